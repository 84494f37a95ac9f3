"""
The HTTP paths' loops (PROTOCOL §9.1, §9.3): :class:`Poller`.

* The heartbeat, ``POST /api/v1/agents/{id}/heartbeat`` every
  ``HOSTLINK_HEARTBEAT_INTERVAL``, is always sent; its ``pending_tasks`` are
  taken in only while polling runs.
* The poll, ``GET /api/v1/tasks`` every ``HOSTLINK_TASK_POLL_INTERVAL``,
  runs only while the :class:`~hostlink_tw.agent.polling.PollingCoordinator`
  says so.

Runnable tasks (§9.1: not completed, failed or cancelled) are handed to
``offer`` — the task engine, which records each one under (task id,
attempt id or "") before it runs, so a task that arrives by several paths
runs once (§9.2).  A request never overlaps the previous one of its kind
(a slow control plane is not piled on), and each failure is logged once per
distinct error, not once per interval.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.httpapi import ControlPlaneAPI, ControlPlaneHTTPError, PolledTask
from hostlink_tw.agent.polling import PollingCoordinator

__all__ = ["Poller"]

_log = Logger(namespace="hostlink_tw.poller")


class Poller:
    """
    Runs the heartbeat always and the poll while the coordinator says so.

    :param offer: takes in one runnable task (``via`` is ``"poll"`` or ``"heartbeat"``).
    :param on_answer: called after each answered poll or heartbeat (the
        control plane is reachable: owed reports can go).
    """

    def __init__(self, api: ControlPlaneAPI, coordinator: PollingCoordinator, *,
                 clock: IReactorTime, poll_interval: float, heartbeat_interval: float,
                 offer: Callable[[PolledTask, str], None], log: Logger | None = None,
                 on_answer: Callable[[], None] | None = None) -> None:
        self.api = api
        self.coordinator = coordinator
        self._clock = clock
        self._poll_interval = poll_interval
        self._offer = offer
        self._on_answer = on_answer
        self._log = log if log is not None else _log
        self._poll = LoopingCall(self._poll_once)
        self._poll.clock = clock
        self._heartbeat = LoopingCall(self._heartbeat_once)
        self._heartbeat.clock = clock
        self._heartbeat_interval = heartbeat_interval
        self._last_error: dict[str, str] = {}
        self._in_flight: set[Deferred[Any]] = set()
        #: Polls and heartbeats by result: ``ok`` or ``error``.
        self.polls: Counter[str] = Counter()
        self.heartbeats: Counter[str] = Counter()
        #: Reactor time of the last poll that got an answer.
        self.last_poll_at: float | None = None

    def start(self) -> None:
        """Start the heartbeat, and the poll if polling runs."""
        self._heartbeat.start(self._heartbeat_interval, now=True)
        self.polling_changed(self.coordinator.polling)

    def stop(self) -> None:
        """Stop both loops and cancel the requests in flight (the agent stops:
        nothing they could bring would be taken in)."""
        for loop in (self._poll, self._heartbeat):
            if loop.running:
                loop.stop()
        for d in list(self._in_flight):
            d.cancel()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._in_flight.add(d)

        def forget(result: object) -> object:
            self._in_flight.discard(d)
            return result

        return d.addBoth(forget)

    def polling_changed(self, polling: bool) -> None:
        """The coordinator's verdict changed."""
        if polling and not self._poll.running and self._heartbeat.running:
            self._log.info("polling the control plane for tasks every {interval:g}s "
                           "({reason})", interval=self._poll_interval,
                           reason=self.coordinator.reason)
            self._poll.start(self._poll_interval, now=True)
        elif not polling and self._poll.running:
            self._log.info("polling paused: {reason}", reason=self.coordinator.reason)
            self._poll.stop()

    def _poll_once(self) -> Deferred[None]:
        d = self._track(self.api.list_tasks())

        def got(tasks: list[PolledTask]) -> None:
            self.polls["ok"] += 1
            self.last_poll_at = self._clock.seconds()
            self._recovered("poll")
            self._take(tasks, "poll")
            self._answered()

        # An error in ``got`` too is logged here: a LoopingCall stops on a failure.
        return d.addCallback(got).addErrback(self._failed, "poll", self.polls)

    def _heartbeat_once(self) -> Deferred[None]:
        d = self._track(self.api.heartbeat())

        def got(tasks: list[PolledTask]) -> None:
            self.heartbeats["ok"] += 1
            self._recovered("heartbeat")
            if self.coordinator.polling:
                self._take(tasks, "heartbeat")
            self._answered()

        return d.addCallback(got).addErrback(self._failed, "heartbeat", self.heartbeats)

    def _answered(self) -> None:
        if self._on_answer is not None:
            self._on_answer()

    def _take(self, tasks: list[PolledTask], via: str) -> None:
        for task in tasks:
            if task.runnable:
                self._offer(task, via)

    def _failed(self, failure: Failure, kind: str, counter: Counter[str]) -> None:
        if isinstance(failure.value, CancelledError):
            return  # stopped
        counter["error"] += 1
        if not isinstance(failure.value, ControlPlaneHTTPError):
            self._log.failure("{kind} failed", failure, kind=kind)
            return
        text = str(failure.value)
        if self._last_error.get(kind) != text:
            self._last_error[kind] = text
            self._log.warn("{kind} failed: {error}", kind=kind, error=text)

    def _recovered(self, kind: str) -> None:
        if self._last_error.pop(kind, None) is not None:
            self._log.info("{kind} works again", kind=kind)

    def describe(self) -> dict[str, Any]:
        """For the status page."""
        return {
            "polling": self.coordinator.polling,
            "reason": self.coordinator.reason,
            "last_poll_at": self.last_poll_at,
            "polls": dict(self.polls),
            "heartbeats": dict(self.heartbeats),
        }
