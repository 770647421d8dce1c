"""The ``tcplab echo`` client: protocol logic with fake transports, exit codes as a process."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import threading
import time
import tty

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.echo.client import (
    MAX_PENDING_BYTES,
    MAX_PENDING_LINES,
    MAX_UNMATCHED_LINE,
    EchoClient,
    InputLines,
    LineBuffer,
    TerminalText,
    UDPEchoClient,
)
from tcplab.errors import ConnectionLostError, ExitCode, TimedOut, VerificationFailed
from tcplab.testing import FakeTransport
from tests.support import TCPLAB, ServerProcess, childEnv, runMain, runTcplab


def connectedClient(timeout: float = 5) -> tuple[EchoClient, StringTransport, Clock, list[bytes]]:
    out: list[bytes] = []
    clock = Clock()
    client = EchoClient(out.append, clock, timeout)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock, out


class EchoClientTests(unittest.TestCase):
    def test_doneWhenAllEchoesCameBack(self) -> None:
        """The echo client sends each line, prints the echoes as they arrive byte by byte, and finishes and closes
        once every echo is back."""
        client, transport, clock, out = connectedClient()
        client.sendLines([b"hello", b"w\xc3\xb6rld"])
        client.endInput()
        self.assertEqual(transport.value(), b"hello\nw\xc3\xb6rld\n")
        self.assertNoResult(client.done)
        data = b"hello\nw\xc3\xb6rld\n"
        for byte in range(len(data)):
            client.dataReceived(data[byte : byte + 1])
        self.successResultOf(client.done)
        self.assertEqual(b"".join(out), data)
        self.assertTrue(transport.disconnecting)

    def test_unsolicitedLinesArePrintedNotCounted(self) -> None:
        """Against tcplab-multi, other clients' lines arrive between our echoes."""
        client, transport, clock, out = connectedClient()
        client.sendLines([b"mine"])
        client.endInput()
        client.dataReceived(b"[127.0.0.1:4000] theirs\n")
        self.assertNoResult(client.done)
        client.dataReceived(b"mine\n")
        self.successResultOf(client.done)
        self.assertEqual(out, [b"[127.0.0.1:4000] theirs\n", b"mine\n"])

    def test_timeoutWhenEchoesMissing(self) -> None:
        """The echo client fails with a timeout saying how many lines are still due when the echoes stop for
        --timeout, and not before."""
        client, transport, clock, out = connectedClient(timeout=3)
        client.sendLines([b"a", b"b"])
        client.endInput()
        clock.advance(2)
        client.dataReceived(b"a\n")
        clock.advance(2.9)
        self.assertNoResult(client.done)
        clock.advance(0.2)
        failure = self.failureResultOf(client.done, TimedOut)
        self.assertIn("1 line still due", str(failure.value))
        self.assertEqual(failure.value.code, ExitCode.TIMEOUT)

    def test_connectionLostWithEchoesDue(self) -> None:
        """A connection lost with echoes still due fails the client saying how many."""
        client, transport, clock, out = connectedClient()
        client.sendLines([b"a"])
        client.endInput()
        client.connectionLost(None)
        failure = self.failureResultOf(client.done, ConnectionLostError)
        self.assertIn("1 echo still due", str(failure.value))

    def test_stdinLinesFeedTheClient(self) -> None:
        """Lines read from stdin in any pieces are sent whole, a last line without a newline gets one, and end of
        input lets the client finish."""
        client, transport, clock, out = connectedClient()
        lines = InputLines(client)
        lines.dataReceived(b"one\ntw")
        lines.dataReceived(b"o\nthree")
        lines.connectionLost(None)
        self.assertEqual(transport.value(), b"one\ntwo\nthree\n")
        self.assertTrue(client.inputEnded)
        client.dataReceived(b"one\ntwo\nthree\n")
        self.successResultOf(client.done)


