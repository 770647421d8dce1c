"""What every client command shares: where to connect, and how to read stdin."""

from __future__ import annotations

import os
import stat
import sys
from typing import ClassVar

from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.python.failure import Failure

from tcplab.errors import TcplabError, connectFailure
from tcplab.tap.options import floatOption, intOption


class ClientOptions(usage.Options):
    """``--host``, ``--port``, ``--connect ENDPOINT`` and ``--timeout``."""

    defaultPort: ClassVar[int] = 7000

    optParameters = [
        ["host", "H", "localhost", "Server host name or address."],
        ["port", "p", None, "Server port (default: the command's own)."],
        ["connect", "c", None, "A Twisted client endpoint string instead of --host/--port, "
         "e.g. unix:path=/tmp/echo.sock or tls:host=example.org:port=7443."],
        ["timeout", "t", "10", "Seconds to wait for a connection or a reply."],
    ]

    def postOptions(self) -> None:
        if self["connect"] and self["port"] is not None:
            raise usage.UsageError("use either --connect or --host/--port, not both")
        self["port"] = self.defaultPort if self["port"] is None else intOption("--port", self["port"], 1, 65535)
        self["timeout"] = floatOption("--timeout", self["timeout"], 0.001, 86400)
        if self["connect"]:
            from twisted.internet import reactor

            try:
                clientFromString(reactor, self["connect"])
            except Exception as e:
                raise usage.UsageError(f"bad --connect endpoint {self['connect']!r}: {e}") from None

    def where(self) -> str:
        """The server, as the user named it, for error messages."""
        return self["connect"] or f"{self['host']}:{self['port']}"

    def endpoint(self, reactor: object) -> IStreamClientEndpoint:
        if self["connect"]:
            return clientFromString(reactor, self["connect"])
        return HostnameEndpoint(reactor, self["host"], self["port"], timeout=self["timeout"])


def connect(reactor: object, options: ClientOptions, protocol: IProtocol) -> Deferred[IProtocol]:
    """Connect ``protocol``; a failure becomes a one-line TcplabError."""
    where = options.where()

    def failed(failure: Failure) -> Failure:
        return Failure(connectFailure(failure, where))

    d = options.endpoint(reactor).connect(Factory.forProtocol(lambda: protocol))
    if options["connect"]:
        d.addTimeout(options["timeout"], reactor)
    return d.addErrback(failed)


def readStdin(reactor: object, protocol: Protocol) -> None:
    """Deliver stdin to ``protocol`` (``dataReceived`` then ``connectionLost`` at EOF).

    Pipes and terminals go through ``twisted.internet.stdio``; regular files and
    /dev/null cannot be watched by epoll, so they are read in chunks between
    reactor turns instead.
    """
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        stdio.StandardIO(protocol, stdin=fd, reactor=reactor)
        return

    def readSome() -> None:
        try:
            data = os.read(fd, 1 << 16)
        except OSError as e:
            raise TcplabError(f"cannot read stdin: {e.strerror}") from None
        if data:
            protocol.dataReceived(data)
            reactor.callLater(0, readSome)  # type: ignore[attr-defined]
        else:
            protocol.connectionLost(Failure(EOFError()))

    reactor.callLater(0, readSome)  # type: ignore[attr-defined]


def writeStdout(data: bytes) -> None:
    """Print bytes as they came (the terminal or pipe decides how they look)."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
