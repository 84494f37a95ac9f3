"""
In-memory test support for hostlink_tw.client (no test cases here).

:class:`Harness` runs one :class:`HostlinkClient` on a ``MemoryReactorClock``
with Autobahn's txaio loop replaced by a separate ``Clock`` (so any Autobahn
timer left on it shows up), and plays the server by hand on a
``StringTransport``: it reads the client's upgrade request and masked
frames, and writes the server's handshake response and frames.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionRefusedError,
    UserError,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.python.failure import Failure
from txaio.testutil import replace_loop

from hostlink_tw.client import ClientEvent, HostlinkClient, HostlinkClientProtocol
from hostlink_tw.config import Settings
from hostlink_tw.protocol import AGENT_HELLO, AGENT_HELLO_ACK, ack_payload, make_envelope
from hostlink_tw.signing import RequestSigner

AGENT = "agent-7f3a"
URL = "ws://127.0.0.1:8080/api/v1/agents/ws"
_WS_MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_KEY: rsa.RSAPrivateKey | None = None


def key() -> rsa.RSAPrivateKey:
    """One RSA key for the whole test run (generating one takes a while)."""
    global _KEY
    if _KEY is None:
        _KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEY


def settings(**overrides: Any) -> Settings:
    """Small, round timing values so tests read easily."""
    base = Settings(
        ws_url=URL,
        reconnect_min=1.0,
        reconnect_max=60.0,
        ping_interval=30.0,
        pong_timeout=10.0,
        hello_timeout=10.0,
        handshake_timeout=10.0,
        max_message_bytes=4096,
        reconnect_jitter="go",
    )
    return replace(base, **overrides)


class MidRandom(random.Random):
    """uniform() returns the middle of its range: jitter-free delays."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class FakeTransport(StringTransport):
    """A StringTransport that also records startTLS and tolerates unregisterProducer."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        self.tls_options: Any = None
        self.aborted = False

    def startTLS(self, options: Any) -> None:
        self.tls_options = options

    def unregisterProducer(self) -> None:
        self.producer = None

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def server_frame(opcode: int, payload: bytes, fin: bool = True, length: int | None = None) -> bytes:
    """An unmasked server-to-client frame; ``length`` overrides the header's length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def parse_client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, unmasked payload) of every complete masked frame in ``data``."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        opcode = data[i] & 0x0F
        masked = data[i + 1] & 0x80
        n = data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n = struct.unpack("!H", data[j : j + 2])[0]
            j += 2
        elif n == 127:
            n = struct.unpack("!Q", data[j : j + 8])[0]
            j += 8
        mask = data[j : j + 4] if masked else b"\0\0\0\0"
        j += 4 if masked else 0
        if j + n > len(data):
            break
        masked_payload = data[j : j + n]
        # XOR as one big integer: the fuzzers read thousands of frames per example.
        key = (mask * (n // 4 + 1))[:n]
        payload = (
            int.from_bytes(masked_payload, "big") ^ int.from_bytes(key, "big")
        ).to_bytes(n, "big")
        frames.append((opcode, payload))
        i = j + n
    return frames


class _Redialer:
    """
    A memory-reactor connector that can connect again, as a real one can:
    each ``connect()`` (RCF's retry calls it) records a new attempt in the
    reactor's ``tcpClients`` and ``connectors`` and tells the factory.
    """

    def __init__(self, reactor: RedialingReactor, host: str, port: int, factory: Any,
                 timeout: float, bind: Any) -> None:
        self.reactor = reactor
        self.args = (host, port, factory, timeout, bind)
        self.stoppedConnecting = False
        self._in_connect = False

    def connect(self) -> None:
        self.stoppedConnecting = False
        self._in_connect = True
        try:
            self.args[2].startedConnecting(self)
        finally:
            self._in_connect = False
        if not self.stoppedConnecting:
            # A connector stopped inside startedConnecting never dials.
            self.reactor.tcpClients.append(self.args)
            self.reactor.connectors.append(self)

    def stopConnecting(self) -> None:
        self.stoppedConnecting = True
        if self._in_connect:
            # Twisted's real connectors report a stopped connect at once.
            self.args[2].clientConnectionFailed(self, Failure(UserError()))

    def disconnect(self) -> None:
        pass

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.args[0], self.args[1])


class RedialingReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` whose connectors can be connected again."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> _Redialer:
        connector = _Redialer(self, host, port, factory, timeout, bindAddress)
        connector.connect()
        return connector


class Conn:
    """The server side of one in-memory connection."""

    def __init__(self, harness: Harness, proto: HostlinkClientProtocol, connector: Any) -> None:
        self.harness = harness
        self.proto = proto
        self.connector = connector
        self.transport = FakeTransport()
        self._request_end = -1
        self.lost = False

    # -- reading what the client sent ---------------------------------------------

    def written(self) -> bytes:
        return bytes(self.transport.value())

    def request(self) -> tuple[str, dict[str, str]]:
        """The upgrade request line and headers (names lower-cased)."""
        data = self.written()
        end = data.find(b"\r\n\r\n")
        assert end >= 0, data
        lines = data[:end].decode("utf-8").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return lines[0], headers

    def frames(self) -> list[tuple[int, bytes]]:
        """Every frame the client sent after its upgrade request."""
        data = self.written()
        end = data.find(b"\r\n\r\n")
        return parse_client_frames(data[end + 4 :])

    def texts(self) -> list[dict[str, Any]]:
        """The JSON objects of the client's text frames."""
        return [json.loads(p) for op, p in self.frames() if op == 1]

    def close_frames(self) -> list[tuple[int | None, bytes]]:
        out = []
        for op, p in self.frames():
            if op == 8:
                out.append((struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None, p[2:]))
        return out

    def pings(self) -> list[bytes]:
        return [p for op, p in self.frames() if op == 9]

    def hello(self) -> dict[str, Any]:
        hellos = [t for t in self.texts() if t.get("type") == AGENT_HELLO]
        assert len(hellos) == 1, hellos
        return hellos[0]

    # -- writing as the server --------------------------------------------------

    def open(self) -> Conn:
        """Connect TCP (the protocol writes its request)."""
        self.proto.makeConnection(self.transport)
        return self

    def accept(self, extra: bytes = b"") -> Conn:
        """Answer the upgrade with 101."""
        _, headers = self.request()
        accept = base64.b64encode(
            hashlib.sha1(headers["sec-websocket-key"].encode() + _WS_MAGIC).digest()  # noqa: S324
        ).decode()
        self.receive(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n" + extra
        )
        return self

    def refuse(self, status: int, phrase: str = "Refused", body: bytes = b"") -> Conn:
        self.receive(
            f"HTTP/1.1 {status} {phrase}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        return self

    def receive(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def send_text(self, text: str | bytes) -> None:
        self.receive(server_frame(1, text.encode() if isinstance(text, str) else text))

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    def send_binary(self, data: bytes) -> None:
        self.receive(server_frame(2, data))

    def send_pong(self, payload: bytes) -> None:
        self.receive(server_frame(10, payload))

    def send_close(self, code: int = 1000, reason: bytes = b"") -> None:
        self.receive(server_frame(8, struct.pack("!H", code) + reason))

    def ack_hello(self, acked: str | None = None) -> None:
        hello_id = self.hello()["message_id"] if acked is None else acked
        env = make_envelope(
            AGENT_HELLO_ACK, AGENT, ack_payload(hello_id, AGENT_HELLO), now=1_800_000_000
        )
        self.send_text(env.to_json())

    def activate(self) -> Conn:
        self.accept()
        self.ack_hello()
        return self

    def lose(self, reason: Exception | None = None) -> None:
        """The TCP connection ends: protocol first, then the factory, as Twisted does."""
        assert not self.lost
        self.lost = True
        if reason is None:
            reason = ConnectionAborted() if self.transport.aborted else ConnectionDone()
        failure = Failure(reason)
        self.proto.connectionLost(failure)
        self.harness.client.factory.clientConnectionLost(self.connector, failure)

    def finish(self) -> None:
        """Deliver connectionLost if the client closed or aborted the transport."""
        if self.transport.disconnecting and not self.lost:
            self.lose()


def harness(test: Any, **kwargs: Any) -> Harness:
    """A Harness whose txaio loop is replaced for the duration of ``test``."""
    h = Harness(**kwargs)
    cm = h.txaio()
    cm.__enter__()
    test.addCleanup(cm.__exit__, None, None, None)
    return h


class Harness:
    """One client on a memory reactor, with its events and log lines recorded."""

    def __init__(self, environ: dict[str, str] | None = None, rng: random.Random | None = None,
                 **overrides: Any) -> None:
        self.reactor = RedialingReactor()
        self.txaio_clock = Clock()
        self.settings = settings(**overrides)
        self.signer = RequestSigner.from_key(key(), AGENT, clock=lambda: 1_800_000_000.0)
        self.events: list[ClientEvent] = []
        self.logged: list[LogEvent] = []
        self.client = HostlinkClient(
            self.settings,
            self.signer,
            reactor=self.reactor,
            rng=rng if rng is not None else MidRandom(),
            log=Logger(namespace="test", observer=self.logged.append),
            environ=environ if environ is not None else {},
        )
        self.client.add_observer(self.events.append)
        self._seen_clients = 0

    @contextmanager
    def txaio(self) -> Iterator[Clock]:
        """Autobahn's timers go to ``txaio_clock`` (where none should ever be)."""
        with replace_loop(self.txaio_clock) as clock:
            yield clock

    # -- connections -------------------------------------------------------------

    @property
    def attempts_made(self) -> int:
        return len(self.reactor.tcpClients)

    def target(self) -> tuple[str, int]:
        host, port = self.reactor.tcpClients[-1][:2]
        return host, port

    def conn(self, made: bool = True) -> Conn:
        """The newest attempt's TCP connection, made (or only built, to ``open()`` later)."""
        assert self.attempts_made > self._seen_clients, "no new connection attempt"
        self._seen_clients = self.attempts_made
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        conn = Conn(self, proto, self.reactor.connectors[-1])
        return conn.open() if made else conn

    def fail_connect(self, reason: Exception | None = None) -> None:
        """The newest attempt's TCP connect fails."""
        assert self.attempts_made > self._seen_clients, "no new connection attempt"
        self._seen_clients = self.attempts_made
        self.client.factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(reason or ConnectionRefusedError())
        )

    def active_conn(self) -> Conn:
        c = self.conn().activate()
        assert self.client.is_active
        return c

    # -- observations ---------------------------------------------------------------

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of_kind(self, kind: str) -> list[ClientEvent]:
        return [e for e in self.events if e.kind == kind]

    def delays(self) -> list[float]:
        return [e.fields["delay"] for e in self.of_kind("retry_scheduled")]

    def messages(self, level: str | None = None) -> list[str]:
        return [
            formatEvent(e) for e in self.logged
            if level is None or e["log_level"].name == level
        ]

    def pending_calls(self) -> list[Any]:
        return [c for c in self.reactor.getDelayedCalls() if c.active()]
