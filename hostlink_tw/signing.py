"""
Signed requests under the import path they have always had.

The code lives in :mod:`hostlink_tw.wire.signing` (the four headers of
PROTOCOL §2: :class:`RequestSigner` on the agent's side,
:func:`verify_signature` on the control plane's); every name exported here
keeps working.
"""

from hostlink_tw.wire.signing import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    NONCE_BYTES,
    SIGNED_HEADERS,
    RequestSigner,
    SigningError,
    signed_message,
    verify_signature,
)

__all__ = [
    "HEADER_AGENT_ID",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "NONCE_BYTES",
    "SIGNED_HEADERS",
    "RequestSigner",
    "SigningError",
    "signed_message",
    "verify_signature",
]
