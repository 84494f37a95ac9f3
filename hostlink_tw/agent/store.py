"""The agent's local task store: executions and the outbox, in one SQLite file.

The contract is PROTOCOL §7 and PROTOCOL §8 in docs/protocol.rst (message
ids; receipt, final, the local store, restart).  The task engine
(:mod:`hostlink_tw.agent.tasks`) is its one user; the read side is in
:mod:`hostlink_tw.agent.storereads`.

* One file, created mode 0600 (an existing file readable by group or others is
  a clear error, as the identity files are: nothing is repaired silently), WAL
  journal, ``synchronous=FULL`` so a commit that returned survives a crash.
* Every call runs on one dedicated thread and returns a Deferred: the reactor
  thread never waits for an fsync.  We use a ``ThreadPool(1, 1)`` with
  ``deferToThreadPool`` rather than ``adbapi.ConnectionPool``: the one
  connection is created, migrated and closed on that thread (so sqlite3's
  ``check_same_thread`` stays on), transactions are our explicit
  ``BEGIN IMMEDIATE``/``COMMIT`` (adbapi wraps each interaction in its own
  commit logic and reconnect policy and starts itself from a reactor startup
  trigger), and ``start()``/``stop()`` are plain calls the service makes.
  One thread also means one writer, with calls serialized in order.
* The schema is versioned with ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`);
  :func:`migrate` brings an older file up to date, and a file from a newer
  agent is refused rather than misread.
* Any sqlite error (corrupt file, unreadable file, disk full) becomes one
  :class:`StoreError` whose message names the file -- never a traceback.
  A full disk is waited out first: the call retries on the store's thread
  for up to :data:`FULL_PATIENCE` (calls behind it wait their turn, so
  nothing is reordered or dropped), logging once when it starts waiting and
  once when there is room again; only then does it fail (:class:`StoreFullError`).

Output messages are deleted when acked.  A final is only marked acked: it is
kept with its ended attempt for the retention time, so a re-delivery can be
answered with the same final and the same message id (§8.2), then
:meth:`TaskStore.purge` deletes both.  Nothing unacked is ever purged,
except an HTTP report the control plane refused (§9.2: kept for inspection, never retried).
"""

from __future__ import annotations

import enum
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hostlink_tw._files import private_file_problem
from hostlink_tw.agent.storebatch import GroupCommit
from hostlink_tw.agent.storereads import (
    SELECT_MESSAGE,
    OutputRange,
    QueuedAttempt,
    Reads,
    RunningAttempt,
    StoredMessage,
    StoreSnapshot,
    message_from_row,
)
from hostlink_tw.wire.tasks import interrupted_final_message_id

__all__ = [
    "SCHEMA_VERSION",
    "LocalState",
    "OutputRange",
    "QueuedAttempt",
    "Receipt",
    "RunningAttempt",
    "StoreError",
    "StoreFullError",
    "StoreSnapshot",
    "StoredMessage",
    "TaskStore",
    "distinct_final_id",
    "interrupted_message_id",
    "migrate",
]

SCHEMA_VERSION = 2
"""The ``PRAGMA user_version`` this code writes and reads."""

_log = Logger()

FINAL = "task.final"
OUTPUT = "task.output"

# The kinds of write a group commit holds (TaskStore: output chunks and acks).
_GROUP_OUTPUT = "output"
_GROUP_ACKS = "acks"

_T = TypeVar("_T")

