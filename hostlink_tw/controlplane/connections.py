"""
Every TCP connection of the gateway listener, from accept to close.

:class:`ConnectionTracker` wraps the gateway's site: each connection is a
:class:`TrackedConnection`, *pending* until its WebSocket upgrade is
accepted (an absolute handshake deadline, and a cap of its own where a new
connection pushes out the oldest pending one), then a session (counted
against ``max_connections``; the WebSocket keepalive watches it instead).
:func:`buffered_bytes` measures what waits to be sent on a connection, for
the gateway's send-buffer bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import directlyProvides, noLongerProvides, providedBy

__all__ = ["ConnectionTracker", "TrackedConnection", "buffered_bytes", "format_address"]

log = Logger()


def format_address(address: IAddress | str) -> str:
    """A peer as ``host:port`` (``[host]:port`` for IPv6)."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = f"[{address.host}]" if isinstance(address, IPv6Address) else address.host
        return f"{host}:{address.port}"
    return str(address)


def buffered_bytes(transport: object) -> int:
    """
    Bytes written to ``transport`` that the peer has not taken yet: the
    write buffers of every layer down to the socket (our connection wrapper,
    TLS's cleartext buffer, the TCP transport's buffer).

    Twisted has no public accessor for a transport's buffered size (only
    the pause/resume producer signal at 64 KiB, which its HTTP channel
    already holds on this connection), so this reads the attributes of
    :class:`twisted.internet.abstract.FileDescriptor` and
    :class:`twisted.protocols.tls.TLSMemoryBIOProtocol`; the flood test checks
    that they still mean what they meant.
    """
    total = 0
    for _ in range(8):  # a few wrapping layers at most
        # Instance attributes only: ProtocolWrapper forwards unknown
        # attributes to its transport, which would count a buffer twice.
        own = getattr(transport, "__dict__", {})
        data_buffer = own.get("dataBuffer")
        if isinstance(data_buffer, (bytes, bytearray, memoryview)):
            total += len(data_buffer) - int(own.get("offset", 0))
            total += int(own.get("_tempDataLen", 0))
        tls_buffer = own.get("_appSendBuffer")
        if isinstance(tls_buffer, list):
            total += sum(len(chunk) for chunk in tls_buffer)
        transport = own.get("transport")
        if transport is None:
            break
    return total


class TrackedConnection(ProtocolWrapper):
    """
    Every TCP connection of the gateway listener.

    Until it is an accepted WebSocket it is *pending*: it has an absolute
    deadline (``handshake_timeout`` from TCP connect, whatever it sends
    meanwhile: a request, a trickle of bytes, keep-alive requests) and it
    counts against ``max_pending_connections``, where a new connection
    pushes out the oldest pending one.  Once the upgrade is accepted the
    deadline is gone and the connection counts against ``max_connections``
    (the sessions), watched by the WebSocket keepalive instead.
    """

    factory: ConnectionTracker
    _timer: Any = None
    #: True once the WebSocket upgrade was accepted.
    upgraded = False

    def makeConnection(self, transport: Any) -> None:
        timeout = self.factory.handshake_timeout
        if timeout > 0:
            self._timer = self.factory.reactor.callLater(timeout, self._timed_out)
        directlyProvides(self, providedBy(transport))
        # Autobahn reads TLS channel details only from a real TLS protocol
        # and fails on a wrapper that merely claims ISSLTransport.
        if ISSLTransport.providedBy(self):
            noLongerProvides(self, ISSLTransport)
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]
        self.factory.registerProtocol(self)
        wrapped: Any = self.wrappedProtocol
        wrapped.makeConnection(self)

    def upgrade_accepted(self) -> None:
        """The WebSocket is open: no deadline, and it counts as a session now."""
        self._cancel_deadline()
        self.upgraded = True
        self.factory.pending.pop(self, None)

    def hold(self) -> None:
        """A held upgrade (a test control): only whoever holds it releases it."""
        self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        transport: Any = self.transport
        log.info("handshake timeout remote={remote}", remote=format_address(transport.getPeer()))
        # Abort, not close: a peer that does not read would hold a close forever.
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        for d in self.factory.lost_waiters.pop(self, []):
            d.callback(None)


