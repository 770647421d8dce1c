"""The client's connection stand-ins in memory: a plain connection to a TLS port is told apart from
a lost one, and nothing the server sent is lost or reordered on the way to the protocol."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcplab.errors import ConnectFailed, tlsFailure
from tcplab.tlsclient import PlainTCP, _answersTLS, clientHello

ALERT = b"\x15\x03\x03\x00\x02\x02\x46"
SERVER_HELLO_HEAD = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"


class Inner(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


class PlainTCPTests(SynchronousTestCase):
    def connect(self, tls: bool | None) -> tuple[PlainTCP, Inner, list[int]]:
        inner, probes = Inner(), []

        def probe() -> Deferred[bool]:
            probes.append(1)
            return succeed(bool(tls))

        gate = PlainTCP(inner, "localhost:7000", probe if tls is not None else None)
        gate.makeConnection(StringTransport())
        return gate, inner, probes

    def test_silentHangUpFromATLSPort(self) -> None:
        """Silence then a hang-up, and the port answers a ClientHello: the protocol hears "TLS port", exit 3."""
        for lost in (ConnectionDone, ConnectionLost):
            gate, inner, probes = self.connect(tls=True)
            gate.connectionLost(Failure(lost()))
            self.assertEqual(probes, [1])
            error = tlsFailure(inner.reason)
            self.assertIsInstance(error, ConnectFailed)
            self.assertIn("localhost:7000 is a TLS port: connect with --tls", str(error))

    def test_silentHangUpFromAPlainServer(self) -> None:
        """A plain server that died keeps its "connection lost" (and the --resume advice that goes with it)."""
        gate, inner, probes = self.connect(tls=False)
        gate.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(probes, [1])
        assert inner.reason is not None
        self.assertTrue(inner.reason.check(ConnectionDone))

    def test_alertThenHangUp(self) -> None:
        """A TLS alert, in fragments of every size, then a hang-up: "TLS port", and the alert is not printed."""
        for size in range(1, len(ALERT) + 1):
            gate, inner, probes = self.connect(tls=True)
            for i in range(0, len(ALERT), size):
                gate.dataReceived(ALERT[i:i + size])
            self.assertEqual(inner.data, b"")
            gate.connectionLost(Failure(ConnectionDone()))
            self.assertEqual((probes, inner.data), ([1], b""), size)
            self.assertIsInstance(tlsFailure(inner.reason), ConnectFailed)

    def test_heldBytesAreDeliveredWhenNotTLS(self) -> None:
        """Alert-like bytes from a plain server (an echo of binary input) all reach the protocol, in order."""
        gate, inner, probes = self.connect(tls=False)
        gate.dataReceived(ALERT)
        gate.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((probes, inner.data), ([1], ALERT))
        gate, inner, probes = self.connect(tls=True)
        for byte in ALERT + b"more":
            gate.dataReceived(bytes([byte]))
        self.assertEqual(inner.data, ALERT + b"more")
        gate.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(probes, [])
        assert inner.reason is not None
        self.assertTrue(inner.reason.check(ConnectionDone))

    def test_ordinaryRepliesPassStraightThrough(self) -> None:
        """Text from the server reaches the protocol at once, in fragments of every size; no probe after it."""
        reply = b"* welcome\nhello\n"
        for size in range(1, len(reply) + 1):
            gate, inner, probes = self.connect(tls=True)
            for i in range(0, len(reply), size):
                gate.dataReceived(reply[i:i + size])
                self.assertEqual(inner.data, reply[:i + size])
            gate.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(probes, [])


class ProbeVerdictTests(SynchronousTestCase):
    def test_verdicts(self) -> None:
        """A ServerHello or an alert is TLS; an echoed ClientHello or text is not; fed byte by byte."""
        for reply, tls in ((SERVER_HELLO_HEAD, True), (ALERT, True), (clientHello(), False),
                           (b"ERR bad-request\n", False), (b"\x16\x04\x00", False)):
            verdicts = [_answersTLS(reply[:n]) for n in range(1, len(reply) + 1)]
            decided = [v for v in verdicts if v is not None]
            self.assertEqual(decided[0], tls, reply)
