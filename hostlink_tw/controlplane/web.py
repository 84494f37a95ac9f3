"""
The HTTP around the gateway: what each listener serves besides WebSockets.

The gateway listener (:func:`gateway_site`) routes on the whole path:
``/api/v1/agents/ws`` to the WebSocket resource, ``GET /healthz`` to
``200 ok``, anything else to 404.  No request there has a body (a body is
refused with 413, unread) and every answer but an accepted upgrade closes
its connection.  The operator listener (:func:`operator_factory`) serves
``GET /status``, the sessions as JSON, and, once given one
(:meth:`OperatorFactory.serve_api`), the operator API under
``/operator/v1/`` (:mod:`~hostlink_tw.controlplane.operatorapi`); it takes
request bodies of a bounded length only (larger: 413, chunked: 411, both
unread) and closes after every answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from twisted.protocols.policies import WrappingFactory
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from hostlink_tw._listen import is_loopback
from hostlink_tw.controlplane.operatorapi import API_PREFIX, error_body
from hostlink_tw.wire.vocabulary import GATEWAY_PATH

__all__ = [
    "DEFAULT_MAX_OPERATOR_BODY_BYTES",
    "OperatorFactory",
    "gateway_site",
    "is_loopback",
    "operator_factory",
    "reason_phrase",
]

_BODY_REFUSED = b"request bodies are not accepted\n"
#: The longest request body the operator listener reads without an API that needs more.
DEFAULT_MAX_OPERATOR_BODY_BYTES = 64 * 1024


class _Channel(HTTPChannel):
    """
    HTTP on the gateway listener: no request has a body here (the upgrade
    and ``/healthz`` are GETs), so a body is refused with 413 before any of it
    is stored, and the connection is closed.
    """

    def allHeadersReceived(self) -> None:
        # length: None for chunked, the Content-Length otherwise (0 if absent).
        # Checked before the request sees its length, which is when Twisted
        # would create the body's temporary file.
        if self.length == 0:
            super().allHeadersReceived()  # type: ignore[no-untyped-call]
            return
        self.persistent = False
        # The parser goes on in raw mode (length is not 0): everything after
        # the headers is dropped unread.
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(_BODY_REFUSED), _BODY_REFUSED)
        )
        transport.loseConnection()


class _Site(Site):
    """
    A Site whose answers other than the WebSocket upgrade close the
    connection: a keep-alive connection would be a way to stay connected
    without ever authenticating.
    """

    # A plain HTTP/1.1 channel: no HTTP/2 negotiation on the gateway.
    protocol = _Channel  # type: ignore[assignment]

    def logPrefix(self) -> str:
        """Twisted's "<prefix> starting on <port>" line names the listener, not a class."""
        return "agent gateway"

    def getResourceFor(self, request: Request) -> IResource:
        if request.path != GATEWAY_PATH.encode("ascii"):
            request.channel.persistent = False
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


class _Root(Resource):
    """Routes on the whole path: only the paths given exist, the rest is 404."""

    def __init__(self, routes: Mapping[bytes, Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._routes: dict[bytes, IResource] = dict(routes)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        resource = self._routes.get(request.path)
        if resource is None:
            return notFound()
        # The routed resources are leaves: traversal stops here.
        return resource


class _Healthz(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"ok"


class _Status(Resource):
    """``GET /status`` on the operator listener: the sessions, as JSON."""

    isLeaf = True

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._status = status

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
        return json.dumps(self._status(), indent=2).encode("utf-8") + b"\n"


class _OperatorChannel(HTTPChannel):
    """
    HTTP on the operator listener: a request body longer than the site's
    ``max_body_bytes`` (413) or of unknown length (chunked: 411) is refused
    before any of it is stored, and the connection closed.
    """

    def allHeadersReceived(self) -> None:
        site: Any = getattr(self, "site", None)
        limit = getattr(site, "max_body_bytes", DEFAULT_MAX_OPERATOR_BODY_BYTES)
        # length: None for chunked, the Content-Length otherwise (0 if absent).
        if self.length is not None and self.length <= limit:
            super().allHeadersReceived()  # type: ignore[no-untyped-call]
            return
        if self.length is None:
            status = b"411 Length Required"
            body = error_body("length_required", "send the body with a Content-Length")
        else:
            status = b"413 Content Too Large"
            body = error_body("body_too_large", f"request bodies are limited to {limit} bytes")
        self.persistent = False
        # Everything after the headers is dropped unread (as on the gateway).
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(body), body)
        )
        transport.loseConnection()


class _OperatorRoot(_Root):
    """``/status``, and the operator API's whole tree once it is served."""

    def __init__(self, routes: Mapping[bytes, Any]) -> None:
        super().__init__(routes)
        self.api: IResource | None = None

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        prefix = API_PREFIX.encode("ascii")
        if self.api is not None and (
            request.path == prefix or request.path.startswith(prefix + b"/")
        ):
            return self.api
        return super().getChildWithDefault(path, request)


class _OperatorSite(Site):
    """The operator listener's site: every answer closes its connection."""

    # Not "Starting factory <…_OperatorSite object at 0x…>" at each start.
    noisy = False
    protocol = _OperatorChannel  # type: ignore[assignment]
    #: Read by the channel before the body arrives.
    max_body_bytes = DEFAULT_MAX_OPERATOR_BODY_BYTES

    def getResourceFor(self, request: Request) -> IResource:
        request.channel.persistent = False
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


class OperatorFactory(WrappingFactory):
    """
    The operator listener's factory; keeps its connections (``.protocols``)
    to drop them on stop.
    """

    noisy = False

    def logPrefix(self) -> str:
        """Twisted's "<prefix> starting on <port>" line names the listener, not classes."""
        return "operator page"

    def serve_api(self, api: IResource, max_body_bytes: int) -> None:
        """
        Serve ``api`` for every path under ``/operator/v1`` from now on, and
        take request bodies of up to ``max_body_bytes``.
        """
        site: Any = self.wrappedFactory
        site.resource.api = api
        site.max_body_bytes = max_body_bytes


def gateway_site(websocket: IResource, reactor: Any) -> Site:
    """The gateway listener's site: ``websocket`` at the gateway path, and ``/healthz``."""
    site = _Site(  # type: ignore[no-untyped-call]
        _Root({GATEWAY_PATH.encode("ascii"): websocket, b"/healthz": _Healthz()}),
        reactor=reactor,
    )
    site.noisy = False
    return site


def operator_factory(status: Callable[[], Mapping[str, Any]], reactor: Any) -> OperatorFactory:
    """
    The operator listener's factory: ``GET /status`` answers ``status()``
    as JSON (the operator API joins it with :meth:`OperatorFactory.serve_api`).
    Wrapped so that stopping can drop its open connections (``.protocols``).
    """
    return OperatorFactory(
        _OperatorSite(_OperatorRoot({b"/status": _Status(status)}), reactor=reactor)  # type: ignore[no-untyped-call]
    )


def reason_phrase(status: int) -> str:
    """The standard reason phrase of an HTTP status."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