class HandshakeTests(unittest.TestCase):
    def connect(self, timeout: float = 2) -> tuple[EchoClient, FakeTransport, Clock]:
        clock = Clock()
        client = EchoClient([].append, clock, timeout)
        transport = FakeTransport(tls=True)
        client.makeConnection(transport)
        return client, transport, clock

    def test_stalledHandshakeIsNamed(self) -> None:
        """A TLS handshake that never finishes is reported as such, not as "no echo"."""
        client, transport, clock = self.connect()
        client.sendLines([b"hi"])
        client.endInput()
        clock.advance(2)
        failure = self.failureResultOf(client.done, TimedOut)
        self.assertIn("TLS handshake", str(failure.value))
        self.assertNotIn("echo", str(failure.value))
        self.assertTrue(transport.disconnecting)

    def test_stalledHandshakeEndsAChatToo(self) -> None:
        """With input still open (a chat), a stalled handshake times out after --timeout."""
        client, transport, clock = self.connect()
        clock.advance(1.9)
        self.assertNoResult(client.done)
        clock.advance(0.2)
        self.assertIn("TLS handshake", str(self.failureResultOf(client.done, TimedOut).value))

    def test_afterTheHandshakeItIsNoEcho(self) -> None:
        """Once the handshake is done, a silent server is "no echo" as over plain TCP."""
        client, transport, clock = self.connect()
        client.handshakeCompleted()
        clock.advance(5)
        self.assertNoResult(client.done)
        client.sendLines([b"hi"])
        client.endInput()
        clock.advance(2)
        self.assertIn("no echo for 2s", str(self.failureResultOf(client.done, TimedOut).value))


class FakeDatagramTransport:
    """Records the datagrams a DatagramProtocol writes."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, datagram: bytes) -> None:
        self.sent.append(datagram)


class UDPClientTests(unittest.TestCase):
    def start(self, *messages: bytes) -> tuple[UDPEchoClient, list[bytes]]:
        out: list[bytes] = []
        client = UDPEchoClient(list(messages), out.append, Clock(), 5)
        client.transport = FakeDatagramTransport()  # type: ignore[assignment]
        client.send()
        return client, out

    def test_truncatedReplyIsVerificationFailed(self) -> None:
        """A 10000-byte message answered with its first 8192 bytes is exit 9, not success."""
        message = bytes(range(256)) * 39 + b"x" * 16
        client, out = self.start(message)
        client.datagramReceived(message[:8192], ("127.0.0.1", 7000))
        failure = self.failureResultOf(client.done, VerificationFailed)
        self.assertEqual(failure.value.code, ExitCode.VERIFY)
        self.assertIn("truncated: 8192 of 10000 bytes", str(failure.value))
        self.assertEqual(out, [])

    def test_differentReplyIsVerificationFailed(self) -> None:
        """A reply that is not one of the messages sent fails, even if as long."""
        client, out = self.start(b"ping", b"pong")
        client.datagramReceived(b"ping", ("127.0.0.1", 7000))
        client.datagramReceived(b"PONG", ("127.0.0.1", 7000))
        self.assertIn("not any message sent", str(self.failureResultOf(client.done, VerificationFailed).value))

    def test_reorderedAndDuplicatedRepliesPass(self) -> None:
        """UDP may reorder and duplicate: each message back once, in any order, is success."""
        client, out = self.start(b"a", b"b", b"a")
        for reply in [b"b", b"b", b"a"]:
            client.datagramReceived(reply, ("127.0.0.1", 7000))
        self.assertNoResult(client.done)
        client.datagramReceived(b"a", ("127.0.0.1", 7000))
        self.successResultOf(client.done)
        self.assertEqual(out, [b"b\n", b"a\n", b"a\n"])


class FakeInput:
    """Stands for stdin's producer: records whether it is paused."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class InputPacingTests(unittest.TestCase):
    def test_tooManyEchoesDuePausesInput(self) -> None:
        """A server that reads but never echoes cannot make the client read all its input."""
        client, transport, clock, out = connectedClient()
        source = FakeInput()
        client.readFrom(source)  # type: ignore[arg-type]
        client.sendLines([b"x"] * MAX_PENDING_LINES)
        self.assertFalse(source.paused)
        client.sendLines([b"x"])
        self.assertTrue(source.paused)
        client.dataReceived(b"x\n" * (MAX_PENDING_LINES // 2))
        self.assertTrue(source.paused)
        client.dataReceived(b"x\n")
        self.assertFalse(source.paused)

    def test_fullSocketAndDueEchoesAreSeparateReasons(self) -> None:
        """Reading input stays paused while too many echoes are due even after the socket drains, and resumes once
        they are back."""
        client, transport, clock, out = connectedClient()
        source = FakeInput()
        client.readFrom(source)  # type: ignore[arg-type]
        transport.producer.pauseProducing()
        client.sendLines([b"y" * (MAX_PENDING_BYTES + 1)])
        transport.producer.resumeProducing()
        self.assertTrue(source.paused, "still too many bytes due")
        client.dataReceived(b"y" * (MAX_PENDING_BYTES + 1) + b"\n")
        self.assertFalse(source.paused)


class LineBufferTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=30))
    def test_sameLinesWhateverTheChunks(self, chunks: list[bytes]) -> None:
        """However the output is chunked, whole lines come out as they complete and the flush gives the rest, byte
        for byte."""
        buffer = LineBuffer()
        blocks = b"".join(buffer.feed(chunk) for chunk in chunks)
        whole = b"".join(chunks)
        self.assertEqual(blocks + buffer.flush(), whole)
        self.assertEqual(blocks, whole[: whole.rfind(b"\n") + 1])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(
        [b"", b"\n", b"a", b"ab", b"abc\n", b"abcdefgh", b"x\ny", b"\n\n", b"abcdefghij\nk"]), max_size=30),
        st.integers(min_value=0, max_value=12))
    def test_limitDropsOnlyOverlongLines(self, chunks: list[bytes], limit: int) -> None:
        """With a limit, whatever the chunks: at most ``limit`` bytes are held, every line within it
        comes out, and nothing comes out that was not a whole line of the stream."""
        buffer = LineBuffer()
        blocks = []
        for chunk in chunks:
            blocks.append(buffer.feed(chunk, limit))
            self.assertLessEqual(len(buffer.partial), limit)
        whole = b"".join(chunks)
        lines = whole[: whole.rfind(b"\n") + 1].split(b"\n")[:-1]
        out = b"".join(blocks).split(b"\n")[:-1]
        it = iter(out)
        pending = next(it, None)
        for line in lines:
            if pending is not None and line == pending:
                pending = next(it, None)
            else:
                self.assertGreater(len(line), limit, f"{line!r} was dropped")
        self.assertIsNone(pending, "a line came out that was not in the stream")


