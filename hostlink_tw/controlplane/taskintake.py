"""
What the control plane does with each ``task.received``, ``task.started``,
``task.output`` and ``task.final`` an agent sends (PROTOCOL §7.4, §7.5):
:class:`TaskIntake`.

* The payload is read with :func:`~hostlink_tw.wire.tasks.phase2_payload`;
  an invalid one is refused as every invalid frame is (``error``, close 1008).
* A message of an attempt that is not one of this agent's is acked and
  dropped: acking keeps the agent from sending it forever, and its next
  hello gets the attempt discarded.
* De-duplicated by message id (:class:`~hostlink_tw.controlplane.trackers.DuplicateTracker`,
  per agent, in memory) and, across restarts, by what the store holds: an
  output sequence already stored, a final already stored (by message id, or
  any final of the same attempt).  A repeat is acked again and changes nothing.
* Output is judged per (attempt, stream) by an
  :class:`~hostlink_tw.controlplane.trackers.OutputSequenceTracker`
  seeded from the store (:class:`OutputPositions`): the next sequence is
  stored, then acked with ``highest_output_sequence``; an old one is acked
  again; one past the next is answered with a retryable ``error``
  ``output_sequence_gap`` carrying ``highest_accepted_sequence``.
* Every stored message is acked (``ack``: ``acked_message_id``,
  ``acked_type``, the task ids in the envelope and the payload) only once
  it is stored.  A test layer may hold acks back (:class:`AckGate`).
* Output is stored and acked per batch (:meth:`TaskIntake.batch`: the
  gateway makes each read of a connection one batch): the chunks a read
  brings are stored in one transaction, then acked with one cumulative
  ``ack`` per (attempt, stream) -- the id of its last message and
  ``highest_output_sequence`` (PROTOCOL §7.5).  Any other message of the
  connection, and a gap, first stores and acks the batch so far: a final's
  ack never precedes the chunks before it, and the answers keep their order.
* The store failing is one retryable ``error`` ``store_unavailable`` (for
  a failed batch: about its first message), no ack: the agent keeps the
  messages and replays them on its next connection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

from hostlink_tw.controlplane.inbound import InboundConnection, ack_envelope
from hostlink_tw.controlplane.sessions import NoSessionError, Session
from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.taskmodel import (
    ATTEMPT_RECEIVED,
    ATTEMPT_RUNNING,
    AttemptRecord,
    OutputChunk,
    TaskRecord,
)
from hostlink_tw.controlplane.taskstore import TaskStore, TaskStoreError
from hostlink_tw.controlplane.trackers import (
    SEQUENCE_DUPLICATE,
    SEQUENCE_GAP,
    DuplicateTracker,
    OutputSequenceTracker,
    SequenceVerdict,
)
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.errors import ProtocolError
from hostlink_tw.wire.payloads import (
    TaskFinalPayload,
    TaskOutputPayload,
    error_payload,
)
from hostlink_tw.wire.tasks import phase2_payload
from hostlink_tw.wire.vocabulary import (
    CLOSE_POLICY,
    ERROR,
    TASK_RECEIVED,
    TASK_STARTED,
)

__all__ = [
    "OUTPUT_SEQUENCE_GAP",
    "STORE_UNAVAILABLE",
    "AckGate",
    "IntakeEvents",
    "OutputPositions",
    "TaskIntake",
]

log = Logger()

#: ``error`` codes this control plane sends.
OUTPUT_SEQUENCE_GAP = "output_sequence_gap"
STORE_UNAVAILABLE = "store_unavailable"

#: Message ids remembered for de-duplication, all agents together.
SEEN_MESSAGES = 100_000
#: (attempt, stream) positions kept in memory; older ones are read again from the store.
POSITIONS_KEPT = 1000


class IntakeEvents(Protocol):
    """What the task service learns from the intake."""

    def task_changed(self, record: TaskRecord) -> None:
        """A task's status or flags changed."""

    def output_stored(self, chunk: OutputChunk) -> None:
        """A chunk of output was stored (as stored: possibly cut)."""

    def slot_freed(self, agent_id: str) -> None:
        """An attempt of the agent started or ended: more may be delivered."""


class AckGate(Protocol):
    """Where a test layer may hold the acks of stored messages back."""

    def hold_ack(self, session: Session, envelope: Envelope) -> bool:
        """True: the gate keeps this ack (and sends it later, or never)."""


