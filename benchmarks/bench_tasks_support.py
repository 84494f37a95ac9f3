"""
The rig of the phase-2 benchmarks: a real agent process with tasks on, an
in-process reference control plane, and taps on the control plane's wire.

:class:`TaskRig` starts the control plane (its task file on disk, as a user
runs it) and ``twistd -n hostlink --enable-delivery --enable-results`` with
its local store in the same temporary directory, waits for the active
session, and stops both (the agent with SIGTERM, then SIGKILL) when it is
left.  :class:`WireClock` notes, on the control plane's side, when each
``task.deliver`` was written and when each ``task.final`` arrived.

The pieces the replay, store and fleet benchmarks build their own runs from:
the agent's task options (:func:`task_agent_args`), the in-process control
plane with a tasks file (:func:`start_task_control_plane`), looks at an
agent's store from outside, and ``/proc/PID/io``.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.bench_support import ChildProcess, Identity, make_identity, spawn_agent

__all__ = [
    "CP_TASKS_FILE",
    "STORE_SUFFIXES",
    "TaskRig",
    "WireClock",
    "commit_seconds",
    "filesystem_of",
    "start_task_control_plane",
    "store_count",
    "store_files",
    "task_agent_args",
    "unacked_messages",
    "write_bytes",
]

#: Seconds the agent may take to start and say hello.
START_TIMEOUT = 60.0


def filesystem_of(path: str) -> str:
    """The file system type ``path`` is on (``ext4``, ``tmpfs``…), or ``unknown``."""
    try:
        out = subprocess.run(
            ["df", "--output=fstype", path], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = out.stdout.split()
    return lines[-1] if len(lines) > 1 else "unknown"


def commit_seconds(directory: str, runs: int = 200) -> list[float]:
    """
    Seconds of each of ``runs`` one-row commits to a fresh SQLite file in
    ``directory`` in the agent store's mode (WAL, ``synchronous=FULL``):
    what one state change of a task costs on this disk.
    """
    import sqlite3

    path = os.path.join(directory, "commit-probe.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (v BLOB)")
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (b"x" * 200,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - start)
        return times
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)


class WireClock:
    """
    ``time.perf_counter()`` when each ``task.deliver`` was handed to the
    session's transport and when each ``task.final`` reached the control
    plane (before it is handled), by task id.
    """

    def __init__(self) -> None:
        self.delivered: dict[str, float] = {}
        self.finals: dict[str, float] = {}
        #: The first ``task.output`` of each task.
        self.first_output: dict[str, float] = {}
        #: The first ``task.received`` and ``task.started`` of each task.
        self.received: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def attach(self, cp: Any, session: Any) -> None:
        """Tap ``session``'s sends and ``cp``'s inbound hook."""
        from hostlink_tw.wire.vocabulary import (
            TASK_DELIVER,
            TASK_FINAL,
            TASK_OUTPUT,
            TASK_RECEIVED,
            TASK_STARTED,
        )

        send = session.send_envelope

        def timed_send(envelope: Any) -> None:
            send(envelope)
            if envelope.type == TASK_DELIVER and envelope.task_id not in self.delivered:
                self.delivered[envelope.task_id] = time.perf_counter()

        session.send_envelope = timed_send
        controls = cp.controls
        inbound = controls.inbound

        def tap(s: Any, envelope: Any, size: int) -> None:
            now = time.perf_counter()
            if envelope.type == TASK_FINAL:
                self.finals.setdefault(envelope.task_id, now)
            elif envelope.type == TASK_OUTPUT:
                self.first_output.setdefault(envelope.task_id, now)
            elif envelope.type == TASK_RECEIVED:
                self.received.setdefault(envelope.task_id, now)
            elif envelope.type == TASK_STARTED:
                self.started.setdefault(envelope.task_id, now)
            inbound(s, envelope, size)

        controls.inbound = tap

    def round_trip(self, task_id: str) -> float:
        """Seconds from the deliver written to the final received."""
        return self.finals[task_id] - self.delivered[task_id]

    def stages(self, task_id: str) -> tuple[float, float, float]:
        """Seconds deliver → ``task.received``, → ``task.started``, → ``task.final``."""
        delivered, received = self.delivered[task_id], self.received[task_id]
        started = self.started[task_id]
        return received - delivered, started - received, self.finals[task_id] - started


class TaskRig:
    """
    ``async with TaskRig(...) as rig``: ``rig.cp`` (the control plane),
    ``rig.session`` (the agent's active session), ``rig.agent`` (its
    :class:`~benchmarks.bench_support.ChildProcess`), ``rig.clock``
    (a :class:`WireClock` on the session), ``rig.directory``.

    Tasks run in the agent's own working directory (no ``--task-workdir``),
    as under the systemd unit: Twisted then spawns them with ``posix_spawnp``
    rather than ``fork`` (which any other directory needs).

    :param agent_args: more ``twistd hostlink`` options (``--task-output-limit-bytes``…).
    :param cp_options: keyword arguments of the control plane (``max_output_bytes``…).
    :param directory: where the store files go (a temporary directory under it);
        the default is the system's temporary directory.
    """

    def __init__(
        self,
        agent_id: str,
        *,
        agent_args: Sequence[str] = (),
        cp_options: Mapping[str, Any] | None = None,
        directory: str | None = None,
    ) -> None:
        self.agent_id = agent_id
        self._agent_args = list(agent_args)
        self._cp_options = dict(cp_options or {})
        self._parent = directory
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.directory = ""
        self.cp: Any = None
        self.session: Any = None
        self.agent: ChildProcess | None = None
        self.clock = WireClock()

    async def __aenter__(self) -> TaskRig:
        self._tmp = tempfile.TemporaryDirectory(prefix="hostlink-bench-", dir=self._parent)
        self.directory = self._tmp.name
        try:
            identity = make_identity(os.path.join(self.directory, "agent"), self.agent_id)
            self.cp = await start_task_control_plane([identity], self.directory,
                                                     **self._cp_options)
            waiting = self.cp.wait_active(self.agent_id, timeout=START_TIMEOUT)
            # The HTTP paths (heartbeat, polling fallback) to this control plane too:
            # their default base URL is a public host.
            http_base = "http://" + urlsplit(self.cp.ws_url).netloc
            self.agent = spawn_agent(
                identity,
                self.cp.ws_url,
                "--control-plane-url",
                http_base,
                "--enable-delivery",
                "--enable-results",
                "--local-store-path",
                os.path.join(self.directory, "agent.db"),
                *self._agent_args,
            )
            self.session = await self.agent.wait_while_running(
                waiting, "the agent's session never became active"
            )
            self.clock.attach(self.cp, self.session)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        try:
            if self.agent is not None:
                await self.agent.kill()
        finally:
            try:
                if self.cp is not None:
                    await self.cp.stop()
            finally:
                if self._tmp is not None:
                    self._tmp.cleanup()
                    self._tmp = None

    @property
    def agent_pid(self) -> int:
        """The agent process's pid."""
        if self.agent is None:
            raise RuntimeError("no agent")
        return self.agent.pid

    async def run_task(self, command: str, timeout: float) -> Any:
        """Create a task and return its record once its final is stored (and acked)."""
        task = self.cp.tasks.create(self.agent_id, command)
        if self.agent is None:
            raise RuntimeError("no agent")
        return await self.agent.wait_while_running(
            self.cp.tasks.wait_final(task.task_id, timeout=timeout),
            f"task {task.task_id} got no final",
        )


