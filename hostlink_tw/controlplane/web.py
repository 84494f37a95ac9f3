"""
The operator listener's HTTP (the gateway listener's is
:mod:`~hostlink_tw.controlplane.gatewaysite`).

The operator listener (:func:`operator_factory`) serves
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

__all__ = [
    "DEFAULT_MAX_OPERATOR_BODY_BYTES",
    "OperatorFactory",
    "is_loopback",
    "operator_factory",
    "reason_phrase",
]

#: The longest request body the operator listener reads without an API that needs more.
DEFAULT_MAX_OPERATOR_BODY_BYTES = 64 * 1024


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
