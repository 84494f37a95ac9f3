"""
Tests for L{hostlink_tw.controlplane}, over real loopback sockets.

The client is written here (plain Autobahn plus L{RequestSigner}), not the
agent's client, so the control plane is checked against the protocol text
and not against our own agent.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hostlink_tw import controlplane
from hostlink_tw.controlplane import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_TOO_BIG,
    AgentsFileError,
    ControlPlane,
    NonceCache,
    NoSessionError,
    load_agents_file,
    parse_agents,
    start_control_plane,
)
from hostlink_tw.identity import public_key_base64, public_key_pem
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_RECEIVED,
    Envelope,
    make_envelope,
    parse_envelope,
)
from hostlink_tw.signing import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    RequestSigner,
)
from hostlink_tw.testing import make_test_certificates

# RSA key generation is slow: one key per role, for the whole module.
KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
AGENT_A = "agent-a"
AGENT_B = "agent-b"
BASE_TIME = 1_780_000_000.0
WAIT = 5.0


class FakeClock:
    """Wall-clock time under the test's control, shared by both sides."""

    def __init__(self, now: float = BASE_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _signer(
    key: rsa.RSAPrivateKey = KEY_A, agent_id: str = AGENT_A, at: float = BASE_TIME
) -> RequestSigner:
    return RequestSigner.from_key(key, agent_id, clock=lambda: at)


def _timeout(d: Deferred[Any], seconds: float = WAIT) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


class _Raw(Protocol):
    """An HTTP client that writes one request and collects the answer."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        # A 101 or a keep-alive answer leaves the connection open: hang up
        # ourselves once the whole response is in.
        head, found, body = self.data.partition(b"\r\n\r\n")
        if not found:
            return
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        complete = (
            head.startswith(b"HTTP/1.1 101")
            or (length is not None and len(body) >= int(length.group(1)))
            or (b"chunked" in head.lower() and body.endswith(b"0\r\n\r\n"))
        )
        if complete:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("iso-8859-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        self.text = self.body.decode("utf-8", "replace").strip()


@inlineCallbacks
def raw_request(
    port: int,
    path: str = controlplane.GATEWAY_PATH,
    headers: dict[str, str] | None = None,
    upgrade: bool = True,
    method: str = "GET",
) -> Any:
    """Send one HTTP request (a WebSocket upgrade by default); return a L{Response}."""
    proto = _Raw()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
    else:
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
    data = yield _timeout(proto.done)
    return Response(data)


class _ClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.protocol_instance = self
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))
        waiters, self.factory.waiters = self.factory.waiters, []
        for d in waiters:
            d.callback(None)

    def onPong(self, payload: bytes) -> None:
        self.factory.pongs += 1

    def onPing(self, payload: bytes) -> None:
        self.factory.pings += 1
        if self.factory.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(RuntimeError(f"not opened: {reason}"))
        self.factory.closed.callback((wasClean, code, reason))

    def connectionLost(self, reason: Any = None) -> None:
        # Autobahn may leave its close-handshake timer behind.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None
        super().connectionLost(reason)


class Client(WebSocketClientFactory):
    """One WebSocket connection, with what it received."""

    protocol = _ClientProtocol

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(url, headers=headers)
        self.opened: Deferred[_ClientProtocol] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.received: list[tuple[bytes, bool]] = []
        self.waiters: list[Deferred[None]] = []
        self.pongs = 0
        self.pings = 0
        self.answer_pings = True
        self.protocol_instance: _ClientProtocol | None = None

    @property
    def proto(self) -> _ClientProtocol:
        assert self.protocol_instance is not None
        return self.protocol_instance

    @inlineCallbacks
    def message(self, index: int) -> Any:
        """The envelope received at C{index}, waiting for it if needed."""
        while len(self.received) <= index:
            d: Deferred[None] = Deferred()
            self.waiters.append(d)
            yield _timeout(d)
        payload, is_binary = self.received[index]
        assert not is_binary
        return Envelope.from_json(payload)

    def send(self, envelope: Envelope) -> None:
        self.proto.sendMessage(envelope.to_json().encode("utf-8"))

    def hello(self, agent_id: str = AGENT_A) -> Envelope:
        envelope = make_envelope(AGENT_HELLO, agent_id, {}, now=BASE_TIME)
        self.send(envelope)
        return envelope


class ControlPlaneTestMixin:
    """Start control planes and clients, and clean every one of them up."""

    clock: FakeClock

    def start(self, agents: dict[str, Any] | None = None, **options: Any) -> Deferred[ControlPlane]:
        self.clock = FakeClock()
        if agents is None:
            agents = {AGENT_A: KEY_A.public_key(), AGENT_B: KEY_B.public_key()}
        options.setdefault("clock", self.clock)
        d = start_control_plane(agents, **options)

        def started(cp: ControlPlane) -> ControlPlane:
            self.addCleanup(cp.stop)  # type: ignore[attr-defined]
            return cp

        return d.addCallback(started)

    @inlineCallbacks
    def connect(
        self,
        cp: ControlPlane,
        signer: RequestSigner | None = None,
        *,
        hello: bool = True,
        endpoint: Any = None,
        url: str | None = None,
    ) -> Any:
        """Open a WebSocket as C{signer}'s agent; send hello and wait for its ack."""
        signer = signer or _signer(at=self.clock.now)
        client = Client(url or cp.ws_url, signer.sign_headers())
        if endpoint is None:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", cp.port)
        proto = yield endpoint.connect(client)
        self.addCleanup(self._disconnect, client, proto)  # type: ignore[attr-defined]
        yield _timeout(client.opened)
        if hello:
            sent = client.hello(signer.agent_id)
            ack = yield client.message(0)
            assert ack.type == AGENT_HELLO_ACK, ack
            assert ack.payload["acked_message_id"] == sent.message_id
        return client

    @inlineCallbacks
    def _disconnect(self, client: Client, proto: _ClientProtocol) -> Any:
        client.opened.addErrback(lambda f: None)
        if not client.closed.called and proto.transport is not None:
            proto.transport.abortConnection()
        yield _timeout(client.closed)


class UpgradeAuthenticationTests(ControlPlaneTestMixin, TestCase):
    """Every upgrade is authenticated as PROTOCOL §2 says."""

    @inlineCallbacks
    def test_valid_signature_accepted_and_hello_acked(self) -> Any:
        cp = yield self.start()
        active = cp.wait_active(AGENT_A, timeout=WAIT)
        client = yield self.connect(cp)
        session = yield active
        ack = yield client.message(0)
        parse_envelope(client.received[0][0], AGENT_A)  # a valid envelope for the agent
        self.assertEqual(ack.payload["acked_type"], AGENT_HELLO)
        self.assertEqual(ack.agent_id, AGENT_A)
        self.assertEqual(session.agent_id, AGENT_A)
        self.assertTrue(session.active)
        self.assertEqual([s.agent_id for s in cp.sessions()], [AGENT_A])
        self.assertEqual((session.messages_in, session.messages_out), (1, 1))
        [attempt] = cp.attempts
        self.assertTrue(attempt.accepted)
        self.assertEqual(attempt.agent_id, AGENT_A)
        self.assertEqual(attempt.timestamp, str(int(BASE_TIME)))
        self.assertTrue(attempt.nonce)

    @inlineCallbacks
    def assertRefused(
        self, cp: ControlPlane, headers: dict[str, str], status: int, reason: str
    ) -> Any:
        response = yield raw_request(cp.port, headers=headers)
        self.assertEqual(
            (response.status, response.text), (status, reason), f"headers: {sorted(headers)}"
        )
        self.assertEqual(cp.attempts[-1].status, status)
        self.assertEqual(cp.sessions(), [])

    @inlineCallbacks
    def test_replayed_nonce(self) -> Any:
        cp = yield self.start()
        headers = _signer().sign_headers()
        first = yield raw_request(cp.port, headers=headers)
        self.assertEqual(first.status, 101)
        yield self.assertRefused(cp, headers, 401, "replayed nonce")

    @inlineCallbacks
    def test_timestamp_window(self) -> Any:
        """±300 s is inside the window; ±301 s is refused."""
        cp = yield self.start()
        for offset in (301, -301):
            headers = _signer(at=BASE_TIME + offset).sign_headers()
            yield self.assertRefused(cp, headers, 401, "timestamp outside the allowed window")
        for offset in (300, -300):
            headers = _signer(at=BASE_TIME + offset).sign_headers()
            response = yield raw_request(cp.port, headers=headers)
            self.assertEqual(response.status, 101, offset)

    @inlineCallbacks
    def test_malformed_timestamp(self) -> Any:
        cp = yield self.start()
        for bad in ("12.5", "1e9", "soon", "\u0661\u0662"):
            headers = _signer().sign_headers()
            headers[HEADER_TIMESTAMP] = bad
            yield self.assertRefused(cp, headers, 401, "malformed X-Timestamp header")

    @inlineCallbacks
    def test_bad_base64_signature(self) -> Any:
        cp = yield self.start()
        headers = _signer().sign_headers()
        headers[HEADER_SIGNATURE] = "not*base64!"
        yield self.assertRefused(cp, headers, 401, "malformed X-Signature header (bad base64)")

    @inlineCallbacks
    def test_signature_by_another_key(self) -> Any:
        cp = yield self.start()
        headers = _signer(key=KEY_B, agent_id=AGENT_A).sign_headers()
        yield self.assertRefused(cp, headers, 401, "invalid signature")

    @inlineCallbacks
    def test_tampered_nonce(self) -> Any:
        """The nonce is signed: changing it breaks the signature."""
        cp = yield self.start()
        headers = _signer().sign_headers()
        headers[HEADER_NONCE] = base64.b64encode(b"\0" * 16).decode()
        yield self.assertRefused(cp, headers, 401, "invalid signature")

    @inlineCallbacks
    def test_unknown_agent(self) -> Any:
        cp = yield self.start()
        headers = _signer(KEY_B, "agent-z").sign_headers()
        yield self.assertRefused(cp, headers, 401, "unknown agent")

    @inlineCallbacks
    def test_each_missing_header(self) -> Any:
        cp = yield self.start()
        for name in (HEADER_AGENT_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
            headers = _signer().sign_headers()
            del headers[name]
            yield self.assertRefused(cp, headers, 401, f"missing {name} header")
            headers[name] = ""
            yield self.assertRefused(cp, headers, 401, f"missing {name} header")
        self.assertEqual(len(cp.attempts), 8)

    @inlineCallbacks
    def test_refusal_logs_one_line_without_secrets(self) -> Any:
        cp = yield self.start()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        # Even with Autobahn's debug logging on, no header value may leak.
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, level)
        headers = _signer(key=KEY_B).sign_headers()
        response = yield raw_request(cp.port, headers=headers)
        self.assertEqual(response.status, 401)
        from twisted.logger import formatEvent

        texts = [formatEvent(e) for e in events]
        refusals = [t for t in texts if "refused" in t]
        self.assertEqual(len(refusals), 1, texts)
        self.assertIn("invalid signature", refusals[0])
        self.assertIn(f"agent_id={AGENT_A}", refusals[0])
        self.assertIn("remote=127.0.0.1:", refusals[0])
        for text in texts:
            self.assertNotIn(headers[HEADER_NONCE], text)
            self.assertNotIn(headers[HEADER_SIGNATURE][:40], text)
            self.assertNotIn("Traceback", text)

    @inlineCallbacks
    def test_malformed_upgrade_refused_with_reason(self) -> Any:
        """Autobahn's own checks answer with a body too, and are recorded."""
        cp = yield self.start()
        response = yield raw_request(
            cp.port, headers={**_signer().sign_headers(), "Sec-WebSocket-Version": "99"}
        )
        self.assertEqual(response.status, 400)
        self.assertIn("Sec-WebSocket-Version", response.text)
        self.assertEqual(cp.attempts[-1].agent_id, AGENT_A)
        self.assertEqual(cp.attempts[-1].status, 400)

    @inlineCallbacks
    def test_attempt_records_keep_bounded_header_values(self) -> Any:
        cp = yield self.start()
        headers = {**_signer().sign_headers(), "X-Agent-ID": "a" * 8000}
        response = yield raw_request(cp.port, headers=headers)
        self.assertEqual(response.status, 401)
        self.assertEqual(cp.attempts[-1].agent_id, "a" * 256)

    def test_attempt_records_are_bounded(self) -> None:
        cp = controlplane.ControlPlane({})
        for i in range(2 * controlplane.ATTEMPTS_KEPT + 1):
            cp.controls.judged(
                controlplane.ConnectionAttempt(
                    at=float(i),
                    remote="-",
                    path="/",
                    agent_id=None,
                    timestamp=None,
                    nonce=None,
                    status=401,
                    reason="x",
                )
            )
        self.assertEqual(len(cp.attempts), controlplane.ATTEMPTS_KEPT)
        self.assertEqual(cp.attempts[-1].at, float(2 * controlplane.ATTEMPTS_KEPT))

    @inlineCallbacks
    def test_nonce_cache_bound(self) -> Any:
        """A full replay memory answers 503; entries leave with the window."""
        cp = yield self.start(nonce_cache_size=2)
        for _ in range(2):
            response = yield raw_request(cp.port, headers=_signer().sign_headers())
            self.assertEqual(response.status, 101)
        yield self.assertRefused(
            cp, _signer().sign_headers(), 503, "replay cache full, try again later"
        )
        self.clock.now = BASE_TIME + 301
        response = yield raw_request(cp.port, headers=_signer(at=self.clock.now).sign_headers())
        self.assertEqual(response.status, 101)


class SessionTests(ControlPlaneTestMixin, TestCase):
    """What happens once the WebSocket is open."""

    @inlineCallbacks
    def assertClosedWithError(
        self, client: Client, index: int, error_code: str, close_code: int
    ) -> Any:
        error = yield client.message(index)
        self.assertEqual(error.type, ERROR)
        self.assertEqual(error.payload["code"], error_code)
        self.assertIs(error.payload["retryable"], False)
        was_clean, code, _ = yield _timeout(client.closed)
        self.assertEqual(code, close_code)
        return error

    @inlineCallbacks
    def test_oversize_message_closed_with_1009(self) -> Any:
        cp = yield self.start(max_message_bytes=1024)
        client = yield self.connect(cp)
        session = cp.session(AGENT_A)
        client.proto.sendMessage(b"x" * 2048)
        _, code, _ = yield _timeout(client.closed)
        self.assertEqual(code, CLOSE_TOO_BIG)
        yield _timeout(session.when_closed())
        self.assertEqual(session.close_code, CLOSE_TOO_BIG)

    @inlineCallbacks
    def test_invalid_envelope_error_then_1008(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        bad = make_envelope(ACK, "someone-else", {}, now=BASE_TIME)
        client.send(bad)
        error = yield self.assertClosedWithError(client, 1, "agent_id_mismatch", CLOSE_POLICY)
        self.assertEqual(error.payload["related_message_id"], bad.message_id)
        self.assertEqual(cp.sessions(), [])

    @inlineCallbacks
    def test_invalid_json_error_then_1007(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        client.proto.sendMessage(b'{"protocol_version": 1,')
        error = yield self.assertClosedWithError(client, 1, "invalid_json", CLOSE_INVALID_PAYLOAD)
        self.assertNotIn("related_message_id", error.payload)

    @inlineCallbacks
    def test_invalid_utf8_error_then_1007(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        # Autobahn's client would refuse to send this; send the frame raw.
        client.proto.sendFrame(opcode=1, payload=b'{"x": "\xff"}')
        yield self.assertClosedWithError(client, 1, "invalid_utf8", CLOSE_INVALID_PAYLOAD)

    @inlineCallbacks
    def test_binary_frame_refused(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        client.proto.sendMessage(b"{}", isBinary=True)
        yield self.assertClosedWithError(client, 1, "binary_frame", CLOSE_POLICY)

    @inlineCallbacks
    def test_hello_must_come_first(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp, hello=False)
        client.send(make_envelope(ACK, AGENT_A, {"acked_message_id": "m", "acked_type": "x"}))
        yield self.assertClosedWithError(client, 0, "hello_required", CLOSE_POLICY)

    @inlineCallbacks
    def test_task_messages_acked(self) -> Any:
        cp = yield self.start(record_messages=1 << 20)
        client = yield self.connect(cp)
        received = make_envelope(
            TASK_RECEIVED, AGENT_A, {}, task_id="t1", execution_attempt_id="e1"
        )
        client.send(received)
        ack = yield client.message(1)
        self.assertEqual(ack.type, ACK)
        self.assertEqual(ack.payload["acked_message_id"], received.message_id)
        self.assertEqual(ack.payload["task_id"], "t1")
        self.assertEqual(cp.session(AGENT_A).received[-1], received)

    @inlineCallbacks
    def test_second_connection_replaces_first(self) -> Any:
        cp = yield self.start()
        first = yield self.connect(cp)
        old = cp.session(AGENT_A)
        active = cp.wait_active(AGENT_A, new=True, timeout=WAIT)
        second = yield self.connect(cp)
        new = yield active
        _, code, reason = yield _timeout(first.closed)
        self.assertEqual((code, reason), (CLOSE_REPLACED, "replaced"))
        self.assertIsNot(new, old)
        self.assertEqual(old.close_code, CLOSE_REPLACED)
        self.assertEqual(cp.sessions(), [new])
        self.assertFalse(second.closed.called)

    @inlineCallbacks
    def test_close_with_any_code_and_abort(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        code = yield _timeout(cp.close(AGENT_A, 1008, "policy"))
        self.assertEqual(code, 1008)
        _, client_code, _ = yield _timeout(client.closed)
        self.assertEqual(client_code, 1008)
        client = yield self.connect(cp, _signer(at=self.clock.now))
        code = yield _timeout(cp.abort(AGENT_A))
        self.assertEqual(code, 1006)
        was_clean, _, _ = yield _timeout(client.closed)
        self.assertFalse(was_clean)
        self.assertRaises(NoSessionError, cp.session, AGENT_A)
        self.assertRaises(NoSessionError, cp.send_text, AGENT_A, "{}")

    @inlineCallbacks
    def test_send_raw_frames(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        cp.send_text(AGENT_A, "not json")
        cp.send_binary(AGENT_A, b"\x00\x01")
        cp.send_envelope(
            AGENT_A,
            make_envelope(ACK, AGENT_A, {"acked_message_id": "m1", "acked_type": AGENT_HELLO}),
        )
        ack = yield client.message(3)
        self.assertEqual(ack.payload["acked_message_id"], "m1")
        self.assertEqual(client.received[1:3], [(b"not json", False), (b"\x00\x01", True)])
        self.assertEqual(cp.session(AGENT_A).messages_out, 4)

    @inlineCallbacks
    def test_withhold_hello_ack(self) -> Any:
        cp = yield self.start()
        cp.withhold_hello_ack = True
        client = yield self.connect(cp, hello=False)
        hello_seen = cp.wait_message(AGENT_A, AGENT_HELLO, timeout=WAIT)
        sent = client.hello()
        envelope = yield hello_seen
        self.assertEqual(envelope, sent)
        session = cp.session(AGENT_A)
        self.assertFalse(session.active)
        self.assertEqual(session.hello_message_id, sent.message_id)
        self.assertEqual(session.messages_out, 0)

    @inlineCallbacks
    def test_stop_answering_pings(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        client.proto.sendPing(b"one")
        client.hello()
        yield client.message(1)  # pong, if any, came before this ack
        self.assertEqual(client.pongs, 1)
        cp.answer_pings = False
        client.proto.sendPing(b"two")
        client.hello()
        yield client.message(2)
        self.assertEqual(client.pongs, 1)
        self.assertEqual(cp.session(AGENT_A).pings_received, 2)

    @inlineCallbacks
    def test_keepalive_pings(self) -> Any:
        """The control plane pings; an agent that never answers is dropped."""
        cp = yield self.start(ping_interval=0.05, ping_timeout=0.1)
        client = yield self.connect(cp)
        for _ in range(200):
            if client.pings >= 4:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertGreaterEqual(client.pings, 4)
        self.assertFalse(client.closed.called)  # pongs keep it alive
        client.answer_pings = False
        was_clean, _, _ = yield _timeout(client.closed)
        self.assertFalse(was_clean)
        self.assertGreaterEqual(client.pings, 1)
        session = yield _timeout(cp.wait_active(AGENT_A, timeout=0.01).addErrback(lambda f: None))
        self.assertIsNone(session)

    @inlineCallbacks
    def test_refuse_upgrades_for_a_while(self) -> Any:
        cp = yield self.start()
        cp.refuse_upgrades(429, duration=60)
        response = yield raw_request(cp.port, headers=_signer().sign_headers())
        self.assertEqual((response.status, response.text), (429, "Too Many Requests"))
        cp.clear_refusal()
        response = yield raw_request(cp.port, headers=_signer().sign_headers())
        self.assertEqual(response.status, 101)

    @inlineCallbacks
    def test_stall_upgrades(self) -> Any:
        cp = yield self.start()
        cp.stall_upgrades()
        pending = raw_request(cp.port, headers=_signer().sign_headers())
        for _ in range(100):
            if cp.stalled_count:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(cp.stalled_count, 1)
        self.assertFalse(pending.called)
        cp.clear_stall()
        response = yield pending
        self.assertEqual(response.status, 101)

    @inlineCallbacks
    def test_connection_cap(self) -> Any:
        cp = yield self.start(max_connections=1)
        yield self.connect(cp)
        response = yield raw_request(cp.port, headers=_signer().sign_headers())
        self.assertEqual((response.status, response.text), (503, "too many connections"))

    @inlineCallbacks
    def test_handshake_timeout(self) -> Any:
        """A connection that never sends its request is dropped."""
        cp = yield self.start(handshake_timeout=0.1)
        proto = _Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", cp.port), proto)
        data = yield _timeout(proto.done, 2.0)
        self.assertEqual(data, b"")

    @inlineCallbacks
    def test_wait_active(self) -> Any:
        """Fires at once for an active session, or waits for a new one."""
        cp = yield self.start()
        timed_out = cp.wait_active(AGENT_A, timeout=0.01)
        yield self.assertFailure(timed_out, defer.TimeoutError)
        yield self.connect(cp)
        session = yield _timeout(cp.wait_active(AGENT_A))
        fresh = cp.wait_active(AGENT_A, new=True, timeout=WAIT)
        self.assertFalse(fresh.called)
        yield self.connect(cp)
        replacement = yield fresh
        self.assertIsNot(replacement, session)
        yield _timeout(session.when_closed())
        self.assertEqual(cp.status()["sessions"], [replacement.snapshot()])

    @inlineCallbacks
    def test_stop_closes_sessions_with_1001(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp)
        yield _timeout(cp.stop())
        _, code, _ = yield _timeout(client.closed)
        self.assertEqual(code, 1001)
        self.assertEqual(cp.sessions(), [])
        yield _timeout(cp.stop())  # again: fires too


class AgentsReloadTests(ControlPlaneTestMixin, TestCase):
    """The agents file is re-read on change, keeping open sessions."""

    def write_agents(self, path: str, agents: dict[str, str]) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(agents, f)
        os.replace(tmp, path)

    @inlineCallbacks
    def test_reload_on_change_keeps_sessions(self) -> Any:
        path = self.mktemp()
        self.write_agents(path, {AGENT_A: public_key_base64(KEY_A)})
        cp = yield self.start({}, agents_file=path, reload_interval=0.02)
        client = yield self.connect(cp)
        self.write_agents(
            path, {AGENT_B: public_key_pem(KEY_B), "agent-c": public_key_base64(KEY_B)}
        )
        for _ in range(200):
            if AGENT_B in cp.agents:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(sorted(cp.agents), [AGENT_B, "agent-c"])
        # The open session of the now-unlisted agent goes on.
        client.hello()
        ack = yield client.message(1)
        self.assertEqual(ack.type, AGENT_HELLO_ACK)
        response = yield raw_request(cp.port, headers=_signer().sign_headers())
        self.assertEqual((response.status, response.text), (401, "unknown agent"))
        response = yield raw_request(cp.port, headers=_signer(KEY_B, AGENT_B).sign_headers())
        self.assertEqual(response.status, 101)

    @inlineCallbacks
    def test_bad_reload_keeps_old_set(self) -> Any:
        path = self.mktemp()
        self.write_agents(path, {AGENT_A: public_key_base64(KEY_A)})
        cp = yield self.start({}, agents_file=path, reload_interval=0)
        with open(path, "w") as f:
            f.write('{"agent-a": "not a key"}')
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertFalse(cp.reload_agents())
        self.assertEqual(sorted(cp.agents), [AGENT_A])
        self.assertTrue(any("not reloaded" in e.get("log_format", "") for e in events))
        yield self.connect(cp)

    @inlineCallbacks
    def test_set_agents_in_memory(self) -> Any:
        """Tests can revoke or add agents; the file's entries stay on top."""
        path = self.mktemp()
        self.write_agents(path, {AGENT_B: public_key_base64(KEY_B)})
        cp = yield self.start({AGENT_A: KEY_A.public_key()}, agents_file=path, reload_interval=0)
        self.assertEqual(sorted(cp.agents), [AGENT_A, AGENT_B])
        cp.set_agents({})
        self.assertEqual(sorted(cp.agents), [AGENT_B])
        response = yield raw_request(cp.port, headers=_signer().sign_headers())
        self.assertEqual(response.status, 401)

    def test_bad_file_is_a_startup_error(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[]")
        d = start_control_plane({}, agents_file=path)
        failure = self.failureResultOf(d, AgentsFileError)
        self.assertIn(path, str(failure.value))


class HTTPTests(ControlPlaneTestMixin, TestCase):
    """/healthz, /status (operator listener) and everything else."""

    @inlineCallbacks
    def test_healthz(self) -> Any:
        cp = yield self.start()
        response = yield raw_request(cp.port, "/healthz", upgrade=False)
        self.assertEqual((response.status, response.body), (200, b"ok"))

    @inlineCallbacks
    def test_status(self) -> Any:
        """/status is on the operator listener, and only there."""
        cp = yield self.start(operator_listen="tcp:0:interface=127.0.0.1")
        yield self.connect(cp)
        response = yield raw_request(cp.port, "/status", upgrade=False)
        self.assertEqual(response.status, 404)
        operator_port = int(cp.operator_url.rsplit(":", 1)[1])
        self.assertNotEqual(operator_port, cp.port)
        response = yield raw_request(operator_port, "/status", upgrade=False)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/json")
        status = json.loads(response.body)
        [session] = status["sessions"]
        self.assertEqual(session["agent_id"], AGENT_A)
        self.assertTrue(session["remote"].startswith("127.0.0.1:"))
        self.assertEqual((session["messages_in"], session["messages_out"]), (1, 1))
        self.assertEqual(session["connected_since"], "2026-05-28T20:26:40Z")
        self.assertEqual(session["last_message_at"], "2026-05-28T20:26:40Z")

    @inlineCallbacks
    def test_other_paths_404(self) -> Any:
        cp = yield self.start()
        for path in ("/", "/nope", "/api/v1/agents", controlplane.GATEWAY_PATH + "/x"):
            response = yield raw_request(cp.port, path, upgrade=False)
            self.assertEqual(response.status, 404, path)
            response = yield raw_request(cp.port, path, headers=_signer().sign_headers())
            self.assertEqual(response.status, 404, path)

    @inlineCallbacks
    def test_gateway_without_upgrade(self) -> Any:
        cp = yield self.start()
        response = yield raw_request(cp.port, upgrade=False)
        self.assertEqual(response.status, 426)


class TLSTests(ControlPlaneTestMixin, TestCase):
    @inlineCallbacks
    def test_wss(self) -> Any:
        certificates = make_test_certificates(self.mktemp())
        ca_pem = certificates.ca_pem()
        cp = yield self.start(listen=certificates.listen())
        self.assertTrue(cp.ws_url.startswith("wss://127.0.0.1:"))
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca_pem))
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", cp.port, options)
        url = f"wss://localhost:{cp.port}{controlplane.GATEWAY_PATH}"
        yield self.connect(cp, endpoint=endpoint, url=url)
        session = yield cp.wait_active(AGENT_A, timeout=WAIT)
        self.assertTrue(session.active)


class AgentsParsingTests(SynchronousTestCase):
    def test_base64_and_pem(self) -> None:
        agents = parse_agents({AGENT_A: public_key_base64(KEY_A), AGENT_B: public_key_pem(KEY_B)})
        self.assertEqual(agents[AGENT_A].public_numbers(), KEY_A.public_key().public_numbers())
        self.assertEqual(agents[AGENT_B].public_numbers(), KEY_B.public_key().public_numbers())

    def test_bad_entries(self) -> None:
        for bad in ([], {"": public_key_base64(KEY_A)}, {AGENT_A: 5}, {AGENT_A: "garbage"}):
            self.assertRaises(AgentsFileError, parse_agents, bad)

    def test_file_errors_name_the_file(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(AgentsFileError, load_agents_file, path)
        self.assertIn(path, str(e))
        with open(path, "w") as f:
            f.write("{not json")
        e = self.assertRaises(AgentsFileError, load_agents_file, path)
        self.assertIn("not valid JSON", str(e))

    def test_bad_options(self) -> None:
        self.assertRaises(ValueError, ControlPlane, {}, max_skew=-1)
        self.assertRaises(ValueError, ControlPlane, {}, nonce_cache_size=0)


class NonceCacheTests(SynchronousTestCase):
    def test_window_and_cap(self) -> None:
        cache = NonceCache(window=300, max_entries=2)
        cache.add("a", "n1", 1000)
        self.assertTrue(cache.seen("a", "n1", 1300))
        self.assertFalse(cache.seen("b", "n1", 1300))
        cache.add("a", "n2", 1100)
        self.assertTrue(cache.full(1300))
        self.assertFalse(cache.seen("a", "n1", 1300.5))
        self.assertFalse(cache.full(1300.5))
        self.assertEqual(len(cache), 1)
