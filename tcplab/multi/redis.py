"""The backplane over Redis: two txredisapi connections, their lifecycle, and the presence keys.

:class:`RedisBackplane` carries what :class:`tcplab.multi.backplane.Backplane` sends and
receives: one connection SUBSCRIBEs to the channel, the other PUBLISHes and keeps this node's
presence (``SET CHANNEL:node:ID ... PX ttl`` and the set ``CHANNEL:nodes``). Its lifecycle
(connecting, unreachable, up, congested, outage, stopped) is one Automat machine, its
transitions in the table at the end of the class; docs/ARCHITECTURE.md draws it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from automat import MethodicalMachine
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab.interfaces import IReactor, globalReactor
from tcplab.multi.backplane import Backplane

log = Logger(namespace="tcplab.multi.backplane")

#: Bytes handed to the store and not yet acknowledged, past which new messages are dropped (counted).
MAX_UNANSWERED = 4 << 20

CHANNEL = re.compile(r"[A-Za-z0-9._:-]{1,100}")


@dataclass(frozen=True)
class RedisAddress:
    """Where the Redis server is: from ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """Raise ValueError with a one-line reason if ``url`` is not a usable ``redis://`` URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}") from None
    if parts.scheme != "redis":
        raise ValueError(f"bad Redis URL {url!r}: use redis://HOST:PORT/DB (rediss:// and unix sockets are not "
                         "supported)")
    if not parts.hostname:
        raise ValueError(f"bad Redis URL {url!r}: no host (use redis://HOST:PORT/DB)")
    path = parts.path.strip("/")
    if parts.query or parts.fragment or (path and not path.isdigit()):
        raise ValueError(f"bad Redis URL {url!r}: the path is the database number, e.g. redis://HOST:6379/0")
    return RedisAddress(
        parts.hostname, port or 6379, int(path) if path else 0,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password is not None else None,
    )


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint that reports failed connection attempts (txredisapi retries them quietly)."""

    def __init__(self, endpoint: IStreamClientEndpoint, onFailure: Callable[[Failure], None], name: str) -> None:
        self.endpoint = endpoint
        self.onFailure = onFailure
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def connect(self, factory: Any) -> Deferred[Any]:
        return self.endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        self.onFailure(failure)
        return failure


def _served(protocol: Any) -> RedisBackplane | None:
    """The backplane a connection reports to; None once it stopped (it hears nothing more)."""
    backplane: RedisBackplane | None = protocol.factory.backplane
    return backplane


@functools.cache
def _redisClasses() -> tuple[Any, type, type]:
    """txredisapi and our protocols on it, imported only when a Redis backplane starts (txredisapi
    imports the reactor, which twistd must have chosen first)."""
    import txredisapi  # a dependency of tcplab; its presence is checked when options are parsed

    class Commands(txredisapi.RedisProtocol):
        def connectionMade(self) -> Any:
            self.whenConnected().addCallback(self._tcplabReady)
            return super().connectionMade()

        def _tcplabReady(self, _: object) -> None:
            """(Not ``_ready``: txredisapi's protocols have a ``_ready`` attribute of their own.)"""
            backplane = _served(self)
            if backplane is not None:
                backplane._commandsReady(self)

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            backplane = _served(self)
            if backplane is not None:
                backplane._lost(self, why)

    class Subscriber(txredisapi.SubscriberProtocol):
        def connectionMade(self) -> Any:
            self.whenConnected().addCallback(self._tcplabReady)
            return super().connectionMade()

        def _tcplabReady(self, _: object) -> None:
            backplane = _served(self)
            if backplane is not None:
                backplane._subscriberReady(self)

        def messageReceived(self, pattern: object, channel: object, message: object) -> None:
            backplane = _served(self)
            if backplane is not None and isinstance(message, bytes):
                backplane.received(message)

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            backplane = _served(self)
            if backplane is not None:
                backplane._lost(self, why)

    return txredisapi, Commands, Subscriber


def _ignore(_: object) -> None:
    return None


def _verdict(values: Iterable[object]) -> object:
    """What an offer to send returns: the last output's answer (``_accept`` or ``_refuse``)."""
    return list(values)[-1]


