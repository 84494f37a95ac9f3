"""
``make bench``: run every benchmark, print the results, and write
``performance.rst`` and ``storm.png`` into ``benchmarks/results/``
(git-ignored).  Publishing them is a separate, deliberate step:
``make bench-publish`` copies both into ``docs/``.

Usage: ``python -m benchmarks.run [--agents 5000] [--only storm] …`` (see
``--help``).  At the default sizes the whole run takes a few minutes on two
cores: cold start (7 + 7 runs), idle (60 s), throughput, and three fleet
processes of 1,000 agents, each through a drop and a 10 s outage, plus one
profiled drop; then phase 2's task benchmarks (``task-roundtrip``: 1,000
tasks of ``true`` and 200 more with another working directory, about a
minute; ``task-output``: 256 MiB of task output, then the same through a
loopback WebSocket; ``task-replay``: 10,000 unacked chunks replayed;
``task-store``: 10,000 tasks on one agent until retention has purged them,
the longest, about 10 minutes; ``task-fleet``: 1,000 agents in one process
each running a task after a control-plane restart).  All traffic stays on
127.0.0.1; every child process is stopped before the command returns.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer, task

from benchmarks.bench_coldstart import measure_cold_start
from benchmarks.bench_idle import measure_idle
from benchmarks.bench_profile import breakdown, top_functions
from benchmarks.bench_report import Results, plot_storm, render, results_to_dict
from benchmarks.bench_storm import STRATEGIES, recovery_bound, run_storm
from benchmarks.bench_support import REPO, dump_json, machine_description, raise_nofile_limit
from benchmarks.bench_task_fleet import measure_fleet
from benchmarks.bench_task_output import measure_output
from benchmarks.bench_task_replay import measure_replay
from benchmarks.bench_task_roundtrip import measure_roundtrip
from benchmarks.bench_task_store import measure_store
from benchmarks.bench_throughput import measure_throughput

__all__ = ["main"]

BENCHMARKS = ("coldstart", "idle", "throughput", "storm", "task-roundtrip", "task-output",
              "task-replay", "task-store", "task-fleet")
# A run writes here, never over the tracked docs/ (make bench-publish copies).
RESULTS = REPO / "benchmarks" / "results"


def _say(text: str) -> None:
    print(text, flush=True)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=(
            "hostlink_tw benchmarks; writes performance.rst and storm.png into "
            "benchmarks/results/ (make bench-publish copies them into docs/)."
        ),
    )
    parser.add_argument("--only", action="append", choices=BENCHMARKS,
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--agents", type=int, default=1000, help="storm fleet size")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated storm strategies (rcf, go, full)")
    parser.add_argument("--down", type=float, default=10.0,
                        help="storm run 2 outage in seconds (0 skips run 2)")
    parser.add_argument("--cold-runs", type=int, default=7)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--envelopes", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale-agents", type=int, default=5000,
                        help="one more go fleet of this size, run 1 only (0 skips)")
    parser.add_argument("--tasks", type=int, default=1000,
                        help="task-roundtrip: tasks timed, one after the other")
    parser.add_argument("--workdir-tasks", type=int, default=200,
                        help="task-roundtrip: more tasks with --task-workdir elsewhere (0 skips)")
    parser.add_argument("--spawn-runs", type=int, default=300,
                        help="task-roundtrip: spawns of /bin/sh -c true for the floor")
    parser.add_argument("--output-mib", type=float, default=256.0,
                        help="task-output: MiB the task prints")
    parser.add_argument("--flush-threshold", type=int, default=16384,
                        help="task-output: the agent's output flush threshold (chunk size), "
                        "also the floor's message size")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiled storm run")
    parser.add_argument("--rst", default=str(RESULTS / "performance.rst"))
    parser.add_argument("--png", default=str(RESULTS / "storm.png"))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--replay-chunks", type=int, default=10_000,
                        help="task-replay: unacked chunks in the store")
    parser.add_argument("--store-tasks", type=int, default=10_000,
                        help="task-store: tasks run on one agent")
    parser.add_argument("--fleet-agents", type=int, default=1000,
                        help="task-fleet: agents in the one fleet process")
    parser.add_argument("--fleet-timeout", type=float, default=300.0,
                        help="task-fleet: seconds before the fleet gives up")
    args = parser.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in args.strategies:
        if s not in STRATEGIES:
            parser.error(f"unknown strategy {s!r}")
    if (args.agents < 1 or args.cold_runs < 1 or args.envelopes < 1 or args.repeats < 1
            or args.tasks < 1 or args.spawn_runs < 1 or args.output_mib <= 0
            or args.replay_chunks < 1 or args.store_tasks < 1 or args.fleet_agents < 1):
        parser.error("sizes must be >= 1")
    return args


async def _run(args: argparse.Namespace) -> Results:
    only = set(args.only or BENCHMARKS)
    results = Results(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_description(),
    )
    def load(name: str) -> None:
        results.load.append((name, os.getloadavg()[0]))

    if "coldstart" in only:
        load("coldstart")
        _say(f"cold start: {args.cold_runs} runs of the agent and of the import floor…")
        c = await measure_cold_start(args.cold_runs)
        results.cold_start = c
        _say(f"  agent {c.agent_median:.3f} s, floor {c.floor_median:.3f} s, "
             f"ratio {c.ratio:.2f} (≤ 1.5: {'met' if c.met else 'MISSED'})")
    if "idle" in only:
        load("idle")
        _say(f"idle: {args.idle_seconds:g} s with a 5 s ping…")
        i = await measure_idle(args.idle_seconds)
        results.idle = i
        _say(f"  RSS {i.rss / 2**20:.1f} MB (floor {i.floor_rss / 2**20:.1f} MB, "
             f"+{i.rss_over_floor / 2**20:.1f} MB: {'met' if i.rss_met else 'MISSED'}); "
             f"CPU {i.cpu:.2f} s = {i.cpu_per_minute:.3f} s/min "
             f"({'met' if i.cpu_met else 'MISSED'})")
    if "throughput" in only:
        load("throughput")
        _say(f"throughput: {args.repeats} × {args.envelopes:,} acks…")
        t = measure_throughput(args.envelopes, args.repeats)
        results.throughput = t
        _say(f"  {t.data_received_rate:,.0f}/s framed, {t.on_message_rate:,.0f}/s onMessage "
             f"({'met' if t.met else 'MISSED'})")
    if "storm" in only:
        for strategy in args.strategies:
            load(f"storm {strategy}")
            _say(f"storm: {args.agents:,} agents, {strategy}…")
            s = await run_storm(strategy, args.agents, down=args.down)
            results.storms.append(s)
            for name, p in s.phases.items():
                _say(f"  {name}: all active after "
                     f"{'never' if p.recovery is None else f'{p.recovery:.2f} s'}"
                     f" (bound {recovery_bound(s.reconnect_min):.2f} s for the drop), "
                     f"peak {p.peak}/100 ms, {len(p.attempts)} attempts, "
                     f"fleet CPU {p.fleet_cpu:.2f} s")
        if args.scale_agents and args.scale_agents != args.agents:
            load("storm scale")
            _say(f"storm: {args.scale_agents:,} agents, go, run 1 only…")
            scale = await run_storm("go", args.scale_agents, down=0)
            results.scale = scale
            drop = scale.phases["drop"]
            _say(f"  drop: all active after "
                 f"{'never' if drop.recovery is None else f'{drop.recovery:.2f} s'}, "
                 f"{len(drop.attempts)} attempts, fleet CPU {drop.fleet_cpu:.2f} s")
        if not args.no_profile:
            load("storm profile")
            _say(f"storm: profiling one drop of {args.agents:,} go agents…")
            with tempfile.TemporaryDirectory(prefix="hostlink-bench-") as tmp:
                path = os.path.join(tmp, "storm.prof")
                await run_storm("go", args.agents, down=0, profile=path)
                results.profile = breakdown(path)
                results.profile_top = top_functions(path)
                results.profile_agents = args.agents
            for owner, seconds in results.profile[:8]:
                _say(f"  {seconds:6.2f} s  {owner}")
    if "task-roundtrip" in only:
        load("task-roundtrip")
        _say(f"task round trip: {args.spawn_runs} spawns of the floor, {args.tasks:,} tasks…")
        rt = await measure_roundtrip(args.tasks, args.spawn_runs,
                                     elsewhere_tasks=args.workdir_tasks)
        results.tasks.append(rt)
        _say(f"  median {rt.median * 1000:.1f} ms, p99 {rt.p99 * 1000:.1f} ms, floor "
             f"{rt.floor * 1000:.1f} ms: floor + {rt.margin * 1000:.1f} ms "
             f"({'met' if rt.met else 'MISSED'})")
    if "task-output" in only:
        load("task-output")
        size = int(args.output_mib * 2**20)
        _say(f"task output: {args.output_mib:g} MiB in chunks of {args.flush_threshold:,} "
             "bytes, then the floor…")
        out = await measure_output(size, args.flush_threshold)
        results.tasks.append(out)
        _say(f"  {out.rate:.1f} MiB/s vs floor {out.floor_rate:.1f} MiB/s ({out.ratio:.0%}), "
             f"RSS +{out.rss_growth / 2**20:.1f} MiB, complete: {out.complete} "
             f"({'met' if out.met else 'MISSED'})")
    if "task-replay" in only:
        load("task-replay")
        _say(f"task replay: {args.replay_chunks:,} unacked chunks…")
        results.tasks.append(await measure_replay(args.replay_chunks))
        _say(f"  {results.tasks[-1].summary_row()[1]} ({results.tasks[-1].summary_row()[4]})")
    if "task-store" in only:
        load("task-store")
        _say(f"task store: {args.store_tasks:,} tasks, then retention…")
        results.tasks.append(await measure_store(args.store_tasks))
        _say(f"  {results.tasks[-1].summary_row()[1]} ({results.tasks[-1].summary_row()[4]})")
    if "task-fleet" in only:
        load("task-fleet")
        _say(f"task fleet: {args.fleet_agents:,} agents, one task each after a restart…")
        results.tasks.append(await measure_fleet(args.fleet_agents, timeout=args.fleet_timeout))
        _say(f"  {results.tasks[-1].summary_row()[1]} ({results.tasks[-1].summary_row()[4]})")
    load("end")
    return results


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    started = time.monotonic()
    raise_nofile_limit()
    results = await _run(args)
    results.runtime = time.monotonic() - started
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        dump_json(args.json, results_to_dict(results))
    if args.no_write:
        return
    for path in (args.rst, args.png):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if results.storms:
        plot_storm(results.storms, args.png)
        _say(f"wrote {args.png}")
    with open(args.rst, "w", encoding="utf-8") as f:
        f.write(render(results))
    _say(f"wrote {args.rst} ({results.runtime / 60:.1f} min)")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``make bench``."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args)))


if __name__ == "__main__":
    main()
