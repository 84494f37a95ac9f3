"""
Store: what the agent's local store costs on disk over N tasks (10,000 by
default) once retention has passed, and how many bytes the agent writes to
disk per byte of task output.

A real agent (``twistd -n hostlink``) runs N tasks from the reference
control plane in this process, each printing ``output_bytes`` bytes
(``printf``, a shell builtin: one chunk each at the default sizes), with
``HOSTLINK_LOCAL_STORE_RETENTION`` at its minimum (1 min; the purge then runs
every 15 s) and a few tasks at once.  The control plane keeps a window of
tasks outstanding and adds one as each final arrives.  Every second the
benchmark samples the store's files (database, WAL, shared memory), the
attempts it holds (a read-only count beside the running agent) and the
agent's ``write_bytes`` from ``/proc/PID/io`` (bytes the process caused to be
written to storage: WAL appends, checkpoints into the database file, each
commit's fsync).  After the last final it waits until the purge has deleted
every attempt (retention passed), then reads the files once more.

*Bounded* means the store stops growing once the first retention window
has passed: the largest size in the second half of the run is at most 10 %
above the largest in the first half (judged only when the first half is
longer than the retention plus two purge intervals).  SQLite keeps freed
pages in the file for reuse (no VACUUM), so the size after the purge is the
high-water mark of one retention window, not zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from benchmarks.bench_rst import NOT_JUDGED, table, verdict
from benchmarks.bench_support import (
    global_reactor,
    make_identity,
    quiet_logging,
    sleep,
    spawn_agent,
)
from benchmarks.bench_tasks_support import (
    start_task_control_plane,
    store_count,
    store_files,
    task_agent_args,
    write_bytes,
)

__all__ = ["StoreResult", "measure_store"]

RETENTION = 60.0
#: The engine's purge interval for that retention (max(1 s, min(retention / 4, 10 min))).
PURGE_INTERVAL = max(1.0, min(RETENTION / 4, 600.0))

_MB = 1024 * 1024
_EXECUTIONS = "SELECT count(*) FROM executions"


@dataclass
class Sample:
    """One look at the store: seconds since the first task, files, attempts, writes."""

    at: float
    files: dict[str, int]
    attempts: int
    written: int

    @property
    def total(self) -> int:
        """Database + WAL + shared memory."""
        return sum(self.files.values())


@dataclass
class StoreResult:
    """What :func:`measure_store` measured."""

    tasks: int
    output_bytes: int
    concurrency: int
    retention: float
    #: Seconds from the first task created to the last final stored.
    run_seconds: float
    #: Seconds from the last final until the purge had emptied the store.
    purge_seconds: float | None
    samples: list[Sample]
    #: Bytes the agent wrote to disk over the tasks, and until the purge was done.
    written_run: int
    written_total: int
    #: The files after the purge (retention passed).
    files_after: dict[str, int]
    #: Pages in the database file, and how many of them are free (after the purge).
    pages: int
    free_pages: int
    page_size: int
    title: str = "Store"
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        self.met = self.bounded()

    @property
    def output_total(self) -> int:
        """Bytes of task output produced."""
        return self.tasks * self.output_bytes

    @property
    def peak(self) -> int:
        """The largest database + WAL + SHM seen."""
        return max([s.total for s in self.samples] + [sum(self.files_after.values())])

    @property
    def peak_attempts(self) -> int:
        """The most attempts the store held at once."""
        return max([s.attempts for s in self.samples] + [0])

    @property
    def amplification(self) -> float | None:
        """Bytes written to disk over the tasks per byte of output."""
        return None if not self.output_total else self.written_run / self.output_total

    def bounded(self) -> bool | None:
        """See the module docstring; None when the run is too short to tell."""
        run = [s for s in self.samples if s.at <= self.run_seconds]
        half = self.run_seconds / 2
        if half < self.retention + 2 * PURGE_INTERVAL or len(run) < 4:
            return None
        first = max(s.total for s in run if s.at <= half)
        second = max(s.total for s in run if s.at > half)
        return second <= 1.1 * first

    def summary_row(self) -> list[str]:
        """[benchmark, measured, target, ratio, verdict]."""
        after = sum(self.files_after.values())
        amp = self.amplification
        return [
            f"Store: {self.tasks:,} tasks, retention {self.retention:g} s passed",
            f"{after / _MB:.1f} MiB on disk after (peak {self.peak / _MB:.1f} MiB); "
            + ("" if amp is None else f"{amp:.1f} bytes written per output byte"),
            "bounded",
            f"{self.peak_attempts:,} attempts held at most",
            verdict(self.met, NOT_JUDGED),
        ]

    def detail_rst(self) -> str:
        """The section body: method, figures, verdict."""
        after = self.files_after
        amp = self.amplification
        rows = [
            ["tasks (each printing)", f"{self.tasks:,} ({self.output_bytes:,} bytes)"],
            ["at once (``HOSTLINK_TASK_CONCURRENCY``)", str(self.concurrency)],
            ["run (first task → last final)",
             f"{self.run_seconds:.0f} s ({self.tasks / self.run_seconds:.1f} tasks/s)"],
            ["``HOSTLINK_LOCAL_STORE_RETENTION`` / purge every",
             f"{self.retention:g} s / {PURGE_INTERVAL:g} s"],
            ["last final → store emptied by the purge",
             "never" if self.purge_seconds is None else f"{self.purge_seconds:.0f} s"],
            ["attempts held at most", f"{self.peak_attempts:,}"],
            ["peak on disk (db + WAL + SHM)", f"{self.peak / _MB:.2f} MiB"],
            ["after retention passed: db / WAL / SHM",
             f"{after['db'] / _MB:.2f} / {after['wal'] / _MB:.2f} / {after['shm'] / _MB:.3f} MiB"],
            ["database pages after (free)",
             f"{self.pages:,} × {self.page_size} B ({self.free_pages:,} free)"],
            ["output produced", f"{self.output_total / _MB:.1f} MiB"],
            ["agent ``write_bytes`` over the tasks", f"{self.written_run / _MB:.1f} MiB"],
            ["… and including the purge", f"{self.written_total / _MB:.1f} MiB"],
            ["write amplification (written / output)", "" if amp is None else f"{amp:.1f} ×"],
            ["written per task", f"{self.written_run / max(self.tasks, 1) / 1024:.1f} KiB"],
        ]
        quarters = self._quarters()
        return (
            _method() + "\n\n"
            + table(["measurement", "value"], rows)
            + "\n\nStore size over the run (largest sample in each quarter): "
            + ", ".join(f"{q / _MB:.2f} MiB" for q in quarters) + ".\n\n"
            + "Write amplification counts every byte the agent process caused to be "
            "written to storage (``/proc/PID/io`` ``write_bytes``), over the bytes its tasks "
            "printed: each task is several commits (received, running, its process "
            "group, each chunk, the final, the acks), each a WAL frame of whole 4 KiB "
            "pages plus its fsync, and checkpoints copy pages into the database file "
            "again.  It is a per-task cost, so it shrinks as output per task grows.\n\n"
            + f"Bounded (the second half of the run no larger than the first, +10 %): "
            f"{verdict(self.met, NOT_JUDGED)}.\n"
        )

    def _quarters(self) -> list[int]:
        run = [s for s in self.samples if s.at <= self.run_seconds]
        if not run:
            return []
        step = self.run_seconds / 4
        out = []
        for q in range(4):
            inside = [s.total for s in run if q * step <= s.at <= (q + 1) * step]
            if inside:
                out.append(max(inside))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Raw figures (for ``--json``)."""
        return {
            "title": self.title,
            "tasks": self.tasks,
            "output_bytes": self.output_bytes,
            "concurrency": self.concurrency,
            "retention": self.retention,
            "run_seconds": self.run_seconds,
            "purge_seconds": self.purge_seconds,
            "peak_bytes": self.peak,
            "peak_attempts": self.peak_attempts,
            "files_after": self.files_after,
            "pages": self.pages,
            "free_pages": self.free_pages,
            "page_size": self.page_size,
            "written_run": self.written_run,
            "written_total": self.written_total,
            "output_total": self.output_total,
            "amplification": self.amplification,
            "samples": [[s.at, s.total, s.attempts, s.written] for s in self.samples],
            "met": self.met,
        }