class RedisBackplane(Backplane):
    """The backplane over Redis: one connection subscribed to the channel, one for PUBLISH and
    presence (``SET CHANNEL:node:ID ... PX ttl`` and the set ``CHANNEL:nodes``).

    Lines go out only while both connections are ready (state up) and Redis keeps up (not
    congested). Otherwise the node serves its own clients, drops (and counts) what it would
    have sent, and reconnects with txredisapi's backoff; one log line says so, one more when
    Redis is back. Messages are never queued for a Redis that is down or not answering: past
    ``maxUnanswered`` unacknowledged bytes they are dropped too.
    """

    _machine = MethodicalMachine()

    def __init__(
        self,
        address: RedisAddress,
        channel: str = "tcplab-multi",
        reactor: IReactor | None = None,
        ttl: float = 15.0,
        nodeId: str | None = None,
        maxUnanswered: int = MAX_UNANSWERED,
        replyTimeout: float = 10.0,
        initialDelay: float = 1.0,
        maxDelay: float = 10.0,
    ) -> None:
        reactor = globalReactor() if reactor is None else reactor
        super().__init__(nodeId, reactor, ttl)
        if CHANNEL.fullmatch(channel) is None:
            raise ValueError(f"bad channel name {channel!r}")
        self.reactor = reactor
        self.address = address
        self.channel = channel
        self.presenceKey = f"{channel}:node:{self.nodeId}"
        self.nodesKey = f"{channel}:nodes"
        self.maxUnanswered = maxUnanswered
        self.replyTimeout = replyTimeout
        self.initialDelay = initialDelay
        self.maxDelay = maxDelay
        self.unanswered = 0
        self._commands: Any = None
        self._subscriber: Any = None
        self._factories: list[Any] = []
        self._refresh: LoopingCall | None = None
        self._presenceCall: IDelayedCall | None = None
        self._reading = False
        self._readAgain = False
        self._outageSince = 0.0
        self._droppedBefore = 0
        self._loggedRefusal = False
        self._whenUp: list[Deferred[None]] = []

    @_machine.serializer()
    def lifecycle(self, state: str) -> str:
        """The state's name: connecting, unreachable, up, congested, outage or stopped."""
        return state

    @property
    def up(self) -> bool:
        return self.lifecycle() in ("up", "congested")

    def whenUp(self) -> Deferred[None]:
        """Fires once both connections are ready (at once if they are)."""
        if self.up:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._whenUp.append(d)
        return d

    def state(self) -> str:
        """For the stats line."""
        if self.lifecycle() == "stopped":
            return "stopped"
        return "up" if self.up else "DOWN (serving this server's clients only)"

    # -- starting and stopping

    def start(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint

        txredisapi, Commands, Subscriber = _redisClasses()
        log.info("backplane: node {node}, channel {channel} on {address}", node=self.nodeId, channel=self.channel,
                 address=str(self.address))
        for protocol, dbid in ((Commands, self.address.db), (Subscriber, None)):
            factory = txredisapi.RedisFactory(
                f"{self.address.host}:{self.address.port}", dbid, 1, isLazy=True, charset=None,
                password=self.address.password, replyTimeout=self.replyTimeout, convertNumbers=False,
                username=self.address.username,
            )
            factory.protocol = protocol
            factory.backplane = self
            factory.initialDelay = self.initialDelay
            factory.maxDelay = self.maxDelay
            factory.deferred.addErrback(self._refused)
            endpoint = HostnameEndpoint(self.reactor, self.address.host, self.address.port, timeout=10)
            factory.startConnecting(_WatchedEndpoint(endpoint, self._attemptFailed, f"{self.address} (backplane)"))
            self._factories.append(factory)
        self._refresh = LoopingCall(self._refreshPresence)
        self._refresh.clock = self.clock
        self._refresh.start(max(self.ttl / 3, 0.1), now=False)

    def stop(self) -> Deferred[None]:
        """Say goodbye (if connected), remove this node's presence, close both connections."""
        last = self._leave()
        self._stop()

        def disconnect(_: object) -> Deferred[Any]:
            return DeferredList([f.disconnect() for f in self._factories], consumeErrors=True)

        return last.addCallback(disconnect).addCallback(_ignore)

    def _leave(self) -> Deferred[Any]:
        """While the commands connection is there: the last message (a BYE frame after what is
        queued, if Redis takes it now), then this node's presence removed, waited for 2 s at most."""
        commands = self._commands
        last: Deferred[Any] = succeed(None)
        if commands is None:
            return last
        self.goodbye()
        try:
            commands.delete(self.presenceKey).addErrback(self._failed)
            last = commands.srem(self.nodesKey, self.nodeId).addErrback(self._failed)
        except Exception:
            pass
        return last.addTimeout(2, self.clock).addErrback(_ignore)

    # -- what the two connections report (through their factories, until stop)

    def _commandsReady(self, protocol: Any) -> None:
        self._commands = protocol
        if self._subscriber is not None:
            self._connected()

    def _subscriberReady(self, protocol: Any) -> None:
        protocol.subscribe(self.channel).addCallbacks(lambda _: self._subscribed(protocol), self._failed)

    def _subscribed(self, protocol: Any) -> None:
        if _served(protocol) is not self or not protocol.connected:
            return
        self._subscriber = protocol
        if self._commands is not None:
            self._connected()

    def _lost(self, protocol: Any, why: Failure) -> None:
        if protocol is self._commands:
            self._commands = None
            self.unanswered = 0
        elif protocol is self._subscriber:
            self._subscriber = None
        else:
            return
        self._connectionLost(why)

    def _refused(self, failure: Failure) -> None:
        """txredisapi gave up: Redis refused AUTH or SELECT (it stops trying by itself)."""
        log.error("backplane: Redis at {address} refused this node ({why}): check --backplane; serving this "
                  "server's clients only", address=str(self.address), why=failure.getErrorMessage())

    # -- sending

    def _canSend(self, size: int) -> bool:
        if self.unanswered + size > self.maxUnanswered:
            return bool(self._overflows())
        if self.lifecycle() == "up":
            return True  # the table's up --fits--> up [_accept], taken by every message: 0.3 us, not Automat's 10
        return bool(self._fits())

    def _send(self, message: bytes) -> None:
        commands = self._commands
        size = len(message)
        try:
            d = commands.publish(self.channel, message)
        except Exception:
            return
        self.unanswered += size

        def answered(_: object) -> None:
            if commands is self._commands:
                self.unanswered -= size

        d.addBoth(answered)

    # -- presence

    def _refreshPresence(self) -> None:
        """Write this node's snapshot (with expiry) and read the others'; also pings the subscriber,
        so a connection that died silently is noticed (txredisapi times the reply out)."""
        commands = self._commands
        if commands is None:
            return
        ms = max(int(self.ttl * 1000), 1)
        try:
            if self._subscriber is not None:
                self._subscriber.ping().addErrback(self._failed)
            commands.set(self.presenceKey, self.snapshot(), pexpire=ms).addErrback(self._failed)
            commands.sadd(self.nodesKey, self.nodeId).addErrback(self._failed)
            commands.execute_command("PEXPIRE", self.nodesKey, ms * 4).addErrback(self._failed)
        except _redisClasses()[0].ConnectionError:
            return
        self._readPresence()

    def _wantPresence(self) -> None:
        if self._commands is not None and (self._presenceCall is None or not self._presenceCall.active()):
            self._presenceCall = self.clock.callLater(0.2, self._readPresence)

    def _readPresence(self) -> None:
        commands = self._commands
        if commands is None:
            return
        if self._reading:
            self._readAgain = True
            return
        self._reading = True

        async def read() -> None:
            members = await commands.smembers(self.nodesKey)
            nodes = sorted(m.decode("ascii", "replace") for m in members)
            values = await commands.mget([f"{self.channel}:node:{node}" for node in nodes]) if nodes else []
            expired = self.presenceRead(dict(zip(nodes, values, strict=True)))
            if expired and self._commands is commands:
                commands.srem(self.nodesKey, expired).addErrback(self._failed)

        def done(_: object) -> None:
            self._reading = False
            if self._readAgain:
                self._readAgain = False
                self._readPresence()

        Deferred.fromCoroutine(read()).addErrback(self._failed).addBoth(done)

    def _failed(self, failure: Failure) -> None:
        """A command that failed: quietly if the connection went (that is logged once, elsewhere)."""
        redis = _redisClasses()[0]
        if failure.check(redis.ResponseError):
            if not self._loggedRefusal:
                self._loggedRefusal = True
                log.warn("backplane: Redis at {address} refused a command ({why}); more such errors are not "
                         "logged", address=str(self.address), why=failure.getErrorMessage())
        elif not failure.check(redis.RedisError, CancelledError, DeferredTimeout):
            log.failure("backplane: unexpected error", failure)

    # -- the lifecycle: states, inputs, outputs, then the table

    @_machine.state(initial=True, serialized="connecting")
    def _connecting(self) -> None:
        """Started (or not yet): never up so far, no attempt has failed yet."""

    @_machine.state(serialized="unreachable")
    def _unreachable(self) -> None:
        """Never up so far, and an attempt failed (logged once)."""

    @_machine.state(serialized="up")
    def _up(self) -> None:
        """Both connections ready: lines go to the other nodes."""

    @_machine.state(serialized="congested")
    def _congested(self) -> None:
        """Up, but Redis has ``maxUnanswered`` bytes unanswered: lines are dropped (logged once)."""

    @_machine.state(serialized="outage")
    def _outage(self) -> None:
        """Was up, lost a connection (logged once): reconnecting with backoff, lines dropped."""

    @_machine.state(terminal=True, serialized="stopped")
    def _stopped(self) -> None:
        """Stopped: the connections are closed or closing and report nothing more."""

    @_machine.input()
    def _connected(self) -> None:
        """Both connections are ready (the subscriber has subscribed)."""

    @_machine.input()
    def _connectionLost(self, why: Failure) -> None:
        """One of the two ready connections went."""

    @_machine.input()
    def _attemptFailed(self, why: Failure) -> None:
        """A connection attempt failed (txredisapi tries again with backoff)."""

    @_machine.input()
    def _fits(self) -> None:
        """A message to send fits in what Redis may leave unanswered: may it go?"""

    @_machine.input()
    def _overflows(self) -> None:
        """A message to send would pass what Redis may leave unanswered: may it go?"""

    @_machine.input()
    def _stop(self) -> None:
        """The service stops (after :meth:`_leave`)."""

    @_machine.output()
    def _accept(self) -> bool:
        return True

    @_machine.output()
    def _refuse(self) -> bool:
        return False

    @_machine.output()
    def _logConnected(self) -> None:
        log.info("backplane: connected to Redis at {address}", address=str(self.address))

    @_machine.output()
    def _logBack(self) -> None:
        log.info("backplane: Redis at {address} is back after {seconds:.1f}s: lines reach the other servers "
                 "again ({dropped} lines were not sent meanwhile)", address=str(self.address),
                 seconds=self.clock.seconds() - self._outageSince, dropped=self.stats.dropped - self._droppedBefore)

    @_machine.output()
    def _announce(self) -> None:
        """Tell the others (HELLO), write and read presence, wake whoever waits in :meth:`whenUp`."""
        self.hello()
        self._refreshPresence()
        waiting, self._whenUp = self._whenUp, []
        for d in waiting:
            d.callback(None)

    @_machine.output()
    def _logUnreachable(self, why: Failure) -> None:
        self._droppedBefore = self.stats.dropped
        log.warn("backplane: cannot reach Redis at {address} ({why}): serving this server's clients only; "
                 "retrying with backoff", address=str(self.address), why=why.getErrorMessage())

    @_machine.output()
    def _logLost(self, why: Failure) -> None:
        self._outageSince = self.clock.seconds()
        self._droppedBefore = self.stats.dropped
        log.warn("backplane: lost Redis at {address} ({why}): serving this server's clients only, lines are not "
                 "sent to other servers (dropped and counted) until it is back; reconnecting with backoff",
                 address=str(self.address), why=why.getErrorMessage())

    @_machine.output()
    def _logCongested(self) -> None:
        self._droppedBefore = self.stats.dropped
        log.warn("backplane: Redis at {address} is not keeping up ({bytes} bytes unanswered): lines for "
                 "other servers are dropped (and counted) until it does", address=str(self.address),
                 bytes=self.unanswered)

    @_machine.output()
    def _logKeepsUp(self) -> None:
        log.info("backplane: Redis at {address} keeps up again ({dropped} lines were not sent meanwhile)",
                 address=str(self.address), dropped=self.stats.dropped - self._droppedBefore)

    @_machine.output()
    def _shutDown(self) -> None:
        """Timers stopped, queued frames forgotten, waiters cancelled, the connections detached."""
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self._presenceCall is not None and self._presenceCall.active():
            self._presenceCall.cancel()
        self.discardQueued()
        waiting, self._whenUp = self._whenUp, []
        for d in waiting:
            d.cancel()
        for factory in self._factories:
            factory.backplane = None
        self._commands = self._subscriber = None

    _connecting.upon(_connected, enter=_up, outputs=[_logConnected, _announce])
    _connecting.upon(_attemptFailed, enter=_unreachable, outputs=[_logUnreachable])
    _connecting.upon(_connectionLost, enter=_connecting, outputs=[])
    _connecting.upon(_fits, enter=_connecting, outputs=[_refuse], collector=_verdict)
    _connecting.upon(_overflows, enter=_connecting, outputs=[_refuse], collector=_verdict)
    _connecting.upon(_stop, enter=_stopped, outputs=[_shutDown])

    _unreachable.upon(_connected, enter=_up, outputs=[_logConnected, _announce])
    _unreachable.upon(_attemptFailed, enter=_unreachable, outputs=[])
    _unreachable.upon(_connectionLost, enter=_unreachable, outputs=[])
    _unreachable.upon(_fits, enter=_unreachable, outputs=[_refuse], collector=_verdict)
    _unreachable.upon(_overflows, enter=_unreachable, outputs=[_refuse], collector=_verdict)
    _unreachable.upon(_stop, enter=_stopped, outputs=[_shutDown])

    _up.upon(_connected, enter=_up, outputs=[])
    _up.upon(_attemptFailed, enter=_up, outputs=[])
    _up.upon(_connectionLost, enter=_outage, outputs=[_logLost])
    _up.upon(_fits, enter=_up, outputs=[_accept], collector=_verdict)
    _up.upon(_overflows, enter=_congested, outputs=[_logCongested, _refuse], collector=_verdict)
    _up.upon(_stop, enter=_stopped, outputs=[_shutDown])

    _congested.upon(_connected, enter=_congested, outputs=[])
    _congested.upon(_attemptFailed, enter=_congested, outputs=[])
    _congested.upon(_connectionLost, enter=_outage, outputs=[_logLost])
    _congested.upon(_fits, enter=_up, outputs=[_logKeepsUp, _accept], collector=_verdict)
    _congested.upon(_overflows, enter=_congested, outputs=[_refuse], collector=_verdict)
    _congested.upon(_stop, enter=_stopped, outputs=[_shutDown])

    _outage.upon(_connected, enter=_up, outputs=[_logBack, _announce])
    _outage.upon(_attemptFailed, enter=_outage, outputs=[])
    _outage.upon(_connectionLost, enter=_outage, outputs=[])
    _outage.upon(_fits, enter=_outage, outputs=[_refuse], collector=_verdict)
    _outage.upon(_overflows, enter=_outage, outputs=[_refuse], collector=_verdict)
    _outage.upon(_stop, enter=_stopped, outputs=[_shutDown])

    _stopped.upon(_connected, enter=_stopped, outputs=[])
    _stopped.upon(_attemptFailed, enter=_stopped, outputs=[])
    _stopped.upon(_connectionLost, enter=_stopped, outputs=[])
    _stopped.upon(_fits, enter=_stopped, outputs=[_refuse], collector=_verdict)
    _stopped.upon(_overflows, enter=_stopped, outputs=[_refuse], collector=_verdict)
    _stopped.upon(_stop, enter=_stopped, outputs=[])
