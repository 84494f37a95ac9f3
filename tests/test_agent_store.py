"""The local task store (hostlink_tw.agent.store), on its real thread.

Each rule of PROTOCOL §7 and PROTOCOL §8 (docs/protocol.rst) that the store owns has a
test here; the crash test runs a child process that dies mid-transaction.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from hostlink_tw.agent.store import (
    SCHEMA_VERSION,
    Database,
    LocalState,
    StoreError,
    TaskStore,
    distinct_final_id,
    interrupted_message_id,
)

FINAL = {"status": "completed", "exit_code": 0, "output_truncated": False,
         "error_truncated": False}


def _chunk(data: str) -> dict[str, Any]:
    return {"stream": "stdout", "data": data, "byte_count": len(data.encode())}


class StoreTestCase(TestCase):
    """A fresh store in a private temporary directory, started and stopped."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.dir)
        self.path = os.path.join(self.dir, "task_store.db")

    def open(self, path: str | None = None) -> TaskStore:
        store = TaskStore(path or self.path)
        self.addCleanup(store.stop)
        return store


def _rmtree(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


class OpenTests(StoreTestCase):
    @inlineCallbacks
    def test_created_private_wal_full(self) -> Any:
        """A new file is mode 0600, in WAL mode, at the current schema version."""
        old = os.umask(0)
        try:
            store = self.open()
            yield store.start()
        finally:
            os.umask(old)
        yield store.record_received("t", "a", 1.0)
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600, name)
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(SCHEMA_VERSION, 2)

    @inlineCallbacks
    def test_synchronous_full(self) -> Any:
        """The store's own connection commits with synchronous=FULL (2)."""
        store = self.open()
        yield store.start()
        level = yield store._call(
            lambda: store._db._conn.execute("PRAGMA synchronous").fetchone()[0]  # type: ignore[union-attr]
        )
        self.assertEqual(level, 2)

    @inlineCallbacks
    def test_group_readable_refused(self) -> Any:
        """An existing file with group/other bits is refused, not repaired."""
        with open(self.path, "wb"):
            pass
        os.chmod(self.path, 0o640)
        store = self.open()
        err = yield self.assertFailure(store.start(), StoreError)
        self.assertIn(self.path, str(err))
        self.assertIn("group or others", str(err))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    @inlineCallbacks
    def test_future_version_refused(self) -> Any:
        """A file from a newer agent (user_version 3) is refused clearly."""
        store = self.open()
        yield store.start()
        yield store.stop()
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA user_version = 3")
        conn.close()
        err = yield self.assertFailure(self.open().start(), StoreError)
        self.assertIn(self.path, str(err))
        self.assertIn("schema version 3", str(err))

    @inlineCallbacks
    def test_migrates_version_1(self) -> Any:
        """A version-1 file (no process columns) is brought to version 2, rows kept."""
        from hostlink_tw.agent.store import _MIGRATIONS

        conn = sqlite3.connect(self.path, isolation_level=None)
        for sql in _MIGRATIONS[0]:
            conn.execute(sql)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO executions (task_id, attempt_id, state, received_at, started_at)"
            " VALUES ('t', 'a', 'running', 1.0, 2.0)"
        )
        conn.close()
        os.chmod(self.path, 0o600)
        store = self.open()
        yield store.start()
        running = yield store.running_attempts()
        self.assertEqual([(r.task_id, r.pgid, r.boot_id) for r in running], [("t", None, None)])
        yield store.set_process("t", "a", 4242, "boot-1")
        running = yield store.running_attempts()
        self.assertEqual([(r.pgid, r.boot_id) for r in running], [(4242, "boot-1")])
        yield store.stop()
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 2)

    @inlineCallbacks
    def test_reopen_keeps_data(self) -> Any:
        """Reopening a current file migrates nothing and keeps its rows."""
        store = self.open()
        yield store.start()
        yield store.record_received("t", "a", 1.0)
        yield store.stop()
        again = self.open()
        yield again.start()
        queued = yield again.queued_attempts()
        self.assertEqual([(q.task_id, q.attempt_id) for q in queued], [("t", "a")])

    @inlineCallbacks
    def test_corrupt_file(self) -> Any:
        """Garbage in the file: one StoreError naming it, on one line."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"this is not a database\n" * 400)
        os.close(fd)
        err = yield self.assertFailure(self.open().start(), StoreError)
        self.assertIn(self.path, str(err))
        self.assertNotIn("\n", str(err))

    @inlineCallbacks
    def test_damaged_payload(self) -> Any:
        """A stored payload that is not JSON is a StoreError, not a ValueError."""
        store = self.open()
        yield store.start()
        yield store.record_received("t", "a", 1.0)
        yield store.record_final("t", "a", "f", {"status": "completed"}, 2.0)
        conn = sqlite3.connect(self.path)
        conn.execute("UPDATE outbox SET payload = '{not json'")
        conn.commit()
        conn.close()
        err = yield self.assertFailure(store.unacked(), StoreError)
        self.assertIn(self.path, str(err))

    @inlineCallbacks
    def test_not_open(self) -> Any:
        """A call before start() (or after a failed one) is a StoreError."""
        store = TaskStore(self.path)
        store._pool.start()
        self.addCleanup(store._pool.stop)
        # With no open file every call fails, it never touches the disk.
        yield self.assertFailure(store.unacked(), StoreError)


class ReceiptTests(StoreTestCase):
    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        super().setUp()
        self.store = self.open()
        yield self.store.start()

    @inlineCallbacks
    def test_idempotent_receipt(self) -> Any:
        """A second receipt of a queued attempt queues it once, not twice."""
        first = yield self.store.record_received("t", "a", 1.0)
        second = yield self.store.record_received("t", "a", 2.0)
        self.assertEqual(first.state, LocalState.UNKNOWN)
        self.assertEqual(second.state, LocalState.RECEIVED)
        queued = yield self.store.queued_attempts()
        self.assertEqual([(q.task_id, q.attempt_id, q.received_at) for q in queued],
                         [("t", "a", 1.0)])

    @inlineCallbacks
    def test_states(self) -> Any:
        """§8.2: unknown, received, running, ended unacked, ended acked."""
        s = self.store
        self.assertEqual((yield s.record_received("t", "a", 1.0)).state, LocalState.UNKNOWN)
        self.assertEqual((yield s.record_received("t", "a", 1.0)).state, LocalState.RECEIVED)
        self.assertTrue((yield s.mark_running("t", "a", 2.0)))
        self.assertFalse((yield s.mark_running("t", "a", 2.0)))
        self.assertEqual((yield s.record_received("t", "a", 3.0)).state, LocalState.RUNNING)
        yield s.record_final("t", "a", "m-final", FINAL, 4.0)
        r = yield s.record_received("t", "a", 5.0)
        self.assertEqual(r.state, LocalState.ENDED)
        self.assertEqual((r.final.message_id, r.final.payload, r.final.acked),
                         ("m-final", FINAL, False))
        self.assertTrue((yield s.ack("m-final")))
        r = yield s.record_received("t", "a", 6.0)
        self.assertEqual((r.state, r.final.message_id, r.final.acked),
                         (LocalState.ENDED, "m-final", True))
        # A new attempt of the same task is a new, unknown attempt.
        self.assertEqual((yield s.record_received("t", "b", 7.0)).state, LocalState.UNKNOWN)

    @inlineCallbacks
    def test_queue_full(self) -> Any:
        """At the limit a new attempt is refused and not recorded; re-deliveries pass."""
        s = self.store
        yield s.record_received("t", "1", 1.0, queue_limit=2)
        yield s.record_received("t", "2", 2.0, queue_limit=2)
        full = yield s.record_received("t", "3", 3.0, queue_limit=2)
        self.assertEqual(full.state, LocalState.QUEUE_FULL)
        again = yield s.record_received("t", "1", 4.0, queue_limit=2)
        self.assertEqual(again.state, LocalState.RECEIVED)
        yield s.mark_running("t", "1", 5.0)  # running ones do not count
        self.assertEqual((yield s.record_received("t", "3", 6.0, queue_limit=2)).state,
                         LocalState.UNKNOWN)
        queued = yield s.queued_attempts()
        self.assertEqual([q.attempt_id for q in queued], ["2", "3"])

    @inlineCallbacks
    def test_final_and_state_one_transaction(self) -> Any:
        """A final that cannot be stored leaves the attempt running (rolled back)."""
        s = self.store
        yield s.record_received("t", "a", 1.0)
        yield s.mark_running("t", "a", 2.0)
        # An output already holds that id: the final's insert fails.
        yield s.enqueue_output("t", "a", "dup", "stdout", 1, _chunk("x"), 1, 3.0)
        yield self.assertFailure(s.record_final("t", "a", "dup", FINAL, 4.0), StoreError)
        self.assertEqual((yield s.record_received("t", "a", 5.0)).state, LocalState.RUNNING)
        yield s.record_final("t", "a", "f", FINAL, 6.0)
        # The first final stays: a second record returns it, id unchanged.
        other = yield s.record_final("t", "a", "g", {"status": "failed"}, 7.0)
        self.assertEqual(other.message_id, "f")
        self.assertEqual([m.message_id for m in (yield s.unacked())], ["dup", "f"])

    @inlineCallbacks
    def test_final_unknown_attempt(self) -> Any:
        yield self.assertFailure(self.store.record_final("t", "x", "f", FINAL, 1.0), StoreError)


class OutboxTests(StoreTestCase):
    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        super().setUp()
        self.store = self.open()
        yield self.store.start()
        yield self.store.record_received("t", "a", 1.0)
        yield self.store.mark_running("t", "a", 1.0)

    @inlineCallbacks
    def test_ack_by_id_and_bytes(self) -> Any:
        """Acked output is gone; bytes_used sums unacked byte counts."""
        s = self.store
        yield s.enqueue_output("t", "a", "o1", "stdout", 1, _chunk("héllo"), 6, 2.0)
        yield s.enqueue_output("t", "a", "o2", "stdout", 2, _chunk("ab"), 2, 2.0)
        self.assertEqual((yield s.bytes_used()), 8)
        self.assertTrue((yield s.ack("o1")))
        self.assertFalse((yield s.ack("o1")))
        self.assertEqual((yield s.bytes_used()), 2)
        final = yield s.record_final("t", "a", "f", FINAL, 3.0)
        self.assertEqual((yield s.bytes_used()), 2 + final.byte_count)
        self.assertGreater(final.byte_count, 0)
        unacked = yield s.unacked()
        self.assertEqual(unacked[0].payload, _chunk("ab"))

    def _hold_thread(self) -> tuple[threading.Event, list[str]]:
        """Block the store's thread until the event is set; count its COMMITs from now on."""
        commits: list[str] = []
        db: Any = self.store._db
        execute = db._exec

        def counting(sql: str, params: Any = ()) -> Any:
            if sql == "COMMIT":
                commits.append(sql)
            return execute(sql, params)

        db._exec = counting
        release = threading.Event()
        self.addCleanup(release.set)
        self.store._call(release.wait, 10)
        return release, commits

    @inlineCallbacks
    def test_output_enqueued_together_is_committed_together(self) -> Any:
        """Chunks enqueued while the thread is busy share one commit; any other
        call closes the group, so calls still run in the order they were made."""
        s = self.store
        release, commits = self._hold_thread()
        first = [s.enqueue_output("t", "a", f"o{n}", "stdout", n, _chunk("x"), 1, 2.0)
                 for n in (1, 2, 3)]
        acked = s.ack("o2")  # after o1-o3 are stored, before o4 and o5
        second = [s.enqueue_output("t", "a", f"o{n}", "stdout", n, _chunk("x"), 1, 2.0)
                  for n in (4, 5)]
        self.assertFalse(any(d.called for d in first + second))
        release.set()
        stored = yield gatherResults(first + second)
        self.assertTrue((yield acked))
        self.assertEqual([m.message_id for m in stored], ["o1", "o2", "o3", "o4", "o5"])
        self.assertEqual([m.sequence for m in stored], [1, 2, 3, 4, 5])
        self.assertEqual(len(commits), 3)  # o1-o3, the ack, o4-o5
        ids = [m.message_id for m in (yield s.unacked())]
        self.assertEqual(ids, ["o1", "o3", "o4", "o5"])

    @inlineCallbacks
    def test_acks_join_the_output_group_in_order(self) -> Any:
        """Acks (ack_messages) made while the thread is busy are committed with the
        chunks enqueued around them, in call order: one commit, not one per batch."""
        s = self.store
        yield s.enqueue_output("t", "a", "o1", "stdout", 1, _chunk("aaa"), 3, 2.0)
        yield s.enqueue_output("t", "a", "o2", "stdout", 2, _chunk("bb"), 2, 2.0)
        release, commits = self._hold_thread()
        third = s.enqueue_output("t", "a", "o3", "stdout", 3, _chunk("c"), 1, 2.0)
        freed = s.ack_messages([("o2", 2)])  # cumulative: o1 and o2, not o3
        fourth = s.enqueue_output("t", "a", "o4", "stdout", 4, _chunk("d"), 1, 2.0)
        again = s.ack_messages([("o3", None), ("o9", None)])  # o9: unknown, a no-op
        self.assertFalse(any(d.called for d in (third, freed, fourth, again)))
        release.set()
        stored = yield gatherResults([third, fourth])
        self.assertEqual([m.message_id for m in stored], ["o3", "o4"])
        self.assertEqual((yield freed), (2, 5))
        self.assertEqual((yield again), (1, 1))
        self.assertEqual(len(commits), 1)
        self.assertEqual([m.message_id for m in (yield s.unacked())], ["o4"])
        # Alone, an ack is its own transaction, as any other call.
        self.assertEqual((yield s.ack_messages([("o4", 4)])), (1, 1))
        self.assertEqual(len(commits), 2)
        self.assertEqual((yield s.unacked()), [])

    @inlineCallbacks
    def test_a_group_that_cannot_be_committed_fails_every_chunk(self) -> Any:
        s = self.store
        yield s.enqueue_output("t", "a", "o1", "stdout", 1, _chunk("x"), 1, 2.0)
        release, _ = self._hold_thread()
        group = [s.enqueue_output("t", "a", "o2", "stdout", 2, _chunk("x"), 1, 2.0),
                 s.enqueue_output("t", "a", "o1", "stdout", 3, _chunk("x"), 1, 2.0)]  # taken id
        release.set()
        for d in group:
            yield self.assertFailure(d, StoreError)
        self.assertEqual([m.message_id for m in (yield s.unacked())], ["o1"])
        # The store goes on: the next chunk is stored.
        yield s.enqueue_output("t", "a", "o2", "stdout", 2, _chunk("x"), 1, 2.0)
        self.assertEqual([m.message_id for m in (yield s.unacked())], ["o1", "o2"])

    @inlineCallbacks
    def test_output_after_stop_fails(self) -> Any:
        yield self.store.stop()
        yield self.assertFailure(
            self.store.enqueue_output("t", "a", "o1", "stdout", 1, _chunk("x"), 1, 2.0),
            StoreError,
        )

    @inlineCallbacks
    def test_ack_messages_counts_what_it_took_out(self) -> Any:
        """A batch of acks says how many messages and bytes left the unacked
        outbox: cumulative ranges, finals (marked, not deleted) and repeats
        counted once, whatever the batch's order."""
        s = self.store
        for n in range(1, 6):
            yield s.enqueue_output("t", "a", f"o{n}", "stdout", n, _chunk("x" * n), n, 2.0)
        final = yield s.record_final("t", "a", "f", FINAL, 3.0)
        taken = yield s.ack_messages(
            [("o1", 1), ("o2", 2), ("o3", 3), ("o3", 3), ("f", None), ("nope", 9)]
        )
        self.assertEqual(taken, (4, 1 + 2 + 3 + final.byte_count))
        self.assertEqual([m.message_id for m in (yield s.unacked())], ["o4", "o5"])
        self.assertEqual((yield s.ack_messages([("o4", None), ("f", None)])), (1, 4))
        self.assertEqual((yield s.outbox_totals()), (1, 5))

    @inlineCallbacks
    def test_cumulative_ack(self) -> Any:
        """ack_through acks that attempt's stream up to the sequence, nothing else."""
        s = self.store
        for n in range(1, 5):
            yield s.enqueue_output("t", "a", f"o{n}", "stdout", n, _chunk("x"), 1, 2.0)
            yield s.enqueue_output("t", "a", f"e{n}", "stderr", n, _chunk("x"), 1, 2.0)
        yield s.record_received("t", "b", 1.0)
        yield s.enqueue_output("t", "b", "b1", "stdout", 1, _chunk("x"), 1, 2.0)
        self.assertEqual((yield s.ack_through("t", "a", "stdout", 3)), 3)
        ids = [m.message_id for m in (yield s.unacked())]
        self.assertEqual(ids, ["e1", "e2", "e3", "o4", "e4", "b1"])

    @inlineCallbacks
    def test_unacked_order(self) -> Any:
        """Unacked messages come oldest first, each stream in sequence order."""
        s = self.store
        yield s.enqueue_output("t", "a", "o1", "stdout", 1, _chunk("1"), 1, 9.0)
        yield s.enqueue_output("t", "a", "e1", "stderr", 1, _chunk("1"), 1, 1.0)
        yield s.enqueue_output("t", "a", "o2", "stdout", 2, _chunk("2"), 1, 5.0)
        yield s.record_final("t", "a", "f", FINAL, 2.0)
        unacked = yield s.unacked()
        self.assertEqual([m.message_id for m in unacked], ["o1", "e1", "o2", "f"])
        self.assertEqual([m.sequence for m in unacked], [1, 1, 2, None])

    @inlineCallbacks
    def test_duplicate_sequence_refused(self) -> Any:
        """A stream's sequence is stored once: a second chunk 1 is an error."""
        s = self.store
        yield s.enqueue_output("t", "a", "o1", "stdout", 1, _chunk("1"), 1, 1.0)
        yield self.assertFailure(
            s.enqueue_output("t", "a", "o1b", "stdout", 1, _chunk("1"), 1, 1.0), StoreError
        )

    @inlineCallbacks
    def test_recover_exactly_once(self) -> Any:
        """Running -> ended with the §7.6 interrupted final, once; queued stays queued."""
        s = self.store
        yield s.record_received("x/y z", "p|q", 2.0)
        yield s.mark_running("x/y z", "p|q", 3.0)
        yield s.record_received("t", "queued", 4.0)
        first = yield s.recover(10.0)
        self.assertEqual([m.message_id for m in first],
                         ["local-interrupted-t-a", "local-interrupted-x-y-z-p-q"])
        self.assertEqual(interrupted_message_id("x/y z", "p|q"), "local-interrupted-x-y-z-p-q")
        self.assertEqual(first[0].payload, {"status": "interrupted", "exit_code": -1,
                                            "output_truncated": False,
                                            "error_truncated": False})
        self.assertEqual((yield s.recover(11.0)), [])
        finals = [m for m in (yield s.unacked()) if m.type == "task.final"]
        self.assertEqual(len(finals), 2)
        self.assertEqual([q.attempt_id for q in (yield s.queued_attempts())], ["queued"])
        self.assertEqual((yield s.record_received("t", "a", 12.0)).state, LocalState.ENDED)

    @inlineCallbacks
    def test_recover_attempts_whose_interrupted_ids_map_to_one(self) -> Any:
        """(``u-x``, ``b``) and (``u``, ``x-b``) share §7.6's interrupted id: each still
        gets its final (the second a distinct id of its own), and recovery
        succeeds -- it used to fail on the unique id, at every start."""
        s = self.store
        for task, attempt in (("u-x", "b"), ("u", "x-b")):
            yield s.record_received(task, attempt, 1.0)
            yield s.mark_running(task, attempt, 2.0)
        finals = [m for m in (yield s.recover(10.0)) if m.task_id.startswith("u")]
        self.assertEqual([(m.task_id, m.attempt_id) for m in finals],
                         [("u-x", "b"), ("u", "x-b")])
        first, second = (m.message_id for m in finals)
        self.assertEqual(first, "local-interrupted-u-x-b")
        self.assertEqual(second, distinct_final_id(first, finals[1].task_id,
                                                   finals[1].attempt_id))
        # Recorded again (a later shutdown's kill), each attempt keeps its own final.
        again = yield s.record_final("u", "x-b", first, finals[1].payload, 20.0)
        self.assertEqual(again.message_id, second)
        unacked = [m.message_id for m in (yield s.unacked()) if m.task_id.startswith("u")]
        self.assertEqual(unacked, [first, second])

    @inlineCallbacks
    def test_purge(self) -> Any:
        """Ended and acked past retention goes; unacked or recent stays."""
        s = self.store
        yield s.record_final("t", "a", "fa", FINAL, 100.0)
        yield s.ack("fa")
        yield s.record_received("t", "b", 1.0)
        yield s.record_final("t", "b", "fb", FINAL, 100.0)  # never acked
        yield s.record_received("t", "c", 1.0)
        yield s.record_final("t", "c", "fc", FINAL, 150.0)
        yield s.ack("fc")
        yield s.record_received("t", "q", 1.0)  # queued: never purged
        self.assertEqual((yield s.purge(now=160.0, retention=61.0)), 0)
        self.assertEqual((yield s.purge(now=160.0, retention=50.0)), 1)
        self.assertEqual((yield s.record_received("t", "a", 170.0)).state, LocalState.UNKNOWN)
        self.assertEqual((yield s.record_received("t", "b", 170.0)).state, LocalState.ENDED)
        self.assertEqual((yield s.record_received("t", "c", 170.0)).state, LocalState.ENDED)
        self.assertEqual([m.message_id for m in (yield s.unacked())], ["fb"])



