"""The tcplab-file server protocol: a state machine from request line to reply.

Framing is Twisted's ``LineReceiver``: request and trailer lines in line mode (their length
limits are ``MAX_LENGTH``), the body in raw mode, written to the store as it is read. Each
connection moves through the named states of ``State``, every change through
``FileReceiver._enter`` (diagram: docs/ARCHITECTURE.md, "The file receiver")::

    HEADER --PUT--> PREPARING --> BODY --> [TRAILER] --> COMMITTING --OK--> HEADER
    HEADER --STAT-> PREPARING --HAVE--> HEADER
    any state --error--> CLOSING (ERR sent; input read and dropped until the peer leaves)
    any state --connection gone--> LOST (a store answer still due only tidies up)

PREPARING and COMMITTING wait for the store, which works off the reactor thread (opening a
resumed file, fsync and rename): if its answer does not come at once, reading from the peer
is paused (``pauseProducing``) and bytes that already arrived wait in LineReceiver's buffer.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab.escaping import escapeName
from tcplab.file.names import checkPath, storedParts
from tcplab.file.observe import FileCounters
from tcplab.file.store import FileStore, HeldPrefix, StorageError, Upload
from tcplab.file.wire import (
    EMPTY_SHA256,
    MAX_HEADER,
    MAX_TRAILER,
    Clash,
    ErrorCode,
    Put,
    Stat,
    WireError,
    formatErr,
    formatHave,
    formatOk,
    parseRequest,
    parseTrailer,
)
from tcplab.interfaces import StreamTransport, globalReactor
from tcplab.peers import describeAddress
from tcplab.ratelimit import RateLimitedLog

T = TypeVar("T")

log = Logger(namespace="tcplab.file.receiver")

#: How long a connection that got an ERR may keep sending before it is cut off.
LINGER_SECONDS = 5.0
#: The same for a connection turned away by --max-connections/--max-per-peer: it has sent
#: at most a request line and a little body, and a flood of them must not hold descriptors.
TURN_AWAY_LINGER = 1.0
#: At most this many turned-away connections wait to be closed; past it, one is closed as soon
#: as its ERR is written, so a flood from one address cannot use up the server's descriptors.
MAX_TURNING_AWAY = 32
#: Read this much per ``recv``: fewer, larger reads for big bodies (Twisted's default is 64 KiB).
READ_SIZE = 1 << 20
#: Warnings (ERR replies, turned-away connections) logged per second, and in a burst: a flood of
#: bad requests must not become a flood of log writes. The rest are counted, and the count logged.
WARN_LOG_RATE = 20.0
WARN_LOG_BURST = 100.0


def peerKey(address: object) -> str | None:
    """What --max-per-peer counts by: the IPv4 address, or the /64 of an IPv6 address (one
    host usually has a whole /64 to pick addresses from); None for Unix sockets (all local)."""
    if isinstance(address, IPv6Address):
        host = address.host.split("%", 1)[0]
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    if isinstance(address, IPv4Address):
        return address.host
    return None


class State(Enum):
    HEADER = "header"  # reading a request line (under --header-timeout)
    PREPARING = "preparing"  # opening the target file, or hashing a kept prefix (see _await)
    BODY = "body"  # hashing and writing the body (under --idle-timeout)
    TRAILER = "trailer"  # reading the SHA256 line after the body (still under --idle-timeout)
    COMMITTING = "committing"  # fsync, link into place, fsync the folder (see _await)
    CLOSING = "closing"  # an ERR was sent; input is read and dropped until the peer goes
    LOST = "lost"  # the connection is gone; a store answer still due only tidies up


#: Every move FileReceiver._enter allows (anything else is a bug, caught by the tests and the
#: fuzzer). HEADER -> HEADER is the start, on connectionMade; PREPARING goes straight on to
#: TRAILER or COMMITTING for an empty body.
_NEXT: dict[State, frozenset[State]] = {
    State.HEADER: frozenset({State.HEADER, State.PREPARING, State.CLOSING, State.LOST}),
    State.PREPARING: frozenset({State.HEADER, State.BODY, State.TRAILER, State.COMMITTING, State.CLOSING,
                                State.LOST}),
    State.BODY: frozenset({State.TRAILER, State.COMMITTING, State.CLOSING, State.LOST}),
    State.TRAILER: frozenset({State.COMMITTING, State.CLOSING, State.LOST}),
    State.COMMITTING: frozenset({State.HEADER, State.CLOSING, State.LOST}),
    State.CLOSING: frozenset({State.LOST}),
    State.LOST: frozenset(),
}
#: Waiting for the store: reads pause, end of input waits until the answer.
_WAITING = frozenset({State.PREPARING, State.COMMITTING})
_READING = frozenset({State.HEADER, State.BODY, State.TRAILER})


if TYPE_CHECKING:  # Factory is generic for the type checker in recent Twisted, not at run time in 23.10
    _ReceiverFactoryBase = Factory["FileReceiver"]
else:
    _ReceiverFactoryBase = Factory


class FileReceiverFactory(_ReceiverFactoryBase):
    """Settings shared by every connection, and counters for logs and tests."""

    noisy = False

    def __init__(self, store: FileStore, prefix: str = "received_", token: bytes | None = None,
                 maxSize: int | None = None, headerTimeout: float = 30.0, idleTimeout: float = 300.0,
                 maxFiles: int = 1000, clock: IReactorTime | None = None, readSize: int = READ_SIZE,
                 linger: float = LINGER_SECONDS, maxConnections: int = 0, maxPerPeer: int = 0,
                 turnAwayLinger: float = TURN_AWAY_LINGER, maxTurningAway: int = MAX_TURNING_AWAY) -> None:
        self.store = store
        self.prefix = prefix
        self.token = token
        self.maxSize = maxSize
        self.headerTimeout = headerTimeout
        self.idleTimeout = idleTimeout
        self.maxFiles = maxFiles
        self.clock: IReactorTime = globalReactor() if clock is None else clock
        self.readSize = readSize
        self.linger = linger
        self.maxConnections = maxConnections
        self.maxPerPeer = maxPerPeer
        self.turnAwayLinger = turnAwayLinger
        self.maxTurningAway = maxTurningAway
        #: Turned-away connections waiting for their peer to close (at most maxTurningAway).
        self.turningAway = 0
        #: Every open connection; of them, those let in (not turned away), in all and by peerKey.
        self.connections = 0
        self.admitted = 0
        self.perPeer: dict[str, int] = {}
        self.stored = 0
        self.refused = 0
        self.turnedAway = 0
        self.unlogged = 0
        self._warnLog = RateLimitedLog(log, LogLevel.warn, WARN_LOG_RATE, WARN_LOG_BURST, self.clock.seconds)
        self.counters = FileCounters()

    def buildProtocol(self, addr: Any) -> FileReceiver:
        protocol = FileReceiver()
        protocol.factory = self
        return protocol

    def admit(self, key: str | None) -> str | None:
        """Let a new connection from ``key`` in (and count it), or say why not (--max-connections,
        --max-per-peer; 0 is no limit). Twisted's policies.LimitConnectionsByPeer and
        LimitTotalConnectionsFactory close such a connection without a word, and wrap every
        protocol, which would hide the transport's half-close and read size from FileReceiver."""
        if self.maxConnections and self.admitted >= self.maxConnections:
            return (f"the server has {self.admitted} connections, its limit (--max-connections): "
                    "try again later")
        if key is not None and self.maxPerPeer and self.perPeer.get(key, 0) >= self.maxPerPeer:
            return (f"{self.perPeer[key]} connections from {key} already, the limit per address "
                    "(--max-per-peer): close one or try again later")
        self.admitted += 1
        if key is not None:
            self.perPeer[key] = self.perPeer.get(key, 0) + 1
        return None

    def release(self, key: str | None) -> None:
        self.admitted -= 1
        if key is not None:
            left = self.perPeer.pop(key) - 1
            if left:
                self.perPeer[key] = left

    def warn(self, format: str, **fields: object) -> None:
        """Log a warning about one client, unless they come too fast (then only count it)."""
        if not self._warnLog(format, **fields):
            self.unlogged += 1


