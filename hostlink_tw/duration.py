"""Go's duration syntax: the parser and the short form it prints.

The reference agent reads its timing settings with Go's
``time.ParseDuration``, so an operator's existing ``HOSTLINK_WS_*`` values
must mean exactly the same thing here: what Go accepts is accepted with the
same value, and what Go rejects is rejected.  That grammar is: an optional
sign, then either ``0`` alone or one or more decimal numbers, each with an
optional fraction (``1.5``, ``.5``, ``1.``) and a unit (``ns``, ``us``,
``µs`` (U+00B5), ``μs`` (U+03BC), ``ms``, ``s``, ``m``, ``h``), with nothing
in between.  Values are whole nanoseconds in a signed 64-bit range.

The arithmetic below follows Go's step by step, unsigned 64-bit limits and
the float64 used for fractions included, so even the last nanosecond of an
odd fraction comes out the same.
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ["DurationError", "format_duration", "parse_go_duration"]

_NANOSECOND = 1
_MICROSECOND = 1_000 * _NANOSECOND
_MILLISECOND = 1_000 * _MICROSECOND
_SECOND = 1_000 * _MILLISECOND
_MINUTE = 60 * _SECOND
_HOUR = 60 * _MINUTE

_UNITS: dict[str, int] = {
    "ns": _NANOSECOND,
    "us": _MICROSECOND,
    "\u00b5s": _MICROSECOND,  # MICRO SIGN, what Go itself prints
    "\u03bcs": _MICROSECOND,  # GREEK SMALL LETTER MU, what people type
    "ms": _MILLISECOND,
    "s": _SECOND,
    "m": _MINUTE,
    "h": _HOUR,
}

# Go accumulates in a uint64 and allows up to 1<<63 so that the most negative
# int64 can be written; a positive result must stay at or below 1<<63 - 1.
_LIMIT = 1 << 63
_UINT64 = 1 << 64

# Only ASCII digits: str.isdigit() would also take Arabic-Indic and other
# digits, which Go rejects.
_DIGITS = "0123456789"


class DurationError(ValueError):
    """A text that Go's ``time.ParseDuration`` would reject.

    The message says why, in Go's words (invalid duration, missing unit,
    unknown unit), and quotes the text.
    """


def parse_go_duration(text: str) -> float:
    """Parse *text* as Go's ``time.ParseDuration`` does; return seconds.

    Examples: ``"300ms"`` → 0.3, ``"1h30m"`` → 5400.0, ``"-1.5s"`` → -1.5,
    ``"0"`` → 0.0.  No whitespace is skipped, a bare number other than
    ``0`` has no unit and is rejected, and so is a value beyond the signed
    64-bit nanosecond range (about ±292 years).

    The result is the exact nanosecond count divided by 10**9, correctly
    rounded to a float.

    :raises DurationError: for anything Go rejects.
    """
    return _parse_nanoseconds(text) / _SECOND


def format_duration(seconds: float) -> str:
    """Format *seconds* the way Go prints a ``time.Duration``.

    The value is rounded to whole nanoseconds first.  Examples: ``1.0`` →
    ``"1s"``, ``300.0`` → ``"5m0s"``, ``5400.0`` → ``"1h30m0s"``, ``0.3`` →
    ``"300ms"``, ``2e-6`` → ``"2µs"``, ``0.0`` → ``"0s"``.  Every result is
    accepted by ``parse_go_duration``, which gives the same value back.

    :raises ValueError: for NaN or an infinity.
    """
    if not math.isfinite(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    # Fraction(float) is exact, so the only rounding is the final one to
    # whole nanoseconds.
    return _format_nanoseconds(round(Fraction(seconds) * _SECOND))


def _invalid(text: str) -> DurationError:
    return DurationError(f"invalid duration {text!r}")


def _parse_nanoseconds(text: str) -> int:
    """Parse *text* as Go does and return whole nanoseconds."""
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    # Go's one exception to "every number needs a unit".
    if rest == "0":
        return 0
    if not rest:
        raise _invalid(text)

    total = 0
    pos = 0
    end = len(rest)
    while pos < end:
        if rest[pos] != "." and rest[pos] not in _DIGITS:
            raise _invalid(text)

        # The integer part: an overflow here is an error.
        start = pos
        whole = 0
        while pos < end and rest[pos] in _DIGITS:
            if whole > _LIMIT // 10:
                raise _invalid(text)
            whole = whole * 10 + _DIGITS.index(rest[pos])
            if whole > _LIMIT:
                raise _invalid(text)
            pos += 1
        has_whole = pos > start

        # The fraction: digits past what a uint64 holds are read but ignored,
        # as in Go (they cannot change the nanosecond result).
        fraction = 0
        scale = 1.0
        has_fraction = False
        if pos < end and rest[pos] == ".":
            pos += 1
            start = pos
            saturated = False
            while pos < end and rest[pos] in _DIGITS:
                if not saturated:
                    if fraction > (_LIMIT - 1) // 10:
                        saturated = True
                    else:
                        bigger = fraction * 10 + _DIGITS.index(rest[pos])
                        if bigger > _LIMIT:
                            saturated = True
                        else:
                            fraction = bigger
                            scale *= 10
                pos += 1
            has_fraction = pos > start
        if not has_whole and not has_fraction:
            raise _invalid(text)  # ".s", "-.s"

        # The unit runs up to the next number.
        start = pos
        while pos < end and rest[pos] != "." and rest[pos] not in _DIGITS:
            pos += 1
        if pos == start:
            raise DurationError(f"missing unit in duration {text!r}")
        unit_name = rest[start:pos]
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise DurationError(f"unknown unit {unit_name!r} in duration {text!r}")

        if whole > _LIMIT // unit:
            raise _invalid(text)
        value = whole * unit
        if fraction > 0:
            # Go computes the fraction in float64 and truncates; doing the
            # same keeps odd fractions ("0.3333333333333333333h") identical.
            value += int(float(fraction) * (float(unit) / scale))
            if value > _LIMIT:
                raise _invalid(text)
        # Go adds in a uint64, which wraps only when both terms are exactly
        # 1<<63 (e.g. "9223372036854775808ns9223372036854775808ns" is 0 in
        # Go).  Wrapping here too keeps the parsers in agreement.
        total = (total + value) % _UINT64
        if total > _LIMIT:
            raise _invalid(text)

    if negative:
        return -total
    if total > _LIMIT - 1:
        raise _invalid(text)
    return total


def _format_nanoseconds(nanoseconds: int) -> str:
    """Go's ``Duration.String`` for a whole number of nanoseconds."""
    magnitude = abs(nanoseconds)
    if magnitude == 0:
        return "0s"
    if magnitude < _SECOND:
        # Below a second Go switches to the largest unit that keeps an
        # integer part: 1.2ms, 3µs, 7ns.
        if magnitude < _MICROSECOND:
            digits, unit = 0, "ns"
        elif magnitude < _MILLISECOND:
            digits, unit = 3, "\u00b5s"
        else:
            digits, unit = 6, "ms"
        units, fraction = _split_fraction(magnitude, digits)
        text = f"{units}{fraction}{unit}"
    else:
        seconds, fraction = _split_fraction(magnitude, 9)
        minutes, seconds = divmod(seconds, 60)
        text = f"{seconds}{fraction}s"
        if minutes:
            # Hours are the largest unit: days vary in length.
            hours, minutes = divmod(minutes, 60)
            text = f"{minutes}m{text}"
            if hours:
                text = f"{hours}h{text}"
    return f"-{text}" if nanoseconds < 0 else text


def _split_fraction(value: int, digits: int) -> tuple[int, str]:
    """Split *value* / 10**digits into its integer part and ``".ddd"``.

    Trailing zeros of the fraction are dropped, and the point with them when
    nothing is left.
    """
    whole, rest = divmod(value, 10**digits)
    if not rest:
        return whole, ""
    return whole, "." + f"{rest:0{digits}d}".rstrip("0")