class ClosedTests(StoreTestCase):
    @inlineCallbacks
    def test_a_call_after_stop_fails_instead_of_hanging(self) -> Any:
        store = self.open()
        yield store.start()
        yield store.stop()
        err = yield self.assertFailure(store.bytes_used(), StoreError)
        self.assertIn("closed", str(err))


class ReadTests(StoreTestCase):
    """The session's queries: snapshot, pages, one stream, discard."""

    @inlineCallbacks
    def filled(self) -> Any:
        s = self.open()
        yield s.start()
        yield s.record_received("q", "a", 5.0)  # queued, never started
        yield s.record_received("t", "a", 1.0)
        yield s.mark_running("t", "a", 2.0)
        for seq in (1, 2, 3, 4):
            payload = dict(_chunk("x" * seq), truncated_locally=True) if seq == 4 else _chunk(
                "x" * seq)
            yield s.enqueue_output("t", "a", f"o{seq}", "stdout", seq, payload, seq, 3.0)
        yield s.enqueue_output("t", "a", "e1", "stderr", 1, _chunk("e"), 1, 3.0)
        return s

    @inlineCallbacks
    def test_snapshot_merges_contiguous_ranges(self) -> Any:
        """Unacked output is one range per contiguous run; a hole splits it."""
        s = yield self.filled()
        yield s.ack("o2")
        snap = yield s.snapshot()
        ranges = [(r.stream, r.first_sequence, r.last_sequence, r.truncated_locally)
                  for r in snap.unacked_output]
        self.assertEqual(ranges, [("stderr", 1, 1, False), ("stdout", 1, 1, False),
                                  ("stdout", 3, 4, True)])
        self.assertEqual([(q.task_id, q.received_at) for q in snap.queued], [("q", 5.0)])
        self.assertEqual([(r.task_id, r.started_at) for r in snap.running], [("t", 2.0)])
        self.assertEqual(snap.bytes_used, 1 + 3 + 4 + 1)
        self.assertEqual(snap.unacked_finals, [])

    @inlineCallbacks
    def test_snapshot_lists_unacked_finals_only(self) -> Any:
        """An acked final is kept but no longer in the snapshot."""
        s = yield self.filled()
        yield s.record_final("t", "a", "f", FINAL, 4.0)
        snap = yield s.snapshot()
        self.assertEqual([m.message_id for m in snap.unacked_finals], ["f"])
        self.assertEqual((yield s.ack_finals(["f", "nope", "o1"])), 1)
        snap = yield s.snapshot()
        self.assertEqual(snap.unacked_finals, [])
        self.assertIn("o1", [m.message_id for m in (yield s.unacked())])

    @inlineCallbacks
    def test_pages_in_insertion_order(self) -> Any:
        """Pages follow rowid; a message stored later appears in a later page."""
        s = yield self.filled()
        first = yield s.unacked_page(0, 2)
        self.assertEqual([m.message_id for _, m in first], ["o1", "o2"])
        rest = yield s.unacked_page(first[-1][0], 100)
        self.assertEqual([m.message_id for _, m in rest], ["o3", "o4", "e1"])
        yield s.enqueue_output("t", "a", "o5", "stdout", 5, _chunk("z"), 1, 3.0)
        later = yield s.unacked_page(rest[-1][0], 100)
        self.assertEqual([m.message_id for _, m in later], ["o5"])

    @inlineCallbacks
    def test_page_cursor_never_skips_after_acks(self) -> Any:
        """A message stored after the newest ones were acked (deleted) is still after
        the cursor: SQLite reuses the largest rowid once its row is gone."""
        s = yield self.filled()
        page = yield s.unacked_page(0, 100)
        cursor = page[-1][0]
        yield s.ack_messages([("e1", 1), ("o4", 4)])
        yield s.enqueue_output("t", "a", "o5", "stdout", 5, _chunk("z"), 1, 3.0)
        yield s.record_final("t", "a", "f", FINAL, 4.0)
        later = yield s.unacked_page(cursor, 100)
        self.assertEqual([m.message_id for _, m in later], ["o5", "f"])
        # Reopened, the numbering goes on above every row kept.
        yield s.stop()
        s = self.open()
        yield s.start()
        page = yield s.unacked_page(0, 100)
        yield s.ack_messages([("f", None)])
        yield s.record_received("t", "b", 5.0)
        yield s.mark_running("t", "b", 5.0)
        yield s.enqueue_output("t", "b", "b1", "stdout", 1, _chunk("y"), 1, 6.0)
        later = yield s.unacked_page(page[-1][0], 100)
        self.assertEqual([m.message_id for _, m in later], ["b1"])

    @inlineCallbacks
    def test_unacked_stream_above_and_through(self) -> Any:
        """One stream above a sequence, bounded by rowid and limit, in sequence order."""
        s = yield self.filled()
        page = yield s.unacked_page(0, 100)
        through = page[2][0]  # o3
        got = yield s.unacked_stream("t", "a", "stdout", 1, through, 100)
        self.assertEqual([m.message_id for _, m in got], ["o2", "o3"])
        got = yield s.unacked_stream("t", "a", "stdout", 0, 10**9, 2)
        self.assertEqual([m.sequence for _, m in got], [1, 2])

    @inlineCallbacks
    def test_discard_forgets_everything(self) -> Any:
        """A discarded attempt leaves no row; delivered again it is unknown."""
        s = yield self.filled()
        self.assertEqual((yield s.discard("t", "a")), "running")
        self.assertEqual((yield s.discard("t", "a")), None)
        self.assertEqual([m.task_id for m in (yield s.unacked())], [])
        receipt = yield s.record_received("t", "a", 9.0)
        self.assertEqual(receipt.state, LocalState.UNKNOWN)

