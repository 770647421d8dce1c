"""Several tcplab-multi processes as one room: a backplane carries each node's broadcasts to the others.

The hub (:class:`tcplab.multi.hub.MultiHub`) hands its node's :class:`Backplane` what
its own clients produce (lines, joins, leaves, renames) and gets back, through
``deliverRemote``, the bytes other nodes' clients produced, already prefixed and
escaped at their origin: it gives them to its clients through the same
per-client send queues as its own broadcasts, so slow readers are dropped
exactly as before. Who is connected to the other nodes is kept here (for
``/who``, welcome counts, unique names), from the presence events on the wire
and from snapshots each node keeps in the shared store with an expiry.

:class:`Backplane` is that logic with no network; :class:`RedisBackplane` runs it
over Redis pub/sub (txredisapi). The envelope format is in docs/PROTOCOL.md,
"Backplane".
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="tcplab.multi.backplane")

MAGIC = b"TLB\x01"

#: Frame kinds.
LINES = b"L"
JOIN = b"J"
PART = b"P"
NICK = b"N"
HELLO = b"H"
BYE = b"B"
_KINDS = frozenset((LINES, JOIN, PART, NICK, HELLO, BYE))

#: Frames queued in one reactor turn go out as one message; a message is sent early at this size.
FLUSH_BYTES = 64 * 1024

#: Bytes handed to the store and not yet acknowledged, past which new messages are dropped (counted).
MAX_UNANSWERED = 4 << 20

_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
CHANNEL = re.compile(r"[A-Za-z0-9._:-]{1,100}")


class BadEnvelope(ValueError):
    """A message on the channel that is not a tcplab backplane envelope."""


@dataclass(frozen=True)
class Frame:
    """One event from one node: ``LINES`` (payload: bytes for every client, ``name`` the sender),
    ``JOIN``/``PART`` (``name``; payload: the notice, maybe empty), ``NICK`` (``name`` becomes
    ``other``), ``HELLO`` (a node (re)connected) or ``BYE`` (a node is stopping)."""

    kind: bytes
    name: str = ""
    other: str = ""
    payload: bytes = b""


@dataclass(frozen=True)
class Envelope:
    """One message: the node that sent it, its sequence number there (1, 2, ...), and its frames."""

    node: str
    seq: int
    frames: tuple[Frame, ...]


def encodeFrame(kind: bytes, name: str = "", other: str = "", payload: bytes = b"") -> bytes:
    rawName, rawOther = name.encode("utf-8"), other.encode("utf-8")
    if len(rawName) > 255 or len(rawOther) > 255:
        raise ValueError("a name in a backplane frame is at most 255 bytes")
    return b"".join((kind, bytes((len(rawName),)), rawName, bytes((len(rawOther),)), rawOther,
                     len(payload).to_bytes(4, "big"), payload))


def encodeEnvelope(node: str, seq: int, frames: Iterable[bytes]) -> bytes:
    """``frames`` are :func:`encodeFrame` results."""
    rawNode = node.encode("ascii")
    return b"".join((MAGIC, bytes((len(rawNode),)), rawNode, seq.to_bytes(8, "big"), *frames))


def decodeEnvelope(data: bytes) -> Envelope:
    """The envelope in ``data``, or :class:`BadEnvelope`."""
    if data[:4] != MAGIC:
        raise BadEnvelope("not a tcplab backplane message")
    try:
        size = data[4]
        end = 5 + size
        node = data[5:end].decode("ascii")
        if _NODE_ID.fullmatch(node) is None:
            raise BadEnvelope(f"bad node id {node!r}")
        if len(data) < end + 8:
            raise BadEnvelope("truncated header")
        seq = int.from_bytes(data[end:end + 8], "big")
        pos = end + 8
        frames = []
        while pos < len(data):
            kind = data[pos:pos + 1]
            if kind not in _KINDS:
                raise BadEnvelope(f"unknown frame kind {kind!r}")
            nameEnd = pos + 2 + data[pos + 1]
            name = data[pos + 2:nameEnd].decode("utf-8")
            otherEnd = nameEnd + 1 + data[nameEnd]
            other = data[nameEnd + 1:otherEnd].decode("utf-8")
            payloadEnd = otherEnd + 4 + int.from_bytes(data[otherEnd:otherEnd + 4], "big")
            if otherEnd + 4 > len(data) or payloadEnd > len(data):
                raise BadEnvelope("truncated frame")
            frames.append(Frame(kind, name, other, data[otherEnd + 4:payloadEnd]))
            pos = payloadEnd
    except (IndexError, UnicodeDecodeError) as e:
        raise BadEnvelope(f"malformed: {e}") from None
    if seq < 1:
        raise BadEnvelope("sequence numbers start at 1")
    return Envelope(node, seq, tuple(frames))


def makeNodeId() -> str:
    """``HOST.PID.RANDOM``: unique per process run, readable in logs."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}.{os.getpid()}.{secrets.token_hex(3)}"


