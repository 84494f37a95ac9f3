"""
An ``IStreamClientEndpoint`` through an HTTP proxy's ``CONNECT`` tunnel.

The HTTP paths (PROTOCOL §9) follow the same proxy rules as the session
(:func:`hostlink_tw.proxy.proxy_for`): an ``http://`` proxy, always
tunnelled with ``CONNECT``, as the Go agent's client does.  Twisted's
``ProxyAgent`` only forwards plain-HTTP requests, so this endpoint opens the
tunnel itself and then hands the connection to the caller's protocol; TLS
to the control plane is layered on top with ``wrapClientTLS``, so the proxy
sees only the encrypted stream.

The proxy's answer is read up to :data:`MAX_ANSWER_BYTES`; anything but a
2xx status fails the connection attempt with :class:`TunnelError`, whose
message never repeats the proxy's credentials.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["MAX_ANSWER_BYTES", "ConnectTunnelEndpoint", "TunnelError"]

#: The proxy's answer head may be at most this long.
MAX_ANSWER_BYTES = 8192


class TunnelError(ConnectionError):
    """The proxy refused or broke the ``CONNECT``."""


def _is_success(status_line: str) -> bool:
    """Whether a status line (``HTTP/1.1 200 Connection established``) says 2xx."""
    parts = status_line.split(" ", 2)
    # Three ASCII digits: str.isdigit() also accepts "²" (latin-1 0xB2),
    # which int() refuses, and a proxy's answer must not raise here.
    return (len(parts) >= 2 and parts[0].startswith("HTTP/") and len(parts[1]) == 3
            and parts[1].isascii() and parts[1].isdigit() and parts[1].startswith("2"))


class _Tunnel(Protocol):
    def __init__(self, target: str, authorization: str | None, factory: IProtocolFactory,
                 done: Deferred[IProtocol]) -> None:
        self._target = target
        self._authorization = authorization
        self._factory = factory
        # None once the caller has its answer (success or failure).
        self._done: Deferred[IProtocol] | None = done
        self._buffer = b""
        self._inner: IProtocol | None = None

    @property
    def _transport(self) -> Any:
        # Set by makeConnection before any of our callbacks run.
        return self.transport

    def connectionMade(self) -> None:
        lines = [f"CONNECT {self._target} HTTP/1.1", f"Host: {self._target}"]
        if self._authorization:
            lines.append(f"Proxy-Authorization: {self._authorization}")
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._done is None:
            return  # refused: the connection is being aborted
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        # The bound holds whether or not the head's end came in the same read.
        if end > MAX_ANSWER_BYTES or (end < 0 and len(self._buffer) > MAX_ANSWER_BYTES):
            self._fail("the proxy's answer to CONNECT is too long")
            return
        if end < 0:
            return
        head, rest = self._buffer[:end], self._buffer[end + 4:]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        if not _is_success(status_line):
            shown = "".join(c if c.isprintable() else "?" for c in status_line[:80])
            self._fail(f"the proxy refused CONNECT {self._target}: {shown!r}")
            return
        inner = self._factory.buildProtocol(self._transport.getPeer())
        if inner is None:
            self._fail("no protocol for the tunnel")
            return
        self._inner = inner
        inner.makeConnection(self._transport)
        done, self._done = self._done, None
        done.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _fail(self, reason: str) -> None:
        done, self._done = self._done, None
        self._transport.abortConnection()
        if done is not None:
            done.errback(TunnelError(reason))

    def abandon(self) -> None:
        """The caller gave up waiting (cancelled): close without answering it."""
        self._done = None
        self._transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)  # type: ignore[arg-type]
        elif self._done is not None:
            # Only while the caller still waits: after a refusal the abort
            # brings us here too, and a second Deferred failed with nobody
            # listening would be logged as an unhandled error.
            done, self._done = self._done, None
            done.errback(TunnelError("the proxy closed the connection"))


@implementer(IStreamClientEndpoint)
class ConnectTunnelEndpoint:
    """Connect to ``host:port`` through the proxy reachable by ``proxy``.

    :param proxy: an endpoint to the proxy itself.
    :param authorization: the ``Proxy-Authorization`` value, if any.
    """

    def __init__(self, proxy: IStreamClientEndpoint, host: str, port: int,
                 authorization: str | None = None) -> None:
        self._proxy = proxy
        host_part = f"[{host}]" if ":" in host else host
        self._target = f"{host_part}:{port}"
        self._authorization = authorization

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Open the tunnel; fires with the caller's protocol once it is through.

        Cancelling it (a caller's timeout) cancels the connection to the
        proxy, or aborts it while the proxy's answer is awaited.
        """
        tunnels: list[_Tunnel] = []

        def cancel(d: Deferred[IProtocol]) -> None:
            if tunnels and tunnels[0].transport is not None:
                tunnels[0].abandon()
            else:
                connecting.cancel()

        done: Deferred[IProtocol] = Deferred(cancel)

        def build() -> _Tunnel:
            tunnel = _Tunnel(self._target, self._authorization, protocolFactory, done)
            tunnels.append(tunnel)
            return tunnel

        connecting = self._proxy.connect(Factory.forProtocol(build))
        connecting.addErrback(lambda f: None if done.called else done.errback(f))
        return done
