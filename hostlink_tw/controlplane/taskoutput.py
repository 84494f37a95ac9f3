"""
The output agents stream, in the task file: per attempt and stream, the
chunks in sequence order and the highest sequence accepted
(:class:`OutputLog`).

Output beyond ``limit`` bytes per attempt and stream is not stored: the
chunk that crosses it is cut at a character boundary, nothing after it is
stored (so the stored text is always a prefix of the stream), and the task
is flagged (``output_truncated`` for stdout, ``error_truncated`` for
stderr); the sequence still advances, so the agent's chunks keep being acked.  A
chunk the agent marked ``truncated_locally`` flags the task too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from hostlink_tw.controlplane.taskdb import TaskDatabase, TaskStoreError, task_from_row
from hostlink_tw.controlplane.taskmodel import OutputChunk, TaskRecord, cut_utf8
from hostlink_tw.wire.payloads import STREAM_STDOUT

__all__ = ["OutputLog"]


class OutputLog:
    """The stored output of every attempt."""

    def __init__(self, db: TaskDatabase) -> None:
        self._db = db

    def highest(self, attempt_id: str, stream: str) -> int:
        """The highest output sequence accepted for the attempt's stream (0: none)."""
        rows = self._db.rows(
            "SELECT highest_sequence FROM streams WHERE attempt_id = ? AND stream = ?",
            (attempt_id, stream),
        )
        return int(rows[0][0]) if rows else 0

    def append(
        self, chunk: OutputChunk, limit: int, now: float
    ) -> tuple[OutputChunk | None, TaskRecord | None]:
        """
        Store the next chunk of a stream (its sequence must be the highest + 1),
        cut to what fits in ``limit`` bytes per attempt and stream.

        :returns: The chunk as stored (None when nothing of it fits), and the
            task if a truncation flag was newly set on it.
        """
        return self.append_many([chunk], limit, now)[0]

    def append_many(
        self, chunks: Sequence[OutputChunk], limit: int, now: float
    ) -> list[tuple[OutputChunk | None, TaskRecord | None]]:
        """
        :meth:`append` each chunk, in order, all in one transaction: every
        one of them is stored, or (:class:`TaskStoreError`) none is.

        :returns: What :meth:`append` returns, per chunk.
        """
        with self._db.transaction() as db:
            return [self._append(db, chunk, limit, now) for chunk in chunks]

    def _append(
        self, db: sqlite3.Connection, chunk: OutputChunk, limit: int, now: float
    ) -> tuple[OutputChunk | None, TaskRecord | None]:
        encoded = chunk.data.encode("utf-8")
        flagged: TaskRecord | None = None
        row = db.execute(
            "SELECT highest_sequence, stored_bytes, truncated FROM streams "
            "WHERE attempt_id = ? AND stream = ?",
            (chunk.execution_attempt_id, chunk.stream),
        ).fetchone()
        highest, stored, truncated = row if row is not None else (0, 0, 0)
        if chunk.sequence != highest + 1:
            raise TaskStoreError(
                f"task store {self._db.path}: sequence {chunk.sequence} "
                f"does not follow {highest}"
            )
        kept: OutputChunk | None = chunk
        room = max(limit - stored, 0)
        if truncated:  # cut once: what follows would leave a hole
            kept = None
        elif len(encoded) > room:
            kept = chunk.replace_data(cut_utf8(encoded, room)) if room else None
            truncated = 1
        if kept is not None:
            db.execute(
                "INSERT INTO output (attempt_id, stream, sequence, data, byte_count, "
                "truncated_locally, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kept.execution_attempt_id, kept.stream, kept.sequence, kept.data,
                 kept.byte_count, int(kept.truncated_locally), now),
            )
            stored += len(kept.data.encode("utf-8"))
        db.execute(
            "INSERT OR REPLACE INTO streams (attempt_id, stream, highest_sequence, "
            "stored_bytes, truncated) VALUES (?, ?, ?, ?, ?)",
            (chunk.execution_attempt_id, chunk.stream, chunk.sequence, stored, truncated),
        )
        if truncated or chunk.truncated_locally:
            flagged = self._flag(db, chunk.execution_attempt_id, chunk.stream, now)
        return kept, flagged

    def skip(self, attempt_id: str, stream: str, highest: int, now: float) -> None:
        """
        The agent no longer has sequences up to ``highest`` that were never
        stored here: move past them, flagging the output as truncated.
        """
        with self._db.transaction() as db:
            row = db.execute(
                "SELECT stored_bytes, truncated FROM streams WHERE attempt_id = ? AND stream = ?",
                (attempt_id, stream),
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO streams (attempt_id, stream, highest_sequence, "
                "stored_bytes, truncated) VALUES (?, ?, ?, ?, ?)",
                (attempt_id, stream, highest, *(row if row is not None else (0, 0))),
            )
            self._flag(db, attempt_id, stream, now)

    @staticmethod
    def _flag(
        db: sqlite3.Connection, attempt_id: str, stream: str, now: float
    ) -> TaskRecord | None:
        """Set the stream's truncation flag on the task whose current attempt this is."""
        cursor = db.execute(
            "UPDATE tasks SET updated_at = ?1, "
            "output_truncated = output_truncated OR ?2, error_truncated = error_truncated OR ?3 "
            "WHERE attempt_id = ?4 AND NOT (CASE WHEN ?2 THEN output_truncated "
            "ELSE error_truncated END)",
            (now, stream == STREAM_STDOUT, stream != STREAM_STDOUT, attempt_id),
        )
        if not cursor.rowcount:
            return None
        row = db.execute("SELECT * FROM task_view WHERE attempt_id = ?", (attempt_id,)).fetchone()
        return None if row is None else task_from_row(row)

    def text(self, attempt_id: str, stream: str) -> str:
        """The stored text of the attempt's stream."""
        rows = self._db.rows(
            "SELECT data FROM output WHERE attempt_id = ? AND stream = ? ORDER BY sequence",
            (attempt_id, stream),
        )
        return "".join(str(r[0]) for r in rows)

    def chunks(
        self, attempt_id: str, after: Mapping[str, int] | None = None
    ) -> list[OutputChunk]:
        """
        The attempt's stored chunks, each stream in sequence order, the streams
        interleaved as they arrived.

        :param after: Stream → sequence: only the chunks above it.
        """
        after = after or {}
        # In SQL, so a follower catching up reads only what it has not seen.
        rows = self._db.rows(
            "SELECT a.task_id, o.attempt_id, o.stream, o.sequence, o.data, o.byte_count, "
            "o.truncated_locally FROM output o JOIN attempts a USING (attempt_id) "
            "WHERE o.attempt_id = ? AND ((o.stream = 'stdout' AND o.sequence > ?) "
            "OR (o.stream = 'stderr' AND o.sequence > ?) "
            "OR o.stream NOT IN ('stdout', 'stderr')) ORDER BY o.rowid",
            (attempt_id, int(after.get("stdout", 0)), int(after.get("stderr", 0))),
        )
        return [OutputChunk(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]
