"""
The agent's WebSocket client: one signed, live session with the control plane.

Three pieces, as Twisted and Autobahn divide the work:

:class:`HostlinkClientProtocol`
    One connection.  Signs the upgrade afresh in ``onConnecting``, sends
    ``agent.hello`` in ``onOpen``, validates every inbound frame, keeps the
    peer alive with its own pings, and owns the timers of that connection
    (hello_ack, ping, pong, close), all cancelled when the connection ends.
:class:`HostlinkClientFactory`
    Autobahn's ``WebSocketClientFactory`` combined with Twisted's
    ``ReconnectingClientFactory``: builds the protocols, opens one connection
    at a time and schedules the next one with :class:`~hostlink_tw.backoff.Backoff`
    (the retry bookkeeping is our own; see the factory's docstring for what
    differs from the stock class and why).
:class:`HostlinkClient`
    What embedding code uses: ``start()``, ``stop()``, the session state,
    ``when_active()`` and observers of :class:`ClientEvent`.

Timing rules (keepalive, hello, handshake and close timeouts, retry delays)
run on ``reactor.callLater`` of the injected reactor.  Autobahn's own timers
(auto-ping, opening/closing handshake timeouts, server drop timeout) run on
txaio's batched loop, which rounds deadlines to buckets, and are therefore
all switched off.

A connection's life, as :attr:`HostlinkClient.state` shows it::

    idle/stopped --start()--> connecting --upgrade--> awaiting_hello_ack
        --hello_ack--> active
    any connection state --failure/close--> closing --TCP gone--> waiting
    waiting --delay--> connecting
    any state --stop()--> stopping --all closed--> stopped
"""

from __future__ import annotations

import enum
import ipaddress
import os
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw import __version__
from hostlink_tw.backoff import GO_JITTER, Backoff, BackoffPolicy
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    Envelope,
    ErrorPayload,
    ProtocolError,
    make_envelope,
    parse_envelope,
)
from hostlink_tw.proxy import Proxy, UnsupportedProxyError, proxy_for
from hostlink_tw.signing import RequestSigner
from hostlink_tw.tls import TLSConfigError, client_tls_options, describe_tls_failure, is_tls_failure

__all__ = [
    "CLOSE_TIMEOUT",
    "FRAME_PREVIEW_CHARS",
    "ClientEvent",
    "ClientSettings",
    "ClientState",
    "HostlinkClient",
    "HostlinkClientFactory",
    "HostlinkClientProtocol",
    "MAX_RESPONSE_HEAD_BYTES",
    "Observers",
]

#: How long a close handshake may take (ours, the peer's, or stop()'s)
#: before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0

#: At most this many characters of an offending frame go into a log line.
FRAME_PREVIEW_CHARS = 200

#: Most bytes of HTTP response head (status line and headers) accepted from
#: the control plane or a proxy; Autobahn would buffer without limit until
#: the blank line that ends the head.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024

# WebSocket close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008

_HINTS = {
    401: (
        "the control plane did not accept the signed upgrade: check that this host's "
        "clock is right (timestamps more than 300 s off are refused) and that the agent's "
        "public key is registered for this agent id"
    ),
    403: "the control plane refuses this agent: is it registered and allowed?",
}
_HINT_5XX = "the control plane has a problem; retrying with backoff"


