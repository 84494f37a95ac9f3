"""
One WebSocket connection to the control plane: the Autobahn protocol.

A thin adapter.  It does what only the protocol can do — start TLS on the
TCP transport, ask a proxy for a tunnel, sign the upgrade in
``onConnecting``, keep Autobahn's response parsing within bounds — and
reports every input to its owner, its :class:`~hostlink_tw.agent.attempt.Attempt`
as a call of the :class:`ConnectionOwner` interface: opened, a frame, a
pong, the upgrade refused, closing, lost.  It keeps no session state.

Every hook that runs our code is guarded: whatever it raises ends this
attempt with one log line naming the step, and the owner's reconnect loop
goes on (an exception escaping into Autobahn or Twisted could leave an
attempt that never ends).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import txaio
from autobahn.twisted.websocket import WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from hostlink_tw.wire.vocabulary import MAX_FRAMES_PER_MESSAGE

if TYPE_CHECKING:
    from hostlink_tw.agent.factory import HostlinkClientFactory
    from hostlink_tw.agent.interfaces import ConnectionOwner

__all__ = ["MAX_FRAMES_PER_MESSAGE", "HostlinkClientProtocol", "MAX_RESPONSE_HEAD_BYTES"]

#: Most bytes of HTTP response head (status line and headers) accepted from
#: the control plane or a proxy; Autobahn would buffer without limit until
#: the blank line that ends the head.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024

#: Most bytes the agent writes while the transport says its buffer is full
#: (the peer does not read).  Beyond it the connection is aborted: pongs
#: answering a ping flood, or anything else, never queue without bound.
MAX_UNSENT_BYTES = 4 * 1024 * 1024


_F = TypeVar("_F", bound=Callable[..., Any])


def _host_for_header(host: str) -> str:
    """An IPv6 literal in brackets, as HTTP's Host header and CONNECT need it."""
    return f"[{host}]" if ":" in host else host


