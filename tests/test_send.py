"""``tcplab send`` against a real tcplab-file server over loopback, and its exit codes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sys
import time
from typing import Any

import twisted.test
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString
from twisted.internet.interfaces import INegotiated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from tcplab.cli.send import Item, collectFiles
from tcplab.errors import (
    AlreadyExists,
    ConnectionLostError,
    ExitCode,
    LocalFileError,
    RefusedByServer,
    TimedOut,
    UsageProblem,
    VerificationFailed,
)
from tcplab.file import tap as filetap
from tcplab.file.sender import ServerError, Uploader, UploadProtocol, serverCode, unsentBytes
from tcplab.file.wire import MAX_REPLY, Clash, Err, ErrorCode, Ok, formatErr, formatOk, formatPut, formatTrailer
from tcplab.testing import FakeTransport
from tests.support import runMain, scratch

LAB_TEXT = b"The lab's important secret.\n" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LoopbackTestCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.src = scratch(self)
        self.service = self.startServer()

    def startServer(self, *args: str, directory: str | None = None) -> filetap.FileService:
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", directory or self.dir, *args])
        service = filetap.FileService(options)
        service.startService()
        self.addCleanup(service.stopService)
        self.port = service.tcp.ports[0].getHost().port
        return service

    def source(self, name: str, data: bytes) -> str:
        path = os.path.join(self.src, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def uploader(self, endpoint: Any = None, **kwargs: Any) -> Uploader:
        def connect() -> Deferred[Any]:
            client = UploadProtocol(reactor, 10)
            target = endpoint or TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
            return target.connect(Factory.forProtocol(lambda: client))

        uploader = Uploader(connect, **kwargs)
        self.addCleanup(lambda: ensureDeferred(uploader.close()))
        return uploader

    def stored(self, *parts: str) -> bytes:
        with open(os.path.join(self.dir, *parts), "rb") as f:
            return f.read()

    def visible(self) -> list[str]:
        return sorted(os.path.relpath(os.path.join(d, n), self.dir)
                      for d, _, names in os.walk(self.dir) for n in names if not n.startswith(".tcplab-"))

    async def idle(self) -> None:
        """Wait (bounded) until the server has seen every connection go."""
        for _ in range(500):
            if not self.service.factory.connections:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("the server kept a connection open")


class FlowTests(LoopbackTestCase):
    async def test_labExample(self) -> None:
        """``tcplab send important_secret_file.txt`` stores received_important_secret_file.txt, verified."""
        path = self.source("important_secret_file.txt", LAB_TEXT)
        sent = await self.uploader().send(path, "important_secret_file.txt")
        self.assertEqual(sent.stored, "received_important_secret_file.txt")
        self.assertEqual(sent.sha256, sha(LAB_TEXT))
        self.assertEqual(sha(self.stored("received_important_secret_file.txt")), sha(LAB_TEXT))

    async def test_severalFilesOneConnection(self) -> None:
        """Five files sent one after another share one connection and are all stored."""
        uploader = self.uploader()
        contents = {f"f{i}.bin": os.urandom(1000 * i) for i in range(5)}
        for name, data in contents.items():
            await uploader.send(self.source(name, data), name)
        self.assertEqual(uploader.connections, 1)
        for name, data in contents.items():
            self.assertEqual(self.stored("received_" + name), data)

    async def test_recursiveFolder(self) -> None:
        """A folder sent with -r keeps its sub-folders and non-ASCII names under received_TOP."""
        self.source("top/a.txt", b"a")
        self.source("top/sub/b.txt", b"b")
        self.source("top/sub/deeper/звіт 2025.txt", b"c")
        uploader = self.uploader()
        for item in collectFiles([os.path.join(self.src, "top")], True):
            await uploader.send(item.path, item.name)
        self.assertEqual(self.visible(), ["received_top/a.txt", "received_top/sub/b.txt",
                                          "received_top/sub/deeper/звіт 2025.txt"])

    async def test_resumeAfterConnectionCut(self) -> None:
        """A transfer cut off mid-body continues where the server stopped; the hash covers it all."""
        data = os.urandom(3 << 20)
        path = self.source("big.bin", data)
        cut = 1 << 20

        class HalfSender(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(formatPut(len(data), "big.bin", trailer=True) + data[:cut])
                self.transport.loseConnection()

        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(HalfSender))
        await self.idle()
        self.assertEqual(self.visible(), [])
        sent = await self.uploader(resume=True).send(path, "big.bin")
        self.assertEqual(sent.resumedAt, cut)
        self.assertEqual(sent.sha256, sha(data))
        self.assertEqual(self.stored("received_big.bin"), data)
        self.assertEqual(os.listdir(self.dir), ["received_big.bin"])

    async def test_resumeAfterClientKilled(self) -> None:
        """The client's connection is aborted mid-body; ``--resume`` then completes the file."""
        data = os.urandom(4 << 20)
        path = self.source("big.bin", data)
        uploader = self.uploader()

        def progress(n: int) -> None:
            if progress.sent < (1 << 20) <= progress.sent + n:  # type: ignore[attr-defined]
                uploader._client.transport.abortConnection()  # type: ignore[union-attr]
            progress.sent += n  # type: ignore[attr-defined]

        progress.sent = 0  # type: ignore[attr-defined]
        with self.assertRaises(ConnectionLostError):
            await uploader.send(path, "big.bin", progress)
        await self.idle()
        self.assertEqual(self.visible(), [])
        sent = await self.uploader(resume=True).send(path, "big.bin")
        self.assertEqual(sent.sha256, sha(data))
        self.assertEqual(self.stored("received_big.bin"), data)

    async def test_resumeNothingHeld(self) -> None:
        """--resume with nothing held on the server sends the whole file from the start."""
        path = self.source("a.txt", b"abc")
        sent = await self.uploader(resume=True).send(path, "a.txt")
        self.assertEqual((sent.resumedAt, sent.stored), (0, "received_a.txt"))

    async def test_resumeDifferentContent(self) -> None:
        """What the server holds is of another file with that name and size: start from 0."""
        old, new = b"A" * 100_000, b"B" * 100_000

        class HalfSender(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(formatPut(len(old), "x", trailer=True) + old[:50_000])
                self.transport.loseConnection()

        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(HalfSender))
        await self.idle()
        sent = await self.uploader(resume=True).send(self.source("x", new), "x")
        self.assertEqual(sent.resumedAt, 0)
        self.assertEqual(self.stored("received_x"), new)

    async def test_reconnectAtTheCap(self) -> None:
        """The server's per-connection cap is not the client's problem: it reconnects and goes on."""
        self.startServer("--max-files-per-connection", "2", directory=self.dir)
        uploader = self.uploader()
        for i in range(5):
            await uploader.send(self.source(f"f{i}", b"%d" % i), f"f{i}")
        self.assertEqual(uploader.connections, 3)
        self.assertEqual(self.visible(), [f"received_f{i}" for i in range(5)])

    async def test_resumeAtOneRequestPerConnection(self) -> None:
        """--max-files-per-connection 1: STAT and PUT cannot share a connection. The PUT is retried
        alone on a new one, from what the STAT found, for each of several files."""
        self.startServer("--max-files-per-connection", "1", directory=self.dir)
        files = {f"f{i}": os.urandom(300_000) for i in range(3)}
        for name, data in files.items():

            class HalfSender(Protocol):
                def connectionMade(self, data: bytes = data, name: str = name) -> None:
                    self.transport.write(formatPut(len(data), name, trailer=True) + data[:100_000])
                    self.transport.loseConnection()

            await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(HalfSender))
            await self.idle()
        stats = []
        uploader = self.uploader(resume=True)
        for name, data in files.items():
            sent = await uploader.send(self.source(name, data), name, stats.append)
            self.assertEqual((sent.resumedAt, sent.sha256), (100_000, sha(data)))
            self.assertEqual(self.stored(f"received_{name}"), data)
        self.assertEqual(sum(stats), sum(len(d) for d in files.values()), "progress counts each byte once")
        self.assertEqual(self.visible(), [f"received_{name}" for name in files])
        self.assertEqual(sorted(os.listdir(self.dir)), self.visible(), "no partial file left")

    async def test_partialGoneBeforePut(self) -> None:
        """The partial vanishes between STAT and PUT (bad-offset): the file is sent again from 0."""
        data = os.urandom(200_000)

        class HalfSender(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(formatPut(len(data), "x", trailer=True) + data[:100_000])
                self.transport.loseConnection()

        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(HalfSender))
        await self.idle()

        def cleanFirst(f: Any, *args: Any) -> Deferred[Any]:
            for name in os.listdir(self.dir):
                os.unlink(os.path.join(self.dir, name))
            return maybeDeferred(f, *args)

        uploader = self.uploader(resume=True)
        uploader.runBlocking = cleanFirst
        sent = await uploader.send(self.source("x", data), "x")
        self.assertEqual((sent.resumedAt, sent.sha256), (0, sha(data)))
        self.assertEqual(self.stored("received_x"), data)

    async def test_clashNaming(self) -> None:
        """Sending the same name twice stores the second under a unique " (1)" name, even when the name already has
        brackets."""
        uploader = self.uploader()
        path = self.source("report (1) [final].txt", b"v1")
        first = await uploader.send(path, "report (1) [final].txt")
        second = await uploader.send(path, "report (1) [final].txt")
        self.assertEqual((first.stored, second.stored),
                         ("received_report (1) [final].txt", "received_report (1) [final] (1).txt"))

    async def test_noRename(self) -> None:
        """With --no-rename a taken name fails as AlreadyExists and stores nothing, and the next file still goes
        through on a new connection."""
        path = self.source("a.txt", b"v1")
        await self.uploader().send(path, "a.txt")
        uploader = self.uploader(clash=Clash.FAIL)
        with self.assertRaises(AlreadyExists):
            await uploader.send(path, "a.txt")
        self.assertEqual(self.visible(), ["received_a.txt"])
        other = await uploader.send(self.source("b.txt", b"b"), "b.txt")
        self.assertEqual(other.stored, "received_b.txt")
        self.assertEqual(uploader.connections, 2, "a new connection after the refusal")

    async def test_symlinkPlanted(self) -> None:
        """A symlink planted at the destination name is not written through: the file is stored under a unique name
        and the link's target is untouched."""
        victim = self.source("victim", b"precious")
        os.symlink(victim, os.path.join(self.dir, "received_a.txt"))
        sent = await self.uploader().send(self.source("a.txt", b"evil"), "a.txt")
        self.assertEqual(sent.stored, "received_a (1).txt")
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")

    async def test_overwrite(self) -> None:
        """Against a server run with --overwrite, a second send of a name replaces the file."""
        directory = scratch(self)
        self.startServer("--overwrite", directory=directory)
        uploader = self.uploader()
        await uploader.send(self.source("a", b"old"), "a")
        sent = await uploader.send(self.source("a", b"new"), "a")
        self.assertEqual(sent.stored, "received_a")
        with open(os.path.join(directory, "received_a"), "rb") as f:
            self.assertEqual(f.read(), b"new")

    async def test_token(self) -> None:
        """Against a server with --token-file, a send without the token is refused with a message naming the token, a
        wrong token is refused, and the right one is stored."""
        tokenFile = self.source("token", b"s3cret\n")
        self.startServer("--token-file", tokenFile, directory=self.dir)
        path = self.source("a", b"x")
        with self.assertRaises(RefusedByServer) as caught:
            await self.uploader().send(path, "a")
        self.assertIn("token", str(caught.exception))
        with self.assertRaises(RefusedByServer):
            await self.uploader(token="wrong").send(path, "a")
        sent = await self.uploader(token="s3cret").send(path, "a")
        self.assertEqual(sent.stored, "received_a")

    async def test_maxSize(self) -> None:
        """A file over the server's --max-size is refused as too-large and nothing is stored."""
        self.startServer("--max-size", "1K", directory=self.dir)
        with self.assertRaises(RefusedByServer) as caught:
            await self.uploader().send(self.source("big", os.urandom(2 << 20)), "big")
        self.assertIn("too-large", str(caught.exception))
        self.assertEqual(os.listdir(self.dir), [])

    async def test_writeErrorServerKeepsServing(self) -> None:
        """A disk error on the server refuses that send as io-error, stores nothing, and the server goes on accepting
        the next file."""
        store = self.service.store

        def failing(fd: int, data: Any) -> int:
            raise OSError(5, "Input/output error")

        store.write = failing
        with self.assertRaises(RefusedByServer) as caught:
            await self.uploader().send(self.source("a", os.urandom(100_000)), "a")
        self.assertIn("io-error", str(caught.exception))
        self.assertEqual(os.listdir(self.dir), [])
        store.write = os.write
        sent = await self.uploader().send(self.source("b", b"fine"), "b")
        self.assertEqual(sent.stored, "received_b")

    async def test_tenConcurrentUploads(self) -> None:
        """Ten uploads of a quarter mebibyte each at once all arrive whole."""
        contents = {f"c{i}": os.urandom(256 * 1024 + i) for i in range(10)}
        sends = [ensureDeferred(self.uploader().send(self.source(n, d), n)) for n, d in contents.items()]
        results = await DeferredList(sends, fireOnOneErrback=True, consumeErrors=True)
        self.assertEqual(len(results), 10)
        for name, data in contents.items():
            self.assertEqual(self.stored("received_" + name), data)

    async def test_tls(self) -> None:
        """TLS needs nothing but endpoint strings on both sides."""
        pem = FilePath(twisted.test.__file__).sibling("server.pem").path
        options = filetap.Options()
        options.parseOptions(["--listen", f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}",
                              "--dir", self.dir])
        service = filetap.FileService(options)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.tcp.ports[0].getHost().port
        endpoint = clientFromString(reactor, f"ssl:host=127.0.0.1:port={port}")
        uploader = self.uploader(endpoint)
        sent = await uploader.send(self.source("secret.txt", LAB_TEXT), "secret.txt")
        self.assertEqual(sent.sha256, sha(LAB_TEXT))
        with self.assertRaises(AlreadyExists):
            await self.uploader(endpoint, clash=Clash.FAIL).send(
                self.source("secret.txt", LAB_TEXT), "secret.txt")

    async def test_refusalHeardWhileSending(self) -> None:
        """Refused on its request line while the client keeps sending megabytes of body: the
        client reads the ERR and ends cleanly (the server drains instead of resetting)."""
        received: Deferred[bytes] = Deferred()

        class Pusher(Protocol):
            data = b""

            def connectionMade(self) -> None:
                self.transport.write(b"PUT 8388608 ../../etc/passwd\n" + b"x" * (8 << 20))

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Any = None) -> None:
                received.callback(self.data)

        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(Pusher))
        reply = await received
        self.assertTrue(reply.startswith(b"ERR bad-name "), reply)
        self.assertEqual(os.listdir(self.dir), [])

    async def test_ncRefusedCleanly(self) -> None:
        """nc pushing a file the server refuses still prints the ERR and exits 0, no broken pipe."""
        if shutil.which("ncat") is None:
            raise SkipTest("ncat is not installed")
        self.startServer("--max-size", "1K", directory=self.dir)
        self.source("big.bin", b"x" * (3 << 20))
        line = f"{{ printf 'PUT %d %s\\n' 3145728 big.bin; cat big.bin; }} | ncat 127.0.0.1 {self.port}"
        out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", line], env=dict(os.environ), path=self.src)
        self.assertEqual((code, err), (0, b""))
        self.assertTrue(out.startswith(b"ERR too-large "), out)

    async def test_localFileMissing(self) -> None:
        """Sending a file that does not exist fails as a local file error."""
        with self.assertRaises(LocalFileError):
            await self.uploader().send(os.path.join(self.src, "nope"), "nope")

    async def test_fileSwappedForASymlinkAfterTheWalk(self) -> None:
        """A file a folder walk found that becomes a symlink (or another file) before it is sent is not sent."""
        secret = self.source("secret", b"PRIVATE KEY")
        path = self.source("photos/a.jpg", b"jpeg")
        [item] = collectFiles([os.path.dirname(path)], True)
        assert isinstance(item, Item)
        os.replace(self.source("photos/new", b"other"), path)
        with self.assertRaises(LocalFileError) as caught:
            await self.uploader().send(item.path, item.name, identity=item.identity)
        self.assertIn("was replaced", str(caught.exception))
        os.unlink(path)
        os.symlink(secret, path)
        with self.assertRaises(LocalFileError) as caught:
            await self.uploader().send(item.path, item.name, identity=item.identity)
        self.assertIn("became a symlink", str(caught.exception))
        self.assertEqual(self.visible(), [])

    async def test_slowSteadyLinkDoesNotTimeOut(self) -> None:
        """Over a real socket to a server that takes the body in bursts, the upload outlasts --timeout and succeeds."""
        data = os.urandom(4 << 20)
        path = self.source("slow.bin", data)
        server = SlowReader(burst=512 << 10, pause=0.3)
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def connect() -> Deferred[Any]:
            client = UploadProtocol(reactor, 1.5)
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            return endpoint.connect(Factory.forProtocol(lambda: client))

        uploader = Uploader(connect)
        self.addCleanup(lambda: ensureDeferred(uploader.close()))
        started = time.monotonic()
        sent = await uploader.send(path, "slow.bin")
        self.assertEqual(sent.sha256, sha(data))
        self.assertGreater(time.monotonic() - started, 1.5, "the transfer took longer than --timeout")
        self.assertEqual(server.body, len(data))

    async def test_ncOneLiner(self) -> None:
        """The README's shell one-liner uploads a file with nothing but printf, cat and ncat."""
        if shutil.which("ncat") is None:
            raise SkipTest("ncat is not installed")
        self.source("f.txt", LAB_TEXT)
        line = ("{ printf 'PUT %d %s\\n' \"$(stat -c%s f.txt)\" f.txt; cat f.txt; } | "
                f"ncat 127.0.0.1 {self.port}")
        out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", line], env=dict(os.environ), path=self.src)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, f"OK {len(LAB_TEXT)} {sha(LAB_TEXT)} received_f.txt\n".encode())
        self.assertEqual(self.stored("received_f.txt"), LAB_TEXT)


