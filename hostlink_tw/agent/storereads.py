"""
The read side of the local task store: what the session asks of it.

:class:`Reads` is mixed into :class:`hostlink_tw.agent.store.Database`, so
these queries run on the store's one thread like its writes, and see every
write issued before them (PROTOCOL §8.7: one writer, calls in order).

* :meth:`Reads.snapshot`: the hello's reconnect snapshot (§7.1) — queued
  attempts, running attempts, unacked finals, unacked output merged into
  contiguous ranges per stream, the bytes the unacked messages hold.
* :meth:`Reads.unacked_page`: the outbox in insertion order (so each stream
  in sequence order), a page at a time by ``rowid`` — replay and the live
  sender read through it, so memory holds one page, never the spool.
* :meth:`Reads.unacked_stream`: one stream's unacked output above a sequence
  (the answer to an ``output_sequence_gap`` error, §7.5).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OutputRange",
    "QueuedAttempt",
    "Reads",
    "RunningAttempt",
    "StoreSnapshot",
    "StoredMessage",
    "message_from_row",
]

OUTPUT = "task.output"
FINAL = "task.final"


@dataclass(frozen=True)
class StoredMessage:
    """One outbox message, with the id and payload it keeps until acked."""

    message_id: str
    task_id: str
    attempt_id: str
    type: str
    stream: str | None
    sequence: int | None
    payload: dict[str, Any]
    byte_count: int
    created_at: float
    acked: bool
    #: ``payload`` as the store keeps it (compact JSON), when read from the store:
    #: the envelope writes it as is (:attr:`~hostlink_tw.wire.envelope.Envelope.payload_text`).
    payload_text: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class QueuedAttempt:
    """A received, not yet started attempt."""

    task_id: str
    attempt_id: str
    received_at: float
    command: str = ""
    channel: str = "session"


@dataclass(frozen=True)
class RunningAttempt:
    """An attempt recorded ``running``, with the process group it was given."""

    task_id: str
    attempt_id: str
    started_at: float
    pgid: int | None
    boot_id: str | None


@dataclass(frozen=True)
class OutputRange:
    """Contiguous unacked output sequences of one attempt and stream."""

    task_id: str
    attempt_id: str
    stream: str
    first_sequence: int
    last_sequence: int
    truncated_locally: bool


@dataclass(frozen=True)
class StoreSnapshot:
    """The store's part of the hello snapshot (§7.1)."""

    running: list[RunningAttempt]
    queued: list[QueuedAttempt]
    unacked_finals: list[StoredMessage]
    unacked_output: list[OutputRange]
    bytes_used: int


# Literal statements: no SQL is ever built from values.
SELECT_MESSAGE = (
    "SELECT message_id, task_id, attempt_id, type, stream, sequence, payload, byte_count,"
    " created_at, acked FROM outbox"
)
_SELECT_ROWID = (
    "SELECT message_id, task_id, attempt_id, type, stream, sequence, payload, byte_count,"
    " created_at, acked, rowid FROM outbox"
)


# The HTTP channel's attempts (§9.2) are none of the session's business: their
# messages are not sent on it nor listed in the hello.
_SESSION_MESSAGES = (
    " AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.task_id = outbox.task_id"
    " AND e.attempt_id = outbox.attempt_id AND e.channel = 'http')"
)


_SELECT_RANGES = (
    "SELECT task_id, attempt_id, stream, sequence,"
    " coalesce(json_extract(payload, '$.truncated_locally'), 0)"
    " FROM outbox WHERE acked = 0 AND type = ?"
)


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    """A :class:`StoredMessage` from a row of :data:`SELECT_MESSAGE`."""
    m, t, a, ty, s, q, p, b, c, k = row[:10]
    return StoredMessage(m, t, a, ty, s, q, json.loads(p), int(b), float(c), bool(k), p)