class EndlessLineTests(unittest.TestCase):
    def setUp(self) -> None:
        self.notices: list[str] = []
        self.printed = 0
        self.clock = Clock()
        self.client = EchoClient(self.count, self.clock, 5, self.notices.append)
        self.client.makeConnection(StringTransport())
        self.client.sendLines([b"hello"])
        self.client.endInput()

    def count(self, data: bytes) -> None:
        self.printed += len(data)

    def stream(self, mib: int) -> int:
        """Feed ``mib`` MiB of one line without a newline, a second's worth per MiB; the most held."""
        chunk = b"x" * (64 << 10)
        held = 0
        for _ in range(mib * 16):
            self.client.dataReceived(chunk)
            held = max(held, len(self.client._lines.partial))
            self.clock.advance(1 / 16)
        return held

    def test_endlessLineIsNotKept(self) -> None:
        """40 MiB of a line without a newline: all printed, at most 64 KiB held, one notice, then the timeout."""
        held = self.stream(4)
        self.assertNoResult(self.client.done)
        held = max(held, self.stream(36))
        self.assertLessEqual(held, MAX_UNMATCHED_LINE)
        self.assertEqual(self.printed, 40 << 20)
        self.assertEqual(len(self.notices), 1)
        self.assertIn("more than 65536 bytes", self.notices[0])
        self.failureResultOf(self.client.done, TimedOut)

    def test_echoAfterAnOverlongLineCounts(self) -> None:
        """Once the overlong line ends, the echo that follows is recognised (its tail is never taken for one)."""
        self.stream(1)
        self.client.dataReceived(b"hello\n")
        self.assertNoResult(self.client.done)
        self.client.dataReceived(b"hello\n")
        self.successResultOf(self.client.done)

    def test_longEchoIsStillKept(self) -> None:
        """An echo longer than 64 KiB, arriving in pieces, is held whole and recognised."""
        line = b"y" * (1 << 20)
        self.client.sendLines([line])
        self.client.dataReceived(b"hello\n")
        for i in range(0, len(line), 1000):
            self.client.dataReceived(line[i : i + 1000])
        self.client.dataReceived(b"\n")
        self.successResultOf(self.client.done)
        self.assertEqual(self.notices, [])

    def test_echoInTheSameReadAsAnOverlongLine(self) -> None:
        """An echo that arrives in the same read as an overlong finished line still counts."""
        self.client.dataReceived(b"z" * (2 * MAX_UNMATCHED_LINE) + b"\nhello\n")
        self.successResultOf(self.client.done)

    def test_longEchoInManyReadsCostsLinearTime(self) -> None:
        """A 32 MiB echo arriving in 64 KiB reads is matched in well under a second of CPU, not re-copied per read."""
        line = b"y" * (32 << 20)
        self.client.sendLines([line])
        self.client.dataReceived(b"hello\n")
        started = time.process_time()
        for i in range(0, len(line), 64 << 10):
            self.client.dataReceived(line[i : i + (64 << 10)])
        self.client.dataReceived(b"\n")
        spent = time.process_time() - started
        self.successResultOf(self.client.done)
        self.assertLess(spent, 1.0, "the unfinished line is copied again on every read")


