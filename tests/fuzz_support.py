"""
The fuzz harness shared by tests/test_fuzz.py (the client protocol) and
tests/test_fuzz_tasks.py (tasks over the session); no test cases here.

* the budget: ``HOSTLINK_FUZZ_EXAMPLES`` (:func:`budget`), shared out by
  :func:`settings_for`, and :class:`FuzzTestCase`, which runs a share of it
  and checks the global log after every example;
* what a server sends, as data: :func:`encode_frame`, :class:`Message`
  (whole or fragmented), :class:`Control`, :class:`RawFrame`, :class:`Raw`,
  and the steps :class:`Send`, :class:`Advance`, :class:`Act`, with
  :class:`Handshake` and :class:`ProxyReply` for connection attempts;
* :class:`Driver`: plays the server for one client over in-memory
  connections on a ``Clock``, runs the steps, and checks the client's
  invariants after every chunk (see tests/test_fuzz.py's docstring).

A message's content is bytes or anything with a ``render(hello_id)``
method giving its bytes for the connection whose hello is ``hello_id``; a
driver subclass can render contents of its own (:meth:`Driver.render_content`).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, UserError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from hostlink_tw.client import CLOSE_TIMEOUT, MAX_RESPONSE_HEAD_BYTES, ClientEvent
from hostlink_tw.protocol import AGENT_HELLO, AGENT_HELLO_ACK

from .test_client_support import AGENT, Conn, Harness

#: Total examples over every test of one module (each module shares it out).
BUDGET_ENV = "HOSTLINK_FUZZ_EXAMPLES"
#: The total without it (``make test``): small, and derandomised.
DEFAULT_BUDGET = 1500

#: The fuzz harness's message limit: small, so oversized input stays cheap.
MAX_BYTES = 512

#: Fixed upgrade headers: signing is tested elsewhere, and RSA costs a
#: millisecond per attempt that the budget is better spent on frames.
SIGNED = {
    "X-Agent-ID": AGENT,
    "X-Timestamp": "1800000000",
    "X-Nonce": "AAAAAAAAAAAAAAAAAAAAAA==",
    "X-Signature": "c2lnbmF0dXJl",
}

NOW = 1_800_000_000

#: Bytes per dataReceived when flooding, as one TCP read might bring.
READ = 8192


def budget(default: int = DEFAULT_BUDGET) -> int:
    """The total number of examples to run, from the environment (else ``default``)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    return int(raw) if raw else default


