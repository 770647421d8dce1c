"""Options shared by every tcplab server: where to listen, and how to listen well."""

from __future__ import annotations

import os
import resource
import socket
import stat
from collections.abc import Mapping
from typing import ClassVar

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs
from zope.interface import directlyProvides, implementer, providedBy

from tcplab.coerce import intOption
from tcplab.interfaces import IReactor, StreamTransport, globalReactor

log = Logger()

DEFAULT_BACKLOG = 1024
#: Server endpoint types that listen on a TCP port (and so take a backlog, and a port number).
TCP_FAMILY = ("tcp", "tcp6", "ssl")


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog, if this system tells it."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def escapeEndpointValue(value: str) -> str:
    """Quote ``:``, ``=`` and ``\\`` so a value (an IPv6 address, a path) fits an endpoint string."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def endpointKind(description: str) -> str:
    """The endpoint type of a server endpoint string (a bare port number is ``tcp``)."""
    kind = description.split(":", 1)[0].strip().lower()
    return "tcp" if kind.isdigit() else kind


def withBacklog(description: str, backlog: int) -> str:
    """Add ``backlog=`` to a TCP-family endpoint string that does not set one (also under ``haproxy:``).

    Twisted's default of 50 makes bursts of connections wait seconds in SYN retries.
    """
    if endpointKind(description) == "haproxy":
        return "haproxy:" + withBacklog(description.split(":", 1)[1], backlog)
    if endpointKind(description) not in TCP_FAMILY or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def raiseOpenFilesLimit() -> tuple[int, int]:
    """Lift the soft open-files limit to the hard limit, so many clients fit; return (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return soft, hard
        except (ValueError, OSError):
            pass
    return soft, soft


class ServerOptions(usage.Options):
    """``--port``, ``--interface``, ``--listen`` (repeatable) and ``--backlog``, as every server takes them."""

    defaultPort: ClassVar[int] = 7000

    optParameters = [
        ["port", "p", None, "TCP port to listen on (default: the server's own)."],
        ["interface", "i", "", "Address to bind --port to (default: all interfaces)."],
        ["backlog", None, str(DEFAULT_BACKLOG), "Listen backlog for TCP endpoints (capped by somaxconn)."],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics (and /healthz) on this endpoint, e.g. "
         "tcp:9100:interface=127.0.0.1 (default: off). Keep it on loopback or a private network."],
        ["usage-log", None, None, "Append one JSON object per finished connection (and upload) to this file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted server endpoint string, e.g. tcp6:7000, unix:/tmp/s.sock,
        ssl:7443:privateKey=key.pem:certKey=cert.pem (repeatable; replaces --port)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def parseOptions(self, options: list[str] | None = None) -> None:
        """As twistd's subcommand, end a usage error with one line on stderr and exit status 1
        (twistd itself would print its whole help text first); used directly, raise it as usual."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            runner = "twist" if type(self.parent).__module__.startswith("twisted.application.twist") else "twistd"
            command = f"{runner} {self.parent.subCommand}"
            raise UsageExit(f"{command}: {e} (see {command} --help)") from None

    def postOptions(self) -> None:
        port = self["port"]
        if port is None:
            self["port"] = self.defaultPort
        else:
            self["port"] = intOption("--port", port, 0, 65535)
        self["backlog"] = intOption("--backlog", self["backlog"], 1, 1 << 20)
        if self["listen"] and (port is not None or self["interface"]):
            raise usage.UsageError("use either --listen or --port/--interface, not both")
        for description in self["listen"]:
            checkServerEndpoint(description)
        for option, example in (("metrics", "tcp:9100"), ("web", "tcp:8001")):
            description = self.get(option)
            if description is None:
                continue
            if endpointKind(description) == "haproxy":
                raise usage.UsageError(f"--{option} takes a plain endpoint such as {example}:interface=127.0.0.1")
            try:
                checkServerEndpoint(description)
            except usage.UsageError as e:
                raise usage.UsageError(str(e).replace("--listen", f"--{option}", 1)) from None
        if self["usage-log"] is not None:
            checkWritableFile("--usage-log", self["usage-log"])

    def backlog(self) -> int:
        """``--backlog``, capped by the kernel's somaxconn."""
        cap = somaxconn()
        return min(self["backlog"], cap) if cap else self["backlog"]

    def endpointDescriptions(self) -> list[str]:
        """The endpoint strings this server listens on, each with a raised backlog."""
        descriptions = self["listen"] or [_portDescription(self["port"], self["interface"])]
        return [withBacklog(d, self.backlog()) for d in descriptions]


def checkServerEndpoint(description: str) -> None:
    """Raise a one-line UsageError, naming the problem and the fix, for an endpoint string tcplab cannot use."""
    try:
        serverEndpoint(globalReactor(), description)
    except EndpointError as e:
        raise usage.UsageError(f"--listen {description}: {e}") from None


def checkWritableFile(option: str, path: str) -> None:
    """A one-line UsageError unless ``path`` is a file this user can append to (or create)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise usage.UsageError(f"{option} {path} is a folder: give a file name in it")
    if not os.path.isdir(folder):
        raise usage.UsageError(f"{option} {path}: the folder {folder} does not exist: create it first")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise usage.UsageError(f"{option} {path} is not writable by this user: choose another file")


class EndpointError(ValueError):
    """An endpoint string tcplab cannot listen on; the message says what is wrong and how to fix it."""


#: Keys each endpoint type built here takes (Twisted's names).
_KEYS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "ssl": ("port", "privateKey", "certKey", "extraCertChain", "dhParameters", "interface", "backlog",
            "sslmethod"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
    "haproxy": (),
}
_POSITIONAL = {"tcp": "port", "tcp6": "port", "ssl": "port", "unix": "address"}
_EXAMPLES = ("tcp:7000, tcp6:7000, unix:/run/tcplab.sock, ssl:7443:privateKey=key.pem:certKey=cert.pem, "
             "haproxy:tcp:7000 or systemd:domain=INET:index=0")
#: What ``haproxy:`` may wrap: the PROXY header comes first in clear, so TLS must end at the proxy.
_PROXIED = ("tcp", "tcp6", "unix", "systemd")
#: Socket mode of a ``unix:`` endpoint without ``mode=``: owner only (Twisted's default is 0666).
UNIX_MODE = 0o600


def splitEndpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string the way Twisted does: ``:`` separates, the first ``=`` of a part
    makes it ``key=value``, ``\\`` quotes the next character."""
    parts: list[list[str]] = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            parts[-1][-1] += next(chars, "")
        elif char == ":":
            parts.append([""])
        elif char == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += char
    args = [p[0] for p in parts if len(p) == 1]
    kwargs = {p[0]: p[1] for p in parts if len(p) == 2}
    return args, kwargs


def serverEndpoint(reactor: IReactor, description: str) -> IStreamServerEndpoint:
    """The endpoint for a ``--listen`` string, or an :class:`EndpointError` in the user's terms.

    ``tcp``, ``tcp6``, ``unix`` and ``ssl`` are built here (``unix:`` sockets are owner-only unless
    ``mode=`` says otherwise; ``ssl:`` uses :mod:`tcplab.tlsserver`); other types go to Twisted.
    """
    kind = endpointKind(description) if description.strip() else ""
    if kind == "haproxy":
        inner = description.split(":", 1)[1] if ":" in description else ""
        if endpointKind(inner) not in _PROXIED or not inner.strip():
            raise EndpointError("haproxy: wraps tcp:, tcp6:, unix: or systemd:, e.g. haproxy:tcp:7001 (the PROXY "
                                "header comes before any TLS: end TLS at the proxy)")
        return ProxiedEndpoint(serverEndpoint(reactor, inner), reactor)
    args, kwargs = splitEndpoint(description)
    kind = args.pop(0).strip().lower() if args else ""
    if kind.isdigit():
        raise EndpointError(f"a bare port number is not an endpoint: write tcp:{kind}")
    if kind not in _KEYS:
        try:
            return serverFromString(reactor, description)
        except Exception as e:
            if str(e).startswith("Unknown endpoint type"):
                raise EndpointError(f"unknown endpoint type {kind!r}: use {_EXAMPLES}") from None
            raise EndpointError(f"{e}: see Twisted's endpoint string syntax") from None
    unknown = sorted(set(kwargs) - set(_KEYS[kind]))
    if unknown:
        raise EndpointError(f"{kind} endpoints take no {unknown[0]}= (only {', '.join(k + '=' for k in _KEYS[kind])})")
    positional = _POSITIONAL.get(kind)
    if positional is not None and args:
        if positional in kwargs or len(args) > 1:
            raise EndpointError(f"the {positional} is given twice ({args[-1]!r}): give it once, e.g. {_example(kind)}")
        kwargs[positional] = args.pop()
    if args:
        raise EndpointError(f"unexpected {args[0]!r}: give key=value, e.g. {_example(kind)}")
    if positional is not None and positional not in kwargs:
        raise EndpointError(f"no {positional} given: write e.g. {_example(kind)}")
    if kind == "unix":
        return _unixEndpoint(reactor, kwargs)
    if kind == "systemd":
        return _systemdEndpoint(reactor, kwargs)
    port = _number(kind, "port", kwargs["port"], 0, 65535, "a port number from 0 to 65535", _example(kind))
    backlog = _number(kind, "backlog", kwargs.get("backlog", "50"), 1, 1 << 20, "a whole number", "backlog=1024")
    interface = kwargs.get("interface", "")
    if kind == "tcp":
        return TCP4ServerEndpoint(reactor, port, backlog, interface)
    if kind == "tcp6":
        return TCP6ServerEndpoint(reactor, port, backlog, interface or "::")
    from tcplab.tlsserver import TLSConfigError, serverTLS

    method = kwargs.get("sslmethod")
    if method not in (None, "TLS_METHOD", "SSLv23_METHOD"):
        raise EndpointError(f"sslmethod={method} is not supported: tcplab servers speak TLS 1.2 and 1.3 "
                            "only; leave sslmethod= out")
    try:
        tls = serverTLS(kwargs.get("privateKey", "server.pem"), kwargs.get("certKey"),
                        kwargs.get("extraCertChain"), kwargs.get("dhParameters"))
    except TLSConfigError as e:
        raise EndpointError(str(e)) from None
    return SSL4ServerEndpoint(reactor, port, tls, backlog, interface)


def _example(kind: str) -> str:
    return {"tcp": "tcp:7000", "tcp6": "tcp6:7000", "ssl": "ssl:7443:privateKey=key.pem:certKey=cert.pem",
            "unix": "unix:/run/tcplab.sock"}[kind]


def _number(kind: str, key: str, value: str, low: int, high: int, what: str, example: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not low <= number <= high:
        raise EndpointError(f"{key} {value!r} is not {what}: write e.g. {example}")
    return number


def _unixEndpoint(reactor: IReactor, kwargs: dict[str, str]) -> UNIXServerEndpoint:
    path = kwargs["address"]
    if not path:
        raise EndpointError("the socket path is empty: e.g. unix:/run/tcplab.sock")
    mode = UNIX_MODE
    if "mode" in kwargs:
        try:
            mode = int(kwargs["mode"], 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise EndpointError(f"mode {kwargs['mode']!r} is not an octal file mode: write e.g. mode=660")
    lockfile = kwargs.get("lockfile", "1")
    if lockfile not in ("0", "1"):
        raise EndpointError(f"lockfile {lockfile!r} must be 0 or 1")
    backlog = _number("unix", "backlog", kwargs.get("backlog", "50"), 1, 1 << 20, "a whole number", "backlog=1024")
    if not path.startswith("\0"):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise EndpointError(f"the folder {folder} does not exist: create it, or put the socket in an "
                                "existing folder")
    return UNIXServerEndpoint(reactor, path, backlog, mode, wantPID=lockfile == "1")


def readListenFDs(environ: Mapping[str, str], pid: int, start: int = 3) -> ListenFDs:
    """The sockets named by ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` (sd_listen_fds(3)).

    Unlike Twisted's ``ListenFDs.fromEnvironment``, a missing ``LISTEN_FDNAMES`` (as from
    ``systemd-socket-activate`` without ``--fdname``) names each socket ``unknown``, as
    sd_listen_fds_with_names(3) does, instead of hiding every socket.
    """
    if environ.get("LISTEN_PID") != str(pid):
        return ListenFDs([])
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return ListenFDs([])
    if not 0 < count <= 1024:
        return ListenFDs([])
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = ["unknown"] * count
    return ListenFDs(list(range(start, start + count)), names)


def _execEnvironment() -> dict[str, str]:
    """The environment this process was started with (Linux, where systemd runs).

    Twisted deletes LISTEN_PID and LISTEN_FDS from os.environ when ``twisted.internet.endpoints``
    is imported, even when it then ignores them; /proc/self/environ still holds them.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in pairs}


def _systemdSockets() -> ListenFDs:
    """The sockets systemd passed: Twisted's reading of them if it saw any, else our own."""
    from twisted.internet import endpoints

    fds = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if isinstance(fds, ListenFDs) and fds.inheritedDescriptors():
        return fds
    environ: Mapping[str, str] = os.environ if "LISTEN_FDS" in os.environ else _execEnvironment()
    return readListenFDs(environ, os.getpid())


#: Read once, at import, before twistd can fork into the background (LISTEN_PID names this process).
INHERITED = _systemdSockets()


def _systemdEndpoint(reactor: IReactor, kwargs: dict[str, str], fds: ListenFDs | None = None) -> IStreamServerEndpoint:
    """Adopt a socket systemd passed, or say in one line why it is not there (Twisted says
    "list index out of range")."""
    fds = INHERITED if fds is None else fds
    domain = kwargs.get("domain")
    if domain is None or not hasattr(socket, f"AF_{domain}"):
        raise EndpointError("give domain=INET, INET6 or UNIX (the family of the socket systemd passes)")
    if ("index" in kwargs) == ("name" in kwargs):
        raise EndpointError("give exactly one of index=N or name=NAME (FileDescriptorName=)")
    passed = fds.inheritedDescriptors()
    if not passed:
        raise EndpointError("systemd passed this process no socket: start it from a .socket unit (or "
                            "systemd-socket-activate -l PORT), or listen on tcp:PORT")
    if "name" in kwargs:
        names = fds.inheritedNamedDescriptors()
        if kwargs["name"] not in names:
            raise EndpointError(f"no socket named {kwargs['name']!r} was passed (names: "
                                f"{', '.join(sorted(names)) or 'none'}): match FileDescriptorName= in the unit")
        fileno = names[kwargs["name"]]
    else:
        index = kwargs["index"]
        if not index.isdigit() or int(index) >= len(passed):
            raise EndpointError(f"index={index} but systemd passed {len(passed)} socket(s): use index=0"
                                + (f" to {len(passed) - 1}" if len(passed) > 1 else ""))
        fileno = passed[int(index)]
    try:
        isSocket = stat.S_ISSOCK(os.fstat(fileno).st_mode)
    except OSError:
        isSocket = False
    if not isSocket:
        raise EndpointError(f"descriptor {fileno} that systemd announced is not a socket: check the .socket unit")
    return AdoptedStreamServerEndpoint(reactor, fileno, getattr(socket, f"AF_{domain}"))


#: Seconds a connection to a ``haproxy:`` endpoint has to send its PROXY header.
PROXY_HEADER_TIMEOUT = 10.0
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@implementer(IHalfCloseableProtocol)
class ProxiedProtocol(HAProxyProtocolWrapper):
    """Twisted's PROXY wrapper, made to hand the connection on only once the header is read.

    Twisted's own calls the server's ``connectionMade`` before the header has arrived, so the
    server names, logs and counts the proxy's address; it also closes a connection whose header
    comes in pieces of under 16 bytes, and passes no half-close on. A connection that sends no
    header within :data:`PROXY_HEADER_TIMEOUT` is closed.
    """

    factory: ProxiedFactory
    transport: StreamTransport

    def __init__(self, factory: ProxiedFactory, wrappedProtocol: IProtocol) -> None:
        # Twisted wants a WrappingFactory[Self]; HAProxyWrappingFactory is not generic over its protocol.
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]
        self._head = b""
        self._connected = False
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: ITransport) -> None:
        directlyProvides(self, providedBy(transport), IHalfCloseableProtocol)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(PROXY_HEADER_TIMEOUT, self._noHeader)

    def _noHeader(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        parser = self._parser
        if parser is None:
            head = self._head + data
            if head.startswith(b"PROXY"):
                parser = V1Parser()
            elif len(head) >= 16 and head.startswith(_V2_SIGNATURE) and head[12] & 0xF0 == 0x20:
                parser = V2Parser()
            elif len(head) < 16 and (_V2_SIGNATURE.startswith(head[:12]) or b"PROXY".startswith(head)):
                self._head = head
                return
            else:
                self.transport.loseConnection()
                return
            self._parser, self._head, data = parser, b"", head
        try:
            info, remaining = parser.feed(data)
        except InvalidProxyHeader:
            self.transport.loseConnection()
            return
        if info is None:
            return
        self._proxyInfo, self._connected = info, True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # It is the wrapped protocol's transport: it provides the real one's interfaces (makeConnection).
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(remaining)

    def readConnectionLost(self) -> None:
        if self._connected and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._connected and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._connected:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ProxiedFactory(HAProxyWrappingFactory):
    """Wraps each connection in a :class:`ProxiedProtocol`."""

    protocol = ProxiedProtocol  # type: ignore[assignment]  # it takes a ProxiedFactory, not any wrapping factory
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """An endpoint whose connections start with a PROXY header (v1 or v2, as HAProxy's
    ``send-proxy`` and ``send-proxy-v2`` send): the server sees the address it reports."""

    def __init__(self, inner: IStreamServerEndpoint, clock: IReactorTime) -> None:
        self.inner = inner
        self.clock = clock

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.inner.listen(ProxiedFactory(factory, self.clock))


def _portDescription(port: int, interface: str) -> str:
    description = f"tcp:{port}"
    if interface:
        description += f":interface={escapeEndpointValue(interface)}"
    return description


class ListeningService(service.Service):
    """Listen on every endpoint string with one factory; ``ports`` holds the
    listening ports once started (so port 0 can be looked up, by tests and by
    the UDP echo that shares the TCP port number)."""

    def __init__(self, descriptions: list[str], factory: IProtocolFactory, reactor: IReactor | None = None) -> None:
        self.descriptions = descriptions
        self.factory = factory
        self.ports: list[IListeningPort] = []
        self._reactor = reactor

    def startService(self) -> None:
        reactor = self._reactor or globalReactor()
        super().startService()
        for description in self.descriptions:
            failures: list[Failure] = []
            try:
                endpoint = serverEndpoint(reactor, description)
            except EndpointError as e:
                self.stopService()
                raise CannotListen(f"tcplab: cannot listen on {description}: {e}") from None
            endpoint.listen(self.factory).addCallbacks(self.ports.append, failures.append)
            if failures:
                self.stopService()
                raise CannotListen(f"tcplab: cannot listen on {description}: {failures[0].getErrorMessage()}")

    def stopService(self) -> Deferred[object]:
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(p.stopListening) for p in ports]).addCallback(lambda _: None)


class CannotListen(SystemExit):
    """A server endpoint could not be opened (address in use, bad endpoint string...).

    A SystemExit, so twistd ends with status 1 and this one line instead of a traceback.
    """


class UsageExit(SystemExit):
    """A usage error of a server run by twistd: the one line goes to stderr, and the exit status is 1."""