HOSTILE = b"\x1b]0;title\x07\x1b[2J\r* fake notice\n\xe2\x80\xaeevil \\x41 caf\xc3\xa9\r\n"


class TerminalTextTests(unittest.TestCase):
    def test_controlsEscapedBackslashesKept(self) -> None:
        """A title change, a screen clear, a bare CR and a bidi override are escaped; a backslash is not doubled."""
        shown = TerminalText().feed(HOSTILE)
        self.assertEqual(shown, b"\\x1b]0;title\\x07\\x1b[2J\\x0d* fake notice\n\\u202eevil \\x41 caf\xc3\xa9\r\n")
        for unsafe in (b"\x1b", b"\x07", b"\r*", b"\xe2\x80\xae"):
            self.assertNotIn(unsafe, shown)

    def test_sameWhateverTheSplit(self) -> None:
        """Split at every byte, in two reads or one byte a read, the terminal shows the same (UTF-8 and CRLF kept)."""
        whole = TerminalText().feed(HOSTILE)
        for cut in range(len(HOSTILE) + 1):
            terminal = TerminalText()
            self.assertEqual(terminal.feed(HOSTILE[:cut]) + terminal.feed(HOSTILE[cut:]) + terminal.flush(), whole, cut)
        terminal = TerminalText()
        self.assertEqual(b"".join(terminal.feed(HOSTILE[i : i + 1]) for i in range(len(HOSTILE))), whole)

    def test_unfinishedCharacterAtTheEndIsShownEscaped(self) -> None:
        """A connection that ends inside a character or after a CR shows those bytes escaped, never raw."""
        terminal = TerminalText()
        self.assertEqual(terminal.feed(b"ok\xe2\x80"), b"ok")
        self.assertEqual(terminal.flush(), b"\\xe2\\x80")
        terminal = TerminalText()
        self.assertEqual(terminal.feed(b"ok\r") + terminal.flush(), b"ok\\x0d")


class QuitTests(unittest.TestCase):
    def test_quitThenCloseIsSuccess(self) -> None:
        """In a chat, /quit makes the server close the connection: that is how it should end."""
        client, transport, clock, out = connectedClient()
        client.sendLines([b"/quit"])
        client.dataReceived(b"/quit\n* bye\n")
        client.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(client.done)

    def test_closedWithoutQuitIsAnError(self) -> None:
        """A server that hangs up on its own (full, shutting down) is not success."""
        client, transport, clock, out = connectedClient()
        client.dataReceived(b"* server full (10 clients), try again later\n")
        client.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(client.done, ConnectionLostError)


