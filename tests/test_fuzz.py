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

import json
import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.client import MAX_RESPONSE_HEAD_BYTES, ClientState
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

from .fuzz_support import (
    MAX_BYTES,
    NOW,
    Act,
    Advance,
    Control,
    Driver,
    FuzzTestCase,
    Handshake,
    Message,
    ProxyReply,
    Raw,
    RawFrame,
    Send,
    Step,
    matching_hello_ack,
    use_txaio_clock,
)
from .test_client_support import AGENT

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
        env = make_envelope(AGENT_HELLO_ACK, AGENT, ack_payload(hello_id, AGENT_HELLO), now=NOW)
    elif base == "hello_ack_unknown":
        env = make_envelope(
            AGENT_HELLO_ACK, AGENT, ack_payload("msg_424242", AGENT_HELLO), now=NOW
        )
    elif base == "ack_hello":
        env = make_envelope(ACK, AGENT, ack_payload(hello_id, AGENT_HELLO), now=NOW)
    elif base == "ack_unknown":
        env = make_envelope(ACK, AGENT, ack_payload("msg_1", TASK_OUTPUT), now=NOW)
    elif base == "error":
        env = make_envelope(ERROR, AGENT, error_payload("boom", "bad", True, hello_id), now=NOW)
    elif base == "task":
        env = make_envelope(
            TASK_DELIVER, AGENT, {"command": "id"}, now=NOW, task_id="t", execution_attempt_id="a"
        )
    else:  # a server sending our own hello back
        env = make_envelope(AGENT_HELLO, AGENT, {}, now=NOW)
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


# --- the tests ---------------------------------------------------------------------------


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
        self.txaio_clock = use_txaio_clock(self)

    def test_oracle(self) -> None:
        good = EnvelopeSpec("hello_ack").render("msg_5")
        self.assertTrue(matching_hello_ack(good, "msg_5"))
        self.assertFalse(matching_hello_ack(good, "msg_6"))
        for spec in [
            EnvelopeSpec("ack_hello"),
            EnvelopeSpec("hello_ack", (("top", "protocol_version", True),)),
            EnvelopeSpec("hello_ack", (("top", "agent_id", "someone"),)),
            EnvelopeSpec("hello_ack", encoding="padded"),
            EnvelopeSpec("hello_ack", (("payload", "acked_message_id", FromHello("upper")),)),
        ]:
            self.assertFalse(matching_hello_ack(spec.render("msg_5"), "msg_5"), spec)

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
        self.txaio_clock = use_txaio_clock(self)

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
