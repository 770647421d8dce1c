"""Helpers for tests that run tcplab the way users do: as processes on loopback."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
TCPLAB = [sys.executable, "-m", "tcplab"]


def childEnv() -> dict[str, str]:
    """The environment for child processes, with this checkout importable."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class ServerProcess:
    """``twistd -n <plugin> ...`` in a child process, with the TCP port it bound."""

    def __init__(self, plugin: str, *argv: str, timeout: float = 20.0, openFiles: int | None = None) -> None:
        def limitFiles() -> None:
            if openFiles is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (openFiles, openFiles))

        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", plugin, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=childEnv(),
            preexec_fn=limitFiles,
        )
        self.log: list[str] = []
        self.port = self._waitForPort(timeout)

    def _waitForPort(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode("utf-8", "replace")
            if not line:
                break
            self.log.append(line)
            match = re.search(r"starting on (\d+)", line)
            if match:
                return int(match.group(1))
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def rss(self) -> int:
        """Resident memory of the server, in bytes."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                out, _ = self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, _ = self.process.communicate()
            self.log.append(out.decode("utf-8", "replace"))
        return "".join(self.log)


def runTcplab(*argv: str, input: bytes | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """Run the ``tcplab`` command and capture what it prints."""
    return subprocess.run(
        [*TCPLAB, *argv], input=input, stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True, timeout=timeout, env=childEnv(),
    )


def scratch(case: Any) -> str:
    """A fresh folder outside the working tree, removed after the test (trial's ``mktemp``
    makes folders under the current directory, which under pytest is the checkout)."""
    path = tempfile.mkdtemp(prefix="tcplab-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path



def runMain(*argv: str, input: bytes = b"", reactor: Any = None, cwd: str | None = None,
            env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``tcplab ARGV`` in this process, as ``runTcplab`` runs it in a child (same result type), on a
    fresh reactor or ``reactor`` (not yet running, e.g. with a server listening on it).  ``input``
    is stdin; ``cwd`` and ``env`` (None removes a variable) last for the call only."""
    import io

    from twisted.internet.selectreactor import SelectReactor

    from tcplab.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.StringIO()
    saved, here, stdin = dict(os.environ), os.getcwd(), sys.stdin
    with tempfile.TemporaryFile() as source:
        source.write(input)
        source.seek(0)
        try:
            sys.stdin = io.TextIOWrapper(source)
            for name, value in (env or {}).items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            if cwd is not None:
                os.chdir(cwd)
            reactor = reactor or SelectReactor()
            main(list(argv), reactor=reactor, stdout=out, stderr=err)
        except SystemExit as e:
            code = int(e.code or 0)
        else:  # pragma: no cover - main always exits
            raise AssertionError("main returned instead of exiting")
        finally:
            _closeAll(reactor)
            sys.stdin = stdin
            os.chdir(here)
            os.environ.clear()
            os.environ.update(saved)
    return subprocess.CompletedProcess(["tcplab", *argv], code, out.buffer.getvalue(), err.getvalue().encode())


def _closeAll(reactor: Any) -> None:
    """Close every socket a stopped reactor still holds, as the end of a ``tcplab`` process would."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    if reactor is None:
        return
    for _ in range(3):  # what the command started just before the end (an abort's connectionLost, a close)
        reactor.runUntilCurrent()
        reactor.doIteration(0)
    for selectable in reactor.removeAll():
        selectable.connectionLost(Failure(ConnectionDone("the command ended")))
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        waker.connectionLost(None)
