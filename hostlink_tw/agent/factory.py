"""
Twisted's ``ReconnectingClientFactory``, configured with our delays.

RCF's own loop reconnects: ``clientConnectionFailed``/``clientConnectionLost``
call ``retry()``, which schedules ``connector.connect()`` on ``clock`` and
keeps the handle in ``_callID``; ``stopTrying()`` cancels it.  The factory
is connected once by its owner (:meth:`HostlinkClient.start`); it never dials
by itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.python.failure import Failure

from hostlink_tw import __version__
from hostlink_tw.agent.connection import HostlinkClientProtocol
from hostlink_tw.backoff import BackoffPolicy

if TYPE_CHECKING:
    from hostlink_tw.agent.client import HostlinkClient
    from hostlink_tw.proxy import Proxy

__all__ = ["HostlinkClientFactory", "rcf_scales_before_waiting"]


class _RecordingClock:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def callLater(self, delay: float, f: Any, *a: Any, **kw: Any) -> object:
        self.delays.append(delay)
        return object()


class _IdleConnector:
    def connect(self) -> None:
        """Never called: the probe's call is recorded, not run."""


def rcf_scales_before_waiting(rcf: type[ReconnectingClientFactory] = ReconnectingClientFactory
                              ) -> bool:
    """
    Whether this Twisted's ``retry()`` multiplies ``delay`` by ``factor``
    *before* scheduling (Twisted before 26.4) rather than after.  RCF's
    first-delay arithmetic changed in 2025; asking it once, with no jitter,
    lets :meth:`HostlinkClientFactory.retry` hand it a value that makes the
    scheduled wait exactly the backoff's on either side of that change.
    """
    probe = rcf()
    probe.noisy = False  # RCF logs 'will retry' lines when noisy
    clock = _RecordingClock()
    probe.clock = clock  # type: ignore[assignment]
    probe.jitter = 0
    probe.factor = 2.0
    probe.delay = 1.0
    probe.retry(_IdleConnector())  # type: ignore[no-untyped-call]
    return clock.delays == [2.0]


_SCALES_BEFORE_WAITING = rcf_scales_before_waiting()


class HostlinkClientFactory(WebSocketClientFactory, ReconnectingClientFactory):
    """
    Builds :class:`HostlinkClientProtocol` connections; RCF's loop reconnects.

    Configured with the real values: ``initialDelay`` = ``RECONNECT_MIN``,
    ``maxDelay`` = the longest wait the backoff can produce
    (``RECONNECT_MAX``, plus 25 % with ``go`` jitter), ``factor`` = 2 (the
    delay doubles), ``jitter`` = 0: RCF's jitter is Gaussian and stored back
    into ``delay`` (it compounds, and can pass ``maxDelay`` or go negative);
    the configured jitter (uniform ±25 %, or full) is applied by the
    :class:`~hostlink_tw.backoff.Backoff` instead.

    What the overrides change, and why:

    * ``startedConnecting``, ``buildProtocol``, ``clientConnectionFailed``
      and ``clientConnectionLost`` tell the owner (a new attempt, its
      connection, its end) and then do what RCF does.
    * ``retry`` takes the wait from the backoff (doubling from
      ``RECONNECT_MIN``, capped, jittered, never compounding), hands it to
      RCF's ``retry`` so that RCF schedules exactly that wait whatever its
      version's arithmetic (:func:`rcf_scales_before_waiting`), and refuses
      to schedule a second retry while one is pending or an attempt is in
      progress (RCF's would open a second connection).
    * ``resetDelay`` also resets the backoff; the owner calls it when a
      session becomes active (not on TCP connect, so a server that accepts
      and then refuses cannot make us spin).  Unlike RCF's, it neither
      forgets a pending retry (whose handle could then never be cancelled)
      nor undoes ``stopTrying``.

    ``maxRetries`` stays None: the agent reconnects forever.
    """

    protocol = HostlinkClientProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        owner: HostlinkClient,
        url: str,
        backoff: BackoffPolicy,
        reactor: Any,
        proxy: Proxy | None,
        max_message_bytes: int,
    ) -> None:
        WebSocketClientFactory.__init__(  # type: ignore[no-untyped-call]
            self,
            url=url,
            useragent=f"hostlink_tw/{__version__}",
            proxy={"host": proxy.host, "port": proxy.port} if proxy is not None else None,
            reactor=reactor,
        )
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            # Limits: refuse (1009) instead of buffering an oversized message;
            # failByDrop=False so the peer sees the close code.
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            failByDrop=False,
            # Our own timers on the reactor replace Autobahn's txaio ones.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            serverConnectionDropTimeout=0,
            autoPingInterval=0,
        )
        self.owner = owner
        self.backoff = backoff
        self.clock = reactor
        self.initialDelay = backoff.minimum
        self.maxDelay = _longest_wait(backoff)  # type: ignore[assignment]
        self.factor = 2.0
        self.jitter = 0
        self.delay = self.initialDelay
        #: The TLS options of a ``wss://`` connection (chosen by the owner).
        self.contextFactory: Any = None

    # -- what the owner hears ------------------------------------------------------

    def startedConnecting(self, connector: Any) -> None:
        """A connection attempt begins (the owner's ``connect`` or RCF's retry)."""
        self.owner.attempt_started(connector)

    def buildProtocol(self, addr: Any) -> Any:
        """A protocol for the TCP connection of the current attempt, reporting to it."""
        proto: Any = WebSocketClientFactory.buildProtocol(self, addr)
        proto.owner = self.owner.attempt
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """TCP connect failed (refused, unreachable, timed out, stopped)."""
        try:
            self.owner.attempt_ended(connector, reason)
        finally:  # whatever the owner did, RCF's loop goes on
            ReconnectingClientFactory.clientConnectionFailed(  # type: ignore[no-untyped-call]
                self, connector, reason
            )

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """An established TCP connection ended (whatever happened above TCP)."""
        try:
            self.owner.attempt_ended(connector, reason)
        finally:  # whatever the owner did, RCF's loop goes on
            ReconnectingClientFactory.clientConnectionLost(  # type: ignore[no-untyped-call]
                self, connector, reason
            )

    # -- the delays ----------------------------------------------------------------

    def retry(self, connector: Any = None) -> None:
        """Schedule the next attempt after the backoff's next wait (one at a time)."""
        if not self.continueTrying or self.retry_pending or self.owner.attempt_in_progress:
            return
        wait = self.backoff.next_delay()
        self.delay = wait / self.factor if _SCALES_BEFORE_WAITING else wait
        ReconnectingClientFactory.retry(self, connector)  # type: ignore[no-untyped-call]
        if self.retry_pending:
            self.owner.retry_scheduled(wait)

    def resetDelay(self) -> None:
        """A session became active: the next failure waits ``RECONNECT_MIN`` again."""
        pending, trying = self._callID, self.continueTrying
        self.backoff.reset()
        ReconnectingClientFactory.resetDelay(self)  # type: ignore[no-untyped-call]
        self._callID, self.continueTrying = pending, trying

    def resume(self) -> None:
        """
        Try again after ``stopTrying`` (a restarted client), with the delays
        from the start: RCF itself has only ``resetDelay`` for this, which
        would also forget a pending retry.
        """
        self.continueTrying = 1
        self.backoff.reset()

    @property
    def retry_pending(self) -> bool:
        """Whether RCF has a retry scheduled."""
        return self._callID is not None and bool(self._callID.active())


def _longest_wait(backoff: BackoffPolicy) -> float:
    upper = getattr(backoff, "upper_bound", None)
    return float(upper) if upper is not None else backoff.maximum * 1.25
