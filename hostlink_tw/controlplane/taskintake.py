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
* The store failing is one retryable ``error`` ``store_unavailable``, no
  ack: the agent keeps the message and replays it on its next connection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from twisted.logger import Logger

from hostlink_tw.controlplane.inbound import InboundConnection, ack_envelope
from hostlink_tw.controlplane.sessions import Session
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

    def handle(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        """Handle one valid ``task.*`` envelope from the agent of ``session``."""
        try:
            payload = phase2_payload(envelope)
        except ProtocolError as e:
            connection.refuse(CLOSE_POLICY, e.code, e.message, envelope.message_id)
            return
        key = f"{session.agent_id}\n{envelope.message_id}"
        try:
            attempt = self._store.attempt(envelope.execution_attempt_id)
            if (
                attempt is None
                or attempt.task_id != envelope.task_id
                or attempt.agent_id != session.agent_id
            ):
                self._ack(connection, session, envelope)  # not ours: nothing to store
            elif isinstance(payload, TaskOutputPayload):
                self._output(connection, session, envelope, payload, key)
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
        attempt_id, stream = envelope.execution_attempt_id, payload.stream
        sequence = envelope.sequence
        assert sequence is not None  # Envelope.validate requires it for task.output
        if key in self._seen:
            verdict = SequenceVerdict(SEQUENCE_DUPLICATE, 0)
        else:
            verdict = self.positions.check(attempt_id, stream, sequence)
        if verdict.status == SEQUENCE_GAP:
            highest = verdict.expected - 1
            self._error(
                connection, session, envelope, OUTPUT_SEQUENCE_GAP,
                f"{stream} sequence {sequence} skips ahead: expected {highest + 1}",
                highest,
            )
            return
        stored: OutputChunk | None = None
        if verdict.status != SEQUENCE_DUPLICATE:
            chunk = OutputChunk(
                envelope.task_id, attempt_id, stream, sequence, payload.data,
                payload.byte_count, payload.truncated_locally,
            )
            try:
                stored, flagged = self._store.output.append(
                    chunk, self._settings.max_output_bytes, self._clock()
                )
            except TaskStoreError:
                self.positions.forget(attempt_id)  # the tracker counted it: read the store again
                raise
            if flagged is not None:
                self._events.task_changed(flagged)
        self._seen.seen(key)
        self._ack(connection, session, envelope, self.positions.highest(attempt_id, stream))
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

