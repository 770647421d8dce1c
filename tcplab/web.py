"""The browser side shared by the wings: a WebSocket that is the transport of a wing's own protocol,
and the twisted.web Site that serves a wing's page, its WebSocket and its live counters.

Browsers cannot open raw TCP, so a browser client is a WebSocket whose frames are fed, as they
arrive, to the same protocol a TCP client gets (a :class:`~tcplab.multi.hub.HubClient`, a
:class:`~tcplab.file.receiver.FileReceiver`): limits, queues and checks stay in one place. Nothing
is buffered whole: frame payloads are streamed as they are read, and the protocol's pause and
resume reach the TCP socket under the WebSocket, so backpressure is the protocol's own.

Everything the page needs is served from here (no CDN, no build step), with a Content Security
Policy that allows only this origin; the WebSocket refuses a handshake whose ``Origin`` is not the
page's own (a page elsewhere cannot use a visitor's browser to reach a server on their network).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib.resources import files
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    ITransport,
)
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tcplab.interfaces import StreamTransport

#: Headers on every page and asset: only this origin's scripts, styles and WebSocket; never framed.
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}

_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
          ".css": b"text/css; charset=utf-8"}


def sameOrigin(origin: str | None, host: str | None, secure: bool) -> bool:
    """True if a handshake's ``Origin`` is the page's own (scheme and ``Host`` of this request), or absent
    (not a browser: tools such as websocat send none, and a browser always sends one)."""
    if not origin:
        return True
    if not host:
        return False
    return origin.lower() == f"{'https' if secure else 'http'}://{host.lower()}"


@implementer(ITransport, IPushProducer)
class WebSocketTransport:
    """What a wing's protocol writes to and pauses: each write is one WebSocket message (text in line
    mode, where bytes that are not UTF-8 become U+FFFD so the browser accepts it; binary otherwise);
    pausing and producers go to the TCP (or TLS) transport under the WebSocket."""

    def __init__(self, socket: StreamingWebSocket, binary: bool) -> None:
        self.socket = socket
        self.binary = binary
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data:
            return
        if not self.binary:
            data = data.decode("utf-8", "replace").encode("utf-8")
        self.socket.sendMessage(data, isBinary=self.binary)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close the WebSocket cleanly, after what was written (the close frame follows it)."""
        if self.disconnecting:
            return
        self.disconnecting = True
        self.socket.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.socket.transport.abortConnection()

    def getPeer(self) -> IAddress:
        return self.socket.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.socket.transport.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.socket.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.socket.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.socket.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.socket.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.socket.transport.stopProducing()


class StreamingWebSocket(WebSocketServerProtocol):
    """One browser connection: once open, a protocol from the factory's ``inner`` factory is connected to a
    :class:`WebSocketTransport`, and every frame's payload is handed to it as it arrives (autobahn's own
    message buffering and size limits are bypassed: the inner protocol has its own limits). In line mode
    the end of each message is a line end."""

    factory: StreamingWebSocketFactory
    transport: StreamTransport

    def __init__(self) -> None:
        super().__init__()
        self.inner: IProtocol | None = None
        self.adapter: WebSocketTransport | None = None

    def onConnect(self, request: ConnectionRequest) -> None:
        secure = ISSLTransport.providedBy(self.transport)
        if not sameOrigin(request.origin, request.headers.get("host"), secure):
            self.factory.refusedOrigins += 1
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "this WebSocket only serves its own page's origin")
        return None

    def onOpen(self) -> None:
        # twisted.web's HTTPChannel registered itself as the socket's producer; the socket is ours now.
        self.transport.unregisterProducer()
        self.adapter = WebSocketTransport(self, binary=not self.factory.lineMode)
        inner = self.factory.inner.buildProtocol(self.transport.getPeer())
        if inner is None:
            self.sendClose(1013)
            return
        self.inner = inner
        inner.makeConnection(self.adapter)

    def onMessageBegin(self, isBinary: bool) -> None:
        pass

    def onMessageFrameBegin(self, length: int) -> None:
        pass

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.inner is not None and payload:
            self.inner.dataReceived(payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        if self.inner is not None and self.factory.lineMode:
            self.inner.dataReceived(b"\n")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        inner, self.inner = self.inner, None
        if self.adapter is not None:
            self.adapter.disconnecting = True
        if inner is not None:
            inner.connectionLost(Failure(ConnectionDone() if wasClean else ConnectionLost()))


class StreamingWebSocketFactory(WebSocketServerFactory):
    """Browser connections for ``inner`` (the wing's own protocol factory), in line mode (text messages are
    lines: the hub) or byte mode (every payload byte as is: the file drop)."""

    # autobahn's factory is a Factory[_ProtoWithFactory]: through it, Twisted's generic Factory cannot name ours.
    protocol = StreamingWebSocket  # type: ignore[assignment]

    def __init__(self, inner: IProtocolFactory, lineMode: bool) -> None:
        super().__init__(server="tcplab")
        self.inner = inner
        self.lineMode = lineMode
        self.refusedOrigins = 0
        self.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0, openHandshakeTimeout=30,
                                closeHandshakeTimeout=5, autoPingInterval=30, autoPingTimeout=30)


def asset(package: str, name: str) -> bytes:
    return files(package).joinpath("static", name).read_bytes()


def _setHeaders(request: IRequest, contentType: bytes) -> None:
    """The content type and the security headers every response of a page carries."""
    request.setHeader(b"Content-Type", contentType)
    for key, value in SECURITY_HEADERS.items():
        request.setHeader(key, value)


class Asset(Resource):
    """One file of the page, read once at start-up (package data), with the security headers."""

    isLeaf = True

    def __init__(self, body: bytes, contentType: bytes) -> None:
        super().__init__()
        self.body = body
        self.contentType = contentType

    def render_GET(self, request: IRequest) -> bytes:
        self.render_HEAD(request)
        return self.body

    def render_HEAD(self, request: IRequest) -> bytes:
        _setHeaders(request, self.contentType)
        return b""


class Counters(Resource):
    """``/stats``: the server's counters now, as JSON, for the page's live view."""

    isLeaf = True

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.read = read

    def render_GET(self, request: IRequest) -> bytes:
        _setHeaders(request, b"application/json")
        return json.dumps(self.read()).encode("ascii")


def pageSite(package: str, scripts: tuple[str, ...] = ("live.js", "app.js")) -> Resource:
    """The root of a wing's page: ``/`` (the wing's ``static/index.html``), the shared ``/tcplab.css``
    and ``/live.js``, and the wing's ``/app.js`` if it has one."""
    root = Resource()
    root.putChild(b"", Asset(asset(package, "index.html"), _TYPES[".html"]))
    root.putChild(b"tcplab.css", Asset(asset("tcplab", "tcplab.css"), _TYPES[".css"]))
    for name in scripts:
        root.putChild(name.encode(), Asset(asset("tcplab" if name == "live.js" else package, name), _TYPES[".js"]))
    return root


def webSite(package: str, sockets: StreamingWebSocketFactory, counters: Callable[[], dict[str, Any]]) -> Site:
    """The Site of a wing's page (:func:`pageSite`) with ``/ws`` (the WebSocket) and ``/stats`` (the counters)."""
    root = pageSite(package)
    root.putChild(b"ws", WebSocketResource(sockets))
    root.putChild(b"stats", Counters(counters))
    return quietSite(root)


class _QuietSite(Site):
    """A Site that shows browsers no tracebacks and leaves the live view's polls (``/stats``, one a
    second per open page) out of the access log."""

    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        if request.path != b"/stats":
            super().log(request)


def quietSite(root: Resource) -> Site:
    return _QuietSite(root)
