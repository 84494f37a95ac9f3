"""
Task round trip: ``task.deliver`` → ``task.final`` of ``true``, one task
after the other, against the floor of spawning ``/bin/sh -c true`` from
Python on the same machine.

The agent is a real ``twistd -n hostlink`` process with delivery and
results on and its local store on disk (:class:`~benchmarks.bench_tasks_support.TaskRig`);
the control plane runs in this process.  Each task is timed on the control
plane's side, from the moment its ``task.deliver`` was handed to the
session's transport to the moment its ``task.final`` arrived; the next task
is created once the final is stored.  A few warm-up tasks are not counted.

The floor is measured in this process before the tasks: ``/bin/sh -c true``
spawned with Twisted's ``reactor.spawnProcess`` until ``processEnded`` (what
the agent's runner does), and with ``subprocess.run`` for reference,
alternating.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from benchmarks.bench_rst import table, verdict
from benchmarks.bench_support import cpu_seconds, global_reactor, median, subprocess_env
from benchmarks.bench_tasks_support import TaskRig, commit_seconds, filesystem_of

__all__ = ["TARGET_MARGIN", "RoundTripResult", "measure_floor", "measure_roundtrip"]

#: The median round trip may exceed the spawn floor by this much (seconds).
TARGET_MARGIN = 0.015
_SHELL = ["/bin/sh", "-c", "true"]
_WARMUP = 10


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least 1
    return ordered[int(rank) - 1]


@dataclass(frozen=True)
class RoundTripResult:
    """Seconds per task and per floor spawn."""

    tasks: list[float]
    floor_twisted: list[float]
    floor_subprocess: list[float]
    store_filesystem: str = "unknown"
    title: str = "Task round trip"
    #: Seconds of agent CPU (utime + stime) over the counted tasks, if read.
    agent_cpu: float | None = None
    #: Per task: seconds deliver → received, received → started, started → final.
    stages: list[tuple[float, float, float]] = field(default_factory=list)
    #: Round trips with ``--task-workdir`` elsewhere than the agent's directory.
    elsewhere: list[float] = field(default_factory=list)
    elsewhere_cpu: float | None = None
    #: Seconds of one-row commits in the store's mode, in the store's directory.
    commits: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median round trip."""
        return median(self.tasks)

    @property
    def p99(self) -> float:
        """99th percentile round trip."""
        return percentile(self.tasks, 99)

    @property
    def floor(self) -> float:
        """Median Twisted spawn of ``/bin/sh -c true`` (the floor the target uses)."""
        return median(self.floor_twisted)

    @property
    def margin(self) -> float:
        """Median round trip minus the floor."""
        return self.median - self.floor

    @property
    def met(self) -> bool | None:
        """Whether the median is within the floor + 15 ms."""
        return self.margin <= TARGET_MARGIN

    def summary_row(self) -> list[str]:
        """See :class:`~benchmarks.bench_tasks_report.TaskBenchResult`."""
        return [
            f"Task round trip of ``true`` ({len(self.tasks):,} tasks)",
            f"median {self.median * 1000:.1f} ms, p99 {self.p99 * 1000:.1f} ms; "
            f"floor {self.floor * 1000:.1f} ms",
            f"median ≤ floor + {TARGET_MARGIN * 1000:.0f} ms",
            f"floor + {self.margin * 1000:.1f} ms",
            verdict(self.met),
        ]

    def detail_rst(self) -> str:
        """See :class:`~benchmarks.bench_tasks_report.TaskBenchResult`."""
        ms = 1000
        rows = [
            ["round trip, deliver written → final received", f"{self.median * ms:.1f} ms",
             f"{self.p99 * ms:.1f} ms", f"{min(self.tasks) * ms:.1f} ms",
             f"{len(self.tasks):,}"],
            ["floor: ``spawnProcess`` → ``processEnded``", f"{self.floor * ms:.1f} ms",
             f"{percentile(self.floor_twisted, 99) * ms:.1f} ms",
             f"{min(self.floor_twisted) * ms:.1f} ms", f"{len(self.floor_twisted):,}"],
            ["reference: ``subprocess.run``", f"{median(self.floor_subprocess) * ms:.1f} ms",
             f"{percentile(self.floor_subprocess, 99) * ms:.1f} ms",
             f"{min(self.floor_subprocess) * ms:.1f} ms", f"{len(self.floor_subprocess):,}"],
        ]
        cpu = (
            ""
            if self.agent_cpu is None
            else f"  The agent process used {self.agent_cpu / len(self.tasks) * ms:.1f} ms "
            "of CPU per task (utime + stime over the counted tasks)."
        )
        stages = ""
        if self.stages:
            names = ("deliver written → ``task.received`` arrived (the receipt committed)",
                     "→ ``task.started`` (``running`` committed, the shell spawned)",
                     "→ ``task.final`` (the shell ran and was reaped, the final committed)")
            stages = "Where the median task's time goes, as the control plane sees it:\n\n" + table(
                ["stage", "median"],
                [[name, f"{median(s[k] for s in self.stages) * ms:.1f} ms"]
                 for k, name in enumerate(names)],
            ) + "\n\n"
        elsewhere = ""
        if self.elsewhere:
            per_task = ("" if self.elsewhere_cpu is None else
                        f", {self.elsewhere_cpu / len(self.elsewhere) * ms:.1f} ms of agent CPU "
                        "per task")
            elsewhere = (
                f"With ``HOSTLINK_TASK_WORKDIR`` set to another directory than the agent's "
                f"own ({len(self.elsewhere):,} more tasks on a fresh agent): median "
                f"{median(self.elsewhere) * ms:.1f} ms, p99 "
                f"{percentile(self.elsewhere, 99) * ms:.1f} ms{per_task}.  Twisted's "
                "``spawnProcess`` can use ``posix_spawnp`` only when the child keeps the "
                "parent's directory; any other needs a ``fork`` of the whole agent.\n\n"
            )
        findings = (
            "What the round trip holds beyond the spawn: **ours, by design** — four "
            "commits to the agent's store per task (the receipt, ``running`` before the "
            "spawn, the process group, the final), three of them on the path, each an "
            "fsync: what makes a task run at most once and its result survive a crash "
            "(PROTOCOL §8.2, §8.3, §8.5)"
            + (f"; one commit takes {median(self.commits) * ms:.1f} ms (median, p99 "
               f"{percentile(self.commits, 99) * ms:.1f} ms) on this disk" if self.commits
               else "")
            + "; three messages from the agent (received, started, final), each stored "
            "by the reference control plane before it answers; three log lines.  "
            "**Stack** — the shell is started through util-linux ``setsid`` (one more "
            "``exec`` than the floor), and Twisted forks for any other working "
            "directory (below).\n\n"
        )
        return (
            f"{len(self.tasks):,} tasks running ``true``, one after the other (the next "
            "is created once the control plane has stored the previous final), "
            f"after {_WARMUP} warm-up tasks.  Each is timed on the control plane's side "
            "from its ``task.deliver`` handed to the transport to its ``task.final`` "
            "received.  In between, the agent commits the receipt, ``running`` and the "
            f"final to its store (SQLite, WAL, ``synchronous=FULL``, on {self.store_filesystem})"
            ", sends ``task.received``, ``task.started`` and the final, and runs "
            "``/bin/sh -c true`` in its own session (through ``setsid``).  The floor is "
            "``/bin/sh -c true`` spawned from this Python process, alternating the two "
            "ways.\n\n"
            + table(["measurement", "median", "p99", "min", "runs"], rows)
            + f"\n\nMedian {self.median * ms:.1f} ms = floor {self.floor * ms:.1f} ms + "
            f"{self.margin * ms:.1f} ms (target ≤ floor + {TARGET_MARGIN * ms:.0f} ms): "
            f"{verdict(self.met)}.{cpu}\n\n"
            + stages
            + findings
            + elsewhere
            + "".join(f"{note}\n\n" for note in self.notes)
        )

    def to_dict(self) -> dict[str, Any]:
        """See :class:`~benchmarks.bench_tasks_report.TaskBenchResult`."""
        return {
            **asdict(self),
            "median": self.median,
            "p99": self.p99,
            "floor": self.floor,
            "floor_subprocess_median": median(self.floor_subprocess),
            "margin": self.margin,
            "met": self.met,
        }


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[float] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(time.perf_counter())


