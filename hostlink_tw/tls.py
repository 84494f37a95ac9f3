"""
Verified TLS for ``wss://``: the system trust store plus ``HOSTLINK_WS_CA_FILE``.

Autobahn's ``connectWS`` falls back to ``ssl.ClientContextFactory()``, which
checks neither the certificate chain nor the host name; this module builds
the options the client passes to ``startTLS`` instead:
``optionsForClientTLS(hostname, trustRoot=...)`` (chain *and* host name or IP
address verified, SNI sent for DNS names).

Twisted offers two trust roots, the platform's (:func:`platformTrust`) and an
explicit list of certificates (:func:`trustRootFromCertificates`), but not
both at once.  :class:`CombinedTrustRoot` applies several roots to the same
OpenSSL context: each adds its certificates to the one certificate store, so
a server is trusted when any of them vouches for it.

Host-name verification fails closed.  Twisted's own verify callback
(``twisted.internet._sslverify._verifyCB``) refuses a certificate only when
``service_identity`` raises ``VerificationError``; any other exception — the
``CertificateError`` a malformed subjectAltName entry raises (an IP address
written as a dNSName, a wildcard such as ``a.*.example``, an empty name), or
a certificate without any subjectAltName — is logged and the handshake goes
on with OpenSSL's verdict on the chain alone, so a certificate from a trusted
CA for *another* host is accepted.  :func:`client_tls_options` therefore
replaces that callback with :class:`FailClosedClientTLSOptions`'s, which
refuses the certificate on *any* exception while checking its names: the
handshake fails with :class:`CertificateNamesError` and no application byte
(the signed upgrade) is ever sent.  The consequence: a certificate with one
malformed subjectAltName entry is refused even for a name it does hold
(Go's ``crypto/x509`` skips such entries); reissue it with IP addresses as
iPAddress entries.  See ``docs/upstream.rst`` for the Twisted report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet._sslverify import (  # not re-exported by ssl
    ClientTLSOptions,
    IOpenSSLTrustRoot,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hostlink_tw._files import FileTooLargeError, read_regular_file

__all__ = [
    "CA_FILE_MAX_BYTES",
    "read_ca_file",
    "CertificateNamesError",
    "CombinedTrustRoot",
    "FailClosedClientTLSOptions",
    "TLSConfigError",
    "client_tls_options",
    "describe_tls_failure",
    "is_tls_failure",
    "load_ca_certificates",
    "trust_root",
]


log = Logger()


class TLSConfigError(ValueError):
    """``HOSTLINK_WS_CA_FILE`` cannot be used; the message names the file."""


@implementer(IOpenSSLTrustRoot)
class CombinedTrustRoot:
    """
    Trust every certificate authority that any of ``roots`` trusts.

    ``IOpenSSLTrustRoot``'s one method is private to Twisted, so this class
    only delegates to Twisted's own trust roots, in order, on the same
    context; it never touches OpenSSL itself.
    """

    def __init__(self, roots: Sequence[Any]) -> None:
        for root in roots:
            if not IOpenSSLTrustRoot.providedBy(root):
                raise TypeError(f"{root!r} is not an IOpenSSLTrustRoot")
        self._roots: tuple[Any, ...] = tuple(roots)

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        for root in self._roots:
            root._addCACertsToContext(context)


#: A CA bundle larger than this is refused: a whole system bundle is a few
#: hundred KiB, and a mistaken path (a disk image, a log) must not be read
#: into memory.
CA_FILE_MAX_BYTES = 16 * 1024 * 1024


def read_ca_file(path: str) -> list[x509.Certificate]:
    """
    Every certificate of the PEM file at ``path`` (a bundle may hold several).

    The one reader of ``HOSTLINK_WS_CA_FILE``: the configuration checks it at
    start-up with this, and the client loads it with this.  Only a regular
    file is read, opened without blocking (a FIFO is refused at once).

    :raises TLSConfigError: the file cannot be read, is larger than
        :data:`CA_FILE_MAX_BYTES`, or holds no valid PEM certificate; the
        message names the path.
    """
    try:
        # Non-blocking, regular files only: a FIFO at the path must not hang
        # the agent's start (the discipline of the identity files).
        data = read_regular_file(path, CA_FILE_MAX_BYTES)
    except FileTooLargeError:
        raise TLSConfigError(f"{path!r} is larger than a CA bundle can be") from None
    except IsADirectoryError:
        raise TLSConfigError(f"cannot read {path!r} (it is a directory)") from None
    except OSError as e:
        raise TLSConfigError(f"cannot read {path!r} ({e.strerror or e})") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        # cryptography's own message is about PEM framing, not about this file.
        raise TLSConfigError(f"{path!r} holds no PEM certificate") from None


def load_ca_certificates(path: str) -> list[Certificate]:
    """
    The certificates of the CA file at ``path``, as Twisted certificates.

    :raises TLSConfigError: as :func:`read_ca_file`, naming ``HOSTLINK_WS_CA_FILE``.
    """
    try:
        parsed = read_ca_file(path)
    except TLSConfigError as e:
        raise TLSConfigError(f"HOSTLINK_WS_CA_FILE: {e}") from None
    return [Certificate.loadPEM(cert.public_bytes(Encoding.PEM)) for cert in parsed]


def trust_root(ca_file: str | None) -> Any:
    """
    The trust root for the control plane: the platform's trust store, plus
    the certificates of ``ca_file`` when given.

    :raises TLSConfigError: see :func:`load_ca_certificates`.
    """
    system = platformTrust()  # type: ignore[no-untyped-call]
    if not ca_file:
        return system
    extra = trustRootFromCertificates(  # type: ignore[no-untyped-call]
        load_ca_certificates(ca_file)
    )
    return CombinedTrustRoot([system, extra])


class CertificateNamesError(Exception):
    """
    The server certificate's names could not be checked against the host,
    so the certificate was refused (fail closed); the message says why.
    """


@implementer(IOpenSSLClientConnectionCreator)
class FailClosedClientTLSOptions:
    """
    Twisted's client TLS options with a host-name check that fails closed.

    Connections are made by the wrapped ``ClientTLSOptions`` (trust root,
    SNI, protocol settings); only the verify callback is replaced, by one
    that refuses the leaf certificate unless ``service_identity`` positively
    matches its names against the host, whatever goes wrong on the way.
    """

    def __init__(self, options: ClientTLSOptions) -> None:
        from service_identity.hazmat import DNS_ID, IPAddress_ID

        self._options = options
        # The same service id Twisted's callback would have checked: the
        # host as IDNA ASCII, or the IP address literal.
        host = options._hostnameASCII
        self._service_id: Any = DNS_ID(host) if options._hostnameIsDnsName else IPAddress_ID(host)

    @property
    def hostname(self) -> str:
        """The host name or IP address literal the certificate must be valid for."""
        return self._options._hostname

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        The wrapped options' connection, with the fail-closed verify callback.

        :param tlsProtocol: Twisted's ``TLSMemoryBIOProtocol`` for this
            connection; told why verification failed, so that its
            ``connectionLost`` reason names the cause.
        """
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _fail_closed_verify_callback(tlsProtocol, self._service_id),
        )
        return connection


