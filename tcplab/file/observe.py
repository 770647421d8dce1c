"""What the file drop counts for ``--metrics``, and records for ``--usage-log``.

The receiver calls one method here at each event (a connection opens, bytes arrive, an upload is
stored or refused, the connection closes), so the receiver itself stays about the protocol.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from tcplab.file.wire import ErrorCode
from tcplab.usagelog import UsageLog

if TYPE_CHECKING:
    from tcplab.file.receiver import FileReceiver

_CODES = frozenset(code.value for code in ErrorCode)


class FileCounters:
    """Counters since the server started; ``usage`` (``--usage-log``) gets one record per finished
    upload attempt and per connection. Tokens never pass through here."""

    def __init__(self, usage: UsageLog | None = None) -> None:
        self.usage = usage
        self.accepted = 0
        self.received = 0
        self.sent = 0
        self.stored = 0
        self.bytesStored = 0
        #: ERR replies by code (a fixed set: each is one metric label).
        self.errors: Counter[str] = Counter()
        #: Connections turned away, by the limit that did it.
        self.turnedAway: Counter[str] = Counter()
        self._started: dict[FileReceiver, tuple[float, list[int]]] = {}
        self._requested: dict[FileReceiver, float] = {}

    def opened(self, receiver: FileReceiver) -> None:
        """Count the connection and what is written to it (the replies)."""
        self.accepted += 1
        transport: Any = receiver.transport
        out = [0]
        write = transport.write

        def counted(data: bytes) -> None:
            out[0] += len(data)
            self.sent += len(data)
            write(data)

        transport.write = counted
        self._started[receiver] = (receiver.factory.clock.seconds(), out)

    def turnedAwayFor(self, refusal: str) -> None:
        self.turnedAway["max_per_peer" if "--max-per-peer" in refusal else "max_connections"] += 1

    def request(self, receiver: FileReceiver) -> None:
        """A request line arrived: an upload record's start."""
        self._requested[receiver] = receiver.factory.clock.seconds()

    def storedUpload(self, receiver: FileReceiver, name: str, size: int, sha256: str) -> None:
        self.stored += 1
        self.bytesStored += size
        if self.usage is not None:
            self.usage.upload(self._requestStart(receiver), receiver.peer, name, size, sha256, "stored",
                              "verified and stored")

    def failed(self, receiver: FileReceiver, code: object, message: str) -> None:
        """An ERR reply: counted by code; an upload record if it concerned a file."""
        label = str(code) if str(code) in _CODES else "other"
        self.errors[label] += 1
        if self.usage is None or receiver._subject is None:
            return
        put = receiver._put
        size = put.size if put is not None and put.name == receiver._subject else 0
        self.usage.upload(self._requestStart(receiver), receiver.peer, receiver._name(), size, None, label, message)

    def closed(self, receiver: FileReceiver) -> None:
        """Called first thing in connectionLost, while the receiver still knows how it ended."""
        started, out = self._started.pop(receiver, (None, [0]))
        upload = receiver._upload
        if self.usage is not None and upload is not None:
            self.usage.upload(self._requestStart(receiver), receiver.peer, receiver._name(), upload.size, None,
                              "interrupted", f"connection closed after {upload.position} of {upload.size} bytes")
        self._requested.pop(receiver, None)
        if self.usage is None or started is None:
            return
        if not receiver.admitted:
            outcome = "refused"
        elif upload is not None:
            outcome = "interrupted"
        elif receiver.state.value == "closing":
            outcome = "error"
        else:
            outcome = "closed"
        self.usage.connection(started, receiver.peer, receiver.bytesIn, out[0], outcome,
                              f"{receiver.requests} request(s)")

    def _requestStart(self, receiver: FileReceiver) -> float:
        started = self._requested.pop(receiver, None)
        if started is None:
            started = self._started.get(receiver, (receiver.factory.clock.seconds(), []))[0]
        return started
