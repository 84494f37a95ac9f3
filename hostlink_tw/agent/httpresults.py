"""
Results that leave by the HTTP report (PROTOCOL §9.2): :class:`HTTPResults`.

An attempt whose result goes by HTTP (it came without an execution attempt
id, or results over the session are off) has its final recorded in the
store like any other; this sends it with ``PUT /api/v1/tasks/{id}``
(:func:`~hostlink_tw.agent.reports.send_report`'s retries), and then:

* accepted: the final is marked acked in the store (done; purged after the
  retention time like a session final);
* postponed (the network or 5xx through every retry): it stays owed in the
  store and :meth:`HTTPResults.retry_owed` sends it again — the engine calls
  it at start and each time the control plane answers over HTTP;
* refused (4xx): logged once with the status and the answer's message,
  recorded in the store (``report_error``) for inspection, never retried.

One report per attempt is in flight at a time, so a retry tick never sends
the same final twice at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.reports import Outcome, ReportResult, send_report
from hostlink_tw.agent.store import StoredMessage, StoreError, TaskStore

__all__ = ["HTTPResults", "report_body"]

_log = Logger(namespace="hostlink_tw.reports")


def report_body(message: StoredMessage) -> dict[str, Any]:
    """The report of a stored final: its payload (status, exit_code, output,
    error, the truncation flags) and the attempt it ends, when it has an id."""
    body = dict(message.payload)
    if message.attempt_id:
        body["execution_attempt_id"] = message.attempt_id
    return body


class HTTPResults:
    """
    Sends the finals of ``http`` attempts; see the module docstring.

    :param api: has ``report(task_id, body)`` (a
        :class:`~hostlink_tw.agent.httpapi.ControlPlaneAPI`).
    :param on_accepted: called with each final the control plane accepted
        (after it is marked acked), for the spool's count.
    """

    def __init__(self, store: TaskStore, api: Any, clock: IReactorTime, *,
                 on_accepted: Callable[[StoredMessage], None] = lambda m: None,
                 log: Logger | None = None) -> None:
        self._store = store
        self._api = api
        self._clock = clock
        self._on_accepted = on_accepted
        self._log = log if log is not None else _log
        self._in_flight: set[str] = set()
        self._retrying = False
        #: Reports by outcome: ``accepted``, ``postponed``, ``refused``.
        self.reports: Counter[str] = Counter()

    def send(self, message: StoredMessage) -> Deferred[None]:
        """Report one final (nothing when its report is in flight already)."""
        if message.message_id in self._in_flight:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        self._in_flight.add(message.message_id)
        d = self._send(message)

        def done(result: object) -> object:
            self._in_flight.discard(message.message_id)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: self._log.failure("reporting a task result failed", f))
        return d

    @inlineCallbacks
    def _send(self, message: StoredMessage) -> Generator[Deferred[Any], Any, None]:
        body = report_body(message)
        result: ReportResult = yield send_report(
            lambda: self._api.report(message.task_id, body), self._clock
        )
        self.reports[result.outcome.value] += 1
        if result.outcome is Outcome.ACCEPTED:
            try:
                yield self._store.ack(message.message_id)
            except StoreError as e:
                self._log.error("cannot mark a reported result: {error}", error=str(e))
                return
            self._log.info("task result reported over HTTP task_id={task_id} "
                           "attempt={attempt}", task_id=message.task_id,
                           attempt=message.attempt_id)
            self._on_accepted(message)
        elif result.outcome is Outcome.REFUSED:
            self._log.error(
                "the control plane refused the report of task_id={task_id} "
                "attempt={attempt} (HTTP {status}): {error}; kept, not retried",
                task_id=message.task_id, attempt=message.attempt_id,
                status=result.status, error=result.error,
            )
            try:
                yield self._store.report_refused(
                    message.task_id, message.attempt_id,
                    f"HTTP {result.status}: {result.error}",
                )
            except StoreError as e:
                self._log.error("cannot record a refused report: {error}", error=str(e))
        else:
            self._log.warn(
                "the report of task_id={task_id} is postponed after {tries} tries: "
                "{error}; it stays in the store and is sent again later",
                task_id=message.task_id, tries=result.tries, error=result.error,
            )

    def retry_owed(self) -> Deferred[None]:
        """Send every owed report the store holds (one pass at a time)."""
        if self._retrying:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        self._retrying = True
        d = self._retry()

        def failed(failure: Failure) -> None:
            self._log.error("cannot read the owed reports: {error}", error=str(failure.value))

        def done(_: object) -> None:
            self._retrying = False

        return d.addErrback(failed).addBoth(done)

    @inlineCallbacks
    def _retry(self) -> Generator[Deferred[Any], Any, None]:
        owed: list[StoredMessage] = yield self._store.http_finals()
        for message in owed:
            yield self.send(message)
