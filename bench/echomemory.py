"""Echo backpressure workload: does a client that writes but never reads grow the server?

One connection pushes up to PUSH MiB into the server without reading a byte
(non-blocking socket; it stops when everything is sent, when the server has
taken nothing for STALL seconds, or after PUSH_SECONDS). The server's RSS is
sampled from /proc all along; growth is the peak (sampled VmRSS, or VmHWM)
minus VmRSS before the push. Then the client reads while it sends the rest, and
checks that every byte came back, in order (byte count and a BLAKE2b of each
direction). Each server is a fresh process, so its VmHWM belongs to this run.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import select
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BenchError, servers
from bench.echo import SERVERS, positive, serverList
from bench.report import Column, Section, number

NAME = "echo-memory"
HELP = "server memory growth while a client pushes data into the echo server without reading it back"
DEFAULT_SERVERS = ("tcplab", "twisted", "asyncio")
CHUNK = 64 * 1024
SAMPLE_EVERY = 0.05

#: Target from issue 3, item 3: 256 MiB pushed without reading grows the server "well under 64 MiB".
TARGET_GROWTH_MIB = 64


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push", type=positive(int), default=256, help="MiB to push without reading (default 256)")
    parser.add_argument(
        "--push-seconds", type=positive(float), default=10.0, help="longest time spent pushing (default 10)"
    )
    parser.add_argument(
        "--stall", type=positive(float), default=1.0, help="stop pushing after this long with nothing taken (default 1)"
    )
    parser.add_argument(
        "--read-seconds", type=positive(float), default=60.0, help="longest time to read everything back (default 60)"
    )
    parser.add_argument(
        "--servers",
        type=serverList,
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {', '.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)})",
    )


class Stream:
    """The bytes to push: pseudo-random, never repeating at a chunk boundary, hashed as they are sent."""

    def __init__(self, total: int, seed: int = 862) -> None:
        self.total = total
        self.block = random.Random(seed).randbytes(1024 * 1024 + CHUNK)
        self.produced = 0
        self.sent = 0
        self.hash = hashlib.blake2b()
        self.pending = memoryview(b"")
        self.chunks = 0

    def done(self) -> bool:
        return self.sent >= self.total

    def sendSome(self, sock: socket.socket) -> int:
        """Send what the socket takes now, without blocking; the number of bytes sent."""
        sentNow = 0
        while not self.done():
            if not self.pending:
                offset = (self.chunks * 4099 * 16) % (1024 * 1024)
                size = min(CHUNK, self.total - self.produced)
                self.pending = memoryview(self.block)[offset : offset + size]
                self.produced += size
                self.chunks += 1
            try:
                n = sock.send(self.pending)
            except BlockingIOError:
                break
            self.hash.update(self.pending[:n])
            self.pending = self.pending[n:]
            self.sent += n
            sentNow += n
        return sentNow


class Sampler:
    """The server's peak RSS, sampled at most every SAMPLE_EVERY seconds."""

    def __init__(self, server: servers.RunningServer) -> None:
        self.server = server
        self.peak = 0
        self.last = 0.0

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= SAMPLE_EVERY:
            self.last = now
            self.peak = max(self.peak, self.server.memory().rss)


