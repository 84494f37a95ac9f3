"""
The HTTP around the gateway: what each listener serves besides WebSockets.

The gateway listener (:func:`gateway_site`) routes on the whole path:
``/api/v1/agents/ws`` to the WebSocket resource, ``GET /healthz`` to
``200 ok``, anything else to 404.  No request there has a body (a body is
refused with 413, unread) and every answer but an accepted upgrade closes
its connection.  The operator listener (:func:`operator_factory`) serves
``GET /status``, the sessions as JSON, and closes after every answer.
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
from hostlink_tw.wire.vocabulary import GATEWAY_PATH

__all__ = ["gateway_site", "is_loopback", "operator_factory", "reason_phrase"]

_BODY_REFUSED = b"request bodies are not accepted\n"


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


class _OperatorSite(Site):
    """The operator listener's site: every answer closes its connection."""

    # Not "Starting factory <…_OperatorSite object at 0x…>" at each start.
    noisy = False

    def getResourceFor(self, request: Request) -> IResource:
        request.channel.persistent = False
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


class _OperatorFactory(WrappingFactory):
    """Keeps the operator listener's connections (``.protocols``) to drop them on stop."""

    noisy = False

    def logPrefix(self) -> str:
        """Twisted's "<prefix> starting on <port>" line names the listener, not classes."""
        return "operator page"


def gateway_site(websocket: IResource, reactor: Any) -> Site:
    """The gateway listener's site: ``websocket`` at the gateway path, and ``/healthz``."""
    site = _Site(  # type: ignore[no-untyped-call]
        _Root({GATEWAY_PATH.encode("ascii"): websocket, b"/healthz": _Healthz()}),
        reactor=reactor,
    )
    site.noisy = False
    return site


def operator_factory(status: Callable[[], Mapping[str, Any]], reactor: Any) -> WrappingFactory:
    """
    The operator listener's factory: ``GET /status`` answers ``status()``
    as JSON.  Wrapped so that stopping can drop its open connections
    (``.protocols``).
    """
    return _OperatorFactory(
        _OperatorSite(_Root({b"/status": _Status(status)}), reactor=reactor)  # type: ignore[no-untyped-call]
    )


def reason_phrase(status: int) -> str:
    """The standard reason phrase of an HTTP status."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
