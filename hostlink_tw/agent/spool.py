"""
The spool (PROTOCOL §8.4): the outbox's unacked bytes and messages, and the pause.

:class:`Spool` keeps both counts in memory, in step with the store: what the
engine gives the store is added at once; what the session's acks free is
subtracted as the store's ack transaction counted it (a cumulative ack frees
messages the engine cannot count itself).  A final the HTTP report delivered
is subtracted, then the counts are read back from the store, as they are at
start and on each activation: the store runs calls in order, so a read sees
every message issued before it and none issued after, and those are added
back (:meth:`Spool.recount`).  Acks never read the counts back: that read
scans every unacked message, and a replay of N messages acked one batch at a
time would cost O(N²).

Unacked output never passes the spool cap minus the terminal reserve: when
the count comes within what may still arrive after a pause (one flush
threshold per stream and running slot), the runner stops reading every
task's pipes; once acks bring it down to half, it reads again.  Nothing
unacked is ever dropped.

The store bounds memory too: output read but not yet committed is held in
memory (the store commits what waits in one go, but a commit takes an fsync
while a task can write far faster).  When that passes :func:`store_limit`
the runner stops reading the same way, and reads again once the store has
caught up to half of it -- so the agent's memory does not grow with a task's
output rate, whatever the spool cap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.store import StoreError, TaskStore

__all__ = ["STORE_BEHIND_MIN_BYTES", "Spool", "store_limit"]

#: Output bytes that may wait for the store in memory, at least.
STORE_BEHIND_MIN_BYTES = 1 << 20


def store_limit(flush_threshold: int, concurrency: int) -> int:
    """Bytes of output read and not yet stored at which the runner stops reading."""
    return max(STORE_BEHIND_MIN_BYTES, 4 * flush_threshold * concurrency)


class Spool:
    """
    :param settings: the engine's ``TaskSettings`` (cap, reserve, threshold, concurrency).
    :param track: registers a store Deferred with the engine (for an orderly stop).
    :param usable: whether the store may be read now (open, not closing).
    """

    def __init__(self, settings: Any, store: TaskStore, *, log: Logger,
                 track: Callable[[Deferred[Any]], Deferred[Any]],
                 usable: Callable[[], bool]) -> None:
        self._settings = settings
        self._store = store
        self._log = log
        self._track = track
        self._usable = usable
        #: The runner whose output is paused and resumed (``pause_output``/``resume_output``).
        self.runner: Any = None
        #: Unacked bytes in the outbox (§7.1 ``bytes_used``).
        self.bytes = 0
        #: Unacked messages in the outbox.
        self.messages = 0
        #: Whether the spool is full (the runner's output is paused).
        self.paused = False
        #: Output bytes given to the store and not yet committed (held in memory).
        self.unstored = 0
        #: Whether the runner's output is paused because the store is behind.
        self.store_behind = False
        # What was given to the store to add, ever: a count read from the
        # store is corrected by what was issued after the read.
        self._issued_messages = 0
        self._issued_bytes = 0
        self._recounting = False
        self._again = False

    # -- what the engine tells it -----------------------------------------------------

    def output_issued(self, size: int) -> None:
        """An output chunk of ``size`` bytes goes to the store."""
        self.bytes += size
        self.messages += 1
        self._issued_messages += 1
        self._issued_bytes += size
        self.unstored += size
        self.check()

    def output_landed(self, size: int) -> None:
        """The store committed (or failed to commit) an output chunk of ``size`` bytes."""
        self.unstored = max(0, self.unstored - size)
        self.check()

    def final_issued(self) -> None:
        """A final goes to the store (its size is known once stored)."""
        self.messages += 1
        self._issued_messages += 1

    def final_stored(self, size: int) -> None:
        """The final was stored, taking ``size`` bytes."""
        self.bytes += size

    def final_existed(self) -> None:
        """The attempt had its final already: nothing was added."""
        self.messages -= 1

    def acked(self, messages: int, size: int) -> None:
        """The session's acks took ``messages`` messages of ``size`` bytes out
        of the unacked outbox (as the store's ack transaction counted them)."""
        self.messages = max(0, self.messages - messages)
        self.bytes = max(0, self.bytes - size)
        self.check()

    def freed(self, size: int) -> None:
        """A reported final freed ``size`` bytes; the count is read back from the store."""
        self.bytes = max(0, self.bytes - size)
        self.check()
        self.recount_soon()

    # -- the counts ---------------------------------------------------------------------

    def recount(self) -> Deferred[None]:
        """Read the outbox's totals from the store (see the module docstring)."""
        messages, size = self._issued_messages, self._issued_bytes

        def got(totals: tuple[int, int]) -> None:
            count, used = totals
            self.messages = count + self._issued_messages - messages
            self.bytes = used + self._issued_bytes - size

        return self._track(self._store.outbox_totals()).addCallback(got)

    def recount_soon(self) -> None:
        """Recount after acks, one read at a time."""
        if not self._usable():
            return
        if self._recounting:
            self._again = True
            return
        self._recounting = True

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, StoreError):  # said already by the write that failed
                self._log.debug("cannot count the outbox: {error}", error=str(failure.value))
            else:
                self._log.failure("cannot count the outbox", failure)

        def done(_: object) -> None:
            self._recounting = False
            if self._again:
                self._again = False
                self.recount_soon()
            else:
                self.check()

        self.recount().addErrback(failed).addBoth(done)

    # -- the pause ------------------------------------------------------------------------

    def limits(self) -> tuple[int, int]:
        """The counts at which output pauses and resumes."""
        s = self._settings
        limit = s.spool_cap_bytes - s.terminal_reserve_bytes
        # What may still arrive after a pause: one flush threshold per stream and slot.
        margin = 2 * s.flush_threshold * s.concurrency
        pause_at = max(limit - margin, s.flush_threshold)
        return pause_at, pause_at // 2

    def check(self) -> None:
        """Pause or resume the runner's output on the current counts."""
        if self.runner is None:
            return
        was_paused = self.paused or self.store_behind
        pause_at, resume_at = self.limits()
        if not self.paused and self.bytes >= pause_at:
            self.paused = True
            self._log.info("spool full ({bytes} unacked bytes): pausing task output",
                           bytes=self.bytes)
        elif self.paused and self.bytes <= resume_at:
            self.paused = False
            self._log.info("spool drained: resuming task output")
        behind_at = store_limit(self._settings.flush_threshold, self._settings.concurrency)
        if not self.store_behind and self.unstored >= behind_at:
            self.store_behind = True  # routine under fast output: not worth a log line
        elif self.store_behind and self.unstored <= behind_at // 2:
            self.store_behind = False
        if self.paused or self.store_behind:
            if not was_paused:
                self.runner.pause_output()
        elif was_paused:
            self.runner.resume_output()
