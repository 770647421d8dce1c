"""The ``tcplab echo`` client: send lines, print what comes back, know when the echoes are in.

Works against tcplab-echo and, unchanged, tcplab-multi: lines the server sends
unasked (other clients' lines) are printed too, and only our own echoes count
toward "done".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.python.failure import Failure

from tcplab.errors import ConnectFailed, ConnectionLostError, TimedOut, tlsFailure

Output = Callable[[bytes], None]


class EchoClient(Protocol):
    """Sends lines, hands every received line to ``output``, and fires ``done``
    once input has ended and every line sent has come back."""

    def __init__(self, output: Output, clock: IReactorTime, timeout: float) -> None:
        self.output = output
        self.clock = clock
        self.timeout = timeout
        self.done: Deferred[None] = Deferred()
        self.pending: deque[bytes] = deque()
        self.inputEnded = False
        self.received = 0
        self._buffer = b""
        self._timer: IDelayedCall | None = None

    def sendLine(self, line: bytes) -> None:
        """Send ``line`` (without its newline) and expect it back."""
        self.pending.append(line)
        self.transport.write(line + b"\n")

    def sendLines(self, lines: Iterable[bytes]) -> None:
        lines = list(lines)
        self.pending.extend(lines)
        self.transport.write(b"".join(line + b"\n" for line in lines))

    def endInput(self) -> None:
        """No more lines will be sent: finish once the echoes still due are in."""
        self.inputEnded = True
        self._check()

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            self.received += 1
            self.output(line + b"\n")
            if self.pending and self.pending[0] == line:
                self.pending.popleft()
        self._check(progress=True)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancelTimer()
        if self._buffer:
            self.output(self._buffer)
            self._buffer = b""
        if not self.done.called:
            due = len(self.pending)
            if self.inputEnded and not due:
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
        due = len(self.pending)
        self.done.errback(TimedOut(f"no echo for {self.timeout:g}s with {due} line{'s' if due != 1 else ''} still due"))
        self.transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class InputLines(Protocol):
    """Feeds lines read from stdin (or any stream) to an EchoClient."""

    def __init__(self, client: EchoClient) -> None:
        self.client = client
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if lines:
            self.client.sendLines(lines)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._buffer:
            self.client.sendLine(self._buffer)
            self._buffer = b""
        self.client.endInput()


class UDPEchoClient(DatagramProtocol):
    """Sends each message as one datagram to a connected address and fires
    ``done`` once as many replies came back (UDP may reorder; each reply is printed)."""

    def __init__(self, messages: list[bytes], output: Output, clock: IReactorTime, timeout: float) -> None:
        self.messages = messages
        self.output = output
        self.clock = clock
        self.timeout = timeout
        self.done: Deferred[None] = Deferred()
        self.replies = 0
        self._timer: IDelayedCall | None = None

    def send(self) -> None:
        """Send every message; call once the transport is connected to the server."""
        for message in self.messages:
            self.transport.write(message)
        self._timer = self.clock.callLater(self.timeout, self._timedOut)
        if not self.messages:
            self._finish()

    def datagramReceived(self, datagram: bytes, addr: object) -> None:  # type: ignore[override]
        if self.done.called:
            return
        self.replies += 1
        self.output(datagram if datagram.endswith(b"\n") else datagram + b"\n")
        if self.replies >= len(self.messages):
            self._finish()

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
