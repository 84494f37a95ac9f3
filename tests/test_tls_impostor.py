"""
Issue 10.1: host-name verification must fail closed.

An impostor holds a certificate from the CA the agent trusts, valid only for
another host, with one malformed dNSName in its subjectAltName (or none at
all).  ``service_identity`` raises ``CertificateError`` for those, which
Twisted's own verify callback logs and ignores; ours must refuse the
certificate.  Every test runs over 127.0.0.1 against a TLS server that
records every application byte it receives: none may arrive.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from hostlink_tw.client import ClientEvent, HostlinkClient
from hostlink_tw.config import Settings
from hostlink_tw.signing import RequestSigner
from hostlink_tw.testing import TestCertificates, make_test_certificates
from hostlink_tw.tls import client_tls_options, describe_tls_failure, is_tls_failure

from .test_client_support import AGENT, key

TIMEOUT = 5.0

#: What an upgrade request starts with; with fail-open TLS the impostor reads it.
UPGRADE = b"GET /api/v1/agents/ws HTTP/1.1\r\nHost: x\r\nX-Agent-ID: agent\r\n\r\n"

#: Malformed dNSName entries that make service_identity raise CertificateError.
MALFORMED = {
    "ip-as-dns-name": "10.9.8.7",
    "inner-wildcard": "a.*.example",
    "empty": "",
}


class _Recorder(Protocol):
    """Server side: records every byte and when the connection ends."""

    def __init__(self, received: list[bytes], lost: list[Deferred[None]]) -> None:
        self.received = received
        self.done: Deferred[None] = Deferred()
        lost.append(self.done)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


class _Upgrader(Protocol):
    """Client side: starts TLS and writes an upgrade at once, as Autobahn does."""

    def __init__(self, options: Any) -> None:
        self.options = options
        # Fires with None: a Failure given to callback() would errback.
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.startTLS(self.options)  # type: ignore[attr-defined]
        self.transport.write(UPGRADE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class _ImpostorBase(TestCase):
    timeout = 30

    def impostor(self, **kw: Any) -> TestCertificates:
        directory = self.mktemp()
        os.makedirs(directory)
        return make_test_certificates(directory, **kw)

    @inlineCallbacks
    def listen(self, certs: TestCertificates) -> Generator[Deferred[Any], Any, int]:
        self.received: list[bytes] = []
        self.server_lost: list[Deferred[None]] = []
        endpoint = serverFromString(reactor, certs.listen())
        port: IListeningPort = yield endpoint.listen(
            Factory.forProtocol(lambda: _Recorder(self.received, self.server_lost))
        )
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)  # type: ignore[attr-defined]

    @inlineCallbacks
    def server_closed(self) -> Generator[Deferred[Any], Any, None]:
        for d in self.server_lost:
            d.addTimeout(TIMEOUT, reactor)
            yield d


class FailClosedTests(_ImpostorBase):
    """client_tls_options alone, against the recording impostor."""

    @inlineCallbacks
    def attempt(
        self, target: str, certs: TestCertificates
    ) -> Generator[Deferred[Any], Any, _Upgrader]:
        """Connect; returns the client (not the Failure: that would errback)."""
        port = yield self.listen(certs)
        client = _Upgrader(client_tls_options(target, certs.ca))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.lost.addTimeout(TIMEOUT, reactor)
        yield client.lost
        yield self.server_closed()
        return client

    @inlineCallbacks
    def assert_refused(
        self, target: str, certs: TestCertificates
    ) -> Generator[Deferred[Any], Any, None]:
        client = yield self.attempt(target, certs)
        reason = client.reason
        self.assertTrue(is_tls_failure(reason), reason)
        self.assertIn("cannot be checked", describe_tls_failure(reason, target))
        self.assertEqual(b"".join(self.received), b"")

    def test_malformed_names_refused_for_dns_target(self) -> Generator[Deferred[Any], Any, None]:
        return self._each("localhost")

    def test_malformed_names_refused_for_ip_target(self) -> Generator[Deferred[Any], Any, None]:
        return self._each("127.0.0.1")

    @inlineCallbacks
    def _each(self, target: str) -> Generator[Deferred[Any], Any, None]:
        for label, bad in MALFORMED.items():
            certs = self.impostor(names=("impostor.example", bad), ips=(), label=label)
            yield self.assert_refused(target, certs)

    @inlineCallbacks
    def test_no_subject_alt_name_refused(self) -> Generator[Deferred[Any], Any, None]:
        # service_identity raises CertificateError for this too; the common
        # name (here the target itself) is never a fallback.
        for target in ("localhost", "127.0.0.1"):
            certs = self.impostor(names=(target,), ips=(), subject_alt_names=False)
            yield self.assert_refused(target, certs)

    @inlineCallbacks
    def test_plain_mismatch_still_a_verification_error(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        certs = self.impostor(names=("impostor.example",), ips=())
        client = yield self.attempt("localhost", certs)
        self.assertEqual(
            describe_tls_failure(client.reason, "localhost"),
            "server certificate is not valid for localhost",
        )
        self.assertEqual(b"".join(self.received), b"")

    @inlineCallbacks
    def test_valid_certificate_passes_the_bytes(self) -> Generator[Deferred[Any], Any, None]:
        # The control: with a certificate that is valid, the server does read
        # the upgrade, so the empty recordings above mean something.
        certs = self.impostor(names=("localhost",), ips=("127.0.0.1",))
        for target in ("localhost", "127.0.0.1"):
            port = yield self.listen(certs)
            client = _Upgrader(client_tls_options(target, certs.ca))
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            for _ in range(100):
                if b"".join(self.received) == UPGRADE:
                    break
                yield _sleep(0.02)
            self.assertEqual(b"".join(self.received), UPGRADE)
            assert client.transport is not None
            client.transport.loseConnection()
            client.lost.addTimeout(TIMEOUT, reactor)
            yield client.lost
            yield self.server_closed()


class AgentRefusesImpostorTests(_ImpostorBase):
    """The real client: it must not send its signed upgrade, nor report a session."""

    @inlineCallbacks
    def run_agent(self, url_host: str) -> Generator[Deferred[Any], Any, None]:
        certs = self.impostor(names=("impostor.example", "127.0.0.1"), ips=())
        port = yield self.listen(certs)
        settings = Settings(
            ws_url=f"wss://{url_host}:{port}/api/v1/agents/ws",
            reconnect_min=0.05,
            reconnect_max=0.4,
            handshake_timeout=2.0,
            hello_timeout=2.0,
            ca_file=certs.ca,
        )
        events: list[ClientEvent] = []
        client = HostlinkClient(
            settings,
            RequestSigner.from_key(key(), AGENT),
            environ={},
            log=Logger(namespace="impostor", observer=lambda e: None),
        )
        client.add_observer(events.append)
        self.addCleanup(client.stop)
        retried: Deferred[None] = Deferred()
        client.add_observer(
            lambda e: None if e.kind != "retry_scheduled" or retried.called
            else retried.callback(None)
        )
        client.start()
        retried.addTimeout(TIMEOUT, reactor)
        yield retried
        yield client.stop()
        yield self.server_closed()
        self.assertEqual(b"".join(self.received), b"")
        self.assertNotIn("active", [e.kind for e in events])
        self.assertIn("TLS failed", client.last_failure or "")
        self.assertIn("cannot be checked", client.last_failure or "")

    def test_dns_name_target(self) -> Deferred[None]:
        return self.run_agent("localhost")

    def test_ip_literal_target(self) -> Deferred[None]:
        return self.run_agent("127.0.0.1")


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d
