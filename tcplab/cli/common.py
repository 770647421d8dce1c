"""What every client command shares: option parsing, where to connect, stdin and stdout."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NoReturn

from twisted.internet import defer, stdio
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IProtocol, IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab import __version__
from tcplab.coerce import floatOption, intOption
from tcplab.errors import ConnectFailed, TcplabError, UsageProblem, connectFailure
from tcplab.escaping import escapeName
from tcplab.interfaces import IReactor, globalReactor
from tcplab.listening import escapeEndpointValue
from tcplab.tlsclient import PlainTCP, VerifiedTLS, speaksTLS


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is a UsageProblem (the CLI prints it as one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageProblem(" ".join(message.split()))


class CommandOptions(dict):
    """The parsed options of one command, indexable as ``options["port"]``.

    Options may come before or after operands (as with cp, curl and git) and ``--`` ends them;
    the twistd plugins keep ``twisted.python.usage``, which stops at the first operand.
    """

    command: ClassVar[str] = ""
    #: The one synopsis line of ``--help`` (also in README).
    synopsis: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The name under which the operands are kept, or None for a command without any.
    operands: ClassVar[str | None] = None
    operandName: ClassVar[str] = ""
    operandHelp: ClassVar[str] = ""

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = _Parser(prog=f"tcplab {cls.command}".strip(), usage=f"%(prog)s {cls.synopsis}",
                         description=cls.description, allow_abbrev=True)
        parser.add_argument("--version", action="version", version=f"tcplab {__version__}",
                            help="Print tcplab's version and exit.")
        cls.addArguments(parser)
        if cls.operands is not None:
            parser.add_argument(cls.operands, nargs="*", metavar=cls.operandName, help=cls.operandHelp)
        return parser

    @classmethod
    def addArguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the command's options (``dest`` is the key the command reads)."""

    def parseOptions(self, argv: Sequence[str]) -> None:
        """Fill in from ``argv``; a mistake raises UsageProblem (one line)."""
        argv = list(argv)
        # argparse's intermixed parsing mishandles a leading "--": split it off ourselves.
        after: list[str] = []
        if "--" in argv:
            cut = argv.index("--")
            argv, after = argv[:cut], argv[cut + 1:]
        parser = self.parser()
        if after and self.operands is None:
            raise UsageProblem(f"unrecognized arguments: {' '.join(after)}")
        self.update(vars(parser.parse_intermixed_args(argv)))
        if self.operands is not None:
            self[self.operands] = [*self[self.operands], *after]
        try:
            self.postOptions()
        except usage.UsageError as e:  # from the option checks shared with the twistd plugins
            raise UsageProblem(str(e)) from None

    def postOptions(self) -> None:
        """Check and convert the values; raise UsageProblem (or usage.UsageError) for a bad one."""


class ClientOptions(CommandOptions):
    """``--host``, ``--port``, ``--connect ENDPOINT``, ``--tls``, ``--ca`` and ``--timeout``."""

    defaultPort: ClassVar[int] = 7000
    trustRoot: Any = None

    @classmethod
    def addArguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-H", "--host", default="localhost", help="Server host name or address "
                            "(default: localhost).")
        parser.add_argument("-p", "--port", default=None, help=f"Server port (default: {cls.defaultPort}).")
        parser.add_argument("-c", "--connect", default=None, metavar="ENDPOINT",
                            help="A Twisted client endpoint string instead of --host/--port, e.g. "
                                 "unix:path=/tmp/echo.sock or tls:host=example.org:port=7443.")
        parser.add_argument("--tls", action="store_true", help="Connect to --host/--port with TLS, verifying "
                            "the server's certificate and that it names --host (default: off).")
        parser.add_argument("--ca", default=None, metavar="PEM", help="PEM file of the CA (or self-signed "
                            "certificate) that TLS servers must be signed by, instead of the system's trust store.")
        parser.add_argument("-t", "--timeout", default="10", metavar="SECONDS",
                            help="Seconds to wait for a connection or a reply (default: 10).")

    def postOptions(self) -> None:
        if self["connect"] and self["port"] is not None:
            raise UsageProblem("use either --connect or --host/--port, not both")
        self["port"] = self.defaultPort if self["port"] is None else intOption("--port", self["port"], 1, 65535)
        self["timeout"] = floatOption("--timeout", self["timeout"], 0.001, 86400)
        if (self["connect"] or "").lower().startswith("ssl:"):
            raise UsageProblem("--connect ssl:... does not check the server's certificate; "
                               "use tls:host=H:port=P (with --ca for a private CA)")
        if self["tls"] and self["connect"]:
            raise UsageProblem("--tls goes with --host/--port; with --connect write tls:host=...:port=...")
        self.parsedConnect = checkClientEndpoint(self["connect"]) if self["connect"] else None
        if self["ca"] and not self.usesTLS():
            raise UsageProblem("--ca needs --tls or a --connect tls:... endpoint")
        if self["ca"] and self.parsedConnect is not None and "trustRoots" in self.parsedConnect[1]:
            raise UsageProblem("use either --ca or trustRoots= in --connect, not both")
        if self["ca"]:
            try:
                with open(self["ca"], "rb") as f:
                    self.trustRoot = Certificate.loadPEM(f.read())
            except OSError as e:
                raise UsageProblem(f"cannot read --ca {self['ca']}: {e.strerror}") from None
            except Exception:
                raise UsageProblem(f"--ca {self['ca']} is not a PEM certificate") from None
        if self["connect"]:
            try:
                self.endpoint(globalReactor())
            except Exception as e:
                text = " ".join(str(e).split()) or type(e).__name__
                raise UsageProblem(f"bad --connect endpoint {self['connect']!r}: {escapeName(text)}") from None

    def usesTLS(self) -> bool:
        return bool(self["tls"] or (self["connect"] or "").lower().startswith("tls:"))

    def tlsHost(self) -> str | None:
        """The name the server's certificate must have, or None without TLS."""
        if self["tls"]:
            return str(self["host"])
        if self.usesTLS():
            parsed = getattr(self, "parsedConnect", None) or checkClientEndpoint(self["connect"])
            return parsed[1]["host"]
        return None

    def where(self) -> str:
        """The server, as the user named it, for error messages."""
        return self["connect"] or f"{self['host']}:{self['port']}"

    def endpoint(self, reactor: IReactor) -> IStreamClientEndpoint:
        if self["tls"]:
            tcp = HostnameEndpoint(reactor, self["host"], self["port"], timeout=self["timeout"])
            return wrapClientTLS(optionsForClientTLS(self["host"], trustRoot=self.trustRoot), tcp)
        if self["connect"] and self["ca"]:
            return _withTrustRoot(reactor, self["connect"], self["ca"])
        if self["connect"]:
            return clientFromString(reactor, self["connect"])
        return HostnameEndpoint(reactor, self["host"], self["port"], timeout=self["timeout"])