def measure(server: servers.RunningServer, options: argparse.Namespace) -> dict:
    total = options.push * servers.MiB
    sock = socket.create_connection((servers.HOST, server.port), timeout=5)
    try:
        sock.setblocking(False)
        time.sleep(0.2)
        before = server.memory().rss
        sampler = Sampler(server)
        sampler.sample(force=True)
        stream = Stream(total)

        started = time.monotonic()
        lastProgress = started
        while not stream.done():
            now = time.monotonic()
            if now - started > options.push_seconds or now - lastProgress > options.stall:
                break
            if stream.sendSome(sock):
                lastProgress = time.monotonic()
            else:
                select.select([], [sock], [], SAMPLE_EVERY)
            sampler.sample()
        pushSeconds = time.monotonic() - started
        pushed = stream.sent
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            time.sleep(SAMPLE_EVERY)
            sampler.sample(force=True)
        server.check()
        pushPeak = max(sampler.peak, server.memory().hwm)

        received = 0
        back = hashlib.blake2b()
        buffer = bytearray(1024 * 1024)
        view = memoryview(buffer)
        deadline = time.monotonic() + options.read_seconds
        lastProgress = time.monotonic()
        while received < total:
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"{server.spec.label}: only {received:,} of {total:,} bytes came back in time")
            if now - lastProgress > 5:
                raise BenchError(f"{server.spec.label}: echo stopped at {received:,} of {total:,} bytes")
            readable, writable, _ = select.select([sock], [] if stream.done() else [sock], [], SAMPLE_EVERY)
            if writable and stream.sendSome(sock):
                lastProgress = time.monotonic()
            if readable:
                try:
                    n = sock.recv_into(buffer)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    raise BenchError(f"{server.spec.label}: closed the connection after {received:,} bytes")
                if n > 0:
                    back.update(view[:n])
                    received += n
                    lastProgress = time.monotonic()
            sampler.sample()
        sampler.sample(force=True)
        server.check()
        after = server.memory()
    finally:
        sock.close()
    return {
        "name": server.spec.name,
        "server": server.spec.label,
        "pushed_mib": pushed / servers.MiB,
        "push_seconds": pushSeconds,
        "stalled": pushed < total,
        "before_mib": before / servers.MiB,
        "growth_mib": (pushPeak - before) / servers.MiB,
        "peak_growth_mib": (max(sampler.peak, after.hwm) - before) / servers.MiB,
        "echoed_mib": received / servers.MiB,
        "verified": received == stream.sent == total and back.digest() == stream.hash.digest(),
    }


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """One fresh server process per server under test, one after another."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir:
        for name in options.servers:
            with servers.running([SERVERS[name]], Path(workdir)) as (server,):
                row = measure(server, options)
            rows.append(row)
            progress(
                f"{row['server']:<30} pushed {row['pushed_mib']:>6.1f} MiB without reading in "
                f"{row['push_seconds']:.1f} s, server grew {row['growth_mib']:>6.1f} MiB; "
                f"{row['echoed_mib']:.0f} MiB echoed back, {'verified' if row['verified'] else 'NOT VERIFIED'}"
            )
    return rows


def yesNo(value: object) -> str:
    return "yes" if value else "**no**"


COLUMNS = (
    Column("server", "server", align="left"),
    Column("pushed_mib", "MiB taken while not reading", number(1)),
    Column("push_seconds", "push s", number(1)),
    Column("before_mib", "RSS before MiB", number(1)),
    Column("growth_mib", "growth while not reading MiB", number(1)),
    Column("peak_growth_mib", "peak growth (whole run) MiB", number(1)),
    Column("echoed_mib", "echoed back MiB", number(0)),
    Column("verified", "every byte back in order", yesNo),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    notes = [
        f"One connection pushes up to {options.push} MiB without reading (stops when all is sent, after "
        f"{options.stall:g} s with nothing taken, or after {options.push_seconds:g} s), then reads everything back "
        "while sending the rest.",
        '"MiB taken" includes what sits in the kernel\'s socket buffers (client send buffer and server receive '
        "buffer), which is not the server's memory: a server with backpressure stops taking data once those fill.",
        "Growth is the server's peak RSS (VmRSS sampled every 50 ms, and VmHWM) minus VmRSS before the push.",
    ]
    for row in rows:
        if row["name"] == "tcplab":
            met = row["growth_mib"] < TARGET_GROWTH_MIB and row["verified"]
            notes.append(
                f"Target (issue 3): tcplab-echo grows well under {TARGET_GROWTH_MIB} MiB and echoes every byte: "
                f"{row['growth_mib']:.1f} MiB, {'met' if met else 'NOT met'}."
            )
    return Section("Echo: memory while the client does not read", COLUMNS, rows, notes)
