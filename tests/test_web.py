"""The WebSocket adapters in memory: a browser's frames become a hub client's lines or a file receiver's
bytes, over StringTransport, with the Origin check."""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tcplab.file.receiver import FileReceiverFactory
from tcplab.file.store import FileStore, synchronous
from tcplab.multi.hub import HubConfig, MultiHub
from tcplab.web import StreamingWebSocketFactory, sameOrigin
from tests.support import scratch

TEXT, BINARY = 0x1, 0x2


def handshake(origin: str | None, host: str = "127.0.0.1:8001") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def messages(data: bytes) -> list[tuple[int, bytes]]:
    """The server's (unmasked) frames after its handshake response."""
    data = data.split(b"\r\n\r\n", 1)[1]
    out = []
    while data:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        pos = 2
        if size == 126:
            size, pos = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, pos = struct.unpack("!Q", data[2:10])[0], 10
        out.append((opcode, data[pos:pos + size]))
        data = data[pos + size:]
    return out


class SocketTransport(StringTransport):
    """A StringTransport that, like a real socket, lets a protocol unregister when no producer is registered."""

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


def inMemory(factory: StreamingWebSocketFactory) -> StreamingWebSocketFactory:
    """No handshake, ping or close timers: autobahn would put them on the global reactor."""
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0,
                               autoPingTimeout=0)
    return factory


class Browser:
    """A WebSocket connection to ``factory`` over a StringTransport."""

    def __init__(self, factory: StreamingWebSocketFactory, origin: str | None = "http://127.0.0.1:8001",
                 port: int = 50000) -> None:
        self.transport = SocketTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.protocol = inMemory(factory).buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(handshake(origin))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def text(self) -> str:
        return "".join(p.decode() for op, p in messages(self.transport.value()) if op in (TEXT, BINARY))


class OriginTests(SynchronousTestCase):
    def test_sameOrigin(self) -> None:
        """Only the page's own scheme and host:port (or no Origin at all, a non-browser) pass the check."""
        self.assertTrue(sameOrigin("http://127.0.0.1:8001", "127.0.0.1:8001", False))
        self.assertTrue(sameOrigin(None, "127.0.0.1:8001", False))
        self.assertFalse(sameOrigin("http://evil.example", "127.0.0.1:8001", False))
        self.assertFalse(sameOrigin("http://127.0.0.1:9999", "127.0.0.1:8001", False))
        self.assertFalse(sameOrigin("http://127.0.0.1:8001", "127.0.0.1:8001", True))
        self.assertFalse(sameOrigin("null", "127.0.0.1:8001", False))

    def test_otherOriginRefused(self) -> None:
        """A handshake from another origin gets 403 and never becomes a hub client."""
        hub = MultiHub(HubConfig(), Clock())
        browser = Browser(StreamingWebSocketFactory(hub, lineMode=True), origin="http://evil.example")
        self.assertIn(b"403", browser.transport.value().split(b"\r\n", 1)[0])
        self.assertEqual(len(hub.members), 0)


class HubAdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = MultiHub(HubConfig(maxLine=64), self.clock)
        self.sockets = StreamingWebSocketFactory(self.hub, lineMode=True)
        self.tcp = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.other = self.hub.buildProtocol(None)
        self.other.makeConnection(self.tcp)

    def test_browserIsAHubClient(self) -> None:
        """A browser's text messages are lines for the room (escaped for others); others' lines come back as text."""
        browser = Browser(self.sockets)
        self.assertIn("welcome, you are 127.0.0.1:50000", browser.text())
        message = b"hello \x1b[2J room"
        data = frame(message)
        for i in range(len(data)):
            browser.send(data[i:i + 1])
        self.assertIn(b"<127.0.0.1:50000> hello \\x1b[2J room\n", self.tcp.value())
        self.other.dataReceived(b"hi browser\n")
        self.assertIn("<127.0.0.1:40000> hi browser\n", browser.text())

    def test_fragmentedMessageIsOneLine(self) -> None:
        """A message sent in several frames is one line, however the frames are split."""
        browser = Browser(self.sockets)
        browser.send(frame(b"/ni", fin=False) + frame(b"ck web", opcode=0, fin=True))
        self.assertIn("you are now web", browser.text())

    def test_maxLineApplies(self) -> None:
        """A message longer than --max-line gets the hub's own notice and the WebSocket is closed."""
        browser = Browser(self.sockets)
        browser.send(frame(b"x" * 65))
        self.assertIn("line too long: the limit is 64 bytes", browser.text())
        self.assertIn(0x8, [op for op, _ in messages(browser.transport.value())])
        self.assertEqual(len(self.hub.members), 1)

    def test_maxClientsApplies(self) -> None:
        """With the hub full, a browser is told so, as a TCP client would be."""
        hub = MultiHub(HubConfig(maxClients=1), self.clock)
        hub.buildProtocol(None).makeConnection(StringTransport())
        browser = Browser(StreamingWebSocketFactory(hub, lineMode=True))
        self.assertIn("server full (1 clients)", browser.text())


class FileAdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(scratch(self), "drop")
        os.mkdir(self.dir)
        self.store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(self.store.close)

    def factory(self, **kwargs: object) -> StreamingWebSocketFactory:
        receiver = FileReceiverFactory(self.store, clock=Clock(), **kwargs)  # type: ignore[arg-type]
        return StreamingWebSocketFactory(receiver, lineMode=False)

    def test_uploadStreamsIntoStore(self) -> None:
        """A PUT line and a body in binary frames of any size are stored, verified, as received_NAME."""
        body = os.urandom(70000)
        for size in (1, 7, 4096, 70000):
            name = f"f{size}.bin"
            browser = Browser(self.factory())
            browser.send(frame(f"PUT {len(body)} {name}\n".encode()))
            for pos in range(0, len(body), size):
                browser.send(frame(body[pos:pos + size], opcode=BINARY))
            self.assertEqual(browser.text(), f"OK {len(body)} {hashlib.sha256(body).hexdigest()} received_{name}\n")
            with open(os.path.join(self.dir, f"received_{name}"), "rb") as f:
                self.assertEqual(f.read(), body)

    def test_tokenRequired(self) -> None:
        """With a token, a PUT without it gets the protocol's bad-token error."""
        browser = Browser(self.factory(token=b"s3cret"))
        browser.send(frame(b"PUT 5 a.txt\n") + frame(b"hello", opcode=BINARY))
        self.assertTrue(browser.text().startswith("ERR bad-token "))
        self.assertEqual(os.listdir(self.dir), [])

    def test_maxSize(self) -> None:
        """A PUT over --max-size gets the protocol's too-large error before any body is stored."""
        browser = Browser(self.factory(maxSize=10))
        browser.send(frame(b"PUT 11 a.txt\n"))
        self.assertTrue(browser.text().startswith("ERR too-large "))


class BackpressureTests(SynchronousTestCase):
    def test_hubPauseReachesSocket(self) -> None:
        """When the hub stops reading a browser (its queue is full), the socket under the WebSocket is paused."""
        hub = MultiHub(HubConfig(), Clock())
        browser = Browser(StreamingWebSocketFactory(hub, lineMode=True))
        client = browser.protocol.inner
        client.pauseReading()
        self.assertEqual(browser.transport.producerState, "paused")
        client.resumeReading()
        self.assertEqual(browser.transport.producerState, "producing")
