"""The TLS every tcplab server speaks on ``ssl:`` endpoints, the same on every Twisted version.

Twisted's own server context changed under us (since 26.4 it answers an ALPN offer it cannot
match with an empty selection, which OpenSSL turns into a fatal "internal error" alert, so every
browser, Go and Java client is refused; its TLS 1.2 defaults include CBC and plain-RSA suites).
So the context is built here: TLS 1.2 and 1.3 only, on TLS 1.2 only forward-secret AEAD suites,
and ALPN offers declined (no protocol is selected, the handshake goes on).
"""

from __future__ import annotations

import re

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    DiffieHellmanParameters,
    PrivateCertificate,
    TLSVersion,
)
from twisted.python.filepath import FilePath
from zope.interface import implementer

#: TLS 1.2 suites offered: ECDHE or DHE key exchange (forward secrecy) with AES-GCM or
#: ChaCha20-Poly1305 (AEAD); never CBC, never plain-RSA key exchange, never anonymous or PSK.
#: DHE suites are only usable with ``dhParameters=``. TLS 1.3 suites are all AEAD and forward-secret.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!PSK:!DSS"

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TLSConfigError(ValueError):
    """A certificate, key or parameter file the server cannot use; the message says which and why."""


def _declineALPN(connection: SSL.Connection, offered: list[bytes]) -> SSL._NoOverlappingProtocols:
    """Select no protocol, so the handshake completes without ALPN (RFC 7301 allows it)."""
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _read(key: str, path: str) -> bytes:
    try:
        return FilePath(path).getContent()
    except OSError as e:
        raise TLSConfigError(f"cannot read {key}={path} ({e.strerror or e}): give the path of a PEM file") from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """One server context, built once; every connection gets its own ``SSL.Connection`` from it."""

    def __init__(self, options: CertificateOptions) -> None:
        try:
            self.context = options.getContext()
        except SSL.Error as e:
            raise TLSConfigError(f"the private key does not match the certificate ({_sslReason(e)})") from None
        self.context.set_alpn_select_callback(_declineALPN)

    def getContext(self) -> SSL.Context:
        """For code that wants an old-style context factory."""
        return self.context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def serverTLS(privateKey: str = "server.pem", certKey: str | None = None, extraCertChain: str | None = None,
              dhParameters: str | None = None) -> ServerTLS:
    """Load the files an ``ssl:`` endpoint names (as Twisted's ``ssl:`` parser reads them), or raise
    :class:`TLSConfigError` saying which file is wrong."""
    keyPEM = _read("privateKey", privateKey)
    certPEM = keyPEM if certKey is None else _read("certKey", certKey)
    certName = f"certKey={certKey}" if certKey is not None else f"privateKey={privateKey}"
    if not _PEM_CERTIFICATE.search(certPEM):
        raise TLSConfigError(f"{certName} holds no PEM certificate: give certKey=CERT.pem")
    try:
        both = PrivateCertificate.loadPEM(certPEM + b"\n" + keyPEM)
    except (crypto.Error, SSL.Error, ValueError):
        raise TLSConfigError(f"privateKey={privateKey} holds no PEM private key that tcplab can read "
                             "(an unencrypted PEM key is needed)") from None
    chain = None
    if extraCertChain is not None:
        chain = [Certificate.loadPEM(pem).original for pem in _PEM_CERTIFICATE.findall(
            _read("extraCertChain", extraCertChain))]
        if not chain:
            raise TLSConfigError(f"extraCertChain={extraCertChain} holds no PEM certificate")
    dh = None
    if dhParameters is not None:
        _read("dhParameters", dhParameters)
        try:
            SSL.Context(SSL.TLS_METHOD).load_tmp_dh(dhParameters.encode())
        except SSL.Error:
            raise TLSConfigError(f"dhParameters={dhParameters} holds no PEM DH parameters "
                                 "(make some with: openssl dhparam -out dh.pem 2048)") from None
        dh = DiffieHellmanParameters.fromFile(FilePath(dhParameters))
    options = CertificateOptions(
        privateKey=both.privateKey.original,
        certificate=both.original,
        extraCertChain=chain,
        dhParameters=dh,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
    )
    return ServerTLS(options)


def _sslReason(error: SSL.Error) -> str:
    try:
        return str(error.args[0][0][2])
    except (IndexError, TypeError):
        return str(error)
