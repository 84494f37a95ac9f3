"""
An agent's key as both sides know it, and the one error for an identity that
cannot be used.

* :data:`MIN_RSA_BITS`: the smallest RSA modulus this project loads,
  generates or signs with.
* The public key as the control plane stores it: standard base64 of the DER
  SubjectPublicKeyInfo (PKIX) encoding (:func:`public_key_base64`), or PEM
  (:func:`public_key_pem`); :func:`load_public_key` reads either back, for the
  control plane's agents file and the signature verifier.
* :class:`IdentityError`: whatever cannot be used in an agent's identity (its
  state file, its private key, a public key, a file that cannot be written)
  raises this one type, whose message names the file, says what is wrong
  with it and how to fix it, so an operator can act on the log line alone.
  Its :class:`IdentityErrorKind` tells the cases apart for code that must.
  No message ever carries key material.

The agent's side (loading ``agent.json`` and the private key) is
:mod:`hostlink_tw.agent.identity`; making an identity is
:mod:`hostlink_tw.provisioning`.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

__all__ = [
    "MIN_RSA_BITS",
    "IdentityError",
    "IdentityErrorKind",
    "PublicKeySource",
    "load_public_key",
    "public_key_base64",
    "public_key_pem",
]

#: Smallest RSA modulus this project loads, generates or signs with.
MIN_RSA_BITS = 2048

#: What the public key can be computed from.
PublicKeySource = Union[RSAPrivateKey, RSAPublicKey]


class IdentityErrorKind(enum.Enum):
    """
    Which problem an :class:`IdentityError` reports.

    The value is ``<subject>.<problem>``; :attr:`subject` is the file (or
    text) the problem is about.
    """

    #: ``agent.json`` does not exist: the agent has no identity yet.
    AGENT_STATE_MISSING = "agent_state.missing"
    #: ``agent.json`` exists but cannot be read (permissions, a directory,
    #: not a regular file, too large...).
    AGENT_STATE_UNREADABLE = "agent_state.unreadable"
    #: ``agent.json`` is not UTF-8 JSON (or is empty).
    AGENT_STATE_NOT_JSON = "agent_state.not_json"
    #: ``agent.json`` holds valid JSON that is not an object.
    AGENT_STATE_NOT_OBJECT = "agent_state.not_object"
    #: An optional field of ``agent.json`` (``last_sync_time``, ``metadata``)
    #: has the wrong type.
    AGENT_STATE_FIELD = "agent_state.field"
    #: ``agent_id`` in ``agent.json`` is missing or outside the agent-id rule.
    AGENT_ID = "agent_state.agent_id"
    #: The private key file does not exist.
    PRIVATE_KEY_MISSING = "private_key.missing"
    #: The private key path exists but cannot be read (permissions, a
    #: directory, not a regular file, too large...).
    PRIVATE_KEY_UNREADABLE = "private_key.unreadable"
    #: Group or others may read or write the key file (OpenSSH refuses these
    #: too).
    PRIVATE_KEY_PERMISSIONS = "private_key.permissions"
    #: The private key file is empty (or only whitespace).
    PRIVATE_KEY_EMPTY = "private_key.empty"
    #: The file is not a PEM private key this project reads (garbage, a public
    #: key, an OpenSSH-format key, a corrupt block).
    PRIVATE_KEY_FORMAT = "private_key.format"
    #: The private key is encrypted; the agent runs unattended and has no
    #: password.
    PRIVATE_KEY_ENCRYPTED = "private_key.encrypted"
    #: The private key is not RSA (EC, Ed25519, DSA...).
    PRIVATE_KEY_NOT_RSA = "private_key.not_rsa"
    #: The RSA key has (or would have) fewer than :data:`MIN_RSA_BITS` bits.
    PRIVATE_KEY_TOO_SMALL = "private_key.too_small"
    #: A key was to be generated without overwriting, and the file exists.
    PRIVATE_KEY_EXISTS = "private_key.exists"
    #: Text given as a public key is neither PKIX base64 nor a PEM RSA public
    #: key.
    PUBLIC_KEY = "public_key.invalid"
    #: Writing the state file or the private key failed (an :class:`OSError`).
    WRITE_FAILED = "write.failed"

    @property
    def subject(self) -> str:
        """What the problem is about: ``agent_state``, ``private_key``,
        ``public_key`` or ``write``."""
        return self.value.partition(".")[0]


class IdentityError(Exception):
    """
    The agent's identity (state file or key) cannot be used.

    The message names the file (when there is one), what is wrong with it and
    the fix; the parts are also available as attributes.

    :ivar kind: Which problem it is (an :class:`IdentityErrorKind`).
    :ivar problem: What is wrong, naming the file.
    :ivar path: The file concerned, or ``None`` (a key given as text).
    :ivar fix: What the operator should do about it.
    """

    def __init__(
        self, kind: IdentityErrorKind, problem: str, *, path: str | None = None, fix: str = ""
    ) -> None:
        self.kind = kind
        self.problem = problem
        self.path = path
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)

    def __repr__(self) -> str:
        return f"IdentityError({self.kind}, {self.problem!r}, path={self.path!r})"


def _public(key: PublicKeySource) -> RSAPublicKey:
    if isinstance(key, RSAPrivateKey):
        return key.public_key()
    if isinstance(key, RSAPublicKey):
        return key
    raise TypeError(f"expected an RSA private or public key, not {type(key).__name__}")


def public_key_base64(key: PublicKeySource) -> str:
    """
    The public key as the control plane stores it: standard base64 (with
    padding, no line breaks) of the DER SubjectPublicKeyInfo (PKIX).

    :param key: The agent's private key, or its public key.
    """
    der = _public(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def public_key_pem(key: PublicKeySource) -> str:
    """
    The public key as PEM SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``).

    :param key: The agent's private key, or its public key.
    """
    return (
        _public(key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def load_public_key(text: str) -> RSAPublicKey:
    """
    Parse an RSA public key from what a control plane stores or is given.

    Accepted: standard base64 of the PKIX DER (as :func:`public_key_base64` makes;
    line breaks and surrounding whitespace are ignored, as Go's decoder
    ignores them), or PEM (``PUBLIC KEY``, or PKCS#1 ``RSA PUBLIC KEY``).  Key
    size is not checked here: this is the verifier's side, and it accepts
    what Go's ``x509.ParsePKIXPublicKey`` accepts.

    :raises IdentityError: (``PUBLIC_KEY``) anything else, including a non-RSA
        public key.
    """
    if not isinstance(text, str):
        raise IdentityError(
            IdentityErrorKind.PUBLIC_KEY,
            f"public key must be text, not {type(text).__name__}",
            fix="give the base64 of the PKIX DER encoding, or a PEM PUBLIC KEY",
        )
    fix = "give the base64 of the PKIX DER encoding (as stored by the control plane), or PEM"
    stripped = text.strip()
    key: object
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode("utf-8"))
        except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
            raise IdentityError(
                IdentityErrorKind.PUBLIC_KEY,
                "PEM text is not a valid public key",
                fix=fix,
            ) from None
    else:
        compact = "".join(stripped.split())
        if not compact:
            raise IdentityError(IdentityErrorKind.PUBLIC_KEY, "public key is empty", fix=fix)
        try:
            der = base64.b64decode(compact.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise IdentityError(
                IdentityErrorKind.PUBLIC_KEY,
                "public key is neither PEM nor standard base64",
                fix=fix,
            ) from None
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, UnsupportedAlgorithm):
            raise IdentityError(
                IdentityErrorKind.PUBLIC_KEY,
                "base64 public key does not decode to a PKIX (SubjectPublicKeyInfo) key",
                fix=fix,
            ) from None
    if not isinstance(key, RSAPublicKey):
        raise IdentityError(
            IdentityErrorKind.PUBLIC_KEY,
            f"public key is {type(key).__name__}, not RSA",
            fix="agents sign with RSA keys; give the agent's RSA public key",
        )
    return key

