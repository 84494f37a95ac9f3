"""
Hypothesis against the agent's client protocol: hostile inbound frames and
frame sequences over an in-memory connection.

The server is played on a ``StringTransport`` (tests/test_client_support.py):
the client writes its upgrade request and masked frames there, and every
inbound byte goes straight to ``HostlinkClientProtocol.dataReceived``, split
into chunks at generated points.  Generated input:

* messages as text or binary, whole or fragmented into continuation frames,
  with control frames between the fragments; oversized ones (above
  ``max_message_bytes``), both assembled and announced by a frame header only;
* valid envelopes with hostile field values (wrong types, unicode, huge
  numbers, duplicate keys, truncation, padding), acks and hello_acks for
  unknown ids and for near misses of the hello's id;
* control frames with odd payloads: pings over 125 bytes, unsolicited and
  echoed pongs, close frames with no, one-byte, invalid or reserved codes and
  reasons that are not UTF-8;
* frames no server may send: reserved bits and opcodes, masked frames,
  continuation without a start, non-minimal and impossible lengths;
* raw bytes, both after the upgrade and instead of the upgrade response;
  response heads that never end (the client must not buffer them);
* through an HTTP proxy, odd answers to ``CONNECT`` (bad status lines and
  headers, bytes after the answer);
* interleaved with clock advances (pings, pong, hello, handshake and close
  timeouts), TCP losses, and ``stop()``/``start()``, across reconnects.

Invariants, checked after every chunk and every step:

* nothing escapes the protocol: no exception out of ``dataReceived``, a
  timer or ``connectionLost``; nothing logged as a failure or at
  ``error``/``critical`` level, by the client or on the global log;
* the agent is active only when the current connection has received a
  matching ``agent.hello_ack`` (a JSON object of type ``agent.hello_ack``,
  our agent id, protocol version 1 and ``payload.acked_message_id`` equal to
  the ``message_id`` of the hello the client wrote on that connection, in a
  message within ``max_message_bytes``), while the client has written no
  close frame on it (it answers the server's), is not closing it, and TCP
  is up;
* at most one connection attempt is open at any time;
* a response head that never ends is not buffered beyond
  ``MAX_RESPONSE_HEAD_BYTES`` (plus one read);
* afterwards ``stop()`` completes and leaves no timer in the reactor or on
  txaio's loop.

The example budget comes from ``HOSTLINK_FUZZ_EXAMPLES`` (total over all
tests here; small by default so ``make test`` stays quick; ``make fuzz``
sets 100,000).  Without it the runs are derandomised (the same examples
every time); with it each run explores new ones.  No example database is
kept (a failure prints its example and a ``@reproduce_failure`` blob
instead), and Hypothesis's caches go to trial's temporary directory.
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
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, UserError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from hostlink_tw.client import CLOSE_TIMEOUT, MAX_RESPONSE_HEAD_BYTES, ClientEvent, ClientState
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_DELIVER,
    TASK_OUTPUT,
    ack_payload,
    error_payload,
    make_envelope,
)

from .test_client_support import AGENT, Conn, Harness

#: Total examples over every test in this module.
BUDGET_ENV = "HOSTLINK_FUZZ_EXAMPLES"
DEFAULT_BUDGET = 1500

#: The fuzz harness's message limit: small, so oversized input stays cheap.
MAX_BYTES = 512

#: Fixed upgrade headers: signing is tested elsewhere, and RSA costs a
#: millisecond per attempt that the budget is better spent on frames.
_SIGNED = {
    "X-Agent-ID": AGENT,
    "X-Timestamp": "1800000000",
    "X-Nonce": "AAAAAAAAAAAAAAAAAAAAAA==",
    "X-Signature": "c2lnbmF0dXJl",
}

_NOW = 1_800_000_000

#: Bytes per dataReceived when flooding, as one TCP read might bring.
_READ = 8192


def budget() -> int:
    """The total number of examples to run, from the environment."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    return int(raw) if raw else DEFAULT_BUDGET