def settings_for(share: float, default: int = DEFAULT_BUDGET) -> settings:
    """Hypothesis settings giving a test ``share`` of the budget."""
    explore = bool(os.environ.get(BUDGET_ENV, "").strip())
    return settings(
        max_examples=max(1, math.ceil(budget(default) * share)),
        deadline=None,
        derandomize=not explore,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# --- wire encoding -----------------------------------------------------------------------


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length_form: str = "min",
    claimed: int | None = None,
) -> bytes:
    """
    One frame as a server would put it on the wire (unmasked unless ``mask``).

    ``length_form`` is ``min`` (the shortest encoding, as RFC 6455 requires),
    ``16`` or ``64`` (non-minimal when the length is small); ``claimed``
    puts a different length in the header than the payload that follows.
    """
    n = len(payload) if claimed is None else claimed
    head = bytes([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)])
    maskbit = 0x80 if mask is not None else 0
    if length_form == "min" and n < 126:
        head += bytes([maskbit | n])
    elif length_form in ("min", "16") and n < 65536:
        head += bytes([maskbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([maskbit | 127]) + struct.pack("!Q", n & (2**64 - 1))
    if mask is not None:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


# --- what the server sends, as data -----------------------------------------------------


class Rendered(Protocol):
    """A message content resolved against the live connection."""

    def render(self, hello_id: str) -> bytes:
        """The message's bytes for the connection whose hello is ``hello_id``."""
        ...


@dataclass(frozen=True)
class Message:
    """One data message, whole or fragmented, with control frames between fragments."""

    content: Rendered | bytes
    binary: bool = False
    cuts: tuple[int, ...] = ()
    controls: tuple[tuple[int, Control], ...] = ()


@dataclass(frozen=True)
class Control:
    """A ping, pong or close frame; ``payload`` None for a pong echoing our last ping."""

    opcode: int
    payload: bytes | None


@dataclass(frozen=True)
class RawFrame:
    """A frame with every header field chosen: what no conforming server sends."""

    opcode: int
    payload: bytes
    fin: bool
    rsv: int
    masked: bool
    length_form: str
    claimed: int | None


@dataclass(frozen=True)
class Raw:
    """Bytes as they are."""

    data: bytes


Item = Message | Control | RawFrame | Raw


@dataclass(frozen=True)
class Send:
    """Send items, with the byte stream cut into ``dataReceived`` chunks at ``cuts``."""

    items: tuple[Item, ...]
    cuts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Advance:
    """Advance the reactor's clock."""

    seconds: float


@dataclass(frozen=True)
class Act:
    """``lose`` (TCP ends), ``finish`` (deliver the end of a closed transport),
    ``pongs`` (answer every ping), ``stop`` or ``start`` the client."""

    what: str


Step = Send | Advance | Act


@dataclass(frozen=True)
class Handshake:
    """How the server answers a connection attempt."""

    kind: str  # accept, split, refuse, garbage, bad_key, silent, fail
    status: int = 101
    data: bytes = b""
    cut: int = 0


@dataclass(frozen=True)
class ProxyReply:
    """What an HTTP proxy answers to the client's CONNECT, cut at ``cuts``
    (``b"flood"``: a head that never ends)."""

    data: bytes
    cuts: tuple[int, ...] = ()


class TunnelConn(Conn):
    """A connection through an HTTP proxy: the CONNECT request is not part of the upgrade."""

    def written(self) -> bytes:
        """What the client wrote after its CONNECT request (all of it before the tunnel)."""
        data = super().written()
        if data.startswith(b"CONNECT "):
            end = data.find(b"\r\n\r\n")
            return data[end + 4 :] if end >= 0 else b""
        return data


# --- the driver --------------------------------------------------------------------------


def matching_hello_ack(message: bytes, hello_id: str, max_bytes: int = MAX_BYTES) -> bool:
    """Whether ``message`` is, by an independent reading, an ack of ``hello_id``
    (in a message within ``max_bytes``, the client's limit)."""
    if len(message) > max_bytes:
        return False
    try:
        doc = json.loads(message.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    version = doc.get("protocol_version")
    payload = doc.get("payload")
    return (
        doc.get("type") == AGENT_HELLO_ACK
        and doc.get("agent_id") == AGENT
        and type(version) is int
        and version == 1
        and isinstance(payload, dict)
        and payload.get("acked_message_id") == hello_id
    )


@dataclass
class Line:
    """What the server sent on one connection."""

    conn: Conn
    sent: int = 0
    #: (offset just past the message's last byte, its bytes) for every data message.
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    hello_id: str | None = None
    answered_pings: int = 0

    def hello(self) -> str | None:
        """The id of the hello the client wrote here, if it did."""
        if self.hello_id is None:
            hellos = [t for t in self.conn.texts() if t.get("type") == AGENT_HELLO]
            if hellos:
                self.hello_id = str(hellos[0]["message_id"])
        return self.hello_id


class Driver:
    """Runs one generated example against a fresh client and checks every invariant."""

    def __init__(
        self, handshakes: tuple[Handshake, ...] = (), proxy: tuple[ProxyReply, ...] | None = None,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        proxied: dict[str, Any] = {}
        if proxy is not None:
            # A host name outside NO_PROXY's loopback exemption, so the proxy is used.
            proxied = {
                "ws_url": "ws://cp.example.test:8080/api/v1/agents/ws",
                "environ": {"HTTP_PROXY": "http://proxy.corp:3128"},
            }
        self.proxy_replies = list(proxy or ())
        self.max_bytes = max_bytes
        self.h = Harness(
            **proxied,
            max_message_bytes=max_bytes,
            hello_timeout=4.0,
            ping_interval=3.0,
            pong_timeout=2.0,
            handshake_timeout=5.0,
            reconnect_min=1.0,
            reconnect_max=8.0,
        )
        self.h.signer.sign_headers = lambda: dict(SIGNED)  # type: ignore[method-assign]
        self.h.client.add_observer(self._observe)
        self.handshakes = list(handshakes)
        self.lines: list[Line] = []
        self.seen = 0
        self.violations: list[str] = []
        self.current: Line | None = None

    # -- invariants ------------------------------------------------------------------------

    def _observe(self, event: ClientEvent) -> None:
        if event.kind == "active":
            problem = self._activity_problem()
            if problem:
                self.violations.append(f"became active: {problem}")

    def _activity_problem(self) -> str | None:
        """Why the client must not be active now (None when it may be)."""
        live = [line for line in self.lines if not line.conn.lost]
        if not live:
            return "no live connection"
        line = live[-1]
        hello_id = line.hello()
        if hello_id is None:
            return "no hello was sent on this connection"
        if not any(
            end <= line.sent and matching_hello_ack(m, hello_id, self.max_bytes)
            for end, m in line.messages
        ):
            return f"no matching agent.hello_ack for {hello_id} received on this connection"
        if line.conn.close_frames():
            return "the client has sent a close frame"
        if line.conn.transport.disconnecting:
            return "the client is closing the transport"
        return None

    def check(self) -> None:
        """Every invariant that must hold between any two inputs."""
        assert not self.violations, self.violations
        if self.h.client.is_active:
            problem = self._activity_problem()
            assert problem is None, f"active although {problem}"
        live = [line for line in self.lines if not line.conn.lost]
        assert len(live) <= 1, f"{len(live)} live connections"
        assert self.h.attempts_made <= self.seen + 1, "more than one new attempt at once"
        bad = [
            e for e in self.h.logged
            if e.get("log_failure") is not None
            or e["log_level"] in (LogLevel.error, LogLevel.critical)
        ]
        assert not bad, bad

    # -- connections -----------------------------------------------------------------------

    def _handshake(self) -> None:
        """Answer a new connection attempt, as the next planned handshake says."""
        if self.h.attempts_made <= self.seen:
            return
        plan = self.handshakes.pop(0) if self.handshakes else Handshake("accept")
        if plan.kind == "fail":
            self.seen = self.h.attempts_made
            self.h.fail_connect(ConnectionLost())
            return
        self.seen = self.h.attempts_made
        host, port, factory, _, _ = self.h.reactor.tcpClients[-1]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        conn = TunnelConn(self.h, proto, self.h.reactor.connectors[-1]).open()
        line = Line(conn)
        self.lines.append(line)
        self.current = line
        if self.h.client.proxy is not None and not conn.transport.disconnecting:
            reply = self.proxy_replies.pop(0) if self.proxy_replies else ProxyReply(
                b"HTTP/1.1 200 Connection established\r\n\r\n"
            )
            if reply.data == b"flood":
                self._flood(conn, b"HTTP/1.1 200 OK\r\n", 3 * MAX_RESPONSE_HEAD_BYTES)
                return
            bounds = sorted({c % (len(reply.data) + 1) for c in reply.cuts}
                            | {0, len(reply.data)})
            for a, b in zip(bounds, bounds[1:], strict=False):
                if conn.lost or conn.transport.disconnecting:
                    break
                conn.receive(reply.data[a:b])
                self.check()
            if b"\r\n\r\n" not in conn.written():
                return  # no upgrade request (yet): the tunnel is not up
        if conn.transport.disconnecting:
            return
        if plan.kind == "accept":
            conn.accept()
        elif plan.kind == "split":
            whole = self._accept_bytes(conn)
            cut = min(plan.cut, len(whole) - 1)
            conn.receive(whole[:cut])
            self.check()
            conn.receive(whole[cut:])
        elif plan.kind == "refuse":
            conn.refuse(plan.status, "No", plan.data)
        elif plan.kind == "garbage":
            conn.receive(plan.data)
        elif plan.kind == "flood":
            self._flood(conn, b"HTTP/1.1 101 Switching Protocols\r\n", plan.cut)
        elif plan.kind == "bad_key":
            conn.receive(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n"
            )
        self.check()

    def _flood(self, conn: Conn, start: bytes, size: int) -> None:
        """``size`` bytes of response head without its end, in 8 KiB reads."""
        pad = b"X-Pad: " + b"a" * 1017 + b"\r\n"
        data = (start + pad * (size // len(pad) + 1))[:size]
        for i in range(0, len(data), READ):
            if conn.lost or conn.transport.disconnecting:
                break
            conn.receive(data[i : i + READ])
            self.check()
            buffered = len(conn.proto.data)
            assert buffered <= MAX_RESPONSE_HEAD_BYTES + READ, f"{buffered} bytes buffered"

    @staticmethod
    def _accept_bytes(conn: Conn) -> bytes:
        _, headers = conn.request()
        accept = base64.b64encode(
            hashlib.sha1(  # noqa: S324 - RFC 6455's accept key
                headers["sec-websocket-key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            ).digest()
        )
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    def _live(self) -> Line | None:
        line = self.current
        return line if line is not None and not line.conn.lost else None

    # -- steps -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the client and answer its first attempt."""
        self.h.client.start()
        self.check()
        self._handshake()

    def run(self, steps: list[Step]) -> None:
        """Perform each step, checking the invariants after each one."""
        for step in steps:
            if isinstance(step, Send):
                self._send(step)
            elif isinstance(step, Advance):
                self.h.reactor.advance(step.seconds)
            else:
                self._act(step.what)
            self.check()
            self._handshake()

    def _act(self, what: str) -> None:
        line = self._live()
        if what == "stop":
            self.h.client.stop()
        elif what == "start":
            self.h.client.start()
        elif line is None:
            return
        elif what == "lose":
            line.conn.lose()
        elif what == "finish":
            line.conn.finish()
        elif what == "pongs":
            pings = line.conn.pings()
            for payload in pings[line.answered_pings:]:
                self._deliver(line, [(encode_frame(10, payload), None)], ())
            line.answered_pings = len(pings)

    def _send(self, step: Send) -> None:
        line = self._live()
        if line is None:
            return
        hello_id = line.hello() or "msg_none"
        pieces: list[tuple[bytes, bytes | None]] = []
        for item in step.items:
            pieces.extend(self._render(item, line, hello_id))
        self._deliver(line, pieces, step.cuts)

    def _render(self, item: Item, line: Line, hello_id: str) -> list[tuple[bytes, bytes | None]]:
        """(wire bytes, message completed by these bytes or None) for one item."""
        if isinstance(item, Raw):
            return [(item.data, None)]
        if isinstance(item, RawFrame):
            mask = b"\x01\x02\x03\x04" if item.masked else None
            wire = encode_frame(
                item.opcode, item.payload, fin=item.fin, rsv=item.rsv, mask=mask,
                length_form=item.length_form, claimed=item.claimed,
            )
            return [(wire, None)]
        if isinstance(item, Control):
            return [(self._control(item, line), None)]
        data = self.render_content(item.content, line, hello_id)
        bounds = sorted({c % (len(data) + 1) for c in item.cuts} | {0, len(data)})
        parts = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [b""]
        controls = dict(item.controls)
        out: list[tuple[bytes, bytes | None]] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            opcode = (2 if item.binary else 1) if i == 0 else 0
            completes = None if (item.binary or not last) else data
            out.append((encode_frame(opcode, part, fin=last), completes))
            if not last and i in controls:
                out.append((self._control(controls[i], line), None))
        return out

    def render_content(self, content: Rendered | bytes, line: Line, hello_id: str) -> bytes:
        """The bytes of one message's content on ``line`` (subclasses add their own kinds)."""
        return content if isinstance(content, bytes) else content.render(hello_id)

    @staticmethod
    def _control(control: Control, line: Line) -> bytes:
        payload = control.payload
        if payload is None:
            pings = line.conn.pings()
            payload = pings[-1] if pings else b""
        return encode_frame(control.opcode, payload)

    def _deliver(
        self, line: Line, pieces: list[tuple[bytes, bytes | None]], cuts: tuple[int, ...]
    ) -> None:
        """Feed ``pieces`` to the protocol in chunks, checking after each chunk."""
        stream = b"".join(p for p, _ in pieces)
        offset = line.sent
        for wire, message in pieces:
            offset += len(wire)
            if message is not None:
                line.messages.append((offset, message))
        bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for a, b in zip(bounds, bounds[1:], strict=False):
            if line.conn.lost:
                return
            line.sent += b - a
            line.conn.receive(stream[a:b])
            self.check()

    # -- the end ---------------------------------------------------------------------------

    def finish(self, test: SynchronousTestCase, txaio_clock: Clock) -> None:
        """Stop the client; it must stop completely, leaving no timer behind."""
        d = self.h.client.stop()
        self.check()
        for _ in range(4):
            for line in self.lines:
                if not line.conn.lost:
                    line.conn.finish()
            if self.h.attempts_made > self.seen:
                self.seen = self.h.attempts_made
                self.h.fail_connect(UserError())
            if d.called:
                break
            self.h.reactor.advance(CLOSE_TIMEOUT)
        test.successResultOf(d)
        self.check()
        assert not self.h.client.is_active
        assert self.h.pending_calls() == [], self.h.pending_calls()
        assert txaio_clock.getDelayedCalls() == [], txaio_clock.getDelayedCalls()



# --- the test case ---------------------------------------------------------------------


def use_txaio_clock(test: Any) -> Clock:
    """A Clock as txaio's loop for the rest of ``test`` (Autobahn's timers run on it)."""
    clock = Clock()
    loop = replace_loop(clock)
    loop.__enter__()
    test.addCleanup(loop.__exit__, None, None, None)
    return clock


class FuzzTestCase(SynchronousTestCase):
    """Shared set-up: txaio's loop on a Clock, a global log watch, example counting."""

    #: The module's total without ``HOSTLINK_FUZZ_EXAMPLES``.
    default_budget = DEFAULT_BUDGET

    def setUp(self) -> None:
        # Hypothesis's caches (unicode data, constants) go to trial's temporary
        # directory, the current one while a test runs, not into the checkout.
        set_hypothesis_home_dir(os.path.abspath(".hypothesis"))
        self.addCleanup(set_hypothesis_home_dir, None)
        self.txaio_clock = use_txaio_clock(self)
        self.global_events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.global_events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.global_events.append)
        self.examples = 0

    @contextmanager
    def example(self) -> Iterator[None]:
        """One example: count it and check the global log after it."""
        self.examples += 1
        del self.global_events[:]
        yield
        bad = [
            e for e in self.global_events
            if e.get("log_failure") is not None or e.get("isError")
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]
        assert not bad, bad

    def explore(self, share: float, strategy: Any, body: Callable[[Any], None]) -> None:
        """Run ``body`` on ``share`` of the budget's examples drawn from ``strategy``."""
        started = time.monotonic()

        @settings_for(share, self.default_budget)
        @given(strategy)
        def run(example: Any) -> None:
            with self.example():
                body(example)

        try:
            run()
        except BaseException as e:
            # Hypothesis puts the falsifying example and the reproduction
            # blob in the exception's notes, which trial does not show.
            notes = "\n".join(getattr(e, "__notes__", []))
            if notes:
                print(f"\n{self.id()}:\n{notes}", file=sys.stderr)
            raise
        gc.collect()  # a Deferred failing unhandled is reported when collected
        bad = [e for e in self.global_events if e.get("log_failure") is not None]
        self.assertEqual(bad, [])
        if os.environ.get(BUDGET_ENV, "").strip():
            print(
                f"\n{self.id()}: {self.examples} examples in {time.monotonic() - started:.1f}s",
                file=sys.stderr,
            )
        # Hypothesis stops early only on a failure (which raises) or an
        # exhausted search space, which these strategies do not have.
        self.assertGreaterEqual(
            self.examples, settings_for(share, self.default_budget).max_examples
        )

