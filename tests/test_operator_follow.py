"""
The operator API's output follower (controlplane/operatorfollow.py): the
real task service and store (in memory), a fake request, time on a clock.

Output and finals are stored the way the intake stores them (the store,
then the service's notification), without a session.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.controlplane import ControlPlane, OutputChunk, UnknownTaskError
from hostlink_tw.controlplane.operatorfollow import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_WAITING,
    POLL_INTERVAL,
    OutputFollower,
)
from hostlink_tw.wire.payloads import TaskFinalPayload

from .test_client_support import AGENT, key


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeRequest:
    """What the follower uses of a twisted.web Request."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self.channel = FakeChannel()
        self._waiters: list[Deferred[None]] = []

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def write(self, data: bytes) -> None:
        assert not self.finished, "written after finish"
        self.written.append(data)

    def finish(self) -> None:
        assert self.producer is None, "finished with a producer registered"
        self.finished = True
        for d in self._waiters:
            d.callback(None)

    def lose(self) -> None:
        """The client went away."""
        if self.producer is not None:
            self.producer.stopProducing()
        for d in self._waiters:
            d.errback(Failure(ConnectionError("gone")))

    def events(self) -> list[dict[str, Any]]:
        text = b"".join(self.written).decode("ascii")
        assert text == "" or text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def output(self) -> list[tuple[str, int, str]]:
        return [(e["stream"], e["sequence"], e["data"]) for e in self.events()
                if e["event"] == "output"]


class FollowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.cp = ControlPlane(
            {AGENT: key().public_key()}, reactor=self.clock, database=False,
            tasks_database=False, clock=self.clock.seconds,
        )
        self.addCleanup(self.cp.tasks.close)
        self.tasks = self.cp.tasks
        self.task = self.tasks.create(AGENT, "echo hi")
        self.request = FakeRequest()

    def follow(self, **options: Any) -> OutputFollower:
        follower = OutputFollower(
            self.request, self.tasks, self.task.task_id, clock=self.clock,  # type: ignore[arg-type]
            **options,
        )
        follower.start()
        return follower

    def output(self, stream: str, sequence: int, data: str, attempt: str | None = None) -> None:
        chunk = OutputChunk(self.task.task_id, attempt or self.task.execution_attempt_id,
                            stream, sequence, data, len(data.encode()))
        stored, _ = self.tasks.store.output.append(chunk, 1 << 20, self.clock.seconds())
        assert stored is not None
        self.tasks.output_stored(stored)

    def advance(self, state: str) -> None:
        changed = self.tasks.store.advance(
            self.task.execution_attempt_id, state, self.clock.seconds()
        )
        assert changed is not None

    def final(self, status: str = "completed", code: int = 0) -> None:
        stored, changed = self.tasks.store.record_final(
            "final-1", self.task.execution_attempt_id, TaskFinalPayload(status, code),
            self.clock.seconds(),
        )
        assert stored and changed is not None
        self.tasks.task_changed(changed)

    def assertNothingLeft(self) -> None:
        """No timer, no subscription, no waiter once the follower is done."""
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.tasks._subscribers, [])
        self.assertEqual(self.tasks._waiters, {})

    # -- streaming and ending ------------------------------------------------------------

    def test_stored_then_live_then_end(self) -> None:
        self.output("stdout", 1, "a\n")
        self.output("stderr", 1, "oops\n")
        self.follow(follow=True)
        self.assertEqual(self.request.headers[b"Content-Type"], b"application/x-ndjson")
        self.assertEqual(self.request.kinds(), ["status", "output", "output"])
        self.output("stdout", 2, "b\n")
        self.assertEqual(self.request.output(),
                         [("stdout", 1, "a\n"), ("stderr", 1, "oops\n"), ("stdout", 2, "b\n")])
        self.assertFalse(self.request.finished)
        self.final("failed", 3)
        self.assertTrue(self.request.finished)
        end = self.request.events()[-1]
        self.assertEqual(end["event"], "end")
        self.assertEqual((end["task"]["status"], end["task"]["exit_code"]), ("failed", 3))
        self.assertTrue(end["task"]["finished"])
        self.assertNothingLeft()

    def test_a_finished_task_ends_at_once(self) -> None:
        self.output("stdout", 1, "x")
        self.final()
        self.follow(follow=True)
        self.assertEqual(self.request.kinds(), ["status", "output", "end"])
        self.assertTrue(self.request.finished)
        self.assertNothingLeft()

    def test_without_follow_the_stored_output_then_the_end(self) -> None:
        self.advance("running")
        self.output("stdout", 1, "x")
        self.follow(follow=False)
        self.assertEqual(self.request.kinds(), ["status", "output", "end"])
        self.assertEqual(self.request.events()[-1]["task"]["status"], "running")
        self.assertNothingLeft()

    def test_unknown_task_sends_nothing(self) -> None:
        follower = OutputFollower(self.request, self.tasks, "task-nope",  # type: ignore[arg-type]
                                  clock=self.clock)
        self.assertRaises(UnknownTaskError, follower.start)
        self.assertEqual(self.request.written, [])
        self.assertIsNone(self.request.producer)

    # -- resuming ----------------------------------------------------------------------

    def test_resume_after_the_last_sequences(self) -> None:
        for n in (1, 2, 3):
            self.output("stdout", n, f"o{n}")
        self.output("stderr", 1, "e1")
        self.follow(attempt=self.task.execution_attempt_id, after={"stdout": 2, "stderr": 0})
        self.assertEqual(self.request.output(), [("stdout", 3, "o3"), ("stderr", 1, "e1")])

    def test_resume_of_another_attempt_starts_from_the_first_chunk(self) -> None:
        self.output("stdout", 1, "o1")
        self.output("stdout", 2, "o2")
        self.follow(attempt="attempt-old", after={"stdout": 2})
        self.assertEqual(self.request.output(), [("stdout", 1, "o1"), ("stdout", 2, "o2")])

    def test_a_new_attempt_is_announced_and_streamed_from_its_start(self) -> None:
        self.output("stdout", 1, "old")
        self.follow()
        new = self.cp.new_attempt(self.task.task_id)
        self.task = new
        self.output("stdout", 1, "new")
        self.clock.advance(POLL_INTERVAL)
        status = [e for e in self.request.events() if e["event"] == "status"][-1]
        self.assertEqual(status["task"]["execution_attempt_id"], new.execution_attempt_id)
        self.assertEqual(self.request.output(), [("stdout", 1, "old"), ("stdout", 1, "new")])
        attempts = [e["execution_attempt_id"] for e in self.request.events()
                    if e["event"] == "output"]
        self.assertEqual(attempts[-1], new.execution_attempt_id)

    # -- status and heartbeats ------------------------------------------------------------

    def test_status_changes_are_sent(self) -> None:
        self.follow()
        self.advance("delivered")
        self.clock.advance(POLL_INTERVAL)
        self.advance("running")
        self.clock.advance(POLL_INTERVAL)
        statuses = [e["task"]["status"] for e in self.request.events() if e["event"] == "status"]
        self.assertEqual(statuses, ["pending", "delivered", "running"])

    def test_heartbeats_every_second_while_waiting_for_delivery(self) -> None:
        self.follow()
        self.clock.pump([POLL_INTERVAL] * int(3 * HEARTBEAT_WAITING / POLL_INTERVAL))
        self.assertEqual(self.request.kinds().count("heartbeat"), 3)

    def test_heartbeats_slow_down_once_the_task_runs(self) -> None:
        self.advance("running")
        self.follow()
        self.clock.pump([POLL_INTERVAL] * int((HEARTBEAT_INTERVAL - 1) / POLL_INTERVAL))
        self.assertNotIn("heartbeat", self.request.kinds())
        self.clock.pump([POLL_INTERVAL] * int(1 / POLL_INTERVAL))
        self.assertEqual(self.request.kinds().count("heartbeat"), 1)

    # -- flow control --------------------------------------------------------------------

    def test_nothing_is_written_while_paused(self) -> None:
        follower = self.follow()
        follower.pauseProducing()
        before = len(self.request.written)
        self.output("stdout", 1, "a")
        self.advance("running")
        self.clock.pump([POLL_INTERVAL] * 40)
        self.assertEqual(len(self.request.written), before)
        follower.resumeProducing()
        self.assertEqual(self.request.output(), [("stdout", 1, "a")])
        statuses = [e["task"]["status"] for e in self.request.events() if e["event"] == "status"]
        self.assertEqual(statuses, ["pending", "running"])

    def test_a_slow_reader_is_caught_up_from_the_store(self) -> None:
        """Past the limit live chunks are not queued; every chunk still arrives once, in order."""
        follower = self.follow(max_buffered_bytes=10)
        follower.pauseProducing()
        for n in range(1, 21):
            self.output("stdout", n, f"chunk {n:02}\n")
            # Queued: at most the limit and one chunk more.
            self.assertLessEqual(len(follower._pending), 2)
        self.final()
        self.assertFalse(self.request.finished)
        follower.resumeProducing()
        self.assertEqual(self.request.output(),
                         [("stdout", n, f"chunk {n:02}\n") for n in range(1, 21)])
        self.assertTrue(self.request.finished)
        self.assertNothingLeft()

    def test_pause_mid_stream_resumes_where_it_stopped(self) -> None:
        for n in range(1, 6):
            self.output("stdout", n, str(n))
        request = self.request
        original = request.write

        def write_and_pause(data: bytes) -> None:
            original(data)
            if len(request.written) == 3 and request.producer is not None:
                request.producer.pauseProducing()

        request.write = write_and_pause  # type: ignore[method-assign]
        follower = self.follow()
        self.assertEqual([s for _, s, _ in request.output()], [1, 2])
        follower.resumeProducing()
        self.assertEqual([s for _, s, _ in request.output()], [1, 2, 3, 4, 5])

    # -- the client or the control plane goes away ---------------------------------------------

    def test_client_gone_leaves_nothing_behind(self) -> None:
        self.follow()
        self.request.lose()
        self.assertNothingLeft()
        before = len(self.request.written)
        self.output("stdout", 1, "late")
        self.clock.pump([POLL_INTERVAL] * 30)
        self.assertEqual(len(self.request.written), before)

    def test_control_plane_stopping_is_quiet(self) -> None:
        self.follow()
        self.tasks.stop()  # what ControlPlane.stop does first: waiters cancelled
        self.assertEqual(self.flushLoggedErrors(), [])
        self.request.lose()  # then its connections are dropped
        self.assertNothingLeft()

    def test_store_closed_under_the_follower_aborts_the_connection(self) -> None:
        self.follow()
        self.tasks.close()
        self.clock.advance(POLL_INTERVAL)
        self.assertTrue(self.request.channel.transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