def _settings_for(share: float) -> settings:
    """Hypothesis settings giving a test ``share`` of the budget."""
    explore = bool(os.environ.get(BUDGET_ENV, "").strip())
    return settings(
        max_examples=max(1, math.ceil(budget() * share)),
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


# --- what the server sends, as data (resolved against the live connection) ----------------


@dataclass(frozen=True)
class FromHello:
    """A value derived from the hello's message id once it is known."""

    how: str  # exact, upper, prefix, suffix, truncated, padded, other

    def resolve(self, hello_id: str) -> str:
        """The value for this hello id."""
        return {
            "exact": hello_id,
            "upper": hello_id.upper(),
            "prefix": "x" + hello_id,
            "suffix": hello_id + "0",
            "truncated": hello_id[:-1],
            "padded": f" {hello_id} ",
            "other": "msg_0",
        }[self.how]


@dataclass(frozen=True)
class EnvelopeSpec:
    """An envelope of a base kind, then mutated and encoded in some hostile way."""

    base: str
    mutations: tuple[tuple[str, str, Any], ...] = ()
    encoding: str = "plain"
    extra: int = 0

    def render(self, hello_id: str) -> bytes:
        """The message's bytes for the connection whose hello is ``hello_id``."""
        doc = _base_envelope(self.base, hello_id)
        for where, name, value in self.mutations:
            target = doc if where == "top" else doc.setdefault("payload", {})
            if not isinstance(target, dict):
                continue
            if isinstance(value, FromHello):
                value = value.resolve(hello_id)
            if value is _DELETE:
                target.pop(name, None)
            else:
                target[name] = value
        return _encode(doc, self.encoding, self.extra)


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


_DELETE = _Delete()


def _base_envelope(base: str, hello_id: str) -> dict[str, Any]:
    if base == "hello_ack":
        env = make_envelope(AGENT_HELLO_ACK, AGENT, ack_payload(hello_id, AGENT_HELLO), now=_NOW)
    elif base == "hello_ack_unknown":
        env = make_envelope(
            AGENT_HELLO_ACK, AGENT, ack_payload("msg_424242", AGENT_HELLO), now=_NOW
        )
    elif base == "ack_hello":
        env = make_envelope(ACK, AGENT, ack_payload(hello_id, AGENT_HELLO), now=_NOW)
    elif base == "ack_unknown":
        env = make_envelope(ACK, AGENT, ack_payload("msg_1", TASK_OUTPUT), now=_NOW)
    elif base == "error":
        env = make_envelope(ERROR, AGENT, error_payload("boom", "bad", True, hello_id), now=_NOW)
    elif base == "task":
        env = make_envelope(
            TASK_DELIVER, AGENT, {"command": "id"}, now=_NOW, task_id="t", execution_attempt_id="a"
        )
    else:  # a server sending our own hello back
        env = make_envelope(AGENT_HELLO, AGENT, {}, now=_NOW)
    doc: dict[str, Any] = json.loads(env.to_json())
    return doc


def _encode(doc: dict[str, Any], encoding: str, extra: int) -> bytes:
    if encoding == "ascii":
        text = json.dumps(doc)
    elif encoding == "duplicate_first":
        # The same key twice, the hostile value first: last-wins parsers see
        # the original, first-wins ones the other.
        text = json.dumps(doc)
        text = '{"payload": {"acked_message_id": "msg_0"}, ' + text[1:]
    elif encoding == "duplicate_last":
        text = json.dumps(doc)[:-1] + ', "type": "agent.hello_ack"}'
    elif encoding == "truncated":
        text = json.dumps(doc)
        text = text[: max(0, len(text) - 1 - extra % max(1, len(text)))]
    elif encoding == "padded":
        # Whitespace is valid JSON; this pushes the message past the limit.
        text = json.dumps(doc) + " " * (MAX_BYTES + extra)
    elif encoding == "array":
        text = json.dumps([doc])
    elif encoding == "bom":
        return b"\xef\xbb\xbf" + json.dumps(doc).encode()
    elif encoding == "trailing":
        text = json.dumps(doc) + " {}"
    elif encoding == "nul":
        text = json.dumps(doc) + "\x00"
    else:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Message:
    """One data message, whole or fragmented, with control frames between fragments."""

    content: EnvelopeSpec | bytes
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


# --- strategies ----------------------------------------------------------------------------

_hostile_text = st.one_of(
    st.text(max_size=24),
    st.sampled_from(
        ["", " ", "\x00", "\u202e", "\ud800", "msg_1", AGENT, AGENT.upper(), AGENT + " ",
         "agent.hello_ack", "ack", "2026-04-27T11:03:00Z", "2026-04-27T11:03:00.5Z", "x" * 300]
    ),
)
_hostile_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, -1, 2**63, 2**64, 1.0, 0.5, 1e308]),
    st.floats(),
    _hostile_text,
)
_hostile_value = st.recursive(
    _hostile_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_hostile_text, inner, max_size=3),
    max_leaves=6,
)
_from_hello = st.builds(
    FromHello,
    st.sampled_from(["exact", "upper", "prefix", "suffix", "truncated", "padded", "other"]),
)
_top_fields = st.sampled_from(
    ["protocol_version", "message_id", "type", "agent_id", "sent_at", "payload", "task_id",
     "execution_attempt_id", "sequence", "extra"]
)
_payload_fields = st.sampled_from(
    ["acked_message_id", "acked_type", "task_id", "highest_output_sequence", "code", "retryable"]
)
_mutation = st.one_of(
    st.tuples(st.just("top"), _top_fields, st.one_of(_hostile_value, st.just(_DELETE))),
    st.tuples(
        st.just("top"),
        st.just("type"),
        st.sampled_from([AGENT_HELLO_ACK, ACK, ERROR, AGENT_HELLO, "AGENT.HELLO_ACK", ""]),
    ),
    st.tuples(
        st.just("top"),
        st.just("protocol_version"),
        st.sampled_from([True, 1.0, "1", 2, 0, -1, 2**64, None, [1]]),
    ),
    st.tuples(st.just("payload"), _payload_fields, st.one_of(_hostile_value, st.just(_DELETE))),
    st.tuples(st.just("payload"), st.just("acked_message_id"), _from_hello),
)
_envelope = st.builds(
    EnvelopeSpec,
    st.sampled_from(
        ["hello_ack", "hello_ack", "hello_ack_unknown", "ack_hello", "ack_unknown", "error",
         "task", "hello"]
    ),
    st.lists(_mutation, max_size=3).map(tuple),
    st.sampled_from(
        ["plain", "plain", "plain", "ascii", "duplicate_first", "duplicate_last", "truncated",
         "padded", "array", "bom", "trailing", "nul"]
    ),
    st.integers(min_value=0, max_value=64),
)
_valid_hello_ack = st.just(EnvelopeSpec("hello_ack"))

