"""``--web`` on tcplab-echo: a page with the live view alone (connections now, connections and bytes per
second), read from the same counters as the log and ``--metrics``, so a student watching a storm sees it
happen."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from tcplab.echo.server import EchoFactory
from tcplab.interfaces import IReactor
from tcplab.listening import ListeningService
from tcplab.web import Counters, pageSite, quietSite


def echoCounters(factory: EchoFactory) -> dict[str, Any]:
    """The live view's numbers: connections open and accepted, bytes received (and so echoed)."""
    return {"connections": factory.connections, "joined": factory.accepted, "bytesIn": factory.received,
            "bytesOut": factory.received}


def echoSite(factory: EchoFactory) -> Site:
    root: Resource = pageSite("tcplab.echo", scripts=("live.js",))
    root.putChild(b"stats", Counters(lambda: echoCounters(factory)))
    return quietSite(root)


def webService(description: str, factory: EchoFactory, reactor: IReactor) -> ListeningService:
    return ListeningService([description], echoSite(factory), reactor)
