"""
Tests for the parts of the control plane's task side that need no socket:
the store (L{hostlink_tw.controlplane.taskstore}), the hello directives
(L{hostlink_tw.controlplane.taskhello}, pure), the output positions, and the
task API's refusals and waits on a L{Clock}.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.controlplane import (
    ControlPlane,
    OutputChunk,
    TaskRefusedError,
    TaskStoreError,
    UnknownTaskError,
    start_control_plane,
)
from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.taskhello import plan_hello
from hostlink_tw.controlplane.taskintake import OutputPositions
from hostlink_tw.controlplane.taskmodel import advances, cut_utf8
from hostlink_tw.controlplane.taskstore import TaskStore
from hostlink_tw.controlplane.testlayer import TestControls
from hostlink_tw.wire.hello import (
    Capabilities,
    HelloAckDirectives,
    HelloSnapshot,
    OutputReplay,
    ReceivedAttempt,
    RunningTask,
    StreamSequences,
    UnackedFinal,
    UnackedOutput,
    hello_ack_payload,
)
from hostlink_tw.wire.payloads import TaskFinalPayload
from tests.test_controlplane import KEY_A

AT = "2026-05-01T10:00:00Z"
FINAL = TaskFinalPayload("completed", 0)


def _chunk(sequence: int, data: str, stream: str = "stdout", attempt: str = "a1") -> OutputChunk:
    return OutputChunk("t1", attempt, stream, sequence, data, len(data.encode()))


class StoreTests(SynchronousTestCase):
    def path(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, "tasks.db")

    def test_reopened_file_keeps_tasks_output_and_finals(self) -> None:
        path = self.path()
        store = TaskStore(path)
        store.add_task("t1", "agent", "echo hi", "a1", 1.0)
        store.delivered("a1", 2.0)
        store.output.append(_chunk(1, "hi\n"), 100, 3.0)
        store.record_final("m1", "a1", FINAL, 4.0)
        store.close()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        store = TaskStore(path)
        self.addCleanup(store.close)
        record = store.task("t1")
        assert record is not None
        self.assertEqual((record.status, record.exit_code, record.final), ("completed", 0, FINAL))
        self.assertEqual(store.output.text("a1", "stdout"), "hi\n")
        self.assertEqual(store.final_ids(["m1", "m2"]), {"m1"})
        self.assertEqual(store.attempts("t1")[0].deliveries, 1)
        journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(journal, "wal")

    def test_unusable_files_are_one_clear_error(self) -> None:
        path = self.path()
        open(path, "w").close()
        os.chmod(path, 0o644)
        self.assertIn("chmod 600", str(self.assertRaises(TaskStoreError, TaskStore, path)))
        os.chmod(path, 0o600)
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        error = self.assertRaises(TaskStoreError, TaskStore, path)
        self.assertIn("schema version 99", str(error))
        self.assertIn("not a regular file",
                      str(self.assertRaises(TaskStoreError, TaskStore, os.path.dirname(path))))

    def test_status_only_moves_forward(self) -> None:
        store = TaskStore()
        store.add_task("t1", "agent", "x", "a1", 0.0)
        self.assertEqual(store.advance("a1", "running", 1.0, started_at=1.0).status, "running")
        self.assertIsNone(store.advance("a1", "received", 2.0))
        store.record_final("m1", "a1", TaskFinalPayload("failed", 2), 3.0)
        self.assertEqual(store.record_final("m2", "a1", FINAL, 4.0), (False, None))
        self.assertEqual(store.record_final("m1", "a1", FINAL, 4.0), (False, None))
        record = store.task("t1")
        assert record is not None
        self.assertEqual((record.status, record.exit_code, record.started_at), ("failed", 2, 1.0))
        later = [s for s in ("pending", "received", "completed") if advances("running", s)]
        self.assertEqual(later, ["completed"])
        self.assertFalse(advances("cancelled", "completed"))

    def test_cancel_and_replace_attempt(self) -> None:
        store = TaskStore()
        store.add_task("t1", "agent", "x", "a1", 0.0)
        store.delivered("a1", 1.0)
        replaced = store.replace_attempt("t1", "a2", 2.0)
        self.assertEqual((replaced.execution_attempt_id, replaced.status), ("a2", "pending"))
        self.assertEqual([(a.execution_attempt_id, a.current) for a in store.attempts("t1")],
                         [("a1", False), ("a2", True)])
        self.assertEqual([a.execution_attempt_id for a in store.live_attempts("agent")], ["a1"])
        store.record_final("m1", "a1", FINAL, 3.0)  # the old attempt's: the task is unchanged
        self.assertEqual(store.task("t1").status, "pending")  # type: ignore[union-attr]
        self.assertEqual(store.cancel("t1", 4.0).status, "cancelled")  # type: ignore[union-attr]
        self.assertEqual(store.count_unfinished("agent"), 0)
        self.assertIsNone(store.cancel("nope", 5.0))

    def test_chunks_after_a_position_per_stream_in_arrival_order(self) -> None:
        store = TaskStore()
        store.add_task("t1", "agent", "x", "a1", 0.0)
        for seq, stream in ((1, "stdout"), (1, "stderr"), (2, "stdout"), (2, "stderr"),
                            (3, "stdout")):
            store.output.append(_chunk(seq, f"{stream}{seq}", stream), 1000, 1.0)
        got = [(c.stream, c.sequence) for c in store.output.chunks("a1", {"stdout": 1})]
        self.assertEqual(got, [("stderr", 1), ("stdout", 2), ("stderr", 2), ("stdout", 3)])
        got = [(c.stream, c.sequence)
               for c in store.output.chunks("a1", {"stdout": 3, "stderr": 1})]
        self.assertEqual(got, [("stderr", 2)])
        self.assertEqual(len(store.output.chunks("a1")), 5)

    def test_output_past_the_limit_is_cut_at_a_character(self) -> None:
        store = TaskStore()
        store.add_task("t1", "agent", "x", "a1", 0.0)
        kept, flagged = store.output.append(_chunk(1, "ab€d"), 4, 1.0)  # € is 3 bytes
        self.assertEqual(kept.data if kept else None, "ab")
        self.assertTrue(flagged is not None and flagged.output_truncated)
        self.assertEqual(store.output.append(_chunk(2, "zz"), 4, 1.0), (None, None))
        self.assertEqual(store.output.highest("a1", "stdout"), 2)
        self.assertRaises(TaskStoreError, store.output.append, _chunk(4, "x"), 4, 1.0)
        self.assertEqual(cut_utf8("a€".encode(), 3), "a")
        marked = OutputChunk("t1", "a1", "stderr", 1, "e", 1, truncated_locally=True)
        kept, flagged = store.output.append(marked, 4, 1.0)  # the agent cut it: stored, flagged
        self.assertEqual(kept, marked)
        self.assertTrue(flagged is not None and flagged.error_truncated)

    def test_chunks_after_and_interleaving(self) -> None:
        store = TaskStore()
        store.add_task("t1", "agent", "x", "a1", 0.0)
        for chunk in (_chunk(1, "o1"), _chunk(1, "e1", "stderr"), _chunk(2, "o2")):
            store.output.append(chunk, 100, 1.0)
        self.assertEqual([c.data for c in store.output.chunks("a1")], ["o1", "e1", "o2"])
        self.assertEqual([c.data for c in store.output.chunks("a1", {"stdout": 1})], ["e1", "o2"])

    def test_closed_store_raises_its_own_error(self) -> None:
        store = TaskStore()
        store.close()
        store.close()
        self.assertRaises(TaskStoreError, store.task, "t1")


class _Known:
    """What plan_hello asks, from dictionaries."""

    def __init__(
        self,
        unwanted: dict[str, str] | None = None,
        highest: dict[tuple[str, str], int] | None = None,
        finals: Iterable[str] = (),
        ended: Iterable[str] = (),
    ) -> None:
        self._unwanted = unwanted or {}
        self._highest = highest or {}
        self._finals = set(finals)
        self._ended = set(ended)

    def unwanted(self, task_id: str, attempt_id: str) -> str | None:
        return self._unwanted.get(attempt_id)

    def highest(self, attempt_id: str, stream: str) -> int:
        return self._highest.get((attempt_id, stream), 0)

    def stored_finals(self, message_ids: Iterable[str]) -> set[str]:
        return self._finals & set(message_ids)

    def has_final(self, attempt_id: str) -> bool:
        return attempt_id in self._ended


def _snapshot(**fields: Any) -> HelloSnapshot:
    return HelloSnapshot(Capabilities(True, True), "test", **fields)


def _final(message_id: str, attempt: str) -> UnackedFinal:
    return UnackedFinal(message_id, "t-" + attempt, attempt, FINAL)


class HelloPlanTests(SynchronousTestCase):
    def test_unwanted_attempts_discarded_with_their_reason(self) -> None:
        plan = plan_hello(
            _snapshot(
                running_task=RunningTask("t-a", "a", AT),
                received_not_started=[ReceivedAttempt("t-b", "b", AT),
                                      ReceivedAttempt("t-c", "c", AT)],
                unacked_output=[UnackedOutput("t-a", "a", "stdout", 1, 1)],
            ),
            _Known(unwanted={"a": "task_cancelled", "c": "unknown_attempt"}),
        )
        self.assertEqual([(d.execution_attempt_id, d.reason) for d in plan.discarded_attempts],
                         [("a", "task_cancelled"), ("c", "unknown_attempt")])
        self.assertEqual(plan.output_replay, ())  # nothing is replayed of a discarded attempt
        self.assertEqual(plan.mentioned, {"a", "b", "c"})

    def test_finals_stored_acknowledged_free_ones_adopted(self) -> None:
        plan = plan_hello(
            _snapshot(
                unacked_output=[UnackedOutput("t-s", "s", "stdout", 1, 2)],
                unacked_finals=[_final("m-stored", "x"), _final("m-second", "e"),
                                _final("m-new", "n"), _final("m-streaming", "s"),
                                _final("m-dropped", "d")],
            ),
            _Known(unwanted={"d": "superseded"}, finals=["m-stored"], ended=["e"]),
        )
        self.assertEqual(plan.acknowledged_final_message_ids, ("m-stored", "m-second", "m-new"))
        self.assertEqual([f.message_id for f in plan.adopted_finals], ["m-new"])

    def test_output_replay_from_the_highest_stored(self) -> None:
        plan = plan_hello(
            _snapshot(
                running_task=RunningTask("t-a", "a", AT, StreamSequences(stdout=7, stderr=0)),
                unacked_output=[UnackedOutput("t-a", "a", "stdout", 5, 7)],
            ),
            _Known(highest={("a", "stdout"): 5}),
        )
        self.assertEqual(plan.output_replay, (OutputReplay("t-a", "a", "stdout", 6),
                                              OutputReplay("t-a", "a", "stderr", 1)))
        self.assertEqual(plan.skipped_output, ())

    def test_output_the_agent_no_longer_has_is_given_up(self) -> None:
        plan = plan_hello(
            _snapshot(
                running_task=RunningTask("t-a", "a", AT, StreamSequences(stdout=9, stderr=4)),
                unacked_output=[UnackedOutput("t-a", "a", "stdout", 8, 9)],
            ),
            _Known(highest={("a", "stdout"): 5, ("a", "stderr"): 2}),
        )
        self.assertEqual([(r.stream, r.next_sequence) for r in plan.output_replay],
                         [("stdout", 8), ("stderr", 5)])
        self.assertEqual(plan.skipped_output, (("a", "stdout", 7), ("a", "stderr", 4)))

    def test_directives_are_a_valid_hello_ack(self) -> None:
        plan = plan_hello(_snapshot(unacked_finals=[_final("m", "x")]), _Known(finals=["m"]))
        payload = hello_ack_payload(plan.directives("hello-1", False))
        self.assertEqual(HelloAckDirectives.from_dict(payload),
                         HelloAckDirectives("hello-1", "agent.hello", ("m",)))


class OutputPositionsTests(SynchronousTestCase):
    def test_seeded_from_the_store_and_bounded(self) -> None:
        stored = {("a", "stdout"): 10}
        reads: list[tuple[str, str]] = []

        def highest(attempt: str, stream: str) -> int:
            reads.append((attempt, stream))
            return stored.get((attempt, stream), 0)

        positions = OutputPositions(highest, kept=2)
        verdicts = [positions.check("a", "stdout", n).status for n in (10, 12, 11)]
        self.assertEqual(verdicts, ["duplicate", "gap", "accepted"])
        self.assertEqual(positions.highest("a", "stdout"), 11)
        stored[("a", "stdout")] = 11
        positions.check("b", "stdout", 1)
        positions.check("c", "stdout", 1)  # pushes "a" out: read again when needed
        self.assertEqual(positions.check("a", "stdout", 12).status, "accepted")
        self.assertEqual(reads.count(("a", "stdout")), 2)


class ServiceTests(SynchronousTestCase):
    def service(self, **options: Any) -> Any:
        clock = Clock()
        agents = {"agent-1": KEY_A.public_key()}
        cp = ControlPlane(agents, reactor=clock, database=False, clock=lambda: 100.0, **options)
        self.addCleanup(cp.tasks.close)
        return cp, clock

    def test_refusals_are_clear(self) -> None:
        cp, _ = self.service(max_pending_tasks=1, max_command_bytes=8)
        cases = [("agent-2", "echo", "unknown_agent"), ("agent-1", "", "invalid_command"),
                 ("agent-1", "a\x00b", "invalid_command"),
                 ("agent-1", "\ud800", "invalid_command"),
                 ("agent-1", "echo €€€", "command_too_long")]
        for agent_id, command, code in cases:
            error = self.assertRaises(TaskRefusedError, cp.tasks.create, agent_id, command)
            self.assertEqual(error.code, code, command)
        cp.tasks.create("agent-1", "echo 1")
        error = self.assertRaises(TaskRefusedError, cp.tasks.create, "agent-1", "echo 2")
        self.assertEqual(error.code, "too_many_pending")
        self.assertIn("limit is 1", str(error))
        self.assertRaises(UnknownTaskError, cp.tasks.get, "task-nope")

    def test_created_task_waits_pending(self) -> None:
        cp, _ = self.service()
        task = cp.tasks.create("agent-1", "echo hi")
        self.assertEqual((task.status, task.agent_id, task.command, task.created_at),
                         ("pending", "agent-1", "echo hi", 100.0))
        self.assertEqual(cp.tasks.list("agent-1"), [task])
        self.assertEqual(cp.tasks.list("agent-2"), [])
        self.assertEqual(cp.tasks.output(task.task_id), ("", ""))
        self.assertEqual(task.to_dict()["created_at"], "1970-01-01T00:01:40Z")

    def test_wait_final_fires_on_cancel_and_leaves_no_timer(self) -> None:
        cp, clock = self.service()
        task = cp.tasks.create("agent-1", "echo hi")
        waiting = cp.tasks.wait_final(task.task_id, timeout=30)
        forgotten = cp.tasks.wait_final(task.task_id)
        forgotten.cancel()
        self.failureResultOf(forgotten, defer.CancelledError)
        cp.tasks.cancel(task.task_id)
        self.assertEqual(self.successResultOf(waiting).status, "cancelled")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(cp.tasks.wait_final(task.task_id)).status,
                         "cancelled")
        self.assertEqual(cp.tasks.cancel(task.task_id).status, "cancelled")

    def test_wait_final_timeout(self) -> None:
        cp, clock = self.service()
        task = cp.tasks.create("agent-1", "echo hi")
        waiting = cp.tasks.wait_final(task.task_id, timeout=5)
        clock.advance(5)
        self.failureResultOf(waiting, defer.TimeoutError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels_waits_and_subscriptions(self) -> None:
        cp, _ = self.service()
        task = cp.tasks.create("agent-1", "echo hi")
        waiting = cp.tasks.wait_final(task.task_id)
        seen: list[OutputChunk] = []
        unsubscribe = cp.tasks.on_output(seen.append)
        cp.tasks.output_stored(_chunk(1, "x"))
        unsubscribe()
        cp.tasks.output_stored(_chunk(2, "y"))
        self.assertEqual([c.data for c in seen], ["x"])
        cp.tasks.stop()
        self.failureResultOf(waiting, defer.CancelledError)

    def test_a_failing_subscriber_is_logged_not_raised(self) -> None:
        cp, _ = self.service()
        seen: list[OutputChunk] = []

        def broken(chunk: OutputChunk) -> None:
            raise RuntimeError("subscriber bug")

        cp.tasks.on_output(broken)
        cp.tasks.on_output(seen.append)
        cp.tasks.output_stored(_chunk(1, "x"))
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_new_attempt_refused_for_a_cancelled_task(self) -> None:
        cp, _ = self.service()
        task = cp.tasks.create("agent-1", "echo hi")
        replaced = cp.new_attempt(task.task_id)
        self.assertNotEqual(replaced.execution_attempt_id, task.execution_attempt_id)
        cp.tasks.cancel(task.task_id)
        error = self.assertRaises(TaskRefusedError, cp.new_attempt, task.task_id)
        self.assertEqual(error.code, "task_cancelled")
        self.assertFalse(cp.redeliver(task.task_id))  # no session

    def test_options(self) -> None:
        for name, value in (("max_pending_tasks", 0), ("max_output_bytes", -1),
                            ("delivery_window", 1.5), ("delivery_enabled", "yes")):
            self.assertRaises(ValueError, ControlPlaneSettings, **{name: value})

    def test_database_beside_the_agents_file(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        agents = os.path.join(directory, "agents.json")
        with open(agents, "w") as f:
            f.write("{}")
        cp = ControlPlane(agents_file=agents, reactor=Clock(), database=False, reload_interval=0)
        self.addCleanup(cp.tasks.close)
        self.assertEqual(cp.tasks_database, os.path.join(os.path.abspath(directory), "tasks.db"))
        self.assertTrue(os.path.exists(cp.tasks_database))
        failure = self.failureResultOf(
            start_control_plane({}, reactor=Clock(), database=False, tasks_database=directory),
            TaskStoreError,
        )
        self.assertIn(directory, str(failure.value))


class HeldAcksTests(SynchronousTestCase):
    def test_held_acks_are_bounded(self) -> None:
        from hostlink_tw.controlplane import testlayer

        self.patch(testlayer, "ACKS_HELD_MAX", 2)
        controls = TestControls(Clock())
        session: Any = object()
        self.assertFalse(controls.hold_ack(session, None))  # type: ignore[arg-type]
        controls.hold_acks()
        for _ in range(3):
            self.assertTrue(controls.hold_ack(session, None))  # type: ignore[arg-type]
        self.assertEqual(controls.acks_held, 2)
        self.assertRaises(RuntimeError, controls.redeliver, "task-1")
