"""
Process groups a crashed run left behind (PROTOCOL §8.8): :class:`LeftoverGroups`.

At start, every attempt recorded ``running`` was interrupted.  If its
process group still exists it is killed — SIGTERM, then SIGKILL after the
kill grace — but only when its leader is provably the shell we started: the
identity recorded at spawn (boot id and start time,
:func:`~hostlink_tw.agent.tasksnapshot.process_identity`) must match.  After
a reboot or a long outage the same number may name someone else's processes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hostlink_tw.agent.tasksnapshot import process_identity

__all__ = ["LeftoverGroups"]

#: How often a terminated group is checked for being gone.
POLL = 0.05


class LeftoverGroups:
    """Kills the groups of interrupted attempts that are provably ours."""

    def __init__(self, clock: IReactorTime, *, boot_id: str | None, grace: float,
                 kill: Callable[[int, int], None], log: Logger) -> None:
        self._clock = clock
        self._boot_id = boot_id
        self._grace = grace
        self._kill = kill
        self._log = log

    def kill_leftover(
        self, task_id: str, attempt_id: str, pgid: int | None, recorded: str | None
    ) -> Deferred[None]:
        """Kill group ``pgid`` if it exists and its leader is the one recorded."""
        if pgid is None or recorded is None or pgid <= 1 or not self._signal(pgid, 0):
            return succeed(None)
        current = process_identity(pgid, self._boot_id)
        if current != recorded:
            if current is None and recorded.startswith(f"{self._boot_id}:"):
                self._log.warn(
                    "process group {pgid} of an interrupted task still exists but its "
                    "shell is gone: left alone, it cannot be proven ours "
                    "task_id={task_id} attempt={attempt}",
                    pgid=pgid, task_id=task_id, attempt=attempt_id,
                )
            return succeed(None)
        self._log.warn(
            "killing the process group {pgid} a previous run left behind "
            "task_id={task_id} attempt={attempt}",
            pgid=pgid, task_id=task_id, attempt=attempt_id,
        )
        return self._terminate(pgid)

    @inlineCallbacks
    def _terminate(self, pgid: int) -> Generator[Deferred[Any], Any, None]:
        self._signal(pgid, signal.SIGTERM)
        waited = 0.0
        while waited < self._grace and self._signal(pgid, 0):
            yield deferLater(self._clock, POLL, lambda: None)
            waited += POLL
        self._signal(pgid, signal.SIGKILL)

    def _signal(self, pgid: int, sig: int) -> bool:
        """Send ``sig`` to the group; False when the group no longer exists."""
        try:
            self._kill(pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
