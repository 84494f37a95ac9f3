"""Tests for hostlink_tw.wire.signing: the PROTOCOL §2 headers and their verification."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.http_headers import Headers

from hostlink_tw.wire.keys import IdentityError, IdentityErrorKind, public_key_pem
from hostlink_tw.wire.signing import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SIGNED_HEADERS,
    RequestSigner,
    SigningError,
    signed_message,
    verify_signature,
)
from hostlink_tw.wire.vocabulary import AGENT_ID_RULE

from .test_identity import assert_raises_kind

AGENT_ID = "agt_01HX5Z"

# Key generation is slow: each key is made once per run (trial has no setUpClass).
_KEYS: dict[str, RSAPrivateKey] = {}


def key(name: str = "agent", bits: int = 2048) -> RSAPrivateKey:
    """A cached RSA key; different names give different keys."""
    label = f"{name}-{bits}"
    if label not in _KEYS:
        _KEYS[label] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[label]


def write_key(path: str, private_key: Any, mode: int = 0o600) -> str:
    """Write C{private_key} as PKCS#1 PEM at C{path} with C{mode}."""
    data = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def pss(salt_length: Any) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)


class FixedRandom:
    """A deterministic random source that records what was asked of it."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        counter = len(self.requests)
        return bytes((counter + i) % 256 for i in range(n))


class SignHeadersTests(SynchronousTestCase):
    """sign_headers: exactly the four headers, correctly signed, fresh each time."""

    signer: RequestSigner

    def setUp(self) -> None:
        # trial does not run setUpClass; key() caches the slow part.
        self.signer = RequestSigner.from_key(key(), AGENT_ID)

    def verify_with(self, headers: dict[str, str], salt_length: Any) -> None:
        """Verify with cryptography directly; raises InvalidSignature if wrong."""
        key().public_key().verify(
            base64.b64decode(headers[HEADER_SIGNATURE], validate=True),
            f"{headers[HEADER_AGENT_ID]}|{headers[HEADER_TIMESTAMP]}|"
            f"{headers[HEADER_NONCE]}".encode(),
            pss(salt_length),
            hashes.SHA256(),
        )

    def test_exactly_four_headers(self) -> None:
        """The dict holds the four PROTOCOL §2 headers and nothing else."""
        headers = self.signer.sign_headers()
        self.assertEqual(list(headers), list(SIGNED_HEADERS))
        self.assertEqual(SIGNED_HEADERS, ("X-Agent-ID", "X-Timestamp", "X-Nonce", "X-Signature"))
        self.assertEqual(headers[HEADER_AGENT_ID], AGENT_ID)
        for value in headers.values():
            self.assertIsInstance(value, str)

    def test_verifies_with_auto_salt(self) -> None:
        """What the control plane does: PSS with the salt length auto-detected."""
        self.verify_with(self.signer.sign_headers(), padding.PSS.AUTO)

    def test_verifies_with_explicit_max_salt(self) -> None:
        """
        The salt is the maximum the key allows (as Go's SignPSS with nil
        options): key bytes - SHA-256 size - 2, 222 for 2048 bits.
        """
        headers = self.signer.sign_headers()
        max_salt = key().key_size // 8 - 32 - 2
        self.assertEqual(max_salt, 222)
        self.verify_with(headers, max_salt)
        # And not some other salt length: a digest-length salt does not verify.
        self.assertRaises(InvalidSignature, self.verify_with, headers, 32)

    def test_signature_length(self) -> None:
        """The signature is one modulus long, standard base64 with padding."""
        signature = self.signer.sign_headers()[HEADER_SIGNATURE]
        self.assertEqual(len(base64.b64decode(signature, validate=True)), 256)
        self.assertEqual(base64.b64encode(base64.b64decode(signature)).decode(), signature)

    def test_signed_message_format(self) -> None:
        """The signed bytes are exactly agent_id|timestamp|nonce in UTF-8."""
        self.assertEqual(
            signed_message("agt", "1714215780", "bm9uY2U="), b"agt|1714215780|bm9uY2U="
        )
        self.assertEqual(signed_message("agënt", "1", "n"), "agënt|1|n".encode())

    def test_signature_covers_exact_message(self) -> None:
        """
        The signature verifies over signed_message(...) and over a string built
        by hand, and not over near-misses.
        """
        headers = self.signer.sign_headers()
        signature = base64.b64decode(headers[HEADER_SIGNATURE])
        ts, nonce = headers[HEADER_TIMESTAMP], headers[HEADER_NONCE]
        public = key().public_key()
        for message in (
            signed_message(AGENT_ID, ts, nonce),
            (AGENT_ID + "|" + ts + "|" + nonce).encode("utf-8"),
        ):
            public.verify(signature, message, pss(padding.PSS.AUTO), hashes.SHA256())
        for wrong in (
            f"{AGENT_ID}|{ts}|{nonce}|".encode(),
            f"{AGENT_ID}{ts}{nonce}".encode(),
            f"{AGENT_ID}|{nonce}|{ts}".encode(),
            f"{AGENT_ID} |{ts}|{nonce}".encode(),
        ):
            self.assertRaises(
                InvalidSignature,
                public.verify,
                signature,
                wrong,
                pss(padding.PSS.AUTO),
                hashes.SHA256(),
            )

    def test_non_ascii_agent_id_refused(self) -> None:
        """Issue 10.9/10.15: ids outside the rule are refused before signing.

        A non-ASCII id would be signed as UTF-8 but read back as ISO-8859-1
        by the control plane (never authenticates); a lone surrogate cannot
        be encoded at all.
        """
        for bad in ("agënt-ü", "agt\ud800", "a" * 257):
            error = self.assertRaises(SigningError, RequestSigner.from_key, key(), bad)
            self.assertIn(AGENT_ID_RULE, str(error))

    def test_signed_message_is_utf8(self) -> None:
        """The signed bytes are UTF-8, as the Go agent's (for ids of any origin)."""
        self.assertEqual(signed_message("agënt", "1", "n"), "agënt|1|n".encode())

    def test_nonces_16_bytes_and_unique(self) -> None:
        """10,000 calls: every nonce is padded base64 of 16 bytes, all distinct."""
        nonces = set()
        for _ in range(10_000):
            nonce = self.signer.sign_headers()[HEADER_NONCE]
            self.assertEqual(len(nonce), 24)
            self.assertTrue(nonce.endswith("=="))
            self.assertEqual(len(base64.b64decode(nonce, validate=True)), 16)
            nonces.add(nonce)
        self.assertEqual(len(nonces), 10_000)

    def test_default_clock_is_now(self) -> None:
        """Without an injected clock the timestamp is the current Unix time."""
        before = int(time.time())
        timestamp = int(self.signer.sign_headers()[HEADER_TIMESTAMP])
        self.assertTrue(before <= timestamp <= int(time.time()))

    def test_deterministic_with_injected_sources(self) -> None:
        """Injected clock and random source fix timestamp and nonce exactly."""
        random = FixedRandom()
        signer = RequestSigner.from_key(
            key(), AGENT_ID, clock=lambda: 1714215780.999, random_bytes=random
        )
        headers = signer.sign_headers()
        self.assertEqual(headers[HEADER_TIMESTAMP], "1714215780")
        self.assertEqual(random.requests, [16])
        expected_nonce = base64.b64encode(bytes((1 + i) % 256 for i in range(16))).decode()
        self.assertEqual(headers[HEADER_NONCE], expected_nonce)
        self.assertTrue(
            verify_signature(
                key().public_key(),
                AGENT_ID,
                "1714215780",
                expected_nonce,
                headers[HEADER_SIGNATURE],
            )
        )

    def test_fresh_each_call(self) -> None:
        """Each call reads the clock and the random source again, into a new dict."""
        clock = Clock()
        clock.advance(1714215780)
        signer = RequestSigner.from_key(key(), AGENT_ID, clock=clock.seconds)
        first = signer.sign_headers()
        clock.advance(1.5)
        second = signer.sign_headers()
        self.assertIsNot(first, second)
        self.assertEqual(first[HEADER_TIMESTAMP], "1714215780")
        self.assertEqual(second[HEADER_TIMESTAMP], "1714215781")
        self.assertNotEqual(first[HEADER_NONCE], second[HEADER_NONCE])
        self.assertNotEqual(first[HEADER_SIGNATURE], second[HEADER_SIGNATURE])
        # The caller owns the dict: changing it does not leak into the next one.
        second[HEADER_AGENT_ID] = "tampered"
        self.assertEqual(signer.sign_headers()[HEADER_AGENT_ID], AGENT_ID)

    def test_bad_clock(self) -> None:
        """A NaN or infinite clock is a SigningError, not a bogus header."""
        for value in (float("nan"), float("inf")):
            signer = RequestSigner.from_key(key(), AGENT_ID, clock=lambda v=value: v)
            error = self.assertRaises(SigningError, signer.sign_headers)
            self.assertIn("clock", str(error))

    def test_bad_random_source(self) -> None:
        """A random source returning the wrong length is refused without echoing it."""
        short = b"\x01\x02secretbytes!!"
        signer = RequestSigner.from_key(key(), AGENT_ID, random_bytes=lambda n: short)
        error = self.assertRaises(SigningError, signer.sign_headers)
        self.assertIn("15 instead of 16", str(error))
        self.assertNotIn("secret", str(error))
        self.assertNotIn(base64.b64encode(short).decode(), str(error))

    def test_another_key_does_not_verify(self) -> None:
        """A signature from another key fails verification against ours."""
        stranger = RequestSigner.from_key(key("stranger"), AGENT_ID)
        headers = stranger.sign_headers()
        args = (AGENT_ID, headers[HEADER_TIMESTAMP], headers[HEADER_NONCE])
        self.assertFalse(verify_signature(key().public_key(), *args, headers[HEADER_SIGNATURE]))
        self.assertTrue(
            verify_signature(key("stranger").public_key(), *args, headers[HEADER_SIGNATURE])
        )
        self.assertRaises(InvalidSignature, self.verify_with, headers, padding.PSS.AUTO)

    def test_agent_id_and_public_key_properties(self) -> None:
        """agent_id and public_key are exposed; repr shows nothing about the key."""
        self.assertEqual(self.signer.agent_id, AGENT_ID)
        self.assertEqual(
            self.signer.public_key.public_numbers(), key().public_key().public_numbers()
        )
        text = repr(self.signer)
        self.assertIn(AGENT_ID, text)
        numbers = key().private_numbers()
        for secret in (numbers.d, numbers.p, numbers.public_numbers.n):
            self.assertNotIn(str(secret)[:12], text)
            self.assertNotIn(format(secret, "x")[:12], text)


