"""
The control plane's REST endpoints, for the HTTP paths (PROTOCOL §9.1).

:class:`ControlPlaneAPI` is a small client on ``twisted.web.client.Agent``
(no new dependency): persistent connections (``HTTPConnectionPool``), every
request signed afresh with §2's four headers, each bounded in time and in
the bytes of its answer.  It trusts what the session trusts and goes where
the session goes:

* TLS: :func:`hostlink_tw.tls.client_tls_options` — the system store plus
  ``HOSTLINK_WS_CA_FILE``, host names checked fail-closed;
* proxies: :func:`hostlink_tw.proxy.proxy_for`'s rules, always through a
  ``CONNECT`` tunnel (:mod:`hostlink_tw.agent.tunnel`), TLS inside it.

Every failure is a :class:`ControlPlaneHTTPError` whose ``retryable`` says
what the caller should do (network errors, timeouts and 5xx are retryable;
4xx are not; a problem before the request leaves — the CA file unreadable,
a proxy setting that cannot be used — is retryable too, since the control
plane has not judged the request) and whose message is one line fit for a log (the answer's
``message`` or ``error`` field when it has one, escaped and shortened).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from hostlink_tw import __version__
from hostlink_tw.agent.tunnel import ConnectTunnelEndpoint
from hostlink_tw.proxy import proxy_for
from hostlink_tw.safetext import escape_control
from hostlink_tw.tls import client_tls_options, describe_tls_failure, is_tls_failure
from hostlink_tw.wire.signing import RequestSigner

__all__ = [
    "ControlPlaneAPI", "ControlPlaneHTTPError", "MAX_ANSWER_BYTES", "MAX_ERROR_ANSWER_BYTES",
    "PolledTask",
]

#: The largest answer body read (a task list with outputs can be large).
MAX_ANSWER_BYTES = 16 * 1024 * 1024

#: The most read of an answer that is not parsed whole (an error's message).
MAX_ERROR_ANSWER_BYTES = 64 * 1024

#: Task statuses the agent does not run (§9.1 [ours]).
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})



class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory without its "Starting factory" / "Stopping
    factory" lines: the reference control plane closes every HTTP connection,
    so each heartbeat and poll logged two lines (tens of thousands a day).
    Twisted has no public switch for it (twisted/twisted#9330); replacing the
    pool's ``_factory`` is the usual way.
    """

    noisy = False

