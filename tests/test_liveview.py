"""The live view behind every ``--web`` page: ``/stats`` counts what the log and ``--metrics`` count
(TCP clients included, not only browsers), and its once-a-second polls stay out of the access log."""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from tcplab.echo import tap as echotap
from tcplab.file import tap as filetap
from tcplab.file.wire import formatPut
from tcplab.web import quietSite
from tests.support import scratch

LOCAL = ["--port", "0", "--interface", "127.0.0.1", "--web", "tcp:0:interface=127.0.0.1"]


def exchange(port: int, data: bytes, expect: int) -> bytes:
    """Send ``data`` to 127.0.0.1:``port`` and read until ``expect`` bytes came back (or the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < expect:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


class StatsTests(TestCase):
    timeout = 30

    def start(self, tap: Any, *argv: str) -> tuple[int, int]:
        """Start ``tap``'s service with a ``--web`` page; return (its TCP port, its page's port)."""
        options = tap.Options()
        options.parseOptions([*LOCAL, *argv])
        service = tap.makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        ports = [port.getHost().port for child in service for port in getattr(child, "ports", [])]
        return ports[0], ports[1]

    async def stats(self, web: int) -> dict[str, Any]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{web}/stats".encode())
        self.assertEqual(response.code, 200)
        return json.loads(await readBody(response))  # type: ignore[no-any-return]

    async def test_echoCountsTCPClients(self) -> None:
        """tcplab-echo's page counts the connections and bytes of ordinary TCP clients."""
        port, web = self.start(echotap)
        self.assertEqual((await self.stats(web))["joined"], 0)
        self.assertEqual(await threads.deferToThread(exchange, port, b"hello\n", 6), b"hello\n")
        now = await self.stats(web)
        self.assertEqual((now["joined"], now["bytesIn"], now["bytesOut"]), (1, 6, 6))

    async def test_fileCountsTCPUploads(self) -> None:
        """tcplab-file's page counts an upload sent over plain TCP, not only those from browsers."""
        port, web = self.start(filetap, "--dir", scratch(self))
        reply = await threads.deferToThread(exchange, port, formatPut(5, "a.txt") + b"hello", 10)
        self.assertTrue(reply.startswith(b"OK 5 "), reply)
        now = await self.stats(web)
        self.assertEqual(now["stored"], 1)
        self.assertGreaterEqual(now["bytesIn"], len(formatPut(5, "a.txt")) + 5)


class AccessLogTests(SynchronousTestCase):
    def test_pollsAreNotLogged(self) -> None:
        """A page's request is in the access log; the live view's polls of ``/stats`` are not."""
        logged: list[bytes] = []
        self.patch(Site, "log", lambda site, request: logged.append(request.path))
        site = quietSite(Resource())
        for path in (b"/", b"/stats", b"/app.js"):
            request = DummyRequest([path.lstrip(b"/")])
            request.path = path
            site.log(request)
        self.assertEqual(logged, [b"/", b"/app.js"])
