"""Echo cost in instructions: what each server executes per request, counted by valgrind.

On a shared 2-core machine req/s moves by 10-20% from run to run, which hides a
few percent of difference between two servers. Instructions barely move: each
server runs under ``valgrind --tool=callgrind`` (PYTHONHASHSEED=0); CONNECTIONS
connections open and warm up, ``callgrind_control --zero`` resets the counters,
exactly REQUESTS ping-pong requests run on the same connections, and the count
divided by REQUESTS is the user-space instructions one request costs. The
kernel's share (the same socket calls for every server doing the same
ping-pong, except where a server makes extra syscalls) is not counted.
"""

from __future__ import annotations

import argparse
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BenchError, servers
from bench.echo import SERVERS, positive, serverList
from bench.report import Column, Section, number, ratio

NAME = "echo-instructions"
HELP = "user-space instructions per echo request, counted under valgrind (immune to a noisy machine)"
DEFAULT_SERVERS = ("tcplab", "twisted", "asyncio")


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=positive(int), default=20000, help="requests counted (default 20000)")
    parser.add_argument("--connections", type=positive(int), default=10, help="concurrent connections (default 10)")
    parser.add_argument("--size", type=positive(int), default=1024, help="message size in bytes (default 1024)")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before counting starts (default 2000)")
    parser.add_argument(
        "--servers",
        type=serverList,
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {', '.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)})",
    )


class PingPong:
    """Open connections that run exact numbers of echo round trips, so connecting is not counted."""

    def __init__(self, port: int, connections: int, size: int, limit: float) -> None:
        self.message = bytes(i & 0xFF for i in range(size))
        self.limit = limit
        self.selector = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        for _ in range(connections):
            sock = socket.create_connection((servers.HOST, port), timeout=limit)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, sock)

    def run(self, requests: int) -> None:
        """Exactly ``requests`` round trips, at most one in flight per connection."""
        size = len(self.message)
        pending: dict[socket.socket, int] = {}
        started = done = 0
        for sock in self.socks[:requests]:
            sock.sendall(self.message)
            pending[sock] = 0
            started += 1
        deadline = time.monotonic() + self.limit
        while done < requests:
            if time.monotonic() > deadline:
                raise BenchError(f"only {done} of {requests} requests came back within {self.limit:.0f} s")
            for key, _ in self.selector.select(1.0):
                sock = key.data
                data = sock.recv(size - pending[sock])
                if not data:
                    raise BenchError(f"the server closed a connection after {done} requests")
                pending[sock] += len(data)
                if pending[sock] == size:
                    done += 1
                    del pending[sock]
                    if started < requests:
                        sock.sendall(self.message)
                        pending[sock] = 0
                        started += 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.selector.close()


def callgrindControl(pid: int, *args: str) -> str:
    try:
        done = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {e}") from None
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def instructionsNow(pid: int) -> int:
    """Instructions executed since the last zeroing, summed over the process's threads."""
    counts = re.findall(r"^\s*Th\s+\d+\s+([\d,]+)", callgrindControl(pid, "-e", "Ir"), re.MULTILINE)
    if not counts:
        raise BenchError(f"callgrind_control printed no instruction count for process {pid}")
    return sum(int(count.replace(",", "")) for count in counts)


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    valgrind = shutil.which("valgrind")
    if valgrind is None or shutil.which("callgrind_control") is None:
        raise BenchError("valgrind (with callgrind_control) is not installed: apt install valgrind")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir:
        specs = []
        for name in options.servers:
            out = Path(workdir) / f"{name}.callgrind"
            prefix = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"]
            specs.append(SERVERS[name].wrapped(prefix, name, {"PYTHONHASHSEED": "0"}))
        progress(f"starting {len(specs)} servers under valgrind (slow)")
        with servers.running(specs, Path(workdir), timeout=300, stopTimeout=60) as started:
            for server in started:
                began = time.monotonic()
                client = PingPong(server.port, options.connections, options.size, limit=600)
                try:
                    client.run(options.warmup)
                    callgrindControl(server.pid, "--zero")
                    client.run(options.requests)
                    counted = instructionsNow(server.pid)
                finally:
                    client.close()
                rows.append(
                    {
                        "name": server.spec.name,
                        "server": server.spec.label,
                        "baseline": server.spec.baseline,
                        "per_request": counted / options.requests,
                    }
                )
                progress(
                    f"{server.spec.label}: {counted / options.requests:,.0f} instructions per request "
                    f"({time.monotonic() - began:.0f} s)"
                )
    base = next((row for row in rows if row["baseline"]), None)
    for row in rows:
        row["ratio"] = row["per_request"] / base["per_request"] if base else None
    return rows


COLUMNS = (
    Column("server", "server", align="left"),
    Column("per_request", "instructions per request", number()),
    Column("ratio", "vs plain Twisted", ratio),
)


def valgrindVersion() -> str:
    try:
        return subprocess.run(["valgrind", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "valgrind"


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    notes = [
        f"Instructions the server process executed (user space, valgrind --tool=callgrind, PYTHONHASHSEED=0) "
        f"while serving {options.requests:,} requests, divided by {options.requests:,}; counters zeroed with "
        f"callgrind_control after {options.warmup:,} warm-up requests on the same {options.connections} open "
        f"connections, so connecting and logging connections are not counted; {options.size}-byte ping-pong.",
        f"Counted with {valgrindVersion()}.",
    ]
    return Section("Echo: instructions per request", COLUMNS, rows, notes)
