"""Tests for hostlink_tw.tls: trust roots, the CA file, and TLS failure messages."""

from __future__ import annotations

import os
import signal
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch, IPAddress_ID
from twisted.internet._sslverify import ClientTLSOptions
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.testing import make_test_certificates
from hostlink_tw.tls import (
    CA_FILE_MAX_BYTES,
    CertificateNamesError,
    CombinedTrustRoot,
    FailClosedClientTLSOptions,
    TLSConfigError,
    client_tls_options,
    describe_tls_failure,
    is_tls_failure,
    load_ca_certificates,
    trust_root,
)


class _Blocked(Exception):
    pass


def _timed_out(signum: int, frame: object) -> None:
    raise _Blocked("reading the CA file blocked")


class _Store:
    def __init__(self) -> None:
        self.added: list[Any] = []

    def add_cert(self, cert: Any) -> None:
        self.added.append(cert)


class _Context:
    """Records what a trust root does to an OpenSSL context."""

    def __init__(self) -> None:
        self.store = _Store()
        self.default_paths = 0

    def get_cert_store(self) -> _Store:
        return self.store

    def set_default_verify_paths(self) -> None:
        self.default_paths += 1


class CAFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_missing_file_names_the_path(self) -> None:
        path = os.path.join(self.dir, "nope.pem")
        e = self.assertRaises(TLSConfigError, load_ca_certificates, path)
        self.assertIn(path, str(e))
        self.assertIn("HOSTLINK_WS_CA_FILE", str(e))

    def test_oversized_file_is_refused_without_reading_it_all(self) -> None:
        path = os.path.join(self.dir, "huge.pem")
        with open(path, "wb") as f:
            f.truncate(CA_FILE_MAX_BYTES + 1)  # sparse: costs no disk
        e = self.assertRaises(TLSConfigError, load_ca_certificates, path)
        self.assertIn("larger than", str(e))
        self.assertIn("HOSTLINK_WS_CA_FILE", str(e))

    def test_fifo_is_refused_without_blocking(self) -> None:
        # Issue 10.12: open() on a FIFO with no writer blocks forever; the
        # reader must refuse it at once.  The alarm bounds the test if a
        # regression blocks (it interrupts the open with an exception).
        path = os.path.join(self.dir, "ca.fifo")
        os.mkfifo(path)
        previous = signal.signal(signal.SIGALRM, _timed_out)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.alarm(5)
        try:
            e = self.assertRaises(TLSConfigError, load_ca_certificates, path)
        finally:
            signal.alarm(0)
        self.assertIn(path, str(e))
        self.assertIn("not a regular file", str(e))
        self.assertIn("HOSTLINK_WS_CA_FILE", str(e))

    def test_fifo_refused_at_the_agents_start(self) -> None:
        # The start-up check (load_settings) reads the file with the same reader.
        from hostlink_tw.config import ConfigError, load_settings

        path = os.path.join(self.dir, "ca.fifo")
        os.mkfifo(path)
        previous = signal.signal(signal.SIGALRM, _timed_out)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.alarm(5)
        try:
            settings = load_settings(environ={"HOSTLINK_WS_CA_FILE": path})
            e = self.assertRaises(ConfigError, settings.check)
        finally:
            signal.alarm(0)
        self.assertIn("not a regular file", str(e))

    def test_directory_is_refused(self) -> None:
        e = self.assertRaises(TLSConfigError, load_ca_certificates, self.dir)
        self.assertIn("directory", str(e))

    def test_garbage_names_the_path(self) -> None:
        path = os.path.join(self.dir, "bad.pem")
        with open(path, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(TLSConfigError, load_ca_certificates, path)
        self.assertIn(path, str(e))

    def test_bundle_loads_every_certificate(self) -> None:
        one = make_test_certificates(self.mktemp_dir()).ca
        two = make_test_certificates(self.mktemp_dir()).ca
        bundle = os.path.join(self.dir, "bundle.pem")
        with open(bundle, "wb") as out:
            for path in (one, two):
                with open(path, "rb") as f:
                    out.write(f.read())
        certs = load_ca_certificates(bundle)
        self.assertEqual(len(certs), 2)
        self.assertNotEqual(certs[0].digest(), certs[1].digest())

    def mktemp_dir(self) -> str:
        d = self.mktemp()
        os.makedirs(d)
        return d


class TrustRootTests(SynchronousTestCase):
    def test_system_store_only_without_ca_file(self) -> None:
        ctx = _Context()
        trust_root(None)._addCACertsToContext(ctx)
        self.assertEqual(ctx.default_paths, 1)
        self.assertEqual(ctx.store.added, [])

    def test_system_store_plus_ca_file(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        ca = make_test_certificates(d).ca
        root = trust_root(ca)
        self.assertIsInstance(root, CombinedTrustRoot)
        ctx = _Context()
        root._addCACertsToContext(ctx)
        self.assertEqual(ctx.default_paths, 1)
        self.assertEqual(len(ctx.store.added), 1)

    def test_real_context_accepts_combined_root(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        ca = make_test_certificates(d).ca
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        trust_root(ca)._addCACertsToContext(context)

    def test_combined_root_refuses_non_roots(self) -> None:
        self.assertRaises(TypeError, CombinedTrustRoot, [object()])

    def test_client_options_verify_the_host(self) -> None:
        options = client_tls_options("cp.example.test", None)
        self.assertIsInstance(options, FailClosedClientTLSOptions)
        self.assertEqual(options.hostname, "cp.example.test")
        self.assertIsInstance(options._options, ClientTLSOptions)
        self.assertTrue(options._options._hostnameIsDnsName)
        self.assertIsInstance(options._service_id, DNS_ID)
        ip = client_tls_options("127.0.0.1", None)
        self.assertFalse(ip._options._hostnameIsDnsName)
        self.assertIsInstance(ip._service_id, IPAddress_ID)

    def test_client_options_bad_ca_file(self) -> None:
        self.assertRaises(TLSConfigError, client_tls_options, "h", "/nonexistent/ca.pem")


class FailureTests(SynchronousTestCase):
    def test_untrusted_chain(self) -> None:
        f = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        self.assertTrue(is_tls_failure(f))
        text = describe_tls_failure(f)
        self.assertIn("not trusted", text)
        self.assertIn("HOSTLINK_WS_CA_FILE", text)

    def test_other_handshake_error(self) -> None:
        f = Failure(SSL.Error([("SSL routines", "", "wrong version number")]))
        self.assertEqual(describe_tls_failure(f), "TLS handshake failed: wrong version number")

    def test_host_name_mismatch(self) -> None:
        f = Failure(VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("a.example"))]))
        self.assertTrue(is_tls_failure(f))
        self.assertEqual(
            describe_tls_failure(f, "a.example"), "server certificate is not valid for a.example"
        )
        self.assertIn("a.example", describe_tls_failure(f))

    def test_names_not_checkable(self) -> None:
        f = Failure(CertificateNamesError("server certificate's names cannot be checked (x)"))
        self.assertTrue(is_tls_failure(f))
        self.assertIn("cannot be checked", describe_tls_failure(f, "h"))

    def test_not_tls(self) -> None:
        self.assertFalse(is_tls_failure(Failure(ConnectionDone())))
