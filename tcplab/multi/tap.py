"""``twistd tcplab-multi``: the broadcast echo hub, with its limits, and its scale-out options
(``--backplane``, ``--channel``, ``--reuse-port``)."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from tcplab.coerce import floatOption, intOption
from tcplab.interfaces import IReactor, globalReactor
from tcplab.listening import CannotListen, ListeningService, ServerOptions, raiseOpenFilesLimit
from tcplab.metrics import Family, byLabel, one
from tcplab.multi.hub import HubConfig, MultiHub
from tcplab.multi.redis import CHANNEL, RedisAddress, RedisBackplane, parseRedisURL
from tcplab.multi.web import webService
from tcplab.usagelog import UsageLog

log = Logger(namespace="tcplab.multi.hub")

MiB = 1 << 20


class Options(ServerOptions):
    synopsis = (
        "[--port 7001] [--interface ADDR] [--listen ENDPOINT]... [--send-queue BYTES] [--max-clients N] "
        "[--max-line BYTES] [--idle-timeout S] [--stats-interval S] [--notice-limit N] [--reuse-port] "
        "[--backplane redis://HOST:PORT/DB [--channel NAME] [--presence-ttl S]]"
    )
    longdesc = (
        "Every line a client sends comes back to it exactly, and goes to every other client as "
        "'<NAME> LINE' (escaped so it is safe in a terminal). Commands: /nick NAME, /who, /quit, /help. "
        "A client that falls --send-queue bytes behind is disconnected; the others never wait for it."
    )
    defaultPort = 7001

    optParameters = [
        ["send-queue", None, str(MiB), "Bytes that may wait for a client that does not read before it is "
         "disconnected (its own echoes never count against it: it is just not read from)."],
        ["max-clients", None, "0", "Clients at once; more are told the server is full (0: no limit)."],
        ["max-line", None, str(64 * 1024), "Longest line in bytes; a client sending a longer one is told and "
         "disconnected."],
        ["idle-timeout", None, "0", "Disconnect a client that sends nothing for this many seconds (0: never)."],
        ["stats-interval", None, "60", "Seconds between stats log lines (0: none)."],
        ["notice-limit", None, "100", "Announce joins and leaves only while at most this many clients are "
         "connected (above, they are only logged)."],
        ["backplane", None, None, "redis://HOST:PORT/DB: one room with every tcplab-multi that uses the same "
         "Redis and --channel (lines, names, /who, joins and leaves)."],
        ["channel", None, None, "The room's name on the backplane: the Redis pub/sub channel, and the prefix "
         "of its presence keys (default: tcplab-multi)."],
        ["presence-ttl", None, "15", "Seconds after which the clients of a server that stopped refreshing its "
         "presence in Redis (it died, or lost Redis) vanish from /who elsewhere."],
        ["web", None, None, "ENDPOINT (e.g. tcp:8001:interface=127.0.0.1) for a page where browsers join the room "
         "over WebSocket."],
    ]
    optFlags = [
        ["reuse-port", None, "Listen with SO_REUSEPORT, so several tcplab-multi processes share --port (the "
         "kernel spreads connections among them; join them with --backplane). Not for --listen."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["send-queue"] = intOption("--send-queue", self["send-queue"], 0, 1 << 40)
        self["max-clients"] = intOption("--max-clients", self["max-clients"], 0, 1 << 30)
        self["max-line"] = intOption("--max-line", self["max-line"], 1, 1 << 30)
        self["idle-timeout"] = floatOption("--idle-timeout", self["idle-timeout"], 0, 1e9)
        self["stats-interval"] = floatOption("--stats-interval", self["stats-interval"], 0, 1e9)
        self["notice-limit"] = intOption("--notice-limit", self["notice-limit"], 0, 1 << 30)
        self["presence-ttl"] = floatOption("--presence-ttl", self["presence-ttl"], 0.5, 86400)
        if self["backplane"] is not None:
            try:
                self["backplane"] = parseRedisURL(self["backplane"])
            except ValueError as e:
                raise usage.UsageError(f"--backplane: {e}") from None
            if importlib.util.find_spec("txredisapi") is None:
                raise usage.UsageError("--backplane needs the txredisapi package: pip install txredisapi")
        elif self["channel"] is not None:
            raise usage.UsageError("--channel names a room on a backplane: give --backplane too")
        if self["channel"] is None:
            self["channel"] = "tcplab-multi"
        elif CHANNEL.fullmatch(self["channel"]) is None:
            raise usage.UsageError(f"--channel must be 1-100 letters, digits, _ . : or -, not {self['channel']!r}")
        if self["reuse-port"]:
            if self["listen"]:
                raise usage.UsageError("--reuse-port works with --port/--interface, not with --listen endpoints")
            if not hasattr(socket, "SO_REUSEPORT"):
                raise usage.UsageError("--reuse-port: this system has no SO_REUSEPORT")

    def hubConfig(self) -> HubConfig:
        return HubConfig(
            sendQueue=self["send-queue"],
            maxClients=self["max-clients"],
            maxLine=self["max-line"],
            idleTimeout=self["idle-timeout"],
            noticeLimit=self["notice-limit"],
        )


class ReusePortService(ListeningService):
    """Listen on ``interface:port`` with SO_REUSEPORT (Twisted's listenTCP has no such flag: the socket
    is made here and adopted by the reactor). Stops, and keeps ``ports``, as :class:`ListeningService`."""

    def __init__(self, port: int, interface: str, backlog: int, factory: IProtocolFactory, reactor: IReactor) -> None:
        super().__init__([], factory, reactor)
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.reactor = reactor

    def startService(self) -> None:
        service.Service.startService(self)
        where = f"[{self.interface}]:{self.port}" if ":" in self.interface else f"{self.interface or '*'}:{self.port}"
        try:
            family, _, _, _, address = socket.getaddrinfo(
                self.interface or None, self.port, socket.AF_INET6 if ":" in self.interface else socket.AF_INET,
                socket.SOCK_STREAM, 0, socket.AI_PASSIVE,
            )[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise CannotListen(f"tcplab: cannot listen on {where}: {e.strerror or e}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(self.backlog)
            sock.setblocking(False)
            # Twisted types the factory as a ServerFactory; any IProtocolFactory does.
            self.ports.append(self.reactor.adoptStreamPort(sock.fileno(), family, self.factory))  # type: ignore[arg-type]
        except OSError as e:
            raise CannotListen(f"tcplab: cannot listen on {where} with --reuse-port: {e.strerror or e}") from None
        finally:
            sock.close()


class HubService(service.MultiService):
    """The listeners, the hub and its backplane; stopping closes the listeners, then tells every client
    and waits (a bounded time) until they are gone, and leaves the backplane."""

    def __init__(self, options: Options, reactor: IReactor | None = None) -> None:
        super().__init__()
        self.reactor = reactor or globalReactor()
        address: RedisAddress | None = options["backplane"]
        self.backplane: RedisBackplane | None = None
        if address is not None:
            self.backplane = RedisBackplane(address, options["channel"], self.reactor, ttl=options["presence-ttl"])
        self.hub = MultiHub(options.hubConfig(), self.reactor, self.backplane)
        self.usage = UsageLog(options["usage-log"], "multi", self.reactor) if options["usage-log"] else None
        self.hub.usage = self.usage
        self.statsInterval: float = options["stats-interval"]
        self.listening: ListeningService
        if options["reuse-port"]:
            self.listening = ReusePortService(options["port"], options["interface"], options.backlog(), self.hub,
                                              self.reactor)
        else:
            self.listening = ListeningService(options.endpointDescriptions(), self.hub, self.reactor)
        self.listening.setServiceParent(self)
        if options["web"]:
            webService(options["web"], self.hub, self.reactor).setServiceParent(self)
        self.stats: LoopingCall | None = None
        if options["metrics"]:
            from tcplab.metrics import MetricsService

            MetricsService(options["metrics"], self.metrics, self.reactor).setServiceParent(self)

    def metrics(self) -> Iterator[Family]:
        """What ``--metrics`` shows: the counters of the stats log line (``statsFields``), no others."""
        s = self.hub.statsFields()
        yield "multi_connections_accepted_total", "counter", "Connections accepted.", one(s["accepted"])
        yield "multi_connections_open", "gauge", "Connections open now (members or not).", one(self.hub.connections)
        yield "multi_clients", "gauge", "Clients in the room on this server now.", one(s["clients"])
        yield "multi_clients_joined_total", "counter", "Clients that joined the room.", one(s["joined"])
        yield ("multi_connections_refused_total", "counter", "Connections refused, by reason.",
               byLabel("reason", {"server_full": s["refused"]}))
        yield "multi_received_bytes_total", "counter", "Bytes received from clients.", one(s["bytesIn"])
        yield "multi_sent_bytes_total", "counter", "Bytes handed to clients' sockets.", one(s["bytesOut"])
        yield "multi_lines_relayed_total", "counter", "Lines received and relayed to the room.", one(s["lines"])
        yield ("multi_clients_disconnected_total", "counter", "Clients the server cut loose, by reason.",
               byLabel("reason", {"too_slow": s["slow"], "idle": s["idle"], "line_too_long": s["tooLong"]}))
        yield ("multi_send_queue_bytes", "gauge", "Bytes waiting in clients' send queues now.",
               one(self.hub.sendQueueBytes()))
        if self.backplane is not None:
            b = self.backplane.statsFields()
            yield ("multi_backplane_up", "gauge", "1 while the backplane (Redis) is connected, else 0.",
                   one(1 if b["bpState"] == "up" else 0))
            yield "multi_backplane_messages_sent_total", "counter", "Lines sent to the backplane.", one(b["bpSent"])
            yield ("multi_backplane_messages_received_total", "counter", "Lines received from other servers.",
                   one(b["bpReceived"]))
            yield ("multi_backplane_messages_dropped_total", "counter", "Backplane messages lost, by reason.",
                   byLabel("reason", {"send_failed": b["bpDropped"], "duplicate": b["bpDuplicates"],
                                      "missed": b["bpMissed"], "malformed": b["bpMalformed"]}))
            yield "multi_backplane_nodes", "gauge", "Other servers seen on the backplane.", one(b["bpNodes"])

    def startService(self) -> None:
        old, new = raiseOpenFilesLimit()
        if new != old:
            log.info("open files limit raised from {old} to {new}", old=old, new=new)
        else:
            log.info("open files limit is {limit}", limit=new)
        super().startService()
        if self.backplane is not None:
            self.backplane.start()
        if self.statsInterval:
            self.stats = LoopingCall(self.hub.logStats)
            self.stats.clock = self.reactor
            self.stats.start(self.statsInterval, now=False)

    def stopService(self) -> Deferred[None]:
        if self.stats is not None and self.stats.running:
            self.stats.stop()
        self.stats = None
        listeners = super().stopService()
        clients = self.hub.shutdown()
        waits = [listeners, clients]
        if self.backplane is not None:
            waits.append(self.backplane.stop())
        done = gatherResults(waits).addCallback(lambda _: self.hub.logStats())
        if self.usage is not None:
            done.addBoth(self.usage.closeAfter)
        return done


def makeService(options: Options) -> HubService:
    service_ = HubService(options)
    service_.setName("tcplab-multi")
    return service_
