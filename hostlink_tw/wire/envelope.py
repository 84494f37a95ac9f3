"""
The envelope of PROTOCOL §5: one message, built, serialised, parsed and
validated.

* :class:`Envelope` serialises to compact JSON (:meth:`Envelope.to_json`) and
  parses hostile bytes safely (:meth:`Envelope.from_json`, through
  :func:`~hostlink_tw.wire.jsontext.loads_frame`); :meth:`Envelope.validate`
  enforces every rule of §5 against the id of the agent the connection
  authenticated as.  :func:`parse_envelope` does both; :func:`typed_payload`
  reads the payload of the types that have one.
* :func:`make_envelope` builds outbound envelopes, with ids from a
  :class:`MessageIdGenerator` (``msg_<unix nanoseconds>``) and ``sent_at``
  from :func:`format_sent_at`; :func:`parse_sent_at` reads it back.

Everything here is pure code (no reactor, no I/O) and raises only
:class:`~hostlink_tw.wire.errors.ProtocolError`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from hostlink_tw._json import json_kind
from hostlink_tw.wire.errors import (
    AGENT_ID_MISMATCH,
    INVALID_ARGUMENT,
    INVALID_FIELD,
    MISSING_FIELD,
    NOT_OBJECT,
    NUMBER_OUT_OF_RANGE,
    UNKNOWN_TYPE,
    UNSUPPORTED_PROTOCOL_VERSION,
    ProtocolError,
    short_repr,
)
from hostlink_tw.wire.jsontext import is_int64, is_json_int, loads_frame
from hostlink_tw.wire.payloads import PAYLOAD_PARSERS, TypedPayload
from hostlink_tw.wire.vocabulary import MESSAGE_TYPES, PROTOCOL_VERSION, TASK_OUTPUT, TASK_TYPES

__all__ = [
    "Envelope",
    "MessageIdGenerator",
    "format_sent_at",
    "make_envelope",
    "new_message_id",
    "parse_envelope",
    "parse_sent_at",
    "typed_payload",
]

# Fields in the order the Go agent's struct declares them, for stable output.
_ENVELOPE_STRING_FIELDS = (
    "message_id",
    "type",
    "agent_id",
    "task_id",
    "execution_attempt_id",
    "sent_at",
)


# --- sent_at ------------------------------------------------------------------------

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
            INVALID_ARGUMENT, f"cannot format {short_repr(unix_seconds)} as a time"
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
            f"sent_at {short_repr(text)} is not RFC 3339 UTC whole seconds (YYYY-MM-DDTHH:MM:SSZ)",
            field="sent_at",
        )
    try:
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    except ValueError:
        raise ProtocolError(
            INVALID_FIELD,
            f"sent_at {short_repr(text)} is not a valid date and time",
            field="sent_at",
        ) from None


# --- the envelope ----------------------------------------------------------------


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _freeze(value: Any) -> Any:
    """Return a read-only deep copy of a JSON-like value (objects become mapping proxies)."""
    # Exact types first: every inbound envelope passes here, and the ABC
    # checks below cost more than the copy itself for parsed JSON.
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if kind is list:
        return tuple(_freeze(item) for item in value)
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
    #: The payload's compact JSON text when it is known already (a stored
    #: message: the agent's store keeps exactly this text), so that
    #: :meth:`to_json` writes it as is rather than encoding the payload again.
    #: It must be ``json.dumps(payload, ensure_ascii=False, separators=(",", ":"))``.
    payload_text: str | None = field(default=None, compare=False, repr=False)

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
        if self.payload_text is None:
            document["payload"] = self.payload
        try:
            text = json.dumps(
                document,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
                default=_thaw,
            )
            if self.payload_text is not None:
                # "payload" is the last key: the same text json.dumps would write.
                text = f'{text[:-1]},"payload":{self.payload_text}}}'
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
        document = loads_frame(data)
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
                f"protocol_version {short_repr(self.protocol_version)} is not supported "
                f"(expected {PROTOCOL_VERSION})",
                field="protocol_version",
            )
        _check_nonempty_str("message_id", self.message_id)
        _check_nonempty_str("type", self.type)
        if self.type not in MESSAGE_TYPES:
            raise ProtocolError(
                UNKNOWN_TYPE, f"unknown message type {short_repr(self.type)}", field="type"
            )
        _check_nonempty_str("agent_id", self.agent_id)
        if self.agent_id != authenticated_agent_id:
            raise ProtocolError(
                AGENT_ID_MISMATCH,
                f"agent_id {short_repr(self.agent_id)} is not the authenticated agent "
                f"{short_repr(authenticated_agent_id)}",
                field="agent_id",
            )
        for name in ("task_id", "execution_attempt_id"):
            value = getattr(self, name)
            if self.type in TASK_TYPES:
                _check_nonempty_str(name, value, reason=f"is required for {self.type}")
            elif not isinstance(value, str):
                raise ProtocolError(
                    INVALID_FIELD, f"{name} must be a string, not {short_repr(value)}", field=name
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
        parser = PAYLOAD_PARSERS.get(self.type)
        if parser is not None:
            parser(self.payload)


def _check_int_field(name: str, value: object) -> None:
    """Require a JSON integer (not ``true``, not ``1.0``) within 64 bits."""
    if not is_json_int(value):
        raise ProtocolError(
            INVALID_FIELD, f"{name} must be an integer, not {json_kind(value)}", field=name
        )
    if not is_int64(value):
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
    parser = PAYLOAD_PARSERS.get(envelope.type)
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
    payload_text: str | None = None,
) -> Envelope:
    """Build an outbound envelope of protocol version 1.

    :param payload: ``None`` means ``{}``.
    :param message_id: defaults to a fresh :data:`new_message_id` id.
    :param now: Unix time for ``sent_at``; defaults to :func:`time.time` (pass
        ``reactor.seconds()`` to follow a test clock).
    :param payload_text: ``payload`` as compact JSON text, if known (see
        :attr:`Envelope.payload_text`).

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
        payload_text=payload_text,
    )

