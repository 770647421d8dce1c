"""``--web``: an upload page into the same store. The page sends what ``nc`` would (``PUT [token=T] <size>
<name>`` and then the bytes), as WebSocket frames streamed straight into a
:class:`~tcplab.file.receiver.FileReceiver`, so names, atomic fsync'ed storage, ``--max-size``, free
space, the token and the connection limits are the protocol's own, and reading pauses while the store
is busy (the server never holds a whole file)."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Site

from tcplab.file.receiver import FileReceiverFactory
from tcplab.interfaces import IReactor
from tcplab.listening import ListeningService
from tcplab.web import StreamingWebSocketFactory, webSite


def fileCounters(factory: FileReceiverFactory, sockets: StreamingWebSocketFactory) -> dict[str, Any]:
    """The live view's numbers, from the counters the log and ``--metrics`` read: connections, files
    stored and refused, bytes received over TCP and from browsers alike."""
    return {"connections": factory.connections, "stored": factory.stored, "refused": factory.refused,
            "bytesIn": factory.counters.received, "token": factory.token is not None, "maxSize": factory.maxSize}


def fileSite(factory: FileReceiverFactory) -> Site:
    sockets = StreamingWebSocketFactory(factory, lineMode=False)
    return webSite("tcplab.file", sockets, lambda: fileCounters(factory, sockets))


def webService(description: str, factory: FileReceiverFactory, reactor: IReactor) -> ListeningService:
    return ListeningService([description], fileSite(factory), reactor)