#: Client endpoint types tcplab checks itself: (positional keys, required keys, all keys).
ENDPOINT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "tcp": (("host", "port"), ("host", "port"), ("host", "port", "timeout", "bindAddress")),
    "tls": (("host", "port"), ("host", "port"),
            ("host", "port", "timeout", "bindAddress", "certificate", "privateKey", "trustRoots", "endpoint")),
    "unix": (("path",), ("path",), ("path", "timeout", "lockfile", "checkPID")),
}
_EXAMPLE_VALUES = {"host": "host=127.0.0.1", "port": "port=7000", "path": "path=/tmp/echo.sock"}
EXAMPLES = "tcp:host=H:port=P, tls:host=H:port=P or unix:path=FILE"


def checkClientEndpoint(description: str) -> tuple[str, dict[str, str]]:
    """The type and keys of a ``--connect`` string; a mistake is one UsageProblem naming the part."""
    shown = escapeName(description)
    kind, _, rest = description.partition(":")
    kind = kind.lower()
    if kind not in ENDPOINT_KEYS:
        if ":" not in description:
            raise UsageProblem(f"--connect {shown!r} has no endpoint type: write {EXAMPLES}")
        raise UsageProblem(f"--connect {shown!r}: unknown endpoint type {escapeName(kind)!r}: use {EXAMPLES}")
    positional, required, known = ENDPOINT_KEYS[kind]
    values: dict[str, str] = {}
    free = list(positional)
    for part in _splitEndpoint(rest) if rest else []:
        key, value = part
        if key is None:
            free = [k for k in free if k not in values]
            if not free:
                raise UsageProblem(f"--connect {shown!r}: one value too many ({escapeName(value)!r}) "
                                   f"({kind}: takes {', '.join(known)})")
            key = free.pop(0)
        if key not in known:
            raise UsageProblem(f"--connect {shown!r}: unknown key {escapeName(key)!r} "
                               f"({kind}: takes {', '.join(known)})")
        if key in values:
            raise UsageProblem(f"--connect {shown!r}: {key}= is given twice")
        values[key] = value
    if "port" in values:
        _wholeNumber(shown, "port", values["port"], 1, 65535)
    if "timeout" in values:
        _wholeNumber(shown, "timeout", values["timeout"], 1, 86400)
    for key in ("lockfile", "checkPID"):
        if key in values and values[key] not in ("0", "1"):
            raise UsageProblem(f"--connect {shown!r}: {key}= must be 0 or 1, not {escapeName(values[key])!r}")
    if "trustRoots" in values and not os.path.isdir(values["trustRoots"]):
        raise UsageProblem(f"--connect {shown!r}: trustRoots= must be a folder of PEM files "
                           "(or use --ca FILE)")
    for key in ("certificate", "privateKey"):
        if key in values and not os.access(values[key], os.R_OK):
            raise UsageProblem(f"--connect {shown!r}: cannot read {key}= {escapeName(values[key])!r}")
    for key in required:
        if not values.get(key):
            example = ":".join(_EXAMPLE_VALUES[k] for k in required)
            raise UsageProblem(f"--connect {shown!r} has no {key}: add {_EXAMPLE_VALUES[key]} "
                               f"(e.g. {kind}:{example})")
    return kind, values