def encodeSnapshot(seq: int, names: Iterable[str]) -> bytes:
    """A node's presence value: the sequence number it reflects, then its names in join order."""
    return b"\n".join((b"%d" % seq, *(name.encode("utf-8") for name in names)))


def decodeSnapshot(value: bytes) -> tuple[int, list[str]]:
    head, *names = value.split(b"\n")
    try:
        return int(head), [name.decode("utf-8") for name in names if name]
    except (ValueError, UnicodeDecodeError):
        raise BadEnvelope("malformed presence snapshot") from None


class LocalHub(Protocol):
    """What a backplane needs from the hub of its node."""

    def deliverRemote(self, data: bytes) -> None:
        """Give ``data`` (whole lines from another node) to every local client."""

    def localNames(self) -> Iterable[str]:
        """The names of this node's clients, in join order."""


@dataclass
class RemoteNode:
    """What this node knows of another: its clients' names (lower-cased -> as given), the last
    message delivered from it and the last one its roster reflects, and when its last message came
    (a node whose presence key is missing is forgotten only if it has been silent for ``ttl``: right
    after a Redis restart, a live node may not have written its key yet)."""

    names: dict[str, str] = field(default_factory=dict)
    deliveredSeq: int = 0
    rosterSeq: int = 0
    heard: float = 0.0
    gone: bool = False


@dataclass
class BackplaneStats:
    sent: int = 0
    received: int = 0
    dropped: int = 0
    duplicates: int = 0
    missed: int = 0
    malformed: int = 0


