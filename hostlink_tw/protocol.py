"""Phase-1 Hostlink WebSocket protocol: envelopes and payloads, as both sides use them.

Every WebSocket message is one UTF-8 JSON text frame holding one *envelope*
object (PROTOCOL §5).  This module is pure code (no reactor, no I/O):

* :class:`Envelope` serialises to compact JSON (:meth:`Envelope.to_json`) and
  parses hostile bytes safely (:meth:`Envelope.from_json`);
  :meth:`Envelope.validate` enforces every rule of §5 against the id of the
  agent the connection authenticated as.  :func:`parse_envelope` does both.
* The typed payloads (:class:`AckPayload`, :class:`ErrorPayload`,
  :class:`TaskOutputPayload`, :class:`TaskFinalPayload`) validate their own
  fields; :func:`ack_payload` and :func:`error_payload` build wire dicts.
* :data:`AGENT_ID_RULE` is the one definition of what an agent id may be;
  :func:`agent_id_problem` checks a value against it (the ``init`` command,
  the agent's ``agent.json``, the signer and the reference control plane
  all use it).
* :class:`MessageIdGenerator` makes ``msg_<unix nanoseconds>`` ids.

The receive-side bookkeeping only the control plane does (de-duplication,
output sequences) lives in :mod:`hostlink_tw.controlplane.trackers`.

:class:`ProtocolError` is the only exception this module raises, whatever the
input: it carries a machine-readable ``code`` (one of the ``*`` code constants
below) and a human-readable ``message``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, NoReturn, Union

from hostlink_tw._json import INT64_MAX, INT64_MIN, json_kind
from hostlink_tw._json import is_int as _is_int
from hostlink_tw._json import short_repr as _show

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

# --- payload vocabularies ----------------------------------------------------

STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"
#: Valid ``task.output`` streams.
STREAMS: frozenset[str] = frozenset({STREAM_STDOUT, STREAM_STDERR})

STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"
#: Valid ``task.final`` statuses.
FINAL_STATUSES: frozenset[str] = frozenset({STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED})

# --- ProtocolError codes -----------------------------------------------------

#: The frame is not valid UTF-8 (or a text holds a lone surrogate).
INVALID_UTF8 = "invalid_utf8"
#: The frame is not JSON (syntax, ``NaN``/``Infinity`` literals, BOM, ...).
INVALID_JSON = "invalid_json"
#: Arrays/objects nest deeper than :data:`MAX_NESTING_DEPTH`.
NESTING_TOO_DEEP = "nesting_too_deep"
#: A number is too long, or outside the 64-bit range an integer field allows.
NUMBER_OUT_OF_RANGE = "number_out_of_range"
#: An object repeats a key (ambiguous: parsers disagree on which one wins).
DUPLICATE_KEY = "duplicate_key"
#: The top-level JSON value is not an object.
NOT_OBJECT = "not_object"
#: ``protocol_version`` is an integer other than :data:`PROTOCOL_VERSION`.
UNSUPPORTED_PROTOCOL_VERSION = "unsupported_protocol_version"
#: A required envelope field is absent or empty.
MISSING_FIELD = "missing_field"
#: An envelope field has the wrong JSON type or a malformed value.
INVALID_FIELD = "invalid_field"
#: ``type`` is not one of :data:`MESSAGE_TYPES`.
UNKNOWN_TYPE = "unknown_type"
#: ``agent_id`` differs from the authenticated agent's id.
AGENT_ID_MISMATCH = "agent_id_mismatch"
#: The payload breaks the rules of its message type.
INVALID_PAYLOAD = "invalid_payload"
#: A value given to this module's API cannot be used (a programming error).
INVALID_ARGUMENT = "invalid_argument"

#: Deepest array/object nesting accepted in a frame.  An envelope needs 2
#: (envelope, payload); the margin leaves room for structured task payloads of
#: later phases while keeping every walk over parsed data far from Python's
#: recursion limit.
MAX_NESTING_DEPTH = 64

#: Longest integer literal parsed, in characters.  int64 needs at most 20;
#: refusing early keeps quadratic big-int conversion out of an attacker's reach.
MAX_INT_LITERAL_LENGTH = 40


# Fields in the order the Go agent's struct declares them, for stable output.
_ENVELOPE_STRING_FIELDS = (
    "message_id",
    "type",
    "agent_id",
    "task_id",
    "execution_attempt_id",
    "sent_at",
)


class ProtocolError(Exception):
    """A frame, envelope, payload or argument breaks the protocol.

    :ivar code: machine-readable reason, one of this module's code constants
        (for example :data:`AGENT_ID_MISMATCH`); suitable as the ``code`` of an
        ``error`` payload.
    :ivar message: human-readable explanation.
    :ivar field: the offending field (``"sent_at"``, ``"payload.stream"``), or
        ``""`` when the problem is not about one field.
    """

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, field={self.field!r})"


def _is_int64(value: object) -> bool:
    """Return whether *value* is an integer a Go ``int`` (64-bit) can hold."""
    return _is_int(value) and INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]


# --- safe JSON parsing ---------------------------------------------------------

# One JSON string token (escapes included) or one bracket: enough to measure
# nesting without being fooled by brackets inside strings.  An unterminated
# string runs to the end of the text: were it allowed to fail, the scan would
# retry at every escaped quote inside it, quadratic time on a hostile frame.
_DEPTH_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
# A \uD800-\uDFFF escape may decode to a lone surrogate; only then is the
# (slower) walk over every decoded string needed.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_NESTING_DEPTH` before parsing.

    Doing it before ``json.loads`` means a hostile frame never drives the
    parser into deep recursion at all.
    """
    openers = text.count("[") + text.count("{")
    if openers <= MAX_NESTING_DEPTH:
        return  # cannot nest deeper than the number of openers
    depth = 0
    for match in _DEPTH_TOKEN.finditer(text):
        first = match.group()[0]
        if first == "[" or first == "{":
            depth += 1
            if depth > MAX_NESTING_DEPTH:
                raise ProtocolError(
                    NESTING_TOO_DEEP,
                    f"JSON nests deeper than {MAX_NESTING_DEPTH} levels",
                )
        elif first == "]" or first == "}":
            depth -= 1


