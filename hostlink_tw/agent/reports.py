"""
Sending one result by the HTTP report (PROTOCOL §9.1): :func:`send_report`.

``PUT /api/v1/tasks/{id}``: a 2xx means accepted.  Network errors and 5xx
are retried :data:`RETRIES` times with a delay of 1 s doubling each time,
as the Go agent does; then the report is *kept* (the caller leaves it in the
store and tries again later) instead of being dropped [ours].  A 4xx is the
control plane refusing this report: it is not retried (it would be refused
again) and is kept for inspection with the status and the answer's message.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from hostlink_tw.agent.httpapi import ControlPlaneHTTPError

__all__ = ["FIRST_DELAY", "RETRIES", "Outcome", "ReportResult", "send_report"]

#: Retries after the first try, for network errors and 5xx (the Go agent's).
RETRIES = 5
#: The first retry's delay, doubled for each next one.
FIRST_DELAY = 1.0


class Outcome(enum.Enum):
    """What became of a report."""

    ACCEPTED = "accepted"
    """A 2xx: done."""
    REFUSED = "refused"
    """A 4xx: not retried; kept for inspection."""
    POSTPONED = "postponed"
    """Every retry failed on the network or a 5xx: kept, tried again later."""


@dataclass(frozen=True)
class ReportResult:
    """The outcome, the tries made, and the last error's one-line text."""

    outcome: Outcome
    tries: int
    error: str = ""
    status: int | None = None


@inlineCallbacks
def send_report(
    put: Callable[[], Deferred[Any]], clock: IReactorTime
) -> Generator[Deferred[Any], Any, ReportResult]:
    """Try ``put()`` until it is accepted, refused, or the retries run out."""
    delay = FIRST_DELAY
    tries = 0
    while True:
        tries += 1
        try:
            yield put()
        except ControlPlaneHTTPError as e:
            if not e.retryable:
                return ReportResult(Outcome.REFUSED, tries, str(e), e.status)
            if tries > RETRIES:
                return ReportResult(Outcome.POSTPONED, tries, str(e), e.status)
            yield deferLater(clock, delay, lambda: None)
            delay *= 2
            continue
        return ReportResult(Outcome.ACCEPTED, tries)
