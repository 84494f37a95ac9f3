"""
The reference Hostlink control plane: a real agent gateway for tests, demos
and local development.

It serves the server side of the Hostlink agent protocol (docs/protocol.rst) over
Autobahn and Twisted Web, on any Twisted server endpoint (``tcp:…`` plain,
``ssl:…`` TLS).  The gateway listener serves only:

* ``GET /api/v1/agents/ws`` — the agent gateway (WebSocket upgrade).  Every
  upgrade is authenticated from the four signed headers (PROTOCOL §2):
  agent known, timestamp within ±C{max_skew} of our clock, RSA-PSS signature
  valid (salt length auto-detected, as Go's C{VerifyPSS(…, nil)}), nonce not
  seen inside the window.  Refusals are HTTP 401 with a short text body and
  one log line; a full nonce memory answers 503.
* ``GET /healthz`` — C{200 ok}.
* anything else — 404.

Every answer but an accepted upgrade closes its connection, a request with a
body is refused (413) unread, and a connection that is not an accepted
WebSocket C{handshake_timeout} after TCP connect is aborted, whatever it has
sent.  Unauthenticated connections are capped apart from sessions
(C{max_pending_connections}; a new one closes the oldest), so they cannot
take the sessions' place (C{max_connections}).  A peer that stops reading is
aborted once C{max_send_buffer_bytes} wait to be sent to it.  The listen
backlog is Twisted's default of 50 pending TCP handshakes; a storm of more
agents needs a larger one in the endpoint (C{tcp:8080:backlog=1024}; the
kernel caps it at C{net.core.somaxconn}).

A separate I{operator} listener (L{ControlPlane.listen_operator}; loopback
by default) serves ``GET /status``: JSON, the open sessions with each agent's
id and remote address, which is why it is not on the gateway.

Sessions
========
The agent's first message must be C{agent.hello}; it is answered with
C{agent.hello_ack} acking its C{message_id}, and from then on the session is
I{active}.  Each inbound frame is validated against the authenticated agent
id; an invalid one gets an C{error} envelope (C{retryable: false}) and a
close.  C{task.*} messages are acknowledged with C{ack}.

Close codes this control plane sends:

==========  ===========================================================
1000        closed on request (L{Session.close} default)
1001        the control plane is stopping (L{ControlPlane.stop})
1007        a frame is not valid UTF-8 or not valid JSON (L{CLOSE_INVALID_PAYLOAD})
1008        a policy violation: invalid envelope, binary frame, wrong first
            message, a type an agent may not send (L{CLOSE_POLICY})
1009        a message larger than C{max_message_bytes} (L{CLOSE_TOO_BIG})
4001        replaced: the same agent opened a newer session (L{CLOSE_REPLACED})
==========  ===========================================================

In-process use (tests, demos)
=============================
::

    from hostlink_tw.controlplane import start_control_plane

    cp = yield start_control_plane({"agent-1": public_key})   # RSAPublicKey or base64/PEM text
    cp.ws_url                       # "ws://127.0.0.1:<port>/api/v1/agents/ws"
    session = yield cp.wait_active("agent-1", timeout=10)   # hello_ack sent
    session = yield cp.wait_active("agent-1", new=True, timeout=10)   # the next one
    yield session.when_closed()           # fires with the close code
    envelope = yield cp.wait_message("agent-1", "task.received", timeout=10)
    cp.send_envelope("agent-1", make_envelope(ACK, "agent-1", {...}))
    cp.close("agent-1", 1008, "policy")   # any code, 1001/1008/… included
    cp.abort("agent-1")                   # drop TCP, no close frame
    cp.answer_pings = False               # stop answering the agent's pings
    cp.refuse_upgrades(503, duration=5)   # refuse every upgrade for 5 s
    cp.stall_upgrades()                   # hold upgrades unanswered (clear_stall() releases)
    cp.withhold_hello_ack = True          # hellos stay unanswered
    cp.attempts                           # upgrade attempts and verdicts (the last 10,000+)
    cp.record_messages = 1 << 20          # keep 1 MiB of inbound envelopes per session
    cp.session("agent-1").received        # ... here
    yield cp.listen_operator()            # GET cp.operator_url + "/status"
    yield cp.stop()                       # closes everything, stops listening

L{ControlPlane.wait_active} fires when the control plane has I{sent} the
hello_ack; the agent learns it a moment later.  Autobahn's own timers run
on the global reactor; everything else (keepalive, handshake deadline,
chaos durations) on the C{reactor} given.

Options (keyword arguments of L{ControlPlane} and L{start_control_plane}):
C{agents_file}, C{clock} (wall-clock Unix time for the timestamp window),
C{max_skew} (300 s), C{max_message_bytes} (1 MiB), C{handshake_timeout}
(10 s from TCP connect to an accepted WebSocket), C{ping_interval} (30 s)
and C{ping_timeout} (20 s) for our keepalive, C{max_connections} (1000
sessions; above it 503), C{max_pending_connections} (256 connections not
yet upgraded), C{max_send_buffer_bytes} (4 MiB), C{nonce_cache_size}
(100,000), C{nonce_quota} (1000 per agent; above it 429), C{database}
(the replay window's SQLite file, by default C{controlplane.db} beside the
agents file; memory only without one), C{record_messages} (0 bytes),
C{reload_interval} (1 s agents-file poll).  As a daemon it runs under
twistd: ``twistd -n hostlink-controlplane --agents agents.json``
(L{hostlink_tw.controlplane.tap}).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import directlyProvides, noLongerProvides, providedBy

from hostlink_tw._files import read_regular_file
from hostlink_tw.controlplane.replay import (
    NonceCache,
    NonceStore,
    ReplayStoreError,
    database_beside,
    valid_nonce,
)
from hostlink_tw.identity import IdentityError, load_public_key
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    DUPLICATE_KEY,
    ERROR,
    INVALID_JSON,
    INVALID_UTF8,
    NESTING_TOO_DEEP,
    NUMBER_OUT_OF_RANGE,
    TASK_OUTPUT,
    TASK_TYPES,
    Envelope,
    ProtocolError,
    ack_payload,
    agent_id_problem,
    error_payload,
    format_sent_at,
    make_envelope,
)
from hostlink_tw.signing import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    verify_signature,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_REPLACED",
    "CLOSE_TOO_BIG",
    "GATEWAY_PATH",
    "AgentsFileError",
    "ConnectionAttempt",
    "ControlPlane",
    "NoSessionError",
    "NonceCache",
    "ReplayStoreError",
    "Session",
    "load_agents_file",
    "parse_agents",
    "start_control_plane",
]

log = Logger()

# Close codes and the gateway path are the wire vocabulary's (re-exported here).
from hostlink_tw.wire.vocabulary import (  # noqa: E402
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_TOO_BIG,
    GATEWAY_PATH,
)

DEFAULT_MAX_SKEW = 300.0
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_PENDING_CONNECTIONS = 256
DEFAULT_NONCE_CACHE_SIZE = 100_000
#: Bytes that may wait in one connection's send buffers (the peer not
#: reading) before it is aborted: room for several of the largest messages.
DEFAULT_MAX_SEND_BUFFER_BYTES = 4 << 20
#: Accepted upgrades one agent may have inside the replay window (±max_skew):
#: far above what a reconnecting agent needs (its backoff allows about one a
#: second at worst), far below the cache size, so one agent cannot fill it.
DEFAULT_NONCE_QUOTA = 1000
DEFAULT_RELOAD_INTERVAL = 1.0
DEFAULT_LISTEN = "tcp:0:interface=127.0.0.1"
#: In process, the operator listener (C{/status}) is opened only on request,
#: on an ephemeral loopback port by default.
DEFAULT_OPERATOR_LISTEN = "tcp:0:interface=127.0.0.1"

# Go's strconv.ParseInt syntax for the timestamp: ASCII digits, optional sign.
_TIMESTAMP = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", re.ASCII)
# Frames that fail before there is any JSON object to look at: close 1007.
_PAYLOAD_ERRORS = frozenset(
    {INVALID_UTF8, INVALID_JSON, NESTING_TOO_DEEP, NUMBER_OUT_OF_RANGE, DUPLICATE_KEY}
)
# The agents file is a few keys; refusing huge files keeps a mistake cheap.
_MAX_AGENTS_FILE_BYTES = 16 << 20
#: Upgrade attempts kept in L{ControlPlane.attempts} (the oldest are dropped
#: in batches once twice as many have piled up), and the longest header value
#: kept per attempt: anyone can send upgrades, so neither may grow unbounded.
ATTEMPTS_KEPT = 10_000
_ATTEMPT_VALUE_KEPT = 256


class AgentsFileError(ValueError):
    """The authorized-agents file (or mapping) cannot be used; the message says why."""


class NoSessionError(KeyError):
    """The agent has no open session on this control plane."""

    def __str__(self) -> str:
        return f"no open session for agent {self.args[0]!r}"


def parse_agents(agents: Mapping[str, object], source: str = "agents") -> dict[str, RSAPublicKey]:
    """
    Check an agent id → public key mapping.

    @param agents: Values are L{RSAPublicKey} objects, or text: standard
        base64 of the PKIX DER encoding (what the Go control plane stores)
        or PEM.
    @param source: Names the origin in error messages (a file path).
    @raise AgentsFileError: An id is empty or not a string, or a key cannot
        be parsed.
    """
    if not isinstance(agents, Mapping):
        raise AgentsFileError(
            f"{source}: must be a JSON object mapping agent id to public key, "
            f"not {type(agents).__name__}"
        )
    result: dict[str, RSAPublicKey] = {}
    for agent_id, key in agents.items():
        problem = agent_id_problem(agent_id)
        if problem is not None:
            raise AgentsFileError(f"{source}: agent id {str(agent_id)[:64]!r}: {problem}")
        if isinstance(key, RSAPublicKey):
            result[agent_id] = key
            continue
        if not isinstance(key, str):
            raise AgentsFileError(
                f"{source}: agent {agent_id!r}: the public key must be a string "
                f"(base64 of PKIX DER, or PEM), not {type(key).__name__}"
            )
        try:
            result[agent_id] = load_public_key(key)
        except IdentityError as e:
            raise AgentsFileError(f"{source}: agent {agent_id!r}: {e}") from None
    return result


def load_agents_file(path: str) -> dict[str, RSAPublicKey]:
    """
    Read the authorized-agents file: a JSON object mapping agent id to
    public key (see L{parse_agents}).

    The file is opened non-blocking and must be a regular file of at most
    16 MiB (L{hostlink_tw._files.read_regular_file}): a FIFO or device at
    the path is refused at once instead of blocking the reactor.

    @raise AgentsFileError: The file is missing, unreadable, not a regular
        file, too large, not JSON, or holds a bad entry; the message names
        the file.
    """
    try:
        data = read_regular_file(path, _MAX_AGENTS_FILE_BYTES)
    except OSError as e:
        raise AgentsFileError(f"{path}: cannot read the agents file: {e.strerror or e}") from None
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AgentsFileError(f"{path}: not valid JSON: {e}") from None
    return parse_agents(document, source=path)


@dataclass(frozen=True)
class ConnectionAttempt:
    """
    One upgrade attempt as the control plane judged it (kept in memory for
    tests; never logged, as it holds the nonce).

    @ivar status: 101 when accepted, else the HTTP status of the refusal.
    """

    at: float
    remote: str
    path: str
    agent_id: str | None
    timestamp: str | None
    nonce: str | None
    status: int
    reason: str

    @property
    def accepted(self) -> bool:
        """True if the upgrade was accepted."""
        return self.status == 101


class Session:
    """
    One open WebSocket session of an authenticated agent.

    Counters and timestamps are what C{/status} reports.  C{received} keeps
    the last inbound envelopes, for tests, only while the control plane's
    C{record_messages} is set, and only that many bytes of them.
    """

    def __init__(self, protocol: _GatewayProtocol, agent_id: str, remote: str, now: float) -> None:
        self._protocol = protocol
        self.agent_id = agent_id
        self.remote = remote
        self.connected_since = now
        self.last_message_at: float | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.pings_received = 0
        self.active = False
        self.active_since: float | None = None
        self.hello_message_id: str | None = None
        self.received: deque[Envelope] = deque()
        self._received_sizes: deque[int] = deque()
        self._received_bytes = 0
        #: The most bytes ever waiting in this connection's send buffers.
        self.peak_send_buffer = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = False
        self._closed_waiters: list[Deferred[int | None]] = []

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.active else "open")
        return f"<Session agent_id={self.agent_id!r} remote={self.remote} {state}>"

    def send_envelope(self, envelope: Envelope) -> None:
        """Send one envelope as a text frame (not validated: tests may send bad ones)."""
        self.send_text(envelope.to_json())

    def send_text(self, text: str) -> None:
        """Send a raw text frame."""
        self._protocol.send_frame(text.encode("utf-8"), is_binary=False)

    def send_binary(self, data: bytes) -> None:
        """Send a raw binary frame."""
        self._protocol.send_frame(data, is_binary=True)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> Deferred[int | None]:
        """
        Start the closing handshake with any code (1001, 1008, 4xxx… are
        all allowed here) and fire with the close code once the connection
        is gone.
        """
        self._protocol.close_with(code, reason)
        return self.when_closed()

    def abort(self) -> Deferred[int | None]:
        """Drop the TCP connection without a close frame; fire when it is gone."""
        self._protocol.abort()
        return self.when_closed()

    def when_closed(self) -> Deferred[int | None]:
        """Fire with the close code once the connection is gone."""
        if self.closed:
            return defer.succeed(self.close_code)
        d: Deferred[int | None] = Deferred()
        self._closed_waiters.append(d)
        return d

    def snapshot(self) -> dict[str, Any]:
        """The JSON-able state C{/status} shows."""
        return {
            "agent_id": self.agent_id,
            "remote": self.remote,
            "active": self.active,
            "connected_since": format_sent_at(self.connected_since),
            "last_message_at": (
                None if self.last_message_at is None else format_sent_at(self.last_message_at)
            ),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
        }

    def _keep(self, envelope: Envelope, size: int, limit: int) -> None:
        """Keep an inbound envelope of C{size} bytes, the oldest going past C{limit} bytes."""
        if limit <= 0 or size > limit:
            return
        self.received.append(envelope)
        self._received_sizes.append(size)
        self._received_bytes += size
        while self._received_bytes > limit:
            self.received.popleft()
            self._received_bytes -= self._received_sizes.popleft()

    def _ended(self, code: int | None, reason: str | None) -> None:
        self.closed = True
        self.active = False
        self.close_code = code
        self.close_reason = reason
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(code)


def _kept(value: str | None) -> str | None:
    """A header value as L{ConnectionAttempt} keeps it: at most 256 characters."""
    return None if value is None else value[:_ATTEMPT_VALUE_KEPT]


def _printable(text: str | None, limit: int = 128) -> str:
    """A header value made safe for one log line (hostile input)."""
    if text is None:
        return "-"
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("…" if len(text) > limit else "")


def _phrase(status: int) -> str:
    """The standard reason phrase of an HTTP status."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _buffered_bytes(transport: object) -> int:
    """
    Bytes written to C{transport} that the peer has not taken yet: the
    write buffers of every layer down to the socket (our connection wrapper,
    TLS's cleartext buffer, the TCP transport's buffer).

    Twisted has no public accessor for a transport's buffered size (only
    the pause/resume producer signal at 64 KiB, which its HTTP channel
    already holds on this connection), so this reads the attributes of
    L{twisted.internet.abstract.FileDescriptor} and
    L{twisted.protocols.tls.TLSMemoryBIOProtocol}; the flood test checks
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


def _format_address(address: IAddress | str) -> str:
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = f"[{address.host}]" if isinstance(address, IPv6Address) else address.host
        return f"{host}:{address.port}"
    return str(address)


class _GatewayProtocol(WebSocketServerProtocol):
    """One agent connection: the authenticated upgrade, then the session."""

    # Autobahn's debug lines would show the request headers, signature and
    # nonce included: pin its logger at warn whatever the global level.
    log = txaio.make_logger(level="warn")  # type: ignore[attr-defined]

    factory: _GatewayFactory
    _agent_id: str | None = None
    _session: Session | None = None
    _attempt_recorded = False
    _ping_call: Any = None
    _pong_deadline: Any = None
    _ping_payload: bytes | None = None
    _send_aborted = False
    _peak_buffered = 0

    @property
    def _cp(self) -> ControlPlane:
        return self.factory.control_plane

    @property
    def remote(self) -> str:
        """The peer as C{host:port}."""
        transport: Any = self.transport
        if transport is None:
            return "-"
        return _format_address(transport.getPeer())

    # -- connection lifetime ------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cp._stalled.pop(self, None)
        self._stop_keepalive()
        # Autobahn leaves a pending close-handshake timer behind when the
        # peer vanishes mid-close; cancel it so nothing outlives the socket.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None
        super().connectionLost(reason)

    # -- the upgrade ----------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:
        cp = self._cp
        if request.path != GATEWAY_PATH:
            raise self._deny(request, 404, "not found")
        if cp._tracker.upgraded_count >= cp.max_connections:
            raise self._deny(request, 503, "too many connections")
        if cp._refusal is not None:
            raise self._deny(request, cp._refusal[0], cp._refusal[1])
        if cp._stalling:
            # Hold the upgrade unanswered (for client handshake-timeout
            # tests) until clear_stall() releases it into the normal path.
            d: Deferred[None] = Deferred()
            cp._stalled[self] = d
            if isinstance(self.transport, _TrackedConnection):
                self.transport.hold()
            d.addCallback(lambda _: self._authenticate(request))
            return d
        return self._authenticate(request)

    def _authenticate(self, request: ConnectionRequest) -> Deferred[None] | None:
        cp = self._cp
        headers = request.headers
        agent_id = headers.get(HEADER_AGENT_ID.lower(), "")
        timestamp = headers.get(HEADER_TIMESTAMP.lower(), "")
        nonce = headers.get(HEADER_NONCE.lower(), "")
        signature = headers.get(HEADER_SIGNATURE.lower(), "")
        for name, value in (
            (HEADER_AGENT_ID, agent_id),
            (HEADER_TIMESTAMP, timestamp),
            (HEADER_NONCE, nonce),
            (HEADER_SIGNATURE, signature),
        ):
            if not value:
                raise self._deny(request, 401, f"missing {name} header")
        problem = agent_id_problem(agent_id)  # the one rule (protocol.AGENT_ID_RULE)
        if problem is not None:
            raise self._deny(request, 401, f"malformed {HEADER_AGENT_ID} header: {problem}")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise self._deny(request, 401, f"malformed {HEADER_TIMESTAMP} header")
        if not valid_nonce(nonce):
            raise self._deny(
                request, 401, f"malformed {HEADER_NONCE} header (must be base64 of 16 bytes)"
            )
        now = cp.clock()
        signed_at = int(timestamp)
        if abs(now - signed_at) > cp.max_skew:
            raise self._deny(request, 401, "timestamp outside the allowed window")
        public_key = cp._agents.get(agent_id)
        if public_key is None:
            raise self._deny(request, 401, "unknown agent")
        if not _BASE64.fullmatch(signature):
            raise self._deny(request, 401, f"malformed {HEADER_SIGNATURE} header (bad base64)")
        if not verify_signature(public_key, agent_id, timestamp, nonce, signature):
            raise self._deny(request, 401, "invalid signature")
        if cp._nonces.seen(agent_id, nonce, now):
            raise self._deny(request, 401, "replayed nonce")
        if cp._nonces.over_quota(agent_id, now):
            raise self._deny(request, 429, "too many upgrades from this agent, try again later")
        if cp._nonces.full(now):
            raise self._deny(request, 503, "replay cache full, try again later")
        return self._accept(request, agent_id, nonce, float(signed_at), now)

    def _accept(
        self, request: ConnectionRequest, agent_id: str, nonce: str, signed_at: float, now: float
    ) -> Deferred[None] | None:
        """Remember the nonce (memory first, so a concurrent replay is refused), then accept."""
        cp = self._cp
        expires = cp._nonces.add(agent_id, nonce, signed_at)
        self._agent_id = agent_id
        if cp._nonce_store is None:
            self._record(request, 101, "accepted")
            return None
        # Answered once the nonce is on disk: a restart must not accept it again.
        stored = cp._nonce_store.record(agent_id, nonce, expires, now)

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
        self._cp._record_attempt(
            ConnectionAttempt(
                at=self._cp.clock(),
                remote=self.remote,
                path=path,
                agent_id=_kept(headers.get(HEADER_AGENT_ID.lower())),
                timestamp=_kept(headers.get(HEADER_TIMESTAMP.lower())),
                nonce=_kept(headers.get(HEADER_NONCE.lower())),
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
            agent_id=_printable(headers.get(HEADER_AGENT_ID.lower())),
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
        phrase = _phrase(code)
        lines = [
            f"HTTP/1.1 {code} {phrase}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines.extend(f"{name}: {value}" for name, value in responseHeaders or ())
        self.sendData(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)

    # -- the session ----------------------------------------------------------

    def onOpen(self) -> None:
        assert self._agent_id is not None
        cp = self._cp
        if isinstance(self.transport, _TrackedConnection):
            self.transport.upgrade_accepted()
        self._session = Session(self, self._agent_id, self.remote, cp.clock())
        cp._session_opened(self._session)
        if cp.ping_interval > 0:
            self._ping_call = cp.reactor.callLater(cp.ping_interval, self._ping)

    # -- keepalive -------------------------------------------------------------

    def _ping(self) -> None:
        cp = self._cp
        self._ping_call = cp.reactor.callLater(cp.ping_interval, self._ping)
        if self.state != self.STATE_OPEN:
            return
        # One ping outstanding at a time, with one deadline: a peer that
        # keeps not answering must not push it further away with every ping.
        if self._ping_payload is not None and cp.ping_timeout > 0:
            return
        # Random, and checked on the pong: a peer that never reads our
        # frames cannot answer it, so it cannot keep a dead session alive.
        self._ping_payload = os.urandom(16)
        self.sendPing(self._ping_payload)
        if cp.ping_timeout > 0:
            self._pong_deadline = cp.reactor.callLater(cp.ping_timeout, self._pong_missed)

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
            timeout=self._cp.ping_timeout,
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
        if self._cp.answer_pings:
            super().onPing(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is None or session.closed or self.state != self.STATE_OPEN:
            return
        now = self._cp.clock()
        session.last_message_at = now
        session.messages_in += 1
        if isBinary:
            self._refuse(CLOSE_POLICY, "binary_frame", "binary frames are not accepted", "")
            return
        try:
            envelope = Envelope.from_json(payload)
        except ProtocolError as e:
            code = CLOSE_INVALID_PAYLOAD if e.code in _PAYLOAD_ERRORS else CLOSE_POLICY
            self._refuse(code, e.code, e.message, "")
            return
        try:
            envelope.validate(session.agent_id)
        except ProtocolError as e:
            self._refuse(CLOSE_POLICY, e.code, e.message, envelope.message_id)
            return
        session._keep(envelope, len(payload), self._cp.record_messages)
        self._dispatch(session, envelope)
        # After dispatch, so a waiter sees the answer (hello_ack) already sent.
        self._cp._message_received(session, envelope)

    def _dispatch(self, session: Session, envelope: Envelope) -> None:
        cp = self._cp
        if envelope.type == AGENT_HELLO:
            session.hello_message_id = envelope.message_id
            if cp.withhold_hello_ack:
                log.info(
                    "hello_ack withheld agent_id={agent_id} remote={remote}",
                    agent_id=session.agent_id,
                    remote=session.remote,
                )
                return
            self.send_envelope(
                make_envelope(
                    AGENT_HELLO_ACK,
                    session.agent_id,
                    ack_payload(envelope.message_id, envelope.type),
                    now=cp.clock(),
                )
            )
            if not session.active:
                session.active = True
                session.active_since = cp.clock()
                log.info(
                    "session active agent_id={agent_id} remote={remote}",
                    agent_id=session.agent_id,
                    remote=session.remote,
                )
                cp._session_activated(session)
            return
        if session.hello_message_id is None:
            self._refuse(
                CLOSE_POLICY,
                "hello_required",
                f"the first message must be {AGENT_HELLO}, not {envelope.type}",
                envelope.message_id,
            )
            return
        if envelope.type in (ACK,):
            return
        if envelope.type == ERROR:
            log.warn(
                "agent reported an error agent_id={agent_id} code={code} message={message}",
                agent_id=session.agent_id,
                code=_printable(str(envelope.payload.get("code", ""))),
                message=_printable(str(envelope.payload.get("message", "")), 200),
            )
            return
        if envelope.type in TASK_TYPES and envelope.type != "task.deliver":
            self.send_envelope(
                make_envelope(
                    ACK,
                    session.agent_id,
                    ack_payload(
                        envelope.message_id,
                        envelope.type,
                        envelope.task_id,
                        envelope.execution_attempt_id,
                        envelope.sequence if envelope.type == TASK_OUTPUT else None,
                    ),
                    now=cp.clock(),
                    task_id=envelope.task_id,
                    execution_attempt_id=envelope.execution_attempt_id,
                )
            )
            return
        self._refuse(
            CLOSE_POLICY,
            "unexpected_type",
            f"an agent may not send {envelope.type}",
            envelope.message_id,
        )

    def _refuse(self, close_code: int, code: str, message: str, related: str) -> None:
        """Answer a bad frame with an C{error} envelope, then close."""
        session = self._session
        assert session is not None
        log.warn(
            "invalid frame agent_id={agent_id} remote={remote} code={code}: {message}",
            agent_id=session.agent_id,
            remote=session.remote,
            code=code,
            message=_printable(message, 200),
        )
        self.send_envelope(
            make_envelope(
                ERROR,
                session.agent_id,
                error_payload(code, message, False, related),
                now=self._cp.clock(),
            )
        )
        self.close_with(close_code, code)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Every byte we send passes here (the upgrade answer, frames, Autobahn's
        own pongs and close frames): once the peer stops reading and more
        than C{max_send_buffer_bytes} wait in our buffers, the connection is
        aborted, so a peer flooding pings it never reads cannot grow our
        memory.
        """
        if self._send_aborted:
            return
        super().sendData(data, sync, chopsize)
        buffered = _buffered_bytes(self.transport) + sum(len(e[0]) for e in self.send_queue)
        if buffered > self._peak_buffered:
            self._peak_buffered = buffered
            if self._session is not None:
                self._session.peak_send_buffer = buffered
        if buffered > self._cp.max_send_buffer_bytes:
            self._send_aborted = True
            log.warn(
                "peer is not reading: {buffered} bytes waiting to be sent (limit {limit}), "
                "dropping agent_id={agent_id} remote={remote}",
                buffered=buffered,
                limit=self._cp.max_send_buffer_bytes,
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
        cp = self._cp
        duration = cp.clock() - session.connected_since
        log.info(
            "session ended agent_id={agent_id} remote={remote} duration={duration:.3f}s "
            "close_code={close_code} in={messages_in} out={messages_out}",
            agent_id=session.agent_id,
            remote=session.remote,
            duration=duration,
            close_code=close_code,
            messages_in=session.messages_in,
            messages_out=session.messages_out,
        )
        session._ended(close_code, close_reason)
        cp._session_closed(session)


class _GatewayFactory(WebSocketServerFactory):
    protocol = _GatewayProtocol  # type: ignore[assignment]

    def __init__(self, control_plane: ControlPlane, url: str) -> None:
        super().__init__(url=url, server="hostlink-controlplane")  # type: ignore[no-untyped-call]
        self.control_plane = control_plane


class _TrackedConnection(ProtocolWrapper):
    """
    Every TCP connection of the gateway listener.

    Until it is an accepted WebSocket it is I{pending}: it has an absolute
    deadline (C{handshake_timeout} from TCP connect, whatever it sends
    meanwhile: a request, a trickle of bytes, keep-alive requests) and it
    counts against C{max_pending_connections}, where a new connection
    pushes out the oldest pending one.  Once the upgrade is accepted the
    deadline is gone and the connection counts against C{max_connections}
    (the sessions), watched by the WebSocket keepalive instead.
    """

    factory: _ConnectionTracker
    _timer: Any = None
    #: True once the WebSocket upgrade was accepted.
    upgraded = False

    def makeConnection(self, transport: Any) -> None:
        timeout = self.factory.control_plane.handshake_timeout
        if timeout > 0:
            self._timer = self.factory.control_plane.reactor.callLater(timeout, self._timed_out)
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
        """A stalled upgrade (a test control): only the test releases it."""
        self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        transport: Any = self.transport
        log.info("handshake timeout remote={remote}", remote=_format_address(transport.getPeer()))
        # Abort, not close: a peer that does not read would hold a close forever.
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        for d in self.factory.lost_waiters.pop(self, []):
            d.callback(None)


class _ConnectionTracker(WrappingFactory):
    protocol = _TrackedConnection

    def __init__(self, site: Site, control_plane: ControlPlane) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.control_plane = control_plane
        self.lost_waiters: dict[_TrackedConnection, list[Deferred[None]]] = {}
        #: Connections not yet an accepted WebSocket, oldest first.
        self.pending: dict[_TrackedConnection, None] = {}
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
        if isinstance(p, _TrackedConnection):
            self.pending[p] = None

    def unregisterProtocol(self, p: Protocol) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        self.pending.pop(p, None)  # type: ignore[call-overload]

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        # Unauthenticated connections get their own cap, and the oldest one
        # makes room: holding the cap then needs a fresh connection faster
        # than an agent completes its upgrade (milliseconds), not a slow
        # trickle, and the sessions' cap is not theirs to fill.
        cap = self.control_plane.max_pending_connections
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
        now = self.control_plane.reactor.seconds()
        if self._eviction_logged_at is not None and now - self._eviction_logged_at < 60:
            return
        log.warn(
            "pending-connection cap of {cap} reached: closed {count} oldest unauthenticated "
            "connection(s) to make room (latest from {remote})",
            cap=self.control_plane.max_pending_connections,
            count=self.evicted - self._evicted_logged,
            remote=_format_address(addr),
        )
        self._evicted_logged = self.evicted
        self._eviction_logged_at = now

    def when_lost(self, connection: _TrackedConnection) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.lost_waiters.setdefault(connection, []).append(d)
        return d


_BODY_REFUSED = b"request bodies are not accepted\n"


class _Channel(HTTPChannel):
    """
    HTTP on the gateway listener: no request has a body here (the upgrade
    and C{/healthz} are GETs), so a body is refused with 413 before any of it
    is stored, and the connection is closed.
    """

    def allHeadersReceived(self) -> None:
        # length: None for chunked, the Content-Length otherwise (0 if absent).
        # Checked before the request sees its length, which is when Twisted
        # would create the body's temporary file.
        if self.length == 0:
            super().allHeadersReceived()  # type: ignore[no-untyped-call]
            return
        self.persistent = False
        # The parser goes on in raw mode (length is not 0): everything after
        # the headers is dropped unread.
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(_BODY_REFUSED), _BODY_REFUSED)
        )
        transport.loseConnection()


