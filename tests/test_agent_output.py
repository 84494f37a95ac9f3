"""Tests for hostlink_tw.agent.output: one stream cut into chunks (PROTOCOL §8.4, §8.5)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.output import StreamOutput, split_length
from hostlink_tw.wire.tasks import decode_output

EURO = "€".encode()  # e2 82 ac
CLEF = "𝄞".encode()  # f0 9d 84 9e


class _Recorder:
    """Collects what a StreamOutput emits."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, bool]] = []

    def __call__(self, chunk: bytes, truncated: bool) -> None:
        self.chunks.append((chunk, truncated))

    @property
    def data(self) -> bytes:
        return b"".join(chunk for chunk, _ in self.chunks)


def _stream(threshold: int = 8, limit: int = 1000, final_bytes: int = 1000,
            ) -> tuple[StreamOutput, _Recorder]:
    recorder = _Recorder()
    out = StreamOutput("stdout", threshold=threshold, limit=limit, final_bytes=final_bytes,
                       emit=recorder)
    return out, recorder


def _valid_spans(data: bytes) -> list[tuple[int, int]]:
    """Every multi-byte character that is valid UTF-8 in *data*, as (start, end).

    Written independently of the module: Python's strict decoder judges.
    """
    spans = []
    index = 0
    while index < len(data):
        for length in (1, 2, 3, 4):
            try:
                data[index:index + length].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if length > 1:
                spans.append((index, index + length))
            index += length
            break
        else:
            index += 1
    return spans


class ThresholdTests(SynchronousTestCase):
    def test_nothing_below_the_threshold(self) -> None:
        out, rec = _stream(threshold=8)
        out.feed(b"1234567")
        self.assertEqual(rec.chunks, [])
        self.assertEqual(out.pending, 7)

    def test_a_chunk_at_the_threshold(self) -> None:
        out, rec = _stream(threshold=8)
        out.feed(b"1234567")
        out.feed(b"89")
        self.assertEqual(rec.chunks, [(b"12345678", False)])
        self.assertEqual(out.pending, 1)

    def test_a_big_read_is_cut_into_threshold_chunks(self) -> None:
        out, rec = _stream(threshold=4)
        out.feed(b"abcdefghij")
        self.assertEqual(rec.chunks, [(b"abcd", False), (b"efgh", False)])
        out.finish()
        self.assertEqual(rec.chunks[-1], (b"ij", False))

    def test_flush_emits_what_is_pending(self) -> None:
        out, rec = _stream(threshold=8)
        out.feed(b"abc")
        out.flush()
        self.assertEqual(rec.chunks, [(b"abc", False)])
        out.flush()
        self.assertEqual(len(rec.chunks), 1)

    def test_finish_emits_everything_once(self) -> None:
        out, rec = _stream(threshold=8)
        out.feed(b"abc")
        out.finish()
        out.finish()
        out.flush()
        self.assertEqual(rec.chunks, [(b"abc", False)])
        self.assertTrue(out.finished)

    def test_empty_stream_emits_nothing(self) -> None:
        out, rec = _stream()
        out.feed(b"")
        out.finish()
        self.assertEqual(rec.chunks, [])
        self.assertEqual(out.final_text(), "")
        self.assertFalse(out.final_truncated())

    def test_feed_after_finish_is_a_programming_error(self) -> None:
        out, _ = _stream()
        out.finish()
        self.assertRaises(RuntimeError, out.feed, b"x")

    def test_parameters_are_checked(self) -> None:
        def make(**kwargs: int) -> StreamOutput:
            args = {"threshold": 8, "limit": 8, "final_bytes": 8}
            args.update(kwargs)
            return StreamOutput("stdout", emit=lambda c, t: None, **args)

        self.assertRaises(ValueError, make, threshold=3)
        self.assertRaises(ValueError, make, limit=0)
        self.assertRaises(ValueError, make, final_bytes=-1)
        make(threshold=4, limit=1, final_bytes=0)


