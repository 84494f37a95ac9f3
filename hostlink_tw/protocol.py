"""
The phase-1 protocol under the import path it has always had.

The code lives in :mod:`hostlink_tw.wire`, one module per concern:

* :mod:`hostlink_tw.wire.vocabulary` — message types, the protocol version,
  the agent-id rule (:data:`AGENT_ID_RULE`, :func:`agent_id_problem`);
* :mod:`hostlink_tw.wire.errors` — :class:`ProtocolError` and its codes;
* :mod:`hostlink_tw.wire.jsontext` — hardened JSON parsing (depth, duplicate
  keys, integer ranges, surrogates);
* :mod:`hostlink_tw.wire.payloads` — the typed payloads and the builders
  :func:`ack_payload` and :func:`error_payload`;
* :mod:`hostlink_tw.wire.envelope` — :class:`Envelope`,
  :func:`parse_envelope`, :func:`make_envelope`, message ids and ``sent_at``.

Every name this module has exported keeps working from here.  The
receive-side trackers (:class:`DuplicateTracker`,
:class:`OutputSequenceTracker`) are the control plane's and are still
defined below until they move there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from hostlink_tw.wire.envelope import (
    Envelope,
    MessageIdGenerator,
    format_sent_at,
    make_envelope,
    new_message_id,
    parse_envelope,
    parse_sent_at,
    typed_payload,
)
from hostlink_tw.wire.errors import (
    AGENT_ID_MISMATCH,
    DUPLICATE_KEY,
    INVALID_ARGUMENT,
    INVALID_FIELD,
    INVALID_JSON,
    INVALID_PAYLOAD,
    INVALID_UTF8,
    MISSING_FIELD,
    NESTING_TOO_DEEP,
    NOT_OBJECT,
    NUMBER_OUT_OF_RANGE,
    UNKNOWN_TYPE,
    UNSUPPORTED_PROTOCOL_VERSION,
    ProtocolError,
)
from hostlink_tw.wire.errors import short_repr as _show
from hostlink_tw.wire.jsontext import MAX_INT_LITERAL_LENGTH, MAX_NESTING_DEPTH
from hostlink_tw.wire.jsontext import is_json_int as _is_int
from hostlink_tw.wire.payloads import (
    FINAL_STATUSES,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAMS,
    AckPayload,
    ErrorPayload,
    TaskFinalPayload,
    TaskOutputPayload,
    TypedPayload,
    ack_payload,
    error_payload,
)
from hostlink_tw.wire.vocabulary import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    AGENT_ID_MAX_LENGTH,
    AGENT_ID_PATTERN,
    AGENT_ID_RULE,
    ERROR,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TASK_DELIVER,
    TASK_FINAL,
    TASK_LEASE_HEARTBEAT,
    TASK_OUTPUT,
    TASK_RECEIVED,
    TASK_STARTED,
    TASK_TYPES,
    agent_id_problem,
)

__all__ = [
    "ACK",
    "AGENT_ID_MAX_LENGTH",
    "AGENT_ID_MISMATCH",
    "AGENT_ID_PATTERN",
    "AGENT_ID_RULE",
    "DUPLICATE_KEY",
    "FINAL_STATUSES",
    "INVALID_ARGUMENT",
    "INVALID_FIELD",
    "INVALID_JSON",
    "INVALID_PAYLOAD",
    "INVALID_UTF8",
    "MAX_INT_LITERAL_LENGTH",
    "MAX_NESTING_DEPTH",
    "MISSING_FIELD",
    "NESTING_TOO_DEEP",
    "NOT_OBJECT",
    "NUMBER_OUT_OF_RANGE",
    "SEQUENCE_ACCEPTED",
    "SEQUENCE_DUPLICATE",
    "SEQUENCE_GAP",
    "STATUS_COMPLETED",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STREAMS",
    "STREAM_STDERR",
    "STREAM_STDOUT",
    "UNKNOWN_TYPE",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "TypedPayload",
    "AGENT_HELLO",
    "AGENT_HELLO_ACK",
    "ERROR",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "TASK_DELIVER",
    "TASK_FINAL",
    "TASK_LEASE_HEARTBEAT",
    "TASK_OUTPUT",
    "TASK_RECEIVED",
    "TASK_STARTED",
    "TASK_TYPES",
    "AckPayload",
    "DuplicateTracker",
    "Envelope",
    "ErrorPayload",
    "MessageIdGenerator",
    "OutputSequenceTracker",
    "ProtocolError",
    "SequenceVerdict",
    "TaskFinalPayload",
    "TaskOutputPayload",
    "ack_payload",
    "agent_id_problem",
    "error_payload",
    "format_sent_at",
    "make_envelope",
    "new_message_id",
    "parse_envelope",
    "parse_sent_at",
    "typed_payload",
]


# --- receive-side trackers ------------------------------------------------------------


class DuplicateTracker:
    """Remember recently seen ``message_id`` values to drop redelivered messages.

    Bounded: past *max_entries* the least recently seen id is forgotten, so a
    long session uses constant memory.  A forgotten id would be accepted
    again, so size the bound well above the number of messages a peer can
    have in flight for redelivery.
    """

    def __init__(self, max_entries: int = 10000) -> None:
        if not _is_int(max_entries) or max_entries < 1:
            raise ProtocolError(
                INVALID_ARGUMENT, f"max_entries must be a positive integer, not {max_entries!r}"
            )
        self.max_entries = max_entries
        self._seen: OrderedDict[str, None] = OrderedDict()

    def seen(self, message_id: str) -> bool:
        """Record *message_id*; return ``True`` if it was already recorded (a repeat)."""
        if message_id in self._seen:
            self._seen.move_to_end(message_id)
            return True
        self._seen[message_id] = None
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return False

    def __contains__(self, message_id: object) -> bool:
        """Return whether *message_id* is currently remembered (without recording it)."""
        return message_id in self._seen

    def __len__(self) -> int:
        """Return how many ids are remembered."""
        return len(self._seen)

    def clear(self) -> None:
        """Forget every id."""
        self._seen.clear()


#: :attr:`SequenceVerdict.status` values.
SEQUENCE_ACCEPTED = "accepted"
SEQUENCE_DUPLICATE = "duplicate"
SEQUENCE_GAP = "gap"


@dataclass(frozen=True)
class SequenceVerdict:
    """The result of :meth:`OutputSequenceTracker.check`.

    :ivar status: ``"accepted"``, ``"duplicate"`` or ``"gap"``.
    :ivar expected: the sequence expected next *after* this check (for an
        accepted one, its successor; for a duplicate or a gap, the one still
        missing).
    """

    status: str
    expected: int

    @property
    def retryable(self) -> bool:
        """A gap is retryable: the sender should resend from :attr:`expected`."""
        return self.status == SEQUENCE_GAP


class OutputSequenceTracker:
    """Track ``task.output`` sequences per (execution attempt, stream) (PROTOCOL §5).

    Sequences start at 1: the highest accepted starts at 0 and the next
    expected is always highest + 1.  A sequence equal to the expected one is
    accepted; a lower one is a duplicate (already accepted); a higher one is a
    gap and is *not* accepted, so the sender must resend from the expected one.

    Bounded: past *max_attempts* execution attempts the least recently used
    one is forgotten (call :meth:`forget` when an attempt ends); output of a
    forgotten attempt is then judged from the start again.
    """

    def __init__(self, max_attempts: int = 1000) -> None:
        if not _is_int(max_attempts) or max_attempts < 1:
            raise ProtocolError(
                INVALID_ARGUMENT,
                f"max_attempts must be a positive integer, not {max_attempts!r}",
            )
        self.max_attempts = max_attempts
        self._highest: OrderedDict[str, dict[str, int]] = OrderedDict()

    def check(self, attempt_id: str, stream: str, sequence: int) -> SequenceVerdict:
        """Judge (and, if accepted, record) one output *sequence*.

        :raises ProtocolError: (:data:`INVALID_ARGUMENT`) for a stream other
            than ``stdout``/``stderr`` or a non-integer sequence.
        """
        if stream not in STREAMS:
            raise ProtocolError(INVALID_ARGUMENT, f"unknown output stream {_show(stream)}")
        if not _is_int(sequence):
            raise ProtocolError(INVALID_ARGUMENT, f"sequence must be an integer: {sequence!r}")
        streams = self._highest.get(attempt_id)
        if streams is None:
            streams = self._highest[attempt_id] = {}
            if len(self._highest) > self.max_attempts:
                self._highest.popitem(last=False)
        else:
            self._highest.move_to_end(attempt_id)
        expected = streams.get(stream, 0) + 1
        if sequence == expected:
            streams[stream] = sequence
            return SequenceVerdict(SEQUENCE_ACCEPTED, sequence + 1)
        if sequence < expected:
            return SequenceVerdict(SEQUENCE_DUPLICATE, expected)
        return SequenceVerdict(SEQUENCE_GAP, expected)

    def highest(self, attempt_id: str, stream: str) -> int:
        """Return the highest accepted sequence (0 if none), e.g. for an ack."""
        return self._highest.get(attempt_id, {}).get(stream, 0)

    def forget(self, attempt_id: str) -> None:
        """Drop the state of a finished execution attempt."""
        self._highest.pop(attempt_id, None)

    def __len__(self) -> int:
        """Return how many execution attempts are tracked."""
        return len(self._highest)
