"""
Tasks over the HTTP paths (PROTOCOL §9.1, the server side): what a poll or a
heartbeat offers an agent, and what a report does (:class:`HttpTasks`, used
by :class:`~hostlink_tw.controlplane.tasks.TaskService`).

* **Offered** (``GET /api/v1/tasks``, a heartbeat's ``pending_tasks``): the
  agent's tasks whose status is ``pending`` or ``delivered``, oldest first,
  each with its task's *current* ``execution_attempt_id``.  A pending one
  becomes ``delivered`` (counted as a delivery) — the same attempt a session
  would deliver, never a new one, so one task never has two attempts live
  and an agent that got it over its session too runs it once (§9.2 keys its
  one run by task id and attempt id).  Not offered: ``received`` and
  ``running`` tasks (the agent said over its session that it has them: an
  agent without §9.2's rule, the Go agent, would run them again), finished
  ones (``interrupted`` included, which the agent's own §9.1 filter would
  let through), a task whose older attempt the agent may still hold (only a
  session's hello can discard it, as in dispatch), and pending tasks beyond
  the agent's ``delivery_window`` of delivered and received ones.
* **Reported** (``PUT /api/v1/tasks/{id}``): the body is a ``task.final``
  payload (Go's four fields; the truncation flags and an
  ``execution_attempt_id`` are optional, ours).  It ends the named attempt,
  or without a name the task's current attempt — the newest one ever
  delivered, so a report cannot land on an attempt the agent never had.
  The first final of an attempt wins, whichever path brought it: the same
  report twice, or a report of a final the session already stored, changes
  nothing.  The report's ``output``/``error`` become the attempt's stdout and
  stderr when nothing of that stream was streamed (an agent reporting over
  HTTP streams nothing), so output followers and the task API see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.taskintake import IntakeEvents
from hostlink_tw.controlplane.taskmodel import (
    STATUS_DELIVERED,
    STATUS_PENDING,
    STATUS_RECEIVED,
    AttemptRecord,
    OutputChunk,
    TaskRecord,
    TaskRefusedError,
    UnknownTaskError,
)
from hostlink_tw.controlplane.taskstore import TaskStore
from hostlink_tw.wire.payloads import STREAM_STDERR, STREAM_STDOUT, TaskFinalPayload

__all__ = ["REPORT_MESSAGE_PREFIX", "HttpTasks", "ReportOutcome"]

log = Logger()

#: A report is stored as a final under the message id ``http-report-<attempt id>``:
#: one id per attempt, so a repeated report is recognised as such.
REPORT_MESSAGE_PREFIX = "http-report-"


@dataclass(frozen=True)
class ReportOutcome:
    """
    What a report did.

    :ivar applied: This report's final was stored (False: the attempt had a
        final already, from this path or the session's).
    :ivar task: The task afterwards.
    """

    applied: bool
    task: TaskRecord


class HttpTasks:
    """The offers and reports of the HTTP paths (see the module docstring)."""

    def __init__(
        self,
        store: TaskStore,
        settings: ControlPlaneSettings,
        clock: Callable[[], float],
        events: IntakeEvents,
        forget_output: Callable[[str], None],
    ) -> None:
        """
        :param events: Told of changed tasks, stored output and ended attempts,
            as the session's intake tells them.
        :param forget_output: Told of an attempt whose output was stored here
            (the intake's sequence positions read the store again).
        """
        self._store = store
        self._settings = settings
        self._clock = clock
        self._events = events
        self._forget_output = forget_output

    def offer(self, agent_id: str) -> list[TaskRecord]:
        """
        The tasks the agent should run, oldest first; pending ones become
        delivered.

        :raises TaskStoreError: The store failed (nothing was marked then).
        """
        store = self._store
        held = {a.task_id for a in store.live_attempts(agent_id) if not a.current}
        tasks = store.tasks(agent_id, unfinished=True)
        waiting = sum(1 for t in tasks if t.status in (STATUS_DELIVERED, STATUS_RECEIVED))
        offered: list[TaskRecord] = []
        for task in tasks:
            if task.task_id in held or task.status not in (STATUS_PENDING, STATUS_DELIVERED):
                continue
            if task.status == STATUS_PENDING:
                if waiting >= self._settings.delivery_window:
                    break  # first in, first out: nothing newer jumps the queue
                changed = store.delivered(task.execution_attempt_id, self._clock())
                waiting += 1
                if changed is not None:
                    self._events.task_changed(changed)
                    task = changed
                log.info(
                    "task delivered over HTTP task_id={task_id} agent_id={agent_id}",
                    task_id=task.task_id,
                    agent_id=agent_id,
                )
            offered.append(task)
        return offered

    def report(
        self,
        agent_id: str,
        task_id: str,
        final: TaskFinalPayload,
        attempt_id: str | None = None,
    ) -> ReportOutcome:
        """
        Take the agent's report of an attempt's end.

        :param attempt_id: The attempt it names, if any.
        :raises UnknownTaskError: No task of this agent has this id.
        :raises TaskRefusedError: ``unknown_attempt`` (the named attempt is
            not one of the task's) or ``never_delivered`` (no attempt the
            report could be about ever went out).
        :raises TaskStoreError: The store failed.
        """
        task = self._store.task(task_id)
        if task is None or task.agent_id != agent_id:
            raise UnknownTaskError(task_id)
        attempt = self._target(task, attempt_id)
        target = attempt.execution_attempt_id
        if self._store.has_final(target):
            return ReportOutcome(False, task)
        now = self._clock()
        # Output first: a follower that stops at the final has seen it by then.
        for stream, text, truncated in (
            (STREAM_STDOUT, final.output, final.output_truncated),
            (STREAM_STDERR, final.error, final.error_truncated),
        ):
            if text and self._store.output.highest(target, stream) == 0:
                self._store_text(task_id, target, stream, text, truncated, now)
        stored, changed = self._store.record_final(
            REPORT_MESSAGE_PREFIX + target, target, final, now
        )
        log.info(
            "task final reported over HTTP task_id={task_id} agent_id={agent_id} "
            "status={status} exit_code={exit_code} stored={stored}",
            task_id=task_id,
            agent_id=agent_id,
            status=final.status,
            exit_code=final.exit_code,
            stored=stored,
        )
        if changed is not None:
            self._events.task_changed(changed)
        if stored:
            self._events.slot_freed(agent_id)
        now_task = self._store.task(task_id)
        return ReportOutcome(stored, now_task if now_task is not None else task)

    def _target(self, task: TaskRecord, attempt_id: str | None) -> AttemptRecord:
        attempts = self._store.attempts(task.task_id)
        if attempt_id is not None:
            named = [a for a in attempts if a.execution_attempt_id == attempt_id]
            if not named:
                raise TaskRefusedError(
                    "unknown_attempt",
                    f"task {task.task_id} has no attempt with that execution_attempt_id",
                )
            candidates = named
        else:
            # Go's report names no attempt: the newest one that went out.
            candidates = list(reversed(attempts))
        for attempt in candidates:
            if attempt.deliveries > 0:
                return attempt
        raise TaskRefusedError(
            "never_delivered",
            f"task {task.task_id} was never delivered to this agent: there is nothing to report",
        )

    def _store_text(
        self, task_id: str, attempt_id: str, stream: str, text: str, truncated: bool, now: float
    ) -> None:
        # Surrogates cannot reach here: the body was parsed as strict JSON text.
        chunk = OutputChunk(
            task_id, attempt_id, stream, 1, text, len(text.encode("utf-8")), truncated
        )
        stored, flagged = self._store.output.append(chunk, self._settings.max_output_bytes, now)
        self._forget_output(attempt_id)
        if flagged is not None:
            self._events.task_changed(flagged)
        if stored is not None:
            self._events.output_stored(stored)
