"""PNG bar charts of a report's figures (matplotlib, Agg backend: no display needed).

matplotlib is the optional ``bench`` extra (``pip install '.[bench]'``), not a dependency of
tcplab: without it, ``available()`` says why and the report is written without pictures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: tcplab's own bars stand out; peers are grey, the baseline of the ratios a darker grey.
TCPLAB = "#1f77b4"
PEER = "#b0b0b0"
BASELINE = "#6f6f6f"


def available() -> str:
    """"" if charts can be drawn, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "charts not drawn: matplotlib is not installed (`pip install '.[bench]'`)"
    return ""


def colour(name: str, baseline: bool = False) -> str:
    if name.startswith("tcplab"):
        return TCPLAB
    return BASELINE if baseline else PEER


Bar = tuple[str, float | None, str] | tuple[str, float | None, str, str]


def bars(path: Path, title: str, panels: Sequence[tuple[str, Sequence[Bar], str]]) -> Path:
    """Horizontal bar panels side by side. Each panel: (axis label, bars, value format); a bar is
    (label, value, colour) or (label, value, colour, text to show instead of the value).

    A bar whose value is None (not measured: the server died or was skipped) is drawn empty and labelled so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.45 * max(len(items) for _, items, _ in panels) + 1.1
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), height), squeeze=False)
    for axis, (label, items, fmt) in zip(axes[0], panels, strict=True):
        names = [item[0] for item in items][::-1]
        values = [item[1] or 0 for item in items][::-1]
        colours = [item[2] for item in items][::-1]
        drawn = axis.barh(names, values, color=colours)
        top = max(values) if any(values) else 1
        for bar, item in zip(drawn, list(items)[::-1], strict=True):
            value = item[1]
            text = item[3] if len(item) > 3 else "not measured" if value is None else fmt.format(value)
            axis.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, text, va="center",
                      fontsize=8)
        axis.set_xlim(0, top * 1.28)
        axis.set_xlabel(label, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.spines[["top", "right"]].set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def measured(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if "skipped" not in row]


def echoChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)
    return bars(path, "Echo, 10 connections ping-pong (higher req/s, lower p99 are better)", [
        ("requests/s (median)", [(r["server"], r["rps"], colour(r["name"], r["baseline"])) for r in rows], "{:,.0f}"),
        ("p99 latency µs (median)", [(r["server"], r["p99_us"], colour(r["name"], r["baseline"])) for r in rows],
         "{:,.0f}"),
    ])


def echoMemoryChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)
    return bars(path, "Echo server memory while a client pushes without reading (lower is better)", [
        ("RSS growth while not reading, MiB", [(r["server"], r["growth_mib"], colour(r["name"])) for r in rows],
         "{:,.1f}"),
    ])


def instructionsChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)
    return bars(path, "Echo: user-space instructions per request (lower is better)", [
        ("instructions per request", [(r["server"], r["per_request"], colour(r["name"], r["baseline"]))
                                      for r in rows], "{:,.0f}"),
    ])


def stormInstructionsChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)
    return bars(path, "Storm: user-space instructions per connection (lower is better)", [
        ("instructions per connection", [(r["server"], r["per_connection"], colour(r["name"], r["baseline"]))
                                         for r in rows], "{:,.0f}"),
    ])


def stormChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)

    def label(r: dict) -> str:
        return f"{r['server']}, {r['concurrency']} at a time" if "concurrency" in r else r["server"]

    return bars(path, "Connection storm (higher conns/s, lower p99 are better)", [
        ("connections/s (median)", [(label(r), r["conns_per_s"], colour(r["name"], r["baseline"])) for r in rows],
         "{:,.0f}"),
        ("p99 connect + line back, ms", [(label(r), r["p99_ms"], colour(r["name"], r["baseline"])) for r in rows],
         "{:,.1f}"),
    ])


def fanoutChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)
    items = []
    for r in rows:
        label = r["server"] + ("" if r["in_order"] else " (LOST LINES)")
        items.append((label, r["lines_per_s"] / 1e6, colour(r["name"], r["baseline"])))
    return bars(path, "Fan-out: one sender, many listeners (higher is better)", [
        ("million lines/s delivered (median)", items, "{:,.2f}M"),
    ])


def multiMemoryChart(rows: Sequence[dict], path: Path) -> Path:
    rows = measured(rows)
    idle: list[Bar] = []
    stuck: list[Bar] = []
    for r in rows:
        shade = colour(r["name"], r.get("baseline", False))
        if r.get("rss_all") is None:
            idle.append((r["server"], None, shade, f"died at about {r.get('failed_at', 0):,} clients"
                         if "failure" in r else "not measured"))
        else:
            idle.append((r["server"], r["rss_all"], shade))
        if r.get("growth_mib") is not None and not r.get("listener_ok", True):
            stuck.append((r["server"], r["growth_mib"], shade,
                          f"{r['growth_mib']:,.1f} (stalled: listener got {r.get('listener_mib', 0):,.0f} MiB)"))
        else:
            stuck.append((r["server"], r.get("growth_mib"), shade))
    return bars(path, "Broadcast server memory (lower is better)", [
        (f"RSS with {rows[0]['idle']:,} idle clients, MiB" if rows else "RSS, MiB", idle, "{:,.1f}"),
        ("RSS growth, one stuck reader, MiB", stuck, "{:,.1f}"),
    ])


def fileChart(rows: Sequence[dict], path: Path) -> Path:
    return bars(path, "File upload throughput, data fsync'ed (higher is better)", [
        ("MB/s", [(r["label"], r["mb_per_s"], TCPLAB if r["method"].startswith("tcplab") else PEER) for r in rows],
         "{:,.0f}"),
    ])


CHARTS = {
    "echo": echoChart,
    "echo-memory": echoMemoryChart,
    "echo-instructions": instructionsChart,
    "storm": stormChart,
    "storm-instructions": stormInstructionsChart,
    "fanout": fanoutChart,
    "multi-memory": multiMemoryChart,
    "file": fileChart,
}
