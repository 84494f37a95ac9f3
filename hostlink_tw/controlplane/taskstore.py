"""
The reference control plane's task store: tasks, their execution attempts
and the finals agents sent (:class:`TaskStore`), with their output
(:attr:`TaskStore.output`, an :class:`~hostlink_tw.controlplane.taskoutput.OutputLog`),
in the task file (:mod:`~hostlink_tw.controlplane.taskdb`: one SQLite file,
WAL, synchronous calls on the reactor thread and why).

Changes only ever move an attempt or a task forward
(:func:`~hostlink_tw.controlplane.taskmodel.advances`): a late
``task.received`` after the final, or a final after a cancel, change nothing
but the attempt's own state.  A final is stored in the same transaction that
ends its attempt.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from hostlink_tw.controlplane.taskdb import (
    TaskDatabase,
    TaskStoreError,
    attempt_from_row,
    task_from_row,
)
from hostlink_tw.controlplane.taskmodel import (
    ATTEMPT_DELIVERED,
    ATTEMPT_DISCARDED,
    ATTEMPT_ENDED,
    ATTEMPT_PENDING,
    LIVE_ATTEMPT_STATES,
    STATUS_CANCELLED,
    STATUS_DELIVERED,
    STATUS_PENDING,
    UNFINISHED_STATUSES,
    AttemptRecord,
    TaskRecord,
    advances,
    attempt_advances,
)
from hostlink_tw.controlplane.taskoutput import OutputLog
from hostlink_tw.wire.payloads import TaskFinalPayload

__all__ = ["TaskStore", "TaskStoreError"]

# Sets of statuses travel as one JSON array parameter (json_each), so every
# statement is a literal.
_UNFINISHED = json.dumps(sorted(UNFINISHED_STATUSES))
_LIVE = json.dumps(sorted(LIVE_ATTEMPT_STATES))


class TaskStore:
    """The tasks of one control plane, on one SQLite connection used from the reactor thread."""

    def __init__(self, path: str = ":memory:") -> None:
        """
        :param path: The file, or ``":memory:"`` (gone with the process).
        :raises TaskStoreError: The file cannot be created, read or used.
        """
        self._db = TaskDatabase(path)
        #: The file (or ``":memory:"``).
        self.path = path
        #: The output chunks.
        self.output = OutputLog(self._db)

    def close(self) -> None:
        """Close the file (idempotent); later calls raise :class:`TaskStoreError`."""
        self._db.close()

    # -- tasks ---------------------------------------------------------------------

    def add_task(
        self, task_id: str, agent_id: str, command: str, attempt_id: str, now: float
    ) -> TaskRecord:
        """Record a new pending task with its first attempt."""
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO tasks (task_id, agent_id, command, status, attempt_id, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (task_id, agent_id, command, STATUS_PENDING, attempt_id, now, now),
            )
            db.execute(
                "INSERT INTO attempts (attempt_id, task_id, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (attempt_id, task_id, ATTEMPT_PENDING, now, now),
            )
        return self._must_task(task_id)

    def task(self, task_id: str) -> TaskRecord | None:
        """The task, or None."""
        rows = self._db.rows("SELECT * FROM task_view WHERE task_id = ?", (task_id,))
        return task_from_row(rows[0]) if rows else None

    def _must_task(self, task_id: str) -> TaskRecord:
        record = self.task(task_id)
        if record is None:
            raise TaskStoreError(f"task store {self._db.path}: task {task_id!r} vanished")
        return record

    def tasks(self, agent_id: str | None = None, *, unfinished: bool = False) -> list[TaskRecord]:
        """Tasks (of one agent, if given; only unfinished ones, if asked), oldest first."""
        rows = self._db.rows(
            "SELECT * FROM task_view WHERE (?1 IS NULL OR agent_id = ?1) "
            "AND (?2 IS NULL OR status IN (SELECT value FROM json_each(?2))) ORDER BY position",
            (agent_id, _UNFINISHED if unfinished else None),
        )
        return [task_from_row(r) for r in rows]

    def count_unfinished(self, agent_id: str) -> int:
        """How many of the agent's tasks are pending, delivered, received or running."""
        rows = self._db.rows(
            "SELECT COUNT(*) FROM tasks WHERE agent_id = ? "
            "AND status IN (SELECT value FROM json_each(?))",
            (agent_id, _UNFINISHED),
        )
        return int(rows[0][0])

    def cancel(self, task_id: str, now: float) -> TaskRecord | None:
        """Mark an unfinished task cancelled (a finished one stays as it is); None if unknown."""
        with self._db.transaction() as db:
            db.execute(
                "UPDATE tasks SET status = ?, updated_at = ?, ended_at = ? WHERE task_id = ? "
                "AND status IN (SELECT value FROM json_each(?))",
                (STATUS_CANCELLED, now, now, task_id, _UNFINISHED),
            )
        return self.task(task_id)

    def replace_attempt(self, task_id: str, attempt_id: str, now: float) -> TaskRecord:
        """Make ``attempt_id`` the task's current attempt: pending, no result, no flags."""
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO attempts (attempt_id, task_id, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (attempt_id, task_id, ATTEMPT_PENDING, now, now),
            )
            db.execute(
                "UPDATE tasks SET attempt_id = ?, status = ?, exit_code = NULL, updated_at = ?, "
                "started_at = NULL, ended_at = NULL, output_truncated = 0, error_truncated = 0 "
                "WHERE task_id = ?",
                (attempt_id, STATUS_PENDING, now, task_id),
            )
        return self._must_task(task_id)

    # -- attempts ----------------------------------------------------------------------

    def attempt(self, attempt_id: str) -> AttemptRecord | None:
        """The attempt, or None."""
        rows = self._db.rows("SELECT * FROM attempt_view WHERE attempt_id = ?", (attempt_id,))
        return attempt_from_row(rows[0]) if rows else None

    def attempts(self, task_id: str) -> list[AttemptRecord]:
        """The task's attempts, oldest first."""
        rows = self._db.rows(
            "SELECT * FROM attempt_view WHERE task_id = ? ORDER BY position", (task_id,)
        )
        return [attempt_from_row(r) for r in rows]

    def live_attempts(self, agent_id: str) -> list[AttemptRecord]:
        """The agent's attempts that were delivered and have not ended, oldest first."""
        rows = self._db.rows(
            "SELECT * FROM attempt_view WHERE agent_id = ? "
            "AND state IN (SELECT value FROM json_each(?)) ORDER BY position",
            (agent_id, _LIVE),
        )
        return [attempt_from_row(r) for r in rows]

    def advance(
        self,
        attempt_id: str,
        state: str,
        now: float,
        *,
        status: str | None = None,
        started_at: float | None = None,
    ) -> TaskRecord | None:
        """
        Move the attempt forward to ``state`` (never back), and its task with it
        (to ``status``, by default the same word) when it is the task's
        current attempt and the task is unfinished.

        :returns: The task if its status changed, else None.
        """
        with self._db.transaction() as db:
            changed = self._advance(db, attempt_id, state, now, status or state, started_at)
        return None if changed is None else self._must_task(changed)

    @staticmethod
    def _advance(
        db: sqlite3.Connection,
        attempt_id: str,
        state: str,
        now: float,
        status: str,
        started_at: float | None = None,
        final: TaskFinalPayload | None = None,
    ) -> str | None:
        """:meth:`advance` inside the caller's transaction; the changed task's id, or None."""
        row = db.execute(
            "SELECT state, task_id, current FROM attempt_view WHERE attempt_id = ?",
            (attempt_id,),
        ).fetchone()
        if row is None:
            return None
        old_state, task_id, current = row
        if attempt_advances(old_state, state):
            db.execute(
                "UPDATE attempts SET state = ?, updated_at = ? WHERE attempt_id = ?",
                (state, now, attempt_id),
            )
        (old_status,) = db.execute(
            "SELECT status FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
        if not (current and advances(old_status, status)):
            return None
        db.execute(
            "UPDATE tasks SET status = ?, updated_at = ?, "
            "started_at = COALESCE(started_at, ?), exit_code = ?, ended_at = ? "
            "WHERE task_id = ?",
            (status, now, started_at, None if final is None else final.exit_code,
             None if final is None else now, task_id),
        )
        return str(task_id)

    def delivered(self, attempt_id: str, now: float) -> TaskRecord | None:
        """Count one delivery of the attempt (pending becomes delivered)."""
        with self._db.transaction() as db:
            db.execute(
                "UPDATE attempts SET deliveries = deliveries + 1 WHERE attempt_id = ?",
                (attempt_id,),
            )
            changed = self._advance(db, attempt_id, ATTEMPT_DELIVERED, now, STATUS_DELIVERED)
        return None if changed is None else self._must_task(changed)

    def undelivered(self, attempt_id: str, now: float) -> TaskRecord | None:
        """
        The agent refused the delivery (its queue was full, ...) and recorded
        nothing: a delivered attempt is pending again, and so is its task.
        """
        with self._db.transaction() as db:
            cursor = db.execute(
                "UPDATE attempts SET state = ?, updated_at = ? WHERE attempt_id = ? AND state = ?",
                (ATTEMPT_PENDING, now, attempt_id, ATTEMPT_DELIVERED),
            )
            if cursor.rowcount:
                db.execute(
                    "UPDATE tasks SET status = ?, updated_at = ? WHERE attempt_id = ? "
                    "AND status = ?",
                    (STATUS_PENDING, now, attempt_id, STATUS_DELIVERED),
                )
        record = self.attempt(attempt_id)
        return None if record is None else self.task(record.task_id)

    def discard(self, attempt_ids: Sequence[str], now: float) -> None:
        """Mark attempts discarded: the agent was told to drop them (or never had them)."""
        with self._db.transaction() as db:
            db.executemany(
                "UPDATE attempts SET state = ?, updated_at = ? WHERE attempt_id = ?",
                [(ATTEMPT_DISCARDED, now, a) for a in attempt_ids],
            )

    # -- finals ----------------------------------------------------------------------

    def final_ids(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these final message ids are stored."""
        rows = self._db.rows(
            "SELECT message_id FROM finals WHERE message_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(message_ids)),),
        )
        return {str(r[0]) for r in rows}

    def has_final(self, attempt_id: str) -> bool:
        """Whether a final of the attempt is stored."""
        return bool(self._db.rows("SELECT 1 FROM finals WHERE attempt_id = ?", (attempt_id,)))

    def record_final(
        self, message_id: str, attempt_id: str, final: TaskFinalPayload, now: float
    ) -> tuple[bool, TaskRecord | None]:
        """
        Store the attempt's final (only its first: another id for the same
        attempt is not stored again) and end the attempt; the task takes its
        status and exit code when this is its current attempt and it is
        unfinished.

        :returns: Whether it was stored, and the task if its status changed.
        """
        with self._db.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO finals (message_id, attempt_id, payload, received_at) "
                "VALUES (?, ?, ?, ?)",
                (message_id, attempt_id, json.dumps(final.to_dict()), now),
            )
            if not cursor.rowcount:
                return False, None
            # One transaction: a final is never stored without ending its attempt.
            changed = self._advance(
                db, attempt_id, ATTEMPT_ENDED, now, final.status, final=final
            )
        return True, None if changed is None else self._must_task(changed)
