"""
Tasks from the HTTP paths into the engine (PROTOCOL §9.2): one task, one
run, one result, whatever path brings it; the HTTP report of ``http``
attempts with its outcomes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock

from hostlink_tw.agent.httpapi import ControlPlaneHTTPError, PolledTask
from hostlink_tw.agent.httpresults import report_body
from hostlink_tw.agent.reports import FIRST_DELAY, RETRIES
from hostlink_tw.wire.hello import HelloSnapshot
from hostlink_tw.wire.vocabulary import TASK_FINAL, TASK_OUTPUT
from tests.test_agent_tasks import EngineTestCase, Result, Spec, deliver


def polled(task: str, attempt: str = "", command: str = "echo hi") -> PolledTask:
    return PolledTask(task, attempt, command, "pending")


class FakeAPI:
    """``report`` answers from a script: None accepts, an exception fails."""

    def __init__(self, *answers: Exception | None) -> None:
        self.answers = list(answers)
        self.reports: list[tuple[str, dict[str, Any]]] = []

    def report(self, task_id: str, body: dict[str, Any]) -> Deferred[None]:
        self.reports.append((task_id, body))
        answer = self.answers.pop(0) if self.answers else None
        return fail(answer) if answer is not None else succeed(None)


def server_error() -> ControlPlaneHTTPError:
    return ControlPlaneHTTPError("HTTP 503: busy", status=503, retryable=True)


class OfferTests(EngineTestCase):
    @inlineCallbacks
    def test_poll_heartbeat_and_session_run_it_once(self) -> Any:
        engine = yield self.engine()
        engine.offer(polled("t1", "a1"), "poll")
        engine.offer(polled("t1", "a1"), "heartbeat")
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        self.session(engine)
        engine.offer(polled("t1", "a1"), "poll")
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [Spec("t1", "a1", "echo hi")])
        self.assertEqual(engine.offers, {"new": 1, "known": 2})

    @inlineCallbacks
    def test_session_first_then_polls_run_it_once(self) -> Any:
        engine = yield self.engine()
        self.session(engine)
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        engine.offer(polled("t1", "a1"), "heartbeat")
        engine.offer(polled("t1", "a1"), "poll")
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [Spec("t1", "a1", "echo hi")])

    @inlineCallbacks
    def test_an_ended_attempt_polled_again_is_not_run(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [], Result())
        self.runner.submitted.clear()
        engine.offer(polled("t1", "a1"), "poll")
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [])

    @inlineCallbacks
    def test_a_polled_task_runs_without_a_hello_ack(self) -> Any:
        """No session may ever come: a polled task is not held for one."""
        engine = yield self.engine()
        engine.offer(polled("t1"), "poll")
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [Spec("t1", "", "echo hi")])

    @inlineCallbacks
    def test_a_new_attempt_id_runs_again(self) -> Any:
        engine = yield self.engine()
        engine.offer(polled("t1", "a1"), "poll")
        engine.offer(polled("t1", "a2"), "poll")
        yield self.settle(engine)
        self.assertEqual([s.attempt_id for s in self.runner.submitted], ["a1", "a2"])

    @inlineCallbacks
    def test_the_queue_limit_holds_for_polled_tasks(self) -> Any:
        engine = yield self.engine(queue_limit=2)
        for n in range(3):
            engine.offer(polled(f"t{n}"), "poll")
        yield self.settle(engine)
        self.assertEqual(len(self.runner.submitted), 2)
        self.assertEqual(engine.offers["queue_full"], 1)

    @inlineCallbacks
    def test_held_attempts_are_released_by_an_answered_poll(self) -> Any:
        """Received before a restart: held for a hello_ack, or released when
        polling runs and the control plane answered over HTTP."""
        engine = yield self.engine()
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        engine.control_plane_answered(polling=False)
        self.assertEqual(self.runner.submitted, [])
        engine.control_plane_answered(polling=True)
        self.assertEqual(self.runner.submitted, [Spec("t1", "a1", "echo hi")])


class ChannelTests(EngineTestCase):
    @inlineCallbacks
    def run_polled(self, engine: Any, task: str, attempt: str, result: Result) -> Any:
        engine.offer(polled(task, attempt), "poll")
        yield self.settle(engine)
        spec = Spec(task, attempt, "echo hi")
        self.assertTrue((yield engine.before_start(spec)))
        engine.started(spec, 0)
        engine.output(spec, "stdout", b"chunk", False)
        engine.ended(spec, result)
        yield self.settle(engine)
        for _ in range(3):
            yield engine.pending_writes()

    @inlineCallbacks
    def test_without_an_attempt_id_the_result_goes_by_http(self) -> Any:
        engine = yield self.engine()
        api = FakeAPI()
        engine.attach_api(api)
        self.session(engine)
        yield self.run_polled(engine, "t1", "", Result())
        self.assertEqual([e.type for e in self.wire if e.type in (TASK_OUTPUT, TASK_FINAL)], [])
        self.assertEqual(api.reports, [("t1", {"status": "completed", "exit_code": 0,
                                                "output": "done", "output_truncated": False,
                                                "error_truncated": False})])
        self.assertEqual((yield engine.store.http_finals()), [])  # accepted: acked
        self.assertEqual(engine.http_results.reports, {"accepted": 1})
        self.assertEqual(engine.spool_bytes, 0)

    @inlineCallbacks
    def test_with_an_attempt_id_and_results_on_it_goes_by_the_session(self) -> Any:
        engine = yield self.engine()
        api = FakeAPI()
        engine.attach_api(api)
        self.session(engine)
        yield self.run_polled(engine, "t1", "a1", Result())
        self.assertEqual(api.reports, [])
        self.assertEqual([e.type for e in self.wire if e.type in (TASK_OUTPUT, TASK_FINAL)],
                         [TASK_OUTPUT, TASK_FINAL])

    @inlineCallbacks
    def test_the_report_names_its_attempt(self) -> Any:
        engine = yield self.engine(results_enabled=False)
        api = FakeAPI()
        engine.attach_api(api)
        yield self.run_polled(engine, "t1", "a1", Result())
        self.assertEqual(api.reports[0][1]["execution_attempt_id"], "a1")

    @inlineCallbacks
    def test_a_postponed_report_is_sent_again_when_the_control_plane_answers(self) -> Any:
        clock = Clock()
        clock.advance(1_700_000_000)
        engine = yield self.engine(clock=clock)
        api = FakeAPI(*[server_error() for _ in range(RETRIES + 1)])
        engine.attach_api(api)
        d = self.run_polled(engine, "t1", "", Result())
        yield d
        delay = FIRST_DELAY
        for _ in range(RETRIES):
            clock.advance(delay)
            delay *= 2
            yield engine.pending_writes()
        self.assertEqual(len(api.reports), RETRIES + 1)
        self.assertEqual(engine.http_results.reports, {"postponed": 1})
        owed = yield engine.store.http_finals()
        self.assertEqual(len(owed), 1)  # kept in the store
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual(len(snapshot.unacked_finals), 0)  # none of the session's business
        yield engine.http_results.retry_owed()
        self.assertEqual(engine.http_results.reports, {"postponed": 1, "accepted": 1})
        self.assertEqual((yield engine.store.http_finals()), [])

    @inlineCallbacks
    def test_a_refused_report_is_kept_and_not_retried(self) -> Any:
        engine = yield self.engine()
        api = FakeAPI(ControlPlaneHTTPError("HTTP 409: no such attempt", status=409,
                                            retryable=False))
        engine.attach_api(api)
        with self.assertLogs_() as logged:
            yield self.run_polled(engine, "t1", "", Result())
        self.assertEqual(len(api.reports), 1)
        self.assertEqual(engine.http_results.reports, {"refused": 1})
        yield engine.http_results.retry_owed()
        self.assertEqual(len(api.reports), 1)  # not retried
        self.assertTrue(any("HTTP 409" in line and "no such attempt" in line
                            for line in logged))

    @inlineCallbacks
    def test_owed_reports_are_sent_at_start(self) -> Any:
        engine = yield self.engine(results_enabled=False)
        yield self.run_polled(engine, "t1", "", Result())  # no API: owed
        yield engine.close()
        again = yield self.engine_with_api(results_enabled=False)
        for _ in range(10):  # each store read is a round trip behind the retry's
            if self.api.reports:
                break
            yield again.store.http_finals()
        self.assertEqual([t for t, _ in self.api.reports], ["t1"])

    @inlineCallbacks
    def engine_with_api(self, **settings: Any) -> Any:
        from hostlink_tw.agent.store import TaskStore
        from hostlink_tw.agent.tasks import TaskEngine, TaskSettings
        from tests.test_agent_tasks import AGENT, FakeRunner

        values: dict[str, Any] = {"delivery_enabled": True, "results_enabled": True}
        values.update(settings)
        engine = TaskEngine(TaskStore(self.path), TaskSettings(**values), agent_id=AGENT,
                            clock=self.clock, make_spec=Spec, boot_id="boot-test")
        self.api = FakeAPI()
        engine.attach_api(self.api)
        engine.attach_runner(FakeRunner())
        yield engine.start()
        self.addCleanup(engine.close)
        return engine

    def assertLogs_(self) -> Any:
        from contextlib import contextmanager

        from twisted.logger import formatEvent, globalLogPublisher

        @contextmanager
        def capture() -> Any:
            lines: list[str] = []

            def observer(event: dict[str, Any]) -> None:
                lines.append(formatEvent(event))

            globalLogPublisher.addObserver(observer)
            try:
                yield lines
            finally:
                globalLogPublisher.removeObserver(observer)

        return capture()


class BodyTests(EngineTestCase):
    def test_body_without_attempt(self) -> None:
        from hostlink_tw.agent.store import StoredMessage

        m = StoredMessage("m", "t", "", TASK_FINAL, None, None, {"status": "failed",
                                                                  "exit_code": 2}, 1, 0.0,
                          False)
        self.assertEqual(report_body(m), {"status": "failed", "exit_code": 2})
