"""
The agent gateway: the server side of the WebSocket protocol, over Autobahn.

One :class:`GatewayProtocol` per agent connection: the upgrade is
authenticated (:mod:`hostlink_tw.controlplane.upgrade`) and refused with a
short HTTP answer and one log line, or accepted as a
:class:`~hostlink_tw.controlplane.sessions.Session`; then every frame is
parsed and validated against the authenticated agent id (a bad one gets an
``error`` envelope and a close) and handed to the message handlers
(:mod:`hostlink_tw.controlplane.inbound`).  Our keepalive pings on the
injected reactor; a peer that stops reading is aborted once
``max_send_buffer_bytes`` wait to be sent to it.

:class:`GatewayFactory` holds what its connections share (among them the
:class:`~hostlink_tw.controlplane.hooks.GatewayHooks` a layer on top may
set), and builds the listener's factory (:attr:`GatewayFactory.connections`):
every TCP connection tracked, and the listener's HTTP
(:mod:`~hostlink_tw.controlplane.gatewaysite`) with the agent API of §9.1
beside the upgrade (:attr:`GatewayFactory.api`, same authentication, same
replay memory).  The task side attached to the handlers
(:meth:`GatewayFactory.attach_tasks`) serves both.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.controlplane.agentapi import AgentAPI, AgentTasks
from hostlink_tw.controlplane.connections import (
    ConnectionTracker,
    TrackedConnection,
    buffered_bytes,
    format_address,
)
from hostlink_tw.controlplane.gatewaysite import gateway_site
from hostlink_tw.controlplane.hooks import GatewayHooks
from hostlink_tw.controlplane.inbound import InboundHandlers, TaskHandling, printable
from hostlink_tw.controlplane.sessions import NoSessionError, Session, SessionRegistry
from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.upgrade import (
    ConnectionAttempt,
    UpgradeAuthenticator,
    UpgradeRefusedError,
)
from hostlink_tw.controlplane.web import reason_phrase
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.errors import (
    DUPLICATE_KEY,
    INVALID_JSON,
    INVALID_UTF8,
    NESTING_TOO_DEEP,
    NUMBER_OUT_OF_RANGE,
    ProtocolError,
)
from hostlink_tw.wire.payloads import error_payload
from hostlink_tw.wire.vocabulary import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    ERROR,
    GATEWAY_PATH,
    HEADER_AGENT_ID,
    MAX_FRAMES_PER_MESSAGE,
)

__all__ = ["GatewayFactory", "GatewayProtocol"]

log = Logger()

# Frames that fail before there is any JSON object to look at: close 1007.
_PAYLOAD_ERRORS = frozenset(
    {INVALID_UTF8, INVALID_JSON, NESTING_TOO_DEEP, NUMBER_OUT_OF_RANGE, DUPLICATE_KEY}
)


class GatewayProtocol(WebSocketServerProtocol):
    """One agent connection: the authenticated upgrade, then the session."""

    # Autobahn's debug lines would show the request headers, signature and
    # nonce included: pin its logger at warn whatever the global level.
    log = txaio.make_logger(level="warn")  # type: ignore[attr-defined]

    factory: GatewayFactory
    _agent_id: str | None = None
    _session: Session | None = None
    _attempt_recorded = False
    _ping_call: Any = None
    _pong_deadline: Any = None
    _ping_payload: bytes | None = None
    _send_aborted = False
    _peak_buffered = 0

    @property
    def remote(self) -> str:
        """The peer as ``host:port``."""
        transport: Any = self.transport
        if transport is None:
            return "-"
        return format_address(transport.getPeer())

    # -- connection lifetime ------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.hooks.released(self)
        self._stop_keepalive()
        # Autobahn leaves a pending close-handshake timer behind when the
        # peer vanishes mid-close; cancel it so nothing outlives the socket.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None
        super().connectionLost(reason)
        # Autobahn resolves is_closed with the protocol itself, a cycle that
        # keeps a dead session's buffers until the cycle collector runs
        # (docs/upstream.rst); a fired future without the reference replaces it.
        self.is_closed = txaio.create_future_success(None)  # type: ignore[attr-defined]

    # -- message assembly bound -----------------------------------------------

    _frames = 0

    def onMessageBegin(self, isBinary: bool) -> None:
        self._frames = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        self._frames += 1
        if self._frames > MAX_FRAMES_PER_MESSAGE and not self.failedByMe:
            # Endless empty fragments: stop keeping them and close (1009).
            self.failedByMe = True
            log.warn(
                "closing session: more than {limit} frames in one message agent_id={agent_id} "
                "remote={remote}",
                limit=MAX_FRAMES_PER_MESSAGE,
                agent_id=self._agent_id,
                remote=self.remote,
            )
            self.close_with(CLOSE_TOO_BIG, "message too fragmented")
        super().onMessageFrameBegin(length)

    # -- the upgrade ----------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:
        gateway = self.factory
        if request.path != GATEWAY_PATH:
            raise self._deny(request, 404, "not found")
        if gateway.connections.upgraded_count >= gateway.settings.max_connections:
            raise self._deny(request, 503, "too many connections")
        refusal = gateway.hooks.refusal()
        if refusal is not None:
            raise self._deny(request, refusal[0], refusal[1])
        held = gateway.hooks.hold(self)
        if held is not None:
            # Held unanswered (the client's handshake timeout is the only way
            # out) until the hook releases it into the normal path.
            if isinstance(self.transport, TrackedConnection):
                self.transport.hold()
            held.addCallback(lambda _: self._authenticate(request))
            return held
        return self._authenticate(request)

    def _authenticate(self, request: ConnectionRequest) -> Deferred[None] | None:
        authenticator = self.factory.authenticator
        try:
            credentials = authenticator.check(request.headers)
        except UpgradeRefusedError as refused:
            raise self._deny(request, refused.status, refused.reason) from None
        self._agent_id = credentials.agent_id
        stored = authenticator.commit(credentials)
        if stored is None:
            self._record(request, 101, "accepted")
            return None

        # Answered once the nonce is on disk: a restart must not accept it again.
        def committed(_: object) -> None:
            self._record(request, 101, "accepted")

        def failed(failure: Failure) -> None:
            log.error(
                "replay store write failed, refusing the upgrade: {error}",
                error=str(failure.value),
            )
            raise self._deny(request, 503, "replay store unavailable, try again later")

        return stored.addCallbacks(committed, failed)

    def _deny(self, request: ConnectionRequest, status: int, reason: str) -> ConnectionDeny:
        self._record(request, status, reason)
        return ConnectionDeny(status, reason)  # type: ignore[no-untyped-call]

    def _record(self, request: ConnectionRequest | None, status: int, reason: str) -> None:
        if self._attempt_recorded:
            return
        self._attempt_recorded = True
        headers: Mapping[str, str] = {}
        path = "-"
        if request is not None:
            headers, path = request.headers, request.path
        elif isinstance(getattr(self, "http_headers", None), dict):
            headers = self.http_headers
        self.factory.hooks.judged(
            ConnectionAttempt.judged(
                headers,
                at=self.factory.clock(),
                remote=self.remote,
                path=path,
                status=status,
                reason=reason,
            )
        )

    def failHandshake(
        self, reason: str, code: int = 400, responseHeaders: Iterable[tuple[str, str]] | None = None
    ) -> None:
        """
        Refuse the upgrade: an HTTP error with the reason as a short text body,
        and exactly one log line (no headers, no traceback).
        """
        self._record(None, code, reason)
        headers = getattr(self, "http_headers", None) or {}
        log.warn(
            "upgrade refused: {reason} (HTTP {status}) agent_id={agent_id} remote={remote}",
            reason=reason,
            status=code,
            agent_id=printable(headers.get(HEADER_AGENT_ID.lower())),
            remote=self.remote,
        )
        self.wasNotCleanReason = reason
        # A refused upgrade is a complete HTTP exchange, not an unclean
        # WebSocket close: this keeps Autobahn from logging it a second time.
        self.wasClean = True
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.dropConnection(abort=False)

    def sendHttpErrorResponse(
        self, code: int, reason: str, responseHeaders: Iterable[tuple[str, str]] | None = None
    ) -> None:
        """An HTTP error response whose body is the reason (Autobahn sends none)."""
        body = (reason + "\n").encode("utf-8")
        lines = [
            f"HTTP/1.1 {code} {reason_phrase(code)}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines.extend(f"{name}: {value}" for name, value in responseHeaders or ())
        self.sendData(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)

    # -- the session ----------------------------------------------------------

    def onOpen(self) -> None:
        assert self._agent_id is not None
        gateway = self.factory
        if isinstance(self.transport, TrackedConnection):
            self.transport.upgrade_accepted()
        self._session = Session(self, self._agent_id, self.remote, gateway.clock())
        gateway.sessions.opened(self._session)
        if gateway.settings.ping_interval > 0:
            self._ping_call = gateway.reactor.callLater(gateway.settings.ping_interval, self._ping)

    def dataReceived(self, data: bytes) -> None:
        # One read is one batch: the output it brings is stored in one
        # transaction and acked once per stream (TaskIntake.batch).
        with self.factory.handlers.batch(self):
            super().dataReceived(data)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is None or session.closed or self.state != self.STATE_OPEN:
            return
        gateway = self.factory
        session.last_message_at = gateway.clock()
        session.messages_in += 1
        if isBinary:
            self.refuse(CLOSE_POLICY, "binary_frame", "binary frames are not accepted", "")
            return
        try:
            envelope = Envelope.from_json(payload)
        except ProtocolError as e:
            code = CLOSE_INVALID_PAYLOAD if e.code in _PAYLOAD_ERRORS else CLOSE_POLICY
            self.refuse(code, e.code, e.message, "")
            return
        try:
            envelope.validate(session.agent_id)
        except ProtocolError as e:
            self.refuse(CLOSE_POLICY, e.code, e.message, envelope.message_id)
            return
        gateway.hooks.inbound(session, envelope, len(payload))
        gateway.handlers.handle(self, session, envelope)
        # After handling, so a waiter sees the answer (hello_ack) already sent.
        gateway.sessions.message_received(session, envelope)

    def refuse(self, close_code: int, code: str, message: str, related: str) -> None:
        """Answer a bad frame with an ``error`` envelope, then close."""
        session = self._session
        assert session is not None
        log.warn(
            "invalid frame agent_id={agent_id} remote={remote} code={code}: {message}",
            agent_id=session.agent_id,
            remote=session.remote,
            code=code,
            message=printable(message, 200),
        )
        self.send_envelope(
            make_envelope(
                ERROR,
                session.agent_id,
                error_payload(code, message, False, related),
                now=self.factory.clock(),
            )
        )
        self.close_with(close_code, code)

    # -- keepalive -------------------------------------------------------------

    def _ping(self) -> None:
        settings, reactor = self.factory.settings, self.factory.reactor
        self._ping_call = reactor.callLater(settings.ping_interval, self._ping)
        if self.state != self.STATE_OPEN:
            return
        # One ping outstanding at a time, with one deadline: a peer that
        # keeps not answering must not push it further away with every ping.
        if self._ping_payload is not None and settings.ping_timeout > 0:
            return
        # Random, and checked on the pong: a peer that never reads our
        # frames cannot answer it, so it cannot keep a dead session alive.
        self._ping_payload = os.urandom(16)
        self.sendPing(self._ping_payload)
        if settings.ping_timeout > 0:
            self._pong_deadline = reactor.callLater(settings.ping_timeout, self._pong_missed)

    def onPong(self, payload: bytes) -> None:
        expected = self._ping_payload
        if expected is None or not hmac.compare_digest(payload, expected):
            # Unsolicited pongs are allowed (RFC 6455 §5.5.3), but prove nothing.
            return
        self._ping_payload = None
        if self._pong_deadline is not None:
            self._pong_deadline.cancel()
            self._pong_deadline = None

    def _pong_missed(self) -> None:
        self._pong_deadline = None
        session = self._session
        log.warn(
            "no pong within {timeout}s, dropping agent_id={agent_id} remote={remote}",
            timeout=self.factory.settings.ping_timeout,
            agent_id=session.agent_id if session is not None else "-",
            remote=self.remote,
        )
        self.abort()

    def _stop_keepalive(self) -> None:
        for name in ("_ping_call", "_pong_deadline"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def onPing(self, payload: bytes) -> None:
        if self._session is not None:
            self._session.pings_received += 1
        if self.factory.hooks.answer_ping():
            super().onPing(payload)

    # -- sending and closing -------------------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Every byte we send passes here (the upgrade answer, frames, Autobahn's
        own pongs and close frames): once the peer stops reading and more
        than ``max_send_buffer_bytes`` wait in our buffers, the connection is
        aborted, so a peer flooding pings it never reads cannot grow our
        memory.
        """
        if self._send_aborted:
            return
        super().sendData(data, sync, chopsize)
        buffered = buffered_bytes(self.transport) + sum(len(e[0]) for e in self.send_queue)
        if buffered > self._peak_buffered:
            self._peak_buffered = buffered
            if self._session is not None:
                self._session.peak_send_buffer = buffered
        limit = self.factory.settings.max_send_buffer_bytes
        if buffered > limit:
            self._send_aborted = True
            log.warn(
                "peer is not reading: {buffered} bytes waiting to be sent (limit {limit}), "
                "dropping agent_id={agent_id} remote={remote}",
                buffered=buffered,
                limit=limit,
                agent_id=self._agent_id or "-",
                remote=self.remote,
            )
            self.abort()

    def send_envelope(self, envelope: Envelope) -> None:
        """Send one envelope as a text frame."""
        self.send_frame(envelope.to_json().encode("utf-8"), is_binary=False)

    def send_frame(self, data: bytes, *, is_binary: bool) -> None:
        """Send one message frame and count it."""
        if self.state != self.STATE_OPEN:
            raise NoSessionError(self._agent_id)
        self.sendMessage(data, isBinary=is_binary)  # type: ignore[no-untyped-call]
        if self._session is not None:
            self._session.messages_out += 1

    def close_with(self, code: int, reason: str = "") -> None:
        """Send a close frame with any code (Autobahn's sendClose refuses 1001/1008/…)."""
        if self.state == self.STATE_OPEN:
            encoded = reason.encode("utf-8")[:123] if reason else None
            self.sendCloseFrame(code=code, reasonUtf8=encoded, isReply=False)

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        transport: Any = self.transport  # a TCP or TLS transport: it can abort
        if transport is not None:
            transport.abortConnection()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session = self._session
        if session is None:
            return
        if self.closedByMe and self.localCloseCode is not None:
            close_code: int | None = self.localCloseCode
            close_reason = (self.localCloseReason or b"").decode("utf-8", "replace")
        elif wasClean:
            close_code, close_reason = code, reason
        else:
            close_code, close_reason = CLOSE_ABNORMAL, "connection lost"
        log.info(
            "session ended agent_id={agent_id} remote={remote} duration={duration:.3f}s "
            "close_code={close_code} in={messages_in} out={messages_out}",
            agent_id=session.agent_id,
            remote=session.remote,
            duration=self.factory.clock() - session.connected_since,
            close_code=close_code,
            messages_in=session.messages_in,
            messages_out=session.messages_out,
        )
        session.ended(close_code, close_reason)
        self.factory.sessions.closed(session)


