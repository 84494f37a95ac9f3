"""
The one exception of the wire code, and its machine-readable codes.

:class:`ProtocolError` is all that parsing, validating or building an
envelope or payload raises, whatever the input (:mod:`hostlink_tw.wire.jsontext`,
:mod:`hostlink_tw.wire.envelope`, :mod:`hostlink_tw.wire.payloads`).  Its
``code`` is one of the constants below, suitable as the ``code`` of an
``error`` payload.
"""

from __future__ import annotations

__all__ = [
    "AGENT_ID_MISMATCH",
    "DUPLICATE_KEY",
    "INVALID_ARGUMENT",
    "INVALID_FIELD",
    "INVALID_JSON",
    "INVALID_PAYLOAD",
    "INVALID_UTF8",
    "MISSING_FIELD",
    "NESTING_TOO_DEEP",
    "NOT_OBJECT",
    "NUMBER_OUT_OF_RANGE",
    "UNKNOWN_TYPE",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "ProtocolError",
    "short_repr",
]

# --- ProtocolError codes -----------------------------------------------------

#: The frame is not valid UTF-8 (or a text holds a lone surrogate).
INVALID_UTF8 = "invalid_utf8"
#: The frame is not JSON (syntax, ``NaN``/``Infinity`` literals, BOM, ...).
INVALID_JSON = "invalid_json"
#: Arrays/objects nest deeper than :data:`~hostlink_tw.wire.jsontext.MAX_NESTING_DEPTH`.
NESTING_TOO_DEEP = "nesting_too_deep"
#: A number is too long, or outside the 64-bit range an integer field allows.
NUMBER_OUT_OF_RANGE = "number_out_of_range"
#: An object repeats a key (ambiguous: parsers disagree on which one wins).
DUPLICATE_KEY = "duplicate_key"
#: The top-level JSON value is not an object.
NOT_OBJECT = "not_object"
#: ``protocol_version`` is an integer other than
#: :data:`~hostlink_tw.wire.vocabulary.PROTOCOL_VERSION`.
UNSUPPORTED_PROTOCOL_VERSION = "unsupported_protocol_version"
#: A required envelope field is absent or empty.
MISSING_FIELD = "missing_field"
#: An envelope field has the wrong JSON type or a malformed value.
INVALID_FIELD = "invalid_field"
#: ``type`` is not one of :data:`~hostlink_tw.wire.vocabulary.MESSAGE_TYPES`.
UNKNOWN_TYPE = "unknown_type"
#: ``agent_id`` differs from the authenticated agent's id.
AGENT_ID_MISMATCH = "agent_id_mismatch"
#: The payload breaks the rules of its message type.
INVALID_PAYLOAD = "invalid_payload"
#: A value given to the wire code's API cannot be used (a programming error).
INVALID_ARGUMENT = "invalid_argument"


class ProtocolError(Exception):
    """A frame, envelope, payload or argument breaks the protocol.

    :ivar code: machine-readable reason, one of the code constants of this
        module (for example :data:`AGENT_ID_MISMATCH`); suitable as the
        ``code`` of an ``error`` payload.
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


def short_repr(value: object, limit: int = 64) -> str:
    """Return a short repr of *value* for messages: peer data can be huge."""
    text = repr(value)
    if len(text) > limit:
        return text[: limit - 3] + "..."
    return text

