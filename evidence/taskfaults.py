"""
The task side of the chaos harness (:mod:`evidence.chaos_tasks` runs the
faults): the tasks themselves, what the control plane received and stored,
the agent's memory, the store's disk, and each task's verdict.

:class:`TaskBook`
    The stream of tasks of one fault: each runs ``tests/taskgen.py counted``,
    which appends a line to its own runs file when it starts and, when it
    ends normally, writes a done file with its exit code and the sha256 of
    what it printed on each stream.  The files are the tasks' own testimony,
    independent of the agent and the control plane.
:class:`WireLog`
    Every ``task.output`` and ``task.final`` (and every final of a hello's
    reconnect snapshot) that reached the control plane, before it handled
    it: ids, sequence, status and exit code only, never output.  In process
    it wraps the control plane's inbound hook; a ``twistd`` control plane is
    started through ``python -m evidence.taskfaults cp-twistd -- ARGS``,
    which installs the same hook and prints one ``CHAOS-TAP`` line per message.
:func:`read_control_plane`
    What the control plane stored, read from its SQLite tasks file.
:class:`RssSampler`
    The agent's resident set size from ``/proc``, across restarts.
:class:`StoreDisk`
    A small tmpfs for the agent's store that can be filled (``mount -t
    tmpfs`` needs root), or else ``RLIMIT_FSIZE`` on the agent (``prlimit``).

Each task's verdict and the table are in :mod:`evidence.tasktable`.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from twisted.internet.task import LoopingCall

from evidence.faults import REPO_ROOT

__all__ = [
    "StoreDisk",
    "RssSampler",
    "StoredTask",
    "TaskBook",
    "TaskSpec",
    "WireLog",
    "WireMessage",
    "read_control_plane",
]

TAP = "CHAOS-TAP "
_TASKGEN = os.path.join(REPO_ROOT, "tests", "taskgen.py")


# -- the tasks -------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One task: how much it prints, over how long, and how it exits."""

    name: str
    nbytes: int
    seconds: float
    seed: int
    exit_code: int = 0
    err_nbytes: int = 0


class TaskBook:
    """The tasks of one fault and their files (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.join(directory, "tasks")
        os.makedirs(self.dir, exist_ok=True)
        self.specs: dict[str, TaskSpec] = {}

    def command(self, spec: TaskSpec) -> str:
        """The shell command of ``spec`` (its files name it: a stored task maps back)."""
        self.specs[spec.name] = spec
        return shlex.join([
            sys.executable, _TASKGEN, "counted", self.runs_file(spec.name),
            self.done_file(spec.name), str(spec.nbytes), f"{spec.seconds:g}", str(spec.seed),
            str(spec.exit_code), str(spec.err_nbytes),
        ])

    def name_of(self, command: str) -> str | None:
        """Which of our tasks ``command`` runs."""
        for name in self.specs:
            if shlex.quote(self.runs_file(name)) in command or self.runs_file(name) in command:
                return name
        return None

    def runs_file(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.runs")

    def done_file(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.done")

    def runs(self, name: str) -> list[int]:
        """The process group of each run of the task so far."""
        try:
            with open(self.runs_file(name)) as f:
                return [int(line.split("=", 1)[1]) for line in f if line.startswith("run pgid=")]
        except OSError:
            return []

    def done(self, name: str) -> dict[str, Any] | None:
        """The task's done file (it ended by itself), if any."""
        try:
            with open(self.done_file(name)) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (OSError, ValueError):
            return None

    def in_flight(self) -> set[str]:
        """Tasks that started and have not written their done file."""
        return {n for n in self.specs if self.runs(n) and self.done(n) is None}

    def kill_groups(self) -> int:
        """SIGKILL every task process group still alive (ours only: checked by its command line)."""
        killed = 0
        for name in self.specs:
            for pgid in self.runs(name):
                try:
                    with open(f"/proc/{pgid}/cmdline", "rb") as f:
                        if self.runs_file(name).encode() not in f.read():
                            continue
                    os.killpg(pgid, signal.SIGKILL)
                    killed += 1
                except (OSError, ProcessLookupError):
                    continue
        return killed


# -- what reached the control plane --------------------------------------------------------


@dataclass(frozen=True)
class WireMessage:
    """One output or final message as the control plane received it (no output data)."""

    type: str
    message_id: str
    task_id: str
    attempt_id: str
    stream: str = ""
    sequence: int = 0
    status: str = ""
    exit_code: int | None = None

    def line(self) -> str:
        return TAP + json.dumps(self.__dict__, separators=(",", ":"))


