"""A client that writes but never reads must not grow the echo server (real sockets)."""

from __future__ import annotations

import hashlib
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.trial import unittest

from tests.support import TCPLAB, ServerProcess, childEnv

MiB = 1 << 20


class NonReadingClientTests(unittest.TestCase):
    def test_serverStopsReadingAndLosesNothing(self) -> None:
        """Push up to 256 MiB without reading: the server stops taking bytes long before,
        its memory stays flat, and once we read, every byte pushed comes back in order."""
        server = ServerProcess("tcplab-echo", "--port", "0", "--interface", "127.0.0.1")
        self.addCleanup(server.stop)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        before = server.rss()
        chunk = bytes(range(256)) * 256
        sent = hashlib.sha256()
        pushed = 0
        stalledSince = None
        deadline = time.monotonic() + 20
        while pushed < 256 * MiB and time.monotonic() < deadline:
            try:
                n = sock.send(chunk)
            except BlockingIOError:
                stalledSince = stalledSince or time.monotonic()
                if time.monotonic() - stalledSince > 1.0:
                    break
                time.sleep(0.01)
                continue
            sent.update(chunk[:n])
            pushed += n
            stalledSince = None
        grown = server.rss() - before
        self.assertLess(pushed, 64 * MiB, "the server kept reading from a client that does not read")
        self.assertLess(grown, 32 * MiB, f"server grew by {grown / MiB:.1f} MiB")

        received = hashlib.sha256()
        got = 0
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 20
        while got < pushed and time.monotonic() < deadline:
            if selector.select(timeout=1):
                data = sock.recv(1 << 20)
                if not data:
                    break
                received.update(data)
                got += len(data)
        selector.close()
        self.assertEqual(got, pushed)
        self.assertEqual(received.hexdigest(), sent.hexdigest())


class ClientInputTests(unittest.TestCase):
    def test_clientDoesNotSwallowItsInput(self) -> None:
        """``tcplab echo`` reading 64 MiB of lines from stdin into a server that never reads:
        it stops reading stdin instead of holding it all in memory."""
        path = os.path.join(tempfile.mkdtemp(), "lines.txt")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "wb") as f:
            for _ in range(64):
                f.write(b"0123456789abcdef0123456789abcde\n" * (MiB // 32))
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            with open(path, "rb") as stdin:
                client = subprocess.Popen([*TCPLAB, "echo", "--host", "127.0.0.1", "--port", str(port)],
                                          stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          env=childEnv())
            self.addCleanup(client.kill)
            conn, _ = listener.accept()
            self.addCleanup(conn.close)
            read = _stdinReadWhenStill(client.pid, deadline=time.monotonic() + 10)
            self.assertIsNone(client.poll(), "the client gave up")
            peak = _peakRSS(client.pid)
        self.assertLess(read, 64 * MiB, "the client read all of its input")
        self.assertLess(peak, 100 * MiB, f"the client's memory peaked at {peak / MiB:.0f} MiB")


def _stdinReadWhenStill(pid: int, deadline: float) -> int:
    """How far ``pid`` has read its stdin once that stops moving for half a second (or at ``deadline``)."""
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/fdinfo/0") as f:
            pos = int(f.readline().split()[1])
        if pos != last:
            last, since = pos, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
        time.sleep(0.05)
    return last


def _peakRSS(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
