"""Options shared by every tcplab server: where to listen, and how to listen well."""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

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
        return min(self["backlog"], cap) if cap else self["backlog"]  # type: ignore[no-any-return]

    def endpointDescriptions(self) -> list[str]:
        """The endpoint strings this server listens on, each with a raised backlog."""
        descriptions = self["listen"] or [_portDescription(self["port"], self["interface"])]
        return [withBacklog(d, self.backlog()) for d in descriptions]


def checkServerEndpoint(description: str) -> None:
    """Raise a one-line UsageError for an endpoint string Twisted cannot use."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(f"bad --listen endpoint {description!r}: {e}") from None


def _portDescription(port: int, interface: str) -> str:
    description = f"tcp:{port}"
    if interface:
        description += f":interface={escapeEndpointValue(interface)}"
    return description


def intOption(name: str, value: object, low: int, high: int) -> int:
    """Parse a bounded integer option, or raise a one-line UsageError."""
    return _bounded(name, value, low, high, int, "a whole number")


def floatOption(name: str, value: object, low: float, high: float) -> float:
    """Parse a bounded number option, or raise a one-line UsageError."""
    return _bounded(name, value, low, high, float, "a number")


def _bounded(name: str, value: object, low: Any, high: Any, convert: Callable[[str], Any], kind: str) -> Any:
    try:
        number = convert(str(value))
    except ValueError:
        raise usage.UsageError(f"{name} must be {kind}, not {value!r}") from None
    if not low <= number <= high:
        raise usage.UsageError(f"{name} must be between {low} and {high}, not {number}")
    return number


class ListeningService(service.Service):
    """Listen on every endpoint string with one factory; ``ports`` holds the
    listening ports once started (so port 0 can be looked up, by tests and by
    the UDP echo that shares the TCP port number)."""

    def __init__(self, descriptions: list[str], factory: IProtocolFactory, reactor: object = None) -> None:
        self.descriptions = descriptions
        self.factory = factory
        self.ports: list[IListeningPort] = []
        self._reactor = reactor

    def startService(self) -> None:
        from twisted.internet import reactor as defaultReactor

        reactor = self._reactor or defaultReactor
        super().startService()
        for description in self.descriptions:
            failures: list[Failure] = []
            serverFromString(reactor, description).listen(self.factory).addCallbacks(
                self.ports.append, failures.append
            )
            if failures:
                self.stopService()
                raise CannotListen(f"tcplab: cannot listen on {description}: {failures[0].getErrorMessage()}")

    def stopService(self) -> Deferred[object]:  # type: ignore[override]
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(p.stopListening) for p in ports]).addCallback(lambda _: None)


class CannotListen(SystemExit):
    """A server endpoint could not be opened (address in use, bad endpoint string...).

    A SystemExit, so twistd ends with status 1 and this one line instead of a traceback.
    """
