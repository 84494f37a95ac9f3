"""The status page's start line says where it is (issue 9 item 21)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from hostlink_tw.status import make_status_service


class _Source:
    def snapshot(self) -> dict[str, Any]:
        return {"active": False}

    def add_observer(self, observer: Callable[[Any], None]) -> Callable[[], None]:
        return lambda: None


class StartLineTests(TestCase):
    @inlineCallbacks
    def test_status_page_on_its_url(self) -> Any:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service, metrics = make_status_service("tcp:0:interface=127.0.0.1", _Source(), reactor)
        self.addCleanup(metrics.close)
        service.startService()  # a TCP listen happens at once
        stopped = service.stopService()
        yield stopped
        lines = [formatEvent(e) for e in events]
        urls = [e["url"] for e in events if e.get("log_namespace") == "hostlink_tw.status"]
        self.assertEqual(len(urls), 1, lines)
        self.assertRegex(urls[0], r"^http://127\.0\.0\.1:[1-9][0-9]*/$")
        self.assertIn(f"status page on {urls[0]}", lines)
        self.assertIn(f"(TCP Port {urls[0].rsplit(':', 1)[1].strip('/')} Closed)", lines)
        for line in lines:
            self.assertNotIn("Site", line)  # neither "Site starting on" nor "Starting factory"


class BusyPortTests(TestCase):
    """Issue 9 item 6: a busy status port is one error line, not an Unhandled Error."""

    @inlineCallbacks
    def test_busy_port_is_one_line_and_the_agent_goes_on(self) -> Any:
        import socket

        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service, metrics = make_status_service(
            f"tcp:{port}:interface=127.0.0.1", _Source(), reactor
        )
        self.addCleanup(metrics.close)
        service.privilegedStartService()  # what twistd calls: it must not raise
        service.startService()
        yield service.stopService()
        errors = [formatEvent(e) for e in events if e["log_level"].name in ("error", "critical")]
        self.assertEqual(
            errors,
            [
                f"status page not started: port {port} is already in use by another process: "
                "stop that process, or choose another port with "
                "HOSTLINK_WS_STATUS_LISTEN (--status-listen)"
            ],
        )
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])
        self.assertEqual(self.flushLoggedErrors(), [])


class ListenFailureTests(TestCase):
    """Any failure to listen is one line with a hint, not only a busy port."""

    @inlineCallbacks
    def test_port_out_of_range(self) -> Any:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service, metrics = make_status_service("tcp:99999", _Source(), reactor)
        self.addCleanup(metrics.close)
        service.privilegedStartService()
        service.startService()
        yield service.stopService()
        errors = [formatEvent(e) for e in events if e["log_level"].name in ("error", "critical")]
        self.assertEqual(
            errors,
            [
                "status page not started: port out of range (ports are 1-65535): choose "
                "another port with HOSTLINK_WS_STATUS_LISTEN (--status-listen)"
            ],
        )
        self.assertEqual(self.flushLoggedErrors(), [])
