"""tcplab-echo where real clients reach its edges: half-close, whole datagrams, slow readers,
byte order under partial writes, and the UDP burst cap after a long quiet."""

from __future__ import annotations

import array
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from tcplab.echo import tap as echotap
from tcplab.echo.server import EchoFactory, UDPEcho
from tests.support import ServerProcess, scratch
from tests.tlsutil import makeCertificates

KiB = 1 << 10
MiB = 1 << 20


def drain(server: ServerProcess) -> None:
    """Keep reading the server's log, so that many connections cannot fill its pipe and stall it."""

    def run() -> None:
        assert server.process.stdout is not None
        for line in iter(server.process.stdout.readline, b""):
            server.log.append(line.decode("utf-8", "replace"))

    threading.Thread(target=run, daemon=True).start()


def tcpClient(port: int, rcvbuf: int | None = None, mss: int | None = None) -> socket.socket:
    """A loopback TCP socket, its receive buffer and segment size set before it connects
    (set after, a smaller buffer only confuses the window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


class Exchange:
    """Send ``data`` while reading what comes back (so neither side's buffers deadlock), then
    optionally shut down the sending side and read until the server closes.

    ``onData`` sees each piece read; ``pace`` seconds pass after each read (a slow reader).
    """

    def __init__(self, sock: socket.socket, onData: Callable[[bytes], None]) -> None:
        self.sock = sock
        self.onData = onData
        self.received = 0
        self.closed = False

    def run(self, data: bytes, *, readSize: int = 4096, halfClose: bool = True, pace: float = 0.0,
            deadline: float = 20.0, until: Callable[[], bool] | None = None) -> None:
        sock, view, sent = self.sock, memoryview(data), 0
        sock.setblocking(False)
        end = time.monotonic() + deadline
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while sent < len(data) and time.monotonic() < end:
                for _, events in selector.select(1):
                    if events & selectors.EVENT_WRITE:
                        try:
                            sent += sock.send(view[sent : sent + 64 * KiB])
                        except BlockingIOError:
                            pass
                    if events & selectors.EVENT_READ:
                        if self._read(readSize):
                            return
                        if pace:
                            time.sleep(pace)
            if sent < len(data):
                raise AssertionError(f"sent only {sent} of {len(data)} bytes within {deadline:g}s")
            if halfClose:
                sock.shutdown(socket.SHUT_WR)
            selector.modify(sock, selectors.EVENT_READ)
            while time.monotonic() < end and not (until and until()):
                if selector.select(1) and self._read(readSize):
                    return
                if pace:
                    time.sleep(pace)

    def _read(self, size: int) -> bool:
        try:
            data = self.sock.recv(size)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return True
        self.received += len(data)
        self.onData(data)
        return False


def roundTrip(sock: socket.socket, data: bytes, **kwargs: object) -> tuple[bytes, bool]:
    """What came back for ``data`` sent and half-closed, and whether the server then closed."""
    got = bytearray()
    exchange = Exchange(sock, got.extend)
    exchange.run(data, **kwargs)  # type: ignore[arg-type]
    return bytes(got), exchange.closed


class HalfCloseProtocolTests(unittest.TestCase):
    def test_closesOnlyOnceOwedBytesAreOut(self) -> None:
        """When the peer shuts down its sending side, the echo stops throttling and closes after
        its buffer is flushed, instead of dropping the connection with the buffer unsent."""
        factory = EchoFactory()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"all I have")
        transport.producer.pauseProducing()
        self.assertIsNotNone(IHalfCloseableProtocol(protocol, None), "half-close is not seen as a full close")
        protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer, "a registered producer would keep the connection open forever")
        self.assertEqual(transport.value(), b"all I have")


class RealServerCase(unittest.TestCase):
    """Against a real tcplab-echo process listening on TCP and on a UNIX socket."""

    def setUp(self) -> None:
        self.path = os.path.join(scratch(self), "echo.sock")
        # The UNIX socket first: the server is taken as started once its TCP port is.
        self.server = ServerProcess("tcplab-echo", "--listen", f"unix:{self.path}", "--listen",
                                    "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.server.stop)
        drain(self.server)


class HalfCloseLoopbackTests(RealServerCase):
    def test_smallWindowGetsEveryByte(self) -> None:
        """64 KiB sent, then SHUT_WR, by a client with a 4 KiB receive buffer and 536-byte
        segments: all 64 KiB come back, then the close (17 KiB were lost before)."""
        data = os.urandom(64 * KiB)
        for _ in range(3):
            with tcpClient(self.server.port, rcvbuf=4096, mss=536) as sock:
                got, closed = roundTrip(sock, data, readSize=1000)
            self.assertEqual(len(got), len(data))
            self.assertEqual(got, data)
            self.assertTrue(closed, "the server closes once it has sent everything")

    def test_slowReaderGetsTheTail(self) -> None:
        """A client that reads slowly, in small pieces, while it sends 512 KiB and after its SHUT_WR
        still gets every byte, each of 4 times."""
        for _ in range(4):
            data = os.urandom(512 * KiB)
            with tcpClient(self.server.port, rcvbuf=16 * KiB, mss=536) as sock:
                got, closed = roundTrip(sock, data, readSize=2048, pace=0.0002)
            self.assertEqual((len(got), got == data, closed), (len(data), True, True))

    def test_unixSocketHalfClose(self) -> None:
        """The same over a UNIX socket: 1 MiB, SHUT_WR, slow small reads, every byte, then the close."""
        data = os.urandom(MiB)
        for _ in range(2):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(self.path)
                got, closed = roundTrip(sock, data, readSize=2048, pace=0.0001)
            self.assertEqual((len(got), got == data, closed), (len(data), True, True))

class ByteOrderTests(RealServerCase):
    def test_byteOrderUnderPartialWrites(self) -> None:
        """32 MiB of consecutive 64-bit counters through a small client receive window, read in
        small pieces while sending: every counter comes back, in sequence, each of 3 times (a
        direct write must never jump ahead of bytes Twisted still holds)."""
        payload = array.array("Q", range(4 * MiB)).tobytes()
        for _ in range(3):
            checked = [0]

            def check(chunk: bytes, checked: list[int] = checked) -> None:
                at = checked[0]
                if payload[at : at + len(chunk)] != chunk:
                    wrong = next(i for i in range(len(chunk)) if payload[at + i] != chunk[i])
                    self.fail(f"counter {(at + wrong) // 8} (byte {at + wrong}) came back out of sequence")
                checked[0] = at + len(chunk)

            with tcpClient(self.server.port, rcvbuf=16 * KiB) as sock:
                exchange = Exchange(sock, check)
                exchange.run(payload, readSize=1000, deadline=30)
            self.assertEqual((checked[0], exchange.closed), (len(payload), True))


class IdleReaderTests(unittest.TestCase):
    def test_slowReaderIsNotIdle(self) -> None:
        """With ``--idle-timeout 1``, a client that sent 2 MiB and then only reads, slowly (50 KB/s),
        for 3 s is not cut off, though most of its echo waits in the server's socket buffer meanwhile;
        once it stops reading too, it is cut off."""
        server = ServerProcess("tcplab-echo", "--port", "0", "--interface", "127.0.0.1", "--idle-timeout", "1")
        self.addCleanup(server.stop)
        drain(server)

        def cut() -> bool:
            return any("idle for 1s" in line for line in server.log)

        data = os.urandom(2 * MiB)
        got = bytearray()
        with tcpClient(server.port, rcvbuf=16 * KiB) as sock:
            exchange = Exchange(sock, got.extend)
            exchange.run(data, readSize=1024, halfClose=False, deadline=10, until=lambda: True)
            readingUntil = time.monotonic() + 3
            exchange.run(b"", readSize=1024, halfClose=False, pace=0.02,
                         until=lambda: cut() or time.monotonic() > readingUntil)
            self.assertFalse(cut(), f"cut off while reading, after {len(got)} of {len(data)} bytes")
            self.assertGreater(len(data), len(got), "it was still owed bytes: the test must read more slowly")
            self.assertEqual(bytes(got), data[: len(got)])
            end = time.monotonic() + 10
            while not cut() and time.monotonic() < end:
                time.sleep(0.05)
        self.assertTrue(cut(), "a client that neither sends nor reads is cut off")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise unittest.SkipTest(f"{name} is not installed")
    return path


class ThirdPartyClientTests(unittest.TestCase):
    """``printf 'x\\n' | nc -N`` and ``| ncat``: the usual way to say "that is all"."""

    RUNS = 100
    BATCH = 10

    def setUp(self) -> None:
        self.server = ServerProcess("tcplab-echo", "--port", "0", "--interface", "127.0.0.1")
        self.addCleanup(self.server.stop)
        drain(self.server)

    def runs(self, argv: list[str]) -> None:
        failures: list[str] = []
        end = time.monotonic() + 60
        for _ in range(0, self.RUNS, self.BATCH):
            batch = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for _ in range(self.BATCH)]
            for process in batch:
                try:
                    out, err = process.communicate(b"x\n", timeout=max(1.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    out, err = process.communicate()
                    failures.append("timed out")
                    continue
                if (process.returncode, out) != (0, b"x\n"):
                    failures.append(f"exit {process.returncode}, got {out!r} {err[:200]!r}")
        self.assertEqual(failures, [], f"{len(failures)} of {self.RUNS} runs did not get their echo")

    def test_ncHalfClose(self) -> None:
        """``printf 'x\\n' | nc -N 127.0.0.1 PORT`` prints ``x`` in 100 runs of 100."""
        nc = tool("nc")
        usage = subprocess.run([nc, "-h"], capture_output=True, timeout=10)
        if b"-N" not in usage.stdout + usage.stderr:
            raise unittest.SkipTest("this nc has no -N (it is not OpenBSD netcat)")
        self.runs([nc, "-N", "127.0.0.1", str(self.server.port)])

    def test_ncat(self) -> None:
        """``printf 'x\\n' | ncat 127.0.0.1 PORT`` (which half-closes by default) prints ``x`` in 100 runs of 100."""
        self.runs([tool("ncat"), "127.0.0.1", str(self.server.port)])


class TLSHalfCloseTests(unittest.TestCase):
    """Over TLS the end of a client's data is its close_notify."""

    def setUp(self) -> None:
        self.certs = makeCertificates(scratch(self))
        self.server = ServerProcess("tcplab-echo", "--listen",
                                    f"ssl:0:privateKey={self.certs['server']}:interface=127.0.0.1")
        self.addCleanup(self.server.stop)
        drain(self.server)

    def tlsExchange(self, data: bytes, version: int, notifyFirst: bool) -> tuple[bytes, str | None]:
        """Send ``data`` over TLS while reading; then (``notifyFirst``) send close_notify and go on
        reading, or read the whole echo first and close after. Returns the echo and how it ended."""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        context.load_verify_locations(self.certs["ca"])
        tls = SSL.Connection(context, None)
        tls.set_connect_state()
        tls.set_tlsext_host_name(b"localhost")
        sock = tcpClient(self.server.port)
        self.addCleanup(sock.close)
        outgoing, got = bytearray(), bytearray()
        ended: list[str] = []

        def fromTLS() -> None:
            try:
                while True:
                    outgoing.extend(tls.bio_read(65536))
            except SSL.WantReadError:
                pass

        def toTLS(chunk: bytes) -> None:
            if not chunk:
                ended.append("tcp eof")
                return
            tls.bio_write(chunk)
            try:
                while True:
                    got.extend(tls.recv(65536))
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                ended.append("close_notify")
            fromTLS()

        sock.setblocking(False)
        end = time.monotonic() + 20
        sent, closing = 0, False
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while not ended and time.monotonic() < end:
                if tls.get_state_string() != b"SSL negotiation finished successfully" and not sent:
                    try:
                        tls.do_handshake()
                    except SSL.WantReadError:
                        pass
                elif sent < len(data) and len(outgoing) < 64 * KiB:
                    sent += tls.send(data[sent : sent + 16 * KiB])
                elif sent == len(data) and not closing and (notifyFirst or len(got) == len(data)):
                    closing = True
                    tls.shutdown()
                fromTLS()
                for _, events in selector.select(0.5):
                    if events & selectors.EVENT_WRITE and outgoing:
                        try:
                            del outgoing[: sock.send(outgoing)]
                        except BlockingIOError:
                            pass
                    if events & selectors.EVENT_READ:
                        try:
                            toTLS(sock.recv(16 * KiB))
                        except BlockingIOError:
                            pass
                if not outgoing:
                    selector.modify(sock, selectors.EVENT_READ)
                else:
                    selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        return bytes(got), (ended or [None])[0]

    def test_closeNotifyAfterDataGetsEveryByte(self) -> None:
        """A TLS client that sends 3 MB, then its close_notify, then reads, gets all 3 MB before the
        server's close_notify, on TLS 1.2 and 1.3 (Twisted used to drop up to 64 KB it was gathering)."""
        data = os.urandom(3 * 1000 * 1000)
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION):
            got, ended = self.tlsExchange(data, version, notifyFirst=True)
            self.assertEqual((len(got), got == data, ended), (len(data), True, "close_notify"))

    def test_closeAfterEchoLosesNothing(self) -> None:
        """A TLS client that reads its whole echo before it closes gets every byte and a clean close."""
        data = os.urandom(256 * KiB)
        got, ended = self.tlsExchange(data, SSL.TLS1_3_VERSION, notifyFirst=False)
        self.assertEqual((len(got), got == data, ended), (len(data), True, "close_notify"))


