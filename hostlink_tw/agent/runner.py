"""
The agent's task runner: a FIFO of attempts run in slots (PROTOCOL §8.3, §8.4, §8.8).

:class:`TaskRunner` is a Twisted service that knows nothing of the store or
the session: the engine that connects them submits attempts
(:meth:`~TaskRunner.submit`), is asked before each spawn (``before_start``,
where it commits ``running``), and hears of each attempt through a
:class:`RunnerSink` -- started, output chunks in order, ended.  One attempt's
process, its pipes, its timers and its kill are
:class:`~hostlink_tw.agent.process.TaskProcess`'s.

* The queue is in memory and FIFO (it is durable in the store, not here);
  ``concurrency`` attempts run at once, and a slot is taken from the moment
  ``before_start`` is asked until every process of the attempt is gone.
* :meth:`~TaskRunner.discard` drops a queued attempt, or kills a running one
  that then ends silently (§7.2 step 2).
* :meth:`~TaskRunner.pause_output` is the spool's backpressure: no pipe is
  read until :meth:`~TaskRunner.resume_output`.
* :meth:`~TaskRunner.stopService` starts nothing new and kills every running
  group; each ends ``interrupted`` (§8.8).  Queued attempts stay queued.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.output import MIN_THRESHOLD
from hostlink_tw.agent.process import (
    ProcessSettings,
    RunResult,
    TaskProcess,
    TaskSpec,
    log_fields,
    session_argv,
    task_environment,
)
from hostlink_tw.safetext import escape_control
from hostlink_tw.wire.payloads import STATUS_FAILED, STATUS_INTERRUPTED
from hostlink_tw.wire.tasks import NO_EXIT_CODE

__all__ = ["RunResult", "RunnerSink", "RunningTask", "TaskRunner", "TaskSpec"]


@dataclass(frozen=True)
class RunningTask:
    """An attempt whose process runs: its shell's pid (= its process group) and start time."""

    spec: TaskSpec
    pid: int
    started_at: float


class RunnerSink(Protocol):
    """What the runner tells about each attempt (the engine implements it).

    For one attempt: :meth:`started` once, then :meth:`output` chunks in
    order per stream, then :meth:`ended` once, when every process of its
    group is gone.  A discarded attempt gets no :meth:`ended`.  An attempt
    that could not be spawned, or whose ``before_start`` answered after the
    runner stopped, gets :meth:`ended` without :meth:`started`.  An exception
    raised here is logged; the runner goes on.
    """

    def started(self, spec: TaskSpec, pid: int) -> None:
        """The shell of *spec* runs as *pid*, the leader of its own process group."""

    def output(self, spec: TaskSpec, stream: str, chunk: bytes, truncated_locally: bool) -> None:
        """*chunk*, the next raw bytes of *stream* (``stdout``/``stderr``)."""

    def ended(self, spec: TaskSpec, result: RunResult) -> None:
        """*spec* ended with *result*; no output of it follows."""