class OutputPositions:
    """
    The highest sequence accepted per (attempt, stream), judged by an
    :class:`OutputSequenceTracker` and seeded from the store.

    The tracker counts from 0, so each stream is seen through a base: the
    highest the store held when the stream was first looked at here.  Only
    :data:`POSITIONS_KEPT` attempts stay in memory (least recently used
    first out, tracker and bases together); a forgotten one is read again.
    """

    def __init__(self, highest: Callable[[str, str], int], kept: int = POSITIONS_KEPT) -> None:
        """:param highest: ``(attempt_id, stream)`` → the highest sequence stored."""
        self._stored = highest
        self._kept = kept
        # One more than we keep: the tracker never forgets an attempt on its own.
        self._tracker = OutputSequenceTracker(kept + 1)
        self._bases: OrderedDict[str, dict[str, int]] = OrderedDict()

    def _base(self, attempt_id: str, stream: str) -> int:
        streams = self._bases.get(attempt_id)
        if streams is None:
            streams = self._bases[attempt_id] = {}
            if len(self._bases) > self._kept:
                oldest, _ = self._bases.popitem(last=False)
                self._tracker.forget(oldest)
        else:
            self._bases.move_to_end(attempt_id)
        if stream not in streams:
            streams[stream] = self._stored(attempt_id, stream)
        return streams[stream]

    def check(self, attempt_id: str, stream: str, sequence: int) -> SequenceVerdict:
        """Judge ``sequence`` (and record it if accepted); ``expected`` is absolute."""
        base = self._base(attempt_id, stream)
        verdict = self._tracker.check(attempt_id, stream, sequence - base)
        return SequenceVerdict(verdict.status, verdict.expected + base)

    def highest(self, attempt_id: str, stream: str) -> int:
        """The highest sequence accepted for the stream."""
        base = self._base(attempt_id, stream)
        return base + self._tracker.highest(attempt_id, stream)

    def forget(self, attempt_id: str) -> None:
        """Drop what is known of an attempt (the store is read again next time)."""
        self._bases.pop(attempt_id, None)
        self._tracker.forget(attempt_id)


@dataclass(frozen=True)
class _Pending:
    """An output message of a batch, waiting for the batch's commit."""

    session: Session
    envelope: Envelope
    stream: str
    key: str
    #: What to store; None for a repeat (only acked again).
    chunk: OutputChunk | None


