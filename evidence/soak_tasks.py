"""
The soak's tasks: a short task every few seconds while the control plane
restarts, and the store and thread figures sampled beside the fds.

:mod:`evidence.soak` runs the processes and the loop; this module holds the
task part so that the loop stays readable:

* :func:`agent_task_args` and :func:`control_plane_task_args`: the agent
  runs with both task flags on (``--enable-delivery --enable-results``) and
  a local store with a short retention (``--store-retention``, one minute by
  default, the least allowed: its purge runs every quarter of it, so the
  store reaches its steady size early in the run); the control plane keeps
  its tasks in ``tasks.db`` across restarts and serves the operator API on
  127.0.0.1 with a token file.
* :class:`TaskFeed`: submits task *n* through the operator API
  (:class:`hostlink_tw.operatorclient.OperatorClient`) every ``every``
  seconds.  Each task appends a line to its own runs file, prints lines to
  stdout and one to stderr, and exits with ``n % 3``
  (:func:`task_spec`).  When the control plane is down the submission waits
  and is retried every ``retry_every`` seconds for at most
  ``submit_timeout``; before each retry the feed looks for the command in
  the agent's newest tasks (a POST whose answer was lost to a restart may
  have created it), so no task is created twice.  Submissions that waited,
  retries and adopted tasks are counted.  The feed also polls its unfinished
  tasks, and :meth:`TaskFeed.verify` checks every one at the end.
* :func:`judge_store`: the store's verdict (see its docstring).

The feed never blocks for long: :meth:`TaskFeed.step` does what is due and
returns, and every request has the client's timeout.  Task output is checked,
never printed or logged.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from hostlink_tw.operatorclient import OperatorError, task_path

#: Lines each task prints on stdout.
TASK_LINES = 20
#: The store's three files: the database, its WAL and the WAL index.
STORE_SUFFIXES = ("", "-wal", "-shm")


# --- the processes' options ----------------------------------------------------------------


def agent_task_args(store: Path, retention: float, workdir: Path) -> list[str]:
    """The agent's options for tasks: both flags, the store, the retention, the workdir."""
    return [
        "--enable-delivery",
        "--enable-results",
        "--local-store-path", str(store),
        "--store-retention", f"{retention:g}s",
        "--task-workdir", str(workdir),
    ]


def control_plane_task_args(operator_port: int, token_file: Path, tasks_db: Path) -> list[str]:
    """The control plane's options: the persistent task store and the operator API."""
    return [
        "--tasks-database", str(tasks_db),
        "--operator-listen", f"tcp:{operator_port}:interface=127.0.0.1",
        "--operator-token-file", str(token_file),
    ]


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The soak's options for tasks, threads and the store."""
    parser.add_argument("--thread-tolerance", type=int, default=1)
    parser.add_argument("--store-tolerance-kib", type=float, default=256.0)
    parser.add_argument("--task-every", type=float, default=3.0, metavar="SECONDS",
                        help="submit a task this often (default 3)")
    parser.add_argument("--store-retention", type=float, default=60.0, metavar="SECONDS",
                        help="the agent's store retention (default 60, the least it takes)")
    parser.add_argument("--submit-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="give a submission up after this long (default 30)")
    parser.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="after the last sample, wait this long for open tasks (default 60)")