class _Slot:
    """An attempt holding a slot: ``before_start`` pending, or its process running."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.process: TaskProcess | None = None
        self.discarded = False

    def is_(self, task_id: str, attempt_id: str) -> bool:
        return (self.spec.task_id, self.spec.attempt_id) == (task_id, attempt_id)


class TaskRunner(Service):
    """Runs submitted attempts, ``concurrency`` at a time, and reports to *sink*.

    :param sink: told of each attempt's start, output and end.
    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``; the
        global reactor by default.
    :param concurrency: attempts running at once (≥ 1).
    :param timeout: seconds an attempt may run, 0 for no limit.
    :param kill_grace: seconds between SIGTERM and SIGKILL, and how long the
        pipes may stay open after the shell exits.
    :param flush_threshold: the largest output chunk, in bytes.
    :param flush_interval: seconds after which pending output is flushed.
    :param output_limit: bytes kept per stream.
    :param final_output_bytes: bytes of each stream the final's text keeps.
    :param workdir: the tasks' working directory; the agent's by default.
    :param environ: the environment tasks get, minus ``HOSTLINK_*`` and
        ``SH_*``; ``os.environ`` (when the runner is made) by default.
    :param before_start: called right before each spawn; the attempt runs
        only if its Deferred fires true.
    :param log: where the start and end lines go.
    :param use_setsid: start the shell through util-linux ``setsid`` when it
        is installed; false forces the Python trampoline.
    :raises ValueError: for a setting out of its range.
    """

    def __init__(
        self,
        sink: RunnerSink,
        *,
        reactor: Any = None,
        concurrency: int = 1,
        timeout: float = 0.0,
        kill_grace: float = 5.0,
        flush_threshold: int = 16384,
        flush_interval: float = 0.1,
        output_limit: int = 64 * 2**20,
        final_output_bytes: int = 256 * 1024,
        workdir: str | None = None,
        environ: Mapping[str, str] | None = None,
        before_start: Callable[[TaskSpec], Deferred[bool]] | None = None,
        log: Logger | None = None,
        use_setsid: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        _check(concurrency >= 1, "concurrency must be at least 1")
        _check(timeout >= 0 and kill_grace >= 0, "timeout and kill grace must not be negative")
        _check(flush_interval > 0, "the flush interval must be positive")
        _check(flush_threshold >= MIN_THRESHOLD, f"the flush threshold must be ≥ {MIN_THRESHOLD}")
        _check(output_limit >= 1 and final_output_bytes >= 0, "output sizes out of range")
        self._sink = sink
        self._reactor = reactor
        self._concurrency = concurrency
        self._settings = ProcessSettings(
            timeout, kill_grace, flush_threshold, flush_interval, output_limit, final_output_bytes
        )
        self._workdir = workdir
        self._environ = task_environment(os.environ if environ is None else environ)
        setsid = shutil.which("setsid") if use_setsid else None
        self._setsid = os.path.abspath(setsid) if setsid else None
        _check(self._setsid is not None or bool(sys.executable), "no setsid and no Python")
        self._before_start = before_start
        self._log = log if log is not None else Logger()
        self._queue: deque[TaskSpec] = deque()
        self._slots: list[_Slot] = []
        self._paused = False
        self._stopped: Deferred[None] | None = None

    # --- the queue --------------------------------------------------------------

    def submit(self, spec: TaskSpec) -> None:
        """Queue *spec*; it runs when a slot is free and the service runs.

        An attempt the runner already knows is not queued twice.
        """
        if self.knows(spec.task_id, spec.attempt_id):
            self._log.debug("already known: {task_id} {attempt_id}", **log_fields(spec))
            return
        self._queue.append(spec)
        self._fill()

    def discard(self, task_id: str, attempt_id: str) -> bool:
        """Drop an attempt: a queued one never runs; a running one's group is killed.

        The killed attempt gets no :meth:`RunnerSink.ended` and no more
        output; it keeps its slot until its processes are gone.

        :return: whether the attempt was queued or running.
        """
        for spec in self._queue:
            if (spec.task_id, spec.attempt_id) == (task_id, attempt_id):
                self._queue.remove(spec)
                return True
        for slot in self._slots:
            if slot.is_(task_id, attempt_id) and not slot.discarded:
                slot.discarded = True
                if slot.process is not None:
                    slot.process.interrupt()
                return True
        return False

    def queued(self) -> list[TaskSpec]:
        """The attempts waiting for a slot, oldest first."""
        return list(self._queue)

    def running_tasks(self) -> list[RunningTask]:
        """The attempts whose process runs, oldest first.

        (Named so because ``running`` is ``IService``'s flag.)
        """
        return [
            RunningTask(slot.spec, slot.process.pid, slot.process.started_at)
            for slot in self._slots
            if slot.process is not None and slot.process.pid is not None and not slot.discarded
        ]

    def knows(self, task_id: str, attempt_id: str) -> bool:
        """Whether the attempt is queued, starting or running (and not discarded)."""
        return any(
            (spec.task_id, spec.attempt_id) == (task_id, attempt_id) for spec in self._queue
        ) or any(slot.is_(task_id, attempt_id) and not slot.discarded for slot in self._slots)

    # --- backpressure -----------------------------------------------------------

    def pause_output(self) -> None:
        """Stop reading every task's pipes (tasks started meanwhile start paused)."""
        self._paused = True
        for slot in self._slots:
            if slot.process is not None:
                slot.process.pause()

    def resume_output(self) -> None:
        """Read the pipes again."""
        self._paused = False
        for slot in self._slots:
            if slot.process is not None:
                slot.process.resume()

    # --- the service ------------------------------------------------------------

    def startService(self) -> None:
        """Start running queued attempts."""
        super().startService()  # type: ignore[no-untyped-call]
        self._fill()

    def stopService(self) -> Deferred[None]:
        """Start nothing more; kill every running group.

        Each running attempt ends ``interrupted`` with exit code −1 (a
        discarded one still ends silently).  Queued attempts stay queued.

        :return: fires when every process of every attempt is gone.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        for slot in list(self._slots):
            if slot.process is not None:
                slot.process.interrupt()
        if not self._slots:
            return succeed(None)
        if self._stopped is None:
            self._stopped = Deferred()
        return self._stopped

    # --- slots ------------------------------------------------------------------

    def _fill(self) -> None:
        while self.running and self._queue and len(self._slots) < self._concurrency:
            self._take(self._queue.popleft())

    def _take(self, spec: TaskSpec) -> None:
        slot = _Slot(spec)
        self._slots.append(slot)
        if self._before_start is None:
            self._spawn(slot)
            return
        asked = maybeDeferred(self._before_start, spec)
        asked.addCallbacks(
            lambda start: self._answered(slot, bool(start)),
            lambda failure: self._refused(slot, failure),
        )

    def _answered(self, slot: _Slot, start: bool) -> None:
        if slot.discarded:
            self._release(slot)
        elif not start:
            self._log.debug("not started: {task_id} {attempt_id}", **log_fields(slot.spec))
            self._release(slot)
        elif not self.running:
            # The engine recorded it running: it ends as a shutdown would end it.
            self._end(slot, _unstarted(STATUS_INTERRUPTED, ""))
        else:
            self._spawn(slot)

    def _refused(self, slot: _Slot, failure: Failure) -> None:
        self._log.debug(
            "not started: {task_id} {attempt_id}: {why}",
            why=failure.getErrorMessage(),
            **log_fields(slot.spec),
        )
        self._release(slot)

    def _spawn(self, slot: _Slot) -> None:
        spec = slot.spec
        process = TaskProcess(
            spec,
            self._settings,
            self._reactor,
            lambda stream, chunk, truncated: self._output(slot, stream, chunk, truncated),
            self._log,
        )
        slot.process = process
        try:
            process.spawn(
                session_argv(spec.command, self._setsid),
                self._environ,
                self._workdir,
                self._paused,
            )
        except (OSError, ValueError) as e:
            # The command came from the control plane: one that cannot be
            # spawned (a NUL in it, too long) fails, it never raises here.
            self._log.warn(
                "task_id={task_id} attempt_id={attempt_id} could not start: {why}",
                why=str(e),
                **log_fields(spec),
            )
            self._end(slot, _unstarted(STATUS_FAILED, f"could not start the task: {e}"))
            return
        assert process.pid is not None
        self._log.info(
            "task started task_id={task_id} attempt_id={attempt_id} pid={pid}",
            pid=process.pid,
            **log_fields(spec),
        )
        self._log.debug(
            "task_id={task_id} command={command}",
            command=escape_control(spec.command, 1000),
            **log_fields(spec),
        )
        with self._log.failuresHandled("RunnerSink.started failed"):
            self._sink.started(spec, process.pid)
        process.done.addCallback(lambda result: self._end(slot, result))

    def _output(self, slot: _Slot, stream: str, chunk: bytes, truncated: bool) -> None:
        if not slot.discarded:
            with self._log.failuresHandled("RunnerSink.output failed"):
                self._sink.output(slot.spec, stream, chunk, truncated)

    def _end(self, slot: _Slot, result: RunResult) -> None:
        # The slot is free before the sink hears of the end: what the sink
        # asks the runner then (running_tasks, knows) no longer lists it.
        self._slots.remove(slot)
        if slot.discarded:
            self._log.info("task discarded task_id={task_id} attempt_id={attempt_id}",
                           **log_fields(slot.spec))
        else:
            self._log.info(
                "task ended task_id={task_id} attempt_id={attempt_id} status={status} "
                "exit_code={exit_code} duration={duration:.3f}s",
                status=result.status,
                exit_code=result.exit_code,
                duration=result.duration,
                **log_fields(slot.spec),
            )
            with self._log.failuresHandled("RunnerSink.ended failed"):
                self._sink.ended(slot.spec, result)
        self._freed()

    def _release(self, slot: _Slot) -> None:
        self._slots.remove(slot)
        self._freed()

    def _freed(self) -> None:
        if self._stopped is not None and not self._slots:
            stopped, self._stopped = self._stopped, None
            stopped.callback(None)
        self._fill()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _unstarted(status: str, error: str) -> RunResult:
    """The result of an attempt whose process never ran."""
    return RunResult(
        status=status,
        exit_code=NO_EXIT_CODE,
        output="",
        error=error,
        output_truncated=False,
        error_truncated=False,
        duration=0.0,
        signal=None,
        timed_out=False,
    )
