"""TLS end to end: every server takes ssl:..., every client verifies against --ca (or the system's
trust store), and a certificate nobody vouched for is refused in one clear line (exit 3)."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.errors import ConnectFailed, ExitCode
from tcplab.tlsclient import nameProblem
from tests.support import ServerProcess, childEnv, runTcplab, scratch
from tests.tlsutil import makeCertificates, makeNamedCertificates

UNTRUSTED = b"TLS handshake failed (certificate verify failed)"


def sslListen(certs: dict[str, str]) -> str:
    return f"ssl:0:privateKey={certs['server']}:interface=127.0.0.1"


async def tcplab(*argv: str, cwd: str | None = None) -> tuple[int, bytes, bytes]:
    """Run ``tcplab`` without blocking the reactor (the test may be serving a connection meanwhile)."""
    out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "tcplab", *argv], env=childEnv(),
                                                    path=cwd)
    return code, out, err


class EchoOverTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.certs = makeCertificates(scratch(self))
        self.server = ServerProcess("tcplab-echo", "--listen", sslListen(self.certs))
        self.addCleanup(self.server.stop)

    def test_trustedWithTLSFlag(self) -> None:
        """tcplab echo --tls with the server's CA gets its line back over TLS."""
        result = runTcplab("echo", "--tls", "--ca", self.certs["ca"], "--host", "localhost",
                           "--port", str(self.server.port), "hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello\n"), result.stderr)

    def test_trustedWithConnectString(self) -> None:
        """tcplab echo with --ca and a tls: connect string gets its line back over TLS."""
        result = runTcplab("echo", "--ca", self.certs["ca"],
                           "--connect", f"tls:host=127.0.0.1:port={self.server.port}", "hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello\n"), result.stderr)

    def test_untrustedCertificateIsRefused(self) -> None:
        """Verification is on by default: a certificate from another CA is a clear connect error."""
        for ca in (["--ca", self.certs["other-ca"]], []):
            result = runTcplab("echo", *ca, "--connect", f"tls:host=localhost:port={self.server.port}", "hello")
            self.assertEqual(result.returncode, ExitCode.CONNECT, result.stderr)
            self.assertEqual(result.stdout, b"")
            self.assertEqual(result.stderr.count(b"\n"), 1)
            self.assertIn(UNTRUSTED, result.stderr)

    def test_sslConnectStringIsNotUnverified(self) -> None:
        """Twisted's ``ssl:`` client endpoint verifies nothing: tcplab must refuse it (or verify), not
        talk to whoever answers."""
        result = runTcplab("echo", "--timeout", "3", "--connect", f"ssl:host=localhost:port={self.server.port}", "hi")
        self.assertEqual(result.returncode, ExitCode.USAGE)
        self.assertEqual(result.stdout, b"")
        self.assertIn(b"use tls:host=", result.stderr)

    def test_caOptionErrors(self) -> None:
        """--ca without TLS, or a --ca file that cannot be read, is a usage error saying so."""
        result = runTcplab("echo", "--ca", self.certs["ca"], "hi")
        self.assertEqual(result.returncode, ExitCode.USAGE)
        result = runTcplab("echo", "--tls", "--ca", "/nonexistent.pem", "hi")
        self.assertEqual(result.returncode, ExitCode.USAGE)
        self.assertIn(b"cannot read --ca", result.stderr)


