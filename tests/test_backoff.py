"""Tests for hostlink_tw.backoff: the reconnect delay computation."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.backoff import GO_JITTER, Backoff, base_delay, jittered

_bounds = st.floats(min_value=0.001, max_value=10_000, allow_nan=False, allow_infinity=False)


class _FixedRandom(random.Random):
    """A Random whose uniform() returns one end of the range."""

    def __init__(self, end: str) -> None:
        super().__init__(0)
        self.end = end

    def uniform(self, a: float, b: float) -> float:
        return {"low": a, "high": b, "mid": (a + b) / 2}[self.end]


class BaseDelayTests(SynchronousTestCase):
    def test_first_failure_waits_minimum(self) -> None:
        self.assertEqual(base_delay(1, 1.0, 300.0), 1.0)

    def test_doubles_after_each_further_failure(self) -> None:
        self.assertEqual(
            [base_delay(n, 1.0, 300.0) for n in range(1, 11)],
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300],
        )

    def test_capped_at_maximum(self) -> None:
        self.assertEqual(base_delay(50, 1.0, 300.0), 300.0)

    def test_huge_failure_counts_stay_finite(self) -> None:
        # Retries never stop: the counter may grow without bound.
        self.assertEqual(base_delay(10**9, 0.1, 3600.0), 3600.0)

    def test_minimum_above_maximum_uses_maximum(self) -> None:
        self.assertEqual(base_delay(1, 300.0, 1.0), 1.0)

    def test_rejects_zero_failures(self) -> None:
        self.assertRaises(ValueError, base_delay, 0, 1.0, 2.0)

    def test_rejects_non_positive_bounds(self) -> None:
        self.assertRaises(ValueError, base_delay, 1, 0.0, 2.0)
        self.assertRaises(ValueError, base_delay, 1, 1.0, -2.0)
        self.assertRaises(ValueError, base_delay, 1, float("nan"), 2.0)
        self.assertRaises(ValueError, base_delay, 1, 1.0, float("inf"))

    @given(st.integers(min_value=1, max_value=5000), _bounds, _bounds)
    def test_within_bounds(self, failures: int, minimum: float, maximum: float) -> None:
        d = base_delay(failures, minimum, maximum)
        self.assertLessEqual(d, maximum)
        self.assertGreaterEqual(d, min(minimum, maximum))

    @given(st.integers(min_value=1, max_value=5000), _bounds, _bounds)
    def test_monotonic(self, failures: int, minimum: float, maximum: float) -> None:
        self.assertLessEqual(
            base_delay(failures, minimum, maximum), base_delay(failures + 1, minimum, maximum)
        )


class JitterTests(SynchronousTestCase):
    def test_go_jitter_range_ends(self) -> None:
        self.assertEqual(jittered(8.0, "go", _FixedRandom("low")), 6.0)
        self.assertEqual(jittered(8.0, "go", _FixedRandom("high")), 10.0)

    def test_full_jitter_range_ends(self) -> None:
        self.assertEqual(jittered(8.0, "full", _FixedRandom("low")), 0.0)
        self.assertEqual(jittered(8.0, "full", _FixedRandom("high")), 8.0)

    def test_unknown_mode(self) -> None:
        self.assertRaises(ValueError, jittered, 1.0, "gaussian", random.Random(1))

    def test_negative_delay(self) -> None:
        self.assertRaises(ValueError, jittered, -1.0, "go", random.Random(1))

    @given(st.floats(min_value=0, max_value=1e6), st.integers(min_value=0, max_value=2**32))
    def test_go_within_quarter(self, delay: float, seed: int) -> None:
        d = jittered(delay, "go", random.Random(seed))
        self.assertGreaterEqual(d, delay * (1 - GO_JITTER))
        self.assertLessEqual(d, delay * (1 + GO_JITTER))

    @given(st.floats(min_value=0, max_value=1e6), st.integers(min_value=0, max_value=2**32))
    def test_full_within_zero_and_delay(self, delay: float, seed: int) -> None:
        d = jittered(delay, "full", random.Random(seed))
        self.assertGreaterEqual(d, 0.0)
        self.assertLessEqual(d, delay)

    def test_go_jitter_is_spread_uniformly(self) -> None:
        """Not a constant factor: draws cover both halves of the ±25 % band."""
        rng = random.Random(42)
        draws = [jittered(100.0, "go", rng) for _ in range(2000)]
        below = sum(1 for d in draws if d < 100.0)
        self.assertTrue(800 < below < 1200, below)
        self.assertLess(min(draws), 77.0)
        self.assertGreater(max(draws), 123.0)


class BackoffTests(SynchronousTestCase):
    def test_sequence_like_reference_agent(self) -> None:
        b = Backoff(1.0, 10.0, "go", _FixedRandom("mid"))
        self.assertEqual([b.next_delay() for _ in range(6)], [1, 2, 4, 8, 10, 10])
        self.assertEqual(b.failures, 6)

    def test_reset_starts_again_from_minimum(self) -> None:
        b = Backoff(1.0, 10.0, "go", _FixedRandom("mid"))
        for _ in range(4):
            b.next_delay()
        b.reset()
        self.assertEqual(b.failures, 0)
        self.assertEqual(b.next_delay(), 1.0)

    def test_peek_base_does_not_record(self) -> None:
        b = Backoff(1.0, 10.0)
        self.assertEqual(b.peek_base(), 1.0)
        self.assertEqual(b.peek_base(), 1.0)
        self.assertEqual(b.failures, 0)

    def test_full_jitter_mode(self) -> None:
        b = Backoff(1.0, 10.0, "full", _FixedRandom("high"))
        self.assertEqual([b.next_delay() for _ in range(5)], [1, 2, 4, 8, 10])
        self.assertEqual(b.upper_bound, 10.0)

    def test_upper_bound_go(self) -> None:
        self.assertEqual(Backoff(1.0, 300.0).upper_bound, 375.0)

    def test_rejects_unknown_mode(self) -> None:
        self.assertRaises(ValueError, Backoff, 1.0, 2.0, "e")

    def test_rejects_bad_bounds(self) -> None:
        self.assertRaises(ValueError, Backoff, 0.0, 2.0)

    def test_jitter_does_not_compound(self) -> None:
        """A high draw does not leak into the next delay (stock RCF stores it back)."""
        b = Backoff(1.0, 300.0, "go", _FixedRandom("high"))
        self.assertEqual([b.next_delay() for _ in range(3)], [1.25, 2.5, 5.0])

    @settings(max_examples=200)
    @given(
        _bounds,
        _bounds,
        st.sampled_from(["go", "full"]),
        st.integers(min_value=0, max_value=2**32),
        st.integers(min_value=1, max_value=200),
    )
    def test_never_negative_never_above_bound(
        self, minimum: float, maximum: float, mode: str, seed: int, n: int
    ) -> None:
        b = Backoff(minimum, maximum, mode, random.Random(seed))
        for _ in range(n):
            d = b.next_delay()
            self.assertGreaterEqual(d, 0.0)
            self.assertLessEqual(d, b.upper_bound)
            self.assertLessEqual(d, 1.25 * maximum)

    def test_seeded_rng_is_deterministic(self) -> None:
        a = Backoff(1.0, 60.0, "go", random.Random(7))
        b = Backoff(1.0, 60.0, "go", random.Random(7))
        self.assertEqual([a.next_delay() for _ in range(10)], [b.next_delay() for _ in range(10)])
