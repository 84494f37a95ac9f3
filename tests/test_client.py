"""
Unit tests for hostlink_tw.client on a memory reactor and a Clock.

The server is played by hand (tests/test_client_support.py), so every
timing rule and every interleaving is deterministic.
"""

from __future__ import annotations

import json
import operator
import random
from typing import Any

from twisted.internet.error import ConnectionLost, UserError
from twisted.internet.ssl import ClientContextFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.client import (
    CLOSE_TIMEOUT,
    MAX_RESPONSE_HEAD_BYTES,
    ClientEvent,
    ClientState,
    HostlinkClient,
    redact_url,
)
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_DELIVER,
    ack_payload,
    error_payload,
    make_envelope,
)
from hostlink_tw.signing import verify_signature

from .test_client_support import AGENT, Conn, Harness, harness, key, server_frame


def _ack(acked: str = "msg_1", acked_type: str = AGENT_HELLO) -> str:
    return make_envelope(ACK, AGENT, ack_payload(acked, acked_type), now=1_800_000_000).to_json()


class HelloAndActivationTests(SynchronousTestCase):
    """Point 1: hello on open, active only on the matching hello_ack."""

    def test_connects_to_url_target(self) -> None:
        h = harness(self)
        h.client.start()
        self.assertEqual(h.target(), ("127.0.0.1", 8080))
        self.assertEqual(h.kinds(), ["attempt"])
        self.assertEqual(h.client.state, ClientState.CONNECTING)

    def test_upgrade_request_is_signed_and_targets_the_url(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn()
        line, headers = c.request()
        self.assertEqual(line, "GET /api/v1/agents/ws HTTP/1.1")
        self.assertEqual(headers["host"], "127.0.0.1:8080")
        self.assertEqual(headers["x-agent-id"], AGENT)
        self.assertEqual(headers["x-timestamp"], "1800000000")
        self.assertTrue(
            verify_signature(
                key().public_key(),
                AGENT,
                headers["x-timestamp"],
                headers["x-nonce"],
                headers["x-signature"],
            )
        )
        self.assertTrue(headers["user-agent"].startswith("hostlink_tw/"))

    def test_ipv6_literal_host_header(self) -> None:
        h = harness(self, ws_url="ws://[::1]:8080/api/v1/agents/ws")
        h.client.start()
        self.assertEqual(h.target(), ("::1", 8080))
        self.assertEqual(h.conn().request()[1]["host"], "[::1]:8080")

    def test_each_attempt_is_signed_afresh(self) -> None:
        h = harness(self)
        h.client.start()
        first = h.conn()
        first.lose()
        h.reactor.advance(10)
        second = h.conn()
        n1, n2 = first.request()[1]["x-nonce"], second.request()[1]["x-nonce"]
        s1, s2 = first.request()[1]["x-signature"], second.request()[1]["x-signature"]
        self.assertNotEqual(n1, n2)
        self.assertNotEqual(s1, s2)

    def test_signing_failure_fails_the_attempt_and_backs_off(self) -> None:
        from hostlink_tw.signing import SigningError

        h = harness(self)

        def broken() -> dict[str, str]:
            raise SigningError("the clock returned nan")

        h.signer.sign_headers = broken  # type: ignore[method-assign]
        h.client.start()
        c = h.conn()
        self.assertNotIn(b"GET", c.written())
        c.finish()
        self.assertIn("cannot sign the upgrade request", h.client.last_failure or "")
        self.assertTrue(any("the clock returned nan" in m for m in h.messages("error")))
        self.assertEqual(h.delays(), [1])

    def test_hello_sent_on_open(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        hello = c.hello()
        self.assertEqual(hello["type"], AGENT_HELLO)
        self.assertEqual(hello["payload"], {})
        self.assertEqual(hello["agent_id"], AGENT)
        self.assertEqual(hello["protocol_version"], 1)
        self.assertTrue(hello["message_id"].startswith("msg_"))
        self.assertEqual(h.client.state, ClientState.AWAITING_ACK)
        self.assertFalse(h.client.is_active)
        self.assertEqual(h.kinds(), ["attempt", "connected", "message_out"])
        self.assertEqual(h.of_kind("message_out")[0].fields["type"], AGENT_HELLO)

    def test_active_after_matching_hello_ack(self) -> None:
        h = harness(self)
        waiting = h.client.when_active()
        h.client.start()
        c = h.conn().accept()
        self.assertNoResult(waiting)
        h.reactor.advance(3)
        c.ack_hello()
        self.assertTrue(h.client.is_active)
        self.assertEqual(h.client.state, ClientState.ACTIVE)
        self.assertIsNone(self.successResultOf(waiting))
        self.assertIsNone(self.successResultOf(h.client.when_active()))
        self.assertEqual(h.client.attempts, 0)
        assert h.client.last_ack is not None
        self.assertEqual(h.client.last_ack.type, AGENT_HELLO_ACK)
        self.assertEqual(h.client.last_ack_at, 3)
        self.assertEqual(h.of_kind("active")[0].fields["message_id"], c.hello()["message_id"])
        self.assertEqual(h.kinds()[-2:], ["message_in", "active"])

    def test_hello_ack_for_another_id_does_not_activate(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.ack_hello(acked="msg_someone_else")
        self.assertFalse(h.client.is_active)
        self.assertEqual(h.client.state, ClientState.AWAITING_ACK)
        assert h.client.last_ack is not None
        self.assertEqual(h.client.last_ack.payload["acked_message_id"], "msg_someone_else")
        self.assertNotIn("active", h.kinds())
        self.assertTrue(any("msg_someone_else" in m for m in h.messages("warn")))
        # The right one still activates.
        c.ack_hello()
        self.assertTrue(h.client.is_active)

    def test_ack_is_recorded_without_side_effects(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        before = c.written()
        h.reactor.advance(5)
        c.send_text(_ack("msg_42", "task.final"))
        assert h.client.last_ack is not None
        self.assertEqual(h.client.last_ack.type, ACK)
        self.assertEqual(h.client.last_ack.payload["acked_message_id"], "msg_42")
        self.assertEqual(h.client.last_ack_at, 5)
        self.assertTrue(h.client.is_active)
        self.assertEqual(c.written(), before)

    def test_ack_before_active_does_not_activate(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.send_text(_ack(c.hello()["message_id"]))
        self.assertFalse(h.client.is_active)
        self.assertIsNotNone(h.client.last_ack)

    def test_second_hello_ack_is_harmless(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.ack_hello()
        self.assertTrue(h.client.is_active)
        self.assertEqual(len(h.of_kind("active")), 1)

    def test_when_active_can_be_cancelled(self) -> None:
        h = harness(self)
        d = h.client.when_active()
        d.cancel()
        self.failureResultOf(d)
        h.client.start()
        h.active_conn()  # nothing left to fire, nothing raises

    def test_hello_ack_sent_at_before_open_is_fine(self) -> None:
        """sent_at is only checked for its format, not against our clock."""
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        env = make_envelope(
            AGENT_HELLO_ACK, AGENT, ack_payload(c.hello()["message_id"], AGENT_HELLO), now=0
        )
        c.send_text(env.to_json())
        self.assertTrue(h.client.is_active)


def _bad_inputs() -> list[tuple[str, Any, int]]:
    """(name, what the server sends, expected close code)."""
    hello_ack = json.loads(
        make_envelope(AGENT_HELLO_ACK, AGENT, ack_payload("x", AGENT_HELLO), now=0).to_json()
    )

    def variant(**changes: Any) -> str:
        doc = dict(hello_ack)
        for k, v in changes.items():
            if v is None:
                doc.pop(k, None)
            else:
                doc[k] = v
        return json.dumps(doc)

    return [
        ("bad json", "{not json", 1007),
        ("non-object", "[1, 2, 3]", 1007),
        ("string", '"hello"', 1007),
        ("wrong agent", variant(agent_id="agent-other"), 1007),
        ("wrong version", variant(protocol_version=2), 1007),
        ("missing message_id", variant(message_id=None), 1007),
        ("missing payload", variant(payload=None), 1007),
        ("missing sent_at", variant(sent_at=None), 1007),
        ("unknown type", variant(type="agent.bogus"), 1007),
        ("binary", b"\x00\x01binary", 1003),
        (
            "error envelope",
            make_envelope(
                ERROR, AGENT, error_payload("bad_thing", "you did a bad thing", False), now=0
            ).to_json(),
            1000,
        ),
        (
            "task.deliver",
            make_envelope(
                TASK_DELIVER,
                AGENT,
                {"command": "x"},
                now=0,
                task_id="t1",
                execution_attempt_id="a1",
            ).to_json(),
            1008,
        ),
        (
            "agent.hello from server",
            make_envelope(AGENT_HELLO, AGENT, {}, now=0).to_json(),
            1008,
        ),
        ("bad ack payload", variant(payload={"acked_message_id": 5}), 1007),
    ]


class BadInputTests(SynchronousTestCase):
    """Point 2: bad or unexpected input → one log line, close, reconnect."""

    def _check(self, active: bool, name: str, frame: Any, code: int) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        if active:
            c.ack_hello()
        warnings_before = len(h.messages("warn"))
        if isinstance(frame, bytes):
            c.send_binary(frame)
        else:
            c.send_text(frame)
        warnings = h.messages("warn")[warnings_before:]
        self.assertEqual(len(warnings), 1, (name, warnings))
        self.assertIn("closing connection", warnings[0])
        self.assertIn("reason=", warnings[0])
        self.assertIn("type=", warnings[0])
        self.assertEqual([cf[0] for cf in c.close_frames()], [code], name)
        self.assertFalse(h.client.is_active, name)
        self.assertEqual(h.client.state, ClientState.CLOSING, name)
        if active:
            self.assertEqual(
                h.of_kind("inactive")[-1].fields["reason"],
                h.client.last_failure or h.of_kind("inactive")[-1].fields["reason"],
            )
        # The peer answers the close and drops TCP: the client backs off and retries.
        c.send_close(code)
        c.lose()
        self.assertEqual(h.client.state, ClientState.WAITING, name)
        self.assertEqual(h.kinds()[-2:], ["closed", "retry_scheduled"], name)
        self.assertEqual(h.of_kind("closed")[-1].fields["code"], code)
        self.assertIsNotNone(h.client.last_failure)
        h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(h.attempts_made, 2, name)

    def test_each_bad_input_while_awaiting_ack(self) -> None:
        for name, frame, code in _bad_inputs():
            self._check(False, name, frame, code)

    def test_each_bad_input_while_active(self) -> None:
        for name, frame, code in _bad_inputs():
            self._check(True, name, frame, code)

    def test_error_envelope_logged_with_code_and_message(self) -> None:
        """A non-retryable error ends the connection, logged with its code and message."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.send_text(
            make_envelope(ERROR, AGENT, error_payload("quota", "too many", False), now=0).to_json()
        )
        (line,) = [m for m in h.messages("warn") if "closing connection" in m]
        self.assertIn("code=quota", line)
        self.assertIn("too many", line)
        self.assertIn("type=error", line)

    def test_retryable_error_keeps_the_connection(self) -> None:
        """PROTOCOL §7.5: a retryable error is logged and the session stays active."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.send_text(
            make_envelope(ERROR, AGENT, error_payload("quota", "too many", True), now=0).to_json()
        )
        self.assertEqual(h.client.state, ClientState.ACTIVE)
        self.assertEqual([m for m in h.messages("warn") if "closing connection" in m], [])
        (line,) = [m for m in h.messages("warn") if "retryable error" in m]
        self.assertIn("code=quota", line)
        self.assertIn("too many", line)

    def test_retryable_error_before_the_hello_ack_keeps_the_connection(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.send_text(
            make_envelope(ERROR, AGENT, error_payload("busy", "later", True), now=0).to_json()
        )
        self.assertEqual(h.client.state, ClientState.AWAITING_ACK)
        self.assertEqual([m for m in h.messages("warn") if "closing connection" in m], [])

    def test_frame_preview_is_at_most_200_characters(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.send_text("{" + "x" * 3000)
        (event,) = [e for e in h.logged if "closing connection" in e["log_format"]]
        self.assertLessEqual(len(event["frame"]), 200 + 2)  # repr quotes
        self.assertEqual(event["size"], 3001)
        self.assertIn("xxxx", event["frame"])

    def test_frames_after_a_rejection_are_ignored(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.send_text("nope")
        c.send_text("nope again")
        c.ack_hello()
        self.assertEqual(len([m for m in h.messages("warn") if "closing" in m]), 1)
        self.assertFalse(h.client.is_active)

    def test_invalid_utf8_text_frame(self) -> None:
        """Autobahn itself fails the connection (1007); we reconnect."""
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.receive(server_frame(1, b"\xff\xfe"))
        self.assertEqual([cf[0] for cf in c.close_frames()], [1007])
        c.lose()
        self.assertEqual(h.client.state, ClientState.WAITING)

    def test_unexpected_exception_while_handling_is_contained(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()

        def boom(envelope: Any) -> None:
            raise RuntimeError("observer-free bug")

        h.client.ack_received = boom  # type: ignore[method-assign]
        c.ack_hello()
        self.assertEqual([cf[0] for cf in c.close_frames()], [1007])
        c.lose()
        self.assertIn("RuntimeError", h.client.last_failure or "")

    def test_observer_errors_are_logged_not_raised(self) -> None:
        h = harness(self)

        def bad(event: ClientEvent) -> None:
            raise ValueError("observer bug")

        h.client.add_observer(bad)
        h.client.start()
        h.active_conn()
        self.assertTrue(h.client.is_active)
        self.assertTrue(any(e.get("log_failure") for e in h.logged))

    def test_control_frames_from_server(self) -> None:
        """A server ping is answered; an unsolicited pong is ignored."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.receive(server_frame(9, b"hi"))
        c.send_pong(b"unsolicited")
        self.assertIn((10, b"hi"), c.frames())
        self.assertTrue(h.client.is_active)


class BackoffTests(SynchronousTestCase):
    """Point 3: delays like the reference agent; reset only after ACTIVE."""

    def test_first_retry_after_min_then_doubling_capped(self) -> None:
        h = harness(self, reconnect_min=1.0, reconnect_max=20.0)
        h.client.start()
        for _ in range(8):
            h.fail_connect()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(h.delays(), [1, 2, 4, 8, 16, 20, 20, 20])
        self.assertEqual(h.attempts_made, 9)

    def test_retry_happens_exactly_after_the_delay(self) -> None:
        h = harness(self, reconnect_min=1.0)
        h.client.start()
        h.fail_connect()
        h.reactor.advance(0.999)
        self.assertEqual(h.attempts_made, 1)
        h.reactor.advance(0.001)
        self.assertEqual(h.attempts_made, 2)

    def test_go_jitter_uniform_within_a_quarter(self) -> None:
        h = harness(self, rng=random.Random(3), reconnect_min=1.0, reconnect_max=8.0)
        h.client.start()
        for _ in range(40):
            h.fail_connect()
            h.reactor.advance(h.client.current_delay or 0)
        bases = [min(2.0**i, 8.0) for i in range(40)]
        for delay, base in zip(h.delays(), bases, strict=True):
            self.assertGreaterEqual(delay, 0.75 * base)
            self.assertLessEqual(delay, 1.25 * base)
        self.assertGreater(len({round(d, 6) for d in h.delays()[4:]}), 10)
        self.assertLessEqual(max(h.delays()), 10.0)

    def test_full_jitter_option(self) -> None:
        h = harness(
            self,
            rng=random.Random(5),
            reconnect_min=1.0,
            reconnect_max=8.0,
            reconnect_jitter="full",
        )
        h.client.start()
        for _ in range(30):
            h.fail_connect()
            h.reactor.advance(h.client.current_delay or 0)
        bases = [min(2.0**i, 8.0) for i in range(30)]
        for delay, base in zip(h.delays(), bases, strict=True):
            self.assertGreaterEqual(delay, 0.0)
            self.assertLessEqual(delay, base)
        self.assertLess(min(h.delays()[5:]), 6.0)  # not clustered near the top

    def test_tcp_connect_alone_does_not_reset(self) -> None:
        """A server that accepts TCP and hangs up at once does not make us spin."""
        h = harness(self)
        h.client.start()
        for _ in range(5):
            h.conn().lose()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(h.delays(), [1, 2, 4, 8, 16])

    def test_open_without_hello_ack_does_not_reset(self) -> None:
        h = harness(self)
        h.client.start()
        for _ in range(4):
            c = h.conn().accept()
            c.send_close(1000)
            c.lose()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(h.delays(), [1, 2, 4, 8])

    def test_reset_after_active_session(self) -> None:
        h = harness(self)
        h.client.start()
        for _ in range(3):
            h.fail_connect()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(h.client.attempts, 4)
        c = h.active_conn()
        self.assertEqual(h.client.attempts, 0)
        c.send_close(1001)
        c.lose()
        self.assertEqual(h.delays(), [1, 2, 4, 1])
        h.reactor.advance(1)
        h.fail_connect()
        self.assertEqual(h.delays()[-1], 2)

    def test_upgrade_response_not_utf8_is_one_line_and_backs_off(self) -> None:
        """Autobahn raises on a non-UTF-8 head; it must not escape the protocol."""
        h = harness(self)
        h.client.start()
        c = h.conn()
        c.receive(b"HTTP/1.1 101 Switching \xe9\r\n\r\n")
        self.assertTrue(c.transport.aborted)
        c.finish()
        self.assertEqual(self.flushLoggedErrors(), [])
        (line,) = [m for m in h.messages("warn") if "unparsable" in m]
        self.assertIn("UnicodeDecodeError", line)
        self.assertNotIn("\n", line)
        self.assertEqual(h.delays(), [1])
        self.assertIn("upgrade failed: response unparsable", h.client.last_failure or "")

    def test_endless_upgrade_response_head_is_bounded(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn()
        chunk = b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Filler: " + b"a" * 4000 + b"\r\n"
        for _ in range(MAX_RESPONSE_HEAD_BYTES // len(chunk)):
            c.receive(chunk)
            self.assertFalse(c.transport.aborted)
        c.receive(chunk)
        self.assertTrue(c.transport.aborted)
        c.finish()
        self.assertIn("larger than", h.client.last_failure or "")
        self.assertEqual(h.delays(), [1])

    def test_refusals_back_off_and_401_hints(self) -> None:
        h = harness(self)
        h.client.start()
        for status in (401, 403, 503, 500, 401):
            h.conn().refuse(status, "No", b"stale timestamp").finish()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(
            [e.fields["status"] for e in h.of_kind("refused")], [401, 403, 503, 500, 401]
        )
        self.assertEqual(h.delays(), [1, 2, 4, 8, 16])
        hints = [m for m in h.messages("warn") if "HTTP 401" in m]
        self.assertEqual(len(hints), 2)
        self.assertIn("clock", hints[0])
        self.assertIn("registered", hints[0])
        self.assertIn("stale timestamp", hints[0])
        self.assertIn("upgrade refused", h.client.last_failure or "")
        self.assertIn(503, [e.fields["status"] for e in h.of_kind("refused")])
        self.assertTrue(any("HTTP 503" in m and "control plane" in m for m in h.messages("warn")))

    def test_upgrade_answered_200_is_not_called_a_refusal(self) -> None:
        h = harness(self)
        h.client.start()
        h.conn().refuse(200, "OK", b"<html>").finish()
        (line,) = [m for m in h.messages("warn") if "HTTP 200" in m]
        self.assertIn("upgrade not accepted (expected 101): HTTP 200 OK", line)
        self.assertNotIn("refused", line)
        self.assertIn("expected 101", h.client.last_failure or "")
        self.assertEqual(h.delays(), [1])

    def test_retries_never_stop(self) -> None:
        h = harness(self, reconnect_min=0.5, reconnect_max=2.0)
        h.client.start()
        for _ in range(300):
            h.fail_connect()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(h.attempts_made, 301)
        self.assertEqual(h.client.attempts, 301)
        self.assertLessEqual(max(h.delays()), 2.5)

    def test_rcf_fields_are_the_configured_values(self) -> None:
        """No mirrors: RCF's fields are what it really uses; its jitter is off (Backoff's is on)."""
        h = harness(self, reconnect_min=2.0, reconnect_max=30.0)
        f = h.client.factory
        # maxDelay: the longest wait, RECONNECT_MAX plus go jitter's 25 %.
        self.assertEqual((f.initialDelay, f.maxDelay, f.factor, f.jitter), (2.0, 37.5, 2.0, 0))
        h.client.start()
        h.fail_connect()
        self.assertEqual(f.retries, 1)  # RCF's own counter
        self.assertEqual(h.delays(), [2.0])

    def test_rcf_retry_calls_connector_connect(self) -> None:
        """RCF's loop reconnects: its retry() schedules connector.connect() on the clock."""
        h = harness(self)
        h.client.start()
        connector = h.reactor.connectors[-1]
        calls: list[str] = []
        real_connect = connector.connect
        connector.connect = lambda: (calls.append("connect"), real_connect())[1]
        h.fail_connect()
        self.assertIs(h.client.factory.connector, connector)
        pending = [c for c in h.pending_calls() if c.func.__name__ == "reconnector"]
        self.assertEqual(len(pending), 1)  # RCF's own reconnector, held in _callID
        self.assertIs(h.client.factory._callID, pending[0])
        h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(calls, ["connect"])
        self.assertEqual(h.attempts_made, 2)

    def test_reset_delay_keeps_a_pending_retry(self) -> None:
        h = harness(self)
        h.client.start()
        h.fail_connect()
        h.client.factory.resetDelay()
        self.assertTrue(h.client.factory.retry_pending)
        h.reactor.advance(1)
        self.assertEqual(h.attempts_made, 2)

    def test_stop_trying_then_retry_does_nothing(self) -> None:
        h = harness(self)
        h.client.start()
        h.fail_connect()
        h.client.factory.stopTrying()
        h.client.factory.retry()
        h.reactor.advance(100)
        self.assertEqual(h.attempts_made, 1)


class KeepaliveTests(SynchronousTestCase):
    """Point 4: our own pings on the reactor; a missing pong aborts."""

    def test_pings_every_interval(self) -> None:
        h = harness(self, ping_interval=30.0, pong_timeout=10.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(29.9)
        self.assertEqual(c.pings(), [])
        h.reactor.advance(0.1)
        self.assertEqual(len(c.pings()), 1)
        c.send_pong(c.pings()[0])
        h.reactor.advance(30)
        self.assertEqual(len(c.pings()), 2)
        c.send_pong(c.pings()[1])
        h.reactor.advance(30)
        self.assertEqual(len(c.pings()), 3)
        self.assertTrue(h.client.is_active)
        self.assertEqual(h.txaio_clock.getDelayedCalls(), [])

    def test_ping_and_pong_events(self) -> None:
        """Observers (the demo, metrics) see each keepalive ping and its pong."""
        h = harness(self, ping_interval=5.0, pong_timeout=8.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(5)
        h.reactor.advance(5)
        self.assertEqual([e.fields["sequence"] for e in h.of_kind("ping")], [1, 2])
        self.assertEqual(h.of_kind("pong"), [])
        c.send_pong(b"unrelated")
        self.assertEqual(h.of_kind("pong"), [])
        c.send_pong(c.pings()[1])
        self.assertEqual([e.fields["sequence"] for e in h.of_kind("pong")], [2])

    def test_pings_start_before_the_hello_ack(self) -> None:
        h = harness(self, ping_interval=5.0, hello_timeout=60.0)
        h.client.start()
        c = h.conn().accept()
        h.reactor.advance(5)
        self.assertEqual(len(c.pings()), 1)

    def test_missing_pong_aborts_and_reconnects(self) -> None:
        h = harness(self, ping_interval=30.0, pong_timeout=10.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(30)
        h.reactor.advance(9.9)
        self.assertFalse(c.transport.aborted)
        h.reactor.advance(0.1)
        self.assertTrue(c.transport.aborted)
        self.assertEqual(c.close_frames(), [])  # no close handshake with a dead peer
        self.assertFalse(h.client.is_active)
        self.assertEqual(h.of_kind("inactive")[0].fields["reason"], "no pong within 10s")
        c.finish()
        self.assertEqual(h.client.state, ClientState.WAITING)
        self.assertEqual(h.of_kind("closed")[-1].fields["code"], None)
        self.assertEqual(h.client.last_failure, "no pong within 10s")
        self.assertEqual(h.delays(), [1])  # it had been active: back to the minimum

    def test_wrong_pong_payload_does_not_count(self) -> None:
        h = harness(self, ping_interval=30.0, pong_timeout=10.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(30)
        c.send_pong(b"something else")
        h.reactor.advance(10)
        self.assertTrue(c.transport.aborted)

    def test_late_pong_answers_earlier_pings(self) -> None:
        """pong_timeout longer than the interval: a pong of the 2nd ping clears both."""
        h = harness(self, ping_interval=5.0, pong_timeout=8.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(5)
        h.reactor.advance(5)
        self.assertEqual(len(c.pings()), 2)
        c.send_pong(c.pings()[1])
        h.reactor.advance(4)  # t=14: past the first ping's deadline (13)
        self.assertFalse(c.transport.aborted)

    def test_later_pong_does_not_extend_an_older_pings_deadline(self) -> None:
        """Each ping gets PONG_TIMEOUT from when it was sent, not from the last pong."""
        h = harness(self, ping_interval=5.0, pong_timeout=10.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(5)  # ping 1 at t=5
        h.reactor.advance(5)  # ping 2 at t=10: deadline t=20
        h.reactor.advance(4.9)
        c.send_pong(c.pings()[0])  # t=14.9: answers ping 1 only
        h.reactor.advance(5.0)  # t=19.9
        self.assertFalse(c.transport.aborted)
        h.reactor.advance(0.1)  # t=20
        self.assertTrue(c.transport.aborted)

    def test_first_pong_outstanding_deadline_kept(self) -> None:
        h = harness(self, ping_interval=5.0, pong_timeout=8.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(5)  # ping 1 at t=5, deadline 13
        h.reactor.advance(5)  # ping 2 at t=10
        c.send_pong(c.pings()[0])  # answers ping 1 only: deadline moves to 18
        h.reactor.advance(7.9)
        self.assertFalse(c.transport.aborted)
        h.reactor.advance(0.1)
        self.assertTrue(c.transport.aborted)

    def test_no_autobahn_timers(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(30)
        c.send_close(1000)
        self.assertEqual(h.txaio_clock.getDelayedCalls(), [])
        f = h.client.factory
        self.assertEqual(
            (
                f.autoPingInterval,
                f.openHandshakeTimeout,
                f.closeHandshakeTimeout,
                f.serverConnectionDropTimeout,
            ),
            (0, 0, 0, 0),
        )


class TimeoutTests(SynchronousTestCase):
    """Point 5: handshake and hello timeouts."""

    def test_handshake_timeout_while_tcp_connecting(self) -> None:
        h = harness(self, handshake_timeout=10.0)
        h.client.start()
        connector = h.reactor.connectors[-1]
        h.reactor.advance(9.9)
        self.assertFalse(connector.stoppedConnecting)
        h.reactor.advance(0.1)
        self.assertTrue(connector.stoppedConnecting)
        h.fail_connect(UserError())  # what stopConnecting makes Twisted report
        self.assertIn(
            "within 10s (stuck in name lookup or TCP connect)", h.client.last_failure or ""
        )
        self.assertEqual(h.client.state, ClientState.WAITING)
        self.assertEqual(h.delays(), [1])

    def test_handshake_timeout_during_upgrade(self) -> None:
        h = harness(self, handshake_timeout=10.0)
        h.client.start()
        h.reactor.advance(4)
        c = h.conn()  # TCP up at t=4, no 101 ever
        h.reactor.advance(5.9)
        self.assertFalse(c.transport.aborted)
        h.reactor.advance(0.1)
        self.assertTrue(c.transport.aborted)
        c.finish()
        self.assertIn(
            "within 10s (stuck in TLS handshake or upgrade response)", h.client.last_failure or ""
        )
        self.assertEqual(h.delays(), [1])

    def test_handshake_timer_stops_at_open(self) -> None:
        h = harness(self, handshake_timeout=10.0, hello_timeout=60.0)
        h.client.start()
        c = h.conn().accept()
        h.reactor.advance(20)
        self.assertFalse(c.transport.aborted)

    def test_connect_timeout_backstop_is_longer(self) -> None:
        h = harness(self, handshake_timeout=10.0)
        h.client.start()
        self.assertGreater(h.reactor.tcpClients[-1][3], 10.0)

    def test_hello_timeout_closes_and_reconnects(self) -> None:
        h = harness(self, hello_timeout=10.0, ping_interval=300.0)
        h.client.start()
        c = h.conn().accept()
        h.reactor.advance(9.9)
        self.assertEqual(c.close_frames(), [])
        h.reactor.advance(0.1)
        self.assertEqual([cf[0] for cf in c.close_frames()], [1000])
        self.assertEqual(h.client.state, ClientState.CLOSING)
        # The peer does not answer: the close timer aborts.
        h.reactor.advance(CLOSE_TIMEOUT)
        self.assertTrue(c.transport.aborted)
        c.finish()
        self.assertEqual(h.client.last_failure, "no agent.hello_ack within 10s")
        self.assertEqual(h.client.state, ClientState.WAITING)

    def test_hello_timer_cancelled_by_ack(self) -> None:
        h = harness(self, hello_timeout=10.0, ping_interval=300.0)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(50)
        self.assertEqual(c.close_frames(), [])
        self.assertTrue(h.client.is_active)

    def test_server_close_answered_then_bounded(self) -> None:
        """The server closes but never drops TCP: we abort after the close timeout."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.send_close(4001, b"replaced")
        self.assertEqual([cf[0] for cf in c.close_frames()], [1000])  # answered
        h.reactor.advance(CLOSE_TIMEOUT)
        self.assertTrue(c.transport.aborted)
        c.finish()
        self.assertIn("4001", h.client.last_failure or "")
        self.assertEqual(h.of_kind("closed")[-1].fields["code"], 4001)


class LimitTests(SynchronousTestCase):
    """Point 6: payload limits, 1009."""

    def test_protocol_options(self) -> None:
        h = harness(self, max_message_bytes=12345)
        f = h.client.factory
        self.assertEqual(f.maxMessagePayloadSize, 12345)
        self.assertEqual(f.maxFramePayloadSize, 12345)
        self.assertFalse(f.failByDrop)

    def test_oversized_frame_closes_1009_before_the_payload(self) -> None:
        h = harness(self, max_message_bytes=4096)
        h.client.start()
        c = h.active_conn()
        # Only the header of a 1 MiB frame and a little payload arrive.
        c.receive(server_frame(1, b"x" * 100, length=1 << 20))
        self.assertEqual([cf[0] for cf in c.close_frames()], [1009])
        (line,) = [m for m in h.messages("warn") if "closing connection" in m]
        self.assertIn("close_code=1009", line)
        self.assertIn("exceeds payload limit of 4096", line)
        self.assertFalse(h.client.is_active)
        c.receive(b"x" * 10000)  # the rest is not buffered into a message
        self.assertEqual(len(h.of_kind("message_in")), 1)
        self.assertLess(len(c.proto.data), 16)
        c.send_close(1000)
        c.lose()
        self.assertEqual(h.of_kind("closed")[-1].fields["code"], 1009)

    def test_oversized_fragmented_message_closes_1009(self) -> None:
        h = harness(self, max_message_bytes=4096)
        h.client.start()
        c = h.active_conn()
        c.receive(server_frame(1, b"a" * 3000, fin=False))
        c.receive(server_frame(0, b"b" * 3000, fin=True))
        self.assertEqual([cf[0] for cf in c.close_frames()], [1009])

    def test_message_at_the_limit_is_fine(self) -> None:
        h = harness(self, max_message_bytes=4096)
        h.client.start()
        c = h.active_conn()
        text = _ack()
        padded = text[:-1] + "," + '"pad":"' + "p" * (4096 - len(text) - 9) + '"}'
        self.assertEqual(len(padded), 4096)
        c.send_text(padded)
        self.assertEqual(c.close_frames(), [])
        self.assertTrue(h.client.is_active)


class TLSAndProxyTests(SynchronousTestCase):
    """Point 7 on memory transports (real TLS is in test_client_e2e)."""

    def test_wss_starts_tls_with_verifying_options(self) -> None:
        from hostlink_tw.tls import FailClosedClientTLSOptions

        h = harness(self, ws_url="wss://cp.example.test/api/v1/agents/ws")
        h.client.start()
        self.assertEqual(h.target(), ("cp.example.test", 443))
        c = h.conn()
        self.assertIsInstance(c.transport.tls_options, FailClosedClientTLSOptions)
        self.assertNotIsInstance(c.transport.tls_options, ClientContextFactory)
        self.assertEqual(c.transport.tls_options.hostname, "cp.example.test")
        self.assertEqual(c.request()[1]["host"], "cp.example.test:443")

    def test_unreadable_ca_file_fails_the_attempt_and_backs_off(self) -> None:
        h = harness(self, ws_url="wss://cp.example.test/ws", ca_file="/nonexistent/ca.pem")
        h.client.start()
        self.assertEqual(h.attempts_made, 0)
        self.assertEqual(h.kinds(), ["attempt", "closed", "retry_scheduled"])
        self.assertIn("/nonexistent/ca.pem", h.client.last_failure or "")
        self.assertTrue(any("/nonexistent/ca.pem" in m for m in h.messages("error")))
        h.reactor.advance(1)
        self.assertEqual(h.delays(), [1, 2])

    def test_plaintext_warning_once_for_remote_host(self) -> None:
        h = harness(self, ws_url="ws://cp.example.test/api/v1/agents/ws")
        h.client.start()
        d = h.client.stop()
        h.fail_connect(UserError())
        self.successResultOf(d)
        h.client.start()
        warnings = [m for m in h.messages("warn") if "not encrypted" in m]
        self.assertEqual(len(warnings), 1)
        self.assertIn("signature", warnings[0])

    def test_no_plaintext_warning_for_loopback(self) -> None:
        for url in ("ws://127.0.0.1:1/ws", "ws://localhost:1/ws", "ws://[::1]:1/ws"):
            h = harness(self, ws_url=url)
            h.client.start()
            self.assertEqual([m for m in h.messages("warn") if "not encrypted" in m], [], url)

    def _proxied(self, url: str, environ: dict[str, str]) -> tuple[Harness, Conn]:
        h = harness(self, ws_url=url, environ=environ)
        h.client.start()
        return h, h.conn()

    def test_connect_tunnel_through_http_proxy(self) -> None:
        h, c = self._proxied(
            "ws://cp.example.test:8080/api/v1/agents/ws",
            {"HTTP_PROXY": "http://user:p%40ss@proxy.corp:3128"},
        )
        self.assertEqual(h.target(), ("proxy.corp", 3128))
        request = c.written().decode()
        self.assertTrue(request.startswith("CONNECT cp.example.test:8080 HTTP/1.1\r\n"), request)
        self.assertIn("Host: cp.example.test:8080\r\n", request)
        self.assertIn("Proxy-Authorization: Basic dXNlcjpwQHNz\r\n", request)
        self.assertNotIn("X-Signature", request)  # nothing signed before the tunnel
        c.receive(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertIn("X-Signature:", c.written().decode())
        self.assertIn("via proxy http://proxy.corp:3128", "\n".join(h.messages("info")))
        self.assertNotIn("p@ss", "\n".join(h.messages()))
        self.assertNotIn("p%40ss", "\n".join(h.messages()))

    def test_wss_through_proxy_keeps_verified_tls(self) -> None:
        from hostlink_tw.tls import FailClosedClientTLSOptions

        h, c = self._proxied(
            "wss://cp.example.test/api/v1/agents/ws", {"HTTPS_PROXY": "proxy.corp:3128"}
        )
        self.assertEqual(h.target(), ("proxy.corp", 3128))
        self.assertIsNone(c.transport.tls_options)  # not before the tunnel is up
        self.assertTrue(c.written().startswith(b"CONNECT cp.example.test:443 HTTP/1.1"))
        c.receive(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertIsInstance(c.transport.tls_options, FailClosedClientTLSOptions)
        self.assertEqual(c.transport.tls_options.hostname, "cp.example.test")

    def test_proxy_refusal_backs_off(self) -> None:
        h, c = self._proxied("ws://cp.example.test/ws", {"http_proxy": "http://proxy.corp"})
        c.receive(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        c.finish()
        self.assertIn("proxy refused", h.client.last_failure or "")
        self.assertEqual(h.delays(), [1])

    def test_connect_tunnel_to_ipv6_literal(self) -> None:
        h, c = self._proxied("ws://[2001:db8::5]:8080/ws", {"HTTP_PROXY": "http://proxy:3128"})
        self.assertTrue(c.written().startswith(b"CONNECT [2001:db8::5]:8080 HTTP/1.1\r\n"))

    def test_no_proxy_connects_directly(self) -> None:
        h, _ = self._proxied(
            "ws://cp.example.test/ws",
            {"HTTP_PROXY": "http://proxy.corp:3128", "NO_PROXY": "example.test"},
        )
        self.assertEqual(h.target(), ("cp.example.test", 80))

    def test_unparsable_proxy_fails_closed(self) -> None:
        """Like Go's dialer: a proxy that cannot be used is an error, never bypassed."""
        h = harness(
            self, ws_url="wss://cp.example.test/ws", environ={"HTTPS_PROXY": "http://u:pw@[::1"}
        )
        h.client.start()
        self.assertEqual(h.attempts_made, 0)  # no connection, direct or otherwise
        self.assertIn("NO_PROXY", h.client.last_failure or "")
        self.assertEqual(h.delays(), [1])
        self.assertTrue(any("proxy" in m for m in h.messages("error")))
        self.assertNotIn("pw", "\n".join(h.messages()))

    def test_unsupported_proxy_scheme_fails_closed_and_backs_off(self) -> None:
        h = harness(
            self, ws_url="wss://cp.example.test/ws", environ={"HTTPS_PROXY": "socks5://s:1080"}
        )
        h.client.start()
        h.reactor.advance(1)
        h.reactor.advance(2)
        self.assertEqual(h.attempts_made, 0)
        self.assertEqual(h.delays(), [1, 2, 4])
        self.assertIn("socks5", h.client.last_failure or "")

    def test_no_proxy_overrides_an_unusable_proxy(self) -> None:
        h, _ = self._proxied(
            "wss://cp.example.test/ws",
            {"HTTPS_PROXY": "socks5://s:1080", "NO_PROXY": "cp.example.test"},
        )
        self.assertEqual(h.target(), ("cp.example.test", 443))


class StopTests(SynchronousTestCase):
    """Point 8: stop() in every state, and twice."""

    def _assert_clean(self, h: Harness) -> None:
        self.assertEqual(h.pending_calls(), [])
        self.assertEqual(h.txaio_clock.getDelayedCalls(), [])
        self.assertEqual(h.client.state, ClientState.STOPPED)
        made = h.attempts_made
        h.reactor.advance(10_000)
        self.assertEqual(h.attempts_made, made)
        self.assertEqual(h.kinds()[-1], "stopped")

    def test_never_started(self) -> None:
        h = harness(self)
        self.assertIsNone(self.successResultOf(h.client.stop()))
        self.assertIsNone(self.successResultOf(h.client.stop()))
        self.assertEqual(h.pending_calls(), [])
        self.assertEqual(h.attempts_made, 0)

    def test_while_tcp_connecting(self) -> None:
        h = harness(self)
        h.client.start()
        d = h.client.stop()
        self.assertTrue(h.reactor.connectors[-1].stoppedConnecting)
        self.assertNoResult(d)
        h.fail_connect(UserError())
        self.successResultOf(d)
        self._assert_clean(h)

    def test_while_tcp_connecting_synchronous_failure(self) -> None:
        """Twisted's real connectors report the stopped connect at once."""
        h = harness(self)
        h.client.start()
        connector = h.reactor.connectors[-1]
        connector.stopConnecting = lambda: h.client.factory.clientConnectionFailed(
            connector, Failure(UserError())
        )
        self.successResultOf(h.client.stop())
        self.assertEqual(h.kinds(), ["attempt", "closed", "stopped"])
        self._assert_clean(h)

    def test_while_upgrading(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn()
        d = h.client.stop()
        self.assertTrue(c.transport.aborted)
        self.assertNoResult(d)
        c.finish()
        self.successResultOf(d)
        self._assert_clean(h)

    def test_refusal_arriving_during_stop(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn()
        d = h.client.stop()
        c.refuse(401)
        c.finish()
        self.successResultOf(d)
        self._assert_clean(h)

    def test_while_awaiting_hello_ack(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        d = h.client.stop()
        self.assertEqual([cf[0] for cf in c.close_frames()], [1000])
        self.assertNoResult(d)
        c.ack_hello()  # too late: not activated
        self.assertFalse(h.client.is_active)
        c.send_close(1000)
        c.lose()
        self.successResultOf(d)
        self._assert_clean(h)

    def test_while_active_clean_close(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        d = h.client.stop()
        self.assertFalse(h.client.is_active)
        self.assertEqual(h.of_kind("inactive")[-1].fields["reason"], "agent stopping")
        self.assertEqual([cf[0] for cf in c.close_frames()], [1000])
        self.assertFalse(c.transport.aborted)
        c.send_close(1000)
        c.lose()
        self.successResultOf(d)
        self.assertEqual(h.of_kind("closed")[-1].fields["code"], 1000)
        self._assert_clean(h)

    def test_while_active_peer_silent_is_bounded(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        d = h.client.stop()
        h.reactor.advance(CLOSE_TIMEOUT - 0.01)
        self.assertFalse(c.transport.aborted)
        h.reactor.advance(0.01)
        self.assertTrue(c.transport.aborted)
        c.finish()
        self.successResultOf(d)
        self._assert_clean(h)

    def test_while_closing_after_bad_input(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        c.send_text("garbage")
        d = h.client.stop()
        self.assertEqual(len(c.close_frames()), 1)
        h.reactor.advance(CLOSE_TIMEOUT)
        c.finish()
        self.successResultOf(d)
        self._assert_clean(h)

    def test_while_waiting_to_retry(self) -> None:
        h = harness(self)
        h.client.start()
        h.fail_connect()
        self.assertTrue(h.client.factory.retry_pending)
        self.successResultOf(h.client.stop())
        self.assertFalse(h.client.factory.retry_pending)
        self._assert_clean(h)

    def test_twice(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        d1 = h.client.stop()
        d2 = h.client.stop()
        self.assertEqual(len(c.close_frames()), 1)
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        c.send_close(1000)
        c.lose()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.successResultOf(h.client.stop())
        self._assert_clean(h)

    def test_start_after_stop_connects_afresh(self) -> None:
        h = harness(self)
        h.client.start()
        h.fail_connect()
        self.successResultOf(h.client.stop())
        h.client.start()
        self.assertEqual(h.attempts_made, 2)
        self.assertEqual(h.client.attempts, 1)
        h.fail_connect()
        self.assertEqual(h.delays(), [1, 1])

    def test_start_twice_is_one_connection(self) -> None:
        h = harness(self)
        h.client.start()
        h.client.start()
        self.assertEqual(h.attempts_made, 1)

    def test_start_during_stopping_is_ignored(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        d = h.client.stop()
        h.client.start()
        c.send_close(1000)
        c.lose()
        self.successResultOf(d)
        self.assertEqual(h.attempts_made, 1)
        self._assert_clean(h)

    def test_stop_from_an_observer(self) -> None:
        h = harness(self)
        results: list[Any] = []

        def on_event(event: ClientEvent) -> None:
            if event.kind == "connected":
                results.append(h.client.stop())

        h.client.add_observer(on_event)
        h.client.start()
        c = h.conn().accept()
        self.assertEqual([t["type"] for t in c.texts()], [])  # no hello after stop
        c.send_close(1000)
        c.lose()
        self.successResultOf(results[0])
        self._assert_clean(h)

    def test_stop_from_an_attempt_observer(self) -> None:
        """ "Give up after N attempts": stop() inside the attempt event stops at once."""
        for give_up_at in (1, 2):
            with self.subTest(give_up_at=give_up_at):
                h = harness(self)
                results: list[Any] = []

                def on_event(
                    event: ClientEvent, n: int = give_up_at, h: Any = h, results: Any = results
                ) -> None:
                    if event.kind == "attempt" and event.fields["attempt"] == n:
                        results.append(h.client.stop())

                h.client.add_observer(on_event)
                h.client.start()
                if give_up_at == 2:
                    h.fail_connect()
                    h.reactor.advance(h.client.current_delay or 0)
                self.assertEqual(h.attempts_made, give_up_at - 1)
                self.successResultOf(results[0])
                self.assertEqual(h.client.state, ClientState.STOPPED)
                h.reactor.advance(3600)
                self.assertEqual(h.attempts_made, give_up_at - 1)
                self.assertFalse(h.client.is_active)
                self.assertEqual(self.flushLoggedErrors(), [])
                self._assert_clean(h)


class OneConnectionTests(SynchronousTestCase):
    """Point 9: never two connections, in any interleaving."""

    def test_retry_while_retry_pending(self) -> None:
        h = harness(self)
        h.client.start()
        h.fail_connect()
        h.client.factory.retry()
        h.client.factory.retry()
        self.assertEqual(len(h.pending_calls()), 1)
        self.assertEqual(h.delays(), [1])
        h.reactor.advance(100)
        self.assertEqual(h.attempts_made, 2)

    def test_retry_while_connected(self) -> None:
        h = harness(self)
        h.client.start()
        h.active_conn()
        h.client.factory.retry()
        h.reactor.advance(100)
        self.assertEqual(h.attempts_made, 1)

    def test_stale_connection_end_is_ignored(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn()
        c.lose()
        # A second report for the same, already ended, attempt.
        h.client.factory.clientConnectionLost(c.connector, Failure(ConnectionLost()))
        self.assertEqual(len(h.of_kind("retry_scheduled")), 1)
        h.reactor.advance(100)
        self.assertEqual(h.attempts_made, 2)

    def test_server_close_during_hello(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn().accept()
        c.send_close(1008, b"no")
        c.lose()
        h.reactor.advance(1)
        self.assertEqual(h.attempts_made, 2)
        h.reactor.advance(100)
        self.assertEqual(h.attempts_made, 2)

    def test_random_interleavings(self) -> None:
        """Random server behaviour and stop/start calls: at most one open attempt."""
        kinds: set[str] = set()
        for seed in range(100):
            kinds.update(self._interleave(seed))
        # The walk reached every phase of a connection's life.
        self.assertLessEqual(
            {
                "attempt",
                "connected",
                "active",
                "inactive",
                "refused",
                "closed",
                "retry_scheduled",
                "stopped",
            },
            kinds,
        )

    def _interleave(self, seed: int) -> list[str]:
        rng = random.Random(seed)
        h = harness(
            self,
            rng=random.Random(seed),
            hello_timeout=5.0,
            ping_interval=3.0,
            pong_timeout=2.0,
            handshake_timeout=4.0,
            reconnect_max=8.0,
        )
        open_conns: list[Conn] = []
        seen = 0
        if seed % 2:
            # Embedding code reacting to events by stopping or restarting.
            chaos = random.Random(seed + 1000)

            def meddle(event: ClientEvent) -> None:
                roll = chaos.random()
                if roll < 0.05:
                    h.client.stop()
                elif roll < 0.10:
                    h.client.start()

            unsubscribe = h.client.add_observer(meddle)
        h.client.start()
        for _ in range(60):
            # Newly started attempts: TCP connects or fails.
            if h.attempts_made > seen:
                self.assertEqual(h.attempts_made, seen + 1, seed)
                seen = h.attempts_made
                if rng.random() < 0.3:
                    h.fail_connect()
                else:
                    open_conns.append(h.conn())
            live = [c for c in open_conns if not c.lost]
            self.assertLessEqual(len(live), 1, seed)
            action = rng.choice(
                [
                    "advance",
                    "advance",
                    "accept",
                    "ack",
                    "refuse",
                    "close",
                    "lose",
                    "garbage",
                    "stop",
                    "start",
                    "pong",
                ]
            )
            c = live[0] if live else None
            if action == "advance":
                h.reactor.advance(rng.choice([0.5, 1, 2, 5]))
            elif action == "stop":
                h.client.stop()
            elif action == "start":
                h.client.start()
            elif c is not None and not c.transport.disconnecting:
                state = c.proto.state
                if action == "accept" and state == 1:
                    c.accept()
                elif action == "refuse" and state == 1:
                    c.refuse(rng.choice([401, 403, 500, 503]))
                elif action == "ack" and state in (2, 3):
                    if h.client.hello_id:
                        c.ack_hello()
                elif action == "close" and state in (2, 3):
                    c.send_close(1000)
                elif action == "garbage" and state in (2, 3):
                    c.send_text("garbage")
                elif action == "pong" and c.pings():
                    c.send_pong(c.pings()[-1])
                elif action == "lose":
                    c.lose()
            for conn in open_conns:
                conn.finish()
        if seed % 2:
            unsubscribe()
        d = h.client.stop()
        for conn in open_conns:
            if not conn.lost:
                h.reactor.advance(CLOSE_TIMEOUT)
                conn.finish()
        if h.attempts_made > seen:
            h.fail_connect(UserError())
        self.successResultOf(d)
        self.assertEqual(h.pending_calls(), [], seed)
        self.assertEqual(h.txaio_clock.getDelayedCalls(), [], seed)
        return h.kinds()


class StateTests(SynchronousTestCase):
    """Point 10: state and events for callers."""

    def test_snapshot_through_a_life(self) -> None:
        h = harness(self)
        snap = h.client.snapshot()
        self.assertEqual(snap["state"], "idle")
        self.assertFalse(snap["active"])
        self.assertEqual(snap["agent_id"], AGENT)
        h.client.start()
        h.reactor.advance(1)
        h.fail_connect()
        snap = h.client.snapshot()
        self.assertEqual(snap["state"], "waiting")
        self.assertEqual(snap["attempts"], 1)
        self.assertEqual(snap["current_delay"], 1)
        self.assertEqual(snap["next_retry_at"], 2)
        self.assertIn("Connection was refused", snap["last_failure"])
        h.reactor.advance(1)
        c = h.conn().accept()
        h.reactor.advance(0.5)
        snap = h.client.snapshot()
        self.assertEqual(snap["state"], "awaiting_hello_ack")
        self.assertEqual(snap["connected_since"], 2)
        self.assertIsNone(snap["current_delay"])
        self.assertIsNone(snap["next_retry_at"])
        self.assertEqual(snap["attempts"], 2)
        c.ack_hello()
        snap = h.client.snapshot()
        self.assertTrue(snap["active"])
        self.assertEqual(snap["attempts"], 0)
        self.assertIsNone(snap["last_failure"])
        self.assertEqual(snap["last_ack_at"], 2.5)
        self.assertEqual(snap["last_ack"]["acked_message_id"], c.hello()["message_id"])
        json.dumps(snap)
        c.send_close(1000)
        c.lose()
        snap = h.client.snapshot()
        self.assertIsNone(snap["connected_since"])
        self.assertIn("closed by control plane: code=1000", snap["last_failure"])

    def test_event_sequence(self) -> None:
        h = harness(self)
        h.client.start()
        h.fail_connect()
        h.reactor.advance(1)
        c = h.active_conn()
        c.send_close(1000)
        c.lose()
        self.assertEqual(
            h.kinds(),
            [
                "attempt",
                "closed",
                "retry_scheduled",
                "attempt",
                "connected",
                "message_out",
                "message_in",
                "active",
                "inactive",
                "closed",
                "retry_scheduled",
            ],
        )
        self.assertEqual(h.of_kind("attempt")[1].fields["attempt"], 2)
        self.assertEqual(h.of_kind("closed")[0].fields["code"], None)
        self.assertEqual(h.of_kind("closed")[1].fields["code"], 1000)
        self.assertTrue(h.of_kind("closed")[1].fields["clean"])
        self.assertEqual(h.of_kind("retry_scheduled")[0].fields, {"delay": 1.0, "at": 1.0})

    def test_unsubscribe(self) -> None:
        h = harness(self)
        seen: list[ClientEvent] = []
        unsubscribe = h.client.add_observer(seen.append)
        h.client.start()
        unsubscribe()
        unsubscribe()
        h.fail_connect()
        self.assertEqual([e.kind for e in seen], ["attempt"])

    def test_events_are_immutable(self) -> None:
        event = ClientEvent("attempt", {"attempt": 1})
        self.assertRaises(TypeError, operator.setitem, event.fields, "attempt", 2)

    def test_url_and_agent_id(self) -> None:
        h = harness(self)
        self.assertEqual(h.client.url, h.settings.ws_url)
        self.assertEqual(h.client.agent_id, AGENT)

    def test_bad_url_is_refused_at_construction(self) -> None:
        h = Harness()
        self.assertRaises(
            ValueError, HostlinkClient, h.settings.__class__(ws_url="http://x/ws"), h.signer
        )


class LoggingTests(SynchronousTestCase):
    """Point 11: structured fields, no secrets."""

    def test_fields_and_no_secrets(self) -> None:
        h = harness(self, ws_url="ws://user:hunter2@127.0.0.1:8080/api/v1/agents/ws")
        h.client.start()
        c = h.conn()
        headers = c.request()[1]
        c.accept()
        c.send_close(1000)
        c.lose()
        h.reactor.advance(1)
        c = h.conn()
        second = c.request()[1]
        c.refuse(401)
        c.finish()
        everything = repr([dict(e) for e in h.logged]) + "\n".join(h.messages())
        for secret in (
            headers["x-nonce"],
            headers["x-signature"],
            second["x-nonce"],
            second["x-signature"],
            "hunter2",
        ):
            self.assertNotIn(secret, everything)
        for e in h.logged:
            self.assertEqual(e.get("agent_id"), AGENT, e["log_format"])
            self.assertEqual(e.get("url"), "ws://127.0.0.1:8080/api/v1/agents/ws")
        attempts = [e for e in h.logged if "attempt" in e]
        self.assertTrue(attempts)
        delays = [e for e in h.logged if "delay" in e]
        self.assertEqual([e["delay"] for e in delays], [1.0, 2.0])
        closes = [e for e in h.logged if "close_code" in e]
        self.assertEqual(closes[0]["close_code"], 1000)
        self.assertTrue(all("reason" in e for e in closes))

    def test_redact_url(self) -> None:
        # Issue 10.14: query values are secrets too (?token=...), not only user info.
        self.assertEqual(redact_url("wss://a:b@h:1/p?q=1"), "wss://h:1/p?q=REDACTED")
        self.assertEqual(redact_url("wss://h/p"), "wss://h/p")

    def test_autobahn_debug_logging_is_pinned_off(self) -> None:
        """Autobahn's debug lines print the signed request; our protocols never emit them."""
        from hostlink_tw.client import HostlinkClientProtocol

        self.assertEqual(HostlinkClientProtocol.log._log_level, "critical")
