"""``--metrics``: the Prometheus text format at ``/metrics``, and ``/healthz``, on their own endpoint.

Nothing is counted here: each wing's collector reads the counters its servers already keep
for their log lines, when a scrape asks, so the log and the metrics cannot disagree. Names
follow Prometheus style (``tcplab_<wing>_..._total``, units in the name) and labels come from
small fixed sets (reasons, error codes), never from peers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.threads import blockingCallFromThread
from twisted.python.threadable import isInIOThread
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tcplab.interfaces import IReactor, globalReactor
from tcplab.listening import ListeningService

#: One sample: (name without ``tcplab_``, kind ``counter`` or ``gauge``, help, {label tuple: value}).
Family = tuple[str, str, str, dict[tuple[tuple[str, str], ...], float]]


def one(value: float) -> dict[tuple[tuple[str, str], ...], float]:
    """A family with a single unlabelled sample."""
    return {(): value}


def byLabel(label: str, values: dict[str, float]) -> dict[tuple[tuple[str, str], ...], float]:
    """A family with one sample per value of ``label`` (a small fixed set, such as reasons)."""
    return {((label, key),): value for key, value in values.items()}


class SnapshotCollector(Collector):
    """Reads ``snapshot()`` in the reactor thread (the WSGI scrape runs in a worker thread, and
    the servers' counters are only ever touched by the reactor), and turns it into metric families."""

    def __init__(self, snapshot: Callable[[], Iterable[Family]], reactor: IReactor) -> None:
        self.snapshot = snapshot
        self.reactor = reactor

    def collect(self) -> Iterator[Metric]:
        if isInIOThread():
            families = list(self.snapshot())
        else:
            families = blockingCallFromThread(self.reactor, lambda: list(self.snapshot()))
        for name, kind, help_, samples in families:
            labels = sorted({key for labelled in samples for key, _ in labelled})
            metric: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                metric = CounterMetricFamily(f"tcplab_{name}", help_, labels=labels)
            else:
                metric = GaugeMetricFamily(f"tcplab_{name}", help_, labels=labels)
            for labelled, value in samples.items():
                metric.add_metric([dict(labelled)[k] for k in labels], value)
            yield metric


class Health(Resource):
    """``/healthz``: 200 ``ok`` while the process serves (for load balancers and systemd watchdogs)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


def metricsSite(registry: CollectorRegistry) -> Site:
    """A twisted.web Site with prometheus_client's ``MetricsResource`` at /metrics and /healthz."""
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", Health())
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]  # a scrape every few seconds is not news
    return site


class MetricsService(ListeningService):
    """Serves one server's metrics on ``--metrics ENDPOINT``; ``registry`` is its own (not the global
    one), so several servers in one process, as in tests, never mix."""

    def __init__(self, description: str, snapshot: Callable[[], Iterable[Family]],
                 reactor: IReactor | None = None) -> None:
        reactor = globalReactor() if reactor is None else reactor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot, reactor))
        super().__init__([description], metricsSite(self.registry), reactor)
        self.setName("metrics")
