"""Signed requests: the four authentication headers of PROTOCOL §2.

Every authenticated request (each HTTP call and each WebSocket upgrade)
carries, freshly generated for that request:

* ``X-Agent-ID``: the agent id;
* ``X-Timestamp``: the current Unix time in whole seconds, decimal;
* ``X-Nonce``: standard base64 (with padding) of 16 bytes from a CSPRNG;
* ``X-Signature``: standard base64 of RSA-PSS (SHA-256, MGF1-SHA-256, salt
  length the maximum the key allows: what Go's ``rsa.SignPSS`` with nil
  options produces) over the UTF-8 string ``agent_id|timestamp|nonce``.

The control plane rejects a timestamp more than 300 s from its clock and may
reject a nonce it has seen, so headers are never reused: call
:meth:`RequestSigner.sign_headers` for each request (a reconnect signs again).

Nonces, signatures and key material never appear in log events or exception
messages raised here.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import time
from collections.abc import Callable, MutableMapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from twisted.web.http_headers import Headers

# The file constructor of RequestSigner loads the key the agent runs on: the
# agent's loader, so that a key file reads the same everywhere.
from hostlink_tw.agent.identity import load_private_key
from hostlink_tw.wire.keys import MIN_RSA_BITS

# The header names are the wire vocabulary's (re-exported here).
from hostlink_tw.wire.vocabulary import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SIGNED_HEADERS,
    check_agent_id,
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


#: Random bytes in each nonce (PROTOCOL §2).
NONCE_BYTES = 16

# A signature is as long as the modulus: 16384-bit keys give 2048 bytes,
# 2732 base64 characters.  Anything longer is refused before decoding so a
# hostile header cannot make the verifier decode megabytes.
_MAX_SIGNATURE_B64 = 4096


class SigningError(Exception):
    """
    A :class:`RequestSigner` cannot be built or cannot sign.

    Raised for an unusable agent id, a key given to :meth:`RequestSigner.from_key`
    that is not a usable RSA key, or an injected clock or random source that
    returns something unusable.  A key *file* that cannot be used raises
    :class:`~hostlink_tw.wire.keys.IdentityError` instead (see
    :class:`RequestSigner`).
    """


def signed_message(agent_id: str, timestamp: str, nonce: str) -> bytes:
    """
    The bytes that are signed: UTF-8 of ``agent_id|timestamp|nonce``.

    :raises UnicodeEncodeError: ``agent_id`` holds lone surrogates.
    """
    return f"{agent_id}|{timestamp}|{nonce}".encode()


def _pss(salt_length: padding._MaxLength | padding._Auto | int) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)


class RequestSigner:
    """
    Produces the signed headers of PROTOCOL §2 for one agent.

    :ivar agent_id: The agent id the headers carry (read-only).
    """

    _key: RSAPrivateKey
    _agent_id: str
    _clock: Callable[[], float]
    _random_bytes: Callable[[int], bytes]

    def __init__(
        self,
        private_key_path: str,
        agent_id: str,
        *,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """
        Load the key at ``private_key_path`` and sign as ``agent_id``.

        The agent id is checked first, so a bad id is reported without
        touching the key file.

        :param clock: Returns the current Unix time in seconds (for tests a
            :class:`twisted.internet.task.Clock`'s ``seconds``).
        :param random_bytes: Returns that many random bytes; the default is
            the operating system's CSPRNG.  Only tests should replace it.
        :raises SigningError: ``agent_id`` is empty, not a string, or not
            usable as a header value.
        :raises ~hostlink_tw.wire.keys.IdentityError: The key file cannot be
            used (missing, unsafe permissions, not RSA, too small, encrypted,
            garbage...): its message names the file and the fix, which a
            wrapper here would only hide.
        """
        agent_id = _checked_agent_id(agent_id)
        key = load_private_key(private_key_path)
        self._setup(key, agent_id, clock, random_bytes)

    @classmethod
    def from_key(
        cls,
        key: RSAPrivateKey,
        agent_id: str,
        *,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> RequestSigner:
        """
        A signer for a key already in memory (tests, a just-generated key).

        :raises SigningError: ``agent_id`` is unusable, or ``key`` is not an RSA
            private key of at least 2048 bits.
        """
        agent_id = _checked_agent_id(agent_id)
        if not isinstance(key, RSAPrivateKey):
            raise SigningError(
                f"the signing key must be an RSA private key, not {type(key).__name__}"
            )
        if key.key_size < MIN_RSA_BITS:
            raise SigningError(
                f"the signing key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
        signer = cls.__new__(cls)
        signer._setup(key, agent_id, clock, random_bytes)
        return signer

    def _setup(
        self,
        key: RSAPrivateKey,
        agent_id: str,
        clock: Callable[[], float],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self._key = key
        self._agent_id = agent_id
        self._clock = clock
        self._random_bytes = random_bytes

    def __repr__(self) -> str:
        # Deliberately nothing about the key.
        return f"<RequestSigner agent_id={self._agent_id!r} rsa_bits={self._key.key_size}>"

    @property
    def agent_id(self) -> str:
        """The agent id sent in ``X-Agent-ID`` and signed."""
        return self._agent_id

    @property
    def public_key(self) -> RSAPublicKey:
        """The public half of the signing key (what the control plane stores)."""
        return self._key.public_key()

    def sign_headers(self) -> dict[str, str]:
        """
        A new dict with exactly the four signed headers, with a fresh
        timestamp and nonce: call it once per request.

        :raises SigningError: The injected clock or random source returned
            something unusable.
        """
        timestamp = self._timestamp()
        nonce = self._nonce()
        signature = self._key.sign(
            signed_message(self._agent_id, timestamp, nonce),
            _pss(padding.PSS.MAX_LENGTH),
            hashes.SHA256(),
        )
        return {
            HEADER_AGENT_ID: self._agent_id,
            HEADER_TIMESTAMP: timestamp,
            HEADER_NONCE: nonce,
            HEADER_SIGNATURE: base64.b64encode(signature).decode("ascii"),
        }

    def sign_request(self, headers: Headers | MutableMapping[str, str]) -> None:
        """
        Add freshly signed headers (from :meth:`sign_headers`) to ``headers``.

        Any value those four headers already had is replaced, whatever its
        case, so a request never carries two signatures.

        :param headers: A :class:`twisted.web.http_headers.Headers` or a mutable
            mapping of header names to values (a plain ``dict``).
        :raises TypeError: ``headers`` is neither.
        """
        signed = self.sign_headers()
        if isinstance(headers, Headers):
            for name, value in signed.items():
                headers.setRawHeaders(name, [value])
        elif isinstance(headers, MutableMapping):
            wanted = {name.lower() for name in signed}
            for existing in [k for k in headers if isinstance(k, str) and k.lower() in wanted]:
                del headers[existing]
            headers.update(signed)
        else:
            raise TypeError(
                f"headers must be twisted.web.http_headers.Headers or a dict, "
                f"not {type(headers).__name__}"
            )

    def _timestamp(self) -> str:
        now = self._clock()
        try:
            # floor, not int(): Go's Unix() floors, which differs only for
            # times before 1970; a NaN or infinite clock is refused.
            return str(math.floor(now))
        except (TypeError, ValueError, OverflowError):
            raise SigningError(
                f"the clock returned {type(now).__name__} {now!r}, not a finite number of seconds"
            ) from None

    def _nonce(self) -> str:
        raw = self._random_bytes(NONCE_BYTES)
        if not isinstance(raw, bytes) or len(raw) != NONCE_BYTES:
            # Says how much came back, never what.
            size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise SigningError(f"the random source returned {size} instead of {NONCE_BYTES} bytes")
        return base64.b64encode(raw).decode("ascii")


def _checked_agent_id(agent_id: object) -> str:
    try:
        return check_agent_id(agent_id)
    except ValueError as e:
        raise SigningError(
            f"cannot sign requests: {e}; the agent id comes from agent.json "
            "(written by hostlink-tw init)"
        ) from None


def verify_signature(
    public_key: RSAPublicKey,
    agent_id: str,
    timestamp: str,
    nonce: str,
    signature_b64: str,
) -> bool:
    """
    Check an ``X-Signature`` as the control plane does (Go's
    ``rsa.VerifyPSS(pub, SHA256, digest, sig, nil)``: salt length
    auto-detected).

    Only the signature is checked: the timestamp window and nonce reuse are
    the caller's policy.

    :param public_key: The agent's RSA public key.
    :return: True if the signature is valid; False for anything else,
        including wrongly typed values, bad base64, an oversized signature or
        text that cannot be encoded.  Hostile header values never raise.
    :raises TypeError: ``public_key`` is not an RSA public key (a programming
        error, not hostile input).
    """
    if not isinstance(public_key, RSAPublicKey):
        raise TypeError(f"public_key must be an RSA public key, not {type(public_key).__name__}")
    if not all(isinstance(v, str) for v in (agent_id, timestamp, nonce, signature_b64)):
        return False
    if len(signature_b64) > _MAX_SIGNATURE_B64:
        return False
    try:
        signature = base64.b64decode(signature_b64.encode("ascii"), validate=True)
        message = signed_message(agent_id, timestamp, nonce)
    except (binascii.Error, ValueError):
        # UnicodeEncodeError is a ValueError too.
        return False
    try:
        public_key.verify(signature, message, _pss(padding.PSS.AUTO), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
