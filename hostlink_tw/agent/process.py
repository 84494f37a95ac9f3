"""
One task attempt's process, from its spawn until every process of its group is gone.

PROTOCOL §8.3 (running), §8.4 (output) and the kill of §8.8; the queue and
the slots are :mod:`hostlink_tw.agent.runner`'s.  :class:`TaskProcess` is the
``ProcessProtocol``:

* ``/bin/sh -c <command>`` runs in its own session and process group:
  Twisted's ``spawnProcess`` cannot ask for one, so the argument vector
  (:func:`session_argv`) goes through util-linux ``setsid``, or a tiny Python
  trampoline that calls ``os.setsid()`` before it execs the shell.  The shell
  is the group leader: its pid is the group id every kill uses.
* Each pipe feeds a :class:`~hostlink_tw.agent.output.StreamOutput`; a flush
  timer runs while something is pending.
* Twisted's ``processExited`` comes when the shell exits, ``processEnded``
  once every pipe is closed too.  A background grandchild that holds the
  pipes gets the kill grace after the shell's exit, then the group is killed;
  after ``processEnded`` whatever is left of the group is killed, and the
  attempt ends (:attr:`TaskProcess.done`) only when no process of the group
  is alive.
* Timeout, discard and shutdown send SIGTERM to the group, then SIGKILL
  after the grace (one grace in all, whenever the shell exits meanwhile).
* Pipes still open :data:`ESCAPED_PIPE_WAIT` after the group's SIGKILL are
  held by a process that made its own session: they are closed on our side
  (unless output is paused), so it cannot keep the attempt alive.  A stop
  therefore ends within the grace plus :data:`ESCAPED_PIPE_WAIT` plus
  :data:`GROUP_EXIT_WAIT`, one second: §8.8 allows the grace plus 2 s for
  the kill, recording the final and sending it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.output import StreamOutput
from hostlink_tw.duration import format_duration
from hostlink_tw.safetext import escape_control
from hostlink_tw.wire.payloads import STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED
from hostlink_tw.wire.tasks import NO_EXIT_CODE, final_payload

__all__ = [
    "ENV_PREFIXES_REMOVED",
    "ProcessSettings",
    "RunResult",
    "TaskProcess",
    "TaskSpec",
    "group_alive",
    "kill_group",
    "log_fields",
    "session_argv",
    "task_environment",
]

#: Variables whose name starts with one of these never reach a task (§8.3):
#: the agent's own settings and secrets.
ENV_PREFIXES_REMOVED = ("HOSTLINK_", "SH_")

SHELL = "/bin/sh"

# The fallback when util-linux setsid is missing: a new session, then the shell
# in the same process (exec), so the pid Twisted watches is the shell's.
_TRAMPOLINE = "import os, sys\nos.setsid()\nos.execv('/bin/sh', ['/bin/sh', '-c', sys.argv[1]])\n"

#: How long the end waits, after the last SIGKILL, for the group's processes
#: to die; one stuck in the kernel (uninterruptible sleep) must not hold a
#: slot for ever.
GROUP_EXIT_WAIT = 0.5
_GROUP_POLL = 0.01

#: How long after the group's SIGKILL the pipes may stay open before they are
#: closed on our side: only a process that left the group (its own
#: ``setsid``) can still hold them then.
ESCAPED_PIPE_WAIT = 0.5

_STREAMS = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True)
class TaskSpec:
    """One attempt to run: its ids and the shell command."""

    task_id: str
    attempt_id: str
    command: str


@dataclass(frozen=True)
class RunResult:
    """How an attempt ended, with the final's texts (§8.3, §8.5).

    ``exit_code`` is ``-1`` when the shell was killed by a signal, timed out
    or was interrupted.  ``output``/``error`` are the kept texts of stdout
    and stderr; after a timeout ``error`` ends with a line saying so.
    ``duration`` is seconds from the spawn to the end on the runner's clock;
    ``signal`` the signal that killed the shell, if one did.
    """

    status: str
    exit_code: int
    output: str
    error: str
    output_truncated: bool
    error_truncated: bool
    duration: float
    signal: int | None
    timed_out: bool

    def final_payload(self) -> dict[str, Any]:
        """Return the ``task.final`` payload of this result."""
        return final_payload(
            self.status,
            self.exit_code,
            self.output,
            self.error,
            self.output_truncated,
            self.error_truncated,
        )


@dataclass(frozen=True)
class ProcessSettings:
    """The settings every attempt's process runs with (§10 names in brackets)."""

    timeout: float = 0.0  # HOSTLINK_TASK_TIMEOUT, 0 = none
    kill_grace: float = 5.0  # HOSTLINK_TASK_KILL_GRACE
    flush_threshold: int = 16384  # HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD
    flush_interval: float = 0.1  # HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL
    output_limit: int = 64 * 2**20  # HOSTLINK_TASK_OUTPUT_LIMIT_BYTES
    final_output_bytes: int = 256 * 1024  # HOSTLINK_TASK_FINAL_OUTPUT_BYTES


