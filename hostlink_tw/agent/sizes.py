"""
Keeping what the agent sends within the message size limit.

Autobahn applies ``maxMessagePayloadSize`` (``HOSTLINK_WS_MAX_MESSAGE_BYTES``)
to outgoing messages too, and a control plane closes with 1009 above its
own limit.  Raw bytes are not the measure: JSON escapes a control byte as
six characters and an invalid byte becomes U+FFFD (three), so 256 KiB of
output can take 1.5 MiB on the wire.  A message that cannot be sent would
block the outbox behind it (and a hello that cannot be sent, every session),
so the agent measures the *encoded* size:

* :func:`fit_final` cuts a final's ``output``/``error`` from the front
  (the end of a stream is what matters) until the envelope fits, and sets
  the matching ``*_truncated`` flag (§8.5: the text is not the whole stream);
* :func:`encoded_size` is what both this and the hello's budget
  (:func:`hostlink_tw.agent.tasksnapshot.build_hello`) count;
* :func:`chunk_threshold` bounds the flush threshold so that even a chunk of
  control bytes fits.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ENVELOPE_ALLOWANCE", "chunk_threshold", "encoded_size", "fit_final"]

#: Room kept for the envelope around a payload (ids, times, field names).
ENVELOPE_ALLOWANCE = 4096

#: The most bytes one raw output byte can take in a JSON string (``\u0001``).
_WORST_EXPANSION = 6


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as the envelope writes it (compact JSON, UTF-8)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def fit_final(payload: dict[str, Any], limit: int) -> dict[str, Any]:
    """``payload`` (a final's) cut so that it takes at most ``limit`` bytes encoded."""
    size = encoded_size(payload)
    if size <= limit:
        return payload
    fitted = dict(payload)
    while size > limit:
        texts = [k for k in ("output", "error") if fitted.get(k)]
        if not texts:
            break  # nothing left to cut: the limit is smaller than the fields
        key = max(texts, key=lambda k: len(fitted[k]))
        excess = size - limit
        # At least one character, at most what the excess can be worth.
        cut = max(1, excess // _WORST_EXPANSION)
        fitted[key] = fitted[key][cut:]
        fitted[f"{key}_truncated"] = True
        size = encoded_size(fitted)
    for key in ("output", "error"):
        if key in fitted and not fitted[key]:
            del fitted[key]
    return fitted


def chunk_threshold(threshold: int, max_message_bytes: int) -> int:
    """The flush threshold, lowered if a chunk of it could exceed the message limit."""
    room = (max_message_bytes - ENVELOPE_ALLOWANCE) // _WORST_EXPANSION
    return max(1024, min(threshold, room))
