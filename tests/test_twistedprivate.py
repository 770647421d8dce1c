"""The Twisted internals tcplab reads, checked against the installed Twisted.

Each is read where no public API says the same thing, and where it was measured to matter:
``tcplab.flow.writeNow`` (the echo's one-syscall write: nothing may be queued before it),
``tcplab.flow.unsentBytes`` (an upload's progress on the wire: Twisted's and TLS's buffers),
the sender's and receiver's chunk sizes, and the systemd sockets Twisted read at import.
Those readers fall back quietly (``getattr`` with a default) so that a fake transport works;
this module is what fails, loudly and by name, if a Twisted upgrade renames one.
"""

from __future__ import annotations

import socket
import types

from twisted.copyright import version as twistedVersion
from twisted.internet import endpoints, reactor, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcplab import flow


def named(owner: object) -> str:
    if isinstance(owner, types.ModuleType):
        return owner.__name__
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return named(type(owner))


class Private(SynchronousTestCase):
    """Assertions that name the attribute, the Twisted version and the tcplab code reading it."""

    def assertPrivate(self, owner: object, name: str, kinds: type | tuple[type, ...], reader: str) -> object:
        if not hasattr(owner, name):
            self.fail(f"Twisted {twistedVersion} has no {named(owner)}.{name}, which {reader} reads: "
                      "update that code for this Twisted")
        value = getattr(owner, name)
        if not isinstance(value, kinds):
            self.fail(f"Twisted {twistedVersion}'s {named(owner)}.{name} is a {type(value).__name__} now, "
                      f"not what {reader} expects: update that code for this Twisted")
        return value


class TCPTransportTests(Private, TestCase):
    timeout = 10

    async def connected(self) -> tcp.Connection:
        """The client side of a real loopback TCP connection."""
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        lost: Deferred[None] = Deferred()
        client.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]

        async def close() -> None:
            client.transport.abortConnection()
            await lost

        self.addCleanup(close)
        self.assertIsInstance(client.transport, tcp.Connection)
        return client.transport  # type: ignore[return-value]

    async def test_writeBuffers(self) -> None:
        """TCP transports still keep unsent bytes in dataBuffer/offset/_tempDataLen, where tcplab.flow reads them."""
        transport = await self.connected()
        self.assertPrivate(transport, "dataBuffer", (bytes, bytearray, memoryview), "tcplab.flow.writeNow")
        self.assertPrivate(transport, "offset", int, "tcplab.flow.unsentBytes")
        before = self.assertPrivate(transport, "_tempDataLen", int, "tcplab.flow.writeNow")
        transport.write(b"x" * 10)
        self.assertEqual(transport._tempDataLen, before + 10,  # type: ignore[operator]
                         "_tempDataLen no longer counts bytes written this turn: tcplab.flow.writeNow would reorder")
        self.assertGreaterEqual(flow.unsentBytes(transport), 10)  # type: ignore[arg-type]

    async def test_socketAndSizes(self) -> None:
        """A TCP transport still has its socket and the read and send sizes the file server and sender set."""
        transport = await self.connected()
        self.assertPrivate(transport, "socket", socket.socket, "tcplab.flow.plainSocket")
        self.assertIs(flow.plainSocket(transport), transport.socket)
        self.assertPrivate(type(transport), "bufferSize", int, "tcplab.file.receiver (--read-size) and the sender")
        self.assertPrivate(type(transport), "SEND_LIMIT", int, "tcplab.file.sender (one chunk per send())")
        self.assertPrivate(FileDescriptor, "SEND_LIMIT", int, "tcplab.file.sender (one chunk per send())")


class TLSAndSystemdTests(Private):
    def test_tlsKeepsWritesBeforeTheHandshakeInAppSendBuffer(self) -> None:
        """Twisted's TLS still holds bytes written before the handshake in _appSendBuffer, as unsentBytes reads."""
        factory = TLSMemoryBIOFactory(optionsForClientTLS("localhost"), True, Factory.forProtocol(Protocol))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        TLSMemoryBIOProtocol.write(protocol, b"hello")
        held = self.assertPrivate(protocol, "_appSendBuffer", list, "tcplab.flow.unsentBytes")
        self.assertEqual(b"".join(held), b"hello")  # type: ignore[arg-type]
        self.assertTrue(issubclass(BufferingTLSTransport, TLSMemoryBIOProtocol),
                        "tcplab.flow.encryptEachWrite gives a BufferingTLSTransport TLSMemoryBIOProtocol's own write")

    def test_systemdSocketsReadAtImport(self) -> None:
        """Twisted's systemd: parser still keeps the sockets it read at import where tcplab.listening looks."""
        parser = self.assertPrivate(endpoints, "_SystemdParser", type, "tcplab.listening._systemdSockets")
        self.assertPrivate(parser, "_sddaemon", ListenFDs, "tcplab.listening._systemdSockets")
