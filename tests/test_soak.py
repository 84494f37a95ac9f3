"""
The soak's verdict and task feed (:mod:`evidence.soak`, :mod:`evidence.soak_tasks`),
without running a soak: synthetic samples for the judge, a fake operator API
for the feed (each test is the agent that runs the tasks, or fails to).
"""

from __future__ import annotations

import sqlite3
import subprocess
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from evidence.soak import Sample, judge, parse_args
from evidence.soak_tasks import (
    StorePoint,
    TaskFeed,
    judge_store,
    runs_file,
    store_bytes,
    store_settle,
    task_spec,
    wal_resets,
)
from hostlink_tw.operatorclient import OperatorError, UnreachableError

KiB = 1024


def series(
    minutes: int = 30,
    *,
    fds: Any = lambda i: 16,
    threads: Any = lambda i: 4,
    store: Any = lambda i: 4200 * KiB,
    wal_reset_from: int = 2,
) -> list[Sample]:
    """A sample a minute; each figure a function of the sample's index."""
    return [
        Sample(at=60.0 * i, fds=fds(i), rss_kib=62 * 1024, delayed_calls=6, gc_objects=60000,
               state="active", restarts=12 * i, threads=threads(i), store_bytes=store(i),
               wal_resets=1 if i >= wal_reset_from else 0)
        for i in range(minutes + 1)
    ]


def verdict(samples: list[Sample]) -> Any:
    return judge(samples, fd_tolerance=2, timer_tolerance=2, rss_tolerance_kib=4096,
                 thread_tolerance=1, store_tolerance=256 * KiB, store_settle=78.0)


