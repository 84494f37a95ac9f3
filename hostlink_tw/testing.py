"""
Helpers for testing code that uses hostlink_tw (and for our own tests).

:func:`make_test_certificates` makes a throwaway certificate authority and a
server certificate it signed, as PEM files, so a test can run the reference
control plane on an ``ssl:`` endpoint and point an agent at it with
``HOSTLINK_WS_CA_FILE``; nothing trusts them unless told to.  Together with
:func:`hostlink_tw.controlplane.start_control_plane` that is a complete
``wss://`` setup on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TestCertificates", "make_test_certificates"]

_VALID_FOR = datetime.timedelta(days=1)
# Certificates start a little in the past, so a test host whose clock is a
# few minutes behind still accepts them.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TestCertificates:
    """
    Paths of a throwaway CA and a server certificate signed by it.

    :ivar ca: the CA certificate (PEM): what ``HOSTLINK_WS_CA_FILE`` takes.
    :ivar cert: the server certificate (PEM).
    :ivar key: the server's private key (PEM, mode 0600).
    """

    __test__ = False  # not a test case, whatever a collector thinks of the name

    ca: str
    cert: str
    key: str

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """A Twisted ``ssl:`` server endpoint description serving this certificate."""
        return f"ssl:{port}:interface={interface}:privateKey={self.key}:certKey={self.cert}"

    def ca_pem(self) -> bytes:
        """The CA certificate's PEM bytes."""
        with open(self.ca, "rb") as f:
            return f.read()


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    # A new file every time (never through a link, never an old file's mode).
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask
        f.write(data)


def make_test_certificates(
    directory: str,
    *,
    names: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1",),
    label: str = "hostlink test",
    subject_alt_names: bool = True,
) -> TestCertificates:
    """
    Make a new CA and a server certificate for ``names`` and ``ips`` in
    ``directory`` (created if missing) as ``ca.pem``, ``server.pem`` and
    ``server.key``.  Every call makes a new CA, so two calls give two
    authorities that do not trust each other.

    ``names`` become dNSName entries exactly as given, so a test can make the
    malformed ones some CAs issue (an IP address as a dNSName,
    ``a.*.example``, an empty name).  With ``subject_alt_names`` false the
    certificate has no subjectAltName extension at all, only a common name.
    """
    names, ips = tuple(names), tuple(ips)
    if not names and not ips:
        raise ValueError("a server certificate needs at least one name or IP address")
    # A common name cannot be empty; it is never used for verification.
    common_name = next((n for n in names + ips if n), "hostlink test server")
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID_FOR)
    )
    if subject_alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    server = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    result = TestCertificates(
        ca=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, "server.pem"),
        key=os.path.join(directory, "server.key"),
    )
    _write(result.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(result.cert, server.public_bytes(serialization.Encoding.PEM))
    _write(
        result.key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    return result
