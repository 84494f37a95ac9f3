"""
Issue 9 items 3, 11 and 12 on memory transports: an identity used twice is
named and backs off; a refusal's body is shown de-chunked with a hint; a run
of failed connects becomes one warning per cause.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.diagnosis import (
    ESCALATE_AFTER_ATTEMPTS,
    ESCALATE_AFTER_SECONDS,
    REPLACED_SESSIONS,
    REPLACED_WINDOW,
    dechunk,
    shorten_body,
)
from tests.test_client_support import AGENT, Harness, harness


def _replaced(h: Harness) -> None:
    """One session becomes active, then the control plane replaces it (4001)."""
    c = h.active_conn()
    c.send_close(4001, b"replaced by a newer session")
    c.lose()
    h.reactor.advance(h.client.current_delay or 0)


class ReplacedTests(SynchronousTestCase):
    """Issue 9 item 3: two agents with one identity."""

    def _identity_warnings(self, h: Harness) -> list[str]:
        return [m for m in h.messages("warn") if "another process or host" in m]

    def test_named_once_and_backs_off(self) -> None:
        h = harness(self)
        h.client.start()
        for _ in range(REPLACED_SESSIONS - 1):
            _replaced(h)
        self.assertEqual(self._identity_warnings(h), [])
        self.assertEqual(h.delays(), [1.0] * (REPLACED_SESSIONS - 1))
        for _ in range(3):
            _replaced(h)
        (line,) = self._identity_warnings(h)
        self.assertIn(f"another process or host is using agent id {AGENT}", line)
        self.assertIn("cloned VM", line)
        # Sessions that keep being replaced no longer reset the backoff: the pair settles.
        self.assertEqual(h.delays(), [1.0] * REPLACED_SESSIONS + [2.0, 4.0])

    def test_a_lasting_session_starts_the_delays_again(self) -> None:
        h = harness(self, ping_interval=300.0, pong_timeout=100.0)
        h.client.start()
        for _ in range(REPLACED_SESSIONS + 1):
            _replaced(h)
        self.assertEqual(h.delays()[-1], 2.0)
        c = h.active_conn()
        h.reactor.advance(REPLACED_WINDOW + 1)  # the other agent is gone
        c.send_close(1001, b"control plane restarting")
        c.lose()
        self.assertEqual(h.delays()[-1], 1.0)

    def test_replacements_far_apart_are_not_news(self) -> None:
        """One replacement now and then (a deploy, a restart elsewhere) is normal."""
        h = harness(self, ping_interval=300.0, pong_timeout=100.0)
        h.client.start()
        for _ in range(REPLACED_SESSIONS + 1):
            c = h.active_conn()
            h.reactor.advance(REPLACED_WINDOW / (REPLACED_SESSIONS - 1) + 1)
            c.send_close(4001, b"replaced by a newer session")
            c.lose()
            h.reactor.advance(h.client.current_delay or 0)
        self.assertEqual(self._identity_warnings(h), [])
        self.assertEqual(h.delays(), [1.0] * (REPLACED_SESSIONS + 1))


class RefusalBodyTests(SynchronousTestCase):
    """Issue 9 item 11: a refusal's body, readable; a 404 points at the path."""

    def test_chunked_html_body_is_dechunked_and_shortened(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.conn()
        c.receive(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"f\r\n<!DOCTYPE html>\r\n17\r\n<p>No  such\n  page</p>\r\n0\r\n\r\n"
        )
        c.finish()
        (line,) = [m for m in h.messages("warn") if "HTTP 404" in m]
        self.assertIn("upgrade refused: HTTP 404 Not Found 'No such page'", line)
        self.assertNotIn("\\r\\n", line)
        self.assertNotIn("DOCTYPE", line)
        self.assertIn("/api/v1/agents/ws", line)  # the hint names the gateway path

    def test_dechunk(self) -> None:
        self.assertEqual(dechunk(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"), b"abcde")
        self.assertEqual(dechunk(b"zz\r\nabc"), b"")  # not chunked after all: nothing trusted
        self.assertEqual(dechunk(b"5\r\nab"), b"ab")  # cut short: what is there

    def test_shorten_body(self) -> None:
        self.assertEqual(shorten_body({}, b"  a\r\n\tb  "), "a b")
        long = shorten_body({}, b"x" * 1000)
        self.assertEqual(len(long), 201)
        self.assertTrue(long.endswith("\u2026"))


class EscalationTests(SynchronousTestCase):
    """Issue 9 item 12: a never-connecting agent says why, at warning level, once per cause."""

    def _escalations(self, h: Harness) -> list[str]:
        return [m for m in h.messages("warn") if "no session for" in m]

    def _fail(self, h: Harness, error: Exception, times: int) -> None:
        for _ in range(times):
            h.fail_connect(error)
            h.reactor.advance(h.client.current_delay or 0)

    def test_one_warning_per_cause(self) -> None:
        h = harness(self, reconnect_max=2.0)
        h.client.start()
        self._fail(h, DNSLookupError("cp.example.test"), ESCALATE_AFTER_ATTEMPTS - 1)
        self.assertEqual(self._escalations(h), [])
        self._fail(h, DNSLookupError("cp.example.test"), 10)
        (dns,) = self._escalations(h)
        self.assertIn("does not resolve", dns)
        self._fail(h, ConnectionRefusedError(), 10)
        dns_again, refused = self._escalations(h)
        self.assertEqual(dns_again, dns)
        self.assertIn("nothing listens on 127.0.0.1:8080", refused)

    def test_a_minute_without_a_session_is_enough(self) -> None:
        h = harness(self, reconnect_min=70.0, reconnect_max=100.0)
        h.client.start()
        self._fail(h, ConnectionRefusedError(), 2)  # the second failure comes 70 s later
        self.assertGreaterEqual(h.reactor.seconds(), ESCALATE_AFTER_SECONDS)
        self.assertEqual(len(self._escalations(h)), 1)

    def test_a_session_starts_a_new_run(self) -> None:
        h = harness(self, reconnect_max=2.0)
        h.client.start()
        self._fail(h, ConnectionRefusedError(), ESCALATE_AFTER_ATTEMPTS)
        self.assertEqual(len(self._escalations(h)), 1)
        c = h.active_conn()
        c.send_close(1001, b"restarting")
        c.lose()
        h.reactor.advance(h.client.current_delay or 0)
        self._fail(h, ConnectionRefusedError(), ESCALATE_AFTER_ATTEMPTS + 1)
        self.assertEqual(len(self._escalations(h)), 2)


class EndLineTests(SynchronousTestCase):
    def test_end_of_a_session_names_its_own_attempt(self) -> None:
        """The count of attempts restarts on activation; the end line keeps the attempt's number."""
        h = harness(self)
        h.client.start()
        h.fail_connect()
        h.reactor.advance(h.client.current_delay or 0)
        c = h.active_conn()  # attempt 2
        c.send_close(1001, b"restarting")
        c.lose()
        (line,) = [m for m in h.messages("warn") if m.startswith("connection ended")]
        self.assertIn("attempt=2", line)


class RefusalHintTests(SynchronousTestCase):
    """New-user trial: an 'unknown agent' 401 was first told to check the clock."""

    def test_401_hint_follows_the_body(self) -> None:
        from hostlink_tw.agent.diagnosis import refusal_hint

        hint = refusal_hint(401, "upgrade refused: HTTP 401 'unknown agent'")
        self.assertIn("identity show", hint)
        self.assertNotIn("clock", refusal_hint(401, "HTTP 401 'unknown agent'"))
        self.assertIn("another public key", refusal_hint(401, "HTTP 401 'invalid signature'"))
        general = refusal_hint(401, "HTTP 401 'stale timestamp'")
        self.assertIn("clock", general)
        self.assertIn("registered", general)


class PortMismatchTests(SynchronousTestCase):
    """New-user trial: wss:// to a plain port (and the reverse) said nothing useful."""

    def test_wss_to_a_plain_port(self) -> None:
        from twisted.internet.error import ConnectionLost

        h = harness(self, ws_url="wss://cp.example.test:8080/api/v1/agents/ws", reconnect_max=2.0)
        h.client.start()
        for _ in range(3):
            c = h.conn()
            c.lose(ConnectionLost())  # the plain server gave up on the ClientHello
            h.reactor.advance(h.client.current_delay or 0)
        (line,) = [m for m in h.messages("warn") if "no session for" in m]
        self.assertIn("if it is a plain port, use ws://", line)

    def test_ws_to_a_tls_port(self) -> None:
        h = harness(self, reconnect_max=2.0)
        h.client.start()
        for _ in range(3):
            c = h.conn()
            c.lose()  # closed before any upgrade answer
            h.reactor.advance(h.client.current_delay or 0)
        (line,) = [m for m in h.messages("warn") if "no session for" in m]
        self.assertIn("if it expects TLS, use wss://", line)
