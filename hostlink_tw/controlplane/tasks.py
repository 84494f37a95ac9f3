"""
The reference control plane runs tasks (PROTOCOL §7–§8, the server side):
:class:`TaskService`, reachable as ``ControlPlane.tasks``.

A task is a shell command for one agent.  It is stored
(:mod:`~hostlink_tw.controlplane.taskstore`), delivered over the agent's
session when its hello allows (:mod:`~hostlink_tw.controlplane.taskdispatch`),
and what the agent sends back is taken in, de-duplicated and acked
(:mod:`~hostlink_tw.controlplane.taskintake`); each reconnect snapshot is
answered with directives (:mod:`~hostlink_tw.controlplane.taskhello`).  The
HTTP paths of §9.1 offer the same attempts and take reports
(:meth:`TaskService.offer`, :meth:`TaskService.report`:
:mod:`~hostlink_tw.controlplane.taskhttp`).  Everything runs on the reactor
thread.

In process (tests, demos, the operator API)::

    record = cp.tasks.create("agent-1", "echo hi")     # TaskRecord, status "pending"
    record = yield cp.tasks.wait_final(record.task_id, timeout=10)
    record.status, record.exit_code                     # "completed", 0
    stdout, stderr = cp.tasks.output(record.task_id)    # the current attempt's text
    cp.tasks.get(task_id); cp.tasks.list("agent-1"); cp.tasks.cancel(task_id)
    unsubscribe = cp.tasks.on_output(print, task_id)    # each OutputChunk as stored

Refusals are :class:`~hostlink_tw.controlplane.taskmodel.TaskRefusedError`
(with a ``code``), an unknown id :class:`~hostlink_tw.controlplane.taskmodel.UnknownTaskError`,
a failing store :class:`~hostlink_tw.controlplane.taskstore.TaskStoreError`.
"""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hostlink_tw.controlplane.inbound import InboundConnection, printable
from hostlink_tw.controlplane.sessions import Session, SessionRegistry
from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.taskdispatch import Dispatcher
from hostlink_tw.controlplane.taskhttp import HttpTasks, ReportOutcome
from hostlink_tw.controlplane.taskintake import AckGate, TaskIntake
from hostlink_tw.controlplane.taskmodel import (
    STATUS_CANCELLED,
    AttemptRecord,
    OutputChunk,
    TaskRecord,
    TaskRefusedError,
    UnknownTaskError,
)
from hostlink_tw.controlplane.taskstore import TaskStore
from hostlink_tw.wire.envelope import Envelope
from hostlink_tw.wire.payloads import STREAM_STDERR, STREAM_STDOUT, TaskFinalPayload

__all__ = ["OutputCallback", "TaskService"]

log = Logger()

#: What :meth:`TaskService.on_output` calls, with each chunk as stored.
OutputCallback = Callable[[OutputChunk], object]


def _new_id(prefix: str) -> str:
    # 64 random bits: unique enough for one control plane's tasks, short
    # enough to type (``hostlink-tw task show task-…``).
    return f"{prefix}-{secrets.token_hex(8)}"