# The child writes attempts in a loop; before each statement it may die
# (os._exit, no cleanup) with probability 1/40.  After each commit returns it
# prints what is now durable.
_CHILD = textwrap.dedent("""
    import os, random, sys
    from hostlink_tw.agent.store import Database

    class Dying(Database):
        def _exec(self, sql, params=()):
            if random.random() < 1 / 15:
                os._exit(0)
            return super()._exec(sql, params)

    random.seed(int(sys.argv[2]))
    db = Dying(sys.argv[1])
    for n in range(10_000):
        t, a = f"task-{sys.argv[2]}-{n}", "a"
        db.record_received(t, a, n)
        db.mark_running(t, a, n)
        for seq in (1, 2, 3):
            db.enqueue_output(t, a, f"{t}-o{seq}", "stdout", seq,
                              {"data": "x" * 100}, 100, n)
            print("out", f"{t}-o{seq}", flush=True)
        db.record_final(t, a, f"{t}-f", {"status": "completed"}, n)
        print("final", t, flush=True)
""")


class CrashTests(StoreTestCase):
    def test_crash_mid_transaction(self) -> None:
        """os._exit mid-transaction, 20 times: an intact file, every committed row, no half row."""
        committed_out: set[str] = set()
        committed_final: set[str] = set()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        for run in range(20):
            seed = random.randrange(1_000_000) * 10 + run
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, self.path, str(seed)],
                capture_output=True, text=True, timeout=30, env=env, check=False,
            )
            self.assertEqual(child.returncode, 0, child.stderr)
            self.assertEqual(child.stderr, "")
            for line in child.stdout.splitlines():
                kind, name = line.split()
                (committed_out if kind == "out" else committed_final).add(name)
        db = Database(self.path)
        self.addCleanup(db.close)
        conn = db._conn
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        outbox = {m for (m,) in conn.execute("SELECT message_id FROM outbox")}
        self.assertLessEqual(committed_out, outbox)
        self.assertLessEqual({f"{t}-f" for t in committed_final}, outbox)
        # No half rows: ended <=> has its final, every output has its attempt,
        # every stored payload is whole.
        ended = set(conn.execute("SELECT task_id FROM executions WHERE state = 'ended'"))
        finals = set(conn.execute("SELECT task_id FROM outbox WHERE type = 'task.final'"))
        self.assertEqual(ended, finals)
        orphans = conn.execute(
            "SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM executions e"
            " WHERE e.task_id = o.task_id AND e.attempt_id = o.attempt_id)"
        ).fetchone()[0]
        self.assertEqual(orphans, 0)
        for (payload,) in conn.execute("SELECT payload FROM outbox WHERE type = 'task.output'"):
            self.assertEqual(payload, '{"data":"' + "x" * 100 + '"}')
        self.assertGreater(len(committed_out), 0)