class SignRequestTests(SynchronousTestCase):
    """sign_request adds the headers of sign_headers() to Headers or a dict."""

    signer: RequestSigner

    def setUp(self) -> None:
        self.signer = RequestSigner.from_key(
            key(), AGENT_ID, clock=lambda: 1714215780.0, random_bytes=lambda n: b"\x07" * n
        )

    def test_headers(self) -> None:
        """Twisted Headers get one value per signed header; others are kept."""
        headers = Headers({"User-Agent": ["hostlink_tw"]})
        self.signer.sign_request(headers)
        self.assertEqual(headers.getRawHeaders("User-Agent"), ["hostlink_tw"])
        values = {}
        for name in SIGNED_HEADERS:
            raw = headers.getRawHeaders(name)
            assert raw is not None
            self.assertEqual(len(raw), 1, name)
            values[name] = raw[0]
        self.assertEqual(values[HEADER_AGENT_ID], AGENT_ID)
        self.assertEqual(values[HEADER_TIMESTAMP], "1714215780")
        self.assertEqual(values[HEADER_NONCE], base64.b64encode(b"\x07" * 16).decode())
        self.assertTrue(
            verify_signature(
                key().public_key(),
                values[HEADER_AGENT_ID],
                values[HEADER_TIMESTAMP],
                values[HEADER_NONCE],
                values[HEADER_SIGNATURE],
            )
        )

    def test_headers_replaces_stale_values(self) -> None:
        """Re-signing the same Headers leaves one (new) value per header."""
        headers = Headers({"X-Signature": ["old", "older"], "x-nonce": ["stale"]})
        self.signer.sign_request(headers)
        self.signer.sign_request(headers)
        for name in SIGNED_HEADERS:
            raw = headers.getRawHeaders(name)
            assert raw is not None
            self.assertEqual(len(raw), 1, name)
        self.assertNotEqual(headers.getRawHeaders("X-Signature"), ["old"])

    def test_dict(self) -> None:
        """A dict gets the four headers; its other entries are kept."""
        headers = {"User-Agent": "hostlink_tw"}
        self.signer.sign_request(headers)
        self.assertEqual(set(headers), {"User-Agent", *SIGNED_HEADERS})
        self.assertTrue(
            verify_signature(
                key().public_key(),
                headers[HEADER_AGENT_ID],
                headers[HEADER_TIMESTAMP],
                headers[HEADER_NONCE],
                headers[HEADER_SIGNATURE],
            )
        )

    def test_dict_replaces_any_case(self) -> None:
        """Stale values under other spellings are removed: no duplicate headers."""
        headers = {"x-signature": "old", "X-NONCE": "stale", "x-agent-id": "other"}
        self.signer.sign_request(headers)
        self.assertEqual(set(headers), set(SIGNED_HEADERS))

    def test_delegates_to_sign_headers(self) -> None:
        """Both forms apply exactly what sign_headers() returns."""
        fixed = {
            HEADER_AGENT_ID: "A",
            HEADER_TIMESTAMP: "1",
            HEADER_NONCE: "N",
            HEADER_SIGNATURE: "S",
        }
        signer = RequestSigner.from_key(key(), AGENT_ID)
        calls: list[None] = []

        def fake_sign_headers() -> dict[str, str]:
            calls.append(None)
            return dict(fixed)

        self.patch(signer, "sign_headers", fake_sign_headers)
        as_dict: dict[str, str] = {}
        signer.sign_request(as_dict)
        self.assertEqual(as_dict, fixed)
        as_headers = Headers()
        signer.sign_request(as_headers)
        self.assertEqual(
            {name: as_headers.getRawHeaders(name) for name in fixed},
            {name: [value] for name, value in fixed.items()},
        )
        self.assertEqual(len(calls), 2)

    def test_other_types(self) -> None:
        """Anything else is a TypeError."""
        for bad in ([], None, "X-Agent-ID: a", (("a", "b"),)):
            self.assertRaises(TypeError, self.signer.sign_request, bad)


