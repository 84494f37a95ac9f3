"""
The agent's local status endpoint: health, state and Prometheus metrics.

Off by default; ``--status-listen`` / ``HOSTLINK_WS_STATUS_LISTEN`` names a
Twisted server endpoint (``tcp:9920:interface=127.0.0.1``).  It serves:

``GET /healthz``
    ``200 active`` while the session is active, ``503 inactive`` otherwise
    (so a load balancer or a systemd watchdog script can use it as is).
``GET /status``
    the client's state as JSON (see :meth:`StatusSource.snapshot`), its
    times as RFC 3339 UTC text (``2026-04-27T11:03:00Z``, as the reference
    control plane's ``/status``) and its URLs redacted
    (:func:`hostlink_tw.safetext.redact_url`), and under ``tasks`` the
    task engine's state (:func:`hostlink_tw.taskstatus.task_status`).
``GET /metrics``
    Prometheus text exposition, from a registry of our own (not the
    process-global one, so an application embedding several agents, or a
    test suite, never sees two of them collide), without the ``_created``
    series of the counters.

Metrics come from two places: counters and timestamps from the client's
events as they happen, gauges from the client's state at scrape time.  The
task metrics (:mod:`hostlink_tw.taskstatus`) follow the same rule.
Timestamps follow Prometheus conventions: Unix time of the last event, read
from the wall clock when the event arrives (never "seconds since", which
grows on a healthy session and cannot be aggregated).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from hostlink_tw._listen import is_loopback, listen_failure
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO_ACK,
    MESSAGE_TYPES,
    ProtocolError,
    format_sent_at,
)
from hostlink_tw.safetext import redact_url
from hostlink_tw.taskstatus import (
    PollingMetrics,
    TaskMetrics,
    engine_of,
    polling_status,
    task_status,
)

_log = Logger(namespace="hostlink_tw.status")

__all__ = [
    "TIME_FIELDS",
    "ClientMetrics",
    "StatusResource",
    "StatusSource",
    "exposed_interface",
    "make_status_service",
]

#: The ``/status`` fields that are times: reactor seconds in the snapshot,
#: RFC 3339 UTC text in the JSON.
TIME_FIELDS = ("connected_since", "last_ack_at", "next_retry_at")
_URL_FIELDS = ("url", "proxy")
_ACK_TYPES = frozenset({AGENT_HELLO_ACK, ACK})

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
        ``current_delay`` (seconds or None), the :data:`TIME_FIELDS`
        (reactor seconds or None, shown as RFC 3339 text) and ``url`` and
        ``proxy`` (shown redacted); everything else is passed through to
        ``/status``.  A source that has a ``tasks`` attribute (the service
        and the client do: their task engine, or ``None``) adds the task
        metrics and the ``tasks`` part of ``/status``.
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


class _WithoutCreated:
    """A view of a registry without the ``_created`` samples of its metrics.

    prometheus_client's own switches (``disable_created_metrics()``,
    ``PROMETHEUS_DISABLE_CREATED_SERIES``) are process-global: they would
    change the metrics of an application that embeds the agent.  Filtering
    our own exposition touches nothing else.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            if any(sample.name == created for sample in metric.samples):
                metric = copy.copy(metric)
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class ClientMetrics:
    """
    Prometheus metrics of one agent, fed by its events.

    :param source: the agent whose events and state are measured.
    :param registry: where the metrics are registered; a new one by default.
    :param wall_clock: Unix time now, for the ``*_timestamp_seconds`` gauges
        (the wall clock, not the reactor: a test reactor's seconds start at
        0, and Prometheus compares these with its own ``time()``).
    """

    def __init__(
        self,
        source: StatusSource,
        registry: CollectorRegistry | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._source = source
        self._wall_clock = wall_clock
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
        self.last_ack = Gauge(
            "hostlink_last_ack_timestamp_seconds",
            "Unix time of the last ack (agent.hello_ack or ack) received (NaN before the first).",
            registry=r,
        )
        self.last_pong = Gauge(
            "hostlink_last_pong_timestamp_seconds",
            "Unix time of the last pong received (NaN before the first).",
            registry=r,
        )
        self.session_start = Gauge(
            "hostlink_session_start_timestamp_seconds",
            "Unix time the current session became active (NaN while none is).",
            registry=r,
        )
        for gauge in (self.last_ack, self.last_pong, self.session_start):
            gauge.set(math.nan)
        #: The task metrics (PROTOCOL §7–§8).
        self.tasks = TaskMetrics(lambda: engine_of(source), r)
        if hasattr(source, "http"):
            self.polling = PollingMetrics(lambda: getattr(source, "http", None), r)
        self._unsubscribe = source.add_observer(self.observe)

    def _state(self) -> dict[str, Any]:
        return self._source.snapshot()

    def _current_delay(self) -> float:
        value = self._state().get("current_delay")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def observe(self, event: _Event) -> None:
        """Count one client event."""
        kind, fields = event.kind, event.fields
        if kind == "attempt":
            self.attempts.inc()
        elif kind == "active":
            self.activations.inc()
            self.session_start.set(self._wall_clock())
        elif kind == "pong":
            self.last_pong.set(self._wall_clock())
        elif kind == "message_in":
            message_type = fields.get("type")
            self.messages_in.labels(type=_type_label(message_type)).inc()
            if message_type in _ACK_TYPES:
                self.last_ack.set(self._wall_clock())
        elif kind == "message_out":
            self.messages_out.labels(type=_type_label(fields.get("type"))).inc()
        elif kind in ("inactive", "stopped"):
            self.session_start.set(math.nan)
        elif kind == "closed":
            self.session_start.set(math.nan)
            self.closes.labels(code=_code_label(fields.get("code"))).inc()
        elif kind == "refused":
            self.refusals.labels(status=_status_label(fields.get("status"))).inc()
        else:
            self.tasks.observe(kind, fields)

    def close(self) -> None:
        """Stop observing the agent."""
        self._unsubscribe()

    def exposition(self) -> bytes:
        """The Prometheus text exposition of these metrics, without ``_created`` series."""
        return bytes(generate_latest(_WithoutCreated(self.registry)))


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Request], bytes]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        return self._render(request)


