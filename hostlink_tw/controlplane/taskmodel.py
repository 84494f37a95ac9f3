"""
What the reference control plane knows about a task, as plain values: the
statuses and attempt states, the records the task API returns
(:class:`TaskRecord`, :class:`AttemptRecord`, :class:`OutputChunk`), the
refusals (:class:`TaskRefusedError`, :class:`UnknownTaskError`), and the
rules that only ever move a task forward (:func:`advances`).

A task's *status*:

==============  ==============================================================
``pending``     waiting to be delivered (no session with delivery, or queued)
``delivered``   ``task.deliver`` sent for its current attempt, not yet answered
``received``    the agent recorded the attempt (``task.received``)
``running``     the agent started it (``task.started``)
``completed``   a ``task.final`` with that status (also ``failed``, ``interrupted``)
``cancelled``   cancelled by the operator before it finished
==============  ==============================================================

An *attempt* (one ``execution_attempt_id``) is ``pending``, ``delivered``,
``received``, ``running``, ``ended`` (its final is stored) or ``discarded``
(the agent was told to drop it, or never had it, when it was superseded or
its task cancelled).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hostlink_tw.wire.envelope import format_sent_at
from hostlink_tw.wire.payloads import (
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    TaskFinalPayload,
)

__all__ = [
    "ATTEMPT_DELIVERED",
    "ATTEMPT_DISCARDED",
    "ATTEMPT_ENDED",
    "ATTEMPT_PENDING",
    "ATTEMPT_RECEIVED",
    "ATTEMPT_RUNNING",
    "FINISHED_STATUSES",
    "LIVE_ATTEMPT_STATES",
    "STATUS_CANCELLED",
    "STATUS_COMPLETED",
    "STATUS_DELIVERED",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STATUS_PENDING",
    "STATUS_RECEIVED",
    "STATUS_RUNNING",
    "TASK_STATUSES",
    "UNFINISHED_STATUSES",
    "AttemptRecord",
    "OutputChunk",
    "TaskRecord",
    "TaskRefusedError",
    "UnknownTaskError",
    "advances",
    "attempt_advances",
    "cut_utf8",
]

STATUS_PENDING = "pending"
STATUS_DELIVERED = "delivered"
STATUS_RECEIVED = "received"
STATUS_RUNNING = "running"
STATUS_CANCELLED = "cancelled"
#: Every task status, in the order a task goes through them.
TASK_STATUSES = (
    STATUS_PENDING,
    STATUS_DELIVERED,
    STATUS_RECEIVED,
    STATUS_RUNNING,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_CANCELLED,
)
#: Statuses a task never leaves (but for a new attempt).
FINISHED_STATUSES: frozenset[str] = frozenset(
    {STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_CANCELLED}
)
#: The statuses of a task that still counts against its agent's pending limit.
UNFINISHED_STATUSES: frozenset[str] = frozenset(TASK_STATUSES) - FINISHED_STATUSES

ATTEMPT_PENDING = "pending"
ATTEMPT_DELIVERED = "delivered"
ATTEMPT_RECEIVED = "received"
ATTEMPT_RUNNING = "running"
ATTEMPT_ENDED = "ended"
ATTEMPT_DISCARDED = "discarded"
#: Attempt states in which the agent may hold the attempt (and run it).
LIVE_ATTEMPT_STATES: frozenset[str] = frozenset(
    {ATTEMPT_DELIVERED, ATTEMPT_RECEIVED, ATTEMPT_RUNNING}
)

_STATUS_RANK = {STATUS_PENDING: 0, STATUS_DELIVERED: 1, STATUS_RECEIVED: 2, STATUS_RUNNING: 3}
_ATTEMPT_RANK = {
    ATTEMPT_PENDING: 0,
    ATTEMPT_DELIVERED: 1,
    ATTEMPT_RECEIVED: 2,
    ATTEMPT_RUNNING: 3,
    ATTEMPT_ENDED: 4,
    ATTEMPT_DISCARDED: 5,
}


def advances(old: str, new: str) -> bool:
    """
    Whether a task may go from status ``old`` to ``new``: only forward, and
    never out of a finished status (a late ``task.received`` after the
    final, a final after a cancel, change nothing).
    """
    if old in FINISHED_STATUSES or old == new:
        return False
    return _STATUS_RANK.get(new, len(_STATUS_RANK)) > _STATUS_RANK.get(old, len(_STATUS_RANK))


def attempt_advances(old: str, new: str) -> bool:
    """Whether an attempt may go from state ``old`` to ``new`` (only forward)."""
    return _ATTEMPT_RANK.get(new, -1) > _ATTEMPT_RANK.get(old, -1)


def cut_utf8(encoded: bytes, limit: int) -> str:
    """The longest prefix of UTF-8 ``encoded`` within ``limit`` bytes, as whole characters."""
    end = max(min(limit, len(encoded)), 0)
    # Step back over continuation bytes (10xxxxxx) to a character boundary.
    while 0 < end < len(encoded) and (encoded[end] & 0xC0) == 0x80:
        end -= 1
    return encoded[:end].decode("utf-8")


def _time(value: float | None) -> str | None:
    return None if value is None else format_sent_at(value)


@dataclass(frozen=True)
class TaskRecord:
    """
    One task as the control plane knows it now.

    Times are Unix seconds of the control plane's clock (None: not yet).
    ``final`` is the stored final of the current attempt, if any: its
    ``output``/``error`` are the agent's own summary (the streamed output is
    :meth:`~hostlink_tw.controlplane.tasks.TaskService.output`).
    ``output_truncated``/``error_truncated``: the stored stdout/stderr is not
    the whole stream (cut by the agent, or past the control plane's limit).
    """

    task_id: str
    agent_id: str
    command: str
    status: str
    execution_attempt_id: str
    exit_code: int | None
    created_at: float
    updated_at: float
    started_at: float | None = None
    ended_at: float | None = None
    output_truncated: bool = False
    error_truncated: bool = False
    final: TaskFinalPayload | None = None

    @property
    def finished(self) -> bool:
        """True once the task has a final status or is cancelled."""
        return self.status in FINISHED_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (times as RFC 3339 UTC, the final's summary left out)."""
        return {
            "task_id": self.task_id,
            "agent_id": self.agent_id,
            "command": self.command,
            "status": self.status,
            "execution_attempt_id": self.execution_attempt_id,
            "exit_code": self.exit_code,
            "created_at": _time(self.created_at),
            "updated_at": _time(self.updated_at),
            "started_at": _time(self.started_at),
            "ended_at": _time(self.ended_at),
            "output_truncated": self.output_truncated,
            "error_truncated": self.error_truncated,
        }


@dataclass(frozen=True)
class AttemptRecord:
    """One execution attempt of a task; ``current`` if it is the task's current one."""

    execution_attempt_id: str
    task_id: str
    agent_id: str
    state: str
    created_at: float
    updated_at: float
    deliveries: int = 0
    current: bool = True


@dataclass(frozen=True)
class OutputChunk:
    """One stored ``task.output`` chunk (``data`` as stored: possibly cut at the limit)."""

    task_id: str
    execution_attempt_id: str
    stream: str
    sequence: int
    data: str
    byte_count: int
    truncated_locally: bool = False

    def replace_data(self, data: str) -> OutputChunk:
        """The same chunk holding ``data`` instead."""
        return replace(self, data=data)


class TaskRefusedError(ValueError):
    """
    A task operation the control plane refuses; ``code`` names the rule
    (``unknown_agent``, ``invalid_command``, ``command_too_long``,
    ``too_many_pending``, ``task_finished``) and the message says it to a person.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UnknownTaskError(KeyError):
    """No task has this id."""

    def __str__(self) -> str:
        return f"no task {self.args[0]!r}"
