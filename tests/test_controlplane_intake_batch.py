"""
Tests for the task intake's batches (L{hostlink_tw.controlplane.taskintake.TaskIntake.batch}):
the output of one read is stored in one transaction, then acked once per
(attempt, stream) with C{highest_output_sequence}; gaps, finals, held acks
and a failing store keep their order and rules.  No socket: an in-memory
store and a connection that records what it is sent.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.controlplane.sessions import Session
from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.taskintake import TaskIntake
from hostlink_tw.controlplane.taskmodel import OutputChunk, TaskRecord
from hostlink_tw.controlplane.taskstore import TaskStore, TaskStoreError
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.payloads import TaskFinalPayload
from hostlink_tw.wire.vocabulary import TASK_FINAL, TASK_OUTPUT

AGENT = "agent-1"


class _Connection:
    """
    Records what it is sent, and per envelope whether the store was
    mid-transaction then and the highest sequence it held for the stream.
    """

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.sent: list[Envelope] = []
        self.in_transaction: list[bool] = []
        self.held: list[int] = []

    def send_envelope(self, envelope: Envelope) -> None:
        self.sent.append(envelope)
        self.in_transaction.append(self._store._db.connection().in_transaction)
        stream = "stdout"
        if envelope.type == "ack" and envelope.payload["acked_type"] == TASK_OUTPUT:
            stream = str(envelope.payload["acked_message_id"]).split("/")[-1]
        self.held.append(self._store.output.highest(envelope.execution_attempt_id, stream))

    def refuse(self, close_code: int, code: str, message: str, related: str) -> None:
        raise AssertionError(f"refused: {code}")


class _Events:
    def __init__(self) -> None:
        self.stored: list[OutputChunk] = []
        self.changed: list[TaskRecord] = []

    def task_changed(self, record: TaskRecord) -> None:
        self.changed.append(record)

    def output_stored(self, chunk: OutputChunk) -> None:
        self.stored.append(chunk)

    def slot_freed(self, agent_id: str) -> None:
        pass


class _Gate:
    def __init__(self) -> None:
        self.holding = False
        self.held: list[Envelope] = []

    def hold_ack(self, session: Session, envelope: Envelope) -> bool:
        if self.holding:
            self.held.append(envelope)
        return self.holding


class BatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = TaskStore()
        self.addCleanup(self.store.close)
        self.store.add_task("t1", AGENT, "echo", "a1", 1.0)
        self.store.add_task("t2", AGENT, "echo", "a2", 1.0)
        self.statements: list[str] = []
        self.store._db.connection().set_trace_callback(self.statements.append)
        self.events = _Events()
        self.gate = _Gate()
        self.intake = TaskIntake(
            self.store, ControlPlaneSettings(), lambda: 100.0, self.events, self.gate
        )
        self.connection = _Connection(self.store)
        self.session: Any = Session(self.connection, AGENT, "127.0.0.1", 1.0)  # type: ignore[arg-type]
        self.ids = 0

    def output(
        self, sequence: int, stream: str = "stdout", attempt: str = "a1", message_id: str = ""
    ) -> Envelope:
        self.ids += 1
        data = f"{attempt}-{stream}-{sequence}\n"
        return make_envelope(
            TASK_OUTPUT, AGENT,
            {"stream": stream, "data": data, "byte_count": len(data)},
            message_id=(message_id or f"m{self.ids}") + "/" + stream,
            task_id="t" + attempt[1:],
            execution_attempt_id=attempt, sequence=sequence,
        )

    def final(self, attempt: str = "a1") -> Envelope:
        return make_envelope(
            TASK_FINAL, AGENT, TaskFinalPayload("completed", 0).to_dict(),
            message_id=f"final-{attempt}", task_id="t" + attempt[1:],
            execution_attempt_id=attempt,
        )

    def read(self, *envelopes: Envelope) -> None:
        """What the gateway does with one read."""
        with self.intake.batch(self.connection):
            for envelope in envelopes:
                self.intake.handle(self.connection, self.session, envelope)

    def commits(self) -> int:
        return sum(1 for s in self.statements if s.startswith("BEGIN"))

    def sent(self) -> list[tuple[str, str, Any]]:
        """(type, related id, highest) of each envelope sent."""
        result = []
        for e in self.connection.sent:
            if e.type == "ack":
                result.append(("ack", e.payload["acked_message_id"].split("/")[0],
                               e.payload.get("highest_output_sequence")))
            else:
                result.append((e.type, e.payload["related_message_id"].split("/")[0],
                               e.payload.get("highest_accepted_sequence")))
        return result

    def test_one_transaction_then_one_cumulative_ack_per_stream(self) -> None:
        envelopes = [self.output(1), self.output(1, "stderr"), self.output(2),
                     self.output(1, attempt="a2"), self.output(3), self.output(2, "stderr")]
        self.statements.clear()
        self.read(*envelopes)
        self.assertEqual(self.commits(), 1)
        # Ordered by each stream's last message; the ids are those last messages.
        self.assertEqual(self.sent(), [("ack", "m4", 1), ("ack", "m5", 3), ("ack", "m6", 2)])
        # Sent once committed: the store held each ack's highest already.
        self.assertEqual(self.connection.in_transaction, [False] * 3)
        self.assertEqual(self.connection.held, [1, 3, 2])
        self.assertEqual(self.store.output.text("a1", "stdout"), "a1-stdout-1\na1-stdout-2\n"
                         "a1-stdout-3\n")
        self.assertEqual([(c.execution_attempt_id, c.stream, c.sequence)
                          for c in self.events.stored],
                         [("a1", "stdout", 1), ("a1", "stderr", 1), ("a1", "stdout", 2),
                          ("a2", "stdout", 1), ("a1", "stdout", 3), ("a1", "stderr", 2)])
        ack = self.connection.sent[1]
        self.assertEqual((ack.task_id, ack.execution_attempt_id, ack.payload["acked_type"]),
                         ("t1", "a1", TASK_OUTPUT))

    def test_outside_a_batch_each_message_is_one(self) -> None:
        self.statements.clear()
        for sequence in (1, 2):
            self.intake.handle(self.connection, self.session, self.output(sequence))
        self.assertEqual(self.commits(), 2)
        self.assertEqual(self.sent(), [("ack", "m1", 1), ("ack", "m2", 2)])

    def test_gap_inside_a_batch(self) -> None:
        self.read(self.output(1), self.output(2), self.output(4), self.output(3))
        # The chunks before the gap are stored and acked before its error, as
        # unbatched; what follows the gap is a new batch.
        self.assertEqual(self.sent(), [("ack", "m2", 2), ("error", "m3", 2), ("ack", "m4", 3)])
        self.assertEqual(self.connection.sent[1].payload["code"], "output_sequence_gap")
        self.assertEqual(self.store.output.highest("a1", "stdout"), 3)

    def test_duplicates_in_and_across_batches(self) -> None:
        self.read(self.output(1, message_id="x1"), self.output(2, message_id="x2"))
        self.statements.clear()
        self.read(self.output(2, message_id="x2"), self.output(1, message_id="y1"),
                  self.output(3, message_id="x3"), self.output(3, message_id="x3"))
        self.assertEqual(self.commits(), 1)
        self.assertEqual(self.sent()[1:], [("ack", "x3", 3)])
        self.assertEqual(self.store.output.text("a1", "stdout"),
                         "a1-stdout-1\na1-stdout-2\na1-stdout-3\n")
        self.assertEqual(len(self.events.stored), 3)
        self.statements.clear()
        self.read(self.output(2, message_id="x2"))  # nothing to store: no transaction
        self.assertEqual(self.commits(), 0)
        self.assertEqual(self.sent()[-1], ("ack", "x2", 3))

    def test_final_acked_after_the_chunks_before_it(self) -> None:
        self.read(self.output(1), self.output(2), self.final(), self.output(3))
        self.assertEqual(self.sent(), [("ack", "m2", 2), ("ack", "final-a1", None),
                                       ("ack", "m3", 3)])
        self.assertEqual(self.connection.in_transaction, [False] * 3)
        self.assertEqual(self.connection.held, [2, 2, 3])

    def test_held_acks_are_the_batch_acks(self) -> None:
        self.gate.holding = True
        self.read(self.output(1), self.output(2), self.output(1, "stderr"))
        self.assertEqual(self.connection.sent, [])
        self.assertEqual([(e.payload["acked_message_id"].split("/")[0],
                           e.payload["highest_output_sequence"])
                          for e in self.gate.held], [("m2", 2), ("m3", 1)])
        self.assertEqual(self.store.output.highest("a1", "stdout"), 2)

    def test_failed_batch_is_not_acked_and_is_taken_again(self) -> None:
        self.read(self.output(1))
        real = self.store.output.append_many

        def failing(*args: Any) -> Any:
            raise TaskStoreError("task store :memory: failed: disk I/O error")

        self.patch(self.store.output, "append_many", failing)
        self.read(self.output(2, message_id="r2"), self.output(3, message_id="r3"))
        self.assertEqual(self.sent()[1:], [("error", "r2", None)])
        self.assertEqual(self.connection.sent[1].payload["code"], "store_unavailable")
        self.assertEqual(self.store.output.highest("a1", "stdout"), 1)
        self.patch(self.store.output, "append_many", real)
        self.read(self.output(2, message_id="r2"), self.output(3, message_id="r3"))
        self.assertEqual(self.sent()[2:], [("ack", "r3", 3)])
        self.assertEqual(self.store.output.highest("a1", "stdout"), 3)
