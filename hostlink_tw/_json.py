"""Small helpers shared by the modules that read JSON from files and peers."""

from __future__ import annotations

from collections.abc import Mapping

#: The range of Go's int64, which the Go agent and control plane decode into.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def json_kind(value: object) -> str:
    """Name a parsed JSON value's type for error messages ("an integer", "null", …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
