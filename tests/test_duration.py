"""Tests for L{hostlink_tw.duration}: Go's duration grammar, exactly."""

from __future__ import annotations

import re
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.duration import (
    DurationError,
    _format_nanoseconds,
    _parse_nanoseconds,
    format_duration,
    parse_go_duration,
)

NS = 1
US = 1_000
MS = 1_000_000
S = 1_000_000_000
M = 60 * S
H = 60 * M
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)

# (text, nanoseconds) that Go's time.ParseDuration accepts.
ACCEPTED: list[tuple[str, int]] = [
    # zero, the one unit-less number
    ("0", 0),
    ("+0", 0),
    ("-0", 0),
    ("0s", 0),
    ("0h0m0s", 0),
    ("-0s", 0),
    ("000ms", 0),
    # one number, each unit
    ("5s", 5 * S),
    ("30s", 30 * S),
    ("1478s", 1478 * S),
    ("10ns", 10 * NS),
    ("11us", 11 * US),
    ("12\u00b5s", 12 * US),  # MICRO SIGN
    ("12\u03bcs", 12 * US),  # GREEK SMALL LETTER MU
    ("13ms", 13 * MS),
    ("14s", 14 * S),
    ("15m", 15 * M),
    ("16h", 16 * H),
    ("300ms", 300 * MS),
    ("2us", 2 * US),
    ("2\u00b5s", 2 * US),
    # signs
    ("-1s", -S),
    ("-5s", -5 * S),
    ("+5s", 5 * S),
    ("-1.5h", -(H + 30 * M)),
    # fractions
    ("1.5s", 1500 * MS),
    ("5.0s", 5 * S),
    ("5.6s", 5 * S + 600 * MS),
    ("5.s", 5 * S),
    ("1.s", S),
    (".5s", 500 * MS),
    ("1.0s", S),
    ("1.00s", S),
    ("1.004s", S + 4 * MS),
    ("1.0040s", S + 4 * MS),
    ("100.00100s", 100 * S + MS),
    ("0.5ns", 0),  # fractions of a nanosecond truncate
    ("1.9ns", 1),
    ("1.5us", 1500),
    ("2.5m", 150 * S),
    # compounds, any order, repeated units
    ("1h30m", H + 30 * M),
    ("3h30m", 3 * H + 30 * M),
    ("10.5s4m", 4 * M + 10 * S + 500 * MS),
    ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
    ("1h2m3s4ms5us6ns", H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
    ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
    ("1s1s", 2 * S),
    ("1m0s", M),
    ("5m0s", 5 * M),
    ("0.5s.5s", S),
    # large values and precision
    ("52763797000ns", 52763797000),
    ("9007199254740993ns", (1 << 53) + 1),  # not exact in a float64
    ("0.3333333333333333333h", 20 * M),  # more than 9 fraction digits
    ("0.100000000000000000000h", 6 * M),  # fraction digits past uint64
    ("0.830103483285477580700h", 49 * M + 48 * S + 372539827),
    ("1.00000000000000000000000000000000001s", S),
    # the int64 edges
    ("9223372036854775807ns", INT64_MAX),
    ("9223372036854775.807us", INT64_MAX),
    ("9223372036s854ms775us807ns", INT64_MAX),
    ("2562047h47m16.854775807s", INT64_MAX),
    ("-9223372036854775808ns", INT64_MIN),
    ("-9223372036854775.808us", INT64_MIN),
    ("-9223372036s854ms775us808ns", INT64_MIN),
    ("-2562047h47m16.854775808s", INT64_MIN),
    # Go sums in a uint64 that wraps to 0 when both terms are exactly 1<<63.
    ("9223372036854775808ns9223372036854775808ns", 0),
]

# Texts that Go's time.ParseDuration rejects.
REJECTED: list[str] = [
    "",
    "-",
    "+",
    "1",
    "3",
    "1.5",
    "00",
    "-1",
    "+-1s",
    "--1s",
    "s",
    "ms",
    ".",
    "-.",
    ".s",
    "+.s",
    "-.s",
    "1x",
    "1d",
    "1S",
    "1H",
    "1sec",
    "1 s",
    " 1s",
    "1s ",
    "1s\n",
    "1 h 30 m",
    "1h 30m",
    "1,5s",
    "1_000ms",
    "1e3ms",
    "0x10s",
    "1..5s",
    "1.5.s",
    "\u0661s",  # ARABIC-INDIC DIGIT ONE is not a Go digit
    "\uff11s",  # FULLWIDTH DIGIT ONE
    "1\u00b5",
    "1\u03bc",
    "1Ms",
    "inf",
    "infs",
    "nan",
    "1h-30m",
    "1h+30m",
    "\ufffd",
    "\x85\x85",
    "hello world",
    # beyond int64 nanoseconds
    "9223372036854775808ns",
    "9223372036854775810ns",
    "-9223372036854775809ns",
    "9223372036854776us",
    "3000000h",
    "9223372036854775.808us",
    "9223372036854ms775us808ns",
    "2562047h47m16.854775808s",
    "99999999999999999999s",
    "9223372036854775807ns1ns",
    "18446744073709551616ns",
]


class ParseGoDurationTests(SynchronousTestCase):
    """L{parse_go_duration} accepts and rejects exactly what Go does."""

    def test_accepted(self) -> None:
        """Every accepted text gives Go's value, in nanoseconds and in seconds."""
        for text, nanoseconds in ACCEPTED:
            with self.subTest(text=text):
                self.assertEqual(_parse_nanoseconds(text), nanoseconds)
                self.assertEqual(parse_go_duration(text), nanoseconds / S)

    def test_rejected(self) -> None:
        """Every rejected text raises L{DurationError} quoting the text."""
        for text in REJECTED:
            with self.subTest(text=text):
                error = self.assertRaises(DurationError, parse_go_duration, text)
                self.assertIn(repr(text), str(error))

    def test_error_is_value_error(self) -> None:
        """L{DurationError} is a L{ValueError}, so callers may catch either."""
        self.assertTrue(issubclass(DurationError, ValueError))

    def test_messages_say_why(self) -> None:
        """A missing or unknown unit is named as such, as Go does."""
        self.assertIn("missing unit", str(self.assertRaises(DurationError, parse_go_duration, "1")))
        error = self.assertRaises(DurationError, parse_go_duration, "1x")
        self.assertIn("unknown unit 'x'", str(error))
        error = self.assertRaises(DurationError, parse_go_duration, "")
        self.assertIn("invalid duration", str(error))

    def test_returns_float_seconds(self) -> None:
        """The result is a float of seconds."""
        value = parse_go_duration("1500ms")
        self.assertIsInstance(value, float)
        self.assertEqual(value, 1.5)
        self.assertIsInstance(parse_go_duration("0"), float)


class FormatDurationTests(SynchronousTestCase):
    """L{format_duration} prints what Go's C{Duration.String} prints."""

    CASES: list[tuple[float, str]] = [
        (0.0, "0s"),
        (-0.0, "0s"),
        (1e-9, "1ns"),
        (-1e-9, "-1ns"),
        (1.1e-6, "1.1\u00b5s"),
        (2e-6, "2\u00b5s"),
        (0.0022, "2.2ms"),
        (0.3, "300ms"),
        (0.1, "100ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (3.3, "3.3s"),
        (30.0, "30s"),
        (60.0, "1m0s"),
        (61.0, "1m1s"),
        (300.0, "5m0s"),
        (4 * 60 + 5.001, "4m5.001s"),
        (3600.0, "1h0m0s"),
        (5400.0, "1h30m0s"),
        (5 * 3600 + 6 * 60 + 7.001, "5h6m7.001s"),
        (-1.5, "-1.5s"),
        (-3600.0, "-1h0m0s"),
        (1.0000000004, "1s"),  # rounded to whole nanoseconds
        (1.0000000006, "1.000000001s"),
    ]

    def test_cases(self) -> None:
        """Each value prints as Go prints it."""
        for seconds, text in self.CASES:
            with self.subTest(seconds=seconds):
                self.assertEqual(format_duration(seconds), text)

    def test_int64_edges(self) -> None:
        """The int64 extremes print as Go prints them."""
        self.assertEqual(_format_nanoseconds(INT64_MAX), "2562047h47m16.854775807s")
        self.assertEqual(_format_nanoseconds(INT64_MIN), "-2562047h47m16.854775808s")

    def test_not_finite(self) -> None:
        """NaN and infinities are not durations."""
        for value in (float("nan"), float("inf"), float("-inf")):
            with self.subTest(value=value):
                self.assertRaises(ValueError, format_duration, value)


# Texts made of the pieces that matter to the grammar; an empty or invalid
# unit runs numbers together, so some are far out of range.
_NUMBER = st.from_regex(re.compile(r"[0-9]{0,4}(\.[0-9]{0,4})?", re.ASCII), fullmatch=True)
_UNIT = st.sampled_from(["ns", "us", "\u00b5s", "\u03bcs", "ms", "s", "m", "h", "", "x", " s", "S"])
_TEXT = st.builds(
    lambda sign, parts: sign + "".join(number + unit for number, unit in parts),
    st.sampled_from(["", "+", "-", " "]),
    st.lists(st.tuples(_NUMBER, _UNIT), max_size=4),
)
# The grammar of Go's time.ParseDuration as a regular expression.
_GO_GRAMMAR = re.compile(
    r"[-+]?(0|((\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)", re.ASCII
)
_UNIT_NS = {"ns": NS, "us": US, "\u00b5s": US, "\u03bcs": US, "ms": MS, "s": S, "m": M, "h": H}


def _exact_nanoseconds(text: str) -> Fraction:
    """The exact value of a valid *text*, before Go's truncation."""
    sign = -1 if text.startswith("-") else 1
    total = Fraction(0)
    for number, unit in re.findall(r"([0-9.]+)([^0-9.]+)", text):
        total += Fraction(number if not number.endswith(".") else number + "0") * _UNIT_NS[unit]
    return sign * total


class DurationPropertyTests(SynchronousTestCase):
    """Properties that hold for every input."""

    @given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
    def test_round_trip_nanoseconds(self, nanoseconds: int) -> None:
        """Any int64 duration printed as Go prints it parses back unchanged."""
        self.assertEqual(_parse_nanoseconds(_format_nanoseconds(nanoseconds)), nanoseconds)

    @given(st.integers(min_value=-(1 << 52), max_value=1 << 52))
    def test_round_trip_seconds(self, nanoseconds: int) -> None:
        """format_duration and parse_go_duration invert each other."""
        seconds = nanoseconds / S
        text = format_duration(seconds)
        self.assertEqual(parse_go_duration(text), seconds)
        self.assertEqual(format_duration(parse_go_duration(text)), text)

    @given(_TEXT)
    def test_grammar(self, text: str) -> None:
        """Acceptance is exactly Go's grammar and int64 range; values within 1ns per number."""
        if _GO_GRAMMAR.fullmatch(text) is None:
            self.assertRaises(DurationError, parse_go_duration, text)
            return
        exact = _exact_nanoseconds(text)
        if abs(exact) > INT64_MAX + 100:
            # Numbers run together when a unit is missing, so some overflow.
            self.assertRaises(DurationError, parse_go_duration, text)
            return
        if abs(exact) > INT64_MAX - 100:
            return  # too close to the edge for this model; the tables cover it
        parsed = _parse_nanoseconds(text)
        # Go truncates each fraction to whole nanoseconds.
        self.assertLessEqual(abs(exact - parsed), text.count("."))
        self.assertEqual(parse_go_duration(text), parsed / S)

    @given(st.text())
    def test_any_text(self, text: str) -> None:
        """Arbitrary text either parses to an int64 value or raises DurationError."""
        try:
            nanoseconds = _parse_nanoseconds(text)
        except DurationError:
            return
        self.assertTrue(INT64_MIN <= nanoseconds <= INT64_MAX)