def _method() -> str:
    """The module docstring's method paragraph (empty under ``python -OO``)."""
    parts = (__doc__ or "").split("\n\n")
    return parts[1].strip() if len(parts) > 1 else ""


def _pages(path: str) -> tuple[int, int, int]:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return tuple(  # type: ignore[return-value]
            int(conn.execute(f"PRAGMA {p}").fetchone()[0])
            for p in ("page_count", "freelist_count", "page_size")
        )
    finally:
        conn.close()


class _Feeder:
    """Keeps ``window`` tasks outstanding until ``total`` have their final."""

    def __init__(self, cp: Any, agent_id: str, command: str, total: int, window: int) -> None:
        self.cp, self.agent_id, self.command = cp, agent_id, command
        self.total, self.window = total, window
        self.created = self.finished = 0
        self.done: Deferred[None] = Deferred()

    def fill(self) -> None:
        while self.created < self.total and self.created - self.finished < self.window:
            record = self.cp.tasks.create(self.agent_id, self.command)
            self.created += 1
            d = self.cp.tasks.wait_final(record.task_id)
            d.addCallback(self._final)
            d.addErrback(lambda f: None if self.done.called else self.done.errback(f))

    def _final(self, record: Any) -> None:
        self.finished += 1
        if self.finished == self.total and not self.done.called:
            self.done.callback(None)
        else:
            self.fill()


