"""
Reconnect delays: pure computation, no reactor.

The reference agent waits ``RECONNECT_MIN`` after the first failure, doubles
the wait after each further failure up to ``RECONNECT_MAX``, and jitters each
wait uniformly within ±25 %.  That is what :class:`Backoff` computes by
default (``jitter="go"``).  ``jitter="full"`` draws each wait uniformly from
``[0, d]`` instead ("full jitter"), which spreads a fleet of agents reconnecting
after a control plane restart more evenly, at the price of some very short
waits.

Unlike Twisted's stock ``ReconnectingClientFactory`` (factor *e*, normally
distributed jitter that is stored back into the delay, so it compounds and can
pass the ceiling or go negative), the jitter here is applied to a fresh copy
of the un-jittered delay every time, so a delay is always within
``[0, 1.25 × max]`` and never depends on earlier random draws.
"""

from __future__ import annotations

import math
import random
from typing import Final, Protocol

__all__ = [
    "FACTOR",
    "GO_JITTER",
    "JITTER_MODES",
    "Backoff",
    "BackoffPolicy",
    "base_delay",
    "jittered",
]

#: The wait doubles after each further failure.
FACTOR: Final = 2.0

#: The reference agent's jitter: each wait is uniform in ``[0.75 d, 1.25 d]``.
GO_JITTER: Final = 0.25

#: Accepted values of ``Settings.reconnect_jitter``.
JITTER_MODES: Final = frozenset({"go", "full"})

# Past this many doublings every positive minimum has reached any sane
# ceiling; capping the exponent keeps the arithmetic finite forever
# (retries never stop, so the failure count is unbounded).
_MAX_EXPONENT: Final = 1000


def base_delay(failures: int, minimum: float, maximum: float) -> float:
    """
    The un-jittered wait after ``failures`` consecutive failures.

    ``failures`` counts from 1: the first failure waits ``minimum``, each
    further one twice as long as the one before, never more than
    ``maximum``.  When ``minimum`` exceeds ``maximum`` the ceiling wins.

    :raises ValueError: for ``failures < 1`` or non-positive bounds.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, not {failures!r}")
    _check_bounds(minimum, maximum)
    exponent = min(failures - 1, _MAX_EXPONENT)
    return min(math.ldexp(minimum, exponent), maximum)


def jittered(delay: float, mode: str, rng: random.Random) -> float:
    """
    ``delay`` with jitter applied.

    ``"go"``: uniform in ``[0.75 × delay, 1.25 × delay]``;
    ``"full"``: uniform in ``[0, delay]``.  Never negative.

    :raises ValueError: for an unknown mode or a negative delay.
    """
    if delay < 0 or math.isnan(delay):
        raise ValueError(f"delay must be >= 0, not {delay!r}")
    if mode == "go":
        low, high = delay * (1 - GO_JITTER), delay * (1 + GO_JITTER)
    elif mode == "full":
        low, high = 0.0, delay
    else:
        raise ValueError(f"unknown jitter mode {mode!r}; expected one of {sorted(JITTER_MODES)}")
    # random.uniform(a, b) may return b + tiny rounding error; clamp so the
    # documented bounds hold exactly.
    return min(max(rng.uniform(low, high), low), high)


def _check_bounds(minimum: float, maximum: float) -> None:
    for name, value in (("minimum", minimum), ("maximum", maximum)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} delay must be a positive finite number, not {value!r}")


class BackoffPolicy(Protocol):
    """
    What the client's factory asks of a backoff: :class:`Backoff` is the
    one the agent uses; another (a benchmark's model of a different
    strategy, say) can be passed to ``HostlinkClient(backoff=...)``.
    """

    minimum: float
    maximum: float
    jitter: str
    failures: int

    def next_delay(self) -> float:
        """Record one more failure; return the wait before the next attempt."""

    def peek_base(self) -> float:
        """The un-jittered wait the next failure would produce."""

    def reset(self) -> None:
        """Forget the failures (a session became active)."""


class Backoff:
    """
    The retry bookkeeping of one connection: how many consecutive failures,
    and how long to wait before the next attempt.

    :param minimum: the first wait (``RECONNECT_MIN``), seconds.
    :param maximum: the ceiling of the un-jittered wait (``RECONNECT_MAX``).
    :param jitter: ``"go"`` (±25 %) or ``"full"`` (uniform ``[0, d]``).
    :param rng: the source of randomness; inject a seeded one in tests.
    """

    def __init__(
        self,
        minimum: float,
        maximum: float,
        jitter: str = "go",
        rng: random.Random | None = None,
    ) -> None:
        _check_bounds(minimum, maximum)
        if jitter not in JITTER_MODES:
            raise ValueError(
                f"unknown jitter mode {jitter!r}; expected one of {sorted(JITTER_MODES)}"
            )
        self.minimum = minimum
        self.maximum = maximum
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()  # jitter, not crypto
        self.failures = 0

    @property
    def upper_bound(self) -> float:
        """The longest wait this backoff can ever produce."""
        return self.maximum * (1 + GO_JITTER) if self.jitter == "go" else self.maximum

    def next_delay(self) -> float:
        """Record one more failure and return the (jittered) wait before the next attempt."""
        self.failures += 1
        base = base_delay(self.failures, self.minimum, self.maximum)
        return jittered(base, self.jitter, self._rng)

    def peek_base(self) -> float:
        """The un-jittered wait the next failure would produce, without recording it."""
        return base_delay(self.failures + 1, self.minimum, self.maximum)

    def reset(self) -> None:
        """Forget the failures: the next wait is ``minimum`` again (once a session is active)."""
        self.failures = 0
