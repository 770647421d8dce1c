"""tcplab.testing: the producer-aware fake transport and in-memory client/server pairs."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IHalfCloseableDescriptor, IHalfCloseableProtocol, INegotiated
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tcplab.errors import RefusedByServer
from tcplab.file.receiver import FileReceiverFactory
from tcplab.file.sender import Uploader, UploadProtocol
from tcplab.file.store import FileStore, synchronous
from tcplab.testing import FakeTransport, connectToFactory
from tests.support import scratch


class Producer:
    """Records what a transport asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class FakeTransportTests(SynchronousTestCase):
    def test_fullBufferPausesTheProducerAndDrainResumesIt(self) -> None:
        """A streaming producer is paused once more than bufferSize bytes are unsent, and resumed by drain."""
        transport, producer = FakeTransport(bufferSize=4), Producer()
        transport.registerProducer(producer, True)
        transport.write(b"1234")
        self.assertEqual(producer.calls, [])
        transport.write(b"5")
        self.assertEqual(producer.calls, ["pause"])
        transport.drain()
        self.assertEqual((producer.calls, transport.unsent), (["pause", "resume"], 0))
        self.assertEqual((transport.take(), transport.value(), transport.writes), (b"12345", b"", []))

    def test_bufferSizeZeroPausesAfterEveryWrite(self) -> None:
        """With bufferSize=0 every write pauses the producer, as a socket with a full buffer does."""
        transport, producer = FakeTransport(bufferSize=0), Producer()
        transport.registerProducer(producer, True)
        transport.write(b"a")
        transport.write(b"b")
        self.assertEqual((producer.calls, transport.writes), (["pause", "pause"], [b"a", b"b"]))

    def test_pullProducerIsAskedForMore(self) -> None:
        """A pull producer is asked for data when registered and each time the peer has read."""
        transport, producer = FakeTransport(), Producer()
        transport.registerProducer(producer, False)
        transport.drain()
        self.assertEqual(producer.calls, ["resume", "resume"])

    def test_halfCloseAbortAndTLS(self) -> None:
        """loseWriteConnection only shuts the sending side; an abort is told apart; tls=True is INegotiated."""
        transport = FakeTransport(tls=True)
        self.assertTrue(IHalfCloseableDescriptor.providedBy(transport))
        self.assertTrue(INegotiated.providedBy(transport))
        self.assertFalse(INegotiated.providedBy(FakeTransport()))
        transport.loseWriteConnection()
        self.assertEqual((transport.writeClosed, transport.disconnecting, transport.aborted), (True, False, False))
        transport.abortConnection()
        self.assertEqual((transport.disconnecting, transport.aborted), (True, True))


@implementer(IHalfCloseableProtocol)
class Half(Protocol):
    """A half-closeable protocol that records the peer's FIN."""

    readLost = False

    def readConnectionLost(self) -> None:
        self.readLost = True


class InMemoryTransferTests(SynchronousTestCase):
    """``tcplab send``'s protocol against the file receiver, in memory on a Clock: no socket, no reactor."""

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.clock = Clock()
        self.store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(self.store.close)
        self.factory = FileReceiverFactory(self.store, clock=self.clock)
        self.pumps: list[Any] = []

    def connect(self) -> Deferred[UploadProtocol]:
        client = UploadProtocol(self.clock, 10)
        _, pump = connectToFactory(self.factory, client, clock=self.clock)
        self.pumps.append(pump)
        return succeed(client)

    def upload(self, name: str, data: bytes) -> Deferred[Any]:
        path = os.path.join(scratch(self), name)
        with open(path, "wb") as f:
            f.write(data)
        uploader = Uploader(self.connect, runBlocking=lambda f, *a, **k: maybeDeferred(f, *a, **k))
        d = Deferred.fromCoroutine(uploader.send(path, name))
        for _ in range(100):
            if d.called:
                break
            for pump in self.pumps:
                pump.flush()
        return d

    def test_fileIsStoredVerified(self) -> None:
        """A file sent over an in-memory pair is stored under received_NAME with the hash the client computed."""
        data = os.urandom(200_000)
        sent = self.successResultOf(self.upload("a.bin", data))
        self.assertEqual((sent.stored, sent.sha256), ("received_a.bin", hashlib.sha256(data).hexdigest()))
        with open(os.path.join(self.dir, "received_a.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    def test_refusalArrivesWithTheServersHalfClose(self) -> None:
        """A file over the server's --max-size fails the upload with the server's reason, in memory."""
        self.factory = FileReceiverFactory(self.store, clock=self.clock, maxSize=100)
        failure = self.failureResultOf(self.upload("big.bin", b"x" * 1000), RefusedByServer)
        self.assertIn("100", str(failure.value))
        self.assertEqual(os.listdir(self.dir), [])

    def test_halfCloseReachesTheOtherSide(self) -> None:
        """loseWriteConnection on one side of a pair is readConnectionLost on the other, once its bytes arrive."""
        from tcplab.testing import connectedPair

        server, client = Half(), Protocol()
        received: list[bytes] = []
        server.dataReceived = received.append  # type: ignore[method-assign]
        pump = connectedPair(server, client)
        client.transport.write(b"last words")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual((received, server.readLost), ([b"last words"], True))
