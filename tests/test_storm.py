"""Storm survival over real sockets: out of file descriptors, the hub logs it and keeps serving."""

from __future__ import annotations

import socket
import time

from twisted.trial import unittest

from tests.support import ServerProcess, runTcplab


class OutOfFilesTests(unittest.TestCase):
    def test_acceptFailuresDoNotStopTheServer(self) -> None:
        """With only 64 file descriptors, 100 clients at once overflow the server: it logs the
        failed accepts, keeps the clients it has, and serves new ones once others leave."""
        server = ServerProcess("tcplab-multi", "--port", "0", "--interface", "127.0.0.1",
                               "--stats-interval", "0", openFiles=64)
        self.addCleanup(server.stop)
        clients = []
        try:
            for _ in range(100):
                clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            deadline = time.monotonic() + 10
            served = 0
            for sock in clients:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if sock.recv(100).startswith(b"* welcome"):
                        served += 1
                except (TimeoutError, OSError):
                    pass
            self.assertGreater(served, 20)
            self.assertLess(served, 64)
        finally:
            for sock in clients:
                sock.close()
        for _ in range(20):  # the server notices the closes on its own time; bounded: 20 tries, ~10 s
            result = runTcplab("echo", "--host", "127.0.0.1", "--port", str(server.port), "--timeout", "0.5",
                               "still here")
            if result.returncode == 0:
                break
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"still here\n", result.stdout)
        self.assertIn("EMFILE recovery: Closed socket from", server.stop())
