"""Multi memory workload: what idle clients and one stuck reader cost a broadcast server.

Idle: IDLE clients connect (in batches of 100, each once the server has accepted the last), join (the Twisted docs' chat
is sent a name, as its users do) and then do nothing; the server's VmRSS is read once it holds
1,000 and then all IDLE connections (counted in /proc/PID/fd) and has settled for half a second.

Stuck reader: one client joins and never reads again, one normal listener reads everything, and a
sender sends FLOW MiB of LINE-byte numbered lines (the fan-out client with one listener and
``--stuck``). The server's RSS is sampled every 50 ms; growth is the peak (sampled, or VmHWM)
minus VmRSS before. The listener checks it got every line in order; afterwards the stuck
connection is read to see whether the server closed it and what it said last.
"""

from __future__ import annotations

import argparse
import errno
import selectors
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BenchError, chat, servers
from bench.echo import positive
from bench.report import Column, Section, number

NAME = "multi-memory"
HELP = "broadcast server memory with 10,000 idle clients, and with one stuck reader while 100 MiB flows"
DEFAULT_SERVERS = ("tcplab", "twisted", "ncat")
CHECKPOINT = 1000
PENDING = 10  # ncat listens with a backlog of 10, the docs chat with 50: a batch must fit


def table(idle: int) -> dict[str, chat.ChatServer]:
    """The servers, ncat allowed as many connections as the idle test makes (it aborts long before)."""
    return chat.chatServers(ncatMaxConns=max(chat.NCAT_MAX_CONNS, idle + 10))


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--idle", type=positive(int), default=10000, help="idle clients (default 10000)")
    parser.add_argument("--flow", type=positive(int), default=100, help="MiB sent past the stuck reader (default 100)")
    parser.add_argument("--line", type=positive(int), default=1024, help="bytes per line of the flow (default 1024)")
    parser.add_argument(
        "--stall", type=positive(float), default=5.0, help="give up the flow after this long without progress"
    )
    parser.add_argument(
        "--servers",
        type=chat.serverListType(chat.chatServers()),
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {', '.join(chat.chatServers())} (default {','.join(DEFAULT_SERVERS)})",
    )