class JudgeTests(SynchronousTestCase):
    """The verdict on synthetic series."""

    def test_flat(self) -> None:
        """Everything constant (the store growing only before it settles) is flat."""
        result = verdict(series(store=lambda i: min(i, 2) * 2000 * KiB + 200 * KiB))
        self.assertTrue(result.flat, result.lines)
        self.assertIn("threads (max): early 4, final 4", "\n".join(result.lines))

    def test_threads_growing(self) -> None:
        """A thread more every ten minutes is caught."""
        result = verdict(series(threads=lambda i: 4 + i // 10))
        self.assertFalse(result.flat)
        self.assertIn("threads (max): early 4, final 7, growth +3 (allowed 1) -> GROWING",
                      result.lines)

    def test_fds_growing(self) -> None:
        """The existing checks still count: an fd leak is not flat."""
        self.assertFalse(verdict(series(fds=lambda i: 16 + i // 5)).flat)

    def test_store_growing(self) -> None:
        """A store that keeps a few KiB of every task past retention is caught."""
        # 20 tasks a minute, 1 KiB each never purged: 580 KiB more in 29 minutes.
        result = verdict(series(store=lambda i: 4200 * KiB + 20 * KiB * i))
        self.assertFalse(result.flat)
        line = [x for x in result.lines if x.startswith("store size")][0]
        self.assertIn("GROWING", line)
        self.assertIn("from 120s", line)  # the first settled sample (WAL reset at 2:00)

    def test_store_within_tolerance(self) -> None:
        """Growth up to the tolerance is flat."""
        self.assertTrue(verdict(series(store=lambda i: 4200 * KiB + 8 * KiB * (i // 10))).flat)

    def test_wal_never_reset(self) -> None:
        """A WAL never reset after a checkpoint grows without bound: not flat."""
        result = verdict(series(wal_reset_from=99))
        self.assertFalse(result.flat)
        self.assertIn("WAL was never reset", "\n".join(result.lines))
        result = verdict(series(wal_reset_from=25))
        self.assertFalse(result.flat)
        self.assertIn("first reset too late", "\n".join(result.lines))

    def test_too_short_for_the_store(self) -> None:
        """A run whose settled samples reach the last quarter gives no store verdict."""
        samples = [
            Sample(at=10.0 * i, fds=16, rss_kib=62 * 1024, delayed_calls=6, gc_objects=1,
                   state="active", restarts=i, threads=4, store_bytes=100, wal_resets=1)
            for i in range(10)
        ]
        result = verdict(samples)
        self.assertFalse(result.flat)
        self.assertIn("too short", "\n".join(result.lines))

    def test_store_windows(self) -> None:
        """The early window is the first quarter's count of settled samples."""
        points = [StorePoint(at=30.0 * i, size=100 + (50 if i == 3 else 0)) for i in range(11)]
        # Settled from 90 s: early = 90 s and 120 s (k = 2), so the bump at 90 s is early.
        ok, line = judge_store(points, settle=store_settle(60.0, 3.0) + 10, tolerance=0)
        self.assertTrue(ok, line)
        self.assertIn("from 90s", line)
        points[-1] = StorePoint(at=300.0, size=100 + 50 + 1024)
        self.assertFalse(judge_store(points, settle=88.0, tolerance=1000)[0])


class FakeOperatorAPI:
    """The operator API's task calls, in memory; ``down`` refuses everything."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.down = False
        self.lose_next_answer = False
        self.posts = 0

    def request(self, method: str, path: str, document: Any = None,
                query: Any = None) -> dict[str, Any]:
        if self.down:
            raise UnreachableError("cannot reach the control plane: connection refused")
        if method == "POST" and path == "/tasks":
            self.posts += 1
            task_id = f"t{len(self.tasks) + 1}"
            self.tasks[task_id] = {
                "task_id": task_id, "command": document["command"], "status": "pending",
                "finished": False, "exit_code": None, "attempts": [{}],
                "created_at": "2026-12-02T10:00:00Z", "ended_at": None,
                "stdout": "", "stderr": "",
            }
            if self.lose_next_answer:
                self.lose_next_answer = False
                raise UnreachableError("the connection was closed without an answer")
            return dict(self.tasks[task_id])
        if method == "GET" and path == "/tasks":
            return {"tasks": list(self.tasks.values())[::-1]}
        if method == "GET" and path.startswith("/tasks/"):
            task = self.tasks.get(path.split("/")[2])
            if task is None:
                raise OperatorError("no such task", status=404, code="unknown_task")
            return dict(task)
        raise AssertionError(f"unexpected {method} {path}")

    def run_all(self, feed: TaskFeed, runs: int = 1, **changes: Any) -> None:
        """Be the agent: run every pending task ``runs`` times and record its final."""
        specs = {t.spec.command: t.spec for t in feed.tasks}
        for task in self.tasks.values():
            if task["finished"]:
                continue
            spec = specs[task["command"]]
            with open(runs_file(feed.runs_dir, spec.number), "a") as f:
                f.write("run\n" * runs)
            task.update(status=spec.status, exit_code=spec.exit_code, finished=True,
                        ended_at="2026-12-02T10:00:02Z", stdout=spec.stdout, stderr=spec.stderr)
            task.update(changes)


class TaskFeedTests(SynchronousTestCase):
    """Submission, retries, adoption and the per-task checks."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.runs = Path(directory.name)
        self.api = FakeOperatorAPI()
        self.feed = TaskFeed(self.api, "agent-soak", self.runs, every=3.0, submit_timeout=10.0)
        self.feed.start(0.0)

    def advance(self, until: float) -> None:
        """Step the feed at every time it asks for, up to ``until`` (bounded)."""
        now = 0.0
        for _ in range(10000):
            self.feed.step(now)
            now = self.feed.next_due()
            if now > until:
                return
        self.fail("the feed never got past its due times")

    def test_every_task_once(self) -> None:
        """A task every 3 s, each run once as expected: all exactly once."""
        self.advance(30.0)
        self.api.run_all(self.feed)
        self.advance(31.0)
        self.assertFalse(self.feed.busy)
        summary = self.feed.verify()
        self.assertEqual((summary.submitted, summary.finished, summary.exactly_once), (11, 11, 11))
        self.assertTrue(summary.ok, summary.problems)
        self.assertEqual(summary.latencies, [2.0] * 11)
        self.assertEqual(len(summary.seen_latencies), 11)
        self.assertTrue(all(0 < x <= 34 for x in summary.seen_latencies), summary.seen_latencies)
        self.assertEqual({t.spec.exit_code for t in self.feed.tasks}, {0, 1, 2})

    def test_waits_while_down(self) -> None:
        """Refused submissions are retried until the control plane is back, and counted."""
        self.api.down = True
        self.advance(2.0)
        self.assertEqual(self.api.tasks, {})
        self.api.down = False
        self.advance(4.0)  # tasks 1 (due at 0) and 2 (due at 3)
        self.api.run_all(self.feed)
        summary = self.feed.verify()
        self.assertEqual((summary.submitted, summary.waited), (2, 1))
        self.assertEqual(summary.retries, 9)  # refused at 0, 0.25, ..., 2 s
        self.assertTrue(summary.ok, summary.problems)

    def test_lost_answer_adopted(self) -> None:
        """A POST whose answer was lost is found by its command, not created again."""
        self.api.lose_next_answer = True
        self.advance(1.0)
        self.assertEqual((self.api.posts, len(self.api.tasks)), (1, 1))
        self.api.run_all(self.feed)
        summary = self.feed.verify()
        self.assertEqual((summary.submitted, summary.adopted, summary.exactly_once), (1, 1, 1))
        self.assertTrue(summary.ok)

    def test_gives_up(self) -> None:
        """A submission still refused after the timeout is given up, and the run fails."""
        self.api.down = True
        self.advance(11.0)
        self.api.down = False
        summary = self.feed.verify()
        self.assertEqual(summary.gave_up, 1)
        self.assertFalse(summary.ok)
        self.assertIn("given up", summary.problems[0])

    def test_ran_twice(self) -> None:
        """A task whose runs file has two lines fails the run."""
        self.advance(1.0)
        self.api.run_all(self.feed, runs=2)
        summary = self.feed.verify()
        self.assertEqual(summary.exactly_once, 0)
        self.assertEqual(summary.problems, ["task 1: ran 2 times"])

    def test_wrong_final(self) -> None:
        """Another exit code, a second attempt or other output are each named."""
        self.advance(1.0)
        self.api.run_all(self.feed, status="failed", exit_code=-1, attempts=[{}, {}],
                         stdout="soak task 1 line 0\n")
        problems = self.feed.verify().problems
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("ended failed exit -1, expected failed exit 1", problems[0])
        self.assertIn("2 attempts", problems[1])
        self.assertIn("stdout: 19 characters, expected", problems[2])
        self.assertNotIn("soak task 1 line", "\n".join(self.feed.verify().lines()))

    def test_unfinished(self) -> None:
        """A task without a final is not exactly once."""
        self.advance(1.0)
        summary = self.feed.verify()
        self.assertEqual((summary.submitted, summary.finished, summary.exactly_once), (1, 0, 0))
        self.assertFalse(summary.ok)


class PiecesTests(SynchronousTestCase):
    """The task itself, the store's size and WAL resets, the options."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.dir = Path(directory.name)

    def test_task_spec_runs_as_specified(self) -> None:
        """The command prints what its spec says, exits with its code and counts its run."""
        for number in (3, 4, 5):
            spec = task_spec(number, self.dir)
            done = subprocess.run(["/bin/sh", "-c", spec.command], capture_output=True,  # noqa: S603
                                  timeout=10, check=False)
            self.assertEqual(done.returncode, spec.exit_code)
            self.assertEqual(done.stdout.decode(), spec.stdout)
            self.assertEqual(done.stderr.decode(), spec.stderr)
            self.assertEqual(runs_file(self.dir, number).read_text(), "run\n")

    def test_store_bytes_and_wal_resets(self) -> None:
        """The three files are counted; the WAL's checkpoint sequence is read."""
        db = self.dir / "task_store.db"
        self.assertEqual((store_bytes(db), wal_resets(db)), (0, -1))
        with closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA wal_autocheckpoint = 4")
            conn.execute("CREATE TABLE t (x)")
            self.assertEqual(wal_resets(db), 0)
            for _ in range(10):
                conn.execute("INSERT INTO t VALUES (zeroblob(5000))")
            self.assertGreater(wal_resets(db), 0)
            files = [Path(f"{db}{s}") for s in ("", "-wal", "-shm")]
            self.assertEqual(store_bytes(db), sum(f.stat().st_size for f in files))

    def test_options(self) -> None:
        """Task defaults, and a retention below the agent's least is refused."""
        options = parse_args(["--minutes", "5"])
        self.assertEqual((options.task_every, options.store_retention), (3.0, 60.0))
        self.assertEqual(options.sample_every, 30.0)
        with self.assertRaises(SystemExit):
            parse_args(["--store-retention", "30"])
