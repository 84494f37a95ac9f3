"""
The agent's local status endpoint: health, state and Prometheus metrics.

Off by default; ``--status-listen`` / ``HOSTLINK_WS_STATUS_LISTEN`` names a
Twisted server endpoint (``tcp:9920:interface=127.0.0.1``).  It serves:

``GET /healthz``
    ``200 active`` while the session is active, ``503 inactive`` otherwise
    (so a load balancer or a systemd watchdog script can use it as is).
``GET /status``
    the client's state as JSON (see :meth:`StatusSource.snapshot`).
``GET /metrics``
    Prometheus text exposition, from a registry of our own (not the
    process-global one, so an application embedding several agents, or a
    test suite, never sees two of them collide).

Metrics come from two places: counters from the client's events as they
happen, gauges from the client's state at scrape time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from hostlink_tw.protocol import MESSAGE_TYPES

__all__ = [
    "ClientMetrics",
    "StatusResource",
    "StatusSource",
    "make_status_service",
]

# Label values must stay bounded whatever the peer sends: anything outside
# these sets is counted under "other".
_OTHER = "other"


class _Clock(Protocol):
    def seconds(self) -> float: ...


class _Event(Protocol):
    kind: str
    fields: Mapping[str, Any]


class StatusSource(Protocol):
    """What the status endpoint needs from the agent (a client or service)."""

    def snapshot(self) -> dict[str, Any]:
        """
        JSON-able state.  Keys read here: ``active`` (bool),
        ``current_delay`` (seconds or None), ``last_ack_at`` (reactor time
        or None); everything else is passed through to ``/status``.
        """

    def add_observer(self, observer: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``observer`` with every client event; return an unsubscriber."""


def _type_label(value: object) -> str:
    return value if isinstance(value, str) and value in MESSAGE_TYPES else _OTHER


def _code_label(value: object) -> str:
    # WebSocket close codes live in 1000-4999; None is a TCP loss without a
    # close frame.
    if value is None:
        return "none"
    if isinstance(value, int) and not isinstance(value, bool) and 1000 <= value <= 4999:
        return str(value)
    return _OTHER


def _status_label(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return str(value)
    return _OTHER


class ClientMetrics:
    """
    Prometheus metrics of one agent, fed by its events.

    :param source: the agent whose events and state are measured.
    :param clock: the agent's reactor, for "seconds since last ack".
    :param registry: where the metrics are registered; a new one by default.
    """

    def __init__(
        self,
        source: StatusSource,
        clock: _Clock,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._source = source
        self._clock = clock
        r = self.registry
        self.attempts = Counter(
            "hostlink_connection_attempts", "Connection attempts started.", registry=r
        )
        self.activations = Counter(
            "hostlink_sessions_activated", "Sessions that became active (hello acked).",
            registry=r,
        )
        self.messages_in = Counter(
            "hostlink_messages_in", "Inbound envelopes by type.", ["type"], registry=r
        )
        self.messages_out = Counter(
            "hostlink_messages_out", "Outbound envelopes by type.", ["type"], registry=r
        )
        self.closes = Counter(
            "hostlink_connection_closes", "Closed connections by WebSocket close code.",
            ["code"], registry=r,
        )
        self.refusals = Counter(
            "hostlink_handshake_refusals", "Upgrades refused by the control plane, by HTTP status.",
            ["status"], registry=r,
        )
        active = Gauge("hostlink_session_active", "1 while the session is active.", registry=r)
        active.set_function(lambda: 1.0 if self._state().get("active") else 0.0)
        delay = Gauge(
            "hostlink_reconnect_delay_seconds",
            "The current reconnect delay (0 when connected or not waiting).",
            registry=r,
        )
        delay.set_function(self._current_delay)
        since_ack = Gauge(
            "hostlink_seconds_since_last_ack",
            "Seconds since the last ack from the control plane (NaN before the first).",
            registry=r,
        )
        since_ack.set_function(self._seconds_since_ack)
        self._unsubscribe = source.add_observer(self.observe)

    def _state(self) -> dict[str, Any]:
        return self._source.snapshot()

    def _current_delay(self) -> float:
        value = self._state().get("current_delay")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def _seconds_since_ack(self) -> float:
        at = self._state().get("last_ack_at")
        if not isinstance(at, (int, float)):
            return math.nan
        return max(0.0, self._clock.seconds() - float(at))

    def observe(self, event: _Event) -> None:
        """Count one client event."""
        kind, fields = event.kind, event.fields
        if kind == "attempt":
            self.attempts.inc()
        elif kind == "active":
            self.activations.inc()
        elif kind == "message_in":
            self.messages_in.labels(type=_type_label(fields.get("type"))).inc()
        elif kind == "message_out":
            self.messages_out.labels(type=_type_label(fields.get("type"))).inc()
        elif kind == "closed":
            self.closes.labels(code=_code_label(fields.get("code"))).inc()
        elif kind == "refused":
            self.refusals.labels(status=_status_label(fields.get("status"))).inc()

    def close(self) -> None:
        """Stop observing the agent."""
        self._unsubscribe()

    def exposition(self) -> bytes:
        """The Prometheus text exposition of these metrics."""
        return bytes(generate_latest(self.registry))


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Request], bytes]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        return self._render(request)


class StatusResource(Resource):
    """The ``/healthz``, ``/status`` and ``/metrics`` resources of one agent."""

    def __init__(self, source: StatusSource, metrics: ClientMetrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._source = source
        self._metrics = metrics
        for name, render in (
            (b"healthz", self._healthz),
            (b"status", self._status),
            (b"metrics", self._prometheus),
        ):
            self.putChild(name, _Leaf(render))

    def _healthz(self, request: Request) -> bytes:
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-type", b"text/plain; charset=utf-8")
        if self._source.snapshot().get("active"):
            return b"active\n"
        request.setResponseCode(503)
        return b"inactive\n"

    def _status(self, request: Request) -> bytes:
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-type", b"application/json")
        return json.dumps(self._source.snapshot(), sort_keys=True, default=str).encode() + b"\n"

    def _prometheus(self, request: Request) -> bytes:
        request.setHeader(  # type: ignore[no-untyped-call]
            b"content-type", CONTENT_TYPE_LATEST.encode())
        return self._metrics.exposition()


def make_status_service(
    endpoint: str, source: StatusSource, reactor: Any
) -> tuple[StreamServerEndpointService, ClientMetrics]:
    """
    A service serving the status resources of ``source`` on ``endpoint``
    (a Twisted server endpoint description), and the metrics it keeps.
    """
    metrics = ClientMetrics(source, reactor)
    site = Site(StatusResource(source, metrics))  # type: ignore[no-untyped-call]
    # Access logs of a scraper every 15 s are noise in an agent's log.
    site.log = lambda request: None  # type: ignore[method-assign]
    service = StreamServerEndpointService(  # type: ignore[no-untyped-call]
        serverFromString(reactor, endpoint), site  # type: ignore[no-untyped-call]
    )
    return service, metrics