_close_payload = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.tuples(
        st.sampled_from(
            [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1015, 0, 999,
             1004, 1016, 2999, 3000, 4999, 5000, 65535]
        ),
        st.one_of(
            st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
            st.binary(max_size=20),
            st.just(b"r" * 124),
        ),
    ).map(lambda cr: struct.pack("!H", cr[0]) + cr[1]),
)
_control = st.one_of(
    st.builds(Control, st.just(9), st.binary(max_size=125)),
    st.builds(Control, st.just(9), st.binary(max_size=125)),
    st.builds(Control, st.just(10), st.one_of(st.none(), st.binary(max_size=125))),
    st.builds(Control, st.just(10), st.one_of(st.none(), st.binary(max_size=125))),
    st.builds(Control, st.just(8), _close_payload),
    # Over RFC 6455's 125-byte limit for control frames.
    st.builds(Control, st.sampled_from([8, 9, 10]), st.binary(min_size=126, max_size=200)),
)
_content = st.one_of(
    _envelope,
    _envelope,
    _valid_hello_ack,
    st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=64),
    st.integers(min_value=MAX_BYTES - 2, max_value=MAX_BYTES + 2).map(lambda n: b"{" * n),
)
_message = st.builds(
    Message,
    _content,
    st.sampled_from([False, False, False, True]),
    st.lists(st.integers(min_value=0, max_value=2 * MAX_BYTES), max_size=3).map(tuple),
    st.lists(st.tuples(st.integers(min_value=0, max_value=3), _control), max_size=2).map(tuple),
)
_raw_frame = st.builds(
    RawFrame,
    st.integers(min_value=0, max_value=15),
    st.binary(max_size=40),
    st.booleans(),
    # Mostly clean headers, so the opcode, FIN and length get their chance.
    st.sampled_from([0, 0, 0, 0, 0, 1, 2, 4, 7]),
    st.sampled_from([False, False, False, True]),
    st.sampled_from(["min", "min", "16", "64"]),
    st.one_of(
        st.none(),
        st.sampled_from([0, 1, 125, 126, 65535, 65536, MAX_BYTES, MAX_BYTES + 1, 2**63,
                         2**64 - 1]),
    ),
)
# Weighted (one_of picks a branch uniformly): any frame-level violation ends
# the connection, so messages must dominate for envelopes to get through.
_item = st.one_of(
    _message, _message, _message, _message, _message, _message, _control, _control,
    _raw_frame, st.builds(Raw, st.binary(max_size=32)),
)
_cuts = st.lists(st.integers(min_value=0, max_value=4096), max_size=4).map(tuple)
_send = st.builds(Send, st.lists(_item, min_size=1, max_size=4).map(tuple), _cuts)
_advance = st.builds(Advance, st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]))
_life_act = st.builds(Act, st.sampled_from(["lose", "finish", "pongs"]))
_client_act = st.builds(Act, st.sampled_from(["stop", "start"]))

