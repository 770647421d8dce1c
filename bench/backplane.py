"""Backplane workload: fan-out and storm against one tcplab-multi, then two on one port joined by Redis.

One run starts its own ``redis-server`` (free loopback port, temporary folder, no persistence),
then measures, with the same C chat client as the fanout and storm workloads (bench/chatclient.c):

- A: one tcplab-multi process;
- B: two tcplab-multi processes on the same port (``--reuse-port``: the kernel spreads the load
  client's connections over them) joined by ``--backplane redis://127.0.0.1:P/0``.

Both get a large ``--send-queue`` so no listener is dropped. B is measured only once both nodes
are subscribed to the room's channel (PUBSUB NUMSUB); the fan-out's sync phase then repeats its
sync line until every listener, on either node, has seen one. Every listener checks every line's
sequence number (lost, duplicated, out of order), and in the storm the witness connection checks
that every connection's line reached it (on B, often through the other node). Redis is stopped
however the run ends.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BenchError, chat, fanout, servers, storm
from bench.echo import positive
from bench.report import TIMES, Column, Section, number, ratio

NAME = "backplane"
HELP = "scale-out: fan-out and storm, one tcplab-multi vs two on one port joined by a Redis backplane"
CHANNEL = "tcplab-multi"
SEND_QUEUE = 256 * servers.MiB


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listeners", type=positive(int), default=50, help="fan-out listeners (default 50)")
    parser.add_argument("--lines", type=positive(int), default=50000, help="fan-out lines sent (default 50000)")
    parser.add_argument("--size", type=positive(int), default=64, help="bytes per line (default 64)")
    parser.add_argument("--window", type=positive(int), default=4000,
                        help="lines the sender may be ahead of the slowest listener (default 4000)")
    parser.add_argument("--stall", type=positive(float), default=5.0,
                        help="fan-out: give up after this long without progress (default 5)")
    parser.add_argument("--connections", type=positive(int), default=5000, help="storm connections (default 5000)")
    parser.add_argument("--concurrency", type=positive(int), default=100,
                        help="storm connections at a time (default 100)")
    parser.add_argument("--timeout", type=positive(float), default=10.0,
                        help="seconds a storm connection may take (default 10)")
    parser.add_argument("--rounds", type=positive(int), default=3,
                        help="rounds of fresh servers, A and B in alternating order (default 3)")


class Group:
    """Several server processes on one port, seen by the fanout/storm measure functions as one server."""

    def __init__(self, members: Sequence[servers.RunningServer], port: int) -> None:
        self.members = list(members)
        self.port = port

    def alive(self) -> bool:
        return all(m.alive() for m in self.members)

    def check(self) -> None:
        for m in self.members:
            m.check()

    def cpuSeconds(self) -> float:
        return sum(m.cpuSeconds() for m in self.members)

    def memory(self) -> servers.Memory:
        readings = [m.memory() for m in self.members]
        return servers.Memory(sum(r.rss for r in readings), sum(r.hwm for r in readings))

    def logTail(self, lines: int = 5) -> str:
        return "".join(m.logTail(lines) for m in self.members)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


def redisCommand(port: int, *words: str, timeout: float = 1.0) -> bytes:
    """One RESP command to the bench's own Redis; the raw reply (enough for PING and PUBSUB NUMSUB)."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    with socket.create_connection((servers.HOST, port), timeout=timeout) as s:
        s.sendall(request.encode())
        time.sleep(0.02)
        return s.recv(4096)


def subscribers(port: int) -> int:
    """How many connections are subscribed to the room's channel (``PUBSUB NUMSUB``), -1 if Redis did not say."""
    try:
        reply = redisCommand(port, "PUBSUB", "NUMSUB", CHANNEL).split(b"\r\n")
        return int(next(line for line in reply if line.startswith(b":"))[1:])
    except (OSError, ValueError, StopIteration):
        return -1


def redisSpec(workdir: Path) -> servers.ServerSpec:
    return servers.ServerSpec("redis", "redis-server", lambda port: [
        "redis-server", "--port", str(port), "--bind", servers.HOST, "--save", "", "--appendonly", "no",
        "--dir", str(workdir),
    ])