@implementer(IHalfCloseableProtocol)
class FileReceiver(LineReceiver):
    """Receives files on one connection, one request at a time (see the module doc)."""

    factory: FileReceiverFactory
    transport: StreamTransport
    delimiter = b"\n"
    MAX_LENGTH = MAX_HEADER - 1  # LineReceiver's limit leaves out the newline

    def __init__(self) -> None:
        self.state = State.HEADER  # entered for real (timer and all) on connectionMade
        self.peer = "?"
        self.peerKey: str | None = None
        self.admitted = False
        self.waitingToGo = False
        self.requests = 0
        self.bytesIn = 0
        self._timer: IDelayedCall | None = None
        self._put: Put | None = None
        self._subject: str | None = None
        self._upload: Upload | None = None
        self._prefix: HeldPrefix | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes read and not used yet: a partial line, or what came in while reads were paused
        (the tests hold it to that bound)."""
        return len(self._buffer)

    # -- connection events ----------------------------------------------------

    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.peer = describeAddress(address)
        self.factory.connections += 1
        self.factory.counters.opened(self)
        self.peerKey = peerKey(address)
        refusal = self.factory.admit(self.peerKey)
        if refusal is not None:
            factory = self.factory
            factory.turnedAway += 1
            factory.counters.turnedAwayFor(refusal)
            factory.warn("{peer}: turned away: {message}", peer=self.peer, message=refusal)
            if factory.turningAway >= factory.maxTurningAway:
                self._enter(State.CLOSING)
                self.transport.write(formatErr(ErrorCode.TOO_MANY_CONNECTIONS, refusal))
                self.transport.loseConnection()
                return
            factory.turningAway += 1
            self.waitingToGo = True
            self._refuse(ErrorCode.TOO_MANY_CONNECTIONS, refusal, factory.turnAwayLinger)
            return
        self.admitted = True
        if hasattr(type(self.transport), "bufferSize"):
            # abstract.FileDescriptor's read size (TCP and UNIX), in no interface.
            self.transport.bufferSize = self.factory.readSize  # type: ignore[attr-defined]
        log.debug("connection from {peer}", peer=self.peer)
        self._enter(State.HEADER)

    def dataReceived(self, data: bytes) -> None:
        """LineReceiver's framing, except after an ERR (CLOSING): then input is read and dropped,
        so that the peer reads the ERR rather than a reset."""
        self.bytesIn += len(data)
        self.factory.counters.received += len(data)
        if self.state is not State.CLOSING:
            LineReceiver.dataReceived(self, data)

    def readConnectionLost(self) -> None:
        """The peer sent everything it will send (half-close, as ``nc -N`` and ncat do)."""
        self._eof = True
        if self.state not in _WAITING:
            self._endOfInput()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.counters.closed(self)
        self._enter(State.LOST)
        if self._upload is not None:
            upload, self._upload = self._upload, None
            kept = upload.resumable
            upload.abort(keep=True)
            log.info("{peer} went away after {got} of {size} bytes of {name}{kept}", peer=self.peer,
                     got=upload.position, size=upload.size, name=self._name(),
                     kept=" (kept for --resume)" if kept else "")
        if self.admitted:
            self.admitted = False
            self.factory.release(self.peerKey)
        if self.waitingToGo:
            self.waitingToGo = False
            self.factory.turningAway -= 1
        self.factory.connections -= 1

    # -- the state machine ----------------------------------------------------

    def _enter(self, state: State) -> None:
        """The one place the state changes: checks the move against ``_NEXT``, stops the old
        state's timer and sets up the new state (its framing, its timer, reading again).

        Entering a reading state can run the input that waited, and so further moves: nothing
        may follow a call of ``_enter`` that assumes the state it entered.
        """
        assert state in _NEXT[self.state], f"{self.state.name} -> {state.name}"
        self.state = state
        self._cancelTimer()
        if state is State.HEADER:
            self._put = None
            self._subject = None
            self._readLines(MAX_HEADER, self.factory.headerTimeout, self._headerTimedOut)
        elif state is State.BODY:
            self.setRawMode()
            self._setTimer(self.factory.idleTimeout, self._idleTimedOut)
            self._readOn()
        elif state is State.TRAILER:
            self._readLines(MAX_TRAILER, self.factory.idleTimeout, self._idleTimedOut)
        elif state in (State.CLOSING, State.LOST):
            self.clearLineBuffer()

    def _readLines(self, limit: int, timeout: float, timedOut: Callable[[], None]) -> None:
        self.setLineMode()
        self.MAX_LENGTH = limit - 1
        self._setTimer(timeout, timedOut)
        self._readOn()

    def _readOn(self) -> None:
        """Back from waiting on the store: use what came meanwhile, read again, and act on an end
        of input that came while waiting. (Reads are paused only while an answer is awaited, and
        answers that come late come from the reactor: this never runs inside dataReceived.)"""
        if not self.paused:
            return
        self.resumeProducing()
        if self._eof and self.state in _READING:
            self._endOfInput()

    def _await(self, state: State, answer: Deferred[T], then: Callable[[T], object],
               gone: Callable[[T], object]) -> None:
        """Wait in ``state`` (PREPARING, COMMITTING) for the store, then go on with ``then``.

        Reads pause only if the answer does not come at once (opening a new file needs no
        thread, a commit does): a quick answer has moved the state on before the check.
        """
        self._enter(state)
        answer.addBoth(self._answered, then, gone)
        if self.state is state and not self.paused:
            self.pauseProducing()

    def _answered(self, result: object, then: Callable[[Any], object], gone: Callable[[Any], object]) -> None:
        """Every answer of the store comes here: it moves the request on, or, in LOST (the peer
        left while the store worked), ``gone`` only tidies up."""
        if isinstance(result, Failure):
            then, gone = self._storageFailed, self._storageFailedAfterLoss
        (gone if self.state is State.LOST else then)(result)

    # -- input ----------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.state is State.HEADER:
            self._request(line)
        else:
            self._trailer(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.state is State.HEADER:
            self._fail(ErrorCode.HEADER_TOO_LONG, f"a request line is at most {MAX_HEADER} bytes, newline included")
        else:
            self._fail(ErrorCode.BAD_HEADER, f"a trailer line is at most {MAX_TRAILER} bytes, newline included")

    def rawDataReceived(self, data: bytes) -> None:
        """Body bytes, written (and hashed) as they came; what follows the body is read as lines."""
        upload = self._upload
        assert upload is not None
        need = upload.remaining
        try:
            upload.write(data if len(data) <= need else memoryview(data)[:need])
        except StorageError as e:
            self._fail(e.code, e.message)
            return
        if self._timer is not None:
            self._timer.reset(self.factory.idleTimeout)
        if len(data) >= need:
            if len(data) > need:
                self.setLineMode(data[need:])
            self._bodyDone()

    def _endOfInput(self) -> None:
        if self.state is State.HEADER:
            if self.buffered:
                self._fail(ErrorCode.BAD_HEADER, "the connection ended in the middle of a request line")
            else:
                self.transport.loseConnection()
        elif self.state in (State.BODY, State.TRAILER):
            upload = self._upload
            assert upload is not None
            where = f"after {upload.position} of {upload.size} bytes" if upload.remaining else "before the trailer"
            self._fail(ErrorCode.SHORT_BODY, f"the connection ended {where}", keep=True)
        elif self.state is State.CLOSING:
            self.transport.loseConnection()

    # -- requests -------------------------------------------------------------

    def _headerTimedOut(self) -> None:
        self._timer = None
        self._fail(ErrorCode.TIMEOUT, f"no complete request line within {self.factory.headerTimeout:g}s")

    def _idleTimedOut(self) -> None:
        self._timer = None
        self._fail(ErrorCode.TIMEOUT, f"no data for {self.factory.idleTimeout:g}s", keep=True)

    def _request(self, line: bytes) -> None:
        try:
            request = parseRequest(line)
            self._subject = request.name
            self.factory.counters.request(self)
            if self.requests >= self.factory.maxFiles:
                raise WireError(ErrorCode.TOO_MANY_FILES, f"at most {self.factory.maxFiles} requests per "
                                                          "connection: open a new connection for the rest")
            self.requests += 1
            self._checkToken(request.token)
            parts = storedParts(checkPath(request.name), self.factory.prefix)
            if isinstance(request, Stat):
                self._stat(request, parts)
            else:
                self._startPut(request, parts)
        except (WireError, StorageError) as e:
            self._fail(e.code, e.message)

    def _checkToken(self, token: str | None) -> None:
        expected = self.factory.token
        if expected is None:
            return
        if token is None or not hmac.compare_digest(token.encode("utf-8"), expected):
            raise WireError(ErrorCode.BAD_TOKEN, "this server needs the right token= (tcplab send --token-file)")

    def _stat(self, request: Stat, parts: tuple[str, ...]) -> None:
        self._await(State.PREPARING, self.factory.store.held(parts, request.size), self._have, _nothing)

    def _have(self, held: HeldPrefix | None) -> None:
        self._prefix = held
        self.transport.write(formatHave(held.length, held.sha256) if held else formatHave(0, EMPTY_SHA256))
        self._enter(State.HEADER)

    def _startPut(self, put: Put, parts: tuple[str, ...]) -> None:
        maxSize = self.factory.maxSize
        if maxSize is not None and put.size > maxSize:
            raise WireError(ErrorCode.TOO_LARGE, f"{escapeName(put.name)} is {put.size} bytes; "
                                                 f"this server takes at most {maxSize}")
        store = self.factory.store
        if put.clash is Clash.FAIL and store.exists(parts):
            raise WireError(ErrorCode.EXISTS, f"{escapeName('/'.join(parts))} already exists on the server")
        held, self._prefix = self._prefix, None
        if held is not None and held.key != store.partialName(parts, put.size):
            held = None
        self._put = put
        self._await(State.PREPARING, store.begin(parts, put.size, put.offset, put.hashed, held),
                    self._prepared, self._preparedAfterLoss)

    def _prepared(self, upload: Upload) -> None:
        self._upload = upload
        if upload.remaining:
            self._enter(State.BODY)
        else:
            self._bodyDone()

    def _preparedAfterLoss(self, upload: Upload) -> None:
        upload.abort(keep=True)

    def _bodyDone(self) -> None:
        put = self._put
        assert put is not None
        if put.trailer:
            self._enter(State.TRAILER)
        else:
            self._verify(put.sha256)

    def _trailer(self, line: bytes) -> None:
        try:
            expected = parseTrailer(line)
        except WireError as e:
            self._fail(e.code, e.message)
            return
        self._verify(expected)

    def _verify(self, expected: str | None) -> None:
        put, upload = self._put, self._upload
        assert put is not None and upload is not None
        actual = upload.sha256()
        if expected is not None and expected != actual:
            self._fail(ErrorCode.CHECKSUM_MISMATCH, "the SHA-256 of the bytes received is "
                                                    f"{actual}, not {expected}: nothing was stored")
            return
        self._upload = None
        self._await(State.COMMITTING, upload.commit(put.clash), partial(self._committed, put, actual),
                    partial(self._logStored, put, actual))

    def _committed(self, put: Put, sha256: str, stored: str) -> None:
        self._logStored(put, sha256, stored)
        self.transport.write(formatOk(put.size, sha256, stored))
        self._enter(State.HEADER)

    def _logStored(self, put: Put, sha256: str, stored: str) -> None:
        """A file is in place: counted and logged even if its sender has gone meanwhile."""
        self.factory.stored += 1
        self.factory.counters.storedUpload(self, escapeName(stored), put.size, sha256)
        log.info("{peer} stored {name} ({size} bytes, sha256 {sha256})", peer=self.peer, name=escapeName(stored),
                 size=put.size, sha256=sha256)

    def _storageError(self, failure: Failure) -> tuple[ErrorCode, str]:
        error = failure.value
        if isinstance(error, StorageError):
            return error.code, error.message
        log.failure("unexpected error storing {name} from {peer}", failure, name=self._name(), peer=self.peer)
        return ErrorCode.IO_ERROR, "internal error in the server"

    def _storageFailed(self, failure: Failure) -> None:
        self._fail(*self._storageError(failure))

    def _storageFailedAfterLoss(self, failure: Failure) -> None:
        _, message = self._storageError(failure)
        log.warn("{peer} (gone): {name} not stored: {message}", peer=self.peer, name=self._name(), message=message)

    # -- errors and timers ----------------------------------------------------

    def _fail(self, code: ErrorCode | str, message: str, keep: bool = False) -> None:
        """Reply ERR, drop the upload (a resumable one survives if ``keep``), and close.

        The write side is shut first and input is read and dropped for a while, so
        the peer gets to read the ERR instead of a reset from unread data.
        """
        if self._upload is not None:
            upload, self._upload = self._upload, None
            upload.abort(keep=keep)
        self.factory.refused += 1
        self.factory.counters.failed(self, code, message)
        self.factory.warn("{peer}: {name}: ERR {code} {message}", peer=self.peer, name=self._name(),
                          code=str(code), message=message)
        self._refuse(code, message)

    def _refuse(self, code: ErrorCode | str, message: str, linger: float | None = None) -> None:
        """Send the ERR, then close the way _fail describes."""
        self._enter(State.CLOSING)
        self.transport.write(formatErr(code, message))
        self._setTimer(self.factory.linger if linger is None else linger, self._lingerOver)
        if self._eof:
            self.transport.loseConnection()
            return
        if ISSLTransport.providedBy(self.transport):
            # TLS holds what we write until its handshake is done: a half-close of the socket
            # under it would cut that off. Its own close sends the ERR, then close_notify.
            self.transport.loseConnection()
        elif IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()  # type: ignore[attr-defined]  # a TCP or UNIX half-close
        if self.paused:
            self.resumeProducing()

    def _lingerOver(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def _setTimer(self, seconds: float, then: Callable[[], None]) -> None:
        self._cancelTimer()
        self._timer = self.factory.clock.callLater(seconds, then)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _name(self) -> str:
        return escapeName(self._subject) if self._subject is not None else "-"


def _nothing(result: object) -> None:
    """What a STAT's answer needs once its asker has gone."""
