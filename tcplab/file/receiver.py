"""The tcplab-file server protocol: a state machine from request line to reply.

Each connection moves through named states (see ``State``)::

    HEADER --PUT--> PREPARING --> BODY --> [TRAILER] --> COMMITTING --OK--> HEADER
    HEADER --STAT-> PREPARING --HAVE--> HEADER
    any state --error--> CLOSING (ERR sent; input discarded until the peer leaves)

While PREPARING or COMMITTING, work runs off the reactor thread (opening a
resumed file, fsync and rename) and reading from the peer is paused; bytes that
already arrived wait in a buffer of at most one read.
"""

from __future__ import annotations

import hmac
import ipaddress
from enum import Enum
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
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
from tcplab.peers import describeAddress
from tcplab.ratelimit import RateLimitedLog

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
    PREPARING = "preparing"  # opening the target file, or hashing a kept prefix; reads paused
    BODY = "body"  # hashing and writing the body (under --idle-timeout)
    TRAILER = "trailer"  # reading the SHA256 line after the body
    COMMITTING = "committing"  # fsync, link into place, fsync the folder; reads paused
    CLOSING = "closing"  # an ERR was sent; input is discarded until the peer goes


_PAUSED = frozenset({State.PREPARING, State.COMMITTING})
_READING = frozenset({State.HEADER, State.BODY, State.TRAILER})


