"""What tcplab relies on of its transports and reactors, named once for the type checker.

Twisted types ``Protocol.transport`` as ``ITransport | None`` and the global reactor as the part
of it every platform has (``_IReactorCommon``). A connected stream protocol's transport is in
fact a TCP, UNIX or TLS transport, which also takes producers, pauses its own reading and
aborts; and tcplab's services run on a reactor that also listens on UDP and UNIX sockets.
Protocols narrow ``transport`` to :class:`StreamTransport`, services take an :class:`IReactor`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

from twisted.internet.interfaces import (
    IAddress,
    IProducer,
    IReactorCore,
    IReactorSocket,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
    IReactorUNIX,
    ITransport,
)
from zope.interface import implementer


class IReactor(
    IReactorCore, IReactorTime, IReactorTCP, IReactorSSL, IReactorUNIX, IReactorUDP, IReactorSocket, IReactorThreads
):
    """The reactor tcplab's services and commands run on, for annotations only: as Twisted's own
    ``_IReactorCommon``, no reactor declares it (ask for the single interfaces with providedBy)."""


class Writes(Protocol):
    """Anything bytes are written to: a transport, or the writes one turn gathers for it
    (:class:`tcplab.flow.TurnWrites`)."""

    def write(self, data: bytes) -> None: ...


@implementer(ITransport)
class StreamTransport(Protocol):
    """What tcplab uses of a connected TCP, UNIX or TLS transport: ``ITransport``, plus some of
    ``ITCPTransport`` (it aborts), ``IConsumer`` (it takes a producer for what is written to it)
    and ``IPushProducer`` (it pauses its own reading).

    Declared an ``ITransport`` so that a protocol may narrow Twisted's ``transport: ITransport |
    None`` to it (and mypy-zope checks the ``ITransport`` members below against the interface).
    """

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


def globalReactor() -> IReactor:
    """Twisted's global reactor (installed on first use), typed as what it provides here."""
    from twisted.internet import reactor

    return cast(IReactor, reactor)
