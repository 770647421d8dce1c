"""Fault injection on tcplab-file: the disk fills up or fails in the middle of a body, or the
server is killed mid-upload. Each time the client hears why, nothing half-written is left,
the server goes on serving, and ``tcplab send --resume`` completes after a restart."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcplab.errors import RefusedByServer
from tcplab.file import tap as filetap
from tcplab.file.receiver import FileReceiver, FileReceiverFactory
from tcplab.file.sender import Uploader, UploadProtocol
from tcplab.file.store import FileStore, synchronous
from tcplab.file.wire import Err, Ok, formatPut, formatTrailer, parseReply
from tests.support import ServerProcess, childEnv, scratch


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def openFds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Disk:
    """Wraps ``os.write`` for one file descriptor: writes ``budget`` bytes (the last write cut
    short, as a filling disk does), then fails every write with ``error``."""

    def __init__(self, store: FileStore, error: int, budget: int, only: Callable[[int], bool] = lambda fd: True):
        self.error = error
        self.budget = budget
        self.only = only
        self.failed = 0
        self._write = store.write
        store.write = self.write

    def write(self, fd: int, data: Any) -> int:
        if not self.only(fd):
            return self._write(fd, data)
        if self.budget <= 0:
            self.failed += 1
            raise OSError(self.error, os.strerror(self.error))
        written = self._write(fd, memoryview(data)[:self.budget])
        self.budget -= written
        return written


class StorageFaultTests(SynchronousTestCase):
    """The server protocol on a real folder, with the disk failing under it (StringTransport, Clock)."""

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.clock = Clock()
        self.store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(self.store.close)
        self.factory = FileReceiverFactory(self.store, clock=self.clock)
        self.fds = openFds()

    def connect(self, port: int = 40000) -> tuple[FileReceiver, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        protocol.makeConnection(transport)
        return protocol, transport

    def reply(self, transport: StringTransport) -> Any:
        lines = transport.value().split(b"\n")
        self.assertEqual(len(lines), 2, lines)
        return parseReply(lines[0])

    def assertHealthy(self) -> None:
        """Nothing of the failed upload is left: no file, no space held for it, no descriptor open."""
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.store.reserved, 0)
        self.assertLessEqual(openFds(), self.fds)

    def failMidBody(self, error: int, trailer: bool) -> Err:
        data = os.urandom(300_000)
        protocol, transport = self.connect()
        protocol.dataReceived(formatPut(len(data), "a.bin", trailer=trailer))
        upload = protocol._upload
        assert upload is not None
        self.assertEqual(len(os.listdir(self.dir)), 1, "the body goes into a hidden file")
        disk = Disk(self.store, error, 100_000, only=lambda fd: fd == upload.fd)
        for i in range(0, len(data), 8192):
            protocol.dataReceived(data[i:i + 8192])
        protocol.dataReceived(formatTrailer(sha(data)) if trailer else b"")
        self.assertEqual(disk.failed, 1, "the first failed write ends the upload")
        reply = self.reply(transport)
        self.assertIsInstance(reply, Err)
        self.clock.advance(self.factory.linger)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertHealthy()
        return reply  # type: ignore[no-any-return]

    def test_diskFullMidBody(self) -> None:
        """A disk that fills mid-body refuses the file as no-space with a message saying the disk is full."""
        reply = self.failMidBody(errno.ENOSPC, trailer=False)
        self.assertEqual(reply.code, "no-space")
        self.assertIn("disk is full", reply.message)

    def test_quotaMidBody(self) -> None:
        """A disk quota exceeded mid-body is refused as no-space too."""
        self.assertEqual(self.failMidBody(errno.EDQUOT, trailer=True).code, "no-space")

    def test_ioErrorMidResumableBody(self) -> None:
        """A resumable upload's partial file goes too: bytes a disk failed on are not worth resuming."""
        reply = self.failMidBody(errno.EIO, trailer=True)
        self.assertEqual(reply.code, "io-error")
        self.assertIn("Input/output error", reply.message)

    def test_otherUploadsGoOn(self) -> None:
        """Two uploads at once; the disk fails one of them: the other is stored, and so is the next."""
        good, bad = os.urandom(200_000), os.urandom(200_000)
        goodProtocol, goodTransport = self.connect(40001)
        badProtocol, badTransport = self.connect(40002)
        goodProtocol.dataReceived(formatPut(len(good), "good.bin", trailer=True))
        badProtocol.dataReceived(formatPut(len(bad), "bad.bin", trailer=True))
        failing = badProtocol._upload
        assert failing is not None
        Disk(self.store, errno.ENOSPC, 50_000, only=lambda fd: fd == failing.fd)
        for i in range(0, 200_000, 10_000):
            goodProtocol.dataReceived(good[i:i + 10_000])
            badProtocol.dataReceived(bad[i:i + 10_000])
        goodProtocol.dataReceived(formatTrailer(sha(good)))
        self.assertEqual(self.reply(badTransport).code, "no-space")
        self.assertEqual(self.reply(goodTransport), Ok(len(good), sha(good), "received_good.bin"))
        protocol, transport = self.connect(40003)
        protocol.dataReceived(formatPut(3, "next") + b"abc")
        self.assertIsInstance(self.reply(transport), Ok)
        self.assertEqual(sorted(os.listdir(self.dir)), ["received_good.bin", "received_next"])
        self.assertEqual(self.store.reserved, 0)

    def test_everyStepEveryError(self) -> None:
        """Whichever step fails (write, fsync, link, folder fsync) with whichever error, the reply says
        which kind of trouble, and nothing is left."""
        steps: dict[str, Callable[[int], None]] = {
            "write": lambda e: setattr(self.store, "write", raising(e)),
            "fsync": lambda e: setattr(self.store, "fsync", raising(e)),
            "link": lambda e: setattr(self.store, "link", raising(e)),
            "folder fsync": lambda e: setattr(self.store, "fsync", raisingAfter(1, e)),
        }
        for step, inject in steps.items():
            for error, code in ((errno.ENOSPC, "no-space"), (errno.EIO, "io-error"), (errno.EROFS, "io-error")):
                with self.subTest(step=step, error=errno.errorcode[error]):
                    saved = (self.store.write, self.store.fsync, self.store.link)
                    inject(error)
                    protocol, transport = self.connect()
                    protocol.dataReceived(formatPut(5, "a", trailer=True) + b"hello" + formatTrailer(sha(b"hello")))
                    self.store.write, self.store.fsync, self.store.link = saved
                    self.assertEqual(self.reply(transport).code, code)
                    protocol.connectionLost(None)  # type: ignore[arg-type]
                    self.assertHealthy()

    def test_folderFsyncFailsAfterOverwrite(self) -> None:
        """--overwrite: the new file has replaced the old one when the folder fsync fails. It stays
        (removing it would leave neither), and the client hears io-error saying it is there but not safe."""
        self.store.overwrite = True
        protocol, transport = self.connect()
        protocol.dataReceived(formatPut(3, "a") + b"old")
        self.assertIsInstance(self.reply(transport), Ok)
        self.store.fsync = raisingAfter(1, errno.EIO)
        protocol, transport = self.connect()
        protocol.dataReceived(formatPut(3, "a", trailer=True) + b"new" + formatTrailer(sha(b"new")))
        reply = self.reply(transport)
        self.assertEqual(reply.code, "io-error")
        self.assertIn("received_a was written over the old file, but the folder could not be flushed to disk: "
                      "Input/output error; it may be lost in a crash: send it again", reply.message)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(os.listdir(self.dir), ["received_a"])
        with open(os.path.join(self.dir, "received_a"), "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(self.store.reserved, 0)
        self.assertLessEqual(openFds(), self.fds)


def raising(error: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(error, os.strerror(error))

    return fail


def raisingAfter(calls: int, error: int) -> Callable[[int], None]:
    """An fsync that works ``calls`` times (the file), then fails (the folder)."""
    seen = [0]

    def fsync(fd: int) -> None:
        seen[0] += 1
        if seen[0] > calls:
            raise OSError(error, os.strerror(error))
        os.fsync(fd)

    return fsync


class LoopbackFaultTests(TestCase):
    """The same over real sockets, with the store's work in threads as in production."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.src = scratch(self)
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", self.dir])
        self.service = filetap.FileService(options)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = self.service.tcp.ports[0].getHost().port

    def uploader(self) -> Uploader:
        def connect() -> Deferred[Any]:
            client = UploadProtocol(reactor, 10)
            return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(lambda: client))

        uploader = Uploader(connect)
        self.addCleanup(lambda: ensureDeferred(uploader.close()))
        return uploader

    def source(self, name: str, data: bytes) -> str:
        path = os.path.join(self.src, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def test_diskFillsDuringOneOfTwoUploads(self) -> None:
        """When the disk fills under one of two concurrent uploads, that one is refused as no-space and the other is
        stored whole, with no space left reserved."""
        big, other = os.urandom(8 << 20), os.urandom(4 << 20)
        store = self.service.store
        failing: list[int] = []

        def isBig(fd: int) -> bool:
            """The disk fills under the upload that was first to write."""
            if not failing:
                failing.append(fd)
            return fd == failing[0]

        disk = Disk(store, errno.ENOSPC, 2 << 20, only=isBig)
        bigSend = ensureDeferred(self.uploader().send(self.source("big.bin", big), "big.bin"))
        otherUploader = self.uploader()
        otherSend = ensureDeferred(otherUploader.send(self.source("other.bin", other), "other.bin"))
        with self.assertRaises(RefusedByServer) as caught:
            await bigSend
        self.assertIn("(no-space)", str(caught.exception))
        sent = await otherSend
        self.assertEqual(sent.sha256, sha(other))
        self.assertEqual(disk.failed, 1)
        await otherUploader.close()
        for _ in range(500):
            if not self.service.factory.connections:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(sorted(os.listdir(self.dir)), ["received_other.bin"])
        self.assertEqual(store.reserved, 0)


class KillAndResumeTests(TestCase):
    """A real ``twistd tcplab-file`` is SIGKILLed in the middle of a body, then started again."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.src = scratch(self)
        self.data = os.urandom(6 << 20)
        self.path = os.path.join(self.src, "big.bin")
        with open(self.path, "wb") as f:
            f.write(self.data)

    def startServer(self) -> ServerProcess:
        server = ServerProcess("tcplab-file", "--listen", "tcp:0:interface=127.0.0.1", "--dir", self.dir)
        self.addCleanup(server.stop)
        return server

    def partials(self) -> list[str]:
        return [name for name in os.listdir(self.dir) if name.endswith(".partial")]

    def sendPart(self, port: int, cut: int) -> socket.socket:
        """What ``tcplab send`` sends, up to byte ``cut`` of the body; returns once the server has those
        bytes in its partial file (bounded wait)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(formatPut(len(self.data), "big.bin", trailer=True) + self.data[:cut])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            partials = self.partials()
            if partials and os.path.getsize(os.path.join(self.dir, partials[0])) == cut:
                return sock
            time.sleep(0.01)
        self.fail(f"the server did not write {cut} bytes of the body: {os.listdir(self.dir)}")

    async def test_killedMidUploadThenResumed(self) -> None:
        """After the server is killed mid-upload nothing appears under a final name, and tcplab send --resume to the
        restarted server finishes the file from the cut, verified, with no partial left."""
        server = self.startServer()
        cut = 2 << 20
        self.sendPart(server.port, cut)
        server.process.kill()
        server.process.wait(10)
        self.assertEqual([n for n in os.listdir(self.dir) if not n.startswith(".tcplab-")], [],
                         "nothing under a final name")
        restarted = self.startServer()
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tcplab", "send", "--quiet", "--resume", "--port", str(restarted.port), "big.bin"],
            env=childEnv(), path=self.src)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(f"resumed at {cut}".encode(), out)
        self.assertIn(sha(self.data).encode(), out)
        with open(os.path.join(self.dir, "received_big.bin"), "rb") as f:
            self.assertEqual(sha(f.read()), sha(self.data))
        self.assertEqual(os.listdir(self.dir), ["received_big.bin"], "the partial file is gone")

    async def test_killedTwice(self) -> None:
        """Killed again while the resumed upload runs: the second resume picks up from further on."""
        first = self.startServer()
        self.sendPart(first.port, 1 << 20)
        first.process.kill()
        first.process.wait(10)
        second = self.startServer()
        sock = socket.create_connection(("127.0.0.1", second.port), timeout=10)
        self.addCleanup(sock.close)
        resumeAt, cut = 1 << 20, 3 << 20
        sock.sendall(formatPut(len(self.data), "big.bin", trailer=True, offset=resumeAt)
                     + self.data[resumeAt:cut])
        deadline = time.monotonic() + 10
        while os.path.getsize(os.path.join(self.dir, self.partials()[0])) != cut:
            self.assertLess(time.monotonic(), deadline, "the resumed body did not reach the disk")
            time.sleep(0.01)
        second.process.kill()
        second.process.wait(10)
        third = self.startServer()
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tcplab", "send", "--quiet", "--resume", "--port", str(third.port), "big.bin"],
            env=childEnv(), path=self.src)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(f"resumed at {cut}".encode(), out)
        with open(os.path.join(self.dir, "received_big.bin"), "rb") as f:
            self.assertEqual(f.read(), self.data)
