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

Every name this module has exported keeps working from here, except the
receive-side trackers (``DuplicateTracker``, ``OutputSequenceTracker``,
``SequenceVerdict``), which only the control plane uses: they live in
:mod:`hostlink_tw.controlplane.trackers`.
"""

from __future__ import annotations

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
from hostlink_tw.wire.jsontext import MAX_INT_LITERAL_LENGTH, MAX_NESTING_DEPTH
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
    "Envelope",
    "ErrorPayload",
    "MessageIdGenerator",
    "ProtocolError",
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