def log_fields(spec: TaskSpec) -> dict[str, str]:
    """The log fields naming an attempt: its ids, made safe to print (the peer chose them)."""
    return {
        "task_id": escape_control(spec.task_id, 200),
        "attempt_id": escape_control(spec.attempt_id, 200),
    }


def session_argv(command: str, setsid: str | None) -> list[str]:
    """Return the argument vector running *command* in a new session.

    *setsid* is the path of util-linux ``setsid`` (it execs without forking
    when its caller leads no process group, which a freshly spawned child
    never does), or ``None`` for the Python trampoline.
    """
    if setsid is not None:
        return [setsid, SHELL, "-c", command]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, command]


def task_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return *environ* without the variables a task must not see (§8.3)."""
    return {
        name: value
        for name, value in environ.items()
        if not name.startswith(ENV_PREFIXES_REMOVED)
    }


def kill_group(pgid: int, signum: int) -> None:
    """Send *signum* to process group *pgid*; a group already gone is fine.

    A group none of whose processes we may signal (they all became another
    user, through a setuid program) is out of reach: :func:`group_alive`
    still sees it, and the end waits for it no longer than
    :data:`GROUP_EXIT_WAIT`.
    """
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process of group *pgid* is still alive.

    A zombie does not count: it is dead, only waiting for a parent (init,
    for an orphaned grandchild) to reap it.  Without ``/proc`` every member
    ``kill`` still finds counts.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return any(state not in (b"Z", b"X") for state in _group_states(pgid))
    except OSError:
        return True


def _group_states(pgid: int) -> Iterator[bytes]:
    """Yield the state letter of every process of group *pgid*, from ``/proc``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                line = stat.read()
        except OSError:
            continue  # it ended meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold anything, parentheses too.
        fields = line[line.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode():
            yield fields[0]


class TaskProcess(ProcessProtocol):
    """The process of one attempt.

    :param spec: the attempt.
    :param settings: timeout, grace, output settings.
    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param output: called with ``(stream, chunk, truncated_locally)`` in
        order per stream.
    :param log: where its warnings go (an escaped process, one that
        survived SIGKILL).

    :attr:`done` fires with the :class:`RunResult` once every process of the
    group is gone and the last chunk went to *output*.
    """

    pid: int | None = None
    started_at: float = 0.0

    def __init__(
        self,
        spec: TaskSpec,
        settings: ProcessSettings,
        reactor: Any,
        output: Callable[[str, bytes, bool], None],
        log: Logger,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.done: Deferred[RunResult] = Deferred()
        self._reactor = reactor
        self._output = output
        self._log = log
        self._outputs = {fd: self._stream(name) for fd, name in _STREAMS.items()}
        self._timers: dict[str, IDelayedCall] = {}
        self._paused = False
        self._terminating = False
        self._interrupted = False
        self._timed_out = False
        self._reason: BaseException | None = None
        self._gone_by = 0.0

    def _stream(self, name: str) -> StreamOutput:
        def emit(chunk: bytes, truncated: bool) -> None:
            self._output(name, chunk, truncated)

        settings = self.settings
        return StreamOutput(
            name,
            threshold=settings.flush_threshold,
            limit=settings.output_limit,
            final_bytes=settings.final_output_bytes,
            emit=emit,
        )

    def _producer(self) -> IPushProducer | None:
        # Twisted's Process is a push producer over its output pipes
        # (LIBRARY-FACTS), though IProcessTransport does not declare it.
        return cast(IPushProducer, self.transport) if self.transport is not None else None

    # --- driven by the runner ---------------------------------------------------

    def spawn(self, argv: list[str], environ: Mapping[str, str], path: str | None,
              paused: bool) -> None:
        """Start the shell; its pipes start paused when *paused*.

        :raises OSError: when the process cannot be spawned (a missing
            working directory, a command too long for ``execve``, no file
            descriptors left).
        :raises ValueError: for a command ``execve`` cannot take (a NUL).
        """
        self._paused = paused
        if path is not None and not os.path.isdir(path):
            # Twisted's forked child would report a failed chdir as its own
            # traceback on the task's stderr.
            raise FileNotFoundError(errno.ENOENT, "no such working directory", path)
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            self.started_at = self._reactor.seconds()
            self._reactor.spawnProcess(
                self, argv[0], argv, env=dict(environ), path=path,
                childFDs={0: stdin, 1: "r", 2: "r"},
            )
        finally:
            os.close(stdin)
        if self.settings.timeout > 0:
            self._arm("timeout", self.settings.timeout, self._timeout_passed)

    def pause(self) -> None:
        """Stop reading the pipes: the task blocks once they are full."""
        self._paused = True
        producer = self._producer()
        if producer is not None:
            producer.pauseProducing()

    def resume(self) -> None:
        """Read the pipes again."""
        self._paused = False
        producer = self._producer()
        if producer is not None:
            producer.resumeProducing()

    def interrupt(self) -> None:
        """Kill the group for a shutdown or a discard: the status is ``interrupted``."""
        self._interrupted = True
        self._terminate()

    # --- ProcessProtocol --------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        if self._paused:
            self.pause()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        stream = self._outputs.get(childFD)
        if stream is None:
            return
        stream.feed(data)
        if stream.pending and "flush" not in self._timers:
            self._arm("flush", self.settings.flush_interval, self._flush)

    def childConnectionLost(self, childFD: int) -> None:
        stream = self._outputs.get(childFD)
        if stream is not None:
            stream.finish()

    def processExited(self, reason: Failure) -> None:
        self._reason = reason.value
        self._disarm("timeout")
        if not self._terminating:
            # The pipes may outlive the shell (a background process holds
            # them): the group gets the grace, then SIGKILL; processEnded
            # disarms it.  A group already terminating has its SIGKILL armed.
            self._arm("linger", self.settings.kill_grace, self._kill)

    def processEnded(self, reason: Failure) -> None:
        self._reason = reason.value
        for name in ("flush", "linger", "escaped", "timeout", "kill"):
            self._disarm(name)
        for stream in self._outputs.values():
            stream.finish()
        assert self.pid is not None
        kill_group(self.pid, signal.SIGKILL)
        self._gone_by = self._reactor.seconds() + GROUP_EXIT_WAIT
        self._wait_gone()

    # --- timers -----------------------------------------------------------------

    def _arm(self, name: str, delay: float, call: Callable[[], None]) -> None:
        self._disarm(name)

        def fire() -> None:
            del self._timers[name]
            call()

        self._timers[name] = self._reactor.callLater(delay, fire)

    def _disarm(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _flush(self) -> None:
        for stream in self._outputs.values():
            stream.flush()

    def _timeout_passed(self) -> None:
        self._timed_out = True
        self._terminate()

    def _terminate(self) -> None:
        if self._terminating or self.pid is None or self.done.called:
            return
        self._terminating = True
        kill_group(self.pid, signal.SIGTERM)
        self._arm("kill", self.settings.kill_grace, self._kill)

    def _kill(self) -> None:
        assert self.pid is not None
        kill_group(self.pid, signal.SIGKILL)
        # Pipes still open after this can only be held by a process that
        # left the group; processEnded disarms it.
        self._arm("escaped", ESCAPED_PIPE_WAIT, self._close_pipes)

    def _close_pipes(self) -> None:
        if self._paused and not self._interrupted:
            # Unread output, not an escaped process, may be what is left:
            # it is read once acks free the spool.
            self._arm("escaped", ESCAPED_PIPE_WAIT, self._close_pipes)
            return
        if self._paused:
            # Interrupted (a shutdown, a discard) with the spool full: no ack
            # will resume the reading, and waiting would keep the attempt, its
            # slot and its interrupted final from ending (§8.8).  The group is
            # dead; what it left unread in the pipes is dropped.
            self._log.info(
                "task_id={task_id} attempt_id={attempt_id} interrupted with its output "
                "paused: its unread output is dropped",
                **log_fields(self.spec),
            )
        else:
            self._log.warn(
                "a process outside the group of task_id={task_id} attempt_id={attempt_id} "
                "holds its output pipes: closing them",
                **log_fields(self.spec),
            )
        assert self.transport is not None
        self.transport.loseConnection()

    def _wait_gone(self) -> None:
        assert self.pid is not None
        if group_alive(self.pid):
            if self._reactor.seconds() < self._gone_by:
                self._arm("gone", _GROUP_POLL, self._wait_gone)
                return
            self._log.warn(
                "a process of task_id={task_id} attempt_id={attempt_id} survived SIGKILL",
                **log_fields(self.spec),
            )
        for name in list(self._timers):
            self._disarm(name)
        self.done.callback(self._result())

    def _result(self) -> RunResult:
        exit_code: int | None = 0
        killed_by: int | None = None
        if isinstance(self._reason, ProcessTerminated):
            exit_code, killed_by = self._reason.exitCode, self._reason.signal
        elif not isinstance(self._reason, ProcessDone):
            exit_code = None
        stdout, stderr = self._outputs[1], self._outputs[2]
        error = stderr.final_text()
        if self._interrupted:
            status, code = STATUS_INTERRUPTED, NO_EXIT_CODE
        elif self._timed_out:
            status, code = STATUS_FAILED, NO_EXIT_CODE
            line = f"task timed out after {format_duration(self.settings.timeout)}"
            error = f"{error}\n{line}" if error and not error.endswith("\n") else error + line
        elif killed_by is not None or exit_code is None:
            status, code = STATUS_FAILED, NO_EXIT_CODE
        else:
            status = STATUS_COMPLETED if exit_code == 0 else STATUS_FAILED
            code = exit_code
        return RunResult(
            status=status,
            exit_code=code,
            output=stdout.final_text(),
            error=error,
            output_truncated=stdout.final_truncated(),
            error_truncated=stderr.final_truncated(),
            duration=self._reactor.seconds() - self.started_at,
            signal=killed_by,
            timed_out=self._timed_out,
        )
