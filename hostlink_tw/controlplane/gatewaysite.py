"""
The HTTP of the gateway listener (:func:`gateway_site`): the routes beside
the WebSocket upgrade, which requests may have a body, and that every answer
but an accepted upgrade closes its connection.

* Routes, on the whole path: ``/api/v1/agents/ws`` to the WebSocket
  resource, ``GET /healthz`` to ``200 ok``, ``/api/v1/…`` to the agent API
  (:mod:`~hostlink_tw.controlplane.agentapi`), anything else to 404.
* Bodies: only a request the agent API takes one with (``PUT
  /api/v1/tasks/{id}``) may have a body, of at most the API's
  ``body_limit`` bytes, with a ``Content-Length``.  Any other body, a larger
  one (413) or a chunked one (411) is refused before any of it is stored,
  and the connection closes; an accepted one is kept in memory.
* Every answer but an accepted upgrade closes its connection: a keep-alive
  connection would be a way to stay connected without ever authenticating,
  and the handshake deadline (:mod:`~hostlink_tw.controlplane.connections`)
  ends every connection that is not a WebSocket anyway.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from hostlink_tw.controlplane.agentapi import API_PREFIX, AgentAPI
from hostlink_tw.wire.vocabulary import GATEWAY_PATH

__all__ = ["gateway_site"]

_GATEWAY_PATH = GATEWAY_PATH.encode("ascii")


class _Channel(HTTPChannel):
    """
    HTTP on the gateway listener: a body the site does not take is refused
    (413, or 411 when its length is not given) before any of it is stored,
    and the connection is closed.
    """

    site: _GatewaySite

    def allHeadersReceived(self) -> None:
        # length: None for chunked, the Content-Length otherwise (0 if
        # absent).  Checked before the request sees its length, which is
        # when Twisted would create the body's file.  The request line is
        # only on the channel at this point, in HTTPChannel's private
        # _command and _path; were they gone, no body would be taken (and
        # the report tests would fail), never one too many.
        refusal = self.site.body_refusal(
            getattr(self, "_command", None), getattr(self, "_path", None), self.length
        )
        if refusal is None:
            super().allHeadersReceived()  # type: ignore[no-untyped-call]
            return
        status, phrase, text = refusal
        self.persistent = False
        # The parser goes on in raw mode (length is not 0): everything after
        # the headers is dropped unread.
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        body = text.encode("utf-8") + b"\n"
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, phrase, len(body), body)
        )
        transport.loseConnection()


class _Request(Request):
    """A request whose body, bounded by the channel, is kept in memory."""

    def gotLength(self, length: int | None) -> None:
        # Twisted writes a body over 100 kB to a temporary file; the channel
        # only lets a body through when its length is known and bounded.
        self.content = BytesIO()


class _Root(Resource):
    """Routes on the whole path: only the paths given exist, the rest is 404."""

    def __init__(self, websocket: IResource, api: AgentAPI) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._websocket = websocket
        self._api = api
        self._healthz = _Healthz()

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        # The routed resources are leaves: traversal stops here.
        if request.path == _GATEWAY_PATH:
            return self._websocket
        if request.path == b"/healthz":
            return self._healthz
        if request.path.startswith(API_PREFIX):
            return self._api
        return notFound()


class _Healthz(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"ok"


class _GatewaySite(Site):
    """The gateway listener's site (see the module docstring)."""

    # A plain HTTP/1.1 channel: no HTTP/2 negotiation on the gateway.
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request
    # Hostile input never sees a traceback (Twisted's default, pinned).
    displayTracebacks = False

    def __init__(self, websocket: IResource, api: AgentAPI, reactor: Any) -> None:
        super().__init__(_Root(websocket, api), reactor=reactor)  # type: ignore[no-untyped-call]
        self._api = api
        self.noisy = False

    def logPrefix(self) -> str:
        """Twisted's "<prefix> starting on <port>" line names the listener, not a class."""
        return "agent gateway"

    def body_refusal(
        self, method: bytes | None, target: bytes | None, length: int | None
    ) -> tuple[int, bytes, str] | None:
        """
        Why a request with this method, request target and body length is
        refused before its body is read (status, reason phrase, text), or
        None if it may go on.
        """
        if length == 0:
            return None
        path = None if target is None else target.split(b"?", 1)[0]
        if method is None or path is None or not self._api.takes_body(method, path):
            return 413, b"Content Too Large", "request bodies are not accepted here"
        if length is None:
            return 411, b"Length Required", "a request body needs a Content-Length"
        if length > self._api.body_limit:
            return (
                413,
                b"Content Too Large",
                f"the request body is larger than {self._api.body_limit} bytes",
            )
        return None

    def getResourceFor(self, request: Request) -> IResource:
        if request.path != _GATEWAY_PATH:
            request.channel.persistent = False
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


def gateway_site(websocket: IResource, api: AgentAPI, reactor: Any) -> Site:
    """
    The gateway listener's site: ``websocket`` at the gateway path,
    ``/healthz``, and the agent API under ``/api/v1/``.
    """
    return _GatewaySite(websocket, api, reactor)
