"""
Tests for hostlink_tw.agent.tunnel: an endpoint through an HTTP ``CONNECT`` proxy.

The unit tests drive the tunnel over a memory transport, so "the bytes that
follow the proxy's answer in the same packet" and "the answer split across
many packets" are exact; :class:`RealSocketTests` runs it once through a
small CONNECT proxy on 127.0.0.1.  That proxy (:class:`ConnectProxyFactory`)
is shared with the HTTP client's tests.
"""

from __future__ import annotations

import base64
import gc
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from hostlink_tw.agent.tunnel import MAX_ANSWER_BYTES, ConnectTunnelEndpoint, TunnelError

TIMEOUT = 5.0
CREDENTIALS = "Basic " + base64.b64encode(b"tunnel:s3cr3tpw").decode("ascii")


# --- memory-transport fakes --------------------------------------------------


class Inner(Protocol):
    """The caller's protocol: records what reaches it through the tunnel."""

    def __init__(self) -> None:
        self.received = b""
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IStreamClientEndpoint)
class FakeProxyEndpoint:
    """An endpoint to the proxy that connects when the test says so."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.factory: IProtocolFactory | None = None
        self.protocol: Any = None
        self.connecting: Deferred[Any] | None = None
        self.cancelled = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        self.factory = protocolFactory

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True
            d.errback(CancelledError())

        self.connecting = Deferred(cancel)
        return self.connecting

    def complete(self) -> Any:
        """The TCP connection to the proxy is up: the tunnel sends CONNECT."""
        assert self.factory is not None and self.connecting is not None
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3128))
        self.protocol.makeConnection(self.transport)
        self.connecting.callback(self.protocol)
        return self.protocol

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class _NoProtocol(Factory):
    def buildProtocol(self, addr: Any) -> None:
        return None


def open_tunnel(authorization: str | None = CREDENTIALS, host: str = "cp.test",
                port: int = 8443) -> tuple[FakeProxyEndpoint, Deferred[Any]]:
    proxy = FakeProxyEndpoint()
    endpoint = ConnectTunnelEndpoint(proxy, host, port, authorization)
    d = endpoint.connect(Factory.forProtocol(Inner))
    return proxy, d


class RequestTests(SynchronousTestCase):
    """What the tunnel asks the proxy."""

    def test_connect_request_with_credentials(self) -> None:
        proxy, d = open_tunnel()
        self.assertEqual(proxy.transport.value(), b"")  # nothing before the TCP connection
        proxy.complete()
        self.assertEqual(
            proxy.transport.value(),
            b"CONNECT cp.test:8443 HTTP/1.1\r\nHost: cp.test:8443\r\n"
            + b"Proxy-Authorization: " + CREDENTIALS.encode() + b"\r\n\r\n",
        )
        self.assertNoResult(d)

    def test_no_authorization_without_credentials(self) -> None:
        proxy, _ = open_tunnel(authorization=None)
        proxy.complete()
        self.assertEqual(proxy.transport.value(),
                         b"CONNECT cp.test:8443 HTTP/1.1\r\nHost: cp.test:8443\r\n\r\n")

    def test_ipv6_target_is_bracketed(self) -> None:
        proxy, _ = open_tunnel(authorization=None, host="2001:db8::5", port=443)
        proxy.complete()
        self.assertTrue(proxy.transport.value().startswith(
            b"CONNECT [2001:db8::5]:443 HTTP/1.1\r\nHost: [2001:db8::5]:443\r\n"))


class SuccessTests(SynchronousTestCase):
    """A 2xx answer hands the connection to the caller's protocol."""

    def test_bytes_both_ways_including_those_after_the_answer(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        proxy.transport.clear()
        # The answer and the first bytes of the tunnelled stream in one packet.
        proxy.answer(b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\nEARLY")
        inner = self.successResultOf(d)
        self.assertIsInstance(inner, Inner)
        self.assertTrue(inner.made)
        self.assertEqual(inner.received, b"EARLY")
        proxy.answer(b"down")
        self.assertEqual(inner.received, b"EARLYdown")
        inner.transport.write(b"up")
        self.assertEqual(proxy.transport.value(), b"up")
        self.assertIsNone(inner.lost)
        proxy.lose()
        assert inner.lost is not None
        self.assertIsInstance(inner.lost.value, ConnectionDone)

    def test_answer_one_byte_at_a_time(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        for byte in b"HTTP/1.0 200 OK\r\n\r":
            proxy.answer(bytes([byte]))
            self.assertNoResult(d)
        proxy.answer(b"\n")
        inner = self.successResultOf(d)
        proxy.answer(b"A")
        self.assertEqual(inner.received, b"A")

    def test_nothing_reaches_the_caller_before_the_answer(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        proxy.answer(b"HTTP/1.1 200 OK\r\n")
        self.assertNoResult(d)
        proxy.answer(b"\r\nX")
        self.assertEqual(self.successResultOf(d).received, b"X")


class FailureTests(SynchronousTestCase):
    """Every way the proxy can refuse or break the tunnel is a TunnelError."""

    def assert_refused(self, proxy: FakeProxyEndpoint, d: Deferred[Any]) -> TunnelError:
        error = self.failureResultOf(d, TunnelError).value
        assert isinstance(error, TunnelError)
        self.assertTrue(proxy.transport.disconnecting, "the proxy connection was left open")
        self.assertNotIn("s3cr3t", str(error))
        self.assertNotIn(CREDENTIALS.split()[1], str(error))
        # The connection's end reaches the tunnel later; nothing else may fail.
        proxy.lose()
        return error

    def test_refusals_name_the_status_not_the_credentials(self) -> None:
        for status in (b"407 Proxy Authentication Required", b"403 Forbidden",
                       b"502 Bad Gateway", b"101 Switching Protocols", b"302 Found"):
            proxy, d = open_tunnel()
            proxy.complete()
            proxy.answer(b"HTTP/1.1 " + status + b"\r\nProxy-Authenticate: Basic\r\n\r\n")
            error = self.assert_refused(proxy, d)
            self.assertIn(status.decode(), str(error))

    def test_malformed_status_lines(self) -> None:
        for head in (b"garbage", b"HTTP/1.1", b"", b"HTTP/1.1 2OO OK",
                     # latin-1 superscript digits: str.isdigit() says yes, int() says no
                     b"HTTP/1.1 \xb2\xb2\xb2 OK", b"HTTP/1.1 \xb9\xb2\xb3",
                     b"HTTP/1.1 200\x1b[2J OK"):
            proxy, d = open_tunnel()
            proxy.complete()
            proxy.answer(head + b"\r\n\r\n")
            error = self.assert_refused(proxy, d)
            self.assertNotIn("\x1b", str(error))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_too_long_answer_head(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        proxy.answer(b"HTTP/1.1 200 OK\r\n")
        for _ in range(10 * MAX_ANSWER_BYTES // 100):  # bounded even if it never refuses
            if d.called:
                break
            proxy.answer(b"X-Padding: " + b"a" * 100 + b"\r\n")
        error = self.assert_refused(proxy, d)
        self.assertIn("too long", str(error))

    def test_too_long_answer_head_in_one_packet_with_its_end(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        proxy.answer(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * (2 * MAX_ANSWER_BYTES)
                     + b"\r\n\r\n")
        self.assertIn("too long", str(self.assert_refused(proxy, d)))

    def test_proxy_closes_before_answering(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        proxy.answer(b"HTTP/1.1 200 Connection")
        proxy.lose()
        self.failureResultOf(d, TunnelError)

    def test_connection_to_the_proxy_fails(self) -> None:
        proxy, d = open_tunnel()
        assert proxy.connecting is not None
        proxy.connecting.errback(ConnectionRefusedError())
        self.failureResultOf(d, ConnectionRefusedError)

    def test_no_protocol_for_the_tunnel(self) -> None:
        proxy = FakeProxyEndpoint()
        d = ConnectTunnelEndpoint(proxy, "cp.test", 443).connect(_NoProtocol())
        proxy.complete()
        proxy.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assert_refused(proxy, d)

    def test_a_failed_tunnel_leaves_no_unhandled_error(self) -> None:
        # After a refusal, the connection's end still reaches the tunnel
        # protocol; nothing may be left to fail unobserved.
        proxy, d = open_tunnel()
        proxy.complete()
        proxy.answer(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        self.failureResultOf(d, TunnelError)
        proxy.lose()
        del proxy, d
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class CancelTests(SynchronousTestCase):
    """Cancelling the connection attempt (a caller's timeout) leaves nothing open."""

    def test_cancel_before_the_proxy_answers_the_tcp_connect(self) -> None:
        proxy, d = open_tunnel()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(proxy.cancelled, "the connection to the proxy was not cancelled")

    def test_cancel_while_waiting_for_the_answer(self) -> None:
        proxy, d = open_tunnel()
        proxy.complete()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(proxy.transport.disconnecting, "the proxy connection was left open")
        proxy.answer(b"HTTP/1.1 200 OK\r\n\r\nlate")  # a late answer goes nowhere
        proxy.lose()
        del proxy, d
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


# --- a real CONNECT proxy on 127.0.0.1 (shared with test_agent_httpapi) -----


class _Relay(Protocol):
    """The proxy's connection to the target."""

    def __init__(self, client: ProxyConnection) -> None:
        self.client = client
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.client.transport is not None:
            self.client.transport.loseConnection()
        self.lost.callback(None)


class ProxyConnection(Protocol):
    """One client of the proxy: reads the CONNECT head, then relays both ways."""

    def __init__(self, factory: ConnectProxyFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.relay: _Relay | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.factory.tunnelled += data
            assert self.relay.transport is not None
            self.relay.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        self.factory.heads.append(head.decode("latin-1").split("\r\n"))
        assert self.transport is not None
        if self.factory.answer is not None:
            self.transport.write(self.factory.answer)
            self.transport.loseConnection()
            return
        if self.factory.silent:
            return
        relay = _Relay(self)
        self.factory.relays.append(relay)

        def connected(_: object) -> None:
            assert self.transport is not None and relay.transport is not None
            self.relay = relay
            # The answer and the target's first bytes may share a packet.
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                self.factory.tunnelled += rest
                relay.transport.write(rest)

        target = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.target_port, timeout=2)
        connectProtocol(target, relay).addCallbacks(
            connected, lambda _: self.transport and self.transport.loseConnection())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.loseConnection()
        self.lost.callback(None)


class ConnectProxyFactory(Factory):
    """
    A minimal CONNECT proxy: every tunnel goes to 127.0.0.1:``target_port``
    whatever host it names, so a test can ask for a name that is not
    loopback (which :func:`hostlink_tw.proxy.proxy_for` never proxies).

    :ivar heads: each CONNECT request's lines.
    :ivar tunnelled: every byte the clients sent through their tunnels.
    :ivar answer: when set, sent instead of tunnelling (then the proxy closes).
    :ivar silent: when true, the proxy never answers CONNECT.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.heads: list[list[str]] = []
        self.tunnelled = b""
        self.answer: bytes | None = None
        self.silent = False
        self.connections: list[ProxyConnection] = []
        self.relays: list[_Relay] = []
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> ProxyConnection:
        p = ProxyConnection(self)
        self.connections.append(p)
        return p

    @inlineCallbacks
    def close(self) -> Generator[Deferred[Any], Any, None]:
        """Stop listening, close every connection, wait until they are gone."""
        if self.port is not None:
            yield self.port.stopListening()
        for p in self.connections + self.relays:  # type: ignore[operator]
            if p.transport is not None:
                p.transport.loseConnection()
        lost = defer.gatherResults([p.lost for p in self.connections + self.relays])  # type: ignore[operator]
        yield lost.addTimeout(TIMEOUT, reactor)


@inlineCallbacks
def start_proxy(test: TestCase,
                target_port: int) -> Generator[Deferred[Any], Any, ConnectProxyFactory]:
    """A :class:`ConnectProxyFactory` on 127.0.0.1, closed when ``test`` ends."""
    factory = ConnectProxyFactory(target_port)
    factory.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    test.addCleanup(factory.close)
    return factory


class _Echo(Protocol):
    def __init__(self, lost: list[Deferred[None]]) -> None:
        self.lost: Deferred[None] = Deferred()
        lost.append(self.lost)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello from the target\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data.upper())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.wanted: tuple[bytes, Deferred[None]] | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.wanted is not None and self.wanted[0] in self.received:
            wanted, self.wanted = self.wanted, None
            wanted[1].callback(None)

    def wait_for(self, data: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.wanted = (data, d)
        self.dataReceived(b"")
        return d.addTimeout(TIMEOUT, reactor)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class RealSocketTests(TestCase):
    """The tunnel through a real CONNECT proxy on 127.0.0.1."""

    timeout = 10

    @inlineCallbacks
    def start_echo(self) -> Generator[Deferred[Any], Any, int]:
        lost: list[Deferred[None]] = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _Echo(lost)))

        @inlineCallbacks
        def stop() -> Generator[Deferred[Any], Any, None]:
            yield port.stopListening()
            yield defer.gatherResults(lost).addTimeout(TIMEOUT, reactor)

        self.addCleanup(stop)
        return port.getHost().port  # type: ignore[no-any-return]

    def endpoint(self, proxy: ConnectProxyFactory, authorization: str | None = None) -> Any:
        assert proxy.port is not None
        to_proxy = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port.getHost().port, timeout=2)
        return ConnectTunnelEndpoint(to_proxy, "cp.test", proxy.target_port, authorization)

    @inlineCallbacks
    def test_bytes_both_ways(self) -> Generator[Deferred[Any], Any, None]:
        proxy = yield start_proxy(self, (yield self.start_echo()))
        client = _Collect()
        connected = yield connectProtocol(self.endpoint(proxy, CREDENTIALS), client).addTimeout(
            TIMEOUT, reactor)
        self.assertIs(connected, client)
        yield client.wait_for(b"hello from the target\n")
        client.transport.write(b"ping\n")  # type: ignore[union-attr]
        yield client.wait_for(b"PING\n")
        self.assertEqual(client.received, b"hello from the target\nPING\n")
        self.assertEqual(proxy.heads, [[f"CONNECT cp.test:{proxy.target_port} HTTP/1.1",
                                         f"Host: cp.test:{proxy.target_port}",
                                         f"Proxy-Authorization: {CREDENTIALS}"]])
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost

    @inlineCallbacks
    def test_refusal_over_a_socket(self) -> Generator[Deferred[Any], Any, None]:
        proxy = yield start_proxy(self, (yield self.start_echo()))
        proxy.answer = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
        d = connectProtocol(self.endpoint(proxy, CREDENTIALS), _Collect())
        error = yield self.assertFailure(d.addTimeout(TIMEOUT, reactor), TunnelError)
        self.assertIn("407", str(error))

    @inlineCallbacks
    def test_proxy_closes_early_over_a_socket(self) -> Generator[Deferred[Any], Any, None]:
        proxy = yield start_proxy(self, (yield self.start_echo()))
        proxy.answer = b"HTTP/1.1 200 Conn"  # then the proxy closes
        d = connectProtocol(self.endpoint(proxy), _Collect())
        yield self.assertFailure(d.addTimeout(TIMEOUT, reactor), TunnelError)
