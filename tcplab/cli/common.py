"""What every client command shares: where to connect, and how to read stdin."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from typing import ClassVar

from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab.errors import TcplabError, connectFailure
from tcplab.tap.options import escapeEndpointValue, floatOption, intOption


class ClientOptions(usage.Options):
    """``--host``, ``--port``, ``--connect ENDPOINT`` and ``--timeout``."""

    defaultPort: ClassVar[int] = 7000

    optParameters = [
        ["host", "H", "localhost", "Server host name or address."],
        ["port", "p", None, "Server port (default: the command's own)."],
        ["connect", "c", None, "A Twisted client endpoint string instead of --host/--port, "
         "e.g. unix:path=/tmp/echo.sock or tls:host=example.org:port=7443."],
        ["timeout", "t", "10", "Seconds to wait for a connection or a reply."],
        ["ca", None, None, "PEM file of the CA (or self-signed certificate) that TLS servers must be signed by, "
         "instead of the system's trust store."],
    ]
    optFlags = [["tls", None, "Connect to --host/--port with TLS, verifying the server's certificate."]]

    def postOptions(self) -> None:
        if self["connect"] and self["port"] is not None:
            raise usage.UsageError("use either --connect or --host/--port, not both")
        self["port"] = self.defaultPort if self["port"] is None else intOption("--port", self["port"], 1, 65535)
        self["timeout"] = floatOption("--timeout", self["timeout"], 0.001, 86400)
        if (self["connect"] or "").lower().startswith("ssl:"):
            raise usage.UsageError("--connect ssl:... does not check the server's certificate; "
                                   "use tls:host=H:port=P (with --ca for a private CA)")
        if self["tls"] and self["connect"]:
            raise usage.UsageError("--tls goes with --host/--port; with --connect write tls:host=...:port=...")
        if self["ca"] and not self.usesTLS():
            raise usage.UsageError("--ca needs --tls or a --connect tls:... endpoint")
        if self["ca"]:
            try:
                with open(self["ca"], "rb") as f:
                    self.trustRoot = Certificate.loadPEM(f.read())
            except OSError as e:
                raise usage.UsageError(f"cannot read --ca {self['ca']}: {e.strerror}") from None
            except Exception:
                raise usage.UsageError(f"--ca {self['ca']} is not a PEM certificate") from None
        if self["connect"]:
            from twisted.internet import reactor

            try:
                self.endpoint(reactor)
            except Exception as e:
                raise usage.UsageError(f"bad --connect endpoint {self['connect']!r}: {e}") from None

    def usesTLS(self) -> bool:
        return bool(self["tls"] or (self["connect"] or "").lower().startswith("tls:"))

    def where(self) -> str:
        """The server, as the user named it, for error messages."""
        return self["connect"] or f"{self['host']}:{self['port']}"

    def endpoint(self, reactor: object) -> IStreamClientEndpoint:
        if self["tls"]:
            trust = self.trustRoot if self["ca"] else None
            tcp = HostnameEndpoint(reactor, self["host"], self["port"], timeout=self["timeout"])
            return wrapClientTLS(optionsForClientTLS(self["host"], trustRoot=trust), tcp)
        if self["connect"] and self["ca"]:
            return _withTrustRoot(reactor, self["connect"], self["ca"])
        if self["connect"]:
            return clientFromString(reactor, self["connect"])
        return HostnameEndpoint(reactor, self["host"], self["port"], timeout=self["timeout"])


def _withTrustRoot(reactor: object, description: str, ca: str) -> IStreamClientEndpoint:
    """A ``tls:`` endpoint that trusts only ``ca``: Twisted's ``trustRoots=`` takes a
    folder of PEM files, read while the endpoint is built, so one is made for the moment."""
    with tempfile.TemporaryDirectory(prefix="tcplab-ca-") as folder:
        shutil.copyfile(ca, os.path.join(folder, "ca.pem"))
        return clientFromString(reactor, f"{description}:trustRoots={escapeEndpointValue(folder)}")


def connect(reactor: object, options: ClientOptions, protocol: IProtocol) -> Deferred[IProtocol]:
    """Connect ``protocol``; a failure becomes a one-line TcplabError."""
    where = options.where()

    def failed(failure: Failure) -> Failure:
        return Failure(connectFailure(failure, where))

    d = options.endpoint(reactor).connect(Factory.forProtocol(lambda: protocol))
    if options["connect"]:
        d.addTimeout(options["timeout"], reactor)
    return d.addErrback(failed)


def readStdin(reactor: object, protocol: Protocol) -> IPushProducer:
    """Deliver stdin to ``protocol`` (``dataReceived`` then ``connectionLost`` at EOF), and
    return the producer that pauses and resumes the reading.

    Pipes and terminals go through ``twisted.internet.stdio``; regular files and
    /dev/null cannot be watched by epoll, so they are read in chunks between
    reactor turns instead.
    """
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        return stdio.StandardIO(protocol, stdin=fd, reactor=reactor)  # type: ignore[no-any-return]
    return _FileReader(reactor, fd, protocol)


@implementer(IPushProducer)
class _FileReader:
    """Reads a regular file in chunks, one per reactor turn, while not paused."""

    def __init__(self, reactor: object, fd: int, protocol: Protocol) -> None:
        self.reactor = reactor
        self.fd = fd
        self.protocol = protocol
        self.paused = False
        self.done = False
        self._call = reactor.callLater(0, self._readSome)  # type: ignore[attr-defined]

    def _readSome(self) -> None:
        self._call = None
        if self.paused or self.done:
            return
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError as e:
            raise TcplabError(f"cannot read stdin: {e.strerror}") from None
        if data:
            self.protocol.dataReceived(data)
            if not self.paused and self._call is None:
                self._call = self.reactor.callLater(0, self._readSome)  # type: ignore[attr-defined]
        else:
            self.done = True
            self.protocol.connectionLost(Failure(EOFError()))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._call is None and not self.done:
            self._call = self.reactor.callLater(0, self._readSome)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.done = True


def writeStdout(data: bytes) -> None:
    """Print bytes as they came (the terminal or pipe decides how they look)."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
