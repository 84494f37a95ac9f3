"""
One output stream of one task attempt, cut into chunks (PROTOCOL §8.4, §8.5).

:class:`StreamOutput` is pure logic, with no process and no reactor: the
runner feeds it what it reads from a pipe, calls :meth:`~StreamOutput.flush`
on its flush interval and :meth:`~StreamOutput.finish` when the pipe closes,
and gets chunks back through a callback.  The rules it keeps:

* a chunk goes out each time the flush threshold is pending, never longer
  than the threshold;
* a chunk never splits a multi-byte UTF-8 character that the next read could
  complete: the valid start of such a character (at most 3 bytes) waits for
  the next read, but bytes that can never become a valid character go out as
  they are (``data`` shows them as U+FFFD, :func:`~hostlink_tw.wire.tasks.decode_output`);
* past the per-stream limit, bytes are read and discarded, and the chunk that
  reaches the limit carries ``truncated_locally``; a stream of exactly the
  limit is not truncated, so the chunk ending at the limit waits until one
  more byte (truncated) or the end of the stream (not truncated) decides;
* the text for the final is the kept stream when it fits in the final's
  size, else its last that-many bytes -- kept in a bounded tail, never the
  whole stream.
"""

from __future__ import annotations

from collections.abc import Callable

from hostlink_tw.wire.tasks import decode_output

__all__ = ["MIN_THRESHOLD", "StreamOutput", "split_length"]

#: The smallest flush threshold: a chunk must hold at least one whole
#: character of up to 4 bytes after the start of a split one was held back.
MIN_THRESHOLD = 4


def _sequence_length(lead: int) -> int:
    """Return the length of the UTF-8 sequence *lead* starts, 0 if it starts none.

    ``C0``, ``C1`` and ``F5``-``FF`` start nothing valid (overlong or beyond
    U+10FFFF); ASCII is a sequence of one.
    """
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


# The second byte of these leads has a narrower range: it rules out overlong
# forms (E0, F0), surrogates (ED) and code points past U+10FFFF (F4).
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _valid_start(sequence: bytes | bytearray) -> bool:
    """Whether *sequence* is a complete UTF-8 character or the valid start of one."""
    lead = sequence[0]
    if _sequence_length(lead) < len(sequence):
        return False
    for index, byte in enumerate(sequence[1:], start=1):
        low, high = _SECOND_BYTE.get(lead, (0x80, 0xBF)) if index == 1 else (0x80, 0xBF)
        if not low <= byte <= high:
            return False
    return True


def split_length(buffer: bytes | bytearray, cut: int) -> int:
    """Return how many bytes before *cut* start a character that *cut* would split.

    0 when cutting *buffer* at *cut* splits no character that is (or, with
    the bytes not read yet, could still become) valid UTF-8.  The bytes after
    *cut* that *buffer* already holds decide: a character they break is
    invalid anyway and may be cut anywhere.  At most 3.
    """
    for back in range(1, min(3, cut) + 1):
        start = cut - back
        if 0x80 <= buffer[start] <= 0xBF:
            continue  # a continuation byte: its lead is further back
        length = _sequence_length(buffer[start])
        if length <= back:
            return 0  # the character ends before the cut, or is no character
        return back if _valid_start(buffer[start : start + length]) else 0
    return 0