_handshake = st.one_of(
    st.just(Handshake("accept")),
    st.just(Handshake("accept")),
    st.builds(Handshake, st.just("split"), st.just(101), st.just(b""),
              st.integers(min_value=1, max_value=120)),
    st.builds(Handshake, st.just("refuse"),
              st.sampled_from([100, 200, 204, 301, 400, 401, 403, 404, 426, 500, 503, 999]),
              st.binary(max_size=40)),
    st.builds(Handshake, st.just("garbage"), st.just(0), st.binary(max_size=80)),
    st.just(Handshake("bad_key")),
    # A response head that never ends: the client must not buffer it all.
    st.builds(Handshake, st.just("flood"), st.just(0), st.just(b""),
              st.sampled_from([MAX_RESPONSE_HEAD_BYTES - 100, MAX_RESPONSE_HEAD_BYTES + 1,
                               3 * MAX_RESPONSE_HEAD_BYTES])),
    st.just(Handshake("silent")),
    st.just(Handshake("fail")),
)

_proxy_status_line = st.one_of(
    st.sampled_from([b"HTTP/1.1 200 Connection established", b"HTTP/1.0 200 OK",
                     b"HTTP/1.1 200", b"HTTP/1.1 407 Proxy Authentication Required",
                     b"HTTP/1.1 502 Bad Gateway", b"HTTP/2 200 OK", b"HTTP/1.1 2OO OK",
                     b"HTTP/1.1 -200 OK", b"HTTP/1.1 99999999999999999999 OK", b"HTTP/1.1",
                     b"", b"HTTP/1.1 200 \xff\xfe", b"\x85HTTP/1.1 200 OK"]),
    st.binary(max_size=40),
)
_proxy_reply = st.just(ProxyReply(b"flood")) | st.builds(
    ProxyReply,
    st.tuples(
        _proxy_status_line,
        st.lists(st.sampled_from([b"Proxy-Agent: x", b"Content-Length: 5", b": empty",
                                  b"X: \x00\xff", b"\x0bY: z"]), max_size=2),
        st.sampled_from([b"", b"", b"hello", b"\x81\x05hello",
                         b"HTTP/1.1 101 Switching Protocols\r\n\r\n"]),
    ).map(lambda t: t[0] + b"\r\n" + b"".join(h + b"\r\n" for h in t[1]) + b"\r\n" + t[2]),
    _cuts,
)

#: Frames and timers on one connection that has said hello.
one_connection_steps = st.lists(
    st.one_of(_send, _send, _send, _advance, _life_act), min_size=1, max_size=6
)
#: Whole lives: handshakes, reconnects, stop and start.
session_steps = st.lists(
    st.one_of(_send, _send, _advance, _advance, _life_act, _client_act), min_size=1, max_size=12
)
#: Bytes after the upgrade.
raw_steps = st.lists(
    st.one_of(st.builds(Send, st.lists(st.builds(Raw, st.binary(max_size=200)), min_size=1,
                                       max_size=3).map(tuple), _cuts), _advance),
    min_size=1,
    max_size=4,
)


# --- the driver --------------------------------------------------------------------------