def _guarded(step: str) -> Callable[[_F], _F]:
    """Report anything the hook raises to the owner instead of letting it escape."""

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        def guarded(self: HostlinkClientProtocol, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - nothing may escape into Autobahn/Twisted
                self.hook_failed(step, e)
                return None

        return guarded  # type: ignore[return-value]

    return decorate


class HostlinkClientProtocol(WebSocketClientProtocol):
    """
    One WebSocket connection to the control plane.

    Autobahn logs through a txaio logger pinned here to ``critical``: its
    debug lines would print the signed upgrade request, and its warnings and
    errors (a failed TLS handshake, a failed ``onConnecting``) repeat what
    the client logs once, with structured fields.
    """

    log = txaio.make_logger(level="critical")  # type: ignore[attr-defined]

    factory: HostlinkClientFactory
    #: Who this connection reports to: its attempt (set by the factory).
    owner: ConnectionOwner

    #: Whether the transport asked us to stop writing (its buffer is full).
    paused = False
    #: Bytes written since the transport paused us.
    unsent = 0
    _frames = 0
    _blocked = False

    # -- backpressure: the transport tells us when the peer stops reading ------------

    def pauseProducing(self) -> None:
        """The transport's buffer is full: count what we still write."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The transport's buffer drained."""
        self.paused = False
        self.unsent = 0
        self.owner.write_resumed(self)

    def stopProducing(self) -> None:
        """The connection is going away."""

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Every write of the connection passes here: while the peer does not
        read, at most :data:`MAX_UNSENT_BYTES` more are queued, then the
        connection is aborted (and nothing more is queued).
        """
        if self.paused:
            self.unsent += len(data)
            if self.unsent > MAX_UNSENT_BYTES:
                if not self._blocked:
                    self._blocked = True
                    try:
                        self.owner.write_blocked(self, self.unsent)
                    finally:
                        self.abort("the peer stopped reading")
                return
        super().sendData(data, sync, chopsize)

    # -- message assembly bounds -----------------------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        """A message starts: its frames are counted and its assembly is timed."""
        self._frames = 0
        super().onMessageBegin(isBinary)
        if not self.failedByMe:
            self.owner.message_begun(self)

    def onMessageFrameBegin(self, length: int) -> None:
        """One more frame of the current message."""
        self._frames += 1
        if self._frames > MAX_FRAMES_PER_MESSAGE and not self.failedByMe:
            # Stop Autobahn from keeping the frames; the owner closes (1009).
            self.failedByMe = True
            self.owner.too_many_frames(self, self._frames)
        super().onMessageFrameBegin(length)

    def onMessageEnd(self) -> None:
        """The message is complete."""
        if not self.failedByMe:
            self.owner.message_done(self)
        super().onMessageEnd()

    # -- commands from the owner -----------------------------------------------------

    def send_text(self, text: str) -> None:
        """Send one text frame."""
        self.sendMessage(text.encode("utf-8"), isBinary=False)  # type: ignore[no-untyped-call]

    def send_ping(self, payload: bytes) -> None:
        """Send one ping frame."""
        self.sendPing(payload)

    def close(self, code: int, reason: str) -> None:
        """
        End this connection: a close frame when the WebSocket is open, an
        abort while it is still being set up, nothing when it is already
        ending.
        """
        state = getattr(self, "state", None)
        if state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code, reason.encode("utf-8")[:123], isReply=False)
        elif state in (
            WebSocketProtocol.STATE_CONNECTING,
            WebSocketProtocol.STATE_PROXY_CONNECTING,
            None,
        ):
            self.abort(reason)

    def abort(self, reason: str) -> None:
        """Drop the TCP connection at once, without a close handshake."""
        state = getattr(self, "state", None)
        if state is not None and state != WebSocketProtocol.STATE_CLOSED:
            self.wasClean = False
            self.wasNotCleanReason = reason
            self.dropConnection(abort=True)
        elif self.transport is not None and self.connected:
            # Autobahn considers it closed (or never set it up) but TCP is up.
            self._abort_tcp()

    def hook_failed(self, step: str, error: BaseException) -> None:
        """Our code failed in ``step``: the owner ends this attempt; abort it in any case."""
        try:
            self.owner.hook_failed(self, step, error)
        finally:
            if self.transport is not None and self.connected:
                self._abort_tcp()

    def _abort_tcp(self) -> None:
        transport: Any = self.transport  # TCP (maybe with TLS): it can abort
        transport.abortConnection()

    # -- Twisted / Autobahn hooks --------------------------------------------------

    @_guarded("connection setup")
    def _connectionMade(self) -> None:
        self.owner.connection_made(self)
        # Autobahn starts TLS itself only after a proxy CONNECT; for a direct
        # wss:// connection we start it here, with the verified options,
        # before the upgrade request is written.  (Autobahn's own wss path
        # would be connectWS with an unverified ClientContextFactory.)
        transport: Any = self.transport
        if self.factory.isSecure and self.factory.proxy is None:
            transport.startTLS(self.factory.contextFactory)
        # As a streaming producer the transport tells us when its buffer is
        # full (the peer does not read): see sendData.
        transport.registerProducer(self, True)
        super()._connectionMade()  # type: ignore[no-untyped-call]

    @_guarded("proxy CONNECT")
    def startProxyConnect(self) -> None:
        """Ask the HTTP proxy for a tunnel, as Go's dialer does (with its credentials)."""
        target = f"{_host_for_header(self.factory.host)}:{self.factory.port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.factory.useragent:
            lines.append(f"User-Agent: {self.factory.useragent}")
        authorization = self.owner.proxy_authorization()
        if authorization:
            lines.append(f"Proxy-Authorization: {authorization}")
        self.sendData(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))

    def processProxyConnect(self) -> None:
        """The proxy's answer to CONNECT, parsed with the guards of :meth:`_parse_head`."""
        self._parse_head("proxy CONNECT", super().processProxyConnect)

    def processHandshake(self) -> None:
        """The upgrade response, parsed with the guards of :meth:`_parse_head`."""
        self._parse_head("upgrade", super().processHandshake)

    def _parse_head(self, what: str, parse: Callable[[], None]) -> None:
        """
        Let Autobahn parse an HTTP response head, within bounds: a head
        larger than :data:`MAX_RESPONSE_HEAD_BYTES`, or one Autobahn cannot
        parse (it raises on bytes that are not UTF-8, for instance), ends
        the attempt with one log line instead of a buffer that grows or a
        traceback.
        """
        data: bytes = self.data
        if (
            len(data) > MAX_RESPONSE_HEAD_BYTES
            and b"\r\n\r\n" not in data[:MAX_RESPONSE_HEAD_BYTES]
        ):
            self.owner.bad_head(
                self, f"{what} failed: response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes",
                b"",
            )
            self.abort(what)
            return
        try:
            parse()
        except Exception as e:  # noqa: BLE001 - hostile input must not escape the protocol
            self.owner.bad_head(self, f"{what} failed: response unparsable ({type(e).__name__})",
                                data)
            self.abort(what)

    def failProxyConnect(self, reason: str) -> None:
        """The proxy refused the tunnel."""
        self.owner.proxy_refused(self, reason)
        super().failProxyConnect(reason)  # type: ignore[no-untyped-call]

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        """
        Sign the upgrade for this connection only: a fresh timestamp and nonce
        every time (the control plane refuses a nonce it has seen).  Every
        other field is copied from the factory, because ``ConnectingRequest``'s
        own defaults are ``localhost:80 /``.  If signing fails, the owner
        hears why and Autobahn drops the connection.
        """
        try:
            headers = dict(self.owner.sign_upgrade())
        except Exception as e:
            self.owner.hook_failed(self, "signing the upgrade request", e)
            raise
        return ConnectingRequest(  # type: ignore[no-untyped-call]
            host=_host_for_header(self.factory.host),
            port=self.factory.port,
            resource=self.factory.resource,
            headers=headers,
            useragent=self.factory.useragent,
            origin=self.factory.origin,
            protocols=self.factory.protocols,
        )

    def failHandshake(self, reason: str) -> None:
        """The upgrade failed: tell the owner the HTTP status and body of a refusal."""
        try:
            status_line = getattr(self, "http_status_line", None) or ""
            parts = status_line.split(None, 2)
            status: int | None = None
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
            body = b""
            end = self.data.find(b"\r\n\r\n")
            if end >= 0:
                body = self.data[end + 4 :]
            phrase = parts[2].strip() if len(parts) > 2 else ""
            headers = getattr(self, "http_headers", None) or {}
            self.owner.upgrade_failed(self, status, phrase, headers, body, reason)
        finally:
            super().failHandshake(reason)  # type: ignore[no-untyped-call]

    @_guarded("session start")
    def onOpen(self) -> None:
        """The upgrade succeeded."""
        self.owner.opened(self)

    @_guarded("handling a frame")
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """One inbound message, for the owner."""
        self.owner.message(self, payload, isBinary)

    @_guarded("handling a pong")
    def onPong(self, payload: bytes) -> None:
        """A pong, for the owner's keepalive."""
        self.owner.pong(self, payload)

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        """Autobahn's close; the owner bounds the close handshake, whoever started it."""
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        if self.state == WebSocketProtocol.STATE_CLOSING:
            text = (reasonUtf8 or b"").decode("utf-8", "replace")
            try:
                self.owner.closing(
                    self, code, text, by_agent=not isReply, by_library=bool(self.failedByMe)
                )
            except Exception as e:  # noqa: BLE001 - see the module docstring
                self.hook_failed("closing", e)

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> bool | None:
        """The peer started (or answered) the close handshake."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            reason = (reasonRaw or b"").decode("utf-8", "replace")
            try:
                self.owner.peer_closing(self, code, reason)
            except Exception as e:  # noqa: BLE001 - see the module docstring
                self.hook_failed("peer close", e)
        result: bool | None = super().onCloseFrame(code, reasonRaw)
        return result

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        """
        The connection is gone: Autobahn cleans up, then the owner hears it.
        Then the references that would keep the dead transport and its
        buffers alive in a cycle with this protocol are dropped.
        """
        try:
            if getattr(self, "state", None) is not None:
                super().connectionLost(reason)
        finally:
            self.owner.connection_lost(self, reason)
            self.transport = None
            self.data = b""
            # Autobahn resolves is_closed with the protocol itself: a cycle
            # that would keep it (and whatever it holds) until the cycle
            # collector runs.  A fired future without the reference replaces it.
            self.is_closed = txaio.create_future_success(None)  # type: ignore[attr-defined]
