"""
Chaos with tasks: a real ``twistd -n hostlink`` agent with task delivery and
results on, a real reference control plane, a stream of tasks submitted
through the operator API, and one fault per row, all on 127.0.0.1.
``make chaos`` runs every fault after phase 1's table; ``tests/test_chaos_tasks.py``
runs the quick ones.

Each task (``tests/taskgen.py counted``, :class:`~evidence.taskfaults.TaskBook`)
appends a line to its own runs file when it starts, prints seeded bytes
(some 2–3 MiB over 1–1.5 s, so that the fault lands mid-stream; others a few
KiB), and when it ends by itself writes a done file with its exit code
(0, 1 or 3) and the sha256 of what it printed on each stream.  The fault is
injected once a long task is running and the control plane has stored some
of its output; tasks are submitted before the fault, during it (when the
operator API is reachable) and after it.

The control plane's side is read from its SQLite tasks file (tasks,
attempts, finals, output), and every ``task.output``/``task.final`` that
reached it (a hello's ``unacked_finals`` included) is logged before it is
handled (:class:`~evidence.taskfaults.WireLog`: ids, sequences, status and
exit code, never output).  The columns, per fault:

submitted
    tasks the control plane holds (created through the operator API).
interrupted
    ``ok/n``: the tasks the fault itself interrupted — they were running
    (started, no done file yet) when the agent was killed or stopped, and
    their final says ``interrupted``.  Each must have ended ``interrupted``
    (exit code −1) exactly once — one attempt, one stored final, no other
    final received — and have run at most once (runs file ≤ 1 line) even
    after the restart and a settling wait; the output the control plane
    stored for it must be a prefix of what the task prints.  Only the agent
    faults can interrupt a task; elsewhere this is ``—``.
ran once
    of the other tasks, the share whose runs file has exactly one line.
delivered once
    the share for which the control plane holds exactly one attempt and one
    final, whose status and exit code are what the task's done file proves
    (``completed`` for 0, else ``failed`` with that code), on the task too;
    and every final received for that attempt carries the same message id,
    status and exit code (no conflicting second final).  Re-sends of the same
    message, de-duplicated by the control plane, are allowed by the protocol
    (§7.6, §8.6) and counted apart in ``resent``.
output complete
    the share whose stored stdout and stderr (the chunks, in sequence order)
    have the sha256 the task wrote, with no truncation flag.
resent
    ``finals/outputs``: messages that reached the control plane more than
    once (the extra arrivals), all de-duplicated.
recovery
    from the end of the fault (the restarted control plane listening, SIGCONT,
    the proxy passing again, the restarted agent spawned, the ballast deleted,
    the acks released) to the moment the harness saw every submitted task
    final (the tasks file is polled every 0.1 s).
max RSS
    the agent's peak resident set size, from ``/proc`` every 0.1 s (across
    its restarts).

A row is ``ok`` when ran once, delivered once and output complete are all
100 %, every interrupted task is ``ok``, the agent logged no traceback, no
task process group outlived its final, and everything ended in time.  A
run exits non-zero when a row is not ``ok``.

Usage: ``python -m evidence.chaos_tasks [--only NAME ...] [--hold SECONDS] [--rst FILE] [--keep]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from evidence.chaos import ChaosConfig, FaultRun
from evidence.faults import FaultTimeoutError, free_port, kill_all, reap_all, sleep
from evidence.taskfaults import (
    RssSampler,
    StoreDisk,
    TaskBook,
    TaskSpec,
    TaskVerdict,
    WireLog,
    judge,
    read_control_plane,
)
from evidence.tasktable import TaskRow, format_rst, format_table

__all__ = ["FAULTS", "QUICK_FAULTS", "TaskChaosConfig", "TaskRow", "main", "run_task_fault"]

_GATEWAY = "/api/v1/agents/ws"
_MiB = 1 << 20


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
    long_bytes: int = 3 * _MiB
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
        self.agent_url = f"ws://127.0.0.1:{ws_port}{_GATEWAY}"
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
                if status == "running" and chunks >= 2 and spec.nbytes >= _MiB:
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
            name = _slug(process.name)
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


# -- the faults --------------------------------------------------------------------------------


async def _process_setup(run: TaskRun) -> tuple[Any, int, int]:
    port, status_port = free_port(), free_port()
    cp = await run.cp_process(port, status_port)
    await run.agent_up(port, port)
    return cp, port, status_port


async def _stream(run: TaskRun) -> None:
    await run.submit(run.tc.before, long_first=True)
    await run.mid_stream()


async def control_plane_killed(run: TaskRun) -> None:
    """SIGKILL the control plane process mid-stream; restart it on the same port and files."""
    cp, port, status_port = await _process_setup(run)
    await _stream(run)
    cp.signal(signal.SIGKILL)
    await cp.ended
    await sleep(run.tc.hold)
    new = await run.cp_process(port, status_port, name="control-plane (restarted)")
    match = new.find(r"control plane listening on")
    run.fault_end = match.at if match is not None else time.monotonic()
    await run.submit(run.tc.during + run.tc.after)


async def control_plane_frozen(run: TaskRun) -> None:
    """SIGSTOP the control plane mid-stream, SIGCONT it after the hold."""
    cp, _, _ = await _process_setup(run)
    await _stream(run)
    cp.signal(signal.SIGSTOP)
    await sleep(run.tc.hold)
    cp.signal(signal.SIGCONT)
    run.fault_end = time.monotonic()
    await run.submit(run.tc.during + run.tc.after)


async def proxy_blackhole_then_reset(run: TaskRun) -> None:
    """A proxy in between black-holes everything mid-stream, then resets, then passes."""
    cp = await run.cp_in_process()
    proxy = run.proxy(cp.port)
    assert proxy.port is not None
    await run.agent_up(proxy.port, proxy.port)
    await _stream(run)
    proxy.set_mode("blackhole")
    await run.submit(run.tc.during)
    await sleep(run.tc.hold)
    proxy.set_mode("reset")
    await sleep(run.tc.hold / 2)
    proxy.set_mode("pass")
    run.fault_end = time.monotonic()
    await run.submit(run.tc.after)


async def _agent_signalled(run: TaskRun, sig: int) -> None:
    cp = await run.cp_in_process()
    await run.agent_up(cp.port, cp.port)
    await _stream(run)
    assert run.agent is not None
    run.mark_interrupted()
    old = run.agent
    old.signal(sig)
    try:
        await old.ended.addTimeout(run.tc.startup_timeout, _reactor())
    except defer.TimeoutError:
        run.row.problems.append(f"the agent did not exit {run.tc.startup_timeout:g}s after {sig}")
    await run.submit(run.tc.during)
    await sleep(run.tc.hold)
    run.fault_end = time.monotonic()
    await run.restart_agent()
    await run.submit(run.tc.after)


async def agent_killed(run: TaskRun) -> None:
    """SIGKILL the agent mid-task; restart it on the same store."""
    await _agent_signalled(run, signal.SIGKILL)


async def agent_terminated(run: TaskRun) -> None:
    """SIGTERM the agent mid-task (it stops its task and says so); restart it."""
    await _agent_signalled(run, signal.SIGTERM)


async def store_disk_full(run: TaskRun) -> None:
    """The disk of the agent's store fills up mid-stream, then has room again."""
    disk = StoreDisk(os.path.dirname(run.store_path), 48 * _MiB)
    method = disk.prepare()

    async def unmount() -> None:
        disk.cleanup()

    run.on_cleanup(unmount)
    run.row.notes.append(f"store disk: {method}")
    cp = await run.cp_in_process()
    await run.agent_up(cp.port, cp.port)
    await _stream(run)
    assert run.agent is not None
    run.row.notes.append(disk.fill(run.agent.pid, run.store_path))
    await run.submit(run.tc.during)
    await sleep(run.tc.hold)
    disk.free(run.agent.pid)
    run.fault_end = time.monotonic()
    await run.submit(run.tc.after)
    failed = [t for _, t in run.agent.lines if "full" in t and "#error" in t]
    run.row.notes.append(f"store write errors logged by the agent: {len(failed)}")


