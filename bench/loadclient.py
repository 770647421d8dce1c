"""Build and run the echo ping-pong load client.

The C client (loadclient.c) is compiled once per source version into a cache
directory outside the repository, so a 2-core machine spends its second core on
the server, not on the client. Without a C compiler the same protocol runs in
Python (selectors); it is then likely the bottleneck, and the report says so.

Run as a script (``python bench/loadclient.py HOST PORT CONNECTIONS SIZE WARMUP
SECONDS [STALL]``) this file is the Python client itself: stdlib only, so it
needs nothing from the repository on its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("loadclient.c")


def cacheDir() -> Path:
    """Where compiled clients live: ``$XDG_CACHE_HOME/tcplab-bench``, else a per-user folder in /tmp."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "tcplab-bench"
    return Path(tempfile.gettempdir()) / f"tcplab-bench-{os.getuid()}"


def findCompiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


class BuildFailed(Exception):
    """The C client could not be compiled; the message has the compiler's first lines."""


def buildC(compiler: str | None = None, sourcePath: Path = SOURCE) -> Path:
    """Compile a bench C client (loadclient.c unless told) with ``cc -O2`` unless this exact source is built."""
    compiler = compiler or findCompiler()
    if compiler is None:
        raise BuildFailed("no C compiler found (tried $CC, cc, gcc, clang)")
    source = sourcePath.read_bytes()
    digest = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    directory = cacheDir()
    binary = directory / f"{sourcePath.stem}-{digest}"
    if os.access(binary, os.X_OK):
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{sourcePath.stem}-{digest}.{os.getpid()}"
    command = [compiler, "-O2", "-std=gnu11", "-Wall", "-o", str(partial), str(sourcePath)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildFailed(f"{' '.join(command)}: {e}") from None
    if done.returncode != 0:
        first = " ".join(done.stderr.strip().splitlines()[:3])
        partial.unlink(missing_ok=True)
        raise BuildFailed(f"{' '.join(command)} failed: {first}")
    os.replace(partial, binary)
    return binary


@dataclass(frozen=True)
class LoadClient:
    """One way to run the ping-pong client: the compiled C binary or this file under Python."""

    kind: str
    argv: tuple[str, ...]
    note: str = ""

    @classmethod
    def choose(cls, prefer: str = "auto") -> LoadClient:
        """The C client if it builds (``prefer="auto"`` or ``"c"``), else the Python one with a note."""
        if prefer == "python":
            note = "Load client: Python (selectors), chosen with --client python; it may be the bottleneck"
            return cls("python", (sys.executable, str(Path(__file__).resolve())), note)
        try:
            return cls("c", (str(buildC()),))
        except BuildFailed as e:
            if prefer == "c":
                raise
            note = f"C load client unavailable ({e}); the Python client was used and may be the bottleneck"
            return cls("python", (sys.executable, str(Path(__file__).resolve())), note)

    def run(
        self,
        port: int,
        connections: int,
        size: int,
        warmup: float,
        seconds: float,
        host: str = "127.0.0.1",
        stall: float = 5.0,
    ) -> dict:
        """Run one measurement and return the client's JSON result (``error`` set if the server failed)."""
        args = [host, str(port), str(connections), str(size), repr(warmup), repr(seconds), repr(stall)]
        limit = warmup + seconds + stall + 30
        try:
            done = subprocess.run([*self.argv, *args], capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"error": f"load client did not finish within {limit:.0f} s", "client": self.kind}
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            return {"error": f"load client failed: {why[0]}", "client": self.kind}
        return json.loads(lines[-1])


def percentile(ordered: list[int], p: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in microseconds (as the C client computes it)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered), max(1, -(-int(p * len(ordered) * 1000) // 100000)))
    return ordered[rank - 1] / 1000


def pythonClient(
    host: str, port: int, connections: int, size: int, warmup: float, seconds: float, stall: float = 5.0
) -> dict:
    """The same ping-pong as loadclient.c, with selectors: a fallback, not a peer of the C client."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    messages: dict[socket.socket, bytes] = {}
    received: dict[socket.socket, bytearray] = {}
    started: dict[socket.socket, int] = {}
    sequence = 0
    everything = 0
    error = None

    def startRequest(sock: socket.socket) -> None:
        nonlocal sequence
        sequence += 1
        header = sequence.to_bytes(8, "little") + socks.index(sock).to_bytes(8, "little")
        body = (header + bytes((i * 31 + sequence) & 0xFF for i in range(min(size, 256)))) * (size // 256 + 1)
        messages[sock] = body[:size]
        received[sock] = bytearray()
        started[sock] = time.monotonic_ns()
        sock.settimeout(stall)
        sock.sendall(messages[sock])
        sock.setblocking(False)

    try:
        for _ in range(connections):
            sock = socket.create_connection((host, port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
    except OSError as e:
        error = f"connect to {host}:{port} failed: {e}"
    begin = time.monotonic_ns()
    measureFrom = begin + int(warmup * 1e9)
    end = measureFrom + int(seconds * 1e9)
    lastProgress = begin
    samples: list[int] = []
    cpuFrom = None
    if error is None:
        try:
            for sock in socks:
                startRequest(sock)
                selector.register(sock, selectors.EVENT_READ, sock)
        except OSError as e:
            error = f"send failed: {e}"
    while error is None:
        now = time.monotonic_ns()
        if cpuFrom is None and now >= measureFrom:
            cpuFrom = _cpu()
        if now >= end:
            break
        if now - lastProgress > stall * 1e9:
            error = f"no echo came back for {stall:.1f} s"
            break
        for key, _ in selector.select(0.05):
            sock = key.data
            try:
                data = sock.recv(size - len(received[sock]))
            except BlockingIOError:
                continue
            except OSError as e:
                error = f"recv failed: {e}"
                break
            if not data:
                error = f"server closed connection {socks.index(sock)}"
                break
            received[sock] += data
            if len(received[sock]) < size:
                continue
            if received[sock] != messages[sock]:
                error = f"connection {socks.index(sock)} got back different bytes than it sent"
                break
            done = time.monotonic_ns()
            lastProgress = done
            everything += 1
            if started[sock] >= measureFrom and done <= end:
                samples.append(done - started[sock])
            try:
                startRequest(sock)
            except OSError as e:
                error = f"send failed: {e}"
    cpuTo = _cpu()
    measured = max(0.0, (min(time.monotonic_ns(), end) - measureFrom) / 1e9)
    for sock in socks:
        sock.close()
    samples.sort()
    return {
        "client": "python",
        "connections": len(socks),
        "size": size,
        "seconds": measured,
        "requests": len(samples),
        "bytes": len(samples) * size,
        "all_requests": everything,
        "rps": len(samples) / measured if measured else 0.0,
        "mean_us": sum(samples) / len(samples) / 1000 if samples else 0.0,
        "p50_us": percentile(samples, 50),
        "p90_us": percentile(samples, 90),
        "p99_us": percentile(samples, 99),
        "p999_us": percentile(samples, 99.9),
        "max_us": percentile(samples, 100),
        "client_cpu": (cpuTo - (cpuFrom if cpuFrom is not None else cpuTo)) / measured if measured else 0.0,
        "dropped_samples": 0,
        "error": error,
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    if len(argv) not in (6, 7):
        print("usage: loadclient.py HOST PORT CONNECTIONS SIZE WARMUP_S SECONDS [STALL_S]", file=sys.stderr)
        return 2
    host, port, connections, size = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    warmup, seconds = float(argv[4]), float(argv[5])
    stall = float(argv[6]) if len(argv) == 7 else 5.0
    print(json.dumps(pythonClient(host, port, connections, size, warmup, seconds, stall)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
