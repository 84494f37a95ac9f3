"""
Inbound throughput: envelopes per second the agent's client protocol
validates and handles, on one core.

A :class:`~hostlink_tw.client.HostlinkClient` runs on a memory reactor; its
connection is a ``StringTransport`` whose server side is played here (the
101 answer and the ``agent.hello_ack``), so the session is really active.
Then valid ``ack`` envelopes (acking task output, the busiest ack of later
phases) are fed in two ways:

``onMessage``
    straight into ``HostlinkClientProtocol.onMessage``: the agent's own work
    (JSON parsing, every PROTOCOL §5 check, ack bookkeeping, the
    ``message_in`` event).
``dataReceived``
    as unmasked WebSocket text frames into ``dataReceived``, in 64 KiB
    chunks as a socket read would deliver them: the above plus Autobahn's
    frame parser and UTF-8 validation.

No real socket is involved: the kernel's share is left out on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import statistics
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TARGET_PER_SECOND", "ThroughputResult", "measure_throughput"]

#: Envelopes per second on one core, at least.
TARGET_PER_SECOND = 20_000.0

_AGENT = "bench-throughput"
_URL = "ws://127.0.0.1:9/api/v1/agents/ws"
_WS_MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ThroughputResult:
    """Envelopes per second for each repeat of each path, and the envelope size."""

    envelopes_per_repeat: int
    envelope_bytes: int
    on_message: list[float]
    data_received: list[float]
    #: Share of ``onMessage`` time per step, from a cProfile of a sample.
    shares: dict[str, float] = field(default_factory=dict)

    @property
    def on_message_rate(self) -> float:
        """Median envelopes/s through ``onMessage``."""
        return float(statistics.median(self.on_message))

    @property
    def data_received_rate(self) -> float:
        """Median envelopes/s through ``dataReceived`` (framing included)."""
        return float(statistics.median(self.data_received))

    @property
    def ratio(self) -> float:
        """The framed rate over the target (the stricter of the two paths)."""
        return self.data_received_rate / TARGET_PER_SECOND

    @property
    def met(self) -> bool:
        """Whether the framed path reaches 20,000 envelopes/s."""
        return self.data_received_rate >= TARGET_PER_SECOND

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, derived values included."""
        return {
            **asdict(self),
            "on_message_rate": self.on_message_rate,
            "data_received_rate": self.data_received_rate,
            "ratio": self.ratio,
            "met": self.met,
        }


def _server_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame (server to client)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, n])
    elif n < 65536:
        head = bytes([0x81, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x81, 127]) + struct.pack("!Q", n)
    return head + payload


class _ActiveSession:
    """One client with an active session over a memory transport."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from hostlink_tw.client import HostlinkClient
        from hostlink_tw.config import Settings
        from hostlink_tw.protocol import AGENT_HELLO, AGENT_HELLO_ACK, ack_payload, make_envelope
        from hostlink_tw.signing import RequestSigner

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.reactor = MemoryReactorClock()
        self.client = HostlinkClient(
            Settings(enabled=True, ws_url=_URL),
            RequestSigner.from_key(key, _AGENT),
            reactor=self.reactor,
            environ={},
        )
        self.client.start()
        factory = self.reactor.tcpClients[-1][2]
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 9))
        self.proto: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        self.proto.makeConnection(self.transport)
        request = bytes(self.transport.value())
        ws_key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(ws_key + _WS_MAGIC).digest())  # noqa: S324
        self.proto.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        hello_ack = make_envelope(
            AGENT_HELLO_ACK, _AGENT, ack_payload(self.client.hello_id or "", AGENT_HELLO)
        )
        self.proto.dataReceived(_server_frame(hello_ack.to_json().encode()))
        if not self.client.is_active:
            raise RuntimeError("the benchmark session did not become active")
        self.transport.clear()

    def close(self) -> None:
        """Stop the client and drop the memory connection."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.client.stop()
        reason = Failure(ConnectionDone())
        self.proto.connectionLost(reason)
        self.client.factory.clientConnectionLost(None, reason)


def _acks(count: int) -> list[bytes]:
    from hostlink_tw.protocol import ACK, TASK_OUTPUT, ack_payload, make_envelope

    now = time.time()
    return [
        make_envelope(
            ACK,
            _AGENT,
            ack_payload(
                f"msg_{1_800_000_000_000_000_000 + i}",
                TASK_OUTPUT,
                task_id="task_01HZX3",
                execution_attempt_id="att_01HZX3",
                highest_output_sequence=i,
            ),
            now=now,
            task_id="task_01HZX3",
            execution_attempt_id="att_01HZX3",
        )
        .to_json()
        .encode("utf-8")
        for i in range(count)
    ]


def measure_throughput(envelopes: int = 50_000, repeats: int = 5) -> ThroughputResult:
    """
    Feed ``envelopes`` acks ``repeats`` times through each path; rates are
    envelopes over CPU time of this thread (``time.thread_time``), which is
    one core's worth by construction.
    """
    if envelopes < 1 or repeats < 1:
        raise ValueError("envelopes and repeats must be >= 1")
    session = _ActiveSession()
    try:
        payloads = _acks(envelopes)
        framed = b"".join(_server_frame(p) for p in payloads)
        chunks = [framed[i : i + _CHUNK] for i in range(0, len(framed), _CHUNK)]
        on_message: list[float] = []
        data_received: list[float] = []
        proto = session.proto
        for _ in range(repeats):
            start = time.thread_time()
            for payload in payloads:
                proto.onMessage(payload, False)
            on_message.append(envelopes / (time.thread_time() - start))
            start = time.thread_time()
            for chunk in chunks:
                proto.dataReceived(chunk)
            data_received.append(envelopes / (time.thread_time() - start))
        client = session.client
        if not client.is_active or client.last_ack is None:
            raise RuntimeError(f"the session did not survive the acks: {client.last_failure}")
        if client.last_ack.payload.get("highest_output_sequence") != envelopes - 1:
            raise RuntimeError("not every ack was handled")
        if session.transport.value():
            raise RuntimeError("the agent answered an ack; acks have no side effects")
        shares = _profile_shares(proto, payloads[:5000])
    finally:
        session.close()
    return ThroughputResult(envelopes, len(payloads[0]), on_message, data_received, shares)


# Steps of HostlinkClientProtocol.onMessage for an ack, by function name.
_STEPS = {
    "parse_envelope": "parse_envelope (JSON + every §5 rule)",
    "_loads": "  of which JSON parsing with duplicate-key/depth checks",
    "validate": "  of which Envelope.validate",
    "handle": "the session's dispatch (ack handling, last-ack bookkeeping)",
    "emit": "the message_in event",
}


def _profile_shares(proto: Any, payloads: list[bytes]) -> dict[str, float]:
    """Cumulative share of each step in ``onMessage`` over ``payloads``."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for payload in payloads:
        proto.onMessage(payload, False)
    profile.disable()
    stats: Any = pstats.Stats(profile)
    total = 0.0
    steps: dict[str, float] = {}
    for (filename, _line, name), (_cc, _n, _own, cum, _callers) in stats.stats.items():
        if name == "onMessage" and "hostlink_tw" in filename:
            total = cum
        elif name in _STEPS and "hostlink_tw" in filename:
            steps[_STEPS[name]] = steps.get(_STEPS[name], 0.0) + cum
    if total <= 0:
        return {}
    return {k: v / total for k, v in steps.items()}