def _reject_constant(name: str) -> NoReturn:
    """``parse_constant`` hook: ``NaN``/``Infinity`` are not JSON."""
    raise ProtocolError(INVALID_JSON, f"{name} is not a JSON value")


def _parse_int(literal: str) -> int:
    """``parse_int`` hook: bound the literal before converting it."""
    if len(literal) > MAX_INT_LITERAL_LENGTH:
        raise ProtocolError(
            NUMBER_OUT_OF_RANGE,
            f"integer literal of {len(literal)} characters is too long",
        )
    return int(literal)


def _parse_float(literal: str) -> float:
    """``parse_float`` hook: ``1e999`` overflows to infinity, which JSON cannot hold."""
    value = float(literal)
    if not math.isfinite(value):
        raise ProtocolError(NUMBER_OUT_OF_RANGE, f"number {_show(literal)} overflows a float")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: refuse duplicate keys instead of keeping the last."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ProtocolError(DUPLICATE_KEY, f"duplicate key {_show(key)}", field=key)
        result[key] = value
    return result


def _has_surrogate(text: str) -> bool:
    """Return whether *text* holds a lone surrogate (not encodable as UTF-8)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates anywhere in a parsed value (keys included).

    Python's JSON decoder turns ``"\\ud800"`` into a lone surrogate, which
    could never be sent on again as UTF-8.  Iterative, so depth is no concern.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                raise ProtocolError(INVALID_UTF8, "string holds a lone UTF-16 surrogate")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _loads(data: str | bytes) -> Any:
    """Parse one JSON text from untrusted *data*; raise only :class:`ProtocolError`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")  # strict: no replacement characters
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                INVALID_UTF8, f"frame is not valid UTF-8 (byte {exc.start})"
            ) from None
    elif isinstance(data, str):
        text = data
        if _has_surrogate(text):
            raise ProtocolError(INVALID_UTF8, "text holds a lone UTF-16 surrogate")
    else:
        raise ProtocolError(
            INVALID_ARGUMENT, f"expected str or bytes, got {type(data).__name__}"
        )
    _check_depth(text)
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except ProtocolError:
        raise
    except RecursionError:
        # Unreachable while _check_depth runs first; kept so that no change of
        # limits can ever let a RecursionError escape to the caller.
        raise ProtocolError(NESTING_TOO_DEEP, "JSON nests too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, and int()'s digit limit should the hook change.
        raise ProtocolError(INVALID_JSON, f"frame is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(value)
    return value


# --- time ------------------------------------------------------------------------

_SENT_AT = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")


def format_sent_at(unix_seconds: float) -> str:
    """Format a Unix time as RFC 3339 UTC with whole seconds: ``2026-04-27T11:03:00Z``.

    Fractions are truncated (floored), as Go's ``time.Format`` does.

    :raises ProtocolError: (:data:`INVALID_ARGUMENT`) for NaN, infinities or a
        time outside years 1-9999.
    """
    try:
        whole = math.floor(unix_seconds)
        moment = datetime.fromtimestamp(whole, tz=timezone.utc)
    except (ValueError, OverflowError, OSError, TypeError):
        raise ProtocolError(
            INVALID_ARGUMENT, f"cannot format {_show(unix_seconds)} as a time"
        ) from None
    # Explicit zero padding: strftime("%Y") does not pad years below 1000 on glibc.
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}Z"
    )