class _DelayedCall(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class _Reactor(Protocol):
    """What the client needs of its reactor: ``IReactorTime`` and ``IReactorTCP``."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> _DelayedCall: ...
    def seconds(self) -> float: ...
    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any: ...


class ClientSettings(Protocol):
    """The part of :class:`hostlink_tw.config.Settings` the client reads."""

    @property
    def ws_url(self) -> str: ...
    @property
    def reconnect_min(self) -> float: ...
    @property
    def reconnect_max(self) -> float: ...
    @property
    def ping_interval(self) -> float: ...
    @property
    def pong_timeout(self) -> float: ...
    @property
    def hello_timeout(self) -> float: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def reconnect_jitter(self) -> str: ...


class ClientState(enum.Enum):
    """Where the client is in its connection life (see the module docstring)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    AWAITING_ACK = "awaiting_hello_ack"
    ACTIVE = "active"
    CLOSING = "closing"
    WAITING = "waiting"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ClientEvent:
    """
    Something that happened to the client, for observers (status, metrics, tests).

    ``kind`` and its ``fields``:

    ``attempt``
        a connection attempt starts: ``attempt`` (number since the last
        active session), ``url``.
    ``connected``
        the WebSocket upgrade succeeded: ``attempt``, ``url``.
    ``refused``
        the control plane refused the upgrade: ``status`` (HTTP status, int),
        ``reason``.
    ``active``
        the hello was acked: ``message_id`` (of the hello).
    ``inactive``
        an active session ended or is ending: ``reason``.
    ``message_in`` / ``message_out``
        a valid envelope arrived / was sent: ``type``, ``message_id``.
    ``closed``
        an attempt or connection ended (exactly once per ``attempt``):
        ``code`` (the WebSocket close code received or, failing that, sent;
        None when the TCP connection ended without a close frame or never
        existed), ``reason``, ``clean`` (bool).
    ``ping`` / ``pong``
        a keepalive ping was sent / the pong answering it (or a later one)
        arrived: ``sequence`` (the ping's number on this connection).
    ``retry_scheduled``
        the next attempt is due in ``delay`` seconds, at reactor time ``at``.
    ``stopped``
        stop() finished; nothing is left running.
    """

    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


class Observers:
    """
    The observers of :class:`ClientEvent` s: subscribe, unsubscribe, notify.

    An observer that raises is logged and otherwise ignored: watching the
    client must never break it.
    """

    def __init__(self, log: Logger) -> None:
        self._log = log
        self._observers: list[Callable[[ClientEvent], None]] = []

    def add(self, observer: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Call ``observer`` with every event from now on; return its unsubscriber."""
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def notify(self, event: ClientEvent) -> None:
        """Give ``event`` to every observer subscribed now."""
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:  # noqa: BLE001 - an observer must not break the client
                self._log.failure("client event observer failed on {kind}", kind=event.kind)


def redact_url(url: str) -> str:
    """``url`` without user info (``user:password@``), for log lines and status."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_for_header(host: str) -> str:
    """An IPv6 literal in brackets, as HTTP's Host header and CONNECT need it."""
    return f"[{host}]" if ":" in host else host


def _preview(payload: bytes) -> str:
    """The first :data:`FRAME_PREVIEW_CHARS` characters of a frame, quoted."""
    text = payload[: FRAME_PREVIEW_CHARS * 4].decode("utf-8", "replace")
    return repr(text[:FRAME_PREVIEW_CHARS])


def _describe_reason(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ConnectionDone):
        return "connection closed"
    if isinstance(value, ConnectError):
        # e.g. "Connection was refused by other side: 111: Connection refused."
        return str(value).strip() or type(value).__name__
    return f"{type(value).__name__}: {value}".strip()


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

    def __init__(self) -> None:
        super().__init__()
        self.hello_id: str | None = None
        #: Why this connection ended (or is ending), once we know.
        self.failure: str | None = None
        #: The HTTP status of a refused upgrade.
        self.refused_status: int | None = None
        self.opened = False
        #: Whether this connection's session became active.
        self.activated = False
        self.close_info: tuple[bool, int | None, str | None] | None = None
        self.lost_reason: Failure | None = None
        self._rejecting = False
        self._hello_timer: _DelayedCall | None = None
        self._close_timer: _DelayedCall | None = None
        self._pong_timer: _DelayedCall | None = None
        self._ping_loop: LoopingCall | None = None
        self._ping_seq = 0
        # Unanswered pings, oldest first: payload -> reactor time sent.
        self._outstanding_pings: dict[bytes, float] = {}

    # -- helpers ---------------------------------------------------------------------

    @property
    def _client(self) -> HostlinkClient:
        return self.factory.client

    def _note_failure(self, text: str) -> None:
        """Remember the first reason this connection ends; later ones are consequences."""
        if self.failure is None:
            self.failure = text

    def _cancel_timers(self) -> None:
        for name in ("_hello_timer", "_close_timer", "_pong_timer"):
            call: _DelayedCall | None = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self._ping_loop is not None and self._ping_loop.running:
            self._ping_loop.stop()
        self._ping_loop = None

    def close(self, code: int, reason: str) -> None:
        """
        End this connection: a close frame when the WebSocket is open (the
        close timer bounds the wait for the peer's answer), an abort while
        it is still being set up, nothing when it is already ending.
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code, reason.encode("utf-8")[:123], isReply=False)
        elif self.state in (
            WebSocketProtocol.STATE_CONNECTING,
            WebSocketProtocol.STATE_PROXY_CONNECTING,
        ):
            self.abort(reason)

    def abort(self, reason: str) -> None:
        """Drop the TCP connection at once, without a close handshake."""
        self._note_failure(reason)
        if self.state != WebSocketProtocol.STATE_CLOSED:
            self.wasClean = False
            self.wasNotCleanReason = reason
            self.dropConnection(abort=True)
        elif self.transport is not None and self.connected:
            # Autobahn already considers it closed but TCP is still up.
            self.transport.abortConnection()

    # -- Twisted / Autobahn hooks --------------------------------------------------

    def _connectionMade(self) -> None:
        # Autobahn starts TLS itself only after a proxy CONNECT; for a direct
        # wss:// connection we start it here, with the verified options,
        # before the upgrade request is written.  (Autobahn's own wss path
        # would be connectWS with an unverified ClientContextFactory.)
        if self.factory.isSecure and self.factory.proxy is None:
            transport: Any = self.transport
            transport.startTLS(self.factory.contextFactory)
        super()._connectionMade()  # type: ignore[no-untyped-call]

    def startProxyConnect(self) -> None:
        """Ask the HTTP proxy for a tunnel, as Go's dialer does (with its credentials)."""
        target = f"{_host_for_header(self.factory.host)}:{self.factory.port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.factory.useragent:
            lines.append(f"User-Agent: {self.factory.useragent}")
        proxy = self._client.proxy
        if proxy is not None and proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
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
            self._bad_head(
                f"{what} failed: response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes"
            )
            return
        try:
            parse()
        except Exception as e:  # noqa: BLE001 - hostile input must not escape the protocol
            self._bad_head(f"{what} failed: response unparsable ({type(e).__name__})", data)

    def _bad_head(self, reason: str, data: bytes = b"") -> None:
        self._client.log.warn(
            "{reason} response={preview} agent_id={agent_id} url={url}",
            reason=reason,
            preview=_preview(data),
            **self._client._log_fields(),
        )
        self.abort(reason)

    def failProxyConnect(self, reason: str) -> None:
        """The proxy refused the tunnel."""
        self._note_failure(f"proxy refused the CONNECT tunnel: {reason}")
        super().failProxyConnect(reason)  # type: ignore[no-untyped-call]

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        """
        Sign the upgrade for this connection only: a fresh timestamp and nonce
        every time (the control plane refuses a nonce it has seen).  Every
        other field is copied from the factory, because ``ConnectingRequest``'s
        own defaults are ``localhost:80 /``.
        """
        try:
            headers = dict(self._client.signer.sign_headers())
        except Exception as e:
            # Autobahn drops the connection when this hook raises; say why.
            self._note_failure(f"cannot sign the upgrade request: {e}")
            self._client.log.error(
                "cannot sign the upgrade request: {error} agent_id={agent_id} url={url}",
                error=str(e),
                **self._client._log_fields(),
            )
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
        """The upgrade failed: remember the HTTP status of a refusal."""
        status_line = getattr(self, "http_status_line", None) or ""
        parts = status_line.split(None, 2)
        status: int | None = None
        if len(parts) >= 2 and parts[1].isdigit():
            status = int(parts[1])
        if status is not None and status != 101:
            self.refused_status = status
            body = b""
            end = self.data.find(b"\r\n\r\n")
            if end >= 0:
                body = self.data[end + 4 :]
            phrase = parts[2].strip() if len(parts) > 2 else ""
            detail = f"HTTP {status} {phrase}".strip()
            if body.strip():
                detail += f" {_preview(body.strip())}"
            # A 4xx/5xx is a refusal; anything else (200, a redirect) is a
            # server that is not a Hostlink gateway at this URL.
            verb = "refused" if status >= 400 else "not accepted (expected 101)"
            self._note_failure(f"upgrade {verb}: {detail}")
        else:
            self._note_failure(f"upgrade failed: {reason}")
        super().failHandshake(reason)  # type: ignore[no-untyped-call]

    def onOpen(self) -> None:
        """The upgrade succeeded: say hello and start the keepalive."""
        self.opened = True
        reactor = self.factory.timer
        settings = self._client.settings
        self._ping_loop = LoopingCall(self._send_ping)
        self._ping_loop.clock = cast(Any, reactor)
        self._ping_loop.start(settings.ping_interval, now=False).addErrback(
            lambda f: self._client.log.failure("keepalive pings stopped", f)
        )
        self._hello_timer = reactor.callLater(settings.hello_timeout, self._hello_timed_out)
        self._client._connection_opened(self)
        if self.state != WebSocketProtocol.STATE_OPEN:
            return  # an observer stopped the client
        hello = make_envelope(AGENT_HELLO, self._client.agent_id, {}, now=reactor.seconds())
        self.hello_id = hello.message_id
        self.send_envelope(hello)

    def send_envelope(self, envelope: Envelope) -> None:
        """Send one envelope as a UTF-8 JSON text frame."""
        self.sendMessage(  # type: ignore[no-untyped-call]
            envelope.to_json().encode("utf-8"), isBinary=False
        )
        self._client._emit("message_out", type=envelope.type, message_id=envelope.message_id)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """
        Validate and dispatch one inbound message.  Nothing a frame contains
        may raise out of here: any problem ends the connection (and the
        client reconnects), with one log line saying why.
        """
        if self._rejecting:
            return  # we are closing; the rest is noise
        try:
            self._handle_message(payload, isBinary)
        except Exception as e:  # noqa: BLE001 - a frame must never crash the agent
            self._reject(
                "cannot handle frame", f"{type(e).__name__}: {e}", payload, CLOSE_INVALID_PAYLOAD
            )

    def _handle_message(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._reject(
                "binary frame",
                "the protocol uses text frames only",
                payload,
                CLOSE_UNSUPPORTED_DATA,
            )
            return
        try:
            envelope = parse_envelope(payload, self._client.agent_id)
        except ProtocolError as e:
            self._reject("invalid envelope", str(e), payload, CLOSE_INVALID_PAYLOAD)
            return
        self._client._emit("message_in", type=envelope.type, message_id=envelope.message_id)
        if envelope.type in (AGENT_HELLO_ACK, ACK):
            self._on_ack(envelope)
        elif envelope.type == ERROR:
            try:
                error = ErrorPayload.from_dict(envelope.payload)
                detail = (
                    f"code={error.code[:FRAME_PREVIEW_CHARS]} "
                    f"message={error.message[:FRAME_PREVIEW_CHARS]!r} "
                    f"retryable={error.retryable}"
                )
            except ProtocolError as e:
                detail = f"(unreadable error payload: {e})"
            self._reject(
                "control plane reported an error", detail, payload, CLOSE_NORMAL, envelope.type
            )
        else:
            self._reject(
                "unexpected message type",
                f"{envelope.type} is not handled by this agent",
                payload,
                CLOSE_POLICY,
                envelope.type,
            )

    def _on_ack(self, envelope: Envelope) -> None:
        # parse_envelope has validated the ack payload (acked_message_id is a
        # string); parsing it again cost 14 % of inbound handling.
        acked_message_id: str = envelope.payload["acked_message_id"]
        self._client._ack_received(envelope)
        if (
            envelope.type == AGENT_HELLO_ACK
            and self.hello_id is not None
            and acked_message_id == self.hello_id
            and self._hello_timer is not None
        ):
            self._hello_timer.cancel()
            self._hello_timer = None
            self._client._session_active(self)
        elif envelope.type == AGENT_HELLO_ACK and self._hello_timer is not None:
            self._client.log.warn(
                "ignoring agent.hello_ack for {acked_message_id}: our hello is {hello_id} "
                "agent_id={agent_id} url={url}",
                acked_message_id=acked_message_id[:FRAME_PREVIEW_CHARS],
                hello_id=self.hello_id,
                **self._client._log_fields(),
            )

    def _reject(
        self, problem: str, reason: str, payload: bytes, code: int, msg_type: str | None = None
    ) -> None:
        """One log line about an offending frame, then close and reconnect."""
        self._rejecting = True
        self._note_failure(f"{problem}: {reason}")
        self._client.log.warn(
            "closing connection: {problem} (type={msg_type}, reason={reason}, size={size}) "
            "frame={frame} agent_id={agent_id} url={url}",
            problem=problem,
            msg_type=msg_type,
            reason=reason,
            size=len(payload),
            frame=_preview(payload),
            close_code=code,
            **self._client._log_fields(),
        )
        self._client._connection_closing(self, f"{problem}: {reason}")
        self.close(code, problem)

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        timeout = self._client.settings.hello_timeout
        reason = f"no agent.hello_ack within {timeout:g}s"
        self._note_failure(reason)
        self._client.log.warn(
            "closing connection: {reason} agent_id={agent_id} url={url}",
            reason=reason,
            **self._client._log_fields(),
        )
        self._client._connection_closing(self, reason)
        self.close(CLOSE_NORMAL, "hello timeout")

    def _send_ping(self) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        self._ping_seq += 1
        payload = struct.pack("!Q", self._ping_seq)
        self._outstanding_pings[payload] = self.factory.timer.seconds()
        self.sendPing(payload)
        self._client._emit("ping", sequence=self._ping_seq)
        if self._pong_timer is None:
            self._pong_timer = self.factory.timer.callLater(
                self._client.settings.pong_timeout, self._pong_timed_out
            )

    def onPong(self, payload: bytes) -> None:
        """A pong for one of our pings proves the peer alive up to that ping."""
        if payload in self._outstanding_pings:
            # Pongs come in order: this one answers every earlier ping too.
            for sent in list(self._outstanding_pings):
                del self._outstanding_pings[sent]
                if sent == payload:
                    break
            self._client._emit("pong", sequence=struct.unpack("!Q", payload)[0])
            if self._pong_timer is not None and self._pong_timer.active():
                self._pong_timer.cancel()
            self._pong_timer = None
            if self._outstanding_pings:
                # The oldest unanswered ping keeps its own deadline: a later
                # pong must not give it a fresh PONG_TIMEOUT.
                oldest = next(iter(self._outstanding_pings.values()))
                timer = self.factory.timer
                remaining = max(0.0, oldest + self._client.settings.pong_timeout - timer.seconds())
                self._pong_timer = timer.callLater(remaining, self._pong_timed_out)

    def _pong_timed_out(self) -> None:
        self._pong_timer = None
        reason = f"no pong within {self._client.settings.pong_timeout:g}s"
        self._client.log.warn(
            "aborting connection: {reason} (dead peer) agent_id={agent_id} url={url}",
            reason=reason,
            **self._client._log_fields(),
        )
        self._client._connection_closing(self, reason)
        # A dead peer will not answer a close frame: abort the TCP connection.
        self.abort(reason)

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        """
        Autobahn's close, plus our bound on the close handshake: whoever
        started it (us, the peer, or a 1009 for an oversized message), the
        TCP connection is aborted if it is still there after
        :attr:`HostlinkClient.close_timeout`.
        """
        text = (reasonUtf8 or b"").decode("utf-8", "replace")
        if self.failedByMe and not isReply and self.state == WebSocketProtocol.STATE_OPEN:
            # Autobahn failing the connection itself: a message over
            # MAX_MESSAGE_BYTES (1009), invalid UTF-8 (1007), a protocol
            # violation (1002).  Its own warning is muted; this is the line.
            self._client.log.warn(
                "closing connection: {reason} close_code={close_code} "
                "agent_id={agent_id} url={url}",
                reason=text,
                close_code=code,
                **self._client._log_fields(),
            )
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        if self.state == WebSocketProtocol.STATE_CLOSING and self._close_timer is None:
            if code is not None and not isReply:
                self._note_failure(f"closed by agent: code={code} reason={text}")
            self._client._connection_closing(self, self.failure or "closing")
            self._close_timer = self.factory.timer.callLater(
                self._client.close_timeout, self._close_timed_out
            )

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> bool | None:
        """The peer started (or answered) the close handshake."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            reason = (reasonRaw or b"").decode("utf-8", "replace")
            self._note_failure(f"closed by control plane: code={code} reason={reason}".strip())
        result: bool | None = super().onCloseFrame(code, reasonRaw)
        return result

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self.abort(f"close handshake not finished within {self._client.close_timeout:g}s")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Remember how the WebSocket ended, for the ``closed`` event."""
        self.close_info = (wasClean, code, reason)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        """The connection is gone: no timer of it may outlive it."""
        # With startTLS inside the TCP transport, only the protocol sees the
        # TLS failure; the connector reports the plain TCP end to the factory.
        self.lost_reason = reason
        self._cancel_timers()
        try:
            super().connectionLost(reason)
        finally:
            self._cancel_timers()


class HostlinkClientFactory(WebSocketClientFactory, ReconnectingClientFactory):
    """
    Builds :class:`HostlinkClientProtocol` connections and reconnects forever.

    What differs from Twisted's ``ReconnectingClientFactory``, and why:

    * **Delays** come from :class:`~hostlink_tw.backoff.Backoff` (``retry``):
      the reference agent's doubling from ``RECONNECT_MIN`` capped at
      ``RECONNECT_MAX`` with uniform ±25 % (or full) jitter, instead of
      factor *e* with Gaussian jitter that is stored back into ``delay``
      (it compounds, can pass ``maxDelay`` and even go negative), and
      independent of the Twisted version's first-delay arithmetic: the first
      retry waits ``RECONNECT_MIN`` from the start (the stock class reads a
      subclass's ``initialDelay`` only in ``resetDelay``).
      ``initialDelay``/``maxDelay``/``factor``/``jitter``/``delay``/``retries``
      mirror our values for introspection only.
    * **One attempt at a time** (``retry``): a retry is never scheduled while
      one is pending or a connection exists (the stock ``retry`` would start a
      second connection).  Each attempt opens a fresh connector (the stock
      class reuses one); the proxy is chosen when the client is built and the
      TLS options on the first ``wss://`` attempt, so a changed proxy
      environment or CA file takes effect on restart.
    * **Reset only on an active session** (``resetDelay``): called when the
      hello is acked, not on TCP connect, so a server that accepts and then
      refuses cannot make us spin.  It does not forget a pending retry (the
      stock one drops the handle, which then cannot be cancelled) and does
      not undo ``stopTrying``.
    * **Retries never stop**: ``maxRetries`` is ignored.
    * **stopTrying closes**: it cancels the pending retry and the handshake
      timer, stops a TCP connect in progress, and closes an established
      connection (the stock one leaves it open).
    """

    protocol = HostlinkClientProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        client: HostlinkClient,
        url: str,
        backoff: BackoffPolicy,
        reactor: Any,
        proxy: Proxy | None,
    ) -> None:
        WebSocketClientFactory.__init__(  # type: ignore[no-untyped-call]
            self,
            url=url,
            useragent=f"hostlink_tw/{__version__}",
            proxy={"host": proxy.host, "port": proxy.port} if proxy is not None else None,
            reactor=reactor,
        )
        settings = client.settings
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            # Limits: refuse (1009) instead of buffering an oversized message;
            # failByDrop=False so the peer sees the close code.
            maxFramePayloadSize=settings.max_message_bytes,
            maxMessagePayloadSize=settings.max_message_bytes,
            failByDrop=False,
            # Our own timers on the reactor replace Autobahn's txaio ones.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            serverConnectionDropTimeout=0,
            autoPingInterval=0,
        )
        self.client = client
        self.backoff = backoff
        self.clock = reactor
        #: The reactor, typed: every timer of the client runs on it.
        self.timer: _Reactor = reactor
        self.initialDelay = backoff.minimum
        self.maxDelay = backoff.maximum  # type: ignore[assignment]
        self.factor = 2.0
        self.jitter = GO_JITTER if backoff.jitter == "go" else 1.0
        self.delay = backoff.minimum
        self.retries = 0
        self.continueTrying = 0
        self.contextFactory: Any = None
        self._attempt_open = False
        self._handshake_timer: _DelayedCall | None = None
        # Our handle on the pending retry (the stock class's _callID, typed).
        self._retry_call: _DelayedCall | None = None

    # -- attempts ------------------------------------------------------------------

    def start_trying(self) -> None:
        """Start connecting now (after ``stopTrying``, too); a no-op while trying."""
        if self.continueTrying:
            return
        self.continueTrying = 1
        self.backoff.reset()
        self._sync_rcf_fields()
        self._begin_attempt()

    def _begin_attempt(self) -> None:
        self._retry_call = None
        if not self.continueTrying or self._attempt_open:
            return
        self._attempt_open = True
        # The last attempt's connector is not this attempt's to stop.
        self.connector = None
        self.client._attempt_started()
        if not self.continueTrying:
            # An observer of the ``attempt`` event stopped the client: end
            # this attempt before it connects, which completes the stop.
            stopped = ConnectError(string="stopped before connecting")  # type: ignore[no-untyped-call]
            self._attempt_ended(None, Failure(stopped), None)  # type: ignore[no-untyped-call]
            return
        self._handshake_timer = self.timer.callLater(
            self.client.settings.handshake_timeout, self._handshake_timed_out
        )
        try:
            if self.client._proxy_error is not None:
                raise self.client._proxy_error
            if self.isSecure and self.contextFactory is None:
                self.contextFactory = client_tls_options(self.host, self.client.settings.ca_file)
            proxy = self.client.proxy
            host, port = (proxy.host, proxy.port) if proxy is not None else (self.host, self.port)
            # The TCP connect timeout is only a backstop: our handshake timer
            # bounds connect + proxy + TLS + upgrade together.
            self.connector = self.timer.connectTCP(
                host, port, self, timeout=self.client.settings.handshake_timeout + 1
            )
        except (TLSConfigError, OSError, ValueError) as e:
            self.client.log.error(
                "cannot connect: {error} agent_id={agent_id} url={url}",
                error=str(e),
                **self.client._log_fields(),
            )
            self._attempt_ended(None, Failure(e), None)  # type: ignore[no-untyped-call]

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        proto = self.client._protocol
        if proto is None:
            phase = "name lookup or TCP connect"
        elif proto.state == WebSocketProtocol.STATE_PROXY_CONNECTING:
            phase = "proxy CONNECT"
        else:
            phase = "TLS handshake or upgrade response"
        # Naming the phase tells an operator a hung resolver from a stalled
        # control plane.
        reason = (
            f"connect and upgrade not done within "
            f"{self.client.settings.handshake_timeout:g}s (stuck in {phase})"
        )
        self.client.log.warn(
            "giving up this attempt: {reason} agent_id={agent_id} url={url}",
            reason=reason,
            **self.client._log_fields(),
        )
        if proto is not None:
            proto.abort(reason)
        else:
            self.client._pending_failure = reason
            connector = self.connector
            if connector is not None:
                try:
                    connector.stopConnecting()
                except Exception:  # noqa: BLE001 - the attempt is over either way
                    self.client.log.failure("stopConnecting failed")

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def buildProtocol(self, addr: Any) -> Any:
        """A protocol for the TCP connection of the current attempt."""
        proto: Any = WebSocketClientFactory.buildProtocol(self, addr)
        self.client._tcp_connected(proto)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """TCP connect failed (refused, unreachable, timeout, stopped)."""
        self._attempt_ended(connector, reason, None)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """An established TCP connection ended (whatever happened above TCP)."""
        self._attempt_ended(connector, reason, self.client._protocol)

    def _attempt_ended(
        self, connector: Any, reason: Failure, proto: HostlinkClientProtocol | None
    ) -> None:
        if not self._attempt_open:
            self.client.log.debug("ignoring the end of a connection that was not ours")
            return
        self._attempt_open = False
        self._cancel_handshake_timer()
        self.connector = connector
        self.client._attempt_ended(reason, proto)
        if self.continueTrying:
            self.retry()

    def retry(self, connector: Any = None) -> None:
        """
        Schedule the next attempt after the next backoff delay.

        A no-op after ``stopTrying``, while a retry is already pending, or
        while an attempt is in progress: there is never more than one.
        """
        if not self.continueTrying:
            return
        if self._retry_call is not None and self._retry_call.active():
            self.client.log.debug("retry already scheduled")
            return
        if self._attempt_open:
            self.client.log.debug("not retrying: an attempt is in progress")
            return
        delay = self.backoff.next_delay()
        self._sync_rcf_fields()
        self._retry_call = self.timer.callLater(delay, self._begin_attempt)
        self.client._retry_scheduled(delay, self.timer.seconds() + delay)

    def resetDelay(self) -> None:
        """A session became active: the next failure waits ``RECONNECT_MIN`` again."""
        self.backoff.reset()
        self._sync_rcf_fields()

    def stopTrying(self) -> None:
        """
        No more attempts: cancel the pending retry and the handshake timer,
        stop a TCP connect in progress and close the connection (a close
        frame when the WebSocket is open, an abort before that).
        """
        self.continueTrying = 0
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if not self._attempt_open:
            return
        proto = self.client._protocol
        if proto is not None:
            proto.close(CLOSE_NORMAL, "agent stopping")
        elif self.connector is not None:
            self._cancel_handshake_timer()
            try:
                self.connector.stopConnecting()
            except Exception:  # noqa: BLE001 - e.g. NotConnectingError: already over
                self.client.log.failure("stopConnecting failed")

    @property
    def retry_pending(self) -> bool:
        """Whether a retry is scheduled."""
        return self._retry_call is not None and self._retry_call.active()

    @property
    def attempt_open(self) -> bool:
        """Whether an attempt (TCP connect or connection) is in progress."""
        return self._attempt_open

    def _sync_rcf_fields(self) -> None:
        self.retries = self.backoff.failures
        self.delay = self.backoff.peek_base()


class HostlinkClient:
    """
    The agent's connection to the control plane, kept up until :meth:`stop`.

    :param settings: a :class:`hostlink_tw.config.Settings` (or anything with
        the attributes of :class:`ClientSettings`).
    :param signer: signs each upgrade; its ``agent_id`` is the agent's id.
    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``; the global
        reactor by default.
    :param rng: the source of jitter; inject a seeded one in tests.
    :param log: where log events go.
    :param environ: the environment for ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``;
        ``os.environ`` by default.
    :param close_timeout: how long a close handshake may take before the
        connection is aborted.
    :param backoff: the retry delays; by default a :class:`Backoff` from the
        settings' reconnect min/max/jitter.

    :raises ValueError: ``settings.ws_url`` is not a ``ws://``/``wss://`` URL,
        or the reconnect settings are unusable.

    State for callers (times are the reactor's ``seconds()``):

    :ivar url: the WebSocket URL (``snapshot()`` shows it without credentials).
    :ivar agent_id: the signer's agent id.
    :ivar state: the :class:`ClientState`.
    :ivar last_ack: the last ``agent.hello_ack`` or ``ack`` envelope received.
    :ivar last_ack_at: when it arrived.
    :ivar connected_since: when the current WebSocket opened; None without one.
    :ivar attempts: connection attempts since the last active session.
    :ivar last_failure: why the last connection or attempt ended (None once a
        session is active again).
    :ivar next_retry_at: when the pending retry is due; None when none is.
    :ivar current_delay: the delay of the pending retry; None when none is.
    :ivar proxy: the :class:`~hostlink_tw.proxy.Proxy` in use, or None.
    """

    def __init__(
        self,
        settings: ClientSettings,
        signer: RequestSigner,
        *,
        reactor: Any = None,
        rng: random.Random | None = None,
        log: Logger | None = None,
        environ: Mapping[str, str] | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings
        self.signer = signer
        self.log = log if log is not None else Logger(namespace="hostlink_tw.client")
        self.close_timeout = close_timeout
        self.url = settings.ws_url
        self.agent_id = signer.agent_id
        self._display_url = redact_url(self.url)
        self._reactor: _Reactor = reactor
        self._proxy_error: UnsupportedProxyError | None = None
        try:
            self.proxy: Proxy | None = proxy_for(
                self.url, os.environ if environ is None else environ
            )
        except UnsupportedProxyError as e:
            # Fail closed, as Go's dialer does for a proxy it cannot use:
            # connecting directly would bypass the operator's egress policy.
            self.proxy = None
            self._proxy_error = UnsupportedProxyError(
                f"{e}; not connecting around it (use an http:// proxy, or list the "
                "control plane's host in NO_PROXY to connect directly)"
            )
            self.log.error(
                "unusable proxy setting: {error} url={url}",
                error=str(self._proxy_error),
                url=self._display_url,
            )
        if backoff is None:
            backoff = Backoff(
                settings.reconnect_min, settings.reconnect_max, settings.reconnect_jitter, rng
            )
        self._factory = HostlinkClientFactory(self, self.url, backoff, reactor, self.proxy)

        self.state = ClientState.IDLE
        self.last_ack: Envelope | None = None
        self.last_ack_at: float | None = None
        self.connected_since: float | None = None
        self.attempts = 0
        self.last_failure: str | None = None
        self.next_retry_at: float | None = None
        self.current_delay: float | None = None
        self._protocol: HostlinkClientProtocol | None = None
        self._pending_failure: str | None = None
        self._observers = Observers(self.log)
        self._active_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._warned_plaintext = False

    # -- public API ----------------------------------------------------------------

    @property
    def factory(self) -> HostlinkClientFactory:
        """The reconnecting factory (for tests and introspection)."""
        return self._factory

    @property
    def is_active(self) -> bool:
        """Whether a session is active (its hello acked and not ending)."""
        return self.state is ClientState.ACTIVE

    def start(self) -> None:
        """
        Connect, and keep reconnecting until :meth:`stop`.  A no-op while
        running or stopping; after a completed ``stop()`` it starts afresh.
        """
        if self.state not in (ClientState.IDLE, ClientState.STOPPED):
            return
        self._warn_plaintext_once()
        self.attempts = 0
        self._set_state(ClientState.CONNECTING, "starting")
        self._factory.start_trying()

    def stop(self) -> Deferred[None]:
        """
        Close the connection and stop reconnecting.

        An open session gets a close frame (1000) and :attr:`close_timeout`
        to finish the close handshake before the TCP connection is aborted;
        a connection still being set up is aborted; a pending retry is
        cancelled.  The Deferred fires when the connection is gone and no
        timer of the client is left in the reactor.  Safe in every state and
        when called again (every call's Deferred fires then).
        """
        if self.state in (ClientState.IDLE, ClientState.STOPPED):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self.state is ClientState.STOPPING:
            return d
        self.log.info("stopping agent_id={agent_id} url={url}", **self._log_fields())
        self._set_state(ClientState.STOPPING, "agent stopping")
        self._factory.stopTrying()
        # stopTrying may end the attempt synchronously (a TCP connect is
        # stopped at once), which already finished the stop.
        if self._in_state(ClientState.STOPPING) and not self._factory.attempt_open:
            self._finish_stop()
        return d

    def when_active(self) -> Deferred[None]:
        """
        A Deferred that fires (with None) when a session is active: at once
        if one is, otherwise when the next one becomes active.  Cancel it to
        stop waiting; a stopped client does not fire it until started again.
        """
        if self.is_active:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            if d in self._active_waiters:
                self._active_waiters.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._active_waiters.append(d)
        return d

    def add_observer(self, observer: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """
        Call ``observer`` with every :class:`ClientEvent` from now on.

        Returns a function that unsubscribes it.  An observer that raises is
        logged and otherwise ignored.
        """
        return self._observers.add(observer)

    def snapshot(self) -> dict[str, Any]:
        """The client's state as JSON-able values (for the status endpoint)."""
        last_ack = None
        if self.last_ack is not None:
            last_ack = {
                "type": self.last_ack.type,
                "message_id": self.last_ack.message_id,
                "acked_message_id": self.last_ack.payload.get("acked_message_id"),
            }
        return {
            "state": self.state.value,
            "active": self.is_active,
            "agent_id": self.agent_id,
            "url": self._display_url,
            "proxy": self.proxy.display if self.proxy is not None else None,
            "connected_since": self.connected_since,
            "last_ack": last_ack,
            "last_ack_at": self.last_ack_at,
            "attempts": self.attempts,
            "last_failure": self.last_failure,
            "next_retry_at": self.next_retry_at,
            "current_delay": self.current_delay,
        }

    # -- events and state ----------------------------------------------------------

    def _in_state(self, state: ClientState) -> bool:
        # A method, not an inline test: callbacks may have changed the state
        # since the caller last looked (mypy's narrowing cannot see that).
        return self.state is state

    def _log_fields(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "url": self._display_url}

    def _emit(self, kind: str, **fields: Any) -> None:
        self._observers.notify(ClientEvent(kind, fields))

    def _set_state(self, new: ClientState, reason: str) -> None:
        old, self.state = self.state, new
        if old is ClientState.ACTIVE and new is not ClientState.ACTIVE:
            self._emit("inactive", reason=reason)

    def _warn_plaintext_once(self) -> None:
        if self._warned_plaintext or self._factory.isSecure:
            return
        if _is_loopback_host(self._factory.host):
            return
        self._warned_plaintext = True
        self.log.warn(
            "{url} is not encrypted: the signed upgrade headers (agent id, timestamp, nonce, "
            "signature) and every message travel in clear text; use wss:// "
            "agent_id={agent_id}",
            **self._log_fields(),
        )

    # -- called by the factory and the protocol ------------------------------------

    def _attempt_started(self) -> None:
        self.attempts += 1
        self.next_retry_at = None
        self.current_delay = None
        self._pending_failure = None
        self._set_state(ClientState.CONNECTING, "connecting")
        via = f" via proxy {self.proxy.display}" if self.proxy is not None else ""
        self.log.info(
            "connecting to {url}{via} attempt={attempt} agent_id={agent_id}",
            via=via,
            attempt=self.attempts,
            **self._log_fields(),
        )
        self._emit("attempt", attempt=self.attempts, url=self._display_url)

    def _tcp_connected(self, proto: HostlinkClientProtocol) -> None:
        self._protocol = proto

    def _connection_opened(self, proto: HostlinkClientProtocol) -> None:
        self._factory._cancel_handshake_timer()
        self.connected_since = self._reactor.seconds()
        self._set_state(ClientState.AWAITING_ACK, "connected")
        self.log.info(
            "connected to {url}, sending agent.hello attempt={attempt} agent_id={agent_id}",
            attempt=self.attempts,
            **self._log_fields(),
        )
        self._emit("connected", attempt=self.attempts, url=self._display_url)

    def _ack_received(self, envelope: Envelope) -> None:
        self.last_ack = envelope
        self.last_ack_at = self._reactor.seconds()

    def _session_active(self, proto: HostlinkClientProtocol) -> None:
        if self.state is not ClientState.AWAITING_ACK:
            return
        proto.activated = True
        self._factory.resetDelay()
        self.attempts = 0
        self.last_failure = None
        self._set_state(ClientState.ACTIVE, "active")
        self.log.info(
            "session active agent_id={agent_id} url={url} hello={hello_id}",
            hello_id=proto.hello_id,
            **self._log_fields(),
        )
        self._emit("active", message_id=proto.hello_id)
        waiters, self._active_waiters = self._active_waiters, []
        for d in waiters:
            d.callback(None)

    def _connection_closing(self, proto: HostlinkClientProtocol, reason: str) -> None:
        if proto is self._protocol and self.state in (
            ClientState.CONNECTING,
            ClientState.AWAITING_ACK,
            ClientState.ACTIVE,
        ):
            self._set_state(ClientState.CLOSING, reason)

    def _attempt_ended(self, reason: Failure, proto: HostlinkClientProtocol | None) -> None:
        if proto is not None and proto.lost_reason is not None:
            reason = proto.lost_reason
        self._protocol = None
        self.connected_since = None
        code: int | None = None
        clean = False
        failure = proto.failure if proto is not None else None
        failure = failure or self._pending_failure
        if proto is not None and proto.close_info is not None:
            clean = proto.close_info[0]
            if proto.remoteCloseCode is not None:
                code = proto.remoteCloseCode
            elif proto.localCloseCode is not None:
                code = proto.localCloseCode
        tls = is_tls_failure(reason)
        if failure is None:
            if tls:
                failure = f"TLS failed: {describe_tls_failure(reason, self._factory.host)}"
            elif proto is not None and proto.remoteCloseCode is not None and not proto.closedByMe:
                failure = (
                    f"closed by control plane: code={proto.remoteCloseCode} "
                    f"reason={proto.remoteCloseReason or ''}"
                ).strip()
            elif proto is not None and proto.opened:
                failure = f"connection lost: {_describe_reason(reason)}"
            else:
                failure = f"connection failed: {_describe_reason(reason)}"
        stopping = self.state is ClientState.STOPPING
        if proto is not None and proto.refused_status is not None:
            status = proto.refused_status
            hint = _HINTS.get(status) or (_HINT_5XX if 500 <= status <= 599 else "")
            # The reason names the status ("upgrade refused: HTTP 401 ...",
            # or "upgrade not accepted (expected 101): HTTP 200 OK").
            self.log.warn(
                "{reason}; {hint} agent_id={agent_id} url={url} attempt={attempt}",
                status=status,
                reason=failure,
                hint=hint or "retrying with backoff",
                attempt=self.attempts,
                **self._log_fields(),
            )
            self._emit("refused", status=status, reason=failure)
        elif tls and not stopping:
            self.log.error(
                "{reason} (connecting to {url}) agent_id={agent_id} attempt={attempt}",
                reason=failure,
                attempt=self.attempts,
                **self._log_fields(),
            )
        else:
            # Losing an active session is news; another failed attempt during
            # an outage is not (the retry line follows anyway).
            emit = (
                self.log.warn
                if proto is not None and proto.activated and not stopping
                else (self.log.info)
            )
            emit(
                "connection ended: {reason} close_code={close_code} "
                "agent_id={agent_id} url={url} attempt={attempt}",
                reason=failure,
                close_code=code,
                attempt=self.attempts,
                **self._log_fields(),
            )
        if not stopping:
            self.last_failure = failure
            self._set_state(ClientState.CLOSING, failure)
        self._emit("closed", code=code, reason=failure, clean=clean)
        if stopping:
            self._finish_stop()

    def _retry_scheduled(self, delay: float, at: float) -> None:
        self.current_delay = delay
        self.next_retry_at = at
        self._set_state(ClientState.WAITING, self.last_failure or "waiting")
        self.log.info(
            "reconnecting in {delay:.2f}s agent_id={agent_id} url={url} attempt={attempt}",
            delay=delay,
            attempt=self.attempts + 1,
            **self._log_fields(),
        )
        self._emit("retry_scheduled", delay=delay, at=at)

    def _finish_stop(self) -> None:
        self.next_retry_at = None
        self.current_delay = None
        self.connected_since = None
        self._set_state(ClientState.STOPPED, "stopped")
        self.log.info("stopped agent_id={agent_id} url={url}", **self._log_fields())
        self._emit("stopped")
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