class Backplane:
    """One node's side of the backplane, without the network.

    Frames produced in one reactor turn are sent as one message (see
    :meth:`flush`); a subclass sends it in :meth:`_send`, says whether it can
    in :meth:`_canSend`, and calls :meth:`received` with each message from the
    channel, own ones included (they are recognised by node id and ignored).
    Messages from a node are delivered once, in its order: one whose sequence
    number is not above the last delivered from that node is a duplicate.
    """

    def __init__(self, nodeId: str | None = None, clock: IReactorTime | None = None, ttl: float = 15.0) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.nodeId = nodeId or makeNodeId()
        if _NODE_ID.fullmatch(self.nodeId) is None:
            raise ValueError(f"bad node id {self.nodeId!r}")
        self.ttl = ttl
        self.seq = 0
        self.hub: LocalHub | None = None
        self.remotes: dict[str, RemoteNode] = {}
        self.remoteTotal = 0
        self.stats = BackplaneStats()
        self._frames: list[bytes] = []
        self._framesSize = 0
        self._framesLines = 0
        self._flushCall: IDelayedCall | None = None
        self._loggedMalformed = False
        self._ownHeader = MAGIC + bytes((len(self.nodeId),)) + self.nodeId.encode("ascii")

    def attach(self, hub: LocalHub) -> None:
        self.hub = hub

    # -- what the hub tells the other nodes

    def publish(self, data: bytes, sender: str) -> None:
        """Lines for every client on the other nodes (prefixed and escaped)."""
        self._queue(encodeFrame(LINES, sender, "", data), data.count(b"\n"))

    def joined(self, name: str, notice: bytes) -> None:
        self._queue(encodeFrame(JOIN, name, "", notice), notice.count(b"\n"))

    def left(self, name: str, notice: bytes) -> None:
        self._queue(encodeFrame(PART, name, "", notice), notice.count(b"\n"))

    def renamed(self, old: str, new: str) -> None:
        self._queue(encodeFrame(NICK, old, new), 0)

    # -- what the hub asks

    def remoteCount(self) -> int:
        return self.remoteTotal

    def remoteNames(self) -> Iterator[str]:
        for remote in self.remotes.values():
            yield from remote.names.values()

    def isTaken(self, name: str) -> bool:
        """True if a client on another node has ``name`` (ignoring case)."""
        lower = name.lower()
        return any(lower in remote.names for remote in self.remotes.values())

    # -- sending

    def _queue(self, frame: bytes, lines: int) -> None:
        self._frames.append(frame)
        self._framesSize += len(frame)
        self._framesLines += lines
        if self._framesSize >= FLUSH_BYTES:
            self.flush()
        elif self._flushCall is None:
            self._flushCall = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send what was queued as one message, or drop it (counted) if it cannot be sent now."""
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        if not self._frames:
            return
        frames, lines, size = self._frames, self._framesLines, self._framesSize
        self._frames, self._framesLines, self._framesSize = [], 0, 0
        if not self._canSend(size):
            self.stats.dropped += lines
            return
        self.seq += 1
        self.stats.sent += lines
        self._send(encodeEnvelope(self.nodeId, self.seq, frames))

    def _canSend(self, size: int) -> bool:
        return False

    def _send(self, message: bytes) -> None:
        raise NotImplementedError

    def stopFlushing(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None

    # -- receiving

    def received(self, message: bytes) -> None:
        """One message from the channel."""
        if message.startswith(self._ownHeader):
            return
        try:
            envelope = decodeEnvelope(message)
        except BadEnvelope as e:
            self.stats.malformed += 1
            if not self._loggedMalformed:
                self._loggedMalformed = True
                log.warn("backplane: ignoring a message on the channel that is not from tcplab-multi ({why}); "
                         "more are only counted", why=str(e))
            return
        remote = self.remotes.get(envelope.node)
        if remote is None:
            remote = self.remotes[envelope.node] = RemoteNode()
            if envelope.seq > 1:
                self._wantPresence()
        if envelope.seq <= remote.deliveredSeq:
            self.stats.duplicates += 1
            return
        if remote.deliveredSeq and envelope.seq > remote.deliveredSeq + 1:
            self.stats.missed += envelope.seq - remote.deliveredSeq - 1
        remote.deliveredSeq = envelope.seq
        remote.heard = self.clock.seconds()
        current = envelope.seq > remote.rosterSeq and not remote.gone
        payloads = []
        for frame in envelope.frames:
            if frame.payload:
                payloads.append(frame.payload)
            if current:
                self._apply(envelope.node, remote, frame)
        if current and not remote.gone:
            remote.rosterSeq = envelope.seq
        if payloads:
            data = b"".join(payloads)
            self.stats.received += data.count(b"\n")
            if self.hub is not None:
                self.hub.deliverRemote(data)

    def _apply(self, node: str, remote: RemoteNode, frame: Frame) -> None:
        names = remote.names
        before = len(names)
        if frame.kind == JOIN:
            names[frame.name.lower()] = frame.name
        elif frame.kind == PART:
            names.pop(frame.name.lower(), None)
        elif frame.kind == NICK:
            names.pop(frame.name.lower(), None)
            names[frame.other.lower()] = frame.other
        elif frame.kind == HELLO:
            self._wantPresence()
        elif frame.kind == BYE:
            remote.gone = True
            names.clear()
        self.remoteTotal += len(names) - before

    # -- presence

    def snapshot(self) -> bytes:
        """This node's presence value (anything queued is sent first, so the snapshot's number covers it)."""
        self.flush()
        return encodeSnapshot(self.seq, self.hub.localNames() if self.hub is not None else ())

    def applySnapshot(self, node: str, value: bytes) -> None:
        """Another node's presence value, as read from the store: it replaces what events told us of
        that node unless they are more recent."""
        if node == self.nodeId:
            return
        try:
            seq, names = decodeSnapshot(value)
        except BadEnvelope:
            self.stats.malformed += 1
            return
        remote = self.remotes.get(node)
        if remote is None:
            remote = self.remotes[node] = RemoteNode()
        if remote.gone or seq < remote.rosterSeq:
            return
        self.remoteTotal -= len(remote.names)
        remote.names = {name.lower(): name for name in names}
        self.remoteTotal += len(remote.names)
        remote.rosterSeq = seq

    def presenceRead(self, snapshots: dict[str, bytes | None]) -> list[str]:
        """Apply everything the store holds (node id -> value, None if expired); forget nodes
        not in the store that sent nothing for ``ttl``. Returns the expired node ids, for the
        caller to remove from the store's list."""
        now = self.clock.seconds()
        expired = []
        for node, value in snapshots.items():
            if node == self.nodeId:
                continue
            if value is None:
                expired.append(node)
            else:
                self.applySnapshot(node, value)
        for node, remote in list(self.remotes.items()):
            if snapshots.get(node) is None and now - remote.heard > self.ttl:
                self.forget(node)
        return expired

    def forget(self, node: str) -> None:
        remote = self.remotes.pop(node, None)
        if remote is not None:
            self.remoteTotal -= len(remote.names)

    def _wantPresence(self) -> None:
        """An unknown node spoke, or a node (re)connected: read the store soon."""

    def state(self) -> str:
        """For the stats line."""
        return "up"

    def statsFields(self) -> dict[str, int | str]:
        s = self.stats
        return {
            "bpState": self.state(), "bpSent": s.sent, "bpReceived": s.received, "bpDropped": s.dropped,
            "bpDuplicates": s.duplicates, "bpMissed": s.missed, "bpMalformed": s.malformed,
            "bpNodes": sum(not remote.gone for remote in self.remotes.values()), "bpRemoteClients": self.remoteTotal,
        }