class Listener(Protocol):
    """A chat participant that only listens; ``waitFor`` fires once a line matching the test arrives."""

    def __init__(self) -> None:
        self.buffer = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        for test, d in list(self._waiting):
            for line in self.buffer.split(b"\n")[:-1]:
                if test(line) and not d.called:
                    self._waiting.remove((test, d))
                    d.callback(line)
                    break

    def waitFor(self, test: Callable[[bytes], bool]) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waiting.append((test, d))
        self.dataReceived(b"")
        return d.addTimeout(3, reactor)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class MultiOverTLSTests(unittest.TestCase):
    """``tcplab echo --tls --ca`` as a chat client of ``tcplab-multi --listen ssl:...``."""

    timeout = 30

    def setUp(self) -> None:
        self.certs = makeCertificates(scratch(self))
        self.server = ServerProcess("tcplab-multi", "--listen", sslListen(self.certs), "--stats-interval", "0")
        self.addCleanup(self.server.stop)

    async def listen(self) -> Listener:
        """A verified TLS connection of our own, to see what the others are sent."""
        with open(self.certs["ca"], "rb") as f:
            trust = Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=trust),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port))
        listener = Listener()
        await endpoint.connect(Factory.forProtocol(lambda: listener))
        self.addCleanup(lambda: (listener.transport.abortConnection(), listener.lost)[1])
        await listener.waitFor(lambda line: line.startswith(b"* welcome"))
        return listener

    async def test_chatOverTLS(self) -> None:
        """A client connecting to the hub over TLS is welcomed and its line reaches the other clients."""
        listener = await self.listen()
        code, out, err = await tcplab("echo", "--timeout", "3", "--tls", "--ca", self.certs["ca"], "--host",
                                      "localhost", "--port", str(self.server.port), "hello over tls")
        self.assertEqual(code, 0, err)
        lines = out.split(b"\n")
        self.assertTrue(lines[0].startswith(b"* welcome, you are 127.0.0.1:"), out)
        self.assertIn(b"hello over tls", lines)
        line = await listener.waitFor(lambda line: line.endswith(b"> hello over tls"))
        self.assertTrue(line.startswith(b"<127.0.0.1:"), line)


    async def test_connectString(self) -> None:
        """A tls: connect string reaches the hub over TLS too."""
        code, out, err = await tcplab("echo", "--timeout", "3", "--ca", self.certs["ca"], "--connect",
                                      f"tls:host=127.0.0.1:port={self.server.port}", "hi")
        self.assertEqual(code, 0, err)
        self.assertIn(b"hi\n", out)


    async def test_untrustedCertificateIsRefused(self) -> None:
        """A server certificate from another CA, or with no CA given, fails the connection with one line saying it is
        not trusted and nothing is sent."""
        for ca in (["--ca", self.certs["other-ca"]], []):
            code, out, err = await tcplab("echo", "--timeout", "3", *ca, "--connect",
                                          f"tls:host=localhost:port={self.server.port}", "hi")
            self.assertEqual((code, out, err.count(b"\n")), (ExitCode.CONNECT, b"", 1), err)
            self.assertIn(UNTRUSTED, err)