class TaskIntake:
    """The handlers of the agent's ``task.*`` messages (see the module docstring)."""

    def __init__(
        self,
        store: TaskStore,
        settings: ControlPlaneSettings,
        clock: Callable[[], float],
        events: IntakeEvents,
        gate: AckGate | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._events = events
        self._gate = gate
        self._seen = DuplicateTracker(SEEN_MESSAGES)
        #: Output positions, seeded from the store.
        self.positions = OutputPositions(store.output.highest)
        #: Connection → the output messages of its open batch.
        self._batches: dict[InboundConnection, list[_Pending]] = {}

    @contextmanager
    def batch(self, connection: InboundConnection) -> Iterator[None]:
        """
        The output of ``connection`` handled inside is stored in one
        transaction and acked when the block ends (or when another message
        of the connection, or a gap, needs it stored first).  Nested: the
        outer block decides.  Outside a batch, each message is one.
        """
        if connection in self._batches:
            yield
            return
        self._batches[connection] = []
        try:
            yield
        finally:
            try:
                self._flush(connection)
            finally:
                del self._batches[connection]

    def handle(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        """Handle one valid ``task.*`` envelope from the agent of ``session``."""
        with self.batch(connection):
            self._handle(connection, session, envelope)

    def _handle(
        self, connection: InboundConnection, session: Session, envelope: Envelope
    ) -> None:
        try:
            payload = phase2_payload(envelope)
        except ProtocolError as e:
            self._flush(connection)
            connection.refuse(CLOSE_POLICY, e.code, e.message, envelope.message_id)
            return
        key = f"{session.agent_id}\n{envelope.message_id}"
        try:
            attempt = self._store.attempt(envelope.execution_attempt_id)
            ours = (
                attempt is not None
                and attempt.task_id == envelope.task_id
                and attempt.agent_id == session.agent_id
            )
            if ours and isinstance(payload, TaskOutputPayload):
                self._output(connection, session, envelope, payload, key)
                return
            self._flush(connection)  # what came before is stored and acked first
            if attempt is None or not ours:
                self._ack(connection, session, envelope)  # not ours: nothing to store
            elif key in self._seen:
                self._ack(connection, session, envelope)
            elif isinstance(payload, TaskFinalPayload):
                self._final(connection, session, envelope, payload, attempt, key)
            elif envelope.type in (TASK_RECEIVED, TASK_STARTED):
                self._progress(connection, session, envelope, attempt, key)
            else:  # task.lease_heartbeat: nothing to record
                self._ack(connection, session, envelope)
        except TaskStoreError as e:
            log.error("task store failed, message not acked: {error}", error=str(e))
            self._error(
                connection, session, envelope, STORE_UNAVAILABLE,
                "the control plane cannot store this message now; replay it later",
            )

    def _progress(
        self,
        connection: InboundConnection,
        session: Session,
        envelope: Envelope,
        attempt: AttemptRecord,
        key: str,
    ) -> None:
        now = self._clock()
        if envelope.type == TASK_STARTED:
            changed = self._store.advance(
                attempt.execution_attempt_id, ATTEMPT_RUNNING, now, started_at=now
            )
        else:
            changed = self._store.advance(attempt.execution_attempt_id, ATTEMPT_RECEIVED, now)
        self._seen.seen(key)
        self._ack(connection, session, envelope)
        if changed is not None:
            self._events.task_changed(changed)
        if envelope.type == TASK_STARTED:
            self._events.slot_freed(session.agent_id)

    def _output(
        self,
        connection: InboundConnection,
        session: Session,
        envelope: Envelope,
        payload: TaskOutputPayload,
        key: str,
    ) -> None:
        """Judge one chunk; a next or repeated one joins the batch, a gap is answered."""
        attempt_id, stream = envelope.execution_attempt_id, payload.stream
        sequence = envelope.sequence
        assert sequence is not None  # Envelope.validate requires it for task.output
        if key in self._seen:
            verdict = SequenceVerdict(SEQUENCE_DUPLICATE, 0)
        else:
            verdict = self.positions.check(attempt_id, stream, sequence)
        if verdict.status == SEQUENCE_GAP:
            self._flush(connection)  # the chunks before the gap are acked first, as ever
            highest = verdict.expected - 1
            self._error(
                connection, session, envelope, OUTPUT_SEQUENCE_GAP,
                f"{stream} sequence {sequence} skips ahead: expected {highest + 1}",
                highest,
            )
            return
        chunk: OutputChunk | None = None
        if verdict.status != SEQUENCE_DUPLICATE:
            chunk = OutputChunk(
                envelope.task_id, attempt_id, stream, sequence, payload.data,
                payload.byte_count, payload.truncated_locally,
            )
        self._batches[connection].append(_Pending(session, envelope, stream, key, chunk))

    def _flush(self, connection: InboundConnection) -> None:
        """
        Store the batch's chunks in one transaction, then ack them: one
        cumulative ack per (attempt, stream), in the order their last
        messages came; then tell the followers, chunk by chunk.
        """
        pending = self._batches.get(connection)
        if not pending:
            return
        self._batches[connection] = []
        chunks = [p.chunk for p in pending if p.chunk is not None]
        try:
            results = (
                self._store.output.append_many(
                    chunks, self._settings.max_output_bytes, self._clock()
                )
                if chunks
                else []
            )
        except TaskStoreError as e:
            for chunk in chunks:  # the tracker counted them: read the store again
                self.positions.forget(chunk.execution_attempt_id)
            log.error("task store failed, output not acked: {error}", error=str(e))
            first = pending[0]
            self._error(
                connection, first.session, first.envelope, STORE_UNAVAILABLE,
                "the control plane cannot store this message now; replay it later",
            )
            return
        for _, flagged in results:
            if flagged is not None:
                self._events.task_changed(flagged)
        last: dict[tuple[str, str], _Pending] = {}
        for p in pending:
            self._seen.seen(p.key)
            stream_key = (p.envelope.execution_attempt_id, p.stream)
            last.pop(stream_key, None)  # ordered by each stream's last message
            last[stream_key] = p
        try:
            for (attempt_id, stream), p in last.items():
                highest = self.positions.highest(attempt_id, stream)
                self._ack(connection, p.session, p.envelope, highest)
        except NoSessionError:  # closed within the read: the agent replays, we ack again
            pass
        for stored, _ in results:
            if stored is not None:
                self._events.output_stored(stored)

    def _final(
        self,
        connection: InboundConnection,
        session: Session,
        envelope: Envelope,
        payload: TaskFinalPayload,
        attempt: AttemptRecord,
        key: str,
    ) -> None:
        stored, changed = self._store.record_final(
            envelope.message_id, attempt.execution_attempt_id, payload, self._clock()
        )
        self._seen.seen(key)
        self._ack(connection, session, envelope)
        if changed is not None:
            self._events.task_changed(changed)
        if stored:
            self._events.slot_freed(session.agent_id)

    # -- answers -----------------------------------------------------------------------

    def _ack(
        self,
        connection: InboundConnection,
        session: Session,
        envelope: Envelope,
        highest: int | None = None,
    ) -> None:
        ack = ack_envelope(session.agent_id, envelope, highest, self._clock())
        if self._gate is not None and self._gate.hold_ack(session, ack):
            return
        connection.send_envelope(ack)

    def _error(
        self,
        connection: InboundConnection,
        session: Session,
        envelope: Envelope,
        code: str,
        message: str,
        highest: int | None = None,
    ) -> None:
        connection.send_envelope(
            make_envelope(
                ERROR,
                session.agent_id,
                error_payload(code, message, True, envelope.message_id, highest),
                now=self._clock(),
                task_id=envelope.task_id,
                execution_attempt_id=envelope.execution_attempt_id,
            )
        )

