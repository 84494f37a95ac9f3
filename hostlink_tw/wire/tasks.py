"""
The payloads of phase 2, tasks over the session (PROTOCOL §7), in one place.

* The handshake: :class:`HelloSnapshot` and :class:`HelloAckDirectives`
  (defined in :mod:`hostlink_tw.wire.hello`, re-exported here).
* ``task.deliver``: :class:`TaskDeliverPayload`, :func:`deliver_payload`.
* ``task.received`` / ``task.started``: the payload is ``{}``;
  :func:`check_empty_payload` reads one, ignoring unknown keys.
* ``task.output``: :func:`output_payload` builds one from the raw bytes a
  process wrote (:func:`decode_output` turns them into text exactly as the Go
  agent's JSON encoder does).
* ``task.final``: :func:`final_payload`, :func:`interrupted_final_payload`.
* ``ack`` / ``error``: :class:`~hostlink_tw.wire.payloads.AckPayload` carries
  ``highest_output_sequence``, :class:`~hostlink_tw.wire.payloads.ErrorPayload`
  ``highest_accepted_sequence`` (both in :mod:`hostlink_tw.wire.payloads`).
* Message ids: :func:`interrupted_final_message_id` (§7.6) and
  :func:`task_message_id` (the Go agent's form for output and finals).
* :func:`phase2_payload` reads the payload of any inbound envelope by its type.

:func:`~hostlink_tw.wire.envelope.typed_payload` and ``Envelope.validate``
keep their phase-1 table: they do not check ``agent.hello`` or
``task.deliver`` payloads, so a phase-1 peer's ``{}`` hello stays valid.
Everything here raises only :class:`~hostlink_tw.wire.errors.ProtocolError`.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from hostlink_tw.wire.envelope import Envelope, typed_payload
from hostlink_tw.wire.errors import INVALID_ARGUMENT, ProtocolError, short_repr
from hostlink_tw.wire.hello import (
    Capabilities,
    DiscardedAttempt,
    HelloAckDirectives,
    HelloSnapshot,
    OutputReplay,
    ReceivedAttempt,
    RunningTask,
    SpoolStatus,
    StreamSequences,
    UnackedFinal,
    UnackedOutput,
    hello_ack_payload,
    hello_payload,
)
from hostlink_tw.wire.payloads import (
    STATUS_INTERRUPTED,
    TaskFinalPayload,
    TaskOutputPayload,
    TypedPayload,
    _get_int,
    _get_str,
    _payload_error,
    _require_mapping,
)
from hostlink_tw.wire.vocabulary import (
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    TASK_DELIVER,
    TASK_LEASE_HEARTBEAT,
    TASK_RECEIVED,
    TASK_STARTED,
)

__all__ = [
    "FINAL_MESSAGE_KIND",
    "NO_EXIT_CODE",
    "Capabilities",
    "DiscardedAttempt",
    "HelloAckDirectives",
    "HelloSnapshot",
    "OutputReplay",
    "Phase2Payload",
    "ReceivedAttempt",
    "RunningTask",
    "SpoolStatus",
    "StreamSequences",
    "TaskDeliverPayload",
    "UnackedFinal",
    "UnackedOutput",
    "check_empty_payload",
    "decode_output",
    "deliver_payload",
    "final_payload",
    "hello_ack_payload",
    "hello_payload",
    "interrupted_final_message_id",
    "interrupted_final_payload",
    "output_payload",
    "phase2_payload",
    "task_message_id",
]

#: The exit code of an attempt with none: killed by a signal, timed out, or
#: interrupted by a restart or shutdown (§8.3, §8.8) [wire].
NO_EXIT_CODE = -1

#: The "stream" part of a final's :func:`task_message_id` (its sequence is 0).
FINAL_MESSAGE_KIND = "final"


# --- task.deliver (§7.3) -------------------------------------------------------------


@dataclass(frozen=True)
class TaskDeliverPayload:
    """Payload of ``task.deliver``: the shell command to run.

    ``priority`` is read and kept but does not order anything (FIFO, as the Go
    agent).
    """

    command: str
    priority: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskDeliverPayload:
        """Validate *data* and build the payload; unknown keys are ignored.

        :raises ProtocolError: (:data:`~hostlink_tw.wire.errors.INVALID_PAYLOAD`,
            or :data:`~hostlink_tw.wire.errors.NUMBER_OUT_OF_RANGE`).
        """
        data = _require_mapping(data)
        command = _get_str(data, "command", required=True)
        if not command:
            raise _payload_error("command", "must not be empty")
        priority = _get_int(data, "priority")
        return cls(command=command, priority=0 if priority is None else priority)

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form (``priority`` always written)."""
        return {"command": self.command, "priority": self.priority}


