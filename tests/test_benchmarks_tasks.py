"""
Smoke tests of the task benchmarks (replay, store, fleet): each runs with
tiny sizes against real processes on 127.0.0.1, so the code cannot rot, and
the verdict logic is checked exactly.  They assert structure and sanity,
never speed.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from benchmarks.bench_task_fleet import FleetResult, measure_fleet
from benchmarks.bench_task_replay import TARGET_CHUNKS, ReplayResult, measure_replay
from benchmarks.bench_task_store import PURGE_INTERVAL, Sample, StoreResult, measure_store


def _store(samples: list[tuple[float, int]], run: float) -> StoreResult:
    return StoreResult(
        tasks=100, output_bytes=10, concurrency=1, retention=60.0, run_seconds=run,
        purge_seconds=None,
        samples=[Sample(at, {"db": size, "wal": 0, "shm": 0}, 1, 0) for at, size in samples],
        written_run=5000, written_total=6000, files_after={"db": 1, "wal": 2, "shm": 3},
        pages=1, free_pages=0, page_size=4096,
    )


class VerdictTests(SynchronousTestCase):
    """met: judged at the target's size only, None when there is nothing to judge."""

    def replay(self, chunks: int, seconds: float | None) -> ReplayResult:
        return ReplayResult(chunks, 1024, seconds, seconds, 1.0, chunks + 1, 0)

    def test_replay(self) -> None:
        self.assertTrue(self.replay(TARGET_CHUNKS, 2.9).met)
        self.assertFalse(self.replay(TARGET_CHUNKS, 3.1).met)
        self.assertTrue(self.replay(2 * TARGET_CHUNKS, 5.9).met)  # pro rata above
        self.assertIsNone(self.replay(100, 0.1).met)
        self.assertFalse(self.replay(TARGET_CHUNKS, None).met)
        row = self.replay(TARGET_CHUNKS, 1.5).summary_row()
        self.assertEqual(len(row), 5)
        self.assertEqual(row[3], "0.50 × limit")
        self.assertEqual(json.loads(json.dumps(self.replay(100, 0.1).to_dict()))["chunks"], 100)

    def test_store_bounded(self) -> None:
        run = 4 * (60.0 + 2 * PURGE_INTERVAL)
        flat = [(t, 1000 if t > 40 else 500) for t in range(0, int(run), 5)]
        self.assertTrue(_store(flat, run).met)
        growing = [(t, 100 * t) for t in range(0, int(run), 5)]
        self.assertFalse(_store(growing, run).met)
        self.assertIsNone(_store(flat[:5], 20.0).met)  # shorter than a retention window
        result = _store(flat, run)
        self.assertEqual(result.amplification, 5.0)
        self.assertEqual(result.peak, 1000)
        self.assertIn("write_bytes", result.detail_rst())

    def test_fleet(self) -> None:
        def fleet(finals: float | None, completed: int) -> FleetResult:
            return FleetResult(10, "true", 12, 2 << 20, 1 << 20, 1.0, 0.1, 0.1, 2.0, finals,
                               {"completed": completed}, 10 - completed, 1.0, 1.0)

        self.assertTrue(fleet(9.0, 10).met)
        self.assertFalse(fleet(9.5, 10).met)  # bound 4.25 + 5 s
        self.assertFalse(fleet(3.0, 9).met)
        self.assertFalse(fleet(None, 0).met)
        again = FleetResult.from_dict(json.loads(json.dumps(fleet(3.0, 10).to_dict())))
        self.assertEqual(again, fleet(3.0, 10))
        self.assertIn("9.25 s", fleet(3.0, 10).detail_rst())


class TaskBenchmarkSmokeTests(TestCase):
    """Each benchmark end to end with a real agent, tiny sizes."""

    timeout = 120

    def test_replay(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await measure_replay(chunks=30, timeout=30)
            self.assertEqual(result.unacked_before, 31)  # 30 chunks and the final
            self.assertEqual(result.unacked_after, 0)
            self.assertIsNotNone(result.seconds)
            self.assertIsNotNone(result.final_seconds)
            self.assertIsNone(result.met)
            self.assertIn("hello_ack", result.detail_rst())

        return defer.ensureDeferred(check())

    def test_store(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await measure_store(tasks=12, output_bytes=100, concurrency=2,
                                         timeout=60, wait_for_purge=False)
            self.assertGreaterEqual(len(result.samples), 1)
            self.assertEqual(result.peak_attempts <= 12, True)
            self.assertGreater(result.written_run, 0)
            self.assertGreater(result.files_after["db"], 0)
            self.assertIsNone(result.met)
            self.assertEqual(len(result.summary_row()), 5)

        return defer.ensureDeferred(check())

    def test_fleet(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await measure_fleet(agents=3, keys=1, settle=0.2, timeout=30,
                                         reconnect_min=0.2, profile=True)
            self.assertEqual(result.statuses, {"completed": 3})
            self.assertEqual(result.missing, 0)
            self.assertIsNotNone(result.finals_after)
            self.assertGreaterEqual(result.threads, 3)  # a store writer per agent
            self.assertIn("everything else", result.profile)
            self.assertGreater(sum(result.profile.values()), 0)
            self.assertIn("Where the fleet process", result.detail_rst())

        return defer.ensureDeferred(check())
