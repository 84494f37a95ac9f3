"""hostlink_tw.testing: throwaway certificates for wss:// tests."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.testing import make_test_certificates
from hostlink_tw.tls import load_ca_certificates


def _load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


class MakeTestCertificatesTests(SynchronousTestCase):
    def test_server_certificate_is_signed_by_the_ca(self) -> None:
        certs = make_test_certificates(self.mktemp(), names=("cp.test",), ips=("127.0.0.1",))
        ca, server = _load(certs.ca), _load(certs.cert)
        public = ca.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        server.verify_directly_issued_by(ca)
        sans = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["cp.test"])
        self.assertEqual([str(i) for i in sans.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        self.assertEqual(len(load_ca_certificates(certs.ca)), 1)

    def test_each_call_makes_a_new_authority(self) -> None:
        one = make_test_certificates(self.mktemp())
        two = make_test_certificates(self.mktemp())
        self.assertNotEqual(one.ca_pem(), two.ca_pem())
        self.assertRaises(
            InvalidSignature, _load(two.cert).verify_directly_issued_by, _load(one.ca)
        )

    def test_key_is_private_and_listen_names_both_files(self) -> None:
        certs = make_test_certificates(self.mktemp())
        self.assertEqual(stat.S_IMODE(os.stat(certs.key).st_mode), 0o600)
        self.assertEqual(
            certs.listen(8443),
            f"ssl:8443:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}",
        )

    def test_needs_a_name_or_an_address(self) -> None:
        self.assertRaises(ValueError, make_test_certificates, self.mktemp(), names=(), ips=())
