"""
What the operator reads when an attempt ends: one line per end, and the
warnings that a run of ends deserves (another agent with this identity; a
connect that keeps failing for one cause).

The client calls :class:`EndReporter` once per ended attempt; the decisions
(classification, when to escalate) are the pure functions of
:mod:`hostlink_tw.agent.diagnosis`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from hostlink_tw.agent.attempt import Attempt
from hostlink_tw.agent.diagnosis import (
    REPLACED_WINDOW,
    Escalation,
    Replacements,
    classify,
    refusal_hint,
)
from hostlink_tw.agent.events import EndReason
from hostlink_tw.wire.vocabulary import CLOSE_REPLACED

__all__ = ["EndReporter"]


class EndReporter:
    """
    The log lines about ended attempts.

    :param log: where they go.
    :param fields: the fields every line carries (agent id, URL).
    """

    def __init__(self, log: Logger, fields: Callable[[], dict[str, Any]]) -> None:
        self._log = log
        self._fields = fields
        self._escalation = Escalation()
        self._replacements = Replacements()

    def session_active(self) -> None:
        """A session is up: a later run of failures is news again."""
        self._escalation.session_active()

    def keep_backoff(self, now: float) -> bool:
        """Whether an activation should leave the backoff growing (sessions keep being replaced)."""
        return self._replacements.streak(now)

    def ended(self, attempt: Attempt, end: EndReason, tls: bool, *, stopping: bool,
              attempts: int) -> None:
        """One line about this end: a refusal with its hint, a TLS failure, or the end."""
        fields = self._fields()
        if attempt.refused_status is not None:
            # The reason names the status ("upgrade refused: HTTP 401 ...",
            # or "upgrade not accepted (expected 101): HTTP 200 OK").
            self._log.warn(
                "{reason}; {hint} agent_id={agent_id} url={url} attempt={attempt}",
                status=attempt.refused_status,
                reason=end.text,
                hint=refusal_hint(attempt.refused_status, end.text),
                attempt=attempts,
                **fields,
            )
        elif tls and not stopping:
            self._log.error(
                "{reason} (connecting to {url}) agent_id={agent_id} attempt={attempt}",
                reason=end.text,
                attempt=attempts,
                **fields,
            )
        else:
            # Losing an active session is news; another failed attempt during
            # an outage is not (the retry line follows anyway).
            emit = self._log.warn if attempt.activated and not stopping else self._log.info
            emit(
                "connection ended: {reason} close_code={close_code} "
                "agent_id={agent_id} url={url} attempt={attempt}",
                reason=end.text,
                close_code=end.close_code,
                attempt=attempts,
                **fields,
            )

    def run_of_ends(self, attempt: Attempt, end: EndReason, *, attempts: int, now: float,
                    host: str, port: int, secure: bool) -> bool:
        """
        Say what a run of ends has in common, at warning level.

        :returns: whether the backoff should start from ``RECONNECT_MIN``
            again (a session outlived a run of replacements).
        """
        if attempt.activated:
            reset = False
            if end.close_code == CLOSE_REPLACED and end.kind == "closed_by_peer":
                if self._replacements.replaced(now):
                    self._log.warn(
                        "another process or host is using agent id {agent_id}: the control "
                        "plane replaced this agent's session {count} times in {window:g}s "
                        "(a cloned VM or a second agent with the same identity?); backing off "
                        "url={url}",
                        count=self._replacements.count,
                        window=REPLACED_WINDOW,
                        **self._fields(),
                    )
            elif attempt.backoff_kept and attempt.activated_at is not None:
                # Not replaced for a long while: the other agent is gone.
                reset = now - attempt.activated_at >= REPLACED_WINDOW
            self._replacements.other_end(now)
            return reset
        cause = classify(attempt.failure, end.kind, end.text, host, port,
                         secure=secure, tcp_connected=attempt.tcp_connected)
        if self._escalation.failed(cause, attempts, now) and cause.hint:
            self._log.warn(
                "no session for {elapsed:.0f}s after {attempt} attempts: {reason}; {hint} "
                "agent_id={agent_id} url={url}",
                elapsed=self._escalation.failing_for(now),
                attempt=attempts,
                reason=end.text,
                hint=cause.hint,
                cause=cause.kind,
                **self._fields(),
            )
        return False