def parse_sent_at(text: str) -> datetime:
    """Parse a ``sent_at`` value; return an aware UTC :class:`~datetime.datetime`.

    Exactly the form the agent emits is accepted: ``YYYY-MM-DDTHH:MM:SSZ``
    with ASCII digits, upper-case ``T`` and ``Z``, no fraction, no offset, and
    a real calendar date and time of day (no leap second ``:60``, year >= 1).

    :raises ProtocolError: (:data:`INVALID_FIELD`) otherwise.
    """
    match = _SENT_AT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ProtocolError(
            INVALID_FIELD,
            f"sent_at {_show(text)} is not RFC 3339 UTC whole seconds (YYYY-MM-DDTHH:MM:SSZ)",
            field="sent_at",
        )
    try:
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    except ValueError:
        raise ProtocolError(
            INVALID_FIELD, f"sent_at {_show(text)} is not a valid date and time", field="sent_at"
        ) from None


# --- payloads --------------------------------------------------------------------


def _payload_error(field: str, message: str) -> ProtocolError:
    return ProtocolError(INVALID_PAYLOAD, f"payload.{field} {message}", field=f"payload.{field}")


def _require_mapping(data: object) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(
            INVALID_PAYLOAD, f"payload must be an object, not {type(data).__name__}", "payload"
        )
    return data


def _get_str(data: Mapping[str, Any], key: str, *, required: bool) -> str:
    if key not in data:
        if required:
            raise _payload_error(key, "is required")
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise _payload_error(key, f"must be a string, not {_show(value)}")
    return value


def _get_bool(data: Mapping[str, Any], key: str, *, required: bool) -> bool:
    if key not in data:
        if required:
            raise _payload_error(key, "is required")
        return False
    value = data[key]
    if not isinstance(value, bool):
        raise _payload_error(key, f"must be a boolean, not {_show(value)}")
    return value


def _get_int(data: Mapping[str, Any], key: str) -> int | None:
    """Return an optional 64-bit integer field, ``None`` when absent."""
    if key not in data:
        return None
    return _get_required_int(data, key)


def _get_required_int(data: Mapping[str, Any], key: str) -> int:
    """Return a required 64-bit integer field (``true`` and ``1.0`` are not integers)."""
    if key not in data:
        raise _payload_error(key, "is required")
    value = data[key]
    if not _is_int(value):
        raise _payload_error(key, f"must be an integer, not {_show(value)}")
    if not _is_int64(value):
        raise ProtocolError(
            NUMBER_OUT_OF_RANGE, f"payload.{key} is outside the 64-bit range", f"payload.{key}"
        )
    return int(value)