class Reads:
    """The queries; the class they are mixed into provides ``_exec``."""

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        raise NotImplementedError

    def queued_attempts(self) -> list[QueuedAttempt]:
        """Received, not started attempts, oldest first."""
        rows = self._exec(
            "SELECT task_id, attempt_id, received_at, command, channel FROM executions"
            " WHERE state = 'received' ORDER BY received_at, rowid"
        ).fetchall()
        return [QueuedAttempt(str(t), str(a), float(r), str(c or ""), str(ch))
                for t, a, r, c, ch in rows]

    def http_finals(self) -> list[StoredMessage]:
        """The unacked finals of ``http`` attempts whose report was not refused,
        oldest first: the reports still owed (§9.2)."""
        rows = self._exec(
            SELECT_MESSAGE + " WHERE acked = 0 AND type = ? AND EXISTS (SELECT 1 FROM"
            " executions e WHERE e.task_id = outbox.task_id AND e.attempt_id ="
            " outbox.attempt_id AND e.channel = 'http' AND e.report_error IS NULL)"
            " ORDER BY rowid",
            (FINAL,),
        ).fetchall()
        return [message_from_row(r) for r in rows]

    def message(self, message_id: str) -> StoredMessage | None:
        """One unacked or retained message by id."""
        row = self._exec(SELECT_MESSAGE + " WHERE message_id = ?", (message_id,)).fetchone()
        return None if row is None else message_from_row(row)

    def running_attempts(self) -> list[RunningAttempt]:
        """Attempts recorded ``running``, oldest start first."""
        rows = self._exec(
            "SELECT task_id, attempt_id, started_at, pgid, boot_id FROM executions"
            " WHERE state = 'running' ORDER BY started_at, rowid"
        ).fetchall()
        return [
            RunningAttempt(str(t), str(a), float(s or 0.0), None if p is None else int(p),
                           None if b is None else str(b))
            for t, a, s, p, b in rows
        ]

    def bytes_used(self) -> int:
        """The sum of the byte counts of every unacked message (§7.1)."""
        row = self._exec("SELECT coalesce(sum(byte_count), 0) FROM outbox WHERE acked = 0")
        return int(row.fetchone()[0])

    def outbox_totals(self) -> tuple[int, int]:
        """The number of unacked messages and the sum of their byte counts (one read)."""
        row = self._exec(
            "SELECT count(*), coalesce(sum(byte_count), 0) FROM outbox WHERE acked = 0"
        ).fetchone()
        return int(row[0]), int(row[1])

    def snapshot(self) -> StoreSnapshot:
        """Everything the hello reports from the store, in one read."""
        finals = [
            message_from_row(r)
            for r in self._exec(
                SELECT_MESSAGE + " WHERE acked = 0 AND type = ?" + _SESSION_MESSAGES
            + " ORDER BY rowid", (FINAL,)
            ).fetchall()
        ]
        rows = self._exec(
            _SELECT_RANGES + _SESSION_MESSAGES
            + " ORDER BY task_id, attempt_id, stream, sequence",
            (OUTPUT,),
        ).fetchall()
        ranges: list[OutputRange] = []
        for task, attempt, stream, seq, truncated in rows:
            last = ranges[-1] if ranges else None
            if (
                last is not None
                and (last.task_id, last.attempt_id, last.stream) == (task, attempt, stream)
                and last.last_sequence + 1 == seq
            ):
                ranges[-1] = OutputRange(
                    task, attempt, stream, last.first_sequence, int(seq),
                    last.truncated_locally or bool(truncated),
                )
            else:
                ranges.append(
                    OutputRange(task, attempt, stream, int(seq), int(seq), bool(truncated))
                )
        return StoreSnapshot(
            [r for r in self.running_attempts() if r.attempt_id and not self._is_http(r)],
            [q for q in self.queued_attempts() if q.channel != "http"],
            finals, ranges, self.bytes_used(),
        )

    def _is_http(self, attempt: RunningAttempt) -> bool:
        row = self._exec(
            "SELECT channel FROM executions WHERE task_id = ? AND attempt_id = ?",
            (attempt.task_id, attempt.attempt_id),
        ).fetchone()
        return row is not None and row[0] == "http"

    def unacked_page(self, after_rowid: int, limit: int) -> list[tuple[int, StoredMessage]]:
        """Up to ``limit`` unacked messages stored after ``after_rowid``, in order."""
        rows = self._exec(
            _SELECT_ROWID + " WHERE acked = 0 AND rowid > ?" + _SESSION_MESSAGES
            + " ORDER BY rowid LIMIT ?",
            (after_rowid, limit),
        ).fetchall()
        return [(int(r[10]), message_from_row(r)) for r in rows]

    def unacked_stream(
        self, task_id: str, attempt_id: str, stream: str, above: int, through_rowid: int,
        limit: int,
    ) -> list[tuple[int, StoredMessage]]:
        """Up to ``limit`` of one stream's unacked output with sequence > ``above``,
        stored by ``through_rowid``, in sequence order."""
        rows = self._exec(
            _SELECT_ROWID + " WHERE acked = 0 AND type = ? AND task_id = ? AND attempt_id = ?"
            " AND stream = ? AND sequence > ? AND rowid <= ?" + _SESSION_MESSAGES
            + " ORDER BY sequence LIMIT ?",
            (OUTPUT, task_id, attempt_id, stream, above, through_rowid, limit),
        ).fetchall()
        return [(int(r[10]), message_from_row(r)) for r in rows]