class UDPEcho:
    """A UDP echo server in a thread that sends back at most ``limit`` bytes of each datagram."""

    def __init__(self, limit: int = 65535) -> None:
        self.limit = limit
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        deadline = time.monotonic() + 30
        while not self.stopped.is_set() and time.monotonic() < deadline:
            try:
                data, peer = self.socket.recvfrom(65535)
            except TimeoutError:
                continue
            self.socket.sendto(data[: self.limit], peer)

    def __enter__(self) -> int:
        self.thread.start()
        return int(self.socket.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.socket.close()


class CommandTests(unittest.TestCase):
    """``tcplab echo`` as a user runs it, against ``twistd -n tcplab-echo``."""

    def setUp(self) -> None:
        self.server = ServerProcess("tcplab-echo", "--port", "0", "--interface", "127.0.0.1", "--udp")
        self.addCleanup(self.server.stop)

    def test_messagesComeBack(self) -> None:
        """``tcplab echo hello wörld`` prints both lines back, exit 0, nothing on stderr."""
        result = runMain("echo", "--host", "127.0.0.1", "--port", str(self.server.port), "hello", "wörld")
        self.assertEqual((result.returncode, result.stdout), (0, "hello\nwörld\n".encode()))
        self.assertEqual(result.stderr, b"")

    def test_stdinLinesComeBack(self) -> None:
        """2000 lines piped on stdin, NUL and 0xff bytes included, come back byte for byte."""
        data = b"".join(b"line %d \x00\xff\n" % i for i in range(2000))
        result = runTcplab("echo", "--host", "127.0.0.1", "--port", str(self.server.port), input=data)
        self.assertEqual((result.returncode, result.stdout), (0, data))

    def test_firstContactIsLogged(self) -> None:
        """The server logs the client's connection and, at its end, how many bytes it echoed."""
        result = runMain("echo", "--host", "127.0.0.1", "--port", str(self.server.port), "hello")
        self.assertEqual(result.returncode, 0)
        log = self.server.stop()
        self.assertRegex(log, r"connection from 127\.0\.0\.1:\d+")
        self.assertRegex(log, r"127\.0\.0\.1:\d+ disconnected, 6 bytes echoed")

    def test_udp(self) -> None:
        """``tcplab echo --udp ping pong`` prints both datagrams' echoes, exit 0."""
        # A child process, as the UDP port may be bound a moment after the "starting on" line the test waits for.
        result = runTcplab("echo", "--udp", "--host", "127.0.0.1", "--port", str(self.server.port), "ping", "pong")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(result.stdout.splitlines()), [b"ping", b"pong"])

    def test_udpLinesFromStdin(self) -> None:
        """With --udp, each line read from stdin goes as one datagram and comes back."""
        result = runTcplab("echo", "--udp", "--host", "127.0.0.1", "--port", str(self.server.port),
                           input=b"one\ntwo\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(result.stdout.splitlines()), [b"one", b"two"])

    def test_udpTruncatedReplyExits9(self) -> None:
        """``echo --udp`` of 10000 bytes to a server that returns 8192 of them: exit 9 and one line."""
        with UDPEcho(limit=8192) as port:
            result = runMain("echo", "--udp", "--host", "127.0.0.1", "--port", str(port), "x" * 10000)
        self.assertEqual(result.returncode, ExitCode.VERIFY, result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertIn(b"truncated: 8192 of 10000 bytes", result.stderr)

    def test_udpLargestDatagram(self) -> None:
        """A 65507-byte message goes as one datagram and its whole echo is read; one byte more is exit 2."""
        with UDPEcho() as port:
            result = runMain("echo", "--udp", "--host", "127.0.0.1", "--port", str(port), "y" * 65507)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout, b"y" * 65507 + b"\n")
            result = runMain("echo", "--udp", "--host", "127.0.0.1", "--port", str(port), "y" * 65508)
        self.assertEqual(result.returncode, ExitCode.USAGE, result.stderr)
        self.assertIn(b"at most 65507 bytes", result.stderr)

    def test_udpRefused(self) -> None:
        """--udp to a port nobody listens on is exit 3 with "UDP echo refused", not a timeout."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = runMain("echo", "--udp", "--host", "127.0.0.1", "--port", str(port), "--timeout", "5", "hi")
        self.assertEqual(result.returncode, ExitCode.CONNECT, result.stderr)
        self.assertIn(b"UDP echo refused", result.stderr)

    def test_refused(self) -> None:
        """A TCP port nobody listens on is exit 3 with one line saying the connection was refused."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = runMain("echo", "--host", "127.0.0.1", "--port", str(port), "hi")
        self.assertEqual(result.returncode, ExitCode.CONNECT)
        self.assertEqual(result.stderr.count(b"\n"), 1)
        self.assertIn(b"refused", result.stderr)

    def test_unknownHost(self) -> None:
        """A host name that does not resolve is exit 3, "cannot resolve", and no traceback."""
        result = runMain("echo", "--host", "no-such-host.invalid", "hi")
        self.assertEqual(result.returncode, ExitCode.CONNECT)
        self.assertIn(b"cannot resolve", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)

    def test_timeout(self) -> None:
        """A server that accepts but never answers: exit TIMEOUT after --timeout."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]
            result = runMain("echo", "--host", "127.0.0.1", "--port", str(port), "--timeout", "0.5", "hi")
        self.assertEqual(result.returncode, ExitCode.TIMEOUT)
        self.assertIn(b"no echo for 0.5s", result.stderr)

    def test_stalledTLSHandshake(self) -> None:
        """``--tls`` to a server that never answers is a TLS failure: exit 3, one line naming the handshake."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]
            result = runMain("echo", "--tls", "--host", "127.0.0.1", "--port", str(port), "--timeout", "0.5", "hi")
        self.assertEqual(result.returncode, ExitCode.CONNECT, result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertIn(b"TLS handshake", result.stderr)

    def hostileServer(self) -> tuple[int, threading.Thread, socket.socket]:
        """A server that answers ``hi`` with terminal tricks before the echo, then hangs up."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(100)
                conn.sendall(HOSTILE + b"hi\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        return listener.getsockname()[1], thread, listener

    def test_terminalOutputIsEscaped(self) -> None:
        """On a terminal, what a server sends is shown escaped: no ESC, bare CR or bidi reaches it."""
        port, thread, _ = self.hostileServer()
        primary, secondary = pty.openpty()
        tty.setraw(secondary)  # so the terminal adds no CRs of its own
        self.addCleanup(os.close, primary)
        with os.fdopen(secondary, "wb") as terminal:
            result = subprocess.run([*TCPLAB, "echo", "--host", "127.0.0.1", "--port", str(port), "hi"],
                                    stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE,
                                    env=childEnv(), timeout=30)
        thread.join(5)
        shown = b""
        while select.select([primary], [], [], 0.5)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            shown += chunk
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(shown, TerminalText().feed(HOSTILE) + b"hi\n")

    def test_pipedOutputIsByteExact(self) -> None:
        """Into a pipe, what the server sends is passed on byte for byte, escapes and all."""
        port, thread, _ = self.hostileServer()
        result = runMain("echo", "--host", "127.0.0.1", "--port", str(port), "hi")
        thread.join(5)
        self.assertEqual((result.returncode, result.stdout), (0, HOSTILE + b"hi\n"))

    def test_connectionLost(self) -> None:
        """A server that accepts and hangs up at once: exit LOST."""
        with socket.socket() as rude:
            rude.bind(("127.0.0.1", 0))
            rude.listen()
            port = rude.getsockname()[1]
            def hangUp() -> None:
                conn, _ = rude.accept()
                conn.close()

            thread = threading.Thread(target=hangUp, daemon=True)
            thread.start()
            result = runMain("echo", "--host", "127.0.0.1", "--port", str(port), "hi")
            thread.join(5)
        self.assertEqual(result.returncode, ExitCode.LOST)
        self.assertIn(b"closed the connection", result.stderr)

    def test_interruptedIsNotSuccess(self) -> None:
        """Ctrl-C in the middle of a chat session exits 130, not 0."""
        process = subprocess.Popen(
            [*TCPLAB, "echo", "--host", "127.0.0.1", "--port", str(self.server.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=childEnv(),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
        )
        self.addCleanup(process.kill)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"hi\n")
        process.stdin.flush()
        self.assertEqual(process.stdout.readline(), b"hi\n")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
        _, err = process.communicate(timeout=10)
        self.assertEqual(process.returncode, ExitCode.INTERRUPTED)
        self.assertEqual(err, b"tcplab: interrupted\n")

    def test_usageErrors(self) -> None:
        """A bad option, a bad value, no command or an unknown one: exit 2 and one line each."""
        for argv in (["echo", "--port", "nope"], ["echo", "--bogus"], [], ["frobnicate"]):
            result = runMain(*argv)
            self.assertEqual(result.returncode, ExitCode.USAGE, argv)
            self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)

    def test_version(self) -> None:
        """``tcplab --version`` prints tcplab's version and exits 0."""
        result = runMain("--version")
        self.assertEqual(result.returncode, 0)
        self.assertTrue(result.stdout.startswith(b"tcplab "))
