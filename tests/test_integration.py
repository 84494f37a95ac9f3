"""
End to end over loopback: ``twistd -n hostlink`` against the reference
control plane, SIGTERM, and the status endpoint of a running service.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from hostlink_tw.config import Settings
from hostlink_tw.controlplane import start_control_plane
from hostlink_tw.identity import AgentState, generate_private_key, write_agent_state
from hostlink_tw.service import HostlinkService

from .process_support import Collect, free_port, twistd_argv

WAIT = 30.0


class IntegrationTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.state = os.path.join(self.dir, "state")
        self.key_path = os.path.join(self.state, "agent.key")
        self.key = generate_private_key(self.key_path)
        write_agent_state(self.state, AgentState(agent_id="agent-it"))

    @inlineCallbacks
    def control_plane(self) -> Any:
        cp = yield start_control_plane({"agent-it": self.key.public_key()})
        self.addCleanup(cp.stop)
        return cp

    @inlineCallbacks
    def test_twistd_sigterm_sends_close_frame_before_exit(self) -> Any:
        cp = yield self.control_plane()
        proto = Collect()
        env = {
            **os.environ,
            "HOSTLINK_WS_ENABLED": "true",
            "HOSTLINK_STATE_PATH": self.state,
            "HOSTLINK_PRIVATE_KEY_PATH": self.key_path,
        }
        args = twistd_argv("hostlink", "--url", cp.ws_url)
        process = reactor.spawnProcess(proto, sys.executable, args, env=env, path=self.dir)

        def reap() -> Deferred[Any]:
            # Only if an assertion failed before the process ended.
            if process.pid is not None:
                process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(reap)
        session = yield cp.wait_active("agent-it", timeout=WAIT)
        closed = session.when_closed()
        process.signalProcess("TERM")
        code = yield closed
        self.assertIn(code, (1000, 1001), proto.output.decode(errors="replace"))
        reason = yield proto.ended
        # twistd re-raises SIGTERM after its clean shutdown (Twisted's
        # convention); a status of 0 would be fine too.
        if isinstance(reason, ProcessTerminated):
            self.assertEqual(reason.signal, signal.SIGTERM, proto.output)
        else:
            self.assertIsInstance(reason, ProcessDone)
        log = proto.output.decode(errors="replace")
        self.assertIn("agent-it", log)
        self.assertNotIn("Traceback", log)

    @inlineCallbacks
    def test_status_endpoint_active_then_inactive(self) -> Any:
        cp = yield self.control_plane()
        port = free_port()
        settings = Settings(
            enabled=True,
            ws_url=cp.ws_url,
            state_path=self.state,
            private_key_path=self.key_path,
            reconnect_min=5.0,
            reconnect_max=10.0,
            status_listen=f"tcp:{port}:interface=127.0.0.1",
        )
        service = HostlinkService(settings, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        yield cp.wait_active("agent-it", timeout=WAIT)
        agent = Agent(reactor)
        base = f"http://127.0.0.1:{port}".encode()

        response = yield agent.request(b"GET", base + b"/healthz")
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"active\n"))
        response = yield agent.request(b"GET", base + b"/metrics")
        metrics = yield readBody(response)
        self.assertIn(b"hostlink_session_active 1.0", metrics)
        self.assertIn(b'hostlink_messages_in_total{type="agent.hello_ack"} 1.0', metrics)
        # Timestamps are Unix time on the real reactor (issue 9 item 9).
        started = re.search(rb"^hostlink_session_start_timestamp_seconds (\S+)$", metrics, re.M)
        assert started is not None, metrics
        self.assertLess(abs(float(started.group(1)) - time.time()), 60)

        yield cp.stop()
        response = yield agent.request(b"GET", base + b"/healthz")
        body = yield readBody(response)
        self.assertEqual((response.code, body), (503, b"inactive\n"))
        response = yield agent.request(b"GET", base + b"/status")
        state = json.loads((yield readBody(response)))
        self.assertFalse(state["active"])
        self.assertEqual(state["agent_id"], "agent-it")
        self.assertRegex(state["next_retry_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    @inlineCallbacks
    def test_identity_written_after_start_then_session_starts(self) -> Any:
        """Registration finishing after boot: the service connects by itself."""
        cp = yield self.control_plane()
        late = os.path.join(self.dir, "late")
        settings = Settings(
            enabled=True,
            ws_url=cp.ws_url,
            state_path=late,
            private_key_path=os.path.join(late, "agent.key"),
            reconnect_min=0.1,
            reconnect_max=0.2,
        )
        service = HostlinkService(settings, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertIsNone(service.client)
        self.assertEqual(service.snapshot()["state"], "waiting_for_identity")
        # What registration does: the key, then agent.json.
        os.makedirs(late, mode=0o700)
        shutil.copy2(self.key_path, settings.private_key_path)
        write_agent_state(late, AgentState(agent_id="agent-it"))
        session = yield cp.wait_active("agent-it", timeout=WAIT)
        self.assertTrue(session.active)
        self.assertIsNotNone(service.client)

