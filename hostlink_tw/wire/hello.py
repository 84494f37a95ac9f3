"""
The phase-2 handshake payloads (PROTOCOL §7.1, §7.2): the agent's reconnect
snapshot in ``agent.hello`` and the control plane's directives in
``agent.hello_ack``.

:class:`HelloSnapshot` is what the agent builds from its store
(:func:`hello_payload` writes the wire dict, every key present) and what the
control plane parses (:meth:`HelloSnapshot.from_dict`).
:class:`HelloAckDirectives` is the other way round (:func:`hello_ack_payload`,
:meth:`HelloAckDirectives.from_dict`).  Parsing raises only
:class:`~hostlink_tw.wire.errors.ProtocolError`, whose message and ``field``
name the full path of the offending value
(``payload.unacked_output[2].last_sequence``).

Timestamps (``started_at``, ``received_at``) are RFC 3339 UTC in the one form
the Go agent writes and :func:`~hostlink_tw.wire.envelope.parse_sent_at`
accepts: whole seconds, ``Z``.  A JSON ``null`` where an array belongs reads as
an empty array, because a Go encoder writes a nil slice that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostlink_tw.wire.envelope import parse_sent_at
from hostlink_tw.wire.errors import INVALID_PAYLOAD, ProtocolError, short_repr
from hostlink_tw.wire.payloads import (
    AckPayload,
    TaskFinalPayload,
    _get_bool,
    _get_count,
    _get_list,
    _get_object,
    _get_str,
    _get_stream,
    _get_text,
    _payload_error,
    _require_mapping,
)

__all__ = [
    "Capabilities",
    "DiscardedAttempt",
    "HelloAckDirectives",
    "HelloSnapshot",
    "OutputReplay",
    "ReceivedAttempt",
    "RunningTask",
    "SpoolStatus",
    "StreamSequences",
    "UnackedFinal",
    "UnackedOutput",
    "hello_ack_payload",
    "hello_payload",
]

# --- readers payloads.py cannot hold (envelope.py imports payloads.py) --------------------


def _get_time(data: Mapping[str, Any], key: str, at: str) -> str:
    """Return a required RFC 3339 UTC whole-seconds timestamp, as the wire text."""
    value = _get_text(data, key, at)
    try:
        parse_sent_at(value)
    except ProtocolError:
        raise _payload_error(
            key, f"must be RFC 3339 UTC whole seconds (YYYY-MM-DDTHH:MM:SSZ), "
            f"not {short_repr(value)}", at
        ) from None
    return value


def _ids(data: Mapping[str, Any], at: str) -> tuple[str, str]:
    """The ``task_id`` and ``execution_attempt_id`` every attempt reference carries."""
    return _get_text(data, "task_id", at), _get_text(data, "execution_attempt_id", at)


# --- agent.hello (§7.1) ----------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """The agent's own flags (``HOSTLINK_WS_DELIVERY_ENABLED``, ``..._RESULTS_ENABLED``)."""

    delivery_enabled: bool = False
    results_enabled: bool = False

    @classmethod
    def parse(cls, value: object, at: str) -> Capabilities:
        """Validate the object at path *at*."""
        data = _require_mapping(value, at)
        return cls(
            delivery_enabled=_get_bool(data, "delivery_enabled", required=True, at=at),
            results_enabled=_get_bool(data, "results_enabled", required=True, at=at),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {"delivery_enabled": self.delivery_enabled, "results_enabled": self.results_enabled}


@dataclass(frozen=True)
class StreamSequences:
    """The last output sequence sent per stream (0: none yet)."""

    stdout: int = 0
    stderr: int = 0

    @classmethod
    def parse(cls, value: object, at: str) -> StreamSequences:
        """Validate the object at path *at*."""
        data = _require_mapping(value, at)
        return cls(
            stdout=_get_count(data, "stdout", at, 0), stderr=_get_count(data, "stderr", at, 0)
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {"stdout": self.stdout, "stderr": self.stderr}


@dataclass(frozen=True)
class RunningTask:
    """The attempt running when the hello was built (``started_at`` as wire text)."""

    task_id: str
    execution_attempt_id: str
    started_at: str
    last_output_sequence: StreamSequences = field(default_factory=StreamSequences)

    @classmethod
    def parse(cls, value: object, at: str) -> RunningTask:
        """Validate the object at path *at*."""
        data = _require_mapping(value, at)
        task_id, attempt_id = _ids(data, at)
        return cls(
            task_id=task_id,
            execution_attempt_id=attempt_id,
            started_at=_get_time(data, "started_at", at),
            last_output_sequence=StreamSequences.parse(
                _get_object(data, "last_output_sequence", at), f"{at}.last_output_sequence"
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {
            "task_id": self.task_id,
            "execution_attempt_id": self.execution_attempt_id,
            "started_at": self.started_at,
            "last_output_sequence": self.last_output_sequence.to_dict(),
        }


@dataclass(frozen=True)
class ReceivedAttempt:
    """An attempt recorded as received and not started yet."""

    task_id: str
    execution_attempt_id: str
    received_at: str

    @classmethod
    def parse(cls, value: object, at: str) -> ReceivedAttempt:
        """Validate the object at path *at*."""
        data = _require_mapping(value, at)
        task_id, attempt_id = _ids(data, at)
        return cls(task_id, attempt_id, _get_time(data, "received_at", at))

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {
            "task_id": self.task_id,
            "execution_attempt_id": self.execution_attempt_id,
            "received_at": self.received_at,
        }


@dataclass(frozen=True)
class UnackedFinal:
    """A stored ``task.final`` not acked yet: its message id, attempt and payload."""

    message_id: str
    task_id: str
    execution_attempt_id: str
    final: TaskFinalPayload

    @classmethod
    def parse(cls, value: object, at: str) -> UnackedFinal:
        """Validate the object at path *at*; both truncation flags are required."""
        data = _require_mapping(value, at)
        message_id = _get_text(data, "message_id", at)
        task_id, attempt_id = _ids(data, at)
        final = TaskFinalPayload.from_dict(data, at=at, flags_required=True)
        return cls(message_id, task_id, attempt_id, final)

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form: the ids, then the final's own keys, flattened."""
        return {
            "message_id": self.message_id,
            "task_id": self.task_id,
            "execution_attempt_id": self.execution_attempt_id,
            **self.final.to_dict(),
        }


@dataclass(frozen=True)
class UnackedOutput:
    """A contiguous range of unacked output sequences of one attempt's stream."""

    task_id: str
    execution_attempt_id: str
    stream: str
    first_sequence: int
    last_sequence: int
    truncated_locally: bool = False

    @classmethod
    def parse(cls, value: object, at: str) -> UnackedOutput:
        """Validate the object at path *at*: ``1 <= first_sequence <= last_sequence``."""
        data = _require_mapping(value, at)
        task_id, attempt_id = _ids(data, at)
        stream = _get_stream(data, "stream", at)
        first = _get_count(data, "first_sequence", at, 1)
        last = _get_count(data, "last_sequence", at, 1)
        if last < first:
            raise _payload_error(
                "last_sequence", f"must be >= first_sequence {first}, not {last}", at
            )
        truncated = _get_bool(data, "truncated_locally", required=True, at=at)
        return cls(task_id, attempt_id, stream, first, last, truncated)

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {
            "task_id": self.task_id,
            "execution_attempt_id": self.execution_attempt_id,
            "stream": self.stream,
            "first_sequence": self.first_sequence,
            "last_sequence": self.last_sequence,
            "truncated_locally": self.truncated_locally,
        }


@dataclass(frozen=True)
class SpoolStatus:
    """The outbox's cap and use in bytes."""

    byte_cap: int = 0
    bytes_used: int = 0
    has_rotated_chunks: bool = False

    @classmethod
    def parse(cls, value: object, at: str) -> SpoolStatus:
        """Validate the object at path *at*: byte counts are ``>= 0``."""
        data = _require_mapping(value, at)
        return cls(
            byte_cap=_get_count(data, "byte_cap", at, 0),
            bytes_used=_get_count(data, "bytes_used", at, 0),
            has_rotated_chunks=_get_bool(data, "has_rotated_chunks", required=True, at=at),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {
            "byte_cap": self.byte_cap,
            "bytes_used": self.bytes_used,
            "has_rotated_chunks": self.has_rotated_chunks,
        }


def _tuple_field(instance: object, name: str) -> None:
    """Store a sequence field as a tuple, so equal snapshots compare equal."""
    object.__setattr__(instance, name, tuple(getattr(instance, name)))


@dataclass(frozen=True)
class HelloSnapshot:
    """The ``agent.hello`` payload of phase 2: the agent's state at (re)connect.

    Every key is always present on the wire (``running_task`` may be null).
    Sequence fields are stored as tuples.
    """

    capabilities: Capabilities
    client_version: str
    running_task: RunningTask | None = None
    received_not_started: tuple[ReceivedAttempt, ...] = ()
    unacked_finals: tuple[UnackedFinal, ...] = ()
    unacked_output: tuple[UnackedOutput, ...] = ()
    spool_status: SpoolStatus = field(default_factory=SpoolStatus)

    def __post_init__(self) -> None:
        for name in ("received_not_started", "unacked_finals", "unacked_output"):
            _tuple_field(self, name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HelloSnapshot:
        """Validate *data* and build the snapshot; unknown keys are ignored.

        Every key of §7.1 is required, nested ones too, except the optional
        ``output``/``error`` of a final.

        :raises ProtocolError: (:data:`~hostlink_tw.wire.errors.INVALID_PAYLOAD`,
            or :data:`~hostlink_tw.wire.errors.NUMBER_OUT_OF_RANGE`).
        """
        at = "payload"
        data = _require_mapping(data, at)
        capabilities = Capabilities.parse(
            _get_object(data, "capabilities", at), f"{at}.capabilities"
        )
        client_version = _get_text(data, "client_version", at)
        if "running_task" not in data:
            raise _payload_error("running_task", "is required", at)
        running = data["running_task"]
        return cls(
            capabilities=capabilities,
            client_version=client_version,
            running_task=None if running is None
            else RunningTask.parse(running, f"{at}.running_task"),
            received_not_started=_get_list(
                data, "received_not_started", at, ReceivedAttempt.parse, required=True
            ),
            unacked_finals=_get_list(data, "unacked_finals", at, UnackedFinal.parse,
                                     required=True),
            unacked_output=_get_list(data, "unacked_output", at, UnackedOutput.parse,
                                     required=True),
            spool_status=SpoolStatus.parse(
                _get_object(data, "spool_status", at), f"{at}.spool_status"
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form, every key present."""
        return {
            "capabilities": self.capabilities.to_dict(),
            "client_version": self.client_version,
            "running_task": None if self.running_task is None else self.running_task.to_dict(),
            "received_not_started": [item.to_dict() for item in self.received_not_started],
            "unacked_finals": [item.to_dict() for item in self.unacked_finals],
            "unacked_output": [item.to_dict() for item in self.unacked_output],
            "spool_status": self.spool_status.to_dict(),
        }


def hello_payload(snapshot: HelloSnapshot) -> dict[str, Any]:
    """Build the ``agent.hello`` payload of *snapshot*, refusing what a receiver would.

    :raises ProtocolError: if a value breaks §7.1 (an empty id, a sequence
        below 1, a malformed time, ...).
    """
    payload = snapshot.to_dict()
    HelloSnapshot.from_dict(payload)
    return payload


# --- agent.hello_ack (§7.2) ----------------------------------------------------------


@dataclass(frozen=True)
class DiscardedAttempt:
    """An attempt the control plane gave up: never run it, kill it, send nothing of it."""

    task_id: str
    execution_attempt_id: str
    reason: str = ""

    @classmethod
    def parse(cls, value: object, at: str) -> DiscardedAttempt:
        """Validate the object at path *at* (``reason`` optional: the Go agent ignores it)."""
        data = _require_mapping(value, at)
        task_id, attempt_id = _ids(data, at)
        return cls(task_id, attempt_id, _get_str(data, "reason", required=False, at=at))

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form (``reason`` always written)."""
        return {
            "task_id": self.task_id,
            "execution_attempt_id": self.execution_attempt_id,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class OutputReplay:
    """Where to resume one stream's replay: sequences below ``next_sequence`` are acked."""

    task_id: str
    execution_attempt_id: str
    stream: str
    next_sequence: int

    @classmethod
    def parse(cls, value: object, at: str) -> OutputReplay:
        """Validate the object at path *at*: ``next_sequence >= 1``."""
        data = _require_mapping(value, at)
        task_id, attempt_id = _ids(data, at)
        return cls(
            task_id,
            attempt_id,
            _get_stream(data, "stream", at),
            _get_count(data, "next_sequence", at, 1),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        return {
            "task_id": self.task_id,
            "execution_attempt_id": self.execution_attempt_id,
            "stream": self.stream,
            "next_sequence": self.next_sequence,
        }


def _final_id(value: object, at: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(INVALID_PAYLOAD, f"{at} must be a string, not {short_repr(value)}", at)
    return value


@dataclass(frozen=True)
class HelloAckDirectives:
    """The ``agent.hello_ack`` payload of phase 2: the ack, then what to apply in order.

    Absent and ``null`` lists read as empty; :meth:`to_dict` omits empty
    lists and always writes ``delivery_enabled``.
    """

    acked_message_id: str
    acked_type: str
    acknowledged_final_message_ids: tuple[str, ...] = ()
    discarded_attempts: tuple[DiscardedAttempt, ...] = ()
    output_replay: tuple[OutputReplay, ...] = ()
    delivery_enabled: bool = False

    def __post_init__(self) -> None:
        for name in ("acknowledged_final_message_ids", "discarded_attempts", "output_replay"):
            _tuple_field(self, name)

    @property
    def ack(self) -> AckPayload:
        """The phase-1 view of this payload (what ``Envelope.validate`` checks)."""
        return AckPayload(self.acked_message_id, self.acked_type)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HelloAckDirectives:
        """Validate *data* and build the directives; unknown keys are ignored.

        :raises ProtocolError: (:data:`~hostlink_tw.wire.errors.INVALID_PAYLOAD`,
            or :data:`~hostlink_tw.wire.errors.NUMBER_OUT_OF_RANGE`).
        """
        at = "payload"
        ack = AckPayload.from_dict(data)  # the phase-1 rules, unchanged
        return cls(
            acked_message_id=ack.acked_message_id,
            acked_type=ack.acked_type,
            acknowledged_final_message_ids=_get_list(
                data, "acknowledged_final_message_ids", at, _final_id, required=False
            ),
            discarded_attempts=_get_list(
                data, "discarded_attempts", at, DiscardedAttempt.parse, required=False
            ),
            output_replay=_get_list(data, "output_replay", at, OutputReplay.parse,
                                    required=False),
            delivery_enabled=_get_bool(data, "delivery_enabled", required=False, at=at),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form."""
        result: dict[str, Any] = {
            "acked_message_id": self.acked_message_id,
            "acked_type": self.acked_type,
        }
        if self.acknowledged_final_message_ids:
            result["acknowledged_final_message_ids"] = list(self.acknowledged_final_message_ids)
        if self.discarded_attempts:
            result["discarded_attempts"] = [item.to_dict() for item in self.discarded_attempts]
        if self.output_replay:
            result["output_replay"] = [item.to_dict() for item in self.output_replay]
        result["delivery_enabled"] = self.delivery_enabled
        return result


def hello_ack_payload(directives: HelloAckDirectives) -> dict[str, Any]:
    """Build the ``agent.hello_ack`` payload of *directives*, refusing what a receiver would.

    :raises ProtocolError: if a value breaks §7.2.
    """
    payload = directives.to_dict()
    HelloAckDirectives.from_dict(payload)
    return payload