class FileReceiverFactory(Factory):
    """Settings shared by every connection, and counters for logs and tests."""

    noisy = False

    def __init__(self, store: FileStore, prefix: str = "received_", token: bytes | None = None,
                 maxSize: int | None = None, headerTimeout: float = 30.0, idleTimeout: float = 300.0,
                 maxFiles: int = 1000, clock: IReactorTime | None = None, readSize: int = READ_SIZE,
                 linger: float = LINGER_SECONDS, maxConnections: int = 0, maxPerPeer: int = 0,
                 turnAwayLinger: float = TURN_AWAY_LINGER, maxTurningAway: int = MAX_TURNING_AWAY) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.store = store
        self.prefix = prefix
        self.token = token
        self.maxSize = maxSize
        self.headerTimeout = headerTimeout
        self.idleTimeout = idleTimeout
        self.maxFiles = maxFiles
        self.clock: IReactorTime = clock  # type: ignore[assignment]
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
class FileReceiver(Protocol):
    """Receives files on one connection, one request at a time (see the module doc)."""

    factory: FileReceiverFactory

    def __init__(self) -> None:
        self.state = State.HEADER
        self.peer = "?"
        self.peerKey: str | None = None
        self.admitted = False
        self.waitingToGo = False
        self.requests = 0
        self.bytesIn = 0
        self._line = bytearray()
        self._held = b""
        self._timer: IDelayedCall | None = None
        self._put: Put | None = None
        self._subject: str | None = None
        self._upload: Upload | None = None
        self._prefix: HeldPrefix | None = None
        self._eof = False
        self._lost = False
        self._consuming = False
        self._readPaused = False

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
                self.state = State.CLOSING
                self.transport.write(formatErr(ErrorCode.TOO_MANY_CONNECTIONS, refusal))
                self.transport.loseConnection()
                return
            factory.turningAway += 1
            self.waitingToGo = True
            self._refuse(ErrorCode.TOO_MANY_CONNECTIONS, refusal, factory.turnAwayLinger)
            return
        self.admitted = True
        if hasattr(type(self.transport), "bufferSize"):
            self.transport.bufferSize = self.factory.readSize  # type: ignore[attr-defined]
        log.debug("connection from {peer}", peer=self.peer)
        self._enterHeader()

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.factory.counters.received += len(data)
        if self.state in _PAUSED:
            self._held += data
        elif self.state is not State.CLOSING:
            self._consume(data)
            self._readOn()

    def readConnectionLost(self) -> None:
        """The peer sent everything it will send (half-close, as ``nc -N`` and ncat do)."""
        self._eof = True
        if self.state not in _PAUSED:
            self._endOfInput()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.counters.closed(self)
        self._lost = True
        self._cancelTimer()
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

    # -- the input loop -------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        """Feed ``data`` to the current state until it is used up or reading pauses.

        Work that finishes at once (a commit run synchronously, say) must not start
        consuming again from inside this loop: ``_consuming`` makes it leave that
        to the loop, which carries on with the rest of ``data``.
        """
        pos, end = 0, len(data)
        self._consuming = True
        try:
            while pos < end:
                state = self.state
                if state is State.BODY:
                    pos = self._body(data, pos)
                elif state is State.HEADER:
                    pos = self._lineIn(data, pos, MAX_HEADER, self._request, ErrorCode.HEADER_TOO_LONG)
                elif state is State.TRAILER:
                    pos = self._lineIn(data, pos, MAX_TRAILER, self._trailer, ErrorCode.BAD_HEADER)
                elif state in _PAUSED:
                    self._held = data[pos:] + self._held
                    return
                else:
                    return
        finally:
            self._consuming = False

    def _lineIn(self, data: bytes, pos: int, limit: int, handler: Any, tooLong: ErrorCode) -> int:
        room = limit - len(self._line)
        newline = data.find(b"\n", pos, pos + room)
        if newline < 0:
            if len(data) - pos >= room:
                what = "request" if limit == MAX_HEADER else "trailer"
                self._fail(tooLong, f"a {what} line is at most {limit} bytes, newline included")
            else:
                self._line += data[pos:]
            return len(data)
        if self._line:
            self._line += data[pos:newline]
            line = bytes(self._line)
            self._line.clear()
        else:
            line = data[pos:newline]
        handler(line)
        return newline + 1

    def _body(self, data: bytes, pos: int) -> int:
        upload = self._upload
        assert upload is not None
        n = min(upload.remaining, len(data) - pos)
        try:
            upload.write(data if pos == 0 and n == len(data) else memoryview(data)[pos:pos + n])
        except StorageError as e:
            self._fail(e.code, e.message)
            return len(data)
        if self._timer is not None:
            self._timer.reset(self.factory.idleTimeout)
        if not upload.remaining:
            self._bodyDone()
        return pos + n

    def _endOfInput(self) -> None:
        if self.state is State.HEADER:
            if self._line:
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

    def _resumeReading(self) -> None:
        """Back from PREPARING/COMMITTING: use what arrived meanwhile, then read again."""
        if self._consuming or self.state not in _READING:
            return
        data, self._held = self._held, b""
        if data:
            self._consume(data)
        self._readOn()

    def _readOn(self) -> None:
        """All input at hand is used: read more, or act on the end of input."""
        if self.state not in _READING:
            return
        if self._eof:
            self._endOfInput()
        elif self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _pauseReading(self, state: State) -> None:
        self._cancelTimer()
        self.state = state
        if not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    # -- requests -------------------------------------------------------------

    def _enterHeader(self) -> None:
        self.state = State.HEADER
        self._put = None
        self._subject = None
        self._line.clear()
        self._setTimer(self.factory.headerTimeout, self._headerTimedOut)

    def _headerTimedOut(self) -> None:
        self._timer = None
        self._fail(ErrorCode.TIMEOUT, f"no complete request line within {self.factory.headerTimeout:g}s")

    def _idleTimedOut(self) -> None:
        self._timer = None
        self._fail(ErrorCode.TIMEOUT, f"no data for {self.factory.idleTimeout:g}s", keep=True)

    def _request(self, line: bytes) -> None:
        self._cancelTimer()
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
        self._pauseReading(State.PREPARING)
        self.factory.store.held(parts, request.size).addCallbacks(self._have, self._storageFailed)

    def _have(self, held: HeldPrefix | None) -> None:
        if self._lost:
            return
        self._prefix = held
        self.transport.write(formatHave(held.length, held.sha256) if held else formatHave(0, EMPTY_SHA256))
        self._enterHeader()
        self._resumeReading()

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
        self._pauseReading(State.PREPARING)
        store.begin(parts, put.size, put.offset, put.hashed, held).addCallbacks(self._prepared, self._storageFailed)

    def _prepared(self, upload: Upload) -> None:
        if self._lost:
            upload.abort(keep=True)
            return
        self._upload = upload
        self.state = State.BODY
        self._setTimer(self.factory.idleTimeout, self._idleTimedOut)
        if not upload.remaining:
            self._bodyDone()
        self._resumeReading()

    def _bodyDone(self) -> None:
        put = self._put
        assert put is not None
        if put.trailer:
            self.state = State.TRAILER
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
        self._pauseReading(State.COMMITTING)
        upload.commit(put.clash).addCallbacks(self._committed, self._storageFailed, callbackArgs=(put, actual))

    def _committed(self, stored: str, put: Put, sha256: str) -> None:
        self.factory.stored += 1
        self.factory.counters.storedUpload(self, escapeName(stored), put.size, sha256)
        log.info("{peer} stored {name} ({size} bytes, sha256 {sha256})", peer=self.peer, name=escapeName(stored),
                 size=put.size, sha256=sha256)
        if self._lost:
            return
        self.transport.write(formatOk(put.size, sha256, stored))
        self._enterHeader()
        self._resumeReading()

    def _storageFailed(self, failure: Failure) -> None:
        if failure.check(StorageError):
            code, message = failure.value.code, failure.value.message  # type: ignore[union-attr]
        else:
            log.failure("unexpected error storing {name} from {peer}", failure, name=self._name(), peer=self.peer)
            code, message = ErrorCode.IO_ERROR, "internal error in the server"
        if self._lost:
            log.warn("{peer} (gone): {name} not stored: {message}", peer=self.peer, name=self._name(), message=message)
            return
        self._fail(code, message)

    # -- errors and timers ----------------------------------------------------

    def _fail(self, code: ErrorCode | str, message: str, keep: bool = False) -> None:
        """Reply ERR, drop the upload (a resumable one survives if ``keep``), and close.

        The write side is shut first and input is read and dropped for a while, so
        the peer gets to read the ERR instead of a reset from unread data.
        """
        if self.state is State.CLOSING or self._lost:
            return
        self._cancelTimer()
        if self._upload is not None:
            upload, self._upload = self._upload, None
            upload.abort(keep=keep)
        self.factory.refused += 1
        self.factory.counters.failed(self, code, message)
        self.factory.warn("{peer}: {name}: ERR {code} {message}", peer=self.peer, name=self._name(),
                          code=str(code), message=message)
        self._refuse(code, message)

    def _refuse(self, code: ErrorCode, message: str, linger: float | None = None) -> None:
        """Send the ERR, then close the way _fail describes."""
        self.state = State.CLOSING
        self._held = b""
        self.transport.write(formatErr(code, message))
        self._timer = self.factory.clock.callLater(self.factory.linger if linger is None else linger,
                                                   self._lingerOver)
        if self._eof:
            self.transport.loseConnection()
            return
        if ISSLTransport.providedBy(self.transport):
            # TLS holds what we write until its handshake is done: a half-close of the socket
            # under it would cut that off. Its own close sends the ERR, then close_notify.
            self.transport.loseConnection()
        elif IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()  # type: ignore[attr-defined]
        if self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _lingerOver(self) -> None:
        self._timer = None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _setTimer(self, seconds: float, then: Any) -> None:
        self._cancelTimer()
        self._timer = self.factory.clock.callLater(seconds, then)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _name(self) -> str:
        return escapeName(self._subject) if self._subject is not None else "-"
