"""
The outbox sender: the store's unacked messages onto the active session, in order.

PROTOCOL §8.6 (replay), §7.5 (acks and gap errors), §7.6 (one id, one payload).

The store is the queue.  The sender never holds more than one page of
messages: it reads the outbox by ``rowid`` (insertion order, so each stream
in sequence order) from a per-connection cursor, and a newly stored message
only *nudges* it.  That one mechanism gives every rule of §8.6:

* on activation the cursor starts at 0, so everything unacked is re-sent,
  oldest first, before anything stored later (replay before live);
* live output produced during the replay is simply further along the same
  cursor, so on one connection a stream's sequences only go up;
* a message leaves with the id and payload it was stored with; only
  ``sent_at`` is new.

A gap error (§7.5) queues a *resend* of one stream above the sequence the
control plane accepted; the main cursor waits until it is done, so no new
chunk of that stream goes out between the first and the last re-sent one.
Sending waits while the transport is paused (the peer reads slowly), so the
connection's unsent-bytes bound is never what stops a replay.

Acks are batched: those that arrive while a store call is running are
committed together in the next one (one fsync for many acks).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.session import Session, SessionEndedError
from hostlink_tw.agent.store import StoredMessage, StoreError, TaskStore
from hostlink_tw.wire.envelope import Envelope, make_envelope

__all__ = ["Outbox", "PAGE_MESSAGES"]

#: Messages read from the store per page: memory holds one page at most.
PAGE_MESSAGES = 64

_log = Logger(namespace="hostlink_tw.outbox")


def envelope_of(message: StoredMessage, agent_id: str, now: float) -> Envelope:
    """The envelope of a stored message: its own id and payload, a fresh ``sent_at``."""
    return make_envelope(
        message.type,
        agent_id,
        message.payload,
        message_id=message.message_id,
        now=now,
        task_id=message.task_id,
        execution_attempt_id=message.attempt_id,
        sequence=message.sequence,
        payload_text=message.payload_text,
    )


class Outbox:
    """
    Sends the outbox on one session at a time and applies its acks.

    :param store: the local store (already started).
    :param agent_id: this agent's id, for the envelopes.
    :param clock: for ``sent_at``.
    :param on_freed: told of the messages and bytes each batch of acks took
        out of the unacked outbox (spool accounting).
    :param on_resent: told of each message sent for another reason than
        ``live`` (``replay``, ``gap``, ``redelivery``), for the status page.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        agent_id: str,
        clock: IReactorTime,
        on_freed: Callable[[int, int], None],
        on_resent: Callable[[str, StoredMessage], None] | None = None,
        log: Logger | None = None,
    ) -> None:
        self._store = store
        self._agent_id = agent_id
        self._clock = clock
        self._on_freed = on_freed
        self._on_resent = on_resent
        self._log = log if log is not None else _log
        self._session: Session | None = None
        self._cursor = 0
        self._pumping = False
        self._again = False
        self._resends: deque[tuple[str, str, str, int]] = deque()
        self._acks: list[tuple[str, int | None]] = []
        self._acking = False
        self._idle_waiters: list[Deferred[None]] = []
        #: Messages sent, by why: ``live``, ``replay`` (the catch-up on
        #: activation), ``gap`` (a gap error's resend), ``redelivery``.
        self.sent: Counter[str] = Counter()
        self._attached_at = 0.0

    # -- sessions ---------------------------------------------------------------------

    @property
    def session(self) -> Session | None:
        """The session being sent on, if any."""
        return self._session

    def attach(self, session: Session) -> None:
        """Start sending on ``session``: everything unacked first (replay)."""
        self._session = session
        self._cursor = 0
        self._attached_at = self._clock.seconds()
        self._resends.clear()
        self.nudge()

    def detach(self, session: Session) -> None:
        """``session`` ended: stop sending on it."""
        if self._session is session:
            self._session = None
            self._resends.clear()

    def nudge(self) -> None:
        """Something was stored: send it when its turn comes."""
        if self._session is None:
            return
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        self._again = False
        d = self._run(self._session)
        d.addErrback(self._pump_failed)
        d.addBoth(self._pump_done)

    def resend(self, task_id: str, attempt_id: str, stream: str, above: int) -> None:
        """Re-send one stream's unacked output above ``above`` (a gap error), in order."""
        if self._session is None:
            return
        # One resend per stream: each gap error of a burst (one per chunk that
        # arrived out of order) would otherwise re-send the same tail again.
        for i, (t, a, s, lowest) in enumerate(self._resends):
            if (t, a, s) == (task_id, attempt_id, stream):
                self._resends[i] = (t, a, s, min(lowest, above))
                return
        self._resends.append((task_id, attempt_id, stream, above))
        self.nudge()

    def send_now(self, message: StoredMessage, reason: str) -> bool:
        """Send one stored message at once (a re-delivery's answer); False without a session."""
        session = self._session
        if session is None or session.ended is not None:
            return False
        session.send(envelope_of(message, self._agent_id, self._clock.seconds()))
        self._count(reason, message)
        return True

    def _count(self, reason: str, message: StoredMessage) -> None:
        self.sent[reason] += 1
        if reason != "live" and self._on_resent is not None:
            self._on_resent(reason, message)

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is being sent and no ack is being recorded."""
        if not self._pumping and not self._acking:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- acks -------------------------------------------------------------------------

    def acked(self, message_id: str, highest_output_sequence: int | None) -> None:
        """An ``ack`` arrived: commit it with whatever else arrives meanwhile."""
        self._acks.append((message_id, highest_output_sequence))
        if not self._acking:
            self._commit_acks()

    def _commit_acks(self) -> None:
        batch, self._acks = self._acks, []
        self._acking = True

        def done(freed: tuple[int, int]) -> None:
            self._on_freed(*freed)

        def failed(failure: Failure) -> None:
            if not isinstance(failure.value, StoreError):
                self._log.failure("cannot record acks", failure)
                return
            self._log.error("cannot record acks: {error}", error=str(failure.value))

        def next_batch(_: object) -> None:
            self._acking = False
            if self._acks:
                self._commit_acks()
            else:
                self._wake_idle()

        d = self._store.ack_messages(batch)
        d.addCallbacks(done, failed)
        d.addBoth(next_batch)

    # -- the pump ---------------------------------------------------------------------

    @inlineCallbacks
    def _run(self, session: Session) -> Generator[Deferred[Any], Any, None]:
        while self._session is session and session.ended is None:
            self._again = False
            if self._resends:
                yield from self._resend_one(session, *self._resends.popleft())
                continue
            page: list[tuple[int, StoredMessage]] = yield self._store.unacked_page(
                self._cursor, PAGE_MESSAGES
            )
            for rowid, message in page:
                if self._session is not session:
                    return
                if session.paused:
                    yield session.when_drained()
                # Stored before this session began: a replay (§8.6).
                reason = "replay" if message.created_at < self._attached_at else "live"
                session.send(envelope_of(message, self._agent_id, self._clock.seconds()))
                self._count(reason, message)
                self._cursor = rowid
            if not page and not self._again and not self._resends:
                return

    def _resend_one(
        self, session: Session, task_id: str, attempt_id: str, stream: str, above: int
    ) -> Generator[Deferred[Any], Any, None]:
        # Only what the main cursor has sent already; the rest goes in its turn.
        through = self._cursor
        while True:
            page: list[tuple[int, StoredMessage]] = yield self._store.unacked_stream(
                task_id, attempt_id, stream, above, through, PAGE_MESSAGES
            )
            for _, message in page:
                if self._session is not session:
                    return
                if session.paused:
                    yield session.when_drained()
                session.send(envelope_of(message, self._agent_id, self._clock.seconds()))
                self._count("gap", message)
                assert message.sequence is not None
                above = message.sequence
            if len(page) < PAGE_MESSAGES:
                return

    def _pump_failed(self, failure: Failure) -> None:
        if isinstance(failure.value, SessionEndedError):
            return  # the connection went away mid-send; the next one replays
        if isinstance(failure.value, StoreError):
            self._log.error("cannot read the outbox: {error}", error=str(failure.value))
            return
        self._log.failure("the outbox sender failed", failure)

    def _pump_done(self, _: object) -> None:
        self._pumping = False
        if self._again and self._session is not None:
            self.nudge()
            return
        self._wake_idle()

    def _wake_idle(self) -> None:
        if self._pumping or self._acking:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)
