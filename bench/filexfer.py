"""File workload: a verified upload with tcplab send into tcplab-file, against a raw socat pipe and dd.

A SIZE-byte file of pseudo-random bytes is made in a temporary folder, and stored three ways into
a folder next to it on the same file system, each timed from start to the data being on disk:

- ``tcplab send -q FILE`` to a fresh ``tcplab-file --dir D`` (SHA-256 both ends, fsync of the file
  and the folder, atomic rename: the server replies only once all that is done). The time includes
  the client's interpreter start-up, as a user sees it.
- ``socat -u OPEN:FILE TCP:HOST:P`` into ``socat -u TCP-LISTEN:P OPEN:D/out,creat,trunc``, then an
  fsync of D/out: a raw pipe with nothing checked, made durable the same way.
- ``dd if=FILE of=D/copy bs=4M conv=fsync``: a local copy, no network.

Each stored file's SHA-256 is checked against the source afterwards (not timed). Peak RSS: VmHWM,
polled while each client runs, and the server's at the end (a fresh process per measurement).
Then CONCURRENT uploads of EACH bytes at once, each by its own ``tcplab send``,
into one fresh server: aggregate MB/s, all verified.

Page cache: dropping caches needs root, so the source file is in the page cache for every
method (it was just written); only the destination's writing and fsync reach the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import BenchError, servers
from bench.echo import positive
from bench.report import TIMES, Column, Section, number, ratio

NAME = "file"
HELP = "1 GiB verified upload: tcplab send into tcplab-file vs a raw socat pipe + fsync vs dd conv=fsync"
MB = 1_000_000
GiB = 1024 * servers.MiB

#: Targets from issue 5.
TARGET_SOCAT = 1.5
TARGET_DD = 0.5
TARGET_GROWTH_MIB = 64


def size(value: str) -> int:
    """Bytes, or with K/M/G (powers of 1024)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            text, scale = text[:-1], factor
    try:
        result = int(float(text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is bytes or a number with K, M or G, not {value!r}") from None
    if result <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {value!r}")
    return result


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=size, default=GiB, help="file size, e.g. 1G or 256M (default 1G)")
    parser.add_argument("--concurrent", type=int, default=10, help="uploads at once in the second test (default 10)")
    parser.add_argument("--each", type=size, default=64 * servers.MiB, help="size of each of those (default 64M)")
    parser.add_argument("--rounds", type=positive(int), default=1, help="rounds of the three methods (default 1)")
    parser.add_argument(
        "--tmpdir", type=Path, default=None,
        help="where to make the temporary folder (default: the system's, e.g. /tmp); the files are made and "
        "stored inside it, so on one file system",
    )


def makeFile(path: Path, length: int, seed: int) -> str:
    """Write ``length`` pseudo-random bytes (a 16 MiB random block, shifted for each chunk); their SHA-256."""
    block = random.Random(seed).randbytes(16 * servers.MiB + 4096)
    digest = hashlib.sha256()
    chunk = 4 * servers.MiB
    written = 0
    with open(path, "wb") as f:
        index = 0
        while written < length:
            offset = (index * 4099) % (12 * servers.MiB)
            data = memoryview(block)[offset : offset + min(chunk, length - written)]
            f.write(data)
            digest.update(data)
            written += len(data)
            index += 1
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * servers.MiB):
            digest.update(chunk)
    return digest.hexdigest()


def fsyncPath(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fileSystem(path: Path) -> str:
    """The file system a path is on, from /proc/self/mounts: "ext4 on /dev/vda (mounted at /)"."""
    best = ("", "unknown", "unknown")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                device, mount, kind = line.split()[:3]
                if str(path).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[0]):
                    best = (mount, kind, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} (mounted at {best[0] or '?'})"


