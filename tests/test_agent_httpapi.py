"""
Tests for hostlink_tw.agent.httpapi: the control plane's REST endpoints (PROTOCOL §9.1).

Each test runs a small twisted.web server on 127.0.0.1 (TLS with
make_test_certificates where it matters) and, for the proxy rules, the CONNECT
proxy of :mod:`tests.test_agent_tunnel`.  Every test closes the client's
pool, stops its ports and waits (bounded) until the server has seen every
connection close, so a connection the client leaks fails the test.

:func:`hostlink_tw.proxy.proxy_for` never proxies loopback names, so the
proxied tests address the control plane as ``cp.test`` and the proxy relays
every tunnel to 127.0.0.1; a direct connection to ``cp.test`` (``NO_PROXY``)
resolves it through :class:`NamedReactor`, a reactor whose name resolver
knows that one name.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from hostlink_tw.agent.httpapi import ControlPlaneAPI, ControlPlaneHTTPError, PolledTask
from hostlink_tw.testing import TestCertificates, make_test_certificates
from hostlink_tw.wire.signing import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    RequestSigner,
    verify_signature,
)

from .test_agent_tunnel import ConnectProxyFactory, start_proxy
from .test_client_support import key

TIMEOUT = 5.0
#: Valid (``A-Z a-z 0-9 . _ : @ -``) and in need of quoting in a path.
AGENT = "agent:7@host"
PASSWORD = "s3cr3tpw"
CREDENTIALS = base64.b64encode(f"tunnel:{PASSWORD}".encode()).decode("ascii")


# --- the control plane side ------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes


class ControlPlaneResource(Resource):
    """
    Answers every request with ``answers[(method, path)]`` (status, body) or
    ``default``; with ``hang`` set, never answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.answers: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.default: tuple[int, bytes] = (200, b"[]")
        self.hang = False

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.uri is not None
        method, path = request.method.decode(), request.uri.decode()
        headers = {name.decode().lower(): [v.decode() for v in values]
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        assert request.content is not None
        self.seen.append(Seen(method, path, headers, request.content.read()))
        if self.hang:
            return NOT_DONE_YET
        status, body = self.answers.get((method, path), self.default)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return body


class _Channel(HTTPChannel):
    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.factory.channel_lost(self)  # type: ignore[attr-defined]


class TrackingSite(Site):
    """A Site that knows its open connections, to wait until they are all gone."""

    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource, timeout=None)
        self.open: set[_Channel] = set()
        self.waiting: list[Deferred[None]] = []
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.open.add(channel)
        self.connections += 1
        return channel

    def channel_lost(self, channel: _Channel) -> None:
        self.open.discard(channel)
        if not self.open:
            waiting, self.waiting = self.waiting, []
            for d in waiting:
                d.callback(None)

    def all_closed(self, timeout: float = TIMEOUT) -> Deferred[None]:
        """Fires once no connection is open; fails after ``timeout`` seconds."""
        d: Deferred[None] = Deferred()
        if not self.open:
            d.callback(None)
        else:
            self.waiting.append(d)
        return d.addTimeout(timeout, reactor)


@dataclass
class Server:
    resource: ControlPlaneResource
    site: TrackingSite
    port: int


# --- a reactor that knows the name cp.test ------------------------------------------


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass  # answered at once: nothing to cancel


