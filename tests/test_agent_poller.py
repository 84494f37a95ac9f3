"""The HTTP loops (hostlink_tw.agent.poller.Poller) on a Clock with a fake API."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.httpapi import ControlPlaneHTTPError, PolledTask
from hostlink_tw.agent.poller import Poller
from hostlink_tw.agent.polling import PollingCoordinator

RUN = PolledTask("t1", "", "echo hi", "pending")
DONE = PolledTask("t2", "", "echo hi", "completed")


class FakeAPI:
    def __init__(self) -> None:
        self.polls = 0
        self.heartbeats = 0
        self.poll_answer: Any = [RUN, DONE]
        self.heartbeat_answer: Any = [PolledTask("h1", "a", "true", "pending")]
        self.pending: Deferred[Any] | None = None

    def list_tasks(self) -> Deferred[Any]:
        self.polls += 1
        if self.pending is not None:
            return self.pending
        answer = self.poll_answer
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)

    def heartbeat(self) -> Deferred[Any]:
        self.heartbeats += 1
        return succeed(self.heartbeat_answer)


class PollerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.api = FakeAPI()
        self.offered: list[tuple[str, str]] = []
        self.logged: list[dict[str, Any]] = []
        self.coordinator = PollingCoordinator(self.clock, local_delivery=True, threshold=0,
                                              on_change=lambda p: self.poller.polling_changed(p))
        self.poller = Poller(self.api, self.coordinator, clock=self.clock,  # type: ignore[arg-type]
                             poll_interval=10, heartbeat_interval=5,
                             offer=lambda t, via: self.offered.append((t.task_id, via)),
                             log=Logger(observer=self.logged.append))
        self.poller.start()
        self.addCleanup(self.poller.stop)

    def test_polls_and_heartbeats_on_their_intervals(self) -> None:
        self.assertEqual((self.api.polls, self.api.heartbeats), (1, 1))
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual((self.api.polls, self.api.heartbeats), (2, 3))

    def test_only_runnable_tasks_are_offered_and_heartbeat_tasks_while_polling(self) -> None:
        self.assertIn(("t1", "poll"), self.offered)
        self.assertNotIn(("t2", "poll"), self.offered)
        self.assertIn(("h1", "heartbeat"), self.offered)

    def test_paused_polling_keeps_the_heartbeat_but_not_its_tasks(self) -> None:
        self.coordinator.session_active(True)
        self.offered.clear()
        for _ in range(6):
            self.clock.advance(5)
        self.assertEqual(self.api.polls, 1)
        self.assertEqual(self.api.heartbeats, 7)
        self.assertEqual(self.offered, [])
        self.coordinator.session_ended()  # threshold 0: resumes at once
        self.assertEqual(self.api.polls, 2)
        self.assertIn(("t1", "poll"), self.offered)

    def test_a_slow_poll_is_not_overlapped(self) -> None:
        self.api.pending = Deferred()
        self.clock.advance(10)
        self.assertEqual(self.api.polls, 2)
        self.clock.advance(50)
        self.assertEqual(self.api.polls, 2)
        pending, self.api.pending = self.api.pending, None
        pending.callback([])
        self.clock.advance(10)
        self.assertEqual(self.api.polls, 3)

    def test_errors_logged_once_per_distinct_error_and_loop_goes_on(self) -> None:
        self.api.poll_answer = ControlPlaneHTTPError("HTTP 503", status=503, retryable=True)
        for _ in range(3):
            self.clock.advance(10)
        warned = [e for e in self.logged if e.get("kind") == "poll" and "error" in e]
        self.assertEqual(len(warned), 1)
        self.assertEqual(self.poller.polls["error"], 3)
        self.api.poll_answer = []
        self.clock.advance(10)
        self.assertEqual(self.poller.polls["ok"], 2)
        self.assertTrue(any("works again" in e.get("log_format", "") for e in self.logged))

    def test_an_offer_that_raises_does_not_stop_the_loop(self) -> None:
        def boom(task: PolledTask, via: str) -> None:
            raise RuntimeError("engine bug")

        self.poller._offer = boom
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.api.polls, 3)
        self.flushLoggedErrors(RuntimeError)