class Utf8Tests(SynchronousTestCase):
    def test_a_split_character_waits_for_its_end(self) -> None:
        out, rec = _stream(threshold=4)
        out.feed(b"ab" + EURO[:2])
        self.assertEqual(rec.chunks, [(b"ab", False)])
        out.feed(EURO[2:])
        out.flush()
        self.assertEqual(rec.chunks[-1], (EURO, False))

    def test_flush_keeps_the_start_of_a_character(self) -> None:
        out, rec = _stream(threshold=16)
        out.feed(b"x" + CLEF[:3])
        out.flush()
        self.assertEqual(rec.chunks, [(b"x", False)])
        self.assertEqual(out.pending, 3)
        out.feed(CLEF[3:])
        out.flush()
        self.assertEqual(rec.data, b"x" + CLEF)

    def test_a_flush_of_only_a_split_character_emits_nothing(self) -> None:
        out, rec = _stream(threshold=16)
        out.feed(EURO[:1])
        out.flush()
        self.assertEqual(rec.chunks, [])

    def test_finish_emits_the_start_of_a_character(self) -> None:
        out, rec = _stream(threshold=16)
        out.feed(b"x" + EURO[:2])
        out.finish()
        self.assertEqual(rec.chunks, [(b"x" + EURO[:2], False)])

    def test_a_cut_inside_a_big_read_moves_before_the_character(self) -> None:
        out, rec = _stream(threshold=4)
        out.feed(b"abc" + EURO + b"de")
        self.assertEqual(rec.chunks, [(b"abc", False), (EURO + b"d", False)])
        self.assertEqual(out.pending, 1)

    def test_bytes_that_cannot_become_a_character_go_out(self) -> None:
        # A lead the next byte contradicts is invalid anyway: it is not held.
        out, rec = _stream(threshold=4)
        out.feed(b"abc\xe2")
        self.assertEqual(rec.chunks, [(b"abc", False)])
        out.feed(b"x")
        out.flush()
        self.assertEqual(rec.data, b"abc\xe2x")

    def test_invalid_leads_are_never_held(self) -> None:
        for tail in (b"\xc0", b"\xc1", b"\xf5", b"\xff", b"\xe0\x80", b"\xed\xa0",
                     b"\xf0\x80", b"\xf4\x90", b"\x80"):
            out, rec = _stream(threshold=16)
            out.feed(b"a" + tail)
            out.flush()
            self.assertEqual(rec.data, b"a" + tail, tail)

    def test_valid_starts_are_held(self) -> None:
        for tail in (b"\xc2", b"\xe0\xa0", b"\xed\x9f", b"\xf0\x90", b"\xf4\x8f\xbf",
                     b"\xe2\x82"):
            out, _ = _stream(threshold=16)
            out.feed(b"a" + tail)
            out.flush()
            self.assertEqual(out.pending, len(tail), tail)

    def test_split_length(self) -> None:
        self.assertEqual(split_length(b"ab" + EURO, 3), 1)
        self.assertEqual(split_length(b"ab" + EURO, 4), 2)
        self.assertEqual(split_length(b"ab" + EURO, 5), 0)
        self.assertEqual(split_length(b"ab" + EURO[:2], 4), 2)  # nothing after: may come
        self.assertEqual(split_length(b"ab" + EURO[:2] + b"z", 4), 0)  # broken anyway
        self.assertEqual(split_length(CLEF, 3), 3)
        self.assertEqual(split_length(b"\x80\x80\x80\x80", 4), 0)
        self.assertEqual(split_length(b"", 0), 0)


class LimitTests(SynchronousTestCase):
    def test_exactly_the_limit_is_not_truncated(self) -> None:
        out, rec = _stream(threshold=4, limit=8)
        out.feed(b"abcdefgh")
        # The chunk that reaches the limit waits: one more byte would truncate it.
        self.assertEqual(rec.chunks, [(b"abcd", False)])
        out.flush()
        self.assertEqual(rec.chunks, [(b"abcd", False)])
        out.finish()
        self.assertEqual(rec.chunks, [(b"abcd", False), (b"efgh", False)])
        self.assertFalse(out.truncated)
        self.assertFalse(out.final_truncated())

    def test_one_byte_past_the_limit_truncates(self) -> None:
        out, rec = _stream(threshold=4, limit=8)
        out.feed(b"abcdefgh")
        out.feed(b"i")
        self.assertEqual(rec.chunks, [(b"abcd", False), (b"efgh", True)])
        out.feed(b"more and more")
        out.flush()
        out.finish()
        self.assertEqual(len(rec.chunks), 2)
        self.assertTrue(out.truncated)
        self.assertTrue(out.final_truncated())
        self.assertEqual((out.total_bytes, out.kept_bytes), (22, 8))

    def test_limit_passed_in_one_read(self) -> None:
        out, rec = _stream(threshold=4, limit=6)
        out.feed(b"abcdefghij")
        self.assertEqual(rec.chunks, [(b"abcd", False), (b"ef", True)])

    def test_limit_inside_a_character_emits_its_start(self) -> None:
        # The rest of the character is discarded: its start can never be completed.
        out, rec = _stream(threshold=16, limit=3)
        out.feed(b"a" + EURO)
        self.assertEqual(rec.chunks, [(b"a" + EURO[:2], True)])

    def test_limit_smaller_than_the_threshold(self) -> None:
        out, rec = _stream(threshold=16, limit=1)
        out.feed(b"a")
        out.flush()
        self.assertEqual(rec.chunks, [])
        out.finish()
        self.assertEqual(rec.chunks, [(b"a", False)])


