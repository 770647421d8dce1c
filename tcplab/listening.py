"""Options shared by every tcplab server: where to listen, and how to listen well."""

from __future__ import annotations

import os
import resource
import socket
import sys
from typing import ClassVar

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.systemd import ListenFDs

from tcplab.coerce import intOption
from tcplab.interfaces import IReactor, globalReactor

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
    """Add ``backlog=`` to a TCP-family endpoint string that does not set one.

    Twisted's default of 50 makes bursts of connections wait seconds in SYN retries.
    """
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
            runner = os.path.basename(sys.argv[0]) if sys.argv else ""
            command = f"{runner if runner in ('twistd', 'twist') else 'twistd'} {self.parent.subCommand}"
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
}
_POSITIONAL = {"tcp": "port", "tcp6": "port", "ssl": "port", "unix": "address"}
_EXAMPLES = ("tcp:7000, tcp6:7000, unix:/run/tcplab.sock, ssl:7443:privateKey=key.pem:certKey=cert.pem "
             "or systemd:domain=INET:index=0")
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
        _checkSystemd(kwargs)
        try:
            return serverFromString(reactor, description)
        except Exception as e:
            raise EndpointError(f"{e}") from None
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


def _systemdSockets() -> ListenFDs:
    """The sockets systemd passed, as Twisted's ``systemd:`` parser read them at import (reading
    removes LISTEN_FDS and LISTEN_PID from the environment, so they cannot be read again)."""
    from twisted.internet import endpoints

    fds = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    return fds if isinstance(fds, ListenFDs) else ListenFDs.fromEnvironment()


def _checkSystemd(kwargs: dict[str, str]) -> None:
    """Say in one line why an inherited socket is not there (Twisted says "list index out of range")."""
    domain = kwargs.get("domain")
    if domain is None or not hasattr(socket, f"AF_{domain}"):
        raise EndpointError("give domain=INET, INET6 or UNIX (the family of the socket systemd passes)")
    if ("index" in kwargs) == ("name" in kwargs):
        raise EndpointError("give exactly one of index=N or name=NAME (FileDescriptorName=)")
    fds = _systemdSockets()
    passed = fds.inheritedDescriptors()
    if not passed:
        raise EndpointError("systemd passed this process no socket: start it from a .socket unit (or "
                            "systemd-socket-activate --fdname=NAME), or listen on tcp:PORT")
    if "name" in kwargs:
        names = fds.inheritedNamedDescriptors()
        if kwargs["name"] not in names:
            raise EndpointError(f"no socket named {kwargs['name']!r} was passed (names: "
                                f"{', '.join(sorted(names)) or 'none'}): match FileDescriptorName= in the unit")
        return
    index = kwargs["index"]
    if not index.isdigit() or int(index) >= len(passed):
        raise EndpointError(f"index={index} but systemd passed {len(passed)} socket(s): use index=0"
                            + (f" to {len(passed) - 1}" if len(passed) > 1 else ""))


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
