"""
``GET /operator/v1/tasks/{id}/output``: one task's output as it arrives, as
newline-delimited JSON over a chunked HTTP response (:class:`OutputFollower`).

Each line is one event (the README shows them all):

``{"event": "status", "task": {…}}``
    first, and again whenever the task's status or current attempt changes;
``{"event": "output", "execution_attempt_id", "stream", "sequence", "data", "truncated_locally"}``
    a stored chunk of the current attempt, each stream in sequence order;
``{"event": "heartbeat"}``
    every second while the task waits for delivery, every 10 s otherwise,
    so that a client can tell a silent task from a dead connection;
``{"event": "end", "task": {…}}``
    last: the task is finished (or, without ``follow``, the stored output
    has all been sent); the response ends after it.

A client that lost the connection asks again with ``attempt`` and
``after_stdout``/``after_stderr`` (the last sequences it got) and receives
exactly the rest: sequences are per attempt and stream, so nothing is lost
or sent twice.

Flow control: the follower is the request's push producer.  While the
client does not read (the transport paused it), nothing is written; live
chunks queue up to ``max_buffered_bytes``, and past that the follower stops
queueing and, once it has written what it holds, reads the rest back from
the task store — the store, not memory, holds what a slow reader is
behind on.  What it holds is bounded by the control plane's output limit.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from hostlink_tw.controlplane.taskmodel import (
    STATUS_DELIVERED,
    STATUS_PENDING,
    OutputChunk,
    TaskRecord,
)
from hostlink_tw.controlplane.tasks import TaskService

__all__ = [
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_WAITING",
    "MAX_BUFFERED_BYTES",
    "POLL_INTERVAL",
    "OutputFollower",
    "task_document",
]

log = Logger()

#: How often the follower looks at the task's status (a primary-key read).
POLL_INTERVAL = 0.5
#: Heartbeat period while the task waits for delivery (clients count down on it).
HEARTBEAT_WAITING = 1.0
#: Heartbeat period otherwise.
HEARTBEAT_INTERVAL = 10.0
#: Live output queued for a client that does not read, before the store takes over.
MAX_BUFFERED_BYTES = 1 << 20

_WAITING = frozenset({STATUS_PENDING, STATUS_DELIVERED})


def task_document(record: TaskRecord) -> dict[str, Any]:
    """A task as the operator API shows it (``finished`` added to its JSON form)."""
    document = record.to_dict()
    document["finished"] = record.finished
    return document


def event_line(event: Mapping[str, Any]) -> bytes:
    """One NDJSON line (ASCII: any lone surrogate in task output stays an escape)."""
    return json.dumps(event, separators=(",", ":")).encode("ascii") + b"\n"


@implementer(IPushProducer)
class OutputFollower:
    """Writes one task's events to ``request`` until the task ends or the client leaves."""

    def __init__(
        self,
        request: Request,
        tasks: TaskService,
        task_id: str,
        *,
        clock: Any,
        attempt: str | None = None,
        after: Mapping[str, int] | None = None,
        follow: bool = True,
        poll_interval: float = POLL_INTERVAL,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        """
        :param request: The GET being answered (status line not sent yet).
        :param tasks: The control plane's task API.
        :param task_id: An existing task.
        :param clock: ``IReactorTime``: the status poll and heartbeats.
        :param attempt: The attempt ``after`` refers to; another (or none) starts from 0.
        :param after: Stream → last sequence the client has.
        :param follow: False: the stored output, then the end, without waiting.
        """
        self._request = request
        self._tasks = tasks
        self._task_id = task_id
        self._clock = clock
        self._requested_attempt = attempt
        self._after = dict(after or {})
        self._follow = follow
        self._poll_interval = poll_interval
        self._max_buffered = max_buffered_bytes
        self._pending: deque[OutputChunk] = deque()
        self._live_bytes = 0
        self._behind = False
        self._paused = False
        self._done = False
        self._ending = False
        self._status_due = False
        self._attempt = ""
        self._status = ""
        self._sent: dict[str, int] = {}
        self._last_write = 0.0
        self._unsubscribe: Callable[[], None] | None = None
        self._final: Deferred[TaskRecord] | None = None
        self._poll: LoopingCall | None = None

    # -- start and end -----------------------------------------------------------

    def start(self) -> None:
        """
        Send the headers and the first events, then follow.

        :raises UnknownTaskError: No such task (nothing is sent).
        :raises TaskStoreError: The store failed (nothing is sent).
        """
        # Everything that can fail is read before the answer starts (a
        # failure is then an ordinary error answer); nothing can be stored
        # between these reads and the subscription: one thread.
        record = self._tasks.get(self._task_id)
        if self._requested_attempt == record.execution_attempt_id:
            self._sent = {k: v for k, v in self._after.items() if v > 0}
        self._pending.extend(self._tasks.chunks(self._task_id, self._sent))
        request = self._request
        request.setHeader(b"Content-Type", b"application/x-ndjson")  # type: ignore[no-untyped-call]
        request.setHeader(b"Cache-Control", b"no-store")  # type: ignore[no-untyped-call]
        request.registerProducer(self, True)  # type: ignore[no-untyped-call]
        request.notifyFinish().addBoth(self._request_done)
        self._attempt = record.execution_attempt_id
        self._status = record.status
        self._write({"event": "status", "task": task_document(record)})
        if self._follow and not record.finished:
            self._unsubscribe = self._tasks.on_output(self._on_chunk, self._task_id)
            final = self._tasks.wait_final(self._task_id)
            final.addCallbacks(self._on_final, self._final_failed)
            self._final = final
            self._poll = LoopingCall(self._tick)
            self._poll.clock = self._clock
            self._poll.start(self._poll_interval, now=False)
        else:
            self._ending = True
        self._pump()

    def _on_final(self, record: TaskRecord) -> None:
        self._final = None
        self._ending = True
        self._pump()

    def _final_failed(self, failure: Failure) -> None:
        # Cancelled: we stopped waiting, or the control plane is stopping
        # (its connections are being dropped, this one included).
        self._final = None
        if not failure.check(CancelledError):  # type: ignore[no-untyped-call]
            log.failure("following a task's output", failure)

    def _finish(self) -> None:
        try:
            record = self._tasks.get(self._task_id)
        except Exception:  # noqa: BLE001 - the store closing under us: end without it
            self._abort()
            return
        self._write({"event": "end", "task": task_document(record)})
        self._cleanup()
        self._request.unregisterProducer()  # type: ignore[no-untyped-call]
        self._request.finish()  # type: ignore[no-untyped-call]

    def _abort(self) -> None:
        self._cleanup()
        transport: Any = self._request.channel.transport
        if transport is not None:
            transport.abortConnection()

    def _request_done(self, result: object) -> None:
        # Finished by us, or the connection is gone (a failure, consumed
        # here): either way, stop.
        self._cleanup()

    def _cleanup(self) -> None:
        if self._done:
            return
        self._done = True
        self._pending.clear()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        final, self._final = self._final, None
        if final is not None:
            final.cancel()

    # -- IPushProducer -------------------------------------------------------------

    def pauseProducing(self) -> None:
        """The client's buffer is full: write nothing until resumed."""
        self._paused = True

    def resumeProducing(self) -> None:
        """Write again."""
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._cleanup()

    # -- what arrives ------------------------------------------------------------------

    def _on_chunk(self, chunk: OutputChunk) -> None:
        if self._done or self._behind or chunk.execution_attempt_id != self._attempt:
            # Another attempt's chunk: the poll notices the change of attempt.
            return
        self._pending.append(chunk)
        self._live_bytes += len(chunk.data)
        if self._live_bytes > self._max_buffered:
            # Stop queueing: once the queue is written, the rest comes from the store.
            self._behind = True
        self._pump()

    def _tick(self) -> None:
        try:
            record = self._tasks.get(self._task_id)
        except Exception:  # noqa: BLE001 - the store closing under us: end without it
            self._abort()
            return
        if record.execution_attempt_id != self._attempt:
            # A new attempt: its output starts again at sequence 1.
            self._attempt = record.execution_attempt_id
            self._sent = {}
            self._pending.clear()
            self._behind = True
            self._status_due = True
        if record.status != self._status:
            self._status = record.status
            self._status_due = True
        if record.finished:
            self._ending = True
        if not self._paused and not self._status_due:
            period = HEARTBEAT_WAITING if record.status in _WAITING else HEARTBEAT_INTERVAL
            if self._clock.seconds() - self._last_write >= period - 1e-6:
                self._write({"event": "heartbeat"})
        self._pump()

    def _pump(self) -> None:
        """Write what is due, in order, until paused, out of work, or ended."""
        while not self._paused and not self._done:
            if self._status_due:
                self._status_due = False
                try:
                    record = self._tasks.get(self._task_id)
                except Exception:  # noqa: BLE001 - the store closing under us
                    self._abort()
                    return
                self._write({"event": "status", "task": task_document(record)})
            elif self._pending:
                chunk = self._pending.popleft()
                if (chunk.execution_attempt_id != self._attempt
                        or chunk.sequence <= self._sent.get(chunk.stream, 0)):
                    continue
                self._sent[chunk.stream] = chunk.sequence
                self._write({
                    "event": "output",
                    "execution_attempt_id": chunk.execution_attempt_id,
                    "stream": chunk.stream,
                    "sequence": chunk.sequence,
                    "data": chunk.data,
                    "truncated_locally": chunk.truncated_locally,
                })
            elif self._behind:
                self._behind = False
                self._live_bytes = 0
                try:
                    self._pending.extend(self._tasks.chunks(self._task_id, self._sent))
                except Exception:  # noqa: BLE001 - the store closing under us
                    self._abort()
                    return
            else:
                self._live_bytes = 0
                if self._ending:
                    self._finish()
                return

    def _write(self, event: Mapping[str, Any]) -> None:
        self._last_write = self._clock.seconds()
        self._request.write(event_line(event))  # type: ignore[no-untyped-call]
