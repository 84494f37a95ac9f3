"""
The SQLite file of the reference control plane's tasks: opening it, its
schema, and the transaction every change runs in (:class:`TaskDatabase`).
:class:`~hostlink_tw.controlplane.taskstore.TaskStore` (tasks, attempts,
finals) and :class:`~hostlink_tw.controlplane.taskoutput.OutputLog` (output
chunks) read and write through it.

* Tables ``tasks`` (the current attempt, status, exit code, timings, the two
  truncation flags), ``attempts`` (one row per ``execution_attempt_id``: its
  state and how often it was delivered), ``streams`` (per attempt and
  stream: the highest accepted sequence, the bytes stored, whether the limit
  cut it), ``output``
  (the chunks) and ``finals`` (the first final of each attempt, under its
  message id); views ``task_view`` and ``attempt_view`` join what a record
  shows.  ``PRAGMA user_version`` is :data:`SCHEMA_VERSION`; a newer file is
  refused rather than misread.
* The file is its own (``tasks.db`` beside the agents file, or
  ``:memory:`` in process without one), not the replay window's
  ``controlplane.db``: that one is written from a thread of its own, and one
  writer per file keeps either from waiting on the other's lock.
* Created mode 0600 (task output may hold secrets); an existing file that
  group or others can read is refused, as the agent's store does.
* WAL journal, ``synchronous=NORMAL``: a commit reaches the operating system
  before it returns, which survives a control-plane restart or crash; only a
  power cut can lose the last transactions, and then the agent replays what
  it finds unacked.
* Calls are synchronous, on the reactor thread.  A reference control plane
  may: each call is a few small statements in one transaction with no
  fsync (NORMAL in WAL mode), and running them on the thread that reads the
  messages, in their order, is what keeps "stored, then acked" and the
  sequence bookkeeping simply ordered.  A production control plane would
  give them a writer thread, as
  :class:`~hostlink_tw.controlplane.replay.NonceStore` has.
* Every sqlite error becomes one :class:`TaskStoreError` naming the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hostlink_tw._files import private_file_problem
from hostlink_tw.controlplane.taskmodel import AttemptRecord, TaskRecord
from hostlink_tw.wire.payloads import TaskFinalPayload

__all__ = [
    "SCHEMA_VERSION",
    "TASKS_DATABASE_NAME",
    "TaskDatabase",
    "TaskStoreError",
    "attempt_from_row",
    "task_from_row",
    "tasks_database_beside",
]

#: The tasks' SQLite file, created beside the agents file.
TASKS_DATABASE_NAME = "tasks.db"


def tasks_database_beside(agents_file: str) -> str:
    """The tasks' database path for an agents file: same directory."""
    return os.path.join(os.path.dirname(os.path.abspath(agents_file)), TASKS_DATABASE_NAME)

#: The ``PRAGMA user_version`` this code writes and reads.
SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY NOT NULL,
        agent_id TEXT NOT NULL,
        command TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt_id TEXT NOT NULL,
        exit_code INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        output_truncated INTEGER NOT NULL DEFAULT 0,
        error_truncated INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX tasks_by_agent ON tasks (agent_id, status)",
    """CREATE TABLE attempts (
        attempt_id TEXT PRIMARY KEY NOT NULL,
        task_id TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX attempts_by_task ON attempts (task_id)",
    """CREATE TABLE streams (
        attempt_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        highest_sequence INTEGER NOT NULL,
        stored_bytes INTEGER NOT NULL,
        truncated INTEGER NOT NULL,
        PRIMARY KEY (attempt_id, stream)) WITHOUT ROWID""",
    """CREATE TABLE output (
        attempt_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        data TEXT NOT NULL,
        byte_count INTEGER NOT NULL,
        truncated_locally INTEGER NOT NULL,
        received_at REAL NOT NULL,
        UNIQUE (attempt_id, stream, sequence))""",
    """CREATE TABLE finals (
        message_id TEXT PRIMARY KEY NOT NULL,
        attempt_id TEXT NOT NULL UNIQUE,
        payload TEXT NOT NULL,
        received_at REAL NOT NULL)""",
    """CREATE VIEW task_view AS SELECT t.task_id, t.agent_id, t.command, t.status,
        t.attempt_id, t.exit_code, t.created_at, t.updated_at, t.started_at, t.ended_at,
        t.output_truncated, t.error_truncated, f.payload, t.rowid AS position
        FROM tasks t LEFT JOIN finals f ON f.attempt_id = t.attempt_id""",
    """CREATE VIEW attempt_view AS SELECT a.attempt_id, a.task_id, t.agent_id, a.state,
        a.created_at, a.updated_at, a.deliveries, a.attempt_id = t.attempt_id AS current,
        a.rowid AS position
        FROM attempts a JOIN tasks t USING (task_id)""",
)

class TaskStoreError(Exception):
    """The task store cannot be used; the message is one line naming the file."""


def task_from_row(row: Sequence[Any]) -> TaskRecord:
    """A :class:`TaskRecord` from a ``task_view`` row."""
    final = None if row[12] is None else TaskFinalPayload.from_dict(json.loads(row[12]))
    return TaskRecord(
        task_id=row[0], agent_id=row[1], command=row[2], status=row[3],
        execution_attempt_id=row[4], exit_code=row[5], created_at=row[6], updated_at=row[7],
        started_at=row[8], ended_at=row[9], output_truncated=bool(row[10]),
        error_truncated=bool(row[11]), final=final,
    )


def attempt_from_row(row: Sequence[Any]) -> AttemptRecord:
    """An :class:`AttemptRecord` from an ``attempt_view`` row."""
    return AttemptRecord(
        execution_attempt_id=row[0], task_id=row[1], agent_id=row[2], state=row[3],
        created_at=row[4], updated_at=row[5], deliveries=row[6], current=bool(row[7]),
    )


def _create_private(path: str) -> None:
    """Create ``path`` mode 0600, or check that the existing file is a private regular file."""
    problem = private_file_problem(path, "task store")
    if problem is not None:
        raise TaskStoreError(problem)


class TaskDatabase:
    """One SQLite connection to the task file, used from the reactor thread only."""

    def __init__(self, path: str = ":memory:") -> None:
        """
        :param path: The file, or ``":memory:"`` (gone with the process).
        :raises TaskStoreError: The file cannot be created, read or used.
        """
        self.path = path
        if path != ":memory:":
            _create_private(path)
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as e:
            raise TaskStoreError(f"task store {path} cannot be opened: {e}") from None
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise TaskStoreError(
                    f"task store {path} has schema version {version}, newer than this control "
                    f"plane's {SCHEMA_VERSION}; upgrade it or move the file away"
                )
            if version < SCHEMA_VERSION:
                with self.transaction() as db:
                    for sql in _SCHEMA:
                        db.execute(sql)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            self.close()
            raise TaskStoreError(f"task store {path} is unreadable or corrupt: {e}") from None
        except TaskStoreError:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (idempotent); later calls raise :class:`TaskStoreError`."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def connection(self) -> sqlite3.Connection:
        """The open connection.

        :raises TaskStoreError: It is closed.
        """
        if self._db is None:
            raise TaskStoreError(f"task store {self.path} is closed")
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none."""
        db = self.connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise TaskStoreError(f"task store {self.path} failed: {e}") from None

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one read statement."""
        try:
            return self.connection().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise TaskStoreError(f"task store {self.path} failed: {e}") from None