class FinalTextTests(SynchronousTestCase):
    def test_the_whole_stream_when_it_fits(self) -> None:
        out, _ = _stream(threshold=4, final_bytes=10)
        out.feed(b"0123456789")
        out.finish()
        self.assertEqual(out.final_text(), "0123456789")
        self.assertFalse(out.final_truncated())

    def test_the_last_bytes_when_it_does_not(self) -> None:
        out, _ = _stream(threshold=4, final_bytes=4)
        out.feed(b"0123456789")
        self.assertEqual(out.final_text(), "6789")
        self.assertTrue(out.final_truncated())

    def test_the_cut_starts_on_a_character(self) -> None:
        out, _ = _stream(threshold=4, final_bytes=4)
        out.feed(b"ab" + EURO + b"xy")  # the last 4 bytes start inside the euro
        self.assertEqual(out.final_text(), "xy")
        out, _ = _stream(threshold=4, final_bytes=5)
        out.feed(b"ab" + EURO + b"xy")
        self.assertEqual(out.final_text(), "€xy")

    def test_the_limit_applies_first(self) -> None:
        out, _ = _stream(threshold=4, limit=5, final_bytes=100)
        out.feed(b"0123456789")
        self.assertEqual(out.final_text(), "01234")
        self.assertTrue(out.final_truncated())

    def test_invalid_bytes_are_replaced(self) -> None:
        out, _ = _stream(threshold=4)
        out.feed(b"a\xff" + EURO[:2])
        self.assertEqual(out.final_text(), "a\ufffd\ufffd\ufffd")

    def test_no_final_text(self) -> None:
        out, _ = _stream(threshold=4, final_bytes=0)
        out.feed(b"abc")
        self.assertEqual(out.final_text(), "")
        self.assertTrue(out.final_truncated())

    def test_memory_is_bounded_by_the_final_size(self) -> None:
        out, rec = _stream(threshold=1024, limit=10 * 2**20, final_bytes=100)
        for _ in range(64):
            out.feed(b"x" * 65536)
            self.assertLessEqual(len(out._tail), 100)
            self.assertLess(out.pending, 1024)
        self.assertEqual(out.kept_bytes, 4 * 2**20)
        self.assertEqual(len(rec.chunks), 4 * 1024)


# Bytes biased towards text: ASCII, whole multi-byte characters, their pieces
# and invalid bytes, so splits and invalid sequences both occur often.
_pieces = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([EURO, CLEF, EURO[:2], EURO[2:], CLEF[:1], CLEF[1:], b"\xff", b"\xc0"]),
)
_actions = st.lists(st.one_of(_pieces, st.just(None)), max_size=40)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(actions=_actions, threshold=st.integers(4, 20), limit=st.integers(1, 120),
           final_bytes=st.integers(0, 60))
    def test_chunks_keep_the_rules(self, actions: list[bytes | None], threshold: int,
                                   limit: int, final_bytes: int) -> None:
        out, rec = _stream(threshold=threshold, limit=limit, final_bytes=final_bytes)
        fed = b""
        for action in actions:
            if action is None:  # a flush interval passed
                out.flush()
                if len(fed) < limit:
                    # Only the start of a character the next read may complete stays.
                    self.assertLessEqual(out.pending, 3)
            else:
                out.feed(action)
                fed += action
                # A full chunk always goes, but the one held at an exact limit.
                if len(fed) == limit:
                    self.assertLessEqual(out.pending, threshold)
                else:
                    self.assertLess(out.pending, threshold)
        out.finish()
        kept = fed[:limit]
        self.assertEqual(out.pending, 0)
        self.assertEqual(rec.data, kept)
        self.assertEqual((out.total_bytes, out.kept_bytes), (len(fed), len(kept)))
        for chunk, _ in rec.chunks:
            self.assertTrue(0 < len(chunk) <= threshold)
        flags = [flag for _, flag in rec.chunks]
        truncated = len(fed) > limit
        self.assertEqual(flags, [False] * (len(flags) - 1) + [truncated] if flags else [])
        # No boundary falls inside a character that is valid in the kept stream.
        boundaries = set()
        position = 0
        for chunk, _ in rec.chunks:
            position += len(chunk)
            boundaries.add(position)
        for start, end in _valid_spans(kept):
            self.assertFalse(any(start < b < end for b in boundaries), (start, end))
        # Hence the chunks' texts make the stream's text, as one decode does.
        self.assertEqual("".join(decode_output(c) for c, _ in rec.chunks),
                         decode_output(kept))
        # The final.
        if len(kept) <= final_bytes:
            expected = kept
        else:
            expected = kept[len(kept) - final_bytes:]
            skip = 0
            while skip < min(3, len(expected)) and 0x80 <= expected[skip] <= 0xBF:
                skip += 1
            expected = expected[skip:]
        self.assertEqual(out.final_text(), decode_output(expected))
        self.assertEqual(out.final_truncated(), truncated or len(kept) > final_bytes)