class ConnectionTracker(WrappingFactory):
    """The gateway listener's factory: tracks, caps and times every connection."""

    protocol = TrackedConnection

    def __init__(
        self, site: Site, reactor: Any, handshake_timeout: float, max_pending_connections: int
    ) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.max_pending_connections = max_pending_connections
        self.lost_waiters: dict[TrackedConnection, list[Deferred[None]]] = {}
        #: Connections not yet an accepted WebSocket, oldest first.
        self.pending: dict[TrackedConnection, None] = {}
        #: Pending connections closed to make room for newer ones.
        self.evicted = 0
        self._evicted_logged = 0
        self._eviction_logged_at: float | None = None

    @property
    def upgraded_count(self) -> int:
        """How many connections are accepted WebSockets."""
        return len(self.protocols) - len(self.pending)

    def registerProtocol(self, p: Protocol) -> None:
        super().registerProtocol(p)  # type: ignore[no-untyped-call]
        if isinstance(p, TrackedConnection):
            self.pending[p] = None

    def unregisterProtocol(self, p: Protocol) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        self.pending.pop(p, None)  # type: ignore[call-overload]

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        # Unauthenticated connections get their own cap, and the oldest one
        # makes room: holding the cap then needs a fresh connection faster
        # than an agent completes its upgrade (milliseconds), not a slow
        # trickle, and the sessions' cap is not theirs to fill.
        cap = self.max_pending_connections
        while len(self.pending) >= cap:
            oldest = next(iter(self.pending))
            del self.pending[oldest]
            self.evicted += 1
            transport: Any = oldest.transport  # TCP or TLS: it can abort
            if transport is not None:
                transport.abortConnection()
        self._log_evictions(addr)
        built: Protocol | None = super().buildProtocol(addr)
        return built

    def _log_evictions(self, addr: IAddress) -> None:
        # At most one line a minute: the eviction is the defence against a
        # flood, which must not become a flood of log lines.
        if self.evicted == self._evicted_logged:
            return
        now = self.reactor.seconds()
        if self._eviction_logged_at is not None and now - self._eviction_logged_at < 60:
            return
        log.warn(
            "pending-connection cap of {cap} reached: closed {count} oldest unauthenticated "
            "connection(s) to make room (latest from {remote})",
            cap=self.max_pending_connections,
            count=self.evicted - self._evicted_logged,
            remote=format_address(addr),
        )
        self._evicted_logged = self.evicted
        self._eviction_logged_at = now

    def close_all(self, close: Callable[[Any], bool], grace: float = 1.0) -> Deferred[Any]:
        """
        End every connection, and fire once all are gone.

        :param close: Called with each connection's wrapped protocol; True
            if it started a closing handshake, else the connection is
            aborted at once.
        :param grace: Seconds after which the connections still there are
            aborted.
        """
        gone = [self.when_lost(c) for c in list(self.protocols)]
        for connection in list(self.protocols):
            if not close(connection.wrappedProtocol):
                connection.transport.abortConnection()
        pending = list(self.protocols)

        def force() -> None:
            for connection in pending:
                if connection in self.protocols:
                    connection.transport.abortConnection()

        deadline = self.reactor.callLater(grace, force)
        all_gone = defer.gatherResults(gone, consumeErrors=True)

        def done(result: object) -> None:
            if deadline.active():
                deadline.cancel()

        all_gone.addBoth(done)
        return all_gone

    def when_lost(self, connection: TrackedConnection) -> Deferred[None]:
        """Fire once this connection is gone."""
        d: Deferred[None] = Deferred()
        self.lost_waiters.setdefault(connection, []).append(d)
        return d
