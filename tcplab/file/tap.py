"""``twistd tcplab-file``: the verified, atomic, resumable file drop (Task 3)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from tcplab.coerce import floatOption, intOption
from tcplab.escaping import escapeName
from tcplab.file.names import MAX_NAME_BYTES, RESERVED_PREFIX, checkPart
from tcplab.file.receiver import FileReceiverFactory
from tcplab.file.store import FileStore
from tcplab.file.web import webService
from tcplab.file.wire import TOKEN_ENV, ErrorCode, TokenError, WireError, loadToken
from tcplab.interfaces import IReactor, globalReactor
from tcplab.listening import ListeningService, ServerOptions
from tcplab.metrics import Family, byLabel, one
from tcplab.usagelog import UsageLog

log = Logger(namespace="tcplab.file")

_SIZE = re.compile(r"([0-9]+)\s*([kmgtKMGT]?)(?:i?[bB])?\Z")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def sizeOption(name: str, value: str) -> int:
    """``1048576``, ``512K``, ``100M``, ``2G``, ``1TiB`` (powers of 1024), or a one-line UsageError."""
    match = _SIZE.match(value.strip())
    if not match:
        raise usage.UsageError(f"{name} must be a size such as 1048576, 500M or 2G, not {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def checkPrefix(prefix: str) -> None:
    """A one-line UsageError unless ``prefix`` keeps every stored name a plain name inside --dir:
    no ``/`` or ``\\``, no NUL or other control characters, not ``.`` or ``..``, not ``.tcplab-...``."""
    if not prefix:
        return
    try:
        checkPart(prefix)
    except WireError as e:
        raise usage.UsageError(f"--prefix: {e.message}") from None
    if prefix.startswith(RESERVED_PREFIX):
        raise usage.UsageError(f"--prefix may not start with {RESERVED_PREFIX!r} (the server's own hidden files)")
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES - 16:
        raise usage.UsageError(f"--prefix {escapeName(prefix[:20])!r}... is too long: leave room for the names")


def checkDir(directory: str) -> None:
    """A one-line UsageError, naming the fix, unless ``directory`` is a folder this user can store into."""
    shown = escapeName(directory)
    if not os.path.exists(directory):
        raise usage.UsageError(f"--dir {shown} does not exist: create it (mkdir -p {shown}) or give an existing "
                               "folder")
    if not os.path.isdir(directory):
        raise usage.UsageError(f"--dir {shown} is a file, not a folder: give the folder to store uploads in")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise usage.UsageError(f"--dir {shown} is not writable by this user ({_user()}): give it write access "
                               "or choose another folder")


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


class Options(ServerOptions):
    synopsis = ("[--port 9000] [--interface ADDR] [--listen ENDPOINT]... [--dir DIR] [--prefix received_] "
                "[--max-size BYTES] [--token-file F] [--overwrite] [--max-connections N] [--max-per-peer N]")
    longdesc = (
        "Receive files (tcplab send, or nc: printf 'PUT <size> <name>\\n' then the bytes) and store each "
        "as <prefix><name> in --dir, verified by SHA-256, fsync'ed and renamed into place atomically. "
        f"The token can also come from ${TOKEN_ENV}. See docs/PROTOCOL.md."
    )
    defaultPort = 9000

    optFlags = [["overwrite", None, "Replace an existing file of the same name (default: store as 'name (1).ext')."]]
    optParameters = [
        ["dir", "d", ".", "Folder to store files in."],
        ["prefix", None, "received_", "Put in front of every stored name (may be empty; no '/' or '\\')."],
        ["max-size", None, None, "Largest file accepted, e.g. 500M or 2G (default: what the disk has free)."],
        ["token-file", None, None, f"Require the token in this file from every client (or set ${TOKEN_ENV})."],
        ["header-timeout", None, "30", "Seconds a client has to send a complete request line."],
        ["idle-timeout", None, "300", "Seconds a body may stall before the upload is dropped."],
        ["max-files-per-connection", None, "1000", "Requests (PUT or STAT) one connection may make."],
        ["partial-ttl", None, "86400", "Seconds an interrupted upload is kept for --resume."],
        ["max-connections", None, "256", "Connections at once; more are told ERR too-many-connections (0: no limit)."],
        ["max-per-peer", None, "16", "Connections at once from one IPv4 address or IPv6 /64 (0: no limit)."],
        ["web", None, None, "ENDPOINT (e.g. tcp:8009:interface=127.0.0.1) for an upload page into the same store."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        directory = self["dir"]
        checkDir(directory)
        checkPrefix(self["prefix"])
        if self["max-size"] is not None:
            self["max-size"] = sizeOption("--max-size", self["max-size"])
        self["header-timeout"] = floatOption("--header-timeout", self["header-timeout"], 0.1, 86400)
        self["idle-timeout"] = floatOption("--idle-timeout", self["idle-timeout"], 0.1, 86400 * 7)
        self["max-files-per-connection"] = intOption(
            "--max-files-per-connection", self["max-files-per-connection"], 1, 10**9)
        self["partial-ttl"] = floatOption("--partial-ttl", self["partial-ttl"], 1, 86400 * 365)
        self["max-connections"] = intOption("--max-connections", self["max-connections"], 0, 1 << 24)
        self["max-per-peer"] = intOption("--max-per-peer", self["max-per-peer"], 0, 1 << 24)
        try:
            self["token"] = loadToken(self["token-file"])
        except TokenError as e:
            raise usage.UsageError(str(e)) from None


class FileService(service.MultiService):
    """The listeners, the store they write into, and the cleaner of stale partial files."""

    def __init__(self, options: Options, reactor: IReactor | None = None) -> None:
        super().__init__()
        self.reactor = reactor or globalReactor()
        self.options = options
        self.store = FileStore(options["dir"], overwrite=options["overwrite"])
        token = options["token"]
        self.factory = FileReceiverFactory(
            self.store,
            prefix=options["prefix"],
            token=token.encode("utf-8") if token else None,
            maxSize=options["max-size"],
            headerTimeout=options["header-timeout"],
            idleTimeout=options["idle-timeout"],
            maxFiles=options["max-files-per-connection"],
            clock=self.reactor,
            maxConnections=options["max-connections"],
            maxPerPeer=options["max-per-peer"],
        )
        self.usage = UsageLog(options["usage-log"], "file", self.reactor) if options["usage-log"] else None
        self.factory.counters.usage = self.usage
        self.tcp = ListeningService(options.endpointDescriptions(), self.factory, self.reactor)
        self.tcp.setServiceParent(self)
        if options["web"]:
            webService(options["web"], self.factory, self.reactor).setServiceParent(self)
        ttl = options["partial-ttl"]
        self.cleaner = TimerService(max(1.0, min(ttl / 4, 3600.0)), self.cleanStale)
        self.cleaner.clock = self.reactor
        self.cleaner.setServiceParent(self)
        if options["metrics"]:
            from tcplab.metrics import MetricsService

            MetricsService(options["metrics"], self.metrics, self.reactor).setServiceParent(self)

    def metrics(self) -> Iterator[Family]:
        """What ``--metrics`` shows: the receiver's own counters."""
        f, c = self.factory, self.factory.counters
        yield "file_connections_accepted_total", "counter", "Connections accepted.", one(c.accepted)
        yield "file_connections_open", "gauge", "Connections open now.", one(f.connections)
        yield ("file_connections_refused_total", "counter", "Connections turned away, by the limit reached.",
               byLabel("reason", {"max_connections": c.turnedAway["max_connections"],
                                  "max_per_peer": c.turnedAway["max_per_peer"]}))
        yield "file_received_bytes_total", "counter", "Bytes received (requests and bodies).", one(c.received)
        yield "file_sent_bytes_total", "counter", "Bytes of replies sent.", one(c.sent)
        yield "file_uploads_stored_total", "counter", "Files verified and stored.", one(c.stored)
        yield "file_stored_bytes_total", "counter", "Bytes of files stored.", one(c.bytesStored)
        yield ("file_uploads_failed_total", "counter", "Requests answered with ERR, by error code.",
               byLabel("code", {code.value: c.errors[code.value] for code in ErrorCode}))
        yield ("file_verification_failures_total", "counter", "Uploads whose SHA-256 did not match (nothing stored).",
               one(c.errors[ErrorCode.CHECKSUM_MISMATCH.value]))

    def startService(self) -> None:
        super().startService()
        token = " (token required)" if self.options["token"] else ""
        log.info("storing files in {dir} as {prefix}<name>{token}", dir=os.path.abspath(self.options["dir"]),
                 prefix=escapeName(self.options["prefix"]), token=token)

    def cleanStale(self) -> Deferred[None]:
        def report(removed: int) -> None:
            if removed:
                log.info("removed {n} stale partial file(s)", n=removed)

        def failed(failure: Failure) -> None:
            log.failure("cleaning stale partial files failed", failure)

        d = self.store.runBlocking(self.store.cleanStale, self.options["partial-ttl"])
        return d.addCallbacks(report, failed)

    def stopService(self) -> Deferred[object]:
        d = super().stopService()
        if not self.factory.connections:
            self.store.close()  # else a commit may still be using it; the process is ending anyway
        if self.usage is not None:
            d.addBoth(self.usage.closeAfter)
        return d


def makeService(options: Options) -> FileService:
    service_ = FileService(options)
    service_.setName("tcplab-file")
    return service_