class FileOverTLSTests(unittest.TestCase):
    """``tcplab send --tls --ca`` to ``tcplab-file --listen ssl:...``."""

    timeout = 30

    def setUp(self) -> None:
        self.certs = makeCertificates(scratch(self))
        self.dir = scratch(self)
        self.src = scratch(self)
        self.data = os.urandom(300_000)
        with open(os.path.join(self.src, "secret.bin"), "wb") as f:
            f.write(self.data)
        self.server = ServerProcess("tcplab-file", "--listen", sslListen(self.certs), "--dir", self.dir)
        self.addCleanup(self.server.stop)

    def stored(self) -> list[str]:
        return sorted(name for name in os.listdir(self.dir) if not name.startswith(".tcplab-"))

    async def test_sendOverTLS(self) -> None:
        """tcplab send --tls delivers the file over TLS, prints its checksum and stores it whole."""
        code, out, err = await tcplab("send", "--quiet", "--tls", "--ca", self.certs["ca"], "--host", "localhost",
                                      "--port", str(self.server.port), "secret.bin", cwd=self.src)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(hashlib.sha256(self.data).hexdigest().encode(), out)
        with open(os.path.join(self.dir, "received_secret.bin"), "rb") as f:
            self.assertEqual(f.read(), self.data)

    async def test_connectStringWithResume(self) -> None:
        """tcplab send --resume over a tls: connect string stores the file."""
        code, out, err = await tcplab("send", "--quiet", "--resume", "--ca", self.certs["ca"], "--connect",
                                      f"tls:host=127.0.0.1:port={self.server.port}", "secret.bin", cwd=self.src)
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(self.stored(), ["received_secret.bin"])

    async def test_untrustedCertificateIsRefused(self) -> None:
        """Nothing is sent to a server that cannot prove who it is: exit 3 (not "lost", and no --resume hint)."""
        port = str(self.server.port)
        for argv in (["--tls", "--ca", self.certs["other-ca"], "--host", "localhost", "--port", port],
                     ["--tls", "--host", "localhost", "--port", port],
                     ["--resume", "--ca", self.certs["other-ca"], "--connect", f"tls:host=127.0.0.1:port={port}"]):
            code, out, err = await tcplab("send", "--quiet", *argv, "secret.bin", cwd=self.src)
            self.assertEqual((code, out, err.count(b"\n")), (ExitCode.CONNECT, b"", 1), err)
            self.assertIn(UNTRUSTED, err)
            self.assertNotIn(b"--resume", err)
        self.assertEqual(os.listdir(self.dir), [])

    async def test_turnedAwayOverTLS(self) -> None:
        """A connection over the limit hears why even over TLS (the ERR waits for the handshake)."""
        server = ServerProcess("tcplab-file", "--listen", sslListen(self.certs), "--dir", self.dir,
                               "--max-per-peer", "1")
        self.addCleanup(server.stop)
        holder = Protocol()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(Factory.forProtocol(lambda: holder))
        self.addCleanup(holder.transport.abortConnection)
        code, out, err = await tcplab("send", "--quiet", "--tls", "--ca", self.certs["ca"], "--host", "localhost",
                                      "--port", str(server.port), "secret.bin", cwd=self.src)
        self.assertEqual((code, out, err.count(b"\n")), (ExitCode.REFUSED, b"", 1), err)
        self.assertIn(b"--max-per-peer): close one or try again later (too-many-connections)", err)
        self.assertEqual(os.listdir(self.dir), [])


class Recorder(Protocol):
    """Echoes what it gets and keeps a copy, to see whether a client sent anything at all."""

    def __init__(self, received: list[bytes]) -> None:
        self.received = received

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(data)  # type: ignore[union-attr]