def tcplabArgv(port: int, redisPort: int | None) -> list[str]:
    extra = ["--send-queue", str(SEND_QUEUE)]
    if redisPort is not None:
        extra += ["--reuse-port", "--backplane", f"redis://{servers.HOST}:{redisPort}/0"]
    return servers.tcplabServer("tcplab-multi", *extra)(port)


def startGroup(nodes: int, redisPort: int, workdir: Path, label: str, timeout: float = 20.0) -> Group:
    """``nodes`` tcplab-multi processes on one free port (one alone: no backplane); once all accept and,
    with a backplane, all are subscribed."""
    port = servers.freePort()
    backplane = redisPort if nodes > 1 else None
    members = []
    try:
        for i in range(nodes):
            spec = servers.ServerSpec(f"{label}-{i + 1}", label, lambda _p: tcplabArgv(port, backplane))
            member = servers.RunningServer(spec, workdir)
            member.launch()
            member.port = port
            members.append(member)
        deadline = time.monotonic() + timeout
        for member in members:
            if not member.waitAccepting(deadline):
                member.check()
        while backplane is not None and subscribers(redisPort) < nodes:
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: the nodes did not all subscribe to Redis within {timeout:g} s"
                                 + "".join(m.logTail() for m in members))
            for member in members:
                member.check()
            time.sleep(0.05)
    except BaseException:
        for member in members:
            member.stop()
        raise
    return Group(members, port)


SETUPS = (("A", 1, "one tcplab-multi"), ("B", 2, "two tcplab-multi, --reuse-port, Redis backplane"))


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    if shutil.which("redis-server") is None:
        note = "skipped: `redis-server` is not installed (Debian/Ubuntu: apt install redis-server)"
        progress(note)
        return [{"skipped": note}]
    servers.raiseOpenFilesLimit()
    client, why = chat.clientOrNote(progress)
    if client is None:
        return [{"skipped": why}]
    server = chat.chatServers()["tcplab"]
    results: dict[str, dict[str, list[dict]]] = {key: {"fanout": [], "storm": []} for key, _, _ in SETUPS}
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir, \
            servers.running([redisSpec(Path(workdir))], Path(workdir)) as (redis,):
        progress(f"redis-server on port {redis.port}")
        for round_ in range(options.rounds):
            order = SETUPS if round_ % 2 == 0 else SETUPS[::-1]
            for key, nodes, label in order:
                for kind in ("fanout", "storm"):
                    redis.check()
                    group = startGroup(nodes, redis.port, Path(workdir), f"{key}{round_ + 1}-{kind}")
                    try:
                        module = fanout if kind == "fanout" else storm
                        result = module.measure(client, server, group, options)  # type: ignore[arg-type]
                    finally:
                        group.stop()
                    results[key][kind].append(result)
                    progress(f"round {round_ + 1}/{options.rounds} {key} ({label}) {kind}: " + describe(kind, result))
    return summarize(results)


def describe(kind: str, r: dict) -> str:
    if kind == "fanout":
        text = (f"{r['lines_per_s']:,.0f} lines/s delivered, "
                f"{'every line once, in order' if r['in_order'] else 'LINES LOST, DUPLICATED OR OUT OF ORDER'}")
    else:
        text = (f"{r['conns_per_s']:,.0f} conns/s, errors {r['errors']}, "
                f"witnessed {r.get('witnessed', 0)}/{r.get('completed', 0)}")
    text += f", server CPU {r.get('server_cpu') or 0:.0%}"
    return text + (f" [{r['error']}]" if r.get("error") else "")


