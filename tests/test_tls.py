"""TLS end to end: every server takes ssl:..., every client verifies against --ca (or the system's
trust store), and a certificate nobody vouched for is refused in one clear line (exit 3)."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.errors import ExitCode
from tests.support import ServerProcess, childEnv, runTcplab, scratch
from tests.tlsutil import makeCertificates

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
        result = runTcplab("echo", "--tls", "--ca", self.certs["ca"], "--host", "localhost",
                           "--port", str(self.server.port), "hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello\n"), result.stderr)

    def test_trustedWithConnectString(self) -> None:
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
        code, out, err = await tcplab("echo", "--timeout", "3", "--ca", self.certs["ca"], "--connect",
                                      f"tls:host=127.0.0.1:port={self.server.port}", "hi")
        self.assertEqual(code, 0, err)
        self.assertIn(b"hi\n", out)


    async def test_untrustedCertificateIsRefused(self) -> None:
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
        code, out, err = await tcplab("send", "--quiet", "--tls", "--ca", self.certs["ca"], "--host", "localhost",
                                      "--port", str(self.server.port), "secret.bin", cwd=self.src)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(hashlib.sha256(self.data).hexdigest().encode(), out)
        with open(os.path.join(self.dir, "received_secret.bin"), "rb") as f:
            self.assertEqual(f.read(), self.data)

    async def test_connectStringWithResume(self) -> None:
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
