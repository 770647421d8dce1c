"""Storm cost in instructions: what each server executes per short connection, counted by valgrind.

The storm's conns/s moves with every neighbour on a shared machine; instructions barely move.
Each server runs under ``valgrind --tool=callgrind`` (PYTHONHASHSEED=0); a warm-up storm runs,
``callgrind_control --zero`` resets the counters, then a storm of exactly CONNECTIONS connections,
CONCURRENCY at a time, from the storm's C client (connect, send a line, read it back, close), and
the count divided by CONNECTIONS is the user-space instructions one connection costs: accepting it,
its line, its echo and its broadcast to the others connected then, its close, and its log lines.
The kernel's share is not counted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BenchError, chat, servers, storm
from bench.echo import positive
from bench.instructions import callgrindControl, instructionsNow, valgrindVersion
from bench.report import Column, Section, number, ratio

NAME = "storm-instructions"
HELP = "user-space instructions per storm connection, counted under valgrind (immune to a noisy machine)"
DEFAULT_SERVERS = ("tcplab", "tcplab-quiet", "twisted-equal", "tcplab-echo", "twisted-echo")


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=positive(int), default=2000, help="connections counted (default 2000)")
    parser.add_argument("--concurrency", type=positive(int), default=20, help="connections at a time (default 20)")
    parser.add_argument("--warmup", type=positive(int), default=300, help="connections before counting (default 300)")
    parser.add_argument(
        "--servers",
        type=chat.serverListType(storm.TABLE),
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {', '.join(storm.TABLE)} (default {','.join(DEFAULT_SERVERS)})",
    )


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    valgrind = shutil.which("valgrind")
    if valgrind is None or shutil.which("callgrind_control") is None:
        raise BenchError("valgrind (with callgrind_control) is not installed: apt install valgrind")
    servers.raiseOpenFilesLimit()
    client, why = chat.clientOrNote(progress)
    if client is None:
        return [{"skipped": why}]
    chosen, skipped = chat.chooseServers(options.servers, storm.TABLE, progress)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir:
        specs = []
        for server in chosen:
            out = Path(workdir) / f"{server.name}.callgrind"
            prefix = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"]
            specs.append(server.spec.wrapped(prefix, server.name, {"PYTHONHASHSEED": "0"}))
        progress(f"starting {len(specs)} servers under valgrind (slow)")
        with servers.running(specs, Path(workdir), timeout=300, stopTimeout=60) as started:
            for server, running in zip(chosen, started, strict=True):
                began = time.monotonic()
                stormOnce(client, server, running, options.warmup, options.concurrency)
                callgrindControl(running.pid, "--zero")
                result = stormOnce(client, server, running, options.connections, options.concurrency)
                counted = instructionsNow(running.pid)
                rows.append({
                    "name": server.name,
                    "server": server.label,
                    "peer": server.peer,
                    "baseline": server.name == server.peer,
                    "concurrency": options.concurrency,
                    "per_connection": counted / options.connections,
                    "relayed": result["relayed_per_conn"],
                })
                progress(f"{server.label}: {counted / options.connections:,.0f} instructions per connection "
                         f"({time.monotonic() - began:.0f} s)")
    byName = {row["name"]: row for row in rows}
    for row in rows:
        peer = byName.get(row["peer"])
        row["ratio"] = row["per_connection"] / peer["per_connection"] if peer else None
    return rows + [{"skipped": note} for note in skipped]


def stormOnce(client: chat.ChatClient, server: chat.ChatServer, running: servers.RunningServer, connections: int,
              concurrency: int) -> dict:
    """One storm of exactly ``connections``, every one completed, or BenchError."""
    result = client.storm(server, running.port, connections, concurrency, timeout=120.0, deadline=900.0,
                          running=running)
    if result.get("error") or result.get("errors") or result.get("completed") != connections:
        why = result.get("error") or result.get("first_error") or f"{result.get('completed')} completed"
        raise BenchError(f"{server.label} under valgrind: {why}{running.logTail()}")
    return result


COLUMNS = (
    Column("server", "server", align="left"),
    Column("per_connection", "instructions per connection", number()),
    Column("ratio", "vs plain Twisted at equal work", ratio),
    Column("relayed", "others' lines per conn", number(1)),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    measured = [row for row in rows if "skipped" not in row]
    notes = [
        f"Instructions the server process executed (user space, valgrind --tool=callgrind, PYTHONHASHSEED=0) "
        f"while serving a storm of {options.connections:,} connections, {options.concurrency} at a time (each "
        f"connects, sends a line, reads it back and closes), divided by {options.connections:,}; counters zeroed "
        f"with callgrind_control after a warm-up storm of {options.warmup:,}. The broadcast servers' storm also "
        "connects and closes the witness connection (one more connection in the count) and each line goes to "
        "every client connected at that moment (others' lines per conn), as in `python -m bench storm`.",
        "Ratios: against the plain Twisted server doing the same work per connection (the equal-work chat for "
        "the broadcast servers, the docs' Echo(Protocol) for tcplab-echo).",
        f"Counted with {valgrindVersion()}.",
    ]
    notes += [row["skipped"] for row in rows if "skipped" in row]
    return Section("Storm: instructions per connection", COLUMNS, measured, notes)