class SlowReader(Protocol):
    """A tcplab-file server on a slow link: takes ``burst`` bytes, then reads nothing for
    ``pause`` seconds; answers OK with the SHA-256 of what it received."""

    def __init__(self, burst: int, pause: float) -> None:
        self.burst, self.pause = burst, pause
        self.buffer = b""
        self.size: int | None = None
        self.body = 0
        self.inBurst = 0
        self.hasher = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        if self.size is None:
            self.buffer += data
            line, newline, data = self.buffer.partition(b"\n")
            if not newline:
                return
            self.size, self.buffer = int(line.split()[2]), b""  # PUT sha256=trailer SIZE NAME
        body = data[: self.size - self.body]
        self.hasher.update(body)
        self.body += len(body)
        if self.body >= self.size:
            self.buffer += data[len(body):]
            if self.buffer.endswith(b"\n"):
                self.transport.write(formatOk(self.size, self.hasher.hexdigest(), "received_slow.bin"))
            return
        self.inBurst += len(data)
        if self.inBurst >= self.burst:
            self.inBurst = 0
            self.transport.pauseProducing()
            reactor.callLater(self.pause, self.transport.resumeProducing)


class FakeServer(Protocol):
    """A misbehaving server: ``mode`` says how."""

    mode = "silent"
    seen: Deferred[None] | None = None
    live: set[FakeServer] = set()

    def connectionMade(self) -> None:
        self.live.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.live.discard(self)

    def dataReceived(self, data: bytes) -> None:
        if self.seen is not None and not self.seen.called:
            self.seen.callback(None)
        if self.mode == "lie" and b"SHA256 " in data:
            self.transport.write(b"OK 3 " + b"0" * 64 + b" received_\x1b[2Jx\n")
        elif self.mode == "close":
            self.transport.loseConnection()
        elif self.mode == "escape":
            self.transport.write(b"ERR bad-name \x1b]0;pwned\x07 evil\n")