class Child:
    """A subprocess whose peak RSS is read from /proc while it runs.

    Not from wait4's ru_maxrss: Linux carries the high-water mark of the memory a child had before
    exec (a copy of this bench's own RSS) into it, so every child would look at least as big as
    the bench. VmHWM belongs to the exec'd program alone, and only grows, so polling it every few
    milliseconds misses at most the last few milliseconds of growth.
    """

    def __init__(self, argv: Sequence[str], cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.out = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                        cwd=cwd)
        self.status: int | None = None
        self.peak = 0
        self.ended = 0.0

    def poll(self) -> bool:
        """Read its VmHWM and reap it if it has exited; True once it has."""
        if self.status is not None:
            return True
        try:
            self.peak = max(self.peak, servers.readMemory(self.process.pid).hwm)
        except OSError:
            pass
        pid, status = os.waitpid(self.process.pid, os.WNOHANG)
        if not pid:
            return False
        self.ended = time.monotonic()
        self.status = self.process.returncode = os.waitstatus_to_exitcode(status)
        return True

    def kill(self) -> None:
        if self.status is None:
            self.process.kill()
            _, status = os.waitpid(self.process.pid, 0)
            self.status = self.process.returncode = os.waitstatus_to_exitcode(status)
            self.ended = time.monotonic()

    def wait(self, timeout: float) -> int:
        waitAll([self], timeout)
        assert self.status is not None
        return self.status

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read().decode(errors="replace").strip()


