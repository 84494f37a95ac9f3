"""The HTTP report's retry schedule (hostlink_tw.agent.reports, PROTOCOL §9.1) on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.httpapi import ControlPlaneHTTPError
from hostlink_tw.agent.reports import Outcome, send_report


class ReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[float] = []

    def put(self, answers: list[Any]) -> Any:
        def call() -> Deferred[Any]:
            self.calls.append(self.clock.seconds())
            answer = answers.pop(0)
            return fail(answer) if isinstance(answer, Exception) else succeed(answer)

        return call

    def test_accepted_at_once(self) -> None:
        result = self.successResultOf(send_report(self.put([None]), self.clock))
        self.assertEqual((result.outcome, result.tries), (Outcome.ACCEPTED, 1))

    def test_five_retries_with_1s_doubling_then_postponed(self) -> None:
        error = ControlPlaneHTTPError("HTTP 503", status=503, retryable=True)
        d = send_report(self.put([error] * 6), self.clock)
        for delay in (1, 2, 4, 8, 16):
            self.assertNoResult(d)
            self.clock.advance(delay)
        result = self.successResultOf(d)
        self.assertEqual(self.calls, [0, 1, 3, 7, 15, 31])
        self.assertEqual((result.outcome, result.tries, result.status),
                         (Outcome.POSTPONED, 6, 503))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_network_error_then_accepted(self) -> None:
        error = ControlPlaneHTTPError("refused", status=None, retryable=True)
        d = send_report(self.put([error, error, None]), self.clock)
        self.clock.advance(1)
        self.clock.advance(2)
        result = self.successResultOf(d)
        self.assertEqual((result.outcome, result.tries), (Outcome.ACCEPTED, 3))

    def test_4xx_is_not_retried(self) -> None:
        error = ControlPlaneHTTPError("HTTP 409: already final", status=409, retryable=False)
        result = self.successResultOf(send_report(self.put([error]), self.clock))
        self.assertEqual((result.outcome, result.tries, result.status, result.error),
                         (Outcome.REFUSED, 1, 409, "HTTP 409: already final"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