class ExitCodeTests(LoopbackTestCase):
    """``python -m tcplab send`` exit statuses: one line on stderr, no traceback, a code that means something."""

    async def run_(self, *args: str, env: dict[str, str] | None = None, lines: int = 1) -> tuple[str, str, int]:
        # In-process on a reactor of its own, in a thread, while this reactor serves the upload.
        result = await deferToThread(runMain, "send", *args, cwd=self.src, env={"TCPLAB_TOKEN": None, **(env or {})})
        out, err, code = result.stdout, result.stderr, result.returncode
        text = err.decode()
        self.assertNotIn("Traceback", text)
        self.assertLessEqual(text.count("\n"), lines, text)
        return out.decode(), text, code

    def fake(self, mode: str) -> int:
        FakeServer.mode = mode
        port = reactor.listenTCP(0, Factory.forProtocol(FakeServer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.fakeGone)
        return port.getHost().port  # type: ignore[no-any-return]

    async def fakeGone(self) -> None:
        """Wait (bounded) until the fake server has seen the in-process client's connection close."""
        for _ in range(500):
            if not FakeServer.live:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("the fake server kept a connection open")

    async def test_ok(self) -> None:
        """``tcplab send important_secret_file.txt`` exits 0 and prints the stored name and its SHA256."""
        self.source("important_secret_file.txt", LAB_TEXT)
        out, err, code = await self.run_("--port", str(self.port), "important_secret_file.txt")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("-> received_important_secret_file.txt", out)
        self.assertIn(sha(LAB_TEXT), out)
        self.assertEqual(self.stored("received_important_secret_file.txt"), LAB_TEXT)

    async def test_usage(self) -> None:
        """No FILE, or an unknown option, is exit 2 with a line naming what is missing."""
        _, err, code = await self.run_("--port", str(self.port))
        self.assertEqual(code, 2)
        self.assertIn("FILE", err)
        _, _, code = await self.run_("--bogus", "x")
        self.assertEqual(code, 2)

    async def test_connectionRefused(self) -> None:
        """tcplab send to a port nobody listens on exits 3 and says the connection was refused."""
        self.source("a", b"x")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        _, err, code = await self.run_("--host", "127.0.0.1", "--port", str(port), "a")
        self.assertEqual(code, 3)
        self.assertIn("refused", err)

    async def test_localFileProblems(self) -> None:
        """A missing file, or a folder without -r, exits 6 with a message naming the file or pointing at -r, and
        nothing is sent."""
        _, err, code = await self.run_("--port", str(self.port), "missing.txt")
        self.assertEqual(code, 6)
        self.assertIn("missing.txt", err)
        os.mkdir(os.path.join(self.src, "folder"))
        _, err, code = await self.run_("--port", str(self.port), "folder")
        self.assertEqual(code, 6)
        self.assertIn("-r", err)
        self.assertEqual(os.listdir(self.dir), [])

    async def test_refused(self) -> None:
        """A file the server refuses (too large) exits 7 with the server's reason."""
        self.startServer("--max-size", "10", directory=self.dir)
        self.source("big", b"x" * 11)
        _, err, code = await self.run_("--port", str(self.port), "big")
        self.assertEqual(code, 7)
        self.assertIn("too-large", err)

    async def test_badToken(self) -> None:
        """A wrong TCPLAB_TOKEN exits 7 with bad-token, and the right one exits 0."""
        self.service.factory.token = b"right"
        self.source("a", b"x")
        _, err, code = await self.run_("--port", str(self.port), "a", env={"TCPLAB_TOKEN": "wrong"})
        self.assertEqual(code, 7)
        self.assertIn("bad-token", err)
        out, _, code = await self.run_("--port", str(self.port), "a", env={"TCPLAB_TOKEN": "right"})
        self.assertEqual(code, 0)

    async def test_tokenFileProblems(self) -> None:
        """A token file that cannot be used is a bad option value (exit 2, as an unreadable --ca is),
        with the same words the server uses."""
        self.source("a", b"x")
        _, err, code = await self.run_("--port", str(self.port), "--token-file", "missing-token", "a")
        self.assertEqual(code, 2)
        self.assertIn("cannot read --token-file 'missing-token': No such file or directory", err)
        self.source("bad-token", b"two words\n")
        _, err, code = await self.run_("--port", str(self.port), "--token-file", "bad-token", "a")
        self.assertEqual(code, 2)
        self.assertIn("spaces", err)

    async def test_folderClashIsNotAlreadyExists(self) -> None:
        """Exit 8 means the name is taken (--no-rename); a file where a folder of the path should be
        is another matter, which no new name would fix: refused, exit 7, with or without --no-rename."""
        with open(os.path.join(self.dir, "received_photos"), "wb") as f:
            f.write(b"not a folder")
        self.source("photos/a.jpg", b"jpeg")
        for options in ([], ["--no-rename"]):
            with self.subTest(options=options):
                _, err, code = await self.run_("--port", str(self.port), "-r", *options, "photos")
                self.assertEqual(code, 7, err)
                self.assertIn("received_photos is a file or symlink on the server, not a folder", err)
                self.assertIn("(bad-name)", err)

    async def test_alreadyExists(self) -> None:
        """--no-rename on a name already stored exits 8 saying it exists."""
        self.source("a.txt", b"x")
        await self.run_("--port", str(self.port), "a.txt")
        _, err, code = await self.run_("--port", str(self.port), "--no-rename", "a.txt")
        self.assertEqual(code, 8)
        self.assertIn("exists", err)

    async def test_verificationFailed(self) -> None:
        """A server that claims another hash is caught; what it says is shown escaped."""
        self.source("a", b"abc")
        out, err, code = await self.run_("--port", str(self.fake("lie")), "a")
        self.assertEqual(code, 9)
        self.assertNotIn("\x1b", out + err)

    async def test_connectionLost(self) -> None:
        """A server that closes mid-transfer exits 4 with a hint to use --resume."""
        self.source("a", b"abc")
        _, err, code = await self.run_("--port", str(self.fake("close")), "a")
        self.assertEqual(code, 4)
        self.assertIn("--resume", err)

    async def test_timedOut(self) -> None:
        """A server that never answers exits 5 after --timeout."""
        self.source("a", b"abc")
        _, _, code = await self.run_("--port", str(self.fake("silent")), "--timeout", "0.5", "a")
        self.assertEqual(code, 5)

    async def test_hostileErrorMessage(self) -> None:
        """A server error message with terminal escapes is shown escaped, so it cannot control the user's terminal."""
        self.source("a", b"abc")
        _, err, code = await self.run_("--port", str(self.fake("escape")), "a")
        self.assertEqual(code, 7)
        self.assertNotIn("\x1b", err)
        self.assertNotIn("\x07", err)
        self.assertIn("\\x1b", err)

    async def test_oneMissingFileDoesNotStopTheOthers(self) -> None:
        """``tcplab send missing.txt good.txt`` stores good.txt and exits 6 with one line about missing.txt."""
        self.source("good.txt", b"good")
        out, err, code = await self.run_("--port", str(self.port), "missing.txt", "good.txt")
        self.assertEqual(code, 6, err)
        self.assertIn("cannot read missing.txt", err)
        self.assertIn("good.txt -> received_good.txt", out)
        self.assertEqual(self.visible(), ["received_good.txt"])

    async def test_folderSymlinksNeverLeak(self) -> None:
        """``send -r photos`` with links to a secret file and folder sends neither, one warning each, exit 0."""
        self.source("secret/id_rsa", b"PRIVATE KEY")
        self.source("photos/a.jpg", b"jpeg")
        os.symlink("../secret/id_rsa", os.path.join(self.src, "photos", "b.jpg"))
        os.symlink("../secret", os.path.join(self.src, "photos", "keys"))
        out, err, code = await self.run_("--port", str(self.port), "-r", "photos", lines=2)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.visible(), ["received_photos/a.jpg"])
        self.assertIn("photos/b.jpg: a symlink", err)
        self.assertIn("photos/keys: a symlink", err)

    async def test_badEntryInAFolderDoesNotStopTheRest(self) -> None:
        """A fifo and a non-UTF-8 name in a folder are skipped with a line each; the rest is stored; exit 6."""
        self.source("docs/a.txt", b"a")
        self.source("docs/sub/b.txt", b"b")
        with open(os.path.join(os.fsencode(self.src), b"docs", b"bad-\xe9.txt"), "wb") as f:
            f.write(b"x")
        os.mkfifo(os.path.join(self.src, "docs", "pipe"))
        out, err, code = await self.run_("--port", str(self.port), "-r", "docs", lines=2)
        self.assertEqual(code, 6, err)
        self.assertEqual(self.visible(), ["received_docs/a.txt", "received_docs/sub/b.txt"])
        self.assertIn("not valid UTF-8", err)
        self.assertIn("docs/pipe: not a regular file", err)

    async def test_severalFailuresSummarised(self) -> None:
        """When several files fail, each failure is reported and a summary says how many of how many failed."""
        self.source("a", b"1")
        self.source("b", b"2")
        await self.run_("--port", str(self.port), "a", "b")
        out, err, code = await self.run_("--port", str(self.port), "--no-rename", "a", "b", lines=3)
        self.assertEqual(code, 8)
        self.assertEqual(err.count("already exists"), 2)
        self.assertIn("2 of 2", err)

    async def test_stalledTLSHandshake(self) -> None:
        """``send --tls`` to a silent server is a TLS failure: exit 3, a line naming the handshake."""
        self.source("a", b"x")
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        _, err, code = await self.run_("--tls", "--host", "127.0.0.1", "--port", str(silent.getsockname()[1]),
                                       "--timeout", "0.5", "a")
        self.assertEqual(code, 3, err)
        self.assertIn("TLS handshake", err)
        self.assertNotIn("no progress", err)

    async def test_interrupted(self) -> None:
        """Ctrl-C is never success."""
        self.source("a", b"abc")
        FakeServer.seen = Deferred()
        self.addCleanup(setattr, FakeServer, "seen", None)
        port = self.fake("silent")
        ended: Deferred[int] = Deferred()

        class Watch(ProcessProtocol):
            def processEnded(self, reason: Any) -> None:
                ended.callback(reason.value.exitCode)

        process = reactor.spawnProcess(Watch(), sys.executable, [sys.executable, "-m", "tcplab", "send", "--port",
                                       str(port), "--timeout", "20", "a"], env=dict(os.environ), path=self.src)
        await FakeServer.seen
        process.signalProcess(signal.SIGINT)
        self.assertEqual(await ended, 130)


