"""hostlink_tw.agent.sizes: what leaves fits the message limit, measured encoded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.sizes import chunk_threshold, encoded_size, fit_final
from hostlink_tw.wire.tasks import decode_output, final_payload


class FitFinalTests(SynchronousTestCase):
    def test_a_small_final_is_untouched(self) -> None:
        payload = final_payload("completed", 0, "ok", "")
        self.assertIs(fit_final(payload, 1000), payload)

    def test_control_bytes_are_measured_escaped(self) -> None:
        text = decode_output(b"\x01" * 10_000)  # 10 kB raw, 60 kB encoded
        payload = final_payload("failed", 1, text, "")
        fitted = fit_final(payload, 20_000)
        self.assertLessEqual(encoded_size(fitted), 20_000)
        self.assertTrue(fitted["output_truncated"])
        self.assertFalse(fitted["error_truncated"])
        self.assertTrue(text.endswith(fitted["output"]))  # the end of the stream is kept

    def test_the_longer_text_is_cut_first(self) -> None:
        payload = final_payload("failed", 1, "o" * 5000, "e" * 100)
        fitted = fit_final(payload, 2000)
        self.assertEqual(fitted["error"], "e" * 100)
        self.assertFalse(fitted["error_truncated"])

    @given(st.binary(max_size=3000), st.binary(max_size=3000),
           st.integers(min_value=200, max_value=20_000))
    def test_always_fits_and_keeps_tails(self, out: bytes, err: bytes, limit: int) -> None:
        payload = final_payload("failed", 2, decode_output(out), decode_output(err))
        fitted = fit_final(payload, limit)
        self.assertLessEqual(encoded_size(fitted), max(limit, encoded_size(
            final_payload("failed", 2, "", "", True, True))))
        for key in ("output", "error"):
            whole = payload.get(key, "")
            kept = fitted.get(key, "")
            self.assertTrue(whole.endswith(kept))
            self.assertEqual(fitted[f"{key}_truncated"], kept != whole)


class ThresholdTests(SynchronousTestCase):
    def test_default_threshold_fits_the_default_limit(self) -> None:
        self.assertEqual(chunk_threshold(16384, 1048576), 16384)

    def test_a_threshold_too_large_for_the_limit_is_lowered(self) -> None:
        threshold = chunk_threshold(1048576, 1048576)
        self.assertLess(threshold * 6 + 4096, 1048576 + 1)
