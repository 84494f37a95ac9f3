"""
The typed payloads of PROTOCOL §5: ``ack`` (and ``agent.hello_ack``),
``error``, ``task.output`` and ``task.final``.

Each payload class validates its own fields (:meth:`AckPayload.from_dict`
and its siblings) and writes its wire form (``to_dict``);
:func:`ack_payload` and :func:`error_payload` build wire dicts for the
messages either side sends.  :data:`PAYLOAD_PARSERS` is the table
:class:`~hostlink_tw.wire.envelope.Envelope` validation uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from hostlink_tw._json import json_kind
from hostlink_tw.wire.errors import INVALID_PAYLOAD, NUMBER_OUT_OF_RANGE, ProtocolError, short_repr
from hostlink_tw.wire.jsontext import is_int64, is_json_int
from hostlink_tw.wire.vocabulary import ACK, AGENT_HELLO_ACK, ERROR, TASK_FINAL, TASK_OUTPUT

__all__ = [
    "FINAL_STATUSES",
    "PAYLOAD_PARSERS",
    "STATUS_COMPLETED",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STREAMS",
    "STREAM_STDERR",
    "STREAM_STDOUT",
    "AckPayload",
    "ErrorPayload",
    "TaskFinalPayload",
    "TaskOutputPayload",
    "TypedPayload",
    "ack_payload",
    "error_payload",
]

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


_T = TypeVar("_T")


def _payload_error(field: str, message: str, at: str = "payload") -> ProtocolError:
    """Return the error for *field* of the object at path *at* (``payload``,
    ``payload.unacked_output[2]``): the message and ``field`` name the full path."""
    return ProtocolError(INVALID_PAYLOAD, f"{at}.{field} {message}", field=f"{at}.{field}")


def _require_mapping(data: object, at: str = "payload") -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(
            INVALID_PAYLOAD, f"{at} must be an object, not {json_kind(data)}", at
        )
    return data


def _get_str(data: Mapping[str, Any], key: str, *, required: bool, at: str = "payload") -> str:
    if key not in data:
        if required:
            raise _payload_error(key, "is required", at)
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise _payload_error(key, f"must be a string, not {short_repr(value)}", at)
    return value


def _get_bool(data: Mapping[str, Any], key: str, *, required: bool, at: str = "payload") -> bool:
    if key not in data:
        if required:
            raise _payload_error(key, "is required", at)
        return False
    value = data[key]
    if not isinstance(value, bool):
        raise _payload_error(key, f"must be a boolean, not {short_repr(value)}", at)
    return value


def _get_int(data: Mapping[str, Any], key: str, at: str = "payload") -> int | None:
    """Return an optional 64-bit integer field, ``None`` when absent."""
    if key not in data:
        return None
    return _get_required_int(data, key, at)


def _get_required_int(data: Mapping[str, Any], key: str, at: str = "payload") -> int:
    """Return a required 64-bit integer field (``true`` and ``1.0`` are not integers)."""
    if key not in data:
        raise _payload_error(key, "is required", at)
    value = data[key]
    if not is_json_int(value):
        raise _payload_error(key, f"must be an integer, not {short_repr(value)}", at)
    if not is_int64(value):
        raise ProtocolError(
            NUMBER_OUT_OF_RANGE, f"{at}.{key} is outside the 64-bit range", f"{at}.{key}"
        )
    return int(value)


def _get_text(data: Mapping[str, Any], key: str, at: str) -> str:
    """Return a required, non-empty string field."""
    value = _get_str(data, key, required=True, at=at)
    if not value:
        raise _payload_error(key, "must not be empty", at)
    return value


def _get_count(data: Mapping[str, Any], key: str, at: str, minimum: int) -> int:
    """Return a required 64-bit integer field of at least *minimum*."""
    value = _get_required_int(data, key, at)
    if value < minimum:
        raise _payload_error(key, f"must be >= {minimum}, not {value}", at)
    return value


def _get_stream(data: Mapping[str, Any], key: str, at: str) -> str:
    value = _get_str(data, key, required=True, at=at)
    if value not in STREAMS:
        raise _payload_error(key, f"must be 'stdout' or 'stderr', not {short_repr(value)}", at)
    return value


def _get_object(data: Mapping[str, Any], key: str, at: str) -> Mapping[str, Any]:
    if key not in data:
        raise _payload_error(key, "is required", at)
    return _require_mapping(data[key], f"{at}.{key}")


def _get_list(
    data: Mapping[str, Any],
    key: str,
    at: str,
    item: Callable[[object, str], _T],
    *,
    required: bool,
) -> tuple[_T, ...]:
    """Return an array field, each element read by ``item(value, path)``.

    Absent (when allowed) and ``null`` read as empty.
    """
    if key not in data:
        if required:
            raise _payload_error(key, "is required", at)
        return ()
    values = data[key]
    if values is None:
        return ()
    if not isinstance(values, (list, tuple)):
        raise _payload_error(key, f"must be an array, not {json_kind(values)}", at)
    return tuple(item(value, f"{at}.{key}[{index}]") for index, value in enumerate(values))


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
    """Payload of ``error``: a peer-reported failure.

    ``highest_accepted_sequence`` (PROTOCOL §7.5, with code
    ``output_sequence_gap``) is ``None`` when absent; ``0`` is a value (the
    control plane accepted no chunk of that stream yet).
    """

    code: str
    message: str
    retryable: bool
    related_message_id: str = ""
    highest_accepted_sequence: int | None = None

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
            highest_accepted_sequence=_get_int(data, "highest_accepted_sequence"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form; the optional fields only when set."""
        result: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.related_message_id:
            result["related_message_id"] = self.related_message_id
        if self.highest_accepted_sequence is not None:
            result["highest_accepted_sequence"] = self.highest_accepted_sequence
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
        stream = _get_stream(data, "stream", "payload")
        byte_count = _get_count(data, "byte_count", "payload", 0)
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
    """Payload of ``task.final``: how a task execution ended.

    Parsing is lenient where the Go agent is: its runner sends no
    ``output_truncated``/``error_truncated`` (they read as false) and may send
    empty ``output``/``error``.  What we build always carries both flags
    (PROTOCOL §7.4 lists them without ``?``) and omits empty texts, as the
    Go agent's own snapshot and synthetic finals do.
    """

    status: str
    exit_code: int
    output: str = ""
    error: str = ""
    output_truncated: bool = False
    error_truncated: bool = False

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, at: str = "payload", flags_required: bool = False
    ) -> TaskFinalPayload:
        """Validate *data* and build the payload; unknown keys are ignored.

        :param at: the path of *data* in error messages (a final nested in a
            hello snapshot is ``payload.unacked_finals[3]``).
        :param flags_required: refuse a final without ``output_truncated`` and
            ``error_truncated`` (the hello snapshot always carries them).
        :raises ProtocolError: (:data:`INVALID_PAYLOAD`, or
            :data:`NUMBER_OUT_OF_RANGE`).
        """
        data = _require_mapping(data, at)
        status = _get_str(data, "status", required=True, at=at)
        if status not in FINAL_STATUSES:
            raise _payload_error(
                "status",
                f"must be completed, failed or interrupted, not {short_repr(status)}",
                at,
            )
        exit_code = _get_required_int(data, "exit_code", at)
        return cls(
            status=status,
            exit_code=exit_code,
            output=_get_str(data, "output", required=False, at=at),
            error=_get_str(data, "error", required=False, at=at),
            output_truncated=_get_bool(data, "output_truncated", required=flags_required, at=at),
            error_truncated=_get_bool(data, "error_truncated", required=flags_required, at=at),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form: both flags always, ``output``/``error`` when not empty."""
        result: dict[str, Any] = {"status": self.status, "exit_code": self.exit_code}
        if self.output:
            result["output"] = self.output
        if self.error:
            result["error"] = self.error
        result["output_truncated"] = self.output_truncated
        result["error_truncated"] = self.error_truncated
        return result


#: Any of the typed payloads.
TypedPayload = Union[AckPayload, ErrorPayload, TaskOutputPayload, TaskFinalPayload]

#: The payload parser of each message type whose payload is typed.
PAYLOAD_PARSERS: Mapping[str, Callable[[Mapping[str, Any]], TypedPayload]] = {
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
    code: str,
    message: str,
    retryable: bool,
    related_message_id: str = "",
    highest_accepted_sequence: int | None = None,
) -> dict[str, Any]:
    """Build the payload of an ``error`` message.

    :raises ProtocolError: (:data:`INVALID_PAYLOAD`) if a value has the wrong type.
    """
    payload = ErrorPayload(
        code, message, retryable, related_message_id, highest_accepted_sequence
    ).to_dict()
    ErrorPayload.from_dict(payload)
    return payload

