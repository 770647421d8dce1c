"""Backpressure: stop reading from a peer while what we owe it cannot be sent."""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer, ITransport
from zope.interface import implementer


@implementer(IPushProducer)
class ReadThrottle:
    """Registered as the producer of a transport's own writes, so a full write
    buffer pauses reading from that same transport (and a drained one resumes it).

    Works for TCP, UNIX and TLS transports alike: each of them (or the transport
    under a TLS wrapper) can pause and resume its reading.
    """

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self.paused = False
        self._transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.paused = False


def throttleReadsOnWrites(transport: ITransport) -> ReadThrottle:
    """Make ``transport`` stop reading while its own outgoing buffer is full."""
    throttle = ReadThrottle(transport)
    transport.registerProducer(throttle, True)  # type: ignore[attr-defined]
    return throttle
