"""tcplab-multi over real loopback sockets: many clients, a connection storm, a stuck reader,
the ``tcplab echo`` command as the chat client, and a graceful stop under twistd."""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections.abc import Callable

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.multi import tap as multitap
from tests.support import ServerProcess, childEnv

TIMEOUT = 20.0


class LineClient(Protocol):
    """Collects the lines it receives; ``waitFor`` fires once a condition on them holds."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self._buffer = b""
        self._waiting: list[tuple[Callable[[LineClient], bool], defer.Deferred[None]]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.transport.getHost().port}"

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        self.lines.extend(lines)
        self._check()

    def waitFor(self, condition: Callable[[LineClient], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((condition, d))
        self._check()
        return d

    def _check(self) -> None:
        ready = [d for condition, d in self._waiting if condition(self)]
        self._waiting = [(condition, d) for condition, d in self._waiting if d not in ready]
        for d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


def chatLines(client: LineClient) -> list[bytes]:
    return [line for line in client.lines if not line.startswith(b"* ")]


class ServerMixin:
    """Start a hub in this process, on a free loopback port, stopped after the test."""

    addCleanup: Callable[..., None]

    def startServer(self, *argv: str) -> multitap.HubService:
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "0", *argv])
        service = multitap.HubService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def port(self, service: multitap.HubService) -> int:
        return service.listening.ports[0].getHost().port  # type: ignore[no-any-return]

    async def connect(self, port: int) -> LineClient:
        client = LineClient()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await client.waitFor(lambda c: bool(c.lines))
        return client


class LoopbackTests(ServerMixin, unittest.TestCase):
    def test_dozensOfClientsEveryLineInOrder(self) -> defer.Deferred[None]:
        """30 clients each send 20 lines at once: each gets its own back exactly and every other
        client's, prefixed, in the order they were sent."""
        service = self.startServer()
        port = self.port(service)
        count, perClient = 30, 20

        async def run() -> None:
            clients = list(await defer.gatherResults([defer.Deferred.fromCoroutine(self.connect(port))
                                                      for _ in range(count)]))
            sent = {c.name: [f"{c.name} says {i} \u00e9\x1b".encode() for i in range(perClient)] for c in clients}
            for c in clients:
                lines = sent[c.name]
                c.transport.write(b"".join(line + b"\n" for line in lines[:7]))
                c.transport.write(b"".join(line + b"\r\n" for line in lines[7:]))
            expected = count * perClient
            await defer.gatherResults([c.waitFor(lambda c: len(chatLines(c)) >= expected) for c in clients])
            for c in clients:
                got = chatLines(c)
                self.assertEqual(len(got), expected)
                own = [line for line in got if not line.startswith(b"<")]
                self.assertEqual(own, sent[c.name][:7] + [line + b"\r" for line in sent[c.name][7:]])
                for other in clients:
                    if other is c:
                        continue
                    prefix = f"<{other.name}> ".encode()
                    theirs = [line[len(prefix):] for line in got if line.startswith(prefix)]
                    self.assertEqual(theirs, [line.replace(b"\x1b", b"\\x1b") for line in sent[other.name]])
            for c in clients:
                c.transport.loseConnection()
            await defer.gatherResults([c.lost for c in clients])

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)

    def test_connectionStorm(self) -> defer.Deferred[None]:
        """500 short connections, 50 at a time, each echoing one line: no errors, in bounded time."""
        service = self.startServer()
        port = self.port(service)
        total, atOnce = 500, 50
        errors: list[str] = []
        started = time.monotonic()

        async def one(i: int) -> None:
            try:
                client = LineClient()
                await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
                line = b"ping %d" % i
                client.transport.write(line + b"\n")
                await client.waitFor(lambda c: line in c.lines)
                client.transport.loseConnection()
                await client.lost
            except Exception as e:
                errors.append(repr(e))

        async def run() -> None:
            semaphore = defer.DeferredSemaphore(atOnce)
            await defer.gatherResults(
                [semaphore.run(lambda i=i: defer.Deferred.fromCoroutine(one(i))) for i in range(total)]
            )
            self.assertEqual(errors, [])
            self.assertLess(time.monotonic() - started, TIMEOUT)
            self.assertEqual(service.hub.stats.joined, total)
            for _ in range(100):
                if not service.hub.members:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(len(service.hub.members), 0, "the server saw every client go")

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)

    def test_stuckReaderIsDroppedOthersGetEverything(self) -> defer.Deferred[None]:
        """A client that never reads is cut loose once --send-queue bytes wait for it; a listener
        that keeps up gets every one of 4 MB of lines, and the sender every echo."""
        service = self.startServer("--send-queue", "65536")
        port = self.port(service)
        lines, batch = 40_000, 1000
        line = b"%06d " + b"l" * 93

        async def run() -> None:
            stuck = await self.connect(port)
            stuck.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.transport.pauseProducing()
            listener = await self.connect(port)
            sender = await self.connect(port)
            prefix = f"<{sender.name}> ".encode()
            for start in range(0, lines, batch):
                sender.transport.write(b"".join(line % i + b"\n" for i in range(start, start + batch)))
                await listener.waitFor(lambda c, last=prefix + line % (start + batch - 1): c.lines[-1] == last)
            await sender.waitFor(lambda c: c.lines[-1] == line % (lines - 1))
            got = [x for x in listener.lines if x.startswith(prefix)]
            self.assertEqual(got, [prefix + line % i for i in range(lines)])
            self.assertEqual([x for x in sender.lines if not x.startswith(b"* ")], [line % i for i in range(lines)])
            self.assertEqual(service.hub.stats.slow, 1)
            self.assertEqual(len(service.hub.members), 2)
            self.assertIn(f"* {stuck.name} left (too slow)".encode(), listener.lines)
            for c in (stuck, listener, sender):
                c.transport.abortConnection()

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)