@dataclass(frozen=True)
class RedisAddress:
    """Where the Redis server is: from ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """Raise ValueError with a one-line reason if ``url`` is not a usable ``redis://`` URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}") from None
    if parts.scheme != "redis":
        raise ValueError(f"bad Redis URL {url!r}: use redis://HOST:PORT/DB (rediss:// and unix sockets are not "
                         "supported)")
    if not parts.hostname:
        raise ValueError(f"bad Redis URL {url!r}: no host (use redis://HOST:PORT/DB)")
    path = parts.path.strip("/")
    if parts.query or parts.fragment or (path and not path.isdigit()):
        raise ValueError(f"bad Redis URL {url!r}: the path is the database number, e.g. redis://HOST:6379/0")
    return RedisAddress(
        parts.hostname, port or 6379, int(path) if path else 0,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password is not None else None,
    )


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint that reports failed connection attempts (txredisapi retries them quietly)."""

    def __init__(self, endpoint: IStreamClientEndpoint, onFailure: Callable[[Failure], None], name: str) -> None:
        self.endpoint = endpoint
        self.onFailure = onFailure
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def connect(self, factory: Any) -> Deferred[Any]:
        return self.endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        self.onFailure(failure)
        return failure


@functools.cache
def _redisClasses() -> tuple[Any, type, type]:
    """txredisapi and our protocols on it, imported only when a Redis backplane starts (txredisapi
    imports the reactor, which twistd must have chosen first)."""
    import txredisapi  # a dependency of tcplab; its presence is checked when options are parsed

    class Commands(txredisapi.RedisProtocol):  # type: ignore[misc, name-defined]
        def connectionMade(self) -> Any:
            self.whenConnected().addCallback(self.factory.backplane._commandsReady)
            return super().connectionMade()

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.backplane._lost(self, why)

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc, name-defined]
        def connectionMade(self) -> Any:
            self.whenConnected().addCallback(self.factory.backplane._subscriberReady)
            return super().connectionMade()

        def messageReceived(self, pattern: object, channel: object, message: object) -> None:
            if isinstance(message, bytes):
                self.factory.backplane.received(message)

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.backplane._lost(self, why)

    return txredisapi, Commands, Subscriber


def _ignore(_: object) -> None:
    return None


class RedisBackplane(Backplane):
    """The backplane over Redis: one connection subscribed to the channel, one for PUBLISH and
    presence (``SET CHANNEL:node:ID ... PX ttl`` and the set ``CHANNEL:nodes``).

    While either connection is down, the node serves its own clients, drops (and counts) what it
    would have sent, and reconnects with txredisapi's backoff; one log line says so, one more
    when Redis is back. Messages are never queued for a Redis that is down or not answering:
    past ``maxUnanswered`` unacknowledged bytes they are dropped too.
    """

    def __init__(
        self,
        address: RedisAddress,
        channel: str = "tcplab-multi",
        reactor: Any = None,
        ttl: float = 15.0,
        nodeId: str | None = None,
        maxUnanswered: int = MAX_UNANSWERED,
        replyTimeout: float = 10.0,
        initialDelay: float = 1.0,
        maxDelay: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(nodeId, reactor, ttl)
        if CHANNEL.fullmatch(channel) is None:
            raise ValueError(f"bad channel name {channel!r}")
        self.reactor = reactor
        self.address = address
        self.channel = channel
        self.presenceKey = f"{channel}:node:{self.nodeId}"
        self.nodesKey = f"{channel}:nodes"
        self.maxUnanswered = maxUnanswered
        self.replyTimeout = replyTimeout
        self.initialDelay = initialDelay
        self.maxDelay = maxDelay
        self.unanswered = 0
        self._commands: Any = None
        self._subscriber: Any = None
        self._factories: list[Any] = []
        self._refresh: LoopingCall | None = None
        self._presenceCall: IDelayedCall | None = None
        self._reading = False
        self._readAgain = False
        self._stopping = False
        self._everUp = False
        self._outageSince: float | None = None
        self._outageLogged = False
        self._droppedBefore = 0
        self._congested = False
        self._loggedRefusal = False
        self._whenUp: list[Deferred[None]] = []

    @property
    def up(self) -> bool:
        return self._commands is not None and self._subscriber is not None

    def whenUp(self) -> Deferred[None]:
        """Fires once both connections are ready (at once if they are)."""
        if self.up:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._whenUp.append(d)
        return d

    # -- starting and stopping

    def start(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint

        txredisapi, Commands, Subscriber = _redisClasses()
        log.info("backplane: node {node}, channel {channel} on {address}", node=self.nodeId, channel=self.channel,
                 address=str(self.address))
        self._outageSince = self.clock.seconds()
        for protocol, dbid in ((Commands, self.address.db), (Subscriber, None)):
            factory = txredisapi.RedisFactory(
                f"{self.address.host}:{self.address.port}", dbid, 1, isLazy=True, charset=None,
                password=self.address.password, replyTimeout=self.replyTimeout, convertNumbers=False,
                username=self.address.username,
            )
            factory.protocol = protocol
            factory.backplane = self
            factory.initialDelay = self.initialDelay
            factory.maxDelay = self.maxDelay
            factory.deferred.addErrback(self._refused)
            endpoint = HostnameEndpoint(self.reactor, self.address.host, self.address.port, timeout=10)
            factory.startConnecting(_WatchedEndpoint(endpoint, self._connectFailed, f"{self.address} (backplane)"))
            self._factories.append(factory)
        self._refresh = LoopingCall(self._refreshPresence)
        self._refresh.clock = self.clock
        self._refresh.start(max(self.ttl / 3, 0.1), now=False)

    def stop(self) -> Deferred[None]:
        """Say goodbye (if connected), remove this node's presence, close both connections."""
        self._stopping = True
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self._presenceCall is not None and self._presenceCall.active():
            self._presenceCall.cancel()
        last: Deferred[Any] = succeed(None)
        commands = self._commands
        if commands is not None:
            self._queue(encodeFrame(BYE), 0)
            self.flush()
            try:
                commands.delete(self.presenceKey).addErrback(self._failed)
                last = commands.srem(self.nodesKey, self.nodeId).addErrback(self._failed)
            except Exception:
                pass
            last.addTimeout(2, self.clock).addErrback(_ignore)
        self.stopFlushing()
        self._frames, self._framesSize, self._framesLines = [], 0, 0
        waiting, self._whenUp = self._whenUp, []
        for d in waiting:
            d.cancel()

        def disconnect(_: object) -> Deferred[Any]:
            return DeferredList([f.disconnect() for f in self._factories], consumeErrors=True)

        return last.addCallback(disconnect).addCallback(_ignore)

    # -- connection state

    def _commandsReady(self, protocol: Any) -> None:
        if self._stopping:
            return
        self._commands = protocol
        self._stateChanged()

    def _subscriberReady(self, protocol: Any) -> None:
        if self._stopping:
            return
        protocol.subscribe(self.channel).addCallbacks(lambda _: self._subscribed(protocol), self._failed)

    def _subscribed(self, protocol: Any) -> None:
        if self._stopping or not protocol.connected:
            return
        self._subscriber = protocol
        self._stateChanged()

    def _lost(self, protocol: Any, why: Failure) -> None:
        wasUp = self.up
        if protocol is self._commands:
            self._commands = None
            self.unanswered = 0
            self._congested = False
        elif protocol is self._subscriber:
            self._subscriber = None
        else:
            return
        if self._stopping or not wasUp:
            return
        self._outageSince = self.clock.seconds()
        self._outageLogged = True
        self._droppedBefore = self.stats.dropped
        log.warn("backplane: lost Redis at {address} ({why}): serving this server's clients only, lines are not "
                 "sent to other servers (dropped and counted) until it is back; reconnecting with backoff",
                 address=str(self.address), why=why.getErrorMessage())

    def _connectFailed(self, failure: Failure) -> None:
        if self._stopping or self._outageLogged:
            return
        self._outageLogged = True
        self._droppedBefore = self.stats.dropped
        log.warn("backplane: cannot reach Redis at {address} ({why}): serving this server's clients only; "
                 "retrying with backoff", address=str(self.address), why=failure.getErrorMessage())

    def _refused(self, failure: Failure) -> None:
        """txredisapi gave up: Redis refused AUTH or SELECT (it stops trying by itself)."""
        log.error("backplane: Redis at {address} refused this node ({why}): check --backplane; serving this "
                  "server's clients only", address=str(self.address), why=failure.getErrorMessage())

    def _stateChanged(self) -> None:
        if not self.up:
            return
        since, self._outageSince = self._outageSince, None
        if not self._everUp:
            self._everUp = True
            log.info("backplane: connected to Redis at {address}", address=str(self.address))
        else:
            seconds = self.clock.seconds() - since if since is not None else 0.0
            log.info("backplane: Redis at {address} is back after {seconds:.1f}s: lines reach the other servers "
                     "again ({dropped} lines were not sent meanwhile)", address=str(self.address), seconds=seconds,
                     dropped=self.stats.dropped - self._droppedBefore)
        self._outageLogged = False
        self._queue(encodeFrame(HELLO), 0)
        self._refreshPresence()
        waiting, self._whenUp = self._whenUp, []
        for d in waiting:
            d.callback(None)

    # -- sending

    def _canSend(self, size: int) -> bool:
        if self._commands is None:
            return False
        if self.unanswered + size > self.maxUnanswered:
            if not self._congested:
                self._congested = True
                self._droppedBefore = self.stats.dropped
                log.warn("backplane: Redis at {address} is not keeping up ({bytes} bytes unanswered): lines for "
                         "other servers are dropped (and counted) until it does", address=str(self.address),
                         bytes=self.unanswered)
            return False
        if self._congested:
            self._congested = False
            log.info("backplane: Redis at {address} keeps up again ({dropped} lines were not sent meanwhile)",
                     address=str(self.address), dropped=self.stats.dropped - self._droppedBefore)
        return True

    def _send(self, message: bytes) -> None:
        commands = self._commands
        size = len(message)
        try:
            d = commands.publish(self.channel, message)
        except Exception:
            return
        self.unanswered += size

        def answered(_: object) -> None:
            if commands is self._commands:
                self.unanswered -= size

        d.addBoth(answered)

    # -- presence

    def _refreshPresence(self) -> None:
        """Write this node's snapshot (with expiry) and read the others'; also pings the subscriber,
        so a connection that died silently is noticed (txredisapi times the reply out)."""
        commands = self._commands
        if commands is None or self._stopping:
            return
        ms = max(int(self.ttl * 1000), 1)
        try:
            if self._subscriber is not None:
                self._subscriber.ping().addErrback(self._failed)
            commands.set(self.presenceKey, self.snapshot(), pexpire=ms).addErrback(self._failed)
            commands.sadd(self.nodesKey, self.nodeId).addErrback(self._failed)
            commands.execute_command("PEXPIRE", self.nodesKey, ms * 4).addErrback(self._failed)
        except _redisClasses()[0].ConnectionError:
            return
        self._readPresence()

    def _wantPresence(self) -> None:
        if self._presenceCall is None or not self._presenceCall.active():
            self._presenceCall = self.clock.callLater(0.2, self._readPresence)

    def _readPresence(self) -> None:
        commands = self._commands
        if commands is None or self._stopping:
            return
        if self._reading:
            self._readAgain = True
            return
        self._reading = True

        async def read() -> None:
            members = await commands.smembers(self.nodesKey)
            nodes = sorted(m.decode("ascii", "replace") for m in members)
            values = await commands.mget([f"{self.channel}:node:{node}" for node in nodes]) if nodes else []
            expired = self.presenceRead(dict(zip(nodes, values, strict=True)))
            if expired and self._commands is commands:
                commands.srem(self.nodesKey, expired).addErrback(self._failed)

        def done(_: object) -> None:
            self._reading = False
            if self._readAgain:
                self._readAgain = False
                self._readPresence()

        Deferred.fromCoroutine(read()).addErrback(self._failed).addBoth(done)

    def _failed(self, failure: Failure) -> None:
        """A command that failed: quietly if the connection went (that is logged once, elsewhere)."""
        redis = _redisClasses()[0]
        if failure.check(redis.ResponseError):
            if not self._loggedRefusal:
                self._loggedRefusal = True
                log.warn("backplane: Redis at {address} refused a command ({why}); more such errors are not "
                         "logged", address=str(self.address), why=failure.getErrorMessage())
        elif not failure.check(redis.RedisError, CancelledError, DeferredTimeout):
            log.failure("backplane: unexpected error", failure)

    def state(self) -> str:
        if self._stopping:
            return "stopped"
        return "up" if self.up else "DOWN (serving this server's clients only)"


#: The backplane's part of the periodic stats line (fields from :meth:`Backplane.statsFields`).
STATS_FORMAT = (
    "backplane: {bpState}, {bpNodes} other servers with {bpRemoteClients} clients; lines: {bpSent} sent, "
    "{bpReceived} received, {bpDropped} not sent (store down or behind); {bpDuplicates} duplicate and "
    "{bpMissed} missed messages, {bpMalformed} malformed"
)