class ClientProtocolTests(SynchronousTestCase):
    """UploadProtocol on its own, through StringTransport and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = UploadProtocol(self.clock, 10, chunkSize=4)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        path = os.path.join(scratch(self), "h")
        with open(path, "wb") as f:
            f.write(b"hello world")
        self.fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, self.fd)
        self.hasher = hashlib.sha256()

    def put(self) -> Deferred[Any]:
        return self.client.put(formatPut(11, "h", trailer=True), "h", self.fd, 0, 11, self.hasher, "h")

    def test_sendsHeaderBodyTrailer(self) -> None:
        """The sender writes the header, the body and a SHA256 trailer, and reports the server's OK with the
        connection still usable."""
        d = self.put()
        self.assertEqual(self.transport.value(),
                         formatPut(11, "h", trailer=True) + b"hello world" + formatTrailer(sha(b"hello world")))
        self.assertNoResult(d)
        self.client.dataReceived(formatOk(11, sha(b"hello world"), "received_h"))
        self.assertEqual(self.successResultOf(d), Ok(11, sha(b"hello world"), "received_h"))
        self.assertTrue(self.client.usable)

    def test_errorStopsTheBody(self) -> None:
        """An ERR while the body is going out: stop reading the file, fail, drop the connection."""
        transport = self.reconnect(FakeTransport(bufferSize=0))
        d = self.put()
        producer = transport.producer
        sent = len(transport.value())
        self.assertEqual(sent, len(formatPut(11, "h", trailer=True)) + 4, "paused after one chunk")
        self.client.dataReceived(formatErr(ErrorCode.TOO_LARGE, "no thanks"))
        self.failureResultOf(d, RefusedByServer)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        producer.resumeProducing()
        self.assertEqual(len(transport.value()), sent, "nothing more was sent")
        self.assertFalse(self.client.usable)

    def reconnect(self, transport: StringTransport) -> StringTransport:
        self.client = UploadProtocol(self.clock, 10, chunkSize=4)
        self.client.makeConnection(transport)
        return transport

    def test_errorCodesMapToExitCodes(self) -> None:
        """Each server error code becomes the matching kind of failure (and so exit code), unknown codes included,
        and keeps its code."""
        for code, kind in [("exists", AlreadyExists), ("checksum-mismatch", VerificationFailed),
                           ("timeout", TimedOut), ("short-body", ConnectionLostError), ("bad-name", RefusedByServer),
                           ("io-error", RefusedByServer), ("some-future-code", RefusedByServer)]:
            with self.subTest(code=code):
                error = ServerError.make(Err(code, "why"), "f\x1b")
                self.assertIsInstance(error, kind)
                self.assertEqual(serverCode(error), code)

    def test_garbageReply(self) -> None:
        """A reply that is not the file protocol fails the send saying the peer is not a tcplab-file server."""
        d = self.put()
        self.client.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertIn("tcplab-file server", str(self.failureResultOf(d, RefusedByServer).value))

    def test_endlessReplyLine(self) -> None:
        """A reply line that never ends fails the send and closes the connection instead of buffering forever."""
        d = self.put()
        for _ in range(10):
            self.client.dataReceived(b"x" * 1000)
        self.failureResultOf(d, RefusedByServer)
        self.assertTrue(self.transport.disconnecting)

    def test_overlongFinishedReplyLine(self) -> None:
        """A reply line longer than 8192 bytes is not believed even when its newline comes in the same read."""
        d = self.put()
        self.client.dataReceived(f"OK 11 {sha(b'hello world')} received_{'n' * MAX_REPLY}\n".encode())
        self.assertIn("overlong line", str(self.failureResultOf(d, RefusedByServer).value))
        self.assertTrue(self.transport.disconnecting)

    def test_replyInFragmentsOfEverySize(self) -> None:
        """A reply (LF or CRLF) read in fragments of any size gives the same result as in one read."""
        for end in (b"\n", b"\r\n"):
            reply = formatOk(11, sha(b"hello world"), "received_h").rstrip(b"\n") + end
            for size in range(1, len(reply) + 1):
                with self.subTest(end=end, size=size):
                    self.reconnect(StringTransport())
                    d = self.put()
                    for i in range(0, len(reply), size):
                        self.assertNoResult(d)
                        self.client.dataReceived(reply[i:i + size])
                    self.assertEqual(self.successResultOf(d), Ok(11, sha(b"hello world"), "received_h"))
                    self.assertTrue(self.client.usable)

    def test_timeout(self) -> None:
        """A server that does not reply within the timeout fails the send as timed out and closes the connection, not
        before."""
        d = self.put()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, TimedOut)
        self.assertTrue(self.transport.disconnecting)

    def slowLink(self, size: int) -> tuple[Deferred[Any], list[int]]:
        """A PUT of ``size`` bytes whose every byte the transport takes at once (as a socket
        buffer of megabytes does) and of which only ``arrived[0]`` have reached the server."""
        path = os.path.join(scratch(self), "big")
        with open(path, "wb") as f:
            f.write(b"x" * size)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        arrived = [0]
        self.client = UploadProtocol(self.clock, 10, chunkSize=1 << 20,
                                 unsent=lambda transport: len(transport.value()) - arrived[0])
        self.client.makeConnection(self.transport)
        d = self.client.put(formatPut(size, "big", trailer=True), "big", fd, 0, size, self.hasher, "big")
        return d, arrived

    def test_timeoutCountsOnlyTimeWithoutProgress(self) -> None:
        """An upload whose bytes reach the server every 6 s for 24 s does not time out with --timeout 10."""
        size = 4 << 20
        d, arrived = self.slowLink(size)
        for _ in range(4):
            self.clock.pump([0.5] * 12)
            self.assertNoResult(d)
            arrived[0] += size // 4
        self.clock.pump([0.5] * 12)
        self.client.dataReceived(formatOk(size, sha(b"x" * size), "received_big"))
        self.assertEqual(self.successResultOf(d).size, size)

    def test_stalledUploadTimesOut(self) -> None:
        """An upload whose bytes stop reaching the server times out --timeout after the last progress."""
        size = 4 << 20
        d, arrived = self.slowLink(size)
        self.clock.pump([0.5] * 12)
        arrived[0] += size // 2
        self.clock.pump([0.5] * 19)
        self.assertNoResult(d)
        self.clock.pump([0.5] * 4)
        failure = self.failureResultOf(d, TimedOut)
        self.assertIn("no progress for 10s while sending big", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_unsentBytesOfARealSocket(self) -> None:
        """``unsentBytes`` sees bytes waiting in the kernel for a peer that does not read, and none once read."""
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)

        class Transport:
            dataBuffer, offset, _tempDataLen = b"12345", 2, 4

            def getHandle(self) -> socket.socket:
                return client

        client.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(10_000):
                sent += client.send(b"x" * 65536)
        self.assertGreater(unsentBytes(Transport()), 7 + 65536, "the peer's window is full")
        server.settimeout(5)
        received = 0
        deadline = time.monotonic() + 10
        while (received < sent or unsentBytes(Transport()) > 7) and time.monotonic() < deadline:
            received += len(server.recv(1 << 20))
        self.assertEqual(unsentBytes(Transport()), 7)

    def test_stalledHandshakeIsNamed(self) -> None:
        """Over TLS, a timeout before the handshake finished says so; after it, it is "no progress"."""
        for handshaken, expected in [(False, "TLS handshake"), (True, "no progress")]:
            with self.subTest(handshaken=handshaken):
                transport = StringTransport()
                directlyProvides(transport, INegotiated)
                self.reconnect(transport)
                if handshaken:
                    self.client.handshakeCompleted()
                d = self.put()
                self.clock.pump([1] * 11)
                self.assertIn(expected, str(self.failureResultOf(d, TimedOut).value))

    def test_connectionLost(self) -> None:
        """A connection lost while waiting for the reply fails the send as a lost connection."""
        d = self.put()
        self.client.connectionLost(Failure(Exception("reset")))
        self.failureResultOf(d, ConnectionLostError)

    def test_okBeforeTheBodyEnds(self) -> None:
        """A server that answers before it has the whole file is not believed."""
        self.reconnect(FakeTransport(bufferSize=0))
        d = self.put()
        self.client.dataReceived(formatOk(11, sha(b"hello world"), "received_h"))
        self.failureResultOf(d, RefusedByServer)

    def test_unaskedErrorMakesConnectionUnusable(self) -> None:
        """An error the server sends unasked (such as an idle timeout) marks the connection unusable for further
        files."""
        self.client.dataReceived(formatErr(ErrorCode.TIMEOUT, "idle"))
        self.assertFalse(self.client.usable)


def split(items: list[Item | LocalFileError]) -> tuple[list[str], list[str]]:
    """The names that would be sent, and the problems, of what collectFiles found."""
    return ([i.name for i in items if isinstance(i, Item)],
            [str(i) for i in items if isinstance(i, LocalFileError)])


class CollectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.top = scratch(self)
        os.makedirs(os.path.join(self.top, "folder", "sub"))
        for name in ["folder/a.txt", "folder/sub/b.txt", "plain.txt"]:
            with open(os.path.join(self.top, name), "wb") as f:
                f.write(b"x")

    def test_files(self) -> None:
        """A named file is sent under its base name."""
        items = collectFiles([os.path.join(self.top, "plain.txt")], False)
        self.assertEqual([(i.name, i.size) for i in items if isinstance(i, Item)], [("plain.txt", 1)])

    def test_folderNeedsRecursive(self) -> None:
        """A folder without -r is a problem for that path only."""
        names, errors = split(collectFiles([os.path.join(self.top, "folder"), os.path.join(self.top, "plain.txt")],
                                           False))
        self.assertEqual(names, ["plain.txt"])
        self.assertEqual(len(errors), 1)
        self.assertIn("-r", errors[0])

    def test_recursive(self) -> None:
        """A folder keeps its relative paths; a fifo and a symlinked folder are skipped with a warning each."""
        os.mkfifo(os.path.join(self.top, "folder", "fifo"))
        os.symlink(self.top, os.path.join(self.top, "folder", "loop"))
        warnings: list[str] = []
        items = collectFiles([os.path.join(self.top, "folder") + "/"], True, warnings.append)
        self.assertEqual(split(items), (["folder/a.txt", "folder/sub/b.txt"], []))
        self.assertEqual(len(warnings), 2)
        self.assertIn("fifo", warnings[0])
        self.assertIn("loop: a symlink", warnings[1])

    def test_symlinksInAFolderNeverFollowed(self) -> None:
        """A symlink to a file, to a folder, or to nothing inside a folder is skipped, one warning line each."""
        secret = os.path.join(self.top, "secret")
        os.makedirs(secret)
        with open(os.path.join(secret, "id_rsa"), "wb") as f:
            f.write(b"PRIVATE KEY")
        photos = os.path.join(self.top, "photos")
        os.makedirs(photos)
        with open(os.path.join(photos, "a.jpg"), "wb") as f:
            f.write(b"jpeg")
        os.symlink("../secret/id_rsa", os.path.join(photos, "b.jpg"))
        os.symlink("../secret", os.path.join(photos, "keys"))
        os.symlink("../nowhere", os.path.join(photos, "dangling"))
        warnings: list[str] = []
        items = collectFiles([photos], True, warnings.append)
        self.assertEqual(split(items), (["photos/a.jpg"], []))
        self.assertEqual(len(warnings), 3, warnings)
        for warning, name in zip(warnings, ["b.jpg", "dangling", "keys"], strict=True):
            self.assertIn(f"{name}: a symlink", warning)
            self.assertEqual(warning.count("\n"), 0)

    def test_badEntriesDoNotStopTheRest(self) -> None:
        """An unreadable file, a socket and non-UTF-8 names in a folder are skipped; the rest is still sent."""
        folder = os.path.join(self.top, "folder")
        for name in [b"latin1-\xe9.txt", b"z.txt", b"locked.txt"]:
            with open(os.path.join(os.fsencode(folder), name), "wb") as f:
                f.write(b"x")
        os.makedirs(os.path.join(os.fsencode(folder), b"dir-\xff"))
        with open(os.path.join(os.fsencode(folder), b"dir-\xff", b"inside.txt"), "wb") as f:
            f.write(b"x")
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.bind(os.path.join(folder, "sock"))
        access = os.access
        self.patch(os, "access", lambda path, mode, **kw: not os.fspath(path).endswith("locked.txt")
                   and access(path, mode, **kw))
        warnings: list[str] = []
        names, errors = split(collectFiles([folder], True, warnings.append))
        self.assertEqual(names, ["folder/a.txt", "folder/z.txt", "folder/sub/b.txt"])
        self.assertEqual(len(errors), 3, errors)
        self.assertRegex(errors[0], r"latin1-\S+\.txt: its name is not valid UTF-8")
        self.assertIn("locked.txt: Permission denied", errors[1])
        self.assertRegex(errors[2], r"dir-\S+: its name is not valid UTF-8 \(nothing in it is sent\)")
        self.assertEqual(len(warnings), 1)
        self.assertIn("sock: not a regular file", warnings[0])

    def test_unreadableFolderDoesNotStopTheRest(self) -> None:
        """A folder that cannot be listed is one problem; its siblings are still sent."""
        scandir = os.scandir
        sub = os.path.join(self.top, "folder", "sub")

        def failing(path: Any) -> Any:
            if path == sub:
                raise PermissionError(13, "Permission denied", path)
            return scandir(path)

        self.patch(os, "scandir", failing)
        names, errors = split(collectFiles([os.path.join(self.top, "folder")], True))
        self.assertEqual(names, ["folder/a.txt"])
        self.assertEqual(len(errors), 1)
        self.assertIn("cannot read the folder", errors[0])

    def test_missing(self) -> None:
        """A missing path is a problem in its place, not an exception."""
        names, errors = split(collectFiles([os.path.join(self.top, "nope"), os.path.join(self.top, "plain.txt")],
                                           False))
        self.assertEqual(names, ["plain.txt"])
        self.assertIn("nope", errors[0])

    def test_unsendableNames(self) -> None:
        """Names with line breaks or not in UTF-8 are refused, in a printable line."""
        for name in ["line\nbreak", "carriage\r", os.fsdecode(b"latin1-\xe9")]:
            path = os.path.join(self.top, name)
            with open(path, "wb") as f:
                f.write(b"x")
            with self.subTest(name=name):
                [problem] = collectFiles([path], False)
                self.assertIsInstance(problem, LocalFileError)
                self.assertTrue(str(problem).isprintable())

    def test_oddNamesKept(self) -> None:
        """Ordinary odd names go as they are."""
        path = os.path.join(self.top, "звіт (1) [final].txt")
        with open(path, "wb") as f:
            f.write(b"x")
        item = collectFiles([path], False)[0]
        assert isinstance(item, Item)
        self.assertEqual(item.name, "звіт (1) [final].txt")


class ServerOptionsTests(SynchronousTestCase):
    """``twistd tcplab-file`` refuses settings that would break its promises, in one line."""

    def setUp(self) -> None:
        self.dir = scratch(self)

    def parse(self, *argv: str) -> filetap.Options:
        options = filetap.Options()
        options.parseOptions(["--dir", self.dir, *argv])
        return options

    def refused(self, *argv: str) -> str:
        error = self.assertRaises(usage.UsageError, self.parse, *argv)
        self.assertNotIn("\n", str(error))
        return str(error)

    def test_prefixStaysInsideTheFolder(self) -> None:
        """``--prefix ../escaped_`` would store ../escaped_a.txt, outside --dir."""
        for prefix in ("../escaped_", "sub/", "/tmp/x", "a\\b", "nul\x00", "esc\x1b[2J", ".", "..",
                       ".tcplab-x", "x" * 250):
            with self.subTest(prefix=prefix):
                self.assertIn("--prefix", self.refused("--prefix", prefix))
        self.assertIn("'/'", self.refused("--prefix", "../escaped_"))
        for prefix in ("", "received_", "in ", "..x_", "звіт-"):
            with self.subTest(prefix=prefix):
                self.assertEqual(self.parse("--prefix", prefix)["prefix"], prefix)

    def test_tokenLikeTheClient(self) -> None:
        """The server reads the token file as ``tcplab send`` does, and says so in the same words."""
        from tcplab.cli import send

        path = os.path.join(self.dir, "token")
        with open(path, "w") as f:
            f.write("s3cret\n")
        self.assertEqual(self.parse("--token-file", path)["token"], "s3cret")
        client = send.Options()
        client.parseOptions(["--token-file", path, "a"])
        self.assertEqual(client["token"], "s3cret")
        missing = os.path.join(self.dir, "missing")
        message = self.refused("--token-file", missing)
        self.assertIn(f"cannot read --token-file '{missing}'", message)
        clientError = self.assertRaises(UsageProblem, send.Options().parseOptions, ["a", "--token-file", missing])
        self.assertEqual(clientError.code, ExitCode.USAGE)
        self.assertEqual(str(clientError), message)