# Version 0 is a new, empty file; each step takes the schema one version up.
_MIGRATIONS: dict[int, Sequence[str]] = {
    0: (
        """CREATE TABLE executions (
            task_id TEXT NOT NULL,
            attempt_id TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('received', 'running', 'ended')),
            received_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            PRIMARY KEY (task_id, attempt_id))""",
        """CREATE TABLE outbox (
            message_id TEXT PRIMARY KEY NOT NULL,
            task_id TEXT NOT NULL,
            attempt_id TEXT NOT NULL,
            type TEXT NOT NULL CHECK (type IN ('task.output', 'task.final')),
            stream TEXT,
            sequence INTEGER,
            payload TEXT NOT NULL,
            byte_count INTEGER NOT NULL,
            created_at REAL NOT NULL,
            acked INTEGER NOT NULL DEFAULT 0,
            UNIQUE (task_id, attempt_id, type, stream, sequence))""",
        "CREATE INDEX outbox_unacked ON outbox (acked)",
    ),
    # 2: the process group of a running attempt (and the boot it was started
    # in), so a restarted agent can kill what a crash left running (§8.8).
    1: (
        "ALTER TABLE executions ADD COLUMN pgid INTEGER",
        "ALTER TABLE executions ADD COLUMN boot_id TEXT",
        # The command, so a received attempt survives a restart and runs after it (§8.2).
        "ALTER TABLE executions ADD COLUMN command TEXT",
        # Where the attempt's result goes (§9.2): 'session' (the outbox) or
        # 'http' (the report); and why the control plane refused its report
        # (kept for inspection, not retried).
        "ALTER TABLE executions ADD COLUMN channel TEXT NOT NULL DEFAULT 'session'"
        " CHECK (channel IN ('session', 'http'))",
        "ALTER TABLE executions ADD COLUMN report_error TEXT",
    ),
}


class StoreError(Exception):
    """The store cannot be used; the message is one line naming the file."""


class StoreFullError(StoreError):
    """A write found no room (SQLITE_FULL: the disk or the file system is full)."""


#: How long one store call waits for room on a full disk before it fails.
FULL_PATIENCE = 60.0
#: How often it tries again meanwhile.
FULL_RETRY_INTERVAL = 0.5


def _is_full(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code == getattr(sqlite3, "SQLITE_FULL", 13) or "disk is full" in str(error)


def _store_error(path: str, error: sqlite3.Error) -> StoreError:
    kind = StoreFullError if _is_full(error) else StoreError
    return kind(f"task store {path} failed: {error}")


class LocalState(enum.Enum):
    """An attempt's local state before a delivery (§8.2's first column)."""

    UNKNOWN = "unknown"
    RECEIVED = "received"
    RUNNING = "running"
    ENDED = "ended"
    QUEUE_FULL = "queue_full"
    """Unknown and the queue is full: nothing was recorded."""


@dataclass(frozen=True)
class Receipt:
    """What :meth:`TaskStore.record_received` found, so the caller can answer.

    ``state`` is the state *before* this delivery: UNKNOWN means it is now
    recorded and queued; ENDED comes with the stored ``final`` (acked or not).
    """

    state: LocalState
    final: StoredMessage | None = None


def interrupted_message_id(task_id: str, attempt_id: str) -> str:
    """The §7.6 id of an attempt's ``interrupted`` final; for a polled task
    without an attempt id (its final never travels on the session, §9.2) a
    local id of the same deterministic kind."""
    if not attempt_id:
        return f"http-interrupted-{task_id}"
    return interrupted_final_message_id(task_id, attempt_id)


def distinct_final_id(message_id: str, task_id: str, attempt_id: str) -> str:
    """The id an attempt's final gets when another attempt's final has ``message_id``.

    §7.6's ``interrupted`` id maps ``/``, space and ``|`` to ``-`` and joins
    task and attempt with ``-``, so (``t-x``, ``a``) and (``t``, ``x-a``) get
    the same one.  The second final takes this id instead -- still a function
    of the attempt alone (a digest of its raw ids) -- rather than fail the
    outbox's unique id and be lost (and a control plane that de-duplicates by
    message id would drop it too).
    """
    raw = f"{task_id}\0{attempt_id}".encode("utf-8", "surrogatepass")
    return f"{message_id}-{hashlib.sha256(raw).hexdigest()[:16]}"


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the schema of ``conn`` up to :data:`SCHEMA_VERSION`, atomically."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"task store {path} has schema version {version}, newer than this "
            f"agent's {SCHEMA_VERSION}; upgrade the agent or move the file away"
        )
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in _MIGRATIONS[version]:
                conn.execute(sql)
            version += 1
            # PRAGMA takes no parameters; version is our own int.
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _open_file(path: str) -> None:
    """Create ``path`` mode 0600, or check that the existing file is private."""
    problem = private_file_problem(path, "task store")
    if problem is not None:
        raise StoreError(problem)