class SignerConstructionTests(SynchronousTestCase):
    """RequestSigner(path, agent_id) and from_key: clear errors for bad input."""

    def key_path(self, private_key: Any = None, mode: int = 0o600) -> str:
        directory = self.mktemp()
        os.mkdir(directory)
        return write_key(
            os.path.join(directory, "agent.key"),
            private_key if private_key is not None else key(),
            mode,
        )

    def test_from_file(self) -> None:
        """A signer built from a key file signs with that key."""
        signer = RequestSigner(self.key_path(), AGENT_ID)
        self.assertEqual(signer.agent_id, AGENT_ID)
        headers = signer.sign_headers()
        self.assertTrue(
            verify_signature(
                key().public_key(),
                AGENT_ID,
                headers[HEADER_TIMESTAMP],
                headers[HEADER_NONCE],
                headers[HEADER_SIGNATURE],
            )
        )

    def test_injection_through_constructor(self) -> None:
        """clock and random_bytes are honoured by the file-based constructor too."""
        signer = RequestSigner(
            self.key_path(), AGENT_ID, clock=lambda: 42.0, random_bytes=lambda n: b"\0" * n
        )
        headers = signer.sign_headers()
        self.assertEqual(headers[HEADER_TIMESTAMP], "42")
        self.assertEqual(headers[HEADER_NONCE], "AAAAAAAAAAAAAAAAAAAAAA==")

    def test_bad_agent_id(self) -> None:
        """Empty, non-string or header-breaking ids raise SigningError."""
        path = self.key_path()
        for bad in ("", None, 42, "agt\r\nX-Evil: 1", " agt", "agt\x00"):
            error = self.assertRaises(SigningError, RequestSigner, path, bad)
            self.assertIn("agent_id", str(error))
            self.assertIn("agent.json", str(error))
            self.assertRaises(SigningError, RequestSigner.from_key, key(), bad)

    def test_agent_id_checked_before_key(self) -> None:
        """A bad id is reported even when the key file is also missing."""
        missing = os.path.join(self.mktemp(), "agent.key")
        self.assertRaises(SigningError, RequestSigner, missing, "")
        assert_raises_kind(
            self, IdentityErrorKind.PRIVATE_KEY_MISSING, RequestSigner, missing, AGENT_ID
        )

    def test_unusable_key_file(self) -> None:
        """Key file problems propagate as the identity error, of the key's kinds."""
        error = assert_raises_kind(
            self,
            IdentityErrorKind.PRIVATE_KEY_PERMISSIONS,
            RequestSigner,
            self.key_path(mode=0o644),
            AGENT_ID,
        )
        self.assertIn("chmod 600", str(error))
        assert_raises_kind(
            self,
            IdentityErrorKind.PRIVATE_KEY_TOO_SMALL,
            RequestSigner,
            self.key_path(key(bits=1024)),
            AGENT_ID,
        )
        directory = self.mktemp()
        os.mkdir(directory)
        error = self.assertRaises(IdentityError, RequestSigner, directory, AGENT_ID)
        self.assertEqual(error.kind.subject, "private_key")

    def test_from_key_refuses_unusable_keys(self) -> None:
        """from_key wants an RSA private key of at least 2048 bits."""
        error = self.assertRaises(SigningError, RequestSigner.from_key, key(bits=1024), AGENT_ID)
        self.assertIn("1024", str(error))
        self.assertRaises(
            SigningError, RequestSigner.from_key, ec.generate_private_key(ec.SECP256R1()), AGENT_ID
        )
        self.assertRaises(SigningError, RequestSigner.from_key, key().public_key(), AGENT_ID)


