"""``--web``: the hub's room in a browser. Each browser is a :class:`~tcplab.multi.hub.HubClient` like any
other, over a WebSocket in line mode (one text message is one line), so every limit, command, notice
and the backplane apply to it unchanged."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Site

from tcplab.interfaces import IReactor
from tcplab.listening import ListeningService
from tcplab.multi.hub import MultiHub
from tcplab.web import StreamingWebSocketFactory, webSite


def hubCounters(hub: MultiHub) -> dict[str, Any]:
    """The live view's numbers, straight from the hub's own stats counters."""
    fields = hub.statsFields()
    return {"connections": fields["clients"], "joined": fields["joined"], "bytesIn": fields["bytesIn"],
            "bytesOut": fields["bytesOut"], "lines": fields["lines"]}


def multiSite(hub: MultiHub) -> Site:
    return webSite("tcplab.multi", StreamingWebSocketFactory(hub, lineMode=True), lambda: hubCounters(hub))


def webService(description: str, hub: MultiHub, reactor: IReactor) -> ListeningService:
    return ListeningService([description], multiSite(hub), reactor)
