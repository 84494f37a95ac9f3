"""
Issue 9 item 2 and issue 10 items 3, 13, 14 on memory transports: whatever
raises while an attempt is set up ends that attempt with one log line and a
scheduled retry; peer text is escaped; URLs are redacted; pongs must echo
our random ping payloads.
"""

from __future__ import annotations

import gc
import json
import random
import weakref
from typing import Any

from twisted.internet.protocol import ReconnectingClientFactory
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent import connection as connection_module
from hostlink_tw.agent.attempt import MAX_MESSAGE_SECONDS
from hostlink_tw.agent.connection import MAX_FRAMES_PER_MESSAGE, MAX_UNSENT_BYTES
from hostlink_tw.agent.factory import rcf_scales_before_waiting
from hostlink_tw.agent.keepalive import PING_PAYLOAD_BYTES
from hostlink_tw.client import ClientState
from hostlink_tw.protocol import ERROR, error_payload, make_envelope
from tests.test_client_support import AGENT, Harness, harness, server_frame


def _no_tracebacks(test: SynchronousTestCase, h: Harness) -> None:
    """The one line per failure is ours: no logged failure (traceback) anywhere."""
    test.assertEqual([e for e in h.logged if e.get("log_failure") is not None], [])
    test.assertEqual(test.flushLoggedErrors(), [])