#: The control plane's tasks file, in the directory given to start_task_control_plane.
CP_TASKS_FILE = "cp.db"

#: The files of one SQLite store in WAL mode.
STORE_SUFFIXES = ("", "-wal", "-shm")


def task_agent_args(cp_port: int, tmp: str, *extra: str) -> list[str]:
    """
    The ``twistd hostlink`` options of an agent that takes tasks from the
    control plane on 127.0.0.1:``cp_port`` (its HTTP paths too, so nothing
    leaves the machine), with its store and task directory under ``tmp``.
    """
    return [
        "--control-plane-url", f"http://127.0.0.1:{cp_port}",
        "--enable-delivery", "--enable-results",
        "--local-store-path", os.path.join(tmp, "agent.db"),
        "--task-workdir", tmp,
        "--reconnect-min", "100ms", "--reconnect-max", "1s",
        "--task-kill-grace", "1s",
        *extra,
    ]


async def start_task_control_plane(identities: Sequence[Identity], tmp: str, port: int = 0,
                                   **options: Any) -> Any:
    """The reference control plane on 127.0.0.1:``port``, its tasks in ``tmp``/cp.db."""
    from hostlink_tw.controlplane import start_control_plane

    return await start_control_plane(
        {i.agent_id: i.key.public_key() for i in identities},
        listen=f"tcp:{port}:interface=127.0.0.1",
        ping_interval=0,
        tasks_database=os.path.join(tmp, CP_TASKS_FILE),
        **options,
    )


def unacked_messages(path: str) -> int:
    """Unacked messages in an agent store no agent has open (the store's own read)."""
    from hostlink_tw.agent.store import Database

    db = Database(path)
    try:
        return db.outbox_totals()[0]
    finally:
        db.close()


def store_count(path: str, sql: str) -> int:
    """
    One ``count(*)`` from an agent's store, read-only: safe beside the running
    agent (WAL).  0 when the file does not exist yet.
    """
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def store_files(path: str) -> dict[str, int]:
    """Bytes of the store's database, WAL and shared-memory files (0 if absent)."""
    sizes = {}
    for suffix in STORE_SUFFIXES:
        try:
            sizes[suffix or "db"] = os.path.getsize(path + suffix)
        except OSError:
            sizes[suffix or "db"] = 0
    return {k.lstrip("-"): v for k, v in sizes.items()}


def write_bytes(pid: int) -> int:
    """Bytes process ``pid`` caused to be written to storage (``/proc/PID/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")
