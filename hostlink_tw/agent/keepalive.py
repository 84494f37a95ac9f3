"""
Our keepalive: a ping every ``PING_INTERVAL``, and a deadline for its pong.

Autobahn's own auto-ping runs on txaio's batched timers (deadlines rounded
to buckets) and accepts any pong; ours runs on the injected reactor and
accepts only a pong that echoes one of our pings.  Each ping carries 8
random bytes: a peer (or a man in the middle on ``ws://``) cannot forge the
pong of a ping it has not seen, so a dead session cannot be kept "active".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["Keepalive"]

#: Bytes of randomness in each ping payload.
PING_PAYLOAD_BYTES = 8


class Keepalive:
    """
    The ping loop and pong deadline of one open connection.

    :param clock: runs the loop and the deadline.
    :param interval: seconds between pings.
    :param timeout: how long the oldest unanswered ping may wait for its pong.
    :param send_ping: sends one ping with the given payload.
    :param on_ping: told the sequence number of each ping sent.
    :param on_pong: told the sequence number a valid pong answered.
    :param on_dead: called once when a pong is overdue.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        send_ping: Callable[[bytes], None],
        on_ping: Callable[[int], None],
        on_pong: Callable[[int], None],
        on_dead: Callable[[], None],
        log: Logger,
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._send_ping = send_ping
        self._on_ping = on_ping
        self._on_pong = on_pong
        self._on_dead = on_dead
        self._log = log
        self._sequence = 0
        # Unanswered pings, oldest first: payload -> (sequence, reactor time sent).
        self._outstanding: dict[bytes, tuple[int, float]] = {}
        self._deadline: IDelayedCall | None = None
        self._loop = LoopingCall(self._ping)
        self._loop.clock = clock
        self._loop.start(interval, now=False).addErrback(
            lambda f: self._log.failure("keepalive pings stopped", f)
        )

    @property
    def outstanding(self) -> int:
        """Pings sent and not answered yet."""
        return len(self._outstanding)

    def stop(self) -> None:
        """
        Stop pinging and forget the deadline (the connection is ending).  The
        callbacks are dropped too: the loop and this object refer to each
        other, and must not keep the dead connection reachable.
        """
        if self._loop.running:
            self._loop.stop()
        self._cancel_deadline()
        self._outstanding.clear()
        self._send_ping = self._on_ping = self._on_pong = _ignore
        self._on_dead = _nothing

    def pong(self, payload: bytes) -> bool:
        """
        A pong arrived: True when it answers one of our pings (and, pongs
        coming in order, every earlier one); any other pong is ignored.
        """
        answered = self._outstanding.get(payload)
        if answered is None:
            return False
        for sent in list(self._outstanding):
            del self._outstanding[sent]
            if sent == payload:
                break
        self._cancel_deadline()
        if self._outstanding:
            # The oldest unanswered ping keeps its own deadline: a later pong
            # must not give it a fresh PONG_TIMEOUT.
            oldest = next(iter(self._outstanding.values()))[1]
            remaining = max(0.0, oldest + self._timeout - self._clock.seconds())
            self._deadline = self._clock.callLater(remaining, self._overdue)
        self._on_pong(answered[0])
        return True

    def _ping(self) -> None:
        self._sequence += 1
        payload = os.urandom(PING_PAYLOAD_BYTES)
        self._outstanding[payload] = (self._sequence, self._clock.seconds())
        # The deadline is armed before calling out: sending (a peer that does
        # not read) or an observer may stop the keepalive, and stop() must
        # find every timer it has to cancel.
        if self._deadline is None:
            self._deadline = self._clock.callLater(self._timeout, self._overdue)
        self._send_ping(payload)
        if self._loop.running:
            self._on_ping(self._sequence)

    def _overdue(self) -> None:
        self._deadline = None
        on_dead = self._on_dead
        self.stop()
        on_dead()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


def _ignore(_: Any) -> None:
    """A callback that does nothing (a stopped keepalive's)."""


def _nothing() -> None:
    """A callback that does nothing (a stopped keepalive's)."""
