"""The task engine (hostlink_tw.agent.tasks): PROTOCOL §7–§8 from the agent's side.

A real store on its thread, a fake runner and channel, a real Session whose
sends are captured; the engine's clock is a ``Clock``.  Each rule has a test
that fails without it: every row of §8.2's table, replay order, cumulative
acks, gap re-sends, discarded attempts, the hello snapshot, spool
backpressure, recovery and the retention purge.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from hostlink_tw.agent.session import Session, ViolationError
from hostlink_tw.agent.spool import store_limit
from hostlink_tw.agent.store import TaskStore
from hostlink_tw.agent.tasks import TaskEngine, TaskSettings
from hostlink_tw.agent.tasksnapshot import process_identity
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.hello import (
    DiscardedAttempt,
    HelloAckDirectives,
    HelloSnapshot,
    OutputReplay,
    hello_ack_payload,
)
from hostlink_tw.wire.payloads import ack_payload, error_payload
from hostlink_tw.wire.tasks import interrupted_final_message_id
from hostlink_tw.wire.vocabulary import (
    ACK,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_DELIVER,
    TASK_FINAL,
    TASK_OUTPUT,
    TASK_RECEIVED,
    TASK_STARTED,
)

AGENT = "agent-1"


@dataclass(frozen=True)
class Spec:
    task_id: str
    attempt_id: str
    command: str


@dataclass(frozen=True)
class Result:
    status: str = "completed"
    exit_code: int = 0
    duration: float = 0.5
    output: str = "done"

    def final_payload(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.exit_code, "output": self.output,
                "output_truncated": False, "error_truncated": False}


class FakeRunner:
    def __init__(self) -> None:
        self.submitted: list[Spec] = []
        self.discarded: list[tuple[str, str]] = []
        self.paused = False
        self.pauses = 0

    def submit(self, spec: Spec) -> None:
        self.submitted.append(spec)

    def discard(self, task_id: str, attempt_id: str) -> bool:
        self.discarded.append((task_id, attempt_id))
        return True

    def pause_output(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_output(self) -> None:
        self.paused = False

    def running_tasks(self) -> list[Any]:
        return []

    def queued(self) -> list[Any]:
        return []


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []
        self.open = True

    def send_if_open(self, envelope: Envelope) -> bool:
        if self.open:
            self.sent.append(envelope)
        return self.open


def deliver(task: str, attempt: str, command: str = "echo hi", mid: str = "") -> Envelope:
    return make_envelope(TASK_DELIVER, AGENT, {"command": command}, now=0,
                         message_id=mid or f"d-{task}-{attempt}", task_id=task,
                         execution_attempt_id=attempt)


class EngineTestCase(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "task_store.db")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.channel = FakeChannel()
        self.wire: list[Envelope] = []

    @inlineCallbacks
    def engine(self, clock: Any = None, **settings: Any) -> Any:
        values: dict[str, Any] = {"delivery_enabled": True, "results_enabled": True}
        values.update(settings)
        store = TaskStore(self.path)
        engine = TaskEngine(store, TaskSettings(**values), agent_id=AGENT,
                            clock=clock or self.clock, make_spec=Spec, boot_id="boot-test")
        self.runner = FakeRunner()
        engine.attach_runner(self.runner)
        yield engine.start()
        self.addCleanup(engine.close)
        return engine

    def session(self, engine: TaskEngine, **directives: Any) -> Session:
        ack = make_envelope(
            AGENT_HELLO_ACK, AGENT,
            hello_ack_payload(HelloAckDirectives("hello-1", "agent.hello", **directives)),
            now=0,
        )
        session = Session("hello-1", self.wire.append, lambda e: None, hello_ack=ack)
        engine.session_started(session)
        return session

    @inlineCallbacks
    def settle(self, engine: TaskEngine) -> Any:
        for _ in range(4):
            yield engine.pending_writes()
            yield engine.outbox.when_idle()

    def types(self, envelopes: list[Envelope] | None = None) -> list[str]:
        return [e.type for e in (self.channel.sent if envelopes is None else envelopes)]

    def ack(self, session: Session, message_id: str, kind: str = TASK_OUTPUT,
            highest: int | None = None) -> None:
        session.handle(make_envelope(ACK, AGENT, ack_payload(message_id, kind,
                                                                highest_output_sequence=highest),
                                     now=0))

    @inlineCallbacks
    def run_one(self, engine: TaskEngine, task: str, attempt: str, chunks: list[bytes],
                result: Result | None = None) -> Any:
        """Receive, start and (unless ``result`` is None) end one attempt."""
        engine.delivered(deliver(task, attempt), self.channel)
        yield self.settle(engine)
        spec = Spec(task, attempt, "echo hi")
        ok = yield engine.before_start(spec)
        self.assertTrue(ok)
        engine.started(spec, 0)
        for chunk in chunks:
            engine.output(spec, "stdout", chunk, False)
        if result is not None:
            engine.ended(spec, result)
        yield self.settle(engine)


class ReceiptTableTests(EngineTestCase):
    """PROTOCOL §8.2, one test per row."""

    @inlineCallbacks
    def test_unknown_is_received_and_queued_after_the_first_hello_ack(self) -> Any:
        engine = yield self.engine()
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        self.assertEqual(self.types(), [TASK_RECEIVED])
        self.assertEqual(self.channel.sent[0].task_id, "t1")
        self.assertEqual(self.runner.submitted, [])  # held until the first hello_ack
        self.session(engine)
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [Spec("t1", "a1", "echo hi")])

    @inlineCallbacks
    def test_received_not_started_stays_queued_once(self) -> Any:
        engine = yield self.engine()
        self.session(engine)
        engine.delivered(deliver("t1", "a1"), self.channel)
        engine.delivered(deliver("t1", "a1", mid="again"), self.channel)
        yield self.settle(engine)
        self.assertEqual(self.types(), [TASK_RECEIVED, TASK_RECEIVED])
        self.assertEqual(len(self.runner.submitted), 1)

    @inlineCallbacks
    def test_running_answers_started(self) -> Any:
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [], None)
        self.assertEqual(self.types(self.wire), [TASK_STARTED])
        engine.delivered(deliver("t1", "a1", mid="again"), self.channel)
        yield self.settle(engine)
        self.assertEqual(self.types(), [TASK_RECEIVED, TASK_STARTED])
        self.assertEqual(len(self.runner.submitted), 1)
        del session

    @inlineCallbacks
    def test_ended_unacked_answers_the_same_final(self) -> Any:
        engine = yield self.engine()
        self.session(engine)
        yield self.run_one(engine, "t1", "a1", [], Result())
        (final,) = [e for e in self.wire if e.type == TASK_FINAL]
        engine.delivered(deliver("t1", "a1", mid="again"), self.channel)
        yield self.settle(engine)
        finals = [e for e in self.wire if e.type == TASK_FINAL]
        self.assertEqual([f.message_id for f in finals], [final.message_id] * 2)
        self.assertEqual(finals[1].payload, final.payload)
        self.assertEqual(len(self.runner.submitted), 1)

    @inlineCallbacks
    def test_ended_acked_answers_the_same_final_again(self) -> Any:
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [], Result())
        (final,) = [e for e in self.wire if e.type == TASK_FINAL]
        self.ack(session, final.message_id, TASK_FINAL)
        yield self.settle(engine)
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual(snapshot.unacked_finals, ())
        engine.delivered(deliver("t1", "a1", mid="again"), self.channel)
        yield self.settle(engine)
        finals = [e for e in self.wire if e.type == TASK_FINAL]
        self.assertEqual([f.message_id for f in finals], [final.message_id] * 2)

    @inlineCallbacks
    def test_delivery_disabled_is_an_error_and_nothing_recorded(self) -> Any:
        engine = yield self.engine(delivery_enabled=False)
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        (error,) = self.channel.sent
        self.assertEqual(error.type, ERROR)
        self.assertEqual(error.payload["code"], "delivery_disabled")
        self.assertIs(error.payload["retryable"], False)
        self.assertEqual(error.payload["related_message_id"], "d-t1-a1")
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual(snapshot.received_not_started, ())

    @inlineCallbacks
    def test_queue_full_is_retryable_and_nothing_recorded(self) -> Any:
        engine = yield self.engine(queue_limit=2)
        for n in range(3):
            engine.delivered(deliver("t", f"a{n}"), self.channel)
        yield self.settle(engine)
        self.assertEqual(self.types(), [TASK_RECEIVED, TASK_RECEIVED, ERROR])
        self.assertEqual(self.channel.sent[2].payload["code"], "queue_full")
        self.assertIs(self.channel.sent[2].payload["retryable"], True)
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual([r.execution_attempt_id for r in snapshot.received_not_started],
                         ["a0", "a1"])

    @inlineCallbacks
    def test_store_unavailable(self) -> Any:
        with open(self.path, "wb") as f:
            f.write(b"not a database" * 100)
        os.chmod(self.path, 0o600)
        engine = yield self.engine()
        self.assertFalse(engine.available)
        self.assertIn(self.path, engine.problem or "")
        engine.delivered(deliver("t1", "a1"), self.channel)
        (error,) = self.channel.sent
        self.assertEqual(error.payload["code"], "store_unavailable")
        self.assertIs(error.payload["retryable"], True)
        payload = yield engine.hello_payload()
        self.assertTrue(HelloSnapshot.from_dict(payload).capabilities.delivery_enabled)

    @inlineCallbacks
    def test_deliveries_recorded_at_once_are_bounded(self) -> Any:
        from hostlink_tw.agent import tasks

        self.patch(tasks, "MAX_RECEIPTS_IN_FLIGHT", 1)
        engine = yield self.engine()
        engine.delivered(deliver("t1", "a1"), self.channel)
        engine.delivered(deliver("t2", "a2"), self.channel)  # the first is still in flight
        yield self.settle(engine)
        self.assertEqual(sorted(self.types()), [ERROR, TASK_RECEIVED])
        (error,) = [e for e in self.channel.sent if e.type == ERROR]
        self.assertEqual((error.payload["code"], error.payload["retryable"]),
                         ("queue_full", True))

    @inlineCallbacks
    def test_queued_attempts_do_not_run_once_delivery_is_off(self) -> Any:
        engine = yield self.engine()
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        yield engine.close()
        again = yield self.engine(delivery_enabled=False)
        self.session(again)
        yield self.settle(again)
        self.assertEqual(self.runner.submitted, [])
        snap = HelloSnapshot.from_dict((yield again.hello_payload()))
        self.assertEqual([r.task_id for r in snap.received_not_started], ["t1"])

    @inlineCallbacks
    def test_invalid_deliver_ends_the_connection(self) -> Any:
        engine = yield self.engine()
        bad = make_envelope(TASK_DELIVER, AGENT, {"command": 5}, now=0, task_id="t",
                            execution_attempt_id="a")
        self.assertRaises(ViolationError, engine.delivered, bad, self.channel)
        no_ids = make_envelope(TASK_DELIVER, AGENT, {"command": "x"}, now=0)
        self.assertRaises(ViolationError, engine.delivered, no_ids, self.channel)


class ReplayTests(EngineTestCase):
    @inlineCallbacks
    def test_replay_before_live_in_sequence_order(self) -> Any:
        """Stored while offline, sent on activation before anything newer (§8.6)."""
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [b"one", b"two"], None)
        self.assertEqual(self.wire, [])
        self.clock.advance(1)
        session = self.session(engine)
        self.clock.advance(1)
        spec = Spec("t1", "a1", "echo hi")
        engine.output(spec, "stdout", b"three", False)  # live, during the replay
        yield self.settle(engine)
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.assertEqual([e.sequence for e in outputs], [1, 2, 3])
        self.assertEqual([e.payload["data"] for e in outputs], ["one", "two", "three"])
        self.assertEqual(engine.outbox.sent["replay"], 2)
        self.assertEqual(engine.outbox.sent["live"], 1)
        del session

    @inlineCallbacks
    def test_same_id_and_payload_on_every_replay(self) -> Any:
        engine = yield self.engine()
        first = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"x"], Result())
        sent_first = [(e.message_id, dict(e.payload)) for e in self.wire
                      if e.type in (TASK_OUTPUT, TASK_FINAL)]
        first.end("gone")
        engine.session_ended(first, "gone")
        self.wire.clear()
        self.session(engine)
        yield self.settle(engine)
        again = [(e.message_id, dict(e.payload)) for e in self.wire]
        self.assertEqual(again, sent_first)

    @inlineCallbacks
    def test_output_replay_directive_skips_what_the_peer_has(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [b"1", b"2", b"3"], None)
        self.session(engine, output_replay=(OutputReplay("t1", "a1", "stdout", 3),))
        yield self.settle(engine)
        self.assertEqual([e.sequence for e in self.wire if e.type == TASK_OUTPUT], [3])
        self.assertEqual(engine.spool_bytes, 1)

    @inlineCallbacks
    def test_results_disabled_the_result_goes_by_http(self) -> Any:
        """§9.2: with results off the final is owed to the HTTP report, not
        the session: neither sent nor listed in the hello, its output not stored."""
        engine = yield self.engine(results_enabled=False)
        self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"x"], Result())
        self.assertEqual([e.type for e in self.wire], [TASK_STARTED])
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual(len(snapshot.unacked_finals), 0)
        self.assertEqual(len(snapshot.unacked_output), 0)
        owed = yield engine.store.http_finals()
        self.assertEqual([(m.task_id, m.attempt_id) for m in owed], [("t1", "a1")])


class AckTests(EngineTestCase):
    @inlineCallbacks
    def test_cumulative_ack(self) -> Any:
        """An ack with highest_output_sequence acks the stream up to it (§7.5)."""
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"aa", b"bb", b"cc"], None)
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.assertEqual(engine.spool_bytes, 6)
        self.ack(session, outputs[1].message_id, highest=2)
        yield self.settle(engine)
        self.assertEqual(engine.spool_bytes, 2)
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        ((first, last),) = [(r.first_sequence, r.last_sequence) for r in snapshot.unacked_output]
        self.assertEqual((first, last), (3, 3))

    @inlineCallbacks
    def test_ack_without_highest_acks_one(self) -> Any:
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"aa", b"bb", b"cc"], None)
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.ack(session, outputs[1].message_id)
        yield self.settle(engine)
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        ranges = [(r.first_sequence, r.last_sequence) for r in snapshot.unacked_output]
        self.assertEqual(ranges, [(1, 1), (3, 3)])

    @inlineCallbacks
    def test_acks_of_receipts_and_starts_skip_the_store(self) -> Any:
        """task.received and task.started are never stored: their acks cost no store call."""
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"aa"], None)
        calls: list[object] = []
        ack_messages = engine.store.ack_messages

        def counted(acks: Any) -> Any:
            calls.append(acks)
            return ack_messages(acks)

        engine.store.ack_messages = counted  # type: ignore[method-assign]
        for kind in (TASK_RECEIVED, TASK_STARTED):
            self.ack(session, f"{kind}-id", kind)
        yield self.settle(engine)
        self.assertEqual(calls, [])
        (output,) = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.ack(session, output.message_id)
        yield self.settle(engine)
        self.assertEqual(calls, [[(output.message_id, None)]])
        self.assertEqual(engine.spool_bytes, 0)

    @inlineCallbacks
    def test_gap_error_resends_the_stream_above_in_order(self) -> Any:
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"1", b"2", b"3", b"4"], None)
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.wire.clear()
        session.handle(make_envelope(
            ERROR, AGENT,
            error_payload("output_sequence_gap", "gap", True,
                          related_message_id=outputs[2].message_id,
                          highest_accepted_sequence=1),
            now=0,
        ))
        yield self.settle(engine)
        resent = [(e.sequence, e.message_id) for e in self.wire]
        self.assertEqual(resent, [(o.sequence, o.message_id) for o in outputs[1:]])
        self.assertEqual(engine.outbox.sent["gap"], 3)


    @inlineCallbacks
    def test_a_burst_of_gap_errors_resends_the_stream_once(self) -> Any:
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"1", b"2", b"3", b"4"], None)
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.wire.clear()
        engine.outbox._pumping = True  # hold the sender while the burst arrives
        for highest in (2, 1, 3):
            engine.outbox.resend("t1", "a1", "stdout", highest)
        engine.outbox._pumping = False
        engine.outbox.nudge()
        yield self.settle(engine)
        self.assertEqual([e.sequence for e in self.wire], [2, 3, 4])
        del session, outputs


class DirectiveTests(EngineTestCase):
    @inlineCallbacks
    def test_acknowledged_finals_are_not_replayed(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [], Result())
        yield self.run_one(engine, "t2", "a2", [], Result())
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        ids = [f.message_id for f in snapshot.unacked_finals]
        self.assertEqual(len(ids), 2)
        self.session(engine, acknowledged_final_message_ids=(ids[0],))
        yield self.settle(engine)
        self.assertEqual([e.message_id for e in self.wire if e.type == TASK_FINAL], [ids[1]])

    @inlineCallbacks
    def test_discarded_queued_never_runs_running_is_killed_without_final(self) -> Any:
        engine = yield self.engine()
        engine.delivered(deliver("q", "a"), self.channel)  # queued, held
        yield self.run_one(engine, "r", "a", [b"out"], None)  # running, output unacked
        self.runner.submitted.clear()
        self.session(engine, discarded_attempts=(
            DiscardedAttempt("q", "a", "cancelled"), DiscardedAttempt("r", "a", "reassigned"),
        ))
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [])
        self.assertEqual(sorted(self.runner.discarded), [("q", "a"), ("r", "a")])
        self.assertEqual([e for e in self.wire if e.type in (TASK_OUTPUT, TASK_FINAL)], [])
        # Late output of the killed process is dropped, not stored.
        engine.output(Spec("r", "a", ""), "stdout", b"late", False)
        yield self.settle(engine)
        snapshot = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual((snapshot.running_task, snapshot.unacked_output,
                          snapshot.received_not_started), (None, (), ()))
        # Delivered again, a discarded attempt is unknown: received and queued.
        engine.delivered(deliver("q", "a", mid="again"), self.channel)
        yield self.settle(engine)
        self.assertEqual(self.runner.submitted, [Spec("q", "a", "echo hi")])


class SnapshotTests(EngineTestCase):
    @inlineCallbacks
    def test_hello_snapshot_contents(self) -> Any:
        engine = yield self.engine(spool_cap_bytes=4 * 1024 * 1024)
        yield self.run_one(engine, "done", "a", [b"xy"], Result(status="failed", exit_code=3))
        yield self.run_one(engine, "run", "b", [b"abc", b"de"], None)
        engine.output(Spec("run", "b", ""), "stderr", b"e", False)
        engine.delivered(deliver("wait", "c"), self.channel)
        yield self.settle(engine)
        snap = HelloSnapshot.from_dict((yield engine.hello_payload()))
        self.assertEqual((snap.capabilities.delivery_enabled,
                          snap.capabilities.results_enabled), (True, True))
        assert snap.running_task is not None
        self.assertEqual(snap.running_task.task_id, "run")
        self.assertEqual(snap.running_task.started_at, "2023-11-14T22:13:20Z")
        self.assertEqual((snap.running_task.last_output_sequence.stdout,
                          snap.running_task.last_output_sequence.stderr), (2, 1))
        self.assertEqual([r.task_id for r in snap.received_not_started], ["wait"])
        (final,) = snap.unacked_finals
        self.assertEqual((final.task_id, final.final.status, final.final.exit_code),
                         ("done", "failed", 3))
        ranges = sorted((r.task_id, r.stream, r.first_sequence, r.last_sequence)
                        for r in snap.unacked_output)
        self.assertEqual(ranges, [("done", "stdout", 1, 1), ("run", "stderr", 1, 1),
                                  ("run", "stdout", 1, 2)])
        self.assertEqual(snap.spool_status.byte_cap, 4 * 1024 * 1024)
        final_bytes = len(final.final.to_dict().__repr__())  # not used: exact sum below
        del final_bytes
        self.assertEqual(snap.spool_status.bytes_used, engine.spool_bytes)
        self.assertGreater(snap.spool_status.bytes_used, 2 + 5 + 1)


class SizeTests(EngineTestCase):
    """What leaves fits HOSTLINK_WS_MAX_MESSAGE_BYTES, measured encoded."""

    @inlineCallbacks
    def test_a_final_of_control_bytes_is_cut_to_fit(self) -> Any:
        engine = yield self.engine(max_message_bytes=64 * 1024)
        self.session(engine)
        yield self.run_one(engine, "t", "a", [], Result(output="\x01" * 60_000))
        (final,) = [e for e in self.wire if e.type == TASK_FINAL]
        self.assertLessEqual(len(final.to_json().encode()), 64 * 1024)
        self.assertTrue(final.payload["output_truncated"])

    @inlineCallbacks
    def test_the_hello_fits_and_the_finals_left_out_are_replayed(self) -> Any:
        engine = yield self.engine(max_message_bytes=32 * 1024)
        for n in range(6):
            yield self.run_one(engine, f"t{n}", "a", [], Result(output="x" * 10_000))
        payload = yield engine.hello_payload()
        self.assertLessEqual(len(json.dumps(payload).encode()), 32 * 1024)
        listed = HelloSnapshot.from_dict(payload).unacked_finals
        self.assertLess(len(listed), 6)
        self.session(engine)
        yield self.settle(engine)
        self.assertEqual(len([e for e in self.wire if e.type == TASK_FINAL]), 6)


class SpoolTests(EngineTestCase):
    @inlineCallbacks
    def test_full_spool_pauses_output_and_acks_resume_it(self) -> Any:
        engine = yield self.engine(spool_cap_bytes=8192, terminal_reserve_bytes=1024,
                                   flush_threshold=1024)
        session = self.session(engine)
        yield self.run_one(engine, "t", "a", [b"x" * 1024] * 4, None)
        self.assertFalse(self.runner.paused)
        engine.output(Spec("t", "a", ""), "stdout", b"x" * 1024, False)
        self.assertTrue(self.runner.paused)  # 5120 >= 7168 - 2048
        yield self.settle(engine)
        last = [e for e in self.wire if e.type == TASK_OUTPUT][-1]
        self.ack(session, last.message_id, highest=last.sequence)
        yield self.settle(engine)
        self.assertFalse(self.runner.paused)
        self.assertEqual(engine.spool_bytes, 0)


    @inlineCallbacks
    def test_output_waiting_for_the_store_pauses_output_until_stored(self) -> Any:
        """Memory is bounded too: output read faster than the store commits it
        pauses the pipes (the spool is far from full), and resumes once stored."""
        engine = yield self.engine(flush_threshold=16384)
        self.session(engine)
        yield self.run_one(engine, "t", "a", [b"x"], None)
        limit = store_limit(16384, 1)
        chunk = b"y" * 16384
        for _ in range(limit // len(chunk) - 1):
            engine.output(Spec("t", "a", ""), "stdout", chunk, False)
        self.assertFalse(self.runner.paused)
        engine.output(Spec("t", "a", ""), "stdout", chunk, False)  # the limit reached
        self.assertTrue(self.runner.paused)
        self.assertFalse(engine.output_paused)  # not the spool: the store is behind
        yield self.settle(engine)
        self.assertFalse(self.runner.paused)
        self.assertEqual(engine.spool.unstored, 0)
        self.assertGreaterEqual(engine.spool_bytes, limit)  # stored, unacked: in the spool


class RecoveryTests(EngineTestCase):
    @inlineCallbacks
    def test_restart_kills_the_group_and_finals_interrupted_once(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t", "a", [b"x"], None)
        engine.delivered(deliver("q", "b"), self.channel)
        yield self.settle(engine)
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: (child.poll() is None and child.kill(), child.wait()))
        yield engine.store.set_process("t", "a", child.pid,
                                       process_identity(child.pid, "boot-test"))
        yield engine.close()

        from twisted.internet import reactor

        again = yield self.engine(clock=reactor, kill_grace=2.0)  # the kill waits in real time
        self.assertEqual(child.wait(timeout=5), -signal.SIGTERM)
        snap = HelloSnapshot.from_dict((yield again.hello_payload()))
        self.assertIsNone(snap.running_task)
        (final,) = snap.unacked_finals
        self.assertEqual(final.message_id, interrupted_final_message_id("t", "a"))
        self.assertEqual((final.final.status, final.final.exit_code), ("interrupted", -1))
        self.assertEqual([r.task_id for r in snap.received_not_started], ["q"])
        self.assertEqual(self.runner.submitted, [])
        self.session(again)
        yield self.settle(again)
        self.assertEqual(self.runner.submitted, [Spec("q", "b", "echo hi")])
        yield again.close()

        third = yield self.engine()
        snap = HelloSnapshot.from_dict((yield third.hello_payload()))
        self.assertEqual([f.message_id for f in snap.unacked_finals], [final.message_id])

    @inlineCallbacks
    def test_group_of_another_boot_is_left_alone(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t", "a", [], None)
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: (child.poll() is None and child.kill(), child.wait()))
        yield engine.store.set_process("t", "a", child.pid,
                                       process_identity(child.pid, "another-boot"))
        yield engine.close()
        yield self.engine()
        self.assertIsNone(child.poll())

    @inlineCallbacks
    def test_a_reused_group_id_is_left_alone(self) -> Any:
        """Same boot, same number, another start time: someone else's group now."""
        engine = yield self.engine()
        yield self.run_one(engine, "t", "a", [], None)
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: (child.poll() is None and child.kill(), child.wait()))
        identity = process_identity(child.pid, "boot-test")
        assert identity is not None
        boot, ticks = identity.split(":")
        yield engine.store.set_process("t", "a", child.pid, f"{boot}:{int(ticks) - 1}")
        yield engine.close()
        again = yield self.engine()
        self.assertIsNone(child.poll())
        snap = HelloSnapshot.from_dict((yield again.hello_payload()))
        self.assertEqual([f.final.status for f in snap.unacked_finals], ["interrupted"])


class PurgeTests(EngineTestCase):
    @inlineCallbacks
    def test_retention_purge(self) -> Any:
        engine = yield self.engine(retention=60.0)
        session = self.session(engine)
        yield self.run_one(engine, "t", "a", [b"x"], Result())
        for e in [e for e in self.wire if e.type in (TASK_OUTPUT, TASK_FINAL)]:
            self.ack(session, e.message_id, e.type)
        yield self.settle(engine)
        self.clock.advance(30)
        yield engine.pending_writes()
        engine.delivered(deliver("t", "a", mid="again"), self.channel)
        yield self.settle(engine)
        self.assertEqual(self.types()[-1], TASK_RECEIVED)  # the first receipt's answer
        finals_before = len([e for e in self.wire if e.type == TASK_FINAL])
        self.assertEqual(finals_before, 2)  # still retained: answered with the final
        self.clock.advance(61)
        yield engine._purge_once()
        engine.delivered(deliver("t", "a", mid="third"), self.channel)
        yield self.settle(engine)
        self.assertEqual(len(self.runner.submitted), 2)  # purged: unknown again
