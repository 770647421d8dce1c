"""Fan-out workload: one sender, R listeners, M numbered lines; delivered lines/s and nothing lost.

From the C chat client (bench/chatclient.c): R listener connections read as fast as they can; one
sender sends M lines of SIZE bytes, each with a sequence number, never more than WINDOW lines
ahead of the slowest listener, in batches (once the slowest listener is within half a window it
writes up to a full window at once). Every listener checks that it got every sequence number, once
and in order. A sync phase first makes sure every listener has joined. Delivered lines/s is
R x M over the time from the first data line sent to the last one delivered.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence

from bench import chat, servers
from bench.echo import positive
from bench.report import TIMES, Column, Section, number, ratio

NAME = "fanout"
HELP = "fan-out: one sender, R listeners, M numbered lines: delivered lines/s, and whether any was lost"
TABLE = chat.chatServers()
DEFAULT_SERVERS = ("tcplab", "twisted", "twisted-example", "ncat", "ncat-chat")

#: Targets from issue 4: at least twice the plain Twisted chat, toward ncat --broker, nothing lost.
TARGET_RATIO = 2.0


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listeners", type=positive(int), default=50, help="listening clients (default 50)")
    parser.add_argument("--lines", type=positive(int), default=100000, help="lines sent (default 100000)")
    parser.add_argument("--size", type=positive(int), default=64, help="bytes per line, line end included (default 64)")
    parser.add_argument(
        "--window", type=positive(int), default=4000,
        help="most lines the sender may be ahead of the slowest listener (default 4000)",
    )
    parser.add_argument("--rounds", type=positive(int), default=3, help="rounds of fresh servers (default 3)")
    parser.add_argument(
        "--stall", type=positive(float), default=5.0, help="give up after this long without progress (default 5)"
    )
    parser.add_argument(
        "--servers",
        type=chat.serverListType(TABLE),
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {', '.join(TABLE)} (default {','.join(DEFAULT_SERVERS)})",
    )


def measure(client: chat.ChatClient, server: chat.ChatServer, running: servers.RunningServer,
            options: argparse.Namespace) -> dict:
    running.check()
    deadline = 60.0 + options.listeners * options.lines / 100_000
    result = client.fanout(server, running.port, options.listeners, options.lines, options.size, options.window,
                           options.stall, deadline, running=running)
    return chat.finishMeasure(result, server, running, "delivered")


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    return chat.runRounds(options, progress, TABLE, measure, _describe, summarize)


def _describe(result: dict) -> str:
    return (
        f"{result['lines_per_s']:>12,.0f} lines/s delivered"
        f"  {'every line, in order' if result['in_order'] else 'LINES LOST OR OUT OF ORDER'}"
        f"  server CPU {result.get('server_cpu') or 0:.0%}"
    )


def summarize(chosen: Sequence[chat.ChatServer], results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for server in chosen:
        runs = results[server.name]
        expected = sum(r["expected"] for r in runs)
        delivered = sum(r["delivered"] for r in runs)
        rows.append({
            "name": server.name,
            "server": server.label,
            "baseline": server.spec.baseline,
            "lines_per_s": statistics.median(r["lines_per_s"] for r in runs),
            "rounds": [r["lines_per_s"] for r in runs],
            "mb_per_s": statistics.median(r["mb_per_s"] for r in runs),
            "in_order": all(r["in_order"] for r in runs),
            "expected": expected,
            "delivered": delivered,
            "gaps": sum(r["gaps"] for r in runs),
            "reordered": sum(r["reordered"] for r in runs),
            "server_cpu": statistics.median(r.get("server_cpu") or 0 for r in runs),
            "client_cpu": max(r["client_cpu"] for r in runs),
            "peak_rss_mib": max((r["peak_rss_mib"] or 0) for r in runs),
            "errors": [r["error"] for r in runs if r.get("error")],
            "died": not all(r["alive"] for r in runs),
        })
    base = next((row for row in rows if row["baseline"]), None)
    for row in rows:
        row["ratio"] = row["lines_per_s"] / base["lines_per_s"] if base and base["lines_per_s"] else None
        row["complete"] = completeness(row)
    return rows


def completeness(row: dict) -> str:
    if row["in_order"]:
        return "yes"
    missing = row["expected"] - row["delivered"]
    parts = []
    if missing > 0:
        parts.append(f"{missing:,} of {row['expected']:,} missing")
    if row["gaps"]:
        parts.append(f"{row['gaps']:,} skipped")
    if row["reordered"]:
        parts.append(f"{row['reordered']:,} out of order")
    return "**no**" + (f" ({', '.join(parts)})" if parts else "")


def rounds(values: object) -> str:
    return " / ".join(f"{v / 1e6:.2f}M" for v in values)  # type: ignore[attr-defined]


COLUMNS = (
    Column("server", "server", align="left"),
    Column("lines_per_s", "lines/s delivered (median)", number()),
    Column("ratio", "vs plain Twisted", ratio),
    Column("rounds", "lines/s per round", rounds),
    Column("mb_per_s", "MB/s delivered", number(0)),
    Column("complete", "every listener got every line, in order", align="left"),
    Column("server_cpu", "server CPU", lambda v: "—" if v is None else f"{v:.0%}"),
    Column("peak_rss_mib", "server peak RSS MiB", number(1)),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    measured = [row for row in rows if "skipped" not in row]
    notes = [
        f"{options.listeners} listeners, one sender, {options.lines:,} lines of {options.size} bytes each "
        f"({options.listeners * options.lines:,} deliveries per run); the sender stays at most {options.window:,} "
        f"lines ahead of the slowest listener and writes in batches of up to that many; {options.rounds} "
        f"round{'s' if options.rounds > 1 else ''} of freshly started servers; figures are medians over rounds.",
        "Every listener checks the sequence number of every line it gets: \"yes\" means every listener got "
        "every line exactly once and in order, in every round.",
        "tcplab-multi and the chatserver.py example also send each line back to the sender, which reads and counts "
        "those echoes; the others do not. Server CPU is the server's share of one core over the run: near 100% "
        "means it set the pace.",
    ]
    notes += [row["skipped"] for row in rows if "skipped" in row]
    for row in measured:
        for error in dict.fromkeys(row["errors"]):
            notes.append(f"{row['server']}: {error}")
        if row["died"]:
            notes.append(f"{row['server']} exited during the run.")
    base = next((row for row in measured if row["baseline"]), None)
    ncat = next((row for row in measured if row["name"] == "ncat"), None)
    for row in measured:
        if row["name"] == "tcplab" and base:
            met = row["ratio"] >= TARGET_RATIO and row["in_order"]
            versus = (f"; {row['lines_per_s'] / ncat['lines_per_s']:.2f}{TIMES} ncat --broker"
                      if ncat and ncat["lines_per_s"] else "")
            notes.append(
                f"Target (issue 4): tcplab-multi ≥ {TARGET_RATIO:.0f}{TIMES} the plain Twisted chat, toward ncat "
                f"--broker, nothing lost: {row['ratio']:.2f}{TIMES}{versus}, "
                f"{'nothing lost' if row['in_order'] else 'LINES LOST'}: {'met' if met else 'NOT met'}."
            )
    return Section("Fan-out: one sender, many listeners", COLUMNS, measured, notes)