class SetupExceptionTests(SynchronousTestCase):
    """An exception anywhere in an attempt ends it with one line and a retry."""

    def _retried(self, h: Harness, needle: str) -> None:
        self.assertEqual(h.client.state, ClientState.WAITING)
        self.assertEqual(len(h.delays()), 1)
        self.assertIn(needle, h.client.last_failure or "")
        errors = [m for m in h.messages("error") if needle in m]
        self.assertEqual(len(errors), 1, h.messages())
        self.assertEqual(len(h.of_kind("closed")), 1)
        _no_tracebacks(self, h)
        # The retry is a real attempt: the reconnect loop is not wedged.
        h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(len(h.of_kind("attempt")), 2)

    def test_start_tls_raises(self) -> None:
        """What MemoryDenyWriteExecute did: the TLS context raises inside startTLS."""
        h = harness(self, ws_url="wss://cp.example.test/api/v1/agents/ws")
        h.client.start()
        conn = h.conn(made=False)

        def start_tls(options: Any) -> None:
            raise MemoryError("Cannot allocate write+execute memory for ffi.callback()")

        conn.transport.startTLS = start_tls  # type: ignore[method-assign]
        conn.open()
        self.assertTrue(conn.transport.aborted)
        self.assertNotIn(b"GET", conn.written())  # nothing signed went out
        # The handshake deadline is harmless (it used to crash here).
        conn.finish()
        self._retried(h, "MemoryError")
        h.reactor.advance(h.settings.handshake_timeout * 2)
        _no_tracebacks(self, h)

    def test_context_factory_raises(self) -> None:
        """Building the TLS options raises something unexpected."""
        h = harness(self, ws_url="wss://cp.example.test/api/v1/agents/ws")

        def broken(host: str, ca_file: str | None) -> Any:
            raise MemoryError("no memory for the context")

        from hostlink_tw.agent import client as client_module

        self.patch(client_module, "client_tls_options", broken)
        h.client.start()
        self.assertEqual(h.attempts_made, 0)  # stopped before it dialled
        self._retried(h, "MemoryError")

    def test_on_connecting_raises(self) -> None:
        """The per-attempt signing hook raises something that is not a SigningError."""
        h = harness(self)

        def broken() -> dict[str, str]:
            raise KeyError("signing bug")

        h.signer.sign_headers = broken  # type: ignore[method-assign]
        h.client.start()
        c = h.conn()
        self.assertNotIn(b"GET", c.written())
        c.finish()
        self._retried(h, "signing bug")

    def test_proxy_step_raises(self) -> None:
        h = harness(self, environ={"HTTP_PROXY": "http://proxy.corp:3128"},
                    ws_url="ws://cp.example.test:8080/api/v1/agents/ws")

        def broken() -> str | None:
            raise ValueError("bad proxy credentials encoding")

        h.client.proxy_authorization = broken  # type: ignore[method-assign]
        h.client.start()
        c = h.conn()
        self.assertTrue(c.transport.aborted)
        c.finish()
        self._retried(h, "bad proxy credentials encoding")

    def test_frame_handler_raises(self) -> None:
        """A bug while handling a frame ends only that connection."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()

        def broken(envelope: Any) -> None:
            raise RuntimeError("handler bug")

        h.client.session.handlers["ack"] = broken  # type: ignore[union-attr]
        c.send_text(json.dumps({
            "protocol_version": 1, "message_id": "m2", "type": "ack", "agent_id": AGENT,
            "sent_at": "2026-01-01T00:00:00Z",
            "payload": {"acked_message_id": "x", "acked_type": "agent.hello"},
        }))
        self.assertEqual([cf[0] for cf in c.close_frames()], [1007])
        c.send_close(1007)
        c.lose()
        self.assertIn("handler bug", h.client.last_failure or "")
        self.assertEqual(h.client.state, ClientState.WAITING)


class PeerTextTests(SynchronousTestCase):
    """Issue 10 item 13: control-plane text is escaped in logs and /status."""

    def test_close_reason_is_escaped(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.send_close(4000, b"bye\x1b[2J\rforged line")
        c.lose()
        failure = h.client.last_failure or ""
        self.assertIn("\\x1b[2J\\rforged line", failure)
        for text in h.messages() + [failure, json.dumps(h.client.snapshot())]:
            self.assertNotIn("\x1b", text)
            self.assertNotIn("\r", text)

    def test_error_code_is_escaped(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        error = make_envelope(ERROR, AGENT, error_payload("bad\x1b]0;owned\x07", "m", False))
        c.send_text(error.to_json())
        self.assertTrue(any("bad\\x1b]0;owned\\x07" in m for m in h.messages("warn")))
        for text in h.messages():
            self.assertNotIn("\x1b", text)
            self.assertNotIn("\x07", text)

    def test_foreign_hello_ack_id_is_escaped(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.ack_hello(acked="other\r\nINFO fake line")
        (line,) = [m for m in h.messages("warn") if "ignoring agent.hello_ack" in m]
        self.assertIn("other\\r\\nINFO fake line", line)
        self.assertNotIn("\r", line)


class RedactionTests(SynchronousTestCase):
    """Issue 10 item 14: no secret of the URL reaches a log line or /status."""

    def test_query_and_fragment_redacted(self) -> None:
        h = harness(self, ws_url="ws://user:hunter2@127.0.0.1:8080/api/v1/agents/ws?token=s3cret")
        h.client.start()
        h.conn().activate()
        shown = h.client.snapshot()["url"]
        self.assertIn("token=REDACTED", shown)
        for text in h.messages() + [json.dumps(h.client.snapshot())]:
            for secret in ("hunter2", "s3cret"):
                self.assertNotIn(secret, text)


class PingPayloadTests(SynchronousTestCase):
    """Issue 10 item 3: ping payloads are random; a forged pong keeps nothing alive."""

    def test_payloads_are_random_and_forged_pongs_ignored(self) -> None:
        h = harness(self, pong_timeout=45.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(h.settings.ping_interval)
        h.reactor.advance(h.settings.ping_interval)
        first, second = c.pings()
        self.assertNotEqual(first, second)
        self.assertEqual(len(first), PING_PAYLOAD_BYTES)
        # A peer that guesses counters (the old payloads) proves nothing.
        import struct

        for n in range(1, 5):
            c.send_pong(struct.pack("!Q", n))
        self.assertEqual(h.of_kind("pong"), [])
        h.reactor.advance(h.settings.pong_timeout)
        self.assertFalse(h.client.is_active)
        self.assertTrue(any("no pong" in m for m in h.messages("warn")))


class OutgoingBoundTests(SynchronousTestCase):
    """Issue 10 item 3: a peer that never reads cannot grow the agent's memory."""

    def test_ping_flood_while_the_peer_does_not_read(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        self.assertIs(c.transport.producer, c.proto)  # the transport tells us when it is full
        c.proto.pauseProducing()  # as the transport does past its buffer size
        before = len(c.written())
        ping = server_frame(9, b"x" * 125)
        for _ in range(MAX_UNSENT_BYTES // 127 + 1000):
            if c.lost or c.transport.aborted:
                break
            c.receive(ping)
        self.assertTrue(c.transport.aborted)
        queued = len(c.written()) - before
        self.assertLessEqual(queued, MAX_UNSENT_BYTES)
        (line,) = [m for m in h.messages("warn") if "stopped reading" in m]
        self.assertIn("bytes queued", line)
        c.finish()
        self.assertIn("stopped reading", h.client.last_failure or "")
        self.assertEqual(h.client.state, ClientState.WAITING)

    def test_resume_forgets_the_count(self) -> None:
        limit = 64 * 1024  # a small bound keeps the test fast; the logic is the same
        self.patch(connection_module, "MAX_UNSENT_BYTES", limit)
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        ping = server_frame(9, b"x" * 125)
        for _ in range(3):
            c.proto.pauseProducing()
            for _ in range(limit // 200):  # each pong is 131 bytes on the wire
                c.receive(ping)
            c.proto.resumeProducing()  # the peer read it all
        self.assertFalse(c.transport.aborted)
        self.assertTrue(h.client.is_active)

    def test_dead_connection_is_freed_without_the_cycle_collector(self) -> None:
        """No reference cycle keeps a lost connection's protocol or transport alive."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        proto_ref, transport_ref = weakref.ref(c.proto), weakref.ref(c.transport)
        gc.disable()
        self.addCleanup(gc.enable)
        c.send_close(1000)
        c.lose()
        del c
        h.reactor.advance(1)  # the next attempt starts; nothing of the old one is kept
        self.assertIsNone(proto_ref())
        self.assertIsNone(transport_ref())


class FragmentBoundTests(SynchronousTestCase):
    """Issue 10 item 4: endless empty fragments end the connection."""

    def test_too_many_fragments(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.receive(server_frame(1, b"{", fin=False))
        for _ in range(MAX_FRAMES_PER_MESSAGE + 50):
            c.receive(server_frame(0, b"", fin=False))
        self.assertEqual([cf[0] for cf in c.close_frames()], [1009])
        self.assertFalse(h.client.is_active)
        self.assertLessEqual(len(c.proto.message_data or []), MAX_FRAMES_PER_MESSAGE)
        (line,) = [m for m in h.messages("warn") if "too fragmented" in m]
        self.assertIn(str(MAX_FRAMES_PER_MESSAGE), line)

    def test_fragments_at_the_bound_are_fine(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        text = json.dumps({
            "protocol_version": 1, "message_id": "m2", "type": "ack", "agent_id": AGENT,
            "sent_at": "2026-01-01T00:00:00Z",
            "payload": {"acked_message_id": "x", "acked_type": "agent.hello"},
        }).encode()
        c.receive(server_frame(1, text[:1], fin=False))
        for _ in range(MAX_FRAMES_PER_MESSAGE - 2):
            c.receive(server_frame(0, b"", fin=False))
        c.receive(server_frame(0, text[1:], fin=True))
        self.assertEqual(c.close_frames(), [])
        self.assertEqual(h.client.last_ack.message_id, "m2")  # type: ignore[union-attr]

    def test_message_never_completed(self) -> None:
        h = harness(self, pong_timeout=100.0, ping_interval=300.0)
        h.client.start()
        c = h.active_conn()
        c.receive(server_frame(1, b"{", fin=False))
        h.reactor.advance(MAX_MESSAGE_SECONDS - 1)
        self.assertTrue(h.client.is_active)
        h.reactor.advance(1)
        self.assertTrue(c.transport.aborted)
        self.assertTrue(any("not complete within" in m for m in h.messages("warn")))

    def test_completed_message_cancels_the_deadline(self) -> None:
        h = harness(self, pong_timeout=100.0, ping_interval=300.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(MAX_MESSAGE_SECONDS * 3)
        self.assertTrue(h.client.is_active)
        self.assertFalse(c.transport.aborted)


class RCFArithmeticTests(SynchronousTestCase):
    """
    RCF's first-delay arithmetic changed in Twisted 26.4 (it used to scale
    ``delay`` by ``factor`` before scheduling).  The factory hands RCF a
    value that makes the scheduled wait exactly the backoff's on both sides.
    """

    class _OldRCF(ReconnectingClientFactory):
        """Twisted < 26.4's retry(): scale, jitter, then schedule."""

        def retry(self, connector: Any = None) -> None:
            if not self.continueTrying:
                return
            connector = connector if connector is not None else self.connector
            self.retries += 1
            self.delay = min(self.delay * self.factor, self.maxDelay)
            if self.jitter:
                self.delay = random.normalvariate(self.delay, self.delay * self.jitter)
            self._callID = self.clock.callLater(self.delay, connector.connect)

    class _NewRCF(ReconnectingClientFactory):
        """Twisted >= 26.4's retry(): jitter, schedule, then scale for next time."""

        def retry(self, connector: Any = None) -> None:
            if not self.continueTrying:
                return
            connector = connector if connector is not None else self.connector
            self.retries += 1
            if self.jitter:
                self.delay = random.normalvariate(self.delay, self.delay * self.jitter)
            self._callID = self.clock.callLater(self.delay, connector.connect)
            self.delay = min(self.delay * self.factor, self.maxDelay)

    def test_probe_tells_the_two_apart(self) -> None:
        self.assertFalse(rcf_scales_before_waiting(self._NewRCF))
        self.assertTrue(rcf_scales_before_waiting(self._OldRCF))
        # The installed Twisted: the change came with 26.4.
        from twisted import version

        self.assertEqual(
            rcf_scales_before_waiting(ReconnectingClientFactory),
            (version.major, version.minor) < (26, 4),
        )

    def test_handed_delay_gives_the_exact_wait_on_old_twisted(self) -> None:
        from twisted.internet.task import Clock

        for wait in (0.1, 1.0, 3.7, 30.0, 37.5, 3600.0):
            rcf = self._OldRCF()
            rcf.clock = Clock()
            rcf.factor, rcf.jitter, rcf.maxDelay = 2.0, 0, 3600 * 1.25
            rcf.delay = wait / rcf.factor  # what HostlinkClientFactory.retry hands it
            rcf.retry(_Connector())
            (call,) = rcf.clock.getDelayedCalls()
            self.assertEqual(call.getTime(), wait)

    def test_current_twisted_schedules_the_backoff_wait(self) -> None:
        h = harness(self, reconnect_min=0.5, reconnect_max=8.0)
        h.client.start()
        waits = []
        for _ in range(7):
            h.fail_connect()
            (call,) = [c for c in h.pending_calls() if c.func.__name__ == "reconnector"]
            waits.append(call.getTime() - h.reactor.seconds())
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(waits, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(waits, h.delays())


class _Connector:
    def connect(self) -> None:
        """Never run: the tests look at the scheduled call only."""
