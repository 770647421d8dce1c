"""The servers' side of TLS: clients that offer ALPN are served, only TLS 1.2+ with forward-secret
AEAD suites is spoken, on every server, as ``openssl s_client`` and a pyOpenSSL client see it."""

from __future__ import annotations

import shutil
import subprocess

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.echo.server import EchoFactory
from tcplab.listening import serverEndpoint
from tcplab.tlsserver import serverTLS
from tests.support import ServerProcess, scratch
from tests.tlsutil import makeCertificates

OPENSSL = shutil.which("openssl")


def sClient(port: int, *argv: str) -> tuple[int, bytes]:
    """Run ``openssl s_client`` against 127.0.0.1:port with no input; its exit status and output."""
    assert OPENSSL is not None
    result = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                             *argv], stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
    return result.returncode, result.stdout + result.stderr


def handshakeDone(output: bytes) -> bool:
    """Whether s_client's report shows a negotiated cipher (``Cipher is (NONE)`` when refused)."""
    return b", Cipher is " in output and b"Cipher is (NONE)" not in output


class OpenSSLClientTests(unittest.TestCase):
    """``openssl s_client`` against each server's ``ssl:`` endpoint."""

    timeout = 60

    def setUp(self) -> None:
        if OPENSSL is None:
            raise unittest.SkipTest("openssl is not installed")
        self.certs = makeCertificates(scratch(self))

    def serve(self, plugin: str, *argv: str, rsa: bool = False) -> int:
        certs = makeCertificates(scratch(self), rsaServer=True) if rsa else self.certs
        server = ServerProcess(plugin, "--listen", f"ssl:0:privateKey={certs['server']}:interface=127.0.0.1", *argv)
        self.addCleanup(server.stop)
        return server.port

    def assertALPNOfferServed(self, port: int) -> None:
        for offer in ("http/1.1", "h2,http/1.1"):
            code, out = sClient(port, "-alpn", offer)
            self.assertEqual(code, 0, out)
            self.assertTrue(handshakeDone(out), out)
            self.assertIn(b"No ALPN negotiated", out)

    def test_echoServesALPNOffer(self) -> None:
        """A client offering ALPN (as every browser does) completes the handshake with tcplab-echo."""
        self.assertALPNOfferServed(self.serve("tcplab-echo"))

    def test_multiServesALPNOffer(self) -> None:
        """A client offering ALPN completes the handshake with tcplab-multi."""
        self.assertALPNOfferServed(self.serve("tcplab-multi", "--stats-interval", "0"))

    def test_fileServesALPNOffer(self) -> None:
        """A client offering ALPN completes the handshake with tcplab-file."""
        self.assertALPNOfferServed(self.serve("tcplab-file", "--dir", scratch(self)))

    def test_oldProtocolsRefused(self) -> None:
        """TLS 1.0 and 1.1 are refused with a protocol-version alert; 1.2 and 1.3 are spoken."""
        port = self.serve("tcplab-echo")
        for version in ("-tls1", "-tls1_1"):
            code, out = sClient(port, version, "-cipher", "DEFAULT@SECLEVEL=0")
            self.assertNotEqual(code, 0, out)
            self.assertIn(b"alert protocol version", out)
        for version, shown in (("-tls1_2", b"TLSv1.2"), ("-tls1_3", b"TLSv1.3")):
            code, out = sClient(port, version)
            self.assertEqual(code, 0, out)
            self.assertIn(b"New, " + shown + b", Cipher is ", out)

    def test_tls12OnlyForwardSecretAEAD(self) -> None:
        """On TLS 1.2 a client offering only CBC or only plain-RSA key exchange is refused; ECDHE with
        AES-GCM or ChaCha20-Poly1305 is accepted (an RSA certificate, which plain RSA would need)."""
        port = self.serve("tcplab-echo", rsa=True)
        for suites in ("ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256",
                       "AES128-GCM-SHA256:AES256-GCM-SHA384", "AES128-SHA:AES256-SHA256"):
            code, out = sClient(port, "-tls1_2", "-cipher", suites)
            self.assertNotEqual(code, 0, suites)
            self.assertIn(b"alert handshake failure", out, suites)
        for suite in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"):
            code, out = sClient(port, "-tls1_2", "-cipher", suite)
            self.assertEqual(code, 0, out)
            self.assertIn(b"Cipher is " + suite.encode(), out)


class EchoClient(Protocol):
    """Sends ``ping`` once connected; ``echoed`` fires with what came back once it all did."""

    def __init__(self) -> None:
        self.received = b""
        self.echoed: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping" and not self.echoed.called:
            self.echoed.callback(self.received)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.echoed.called:
            self.echoed.errback(reason)
        self.lost.callback(None)


class InProcessTests(unittest.TestCase):
    """The ``ssl:`` endpoint tcplab builds, talked to by Twisted's pyOpenSSL client."""

    def setUp(self) -> None:
        self.certs = makeCertificates(scratch(self))

    async def test_pyOpenSSLClientOfferingALPNIsEchoed(self) -> None:
        """A pyOpenSSL client offering h2 and http/1.1 gets its bytes echoed, with no protocol selected."""
        endpoint = serverEndpoint(reactor, f"ssl:0:privateKey={self.certs['server']}:interface=127.0.0.1")
        port = await endpoint.listen(EchoFactory(0, reactor))
        self.addCleanup(port.stopListening)
        with open(self.certs["ca"], "rb") as f:
            trust = Certificate.loadPEM(f.read())
        client = EchoClient()
        creator = optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=[b"h2", b"http/1.1"])
        await wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)).connect(
            Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])  # type: ignore[union-attr]
        self.assertEqual(await client.echoed.addTimeout(5, reactor), b"ping")
        self.assertIsNone(client.transport.negotiatedProtocol)  # type: ignore[union-attr]

    def test_cipherListIsForwardSecretAEAD(self) -> None:
        """Every TLS 1.2 suite the server context offers is ECDHE/DHE with AES-GCM or ChaCha20-Poly1305."""
        context = serverTLS(self.certs["server"]).getContext()
        suites = [name for name in SSL.Connection(context, None).get_cipher_list() if not name.startswith("TLS_")]
        self.assertTrue(suites)
        for name in suites:
            self.assertTrue(name.startswith(("ECDHE-", "DHE-")), name)
            self.assertTrue("-GCM-" in name or name.endswith("CHACHA20-POLY1305"), name)
