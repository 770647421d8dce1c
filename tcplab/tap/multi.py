"""``twistd tcplab-multi``: the broadcast echo hub, with its limits."""

from __future__ import annotations

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tcplab.multi import HubConfig, MultiHub
from tcplab.tap.options import ListeningService, ServerOptions, floatOption, intOption, raiseOpenFilesLimit

log = Logger(namespace="tcplab.multi")

MiB = 1 << 20


class Options(ServerOptions):
    synopsis = (
        "[--port 7001] [--interface ADDR] [--listen ENDPOINT]... [--send-queue BYTES] [--max-clients N] "
        "[--max-line BYTES] [--idle-timeout S] [--stats-interval S] [--notice-limit N]"
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
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["send-queue"] = intOption("--send-queue", self["send-queue"], 0, 1 << 40)
        self["max-clients"] = intOption("--max-clients", self["max-clients"], 0, 1 << 30)
        self["max-line"] = intOption("--max-line", self["max-line"], 1, 1 << 30)
        self["idle-timeout"] = floatOption("--idle-timeout", self["idle-timeout"], 0, 1e9)
        self["stats-interval"] = floatOption("--stats-interval", self["stats-interval"], 0, 1e9)
        self["notice-limit"] = intOption("--notice-limit", self["notice-limit"], 0, 1 << 30)

    def hubConfig(self) -> HubConfig:
        return HubConfig(
            sendQueue=self["send-queue"],
            maxClients=self["max-clients"],
            maxLine=self["max-line"],
            idleTimeout=self["idle-timeout"],
            noticeLimit=self["notice-limit"],
        )


class MultiService(service.MultiService):
    """The listeners and the hub; stopping closes the listeners, then tells every client and waits
    (a bounded time) until they are gone."""

    def __init__(self, options: Options, reactor: object = None) -> None:
        super().__init__()
        from twisted.internet import reactor as defaultReactor

        self.reactor = reactor or defaultReactor
        self.hub = MultiHub(options.hubConfig(), self.reactor)  # type: ignore[arg-type]
        self.statsInterval: float = options["stats-interval"]
        self.listening = ListeningService(options.endpointDescriptions(), self.hub, self.reactor)
        self.listening.setServiceParent(self)
        self.stats: LoopingCall | None = None

    def startService(self) -> None:
        old, new = raiseOpenFilesLimit()
        if new != old:
            log.info("open files limit raised from {old} to {new}", old=old, new=new)
        else:
            log.info("open files limit is {limit}", limit=new)
        super().startService()
        if self.statsInterval:
            self.stats = LoopingCall(self.hub.logStats)
            self.stats.clock = self.reactor  # type: ignore[assignment]
            self.stats.start(self.statsInterval, now=False)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        if self.stats is not None and self.stats.running:
            self.stats.stop()
        self.stats = None
        listeners = super().stopService()
        clients = self.hub.shutdown()
        return gatherResults([listeners, clients]).addCallback(lambda _: self.hub.logStats())


def makeService(options: Options) -> MultiService:
    service_ = MultiService(options)
    service_.setName("tcplab-multi")
    return service_
