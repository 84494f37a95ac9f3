"""
The wire vocabulary both sides share (:mod:`hostlink_tw.wire.vocabulary`).

Envelopes and payloads (:mod:`hostlink_tw.protocol`) and request signing
(:mod:`hostlink_tw.signing`) build on it.
"""