class ServerNameTests(unittest.TestCase):
    """The certificate must name the host asked for (subjectAltName; CN is not a name), checked by
    tcplab itself, or nothing is sent: exit 3, one line naming the host and what the certificate names."""

    timeout = 60

    def setUp(self) -> None:
        self.certs = makeNamedCertificates(scratch(self))
        self.src = scratch(self)
        with open(os.path.join(self.src, "a.txt"), "wb") as f:
            f.write(b"secret bytes\n")

    async def serve(self, label: str) -> tuple[int, list[bytes]]:
        """A TLS server in this process, with the certificate ``label``; what it receives is returned."""
        received: list[bytes] = []
        endpoint = serverFromString(reactor, f"ssl:0:privateKey={self.certs[label]}:interface=127.0.0.1")
        port = await endpoint.listen(Factory.forProtocol(lambda: Recorder(received)))
        self.addCleanup(port.stopListening)
        return port.getHost().port, received

    def ca(self, label: str) -> str:
        return self.certs["cn-only-ca"] if label == "cn-only" else self.certs["ca"]

    async def test_rightNamePasses(self) -> None:
        """A certificate with localhost in its subjectAltName is accepted, by --tls and by tls: alike."""
        port, received = await self.serve("right")
        for argv in (["--tls", "--host", "localhost", "--port", str(port)],
                     ["--connect", f"tls:host=localhost:port={port}"],
                     ["--connect", f"tls:host=127.0.0.1:port={port}"]):
            code, out, err = await tcplab("echo", "--timeout", "5", "--ca", self.ca("right"), *argv, "hello")
            self.assertEqual((code, out, err), (0, b"hello\n", b""), argv)
        self.assertEqual(b"".join(received), b"hello\n" * 3)

    async def test_wrongNameRefusedBeforeAnyByte(self) -> None:
        """SAN for other.example, or only CN=localhost: exit 3 for echo and send, the server gets nothing."""
        for label, names in (("other", b"is for other.example, not localhost"),
                             ("cn-only", b"names no host (no subjectAltName; its CN=localhost")):
            port, received = await self.serve(label)
            for command, operand in (("echo", "hello"), ("send", "a.txt")):
                for argv in (["--tls", "--host", "localhost", "--port", str(port)],
                             ["--connect", f"tls:host=localhost:port={port}"]):
                    code, out, err = await tcplab(command, "--timeout", "5", "--ca", self.ca(label), *argv,
                                                  operand, cwd=self.src)
                    context = (label, command, argv, err)
                    self.assertEqual((code, out, err.count(b"\n")), (ExitCode.CONNECT, b"", 1), context)
                    self.assertTrue(err.startswith(b"tcplab: TLS: the server's certificate "), context)
                    self.assertIn(names, err, context)
                    self.assertNotIn(b"--resume", err, context)
            self.assertEqual(received, [], label)

    async def test_tokenNotSentToWrongName(self) -> None:
        """``tcplab send`` with a token never gives it to a server whose certificate is for another name."""
        port, received = await self.serve("other")
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tcplab", "send", "--tls", "--ca", self.certs["ca"], "--port", str(port),
                             "a.txt"], env={**childEnv(), "TCPLAB_TOKEN": "s3cret"}, path=self.src)
        self.assertEqual(code, ExitCode.CONNECT, err)
        self.assertEqual(received, [])

    async def test_whateverTwistedChecks(self) -> None:
        """With a Twisted whose own check lets every name through, tcplab still refuses another name."""
        from twisted.internet import _sslverify

        from tcplab.cli.common import ClientOptions, connect

        if hasattr(_sslverify, "_verifyCB"):  # Twisted 26.x checks names in its verify callback
            self.patch(_sslverify, "_verifyCB", lambda *a: lambda conn, cert, err, depth, ok: ok)
        else:  # older Twisted checks them in an info callback, through these two
            self.patch(_sslverify, "verifyHostname", lambda connection, host: None)
            self.patch(_sslverify, "verifyIPAddress", lambda connection, address: None)
        for label, refused in (("other", True), ("cn-only", True), ("right", False)):
            port, received = await self.serve(label)
            options = ClientOptions()
            options.parseOptions(["--tls", "--ca", self.ca(label), "--port", str(port), "--timeout", "5"])
            client = Protocol()
            attempt = connect(reactor, options, client)
            if refused:
                error = await self.assertFailure(attempt, ConnectFailed)
                self.assertIn("TLS: the server's certificate", str(error))
                self.assertEqual(received, [], label)
            else:
                self.assertIs(await attempt, client)
                client.transport.loseConnection()  # type: ignore[union-attr]

    def test_nameProblemInProcess(self) -> None:
        """The check itself: right name and address pass; another name and CN-only are named in the refusal."""
        from cryptography import x509

        def cert(label: str) -> x509.Certificate:
            with open(self.certs[label], "rb") as f:
                return x509.load_pem_x509_certificate(f.read())

        self.assertIsNone(nameProblem(cert("right"), "localhost"))
        self.assertIsNone(nameProblem(cert("right"), "127.0.0.1"))
        self.assertIn("is for localhost, 127.0.0.1, not example.org", nameProblem(cert("right"), "example.org") or "")
        self.assertIn("is for localhost, 127.0.0.1, not 127.0.0.2", nameProblem(cert("right"), "127.0.0.2") or "")
        self.assertIn("is for other.example, not localhost", nameProblem(cert("other"), "localhost") or "")
        self.assertIn("names no host", nameProblem(cert("cn-only"), "localhost") or "")