class IdleClients:
    """Connections that join and then sit there, opened in batches of PENDING: each batch is connected
    without blocking, then the next waits until the server has accepted it (a server with a short
    listen backlog would otherwise leave connections the client thinks are open in its SYN queue)."""

    def __init__(self, port: int, server: chat.ChatServer, running: servers.RunningServer, base: int) -> None:
        self.port = port
        self.server = server
        self.running = running
        self.base = base
        self.socks: list[socket.socket] = []
        self.refused = 0

    def connectUpTo(self, count: int, limit: float = 120.0) -> None:
        deadline = time.monotonic() + limit
        while len(self.socks) < count and time.monotonic() < deadline and self.running.alive():
            self.connectBatch(min(PENDING, count - len(self.socks)), deadline)
            waitHeld(self.running, self.base, len(self.socks), limit=5.0, poll=0.002)

    def connectBatch(self, size: int, deadline: float) -> None:
        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, int] = {}
        end = "\r\n" if self.server.crlf else "\n"
        try:
            for _ in range(size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sock.connect_ex((servers.HOST, self.port)) not in (0, errno.EINPROGRESS):
                    sock.close()
                    self.refused += 1
                    continue
                pending[sock] = len(self.socks) + len(pending)
                selector.register(sock, selectors.EVENT_WRITE)
            while pending and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    sock = key.fileobj  # type: ignore[assignment]
                    selector.unregister(sock)
                    number_ = pending.pop(sock)
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        sock.close()
                        self.refused += 1
                        continue
                    if self.server.names:
                        try:
                            sock.send(f"idle{number_}{end}".encode())
                        except OSError:
                            pass
                    self.socks.append(sock)
        finally:
            for sock in pending:
                sock.close()
            selector.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []


def waitHeld(running: servers.RunningServer, base: int, count: int, limit: float = 20.0, poll: float = 0.05) -> bool:
    """Wait until the server holds ``count`` more descriptors than ``base``; False if it died or never did."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not running.alive():
            return False
        try:
            if running.openFiles() >= base + count:
                return True
        except OSError:
            return False
        time.sleep(poll)
    return False


def measureIdle(server: chat.ChatServer, workdir: Path, options: argparse.Namespace,
                progress: Callable[[str], None]) -> dict:
    row: dict = {"name": server.name, "server": server.label, "baseline": server.spec.baseline, "idle": options.idle}
    with servers.running([server.spec], workdir) as (running,):
        time.sleep(0.5)
        base = running.openFiles()
        row["before_mib"] = running.memory().rss / servers.MiB
        clients = IdleClients(running.port, server, running, base)
        try:
            for checkpoint in sorted({min(CHECKPOINT, options.idle), options.idle}):
                clients.connectUpTo(checkpoint)
                held = waitHeld(running, base, checkpoint)
                if not held:
                    row["failed_at"] = len(clients.socks)
                    break
                time.sleep(0.5)
                rss = running.memory().rss / servers.MiB
                row[f"rss_{checkpoint}"] = rss
                row[f"per_client_{checkpoint}"] = (rss - row["before_mib"]) * 1024 / checkpoint
                progress(f"{server.label:<30} {checkpoint:>6,} idle clients: RSS {rss:,.1f} MiB")
            row["alive"] = running.alive()
            if not row["alive"] or "failed_at" in row:
                status = running.process.returncode if running.process and not row["alive"] else None
                what = f"exited (status {status})" if status is not None else "stopped accepting"
                tail = " ".join(running.logTail(2).split())
                row["failure"] = f"{server.label} {what} at about {row.get('failed_at', 0):,} clients{tail}"
                progress(row["failure"])
        finally:
            clients.close()
    return row


def measureStuck(client: chat.ChatClient, server: chat.ChatServer, workdir: Path, options: argparse.Namespace,
                 progress: Callable[[str], None]) -> dict:
    lines = options.flow * servers.MiB // options.line
    with servers.running([server.spec], workdir) as (running,):
        time.sleep(0.3)
        before = running.memory().rss
        peak = [before]

        def sample() -> None:
            try:
                peak[0] = max(peak[0], running.memory().rss)
            except OSError:
                pass

        result = client.fanout(server, running.port, 1, lines, options.line, max(1, servers.MiB // options.line),
                               options.stall, 120.0, stuck=True, running=running, sample=sample)
        if result.get("error") and "delivered" not in result:
            raise BenchError(f"{server.label}: {result['error']}{running.logTail()}")
        alive = running.alive()
        if alive:
            sample()
            peak[0] = max(peak[0], running.memory().hwm)
    stuck = result.get("stuck") or {}
    row = {
        "flow_mib": options.flow,
        "growth_mib": (peak[0] - before) / servers.MiB,
        "listener_ok": result["in_order"],
        "listener_mib": result["delivered"] * options.line / servers.MiB,
        "stuck_closed": stuck.get("closed"),
        "stuck_last": stuck.get("last_line", ""),
        "stuck_waiting_mib": stuck.get("bytes_waiting", 0) / servers.MiB,
        "flow_error": result.get("error"),
        "flow_alive": alive,
        "flow_seconds": result.get("seconds"),
    }
    progress(
        f"{server.label:<30} stuck reader, {options.flow} MiB flow: server grew {row['growth_mib']:,.1f} MiB; "
        f"listener got {row['listener_mib']:,.1f} MiB "
        f"{'in order' if row['listener_ok'] else '(NOT all, or not in order)'}; "
        f"stuck reader {'disconnected' if row['stuck_closed'] else 'still connected'}"
        + (f"  [{row['flow_error']}]" if row["flow_error"] else "")
    )
    return row


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    limit = servers.raiseOpenFilesLimit()
    if limit < options.idle + 100:
        progress(f"the open-files limit is {limit}: --idle {options.idle} may fail in the bench itself")
    servers_ = table(options.idle)
    chosen, skipped = chat.chooseServers(options.servers, servers_, progress)
    client, why = chat.clientOrNote(progress)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir:
        for server in chosen:
            row = measureIdle(server, Path(workdir), options, progress)
            if client is not None:
                row.update(measureStuck(client, server, Path(workdir), options, progress))
            else:
                row["stuck_skipped"] = why
            rows.append(row)
    rows += [{"skipped": note} for note in skipped]
    return rows


def yesNo(value: object) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def stuckOutcome(row: dict) -> str:
    if row.get("stuck_skipped"):
        return "not measured"
    if row.get("stuck_closed"):
        last = row.get("stuck_last") or ""
        return "disconnected" + (f": last line `{last[:120]}`" if last.startswith("*") else "")
    if not row.get("flow_alive", True):
        return "server died"
    return f"still connected, never dropped ({row.get('stuck_waiting_mib', 0):,.1f} MiB waiting in its socket)"


def listenerOutcome(row: dict) -> str:
    if row.get("stuck_skipped"):
        return "—"
    if row.get("listener_ok"):
        return f"yes ({row['listener_mib']:,.0f} MiB)"
    return f"**no**: {row.get('listener_mib', 0):,.1f} of {row['flow_mib']} MiB"


IDLE_COLUMNS = (
    Column("server", "server", align="left"),
    Column("before_mib", "RSS before MiB", number(1)),
    Column(f"rss_{CHECKPOINT}", f"RSS with {CHECKPOINT:,} idle MiB", number(1)),
    Column("rss_all", "RSS with all idle MiB", number(1)),
    Column("per_client", "KiB per idle client", number(1)),
    Column("held", "held them all", align="left"),
)

STUCK_COLUMNS = (
    Column("server", "server", align="left"),
    Column("growth_mib", "RSS growth MiB", number(1)),
    Column("listener", "normal listener got every line", align="left"),
    Column("stuck", "the stuck reader", align="left"),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> list[Section]:
    """Two tables: idle clients, and the stuck reader."""
    measured = [row for row in rows if "skipped" not in row]
    for row in measured:
        row["rss_all"] = row.get(f"rss_{options.idle}")
        row["per_client"] = row.get(f"per_client_{options.idle}")
        row["held"] = "yes" if "failure" not in row else f"**no**: {row['failure'].split(';')[0]}"
        row["listener"] = listenerOutcome(row)
        row["stuck"] = stuckOutcome(row)
    idleNotes = [
        f"{options.idle:,} clients connect (in batches of {PENDING}, each batch once the server has accepted the "
        "one before), join (the docs' chat is sent "
        "a name line) and stay idle. RSS is the server's VmRSS once it holds the connections (counted in "
        "/proc/PID/fd) and has settled for 0.5 s; KiB per idle client is (RSS with all - RSS before) / clients.",
        f"ncat runs with `--max-conns {options.idle + 10}`; its default of 100 would refuse the rest.",
    ]
    idleNotes += [row["skipped"] for row in rows if "skipped" in row]
    for row in measured:
        if "failure" in row:
            idleNotes.append(row["failure"].replace("\n", " "))
    stuckNotes = [
        f"One client joins and then never reads; one listener reads everything; a sender sends {options.flow} MiB as "
        f"{options.line}-byte numbered lines, at most 1 MiB ahead of the listener. Growth is the server's peak RSS "
        "(VmRSS sampled every 50 ms, and VmHWM) minus VmRSS before the flow.",
        "The listener checks every line's sequence number. Afterwards the stuck connection is read: \"disconnected\" "
        "means the server closed it (with its last line, if that was a server notice).",
    ]
    for row in measured:
        if row.get("flow_error"):
            stuckNotes.append(f"{row['server']}: {row['flow_error']}")
        if row.get("stuck_skipped"):
            stuckNotes.append(row["stuck_skipped"])
    return [
        Section(f"Multi memory: {options.idle:,} idle clients", IDLE_COLUMNS, measured, idleNotes),
        Section(f"Multi memory: one stuck reader while {options.flow} MiB flows", STUCK_COLUMNS, measured, stuckNotes),
    ]

