"""PROTOCOL §9.3, every transition of hostlink_tw.agent.polling.PollingCoordinator on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.polling import PollingCoordinator
from hostlink_tw.agent.pollingwiring import split_control_plane


class CoordinatorTests(SynchronousTestCase):
    def make(self, local: bool = True, threshold: float = 30.0) -> PollingCoordinator:
        self.clock = Clock()
        self.changes: list[bool] = []
        return PollingCoordinator(self.clock, local_delivery=local, threshold=threshold,
                                  on_change=self.changes.append)

    def test_polls_until_a_delivering_hello_ack(self) -> None:
        c = self.make()
        self.assertTrue(c.polling)
        c.session_active(True)
        self.assertFalse(c.polling)
        self.assertEqual(self.changes, [False])

    def test_local_flag_off_keeps_polling(self) -> None:
        c = self.make(local=False)
        c.session_active(True)
        self.assertTrue(c.polling)
        self.assertEqual(self.changes, [])
        self.assertIn("flag is off", c.reason)

    def test_peer_delivery_off_keeps_polling(self) -> None:
        c = self.make()
        c.session_active(False)
        self.assertTrue(c.polling)
        self.assertEqual(self.changes, [])

    def test_hello_ack_with_delivery_off_resumes_at_once(self) -> None:
        c = self.make()
        c.session_active(True)
        c.session_active(False)
        self.assertTrue(c.polling)
        self.assertEqual(self.changes, [False, True])

    def test_resumes_threshold_after_the_session_ends(self) -> None:
        c = self.make(threshold=30.0)
        c.session_active(True)
        c.session_ended()
        self.clock.advance(29.9)
        self.assertFalse(c.polling)
        self.clock.advance(0.1)
        self.assertTrue(c.polling)
        self.assertEqual(self.changes, [False, True])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_threshold_zero_resumes_at_once(self) -> None:
        c = self.make(threshold=0)
        c.session_active(True)
        c.session_ended()
        self.assertTrue(c.polling)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_new_delivering_session_within_the_threshold_keeps_it_paused(self) -> None:
        c = self.make(threshold=30.0)
        c.session_active(True)
        c.session_ended()
        self.clock.advance(10)
        c.session_active(True)
        self.clock.advance(60)
        self.assertFalse(c.polling)
        self.assertEqual(self.changes, [False])

    def test_end_of_a_non_delivering_session_changes_nothing(self) -> None:
        c = self.make()
        c.session_active(False)
        c.session_ended()
        self.assertTrue(c.polling)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_the_fallback(self) -> None:
        c = self.make()
        c.session_active(True)
        c.session_ended()
        c.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(c.polling)


class SplitControlPlaneTests(SynchronousTestCase):
    """HOSTLINK_WS_URL set alone would send heartbeats and polls to the production default."""

    def test_different_hosts_are_named(self) -> None:
        message = split_control_plane("https://api.selfhost.dev",
                                      "ws://127.0.0.1:8080/api/v1/agents/ws")
        assert message is not None
        self.assertIn("api.selfhost.dev (SH_CONTROL_PLANE_URL)", message)
        self.assertIn("127.0.0.1 (HOSTLINK_WS_URL)", message)

    def test_same_host_is_quiet(self) -> None:
        self.assertIsNone(split_control_plane("http://127.0.0.1:8080",
                                              "ws://127.0.0.1:8080/api/v1/agents/ws"))
        self.assertIsNone(split_control_plane("https://cp.example/base",
                                              "wss://cp.example/base/api/v1/agents/ws"))