def waitAll(children: Sequence[Child], timeout: float) -> None:
    """Wait for every child, reading their memory as they run; kill them all past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not all([child.poll() for child in children]):
        if time.monotonic() > deadline:
            for child in children:
                child.kill()
            raise BenchError(f"{children[0].argv[0]} ... did not finish within {timeout:.0f} s; killed")
        time.sleep(0.005)


def mib(peak: int) -> float | None:
    """Bytes as MiB; None when nothing was read (the program was done before the first look)."""
    return peak / servers.MiB if peak else None


def sendArgv(port: int, *files: Path) -> list[str]:
    return [sys.executable, "-m", "tcplab", "send", "-q", "--host", servers.HOST, "--port", str(port),
            *map(str, files)]


def timeLimit(length: int) -> float:
    """Generous: 60 s plus 20 s per GiB (this disk writes at several hundred MB/s)."""
    return 60 + 20 * length / GiB


def tcplabUpload(source: Path, digest: str, drop: Path, workdir: Path) -> dict:
    spec = servers.ServerSpec("tcplab-file", "tcplab send → tcplab-file",
                              servers.tcplabServer("tcplab-file", "--dir", str(drop)))
    length = source.stat().st_size
    with servers.running([spec], workdir) as (server,):
        before = server.memory().rss
        started = time.monotonic()
        child = Child(sendArgv(server.port, source))
        status = child.wait(timeLimit(length))
        seconds = child.ended - started
        server.check()
        serverMemory = server.memory()
    if status != 0:
        raise BenchError(f"tcplab send exited {status}: {child.output()[-300:]}")
    stored = drop / f"received_{source.name}"
    verified = stored.exists() and sha256(stored) == digest
    stored.unlink(missing_ok=True)
    return {
        "method": "tcplab",
        "label": "tcplab send → tcplab-file",
        "seconds": seconds,
        "mb_per_s": length / MB / seconds,
        "client_peak_mib": mib(child.peak),
        "server_peak_mib": serverMemory.hwm / servers.MiB,
        "server_growth_mib": (serverMemory.hwm - before) / servers.MiB,
        "verified": verified,
        "checks": "SHA-256 both ends, fsync file + folder, atomic rename",
    }


def socatPipe(source: Path, digest: str, drop: Path) -> dict:
    length = source.stat().st_size
    out = drop / "socat-out"
    port = servers.freePort()
    receiver = Child(["socat", "-u", f"TCP-LISTEN:{port},bind={servers.HOST},reuseaddr", f"OPEN:{out},creat,trunc"])
    deadline = time.monotonic() + 10
    while not servers.listening(port):
        if receiver.process.poll() is not None or time.monotonic() > deadline:
            receiver.process.kill()
            raise BenchError(f"socat did not listen on port {port}: {receiver.output()[-200:]}")
        time.sleep(0.01)
    started = time.monotonic()
    sender = Child(["socat", "-u", f"OPEN:{source}", f"TCP:{servers.HOST}:{port}"])
    limit = timeLimit(length)
    waitAll([sender, receiver], limit)
    sent, received = sender.status, receiver.status
    fsyncPath(out)
    seconds = time.monotonic() - started
    if sent or received:
        raise BenchError(f"socat exited {sent} / {received}: {sender.output()[-200:]} {receiver.output()[-200:]}")
    verified = sha256(out) == digest
    out.unlink()
    return {
        "method": "socat",
        "label": "socat pipe + fsync",
        "seconds": seconds,
        "mb_per_s": length / MB / seconds,
        "client_peak_mib": mib(sender.peak),
        "server_peak_mib": mib(receiver.peak),
        "server_growth_mib": None,
        "verified": verified,
        "checks": "none (fsync of the file afterwards, timed)",
    }


def ddCopy(source: Path, digest: str, drop: Path) -> dict:
    length = source.stat().st_size
    out = drop / "dd-copy"
    started = time.monotonic()
    child = Child(["dd", f"if={source}", f"of={out}", "bs=4M", "conv=fsync"])
    status = child.wait(timeLimit(length))
    seconds = child.ended - started
    if status:
        raise BenchError(f"dd exited {status}: {child.output()[-200:]}")
    verified = sha256(out) == digest
    out.unlink()
    return {
        "method": "dd",
        "label": "dd bs=4M conv=fsync (local copy)",
        "seconds": seconds,
        "mb_per_s": length / MB / seconds,
        "client_peak_mib": mib(child.peak),
        "server_peak_mib": None,
        "server_growth_mib": None,
        "verified": verified,
        "checks": "none (fsync of the file)",
    }


def concurrentUploads(count: int, each: int, base: Path, drop: Path, workdir: Path,
                      progress: Callable[[str], None]) -> dict:
    sources = []
    for i in range(count):
        path = base / f"part-{i:02d}.bin"
        sources.append((path, makeFile(path, each, seed=1000 + i)))
    spec = servers.ServerSpec("tcplab-file", "tcplab-file", servers.tcplabServer("tcplab-file", "--dir", str(drop)))
    with servers.running([spec], workdir) as (server,):
        before = server.memory().rss
        started = time.monotonic()
        children = [Child(sendArgv(server.port, path)) for path, _ in sources]
        waitAll(children, timeLimit(each * count))
        statuses = [child.status for child in children]
        seconds = max(child.ended for child in children) - started
        server.check()
        serverMemory = server.memory()
    verified = 0
    for (path, digest), status in zip(sources, statuses, strict=True):
        stored = drop / f"received_{path.name}"
        if status == 0 and stored.exists() and sha256(stored) == digest:
            verified += 1
        stored.unlink(missing_ok=True)
        path.unlink()
    failures = [child.output()[-200:] for child, status in zip(children, statuses, strict=True) if status]
    row = {
        "method": "tcplab-concurrent",
        "label": f"{count}{TIMES} tcplab send at once",
        "count": count,
        "each": each,
        "seconds": seconds,
        "mb_per_s": count * each / MB / seconds,
        "client_peak_mib": mib(max(child.peak for child in children)),
        "server_peak_mib": serverMemory.hwm / servers.MiB,
        "server_growth_mib": (serverMemory.hwm - before) / servers.MiB,
        "verified": verified == count,
        "verified_count": verified,
        "failures": failures,
    }
    progress(f"{count} concurrent uploads of {each / servers.MiB:.0f} MiB: {row['mb_per_s']:,.0f} MB/s aggregate, "
             f"{verified}/{count} verified")
    return row


def startup() -> tuple[float, int]:
    """``tcplab send --help``: its time (interpreter and imports, part of every upload's time) and its peak RSS
    (what the client holds before sending anything)."""
    started = time.monotonic()
    child = Child([sys.executable, "-m", "tcplab", "send", "--help"])
    child.wait(60)
    return child.ended - started, child.peak


def run(options: argparse.Namespace, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    notes = []
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-file-", dir=options.tmpdir) as tmp:
        base = Path(tmp)
        drop, workdir = base / "drop", base / "logs"
        drop.mkdir()
        workdir.mkdir()
        need = options.size * 2 + options.concurrent * options.each * 2
        free = shutil.disk_usage(base).free
        if free < need + GiB:
            raise BenchError(f"{base} has {free / GiB:.1f} GiB free; this run needs about {need / GiB:.1f} GiB "
                             "(use --size, --each or --tmpdir)")
        assert os.stat(base).st_dev == os.stat(drop).st_dev
        fs = fileSystem(base.resolve())
        progress(f"making a {options.size / servers.MiB:,.0f} MiB file in {base} ({fs})")
        source = base / "upload.bin"
        digest = makeFile(source, options.size, seed=5)
        methods: list[tuple[str, Callable[[], dict]]] = [
            ("tcplab", lambda: tcplabUpload(source, digest, drop, workdir))
        ]
        for program, method in (("socat", lambda: socatPipe(source, digest, drop)),
                                ("dd", lambda: ddCopy(source, digest, drop))):
            if shutil.which(program):
                methods.append((program, method))
            else:
                notes.append(f"{program} skipped: not installed")
                progress(notes[-1])
        results: dict[str, list[dict]] = {name: [] for name, _ in methods}
        for round_ in range(options.rounds):
            shift = round_ % len(methods)
            for name, method in methods[shift:] + methods[:shift]:
                row = method()
                results[name].append(row)
                progress(f"round {round_ + 1}/{options.rounds} {row['label']:<34} {row['mb_per_s']:>7,.0f} MB/s "
                         f"({row['seconds']:.2f} s), {'verified' if row['verified'] else 'NOT VERIFIED'}")
        source.unlink()
        rows = [best(runs) for runs in results.values()]
        if options.concurrent > 0:
            rows.append(concurrentUploads(options.concurrent, options.each, base, drop, workdir, progress))
    startupTime, startupPeak = startup()
    base_ = {row["method"]: row for row in rows}
    for row in rows:
        row["vs_socat"] = row["mb_per_s"] / base_["socat"]["mb_per_s"] if "socat" in base_ else None
        row["vs_dd"] = row["mb_per_s"] / base_["dd"]["mb_per_s"] if "dd" in base_ else None
        row["size"] = row.get("count", 1) * row.get("each", options.size)
    rows[0]["filesystem"] = fs
    rows[0]["startup_s"] = startupTime
    rows[0]["startup_mib"] = mib(startupPeak)
    rows[0]["notes"] = notes
    return rows


def best(runs: list[dict]) -> dict:
    """The median run by MB/s (the faster of two); every run must have verified."""
    ordered = sorted(runs, key=lambda r: r["mb_per_s"])
    row = dict(ordered[len(ordered) // 2])
    row["verified"] = all(r["verified"] for r in runs)
    row["rounds"] = [r["mb_per_s"] for r in runs]
    return row


def yesNo(value: object) -> str:
    return "yes" if value else "**no**"


def mibCell(value: object) -> str:
    return f"{value / servers.MiB:,.0f}" if isinstance(value, int) else "—"


COLUMNS = (
    Column("label", "method", align="left"),
    Column("size", "MiB", mibCell),
    Column("seconds", "seconds", number(2)),
    Column("mb_per_s", "MB/s", number(0)),
    Column("vs_socat", "vs socat pipe", ratio),
    Column("vs_dd", "vs dd", ratio),
    Column("client_peak_mib", "client peak RSS MiB", number(1)),
    Column("server_peak_mib", "server peak RSS MiB", number(1)),
    Column("verified", "SHA-256 of stored file matches", yesNo),
)


def section(rows: Sequence[dict], options: argparse.Namespace) -> Section:
    first = rows[0]
    notes = [
        f"Files made and stored in one temporary folder ({first.get('filesystem', 'unknown file system')}); "
        "MB/s is 10^6 bytes per second over the whole command, from starting it to the data being fsync'ed "
        "(for tcplab: to the client exiting after the server's OK, which comes after its fsyncs and rename). "
        f"{options.rounds} round{'s; figures are the median round' if options.rounds > 1 else ''}.",
        "The source file was just written, so it is in the page cache for every method (dropping caches needs "
        "root): reading it costs no disk time for any of them; writing and fsync'ing the copy does.",
        f"tcplab send's time includes starting Python and importing Twisted: `tcplab send --help` alone took "
        f"{first.get('startup_s', 0):.2f} s in this run (peak RSS {first.get('startup_mib') or 0:.1f} MiB).",
        "socat: `socat -u OPEN:FILE TCP:127.0.0.1:P` into `socat -u TCP-LISTEN:P OPEN:D/out,creat,trunc` "
        "(default 8 KiB buffer), then fsync of the output file; nothing is checked. Client/server peak RSS are "
        "the sending and receiving socat's (a dash: it was done before the first look). dd: "
        "`dd if=FILE of=D/copy bs=4M conv=fsync`, client RSS is dd's.",
        "Peak RSS: VmHWM from /proc, polled every 5 ms for the clients (and socat's receiver), read at the end "
        "for tcplab-file, a fresh server process for each measurement.",
    ]
    notes += first.get("notes", [])
    for row in rows:
        if row.get("failures"):
            notes.append(f"{row['label']}: failures: {'; '.join(row['failures'])}")
    rows_ = {row["method"]: row for row in rows}
    tcplab = rows_.get("tcplab")
    if tcplab:
        parts = []
        if tcplab["vs_socat"] is not None:
            parts.append(f"{tcplab['vs_socat']:.2f}{TIMES} socat (target ≥ {TARGET_SOCAT}{TIMES}: "
                         f"{'met' if tcplab['vs_socat'] >= TARGET_SOCAT else 'NOT met'})")
        if tcplab["vs_dd"] is not None:
            parts.append(f"{tcplab['vs_dd']:.2f}{TIMES} dd (target ≥ {TARGET_DD}{TIMES}: "
                         f"{'met' if tcplab['vs_dd'] >= TARGET_DD else 'NOT met'})")
        clientGrowth = (tcplab["client_peak_mib"] or 0) - (first.get("startup_mib") or 0)
        growth = max(clientGrowth, tcplab["server_growth_mib"] or 0)
        parts.append(f"client growth {clientGrowth:.1f} MiB (its peak RSS minus the "
                     f"{first.get('startup_mib') or 0:.1f} MiB of `tcplab send --help`) and server growth "
                     f"{tcplab['server_growth_mib']:.1f} MiB (target: "
                     f"neither grows by more than {TARGET_GROWTH_MIB} MiB: "
                     f"{'met' if growth < TARGET_GROWTH_MIB else 'NOT met'})")
        notes.append("Targets (issue 5): tcplab send " + "; ".join(parts) + ".")
    concurrent = rows_.get("tcplab-concurrent")
    if concurrent:
        notes.append(
            f"Concurrent: {concurrent['count']} uploads of {concurrent['each'] / servers.MiB:,.0f} MiB, each its own "
            f"`tcplab send` process, started at once into one server: {concurrent['verified_count']} of "
            f"{concurrent['count']} stored and verified (target: all); MB/s is their total over the time until the "
            "last finished."
        )
    return Section("File: verified upload throughput", COLUMNS, rows, notes)