class VerifySignatureTests(SynchronousTestCase):
    """verify_signature: True only for a good signature; never raises for input."""

    headers: dict[str, str]

    def setUp(self) -> None:
        self.headers = RequestSigner.from_key(key(), AGENT_ID).sign_headers()

    def check(self, **changes: Any) -> bool:
        values: dict[str, Any] = {
            "agent_id": self.headers[HEADER_AGENT_ID],
            "timestamp": self.headers[HEADER_TIMESTAMP],
            "nonce": self.headers[HEADER_NONCE],
            "signature_b64": self.headers[HEADER_SIGNATURE],
        }
        values.update(changes)
        return verify_signature(key().public_key(), **values)

    def test_good(self) -> None:
        """The untouched headers verify."""
        self.assertIs(self.check(), True)

    def test_tampered_fields(self) -> None:
        """Changing any signed field breaks the signature."""
        ts = int(self.headers[HEADER_TIMESTAMP])
        self.assertIs(self.check(agent_id="agt_other"), False)
        self.assertIs(self.check(timestamp=str(ts + 1)), False)
        self.assertIs(self.check(nonce=base64.b64encode(b"\0" * 16).decode()), False)

    def test_max_salt_signature_from_cryptography(self) -> None:
        """A signature made independently with PSS.MAX_LENGTH verifies (Go's form)."""
        signature = key().sign(
            signed_message(AGENT_ID, "1", "bm9uY2U="), pss(padding.PSS.MAX_LENGTH), hashes.SHA256()
        )
        self.assertTrue(
            verify_signature(
                key().public_key(), AGENT_ID, "1", "bm9uY2U=", base64.b64encode(signature).decode()
            )
        )

    def test_other_salt_lengths_verify(self) -> None:
        """Auto-detection also accepts other salt lengths, as Go's VerifyPSS(nil) does."""
        for salt in (0, 32, 100):
            signature = key().sign(signed_message(AGENT_ID, "1", "n"), pss(salt), hashes.SHA256())
            self.assertTrue(
                verify_signature(
                    key().public_key(), AGENT_ID, "1", "n", base64.b64encode(signature).decode()
                ),
                salt,
            )

    def test_hostile_signatures(self) -> None:
        """Bad base64, wrong lengths, non-ASCII, huge values: False, no exception."""
        good = self.headers[HEADER_SIGNATURE]
        raw = base64.b64decode(good)
        for bad in (
            "",
            "=",
            "AA==",
            good[:-4],
            good + "AAAA",
            good.rstrip("="),
            good.replace("+", "-").replace("/", "_"),
            "é" + good[1:],
            " " + good,
            good + "\n",
            base64.b64encode(raw[:-1]).decode(),
            base64.b64encode(raw + b"\0").decode(),
            base64.b64encode(b"\xff" * 256).decode(),
            base64.b64encode(b"\0" * 256).decode(),
            "A" * 1_000_000,
            "\ud800",
        ):
            self.assertIs(self.check(signature_b64=bad), False, repr(bad[:20]))

    def test_hostile_fields(self) -> None:
        """Non-string or unencodable fields give False, not an exception."""
        for field in ("agent_id", "timestamp", "nonce", "signature_b64"):
            for bad in (None, 1, b"bytes", ["x"]):
                self.assertIs(self.check(**{field: bad}), False, (field, bad))
        self.assertIs(self.check(agent_id="\ud800"), False)

    @settings(max_examples=200, deadline=None)
    @given(st.text(), st.text(), st.text(), st.text())
    def test_never_raises(self, agent_id: str, timestamp: str, nonce: str, sig: str) -> None:
        """Any text at all in any field: a bool, never an exception."""
        result = verify_signature(key().public_key(), agent_id, timestamp, nonce, sig)
        self.assertIs(result, False)

    def test_wrong_key_type_is_a_programming_error(self) -> None:
        """A non-RSA public key is a TypeError (the caller's bug, not hostile input)."""
        self.assertRaises(
            TypeError,
            verify_signature,
            key(),
            AGENT_ID,
            self.headers[HEADER_TIMESTAMP],
            self.headers[HEADER_NONCE],
            self.headers[HEADER_SIGNATURE],
        )


class OpenSSLInteropTests(SynchronousTestCase):
    """An independent verifier: the openssl command line, where installed."""

    def test_openssl_verifies_max_salt(self) -> None:
        """openssl verifies our signature with salt length "max" and "auto"."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise SkipTest("openssl is not installed")
        directory = self.mktemp()
        os.mkdir(directory)
        headers = RequestSigner.from_key(key(), AGENT_ID).sign_headers()
        files = {
            "pub": public_key_pem(key()).encode(),
            "msg": signed_message(AGENT_ID, headers[HEADER_TIMESTAMP], headers[HEADER_NONCE]),
            "sig": base64.b64decode(headers[HEADER_SIGNATURE]),
        }
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        for saltlen in ("max", "auto"):
            result = subprocess.run(
                [
                    openssl,
                    "dgst",
                    "-sha256",
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    f"rsa_pss_saltlen:{saltlen}",
                    "-sigopt",
                    "rsa_mgf1_md:sha256",
                    "-verify",
                    os.path.join(directory, "pub"),
                    "-signature",
                    os.path.join(directory, "sig"),
                    os.path.join(directory, "msg"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn("Verified OK", result.stdout)
