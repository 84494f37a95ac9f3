"""
Real agent processes for tests (no test cases here): ``twistd -n hostlink``
run as a child of the test's reactor, its output collected, and reaped by a
cleanup whatever the test did.

Used by tests/test_integration.py, tests/test_contrib.py and
tests/test_tasks_process.py.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase

import hostlink_tw

#: ``python -c`` that runs twistd (the venv may have no ``twistd`` script on PATH).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: The directory ``hostlink_tw`` was imported from: a child process imports the same code.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(hostlink_tw.__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Collect(ProcessProtocol):
    """Keeps a child's stdout and stderr together; ``ended`` fires with its end reason."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def twistd_argv(*plugin_args: str) -> list[str]:
    """The argv of ``twistd -n`` (no pid file, log to stdout) running ``plugin_args``."""
    return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", *plugin_args]


class AgentProcess:
    """
    ``twistd -n hostlink`` with the environment ``env`` (``PYTHONPATH`` set
    so that it runs the code under test), started at once in ``directory``.

    A cleanup of ``test`` kills it (SIGKILL) if it still runs and waits for
    its end, so a failed assertion never leaves it behind.
    """

    def __init__(self, test: TestCase, env: dict[str, str], directory: str) -> None:
        self.proto = Collect()
        full = {**env, "PYTHONPATH": SOURCE_ROOT}
        self.process = reactor.spawnProcess(
            self.proto, sys.executable, twistd_argv("hostlink"), env=full, path=directory
        )
        self.pid: int = self.process.pid
        test.addCleanup(self.reap)

    @property
    def ended(self) -> Deferred[Any]:
        """Fires with the process's end reason (ProcessDone or ProcessTerminated)."""
        d: Deferred[Any] = Deferred()

        def fire(reason: Any) -> Any:
            d.callback(reason)
            return reason

        self.proto.ended.addBoth(fire)
        return d

    @property
    def running(self) -> bool:
        """Whether it has not been reaped yet."""
        return self.process.pid is not None

    def signal(self, name: str) -> None:
        """Send ``name`` (``"TERM"``, ``"KILL"``...) to the agent process."""
        self.process.signalProcess(name)

    def log(self) -> str:
        """Everything it wrote so far."""
        return self.proto.output.decode(errors="replace")

    def reap(self) -> Deferred[Any]:
        """SIGKILL it if it still runs; fires once it has ended."""
        if self.running:
            self.process.signalProcess("KILL")
        return self.ended
