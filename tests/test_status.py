"""The local status endpoint: /healthz, /status, /metrics."""

from __future__ import annotations

import json
import math
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from hostlink_tw.client import ClientEvent
from hostlink_tw.status import ClientMetrics, StatusResource, make_status_service


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
        self.metrics = ClientMetrics(self.source, self.clock)
        self.root = StatusResource(self.source, self.metrics)

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
        self.source.state["connected_since"] = 990.0
        code, body, request = self.get(b"/status")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), self.source.snapshot())
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])

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
        self.assertTrue(math.isnan(sample(m, "hostlink_seconds_since_last_ack") or 0.0))
        self.assertEqual(sample(m, "hostlink_reconnect_delay_seconds"), 0)
        self.source.state.update(active=True, last_ack_at=995.0, current_delay=4.5)
        self.assertEqual(sample(m, "hostlink_session_active"), 1)
        self.assertEqual(sample(m, "hostlink_seconds_since_last_ack"), 5.0)
        self.assertEqual(sample(m, "hostlink_reconnect_delay_seconds"), 4.5)

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
        other = ClientMetrics(FakeSource(), self.clock)
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