async def _spawn_once(env: dict[str, str]) -> float:
    proto = _Ended()
    start = time.perf_counter()
    global_reactor().spawnProcess(proto, _SHELL[0], _SHELL, env=env)
    return await proto.ended - start


async def measure_floor(runs: int = 200) -> tuple[list[float], list[float]]:
    """``runs`` spawns of ``/bin/sh -c true`` each way (Twisted, subprocess), alternating."""
    env = subprocess_env()
    twisted_runs: list[float] = []
    subprocess_runs: list[float] = []
    for i in range(runs + 1):
        spawned = await _spawn_once(env)
        start = time.perf_counter()
        subprocess.run(_SHELL, env=env, check=True, timeout=30)
        ran = time.perf_counter() - start
        if i:  # the first of each warms caches
            twisted_runs.append(spawned)
            subprocess_runs.append(ran)
    return twisted_runs, subprocess_runs


async def _run_tasks(
    tasks: int, timeout: float, agent_args: tuple[str, ...]
) -> tuple[list[float], list[tuple[float, float, float]], float, str]:
    """Round trips and stages of ``tasks`` tasks on a fresh agent, its CPU, its store's fs."""
    times: list[float] = []
    stages: list[tuple[float, float, float]] = []
    async with TaskRig("bench-roundtrip", agent_args=agent_args) as rig:
        fs = filesystem_of(rig.directory)
        for _ in range(_WARMUP):
            await rig.run_task("true", timeout)
        cpu_before = cpu_seconds(rig.agent_pid)
        for _ in range(tasks):
            record = await rig.run_task("true", timeout)
            if record.status != "completed":
                raise RuntimeError(f"task {record.task_id} ended {record.status}")
            times.append(rig.clock.round_trip(record.task_id))
            stages.append(rig.clock.stages(record.task_id))
        cpu = cpu_seconds(rig.agent_pid) - cpu_before
    return times, stages, cpu, fs