async def acks_withheld(run: TaskRun) -> None:
    """The control plane stores but does not ack until the agent's spool is full; then acks."""
    cp = await run.cp_in_process()
    # A spool well below one long task's output, so that it fills mid-stream.
    cap = max(run.tc.long_bytes // 2, 512 * 1024)
    await run.agent_up(cp.port, cp.port, extra=("--spool-cap-bytes", str(cap),
                                                "--terminal-reserve-bytes", str(cap // 4)))
    assert run.agent is not None
    mark = run.agent.mark()
    cp.hold_acks()
    await _stream(run)
    try:
        await run.agent.wait_for(r"spool full", since=mark, timeout=run.tc.startup_timeout)
    except FaultTimeoutError as e:
        run.row.problems.append(f"the spool never filled: {e}")
    await run.submit(run.tc.during)
    await sleep(run.tc.hold)
    run.row.notes.append(f"acks held: {cp.controls.acks_held}")
    cp.release_acks()
    run.fault_end = time.monotonic()
    await run.submit(run.tc.after)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


Scenario = Callable[[TaskRun], Coroutine[Any, Any, None]]

#: Every fault of ``make chaos``'s tasks table, in order.
FAULTS: dict[str, Scenario] = {
    "control plane SIGKILL + restart": control_plane_killed,
    "control plane SIGSTOP/SIGCONT": control_plane_frozen,
    "proxy black-hole then reset": proxy_blackhole_then_reset,
    "agent SIGKILL mid-task + restart": agent_killed,
    "agent SIGTERM mid-task + restart": agent_terminated,
    "store disk full while streaming": store_disk_full,
    "acks withheld until the spool fills": acks_withheld,
}

#: Quick enough for ``make test`` (with :data:`QUICK`): a crash of either side.
QUICK_FAULTS: dict[str, Scenario] = {
    name: FAULTS[name] for name in (
        "control plane SIGKILL + restart",
        "agent SIGKILL mid-task + restart",
    )
}

#: The quick subset's stream: fewer, smaller tasks, short holds.
QUICK = TaskChaosConfig(hold=0.5, before=2, during=1, after=1,
                        long_bytes=3 * _MiB // 2, long_seconds=0.8, settle_timeout=40.0,
                        settle=0.5)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


async def run_task_fault(
    name: str, scenario: Scenario, config: TaskChaosConfig, workdir: str
) -> TaskRow:
    """One fault from setup to teardown; the row says what happened (never raises)."""
    run = TaskRun(_slug(name), config, workdir)
    run.row.fault = name
    running: Deferred[None] = Deferred.fromCoroutine(scenario(run))
    running.addTimeout(config.fault_timeout, _reactor())
    try:
        await running
        await run.all_final()
        await run.verdict()
    except FaultTimeoutError as e:
        run.row.problems.append(str(e))
    except defer.TimeoutError:
        run.row.problems.append(f"fault did not finish within {config.fault_timeout:g}s")
    except Exception as e:  # noqa: BLE001 - one broken fault must not stop the table
        import traceback

        run.row.problems.append(f"harness error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        run.rss.stop()
        await run.cleanup()
        run.save_logs()
    run.row.notes += run.result.notes
    run.row.seconds = run.result.seconds
    if not run.row.ok and run.agent is not None:
        run.row.notes.append(f"agent output tail:\n{run.agent.tail(25)}")
    return run.row


async def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evidence.chaos_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold", type=float, default=None,
                        help=f"seconds each fault lasts (default {TaskChaosConfig.hold:g})")
    parser.add_argument("--only", action="append", default=[],
                        help="run only faults whose name contains this (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the quick subset's settings")
    parser.add_argument("--rst", metavar="FILE", help="also write the table as RST to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else TaskChaosConfig()
    config = TaskChaosConfig(**{**base.__dict__,
                                **({"hold": args.hold} if args.hold is not None else {})})
    selected = {n: s for n, s in FAULTS.items()
                if not args.only or any(w.lower() in n.lower() for w in args.only)}
    if not selected:
        print(f"no fault matches {args.only}; faults: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="hostlink-chaos-tasks-")
    print(f"chaos with tasks: {len(selected)} faults; {config.before}+{config.during}+"
          f"{config.after} tasks each (long ones {config.long_bytes / _MiB:g} MiB over "
          f"{config.long_seconds:g}s); fault held {config.hold:g}s", flush=True)
    started = time.monotonic()
    rows: list[TaskRow] = []
    try:
        for name, scenario in selected.items():
            print(f"-- {name} ...", end=" ", flush=True)
            row = await run_task_fault(name, scenario, config, workdir)
            rows.append(row)
            print(f"{'ok' if row.ok else 'FAIL'} ({row.seconds:.1f}s)", flush=True)
    finally:
        await reap_all()
    print()
    print(format_table(rows))
    print()
    print("notes:")
    for row in rows:
        for note in row.notes:
            print(f"  {row.fault}: {note}")
    failed = [r for r in rows if not r.ok]
    for r in failed:
        print()
        print(r.describe())
    if args.rst:
        with open(args.rst, "w", encoding="utf-8") as f:
            f.write(format_rst(rows))
        print(f"RST table written to {args.rst}")
    print()
    print(f"{len(rows) - len(failed)}/{len(rows)} faults on target "
          f"in {time.monotonic() - started:.0f}s")
    if args.keep or failed:
        print(f"scratch directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    """``python -m evidence.chaos_tasks``: run the faults, print the table, exit 1 on any miss."""
    from twisted.internet import task

    _reactor().addSystemEventTrigger("before", "shutdown", kill_all)

    async def run(_: Any) -> None:
        code = await _main(sys.argv[1:] if argv is None else argv)
        if code:
            raise SystemExit(code)

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