def summarize(results: dict[str, dict[str, list[dict]]]) -> list[dict]:
    rows = []
    for key, nodes, label in SETUPS:
        fan, st = results[key]["fanout"], results[key]["storm"]
        rows.append({
            "key": key,
            "setup": f"{key}: {label}",
            "nodes": nodes,
            "lines_per_s": statistics.median(r["lines_per_s"] for r in fan),
            "fan_rounds": [r["lines_per_s"] for r in fan],
            "fan_cpu": statistics.median(r.get("server_cpu") or 0 for r in fan),
            "expected": sum(r["expected"] for r in fan),
            "delivered": sum(r["delivered"] for r in fan),
            "gaps": sum(r["gaps"] for r in fan),
            "reordered": sum(r["reordered"] for r in fan),
            "in_order": all(r["in_order"] for r in fan),
            "conns_per_s": statistics.median(r["conns_per_s"] for r in st),
            "storm_rounds": [r["conns_per_s"] for r in st],
            "storm_cpu": statistics.median(r.get("server_cpu") or 0 for r in st),
            "storm_errors": sum(r["errors"] for r in st),
            "storm_lost": sum(max(0, r["completed"] - r["witnessed"]) for r in st),
            "p99_ms": statistics.median(r["p99_ms"] for r in st),
            "errors": [r["error"] for r in fan + st if r.get("error")],
            "died": not all(r["alive"] for r in fan + st),
        })
    base = rows[0]
    for row in rows:
        row["fan_ratio"] = row["lines_per_s"] / base["lines_per_s"] if base["lines_per_s"] else None
        row["storm_ratio"] = row["conns_per_s"] / base["conns_per_s"] if base["conns_per_s"] else None
        row["complete"] = fanout.completeness(row)
        row["storm_text"] = storm.errorsCell({"errors": row["storm_errors"], "lost": row["storm_lost"]})
    return rows


def perRound(scale: float, suffix: str, digits: int = 1) -> Callable[[object], str]:
    return lambda values: " / ".join(f"{v / scale:.{digits}f}{suffix}" for v in values)  # type: ignore[attr-defined]


def cpu(value: object) -> str:
    return "—" if value is None else f"{value:.0%}"


COLUMNS = (
    Column("setup", "setup", align="left"),
    Column("lines_per_s", "fan-out lines/s delivered (median)", number()),
    Column("fan_ratio", "fan-out vs A", ratio),
    Column("fan_rounds", "fan-out per round", perRound(1e6, "M", 2)),
    Column("complete", "every listener got every line once, in order", align="left"),
    Column("fan_cpu", "servers' CPU (fan-out)", cpu),
    Column("conns_per_s", "storm conns/s (median)", number()),
    Column("storm_ratio", "storm vs A", ratio),
    Column("storm_rounds", "storm per round", perRound(1e3, "k")),
    Column("storm_text", "storm errors (all rounds)"),
    Column("p99_ms", "storm p99 ms", number(1)),
    Column("storm_cpu", "servers' CPU (storm)", cpu),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    measured = [row for row in rows if "skipped" not in row]
    notes = [
        f"Fan-out: {options.listeners} listeners, one sender, {options.lines:,} lines of {options.size} bytes "
        f"(window {options.window:,}); storm: {options.connections:,} connections, {options.concurrency} at a time. "
        f"{options.rounds} round{'s' if options.rounds > 1 else ''}, A and B in alternating order, fresh servers "
        "for every measurement; figures are medians over rounds, ratios are B's median over A's, within this run.",
        "A: one `tcplab-multi --send-queue 268435456`. B: two of them on one port with `--reuse-port --backplane "
        "redis://127.0.0.1:P/0` and a `redis-server` the bench started (`--save '' --appendonly no`); the kernel "
        "spreads the load client's connections over the two (by a hash of the address, so not exactly half each), "
        "and a line from a client of one node reaches the other node's clients through Redis pub/sub.",
        "Correctness: \"yes\" means every fan-out listener, on either node, got every line exactly once (no loss, "
        "no duplicate) and in order, in every round; storm \"lines lost\" counts connections whose line never "
        "reached the witness connection (on B often a client of the other node).",
        "Servers' CPU: the tcplab-multi processes' CPU time over the run per second of wall time (the sum over both "
        "nodes for B, so up to 200%); Redis's own CPU is not included.",
        f"Expectation: this machine has few cores, and the load client and Redis run on the same cores as the "
        "servers, so B is not expected to be faster: it shows what the backplane costs (each line is also published "
        "to and read back from Redis, and escaped once more) and that two nodes behave, to their clients, like one "
        f"server. A ratio below 1.00{TIMES} is that cost; the speed-up of scaling out needs spare cores or machines.",
    ]
    notes += [row["skipped"] for row in rows if "skipped" in row]
    for row in measured:
        for error in dict.fromkeys(row["errors"]):
            notes.append(f"{row['setup']}: {error}")
        if row["died"]:
            notes.append(f"{row['setup']}: a server exited during the run.")
    return Section("Scale-out: one process vs two on the Redis backplane", COLUMNS, measured, notes)
