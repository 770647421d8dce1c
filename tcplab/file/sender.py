"""The ``tcplab send`` client: stream files to a tcplab-file server, hashing as they are read.

``UploadProtocol`` is one connection (one request at a time); ``BodyProducer`` reads
the file in large chunks only as fast as the connection takes them, so memory
stays constant whatever the file size; ``Uploader`` sends file after file,
reconnecting when the server closed the connection (after an ERR, or at its
per-connection cap) and resuming from what the server holds when asked to.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, INegotiated, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab import flow
from tcplab.errors import (
    AlreadyExists,
    ConnectionLostError,
    LocalFileError,
    RefusedByServer,
    TcplabError,
    TimedOut,
    VerificationFailed,
    handshakeTimedOut,
    tlsFailure,
)
from tcplab.escaping import escapeName, safeText
from tcplab.file.wire import (
    MAX_REPLY,
    Clash,
    Err,
    ErrorCode,
    Have,
    Ok,
    WireError,
    formatPut,
    formatStat,
    formatTrailer,
    parseReply,
)
from tcplab.hashing import hashRange
from tcplab.interfaces import StreamTransport

#: Bytes read from the file and written to the connection at a time.
CHUNK_SIZE = 1 << 20
#: Waiting for the server to fsync a file gets this much extra time per byte (50 MB/s).
FLUSH_SECONDS_PER_BYTE = 1 / 50e6

Progress = Callable[[int], None]
#: The most time between two looks at how far the upload has got on the wire.
PROGRESS_CHECK_SECONDS = 1.0


def unsentBytes(transport: StreamTransport) -> int:
    """:func:`tcplab.flow.unsentBytes`, with 0 for a transport that has no socket under it."""
    return flow.unsentBytes(transport) or 0


def _noProgress(n: int) -> None:
    pass


class ServerBusy(RefusedByServer):
    """The server turned the connection away (too many connections): no file can be sent now."""


class ServerError:
    """Which exception (and so which exit status) each ERR code becomes."""

    classes: dict[str, type[TcplabError]] = {
        ErrorCode.EXISTS.value: AlreadyExists,
        ErrorCode.CHECKSUM_MISMATCH.value: VerificationFailed,
        ErrorCode.TIMEOUT.value: TimedOut,
        ErrorCode.SHORT_BODY.value: ConnectionLostError,
    }

    @classmethod
    def make(cls, reply: Err, name: str) -> TcplabError:
        """An error for ``reply`` about ``name``; ``serverCode`` keeps the ERR code."""
        if reply.code == ErrorCode.TOO_MANY_CONNECTIONS.value:
            error: TcplabError = ServerBusy(f"the server turned the connection away: {safeText(reply.message)} "
                                            f"({reply.code})")
        else:
            kind = cls.classes.get(reply.code, RefusedByServer)
            error = kind(f"{escapeName(name)} not stored: {safeText(reply.message)} ({safeText(reply.code)})")
        error.serverCode = reply.code
        return error


def serverCode(error: BaseException) -> str | None:
    return getattr(error, "serverCode", None)


@dataclass(frozen=True)
class Sent:
    """A file the server stored and whose size and SHA-256 match what was read here."""

    name: str
    stored: str
    size: int
    sha256: str
    resumedAt: int = 0


@implementer(IPushProducer)
class BodyProducer:
    """Writes bytes ``start..end`` of ``fd`` to a transport whenever it can take more,
    updating ``hasher`` with each chunk on the way; ``done`` fires at the end."""

    def __init__(self, fd: int, start: int, end: int, hasher: Any, transport: StreamTransport, path: str,
                 progress: Progress = _noProgress, chunkSize: int = CHUNK_SIZE) -> None:
        self.fd = fd
        self.position = start
        self.end = end
        self.hasher = hasher
        self.transport = transport
        self.path = path
        self.progress = progress
        self.chunkSize = chunkSize
        self.done: Deferred[None] = Deferred()
        self._paused = False
        self._stopped = False

    def start(self) -> Deferred[None]:
        self.transport.registerProducer(self, True)
        self.resumeProducing()
        return self.done

    def resumeProducing(self) -> None:
        self._paused = False
        while not (self._paused or self._stopped) and self.position < self.end:
            try:
                chunk = os.pread(self.fd, min(self.chunkSize, self.end - self.position), self.position)
            except OSError as e:
                self._finish(LocalFileError(f"cannot read {escapeName(self.path)}: {e.strerror}"))
                return
            if not chunk:
                self._finish(LocalFileError(f"{escapeName(self.path)} got shorter while it was being sent"))
                return
            self.hasher.update(chunk)
            self.position += len(chunk)
            self.transport.write(chunk)
            self.progress(len(chunk))
        if self.position >= self.end and not self._stopped:
            self._finish(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._stopped = True

    def _finish(self, error: TcplabError | None) -> None:
        self._stopped = True
        self.transport.unregisterProducer()
        if not self.done.called:
            if error is None:
                self.done.callback(None)
            else:
                self.done.errback(error)


@implementer(IHandshakeListener)
class UploadProtocol(LineOnlyReceiver):
    """One connection to a tcplab-file server. ``stat`` and ``put`` send a request
    and fire with its reply; an ERR fails them (and ends the connection). A reply line
    longer than MAX_REPLY, finished or not, is not believed.

    ``timeout`` counts only time without progress on the wire: bytes reaching the server
    (``unsent`` going down), not bytes handed to the socket."""

    transport: StreamTransport
    delimiter = b"\n"
    MAX_LENGTH = MAX_REPLY

    def __init__(self, clock: IReactorTime, timeout: float, chunkSize: int = CHUNK_SIZE,
                 unsent: Callable[[StreamTransport], int] = unsentBytes) -> None:
        self.clock = clock
        self.timeout = timeout
        self.chunkSize = chunkSize
        self.unsent = unsent
        self.tls = False
        self.handshakeDone = False
        self._written = 0
        self._delivered = 0
        self._lastProgress = 0.0
        self._limit = 0.0
        self._flushSeconds = 0.0  # once every byte has reached the server, time for its fsync
        self.isOpen = False
        self.broken = False
        self.closed: Deferred[None] = Deferred()
        self._waiting: Deferred[Any] | None = None
        self._expect: type = Ok
        self._what = ""
        self._producer: BodyProducer | None = None
        self._timer: IDelayedCall | None = None

    @property
    def usable(self) -> bool:
        """Open and in step with the server (no ERR seen): another request may be sent."""
        return self.isOpen and not self.broken

    def connectionMade(self) -> None:
        self.isOpen = True
        transport = self.transport
        self.tls = INegotiated.providedBy(transport)
        if hasattr(type(transport), "SEND_LIMIT"):
            # One chunk per send(), and the producer paused after each chunk: the transport's
            # buffer then only ever holds that one chunk, which it sends without copying it
            # (joining several chunks would copy them all, and cost as much CPU as hashing).
            # Both are abstract.FileDescriptor's (TCP and UNIX), in no interface.
            transport.bufferSize = self.chunkSize // 2  # type: ignore[attr-defined]
            transport.SEND_LIMIT = self.chunkSize  # type: ignore[attr-defined]

    def stat(self, size: int, name: str, token: str | None = None) -> Deferred[Have]:
        """Ask how much of (``name``, ``size``) the server holds from an earlier attempt."""
        return self._request(formatStat(size, name, token), Have, name)

    def put(self, header: bytes, name: str, fd: int, start: int, end: int, hasher: Any, path: str,
            progress: Progress = _noProgress) -> Deferred[Ok]:
        """Send ``header``, then bytes ``start..end`` of ``fd`` and the SHA256 trailer."""
        d = self._request(header, Ok, name)
        self._producer = BodyProducer(fd, start, end, hasher, self.transport, path, self._progressing(progress),
                                      self.chunkSize)
        self._producer.start().addCallbacks(self._bodySent, self._bodyFailed, callbackArgs=(hasher, end - start))
        return d

    def close(self) -> Deferred[None]:
        if self.isOpen:
            self.transport.loseConnection()
        return self.closed

    def _request(self, line: bytes, expect: type, name: str) -> Deferred[Any]:
        if not self.usable or self._waiting is not None:
            raise ConnectionLostError("the connection to the server is closed")
        self._waiting = Deferred()
        self._expect = expect
        self._what = name
        self._write(line)
        self._arm(self.timeout)
        return self._waiting

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True

    def _write(self, data: bytes) -> None:
        self._written += len(data)
        self.transport.write(data)
        self._delivered = max(self._delivered, self._written - self.unsent(self.transport))

    def _progressing(self, progress: Progress) -> Progress:
        def sent(n: int) -> None:
            # The producer only runs when the transport's buffer has drained: that is progress too.
            self._written += n
            self._delivered = max(self._delivered, self._written - self.unsent(self.transport))
            self._lastProgress = self.clock.seconds()
            progress(n)

        return sent

    def _bodySent(self, _: None, hasher: Any, size: int) -> None:
        self._producer = None
        if self.isOpen and self._waiting is not None:
            self._write(formatTrailer(hasher.hexdigest()))
            self._flushSeconds = size * FLUSH_SECONDS_PER_BYTE

    def _bodyFailed(self, failure: Failure) -> None:
        self._producer = None
        self._fail(failure)
        self.transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocolError("the server sent an overlong line")

    def lineReceived(self, line: bytes) -> None:
        try:
            reply = parseReply(line)
        except WireError as e:
            self._protocolError(e.message)
            return
        if isinstance(reply, Err):
            self.broken = True
            self._stopBody()
            if self._waiting is not None:
                self._fail(ServerError.make(reply, self._what))
            self.transport.abortConnection()
        elif self._waiting is None or not isinstance(reply, self._expect) or self._producer is not None:
            text = safeText(line[:80].decode("utf-8", "replace"))
            self._protocolError(f"the server sent an unexpected reply: {text}")
        else:
            d, self._waiting = self._waiting, None
            self._disarm()
            d.callback(reply)

    def _protocolError(self, message: str) -> None:
        self.broken = True
        self._stopBody()
        self._fail(RefusedByServer(f"{message} (is this a tcplab-file server?)"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.isOpen = False
        self._stopBody()
        self._disarm()
        if self._waiting is not None:
            # A refused certificate shows up only here, as a lost connection: say so (exit 3), not "lost".
            self._fail(tlsFailure(reason) or ConnectionLostError(
                f"the connection to the server was lost while sending {escapeName(self._what)}"))
        self.closed.callback(None)

    def _stopBody(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
            if self.isOpen:
                self.transport.unregisterProducer()

    def _fail(self, error: TcplabError | Failure) -> None:
        self._disarm()
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(error)

    def _arm(self, seconds: float) -> None:
        """Fail after ``seconds`` without progress on the wire, looking at it every so often."""
        self._disarm()
        self._limit = seconds
        self._flushSeconds = 0.0
        self._lastProgress = self.clock.seconds()
        self._delivered = max(self._delivered, self._written - self.unsent(self.transport))
        self._timer = self.clock.callLater(min(PROGRESS_CHECK_SECONDS, seconds), self._checkProgress)

    def _checkProgress(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        unsent = self.unsent(self.transport)
        delivered = self._written - unsent
        if delivered > self._delivered:
            self._delivered, self._lastProgress = delivered, now
        limit = self._limit + (self._flushSeconds if unsent <= 0 else 0)
        left = self._lastProgress + limit - now
        if left <= 0:
            self._timedOut(limit)
        else:
            self._timer = self.clock.callLater(min(PROGRESS_CHECK_SECONDS, left), self._checkProgress)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self, seconds: float) -> None:
        self._timer = None
        self.broken = True
        self._stopBody()
        if self.tls and not self.handshakeDone:
            self._fail(handshakeTimedOut(seconds))
        else:
            self._fail(TimedOut(f"no progress for {seconds:g}s while sending {escapeName(self._what)}: "
                                "is the server overloaded? (--timeout)"))
        self.transport.abortConnection()


class Uploader:
    """Sends files one at a time, opening a new connection whenever the last one is done with."""

    def __init__(self, connect: Callable[[], Deferred[Any]], token: str | None = None, clash: Clash | None = None,
                 resume: bool = False, runBlocking: Callable[..., Deferred[Any]] | None = None) -> None:
        self.connect = connect
        self.token = token
        self.clash = clash
        self.resume = resume
        self.runBlocking = runBlocking or threads.deferToThread
        self.connections = 0
        self._client: UploadProtocol | None = None

    async def _connection(self) -> UploadProtocol:
        if self._client is None or not self._client.usable:
            self._client = await self.connect()
            self.connections += 1
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def send(self, path: str, name: str, progress: Progress = _noProgress,
                   identity: tuple[int, int] | None = None) -> Sent:
        """Upload ``path`` as ``name``; raise a TcplabError saying why it was not stored.
        With ``identity`` (device, inode), the file opened must be that one and not a symlink:
        what a folder walk found cannot be swapped for a link to elsewhere before it is sent."""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not block us
        try:
            fd = os.open(path, flags | (os.O_NOFOLLOW if identity is not None else 0))
        except OSError as e:
            if e.errno == errno.ELOOP and identity is not None:
                raise LocalFileError(f"{escapeName(path)} became a symlink while the folder was being sent "
                                     "(not followed)") from None
            raise LocalFileError(f"cannot read {escapeName(path)}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise LocalFileError(f"{escapeName(path)} is not a regular file")
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            os.close(fd)
            raise LocalFileError(f"{escapeName(path)} was replaced by another file while the folder was being sent")
        reported = 0

        def counted(n: int) -> None:
            nonlocal reported
            reported += n
            progress(n)

        try:
            size = os.fstat(fd).st_size
            # What the server holds is asked for once: a PUT retried on a new connection (the server's
            # --max-files-per-connection may allow only one request) goes on from the same offset.
            offset, prefix = await self._held(fd, size, path, name) if self.resume else (0, None)
            for attempt in range(3):
                hasher = prefix.copy() if prefix is not None else hashlib.sha256()
                if offset:
                    counted(offset)
                try:
                    return await self._put(fd, size, path, name, offset, hasher, counted)
                except TcplabError as e:
                    code = serverCode(e)
                    if attempt == 2 or code not in (ErrorCode.TOO_MANY_FILES.value, ErrorCode.BAD_OFFSET.value):
                        raise
                    if code == ErrorCode.BAD_OFFSET.value:
                        offset, prefix = 0, None
                    progress(-reported)
                    reported = 0
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            os.close(fd)

    async def _held(self, fd: int, size: int, path: str, name: str) -> tuple[int, Any]:
        """STAT: the offset to resume at and the hash of the bytes before it, when they are
        the local file's (else 0 and None). Retried once on a new connection at the server's cap."""
        for attempt in range(2):
            try:
                have = await (await self._connection()).stat(size, name, self.token)
                break
            except TcplabError as e:
                if attempt or serverCode(e) != ErrorCode.TOO_MANY_FILES.value:
                    raise
        if not 0 < have.offset <= size:
            return 0, None
        prefix = hashlib.sha256()
        try:
            await self.runBlocking(hashRange, fd, have.offset, prefix)
        except OSError as e:
            raise LocalFileError(f"cannot read {escapeName(path)}: {e.strerror}") from None
        if prefix.hexdigest() != have.sha256:
            return 0, None
        return have.offset, prefix

    async def _put(self, fd: int, size: int, path: str, name: str, offset: int, hasher: Any,
                   progress: Progress) -> Sent:
        """Send bytes ``offset..size-1`` (``hasher`` holds the hash of those before) and check the reply."""
        client = await self._connection()
        header = formatPut(size, name, trailer=True, offset=offset, token=self.token, clash=self.clash)
        ok: Ok = await client.put(header, name, fd, offset, size, hasher, path, progress)
        sha256 = hasher.hexdigest()
        if ok.size != size or ok.sha256 != sha256:
            raise VerificationFailed(f"{escapeName(name)}: the server reports {ok.size} bytes with sha256 "
                                     f"{ok.sha256}, but {size} bytes with sha256 {sha256} were sent")
        return Sent(name, ok.name, size, sha256, offset)
