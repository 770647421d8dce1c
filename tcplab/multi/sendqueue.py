"""A bounded queue of what one connection still owes its peer, with exact byte accounting.

The transport's own buffer tells its producer when it is full and when it has
drained. Registered as that producer, a :class:`SendQueue` hands bytes to the
transport only while it is not full and keeps the rest itself, so it knows to
the byte how much waits for a peer that does not read, and the transport never
holds more than its buffer size plus one write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from tcplab.interfaces import Writes


@implementer(IPushProducer)
class SendQueue:
    """Bytes for one transport, of two kinds: ``put`` always queues (what the peer
    caused itself, such as its echoes, which we must not lose: the caller keeps those
    bounded by not reading from the peer while it is paused); ``offer`` refuses what
    would take the bytes queued through ``offer`` past ``limit`` (the caller then
    decides what to do with a peer that far behind).

    ``onFull`` and ``onDrained`` are called when the transport's buffer fills and
    when it has sent everything again, queue included: the hub uses them to stop
    and restart reading from that same peer.
    """

    def __init__(
        self,
        transport: Writes,
        limit: int,
        onFull: Callable[[], None] = lambda: None,
        onDrained: Callable[[], None] = lambda: None,
    ) -> None:
        self.transport = transport
        self.limit = limit
        self.onFull = onFull
        self.onDrained = onDrained
        self.paused = False
        #: Every byte held here, and those of them that came through ``offer``.
        self.queued = 0
        self.offered = 0
        #: Bytes handed to the transport so far.
        self.written = 0
        #: Made on first use: most clients never fall behind, and 10,000 idle ones would
        #: otherwise hold 10,000 empty deques (the largest thing each client had).
        self._queue: deque[tuple[bytes, bool]] | None = None

    def put(self, data: bytes) -> None:
        """Send ``data`` or queue it, whatever the limit."""
        if self.paused:
            self._pending().append((data, False))
            self.queued += len(data)
        else:
            self.written += len(data)
            self.transport.write(data)

    def offer(self, data: bytes) -> bool:
        """Send or queue ``data``, unless that would hold more than ``limit`` offered bytes: then
        queue nothing and return False."""
        if not self.paused:
            self.written += len(data)
            self.transport.write(data)
            return True
        size = len(data)
        if self.offered + size > self.limit:
            return False
        self._pending().append((data, True))
        self.queued += size
        self.offered += size
        return True

    def clear(self) -> None:
        """Forget everything queued (the peer is being dropped)."""
        if self._queue is not None:
            self._queue.clear()  # a resumeProducing under way stops with it
            self._queue = None
        self.queued = self.offered = 0

    def takeAll(self) -> list[bytes]:
        """Everything queued, oldest first, and the queue emptied (to hand it to a closing transport)."""
        chunks = [data for data, _ in self._queue or ()]
        self.clear()
        return chunks

    def _pending(self) -> deque[tuple[bytes, bool]]:
        if self._queue is None:
            self._queue = deque()
        return self._queue

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.onFull()

    def resumeProducing(self) -> None:
        self.paused = False
        queue = self._queue
        while queue and not self.paused:
            data, offered = queue.popleft()
            size = len(data)
            self.queued -= size
            if offered:
                self.offered -= size
            self.written += size
            self.transport.write(data)
        if not self.paused:
            self.onDrained()

    def stopProducing(self) -> None:
        self.clear()