@implementer(IHostnameResolver)
class _Resolver:
    def __init__(self, names: dict[str, str]) -> None:
        self._names = names

    def resolveHostName(self, resolutionReceiver: IResolutionReceiver, hostName: str,
                        portNumber: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> IResolutionReceiver:
        if hostName not in self._names:
            return reactor.nameResolver.resolveHostName(  # type: ignore[attr-defined,no-any-return]
                resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics)
        resolutionReceiver.resolutionBegan(_Resolution(hostName))
        resolutionReceiver.addressResolved(
            IPv4Address("TCP", self._names[hostName], portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


@implementer(IReactorPluggableNameResolver)
class NamedReactor:
    """The global reactor, except that ``names`` resolve to the given addresses."""

    def __init__(self, names: dict[str, str]) -> None:
        self.nameResolver = _Resolver(names)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


# --- the test base ---------------------------------------------------------------------


class _Base(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.signer = RequestSigner.from_key(key(), AGENT)

    @inlineCallbacks
    def start_server(self, listen: str | None = None) -> Generator[Deferred[Any], Any, Server]:
        resource = ControlPlaneResource()
        site = TrackingSite(resource)
        endpoint = (serverFromString(reactor, listen) if listen
                    else TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        port = yield endpoint.listen(site)

        @inlineCallbacks
        def stop() -> Generator[Deferred[Any], Any, None]:
            yield port.stopListening()
            try:
                # Runs after the client's pool is closed: anything still open
                # is a connection the client leaked.
                yield site.all_closed()
            except defer.TimeoutError:
                for channel in list(site.open):
                    channel.transport.abortConnection()  # type: ignore[union-attr]
                raise AssertionError("the client left a connection open") from None

        self.addCleanup(stop)
        return Server(resource, site, port.getHost().port)

    def make_api(self, base_url: str, **options: Any) -> ControlPlaneAPI:
        options.setdefault("reactor", reactor)
        options.setdefault("timeout", TIMEOUT)
        api = ControlPlaneAPI(base_url, self.signer, **options)
        self.addCleanup(api.close)  # runs before the server's cleanup (LIFO)
        return api

    def certificates(self, **options: Any) -> TestCertificates:
        directory = self.mktemp()
        os.makedirs(directory)
        return make_test_certificates(directory, **options)

    @inlineCallbacks
    def refused(self, d: Deferred[Any]) -> Generator[Deferred[Any], Any, ControlPlaneHTTPError]:
        """The ControlPlaneHTTPError ``d`` fails with (bounded in time)."""
        error = yield self.assertFailure(d.addTimeout(TIMEOUT * 2, reactor),
                                         ControlPlaneHTTPError)
        self.assertNotIn("\n", str(error))
        return error  # type: ignore[no-any-return]


def task(task_id: str, status: str = "pending", **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "command": f"echo {task_id}", "status": status, "priority": 1,
            "output": "", "error": "", "exit_code": None, **fields}


# --- the three endpoints -----------------------------------------------------------


class SignedHeadersTests(_Base):
    @inlineCallbacks
    def test_every_request_is_signed_afresh(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        server.resource.answers[("POST", "/api/v1/agents/agent%3A7%40host/heartbeat")] = (
            200, b'{"message": "ok"}')
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        before = int(time.time())
        yield api.list_tasks()
        yield api.list_tasks()
        yield api.heartbeat()
        yield api.report("t1", {"status": "completed"})
        after = int(time.time())
        self.assertEqual(len(server.resource.seen), 4)
        nonces = set()
        for seen in server.resource.seen:
            values = {}
            for name in (HEADER_AGENT_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
                (values[name],) = seen.headers[name.lower()]  # exactly one of each
            self.assertEqual(values[HEADER_AGENT_ID], AGENT)
            self.assertTrue(before <= int(values[HEADER_TIMESTAMP]) <= after)
            self.assertEqual(len(base64.b64decode(values[HEADER_NONCE], validate=True)), 16)
            self.assertTrue(verify_signature(
                self.signer.public_key, AGENT, values[HEADER_TIMESTAMP], values[HEADER_NONCE],
                values[HEADER_SIGNATURE]), seen.path)
            nonces.add(values[HEADER_NONCE])
        self.assertEqual(len(nonces), 4, "a nonce was reused")

    @inlineCallbacks
    def test_connections_are_reused(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}/")  # a trailing slash too
        for _ in range(3):
            yield api.list_tasks()
        self.assertEqual([s.path for s in server.resource.seen], ["/api/v1/tasks"] * 3)
        self.assertEqual(server.site.connections, 1)

    @inlineCallbacks
    def test_connections_are_not_logged(self) -> Generator[Deferred[Any], Any, None]:
        """A heartbeat every few seconds must not log the pool's factory starting and stopping."""
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield api.list_tasks()
        yield api.close()
        text = [formatEvent(e) for e in events]
        self.assertFalse([t for t in text if "factory" in t.lower()], text)


class EndpointTests(_Base):
    @inlineCallbacks
    def test_list_tasks(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        tasks = [task("a", execution_attempt_id="att-1"), task("b", "running"),
                 task("c", "completed"), task("d", "failed"), task("e", "cancelled")]
        server.resource.default = (200, json.dumps(tasks).encode())
        api = self.make_api(f"http://127.0.0.1:{server.port}/base")
        polled = yield api.list_tasks()
        (seen,) = server.resource.seen
        self.assertEqual((seen.method, seen.path), ("GET", "/base/api/v1/tasks"))
        self.assertEqual([p.task_id for p in polled], ["a", "b", "c", "d", "e"])
        self.assertEqual(polled[0], PolledTask("a", "att-1", "echo a", "pending"))
        self.assertEqual(polled[1].attempt_id, "")
        self.assertEqual([p.runnable for p in polled], [True, True, False, False, False])

    @inlineCallbacks
    def test_heartbeat_returns_pending_tasks(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        path = "/api/v1/agents/agent%3A7%40host/heartbeat"
        body = {"message": "ok", "pending_tasks": [task("p1"), task("p2", "completed")]}
        server.resource.answers[("POST", path)] = (200, json.dumps(body).encode())
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        pending = yield api.heartbeat()
        (seen,) = server.resource.seen
        self.assertEqual((seen.method, seen.path, seen.body), ("POST", path, b""))
        self.assertEqual([(p.task_id, p.runnable) for p in pending],
                         [("p1", True), ("p2", False)])

    @inlineCallbacks
    def test_heartbeat_without_pending_tasks(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        for answer in (b'{"message": "ok"}', b'{"message": "ok", "pending_tasks": null}'):
            server.resource.default = (200, answer)
            self.assertEqual((yield api.heartbeat()), [])
        server.resource.default = (200, b"[]")
        error = yield self.refused(api.heartbeat())
        self.assertFalse(error.retryable)

    @inlineCallbacks
    def test_report_puts_json(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        server.resource.default = (200, b'{"message": "updated"}')
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        body = {"status": "completed", "output": "h\u00e9llo\n\u2603", "error": "",
                "exit_code": 0}
        result = yield api.report("task/1 x", body)
        self.assertIsNone(result)
        (seen,) = server.resource.seen
        self.assertEqual((seen.method, seen.path), ("PUT", "/api/v1/tasks/task%2F1%20x"))
        self.assertEqual(seen.headers["content-type"], ["application/json"])
        self.assertEqual(json.loads(seen.body.decode("utf-8")), body)

    @inlineCallbacks
    def test_report_accepted_whatever_the_answer_body(self) -> Generator[Deferred[Any], Any, None]:
        # §9.1: a 2xx means accepted; what else the answer says is irrelevant.
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        for answer in (b"", b"OK", b"<html>updated</html>"):
            server.resource.default = (200, answer)
            self.assertIsNone((yield api.report("t", {"status": "failed"})))
        server.resource.default = (204, b"")
        self.assertIsNone((yield api.report("t", {"status": "failed"})))


class PolledTaskTests(SynchronousTestCase):
    def test_runnable(self) -> None:
        for status, runnable in (("pending", True), ("running", True), ("", True),
                                 ("completed", False), ("failed", False),
                                 ("cancelled", False)):
            self.assertEqual(PolledTask("t", "", "true", status).runnable, runnable, status)
        self.assertFalse(PolledTask("t", "", "", "pending").runnable)

    def test_parse(self) -> None:
        self.assertEqual(PolledTask.parse({"id": "t", "command": "ls", "status": "pending",
                                           "execution_attempt_id": None, "extra": [1]}),
                         PolledTask("t", "", "ls", "pending"))

    def test_missing_or_null_fields_read_as_empty(self) -> None:
        # As Go decodes them: the task is kept (and not run without a command).
        for value in ({"id": "t"}, {"id": "t", "command": None, "status": None,
                                    "execution_attempt_id": None}):
            polled = PolledTask.parse(value)
            self.assertEqual(polled, PolledTask("t", "", "", ""))
            self.assertFalse(polled.runnable)

    def test_parse_refuses_what_is_not_a_task(self) -> None:
        for value in (None, [], "t", {"command": "ls"}, {"id": ""}, {"id": 5},
                      {"id": "t", "command": 5}, {"id": "t", "command": "ls", "status": 1},
                      {"id": "t", "command": "ls", "execution_attempt_id": 7},
                      {"id": "t", "command": "ls", "status": 0},
                      {"id": "t", "command": "ls", "execution_attempt_id": False},
                      {"id": "t\x1b[2J", "command": 0}):
            error = self.assertRaises(ControlPlaneHTTPError, PolledTask.parse, value)
            self.assertFalse(error.retryable)
            self.assertNotIn("\x1b", str(error))


# --- failures ---------------------------------------------------------------------------


class AnswerFailureTests(_Base):
    @inlineCallbacks
    def test_5xx_is_retryable(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        for status in (500, 502, 503):
            server.resource.default = (status, b'{"message": "try later"}')
            error = yield self.refused(api.list_tasks())
            self.assertEqual((error.status, error.retryable), (status, True))
            self.assertIn("try later", str(error))

    @inlineCallbacks
    def test_4xx_is_final_and_says_why(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        server.resource.default = (
            404, json.dumps({"message": "no such task\n\x1b[31mFAKE LOG LINE"}).encode())
        error = yield self.refused(api.report("t", {"status": "completed"}))
        self.assertEqual((error.status, error.retryable), (404, False))
        self.assertIn("404", str(error))
        self.assertIn("no such task\\n\\x1b[31mFAKE", str(error))
        self.assertNotIn("\x1b", str(error))
        for status in (400, 401, 403, 409):
            server.resource.default = (status, b'{"error": "signature rejected"}')
            error = yield self.refused(api.list_tasks())
            self.assertEqual((error.status, error.retryable), (status, False))
            self.assertIn("signature rejected", str(error))

    @inlineCallbacks
    def test_error_messages_are_bounded(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        server.resource.default = (400, json.dumps({"message": "x" * 100_000}).encode())
        error = yield self.refused(api.list_tasks())
        self.assertLess(len(str(error)), 400)
        server.resource.default = (401, b"not json \r\n" * 1000)
        error = yield self.refused(api.list_tasks())
        self.assertIn("not json \\r\\n", str(error))
        self.assertLess(len(str(error)), 400)

    @inlineCallbacks
    def test_answer_over_the_bound(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        big = json.dumps([task(f"t{i}") for i in range(20_000)]).encode()  # ~2 MB
        server.resource.default = (200, big)
        api = self.make_api(f"http://127.0.0.1:{server.port}", max_answer_bytes=64 * 1024)
        error = yield self.refused(api.list_tasks())
        self.assertFalse(error.retryable)
        self.assertIn("larger than", str(error))
        # Still usable afterwards, on a new connection.
        server.resource.default = (200, b"[]")
        self.assertEqual((yield api.list_tasks()), [])

    @inlineCallbacks
    def test_error_answer_over_the_bound(self) -> Generator[Deferred[Any], Any, None]:
        # The status decides, whatever the size of the page that comes with it.
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}", max_answer_bytes=1024)
        for status, retryable in ((502, True), (413, False)):
            server.resource.default = (status, b"<html>" + b"x" * (1024 * 1024))
            error = yield self.refused(api.list_tasks())
            self.assertEqual((error.status, error.retryable), (status, retryable))
            self.assertIn("<html>xxx", str(error))

    @inlineCallbacks
    def test_report_answer_over_the_bound(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}", max_answer_bytes=1024)
        server.resource.default = (200, b"x" * (1024 * 1024))
        self.assertIsNone((yield api.report("t", {"status": "completed"})))

    @inlineCallbacks
    def test_2xx_that_is_not_json(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        for answer in (b"<html>gateway</html>", b"[1, 2", b"\xff\xfe"):
            server.resource.default = (200, answer)
            error = yield self.refused(api.list_tasks())
            self.assertEqual((error.status, error.retryable), (200, False))

    @inlineCallbacks
    def test_2xx_json_that_is_not_a_task_list(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}")
        for answer in (b"", b"{}", b"null", b'[{"id": 5}]', b"[" * 100_000 + b"]" * 100_000):
            server.resource.default = (200, answer)
            error = yield self.refused(api.list_tasks())
            self.assertFalse(error.retryable, answer[:20])
        self.assertEqual(self.flushLoggedErrors(), [])


class _OldServer(Protocol):
    """HTTP/1.0 style: no Content-Length, the answer ends when the connection does."""

    def __init__(self, answer: bytes, lost: list[Deferred[None]]) -> None:
        self.answer = answer
        self.buffer = b""
        self.lost: Deferred[None] = Deferred()
        lost.append(self.lost)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            assert self.transport is not None
            self.transport.write(self.answer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class CloseDelimitedTests(_Base):
    @inlineCallbacks
    def start_old_server(self, answer: bytes) -> Generator[Deferred[Any], Any, int]:
        lost: list[Deferred[None]] = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _OldServer(answer, lost)))

        @inlineCallbacks
        def stop() -> Generator[Deferred[Any], Any, None]:
            yield port.stopListening()
            yield defer.gatherResults(lost).addTimeout(TIMEOUT, reactor)

        self.addCleanup(stop)
        return port.getHost().port  # type: ignore[no-any-return]

    @inlineCallbacks
    def test_answer_ended_by_the_connection(self) -> Generator[Deferred[Any], Any, None]:
        tasks = json.dumps([task("a")]).encode()
        number = yield self.start_old_server(b"HTTP/1.0 200 OK\r\n\r\n" + tasks)
        api = self.make_api(f"http://127.0.0.1:{number}")
        self.assertEqual([t.task_id for t in (yield api.list_tasks())], ["a"])

    @inlineCallbacks
    def test_cut_short_answer_ended_by_the_connection(self) -> Generator[Deferred[Any], Any, None]:
        tasks = json.dumps([task("a")]).encode()
        number = yield self.start_old_server(b"HTTP/1.0 200 OK\r\n\r\n" + tasks[:-5])
        api = self.make_api(f"http://127.0.0.1:{number}")
        error = yield self.refused(api.list_tasks())
        self.assertIn("not JSON", str(error))


class NetworkFailureTests(_Base):
    @inlineCallbacks
    def test_connection_refused(self) -> Generator[Deferred[Any], Any, None]:
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            TrackingSite(Resource()))
        number = port.getHost().port
        yield port.stopListening()
        api = self.make_api(f"http://127.0.0.1:{number}")
        error = yield self.refused(api.list_tasks())
        self.assertEqual((error.status, error.retryable), (None, True))
        self.assertIn("/api/v1/tasks", str(error))

    @inlineCallbacks
    def test_no_answer_within_the_timeout(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        server.resource.hang = True
        api = self.make_api(f"http://127.0.0.1:{server.port}", timeout=0.3)
        started = time.monotonic()
        error = yield self.refused(api.heartbeat())
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual((error.status, error.retryable), (None, True))
        self.assertIn("no answer within 0.3s", str(error))
        # The request's connection was dropped, not left to the server.
        yield server.site.all_closed(timeout=2)

    @inlineCallbacks
    def test_body_that_never_ends(self) -> Generator[Deferred[Any], Any, None]:
        # Headers come at once, the body never completes: the timeout still
        # covers it, and the connection is closed.
        server = yield self.start_server()
        api = self.make_api(f"http://127.0.0.1:{server.port}", timeout=0.3)

        class Trickle(Resource):
            isLeaf = True

            def render(self, request: Request) -> int:
                request.setHeader(b"Content-Length", b"1000")
                request.write(b"[")
                return NOT_DONE_YET

        server.site.resource = Trickle()
        error = yield self.refused(api.list_tasks())
        self.assertEqual((error.status, error.retryable), (None, True))
        yield server.site.all_closed(timeout=2)


# --- TLS ------------------------------------------------------------------------------


class TLSTests(_Base):
    @inlineCallbacks
    def test_test_ca_accepted(self) -> Generator[Deferred[Any], Any, None]:
        paths = self.certificates()
        server = yield self.start_server(paths.listen())
        api = self.make_api(f"https://127.0.0.1:{server.port}", ca_file=paths.ca)
        self.assertEqual((yield api.list_tasks()), [])
        self.assertEqual(len(server.resource.seen), 1)

    @inlineCallbacks
    def test_untrusted_certificate_refused(self) -> Generator[Deferred[Any], Any, None]:
        paths = self.certificates()
        server = yield self.start_server(paths.listen())
        for ca_file in (None, self.certificates(label="another").ca):
            api = self.make_api(f"https://127.0.0.1:{server.port}", ca_file=ca_file)
            error = yield self.refused(api.list_tasks())
            self.assertIsNone(error.status)
            # The session retries a TLS failure too: the certificate or the
            # trust store may be fixed while the agent runs.
            self.assertTrue(error.retryable)
            self.assertIn("not trusted", str(error))
        self.assertEqual(server.resource.seen, [], "a request was sent over untrusted TLS")

    @inlineCallbacks
    def test_wrong_host_name_refused(self) -> Generator[Deferred[Any], Any, None]:
        paths = self.certificates(names=("cp.test",), ips=())
        server = yield self.start_server(paths.listen())
        api = self.make_api(f"https://127.0.0.1:{server.port}", ca_file=paths.ca)
        error = yield self.refused(api.list_tasks())
        self.assertIsNone(error.status)
        self.assertIn("not valid for 127.0.0.1", str(error))
        self.assertEqual(server.resource.seen, [])

    @inlineCallbacks
    def test_unreadable_ca_file(self) -> Generator[Deferred[Any], Any, None]:
        # The CA file is read per connection; a file gone meanwhile is an
        # error of the request, not an exception out of list_tasks().
        missing = os.path.join(self.mktemp(), "ca.pem")
        api = self.make_api("https://127.0.0.1:1", ca_file=missing)
        error = yield self.refused(api.list_tasks())
        self.assertIn("ca.pem", str(error))
        self.assertIsNone(error.status)


# --- proxies ---------------------------------------------------------------------------


class ProxyTests(_Base):
    """HTTPS_PROXY/HTTP_PROXY/NO_PROXY as for the session: CONNECT, TLS inside."""

    def proxy_environ(self, proxy: ConnectProxyFactory, name: str = "HTTPS_PROXY",
                      **more: str) -> dict[str, str]:
        assert proxy.port is not None
        return {name: f"http://tunnel:{PASSWORD}@127.0.0.1:{proxy.port.getHost().port}",
                **more}

    @inlineCallbacks
    def test_https_through_connect(self) -> Generator[Deferred[Any], Any, None]:
        paths = self.certificates(names=("cp.test",), ips=())
        server = yield self.start_server(paths.listen())
        proxy = yield start_proxy(self, server.port)
        api = self.make_api(f"https://cp.test:{server.port}", ca_file=paths.ca,
                            environ=self.proxy_environ(proxy))
        yield api.list_tasks()
        yield api.report("t", {"status": "completed", "output": "secret output"})
        (head,) = proxy.heads  # one tunnel, reused
        self.assertEqual(head[0], f"CONNECT cp.test:{server.port} HTTP/1.1")
        self.assertIn(f"Proxy-Authorization: Basic {CREDENTIALS}", head)
        self.assertEqual(len(server.resource.seen), 2)
        # TLS inside the tunnel: the proxy saw none of the requests.
        self.assertNotIn(b"/api/v1", proxy.tunnelled)
        self.assertNotIn(b"secret output", proxy.tunnelled)
        self.assertNotIn(AGENT.encode(), proxy.tunnelled)

    @inlineCallbacks
    def test_http_through_connect(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        proxy = yield start_proxy(self, server.port)
        api = self.make_api(f"http://cp.test:{server.port}",
                            environ=self.proxy_environ(proxy, "HTTP_PROXY"))
        yield api.list_tasks()
        self.assertEqual(proxy.heads[0][0], f"CONNECT cp.test:{server.port} HTTP/1.1")
        self.assertIn(b"GET /api/v1/tasks", proxy.tunnelled)

    @inlineCallbacks
    def test_ipv6_control_plane_through_connect(self) -> Generator[Deferred[Any], Any, None]:
        # An IPv6 literal: bracketed in CONNECT, the certificate's IP checked.
        paths = self.certificates(names=(), ips=("2001:db8::5",))
        server = yield self.start_server(paths.listen())
        proxy = yield start_proxy(self, server.port)
        api = self.make_api(f"https://[2001:db8::5]:{server.port}", ca_file=paths.ca,
                            environ=self.proxy_environ(proxy))
        yield api.list_tasks()
        self.assertEqual(proxy.heads[0][0], f"CONNECT [2001:db8::5]:{server.port} HTTP/1.1")
        self.assertEqual(len(server.resource.seen), 1)

    @inlineCallbacks
    def test_proxy_refusals_never_show_the_password(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        proxy = yield start_proxy(self, server.port)
        api = self.make_api(f"https://cp.test:{server.port}",
                            environ=self.proxy_environ(proxy))
        for status in (b"407 Proxy Authentication Required", b"403 Forbidden"):
            proxy.answer = b"HTTP/1.1 " + status + b"\r\n\r\n"
            error = yield self.refused(api.list_tasks())
            self.assertIn(status.split()[0].decode(), str(error))
            self.assertIsNone(error.status)
            self.assertNotIn(PASSWORD, str(error))
            self.assertNotIn(CREDENTIALS, str(error))
        self.assertEqual(server.resource.seen, [])

    @inlineCallbacks
    def test_proxy_that_never_answers(self) -> Generator[Deferred[Any], Any, None]:
        server = yield self.start_server()
        proxy = yield start_proxy(self, server.port)
        proxy.silent = True
        api = self.make_api(f"https://cp.test:{server.port}", timeout=0.3,
                            environ=self.proxy_environ(proxy))
        error = yield self.refused(api.list_tasks())
        self.assertTrue(error.retryable)
        # The client gave up on the tunnel: its connection to the proxy is closed.
        (connection,) = proxy.connections
        yield connection.lost.addTimeout(2, reactor)

    @inlineCallbacks
    def test_no_proxy_goes_direct(self) -> Generator[Deferred[Any], Any, None]:
        paths = self.certificates(names=("cp.test",), ips=())
        server = yield self.start_server(paths.listen())
        proxy = yield start_proxy(self, server.port)
        api = self.make_api(f"https://cp.test:{server.port}", ca_file=paths.ca,
                            reactor=NamedReactor({"cp.test": "127.0.0.1"}),
                            environ=self.proxy_environ(proxy, NO_PROXY=".example,cp.test"))
        yield api.list_tasks()
        self.assertEqual(len(server.resource.seen), 1)
        self.assertEqual(proxy.heads, [])
        self.assertEqual(proxy.connections, [])

    @inlineCallbacks
    def test_unusable_proxy_setting(self) -> Generator[Deferred[Any], Any, None]:
        # A socks5:// proxy cannot be used; the request fails (it does not
        # go around the proxy) and the message keeps the password out.
        server = yield self.start_server()
        api = self.make_api(f"https://cp.test:{server.port}",
                            environ={"HTTPS_PROXY": f"socks5://u:{PASSWORD}@127.0.0.1:1"})
        error = yield self.refused(api.list_tasks())
        self.assertIn("socks5", str(error))
        self.assertNotIn(PASSWORD, str(error))
        self.assertEqual(server.resource.seen, [])


class ConstructionTests(SynchronousTestCase):
    def test_only_http_urls(self) -> None:
        signer = RequestSigner.from_key(key(), AGENT)
        for url in ("ws://cp.test/", "cp.test", "https://", "ftp://cp.test/"):
            self.assertRaises(ValueError, ControlPlaneAPI, url, signer, reactor=reactor)
