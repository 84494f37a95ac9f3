"""
End-to-end tests of hostlink_tw.client against the reference control plane,
over real loopback sockets (plain and TLS).

Timing values are small (tenths of a second) and every wait is bounded; each
test stops its client and control plane, so trial's dirty-reactor check
covers what stop() leaves behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from hostlink_tw.client import ClientEvent, ClientState, HostlinkClient
from hostlink_tw.config import Settings
from hostlink_tw.controlplane import ControlPlane, start_control_plane
from hostlink_tw.protocol import AGENT_HELLO, AGENT_HELLO_ACK, ack_payload, make_envelope
from hostlink_tw.signing import RequestSigner
from hostlink_tw.testing import make_test_certificates

from .test_agent_tunnel import ConnectProxyFactory, start_proxy
from .test_client_support import AGENT, key, parse_client_frames, server_frame

TIMEOUT = 5.0


def fast_settings(url: str, **overrides: Any) -> Settings:
    """Settings built directly: the clamping of the environment does not apply."""
    base = Settings(
        ws_url=url,
        reconnect_min=0.05,
        reconnect_max=0.4,
        ping_interval=5.0,
        pong_timeout=2.0,
        hello_timeout=2.0,
        handshake_timeout=2.0,
        max_message_bytes=4096,
    )
    return replace(base, **overrides)


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


def wait_event(
    client: HostlinkClient,
    kind: str,
    predicate: Callable[[ClientEvent], bool] = lambda e: True,
    timeout: float = TIMEOUT,
) -> Deferred[ClientEvent]:
    """The next event of ``kind`` (matching ``predicate``), within ``timeout``."""
    d: Deferred[ClientEvent] = Deferred()

    def observe(event: ClientEvent) -> None:
        if event.kind == kind and predicate(event) and not d.called:
            d.callback(event)

    unsubscribe = client.add_observer(observe)

    def done(result: Any) -> Any:
        unsubscribe()
        return result

    d.addTimeout(timeout, reactor)
    d.addBoth(done)
    return d


def bounded(d: Deferred[Any], timeout: float = TIMEOUT) -> Deferred[Any]:
    d.addTimeout(timeout, reactor)
    return d


class _Base(TestCase):
    """A control plane and a client of it; both stopped after each test."""

    timeout = 30

    cp: ControlPlane

    @inlineCallbacks
    def start_cp(self, listen: str = "tcp:0:interface=127.0.0.1", **options: Any) -> Generator[
        Deferred[Any], Any, ControlPlane
    ]:
        options.setdefault("ping_interval", 0)
        cp = yield start_control_plane({AGENT: key().public_key()}, listen=listen, **options)
        self.addCleanup(cp.stop)
        self.cp = cp
        return cp

    def make_client(self, url: str | None = None, **overrides: Any) -> HostlinkClient:
        self.logged: list[LogEvent] = []
        self.events: list[ClientEvent] = []
        client = HostlinkClient(
            fast_settings(url or self.cp.ws_url, **overrides),
            RequestSigner.from_key(key(), AGENT),
            environ={},
            log=Logger(namespace="e2e", observer=self.logged.append),
        )
        client.add_observer(self.events.append)
        self.addCleanup(client.stop)
        return client

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.logged]


class SessionTests(_Base):
    @inlineCallbacks
    def test_activation(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client()
        client.start()
        session = yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        yield bounded(client.when_active())
        self.assertTrue(client.is_active)
        self.assertEqual(client.state, ClientState.ACTIVE)
        acked = client.snapshot()["last_ack"]["acked_message_id"]
        self.assertEqual(session.hello_message_id, acked)
        self.assertEqual([a.status for a in self.cp.attempts], [101])
        self.assertEqual(self.kinds()[:5], ["attempt", "connected", "message_out", "message_in",
                                            "active"])

    @inlineCallbacks
    def test_server_close_reconnects_with_fresh_nonce(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client()
        client.start()
        yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        for _ in range(2):
            again = self.cp.wait_active(AGENT, new=True, timeout=TIMEOUT)
            yield self.cp.close(AGENT, 1000, "bye")
            yield again
        statuses = [a.status for a in self.cp.attempts]
        self.assertEqual(statuses, [101, 101, 101])
        nonces = [a.nonce for a in self.cp.attempts]
        self.assertEqual(len(set(nonces)), 3)
        # Each session had been active: every retry starts again from the minimum.
        delays = [e.fields["delay"] for e in self.events if e.kind == "retry_scheduled"]
        self.assertEqual(len(delays), 2)
        for delay in delays:
            self.assertTrue(0.0375 <= delay <= 0.0625, delays)

    @inlineCallbacks
    def test_refused_upgrades_back_off_with_growing_jittered_delays(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        self.cp.refuse_upgrades(401)
        client = self.make_client(reconnect_min=0.05, reconnect_max=0.4)
        client.start()
        yield wait_event(client, "refused", lambda e: len(self.cp.attempts) >= 5)
        self.cp.clear_refusal()
        yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        refused = [e.fields["status"] for e in self.events if e.kind == "refused"]
        self.assertEqual(refused[:5], [401] * 5)
        delays = [e.fields["delay"] for e in self.events if e.kind == "retry_scheduled"][:5]
        for i, delay in enumerate(delays):
            base = min(0.05 * 2**i, 0.4)
            self.assertTrue(0.75 * base <= delay <= 1.25 * base, (i, delays))
        self.assertLess(delays[0], delays[2])
        self.assertLess(delays[2], delays[4])
        self.assertTrue(any("clock" in m and "HTTP 401" in m for m in self.messages()))
        # The refused attempts each carried their own nonce, too.
        nonces = [a.nonce for a in self.cp.attempts]
        self.assertEqual(len(set(nonces)), len(nonces))

    @inlineCallbacks
    def test_dead_peer_detected_within_ping_plus_pong(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client(ping_interval=0.2, pong_timeout=0.2)
        client.start()
        yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        yield bounded(client.when_active())
        # Live peer: pings answered, the session stays up over several intervals.
        yield sleep(0.7)
        self.assertTrue(client.is_active)
        self.assertGreaterEqual(self.cp.session(AGENT).pings_received, 3)
        self.cp.answer_pings = False
        started = reactor.seconds()  # type: ignore[attr-defined]
        event = yield wait_event(client, "inactive")
        elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assertEqual(event.fields["reason"], "no pong within 0.2s")
        # Slack for a loaded test machine; a missed deadline would be >= 0.6 s.
        self.assertLessEqual(elapsed, 0.2 + 0.2 + 0.15)
        self.cp.answer_pings = True
        yield wait_event(client, "attempt")
        elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assertLessEqual(elapsed, 0.2 + 0.2 + 1.25 * 0.05 + 0.15)
        yield self.cp.wait_active(AGENT, new=True, timeout=TIMEOUT)

    @inlineCallbacks
    def test_oversize_message_closed_1009(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client(max_message_bytes=4096)
        client.start()
        session = yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        again = self.cp.wait_active(AGENT, new=True, timeout=TIMEOUT)
        self.cp.send_text(AGENT, '{"big":"' + "x" * 100_000 + '"}')
        code = yield bounded(session.when_closed())
        self.assertEqual(code, 1009)
        yield again

    @inlineCallbacks
    def test_bad_frame_reconnects(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client()
        client.start()
        session = yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        again = self.cp.wait_active(AGENT, new=True, timeout=TIMEOUT)
        self.cp.send_text(AGENT, "not json at all")
        code = yield bounded(session.when_closed())
        self.assertEqual(code, 1007)
        yield again
        self.assertEqual(
            len([m for m in self.messages() if "closing connection: invalid envelope" in m]), 1
        )

    @inlineCallbacks
    def test_handshake_timeout_then_recovery(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        self.cp.stall_upgrades()
        client = self.make_client(handshake_timeout=0.3)
        client.start()
        event = yield wait_event(client, "closed")
        self.assertIn("within 0.3s", event.fields["reason"])
        yield wait_event(client, "retry_scheduled")
        self.cp.clear_stall()
        yield self.cp.wait_active(AGENT, timeout=TIMEOUT)

    @inlineCallbacks
    def test_hello_timeout_then_recovery(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        self.cp.withhold_hello_ack = True
        client = self.make_client(hello_timeout=0.3)
        client.start()
        event = yield wait_event(client, "closed")
        self.assertEqual(event.fields["reason"], "no agent.hello_ack within 0.3s")
        self.assertEqual(event.fields["code"], 1000)
        self.cp.withhold_hello_ack = False
        yield self.cp.wait_active(AGENT, timeout=TIMEOUT)

    @inlineCallbacks
    def test_accept_and_hang_up_does_not_spin(self) -> Generator[Deferred[Any], Any, None]:
        """A TCP connect is not a success: delays keep growing."""
        factory = _HangUpFactory()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = self.make_client(
            f"ws://127.0.0.1:{port.getHost().port}/api/v1/agents/ws",
            reconnect_min=0.02, reconnect_max=10.0,
        )
        client.start()
        yield wait_event(client, "retry_scheduled", lambda e: client.attempts >= 5)
        yield bounded(client.stop())
        delays = [e.fields["delay"] for e in self.events if e.kind == "retry_scheduled"][:5]
        for i, delay in enumerate(delays):
            self.assertTrue(0.75 * 0.02 * 2**i <= delay <= 1.25 * 0.02 * 2**i, delays)
        self.assertEqual(factory.accepted, 5)

    @inlineCallbacks
    def test_connection_refused_backs_off(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.start_cp()
        url = cp.ws_url
        yield cp.stop()
        client = self.make_client(url)
        client.start()
        yield wait_event(client, "retry_scheduled", lambda e: client.attempts >= 3)
        self.assertIn("refused", client.last_failure or "")


class TLSTests(_Base):
    def tls_cp(self, **kw: Any) -> Deferred[ControlPlane]:
        directory = self.mktemp()
        os.makedirs(directory)
        self.paths = make_test_certificates(directory, **kw)
        return self.start_cp(self.paths.listen())

    @inlineCallbacks
    def test_test_ca_accepted(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.tls_cp()
        self.assertTrue(cp.ws_url.startswith("wss://127.0.0.1:"))
        client = self.make_client(cp.ws_url, ca_file=self.paths.ca)
        client.start()
        yield cp.wait_active(AGENT, timeout=TIMEOUT)
        self.assertEqual([m for m in self.messages() if "not encrypted" in m], [])

    @inlineCallbacks
    def test_test_ca_accepted_by_host_name(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.tls_cp()
        client = self.make_client(
            f"wss://localhost:{cp.port}/api/v1/agents/ws", ca_file=self.paths.ca
        )
        client.start()
        yield cp.wait_active(AGENT, timeout=TIMEOUT)

    @inlineCallbacks
    def test_unknown_ca_refused_and_backs_off(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.tls_cp()
        other = self.mktemp()
        os.makedirs(other)
        other_ca = make_test_certificates(other).ca
        client = self.make_client(cp.ws_url, ca_file=other_ca)
        client.start()
        yield wait_event(client, "retry_scheduled", lambda e: client.attempts >= 2)
        self.assertIn("TLS failed", client.last_failure or "")
        self.assertIn("not trusted", client.last_failure or "")
        self.assertEqual(cp.attempts, [])  # no upgrade ever reached the server
        self.assertNotIn("active", self.kinds())
        self.assertTrue(
            any("TLS failed" in m and e["log_level"].name == "error"
                for m, e in zip(self.messages(), self.logged, strict=True))
        )

    @inlineCallbacks
    def test_wrong_host_name_refused(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.tls_cp(names=("cp.example.test",), ips=())
        client = self.make_client(cp.ws_url, ca_file=self.paths.ca)
        client.start()
        yield wait_event(client, "retry_scheduled")
        self.assertIn("TLS failed", client.last_failure or "")
        self.assertIn("not valid for 127.0.0.1", client.last_failure or "")
        self.assertEqual(cp.attempts, [])

    @inlineCallbacks
    def test_stop_while_active_over_tls(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.tls_cp()
        client = self.make_client(cp.ws_url, ca_file=self.paths.ca)
        client.start()
        session = yield cp.wait_active(AGENT, timeout=TIMEOUT)
        yield bounded(client.stop())
        code = yield bounded(session.when_closed())
        self.assertEqual(code, 1000)


class StopTests(_Base):
    """stop() in each state over real sockets; the dirty-reactor check does the rest."""

    @inlineCallbacks
    def _no_reconnect(self, client: HostlinkClient) -> Generator[Deferred[Any], Any, None]:
        made = len(self.cp.attempts)
        yield sleep(0.3)
        self.assertEqual(len(self.cp.attempts), made)
        self.assertIn(client.state, (ClientState.STOPPED, ClientState.IDLE))

    @inlineCallbacks
    def test_never_started(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client()
        yield bounded(client.stop())
        yield self._no_reconnect(client)

    @inlineCallbacks
    def test_while_connecting(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client()
        client.start()
        self.assertEqual(client.state, ClientState.CONNECTING)
        yield bounded(client.stop())
        self.assertEqual(self.kinds(), ["attempt", "closed", "stopped"])
        self.assertEqual(self.cp.attempts, [])
        yield self._no_reconnect(client)

    @inlineCallbacks
    def test_while_upgrading(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        self.cp.stall_upgrades()
        client = self.make_client()
        client.start()
        for _ in range(50):
            if self.cp.stalled_count:
                break
            yield sleep(0.02)
        self.assertEqual(self.cp.stalled_count, 1)
        yield bounded(client.stop())
        yield self._no_reconnect(client)

    @inlineCallbacks
    def test_while_awaiting_hello_ack(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        self.cp.withhold_hello_ack = True
        client = self.make_client()
        client.start()
        yield wait_event(client, "message_out")
        started = reactor.seconds()  # type: ignore[attr-defined]
        yield bounded(client.stop())
        self.assertLess(reactor.seconds() - started, 1.0)  # type: ignore[attr-defined]
        yield self._no_reconnect(client)

    @inlineCallbacks
    def test_while_active(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        client = self.make_client()
        client.start()
        session = yield self.cp.wait_active(AGENT, timeout=TIMEOUT)
        yield bounded(client.when_active())
        d1 = client.stop()
        d2 = client.stop()
        yield bounded(defer.gatherResults([d1, d2]))
        code = yield bounded(session.when_closed())
        self.assertEqual(code, 1000)
        self.assertIn("inactive", self.kinds())
        yield self._no_reconnect(client)

    @inlineCallbacks
    def test_while_waiting_to_retry(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        self.cp.refuse_upgrades(503)
        client = self.make_client(reconnect_min=5.0, reconnect_max=10.0)
        client.start()
        yield wait_event(client, "retry_scheduled")
        yield bounded(client.stop())
        self.assertIsNone(client.next_retry_at)
        yield self._no_reconnect(client)

    @inlineCallbacks
    def test_peer_that_never_answers_the_close(self) -> Generator[Deferred[Any], Any, None]:
        """stop() is bounded even when the peer ignores the close frame."""
        factory = _DeafServerFactory()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(lambda: bounded(factory.all_lost()))
        self.addCleanup(port.stopListening)
        client = self.make_client(f"ws://127.0.0.1:{port.getHost().port}/api/v1/agents/ws")
        client.close_timeout = 0.3
        client.start()
        yield bounded(client.when_active())
        started = reactor.seconds()  # type: ignore[attr-defined]
        yield bounded(client.stop())
        elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assertTrue(0.25 <= elapsed < 1.0, elapsed)
        (closed,) = [e for e in self.events if e.kind == "closed"]
        self.assertFalse(closed.fields["clean"])  # aborted, not a finished handshake
        yield self._no_reconnect_to(factory)

    @inlineCallbacks
    def _no_reconnect_to(self, factory: _DeafServerFactory) -> Generator[Deferred[Any], Any, None]:
        made = len(factory.conns)
        yield sleep(0.3)
        self.assertEqual(len(factory.conns), made)


class _HangUp(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _HangUpFactory(Factory):
    """Accepts every TCP connection and closes it at once."""

    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> _HangUp:
        self.accepted += 1
        return _HangUp()


class _DeafServer(Protocol):
    """Accepts the upgrade and acks the hello, then ignores everything, never closing."""

    def __init__(self) -> None:
        self.buffer = b""
        self.upgraded = False
        self.acked = False
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.acked:
            return
        self.buffer += data
        assert self.transport is not None
        if not self.upgraded:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            headers = dict(
                line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
            )
            digest = hashlib.sha1(  # noqa: S324 - RFC 6455 mandates SHA-1 here
                headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            ).digest()
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + base64.b64encode(digest) + b"\r\n\r\n"
            )
            self.upgraded = True
        for opcode, payload in parse_client_frames(self.buffer):
            if opcode == 1:
                hello = json.loads(payload)
                ack = make_envelope(
                    AGENT_HELLO_ACK, AGENT, ack_payload(hello["message_id"], AGENT_HELLO)
                )
                self.transport.write(server_frame(1, ack.to_json().encode()))
                self.acked = True
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class _DeafServerFactory(Factory):
    def __init__(self) -> None:
        self.conns: list[_DeafServer] = []

    def buildProtocol(self, addr: Any) -> _DeafServer:
        p = _DeafServer()
        self.conns.append(p)
        return p

    def all_lost(self) -> Deferred[Any]:
        return defer.gatherResults([c.lost for c in self.conns])


class ProxyTests(_Base):
    """HTTPS_PROXY/HTTP_PROXY over real sockets: a CONNECT tunnel, TLS verified inside it."""

    @inlineCallbacks
    def start_proxy(
        self, target_port: int
    ) -> Generator[Deferred[Any], Any, ConnectProxyFactory]:
        # Cleanups run last-in first-out: the client (added later) stops
        # first, then the proxy closes its tunnels, then the control plane stops.
        factory = yield start_proxy(self, target_port)
        assert factory.port is not None
        self.proxy_port = factory.port.getHost().port
        return factory

    def proxied_client(self, url: str, env_name: str, **overrides: Any) -> HostlinkClient:
        self.logged = []
        self.events = []
        client = HostlinkClient(
            fast_settings(url, **overrides),
            RequestSigner.from_key(key(), AGENT),
            environ={env_name: f"http://tunnel:s%40cret@127.0.0.1:{self.proxy_port}"},
            log=Logger(namespace="e2e", observer=self.logged.append),
        )
        client.add_observer(self.events.append)
        self.addCleanup(client.stop)
        return client

    @inlineCallbacks
    def test_wss_through_connect_proxy(self) -> Generator[Deferred[Any], Any, None]:
        directory = self.mktemp()
        os.makedirs(directory)
        paths = make_test_certificates(directory, names=("cp.test",), ips=())
        cp = yield self.start_cp(paths.listen())
        proxy = yield self.start_proxy(cp.port)
        client = self.proxied_client(
            f"wss://cp.test:{cp.port}/api/v1/agents/ws", "HTTPS_PROXY", ca_file=paths.ca
        )
        client.start()
        yield cp.wait_active(AGENT, timeout=TIMEOUT)
        (request,) = proxy.heads
        self.assertEqual(request[0], f"CONNECT cp.test:{cp.port} HTTP/1.1")
        self.assertIn("Proxy-Authorization: Basic dHVubmVsOnNAY3JldA==", request)
        self.assertNotIn("s@cret", "\n".join(self.messages()))

    @inlineCallbacks
    def test_tls_inside_the_tunnel_is_verified(self) -> Generator[Deferred[Any], Any, None]:
        directory = self.mktemp()
        os.makedirs(directory)
        paths = make_test_certificates(directory, names=("cp.test",), ips=())
        cp = yield self.start_cp(paths.listen())
        yield self.start_proxy(cp.port)
        # The certificate is for cp.test; asking for another name must fail.
        client = self.proxied_client(
            f"wss://other.test:{cp.port}/api/v1/agents/ws", "HTTPS_PROXY", ca_file=paths.ca
        )
        client.start()
        yield wait_event(client, "retry_scheduled")
        self.assertIn("not valid for other.test", client.last_failure or "")
        self.assertEqual(cp.attempts, [])

    @inlineCallbacks
    def test_ws_through_proxy_and_refusal(self) -> Generator[Deferred[Any], Any, None]:
        cp = yield self.start_cp()
        proxy = yield self.start_proxy(cp.port)
        proxy.answer = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
        client = self.proxied_client(f"ws://cp.test:{cp.port}/api/v1/agents/ws", "HTTP_PROXY")
        client.start()
        yield wait_event(client, "retry_scheduled")
        self.assertIn("proxy refused", client.last_failure or "")
        proxy.answer = None
        yield cp.wait_active(AGENT, timeout=TIMEOUT)


class SharedIdentityTests(_Base):
    """Issue 9 item 3 end to end: two agents with one identity (a cloned VM)."""

    @inlineCallbacks
    def test_the_pair_is_named_and_settles(self) -> Generator[Deferred[Any], Any, None]:
        yield self.start_cp()
        first = self.make_client(reconnect_min=0.1, reconnect_max=2.0)
        first_log = self.logged
        second = self.make_client(reconnect_min=0.1, reconnect_max=2.0)
        first.start()
        yield bounded(first.when_active())
        second.start()
        deadline = reactor.seconds() + 15  # type: ignore[attr-defined]
        warned: list[str] = []
        while not warned and reactor.seconds() < deadline:  # type: ignore[attr-defined]
            yield sleep(0.1)
            warned = [
                formatEvent(e) for e in first_log + self.logged
                if "another process or host is using agent id" in formatEvent(e)
            ]
        self.assertTrue(warned, "no warning about the shared identity")
        self.assertIn(AGENT, warned[0])
        # Backing off: the replaced sessions' retry delays grow instead of
        # resetting to RECONNECT_MIN (0.1 s, at most 0.125 s jittered) after
        # each activation.
        def longest() -> float:
            return max([e.fields["delay"] for e in self.events if e.kind == "retry_scheduled"],
                       default=0.0)

        while longest() <= 0.125 and reactor.seconds() < deadline:  # type: ignore[attr-defined]
            yield sleep(0.1)
        yield bounded(first.stop())
        yield bounded(second.stop())
        self.assertGreater(longest(), 0.125)