class CommandLineClient(ProcessProtocol):
    """``tcplab echo`` as a child process: what it printed, and how it ended."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.out += data
        ready = [d for text, d in self._waiting if text in self.out]
        self._waiting = [(text, d) for text, d in self._waiting if d not in ready]
        for d in ready:
            d.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def printed(self, text: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if text in self.out:
            d.callback(None)
        else:
            self._waiting.append((text, d))
        return d

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value.exitCode)  # type: ignore[union-attr]


class EchoCommandTests(ServerMixin, unittest.TestCase):
    """The Task 1 client, unchanged, is the Task 2 chat client."""

    def spawn(self, port: int, *messages: str) -> CommandLineClient:
        process = CommandLineClient()
        argv = [sys.executable, "-m", "tcplab", "echo", "--port", str(port), "--timeout", "10", *messages]
        transport = reactor.spawnProcess(process, sys.executable, argv, env=childEnv())
        self.addCleanup(lambda: process.ended if process.ended.called else self._kill(transport, process))
        return process

    def _kill(self, transport: object, process: CommandLineClient) -> defer.Deferred[int]:
        transport.signalProcess("KILL")  # type: ignore[attr-defined]
        return process.ended.addErrback(lambda _: -1)

    def test_messagesComeBack(self) -> defer.Deferred[None]:
        """tcplab echo against the hub shows the welcome, its own lines and the /who reply, and another client sees
        the line."""
        port = self.port(self.startServer())

        async def run() -> None:
            other = await self.connect(port)
            cli = self.spawn(port, "hello", "/who")
            code = await cli.ended
            self.assertEqual(code, 0, cli.err)
            self.assertIn(b"\nhello\n/who\n* 2 connected: ", cli.out)
            self.assertTrue(cli.out.startswith(b"* welcome, you are 127.0.0.1:"))
            await other.waitFor(lambda c: any(line.endswith(b"> hello") for line in c.lines))

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)

    def test_chatBetweenTwoClients(self) -> defer.Deferred[None]:
        """Typed lines come back and reach the other client; the other client's lines are printed."""
        port = self.port(self.startServer())

        async def run() -> None:
            other = await self.connect(port)
            cli = self.spawn(port)
            await cli.printed(b"* welcome")
            cli.transport.write(b"hi from the terminal\n")
            await cli.printed(b"\nhi from the terminal\n")
            await other.waitFor(lambda c: any(line.endswith(b"> hi from the terminal") for line in c.lines))
            other.transport.write(b"hi back\n")
            await cli.printed(f"<{other.name}> hi back\n".encode())
            cli.transport.closeStdin()
            self.assertEqual(await cli.ended, 0, cli.err)
            other.transport.loseConnection()
            await other.lost

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)


class TwistdTests(unittest.TestCase):
    def test_sigtermTellsClientsAndStops(self) -> None:
        """Under ``twistd -n tcplab-multi``, SIGTERM tells connected clients and closes them
        (twistd then ends by the same signal, as it does for every plugin)."""
        server = ServerProcess("tcplab-multi", "--port", "0", "--interface", "127.0.0.1")
        self.addCleanup(server.stop)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            welcome = sock.recv(4096)
            self.assertTrue(welcome.startswith(b"* welcome, you are 127.0.0.1:"), welcome)
            assert server.process is not None
            server.process.terminate()
            received = b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                data = sock.recv(4096)
                if not data:
                    break
                received += data
            self.assertEqual(received, b"* server shutting down\n")
        code = server.process.wait(10)
        assert server.process.stdout is not None
        log = "".join(server.log) + server.process.stdout.read().decode("utf-8", "replace")
        self.assertIn(code, (0, -signal.SIGTERM), log)
        self.assertIn("open files limit", log)
        self.assertIn("stats: 0 clients now (1 so far)", log)

