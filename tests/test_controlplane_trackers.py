"""Tests for hostlink_tw.controlplane.trackers: de-duplication and output sequences."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.controlplane.trackers import (
    DuplicateTracker,
    OutputSequenceTracker,
    SequenceVerdict,
)
from hostlink_tw.protocol import ProtocolError

from .test_protocol import FUZZ


class DuplicateTrackerTests(SynchronousTestCase):
    """DuplicateTracker."""

    def test_repeat(self) -> None:
        """The first sighting is new, every later one a repeat."""
        tracker = DuplicateTracker()
        self.assertFalse(tracker.seen("a"))
        self.assertTrue(tracker.seen("a"))
        self.assertTrue(tracker.seen("a"))
        self.assertFalse(tracker.seen("b"))
        self.assertIn("a", tracker)

    def test_bounded(self) -> None:
        """Past max_entries the oldest id is forgotten; size never exceeds the bound."""
        tracker = DuplicateTracker(max_entries=3)
        for message_id in "abcd":
            self.assertFalse(tracker.seen(message_id))
        self.assertEqual(len(tracker), 3)
        self.assertNotIn("a", tracker)
        self.assertTrue(tracker.seen("d"))
        self.assertFalse(tracker.seen("a"))  # forgotten, so new again

    def test_repeat_refreshes(self) -> None:
        """A repeated id counts as recent and outlives older ones."""
        tracker = DuplicateTracker(max_entries=2)
        tracker.seen("a")
        tracker.seen("b")
        tracker.seen("a")
        tracker.seen("c")
        self.assertEqual(("a" in tracker, "b" in tracker), (True, False))

    def test_default_bound(self) -> None:
        """A long session stays at 10000 remembered ids."""
        tracker = DuplicateTracker()
        for number in range(25_000):
            tracker.seen(f"msg_{number}")
        self.assertEqual(len(tracker), 10_000)
        self.assertTrue(tracker.seen("msg_24999"))
        tracker.clear()
        self.assertEqual(len(tracker), 0)

    def test_bad_bound(self) -> None:
        """A bound below 1 is refused."""
        for bad in (0, -1, True, 1.5):
            self.assertRaises(ProtocolError, DuplicateTracker, bad)


class OutputSequenceTrackerTests(SynchronousTestCase):
    """OutputSequenceTracker."""

    def test_in_order(self) -> None:
        """Sequences start at 1; each accepted one moves the expectation on."""
        tracker = OutputSequenceTracker()
        self.assertEqual(tracker.check("a", "stdout", 1), SequenceVerdict("accepted", 2))
        self.assertEqual(tracker.check("a", "stdout", 2), SequenceVerdict("accepted", 3))
        self.assertEqual(tracker.highest("a", "stdout"), 2)

    def test_duplicate(self) -> None:
        """Lower or equal to the highest is a duplicate; the expectation stays."""
        tracker = OutputSequenceTracker()
        tracker.check("a", "stdout", 1)
        tracker.check("a", "stdout", 2)
        for sequence in (2, 1, 0, -5):
            verdict = tracker.check("a", "stdout", sequence)
            self.assertEqual(verdict, SequenceVerdict("duplicate", 3))
            self.assertFalse(verdict.retryable)

    def test_gap(self) -> None:
        """Higher than highest + 1 is a retryable gap naming the missing sequence."""
        tracker = OutputSequenceTracker()
        verdict = tracker.check("a", "stdout", 2)
        self.assertEqual(verdict, SequenceVerdict("gap", 1))
        self.assertTrue(verdict.retryable)
        self.assertEqual(tracker.highest("a", "stdout"), 0)  # a gap is not accepted
        self.assertEqual(tracker.check("a", "stdout", 1).status, "accepted")
        self.assertEqual(tracker.check("a", "stdout", 2).status, "accepted")

    def test_per_attempt_and_stream(self) -> None:
        """Attempts and streams count independently."""
        tracker = OutputSequenceTracker()
        tracker.check("a", "stdout", 1)
        self.assertEqual(tracker.check("a", "stderr", 1).status, "accepted")
        self.assertEqual(tracker.check("b", "stdout", 1).status, "accepted")
        self.assertEqual(tracker.check("a", "stdout", 1).status, "duplicate")

    def test_bounded(self) -> None:
        """Past max_attempts the least recently used attempt is forgotten."""
        tracker = OutputSequenceTracker(max_attempts=2)
        tracker.check("a", "stdout", 1)
        tracker.check("b", "stdout", 1)
        tracker.check("a", "stdout", 2)  # "a" is now the most recent
        tracker.check("c", "stdout", 1)
        self.assertEqual(len(tracker), 2)
        self.assertEqual(tracker.highest("b", "stdout"), 0)
        self.assertEqual(tracker.highest("a", "stdout"), 2)
        for number in range(5000):
            tracker.check(f"x{number}", "stdout", 1)
        self.assertEqual(len(tracker), 2)

    def test_forget(self) -> None:
        """A forgotten attempt starts again at 1."""
        tracker = OutputSequenceTracker()
        tracker.check("a", "stdout", 1)
        tracker.forget("a")
        tracker.forget("never-seen")
        self.assertEqual(len(tracker), 0)
        self.assertEqual(tracker.check("a", "stdout", 1).status, "accepted")

    def test_bad_arguments(self) -> None:
        """Unknown streams, non-integer sequences and bad bounds raise ProtocolError."""
        tracker = OutputSequenceTracker()
        self.assertRaises(ProtocolError, tracker.check, "a", "stdin", 1)
        self.assertRaises(ProtocolError, tracker.check, "a", "stdout", True)
        self.assertRaises(ProtocolError, tracker.check, "a", "stdout", 1.0)
        self.assertRaises(ProtocolError, OutputSequenceTracker, 0)
        self.assertEqual(len(tracker), 0)

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["stdout", "stderr"]),
                              st.integers(min_value=-2, max_value=8)), max_size=60))
    def test_model(self, checks: list[tuple[str, str, int]]) -> None:
        """Against a plain model: verdicts follow highest + 1 for any order of arrivals."""
        tracker = OutputSequenceTracker()
        highest: dict[tuple[str, str], int] = {}
        for attempt, stream, sequence in checks:
            expected = highest.get((attempt, stream), 0) + 1
            verdict = tracker.check(attempt, stream, sequence)
            if sequence == expected:
                highest[(attempt, stream)] = sequence
                self.assertEqual(verdict, SequenceVerdict("accepted", sequence + 1))
            elif sequence < expected:
                self.assertEqual(verdict, SequenceVerdict("duplicate", expected))
            else:
                self.assertEqual(verdict, SequenceVerdict("gap", expected))