class TLSMismatchTests(unittest.TestCase):
    """Plain TCP to a TLS port and TLS to a plain port: exit 3 and a line that says TLS and what to
    check, never "connection lost … --resume" nor "the server closed the connection"."""

    timeout = 60

    def setUp(self) -> None:
        self.certs = makeCertificates(scratch(self))
        self.src = scratch(self)
        self.dir = scratch(self)
        with open(os.path.join(self.src, "a.txt"), "wb") as f:
            f.write(b"x" * 1000)

    def assertTLSFailure(self, code: int, out: bytes, err: bytes, context: object) -> None:
        self.assertEqual((code, out, err.count(b"\n")), (ExitCode.CONNECT, b"", 1), (context, err))
        self.assertIn(b"TLS", err, context)
        self.assertIn(b"--tls", err, context)
        self.assertNotIn(b"--resume", err, context)
        self.assertNotIn(b"closed the connection (", err, context)

    async def test_plainToTLSPort(self) -> None:
        """``tcplab echo``/``send`` without --tls to a TLS server: exit 3, "use --tls"."""
        for plugin, command, operand in (("tcplab-echo", "echo", "hello"), ("tcplab-file", "send", "a.txt")):
            extra = ["--dir", self.dir] if plugin == "tcplab-file" else []
            server = ServerProcess(plugin, "--listen", sslListen(self.certs), *extra)
            self.addCleanup(server.stop)
            code, out, err = await tcplab(command, "--timeout", "5", "--host", "127.0.0.1", "--port",
                                          str(server.port), operand, cwd=self.src)
            self.assertTLSFailure(code, out, err, command)
        self.assertEqual(os.listdir(self.dir), [])

    async def test_tlsToPlainPort(self) -> None:
        """``tcplab echo``/``send --tls`` to a plain server: exit 3, "is it a TLS port?"."""
        for plugin, command, operand in (("tcplab-echo", "echo", "hello"), ("tcplab-file", "send", "a.txt")):
            extra = ["--dir", self.dir] if plugin == "tcplab-file" else []
            server = ServerProcess(plugin, "--port", "0", "--interface", "127.0.0.1", *extra)
            self.addCleanup(server.stop)
            code, out, err = await tcplab(command, "--timeout", "3", "--tls", "--ca", self.certs["ca"], "--host",
                                          "localhost", "--port", str(server.port), operand, cwd=self.src)
            self.assertTLSFailure(code, out, err, command)
            self.assertIn(b"TLS port", err, command)

    async def test_serverAnswersInTLS(self) -> None:
        """A server that answers plain text with a TLS alert and hangs up is named as a TLS port."""
        received: list[bytes] = []

        class Alerting(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)
                self.transport.write(b"\x15\x03\x03\x00\x02\x02\x46")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory.forProtocol(Alerting))
        self.addCleanup(port.stopListening)
        code, out, err = await tcplab("echo", "--timeout", "5", "--host", "127.0.0.1", "--port",
                                      str(port.getHost().port), "hello")
        self.assertTLSFailure(code, out, err, "alert")
        self.assertIn(b"is a TLS port", err)
        self.assertEqual(len(received), 2, "the line sent, then the probe's ClientHello")

    async def test_stalledHandshake(self) -> None:
        """A server that accepts and never answers the ClientHello: exit 3 naming the handshake, after --timeout."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]
            for command, operand in (("echo", "hello"), ("send", "a.txt")):
                code, out, err = await tcplab(command, "--timeout", "0.5", "--tls", "--ca", self.certs["ca"],
                                              "--host", "localhost", "--port", str(port), operand, cwd=self.src)
                self.assertTLSFailure(code, out, err, command)
                self.assertIn(b"TLS handshake with localhost:%d did not complete within 0.5s" % port, err)