class StoredTextTests(StoreTestCase):
    """A stored message goes out as the exact text it was stored as (docs/protocol.rst
    [wire]): the outbox writes the stored payload text instead of encoding again."""

    def test_envelope_from_the_stored_text_is_byte_for_byte_the_same(self) -> None:
        from hostlink_tw.agent.outbox import envelope_of
        from hostlink_tw.wire.envelope import make_envelope
        from hostlink_tw.wire.tasks import output_payload

        db = Database(self.path)
        self.addCleanup(db.close)
        db.record_received("t1", "a1", 1.0)
        db.mark_running("t1", "a1", 2.0)
        raw = [b"plain", "é ü 日本 \u2028 😀".encode(), b"\x00\x01\x1f\x7f \"\\ / \t\n",
               b"\xff\xfe bad \xc3", bytes(range(256))]
        chunks = [("t1", "a1", f"m{n}", "stdout", n, output_payload("stdout", data),
                   len(data), 3.0) for n, data in enumerate(raw, 1)]
        db.write_group([("output", chunk) for chunk in chunks])
        db.record_final("t1", "a1", "fin", {**FINAL, "output": "é\x00😀",
                                              "error": "\ufffd\u2029"}, 4.0)
        messages = db.unacked()
        self.assertEqual(len(messages), len(raw) + 1)
        for message in messages:
            self.assertIsNotNone(message.payload_text)
            sent = envelope_of(message, "agent-1", 5.0)
            encoded = make_envelope(
                message.type, "agent-1", message.payload, message_id=message.message_id,
                now=5.0, task_id=message.task_id, execution_attempt_id=message.attempt_id,
                sequence=message.sequence,
            )
            self.assertIsNone(encoded.payload_text)
            self.assertEqual(sent.to_json(), encoded.to_json())
            self.assertEqual(sent, encoded)