def _messages(envelope: Any) -> list[WireMessage]:
    from hostlink_tw.wire.vocabulary import AGENT_HELLO, TASK_FINAL, TASK_OUTPUT

    payload = envelope.payload
    if envelope.type == TASK_OUTPUT:
        return [WireMessage("task.output", envelope.message_id, envelope.task_id or "",
                            envelope.execution_attempt_id or "", str(payload.get("stream")),
                            int(envelope.sequence or 0))]
    if envelope.type == TASK_FINAL:
        return [WireMessage("task.final", envelope.message_id, envelope.task_id or "",
                            envelope.execution_attempt_id or "", status=str(payload.get("status")),
                            exit_code=payload.get("exit_code"))]
    if envelope.type == AGENT_HELLO:
        return [
            WireMessage("task.final", str(f.get("message_id")), str(f.get("task_id")),
                        str(f.get("execution_attempt_id")), status=str(f.get("status")),
                        exit_code=f.get("exit_code"))
            for f in payload.get("unacked_finals") or [] if isinstance(f, dict)
        ]
    return []


class WireLog:
    """The messages that reached a control plane (see the module docstring)."""

    def __init__(self) -> None:
        self.messages: list[WireMessage] = []

    def attach(self, cp: Any) -> None:
        """Record what the in-process control plane ``cp`` receives from now on."""
        controls = cp.controls
        inbound = controls.inbound

        def tap(session: Any, envelope: Any, size: int) -> None:
            self.messages.extend(_messages(envelope))
            inbound(session, envelope, size)

        controls.inbound = tap

    def add_lines(self, lines: list[tuple[float, str]]) -> None:
        """Take the ``CHAOS-TAP`` lines of a ``cp-twistd`` process's output."""
        for _, text in lines:
            at = text.find(TAP)
            if at >= 0:
                try:
                    self.messages.append(WireMessage(**json.loads(text[at + len(TAP):])))
                except (ValueError, TypeError):
                    continue

    def finals(self, attempt_id: str) -> list[WireMessage]:
        return [m for m in self.messages if m.type == "task.final" and m.attempt_id == attempt_id]

    def resent_outputs(self, attempt_id: str) -> int:
        """Output messages of the attempt that arrived more than once (the extra arrivals)."""
        counts = Counter(m.message_id for m in self.messages
                         if m.type == "task.output" and m.attempt_id == attempt_id)
        return sum(n - 1 for n in counts.values())


def _tapped_twistd(argv: list[str]) -> None:
    """``cp-twistd -- ARGS``: twistd with :class:`WireLog`'s hook printing ``CHAOS-TAP`` lines."""
    if argv[:1] != ["--"]:
        raise SystemExit("usage: python -m evidence.taskfaults cp-twistd -- TWISTD-ARGS")
    from hostlink_tw.controlplane.testlayer import TestControls

    original = TestControls.inbound

    def inbound(self: TestControls, session: Any, envelope: Any, size: int) -> None:
        for message in _messages(envelope):
            print(message.line(), flush=True)
        original(self, session, envelope, size)

    TestControls.inbound = inbound  # type: ignore[method-assign]
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv[1:]]
    run()  # type: ignore[no-untyped-call]


# -- what the control plane stored ---------------------------------------------------------


@dataclass
class StoredTask:
    """One task as the control plane's tasks file holds it."""

    task_id: str
    command: str
    status: str
    exit_code: int | None
    attempt_id: str
    truncated: bool
    attempts: int
    finals: list[tuple[str, dict[str, Any]]]
    stdout: bytes = b""
    stderr: bytes = b""


def read_control_plane(path: str, with_output: bool = True) -> list[StoredTask]:
    """Every task in the control plane's SQLite tasks file (read while it runs: WAL)."""
    with closing(sqlite3.connect(path, timeout=5)) as db:
        rows = db.execute(
            "SELECT task_id, command, status, exit_code, attempt_id, "
            "output_truncated OR error_truncated FROM tasks ORDER BY rowid"
        ).fetchall()
        tasks = []
        for task_id, command, status, exit_code, attempt_id, truncated in rows:
            attempts = db.execute(
                "SELECT attempt_id FROM attempts WHERE task_id = ?", (task_id,)
            ).fetchall()
            finals = db.execute(
                "SELECT message_id, payload FROM finals WHERE attempt_id IN "
                "(SELECT attempt_id FROM attempts WHERE task_id = ?)", (task_id,)
            ).fetchall()
            task = StoredTask(task_id, command, status, exit_code, attempt_id, bool(truncated),
                              len(attempts), [(m, json.loads(p)) for m, p in finals])
            if with_output:
                for stream in ("stdout", "stderr"):
                    data = db.execute(
                        "SELECT data FROM output WHERE attempt_id = ? AND stream = ? "
                        "ORDER BY sequence", (attempt_id, stream),
                    ).fetchall()
                    setattr(task, stream, "".join(d for (d,) in data).encode())
            tasks.append(task)
    return tasks