async def measure_store(
    tasks: int = 10_000, output_bytes: int = 4096, concurrency: int = 4,
    timeout: float = 1800.0, wait_for_purge: bool = True,
) -> StoreResult:
    """Run ``tasks`` tasks on one agent; see the module docstring.

    :param wait_for_purge: False: stop after the last final (a smoke test;
        ``purge_seconds`` is then None and the files are read at once).
    """
    if tasks < 1 or output_bytes < 1 or not 1 <= concurrency <= 64:
        raise ValueError("tasks and output_bytes must be >= 1, concurrency 1-64")
    reactor = global_reactor()
    with tempfile.TemporaryDirectory(prefix="hostlink-bench-store-") as tmp:
        identity = make_identity(os.path.join(tmp, "state"), "bench-store")
        cp = await start_task_control_plane([identity], tmp)
        store = os.path.join(tmp, "agent.db")
        agent = spawn_agent(identity, cp.ws_url, *task_agent_args(
            cp.port, tmp,
            "--store-retention", f"{RETENTION:g}s",
            "--task-concurrency", str(concurrency),
            "--heartbeat-interval", "5m",
        ))
        samples: list[Sample] = []
        sampler: Any = None
        try:
            await agent.wait_while_running(
                cp.wait_active(identity.agent_id, timeout=60), "the agent never became active")
            base = write_bytes(agent.pid)
            start = time.monotonic()

            def sample() -> None:
                if agent.running:
                    samples.append(Sample(time.monotonic() - start, store_files(store),
                                          store_count(store, _EXECUTIONS),
                                          write_bytes(agent.pid) - base))

            sampler = task.LoopingCall(sample)
            sampler.start(1.0, now=True)
            feeder = _Feeder(cp, identity.agent_id, f"printf '%0{output_bytes}d' 0",
                             tasks, window=4 * concurrency)
            feeder.fill()
            await agent.wait_while_running(feeder.done.addTimeout(timeout, reactor),
                                           "the tasks never all ended")
            run_seconds = time.monotonic() - start
            await sleep(1.0)  # the last acks are committed
            written_run = write_bytes(agent.pid) - base
            purge_seconds: float | None = None
            deadline = time.monotonic() + RETENTION + 4 * PURGE_INTERVAL
            while wait_for_purge and time.monotonic() < deadline and agent.running:
                if store_count(store, _EXECUTIONS) == 0:
                    purge_seconds = time.monotonic() - start - run_seconds
                    break
                await sleep(1.0)
            written_total = write_bytes(agent.pid) - base
            sample()
        finally:
            if sampler is not None and sampler.running:
                sampler.stop()
            await agent.kill()
            await cp.stop()
        files_after = samples[-1].files if samples else store_files(store)
        pages, free, page_size = _pages(store)
    return StoreResult(tasks, output_bytes, concurrency, RETENTION, run_seconds, purge_seconds,
                       samples, written_run, written_total, files_after, pages, free, page_size)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_task_store",
                                     description="The agent's store on disk over many tasks.")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--output-bytes", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-purge", action="store_true",
                        help="do not wait for retention to pass")
    return parser.parse_args(argv)


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    quiet_logging()
    r = await measure_store(args.tasks, args.output_bytes, args.concurrency,
                            wait_for_purge=not args.no_purge)
    print(" | ".join(r.summary_row()))
    print(r.detail_rst())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_task_store [--tasks N] [--output-bytes B]``."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args)))


if __name__ == "__main__":
    main()
