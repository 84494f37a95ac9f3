"""
JSON text from peers, parsed as if hostile: one function, :func:`loads_frame`.

Python's :func:`json.loads` accepts more than JSON and can be driven into
trouble by a frame built for it.  :func:`loads_frame` refuses, with a
:class:`~hostlink_tw.wire.errors.ProtocolError` and nothing else: invalid
UTF-8 and lone surrogates, nesting deeper than :data:`MAX_NESTING_DEPTH`
(measured before parsing), duplicate keys, ``NaN``/``Infinity``, integer
literals longer than :data:`MAX_INT_LITERAL_LENGTH` and floats that
overflow.  :func:`is_json_int` and :func:`is_int64` say what an integer
field may hold.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from hostlink_tw._json import INT64_MAX, INT64_MIN
from hostlink_tw.wire.errors import (
    DUPLICATE_KEY,
    INVALID_ARGUMENT,
    INVALID_JSON,
    INVALID_UTF8,
    NESTING_TOO_DEEP,
    NUMBER_OUT_OF_RANGE,
    ProtocolError,
    short_repr,
)

__all__ = [
    "MAX_INT_LITERAL_LENGTH",
    "MAX_NESTING_DEPTH",
    "is_int64",
    "is_json_int",
    "loads_frame",
]

#: Deepest array/object nesting accepted in a frame.  An envelope needs 2
#: (envelope, payload); the margin leaves room for structured task payloads of
#: later phases while keeping every walk over parsed data far from Python's
#: recursion limit.
MAX_NESTING_DEPTH = 64

#: Longest integer literal parsed, in characters.  int64 needs at most 20;
#: refusing early keeps quadratic big-int conversion out of an attacker's reach.
MAX_INT_LITERAL_LENGTH = 40


def is_json_int(value: object) -> bool:
    """Return whether *value* is a JSON integer (``bool`` is an ``int`` in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_int64(value: object) -> bool:
    """Return whether *value* is an integer a Go ``int`` (64-bit) can hold."""
    return is_json_int(value) and INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]


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
        raise ProtocolError(NUMBER_OUT_OF_RANGE, f"number {short_repr(literal)} overflows a float")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: refuse duplicate keys instead of keeping the last."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ProtocolError(DUPLICATE_KEY, f"duplicate key {short_repr(key)}", field=key)
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


def loads_frame(data: str | bytes) -> Any:
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

