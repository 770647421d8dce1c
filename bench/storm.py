"""Storm workload: many short connections to a broadcast server, some at once.

N connections, at most C at a time, from the C chat client (bench/chatclient.c): each connects,
sends one line and waits until that line has come back, then closes. tcplab-multi echoes a line
to its sender, so a connection waits for its own echo (skipping ``* `` server lines and others'
lines). The Twisted docs' chat and ncat --broker relay a line only to the *other* clients, so a
witness connection, open for the whole run on every server, reads every line, and a connection of
those servers is done when the witness has its line. Either way a connection's time is connect +
send + the server processing the line and writing it out to a client. Every line's arrival at the
witness is checked, for every server.

On a broadcast server a storm is also a fan-out: each line goes to every client connected at that
moment, and how many that is depends on the server (a client joins tcplab-multi when it connects;
it joins the docs' chat when its first line, its name, is read). The client counts the other
connections' lines each connection received before it closed ("relayed per connection"), so the
table shows how much broadcasting each server did besides accepting connections.

Each server is compared with the plain Twisted server that does the same work per connection
("at equal work"): tcplab-multi with a ``LineReceiver`` chat that joins clients at accept and echoes
and broadcasts each line (bench/peers/twisted_chatequal.py), tcplab-echo with the docs' ``Echo(Protocol)``
(bench/peers/twisted_echo.py; an echo server relays nothing, so the storm runs without a witness there).
Every concurrency of ``--concurrency`` (20 and 100 by default) is measured on the same servers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import chat, servers
from bench.echo import positive
from bench.report import TIMES, Column, Section, number, ratio

NAME = "storm"
HELP = "connection storm: N short connections, C at a time, each sending a line and waiting for it (conns/s)"

#: Plain echo servers in a storm: each connection waits for its own line back; nothing is relayed.
ECHO_SERVERS = {
    "tcplab-echo": chat.ChatServer(
        servers.ServerSpec("tcplab-echo", "tcplab-echo", servers.tcplabServer("tcplab-echo")),
        echoes=True, witness=False, peer="twisted-echo", about="defaults: connection log lines on, read throttle",
    ),
    "twisted-echo": chat.ChatServer(
        servers.ServerSpec("twisted-echo", "plain Twisted echo (docs)",
                           servers.peerScript("twisted_echo.py", "--backlog", "1024")),
        echoes=True, witness=False, peer="twisted-echo",
        about="Echo(Protocol) from Twisted's docs, listening with tcplab's backlog of 1,024",
    ),
}
TABLE = {**chat.chatServers(), **ECHO_SERVERS}
DEFAULT_SERVERS = ("tcplab", "tcplab-quiet", "twisted-equal", "twisted", "twisted-example", "ncat", "tcplab-echo",
                   "twisted-echo")
DEFAULT_CONCURRENCY = (20, 100)
#: The howto chat: the baseline of issue 4's ratio, kept as its own column.
HOWTO = "twisted"

#: Targets from issue 4 (at least the plain Twisted chat's conns/s, no errors at 10,000 connections) and
#: issue 15 (tcplab-multi and tcplab-echo at least their plain Twisted peers at equal work, at 20 and 100).
TARGET_RATIO = 1.0
TARGETED = ("tcplab", "tcplab-echo")


def concurrencyList(value: str) -> list[int]:
    import argparse

    try:
        numbers = [int(n) for n in value.split(",") if n.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) <= 0:
        raise argparse.ArgumentTypeError(f"concurrency is a comma list of positive numbers; got {value!r}")
    return numbers


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=positive(int), default=10000, help="connections in all (default 10000)")
    parser.add_argument("--concurrency", type=concurrencyList, default=list(DEFAULT_CONCURRENCY),
                        help="connections at a time, a comma list: each is measured (default 20,100)")
    parser.add_argument("--rounds", type=positive(int), default=3, help="rounds of fresh servers (default 3)")
    parser.add_argument(
        "--timeout", type=positive(float), default=10.0, help="seconds a connection may take (default 10)"
    )
    parser.add_argument(
        "--servers",
        type=chat.serverListType(TABLE),
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {', '.join(TABLE)} (default {','.join(DEFAULT_SERVERS)})",
    )


def measure(client: chat.ChatClient, server: chat.ChatServer, running: servers.RunningServer,
            options: argparse.Namespace, concurrency: int | None = None) -> dict:
    """One storm; at ``concurrency``, or at ``options.concurrency`` (a number, for the backplane workload)."""
    if concurrency is None:
        concurrency = options.concurrency
    running.check()
    deadline = max(30.0, options.connections / 100)
    overflowsBefore = servers.listenOverflows()
    result = client.storm(server, running.port, options.connections, concurrency, options.timeout,
                          deadline, running)
    overflowsAfter = servers.listenOverflows()
    if overflowsBefore is not None and overflowsAfter is not None:
        result["overflows"] = overflowsAfter - overflowsBefore
    return chat.finishMeasure(result, server, running, "completed")


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Rounds of fresh servers; in each, every concurrency in turn, the servers in an order that rotates."""
    servers.raiseOpenFilesLimit()
    client, why = chat.clientOrNote(progress)
    if client is None:
        return [{"skipped": why}]
    chosen, skipped = chat.chooseServers(options.servers, TABLE, progress)
    results: dict[tuple[str, int], list[dict]] = {(s.name, c): [] for s in chosen for c in options.concurrency}
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir:
        for round_ in range(options.rounds):
            with servers.running([s.spec for s in chosen], Path(workdir)) as started:
                order = list(zip(chosen, started, strict=True))
                for step, concurrency in enumerate(options.concurrency):
                    shift = (round_ + step) % len(order)
                    for server, running in order[shift:] + order[:shift]:
                        result = measure(client, server, running, options, concurrency)
                        results[server.name, concurrency].append(result)
                        progress(f"round {round_ + 1}/{options.rounds} {server.label:<30} {concurrency:>4} at a time "
                                 f"{_describe(result)}" + (f"  [{result['error']}]" if result.get("error") else ""))
    return summarize(chosen, options.concurrency, results) + [{"skipped": note} for note in skipped]