def deliver_payload(command: str, priority: int = 0) -> dict[str, Any]:
    """Build a ``task.deliver`` payload (the control plane's side).

    :raises ProtocolError: for an empty command or a value of the wrong type.
    """
    payload = TaskDeliverPayload(command, priority).to_dict()
    TaskDeliverPayload.from_dict(payload)
    return payload


# --- task.received / task.started (§7.4) ---------------------------------------------


def check_empty_payload(data: object) -> None:
    """Check the payload of ``task.received`` or ``task.started``: an object.

    It is ``{}`` on the wire; keys a later version may add are ignored, as
    for every other payload.

    :raises ProtocolError: (:data:`~hostlink_tw.wire.errors.INVALID_PAYLOAD`)
        if *data* is not an object.
    """
    _require_mapping(data)


# --- task.output (§7.4) -------------------------------------------------------------

_GO_REPLACE = "hostlink_tw.go_replace"


def _replace_one_byte(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: one U+FFFD per invalid byte, as Go's ``encoding/json``.

    Python's own ``replace`` puts one U+FFFD for a whole truncated sequence
    (``e2 82`` → one); Go's encoder reads byte by byte (``e2 82`` → two).
    ``data`` must match the Go agent's byte for byte, so resume after the first
    byte and let the decoder judge the next one afresh.
    """
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd", error.start + 1


codecs.register_error(_GO_REPLACE, _replace_one_byte)


def decode_output(chunk: bytes) -> str:
    """Return process output *chunk* as text: valid UTF-8 as is, each invalid byte U+FFFD."""
    return bytes(chunk).decode("utf-8", _GO_REPLACE)


def output_payload(stream: str, chunk: bytes, truncated_locally: bool = False) -> dict[str, Any]:
    """Build the ``task.output`` payload of *chunk*, raw bytes of one stream.

    ``byte_count`` is ``len(chunk)``; ``data`` is :func:`decode_output`'s
    text; ``truncated_locally`` is written only when true (§7.4 ``?``).

    :raises ProtocolError: for a stream other than ``stdout``/``stderr``, or
        a chunk that is not bytes.
    """
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise ProtocolError(
            INVALID_ARGUMENT, f"an output chunk must be bytes, not {type(chunk).__name__}"
        )
    payload = TaskOutputPayload(
        stream, decode_output(chunk), len(chunk), truncated_locally
    ).to_dict()
    TaskOutputPayload.from_dict(payload)
    return payload


# --- task.final (§7.4, §8.5, §8.8) ----------------------------------------------------


def final_payload(
    status: str,
    exit_code: int,
    output: str = "",
    error: str = "",
    output_truncated: bool = False,
    error_truncated: bool = False,
) -> dict[str, Any]:
    """Build a ``task.final`` payload: both truncation flags always, texts when not empty.

    :raises ProtocolError: for an unknown status or a value of the wrong type.
    """
    payload = TaskFinalPayload(
        status, exit_code, output, error, output_truncated, error_truncated
    ).to_dict()
    TaskFinalPayload.from_dict(payload, flags_required=True)
    return payload


def interrupted_final_payload(
    output_truncated: bool = False, error_truncated: bool = False
) -> dict[str, Any]:
    """Build the synthetic final of an attempt a restart, shutdown or kill ended (§8.8).

    ``{"status": "interrupted", "exit_code": -1, "output_truncated": …,
    "error_truncated": …}`` — no ``output``/``error``, as the Go agent's.
    """
    return final_payload(
        STATUS_INTERRUPTED,
        NO_EXIT_CODE,
        output_truncated=output_truncated,
        error_truncated=error_truncated,
    )


# --- message ids (§7.6) ------------------------------------------------------------

# The Go agent replaces exactly these three characters (taskjob.messageID).
_ID_UNSAFE = str.maketrans({"/": "-", " ": "-", "|": "-"})


def _id_part(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(
            INVALID_ARGUMENT, f"{name} must be a non-empty string, not {short_repr(value)}"
        )
    return value


def interrupted_final_message_id(task_id: str, execution_attempt_id: str) -> str:
    """Return the deterministic id of an attempt's ``interrupted`` final [wire].

    ``local-interrupted-<task_id>-<execution_attempt_id>`` with every ``/``,
    space and ``|`` replaced by ``-``.  Being a function of the attempt alone,
    recording it again after another restart finds the same message.

    :raises ProtocolError: (:data:`~hostlink_tw.wire.errors.INVALID_ARGUMENT`)
        for an empty or non-string id.
    """
    task = _id_part("task_id", task_id)
    attempt = _id_part("execution_attempt_id", execution_attempt_id)
    return f"local-interrupted-{task}-{attempt}".translate(_ID_UNSAFE)


def task_message_id(
    task_id: str, execution_attempt_id: str, kind: str, sequence: int, unix_ns: int
) -> str:
    """Return an output or final message id in the Go agent's form.

    ``msg-<task_id>-<attempt>-<kind>-<sequence>-<unix_ns>`` with ``/``, space
    and ``|`` replaced by ``-``; *kind* is the stream for output and
    :data:`FINAL_MESSAGE_KIND` (sequence 0) for a final.  The id is chosen once
    and stored with the message (§7.6): *unix_ns* is the time it was stored.

    :raises ProtocolError: (:data:`~hostlink_tw.wire.errors.INVALID_ARGUMENT`)
        for an empty id or kind, or non-integer numbers.
    """
    task = _id_part("task_id", task_id)
    attempt = _id_part("execution_attempt_id", execution_attempt_id)
    kind = _id_part("kind", kind)
    for name, number in (("sequence", sequence), ("unix_ns", unix_ns)):
        if not isinstance(number, int) or isinstance(number, bool):
            raise ProtocolError(
                INVALID_ARGUMENT, f"{name} must be an integer, not {short_repr(number)}"
            )
    return f"msg-{task}-{attempt}-{kind}-{sequence}-{unix_ns}".translate(_ID_UNSAFE)


# --- reading any inbound payload ---------------------------------------------------------

#: What :func:`phase2_payload` returns.
Phase2Payload = Union[TypedPayload, HelloSnapshot, HelloAckDirectives, TaskDeliverPayload]


def phase2_payload(envelope: Envelope) -> Phase2Payload | None:
    """Return the typed payload of *envelope* under the phase-2 rules.

    ``agent.hello`` → :class:`HelloSnapshot`, ``agent.hello_ack`` →
    :class:`HelloAckDirectives`, ``task.deliver`` → :class:`TaskDeliverPayload`;
    ``task.received``, ``task.started`` and ``task.lease_heartbeat`` are
    checked and give ``None``; every other type is
    :func:`~hostlink_tw.wire.envelope.typed_payload`'s.

    :raises ProtocolError: if the payload breaks its type's rules.
    """
    kind = envelope.type
    payload = envelope.payload
    if kind == AGENT_HELLO:
        return HelloSnapshot.from_dict(payload)
    if kind == AGENT_HELLO_ACK:
        return HelloAckDirectives.from_dict(payload)
    if kind == TASK_DELIVER:
        return TaskDeliverPayload.from_dict(payload)
    if kind in (TASK_RECEIVED, TASK_STARTED, TASK_LEASE_HEARTBEAT):
        check_empty_payload(payload)
        return None
    return typed_payload(envelope)