class Database(Reads):
    """The synchronous store on one connection; use it from one thread only.

    :class:`TaskStore` runs it on its own thread; tests and the crash test's
    child process use it directly.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        _open_file(path)
        try:
            # Autocommit mode: every transaction is our explicit BEGIN/COMMIT.
            self._conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"task store {path} cannot be opened: {e}") from None
        try:
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"task store {path} cannot use WAL (journal mode {mode})")
            self._conn.execute("PRAGMA synchronous = FULL")
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"task store {path} is corrupt: {check}")
            migrate(self._conn, path)
            # The outbox's rowids only ever go up (the sender's cursor relies on
            # it): SQLite alone would give a new row the rowid of an acked,
            # deleted newest row again, behind a cursor that passed it.
            self._last_rowid = int(
                self._conn.execute("SELECT coalesce(max(rowid), 0) FROM outbox").fetchone()[0]
            )
        except sqlite3.Error as e:
            self._conn.close()
            raise StoreError(f"task store {path} is unreadable or corrupt: {e}") from None
        except StoreError:
            self._conn.close()
            raise

    def close(self) -> None:
        """Close the connection (a checkpoint folds the WAL back in)."""
        self._conn.close()

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        # Every statement passes here: the crash test's child overrides it.
        return self._conn.execute(sql, params)

    def _tx(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in one write transaction: all of it commits, or none."""
        try:
            self._exec("BEGIN IMMEDIATE")
            try:
                result = fn()
                self._exec("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise _store_error(self.path, e) from None
        return result

    def _insert_message(self, values: tuple[Any, ...]) -> None:
        """Insert one outbox row (:data:`_INSERT`'s values) above every rowid used so far."""
        rowid = self._last_rowid + 1
        self._exec(_INSERT, (*values, rowid))
        # A rolled-back insert leaves a gap, which is harmless; a reused rowid is not.
        self._last_rowid = rowid

    def _state(self, task_id: str, attempt_id: str) -> str | None:
        row = self._exec(
            "SELECT state FROM executions WHERE task_id = ? AND attempt_id = ?",
            (task_id, attempt_id),
        ).fetchone()
        return None if row is None else str(row[0])

    def _final(self, task_id: str, attempt_id: str) -> StoredMessage | None:
        row = self._exec(
            SELECT_MESSAGE + " WHERE task_id = ? AND attempt_id = ? AND type = ?",
            (task_id, attempt_id, FINAL),
        ).fetchone()
        return None if row is None else message_from_row(row)

    def record_received(
        self, task_id: str, attempt_id: str, now: float, queue_limit: int | None = None,
        command: str | None = None, channel: str = "session",
    ) -> Receipt:
        """Commit the receipt of an attempt (idempotent); see :class:`Receipt`.

        ``channel`` (``session`` or ``http``) is where its result will go
        (§9.2); a known attempt keeps the channel it was first recorded with.
        """

        def go() -> Receipt:
            state = self._state(task_id, attempt_id)
            if state is None:
                if queue_limit is not None:
                    queued = self._exec(
                        "SELECT count(*) FROM executions WHERE state = 'received'"
                    ).fetchone()[0]
                    if queued >= queue_limit:
                        return Receipt(LocalState.QUEUE_FULL)
                self._exec(
                    "INSERT INTO executions (task_id, attempt_id, state, received_at, command,"
                    " channel) VALUES (?, ?, 'received', ?, ?, ?)",
                    (task_id, attempt_id, now, command, channel),
                )
                return Receipt(LocalState.UNKNOWN)
            if state == "ended":
                return Receipt(LocalState.ENDED, self._final(task_id, attempt_id))
            return Receipt(LocalState(state))

        return self._tx(go)

    def mark_running(self, task_id: str, attempt_id: str, now: float) -> bool:
        """Commit received -> running; False when the attempt is not queued."""
        return self._tx(
            lambda: self._exec(
                "UPDATE executions SET state = 'running', started_at = ?"
                " WHERE task_id = ? AND attempt_id = ? AND state = 'received'",
                (now, task_id, attempt_id),
            ).rowcount
            == 1
        )

    def _insert_final(
        self, task_id: str, attempt_id: str, message_id: str, payload: dict[str, Any], now: float
    ) -> StoredMessage:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        count = len(text.encode("utf-8"))
        taken = self._exec(
            "SELECT task_id, attempt_id FROM outbox WHERE message_id = ?", (message_id,)
        ).fetchone()
        if taken is not None and tuple(taken) != (task_id, attempt_id):
            message_id = distinct_final_id(message_id, task_id, attempt_id)
        self._exec(
            "UPDATE executions SET state = 'ended', ended_at = ?"
            " WHERE task_id = ? AND attempt_id = ?",
            (now, task_id, attempt_id),
        )
        self._insert_message(
            (message_id, task_id, attempt_id, FINAL, None, None, text, count, now)
        )
        return StoredMessage(
            message_id, task_id, attempt_id, FINAL, None, None, payload, count, now, False
        )

    def record_final(
        self, task_id: str, attempt_id: str, message_id: str, payload: dict[str, Any], now: float
    ) -> StoredMessage:
        """Commit the attempt's end and its final in one transaction.

        An attempt that already ended keeps its first final, which is returned;
        an unknown attempt is a :class:`StoreError`.
        """

        def go() -> StoredMessage:
            state = self._state(task_id, attempt_id)
            if state is None:
                raise StoreError(
                    f"task store {self.path}: no attempt {task_id}/{attempt_id} to end"
                )
            existing = self._final(task_id, attempt_id)
            if state == "ended" and existing is not None:
                return existing
            return self._insert_final(task_id, attempt_id, message_id, payload, now)

        return self._tx(go)

    def enqueue_output(
        self,
        task_id: str,
        attempt_id: str,
        message_id: str,
        stream: str,
        sequence: int,
        payload: dict[str, Any],
        byte_count: int,
        now: float,
    ) -> StoredMessage:
        """Store one output chunk; call in sequence order per stream."""
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        self._tx(
            lambda: self._insert_message(
                (message_id, task_id, attempt_id, OUTPUT, stream, sequence, text,
                 byte_count, now)
            )
        )
        return StoredMessage(
            message_id, task_id, attempt_id, OUTPUT, stream, sequence, payload, byte_count,
            now, False,
        )

    def write_group(self, items: Sequence[tuple[str, Any]]) -> list[Any]:
        """
        Several writes in one transaction, in order: each item is
        ``("output", arguments of enqueue_output)`` or ``("acks", acks of
        ack_messages)``; one result per item (the StoredMessage; the messages
        and bytes the acks took out).
        """
        texts = [json.dumps(args[5], ensure_ascii=False, separators=(",", ":"))
                 if kind == _GROUP_OUTPUT else "" for kind, args in items]

        def go() -> list[Any]:
            results: list[Any] = []
            for (kind, args), text in zip(items, texts, strict=True):
                if kind == _GROUP_OUTPUT:
                    task_id, attempt_id, message_id, stream, sequence, payload, size, now = args
                    self._insert_message((message_id, task_id, attempt_id, OUTPUT, stream,
                                          sequence, text, size, now))
                    results.append(StoredMessage(message_id, task_id, attempt_id, OUTPUT,
                                                 stream, sequence, payload, size, now, False))
                else:
                    results.append(self._apply_acks(args))
            return results

        return self._tx(go)

    def ack(self, message_id: str) -> bool:
        """Ack one message: output is deleted, a final is kept (marked acked)."""

        def go() -> bool:
            n = self._exec(
                "DELETE FROM outbox WHERE message_id = ? AND type = ?", (message_id, OUTPUT)
            ).rowcount
            n += self._exec(
                "UPDATE outbox SET acked = 1 WHERE message_id = ? AND acked = 0",
                (message_id,),
            ).rowcount
            return n > 0

        return self._tx(go)

    def ack_messages(self, acks: Sequence[tuple[str, int | None]]) -> tuple[int, int]:
        """Apply ``ack`` messages (§7.5) in one transaction; how many messages
        they took out of the unacked outbox, and those messages' bytes.

        Each ``(message_id, highest_output_sequence)``: the message is acked
        (output deleted, a final marked); when it is an output and a highest
        sequence is given, every output of the same attempt and stream up to
        that sequence is acked too.  Unknown or already acked ids are no-ops.
        Acks are applied newest first: a batch of cumulative acks of one
        stream is then one range delete and a lookup per older ack (the set
        acked is the same in any order).
        """
        return self._tx(lambda: self._apply_acks(acks))

    def _apply_acks(self, acks: Sequence[tuple[str, int | None]]) -> tuple[int, int]:
        """:meth:`ack_messages` inside the caller's transaction."""
        messages = size = 0
        for message_id, highest in reversed(acks):
            count, freed = self._ack_one(message_id, highest)
            messages += count
            size += freed
        return messages, size

    def _ack_one(
        self, message_id: str, highest_output_sequence: int | None
    ) -> tuple[int, int]:
        row = self._exec(
            "SELECT task_id, attempt_id, type, stream FROM outbox"
            " WHERE message_id = ? AND acked = 0",
            (message_id,),
        ).fetchone()
        if row is None:
            return 0, 0
        task_id, attempt_id, kind, stream = row
        count, freed = 1, 0
        if kind == OUTPUT and highest_output_sequence is not None:
            below = self._exec(
                "SELECT count(*), coalesce(sum(byte_count), 0) FROM outbox WHERE type = ?"
                " AND task_id = ? AND attempt_id = ? AND stream = ? AND sequence <= ?"
                " AND message_id != ?",
                (OUTPUT, task_id, attempt_id, stream, highest_output_sequence, message_id),
            ).fetchone()
            count += int(below[0])
            freed += int(below[1])
            self._exec(
                "DELETE FROM outbox WHERE type = ? AND task_id = ? AND attempt_id = ?"
                " AND stream = ? AND sequence <= ? AND message_id != ?",
                (OUTPUT, task_id, attempt_id, stream, highest_output_sequence, message_id),
            )
        freed += int(self._exec(
            "SELECT byte_count FROM outbox WHERE message_id = ?", (message_id,)
        ).fetchone()[0])
        if kind == OUTPUT:
            self._exec("DELETE FROM outbox WHERE message_id = ?", (message_id,))
        else:
            self._exec("UPDATE outbox SET acked = 1 WHERE message_id = ?", (message_id,))
        return count, freed

    def ack_through(self, task_id: str, attempt_id: str, stream: str, sequence: int) -> int:
        """Ack every output of that attempt and stream up to ``sequence``; the count."""
        return self._tx(
            lambda: self._exec(
                "DELETE FROM outbox WHERE type = ? AND task_id = ? AND attempt_id = ?"
                " AND stream = ? AND sequence <= ?",
                (OUTPUT, task_id, attempt_id, stream, sequence),
            ).rowcount
        )

    def unacked(self) -> list[StoredMessage]:
        """Every unacked message, oldest first (so each stream in sequence order)."""
        rows = self._exec(
            SELECT_MESSAGE + " WHERE acked = 0 ORDER BY rowid"
        ).fetchall()
        return [message_from_row(r) for r in rows]

    def set_process(self, task_id: str, attempt_id: str, pgid: int, boot_id: str | None) -> None:
        """Record the process group of a running attempt (for §8.8's restart kill)."""
        self._tx(
            lambda: self._exec(
                "UPDATE executions SET pgid = ?, boot_id = ?"
                " WHERE task_id = ? AND attempt_id = ? AND state = 'running'",
                (pgid, boot_id, task_id, attempt_id),
            )
        )

    def discard(self, task_id: str, attempt_id: str) -> str | None:
        """Forget an attempt the control plane discarded (§7.2): its state row,
        its unacked output and its final.  Returns the state it had."""

        def go() -> str | None:
            state = self._state(task_id, attempt_id)
            key = (task_id, attempt_id)
            self._exec("DELETE FROM outbox WHERE task_id = ? AND attempt_id = ?", key)
            self._exec("DELETE FROM executions WHERE task_id = ? AND attempt_id = ?", key)
            return state

        return self._tx(go)

    def ack_finals(self, message_ids: Sequence[str]) -> int:
        """Mark the listed finals acked (a hello_ack's list); the count."""

        def go() -> int:
            return sum(
                self._exec(
                    "UPDATE outbox SET acked = 1 WHERE message_id = ? AND type = ?"
                    " AND acked = 0",
                    (m, FINAL),
                ).rowcount
                for m in message_ids
            )

        return self._tx(go)

    def report_refused(self, task_id: str, attempt_id: str, error: str) -> None:
        """Record that the control plane refused the attempt's HTTP report (not retried)."""
        self._tx(
            lambda: self._exec(
                "UPDATE executions SET report_error = ? WHERE task_id = ? AND attempt_id = ?",
                (error, task_id, attempt_id),
            )
        )

    def recover(self, now: float) -> list[StoredMessage]:
        """End every ``running`` attempt with its §7.6 ``interrupted`` final."""

        def go() -> list[StoredMessage]:
            running = self._exec(
                "SELECT task_id, attempt_id FROM executions WHERE state = 'running'"
                " ORDER BY started_at, rowid"
            ).fetchall()
            return [
                self._insert_final(
                    t, a, interrupted_message_id(t, a), _interrupted_payload(), now
                )
                for t, a in running
            ]

        return self._tx(go)

    def purge(self, now: float, retention: float) -> int:
        """Delete attempts ended at or before ``now - retention`` with nothing unacked."""
        cutoff = now - retention

        def go() -> int:
            old = self._exec(
                "SELECT task_id, attempt_id FROM executions e WHERE state = 'ended'"
                " AND ended_at <= ? AND (NOT EXISTS (SELECT 1 FROM outbox o"
                " WHERE o.task_id = e.task_id AND o.attempt_id = e.attempt_id"
                " AND o.acked = 0)"
                # A refused HTTP report is kept for inspection for the
                # retention time, like an acked final: it is never retried.
                " OR report_error IS NOT NULL)",
                (cutoff,),
            ).fetchall()
            for key in old:
                self._exec("DELETE FROM outbox WHERE task_id = ? AND attempt_id = ?", key)
                self._exec("DELETE FROM executions WHERE task_id = ? AND attempt_id = ?", key)
            return len(old)

        return self._tx(go)


# Literal statements: no SQL is ever built from values.
_INSERT = (
    "INSERT INTO outbox (message_id, task_id, attempt_id, type, stream, sequence, payload,"
    " byte_count, created_at, acked, rowid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
)


def _interrupted_payload() -> dict[str, Any]:
    # §8.8: no output (the process is gone); the stored output, if any, was
    # already sent or is still in the outbox.
    return {
        "status": "interrupted",
        "exit_code": -1,
        "output_truncated": False,
        "error_truncated": False,
    }


class TaskStore:
    """:class:`Database` on its own thread: every method returns a Deferred.

    Call :meth:`start` before anything else and :meth:`stop` at shutdown.
    Errors arrive as a :class:`StoreError` failure.

    Output chunks and acks are committed in groups (:mod:`~hostlink_tw.agent.storebatch`):
    those enqueued while the thread is busy share one transaction, and any
    other call closes the group, so calls still run in the order they were made.
    """

    def __init__(self, path: str, reactor: IReactorFromThreads | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = cast(IReactorFromThreads, _reactor)
        self.path = path
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, name="hostlink-task-store")
        self._db: Database | None = None
        self._running = False
        #: A full disk: how long a call waits for room, and how often it retries.
        self.full_patience = FULL_PATIENCE
        self.full_retry_interval = FULL_RETRY_INTERVAL
        self._full_since: float | None = None
        self._waiting_for_room = True
        self._outputs: GroupCommit[tuple[str, Any], Any] = GroupCommit(
            self._call, self._write_group
        )

    def _call(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def _use(self, name: str, *args: Any) -> Deferred[Any]:
        # Output enqueued after this call must not be committed before it.
        self._outputs.close()
        if not self._running:
            # A stopped ThreadPool silently drops work: fail instead of never firing.
            return fail(StoreError(f"task store {self.path} is closed"))
        return self._call(self._patiently, name, *args)

    def _on_db(self, name: str, *args: Any) -> Any:
        """On the store's thread: one :class:`Database` call, its errors as StoreError."""
        if self._db is None:
            raise StoreError(f"task store {self.path} is not open")
        try:
            return getattr(self._db, name)(*args)
        except sqlite3.Error as e:
            raise _store_error(self.path, e) from None
        except ValueError as e:
            # A stored payload that is no longer JSON (a damaged file).
            raise StoreError(f"task store {self.path} failed: {e}") from None

    def _patiently(self, name: str, *args: Any) -> Any:
        """On the store's thread: :meth:`_on_db`, waiting for room on a full disk.

        A full disk is usually a passing state (a log rotated, a cleanup):
        wait for room here, on the store's one thread, so that this write and
        every later one keep their order and nothing is dropped; the calls
        queued behind it wait too (task output pauses once the spool's count
        of issued bytes reaches its cap).  Bounded: after ``full_patience``
        the call fails as any other store error does.
        """
        while True:
            try:
                result = self._on_db(name, *args)
            except StoreFullError as e:
                # The patience is per episode of a full disk, not per call: once
                # one call gave up, those queued behind it fail at once too.
                since = self._full_since if self._full_since is not None else time.monotonic()
                if (not self._running or not self._waiting_for_room
                        or time.monotonic() >= since + self.full_patience):
                    raise
                if self._full_since is None:
                    self._full_since = time.monotonic()
                    self._reactor.callFromThread(
                        _log.error, "task store full, waiting for room: {error}",
                        error=str(e))
                time.sleep(self.full_retry_interval)
                continue
            if self._full_since is not None:
                waited, self._full_since = time.monotonic() - self._full_since, None
                self._reactor.callFromThread(
                    _log.info, "task store has room again after {seconds:.1f}s: {path}",
                    seconds=waited, path=self.path)
            return result

    def stop_waiting_for_room(self) -> None:
        """From now on a write that finds the disk full fails at once (shutdown)."""
        self._waiting_for_room = False

    def start(self) -> Deferred[None]:
        """Start the thread and open (create, migrate) the file on it."""
        self._pool.start()
        self._running = True

        def open_() -> None:
            self._db = Database(self.path)

        return self._call(open_)

    def stop(self) -> Deferred[None]:
        """Close the file on its thread, then stop the thread; idempotent."""
        if not self._running:
            return succeed(None)
        self._running = False

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        d = self._call(close)

        def stop_pool(result: object) -> object:
            self._pool.stop()
            return result

        return d.addBoth(stop_pool)

    def record_received(
        self, task_id: str, attempt_id: str, now: float, queue_limit: int | None = None,
        command: str | None = None, channel: str = "session",
    ) -> Deferred[Receipt]:
        """See :meth:`Database.record_received`."""
        return self._use("record_received", task_id, attempt_id, now, queue_limit, command,
                         channel)

    def report_refused(self, task_id: str, attempt_id: str, error: str) -> Deferred[None]:
        """See :meth:`Database.report_refused`."""
        return self._use("report_refused", task_id, attempt_id, error)

    def http_finals(self) -> Deferred[list[StoredMessage]]:
        """See :meth:`Reads.http_finals`."""
        return self._use("http_finals")

    def mark_running(self, task_id: str, attempt_id: str, now: float) -> Deferred[bool]:
        """See :meth:`Database.mark_running`."""
        return self._use("mark_running", task_id, attempt_id, now)

    def record_final(
        self, task_id: str, attempt_id: str, message_id: str, payload: dict[str, Any], now: float
    ) -> Deferred[StoredMessage]:
        """See :meth:`Database.record_final`."""
        return self._use("record_final", task_id, attempt_id, message_id, payload, now)

    def enqueue_output(self, *args: Any) -> Deferred[StoredMessage]:
        """See :meth:`Database.enqueue_output` (same arguments); committed in
        a group with the chunks enqueued just before and after it."""
        if not self._running:
            return fail(StoreError(f"task store {self.path} is closed"))
        return self._outputs.add((_GROUP_OUTPUT, args))

    def _write_group(self, items: list[tuple[str, Any]]) -> list[Any]:
        """On the store's thread: one group (chunks, acks), one transaction
        (waiting for room on a full disk, as every other write does)."""
        return cast("list[Any]", self._patiently("write_group", items))

    def ack(self, message_id: str) -> Deferred[bool]:
        """See :meth:`Database.ack`."""
        return self._use("ack", message_id)

    def ack_messages(self, acks: Sequence[tuple[str, int | None]]) -> Deferred[tuple[int, int]]:
        """See :meth:`Database.ack_messages`; committed in a group with the
        output chunks enqueued just before and after (while output streams, an
        ack costs no commit of its own), in the order of the calls."""
        if not self._running:
            return fail(StoreError(f"task store {self.path} is closed"))
        return self._outputs.add((_GROUP_ACKS, list(acks)))

    def message(self, message_id: str) -> Deferred[StoredMessage | None]:
        """See :meth:`Reads.message`."""
        return self._use("message", message_id)

    def ack_through(
        self, task_id: str, attempt_id: str, stream: str, sequence: int
    ) -> Deferred[int]:
        """See :meth:`Database.ack_through`."""
        return self._use("ack_through", task_id, attempt_id, stream, sequence)

    def unacked(self) -> Deferred[list[StoredMessage]]:
        """See :meth:`Database.unacked`."""
        return self._use("unacked")

    def queued_attempts(self) -> Deferred[list[QueuedAttempt]]:
        """See :meth:`Reads.queued_attempts`."""
        return self._use("queued_attempts")

    def running_attempts(self) -> Deferred[list[RunningAttempt]]:
        """See :meth:`Reads.running_attempts`."""
        return self._use("running_attempts")

    def snapshot(self) -> Deferred[StoreSnapshot]:
        """See :meth:`Reads.snapshot`."""
        return self._use("snapshot")

    def unacked_page(
        self, after_rowid: int, limit: int
    ) -> Deferred[list[tuple[int, StoredMessage]]]:
        """See :meth:`Reads.unacked_page`."""
        return self._use("unacked_page", after_rowid, limit)

    def unacked_stream(
        self, task_id: str, attempt_id: str, stream: str, above: int, through_rowid: int,
        limit: int,
    ) -> Deferred[list[tuple[int, StoredMessage]]]:
        """See :meth:`Reads.unacked_stream`."""
        return self._use(
            "unacked_stream", task_id, attempt_id, stream, above, through_rowid, limit
        )

    def set_process(
        self, task_id: str, attempt_id: str, pgid: int, boot_id: str | None
    ) -> Deferred[None]:
        """See :meth:`Database.set_process`."""
        return self._use("set_process", task_id, attempt_id, pgid, boot_id)

    def discard(self, task_id: str, attempt_id: str) -> Deferred[str | None]:
        """See :meth:`Database.discard`."""
        return self._use("discard", task_id, attempt_id)

    def ack_finals(self, message_ids: Sequence[str]) -> Deferred[int]:
        """See :meth:`Database.ack_finals`."""
        return self._use("ack_finals", list(message_ids))

    def recover(self, now: float) -> Deferred[list[StoredMessage]]:
        """See :meth:`Database.recover`."""
        return self._use("recover", now)

    def purge(self, now: float, retention: float) -> Deferred[int]:
        """See :meth:`Database.purge`."""
        return self._use("purge", now, retention)

    def bytes_used(self) -> Deferred[int]:
        """See :meth:`Reads.bytes_used`."""
        return self._use("bytes_used")

    def outbox_totals(self) -> Deferred[tuple[int, int]]:
        """See :meth:`Reads.outbox_totals`."""
        return self._use("outbox_totals")