@dataclass(frozen=True)
class AckPayload:
    """Payload of ``ack`` and ``agent.hello_ack``.

    ``highest_output_sequence`` is ``None`` when absent; the optional strings
    are ``""`` when absent and are omitted again by :meth:`to_dict`.
    """

    acked_message_id: str
    acked_type: str
    task_id: str = ""
    execution_attempt_id: str = ""
    highest_output_sequence: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AckPayload:
        """Validate *data* and build the payload; unknown keys are ignored.

        :raises ProtocolError: (:data:`INVALID_PAYLOAD`, or
            :data:`NUMBER_OUT_OF_RANGE` for a sequence beyond 64 bits).
        """
        data = _require_mapping(data)
        return cls(
            acked_message_id=_get_str(data, "acked_message_id", required=True),
            acked_type=_get_str(data, "acked_type", required=True),
            task_id=_get_str(data, "task_id", required=False),
            execution_attempt_id=_get_str(data, "execution_attempt_id", required=False),
            highest_output_sequence=_get_int(data, "highest_output_sequence"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form, without the absent optional fields."""
        result: dict[str, Any] = {
            "acked_message_id": self.acked_message_id,
            "acked_type": self.acked_type,
        }
        if self.task_id:
            result["task_id"] = self.task_id
        if self.execution_attempt_id:
            result["execution_attempt_id"] = self.execution_attempt_id
        if self.highest_output_sequence is not None:
            result["highest_output_sequence"] = self.highest_output_sequence
        return result


@dataclass(frozen=True)
class ErrorPayload:
    """Payload of ``error``: a peer-reported failure."""

    code: str
    message: str
    retryable: bool
    related_message_id: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorPayload:
        """Validate *data* and build the payload; unknown keys are ignored.

        :raises ProtocolError: (:data:`INVALID_PAYLOAD`).
        """
        data = _require_mapping(data)
        return cls(
            code=_get_str(data, "code", required=True),
            message=_get_str(data, "message", required=True),
            retryable=_get_bool(data, "retryable", required=True),
            related_message_id=_get_str(data, "related_message_id", required=False),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form; ``related_message_id`` only when set."""
        result: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.related_message_id:
            result["related_message_id"] = self.related_message_id
        return result


@dataclass(frozen=True)
class TaskOutputPayload:
    """Payload of ``task.output``: one chunk of a task's stdout or stderr."""

    stream: str
    data: str
    byte_count: int
    truncated_locally: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskOutputPayload:
        """Validate *data* and build the payload; unknown keys are ignored.

        :raises ProtocolError: (:data:`INVALID_PAYLOAD`, or
            :data:`NUMBER_OUT_OF_RANGE`).
        """
        data = _require_mapping(data)
        stream = _get_str(data, "stream", required=True)
        if stream not in STREAMS:
            raise _payload_error("stream", f"must be 'stdout' or 'stderr', not {_show(stream)}")
        byte_count = _get_required_int(data, "byte_count")
        if byte_count < 0:
            raise _payload_error("byte_count", f"must be >= 0, not {byte_count}")
        return cls(
            stream=stream,
            data=_get_str(data, "data", required=True),
            byte_count=byte_count,
            truncated_locally=_get_bool(data, "truncated_locally", required=False),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form; ``truncated_locally`` only when true."""
        result: dict[str, Any] = {
            "stream": self.stream,
            "data": self.data,
            "byte_count": self.byte_count,
        }
        if self.truncated_locally:
            result["truncated_locally"] = True
        return result


@dataclass(frozen=True)
class TaskFinalPayload:
    """Payload of ``task.final``: how a task execution ended."""

    status: str
    exit_code: int
    output: str = ""
    error: str = ""
    output_truncated: bool = False
    error_truncated: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskFinalPayload:
        """Validate *data* and build the payload; unknown keys are ignored.

        :raises ProtocolError: (:data:`INVALID_PAYLOAD`, or
            :data:`NUMBER_OUT_OF_RANGE`).
        """
        data = _require_mapping(data)
        status = _get_str(data, "status", required=True)
        if status not in FINAL_STATUSES:
            raise _payload_error(
                "status", f"must be completed, failed or interrupted, not {_show(status)}"
            )
        exit_code = _get_required_int(data, "exit_code")
        return cls(
            status=status,
            exit_code=exit_code,
            output=_get_str(data, "output", required=False),
            error=_get_str(data, "error", required=False),
            output_truncated=_get_bool(data, "output_truncated", required=False),
            error_truncated=_get_bool(data, "error_truncated", required=False),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form, without empty optional fields."""
        result: dict[str, Any] = {"status": self.status, "exit_code": self.exit_code}
        if self.output:
            result["output"] = self.output
        if self.error:
            result["error"] = self.error
        if self.output_truncated:
            result["output_truncated"] = True
        if self.error_truncated:
            result["error_truncated"] = True
        return result


#: Any of the typed payloads.
TypedPayload = Union[AckPayload, ErrorPayload, TaskOutputPayload, TaskFinalPayload]

_PAYLOAD_TYPES: Mapping[str, Callable[[Mapping[str, Any]], TypedPayload]] = {
    ACK: AckPayload.from_dict,
    AGENT_HELLO_ACK: AckPayload.from_dict,
    ERROR: ErrorPayload.from_dict,
    TASK_OUTPUT: TaskOutputPayload.from_dict,
    TASK_FINAL: TaskFinalPayload.from_dict,
}


def ack_payload(
    acked_message_id: str,
    acked_type: str,
    task_id: str = "",
    execution_attempt_id: str = "",
    highest_output_sequence: int | None = None,
) -> dict[str, Any]:
    """Build the payload of an ``ack`` / ``agent.hello_ack`` for a received message.

    :raises ProtocolError: (:data:`INVALID_PAYLOAD`) if a value has the wrong type.
    """
    payload = AckPayload(
        acked_message_id, acked_type, task_id, execution_attempt_id, highest_output_sequence
    ).to_dict()
    AckPayload.from_dict(payload)  # refuse what a receiver would refuse
    return payload


def error_payload(
    code: str, message: str, retryable: bool, related_message_id: str = ""
) -> dict[str, Any]:
    """Build the payload of an ``error`` message.

    :raises ProtocolError: (:data:`INVALID_PAYLOAD`) if a value has the wrong type.
    """
    payload = ErrorPayload(code, message, retryable, related_message_id).to_dict()
    ErrorPayload.from_dict(payload)
    return payload


# --- the envelope ----------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Return a read-only deep copy of a JSON-like value (objects become mapping proxies)."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: object) -> Any:
    """``json.dumps`` ``default`` hook: frozen mappings serialise as objects."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(frozen=True)
class Envelope:
    """One protocol message (PROTOCOL §5), immutable.

    Building an envelope checks nothing, so tests and the reference control
    plane can also express invalid ones; call :meth:`validate` (or use
    :func:`parse_envelope`) to enforce the rules.  The ``payload`` is stored as
    a read-only deep copy (objects become :class:`types.MappingProxyType`,
    arrays tuples); ``None`` becomes ``{}``.
    """

    type: str
    message_id: str
    agent_id: str
    sent_at: str
    payload: Mapping[str, Any]
    protocol_version: int = PROTOCOL_VERSION
    task_id: str = ""
    execution_attempt_id: str = ""
    sequence: int | None = None

    def __post_init__(self) -> None:
        payload: object = self.payload
        if payload is None:
            payload = {}
        if isinstance(payload, (Mapping, list, tuple)):
            payload = _freeze(payload)
        object.__setattr__(self, "payload", payload)

    def to_json(self) -> str:
        """Serialise as compact JSON text (UTF-8 unescaped, no spaces).

        ``task_id`` and ``execution_attempt_id`` are omitted when empty and
        ``sequence`` when ``None``; every other field is always written, as is
        (no validation here).

        :raises ProtocolError: (:data:`INVALID_ARGUMENT`) if a value cannot be
            represented in JSON/UTF-8 (NaN, a set, a lone surrogate, ...).
        """
        document: dict[str, Any] = {
            "protocol_version": self.protocol_version,
            "message_id": self.message_id,
            "type": self.type,
            "agent_id": self.agent_id,
        }
        if self.task_id:
            document["task_id"] = self.task_id
        if self.execution_attempt_id:
            document["execution_attempt_id"] = self.execution_attempt_id
        if self.sequence is not None:
            document["sequence"] = self.sequence
        document["sent_at"] = self.sent_at
        document["payload"] = self.payload
        try:
            text = json.dumps(
                document,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
                default=_thaw,
            )
            text.encode("utf-8")  # a lone surrogate could not go out as a text frame
        except (TypeError, ValueError, RecursionError) as exc:
            raise ProtocolError(
                INVALID_ARGUMENT, f"envelope cannot be serialised: {exc}"
            ) from None
        return text

    @classmethod
    def from_json(cls, data: str | bytes) -> Envelope:
        """Parse one frame into an envelope, checking structure and JSON types only.

        Checks: strict UTF-8, JSON without ``NaN``/``Infinity``, duplicate
        keys, excessive nesting or oversized numbers; a top-level object;
        ``protocol_version`` and ``payload`` present; every known field of the
        right JSON type (strings, an integer that is not a boolean or float,
        an object).  Absent string fields read as ``""``, an absent
        ``sequence`` as ``None``; ``null`` is never accepted.  Unknown fields
        are ignored, as Go's decoder does.  Values (version 1, known type,
        ids, time format, payload contents) are :meth:`validate`'s job.

        :raises ProtocolError: whatever *data* holds; nothing else escapes.
        """
        document = _loads(data)
        if not isinstance(document, dict):
            raise ProtocolError(
                NOT_OBJECT, f"frame must be a JSON object, not {json_kind(document)}"
            )
        if "protocol_version" not in document:
            raise ProtocolError(
                MISSING_FIELD, "protocol_version is required", field="protocol_version"
            )
        version = document["protocol_version"]
        _check_int_field("protocol_version", version)
        strings: dict[str, str] = {}
        for name in _ENVELOPE_STRING_FIELDS:
            value = document.get(name, "")
            if not isinstance(value, str):
                raise ProtocolError(
                    INVALID_FIELD,
                    f"{name} must be a string, not {json_kind(value)}",
                    field=name,
                )
            strings[name] = value
        sequence = document.get("sequence")
        if "sequence" in document:
            _check_int_field("sequence", sequence)
        if "payload" not in document:
            raise ProtocolError(MISSING_FIELD, "payload is required", field="payload")
        payload = document["payload"]
        if not isinstance(payload, dict):
            raise ProtocolError(
                INVALID_FIELD,
                f"payload must be an object, not {json_kind(payload)}",
                field="payload",
            )
        return cls(
            type=strings["type"],
            message_id=strings["message_id"],
            agent_id=strings["agent_id"],
            sent_at=strings["sent_at"],
            payload=payload,
            protocol_version=version,
            task_id=strings["task_id"],
            execution_attempt_id=strings["execution_attempt_id"],
            sequence=sequence,
        )

    def validate(self, authenticated_agent_id: str) -> None:
        """Enforce every rule of PROTOCOL §5 against the authenticated agent's id.

        In order: ``protocol_version`` is the integer 1; ``message_id`` a
        non-empty string; ``type`` a known type; ``agent_id`` non-empty and
        equal to *authenticated_agent_id*; ``task_id`` and
        ``execution_attempt_id`` strings, non-empty for every ``task.*`` type;
        ``sequence`` an integer (64-bit), required for ``task.output``;
        ``sent_at`` RFC 3339 UTC whole seconds (see :func:`parse_sent_at`);
        ``payload`` an object, and for ``ack``, ``agent.hello_ack``,
        ``error``, ``task.output`` and ``task.final`` a valid payload of that
        type.

        :raises ProtocolError: with the code of the first rule broken.
        """
        _check_int_field("protocol_version", self.protocol_version)
        if self.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(
                UNSUPPORTED_PROTOCOL_VERSION,
                f"protocol_version {_show(self.protocol_version)} is not supported "
                f"(expected {PROTOCOL_VERSION})",
                field="protocol_version",
            )
        _check_nonempty_str("message_id", self.message_id)
        _check_nonempty_str("type", self.type)
        if self.type not in MESSAGE_TYPES:
            raise ProtocolError(
                UNKNOWN_TYPE, f"unknown message type {_show(self.type)}", field="type"
            )
        _check_nonempty_str("agent_id", self.agent_id)
        if self.agent_id != authenticated_agent_id:
            raise ProtocolError(
                AGENT_ID_MISMATCH,
                f"agent_id {_show(self.agent_id)} is not the authenticated agent "
                f"{_show(authenticated_agent_id)}",
                field="agent_id",
            )
        for name in ("task_id", "execution_attempt_id"):
            value = getattr(self, name)
            if self.type in TASK_TYPES:
                _check_nonempty_str(name, value, reason=f"is required for {self.type}")
            elif not isinstance(value, str):
                raise ProtocolError(
                    INVALID_FIELD, f"{name} must be a string, not {_show(value)}", field=name
                )
        if self.sequence is None:
            if self.type == TASK_OUTPUT:
                raise ProtocolError(
                    MISSING_FIELD, f"sequence is required for {TASK_OUTPUT}", field="sequence"
                )
        else:
            _check_int_field("sequence", self.sequence)
        _check_nonempty_str("sent_at", self.sent_at)
        parse_sent_at(self.sent_at)
        if not isinstance(self.payload, Mapping):
            raise ProtocolError(
                INVALID_FIELD,
                f"payload must be an object, not {type(self.payload).__name__}",
                field="payload",
            )
        parser = _PAYLOAD_TYPES.get(self.type)
        if parser is not None:
            parser(self.payload)


def _check_int_field(name: str, value: object) -> None:
    """Require a JSON integer (not ``true``, not ``1.0``) within 64 bits."""
    if not _is_int(value):
        raise ProtocolError(
            INVALID_FIELD, f"{name} must be an integer, not {json_kind(value)}", field=name
        )
    if not _is_int64(value):
        raise ProtocolError(NUMBER_OUT_OF_RANGE, f"{name} is outside the 64-bit range", name)


def _check_nonempty_str(name: str, value: object, reason: str = "is required") -> None:
    """Require a non-empty string: wrong type is invalid, empty is missing."""
    if not isinstance(value, str):
        raise ProtocolError(
            INVALID_FIELD, f"{name} must be a string, not {json_kind(value)}", field=name
        )
    if not value:
        raise ProtocolError(MISSING_FIELD, f"{name} {reason}", field=name)


def parse_envelope(data: str | bytes, authenticated_agent_id: str) -> Envelope:
    """Parse and fully validate one inbound frame.

    :meth:`Envelope.from_json` followed by :meth:`Envelope.validate`.

    :raises ProtocolError: for anything *data* may hold.
    """
    envelope = Envelope.from_json(data)
    envelope.validate(authenticated_agent_id)
    return envelope


def typed_payload(envelope: Envelope) -> TypedPayload | None:
    """Return the typed payload of an ``ack``, ``agent.hello_ack``, ``error``,
    ``task.output`` or ``task.final`` envelope, or ``None`` for other types.

    :raises ProtocolError: (:data:`INVALID_PAYLOAD`) if the payload is invalid.
    """
    parser = _PAYLOAD_TYPES.get(envelope.type)
    return None if parser is None else parser(envelope.payload)


# --- ids and building --------------------------------------------------------------


class MessageIdGenerator:
    """Make ``msg_<unix nanoseconds>`` ids, like the Go agent, strictly increasing.

    If the clock stands still or steps back, the id is the previous one plus
    one nanosecond, so ids of one generator never repeat.  Thread-safe.

    :param clock: returns the current Unix time in integer nanoseconds.
    """

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        """Return the next message id."""
        with self._lock:
            now = int(self._clock())
            if now <= self._last:
                now = self._last + 1
            self._last = now
        return f"msg_{now}"


#: The process-wide generator :func:`make_envelope` uses by default.
new_message_id = MessageIdGenerator()


def make_envelope(
    type: str,  # shadows the builtin: it is the protocol's field name
    agent_id: str,
    payload: Mapping[str, Any] | None = None,
    *,
    message_id: str | None = None,
    now: float | None = None,
    task_id: str = "",
    execution_attempt_id: str = "",
    sequence: int | None = None,
) -> Envelope:
    """Build an outbound envelope of protocol version 1.

    :param payload: ``None`` means ``{}``.
    :param message_id: defaults to a fresh :data:`new_message_id` id.
    :param now: Unix time for ``sent_at``; defaults to :func:`time.time` (pass
        ``reactor.seconds()`` to follow a test clock).

    Nothing is validated, so that deliberately broken envelopes can be built
    too; call :meth:`Envelope.validate` for a check.
    """
    return Envelope(
        type=type,
        message_id=new_message_id() if message_id is None else message_id,
        agent_id=agent_id,
        sent_at=format_sent_at(time.time() if now is None else now),
        payload={} if payload is None else payload,
        task_id=task_id,
        execution_attempt_id=execution_attempt_id,
        sequence=sequence,
    )
