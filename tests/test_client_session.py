"""
The session seam (issue 11 §3) on memory transports: the dispatch table,
ack waiters, session listeners; and the cases a review of the reshaped core
found (each test failed before its fix).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.session import Session, SessionEndedError
from hostlink_tw.client import ClientEvent, ClientState
from hostlink_tw.protocol import ACK, ack_payload, make_envelope
from tests.test_client_support import AGENT, harness


def _ack_for(message_id: str) -> str:
    return make_envelope(ACK, AGENT, ack_payload(message_id, "task.final")).to_json()


def _message(n: int) -> Any:
    return make_envelope("task.final", AGENT, {"status": "completed", "exit_code": 0},
                         task_id="t", execution_attempt_id=f"a{n}")


def _logged_failures(h: Any) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in h.logged if e.get("log_failure") is not None]


class _Listener:
    def __init__(self) -> None:
        self.started: list[Session] = []
        self.ended: list[tuple[Session, str]] = []

    def session_started(self, session: Session) -> None:
        self.started.append(session)

    def session_ended(self, session: Session, reason: str) -> None:
        self.ended.append((session, reason))


class AckWaiterTests(SynchronousTestCase):
    def test_waiter_fires_with_the_matching_ack(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        session = h.client.session
        assert session is not None
        envelope = _message(1)
        d = session.send_expecting_ack(envelope)
        self.assertIn(envelope.message_id, [t["message_id"] for t in c.texts()])
        self.assertNoResult(d)
        c.send_text(_ack_for("someone-else"))
        self.assertNoResult(d)
        c.send_text(_ack_for(envelope.message_id))
        self.assertEqual(self.successResultOf(d).payload["acked_message_id"], envelope.message_id)
        self.assertEqual(session.waiting, 0)

    def test_waiters_fail_when_the_session_ends(self) -> None:
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        session = h.client.session
        assert session is not None
        d = session.send_expecting_ack(_message(1))
        c.send_close(1001, b"restarting")
        self.failureResultOf(d, SessionEndedError)
        c.lose()

    def test_no_sends_while_closing(self) -> None:
        """Review #6: a send while closing raised Autobahn's Disconnected and left a waiter."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        session = h.client.session
        assert session is not None
        d = h.client.stop()
        self.assertRaises(SessionEndedError, session.send, _message(1))
        self.assertRaises(SessionEndedError, session.send_expecting_ack, _message(2))
        self.assertEqual(session.waiting, 0)
        c.send_close(1000)
        c.lose()
        self.successResultOf(d)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_second_waiter_for_one_id_is_refused(self) -> None:
        """Review #7: the first waiter was silently orphaned."""
        h = harness(self)
        h.client.start()
        h.active_conn()
        session = h.client.session
        assert session is not None
        envelope = _message(1)
        session.send_expecting_ack(envelope)
        self.assertRaises(ValueError, session.send_expecting_ack, envelope)
        self.assertEqual(session.waiting, 1)


class ListenerTests(SynchronousTestCase):
    def test_started_and_ended_in_order(self) -> None:
        h = harness(self)
        listener = _Listener()
        unsubscribe = h.client.add_session_listener(listener)
        h.client.start()
        c = h.active_conn()
        self.assertEqual(listener.started, [h.client.session])
        c.send_close(1001, b"restarting")
        c.lose()
        ((session, reason),) = listener.ended
        self.assertIs(session, listener.started[0])
        self.assertIn("1001", reason)
        unsubscribe()
        h.reactor.advance(h.client.current_delay or 0)
        h.active_conn()
        self.assertEqual(len(listener.started), 1)

    def test_a_raising_listener_does_not_wedge_the_client(self) -> None:
        """Review #2: an exception in session_ended left the client 'active', never retrying."""
        h = harness(self)

        class Broken(_Listener):
            def session_ended(self, session: Session, reason: str) -> None:
                raise RuntimeError("listener bug")

        h.client.add_session_listener(Broken())
        h.client.start()
        c = h.active_conn()
        c.send_close(1001, b"restarting")
        c.lose()
        self.assertEqual(h.client.state, ClientState.WAITING)
        self.assertEqual(_logged_failures(h), ["a session listener failed"])
        h.reactor.advance(h.client.current_delay or 0)
        h.active_conn()
        self.assertTrue(h.client.is_active)

    def test_a_raising_started_listener_keeps_the_session(self) -> None:
        """Review #9: it was reported as a frame failure and ended the session."""
        h = harness(self)

        class Broken(_Listener):
            def session_started(self, session: Session) -> None:
                raise RuntimeError("flush failed")

        h.client.add_session_listener(Broken())
        h.client.start()
        h.active_conn()
        self.assertTrue(h.client.is_active)
        self.assertEqual(_logged_failures(h), ["a session listener failed"])

    def test_stop_from_session_ended(self) -> None:
        """Review #3: stop() from a listener raised IllegalTransitionError."""
        h = harness(self)
        results: list[Any] = []

        class Stopper(_Listener):
            def session_ended(self, session: Session, reason: str) -> None:
                results.append(h.client.stop())

        h.client.add_session_listener(Stopper())
        h.client.start()
        c = h.active_conn()
        c.send_close(1001, b"restarting")
        c.lose()
        self.successResultOf(results[0])
        self.assertEqual(h.client.state, ClientState.STOPPED)
        self.assertEqual(h.pending_calls(), [])


class ReviewRegressionTests(SynchronousTestCase):
    def test_messages_add_no_timers(self) -> None:
        """Review #1: each message left an entry in the state machine's timer list."""
        h = harness(self)
        h.client.start()
        c = h.active_conn()
        before = h.client.machine.owns_timers()
        for n in range(500):
            c.send_text(_ack_for(f"m{n}"))
        self.assertEqual(h.client.machine.owns_timers(), before)
        self.assertLessEqual(len(h.pending_calls()), 4)  # keepalive loop, assembly check

    def test_stop_from_a_ping_observer_leaves_no_timer(self) -> None:
        """Review #4: the pong deadline was armed after the observer had stopped us."""
        h = harness(self)
        results: list[Any] = []

        def on_event(event: ClientEvent) -> None:
            if event.kind == "ping":
                results.append(h.client.stop())

        h.client.add_observer(on_event)
        h.client.start()
        c = h.active_conn()
        h.reactor.advance(h.settings.ping_interval)
        c.send_close(1000)
        c.lose()
        self.successResultOf(results[0])
        self.assertEqual(h.pending_calls(), [])

    def test_cancelled_active_waiter(self) -> None:
        """Review #5: cancelling a when_active() waiter during activation killed the session."""
        h = harness(self)
        waiter = h.client.when_active()

        def on_event(event: ClientEvent) -> None:
            if event.kind == "active":
                waiter.cancel()

        h.client.add_observer(on_event)
        h.client.start()
        c = h.active_conn()
        self.assertFalse(c.transport.aborted)
        self.assertTrue(h.client.is_active)
        self.failureResultOf(waiter)
