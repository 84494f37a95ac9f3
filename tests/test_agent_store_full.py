"""
The task store and engine when the store's disk is full for a while, then
has room again: found by the chaos-with-tasks harness (``python -m
evidence.chaos_tasks --only disk``, issue 15 §1).

Before, a write that failed was logged and forgotten: the chunk's sequence
was used up and its bytes lost (PROTOCOL §8.4: nothing unacked is ever
dropped), the final was never recorded (the control plane showed the task
``running`` until the agent restarted, then ``interrupted`` although it
completed), and a queued attempt whose ``running`` could not be committed
was dropped by the runner until a restart.  Now a call that finds the disk
full waits for room on the store's thread (in order, bounded by
``full_patience``) instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from typing import Any

from twisted.internet.defer import inlineCallbacks

from hostlink_tw.agent.store import StoreFullError, TaskStore
from hostlink_tw.agent.tasks import TaskEngine

from .test_agent_tasks import TASK_OUTPUT, EngineTestCase, Result, Spec, deliver


def fail_next(store: TaskStore, name: str, times: int) -> list[int]:
    """The next ``times`` calls of the open database's ``name`` raise SQLite's disk-full error."""
    db: Any = store._db
    real = getattr(db, name)
    calls = [0]

    def failing(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args)

    setattr(db, name, failing)
    return calls


class StoreFullTests(EngineTestCase):
    """What waits for room is stored in order, exactly once; the wait is bounded."""

    @inlineCallbacks
    def engine(self, clock: Any = None, **settings: Any) -> Any:
        engine = yield super().engine(clock, **settings)
        engine.store.full_retry_interval = 0.01
        return engine

    def rows(self, kind: str) -> list[tuple[int | None, dict[str, Any]]]:
        with closing(sqlite3.connect(self.path)) as db:
            return [(seq, json.loads(payload)) for seq, payload in db.execute(
                "SELECT sequence, payload FROM outbox WHERE type = ? ORDER BY rowid", (kind,))]

    @inlineCallbacks
    def start_one(self, engine: TaskEngine) -> Any:
        engine.delivered(deliver("t", "a"), self.channel)
        yield self.settle(engine)
        spec = Spec("t", "a", "echo hi")
        self.assertTrue((yield engine.before_start(spec)))
        engine.started(spec, 0)
        return spec

    @inlineCallbacks
    def test_a_chunk_that_found_the_disk_full_is_stored_in_order(self) -> Any:
        engine = yield self.engine()
        spec = yield self.start_one(engine)
        calls = fail_next(engine.store, "write_group", times=3)
        for chunk in (b"one ", b"two ", b"three"):
            engine.output(spec, "stdout", chunk, False)
        yield self.settle(engine)
        # The first write waited through three failures; the chunks are
        # committed in one group or more (the store's group commit).
        self.assertIn(calls[0], (4, 5, 6))
        stored = self.rows("task.output")
        self.assertEqual([s for s, _ in stored], [1, 2, 3])
        self.assertEqual("".join(p["data"] for _, p in stored), "one two three")

    @inlineCallbacks
    def test_a_final_that_found_the_disk_full_is_recorded_once(self) -> Any:
        engine = yield self.engine()
        fail_next(engine.store, "record_final", times=2)
        yield self.run_one(engine, "t", "a", [b"x"], Result(status="failed", exit_code=3))
        finals = self.rows("task.final")
        self.assertEqual([(p["status"], p["exit_code"]) for _, p in finals], [("failed", 3)])

    @inlineCallbacks
    def test_an_attempt_starts_once_there_is_room(self) -> Any:
        engine = yield self.engine()
        fail_next(engine.store, "mark_running", times=2)
        engine.delivered(deliver("t", "a"), self.channel)
        yield self.settle(engine)
        self.assertTrue((yield engine.before_start(Spec("t", "a", "echo hi"))))

    @inlineCallbacks
    def test_the_wait_for_room_is_bounded(self) -> Any:
        engine = yield self.engine()
        engine.store.full_patience = 0.05
        fail_next(engine.store, "mark_running", times=10**6)
        engine.delivered(deliver("t", "a"), self.channel)
        yield self.settle(engine)
        started = yield engine.before_start(Spec("t", "a", "echo hi"))
        self.assertFalse(started)  # refused as before, once the patience ran out
        self.flushLoggedErrors(StoreFullError)

    @inlineCallbacks
    def test_stopping_ends_the_wait(self) -> Any:
        engine = yield self.engine()
        engine.store.full_patience = 3600.0
        fail_next(engine.store, "mark_running", times=10**6)
        waiting = engine.store.mark_running("t", "a", 0.0)
        yield engine.store.stop()
        yield self.assertFailure(waiting, StoreFullError)


class LongFullDiskTests(EngineTestCase):
    """A full disk that outlasts the patience (found by review)."""

    @inlineCallbacks
    def test_lost_chunks_do_not_keep_output_paused(self) -> Any:
        """Chunks that could not be stored leave the spool's count; output resumes once acked."""
        engine = yield self.engine(spool_cap_bytes=200_000, terminal_reserve_bytes=50_000,
                                   flush_threshold=16384)
        store = engine.store
        store.full_retry_interval = 0.01
        store.full_patience = 0.05
        session = self.session(engine)
        engine.delivered(deliver("t", "a"), self.channel)
        yield self.settle(engine)
        spec = Spec("t", "a", "echo hi")
        self.assertTrue((yield engine.before_start(spec)))
        engine.started(spec, 0)
        fail_next(store, "write_group", times=10**6)
        for _ in range(5):
            engine.output(spec, "stdout", b"x" * 14_000, False)
        yield self.settle(engine)
        self.flushLoggedErrors()
        db: Any = store._db
        del db.write_group  # room again: the class's own method
        for _ in range(4):
            engine.output(spec, "stdout", b"y" * 12_500, False)
        yield self.settle(engine)
        last = [e for e in self.wire if e.type == TASK_OUTPUT][-1]
        self.ack(session, last.message_id, TASK_OUTPUT, highest=last.sequence)
        yield self.settle(engine)
        self.assertEqual((yield store.outbox_totals()), (0, 0))
        self.assertEqual((engine.spool.bytes, engine.spool.messages), (0, 0))
        self.assertFalse(self.runner.paused)

    @inlineCallbacks
    def test_shutdown_does_not_wait_for_room(self) -> Any:
        """engine.close() ends the wait: queued writes fail at once instead of each waiting."""
        engine = yield self.engine()
        engine.store.full_patience = 30.0
        engine.store.full_retry_interval = 0.02
        engine.delivered(deliver("t", "a"), self.channel)
        yield self.settle(engine)
        fail_next(engine.store, "record_received", times=10**6)
        for n in range(3):
            engine.delivered(deliver("t", f"b{n}"), self.channel)
        started = time.monotonic()
        yield engine.close()
        self.flushLoggedErrors()
        self.assertLess(time.monotonic() - started, 5.0)

    @inlineCallbacks
    def test_patience_is_per_episode(self) -> Any:
        """Once one call gave up, the calls queued behind it fail at once too."""
        engine = yield self.engine()
        store = engine.store
        store.full_patience = 0.3
        store.full_retry_interval = 0.02
        fail_next(store, "record_received", times=10**6)
        first = store.record_received("t", "x", 0.0)
        second = store.record_received("t", "y", 0.0)
        yield self.assertFailure(first, StoreFullError)
        started = time.monotonic()
        yield self.assertFailure(second, StoreFullError)
        self.assertLess(time.monotonic() - started, 0.2)
        self.flushLoggedErrors()
