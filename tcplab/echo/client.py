"""The ``tcplab echo`` client: send lines, print what comes back, know when the echoes are in.

Works against tcplab-echo and, unchanged, tcplab-multi: lines the server sends
unasked (other clients' lines) are printed too, and only our own echoes count
toward "done".
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IPushProducer,
    IReactorTime,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab.errors import (
    ConnectFailed,
    ConnectionLostError,
    TimedOut,
    VerificationFailed,
    handshakeTimedOut,
    tlsFailure,
)
from tcplab.escaping import showable
from tcplab.interfaces import StreamTransport

Output = Callable[[bytes], None]

#: Stop reading input while this many lines, or bytes, are sent but not yet echoed; start again
#: below half of that. A server that reads but does not echo cannot grow the client.
MAX_PENDING_LINES = 10_000
MAX_PENDING_BYTES = 16 << 20
#: The most of an unfinished line from the server that is kept to compare with the echoes due,
#: if no echo due is longer: tcplab-multi's own --max-line. Past it the line cannot be an echo.
MAX_UNMATCHED_LINE = 64 << 10


# Not LineOnlyReceiver: it re-copies a long unfinished echo each read and drops a read's lines after an overlong one.
class LineBuffer:
    """Splits a byte stream into lines, looking at each byte once (no rescans of a long
    unfinished line). With a ``limit``, an unfinished line that grows past it is dropped, and
    the rest of it up to its newline skipped (``overlong`` meanwhile): memory stays bounded."""

    def __init__(self) -> None:
        self.partial = bytearray()
        self.overlong = False

    def feed(self, data: bytes, limit: int | None = None) -> bytes:
        """The complete lines that ``data`` finishes, newlines included (b"" if none)."""
        if self.overlong:
            skip = data.find(b"\n")
            if skip < 0:
                return b""
            self.overlong = False
            data = data[skip + 1 :]
        end = data.rfind(b"\n")
        if end < 0:
            block = b""
            self.partial += data
        else:
            if self.partial:
                block = bytes(self.partial) + data[: end + 1]
                self.partial = bytearray()
            else:
                block = data[: end + 1]
            self.partial += data[end + 1 :]
        if limit is not None and len(self.partial) > limit:
            self.partial = bytearray()
            self.overlong = True
        return block

    def flush(self) -> bytes:
        """What is left of an unfinished line."""
        rest, self.partial = bytes(self.partial), bytearray()
        return rest


class TerminalText:
    """What a server sends, made safe to show on a terminal read by read: controls, escape
    sequences, CR, bidi and invisible characters are escaped (``showable``; backslashes stay,
    as the hub's lines are escaped already), CRLF line ends stay. A character or a CRLF split
    between two reads is held back (at most 3 bytes) until the next one."""

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        data = self.held + data
        cut = len(data) - _unfinished(data)
        data, self.held = data[:cut], data[cut:]
        return b"\r\n".join(map(showable, data.split(b"\r\n")))

    def flush(self) -> bytes:
        """What is held back, at the end of the connection."""
        rest, self.held = self.held, b""
        return showable(rest)


def _unfinished(data: bytes) -> int:
    """How many bytes at the end of ``data`` may be the start of a CRLF or a UTF-8 character."""
    if data.endswith(b"\r"):
        return 1
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if back < need else 0
    return 0


@implementer(IPushProducer)
class InputGate:
    """Pauses the input (stdin) while any reason holds: the socket's buffer is full, or too
    many echoes are due. The transport and the client each hold their own reason."""

    def __init__(self, source: IPushProducer) -> None:
        self.source = source
        self.reasons: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self.reasons:
            self.source.pauseProducing()
        self.reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.source.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("socket")

    def resumeProducing(self) -> None:
        self.release("socket")

    def stopProducing(self) -> None:
        self.source.stopProducing()


@implementer(IHandshakeListener)
class EchoClient(Protocol):
    """Sends lines, hands everything received to ``output`` (one call per read), and fires
    ``done`` once input has ended and every line sent has come back. Over TLS, a handshake
    that does not finish within ``timeout`` fails it too (in a chat, before any input ends)."""

    transport: StreamTransport

    def __init__(self, output: Output, clock: IReactorTime, timeout: float,
                 notice: Callable[[str], None] | None = None) -> None:
        self.output = output
        self.clock = clock
        self.timeout = timeout
        self.notice = notice
        self.noticed = False
        self.longestDue = 0
        self.done: Deferred[None] = Deferred()
        self.pending: deque[bytes] = deque()
        self.pendingBytes = 0
        self.inputEnded = False
        self.quitSent = False
        self.received = 0
        self.input: InputGate | None = None
        self._lines = LineBuffer()
        self._timer: IDelayedCall | None = None
        self.tls = False
        self.handshakeDone = False
        self._handshakeTimer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.tls = INegotiated.providedBy(self.transport)
        if self.tls:
            self._handshakeTimer = self.clock.callLater(self.timeout, self._handshakeTimedOut)

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        self._cancelHandshakeTimer()

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        if not self.done.called:
            self._cancelTimer()
            self.done.errback(handshakeTimedOut(self.timeout))
        self.transport.abortConnection()

    def _cancelHandshakeTimer(self) -> None:
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None

    def readFrom(self, source: IPushProducer) -> None:
        """Pace ``source`` (the producer feeding ``sendLines``): paused while the socket is
        full or too many echoes are due."""
        self.input = InputGate(source)
        self.transport.registerProducer(self.input, True)

    def sendLine(self, line: bytes) -> None:
        """Send ``line`` (without its newline) and expect it back."""
        self.sendLines([line])

    def sendLines(self, lines: Iterable[bytes]) -> None:
        lines = list(lines)
        self.pending.extend(lines)
        self.pendingBytes += sum(map(len, lines))
        self.longestDue = max(self.longestDue, max(map(len, lines), default=0))
        self.quitSent = self.quitSent or any(line.rstrip(b"\r") == b"/quit" for line in lines)
        self.transport.write(b"".join(line + b"\n" for line in lines))
        if self.input is not None and (len(self.pending) > MAX_PENDING_LINES or self.pendingBytes > MAX_PENDING_BYTES):
            self.input.hold("echoes due")

    def endInput(self) -> None:
        """No more lines will be sent: finish once the echoes still due are in."""
        self.inputEnded = True
        self._check()

    def dataReceived(self, data: bytes) -> None:
        """Print ``data``; count the echoes it completes. An unfinished line longer than any
        echo due (and than MAX_UNMATCHED_LINE) is printed but not kept, and its bytes are no
        progress: a server sending an endless line holds neither memory nor the client."""
        self.output(data)
        limit = max(self.longestDue, MAX_UNMATCHED_LINE)
        block = self._lines.feed(data, limit)
        if self._lines.overlong and not self.noticed:
            self.noticed = True
            if self.notice is not None:
                self.notice(f"the server is sending a line of more than {limit} bytes that is no echo: "
                            "printing it without keeping it")
        if block:
            lines = block[:-1].split(b"\n")
            self.received += len(lines)
            pending = self.pending
            for line in lines:
                if pending and pending[0] == line:
                    self.pendingBytes -= len(pending.popleft())
            if not pending:
                self.longestDue = 0
            if (self.input is not None and len(pending) <= MAX_PENDING_LINES // 2
                    and self.pendingBytes <= MAX_PENDING_BYTES // 2):
                self.input.release("echoes due")
        self._check(progress=bool(block) or not self._lines.overlong)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        self._cancelHandshakeTimer()
        if not self.done.called:
            due = len(self.pending)
            if not due and (self.inputEnded or (self.quitSent and reason is not None and reason.check(ConnectionDone))):
                self.done.callback(None)
            elif (tls := tlsFailure(reason)) is not None:
                self.done.errback(tls)
            else:
                what = f"{due} echo{'es' if due != 1 else ''} still due" if due else "before input ended"
                self.done.errback(ConnectionLostError(f"the server closed the connection ({what})"))

    def _check(self, progress: bool = False) -> None:
        if self.done.called or not self.inputEnded:
            return
        if not self.pending:
            self._cancelTimer()
            self.done.callback(None)
            self.transport.loseConnection()
        elif self._timer is None or progress:
            self._cancelTimer()
            self._timer = self.clock.callLater(self.timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        if self.tls and not self.handshakeDone:
            self._cancelHandshakeTimer()
            self.done.errback(handshakeTimedOut(self.timeout))
            self.transport.abortConnection()
            return
        due = len(self.pending)
        self.done.errback(TimedOut(f"no echo for {self.timeout:g}s with {due} line{'s' if due != 1 else ''} still due"))
        self.transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class InputLines(Protocol):
    """Feeds lines read from stdin (or any stream) to an EchoClient; an unfinished last line
    is sent with a newline at the end of input."""

    def __init__(self, client: EchoClient) -> None:
        self.client = client
        self._lines = LineBuffer()

    def dataReceived(self, data: bytes) -> None:
        block = self._lines.feed(data)
        if block:
            self.client.sendLines(block[:-1].split(b"\n"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        rest = self._lines.flush()
        if rest:
            self.client.sendLine(rest)
        self.client.endInput()


class UDPEchoClient(DatagramProtocol):
    """Sends each message as one datagram to a connected address and fires ``done`` once
    each has come back, byte for byte (UDP may reorder and duplicate: order is free, a
    duplicate is ignored). A reply that is not one of the messages due, e.g. one cut short
    by a server's receive buffer, fails ``done`` with VerificationFailed."""

    transport: IUDPTransport

    def __init__(self, messages: list[bytes], output: Output, clock: IReactorTime, timeout: float) -> None:
        self.messages = messages
        self.output = output
        self.clock = clock
        self.timeout = timeout
        self.done: Deferred[None] = Deferred()
        self.replies = 0
        self.due = Counter(messages)
        self._timer: IDelayedCall | None = None

    def send(self) -> None:
        """Send every message; call once the transport is connected to the server."""
        for message in self.messages:
            # Connected, the port writes to its one address: IUDPTransport has no such write.
            self.transport.write(message)  # type: ignore[call-arg]
        self._timer = self.clock.callLater(self.timeout, self._timedOut)
        if not self.messages:
            self._finish()

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        if self.done.called:
            return
        if self.due[datagram] <= 0:
            if datagram not in self.due:
                self._stop()
                self.done.errback(self._mismatch(datagram))
            return  # a duplicate of one already answered
        self.due[datagram] -= 1
        self.replies += 1
        self.output(datagram if datagram.endswith(b"\n") else datagram + b"\n")
        if self.replies >= len(self.messages):
            self._finish()

    def _mismatch(self, reply: bytes) -> VerificationFailed:
        for message, count in self.due.items():
            if count > 0 and len(reply) < len(message) and message.startswith(reply):
                return VerificationFailed(f"a UDP reply came back truncated: {len(reply)} of {len(message)} bytes "
                                          "(does the server read datagrams that large?)")
        return VerificationFailed(f"a UDP reply of {len(reply)} bytes is not any message sent: "
                                  "the server changed it (is it an echo server?)")

    def doStop(self) -> None:
        """Twisted's epoll reactor drops a connected UDP port on ICMP port-unreachable
        instead of calling ``connectionRefused``: the same thing for us."""
        super().doStop()
        if not self.done.called:
            self.connectionRefused()

    def connectionRefused(self) -> None:
        if not self.done.called:
            self._stop()
            self.done.errback(ConnectFailed("UDP echo refused (port unreachable): is the server running with --udp?"))

    def _finish(self) -> None:
        self._stop()
        self.done.callback(None)

    def _timedOut(self) -> None:
        self._timer = None
        missing = len(self.messages) - self.replies
        self._stop()
        self.done.errback(TimedOut(f"no UDP reply for {self.timeout:g}s with {missing} datagram(s) unanswered"))

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