# -- the agent's memory --------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssSampler:
    """The maximum RSS of whichever process ``pid()`` names, sampled every ``interval``."""

    def __init__(self, pid: Any, interval: float = 0.1) -> None:
        from twisted.internet import reactor

        self.pid = pid
        self.max = 0
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor
        self.interval = interval

    def start(self) -> RssSampler:
        self._loop.start(self.interval, now=True)
        return self

    def sample(self) -> None:
        pid = self.pid()
        if pid:
            self.max = max(self.max, rss_bytes(pid))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


# -- the store's disk ----------------------------------------------------------------------


class StoreDisk:
    """
    Where the agent's store lives for the disk-full fault: a tmpfs of
    ``size`` bytes mounted on ``path`` when the machine lets us (root in a
    container usually may), else a plain directory and ``RLIMIT_FSIZE`` set
    on the agent process with ``prlimit``.  :attr:`method` says which.
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.method = "none"
        self._ballast = os.path.join(path, "ballast")
        os.makedirs(path, exist_ok=True)

    def prepare(self) -> str:
        """Mount the tmpfs if possible; returns the method that will be used."""
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", self.path],
            capture_output=True, timeout=10, check=False,
        )
        self.method = "tmpfs" if result.returncode == 0 else "rlimit-fsize"
        if self.method == "tmpfs":
            _MOUNTED.add(self)
        return self.method

    def fill(self, agent_pid: int | None, store_path: str) -> str:
        """Make the disk full now; returns what was done, in a few words."""
        if self.method == "tmpfs":
            written = 0
            fd = os.open(self._ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                block = b"\0" * (1 << 20)
                for _ in range(self.size // len(block) + 2):  # bounded by the mount's size
                    try:
                        written += os.write(fd, block)
                    except OSError:
                        break
                while True:  # the last few KiB, one page at a time (bounded: the disk is full)
                    try:
                        n = os.write(fd, b"\0" * 4096)
                    except OSError:
                        break
                    if not n:
                        break
                    written += n
            finally:
                os.close(fd)
            return f"tmpfs of {self.size >> 20} MiB filled ({written >> 10} KiB of ballast)"
        size = max(os.path.getsize(store_path + "-wal") if os.path.exists(store_path + "-wal")
                   else 0, os.path.getsize(store_path))
        subprocess.run(["prlimit", f"--pid={agent_pid}", f"--fsize={size}"],
                       capture_output=True, timeout=10, check=False)
        return f"RLIMIT_FSIZE={size} on the agent"

    def free(self, agent_pid: int | None) -> None:
        """End the fault: the ballast deleted, or the limit lifted."""
        if self.method == "tmpfs":
            try:
                os.unlink(self._ballast)
            except OSError:
                pass
        elif agent_pid:
            subprocess.run(["prlimit", f"--pid={agent_pid}", "--fsize=unlimited"],
                           capture_output=True, timeout=10, check=False)

    def cleanup(self) -> None:
        """Unmount (lazily if something still holds it); never raises."""
        if self.method != "tmpfs":
            return
        for args in (["umount", self.path], ["umount", "-l", self.path]):
            try:
                if subprocess.run(args, capture_output=True, timeout=10,
                                  check=False).returncode == 0:
                    self.method = "none"
                    _MOUNTED.discard(self)
                    return
            except (OSError, subprocess.SubprocessError):
                continue


#: Mounted tmpfs not yet unmounted: an interrupted run (Ctrl-C) unmounts them at exit.
_MOUNTED: set[StoreDisk] = set()


@atexit.register
def _unmount_all() -> None:
    for disk in list(_MOUNTED):
        disk.cleanup()


def main(argv: list[str] | None = None) -> None:
    """``python -m evidence.taskfaults cp-twistd -- ARGS`` (the control plane's launcher)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["cp-twistd"]:
        _tapped_twistd(args[1:])
    else:
        raise SystemExit("usage: python -m evidence.taskfaults cp-twistd -- TWISTD-ARGS")


if __name__ == "__main__":
    main()
