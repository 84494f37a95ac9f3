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
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from evidence.faults import FaultTimeoutError, free_port, kill_all, reap_all, sleep
from evidence.taskfaults import StoreDisk
from evidence.taskrun import MiB, TaskChaosConfig, TaskRun, slug
from evidence.tasktable import TaskRow, format_rst, format_table

__all__ = ["FAULTS", "QUICK_FAULTS", "TaskChaosConfig", "TaskRow", "main", "run_task_fault"]


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
    # Long enough for the agent to notice the dead peer and drop the session
    # with output in flight (not only a pause its socket buffers ride out).
    await sleep(max(run.tc.hold, run.tc.dead_peer))
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
    await sleep(max(run.tc.hold, run.tc.dead_peer))  # as for the freeze
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
    disk = StoreDisk(os.path.dirname(run.store_path), 48 * MiB)
    method = disk.prepare()

    async def unmount() -> None:
        disk.cleanup()

    run.on_cleanup(unmount)
    run.row.notes.append(f"store disk: {method}")
    cp = await run.cp_in_process()
    await run.agent_up(cp.port, cp.port)
    await _stream(run)
    assert run.agent is not None
    mark = run.agent.mark()
    run.row.notes.append(disk.fill(run.agent.pid, run.store_path))
    await run.submit(run.tc.during)
    await sleep(run.tc.hold)
    disk.free(run.agent.pid)
    run.fault_end = time.monotonic()
    await run.submit(run.tc.after)
    try:
        await run.agent.wait_for(r"task store has room again", since=mark, timeout=10)
    except FaultTimeoutError as e:
        run.row.notes.append(f"the agent never said it has room again: {e}")
    text = run.agent.text()
    run.row.notes.append(
        f"agent: {text.count('task store full, waiting for room')} waits for room, "
        f"{text.count('has room again')} ends of waiting, "
        f"{text.count('cannot store task output')} chunks it could not store")


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
                        long_bytes=3 * MiB // 2, long_seconds=0.8, settle_timeout=40.0,
                        settle=0.5)


async def run_task_fault(
    name: str, scenario: Scenario, config: TaskChaosConfig, workdir: str
) -> TaskRow:
    """One fault from setup to teardown; the row says what happened (never raises)."""
    run = TaskRun(slug(name), config, workdir)
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
          f"{config.after} tasks each (long ones {config.long_bytes / MiB:g} MiB over "
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
