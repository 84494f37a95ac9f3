"""
The harness of one chaos-with-tasks fault (:mod:`evidence.chaos_tasks` has
the faults and the table): :class:`TaskRun`, phase 1's
:class:`~evidence.chaos.FaultRun` (scratch directory, identity, processes,
teardown) plus the control plane's tasks file and operator API, the agent
with tasks on, the stream of tasks, the wait for every final, and the
verdict of each task (:func:`~evidence.tasktable.judge`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads

from evidence.chaos import ChaosConfig, FaultRun
from evidence.faults import FaultTimeoutError, sleep
from evidence.taskfaults import RssSampler, TaskBook, TaskSpec, WireLog, read_control_plane
from evidence.tasktable import TaskRow, TaskVerdict, judge

__all__ = ["GATEWAY", "MiB", "TaskChaosConfig", "TaskRun", "slug"]

GATEWAY = "/api/v1/agents/ws"
MiB = 1 << 20


def slug(name: str) -> str:
    """``name`` as a file-name part."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


@dataclass(frozen=True)
class TaskChaosConfig:
    """The stream of tasks and the timings of one run."""

    #: How long each fault lasts once injected.
    hold: float = 3.0
    #: Tasks submitted before, during (when the API is up) and after the fault.
    before: int = 5
    during: int = 2
    after: int = 2
    #: A long task's output and duration.
    long_bytes: int = 3 * MiB
    long_seconds: float = 1.5
    #: Bound on the end of the fault -> every task final.
    settle_timeout: float = 90.0
    #: Once every task is final: how long to watch that nothing runs again.
    settle: float = 1.0
    startup_timeout: float = 30.0
    #: Safety net for one fault's whole run.
    fault_timeout: float = 240.0
    #: The agent's connection timings (phase 1's settings, reconnect_max 1 s).
    agent: ChaosConfig = field(default_factory=lambda: ChaosConfig(reconnect_max=1.0))

    @property
    def dead_peer(self) -> float:
        """How long a silent peer takes the agent to notice (ping + pong timeout), plus 1 s."""
        return self.agent.ping_interval + self.agent.pong_timeout + 1.0


