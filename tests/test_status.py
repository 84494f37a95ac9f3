"""The local status endpoint: /healthz, /status, /metrics."""

from __future__ import annotations

import json
import math
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from hostlink_tw.client import ClientEvent
from hostlink_tw.status import (
    ClientMetrics,
    StatusResource,
    exposed_interface,
    make_status_service,
)

# 2026-06-01T00:00:00Z: the wall clock of these tests, far from the reactor's 1000.
WALL = 1_780_272_000.0


class FakeSource:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {
            "active": False,
            "agent_id": "agent-1",
            "url": "wss://cp.example/api/v1/agents/ws",
            "current_delay": None,
            "last_ack_at": None,
            "attempts": 3,
        }
        self.observers: list[Any] = []

    def snapshot(self) -> dict[str, Any]:
        return dict(self.state)

    def add_observer(self, observer: Any) -> Any:
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)

    def emit(self, kind: str, **fields: Any) -> None:
        for observer in list(self.observers):
            observer(ClientEvent(kind, fields))


def sample(metrics: ClientMetrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source = FakeSource()
        self.clock = Clock()
        self.clock.advance(1000)
        self.wall = WALL
        self.metrics = ClientMetrics(self.source, wall_clock=lambda: self.wall)
        self.root = StatusResource(
            self.source, self.metrics, clock=self.clock, wall_clock=lambda: self.wall
        )

    def get(self, path: bytes) -> tuple[int, bytes, DummyRequest]:
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        resource = getChildForRequest(self.root, request)
        body = resource.render(request)
        return (request.responseCode or 200), body, request

    def test_healthz_inactive_then_active(self) -> None:
        code, body, _ = self.get(b"/healthz")
        self.assertEqual((code, body), (503, b"inactive\n"))
        self.source.state["active"] = True
        code, body, _ = self.get(b"/healthz")
        self.assertEqual((code, body), (200, b"active\n"))

    def test_status_is_the_snapshot_as_json(self) -> None:
        code, body, request = self.get(b"/status")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), self.source.snapshot())
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])

    def test_status_times_are_rfc3339_utc(self) -> None:
        """Issue 9 item 14: reactor seconds become wall-clock RFC 3339 text, keys kept."""
        self.source.state.update(connected_since=990.0, last_ack_at=995.5, next_retry_at=1003.0)
        _, body, _ = self.get(b"/status")
        status = json.loads(body)
        self.assertEqual(status["connected_since"], "2026-05-31T23:59:50Z")
        self.assertEqual(status["last_ack_at"], "2026-05-31T23:59:55Z")
        self.assertEqual(status["next_retry_at"], "2026-06-01T00:00:03Z")
        self.assertEqual(status["attempts"], 3)

    def test_status_times_without_a_clock_are_unix_time(self) -> None:
        root = StatusResource(self.source, self.metrics)
        self.source.state.update(connected_since=WALL, last_ack_at=None,
                                 next_retry_at=float("nan"))
        status = root.status()
        self.assertEqual(status["connected_since"], "2026-06-01T00:00:00Z")
        self.assertIsNone(status["last_ack_at"])
        self.assertIsNone(status["next_retry_at"])

    def test_status_urls_are_redacted(self) -> None:
        """Issue 10 item 14: no user info, query value or fragment in /status."""
        self.source.state.update(
            url="wss://u:hunter2@cp.example/ws?token=s3cret#frag",
            proxy="http://user:pw@proxy.example:3128",
        )
        _, body, _ = self.get(b"/status")
        for secret in (b"hunter2", b"s3cret", b"frag", b"user:pw"):
            self.assertNotIn(secret, body)
        status = json.loads(body)
        self.assertEqual(status["url"], "wss://cp.example/ws?token=REDACTED")
        self.assertEqual(status["proxy"], "http://proxy.example:3128")

    def test_unknown_path_is_404(self) -> None:
        code, _, _ = self.get(b"/nope")
        self.assertEqual(code, 404)

    def test_event_counters(self) -> None:
        for _ in range(3):
            self.source.emit("attempt", attempt=1, url="x")
        self.source.emit("active", message_id="m")
        self.source.emit("message_in", type="agent.hello_ack", message_id="a")
        self.source.emit("message_in", type="agent.hello_ack", message_id="b")
        self.source.emit("message_out", type="agent.hello", message_id="c")
        self.source.emit("closed", code=1000, reason="bye", clean=True)
        self.source.emit("closed", code=None, reason="lost", clean=False)
        self.source.emit("refused", status=401, reason="bad signature")
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_connection_attempts_total"), 3)
        self.assertEqual(sample(m, "hostlink_sessions_activated_total"), 1)
        self.assertEqual(sample(m, "hostlink_messages_in_total", type="agent.hello_ack"), 2)
        self.assertEqual(sample(m, "hostlink_messages_out_total", type="agent.hello"), 1)
        self.assertEqual(sample(m, "hostlink_connection_closes_total", code="1000"), 1)
        self.assertEqual(sample(m, "hostlink_connection_closes_total", code="none"), 1)
        self.assertEqual(sample(m, "hostlink_handshake_refusals_total", status="401"), 1)

    def test_hostile_label_values_stay_bounded(self) -> None:
        for i in range(50):
            self.source.emit("message_in", type=f"evil.{i}")
            self.source.emit("closed", code=70000 + i)
            self.source.emit("refused", status=1000 + i)
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_messages_in_total", type="other"), 50)
        self.assertEqual(sample(m, "hostlink_connection_closes_total", code="other"), 50)
        self.assertEqual(sample(m, "hostlink_handshake_refusals_total", status="other"), 50)
        exposition = m.exposition().decode()
        self.assertNotIn("evil", exposition)

    def test_gauges_read_state_at_scrape_time(self) -> None:
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_session_active"), 0)
        self.assertEqual(sample(m, "hostlink_reconnect_delay_seconds"), 0)
        self.source.state.update(active=True, current_delay=4.5)
        self.assertEqual(sample(m, "hostlink_session_active"), 1)
        self.assertEqual(sample(m, "hostlink_reconnect_delay_seconds"), 4.5)

    def test_timestamps_are_wall_clock_unix_time_of_the_events(self) -> None:
        """Issue 9 item 9: timestamps, not an unbounded "seconds since"."""
        m = self.metrics
        names = ("hostlink_last_ack_timestamp_seconds", "hostlink_last_pong_timestamp_seconds",
                 "hostlink_session_start_timestamp_seconds")
        for name in names:
            self.assertTrue(math.isnan(sample(m, name) or 0.0), name)
        self.source.emit("message_in", type="agent.hello_ack", message_id="a")
        self.source.emit("active", message_id="h")
        self.assertEqual(sample(m, "hostlink_last_ack_timestamp_seconds"), WALL)
        self.assertEqual(sample(m, "hostlink_session_start_timestamp_seconds"), WALL)
        # A healthy session: pongs every 30 s, no further ack (phase 1).
        for minute in range(1, 11):
            self.wall = WALL + 30 * minute
            self.clock.advance(30)
            self.source.emit("pong", sequence=minute)
        self.assertEqual(sample(m, "hostlink_last_pong_timestamp_seconds"), WALL + 300)
        # Nothing grows by itself between events.
        self.wall += 3600
        self.clock.advance(3600)
        self.assertEqual(sample(m, "hostlink_last_pong_timestamp_seconds"), WALL + 300)
        self.assertEqual(sample(m, "hostlink_last_ack_timestamp_seconds"), WALL)
        self.assertEqual(sample(m, "hostlink_session_start_timestamp_seconds"), WALL)
        # Other messages are not acks; an ack later is.
        self.source.emit("message_in", type="task.deliver", message_id="t")
        self.assertEqual(sample(m, "hostlink_last_ack_timestamp_seconds"), WALL)
        self.source.emit("message_in", type="ack", message_id="k")
        self.assertEqual(sample(m, "hostlink_last_ack_timestamp_seconds"), self.wall)
        # The session ends: no session start; the last pong and ack stay.
        self.source.emit("inactive", reason="closed")
        self.assertTrue(math.isnan(sample(m, "hostlink_session_start_timestamp_seconds") or 0.0))
        self.source.emit("active", message_id="h2")
        self.source.emit("closed", code=1006, reason="lost", clean=False)
        self.assertTrue(math.isnan(sample(m, "hostlink_session_start_timestamp_seconds") or 0.0))
        self.assertEqual(sample(m, "hostlink_last_pong_timestamp_seconds"), WALL + 300)
        exposition = m.exposition().decode()
        self.assertNotIn("seconds_since", exposition)

    def test_no_created_series_and_nothing_global_changed(self) -> None:
        """The counters' _created samples are left out of our exposition only."""
        from prometheus_client import CollectorRegistry, Counter, generate_latest

        self.source.emit("attempt", attempt=1, url="x")
        self.source.emit("closed", code=1000, reason="bye", clean=True)
        exposition = self.metrics.exposition().decode()
        self.assertNotIn("_created", exposition)
        self.assertIn("hostlink_connection_attempts_total 1.0", exposition)
        self.assertIn('hostlink_connection_closes_total{code="1000"} 1.0', exposition)
        # An embedding application's own registry still has its _created series.
        theirs = CollectorRegistry()
        Counter("their_requests", "Requests.", registry=theirs).inc()
        self.assertIn(b"their_requests_created", generate_latest(theirs))
        # And ours still holds them for anyone reading the registry directly.
        self.assertIsNotNone(sample(self.metrics, "hostlink_connection_attempts_created"))

    def test_metrics_endpoint_serves_prometheus_text(self) -> None:
        self.source.emit("attempt", attempt=1, url="x")
        code, body, request = self.get(b"/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"hostlink_connection_attempts_total 1.0", body)
        (ctype,) = request.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(ctype.startswith(b"text/plain"))

    def test_close_unsubscribes(self) -> None:
        self.metrics.close()
        self.source.emit("attempt", attempt=1, url="x")
        self.assertEqual(sample(self.metrics, "hostlink_connection_attempts_total"), 0)

    def test_two_instances_do_not_collide(self) -> None:
        other = ClientMetrics(FakeSource())
        self.source.emit("attempt", attempt=1, url="x")
        self.assertEqual(sample(other, "hostlink_connection_attempts_total"), 0)
        self.assertEqual(sample(self.metrics, "hostlink_connection_attempts_total"), 1)

    def test_make_status_service_parses_the_endpoint(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        service, metrics = make_status_service("tcp:0:interface=127.0.0.1", self.source, reactor)
        service.startService()
        ((port, factory, _, interface),) = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertIsInstance(metrics, ClientMetrics)
        self.successResultOf(service.stopService())


class ExposedInterfaceTests(SynchronousTestCase):
    """Issue 10 item 16: which status endpoints are reachable beyond this host."""

    def test_endpoints(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        cases = {
            "tcp:9920:interface=127.0.0.1": None,
            "tcp:9920:interface=127.1.2.3": None,
            "tcp6:9920:interface=\\:\\:1": None,
            "tcp:9920:interface=localhost": None,
            "unix:/run/hostlink/status.sock": None,
            "tcp:9920": "all interfaces",
            "tcp:9920:interface=0.0.0.0": "all interfaces",
            "tcp6:9920": "all interfaces",
            "tcp:9920:interface=192.0.2.7": "192.0.2.7",
            "tcp6:9920:interface=2001\\:db8\\:\\:1": "2001:db8::1",
        }
        for description, expected in cases.items():
            with self.subTest(description=description):
                endpoint = serverFromString(reactor, description)
                self.assertEqual(exposed_interface(endpoint), expected)
        self.assertIsNone(exposed_interface(object()))