class StatusResource(Resource):
    """
    The ``/healthz``, ``/status`` and ``/metrics`` resources of one agent.

    :param clock: the agent's reactor, whose ``seconds()`` the snapshot's
        times are in; ``None`` when they already are Unix time.
    :param wall_clock: Unix time now; a reactor time ``t`` is shown as
        ``wall_clock() - (clock.seconds() - t)``.
    """

    def __init__(
        self,
        source: StatusSource,
        metrics: ClientMetrics,
        *,
        clock: _Clock | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._source = source
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
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
        return json.dumps(self.status(), sort_keys=True, default=str).encode() + b"\n"

    def status(self) -> dict[str, Any]:
        """The ``/status`` document: the snapshot with times as text and URLs
        redacted, and the tasks' state."""
        state = self._source.snapshot()
        offset = 0.0 if self._clock is None else self._wall_clock() - self._clock.seconds()

        def as_text(value: object) -> Any:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    return format_sent_at(float(value) + offset)
                except ProtocolError:  # NaN, infinite or beyond year 9999: not a time
                    return None
            return value

        for key in TIME_FIELDS:
            if key in state:
                state[key] = as_text(state[key])
        for key in _URL_FIELDS:
            if isinstance(state.get(key), str):
                state[key] = redact_url(state[key])
        if hasattr(self._source, "tasks"):
            state["tasks"] = task_status(engine_of(self._source), as_text)
        if hasattr(self._source, "http"):
            state["polling"] = polling_status(getattr(self._source, "http", None), as_text)
        return state

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
    metrics = ClientMetrics(source)
    site = Site(StatusResource(source, metrics, clock=reactor))  # type: ignore[no-untyped-call]
    # Access logs of a scraper every 15 s are noise in an agent's log, and
    # so are "Starting factory <Site object at 0x…>" lines; Twisted's own
    # "<prefix> starting on <port>" line cannot be turned off: it names us.
    site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    site.logPrefix = lambda: "status page"  # type: ignore[method-assign]
    service = StreamServerEndpointService(  # type: ignore[no-untyped-call]
        _StatusPageEndpoint(serverFromString(reactor, endpoint)), site  # type: ignore[no-untyped-call]
    )
    return service, metrics


@implementer(IStreamServerEndpoint)
class _StatusPageEndpoint:
    """
    The configured endpoint, saying where the page is once it listens
    (``status page on http://…/``) or, when it cannot (a busy port), why in
    one error line: the agent goes on without its status page rather than
    log a traceback.
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        #: The configured endpoint.
        self.wrapped = endpoint

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d: Deferred[Any] = self.wrapped.listen(factory)
        return d.addCallbacks(_announce, _not_listening)


def _not_listening(failure: Failure) -> None:
    error = failure.value
    if isinstance(error, CancelledError):
        return None
    reason = listen_failure(error, "HOSTLINK_WS_STATUS_LISTEN (--status-listen)")
    _log.error("status page not started: {reason}", reason=reason)
    return None


def _announce(port: Any) -> Any:
    address = port.getHost()
    host = getattr(address, "host", None)
    if isinstance(host, str):
        where = f"http://{f'[{host}]' if ':' in host else host}:{address.port}/"
    else:  # a unix socket, or an endpoint plugin's address
        where = str(getattr(address, "name", address))
    _log.info("status page on {url}", url=where)
    return port


def exposed_interface(endpoint: object) -> str | None:
    """
    The address a server endpoint listens on when it is not loopback-only,
    else ``None``: ``"all interfaces"`` for the default, or the address.

    TCP and SSL endpoints (``tcp:``, ``tcp6:``, ``ssl:``) keep their
    ``interface``; anything else (``unix:``, a custom plugin) is not a
    network address here and gives ``None``.
    """
    endpoint = getattr(endpoint, "wrapped", endpoint)  # the status page's own wrapper
    interface = getattr(endpoint, "_interface", None)
    if not isinstance(interface, str):
        return None
    if interface in ("", "0.0.0.0", "::"):  # noqa: S104 - naming it, not binding it
        return "all interfaces"
    if interface.lower() == "localhost" or is_loopback(interface):
        return None
    return interface
