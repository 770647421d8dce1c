"""``twistd tcplab-echo``: RFC 862 echo on TCP, and on UDP with ``--udp``."""

from __future__ import annotations

from collections.abc import Iterator

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage

from tcplab.coerce import floatOption
from tcplab.echo.server import MAX_DATAGRAM, EchoFactory, UDPEcho
from tcplab.interfaces import IReactor, globalReactor
from tcplab.listening import TCP_FAMILY, CannotListen, ListeningService, ServerOptions, endpointKind
from tcplab.metrics import Family, byLabel, one
from tcplab.usagelog import UsageLog


class Options(ServerOptions):
    synopsis = "[--port 7000] [--interface ADDR] [--listen ENDPOINT]... [--udp] [--idle-timeout S]"
    longdesc = "Echo every byte back (RFC 862). A client that does not read is not read from."
    defaultPort = 7000

    optFlags = [["udp", "u", "Also echo UDP datagrams on the same port number."]]
    optParameters = [
        ["udp-rate", None, "100", "UDP replies per second per source address."],
        ["udp-burst", None, "200", "UDP replies a source may get in one burst."],
        ["idle-timeout", None, "0", "Close a TCP connection that neither sends nor reads its echoes for this "
         "many seconds (0: never)."],
        ["web", None, None, "ENDPOINT (e.g. tcp:8007:interface=127.0.0.1) for a page with a live view of the "
         "connections and bytes per second."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["udp-rate"] = floatOption("--udp-rate", self["udp-rate"], 0.001, 1e9)
        self["udp-burst"] = floatOption("--udp-burst", self["udp-burst"], 1, 1e9)
        self["idle-timeout"] = floatOption("--idle-timeout", self["idle-timeout"], 0, 1e9)
        if self["udp"] and self["listen"] and endpointKind(self["listen"][0]) not in TCP_FAMILY:
            raise usage.UsageError("--udp takes its port number from the first --listen, which must then be "
                                   "tcp:, tcp6: or ssl:")


class EchoService(service.MultiService):
    """The TCP listeners, plus a UDP echo bound to the first TCP port's number."""

    def __init__(self, options: Options, reactor: IReactor | None = None) -> None:
        super().__init__()
        self.reactor = reactor or globalReactor()
        self.options = options
        self.usage = UsageLog(options["usage-log"], "echo", self.reactor) if options["usage-log"] else None
        self.factory = EchoFactory(options["idle-timeout"], self.reactor, self.usage)
        self.tcp = ListeningService(options.endpointDescriptions(), self.factory, self.reactor)
        self.tcp.setServiceParent(self)
        self.udp: UDPEcho | None = None
        self.udpPort: IListeningPort | None = None
        if options["web"]:
            from tcplab.echo.web import webService

            webService(options["web"], self.factory, self.reactor).setServiceParent(self)
        if options["metrics"]:
            from tcplab.metrics import MetricsService

            MetricsService(options["metrics"], self.metrics, self.reactor).setServiceParent(self)

    def metrics(self) -> Iterator[Family]:
        """What ``--metrics`` shows: the factory's and the UDP echo's own counters."""
        f = self.factory
        yield "echo_connections_accepted_total", "counter", "TCP connections accepted.", one(f.accepted)
        yield "echo_connections_open", "gauge", "TCP connections open now.", one(f.connections)
        yield "echo_received_bytes_total", "counter", "Bytes received over TCP.", one(f.received)
        yield ("echo_sent_bytes_total", "counter", "Bytes echoed over TCP (handed to the socket or its buffer).",
               one(f.received))
        yield ("echo_clients_disconnected_total", "counter", "TCP clients the server disconnected, by reason.",
               byLabel("reason", {"idle": f.timedOut}))
        if self.udp is not None:
            u = self.udp
            yield "echo_udp_datagrams_answered_total", "counter", "UDP datagrams echoed.", one(u.echoed)
            yield ("echo_udp_datagrams_dropped_total", "counter", "UDP datagrams not answered, by reason.",
                   byLabel("reason", {"service_port": u.droppedPort, "rate_limited": u.droppedRate}))

    def startService(self) -> None:
        super().startService()
        if not self.options["udp"]:
            return
        host = self.tcp.ports[0].getHost()
        port, interface = host.port, host.host  # type: ignore[attr-defined]  # a TCP port: an IPv4/IPv6Address
        self.udp = UDPEcho(self.options["udp-rate"], self.options["udp-burst"], self.reactor.seconds)
        try:
            self.udpPort = self.reactor.listenUDP(port, self.udp, interface=interface, maxPacketSize=MAX_DATAGRAM)
        except CannotListenError as e:
            self.tcp.stopService()
            raise CannotListen(f"tcplab: cannot listen for UDP on {interface}:{port}: {e.socketError}") from None

    def stopService(self) -> Deferred[object]:
        if self.udpPort is not None:
            self.udpPort.stopListening()
            self.udpPort = None
        d = super().stopService()
        if self.usage is not None:
            d.addBoth(self.usage.closeAfter)
        return d


def makeService(options: Options) -> EchoService:
    service_ = EchoService(options)
    service_.setName("tcplab-echo")
    return service_
