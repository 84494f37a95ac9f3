"""
Tests for hostlink_tw.controlplane.testlayer on a Clock: the test layer is
a set of gateway hooks, and untouched it answers as the real gateway does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.controlplane import ControlPlane
from hostlink_tw.controlplane.hooks import GatewayHooks
from hostlink_tw.controlplane.sessions import Session
from hostlink_tw.controlplane.testlayer import TestControls
from hostlink_tw.protocol import AGENT_HELLO, make_envelope


class _Connection:
    """A stand-in for the gateway's protocol (hooks only store and compare it)."""

    def send_frame(self, data: bytes, *, is_binary: bool) -> None:
        pass

    def close_with(self, code: int, reason: str = "") -> None:
        pass

    def abort(self) -> None:
        pass


def _session() -> Session:
    return Session(_Connection(), "agent-1", "127.0.0.1:1", 0.0)


def _answers(hooks: GatewayHooks) -> tuple[Any, ...]:
    connection: Any = _Connection()
    return (hooks.refusal(), hooks.hold(connection), hooks.answer_ping(),
            hooks.ack_hello(_session()))


class TestLayerTests(SynchronousTestCase):
    def test_untouched_it_is_the_real_gateway(self) -> None:
        """Fresh test controls answer every hook as the real gateway's defaults do."""
        real = _answers(GatewayHooks())
        self.assertEqual(real, (None, None, True, True))
        self.assertEqual(_answers(TestControls(Clock())), real)

    def test_control_plane_installs_it_on_its_gateway(self) -> None:
        """The documented knobs of ControlPlane are the test layer's."""
        cp = ControlPlane({}, reactor=Clock(), database=False, record_messages=7)
        self.assertIsInstance(cp.controls, GatewayHooks)
        self.assertEqual(cp.controls.record_messages, 7)
        cp.answer_pings = False
        cp.withhold_hello_ack = True
        self.assertEqual((cp.controls.answer_ping(), cp.controls.ack_hello(_session())),
                         (False, False))
        self.assertIs(cp.attempts, cp.controls.attempts)

    def test_refusal_for_a_while(self) -> None:
        """A refusal with a duration ends on the reactor given; no timer is left."""
        clock = Clock()
        controls = TestControls(clock)
        controls.refuse_upgrades(429, duration=5)
        self.assertEqual(controls.refusal(), (429, "Too Many Requests"))
        clock.advance(5)
        self.assertIsNone(controls.refusal())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stall_holds_until_cleared(self) -> None:
        """Held upgrades are released together; one whose connection is gone is forgotten."""
        controls = TestControls(Clock())
        controls.stall_upgrades()
        first: Any = _Connection()
        second: Any = _Connection()
        held = controls.hold(first)
        assert held is not None
        self.assertIsNotNone(controls.hold(second))
        controls.released(second)
        self.assertEqual(controls.stalled_count, 1)
        controls.clear_stall()
        self.assertEqual(self.successResultOf(held), None)
        self.assertEqual((controls.stalled_count, controls.hold(first)), (0, None))

    def test_stop_cancels_timers(self) -> None:
        clock = Clock()
        controls = TestControls(clock)
        controls.refuse_upgrades(duration=5)
        controls.stall_upgrades(duration=5)
        controls.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        connection: Any = _Connection()
        self.assertIsNone(controls.hold(connection))

    def test_recording_is_bounded_in_bytes(self) -> None:
        """record_messages keeps at most that many bytes of envelopes per session."""
        controls = TestControls(Clock(), record_messages=10)
        session = _session()
        envelopes = [make_envelope(AGENT_HELLO, "agent-1", {}) for _ in range(3)]
        for envelope in envelopes:
            controls.inbound(session, envelope, 4)
        self.assertEqual(list(session.received), envelopes[1:])
        controls.record_messages = 0
        controls.inbound(session, envelopes[0], 4)
        self.assertEqual(list(session.received), envelopes[1:])
