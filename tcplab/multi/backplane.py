"""Several tcplab-multi processes as one room: the hub's side of the backplane.

The hub (:class:`tcplab.multi.hub.MultiHub`) hands its node's :class:`Backplane` what
its own clients produce (lines, joins, leaves, renames) and gets back, through
``deliverRemote``, the bytes other nodes' clients produced, already prefixed and
escaped at their origin: it gives them to its clients through the same
per-client send queues as its own broadcasts, so slow readers are dropped
exactly as before. Who is connected to the other nodes is kept here (for
``/who``, welcome counts, unique names), from the presence events on the wire
and from snapshots each node keeps in the shared store with an expiry.

:class:`Backplane` is that logic with no network: the envelope it reads and writes is
:mod:`tcplab.multi.envelope`, and :class:`tcplab.multi.redis.RedisBackplane` carries it over
Redis pub/sub (docs/PROTOCOL.md, "Backplane").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tcplab.interfaces import globalReactor
from tcplab.multi.envelope import (
    BYE,
    HELLO,
    JOIN,
    LINES,
    NICK,
    NODE_ID,
    PART,
    BadEnvelope,
    Frame,
    decodeEnvelope,
    decodeSnapshot,
    encodeEnvelope,
    encodeFrame,
    encodeSnapshot,
    envelopeHeader,
    makeNodeId,
)

log = Logger(namespace="tcplab.multi.backplane")

#: Frames queued in one reactor turn go out as one message; a message is sent early at this size.
FLUSH_BYTES = 64 * 1024

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
    :meth:`flush`); a subclass (the carrier: :class:`tcplab.multi.redis.RedisBackplane`)
    sends it in :meth:`_send`, says whether it can in :meth:`_canSend`, reads the
    store when :meth:`_wantPresence` asks, and calls :meth:`received` with each
    message from the channel, own ones included (they are recognised by node id and
    ignored).

    Messages from a node are delivered once, in its order: one whose sequence
    number is not above the last delivered from that node is a duplicate.
    """

    def __init__(self, nodeId: str | None = None, clock: IReactorTime | None = None, ttl: float = 15.0) -> None:
        self.clock: IReactorTime = globalReactor() if clock is None else clock
        self.nodeId = nodeId or makeNodeId()
        if NODE_ID.fullmatch(self.nodeId) is None:
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
        self._ownHeader = envelopeHeader(self.nodeId)

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

    def discardQueued(self) -> None:
        """Forget what is queued, unsent and uncounted (the node is stopping)."""
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        self._frames, self._framesSize, self._framesLines = [], 0, 0

    # -- what the carrier tells the other nodes

    def hello(self) -> None:
        """This node (re)connected: the others read its presence soon."""
        self._queue(encodeFrame(HELLO), 0)

    def goodbye(self) -> None:
        """This node is stopping: send what is queued and a BYE frame now (the others forget it)."""
        self._queue(encodeFrame(BYE), 0)
        self.flush()

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

    def statsFields(self) -> BackplaneStatsFields:
        s = self.stats
        return {
            "bpState": self.state(), "bpSent": s.sent, "bpReceived": s.received, "bpDropped": s.dropped,
            "bpDuplicates": s.duplicates, "bpMissed": s.missed, "bpMalformed": s.malformed,
            "bpNodes": sum(not remote.gone for remote in self.remotes.values()), "bpRemoteClients": self.remoteTotal,
        }


class BackplaneStatsFields(TypedDict):
    """The backplane's state and counters, as the stats line and ``--metrics`` read them."""

    bpState: str
    bpSent: int
    bpReceived: int
    bpDropped: int
    bpDuplicates: int
    bpMissed: int
    bpMalformed: int
    bpNodes: int
    bpRemoteClients: int


#: The backplane's part of the periodic stats line (fields from :meth:`Backplane.statsFields`).
STATS_FORMAT = (
    "backplane: {bpState}, {bpNodes} other servers with {bpRemoteClients} clients; lines: {bpSent} sent, "
    "{bpReceived} received, {bpDropped} not sent (store down or behind); {bpDuplicates} duplicate and "
    "{bpMissed} missed messages, {bpMalformed} malformed"
)