class ControlPlaneHTTPError(Exception):
    """A request failed; ``status`` is None for a network error or a timeout."""

    def __init__(self, message: str, *, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class PolledTask:
    """One task of ``GET /api/v1/tasks`` or a heartbeat's ``pending_tasks``."""

    task_id: str
    attempt_id: str
    command: str
    status: str

    @property
    def runnable(self) -> bool:
        """Whether the agent should run it (§9.1: not completed, failed or cancelled)."""
        return self.status not in FINISHED_STATUSES and bool(self.command)

    @classmethod
    def parse(cls, value: object) -> PolledTask:
        """Read one task object; :class:`ControlPlaneHTTPError` when it is not one."""
        if not isinstance(value, dict):
            raise ControlPlaneHTTPError("a task is not a JSON object", status=None,
                                        retryable=False)
        # A field missing or null reads as "" (Go's decoding into a string
        # field): a task without a command is only not runnable, and must
        # not fail the whole list; a field of another type is refused.
        task_id = value.get("id")
        attempt, command, status = (
            "" if value.get(name) is None else value.get(name)
            for name in ("execution_attempt_id", "command", "status")
        )
        if not isinstance(task_id, str) or not task_id:
            raise ControlPlaneHTTPError("a task has no id", status=None, retryable=False)
        if not all(isinstance(v, str) for v in (attempt, command, status)):
            raise ControlPlaneHTTPError(
                f"task {escape_control(task_id, 80)} has a field of the wrong type",
                status=None, retryable=False,
            )
        return cls(task_id, str(attempt), str(command), str(status))


def parse_tasks(value: object) -> list[PolledTask]:
    """A JSON array of tasks."""
    if not isinstance(value, list):
        raise ControlPlaneHTTPError("the task list is not a JSON array", status=None,
                                    retryable=False)
    return [PolledTask.parse(item) for item in value]


@implementer(IBodyProducer)
class _JSONBody:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BoundedBody(Protocol):
    """
    Collects an answer body, refusing one longer than the bound — or, with
    ``truncate``, keeping only its first ``limit`` bytes (where only the
    start matters: an error's message, an ignored answer).
    """

    def __init__(self, limit: int, done: Deferred[bytes], *, truncate: bool = False) -> None:
        self._limit = limit
        self._done = done
        self._truncate = truncate
        self._parts: list[bytes] = []
        self._size = 0

    def stop(self) -> None:
        """Give up on the body: the connection is closed, not reused."""
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return  # over the bound: the connection is closing
        room = self._limit - self._size
        if len(data) > room:
            self.stop()
            if self._truncate:
                self._parts.append(data[:room])
                self._done.callback(b"".join(self._parts))
            else:
                self._done.errback(ControlPlaneHTTPError(
                    f"the answer is larger than {self._limit} bytes", status=None,
                    retryable=False))
            return
        self._size += len(data)
        self._parts.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._done.called:
            return
        # PotentialDataLoss: an answer without Content-Length or chunking,
        # ended by the connection (HTTP/1.0 style); nothing says it is
        # whole, but what is parsed must be valid JSON, and a cut one is not.
        if reason is None or isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(ControlPlaneHTTPError(
                f"the answer was cut off: {reason.getErrorMessage()}", status=None,
                retryable=True))


class _Endpoints:
    """Where each request connects: directly or through the proxy, TLS when https."""

    def __init__(self, reactor: Any, ca_file: str | None, environ: Any, timeout: float) -> None:
        self._reactor = reactor
        self._ca_file = ca_file
        self._environ = environ
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        scheme = uri.scheme.decode("ascii")
        endpoint: Any
        # An IPv6 literal comes unbracketed from the URI; the URL must bracket it.
        authority = f"[{host}]:{uri.port}" if ":" in host else f"{host}:{uri.port}"
        proxy = proxy_for(f"{'wss' if scheme == 'https' else 'ws'}://{authority}/",
                          self._environ)
        if proxy is None:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = ConnectTunnelEndpoint(
                HostnameEndpoint(self._reactor, proxy.host, proxy.port, timeout=self._timeout),
                host, uri.port, proxy.authorization,
            )
        if scheme == "https":
            endpoint = wrapClientTLS(client_tls_options(host, self._ca_file), endpoint)
        return endpoint


class ControlPlaneAPI:
    """
    The three endpoints of §9.1.

    :param base_url: ``SH_CONTROL_PLANE_URL`` (``http://`` or ``https://``).
    :param signer: signs every request (§2).
    :param ca_file: ``HOSTLINK_WS_CA_FILE``, added to the system trust store.
    :param environ: for the proxy variables.
    :param timeout: seconds for a whole request, connection included.
    """

    def __init__(self, base_url: str, signer: RequestSigner, *, reactor: Any,
                 ca_file: str | None = None, environ: Any = None, timeout: float = 10.0,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {escape_control(base_url, 120)}")
        self._base = base_url.rstrip("/")
        self._host = parts.hostname
        self._signer = signer
        self._reactor = reactor
        self._timeout = timeout
        self._max = max_answer_bytes
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self._pool.maxPersistentPerHost = 2
        self._pool._factory = _QuietHTTP11ClientFactory
        self._agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            reactor, _Endpoints(reactor, ca_file, environ if environ is not None else {},
                                timeout), pool=self._pool,
        )

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections."""
        return self._pool.closeCachedConnections()  # type: ignore[no-untyped-call,no-any-return]

    def list_tasks(self) -> Deferred[list[PolledTask]]:
        """``GET /api/v1/tasks``."""
        return self._request(b"GET", "/api/v1/tasks").addCallback(parse_tasks)

    def heartbeat(self) -> Deferred[list[PolledTask]]:
        """``POST /api/v1/agents/{id}/heartbeat``: its ``pending_tasks``."""
        path = f"/api/v1/agents/{quote(self._signer.agent_id, safe='')}/heartbeat"

        def pending(answer: object) -> list[PolledTask]:
            if not isinstance(answer, dict):
                raise ControlPlaneHTTPError("the heartbeat answer is not a JSON object",
                                            status=None, retryable=False)
            return parse_tasks(answer.get("pending_tasks") or [])

        return self._request(b"POST", path).addCallback(pending)

    def report(self, task_id: str, body: dict[str, Any]) -> Deferred[None]:
        """
        ``PUT /api/v1/tasks/{id}``; fires once a 2xx accepted it.

        Whatever a 2xx answer holds besides its status, the report was
        accepted (§9.1): a body that is not JSON must not make the agent
        send it again.
        """
        path = f"/api/v1/tasks/{quote(task_id, safe='')}"
        return self._request(b"PUT", path, body, json_answer=False).addCallback(lambda _: None)

    def _request(self, method: bytes, path: str, body: dict[str, Any] | None = None, *,
                 json_answer: bool = True) -> Deferred[Any]:
        # maybeDeferred: what fails before the request leaves (the CA file
        # read for each connection, a proxy setting proxy_for refuses, the
        # signer) is a failure of this request like any other, not an
        # exception out of list_tasks() and friends.
        d: Deferred[Any] = maybeDeferred(self._send, method, path, body)
        d.addCallback(self._read, json_answer)
        # The cancellation's own failure depends on where the request was
        # (ResponseNeverReceived([CancelledError]) while awaiting the
        # answer), so the timeout says so itself rather than be recognised.
        d.addTimeout(self._timeout, self._reactor,
                     onTimeoutCancel=lambda result, timeout: self._timed_out(method, path))
        d.addErrback(self._failed, method, path)
        return d

    def _send(self, method: bytes, path: str,
              body: dict[str, Any] | None) -> Deferred[IResponse]:
        headers = Headers({"User-Agent": [f"hostlink_tw/{__version__}"]})
        for name, value in self._signer.sign_headers().items():
            headers.setRawHeaders(name, [value])
        producer = None
        if body is not None:
            headers.setRawHeaders("Content-Type", ["application/json"])
            producer = _JSONBody(json.dumps(body, ensure_ascii=False).encode("utf-8"))
        return self._agent.request(  # type: ignore[no-any-return]
            method, (self._base + path).encode("ascii"), headers, producer
        )

    def _read(self, response: IResponse, json_answer: bool) -> Deferred[Any]:
        # Cancelled (the request's timeout) while the body trickles in: the
        # connection must close, or it stays open as long as the server likes.
        done: Deferred[bytes] = Deferred(lambda _: body.stop())
        # An error answer is judged by its status, whatever its size (a 5xx
        # stays retryable), and an answer not parsed need not be whole.
        accepted = 200 <= response.code < 300
        truncate = not accepted or not json_answer
        limit = min(self._max, MAX_ERROR_ANSWER_BYTES) if truncate else self._max
        body = _BoundedBody(limit, done, truncate=truncate)
        response.deliverBody(body)  # type: ignore[no-untyped-call]

        def judge(raw: bytes) -> Any:
            if accepted and not json_answer:
                return None
            try:
                data = json.loads(raw) if raw.strip() else None
            except (ValueError, RecursionError):
                # RecursionError: "[[[[…" nested deeper than the parser's stack.
                data = None
            if accepted:
                if data is None and raw.strip():
                    raise ControlPlaneHTTPError("the answer is not JSON", status=response.code,
                                                retryable=False)
                return data
            detail = ""
            if isinstance(data, dict):
                detail = str(data.get("message") or data.get("error") or "")
            elif raw:
                detail = raw[:200].decode("utf-8", "replace")
            raise ControlPlaneHTTPError(
                f"HTTP {response.code}" + (f": {escape_control(detail, 200)}" if detail else ""),
                status=response.code, retryable=response.code >= 500,
            )

        return done.addCallback(judge)

    def _timed_out(self, method: bytes, path: str) -> NoReturn:
        raise ControlPlaneHTTPError(
            f"{method.decode()} {path}: no answer within {self._timeout:g}s",
            status=None, retryable=True)

    def _failed(self, failure: Failure, method: bytes, path: str) -> None:
        if isinstance(failure.value, ControlPlaneHTTPError):
            raise failure.value
        raise ControlPlaneHTTPError(
            f"{method.decode()} {path}: {escape_control(self._describe(failure), 200)}",
            status=None, retryable=True)

    def _describe(self, failure: Failure) -> str:
        """A network failure as one readable line (TLS failures as the session says them)."""
        value = failure.value
        if isinstance(value, (ResponseFailed, RequestTransmissionFailed,
                              RequestGenerationFailed)):
            # Twisted's wrappers: their own message is a list of Failure reprs.
            reasons = [r for r in value.reasons if isinstance(r, Failure)]
            if reasons:
                return "; ".join(self._describe(r) for r in reasons[:3])
        if is_tls_failure(failure):
            return describe_tls_failure(failure, self._host)
        return failure.getErrorMessage()
