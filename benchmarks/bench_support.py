"""
Shared pieces of the benchmarks: child processes, /proc readings, identities,
statistics and the machine description.

Everything here talks to 127.0.0.1 only, and every child process a benchmark
starts is watched by a :class:`ChildProcess`, whose :meth:`ChildProcess.kill`
always ends it (SIGKILL after a bounded wait) so no run leaves processes behind.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = [
    "REPO",
    "ChildProcess",
    "Identity",
    "clock_ticks",
    "cpu_seconds",
    "global_reactor",
    "machine_description",
    "make_identity",
    "median",
    "quiet_logging",
    "raise_nofile_limit",
    "rss_bytes",
    "run_seconds",
    "sleep",
    "spawn_agent",
    "subprocess_env",
    "twistd_path",
]

#: The repository root: children run here so ``twisted/plugins`` is found.
REPO = Path(__file__).resolve().parent.parent


def global_reactor() -> Any:
    """The global reactor, typed loosely (its interfaces are zope's, unseen by mypy)."""
    from twisted.internet import reactor

    return reactor


def twistd_path() -> str:
    """The ``twistd`` of the virtualenv running the benchmarks."""
    return str(Path(sys.executable).parent / "twistd")


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The environment for child processes: ours without any ``HOSTLINK_*`` or
    proxy variable (so a developer's shell cannot change what is measured).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HOSTLINK_", "SH_CONTROL_PLANE"))
        and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    }
    env.update(extra or {})
    return env


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on the global reactor."""
    reactor = global_reactor()

    return task.deferLater(reactor, seconds, lambda: None)


def median(values: Iterable[float]) -> float:
    """The median (``statistics.median``), for readability at call sites."""
    return float(statistics.median(list(values)))


def clock_ticks() -> int:
    """Clock ticks per second, the unit of utime/stime in ``/proc/PID/stat``."""
    return int(os.sysconf("SC_CLK_TCK"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from ``/proc/PID/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces; fields after its ")" are fixed.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / clock_ticks()


def run_seconds(pid: int) -> float | None:
    """
    CPU time of process ``pid`` (its main thread) from ``/proc/PID/schedstat``,
    in nanosecond precision; None where the kernel does not provide it.
    """
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20)
    else:
        target = hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass(frozen=True)
class Identity:
    """An agent identity on disk: ``state_path/agent.json`` and its key."""

    agent_id: str
    state_path: str
    private_key_path: str
    key: RSAPrivateKey


def make_identity(directory: str, agent_id: str) -> Identity:
    """Create an agent state directory with a fresh 2048-bit key (0600/0700)."""
    from hostlink_tw.identity import AgentState, generate_private_key, write_agent_state

    os.makedirs(directory, mode=0o700, exist_ok=True)
    key_path = os.path.join(directory, "agent.key")
    key = generate_private_key(key_path)
    write_agent_state(directory, AgentState(agent_id=agent_id))
    return Identity(agent_id, directory, key_path, key)


def _ignore_cancelled(failure: Failure) -> None:
    failure.trap(defer.CancelledError)


class ChildProcess(ProcessProtocol):
    """
    A child process watched from the reactor: its output lines (kept, with a
    bound), its pid, and a Deferred for its end.

    :param keep_lines: at most this many output lines are kept (for error
        reports); older ones are dropped.
    """

    def __init__(self, keep_lines: int = 200) -> None:
        self.keep_lines = keep_lines
        self.lines: list[str] = []
        self._buffer = b""
        self._end_waiters: list[Deferred[None]] = []
        self._end_reason: Failure | None = None
        self._line_waiters: list[tuple[str, Deferred[str]]] = []
        self.transport: Any = None

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        keep_lines: int = 200,
    ) -> ChildProcess:
        """Start ``argv`` (stdout and stderr both read; stdin left open)."""
        reactor = global_reactor()

        child = cls(keep_lines)
        reactor.spawnProcess(
            child,
            argv[0],
            list(argv),
            env=dict(env if env is not None else subprocess_env()),
            path=cwd or str(REPO),
        )
        return child

    @property
    def pid(self) -> int:
        """The child's pid (while it runs)."""
        return int(self.transport.pid)

    @property
    def running(self) -> bool:
        """Whether the child has not ended yet."""
        return self._end_reason is None

    def outReceived(self, data: bytes) -> None:
        """Split output into lines; wake waiters whose marker appears."""
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if len(self.lines) > self.keep_lines:
                del self.lines[: len(self.lines) - self.keep_lines]
            self.line_received(line)
            for entry in list(self._line_waiters):
                marker, d = entry
                if marker in line:
                    self._line_waiters.remove(entry)
                    d.callback(line)

    errReceived = outReceived

    def line_received(self, line: str) -> None:
        """Called for every complete output line (override in subclasses)."""

    def wait_for_line(self, marker: str) -> Deferred[str]:
        """Fire with the first line from now on that contains ``marker``."""
        d: Deferred[str] = Deferred()
        if not self.running:
            d.errback(RuntimeError(f"process ended before printing {marker!r}"))
            return d
        self._line_waiters.append((marker, d))
        return d

    def write(self, data: bytes) -> None:
        """Write to the child's stdin."""
        self.transport.write(data)

    def processEnded(self, reason: Failure) -> None:
        """Remember the end and fire the waiters."""
        self._end_reason = reason
        waiters, self._line_waiters = self._line_waiters, []
        for marker, d in waiters:
            d.errback(RuntimeError(f"process ended before printing {marker!r}: {reason.value}"))
        ends, self._end_waiters = self._end_waiters, []
        for end in ends:
            end.callback(None)

    @property
    def end_reason(self) -> Failure | None:
        """Why the child ended (ProcessDone or ProcessTerminated), once it has."""
        return self._end_reason

    def ended(self) -> Deferred[None]:
        """Fire (with None) once the child is gone; see :attr:`end_reason`."""
        if self._end_reason is not None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._end_waiters.append(d)
        return d

    def signal(self, name: str) -> None:
        """Send a signal (``"TERM"``, ``"KILL"``…) if the child still runs."""
        if self.running:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    async def kill(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; return once the child is gone."""
        if not self.running:
            return
        self.signal("TERM")
        reactor = global_reactor()

        timer = reactor.callLater(grace, self.signal, "KILL")
        try:
            await self.ended()
        finally:
            if timer.active():
                timer.cancel()

    async def wait_while_running(self, d: Deferred[Any], what: str) -> Any:
        """
        The result of ``d``; if the child ends first (or ``d`` fails), raise
        RuntimeError naming ``what`` with the child's last output lines.
        """
        ended = self.ended()
        ended.addCallback(lambda _: d.cancel())
        # Cancelled below once ``d`` is settled; that is not an error.
        ended.addErrback(_ignore_cancelled)
        try:
            return await d
        except (defer.CancelledError, defer.TimeoutError) as e:
            tail = "\n".join(self.lines[-15:])
            state = "it ended" if not self.running else "timed out"
            raise RuntimeError(f"{what}: {state}; last output:\n{tail}") from e
        finally:
            ended.cancel()

    async def finish(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` seconds for the child to exit by itself, then :meth:`kill`."""
        reactor = global_reactor()

        timer = reactor.callLater(timeout, self.signal, "TERM")
        try:
            await self.ended()
        finally:
            if timer.active():
                timer.cancel()
        await self.kill()

    def exited_cleanly(self) -> bool:
        """Exit status 0, or ended by SIGTERM (twistd's clean stop re-raises it)."""
        reason = self._end_reason
        if reason is None:
            return False
        if reason.check(ProcessDone):
            return True
        value = reason.value
        return isinstance(value, ProcessTerminated) and value.signal == 15


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine_description() -> dict[str, str]:
    """Where the numbers come from: cores, CPU, memory, kernel, library versions."""
    import autobahn
    import cryptography
    import txaio

    import twisted

    return {
        "cores (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU": _cpu_model(),
        "memory": _memory_total(),
        "kernel": platform.release(),
        "Python": platform.python_version() + f" ({platform.python_implementation()})",
        "Twisted": twisted.__version__,
        "Autobahn": autobahn.__version__,
        "txaio": txaio.__version__,
        "cryptography": cryptography.__version__,
        "reactor": _reactor_name(),
    }


def _reactor_name() -> str:
    reactor = global_reactor()

    return type(reactor).__name__


def dump_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON (for results handed between processes)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def spawn_agent(identity: Identity, ws_url: str, *extra_args: str) -> ChildProcess:
    """
    ``twistd -n hostlink`` for ``identity`` against ``ws_url``, logging to
    stdout (kept by the :class:`ChildProcess`, for error reports).
    """
    # Off by default: HOSTLINK_BENCH_AGENT_PROFILE=<file> runs the agent under
    # cProfile and writes its stats there when it stops (for ``pstats``).
    profile = os.environ.get("HOSTLINK_BENCH_AGENT_PROFILE", "")
    profiling = [f"--profile={profile}", "--profiler=cprofile", "--savestats"] if profile else []
    argv = [
        twistd_path(),
        "-n",
        "--pidfile=",
        "--logfile=-",
        *profiling,
        "hostlink",
        "--enable",
        "--url",
        ws_url,
        "--state-path",
        identity.state_path,
        "--private-key-path",
        identity.private_key_path,
        *extra_args,
    ]
    return ChildProcess.spawn(argv)


def quiet_logging(level: str = "error") -> None:
    """
    Send log events of ``level`` and above to stderr and drop the rest: a
    fleet's and a control plane's lines (several per agent and reconnect, a
    storm's worth at once) would otherwise pile up in Twisted's start-up log
    buffer or flood the benchmark's output.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))],
            )
        ],
        redirectStandardIO=False,
    )
