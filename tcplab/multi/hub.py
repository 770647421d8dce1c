"""The tcplab-multi hub: every line back to its sender exactly, and to every other client with a prefix.

Fan-out is built to never wait for the slowest client. Each client has a
:class:`~tcplab.multi.sendqueue.SendQueue`: a client whose queue would pass the
limit with another client's line is told and dropped, and the others go on.
A client's own echoes never get it dropped: while the server cannot send to a
client, it stops reading from it (as tcplab-echo does), so its echoes wait in
its socket, not in the server. The wire format is in :mod:`tcplab.multi.wire`.

With a backplane (:mod:`tcplab.multi.backplane`), several hubs are one room: what a
hub's clients produce is also handed to the backplane, once, already escaped,
and what other hubs' clients produce comes back through :meth:`MultiHub.deliverRemote`
into the same send queues; names, counts and ``/who`` cover every hub.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab.escaping import escapeLine, escapeText
from tcplab.flow import WriteTurns, plainSocket, writeNow
from tcplab.interfaces import StreamTransport, globalReactor
from tcplab.multi.backplane import STATS_FORMAT, Backplane
from tcplab.multi.sendqueue import SendQueue
from tcplab.multi.wire import HELP, isValidNick, parseCommand, prefixFor, serverLine
from tcplab.peers import describeAddress
from tcplab.ratelimit import RateLimitedLog
from tcplab.usagelog import UsageLog

log = Logger(namespace="tcplab.multi.hub")

#: Names listed by one /who reply; more are counted, not listed.
WHO_LIMIT = 100

#: Log lines about single clients (joins, leaves, drops) per second, and in a burst: a storm of
#: connections must not become a storm of log writes. The stats line counts the ones left out.
CLIENT_LOG_RATE = 20.0
CLIENT_LOG_BURST = 200.0


@dataclass(frozen=True)
class HubConfig:
    """The hub's limits (``0`` turns off ``maxClients`` and ``idleTimeout``)."""

    sendQueue: int = 1 << 20
    maxClients: int = 0
    maxLine: int = 1 << 16
    idleTimeout: float = 0.0
    noticeLimit: int = 100
    closeGrace: float = 5.0


@dataclass
class HubStats:
    """Counters since the hub started, for the periodic stats line."""

    accepted: int = 0
    joined: int = 0
    lines: int = 0
    bytesIn: int = 0
    bytesOut: int = 0
    slow: int = 0
    idle: int = 0
    tooLong: int = 0
    refused: int = 0
    unlogged: int = 0