async def measure_roundtrip(
    tasks: int = 1000, floor_runs: int = 200, timeout: float = 30.0,
    agent_args: tuple[str, ...] = (), elsewhere_tasks: int = 0,
) -> RoundTripResult:
    """
    The floor, then ``tasks`` counted round trips of ``true`` on a fresh agent
    whose tasks run in its own directory, then ``elsewhere_tasks`` on one
    whose ``--task-workdir`` is another directory (0: not measured).

    :param timeout: seconds one task may take before the benchmark fails.
    """
    if tasks < 1 or floor_runs < 1:
        raise ValueError("tasks and floor_runs must be >= 1")
    floor_twisted, floor_subprocess = await measure_floor(floor_runs)
    times, stages, cpu, fs = await _run_tasks(tasks, timeout, agent_args)
    with tempfile.TemporaryDirectory(prefix="hostlink-bench-commit-") as probe:
        commits = commit_seconds(probe)
    elsewhere: list[float] = []
    elsewhere_cpu = None
    if elsewhere_tasks > 0:
        with tempfile.TemporaryDirectory(prefix="hostlink-bench-workdir-") as workdir:
            elsewhere, _, elsewhere_cpu, _ = await _run_tasks(
                elsewhere_tasks, timeout, (*agent_args, "--task-workdir", workdir)
            )
    return RoundTripResult(times, floor_twisted, floor_subprocess, fs, agent_cpu=cpu,
                           stages=stages, elsewhere=elsewhere, elsewhere_cpu=elsewhere_cpu,
                           commits=commits)