def _wholeNumber(shown: str, key: str, value: str, low: int, high: int) -> None:
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        raise UsageProblem(f"--connect {shown!r}: {key}= must be a whole number from {low} to {high}, "
                           f"not {escapeName(value)!r}")


def _splitEndpoint(text: str) -> list[tuple[str | None, str]]:
    """``a:key=value:b`` as [(None, "a"), ("key", "value"), (None, "b")], with Twisted's ``\\`` escapes."""
    parts: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    parts.append((key, "".join(current)))
    return parts


def _withTrustRoot(reactor: IReactor, description: str, ca: str) -> IStreamClientEndpoint:
    """A ``tls:`` endpoint that trusts only ``ca``: Twisted's ``trustRoots=`` takes a
    folder of PEM files, read while the endpoint is built, so one is made for the moment."""
    with tempfile.TemporaryDirectory(prefix="tcplab-ca-") as folder:
        shutil.copyfile(ca, os.path.join(folder, "ca.pem"))
        return clientFromString(reactor, f"{description}:trustRoots={escapeEndpointValue(folder)}")


#: Seconds to wait for a port to answer a ClientHello, when a plain connection ended without a word.
PROBE_TIMEOUT = 2.0


def connect(reactor: IReactor, options: ClientOptions, protocol: IProtocol) -> Deferred[IProtocol]:
    """Connect ``protocol``, over TLS only once the handshake is done and the certificate names
    the host; a failure (within ``--timeout``) becomes a one-line TcplabError."""
    where = options.where()
    host = options.tlsHost()
    if host is not None:
        gate: VerifiedTLS | PlainTCP = VerifiedTLS(protocol, host, where)
    else:
        gate = PlainTCP(protocol, where, lambda: speaksTLS(options.endpoint(reactor), reactor,
                                                           min(options["timeout"], PROBE_TIMEOUT)))

    def failed(failure: Failure) -> Failure:
        if (failure.check(defer.TimeoutError, defer.CancelledError) and host is not None
                and gate.transport is not None and not gate.handedOver):
            return Failure(ConnectFailed(
                f"TLS handshake with {where} did not complete within {options['timeout']:g}s: "
                "is it a TLS port (leave out --tls, or use tcp:, if it is plain TCP), and is the server answering?"))
        return Failure(connectFailure(failure, where))

    d = options.endpoint(reactor).connect(Factory.forProtocol(lambda: gate))
    d.addCallback(lambda _: gate.ready)
    d.addTimeout(options["timeout"], reactor)
    return d.addErrback(failed)


def readStdin(reactor: IReactor, protocol: Protocol) -> IPushProducer:
    """Deliver stdin to ``protocol`` (``dataReceived`` then ``connectionLost`` at EOF), and
    return the producer that pauses and resumes the reading.

    Pipes and terminals go through ``twisted.internet.stdio``; regular files and
    /dev/null cannot be watched by epoll, so they are read in chunks between
    reactor turns instead.
    """
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        # stdio picks its POSIX StandardIO at run time; the type checker sees the Windows one.
        return stdio.StandardIO(protocol, stdin=fd, reactor=reactor)  # type: ignore[call-arg]
    return _FileReader(reactor, fd, protocol)


@implementer(IPushProducer)
class _FileReader:
    """Reads a regular file in chunks, one per reactor turn, while not paused."""

    def __init__(self, reactor: IReactorTime, fd: int, protocol: Protocol) -> None:
        self.reactor = reactor
        self.fd = fd
        self.protocol = protocol
        self.paused = False
        self.done = False
        self._call: IDelayedCall | None = reactor.callLater(0, self._readSome)

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
                self._call = self.reactor.callLater(0, self._readSome)
        else:
            self.done = True
            self.protocol.connectionLost(Failure(EOFError()))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._call is None and not self.done:
            self._call = self.reactor.callLater(0, self._readSome)

    def stopProducing(self) -> None:
        self.done = True


#: Called once stdout's reader went away (set by the ``tcplab`` command to end quietly, exit 141).
whenOutputGone: Callable[[], None] | None = None


def silenceStdout() -> None:
    """Send whatever is still to be printed nowhere, so nothing complains at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def outputGone() -> None:
    """Whoever read our output went away: end the command quietly, as ``cat`` does when
    ``head`` has seen enough."""
    silenceStdout()
    if whenOutputGone is None:
        raise BrokenPipeError("stdout was closed")
    whenOutputGone()


def writeStdout(data: bytes) -> None:
    """Print bytes as they came (the terminal or pipe decides how they look)."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        outputGone()
