"""``--usage-log FILE``: one JSON object per line for every finished connection, and every upload.

Records go through twisted.logger: a :class:`UsageLog` has its own Logger (namespace
``tcplab.usage``), whose events a filtering observer hands to ``jsonFileLogObserver`` (so the
file reads back with ``json.loads`` per line, or Twisted's ``eventsFromJSONLogFile``). They never
reach the text log. Callers pass only what a record should hold: peers already escaped by
:func:`tcplab.peers.describeAddress`, names by :func:`tcplab.escaping.escapeName`, never a token.
"""

from __future__ import annotations

from typing import IO, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    PredicateResult,
    jsonFileLogObserver,
)
from zope.interface import implementer

from tcplab.interfaces import globalReactor

_T = TypeVar("_T")

NAMESPACE = "tcplab.usage"
#: Kept from Twisted's own event keys: when the record was written (``log_time``: the end), and whose it is.
_KEPT = frozenset({"log_time", "log_namespace"})


@implementer(ILogFilterPredicate)
class _OnlyUsage:
    """Lets only this module's records through to the usage file."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        return PredicateResult.maybe if event.get("log_namespace") == NAMESPACE else PredicateResult.no


@implementer(ILogObserver)
class _Plain:
    """Drops the Logger object and source from each event: they are not data, and do not serialise."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        self.observer({k: v for k, v in event.items() if k in _KEPT or not k.startswith("log_")})


class UsageLog:
    """Appends one JSON record per finished connection or upload to ``path``."""

    def __init__(self, path: str, server: str, clock: IReactorTime | None = None) -> None:
        self.clock: IReactorTime = globalReactor() if clock is None else clock
        self.server = server
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        observer = FilteringLogObserver(_Plain(jsonFileLogObserver(self._file, recordSeparator="")), [_OnlyUsage()])
        self.log = Logger(namespace=NAMESPACE, observer=observer)

    def now(self) -> float:
        return float(self.clock.seconds())

    def connection(self, start: float, peer: str, bytesIn: int, bytesOut: int, outcome: str, reason: str,
                   **extra: object) -> None:
        """A connection ended: ``outcome`` is a short fixed word (``closed``, ``idle``, ``refused``...)."""
        if self._file.closed:
            return
        self.log.info("connection from {peer}: {outcome} ({reason})", kind="connection", server=self.server,
                      start=start, duration=round(self.now() - start, 6), peer=peer, bytes_in=bytesIn,
                      bytes_out=bytesOut, outcome=outcome, reason=reason, **extra)

    def upload(self, start: float, peer: str, name: str, size: int, sha256: str | None, outcome: str,
               reason: str) -> None:
        """An upload ended: ``outcome`` is ``stored`` or the ERR code."""
        if self._file.closed:
            return
        self.log.info("upload of {name} from {peer}: {outcome}", kind="upload", server=self.server, start=start,
                      duration=round(self.now() - start, 6), peer=peer, name=name, size=size, sha256=sha256,
                      outcome=outcome, reason=reason)

    def close(self) -> None:
        self._file.close()

    def closeAfter(self, result: _T) -> _T:
        """Close, and pass ``result`` on: the last step of a service's ``stopService``."""
        self.close()
        return result