def check_task_arguments(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """A usage error (``parser.error``) for values the soak cannot use."""
    if options.task_every <= 0 or options.submit_timeout <= 0 or options.drain_timeout <= 0:
        parser.error("--task-every, --submit-timeout and --drain-timeout must be positive")
    if options.store_retention < 60:
        parser.error("--store-retention must be at least 60 (the agent's least)")


def purge_interval(retention: float) -> float:
    """How often the agent purges (``hostlink_tw.agent.tasks``: a quarter of the retention)."""
    return max(1.0, min(retention / 4, 600.0))


def store_settle(retention: float, task_every: float) -> float:
    """
    Seconds after the start by which the store is in its steady state: the
    first tasks are past retention, one purge has run, and one more task came.
    """
    return retention + purge_interval(retention) + task_every


# --- samples -------------------------------------------------------------------------------


def store_bytes(db: Path) -> int:
    """Bytes of the store's files (database, ``-wal``, ``-shm``); a missing one counts 0."""
    total = 0
    for suffix in STORE_SUFFIXES:
        try:
            total += os.stat(f"{db}{suffix}").st_size
        except FileNotFoundError:
            pass
    return total


def wal_resets(db: Path) -> int:
    """
    How many times the store's WAL was reset after a checkpoint (the
    checkpoint sequence number in its header); -1 without a WAL header.

    SQLite writes the WAL from its start again after a checkpoint (every
    1000 pages by default) but never shrinks the file: once it has been
    reset, the WAL is as large as it gets.
    """
    try:
        with open(f"{db}-wal", "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return -1
    if len(header) < 16 or header[:3] != b"\x37\x7f\x06":
        return -1
    return int.from_bytes(header[12:16], "big")


def thread_count(pid: int) -> int:
    """``Threads`` of ``pid`` (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise ValueError(f"no Threads line for process {pid}")


# --- the store's verdict -------------------------------------------------------------------


@dataclass(frozen=True)
class StorePoint:
    """The store's size at one sample."""

    at: float
    size: int
    wal_reset: bool = True  # the WAL was reset at least once (:func:`wal_resets`)


def judge_store(
    points: Sequence[StorePoint], settle: float, tolerance: int
) -> tuple[bool, str]:
    """
    Whether the store stayed flat, and the line that says so.

    The early window is the first quarter's worth of samples (at least one)
    taken once the store is in its steady state: at or after ``settle``
    seconds (:func:`store_settle`: retention passed and a purge ran) and
    after the WAL was reset once (it has its full size); the final window is
    the last quarter, the first sample excluded as warm-up as for the other
    figures.  Flat: the final maximum is at most ``tolerance`` bytes above
    the early maximum.  A run too short for the two windows to be apart
    fails (it shows nothing about the store), and so does a WAL that is never
    reset (it grows without a bound).
    """
    steady = list(points[1:])
    if not steady:
        return False, "store size: too few samples for a verdict (run longer)"
    k = max(1, round(len(steady) / 4))
    final = steady[-k:]
    past = [p for p in steady if p.at >= settle][:k]
    if not past or past[-1].at >= final[0].at:
        return False, (
            f"store size: the run is too short for a verdict (steady after {settle:g}s and "
            f"the WAL's first reset, needs a quarter of the samples after that and before "
            f"the last quarter)"
        )
    if not any(p.wal_reset for p in steady):
        return False, ("store size: the WAL was never reset after a checkpoint, so it never "
                       "reached its full size (run longer) or it grows without bound -> FAIL")
    early = [p for p in steady if p.at >= settle and p.wal_reset][:k]
    if early[-1].at >= final[0].at:
        return False, ("store size: the WAL was first reset too late for a verdict (in the "
                       "last quarter; run longer) -> FAIL")
    before = max(p.size for p in early) / 1024
    after = max(p.size for p in final) / 1024
    ok = after - before <= tolerance / 1024
    return ok, (
        f"store size (max, from {early[0].at:.0f}s): early {before:.0f} KiB, final {after:.0f} "
        f"KiB, growth {after - before:+.0f} KiB (allowed {tolerance / 1024:.0f} KiB) -> "
        f"{'flat' if ok else 'GROWING'}"
    )


# --- the tasks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What task ``number`` runs and what it must end with."""

    number: int
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def status(self) -> str:
        """The final status it must reach."""
        return "completed" if self.exit_code == 0 else "failed"


def runs_file(runs_dir: Path, number: int) -> Path:
    """Where task ``number`` counts its runs (one line per run)."""
    return runs_dir / f"task-{number}.runs"


def task_spec(number: int, runs_dir: Path) -> TaskSpec:
    """Task ``number``: count the run, print, exit ``number % 3``."""
    words = " ".join(str(i) for i in range(TASK_LINES))
    command = (
        f"echo run >> {shlex.quote(str(runs_file(runs_dir, number)))}; "
        f"printf 'soak task {number} line %s\\n' {words}; "
        f"echo 'soak task {number} stderr' >&2; "
        f"exit {number % 3}"
    )
    return TaskSpec(
        number=number,
        command=command,
        exit_code=number % 3,
        stdout="".join(f"soak task {number} line {i}\n" for i in range(TASK_LINES)),
        stderr=f"soak task {number} stderr\n",
    )


def _seconds(rfc3339: str | None) -> float | None:
    return None if rfc3339 is None else datetime.fromisoformat(rfc3339).timestamp()


class Client(Protocol):
    """What the feed needs of :class:`~hostlink_tw.operatorclient.OperatorClient`."""

    def request(
        self, method: str, path: str, document: Any = None, query: Any = None
    ) -> dict[str, Any]:
        """One request; its JSON answer."""


@dataclass
class SoakTask:
    """One task of the feed and what happened to it."""

    spec: TaskSpec
    due: float
    next_try: float
    tries: int = 0
    task_id: str | None = None
    accepted_at: float | None = None
    adopted: bool = False
    seen_finished_at: float | None = None
    gave_up: str | None = None


@dataclass
class TaskSummary:
    """The figures :meth:`TaskFeed.verify` prints, and whether every task was right."""

    submitted: int = 0
    waited: int = 0
    retries: int = 0
    adopted: int = 0
    gave_up: int = 0
    finished: int = 0
    exactly_once: int = 0
    latencies: list[float] = field(default_factory=list)
    slowest: str = ""  # the task of the longest latency at the control plane
    seen_latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every submitted task reached its final exactly once, as expected."""
        return (not self.problems and self.submitted > 0
                and self.exactly_once == self.submitted)

    def lines(self) -> list[str]:
        """The printed summary."""
        latency = seen = "no task finished"
        if self.latencies:
            latency = (f"median {statistics.median(self.latencies):.0f} s, "
                       f"max {max(self.latencies):.0f} s ({self.slowest})")
        if self.seen_latencies:
            seen = (f"median {statistics.median(self.seen_latencies):.1f} s, "
                    f"max {max(self.seen_latencies):.1f} s")
        lines = [
            f"tasks: submitted {self.submitted} ({self.waited} waited for the control plane, "
            f"{self.retries} retries, {self.adopted} found created after a lost answer, "
            f"{self.gave_up} given up), finished {self.finished}, exactly once "
            f"{self.exactly_once} -> {'OK' if self.ok else 'FAIL'}",
            f"task latency at the control plane (created -> final, whole seconds): {latency}",
            f"task latency at the harness (due -> seen finished, polled every 0.5 s): {seen}",
        ]
        shown = self.problems[:10]
        lines += [f"  problem: {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more problems")
        return lines


class TaskFeed:
    """Submits, follows and finally checks the soak's tasks (see the module docstring)."""

    def __init__(
        self,
        client: Client,
        agent_id: str,
        runs_dir: Path,
        *,
        every: float,
        submit_timeout: float = 30.0,
        retry_every: float = 0.25,
        poll_every: float = 0.5,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.runs_dir = runs_dir
        self.every = every
        self.submit_timeout = submit_timeout
        self.retry_every = retry_every
        self.poll_every = poll_every
        self.tasks: list[SoakTask] = []
        self._queue: deque[SoakTask] = deque()
        self._unfinished: list[SoakTask] = []
        self._next_task: float | None = None
        self._next_poll = 0.0
        self.retries = 0

    # -- the loop's side -------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The first task is due now."""
        self._next_task = now

    def stop_submitting(self) -> None:
        """No new task after this (queued ones are still submitted)."""
        self._next_task = None

    def next_due(self) -> float:
        """When :meth:`step` has something to do next (``inf``: nothing)."""
        times = [self._next_task] if self._next_task is not None else []
        if self._queue:
            times.append(self._queue[0].next_try)
        if self._unfinished:
            times.append(self._next_poll)
        return min(times, default=float("inf"))

    @property
    def busy(self) -> bool:
        """Whether a task is still to be submitted or to finish."""
        return bool(self._queue or self._unfinished)

    def step(self, now: float) -> None:
        """Queue the task that is due, submit the queue's head, poll unfinished tasks."""
        if self._next_task is not None and now >= self._next_task:
            spec = task_spec(len(self.tasks) + 1, self.runs_dir)
            task = SoakTask(spec, due=now, next_try=now)
            self.tasks.append(task)
            self._queue.append(task)
            self._next_task += self.every
            if self._next_task <= now:  # the loop fell behind: no burst to catch up
                self._next_task = now + self.every
        if self._queue and now >= self._queue[0].next_try:
            self._submit(self._queue[0], now)
        if self._unfinished and now >= self._next_poll:
            self._poll(now)
            self._next_poll = now + self.poll_every

    def _submit(self, task: SoakTask, now: float) -> None:
        try:
            if task.tries and self._find(task):
                task.adopted = True
            else:
                task.tries += 1
                created = self.client.request(
                    "POST", "/tasks", {"agent_id": self.agent_id, "command": task.spec.command}
                )
                task.task_id = str(created["task_id"])
        except OperatorError as e:
            if now - task.due >= self.submit_timeout:
                task.gave_up = str(e)
                self._queue.popleft()
                return
            self.retries += 1
            task.next_try = now + self.retry_every
            return
        task.accepted_at = now
        self._queue.popleft()
        self._unfinished.append(task)

    def _find(self, task: SoakTask) -> bool:
        """Whether a lost answer created the task already (then its id is set)."""
        listed = self.client.request(
            "GET", "/tasks", query={"agent_id": self.agent_id, "limit": "100"}
        )
        for document in listed["tasks"]:
            if document["command"] == task.spec.command:
                task.task_id = str(document["task_id"])
                return True
        return False

    def _poll(self, now: float) -> None:
        for task in list(self._unfinished):
            try:
                document = self.client.request("GET", task_path(str(task.task_id)))
            except OperatorError:
                return  # the control plane is down: next time
            if document.get("finished"):
                task.seen_finished_at = now
                self._unfinished.remove(task)

    def drain(self, timeout: float, now: Callable[[], float], sleep: Callable[[float], None]
              ) -> bool:
        """Submit and follow until nothing is left or ``timeout`` passed; True if drained."""
        self.stop_submitting()
        deadline = now() + timeout
        while self.busy and now() < deadline:
            self.step(now())
            sleep(max(0.0, min(self.next_due(), deadline) - now()))
        return not self.busy

    # -- the verdict -----------------------------------------------------------------------

    def verify(self) -> TaskSummary:
        """Check every task once more against the control plane and its runs file."""
        summary = TaskSummary(retries=self.retries)
        for task in self.tasks:
            if task.accepted_at is None and task.gave_up is None:
                continue  # still queued when the run ended: not submitted
            summary.submitted += 1
            summary.waited += task.accepted_at is not None and task.accepted_at > task.due
            summary.adopted += task.adopted
            if task.seen_finished_at is not None:
                summary.seen_latencies.append(task.seen_finished_at - task.due)
            problems = self._check(task, summary)
            summary.problems += [f"task {task.spec.number}: {p}" for p in problems]
            summary.exactly_once += not problems
        return summary

    def _check(self, task: SoakTask, summary: TaskSummary) -> list[str]:
        spec = task.spec
        runs_path = runs_file(self.runs_dir, spec.number)
        runs = len(runs_path.read_text().splitlines()) if runs_path.exists() else 0
        if task.gave_up is not None:
            summary.gave_up += 1
            return [f"submission given up after {self.submit_timeout:g}s ({task.gave_up}); "
                    f"ran {runs} times"]
        try:
            document = self.client.request("GET", task_path(str(task.task_id)))
        except OperatorError as e:
            return [f"cannot read it back: {e}"]
        problems = []
        if document.get("finished"):
            summary.finished += 1
            created, ended = _seconds(document["created_at"]), _seconds(document["ended_at"])
            if created is not None and ended is not None:
                if ended - created > max(summary.latencies, default=-1.0):
                    summary.slowest = f"task {spec.number}, {task.task_id}"
                summary.latencies.append(ended - created)
        if runs != 1:
            problems.append(f"ran {runs} times")
        if document["status"] != spec.status or document["exit_code"] != spec.exit_code:
            problems.append(f"ended {document['status']} exit {document['exit_code']}, "
                            f"expected {spec.status} exit {spec.exit_code}")
        attempts = len(document.get("attempts", ()))
        if attempts != 1:
            problems.append(f"{attempts} attempts")
        for stream in ("stdout", "stderr"):
            # Compared, never printed: a mismatch is named by its sizes only.
            got, expected = document.get(stream, ""), getattr(spec, stream)
            if got != expected:
                problems.append(f"{stream}: {len(got)} characters, expected {len(expected)}")
        return problems