class UDPWholeDatagramTests(unittest.TestCase):
    def startServer(self, *listen: str) -> echotap.EchoService:
        options = echotap.Options()
        options.parseOptions([*listen, "--udp"])
        service = echotap.makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def echoOf(self, family: int, host: str, port: int, datagram: bytes) -> defer.Deferred[bytes]:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * KiB)
        sock.bind((host, 0))
        sock.sendto(datagram, (host, port))
        d: defer.Deferred[bytes] = defer.Deferred()

        def poll(tries: int = 300) -> None:
            try:
                d.callback(sock.recv(128 * KiB, socket.MSG_DONTWAIT))
            except BlockingIOError:
                if tries:
                    reactor.callLater(0.01, poll, tries - 1)
                else:
                    d.errback(AssertionError(f"no UDP echo of {len(datagram)} bytes within 3 s"))

        poll()
        return d

    @defer.inlineCallbacks
    def test_largestIPv4Datagram(self):  # type: ignore[no-untyped-def]
        """Datagrams past Twisted's 8192-byte default, up to the IPv4 limit of 65507, come back whole."""
        service = self.startServer("--listen", "tcp:0:interface=127.0.0.1")
        port = service.udpPort.getHost().port
        for size in (8193, 40000, 65507):
            datagram = os.urandom(size)
            echo = yield self.echoOf(socket.AF_INET, "127.0.0.1", port, datagram)
            self.assertEqual((len(echo), echo == datagram), (size, True))

    @defer.inlineCallbacks
    def test_largestIPv6Datagram(self):  # type: ignore[no-untyped-def]
        """Over IPv6 the limit is 65527 bytes, and such a datagram comes back whole too."""
        try:
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).bind(("::1", 0))
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback") from None
        service = self.startServer("--listen", "tcp6:0:interface=\\:\\:1")
        port = service.udpPort.getHost().port
        datagram = os.urandom(65527)
        echo = yield self.echoOf(socket.AF_INET6, "::1", port, datagram)
        self.assertEqual((len(echo), echo == datagram), (65527, True))