class TaskRun(FaultRun):
    """One fault's harness: phase 1's :class:`FaultRun` plus tasks, their files and verdicts."""

    def __init__(self, name: str, config: TaskChaosConfig, workdir: str) -> None:
        super().__init__(name, config.agent, workdir, detect_bound=0.0)
        self.tc = config
        self.book = TaskBook(self.dir)
        self.wire = WireLog()
        self.db_path = os.path.join(self.dir, "tasks.db")
        self.store_path = os.path.join(self.dir, "agent-store", "agent.db")
        os.makedirs(os.path.dirname(self.store_path), exist_ok=True)
        self.row = TaskRow(name)
        self.client: Any = None
        self.cp_processes: list[Any] = []
        self.agents: list[Any] = []
        self.agent_url = ""
        self.http_url = ""
        self.agent_extra: tuple[str, ...] = ()
        self.interrupted: set[str] = set()
        self.fault_end = 0.0
        self._count = 0
        self.rss = RssSampler(lambda: self.agent.pid if self.agent and self.agent.running else None)
        # Registered first among the first cleanups: runs after the agents are gone.
        self.on_cleanup(self._kill_task_groups, first=True)

    async def _kill_task_groups(self) -> None:
        self.book.kill_groups()

    # -- control planes --------------------------------------------------------------

    def _token(self) -> str:
        from hostlink_tw.controlplane.operatortoken import load_or_create_token

        return load_or_create_token(os.path.join(self.dir, "operator.token"))[0]

    def _client(self, url: str) -> None:
        from hostlink_tw.operatorclient import OperatorClient

        self.client = OperatorClient(url, self._token(), timeout=5)

    async def cp_process(self, port: int, status_port: int, name: str = "control-plane") -> Any:
        """A ``twistd hostlink-controlplane`` with its tasks file, operator API and wire log."""
        process = await self.control_plane_process(
            port, name=name, status_port=status_port,
            extra=("--tasks-database", self.db_path,
                   "--operator-token-file", os.path.join(self.dir, "operator.token")),
            launcher=(sys.executable, "-m", "evidence.taskfaults", "cp-twistd", "--"),
        )
        self.cp_processes.append(process)
        self._client(f"http://127.0.0.1:{status_port}")
        return process

    async def cp_in_process(self) -> Any:
        """The reference control plane in this process (its knobs usable), same files."""
        cp = await self.control_plane(
            tasks_database=self.db_path, database=False,
            operator_listen="tcp:0:interface=127.0.0.1", operator_token=self._token(),
        )
        self.wire.attach(cp)
        self._client(cp.operator_url)
        return cp

    # -- the agent -------------------------------------------------------------------

    async def agent_up(self, ws_port: int, http_port: int, extra: tuple[str, ...] = ()) -> None:
        """Start the agent (tasks on, its store in this run's directory) and wait for a session."""
        self.agent_url = f"ws://127.0.0.1:{ws_port}{GATEWAY}"
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.agent_extra = (
            "--enable-delivery", "--enable-results",
            "--local-store-path", self.store_path,
            "--control-plane-url", self.http_url,
            "--task-workdir", self.book.dir,
            "--task-kill-grace", "1s",
            *extra,
        )
        await self.restart_agent(first=True)
        self.rss.start()

    async def restart_agent(self, first: bool = False) -> None:
        """(Re)start the agent with the same settings and store; wait for its session."""
        if self.watch is not None:
            self.watch.stop()
        await self.start_agent(self.agent_url, set(), extra=self.agent_extra)
        assert self.agent is not None
        self.agents.append(self.agent)

    # -- tasks -----------------------------------------------------------------------

    def spec(self, long: bool) -> TaskSpec:
        i = self._count
        self._count += 1
        exit_code = (0, 3, 0, 1)[i % 4]
        if long:
            return TaskSpec(f"t{i:02d}", self.tc.long_bytes - (i % 3) * 512 * 1024,
                            self.tc.long_seconds, 1000 + i, exit_code, err_nbytes=64 * 1024)
        return TaskSpec(f"t{i:02d}", 4096 + 1000 * i, 0.1, 1000 + i, exit_code,
                        err_nbytes=512 if i % 2 else 0)

    async def submit(self, count: int, long_first: bool = False) -> int:
        """Submit ``count`` tasks (alternating long and short); returns how many were accepted."""
        from hostlink_tw.operatorclient import OperatorError

        accepted = 0
        for k in range(count):
            spec = self.spec(long=(k % 2 == 0) == long_first)
            document = {"agent_id": self.identity.agent_id, "command": self.book.command(spec)}
            try:
                await threads.deferToThread(self.client.request, "POST", "/tasks", document)
                accepted += 1
            except OperatorError as e:
                self.result.notes.append(f"submit {spec.name}: {e}")
        return accepted

    def _statuses(self) -> dict[str, tuple[str, int]]:
        """Task name -> (status, output chunks stored), read from the tasks file."""
        import sqlite3
        from contextlib import closing

        try:
            with closing(sqlite3.connect(self.db_path, timeout=2)) as db:
                rows = db.execute(
                    "SELECT t.command, t.status, (SELECT count(*) FROM output o "
                    "WHERE o.attempt_id = t.attempt_id) FROM tasks t"
                ).fetchall()
        except sqlite3.Error:
            return {}
        found = {}
        for command, status, chunks in rows:
            name = self.book.name_of(command)
            if name is not None:
                found[name] = (status, chunks)
        return found

    async def mid_stream(self) -> None:
        """Wait until a long task runs and the control plane has some of its output."""
        deadline = time.monotonic() + self.tc.startup_timeout
        while time.monotonic() < deadline:
            for name, (status, chunks) in self._statuses().items():
                spec = self.book.specs[name]
                if status == "running" and chunks >= 2 and spec.nbytes >= MiB:
                    self.result.notes.append(f"fault lands while {name} streams")
                    return
            await sleep(0.05)
        raise FaultTimeoutError("no long task was streaming within the startup timeout")

    def mark_interrupted(self) -> None:
        """Call right before a fault that kills or stops the agent."""
        self.interrupted = self.book.in_flight()

    async def all_final(self) -> None:
        """Wait until every submitted task is final; record the recovery time."""
        deadline = time.monotonic() + self.tc.settle_timeout
        while time.monotonic() < deadline:
            statuses = self._statuses()
            if statuses and len(statuses) >= len(self.book.specs) and all(
                s in ("completed", "failed", "interrupted") for s, _ in statuses.values()
            ):
                self.row.recovered = time.monotonic() - self.fault_end
                return
            await sleep(0.1)
        waiting = {n: s for n, (s, _) in self._statuses().items()
                   if s not in ("completed", "failed", "interrupted")}
        self.row.problems.append(
            f"not every task final {self.tc.settle_timeout:g}s after the fault: {waiting}"
        )

    def save_logs(self) -> None:
        """Every process's output in this run's directory (kept when a row fails)."""
        for i, process in enumerate([*self.agents, *self.cp_processes]):
            name = slug(process.name)
            with open(os.path.join(self.dir, f"{i}-{name}.log"), "w", encoding="utf-8") as f:
                f.write(process.text())

    # -- the verdict ---------------------------------------------------------------------

    async def verdict(self) -> None:
        """Judge every task (after a settling wait: nothing may run again) and fill the row."""
        await sleep(self.tc.settle)
        self.rss.stop()
        for process in self.cp_processes:
            self.wire.add_lines(process.lines)
        stored = {self.book.name_of(t.command): t for t in read_control_plane(self.db_path)}
        verdicts: list[TaskVerdict] = []
        for name in self.book.specs:
            task = stored.get(name)
            was_interrupted = name in self.interrupted and (
                task is not None and task.status == "interrupted")
            verdicts.append(judge(self.book, task, self.wire, name, was_interrupted))
        self.row.fill(verdicts, self.rss.max)
        sessions = sum(a.text().count("session active agent_id=") for a in self.agents)
        self.row.notes.append(f"agent sessions: {sessions}")
        kinds = [m.type for m in self.wire.messages]
        self.row.notes.append(f"wire log: {kinds.count('task.output')} outputs, "
                              f"{kinds.count('task.final')} finals received")
        if self.book.kill_groups():
            self.row.problems.append("a task process group outlived its final")
        for agent in self.agents:
            for bad in ("Traceback", "Unhandled"):
                if bad in agent.text():
                    self.row.problems.append(f"{bad!r} in the output of {agent.name}")
        if self.agent is None or not self.agent.running:
            self.row.problems.append("the agent is not running at the end")