def _describe(result: dict) -> str:
    return (
        f"{result['conns_per_s']:>8,.0f} conns/s  errors {result['errors']}"
        f"  p99 {result['p99_ms']:,.1f} ms  relayed/conn {result['relayed_per_conn']:.1f}"
        f"  server CPU {result.get('server_cpu') or 0:.0%}"
        f"  listen-queue overflows {result.get('overflows', '?')}"
        + (f"  ({result['first_error']})" if result.get("first_error") else "")
    )


def summarize(chosen: Sequence[chat.ChatServer], concurrencies: Sequence[int],
              results: dict[tuple[str, int], list[dict]]) -> list[dict]:
    rows = []
    for concurrency, server in ((c, s) for c in concurrencies for s in chosen):
        runs = results[server.name, concurrency]
        cpu = [r["server_cpu"] * r["seconds"] * 1e6 / r["completed"] for r in runs if r.get("completed")
               and r.get("server_cpu") is not None]
        rows.append({
            "name": server.name,
            "server": server.label,
            "concurrency": concurrency,
            "peer": server.peer,
            "baseline": server.spec.baseline or server.name == server.peer,
            "about": server.about,
            "conns_per_s": statistics.median(r["conns_per_s"] for r in runs),
            "rounds": [r["conns_per_s"] for r in runs],
            "errors": sum(r["errors"] for r in runs),
            "lost": sum(max(0, r["completed"] - r["witnessed"]) for r in runs if r.get("witness", True)),
            "connections": sum(r["connections"] for r in runs),
            "completed": sum(r["completed"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "max_ms": max(r["max_ms"] for r in runs),
            "relayed": statistics.median(r["relayed_per_conn"] for r in runs),
            "overflows": [r.get("overflows") for r in runs],
            "server_cpu": statistics.median(r.get("server_cpu") or 0 for r in runs),
            "cpu_us": statistics.median(cpu) if cpu else None,
            "client_cpu": max(r["client_cpu"] for r in runs),
            "peak_rss_mib": max((r["peak_rss_mib"] or 0) for r in runs),
            "first_error": next((r["first_error"] for r in runs if r.get("first_error")), None),
            "fatal": next((r["error"] for r in runs if r.get("error")), None),
            "died": not all(r["alive"] for r in runs),
        })
    byName = {(row["name"], row["concurrency"]): row for row in rows}
    for row in rows:
        row["errors_text"] = errorsCell(row)
        peer = byName.get((row["peer"], row["concurrency"]))
        howto = byName.get((HOWTO, row["concurrency"])) if row["name"] in chat.chatServers() else None
        row["ratio"] = row["conns_per_s"] / peer["conns_per_s"] if peer and peer["conns_per_s"] else None
        row["howto_ratio"] = row["conns_per_s"] / howto["conns_per_s"] if howto and howto["conns_per_s"] else None
    return rows


def rounds(values: object) -> str:
    return " / ".join(f"{v / 1000:.1f}k" for v in values)  # type: ignore[attr-defined]


def errorsCell(row: dict) -> str:
    text = f"{row['errors']:,}"
    if row.get("lost"):
        text += f" ({row['lost']:,} lines lost)"
    return text


COLUMNS = (
    Column("server", "server", align="left"),
    Column("concurrency", "at a time"),
    Column("conns_per_s", "conns/s (median)", number()),
    Column("ratio", "vs plain Twisted at equal work", ratio),
    Column("howto_ratio", "vs the docs' chat", ratio),
    Column("rounds", "conns/s per round", rounds),
    Column("errors_text", "errors (all rounds)"),
    Column("p50_ms", "p50 ms", number(1)),
    Column("p99_ms", "p99 ms", number(1)),
    Column("max_ms", "max ms", number(0)),
    Column("relayed", "others' lines per conn", number(1)),
    Column("overflows", "listen-queue overflows per round", lambda v: " / ".join(
        "?" if x is None else f"{x:,}" for x in v)),  # type: ignore[attr-defined]
    Column("server_cpu", "server CPU", lambda v: "—" if v is None else f"{v:.0%}"),
    Column("cpu_us", "server CPU µs/conn", number(0)),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    measured = [row for row in rows if "skipped" not in row]
    concurrencies = " and ".join(str(c) for c in options.concurrency)
    notes = [
        f"{options.connections:,} connections per server per round, {concurrencies} at a time; "
        f"{options.rounds} round{'s' if options.rounds > 1 else ''} of freshly started servers in rotating order; "
        "figures are medians over rounds "
        "(errors: the sum), ratios are ratios of medians. conns/s is connections completed over the time from the "
        "first connect to the last completion.",
        "At equal work: each server's conns/s over those of the plain Twisted server doing the same work per "
        "connection at the same concurrency, in the same rounds: for the broadcast servers the equal-work chat "
        "(bench/peers/twisted_chatequal.py: a LineReceiver that joins a client at accept, echoes each line to it "
        "and sends it as <NAME> LINE to the others, with tcplab-multi's backlog of 1,024 and nothing else), for "
        "tcplab-echo the docs' Echo(Protocol) (bench/peers/twisted_echo.py, given the same backlog). "
        "The docs' chat column keeps issue 4's ratio against the howto chat, which does less per connection.",
        "A connection's time is from connect() to its line coming back: its own echo from the servers that echo "
        "to the sender (tcplab-multi, the equal-work chat, the chatserver.py example, the echo servers), at the "
        "witness connection for the others (the echo servers run without one: they relay nothing). "
        "Errors: refused or failed connects, "
        "connections closed or reset by the server, and lines not back within "
        f"{options.timeout:g} s; \"lines lost\" are completed connections whose line never reached the witness.",
        "Others' lines per conn: lines of other storm connections that a connection received before it closed, "
        "i.e. how much broadcasting the server did per connection. tcplab-multi, the chatserver.py example and ncat "
        "take a client into the room when they accept it, the howto chat when it has read the client's name (the "
        "first line, which arrives with the message), so fewer clients are members at any moment there. A server "
        "that accepts every connection at once (tcplab-multi's backlog is 1,024) has all 100 clients in the room, "
        "and one whose accept queue overflows has fewer (the rest wait to retry); a slower server keeps clients "
        "connected longer, which makes each broadcast bigger again.",
        "Server CPU µs/conn: the server's user+system CPU time over the run divided by the connections.",
    ]
    if {"tcplab", "tcplab-quiet"} <= {row["name"] for row in measured}:
        notes.append(
            "tcplab-multi runs twice: with its defaults (join and leave notices while at most 100 clients are "
            "connected, which in a storm of 100 at a time means a notice broadcast for most joins and leaves) and "
            "with `--notice-limit 0` (no notices, like the peers). The like-for-like comparison with the peers is "
            "the second; the first is what users get out of the box."
        )
    notes += [
        "Listen-queue overflows: how many times the kernel dropped a connection's handshake because the server's "
        "accept queue was full (TcpExt ListenOverflows in /proc/net/netstat over the run; system-wide, so another "
        "program's would count too). The client then retries after 1 s or more (SYN retry, or with SYN cookies "
        "its data is retransmitted with growing back-off), which shows as max times of 1-8 s, low conns/s and, "
        f"past {options.timeout:g} s, errors. tcplab-multi listens with a backlog of 1,024 (capped by somaxconn), "
        "the docs' chat with Twisted's default of 50, ncat with 10. ncat runs with `--max-conns 1000` (its "
        "default of 100 would refuse the witness plus 100 storm connections).",
    ]
    for row in rows:
        if "skipped" in row:
            notes.append(row["skipped"])
    for row in measured:
        if row.get("fatal"):
            notes.append(f"{row['server']}: {row['fatal']}")
        if row.get("first_error"):
            notes.append(f"{row['server']}: first error: {row['first_error']}")
        if row.get("died"):
            notes.append(f"{row['server']} exited during the run.")
    for row in measured:
        if row["name"] in TARGETED and row["ratio"] is not None:
            met = row["ratio"] >= TARGET_RATIO and row["errors"] == 0 and not row["lost"]
            notes.append(
                f"Target (issue 15), {row['server']}, {row['concurrency']} at a time: ≥ {TARGET_RATIO:.1f}{TIMES} its "
                f"plain Twisted peer at equal work, zero errors: {row['ratio']:.2f}{TIMES}, "
                f"{row['errors']} errors, {'met' if met else 'NOT met'}."
            )
    return Section("Storm: short connections", COLUMNS, measured, notes)