def _fail_closed_verify_callback(tls_protocol: Any, service_id: Any) -> Any:
    # The callback lives as long as the OpenSSL connection, which the TLS
    # protocol holds: drop the protocol as soon as the verdict is known so
    # that no reference cycle outlives the handshake.
    protocol_ref: list[Any] = [tls_protocol]

    def verify(
        connection: SSL.Connection, cert: Any, err: int, depth: int, ok: int
    ) -> bool:
        # An exception escaping an OpenSSL callback is lost (or worse), so
        # everything is caught here; anything but a positive match refuses.
        if not ok:
            # OpenSSL refused the chain; its error names the cause.
            protocol_ref.clear()
            return False
        if depth != 0:
            return True  # chain certificates are OpenSSL's job
        protocol = protocol_ref.pop() if protocol_ref else None
        try:
            from service_identity import VerificationError
            from service_identity.hazmat import verify_service_identity
            from service_identity.pyopenssl import extract_patterns

            try:
                verify_service_identity(extract_patterns(cert), [service_id], [])
            except VerificationError:
                reason = Failure()  # type: ignore[no-untyped-call]
            except Exception as e:  # noqa: BLE001 - fail closed on anything
                # service_identity shows certificate names as bytes reprs
                # (control characters escaped); the length is the peer's, so
                # bound it.
                detail = f"{type(e).__name__}: {e}"
                if len(detail) > 200:
                    detail = detail[:200] + "..."
                reason = Failure(  # type: ignore[no-untyped-call]
                    CertificateNamesError(
                        f"server certificate's names cannot be checked ({detail}); refusing it"
                    )
                )
            else:
                return True
            if protocol is not None:
                protocol.failVerification(reason)
        except BaseException:  # noqa: BLE001 - never let it reach OpenSSL
            log.failure("while refusing the server certificate")
        return False

    return verify


def client_tls_options(hostname: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
    """
    TLS client options verifying the certificate chain against
    :func:`trust_root` and the certificate's names against ``hostname``
    (a DNS name or an IP address literal), failing closed: a certificate
    whose names cannot be checked for any reason is refused (see the module
    docstring).

    :raises TLSConfigError: see :func:`load_ca_certificates`.
    """
    options = optionsForClientTLS(hostname, trustRoot=trust_root(ca_file))
    if not isinstance(options, ClientTLSOptions):
        # Twisted changed what it returns; refuse to run with an unchecked
        # verify callback rather than guess.
        raise TypeError(f"unexpected client TLS options {type(options).__name__}")
    # cast: mypy does not read zope's @implementer.
    return cast(IOpenSSLClientConnectionCreator, FailClosedClientTLSOptions(options))


def is_tls_failure(reason: Failure) -> bool:
    """Whether a connection ended because TLS failed (chain, host name, handshake)."""
    from service_identity import VerificationError

    return isinstance(reason.value, (SSL.Error, VerificationError, CertificateNamesError))


def describe_tls_failure(reason: Failure, host: str = "") -> str:
    """
    A short human-readable account of a TLS failure, for a log line.

    :param host: the host name or address the certificate was checked against.
    """
    from service_identity import VerificationError

    value = reason.value
    if isinstance(value, VerificationError):
        names = ", ".join(
            str(getattr(getattr(e, "mismatched_id", None), "hostname", None)
                or getattr(getattr(e, "mismatched_id", None), "ip", None) or e)
            for e in value.errors
        )
        return f"server certificate is not valid for {host or names}"
    if isinstance(value, CertificateNamesError):
        return str(value)
    if isinstance(value, SSL.Error):
        details = []
        for item in value.args[0] if value.args and isinstance(value.args[0], list) else []:
            if isinstance(item, tuple) and item:
                details.append(str(item[-1]))
        text = "; ".join(d for d in details if d) or str(value)
        if "certificate verify failed" in text:
            return (
                f"server certificate not trusted ({text}); "
                "add its CA to the system store or HOSTLINK_WS_CA_FILE"
            )
        return f"TLS handshake failed: {text}"
    return str(value)