class Leaving(enum.Enum):
    """Why a client goes: the reason others are told, and whether what it is owed is still sent."""

    CLOSED = ("", True)
    QUIT = ("quit", True)
    IDLE = ("idle", True)
    LINE_TOO_LONG = ("line too long", True)
    TOO_SLOW = ("too slow", False)
    SHUTDOWN = ("server shutting down", True)

    def __init__(self, reason: str, flush: bool) -> None:
        self.reason = reason
        self.flush = flush


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class HubClient(Protocol, TimeoutMixin):
    """One connected client: splits its bytes into lines (never holding more than
    ``maxLine`` of an unfinished one), runs its commands, and echoes and broadcasts
    each read's lines as one write per recipient.

    A client joins the room once it can be spoken to: at once over TCP or a unix
    socket, after its handshake over TLS (a connection that never completes one
    is never announced). At the end of its input (a half-close, ``nc -N``) its
    last line, even unterminated, is delivered, and it leaves once everything it
    is owed has been sent.
    """

    factory: MultiHub
    transport: StreamTransport

    def __init__(self) -> None:
        self.peer = "?"
        self.address: object = None
        self.name = ""
        self.prefix = b""
        self.queue: SendQueue | None = None
        self.member = False
        self.closing = False
        self._partial = bytearray()
        self._readingPaused = False
        self._handshaking = False
        self._abort: IDelayedCall | None = None
        self.started = 0.0
        self.received = 0
        self.leaving: Leaving | None = None

    # -- connection lifecycle

    def connectionMade(self) -> None:
        hub = self.factory
        self.callLater = hub.clock.callLater  # type: ignore[method-assign, assignment]
        self.address = self.transport.getPeer()
        self.peer = describeAddress(self.address)
        self.started = hub.clock.seconds()
        hub.stats.accepted += 1
        hub.connections += 1
        self._handshaking = ISSLTransport.providedBy(self.transport)
        if self._handshaking:
            hub.handshaking[self] = None
            if hub.config.idleTimeout:
                self.setTimeout(hub.config.idleTimeout)
        else:
            self._admit()

    def _admit(self) -> None:
        """Give the client its seat (and tell the room), or its refusal."""
        hub = self.factory
        refusal = hub.refusal()
        if refusal is not None:
            self.closing = True
            self.transport.write(refusal)
            self.transport.loseConnection()
            self._abort = hub.clock.callLater(hub.config.closeGrace, self.transport.abortConnection)
            return
        self.queue = SendQueue(hub.writeTurns.writesFor(self.transport), hub.config.sendQueue, self.pauseReading,
                               self.resumeReading)
        self.transport.registerProducer(self.queue, True)
        hub.join(self)
        if hub.config.idleTimeout:
            self.setTimeout(hub.config.idleTimeout)

    def readConnectionLost(self) -> None:
        """The client is done sending (``shutdown(SHUT_WR)``, ``nc -N``): deliver its last line even
        without a line end, then send everything it is owed and close."""
        if self.closing:
            return
        self._endOfInput()
        self.close(Leaving.CLOSED, atEnd=True)

    def writeConnectionLost(self) -> None:
        """The client stopped reading; what it sends still counts until it closes."""

    def _endOfInput(self, echo: bool = True) -> None:
        if self._partial and self.member:
            tail, self._partial = bytes(self._partial), bytearray()
            self._lines(tail, final=True, echo=echo)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        hub = self.factory
        self.setTimeout(None)
        hub.handshaking.pop(self, None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        if not self.closing:
            if reason is not None and reason.check(ConnectionDone):
                # A clean close with no half-close first (TLS cannot half-close): the others still get it.
                self._endOfInput(echo=False)
        if not self.closing:
            self.closing = True
            hub.leave(self, Leaving.CLOSED)
        if self.queue is not None:
            hub.stats.bytesOut += self.queue.written
            self.queue.clear()
        if hub.usage is not None:
            hub.recordUsage(self)
        hub.connectionGone()

    def setName(self, name: str) -> None:
        self.name = name
        self.prefix = prefixFor(name)

    @property
    def described(self) -> str:
        """The client for a log line: its name, and its address if that is not the name."""
        return self.name if self.name in (self.peer, "") else f"{self.name} ({self.peer})"

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self.closing or not self.member:
            return
        self.resetTimeout()
        hub = self.factory
        hub.stats.bytesIn += len(data)
        self.received += len(data)
        if b"\n" not in data:
            self._partial += data
            if _overLong(self._partial, hub.config.maxLine):
                self._lineTooLong()
            return
        if self._partial:
            self._partial += data
            data = bytes(self._partial)
            self._partial = bytearray()
        self._lines(data)

    def _lines(self, data: bytes, final: bool = False, echo: bool = True) -> None:
        """Echo, run and broadcast the lines of ``data``; its unterminated tail is kept for the next read,
        or, at the end of input (``final``), is the last line (a ``\\r`` ending it counts as its line end).
        Without ``echo`` (the connection is gone) only the others are given what they are owed."""
        hub = self.factory
        maxLine = hub.config.maxLine
        lines = data.split(b"\n")
        tail = lines.pop()
        if final and tail:
            lines.append(tail)
            tail = b""
        own: list[bytes] = []
        others: list[bytes] = []
        start = pos = done = 0
        leaving: Leaving | None = None
        for line in lines:
            end = pos + len(line) + 1
            text = line[:-1] if line[-1:] == b"\r" else line
            if len(text) > maxLine:
                leaving = Leaving.LINE_TOO_LONG
                break
            if text[:1] != b"/":
                others += (self.prefix, escapeLine(text), b"\n")
            elif text[:2] == b"//":
                others += (self.prefix, escapeLine(text[1:]), b"\n")
            else:
                own.append(data[start:end])
                start = end
                leaving = self._command(text, own, others)
            pos = end
            done += 1
            if leaving is not None:
                break
        hub.stats.lines += done
        if pos > start:
            own.append(data[start:pos])
        if own and echo:
            self.send(b"".join(own))
        if others:
            hub.broadcast(b"".join(others), self)
        if leaving is Leaving.LINE_TOO_LONG or (leaving is None and _overLong(tail, maxLine)):
            self._lineTooLong()
        elif leaving is not None:
            self.close(leaving, serverLine("bye"))
        elif tail:
            self._partial = bytearray(tail)

    def _command(self, text: bytes, own: list[bytes], others: list[bytes]) -> Leaving | None:
        """Run one command: replies go to ``own``, what the others should see to ``others``."""
        hub = self.factory
        command = parseCommand(text)
        assert command is not None
        if command.name == "nick":
            reply, notice = hub.rename(self, command.argument)
            own.append(reply)
            if notice:
                others.append(notice)
        elif command.name == "who":
            own.append(hub.who())
        elif command.name == "help":
            own.append(serverLine(HELP))
        elif command.name == "quit":
            return Leaving.QUIT
        else:
            name = escapeText(command.name)
            own.append(serverLine(f"error: unknown command /{name} (/help lists the commands)"))
        return None

    def _lineTooLong(self) -> None:
        hub = self.factory
        hub.stats.tooLong += 1
        limit = hub.config.maxLine
        hub.logClient("{client} sent a line over {limit} bytes: disconnected", client=self.described, limit=limit)
        self.close(Leaving.LINE_TOO_LONG, serverLine(f"line too long: the limit is {limit} bytes (--max-line); "
                                                     "disconnecting"))

    def timeoutConnection(self) -> None:
        hub = self.factory
        hub.stats.idle += 1
        seconds = hub.config.idleTimeout
        hub.logClient("{client} idle for {seconds:g}s: disconnected", client=self.described, seconds=seconds)
        self.close(Leaving.IDLE, serverLine(f"idle for {seconds:g}s (--idle-timeout): disconnecting"))

    # -- backpressure: while we cannot send to this client, we do not read from it

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        self.factory.handshaking.pop(self, None)
        if self.closing:
            return
        if self.queue is None:
            self._admit()
        elif self.queue.paused:
            self.pauseReading()

    def pauseReading(self) -> None:
        """Until its handshake is done, TLS holds back what we write (pausing our queue): reading must go
        on meanwhile, or the handshake never completes."""
        if self.closing or self._readingPaused or self._handshaking:
            return
        self._readingPaused = True
        self.transport.pauseProducing()
        self.setTimeout(None)

    def resumeReading(self) -> None:
        if self.closing or not self._readingPaused:
            return
        self._readingPaused = False
        self.transport.resumeProducing()
        if self.factory.config.idleTimeout:
            self.setTimeout(self.factory.config.idleTimeout)

    # -- writing

    def send(self, data: bytes) -> None:
        """Our own echo, replies and server notices: never dropped."""
        if not self.closing and self.queue is not None:
            self.queue.put(data)

    def deliver(self, data: bytes) -> None:
        """Another client's lines: dropped, with us, if we are too far behind."""
        if self.closing or self.queue is None:
            return
        if not self.queue.offer(data):
            self._tooSlow()

    def _tooSlow(self) -> None:
        hub = self.factory
        hub.stats.slow += 1
        assert self.queue is not None
        limit = self.queue.limit
        hub.logClient("{client} fell {queued} bytes behind: disconnected (--send-queue {limit})",
                      client=self.described, queued=self.queue.queued, limit=limit)
        self.close(Leaving.TOO_SLOW, serverLine(f"too slow: over {limit} bytes waiting for you (--send-queue); "
                                                "disconnecting"))

    def close(self, leaving: Leaving, line: bytes | None = None, atEnd: bool = False) -> None:
        """Leave the hub now, send ``line`` (best effort) and disconnect, forcibly after the grace period.

        For a client dropped as too slow, what was queued for it is thrown away
        at once; otherwise it goes out before ``line``. At the end of the client's
        input (``atEnd``: nothing is left unread), over a plain socket, once every byte
        it is owed is in the kernel (which sends it before the FIN) the connection is
        closed at once, as Twisted would a turn later, and no grace timer is needed.
        """
        if self.closing:
            return
        hub = self.factory
        self.closing = True
        self.setTimeout(None)
        self._partial = bytearray()
        hub.leave(self, leaving)
        transport = self.transport
        owed: list[bytes] = []
        if self.queue is not None:
            take = getattr(self.queue.transport, "take", None)
            if take is not None:
                owed.append(take())  # what this turn gave the queue goes out before what is written directly
            pending = self.queue.takeAll() if leaving.flush else []
            self.queue.clear()
            transport.unregisterProducer()
            for chunk in pending:
                self.queue.written += len(chunk)
            owed += pending
        if line:
            owed.append(line)
        sock = plainSocket(transport)
        data = b"".join(owed)
        if data:
            if sock is not None and not transport.disconnecting:  # type: ignore[attr-defined]
                writeNow(transport, sock, data)
            else:
                transport.write(data)
        if atEnd and sock is not None and not transport.dataBuffer and not transport._tempDataLen:  # type: ignore[attr-defined]
            transport.connectionLost(_CLOSED)  # type: ignore[attr-defined]
            return
        transport.loseConnection()
        self._abort = hub.clock.callLater(hub.config.closeGrace, transport.abortConnection)


#: The reason a connection closed at the end of its input is given, made once (as Twisted makes its own).
_CLOSED = Failure(ConnectionDone())


def _ignoreTimeout(failure: Failure) -> None:
    failure.trap(DeferredTimeout, CancelledError)


def _overLong(partial: bytes | bytearray, maxLine: int) -> bool:
    """True if an unfinished line is already longer than allowed (a final ``\\r`` may still be a line end)."""
    size = len(partial)
    return size > maxLine and not (size == maxLine + 1 and partial[-1:] == b"\r")


if TYPE_CHECKING:  # Factory is generic for the type checker in recent Twisted, not at run time in 23.10
    _HubFactoryBase = Factory[HubClient]
else:
    _HubFactoryBase = Factory


class MultiHub(_HubFactoryBase):
    """Who is connected, under which unique name, and the broadcast between them."""

    protocol = HubClient
    noisy = False

    def __init__(
        self, config: HubConfig | None = None, clock: IReactorTime | None = None, backplane: Backplane | None = None
    ) -> None:
        self.config = config or HubConfig()
        self.backplane = backplane
        if backplane is not None:
            backplane.attach(self)
        self.clock: IReactorTime = globalReactor() if clock is None else clock
        self.stats = HubStats()
        self.connections = 0
        self.stopping = False
        self.members: dict[HubClient, None] = {}
        #: TLS connections whose handshake is not done: not members yet, never announced.
        self.handshaking: dict[HubClient, None] = {}
        self.names: dict[str, HubClient] = {}
        self._serial = 0
        self._broadcasting = False
        self._later: deque[tuple[bytes, HubClient | None]] = deque()
        self._whenEmpty: list[Deferred[None]] = []
        self._clientLog = RateLimitedLog(log, LogLevel.info, CLIENT_LOG_RATE, CLIENT_LOG_BURST, self.clock.seconds)
        #: ``--usage-log``: one record per finished connection.
        self.usage: UsageLog | None = None
        self.writeTurns = WriteTurns(self.clock)

    def logClient(self, format: str, **fields: object) -> None:
        """Log one client's event, unless such lines are coming too fast (then only count it)."""
        if not self._clientLog(format, **fields):
            self.stats.unlogged += 1

    # -- joining and leaving

    def refusal(self) -> bytes | None:
        """The line a new connection gets instead of a seat, if it cannot have one."""
        if self.stopping:
            return serverLine("server shutting down")
        limit = self.config.maxClients
        if limit and len(self.members) >= limit:
            self.stats.refused += 1
            self.logClient("refused a connection: server full ({limit} clients)", limit=limit)
            return serverLine(f"server full ({limit} clients), try again later")
        return None

    def join(self, client: HubClient) -> None:
        name = self._defaultName(client)
        client.setName(name)
        client.member = True
        self.members[client] = None
        self.names[name.lower()] = client
        self.stats.joined += 1
        count = self.population()
        self.logClient("{client} joined ({count} connected)", client=client.described, count=count)
        client.send(serverLine(f"welcome, you are {name} ({count} connected; /help lists the commands)"))
        notice = serverLine(f"{name} joined") if count <= self.config.noticeLimit else b""
        if self.backplane is not None:
            self.backplane.joined(name, notice)
        if notice:
            self.fanOut(notice, client)

    def leave(self, client: HubClient, leaving: Leaving) -> None:
        if not client.member:
            return
        client.member = False
        client.leaving = leaving
        count = self.population()
        del self.members[client]
        if self.names.get(client.name.lower()) is client:
            del self.names[client.name.lower()]
        reason = f" ({leaving.reason})" if leaving.reason else ""
        self.logClient("{client} left{reason} ({count} connected)", client=client.described, reason=reason,
                       count=count - 1)
        notice = serverLine(f"{client.name} left{reason}") if count <= self.config.noticeLimit else b""
        if self.backplane is not None:
            self.backplane.left(client.name, notice)
        if notice and not self.stopping:
            self.fanOut(notice, None)

    def _defaultName(self, client: HubClient) -> str:
        """``host:port`` for a TCP client; otherwise, or if that is taken, something unique with ``#N``."""
        self._serial += 1
        address = client.address
        if isinstance(address, (IPv4Address, IPv6Address)):
            name = client.peer
        else:
            name = f"{'unix' if isinstance(address, UNIXAddress) else 'client'}#{self._serial}"
        if self.isTaken(name):
            name = f"{name}#{self._serial}"
        return name

    def isTaken(self, name: str) -> bool:
        """True if a client here or on another hub of the backplane has ``name`` (ignoring case)."""
        return name.lower() in self.names or (self.backplane is not None and self.backplane.isTaken(name))

    def rename(self, client: HubClient, argument: bytes) -> tuple[bytes, bytes | None]:
        """``/nick``: the reply for ``client``, and the notice for the others if the name changed."""
        if not argument:
            return serverLine("error: give a name: /nick NAME"), None
        name = argument.decode("utf-8", "replace")
        if not isValidNick(name):
            return serverLine(f'error: "{escapeText(name)}" is not a valid name: use 1-32 letters, '
                              "digits, _ - or ."), None
        holder = self.names.get(name.lower())
        if (holder is not None and holder is not client) or (
            holder is None and self.backplane is not None and self.backplane.isTaken(name)
        ):
            return serverLine(f"error: the name {name} is taken, choose another"), None
        old = client.name
        if name == old:
            return serverLine(f"you are already {name}"), None
        del self.names[old.lower()]
        self.names[name.lower()] = client
        client.setName(name)
        if self.backplane is not None:
            self.backplane.renamed(old, name)
        self.logClient("{old} is now {name} ({peer})", old=old, name=name, peer=client.peer)
        return serverLine(f"you are now {name}"), serverLine(f"{old} is now {name}")

    def population(self) -> int:
        """Clients here and, with a backplane, on the other hubs."""
        remote = self.backplane.remoteCount() if self.backplane is not None else 0
        return len(self.members) + remote

    def localNames(self) -> Iterator[str]:
        return (c.name for c in self.members)

    def who(self) -> bytes:
        """This hub's clients in join order, then those of the other hubs."""
        count = self.population()
        everyone = chain(self.localNames(), self.backplane.remoteNames() if self.backplane is not None else ())
        names = ", ".join(islice(everyone, WHO_LIMIT))
        more = f", and {count - WHO_LIMIT} more" if count > WHO_LIMIT else ""
        return serverLine(f"{count} connected: {names}{more}")

    # -- broadcast

    def broadcast(self, data: bytes, sender: HubClient) -> None:
        """A client's lines (and the notices its commands caused): to the other hubs, and to every member here
        but ``sender``."""
        if self.backplane is not None:
            self.backplane.publish(data, sender.name)
        self.fanOut(data, sender)

    def deliverRemote(self, data: bytes) -> None:
        """Lines from another hub's clients, for every member here."""
        self.fanOut(data, None)

    def fanOut(self, data: bytes, sender: HubClient | None) -> None:
        """Give ``data`` (whole lines) to every member but ``sender``.

        A broadcast started while one is running (a client dropped as too slow
        is announced as gone) waits until that one is done, so each broadcast
        reaches members in one pass, in order.
        """
        self._later.append((data, sender))
        if self._broadcasting:
            return
        self._broadcasting = True
        try:
            while self._later:
                data, sender = self._later.popleft()
                size = len(data)
                for client in list(self.members):
                    # deliver() and SendQueue.offer(), inlined for a queue that is not paused: a storm makes
                    # this the hub's innermost loop. A member always has a queue; one dropped earlier in this
                    # pass is no member any more.
                    if client is sender or not client.member:
                        continue
                    queue = client.queue
                    if not queue.paused:  # type: ignore[union-attr]
                        queue.written += size  # type: ignore[union-attr]
                        queue.transport.write(data)  # type: ignore[union-attr]
                    elif not queue.offer(data):  # type: ignore[union-attr]
                        client._tooSlow()
        finally:
            self._broadcasting = False
            self._later.clear()

    # -- stopping, and the numbers

    def connectionGone(self) -> None:
        self.connections -= 1
        if self.connections <= 0:
            waiting, self._whenEmpty = self._whenEmpty, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def shutdown(self) -> Deferred[None]:
        """Tell every client the server is going down and close; fires once all are gone (at most
        a little after ``closeGrace``, when the last stuck ones are aborted)."""
        self.stopping = True
        for client in list(self.members):
            client.close(Leaving.SHUTDOWN, serverLine("server shutting down"))
        for client in list(self.handshaking):
            client.transport.abortConnection()
        if self.connections <= 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._whenEmpty.append(d)
        d.addTimeout(self.config.closeGrace + 1, self.clock)
        d.addErrback(_ignoreTimeout)
        return d

    def recordUsage(self, client: HubClient) -> None:
        leaving = client.leaving
        if leaving is not None:
            outcome, reason = leaving.name.lower(), leaving.reason or "closed by the client"
        elif client.closing:
            outcome, reason = "refused", "server shutting down" if self.stopping else "server full (--max-clients)"
        else:
            outcome, reason = "closed", "closed before the TLS handshake completed"
        written = client.queue.written if client.queue is not None else 0
        assert self.usage is not None
        self.usage.connection(client.started, client.peer, client.received, written, outcome, reason,
                              name=client.name or None)

    def sendQueueBytes(self) -> int:
        """Bytes waiting in every client's send queue, for --metrics."""
        return sum(c.queue.queued for c in self.members if c.queue is not None)

    def statsFields(self) -> dict[str, int]:
        s = self.stats
        bytesOut = s.bytesOut + sum(c.queue.written for c in self.members if c.queue is not None)
        return {
            "clients": len(self.members), "joined": s.joined, "lines": s.lines, "bytesIn": s.bytesIn,
            "bytesOut": bytesOut, "slow": s.slow, "idle": s.idle, "tooLong": s.tooLong, "refused": s.refused,
            "unlogged": s.unlogged, "accepted": s.accepted,
        }

    def logStats(self) -> None:
        log.info(
            "stats: {clients} clients now ({joined} so far), {lines} lines and {bytesIn} bytes in, {bytesOut} bytes "
            "out; cut loose: {slow} too slow, {idle} idle, {tooLong} over --max-line; {refused} refused as full; "
            "{unlogged} client events not logged (too many at once)",
            **self.statsFields(),
        )
        if self.backplane is not None:
            log.info(STATS_FORMAT, **self.backplane.statsFields())

