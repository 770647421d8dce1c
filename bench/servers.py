"""Start and stop the servers under test as subprocesses on free loopback ports.

Every server is a separate process run by the bench's own interpreter, so the
load client, the server and the bench itself never share a GIL, and each
server's memory and CPU can be read from /proc while it works.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
MiB = 1024 * 1024


class ServerFailed(Exception):
    """A server did not start, or died; the message ends with the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """How to run one server: ``argv(port)`` listens on HOST:port and runs in the foreground."""

    name: str
    label: str
    argv: Callable[[int], list[str]]
    baseline: bool = False
    env: Mapping[str, str] = field(default_factory=dict)

    def wrapped(self, prefix: Sequence[str], name: str, env: Mapping[str, str]) -> ServerSpec:
        """The same server run under another program (``valgrind ...``), with extra environment."""
        argv = self.argv
        return replace(self, name=name, argv=lambda port: [*prefix, *argv(port)], env={**self.env, **env})


def tcplabServer(plugin: str, *extra: str) -> Callable[[int], list[str]]:
    """``python -m twisted PLUGIN --port P --interface 127.0.0.1`` (twist: foreground, no pidfile)."""
    return lambda port: [
        sys.executable,
        "-m",
        "twisted",
        "--log-format=text",
        plugin,
        "--port",
        str(port),
        "--interface",
        HOST,
        *extra,
    ]


def peerScript(filename: str, *extra: str) -> Callable[[int], list[str]]:
    """``python bench/peers/FILENAME PORT``: a stand-alone peer server."""
    return lambda port: [sys.executable, str(PEERS / filename), str(port), *extra]


def raiseOpenFilesLimit() -> int:
    """Raise this process's soft open-files limit to its hard limit (storms and 10,000 idle clients need
    it); servers started here inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _serverPreexec() -> None:
    """In the forked child, before exec: the open-files limit up to the hard limit, whatever the bench's."""
    raiseOpenFilesLimit()


def freePort() -> int:
    """A loopback port nobody listens on right now (the server may still lose a race for it: start retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Memory:
    rss: int
    hwm: int


class RunningServer:
    """A started server: its port, its process, and its log file."""

    def __init__(self, spec: ServerSpec, workdir: Path) -> None:
        self.spec = spec
        self.logPath = workdir / f"{spec.name}.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        self.port = freePort()
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                self.spec.argv(self.port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **self.spec.env},
                start_new_session=True,
                preexec_fn=_serverPreexec,
            )

    def waitAccepting(self, deadline: float) -> bool:
        """True once the server accepts a connection; False if it exited first."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if accepts(self.port):
                return True
            time.sleep(0.05)
        raise ServerFailed(f"{self.spec.name} did not accept connections on port {self.port}{self.logTail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Raise ServerFailed if the server has exited."""
        if not self.alive():
            code = self.process.returncode if self.process else None
            raise ServerFailed(f"{self.spec.name} exited (status {code}){self.logTail()}")

    def memory(self) -> Memory:
        """VmRSS and VmHWM (peak RSS) from /proc, in bytes."""
        return readMemory(self.pid)

    def cpuSeconds(self) -> float:
        return readCpuSeconds(self.pid)

    def openFiles(self) -> int:
        """How many file descriptors the server holds (each accepted client is one)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def logTail(self, lines: int = 5) -> str:
        try:
            tail = self.logPath.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("; its log ends:\n    " + "\n    ".join(tail)) if tail else ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``: this process only, by its pid."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def startServers(specs: Sequence[ServerSpec], workdir: Path, timeout: float = 20.0) -> list[RunningServer]:
    """Start every server at once (they import in parallel), then wait for each to accept.

    A server that exits before accepting (it lost the race for its free port) is
    started again on another port, up to three times.
    """
    servers = [RunningServer(spec, workdir) for spec in specs]
    try:
        for server in servers:
            server.launch()
        deadline = time.monotonic() + timeout
        for server in servers:
            for attempt in range(3):
                if server.waitAccepting(deadline):
                    break
                if attempt == 2:
                    server.check()
                server.launch()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@contextlib.contextmanager
def running(
    specs: Sequence[ServerSpec], workdir: Path, timeout: float = 20.0, stopTimeout: float = 5.0
) -> Iterator[list[RunningServer]]:
    """Start the servers, and stop every one of them however the block ends."""
    servers = startServers(specs, workdir, timeout)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop(stopTimeout)


def listening(port: int) -> bool:
    """Whether something listens on HOST:port, read from /proc/net/tcp without connecting (a one-shot
    listener such as ``socat TCP-LISTEN`` would take a probe connection as its only client)."""
    wanted = f"{socket.htonl(int.from_bytes(socket.inet_aton(HOST), 'big')):08X}:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == wanted and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def listenOverflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenOverflows in
    /proc/net/netstat; for the whole network namespace, so other programs' overflows count too)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        fields = dict(zip(names.split(), values.split(), strict=False))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return None


def readMemory(pid: int) -> Memory:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return Memory(fields.get("VmRSS", 0), fields.get("VmHWM", 0))


def readCpuSeconds(pid: int) -> float:
    """User + system CPU time of a process (utime and stime in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
