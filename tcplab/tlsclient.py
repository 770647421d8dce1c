"""The client side of a connection: handed to its protocol only once it is safe to talk.

Over TLS that means once the handshake is done *and* the server's certificate names the host
asked for. The name is checked here, inside the handshake (a verify callback on the pyOpenSSL
connection), not left to Twisted's own check: depending on the Twisted and service_identity
versions, that check logs a ``CertificateError`` (a certificate without subjectAltName) and lets
the handshake stand. A refused certificate ends the handshake, so not one byte of ours is sent.

Over plain TCP, a server that closes without a word, or with only a TLS alert (what TLS servers
do with plain text), and then answers a ClientHello in TLS, is reported as a TLS port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from tcplab.errors import ConnectFailed, tlsFailure
from tcplab.escaping import escapeName
from tcplab.interfaces import StreamTransport

#: At most this many of a certificate's names are quoted in a message.
MAX_NAMES_SHOWN = 5


def nameProblem(certificate: x509.Certificate, host: str) -> str | None:
    """Why ``certificate`` is not one for ``host`` (one line), or None when it is."""
    try:
        identity: Any = IPAddress_ID(host) if _isIP(host) else DNS_ID(host)
    except (ValueError, CertificateError):
        return f"TLS: cannot check a certificate for {escapeName(host)!r}: it is neither a host name nor an address"
    try:
        verify_service_identity(extract_patterns(certificate), obligatory_ids=[identity], optional_ids=[])
    except VerificationError:
        return (f"TLS: the server's certificate is for {certificateNames(certificate)}, not {escapeName(host)}: "
                f"connect by a name it is for, or give the server a certificate for {escapeName(host)}")
    except CertificateError:
        common = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        cn = f"; its CN={escapeName(common[0])} is not a name clients check" if common else ""
        return (f"TLS: the server's certificate names no host (no subjectAltName{cn}), so it is not one for "
                f"{escapeName(host)}: give the server a certificate with {escapeName(host)} in its subjectAltName")
    return None


def certificateNames(certificate: x509.Certificate) -> str:
    """The DNS names and addresses a certificate is for, shortened to one readable phrase."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return "no host"
    names = [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
    if not names:
        return "no host name or address"
    shown = ", ".join(escapeName(name) for name in names[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class _Forwarding(Protocol):
    """Stands in for ``protocol`` on a transport, passing on what it is told once handed over."""

    transport: StreamTransport

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        self.handedOver = False
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)
        if IHalfCloseableProtocol.providedBy(protocol):
            alsoProvides(self, IHalfCloseableProtocol)

    def handOver(self) -> None:
        self.handedOver = True
        self.protocol.makeConnection(self.transport)
        self.ready.callback(self.protocol)

    def dataReceived(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def readConnectionLost(self) -> None:
        IHalfCloseableProtocol(self.protocol).readConnectionLost()

    def writeConnectionLost(self) -> None:
        IHalfCloseableProtocol(self.protocol).writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.handedOver:
            self.protocol.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(self.failure(reason))

    def failure(self, reason: Failure | None) -> Failure:
        return Failure(ConnectFailed(f"the connection closed before it could be used ({reason})"))

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class VerifiedTLS(_Forwarding):
    """The protocol's stand-in over TLS until the handshake is done and the server is ``host``."""

    def __init__(self, protocol: IProtocol, host: str, where: str) -> None:
        super().__init__(protocol)
        alsoProvides(self, IHandshakeListener)
        self.host = host
        self.where = where
        self.refusal: str | None = None

    def makeConnection(self, transport: Any) -> None:
        # Called before the handshake starts: the check is in place before the ClientHello goes.
        self.transport = transport
        connection = transport.getHandle() if hasattr(transport, "getHandle") else None
        if not isinstance(connection, SSL.Connection):
            self.refusal = f"TLS: cannot check the server's certificate on {self.where}"
            transport.abortConnection()
            return
        connection.set_verify(connection.get_verify_mode() | SSL.VERIFY_PEER, self._verify)
        self.connectionMade()

    def _verify(self, connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            return False
        if depth == 0:
            self.refusal = nameProblem(certificate.to_cryptography(), self.host)
            return self.refusal is None
        return True

    def handshakeCompleted(self) -> None:
        if self.refusal is not None:  # pragma: no cover - the handshake cannot complete once refused
            self.transport.abortConnection()
            return
        self.handOver()
        if IHandshakeListener.providedBy(self.protocol):
            self.protocol.handshakeCompleted()

    def failure(self, reason: Failure | None) -> Failure:
        if self.refusal is not None:
            return Failure(ConnectFailed(self.refusal))
        tls = tlsFailure(reason, self.where)
        if tls is not None:
            return Failure(tls)
        return Failure(ConnectFailed(f"TLS: {self.where} closed the connection during the TLS handshake: "
                                     "is it a TLS port? (without --tls or tls: if it is plain TCP)"))


def _alertSoFar(data: bytes) -> bool:
    """Whether ``data`` is (the start of) one TLS alert record: 0x15, version 3.x, length 2."""
    pattern = (b"\x15", b"\x03", b"\x00\x01\x02\x03\x04", b"\x00", b"\x02")
    return len(data) <= 7 and all(data[i:i + 1] in allowed for i, allowed in enumerate(pattern) if i < len(data))


def _answersTLS(head: bytes) -> bool | None:
    """Whether a reply to our ClientHello is TLS (a ServerHello or an alert), None until it can tell.
    An echo server sends the ClientHello back: that is handshake type 1, not TLS."""
    if head[:1] not in (b"\x15", b"\x16") or head[1:2] not in (b"", b"\x03"):
        return False
    if head[:1] == b"\x15":
        return True if len(head) >= 3 else None
    return head[5] == 2 if len(head) >= 6 else None


class PlainTCP(_Forwarding):
    """The protocol's stand-in over plain TCP: handed over at once; but a server that hangs up
    without a word (or with only a TLS alert) is asked whether it speaks TLS, and if it does the
    protocol hears that, not that the connection was lost."""

    def __init__(self, protocol: IProtocol, where: str, probe: Callable[[], Deferred[bool]] | None = None) -> None:
        super().__init__(protocol)
        self.where = where
        self.probe = probe
        self.heard = False
        self.held = b""

    def connectionMade(self) -> None:
        self.handOver()

    def dataReceived(self, data: bytes) -> None:
        if not self.heard:
            self.held += data
            if _alertSoFar(self.held):
                return  # maybe a TLS server's alert: hold it until the next byte or the hang-up tells
            self.heard = True
            data, self.held = self.held, b""
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.heard or self.probe is None or not (reason is None or reason.check(ConnectionDone, ConnectionLost)):
            return self._lost(reason)

        # Silence then a hang-up is what a TLS port does to plain text, and also what a plain
        # server that died does: ask the port (one ClientHello, nothing else) which it is.
        def decided(tls: bool) -> None:
            if not tls:
                return self._lost(reason)
            self.held = b""
            self._lost(Failure(ConnectFailed(f"TLS: {self.where} is a TLS port: connect with --tls (and --ca "
                                             "if its certificate is your own), or with a tls: endpoint")))

        self.probe().addCallback(decided)

    def _lost(self, reason: Failure) -> None:
        if self.held:
            held, self.held = self.held, b""
            super().dataReceived(held)
        _Forwarding.connectionLost(self, reason)


def clientHello() -> bytes:
    """The bytes a TLS client starts with, for asking a port whether it speaks TLS."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(1 << 16)


class _Probe(Protocol):
    transport: StreamTransport

    def __init__(self) -> None:
        self.head = b""
        self.answer: Deferred[bool] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(clientHello())

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        verdict = _answersTLS(self.head)
        if verdict is not None and not self.answer.called:
            self.answer.callback(verdict)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answer.called:
            self.answer.callback(bool(self.head) and _answersTLS(self.head) is True)


def speaksTLS(endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float) -> Deferred[bool]:
    """Whether the server at ``endpoint`` answers a ClientHello in TLS (False if unsure)."""
    probe = _Probe()
    d = endpoint.connect(Factory.forProtocol(lambda: probe))
    d.addCallback(lambda _: probe.answer)
    d.addTimeout(timeout, clock)

    def done(result: object) -> bool:
        if probe.transport is not None:
            probe.transport.abortConnection()
        return result is True

    return d.addBoth(done)