class FakeUDPTransport:
    def __init__(self, sent: list[bytes]) -> None:
        self.sent = sent

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)


class UDPBurstTests(unittest.SynchronousTestCase):
    def test_burstCapAfterLongQuiet(self) -> None:
        """After an hour of quiet a source gets ``--udp-burst`` replies at once and no more: the
        bucket refills only up to the burst, however long it was idle."""
        options = echotap.Options()
        options.parseOptions(["--port", "0", "--udp", "--udp-rate", "10", "--udp-burst", "5"])
        clock = Clock()
        udp = UDPEcho(options["udp-rate"], options["udp-burst"], clock.seconds)
        sent: list[bytes] = []
        udp.transport = FakeUDPTransport(sent)  # type: ignore[assignment]
        source = ("192.0.2.7", 40000)
        udp.datagramReceived(b"first", source)
        self.assertEqual(len(sent), 1)
        for quiet in (3600.0, 86400.0):
            sent.clear()
            clock.advance(quiet)
            for _ in range(50):
                udp.datagramReceived(b"burst", source)
            self.assertEqual(len(sent), 5, f"after {quiet:g}s of quiet")
        clock.advance(0.5)
        sent.clear()
        for _ in range(50):
            udp.datagramReceived(b"again", source)
        self.assertEqual(len(sent), 5, "half a second at 10 a second refills 5")
