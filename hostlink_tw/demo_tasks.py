"""
The task part of ``hostlink-tw demo``: the real ``hostlink-tw task run``
command, run as a child process against the demo's control plane, its
lines narrated as they arrive (:class:`TaskRun`), and the check that what
it printed is exactly what the command wrote (:func:`counted_lines`).

The command runs in its own process because it is a blocking program (it
reads the operator API's stream with ``http.client``), and because that is
how a user runs it: the demo shows the command line, not an imitation.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = ["LINES", "TaskRun", "count_command", "counted_lines", "failing_command"]

#: How many lines the first demo task prints, one every :data:`LINE_INTERVAL`.
LINES = 10
LINE_INTERVAL = 0.5
#: What the failing demo task exits with.
FAILING_EXIT = 3
# Bound on what one child line may hold in the narration.
_LINE_CHARS = 200


def count_command(lines: int = LINES, interval: float = LINE_INTERVAL) -> str:
    """A shell command printing ``line 1 of N`` … ``line N of N``, ``interval`` apart."""
    return (
        f"i=1; while [ $i -le {lines} ]; do echo \"line $i of {lines}\"; "
        f"sleep {interval}; i=$((i+1)); done"
    )


def counted_lines(lines: int = LINES) -> list[str]:
    """What :func:`count_command` prints, line by line."""
    return [f"line {i} of {lines}" for i in range(1, lines + 1)]


def failing_command() -> str:
    """A command that says why on stderr and exits with :data:`FAILING_EXIT`."""
    return f"echo looking for /nonexistent; ls /nonexistent || exit {FAILING_EXIT}"


class _Lines(ProcessProtocol):
    """Splits the child's stdout and stderr into lines, hands each one on, and its exit status."""

    def __init__(self, on_line: Callable[[str, str], None], ended: Deferred[int]) -> None:
        self._on_line = on_line
        self._ended = ended
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._partial:
            return
        buffered = self._partial[childFD] + data
        *lines, self._partial[childFD] = buffered.split(b"\n")
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace")[:_LINE_CHARS]
        self._on_line("stdout" if fd == 1 else "stderr", text)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._line(fd, rest)
        value = reason.value
        if isinstance(value, ProcessDone):
            self._ended.callback(0)
        elif isinstance(value, ProcessTerminated) and value.exitCode is not None:
            self._ended.callback(value.exitCode)
        else:
            # Killed by a signal: as a shell reports it.
            signal = getattr(value, "signal", None) or 0
            self._ended.callback(128 + signal)


class TaskRun:
    """One ``hostlink-tw task run`` child process."""

    def __init__(
        self,
        reactor: Any,
        *,
        operator_url: str,
        token_file: str,
        agent_id: str,
        command: str,
        on_line: Callable[[str, str], None],
    ) -> None:
        self._reactor = reactor
        self.agent_id = agent_id
        self.command = command
        self.argv: Sequence[str] = (
            sys.executable, "-m", "hostlink_tw", "task", "run", "--agent", agent_id,
            "--operator-url", operator_url, "--operator-token-file", token_file,
            "--", command,
        )
        self._on_line = on_line
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ended: Deferred[int] = Deferred()
        self._transport: Any = None
        self._gone: list[Deferred[None]] = []

    def shown(self) -> str:
        """The command line as a user would type it."""
        return f"hostlink-tw task run --agent {self.agent_id} -- {shlex.quote(self.command)}"

    def start(self) -> Deferred[int]:
        """Start it; the Deferred fires with its exit status."""

        def line(stream: str, text: str) -> None:
            (self.stdout if stream == "stdout" else self.stderr).append(text)
            self._on_line(stream, text)

        def done(status: int) -> int:
            self._transport = None
            waiting, self._gone = self._gone, []
            for d in waiting:
                d.callback(None)
            return status

        self.ended.addCallback(done)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HOSTLINK_OPERATOR_")}
        self._transport = self._reactor.spawnProcess(
            _Lines(line, self.ended), sys.executable, list(self.argv), env=environ
        )
        return self.ended

    def kill(self) -> Deferred[None]:
        """End it now (the demo is stopping); fires once it is gone."""
        gone: Deferred[None] = Deferred()
        if self._transport is None:
            gone.callback(None)
            return gone
        self._gone.append(gone)
        try:
            self._transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass  # exiting already: processEnded fires anyway
        return gone