class TaskService:
    """Tasks for agents: the API above, and the task side of every session."""

    def __init__(
        self,
        store: TaskStore,
        sessions: SessionRegistry,
        settings: ControlPlaneSettings,
        *,
        clock: Callable[[], float],
        reactor: Any,
        agents: Callable[[], Mapping[str, object]],
        gate: AckGate | None = None,
    ) -> None:
        """
        :param store: Where tasks live (this service closes it in :meth:`close`).
        :param sessions: The open sessions (to close one when an attempt is revoked).
        :param settings: Limits and ``delivery_enabled``.
        :param clock: Wall-clock Unix time (task times, ``sent_at``).
        :param reactor: Runs :meth:`wait_final` timeouts.
        :param agents: The authorized agents now (tasks are only created for them).
        :param gate: May hold acks back (the test layer).
        """
        self.store = store
        self._settings = settings
        self._clock = clock
        self._reactor = reactor
        self._agents = agents
        self._waiters: dict[str, builtins.list[Deferred[TaskRecord]]] = {}
        self._subscribers: builtins.list[tuple[str | None, OutputCallback]] = []
        self.intake = TaskIntake(store, settings, clock, self, gate)
        self.dispatcher = Dispatcher(
            store, sessions, settings, clock, self.task_changed, self.intake.positions.forget
        )
        self._http = HttpTasks(store, settings, clock, self, self.intake.positions.forget)

    # -- the API -------------------------------------------------------------------

    def create(self, agent_id: str, command: str) -> TaskRecord:
        """
        Store a task for the agent and deliver it if its session allows.

        :raises TaskRefusedError: ``unknown_agent``, ``invalid_command`` (empty,
            a NUL character, not text), ``command_too_long``, ``too_many_pending``.
        """
        if agent_id not in self._agents():
            raise TaskRefusedError(
                "unknown_agent", f"no authorized agent has the id {printable(agent_id)!r}"
            )
        if not isinstance(command, str) or not command:
            raise TaskRefusedError("invalid_command", "the command is empty")
        if "\x00" in command:
            raise TaskRefusedError(
                "invalid_command", "the command contains a NUL character, which no shell can run"
            )
        try:
            size = len(command.encode("utf-8"))
        except UnicodeEncodeError:
            raise TaskRefusedError(
                "invalid_command", "the command is not valid text (it holds a lone surrogate)"
            ) from None
        limit = self._settings.max_command_bytes
        if size > limit:
            raise TaskRefusedError(
                "command_too_long",
                f"the command is {size} bytes long, more than the limit of {limit} bytes",
            )
        unfinished = self.store.count_unfinished(agent_id)
        if unfinished >= self._settings.max_pending_tasks:
            raise TaskRefusedError(
                "too_many_pending",
                f"agent {agent_id} already has {unfinished} unfinished tasks (the limit is "
                f"{self._settings.max_pending_tasks}); wait for some to finish or cancel them",
            )
        record = self.store.add_task(
            _new_id("task"), agent_id, command, _new_id("attempt"), self._clock()
        )
        log.info("task created task_id={task_id} agent_id={agent_id}",
                 task_id=record.task_id, agent_id=agent_id)
        self.dispatcher.dispatch(agent_id)
        return self.get(record.task_id)

    def get(self, task_id: str) -> TaskRecord:
        """
        The task now.

        :raises UnknownTaskError: No task has this id.
        """
        record = self.store.task(task_id)
        if record is None:
            raise UnknownTaskError(task_id)
        return record

    def list(self, agent_id: str | None = None) -> builtins.list[TaskRecord]:
        """Every task (of one agent, if given), oldest first."""
        return self.store.tasks(agent_id)

    def attempts(self, task_id: str) -> builtins.list[AttemptRecord]:
        """The task's attempts, oldest first (the last one is its current attempt)."""
        self.get(task_id)
        return self.store.attempts(task_id)

    def cancel(self, task_id: str) -> TaskRecord:
        """
        Cancel an unfinished task; a finished one is returned as it is.  If the
        agent may hold its attempt, its session is closed so that the reconnect
        discards it (and kills it if it runs).

        :raises UnknownTaskError: No task has this id.
        """
        before = self.get(task_id)
        record = self.store.cancel(task_id, self._clock())
        if record is None:
            raise UnknownTaskError(task_id)
        if before.finished or record.status != STATUS_CANCELLED:
            return record
        log.info("task cancelled task_id={task_id} agent_id={agent_id}",
                 task_id=task_id, agent_id=record.agent_id)
        self.task_changed(record)
        self.dispatcher.revoke(record.agent_id, record.execution_attempt_id, "task cancelled")
        self.dispatcher.dispatch(record.agent_id)
        return record

    def output(self, task_id: str) -> tuple[str, str]:
        """
        The stored stdout and stderr text of the task's current attempt.

        :raises UnknownTaskError: No task has this id.
        """
        attempt = self.get(task_id).execution_attempt_id
        return (
            self.store.output.text(attempt, STREAM_STDOUT),
            self.store.output.text(attempt, STREAM_STDERR),
        )

    def chunks(
        self, task_id: str, after: Mapping[str, int] | None = None
    ) -> builtins.list[OutputChunk]:
        """
        The stored chunks of the task's current attempt, in arrival order
        (with :meth:`on_output`, what a follower replays before going live).

        :param after: Stream → sequence: only the chunks above it.
        :raises UnknownTaskError: No task has this id.
        """
        return self.store.output.chunks(self.get(task_id).execution_attempt_id, after)

    def wait_final(self, task_id: str, *, timeout: float | None = None) -> Deferred[TaskRecord]:
        """
        Fire with the task once it is finished (a final status, or cancelled).
        Cancelling the Deferred forgets the wait; ``timeout`` seconds fail it
        with :class:`defer.TimeoutError`.  No timer outlives it.

        :raises UnknownTaskError: No task has this id (raised, not a failure).
        """
        record = self.get(task_id)
        if record.finished:
            return defer.succeed(record)
        waiters = self._waiters.setdefault(task_id, [])

        def forget(d: Deferred[TaskRecord]) -> None:
            if d in waiters:
                waiters.remove(d)
            if not waiters and self._waiters.get(task_id) is waiters:
                del self._waiters[task_id]

        d: Deferred[TaskRecord] = Deferred(canceller=forget)
        waiters.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)
        return d

    def on_output(self, callback: OutputCallback, task_id: str | None = None) -> Callable[[], None]:
        """
        Call ``callback`` with every chunk stored from now on (of one task, if
        given; of any of its attempts: a chunk names its own), once it is
        stored and acked.  Returns the function that unsubscribes.
        """
        entry = (task_id, callback)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

        return unsubscribe

    def new_attempt(self, task_id: str) -> TaskRecord:
        """
        Give the task a new ``execution_attempt_id`` (pending again, no result
        yet) and deliver it once no older attempt can be live on the agent.

        :raises UnknownTaskError: No task has this id.
        :raises TaskRefusedError: ``task_cancelled``.
        """
        before = self.get(task_id)
        if before.status == STATUS_CANCELLED:
            raise TaskRefusedError("task_cancelled", f"task {task_id} is cancelled")
        record = self.store.replace_attempt(task_id, _new_id("attempt"), self._clock())
        self.task_changed(record)
        self.dispatcher.revoke(record.agent_id, before.execution_attempt_id, "attempt superseded")
        self.dispatcher.dispatch(record.agent_id)
        return record

    def redeliver(self, task_id: str) -> bool:
        """
        Send the current attempt's ``task.deliver`` again on the agent's active
        session, whatever its state (duplicate-delivery tests).

        :returns: False when the agent has no active session.
        :raises UnknownTaskError: No task has this id.
        """
        return self.dispatcher.redeliver(self.get(task_id))

    def accepts_deliveries(self, agent_id: str) -> bool:
        """True if the agent's current session may be given tasks now."""
        link = self.dispatcher.link(agent_id)
        return link is not None and link.usable

    def stop(self) -> None:
        """Cancel every :meth:`wait_final` and forget the subscribers (the control plane stops)."""
        waiting, self._waiters = self._waiters, {}
        for waiters in waiting.values():
            for d in builtins.list(waiters):
                d.cancel()
        self._subscribers.clear()

    def close(self) -> None:
        """Close the store (after the last session is gone)."""
        self.store.close()

    # -- the session side (what inbound.InboundHandlers calls) --------------------------

    def hello_ack(self, session: Session, envelope: Envelope) -> dict[str, object]:
        """The ``agent.hello_ack`` payload for this hello (see :class:`Dispatcher`)."""
        return self.dispatcher.hello(session, envelope)

    def activated(self, session: Session) -> None:
        """The hello_ack went out: deliver what may go now."""
        self.dispatcher.dispatch(session.agent_id)

    def handle(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        """A ``task.*`` message from the agent."""
        self.intake.handle(connection, session, envelope)

    def batch(self, connection: InboundConnection) -> AbstractContextManager[None]:
        """See :meth:`TaskIntake.batch <hostlink_tw.controlplane.taskintake.TaskIntake.batch>`."""
        return self.intake.batch(connection)

    def agent_error(self, session: Session, envelope: Envelope) -> None:
        """An ``error`` from the agent (it may refuse a delivery)."""
        self.dispatcher.agent_error(session, envelope)

    # -- the HTTP paths (what agentapi.AgentAPI calls) ------------------------------------

    def offer(self, agent_id: str) -> builtins.list[TaskRecord]:
        """
        The tasks a poll or heartbeat of the agent offers, oldest first, each
        with its current attempt; pending ones become delivered
        (:meth:`HttpTasks.offer <hostlink_tw.controlplane.taskhttp.HttpTasks.offer>`).

        :raises TaskStoreError: The store failed.
        """
        return self._http.offer(agent_id)

    def report(
        self,
        agent_id: str,
        task_id: str,
        final: TaskFinalPayload,
        attempt_id: str | None = None,
    ) -> ReportOutcome:
        """
        The agent's report of an attempt's end, taken once
        (:meth:`HttpTasks.report <hostlink_tw.controlplane.taskhttp.HttpTasks.report>`).

        :raises UnknownTaskError: No task of this agent has this id.
        :raises TaskRefusedError: ``unknown_attempt``, ``never_delivered``.
        :raises TaskStoreError: The store failed.
        """
        return self._http.report(agent_id, task_id, final, attempt_id)

    # -- what the intake and dispatch report ----------------------------------------

    def task_changed(self, record: TaskRecord) -> None:
        """A task's status or flags changed: finished ones fire their waiters."""
        if not record.finished:
            return
        for d in self._waiters.pop(record.task_id, []):
            d.callback(record)

    def output_stored(self, chunk: OutputChunk) -> None:
        """Hand a stored chunk to the subscribers."""
        for task_id, callback in builtins.list(self._subscribers):
            if task_id is None or task_id == chunk.task_id:
                try:
                    callback(chunk)
                except Exception:  # noqa: BLE001 - a subscriber must not break the intake
                    log.failure("an output subscriber failed")

    def slot_freed(self, agent_id: str) -> None:
        """An attempt of the agent started or ended: deliver more."""
        self.dispatcher.dispatch(agent_id)