def _matching_hello_ack(message: bytes, hello_id: str) -> bool:
    """Whether ``message`` is, by an independent reading, an ack of ``hello_id``."""
    if len(message) > MAX_BYTES:
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
class _Line:
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
        self, handshakes: tuple[Handshake, ...] = (), proxy: tuple[ProxyReply, ...] | None = None
    ) -> None:
        proxied: dict[str, Any] = {}
        if proxy is not None:
            # A host name outside NO_PROXY's loopback exemption, so the proxy is used.
            proxied = {
                "ws_url": "ws://cp.example.test:8080/api/v1/agents/ws",
                "environ": {"HTTP_PROXY": "http://proxy.corp:3128"},
            }
        self.proxy_replies = list(proxy or ())
        self.h = Harness(
            **proxied,
            max_message_bytes=MAX_BYTES,
            hello_timeout=4.0,
            ping_interval=3.0,
            pong_timeout=2.0,
            handshake_timeout=5.0,
            reconnect_min=1.0,
            reconnect_max=8.0,
        )
        self.h.signer.sign_headers = lambda: dict(_SIGNED)  # type: ignore[method-assign]
        self.h.client.add_observer(self._observe)
        self.handshakes = list(handshakes)
        self.lines: list[_Line] = []
        self.seen = 0
        self.violations: list[str] = []
        self.current: _Line | None = None

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
            end <= line.sent and _matching_hello_ack(m, hello_id) for end, m in line.messages
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
        line = _Line(conn)
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
        for i in range(0, len(data), _READ):
            if conn.lost or conn.transport.disconnecting:
                break
            conn.receive(data[i : i + _READ])
            self.check()
            buffered = len(conn.proto.data)
            assert buffered <= MAX_RESPONSE_HEAD_BYTES + _READ, f"{buffered} bytes buffered"

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

    def _live(self) -> _Line | None:
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

    def _render(self, item: Item, line: _Line, hello_id: str) -> list[tuple[bytes, bytes | None]]:
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
        content = item.content
        data = content.render(hello_id) if isinstance(content, EnvelopeSpec) else content
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

    @staticmethod
    def _control(control: Control, line: _Line) -> bytes:
        payload = control.payload
        if payload is None:
            pings = line.conn.pings()
            payload = pings[-1] if pings else b""
        return encode_frame(control.opcode, payload)

    def _deliver(
        self, line: _Line, pieces: list[tuple[bytes, bytes | None]], cuts: tuple[int, ...]
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


# --- the tests ---------------------------------------------------------------------------


class FuzzTestCase(SynchronousTestCase):
    """Shared set-up: txaio's loop on a Clock, a global log watch, example counting."""

    def setUp(self) -> None:
        # Hypothesis's caches (unicode data, constants) go to trial's temporary
        # directory, the current one while a test runs, not into the checkout.
        set_hypothesis_home_dir(os.path.abspath(".hypothesis"))
        self.addCleanup(set_hypothesis_home_dir, None)
        self.txaio_clock = Clock()
        loop = replace_loop(self.txaio_clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
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

        @_settings_for(share)
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
        self.assertGreaterEqual(self.examples, _settings_for(share).max_examples)


class FrameFuzzTests(FuzzTestCase):
    """Hostile frames on one connection, before and after the hello is acked."""

    def test_frames_awaiting_hello_ack(self) -> None:
        """From the hello on: only a matching hello_ack may make the agent active."""

        def body(steps: list[Step]) -> None:
            driver = Driver()
            driver.start()
            driver.run(steps)
            driver.finish(self, self.txaio_clock)

        self.explore(0.3, one_connection_steps, body)

    def test_frames_while_active(self) -> None:
        """An active session meets hostile frames; it ends cleanly or stays active."""

        def body(steps: list[Step]) -> None:
            driver = Driver()
            driver.start()
            driver.run([Send((Message(EnvelopeSpec("hello_ack")),))])
            assert driver.h.client.is_active
            driver.run(steps)
            driver.finish(self, self.txaio_clock)

        self.explore(0.2, one_connection_steps, body)

    def test_raw_bytes(self) -> None:
        """Arbitrary bytes after the upgrade, or instead of the upgrade response."""

        def body(example: tuple[bool, list[Step]]) -> None:
            instead_of_upgrade, steps = example
            driver = Driver((Handshake("silent"),) if instead_of_upgrade else ())
            driver.start()
            driver.run(steps)
            driver.finish(self, self.txaio_clock)

        self.explore(0.15, st.tuples(st.booleans(), raw_steps), body)


class SessionFuzzTests(FuzzTestCase):
    """Whole lives: handshakes answered in odd ways, reconnects, stop and start."""

    def test_sessions_and_reconnects(self) -> None:
        """Never active on an old ack, never two connections, always stoppable."""

        def body(example: tuple[list[Handshake], list[Step]]) -> None:
            handshakes, steps = example
            driver = Driver(tuple(handshakes))
            driver.start()
            driver.run(steps)
            driver.finish(self, self.txaio_clock)

        self.explore(
            0.25, st.tuples(st.lists(_handshake, max_size=4), session_steps), body
        )


class ProxyFuzzTests(FuzzTestCase):
    """Through an HTTP proxy: hostile answers to CONNECT, then the usual session."""

    def test_proxy_tunnel_replies(self) -> None:
        """Whatever the proxy answers, nothing escapes and no session starts without an ack."""

        def body(example: tuple[list[ProxyReply], list[Step]]) -> None:
            replies, steps = example
            driver = Driver(proxy=tuple(replies))
            driver.start()
            driver.run(steps)
            driver.finish(self, self.txaio_clock)

        self.explore(
            0.1, st.tuples(st.lists(_proxy_reply, min_size=1, max_size=3), session_steps), body
        )


class DriverTests(SynchronousTestCase):
    """The fuzz harness can fail: its oracle and its checks see what they must."""

    def setUp(self) -> None:
        self.txaio_clock = Clock()
        loop = replace_loop(self.txaio_clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)

    def test_oracle(self) -> None:
        good = EnvelopeSpec("hello_ack").render("msg_5")
        self.assertTrue(_matching_hello_ack(good, "msg_5"))
        self.assertFalse(_matching_hello_ack(good, "msg_6"))
        for spec in [
            EnvelopeSpec("ack_hello"),
            EnvelopeSpec("hello_ack", (("top", "protocol_version", True),)),
            EnvelopeSpec("hello_ack", (("top", "agent_id", "someone"),)),
            EnvelopeSpec("hello_ack", encoding="padded"),
            EnvelopeSpec("hello_ack", (("payload", "acked_message_id", FromHello("upper")),)),
        ]:
            self.assertFalse(_matching_hello_ack(spec.render("msg_5"), "msg_5"), spec)

    def test_valid_hello_ack_fragmented_activates(self) -> None:
        """The driver's framing is right: a fragmented matching ack activates."""
        driver = Driver()
        driver.start()
        ping = Control(9, b"p")
        driver.run([Send((Message(EnvelopeSpec("hello_ack"), cuts=(5, 30), controls=((0, ping),)),),
                         cuts=(1, 7, 50))])
        self.assertTrue(driver.h.client.is_active)
        driver.finish(self, self.txaio_clock)

    def test_activity_without_ack_is_caught(self) -> None:
        """A client made active by hand fails the check."""
        driver = Driver()
        driver.start()
        driver.h.client._machine.set(ClientState.ACTIVE, "made active by the test")
        self.assertRaises(AssertionError, driver.check)

    def test_error_log_is_caught(self) -> None:
        driver = Driver()
        driver.start()
        driver.h.client.log.error("something broke")
        self.assertRaises(AssertionError, driver.check)

    def test_leftover_timer_is_caught(self) -> None:
        driver = Driver()
        driver.start()
        driver.h.reactor.callLater(100, lambda: None)
        self.assertRaises(AssertionError, driver.finish, self, self.txaio_clock)


class FoundByFuzzingTests(SynchronousTestCase):
    """Minimal reproductions of what the fuzzing found, kept as regression tests."""

    def setUp(self) -> None:
        self.txaio_clock = Clock()
        loop = replace_loop(self.txaio_clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)

    def test_upgrade_response_not_utf8_is_contained(self) -> None:
        """
        An upgrade response whose header block is not UTF-8 fails the attempt
        like any bad response.  (Autobahn decodes it for a debug log line
        before parsing it, and the UnicodeDecodeError used to escape
        ``dataReceived``: on a real reactor an "Unhandled Error" traceback on
        every attempt.)
        """
        driver = Driver((Handshake("silent"),))
        driver.start()
        conn = driver.lines[0].conn
        conn.receive(b"HTTP/1.1 101 Switching \xe9\r\n\r\n")
        driver.check()
        conn.finish()
        self.assertFalse(driver.h.client.is_active)
        self.assertIn("upgrade failed", driver.h.client.last_failure or "")
        driver.finish(self, self.txaio_clock)

    def test_bytes_after_the_proxy_tunnel_reply_are_contained(self) -> None:
        """
        The same through a proxy: bytes that follow the proxy's ``200`` in
        one packet become the start of the upgrade response, which then is
        not UTF-8.
        """
        reply = ProxyReply(b"HTTP/1.1 200 Connection established\r\n\r\n\x81\x05hello")
        driver = Driver((Handshake("silent"),), proxy=(reply,))
        driver.start()
        conn = driver.lines[0].conn
        self.assertIn(b"GET /api/v1/agents/ws", conn.written())
        conn.receive(Driver._accept_bytes(conn))
        driver.check()
        conn.finish()
        self.assertFalse(driver.h.client.is_active)
        self.assertIn("upgrade failed", driver.h.client.last_failure or "")
        driver.finish(self, self.txaio_clock)