class _Site(Site):
    """
    A Site whose answers other than the WebSocket upgrade close the
    connection: a keep-alive connection would be a way to stay connected
    without ever authenticating.
    """

    # A plain HTTP/1.1 channel: no HTTP/2 negotiation on the gateway.
    protocol = _Channel  # type: ignore[assignment]

    def getResourceFor(self, request: Request) -> IResource:
        if request.path != GATEWAY_PATH.encode("ascii"):
            request.channel.persistent = False
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


class _Root(Resource):
    """Routes on the whole path: exactly three paths exist, the rest is 404."""

    def __init__(self, routes: Mapping[bytes, Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._routes: dict[bytes, IResource] = dict(routes)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        resource = self._routes.get(request.path)
        if resource is None:
            return notFound()
        # The routed resources are leaves: traversal stops here.
        return resource


class _Healthz(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"ok"


class _Status(Resource):
    """C{GET /status} on the operator listener: the sessions, as JSON."""

    isLeaf = True

    def __init__(self, control_plane: ControlPlane) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._cp = control_plane

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
        return json.dumps(self._cp.status(), indent=2).encode("utf-8") + b"\n"


class _OperatorSite(Site):
    """The operator listener's site: every answer closes its connection."""

    def getResourceFor(self, request: Request) -> IResource:
        request.channel.persistent = False
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class ControlPlane:
    """
    The reference control plane: gateway, session table and test controls.

    Create it, then L{listen}; or use L{start_control_plane}.  The attributes
    C{answer_pings} and C{withhold_hello_ack} may be flipped at any time.
    """

    def __init__(
        self,
        agents: Mapping[str, RSAPublicKey | str] | None = None,
        *,
        agents_file: str | None = None,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
        max_skew: float = DEFAULT_MAX_SKEW,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS,
        nonce_cache_size: int = DEFAULT_NONCE_CACHE_SIZE,
        nonce_quota: int = DEFAULT_NONCE_QUOTA,
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
        database: str | bool = True,
        max_send_buffer_bytes: int = DEFAULT_MAX_SEND_BUFFER_BYTES,
        record_messages: int = 0,
    ) -> None:
        """
        @param agents: Agent id → public key (L{RSAPublicKey}, or base64 of
            PKIX DER, or PEM).  Merged under the file's entries when both
            are given.
        @param agents_file: JSON file of the same mapping; re-read when its
            size or modification time changes (polled every
            C{reload_interval} seconds; 0 disables polling) and on
            L{reload_agents}.
        @param reactor: Defaults to the global reactor.
        @param clock: Wall-clock Unix time, for timestamps and the nonce window.
        @param max_skew: Seconds a signed timestamp may differ from C{clock()}.
        @param max_message_bytes: Larger inbound messages close with 1009.
        @param handshake_timeout: Seconds from TCP connect until the
            connection must be an accepted WebSocket, whatever it sends
            meanwhile (0 disables: tests only).
        @param ping_interval: Our keepalive ping period (0: no pings).
        @param ping_timeout: Seconds to wait for the pong before dropping.
        @param max_connections: Concurrent WebSocket sessions; above it,
            upgrades get 503.
        @param max_pending_connections: Concurrent connections that are not
            (yet) an accepted WebSocket; a new one closes the oldest.
        @param nonce_cache_size: Hard cap of the replay memory; when full,
            new upgrades get 503.
        @param nonce_quota: Accepted upgrades one agent may have inside the
            replay window; above it that agent (and only it) gets 429.
        @param database: The control plane's SQLite file, where the replay
            window survives a restart (L{NonceStore}): a path; C{True} (the
            default) for C{controlplane.db} beside C{agents_file}, or memory
            only when there is no agents file; C{False} for memory only.
        @param max_send_buffer_bytes: Bytes that may wait to be sent on one
            connection (its peer not reading) before it is aborted.
        @param record_messages: Bytes of inbound envelopes each session
            keeps in L{Session.received} (for tests; 0, the default, keeps
            none).  May be changed at any time.
        @raise AgentsFileError: The agents or the file are unusable.
        @raise ReplayStoreError: The database cannot be used.
        @raise ValueError: An option is out of range.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        for name, value in (
            ("max_skew", max_skew),
            ("handshake_timeout", handshake_timeout),
            ("ping_interval", ping_interval),
            ("ping_timeout", ping_timeout),
            ("reload_interval", reload_interval),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        for name, count in (
            ("max_message_bytes", max_message_bytes),
            ("max_connections", max_connections),
            ("max_pending_connections", max_pending_connections),
            ("nonce_cache_size", nonce_cache_size),
            ("nonce_quota", nonce_quota),
            ("max_send_buffer_bytes", max_send_buffer_bytes),
        ):
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be a positive integer, not {count!r}")
        self.reactor = reactor
        self.clock = clock
        self.max_skew = max_skew
        self.max_message_bytes = max_message_bytes
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_connections = max_connections
        self.max_pending_connections = max_pending_connections
        self.max_send_buffer_bytes = max_send_buffer_bytes
        #: Bytes of inbound envelopes kept per session (tests; 0: none).
        self.record_messages = record_messages
        self.reload_interval = reload_interval
        self.agents_file = agents_file

        #: False: the control plane ignores pings (no pong), for keepalive tests.
        self.answer_pings = True
        #: True: C{agent.hello} is recorded but never acknowledged.
        self.withhold_hello_ack = False
        #: Every upgrade attempt, oldest first (tests only; never logged).
        self.attempts: list[ConnectionAttempt] = []

        # Given in code, and read from the file; the file wins on conflicts.
        self._static_agents = parse_agents(agents or {})
        self._file_agents: dict[str, RSAPublicKey] = {}
        self._file_signature: tuple[int, int, int] | None = None
        if agents_file is not None:
            self._file_agents = load_agents_file(agents_file)
            self._file_signature = self._stat_agents_file()
        self._agents = {**self._static_agents, **self._file_agents}
        self._nonces = NonceCache(max_skew, nonce_cache_size, nonce_quota)
        #: The SQLite file of the replay window, or None (memory only).
        self.database: str | None = None
        if isinstance(database, str):
            self.database = database
        elif database and agents_file is not None:
            self.database = database_beside(agents_file)
        self._nonce_store: NonceStore | None = None
        if self.database is not None:
            self._nonce_store = NonceStore(self.database, reactor)
            for agent_id, nonce, expires in self._nonce_store.load(clock()):
                self._nonces.remember(agent_id, nonce, expires)
        self._sessions: dict[str, Session] = {}
        self._active_waiters: dict[str, list[Deferred[Session]]] = {}
        self._message_waiters: list[tuple[str, str | None, Deferred[Envelope]]] = []
        self._stalled: dict[_GatewayProtocol, Deferred[None]] = {}
        self._stalling = False
        self._refusal: tuple[int, str] | None = None
        # Twisted's interface types; Any because mypy cannot see zope interfaces.
        self._timers: dict[str, Any] = {}
        self._port: Any = None
        self._operator_port: Any = None
        self._operator = WrappingFactory(
            _OperatorSite(_Root({b"/status": _Status(self)}), reactor=reactor)  # type: ignore[no-untyped-call]
        )
        self._operator.noisy = False
        self._secure = False
        self._poller: LoopingCall | None = None
        self._stop_result: Deferred[None] | None = None

        factory = _GatewayFactory(self, "ws://127.0.0.1")
        factory.setProtocolOptions(  # type: ignore[no-untyped-call]
            webStatus=False,
            # Invalid UTF-8 must reach onMessage, so the agent gets an error
            # envelope before the 1007 close.
            utf8validateIncoming=False,
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            # Close with 1009/1002 instead of dropping TCP, so peers see why.
            failByDrop=False,
            # The upgrade is answered synchronously; the handshake deadline
            # is enforced per TCP connection by _TrackedConnection instead.
            openHandshakeTimeout=0,
            # Autobahn rounds this deadline down to a whole second: 1 s (its
            # default) could abort after a few ms, before a distant agent's
            # close reply; the frame with our code is out either way.
            closeHandshakeTimeout=3,
            # Keepalive runs on our reactor (see _GatewayProtocol._ping):
            # Autobahn's batched timers round deadlines down to whole
            # seconds, which makes short pong timeouts fire at once.
            autoPingInterval=0,
            autoPingTimeout=0,
        )
        self._ws_factory = factory
        self._site = _Site(  # type: ignore[no-untyped-call]
            _Root(
                {
                    GATEWAY_PATH.encode("ascii"): WebSocketResource(factory),  # type: ignore[no-untyped-call]
                    b"/healthz": _Healthz(),
                }
            ),
            reactor=reactor,
        )
        self._site.noisy = False
        self._tracker = _ConnectionTracker(self._site, self)
        self._tracker.noisy = False

    # -- lifetime ---------------------------------------------------------------

    def listen(self, description: str = DEFAULT_LISTEN) -> Deferred[ControlPlane]:
        """
        Start listening on a Twisted server endpoint description (C{tcp:…},
        C{ssl:…}); fire with this control plane once the port is bound.
        """
        if self._port is not None:
            raise RuntimeError("this control plane is already listening")
        self._secure = description.split(":", 1)[0].strip().lower() in ("ssl", "tls")
        endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
        d: Deferred[Any] = endpoint.listen(self._tracker)

        def listening(port: Any) -> ControlPlane:
            self._port = port
            if self.agents_file is not None and self.reload_interval > 0:
                self._poller = LoopingCall(self.poll_agents_file)
                self._poller.clock = self.reactor
                self._poller.start(self.reload_interval, now=False).addErrback(
                    lambda f: log.failure("agents file polling stopped", f)
                )
            log.info(
                "control plane listening on {url} ({count} agents authorized)",
                url=self.ws_url,
                count=len(self._agents),
            )
            return self

        return d.addCallback(listening)

    @property
    def port(self) -> int:
        """The TCP port we listen on."""
        if self._port is None:
            raise RuntimeError("the control plane is not listening")
        return int(self._port.getHost().port)

    @property
    def url(self) -> str:
        """The base HTTP URL (C{http://127.0.0.1:port} or C{https://…})."""
        if self._port is None:
            raise RuntimeError("the control plane is not listening")
        address = self._port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", ""):  # noqa: S104 - describing, not binding
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self._secure else 'http'}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The agent gateway URL (what C{HOSTLINK_WS_URL} should be)."""
        return "ws" + self.url[len("http") :] + GATEWAY_PATH

    def listen_operator(self, description: str = DEFAULT_OPERATOR_LISTEN) -> Deferred[ControlPlane]:
        """
        Serve C{GET /status} (every session: agent id, remote address,
        counters) on its own listener, apart from the gateway, which anyone
        who can reach an agent's control plane can reach.  Bind it to
        loopback (the default) unless the network in between is trusted:
        a warning is logged when it is not.
        """
        if self._operator_port is not None:
            raise RuntimeError("the operator listener is already open")
        endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
        d: Deferred[Any] = endpoint.listen(self._operator)

        def listening(port: Any) -> ControlPlane:
            self._operator_port = port
            host = str(getattr(port.getHost(), "host", ""))
            log.info("operator status page on {url}/status", url=self.operator_url)
            if not _is_loopback(host):
                log.warn(
                    "the operator status page listens on {host}, not loopback: anyone who "
                    "can reach it sees every agent id and address",
                    host=host or "?",
                )
            return self

        return d.addCallback(listening)

    @property
    def operator_url(self) -> str:
        """The operator listener's base URL (C{http://127.0.0.1:port}); C{/status} is there."""
        if self._operator_port is None:
            raise RuntimeError("the operator listener is not open")
        address = self._operator_port.getHost()
        host = str(getattr(address, "host", "127.0.0.1"))
        if host in ("0.0.0.0", ""):  # noqa: S104 - describing, not binding
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{address.port}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening, close every session with 1001, drop every other
        connection, and fire once all are gone (sessions that do not finish
        the closing handshake within a second are aborted).  Calling it
        again returns a Deferred for the same shutdown.
        """
        if self._stop_result is not None:
            return self._stop_chained(self._stop_result)
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._stalling = False
        waits: list[Deferred[Any]] = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
        if self._operator_port is not None:
            waits.append(defer.maybeDeferred(self._operator_port.stopListening))
            for connection in list(self._operator.protocols):
                connection.transport.abortConnection()
        gone = [self._tracker.when_lost(c) for c in list(self._tracker.protocols)]
        for connection in list(self._tracker.protocols):
            inner = connection.wrappedProtocol
            if isinstance(inner, _GatewayProtocol) and inner.state == inner.STATE_OPEN:
                inner.close_with(CLOSE_GOING_AWAY, "control plane stopping")
            else:
                connection.transport.abortConnection()
        pending = list(self._tracker.protocols)

        def force() -> None:
            for connection in pending:
                if connection in self._tracker.protocols:
                    connection.transport.abortConnection()

        deadline = self.reactor.callLater(1.0, force)
        all_gone = defer.gatherResults(gone, consumeErrors=True)

        def done(result: object) -> None:
            if deadline.active():
                deadline.cancel()

        all_gone.addBoth(done)
        waits.append(all_gone)
        for waiters in self._active_waiters.values():
            for waiter in list(waiters):
                waiter.cancel()
        self._active_waiters.clear()
        for _, _, message_waiter in list(self._message_waiters):
            message_waiter.cancel()
        self._message_waiters.clear()
        result = defer.gatherResults(waits, consumeErrors=True)
        store, self._nonce_store = self._nonce_store, None
        if store is not None:
            # After the connections: an upgrade still being committed finishes first.
            result.addBoth(lambda outcome: store.close().addCallback(lambda _: outcome))
        stopped: Deferred[None] = result.addCallback(lambda _: None)
        self._stop_result = stopped
        return self._stop_chained(stopped)

    @staticmethod
    def _stop_chained(stopped: Deferred[None]) -> Deferred[None]:
        # Callers get their own Deferred, so one caller's callbacks cannot
        # change what the next caller of stop() sees.
        mine: Deferred[None] = Deferred()

        def chain(result: object) -> object:
            if isinstance(result, Failure):
                mine.errback(result)
            else:
                mine.callback(None)
            # Handed on to this caller; later callers see a finished stop.
            return None

        stopped.addBoth(chain)
        return mine

    # -- agents -----------------------------------------------------------------

    @property
    def agents(self) -> Mapping[str, RSAPublicKey]:
        """The authorized agents now in force."""
        return dict(self._agents)

    def set_agents(self, agents: Mapping[str, RSAPublicKey | str]) -> None:
        """Replace the in-memory agents (file entries stay on top); open sessions stay."""
        self._static_agents = parse_agents(agents)
        self._agents = {**self._static_agents, **self._file_agents}

    def reload_agents(self) -> bool:
        """
        Re-read the agents file now (what SIGHUP does).  Open sessions are
        kept, even of agents no longer listed.  On error the current set is
        kept and the reason logged.

        @return: True if the new set is in force.
        """
        if self.agents_file is None:
            return False
        self._file_signature = self._stat_agents_file()
        try:
            loaded = load_agents_file(self.agents_file)
        except AgentsFileError as e:
            log.error(
                "agents file not reloaded, keeping {count} agents: {error}",
                count=len(self._agents),
                error=str(e),
            )
            return False
        self._file_agents = loaded
        merged = {**self._static_agents, **loaded}
        added = sorted(set(merged) - set(self._agents))
        removed = sorted(set(self._agents) - set(merged))
        self._agents = merged
        log.info(
            "agents file reloaded: {count} agents (added {added}, removed {removed})",
            count=len(merged),
            added=", ".join(added) or "none",
            removed=", ".join(removed) or "none",
        )
        return True

    def poll_agents_file(self) -> None:
        """Reload the agents file if its size, mtime or inode changed."""
        if self.agents_file is None:
            return
        signature = self._stat_agents_file()
        if signature != self._file_signature:
            self.reload_agents()

    def _stat_agents_file(self) -> tuple[int, int, int] | None:
        assert self.agents_file is not None
        try:
            st = os.stat(self.agents_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    # -- sessions -----------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """The open sessions (one per agent), oldest first."""
        return sorted(self._sessions.values(), key=lambda s: s.connected_since)

    def session(self, agent_id: str) -> Session:
        """
        The agent's open session.

        @raise NoSessionError: It has none.
        """
        session = self._sessions.get(agent_id)
        if session is None:
            raise NoSessionError(agent_id)
        return session

    def wait_active(
        self, agent_id: str, *, new: bool = False, timeout: float | None = None
    ) -> Deferred[Session]:
        """
        Fire with the agent's session once its hello is acked.

        @param new: Wait for a session that becomes active after this call,
            even if one is active now (after a reconnect).
        @param timeout: Seconds, then fail with L{defer.TimeoutError}.
        """
        current = self._sessions.get(agent_id)
        if not new and current is not None and current.active:
            return defer.succeed(current)
        d: Deferred[Session] = Deferred()
        waiters = self._active_waiters.setdefault(agent_id, [])
        waiters.append(d)

        def forget(result: object) -> object:
            if d in waiters:
                waiters.remove(d)
            return result

        d.addBoth(forget)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        return d

    def wait_message(
        self, agent_id: str, message_type: str | None = None, *, timeout: float | None = None
    ) -> Deferred[Envelope]:
        """Fire with the next valid envelope from the agent (of that type, if given)."""
        d: Deferred[Envelope] = Deferred()
        entry = (agent_id, message_type, d)
        self._message_waiters.append(entry)

        def forget(result: object) -> object:
            if entry in self._message_waiters:
                self._message_waiters.remove(entry)
            return result

        d.addBoth(forget)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        return d

    def send_envelope(self, agent_id: str, envelope: Envelope) -> None:
        """Send an envelope to the agent (not validated)."""
        self.session(agent_id).send_envelope(envelope)

    def send_text(self, agent_id: str, text: str) -> None:
        """Send a raw text frame to the agent."""
        self.session(agent_id).send_text(text)

    def send_binary(self, agent_id: str, data: bytes) -> None:
        """Send a raw binary frame to the agent."""
        self.session(agent_id).send_binary(data)

    def close(
        self, agent_id: str, code: int = CLOSE_NORMAL, reason: str = ""
    ) -> Deferred[int | None]:
        """Close the agent's session with any code; fire when it is gone."""
        return self.session(agent_id).close(code, reason)

    def abort(self, agent_id: str) -> Deferred[int | None]:
        """Drop the agent's TCP connection without a close frame."""
        return self.session(agent_id).abort()

    def status(self) -> dict[str, Any]:
        """What C{GET /status} returns."""
        return {
            "agents_authorized": len(self._agents),
            "connections": len(self._tracker.protocols),
            "sessions": [s.snapshot() for s in self.sessions()],
        }

    # -- chaos controls ---------------------------------------------------------------

    def refuse_upgrades(
        self, status: int = 503, *, duration: float | None = None, reason: str = ""
    ) -> None:
        """
        Refuse every upgrade with this HTTP status, for C{duration} seconds
        or until L{clear_refusal}.
        """
        self._refusal = (status, reason or _phrase(status))
        self._set_timer("refusal", duration, self.clear_refusal)

    def clear_refusal(self) -> None:
        """Accept upgrades again."""
        self._refusal = None
        self._cancel_timer("refusal")

    def stall_upgrades(self, *, duration: float | None = None) -> None:
        """
        Hold every new upgrade unanswered (the client's handshake timeout is
        the only way out) for C{duration} seconds or until L{clear_stall}.
        """
        self._stalling = True
        self._set_timer("stall", duration, self.clear_stall)

    def clear_stall(self) -> None:
        """Stop stalling; held upgrades still connected proceed normally."""
        self._stalling = False
        self._cancel_timer("stall")
        held, self._stalled = self._stalled, {}
        for d in held.values():
            d.callback(None)

    @property
    def stalled_count(self) -> int:
        """How many upgrades are being held now."""
        return len(self._stalled)

    def _set_timer(self, name: str, duration: float | None, action: Callable[[], None]) -> None:
        self._cancel_timer(name)
        if duration is not None:
            self._timers[name] = self.reactor.callLater(duration, action)

    def _cancel_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # -- bookkeeping called by the protocol -------------------------------------------

    def _record_attempt(self, attempt: ConnectionAttempt) -> None:
        self.attempts.append(attempt)
        if len(self.attempts) > 2 * ATTEMPTS_KEPT:
            del self.attempts[:-ATTEMPTS_KEPT]

    def _session_opened(self, session: Session) -> None:
        previous = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        log.info(
            "session started agent_id={agent_id} remote={remote}",
            agent_id=session.agent_id,
            remote=session.remote,
        )
        if previous is not None and not previous.closed:
            log.info(
                "session replaced agent_id={agent_id} old_remote={old} new_remote={new}",
                agent_id=session.agent_id,
                old=previous.remote,
                new=session.remote,
            )
            previous._protocol.close_with(CLOSE_REPLACED, "replaced")

    def _session_activated(self, session: Session) -> None:
        for d in list(self._active_waiters.get(session.agent_id, [])):
            d.callback(session)

    def _session_closed(self, session: Session) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]

    def _message_received(self, session: Session, envelope: Envelope) -> None:
        for agent_id, message_type, d in list(self._message_waiters):
            if agent_id == session.agent_id and message_type in (None, envelope.type):
                d.callback(envelope)


def start_control_plane(
    agents: Mapping[str, RSAPublicKey | str],
    *,
    listen: str = DEFAULT_LISTEN,
    operator_listen: str | None = None,
    reactor: Any = None,
    **options: Any,
) -> Deferred[ControlPlane]:
    """
    Build a L{ControlPlane} and listen; fire with it once the port is bound.

    @param agents: Agent id → public key (L{RSAPublicKey}, base64 PKIX DER, or PEM).
    @param listen: A Twisted server endpoint description; the default is an
        ephemeral port on 127.0.0.1 (read L{ControlPlane.port} / C{ws_url}).
    @param operator_listen: Also open the operator listener (C{/status})
        there (L{ControlPlane.listen_operator}); None: not opened.
    @param options: Keyword arguments of L{ControlPlane}.
    """
    try:
        control_plane = ControlPlane(agents, reactor=reactor, **options)
    except (AgentsFileError, ValueError):
        return defer.fail()
    d = control_plane.listen(listen)
    if operator_listen is not None:
        d.addCallback(lambda cp: cp.listen_operator(operator_listen))
    return d