class StreamOutput:
    """The output of one stream (``stdout`` or ``stderr``) of one attempt.

    :param stream: the stream's name, as the wire has it.
    :param threshold: the flush threshold: the most bytes a chunk holds
        (at least :data:`MIN_THRESHOLD`).
    :param limit: the per-stream limit: bytes past it are discarded (≥ 1).
    :param final_bytes: how many of the last kept bytes the final's text keeps (≥ 0).
    :param emit: called with each chunk and its ``truncated_locally`` flag,
        in order.
    :raises ValueError: for a parameter out of its range.
    """

    def __init__(
        self,
        stream: str,
        *,
        threshold: int,
        limit: int,
        final_bytes: int,
        emit: Callable[[bytes, bool], None],
    ) -> None:
        if threshold < MIN_THRESHOLD:
            raise ValueError(f"the flush threshold must be at least {MIN_THRESHOLD} bytes")
        if limit < 1:
            raise ValueError("the output limit must be at least 1 byte")
        if final_bytes < 0:
            raise ValueError("the final's output size must not be negative")
        self.stream = stream
        self._threshold = threshold
        self._limit = limit
        self._final_bytes = final_bytes
        self._emit = emit
        self._pending = bytearray()
        # The last final_bytes kept bytes: all the final's text needs.
        self._tail = bytearray()
        self._total = 0
        self._kept = 0
        # Nothing goes out any more: the truncated chunk went, or the stream ended.
        self._done = False
        self._finished = False

    @property
    def total_bytes(self) -> int:
        """Every byte fed, the discarded ones included."""
        return self._total

    @property
    def kept_bytes(self) -> int:
        """The bytes kept: at most the limit."""
        return self._kept

    @property
    def pending(self) -> int:
        """The kept bytes not emitted yet."""
        return len(self._pending)

    @property
    def truncated(self) -> bool:
        """Whether the stream passed its limit (some bytes were discarded)."""
        return self._total > self._limit

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` was called."""
        return self._finished

    def feed(self, data: bytes) -> None:
        """Take *data*, the next bytes read from the stream; emit every full chunk.

        :raises RuntimeError: after :meth:`finish`.
        """
        if self._finished:
            raise RuntimeError(f"{self.stream} has ended: nothing more can be fed")
        self._total += len(data)
        kept = data[: max(self._limit - self._kept, 0)]
        if kept:
            self._kept += len(kept)
            self._pending += kept
            self._keep_tail(kept)
        self._drain(everything=False, partial=False)

    def flush(self) -> None:
        """Emit what is pending, but the start of a character the next read may complete."""
        self._drain(everything=False, partial=True)

    def finish(self) -> None:
        """The stream ended: emit everything pending.  Calling it again does nothing."""
        if not self._finished:
            self._finished = True
            self._drain(everything=True, partial=True)
            self._done = True

    def final_text(self) -> str:
        """Return the final's text: the kept stream, or its last ``final_bytes`` bytes.

        A cut tail starts on a character boundary (the continuation bytes of
        a character whose start was cut off are dropped), so it may be up to
        3 bytes shorter than ``final_bytes``.
        """
        tail = self._tail
        if self._kept > self._final_bytes:
            skip = 0
            while skip < min(3, len(tail)) and 0x80 <= tail[skip] <= 0xBF:
                skip += 1
            tail = tail[skip:]
        return decode_output(bytes(tail))

    def final_truncated(self) -> bool:
        """Whether :meth:`final_text` is not the whole stream.

        It was cut by the limit, by ``final_bytes``, or by both.
        """
        return self.truncated or self._kept > self._final_bytes

    def _keep_tail(self, kept: bytes) -> None:
        size = self._final_bytes
        if size == 0:
            return
        if len(kept) >= size:
            self._tail[:] = kept[-size:]
        else:
            self._tail += kept
            if len(self._tail) > size:
                del self._tail[: len(self._tail) - size]

    def _drain(self, *, everything: bool, partial: bool) -> None:
        """Emit the chunks the rules allow.

        *partial*: a chunk shorter than the threshold may go (flush, finish).
        *everything*: nothing is held back, not even a split character (finish).
        """
        pending = self._pending
        truncated = self.truncated
        while pending and not self._done:
            if len(pending) > self._threshold:
                # More follows this chunk: a character it splits is known.
                size = self._threshold - split_length(pending, self._threshold)
            elif truncated or everything:
                # The last chunk: the bytes a held character needs will never come.
                size = len(pending)
            elif self._kept == self._limit:
                # Exactly at the limit: one more byte or the end decides the flag.
                return
            elif len(pending) == self._threshold or partial:
                size = len(pending) - split_length(pending, len(pending))
                if size == 0:
                    return
            else:
                return
            chunk = bytes(pending[:size])
            del pending[:size]
            last = truncated and not pending
            if last:
                self._done = True
            self._emit(chunk, last)