class _Handlers(InboundHandlers):
    """
    The sessions' message handlers.  The task side attached to them (what
    the control plane attaches) serves the agent API too: one attachment,
    so the two paths never serve different task sides.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        hooks: GatewayHooks,
        sessions: SessionRegistry,
        api: AgentAPI,
    ) -> None:
        super().__init__(clock, hooks, sessions)
        self._api = api

    def attach_tasks(self, tasks: TaskHandling) -> None:
        super().attach_tasks(tasks)
        if isinstance(tasks, AgentTasks):
            self._api.attach_tasks(tasks)


class GatewayFactory(WebSocketServerFactory):
    """
    What the gateway's connections share (settings, the authenticator, the
    session registry, the message handlers, the hooks), and the listener's
    factory built around it: :attr:`connections`.
    """

    protocol = GatewayProtocol  # type: ignore[assignment]

    def __init__(
        self,
        settings: ControlPlaneSettings,
        authenticator: UpgradeAuthenticator,
        sessions: SessionRegistry,
        hooks: GatewayHooks,
        *,
        clock: Callable[[], float],
        reactor: Any,
    ) -> None:
        """
        :param clock: Wall-clock Unix time (sessions' timestamps, ``sent_at``).
        :param reactor: Runs our timers (keepalive, handshake deadline).
        """
        super().__init__(url="ws://127.0.0.1", server="hostlink-controlplane")  # type: ignore[no-untyped-call]
        self.settings = settings
        self.authenticator = authenticator
        self.sessions = sessions
        self.hooks = hooks
        self.clock = clock
        self.reactor = reactor
        #: The agent API of §9.1 on this listener (a report is bounded as a frame is).
        self.api = AgentAPI(authenticator, clock, settings.max_message_bytes)
        self.handlers = _Handlers(clock, hooks, sessions, self.api)
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            webStatus=False,
            # Invalid UTF-8 must reach onMessage, so the agent gets an error
            # envelope before the 1007 close.
            utf8validateIncoming=False,
            maxFramePayloadSize=settings.max_message_bytes,
            maxMessagePayloadSize=settings.max_message_bytes,
            # Close with 1009/1002 instead of dropping TCP, so peers see why.
            failByDrop=False,
            # The upgrade is answered synchronously; the handshake deadline
            # is enforced per TCP connection by TrackedConnection instead.
            openHandshakeTimeout=0,
            # Autobahn rounds this deadline down to a whole second: 1 s (its
            # default) could abort after a few ms, before a distant agent's
            # close reply; the frame with our code is out either way.
            closeHandshakeTimeout=3,
            # Keepalive runs on our reactor (see GatewayProtocol._ping):
            # Autobahn's batched timers round deadlines down to whole
            # seconds, which makes short pong timeouts fire at once.
            autoPingInterval=0,
            autoPingTimeout=0,
        )
        #: The gateway listener's factory: every TCP connection, tracked
        #: (:class:`~hostlink_tw.controlplane.connections.ConnectionTracker`).
        self.connections = ConnectionTracker(
            gateway_site(WebSocketResource(self), self.api, reactor),  # type: ignore[no-untyped-call]
            reactor,
            settings.handshake_timeout,
            settings.max_pending_connections,
        )
        self.connections.noisy = False

    def attach_tasks(self, tasks: TaskHandling) -> None:
        """Hand the sessions' task messages, and the agent API, to this task side."""
        self.handlers.attach_tasks(tasks)

    def close_all(self) -> Deferred[Any]:
        """
        Close every session with 1001, drop every other connection, and fire
        once all are gone (sessions that do not finish the closing handshake
        within a second are aborted).
        """

        def close(protocol: object) -> bool:
            if isinstance(protocol, GatewayProtocol) and protocol.state == protocol.STATE_OPEN:
                protocol.close_with(CLOSE_GOING_AWAY, "control plane stopping")
                return True
            return False

        return self.connections.close_all(close)
