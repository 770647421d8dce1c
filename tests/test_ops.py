"""Operations (issue 16): Prometheus metrics over HTTP, the proxied peer behind HAProxy, systemd
socket activation without --fdname, and the JSON usage log read back."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from tcplab.echo import tap as echotap
from tcplab.file import tap as filetap
from tcplab.file.receiver import FileReceiverFactory
from tcplab.file.store import FileStore
from tcplab.listening import ProxiedFactory, ServerOptions, readListenFDs, serverEndpoint
from tcplab.multi import tap as multitap
from tcplab.multi.hub import MultiHub
from tests.support import TWISTD, childEnv, scratch

PROXY_V1 = b"PROXY TCP4 198.51.100.7 203.0.113.1 4242 7001\r\n"


def proxyV2(source: str, sport: int, dest: str = "203.0.113.1", dport: int = 7001) -> bytes:
    """A PROXY v2 header for a TCP over IPv4 connection, as HAProxy's send-proxy-v2 sends it."""
    body = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


class Client(Protocol):
    """Collects what a real loopback client receives; ``until`` fires once ``want`` is in it."""

    def __init__(self, send: bytes = b"", want: bytes = b"", halfClose: bool = True) -> None:
        self.send, self.want, self.halfClose = send, want, halfClose
        self.received = b""
        self.until: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)
            if self.halfClose:
                self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.want and self.want in self.received and not self.until.called:
            self.until.callback(self.received)

    def connectionLost(self, reason: object) -> None:
        if not self.until.called:
            self.until.callback(self.received)
        self.lost.callback(None)


def connect(port: int, client: Client) -> Deferred[Any]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)


def scrape(port: int, path: str = "/metrics") -> Deferred[bytes]:
    """GET over real HTTP (in a thread: the server answers from the reactor)."""
    def get() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.read()  # type: ignore[no-any-return]
    return threads.deferToThread(get)


def parse(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample by name and labels, through prometheus_client's own parser; HELP checked present."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def running(case: unittest.TestCase, module: Any, argv: list[str]) -> Any:
    """A server's service from its tap, started in this process, stopped after the test."""
    options = module.Options()
    options.parseOptions(argv)
    service = module.makeService(options)
    service.startService()
    case.addCleanup(service.stopService)
    return service


def metricsPort(service: Any) -> int:
    return service.getServiceNamed("metrics").ports[0].getHost().port  # type: ignore[no-any-return]


class MetricsTests(unittest.TestCase):
    """``--metrics`` serves prometheus text on real HTTP, from the counters the servers log."""

    timeout = 20

    @inlineCallbacks
    def test_echoCountsConnectionsAndBytes(self) -> Any:
        """After one echoed connection, /metrics says 1 accepted, 0 open, 6 bytes in and out; /healthz is ok."""
        service = running(self, echotap, ["--port", "0", "--interface", "127.0.0.1",
                                          "--metrics", "tcp:0:interface=127.0.0.1"])
        client = Client(b"hello\n")
        yield connect(service.tcp.ports[0].getHost().port, client)
        yield client.lost
        samples = parse((yield scrape(metricsPort(service))))
        self.assertEqual(samples["tcplab_echo_connections_accepted_total"], {(): 1.0})
        self.assertEqual(samples["tcplab_echo_connections_open"], {(): 0.0})
        self.assertEqual(samples["tcplab_echo_received_bytes_total"], {(): 6.0})
        self.assertEqual(samples["tcplab_echo_sent_bytes_total"], {(): 6.0})
        self.assertEqual((yield scrape(metricsPort(service), "/healthz")), b"ok\n")

    @inlineCallbacks
    def test_multiMetricsAreTheStatsLine(self) -> Any:
        """The hub's metrics carry the numbers of its stats log line (one source), with no per-peer label."""
        service = running(self, multitap, ["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "0",
                                           "--metrics", "tcp:0:interface=127.0.0.1"])
        port = service.listening.ports[0].getHost().port
        client = Client(b"one\ntwo\n", want=b"two\n", halfClose=False)
        yield connect(port, client)
        yield client.until
        samples = parse((yield scrape(metricsPort(service))))
        fields = service.hub.statsFields()
        self.assertEqual(samples["tcplab_multi_lines_relayed_total"][()], fields["lines"])
        self.assertEqual(samples["tcplab_multi_lines_relayed_total"][()], 2)
        self.assertEqual(samples["tcplab_multi_received_bytes_total"][()], fields["bytesIn"])
        self.assertEqual(samples["tcplab_multi_clients"][()], 1)
        self.assertEqual(samples["tcplab_multi_clients_disconnected_total"][(("reason", "too_slow"),)], 0)
        labels = {key for family in samples.values() for labelled in family for key, _ in labelled}
        self.assertLessEqual(labels, {"reason", "code"})
        client.transport.loseConnection()
        yield client.lost

    @inlineCallbacks
    def test_fileCountsStoredAndMismatches(self) -> Any:
        """One stored upload and one with a wrong SHA-256 show as stored 1 (5 bytes) and one verification failure."""
        folder = scratch(self)
        service = running(self, filetap, ["--port", "0", "--interface", "127.0.0.1", "--dir", folder,
                                          "--metrics", "tcp:0:interface=127.0.0.1"])
        port = service.tcp.ports[0].getHost().port
        good = Client(b"PUT 5 a.txt\nhello", want=b"OK")
        yield connect(port, good)
        yield good.lost
        bad = Client(b"PUT sha256=" + b"0" * 64 + b" 5 b.txt\nhello", want=b"ERR")
        yield connect(port, bad)
        yield bad.lost
        samples = parse((yield scrape(metricsPort(service))))
        self.assertEqual(samples["tcplab_file_uploads_stored_total"][()], 1)
        self.assertEqual(samples["tcplab_file_stored_bytes_total"][()], 5)
        self.assertEqual(samples["tcplab_file_verification_failures_total"][()], 1)
        self.assertEqual(samples["tcplab_file_uploads_failed_total"][(("code", "checksum-mismatch"),)], 1)

    def test_offByDefault(self) -> None:
        """Without --metrics no metrics listener exists."""
        options = echotap.Options()
        options.parseOptions(["--port", "0"])
        self.assertNotIn("metrics", [s.name for s in echotap.makeService(options)])


class ProxyProtocolTests(unittest.TestCase):
    """Behind ``haproxy:``, names, logs and --max-per-peer use the address the PROXY header reports."""

    def hubClient(self, header: bytes, chunk: int) -> tuple[MultiHub, StringTransport]:
        hub = MultiHub(clock=MemoryReactorClock())
        factory = ProxiedFactory(hub, MemoryReactorClock())
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=None)
        protocol.makeConnection(transport)
        data = header + b"hi\n"
        for i in range(0, len(data), chunk):
            protocol.dataReceived(data[i:i + chunk])
        return hub, transport

    def test_hubNamesTheProxiedPeerInEveryFragmentSize(self) -> None:
        """v1 and v2 headers fed in pieces of every size: the client is named 198.51.100.7:4242."""
        for header in (PROXY_V1, proxyV2("198.51.100.7", 4242)):
            for chunk in range(1, len(header) + 4):
                hub, transport = self.hubClient(header, chunk)
                self.assertEqual(list(hub.names), ["198.51.100.7:4242"], (header, chunk))
                self.assertIn(b"welcome, you are 198.51.100.7:4242", transport.value())

    def test_noHeaderNoConnection(self) -> None:
        """Bytes that are not a PROXY header close the connection before the server sees it."""
        hub = MultiHub(clock=MemoryReactorClock())
        protocol = ProxiedFactory(hub, MemoryReactorClock()).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"hello there, no header\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(hub.connections, 0)

    def test_silentConnectionIsClosed(self) -> None:
        """A connection that sends no header is aborted after the header timeout."""
        clock = MemoryReactorClock()
        protocol = ProxiedFactory(MultiHub(clock=clock), clock).buildProtocol(None)
        transport = StringTransport()
        transport.abortConnection = lambda: setattr(transport, "aborted", True)  # type: ignore[method-assign]
        protocol.makeConnection(transport)
        clock.advance(11)
        self.assertTrue(getattr(transport, "aborted", False))

    def test_maxPerPeerCountsTheProxiedAddress(self) -> None:
        """--max-per-peer 1: a second connection from the same proxied address is turned away, another is let in."""
        factory = FileReceiverFactory(FileStore(scratch(self)), maxPerPeer=1, clock=MemoryReactorClock())
        proxied = ProxiedFactory(factory, MemoryReactorClock())
        for source in ("198.51.100.7", "198.51.100.7", "198.51.100.8"):
            protocol = proxied.buildProtocol(None)
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(f"PROXY TCP4 {source} 203.0.113.1 4242 9000\r\n".encode())
        self.assertEqual(factory.perPeer, {"198.51.100.7": 1, "198.51.100.8": 1})
        self.assertEqual(factory.turnedAway, 1)

    def test_sslIsRefused(self) -> None:
        """``haproxy:ssl:`` is refused in one line: the header comes before TLS."""
        with self.assertRaises(Exception) as caught:
            serverEndpoint(reactor, "haproxy:ssl:7443:privateKey=k.pem")
        self.assertIn("end TLS at the proxy", str(caught.exception))


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise unittest.SkipTest("haproxy is not installed (apt-get install haproxy)")
    return found


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


class RealHAProxyTests(unittest.TestCase):
    """A real HAProxy in front of ``haproxy:tcp:`` (send-proxy and send-proxy-v2)."""

    timeout = 30

    @inlineCallbacks
    def behind(self, option: str) -> Any:
        binary = _haproxy()
        service = running(self, multitap, ["--listen", "haproxy:tcp:0:interface=127.0.0.1", "--stats-interval", "0"])
        backend = service.listening.ports[0].getHost().port
        front = freePort()
        config = os.path.join(scratch(self), "haproxy.cfg")
        with open(config, "w") as f:
            f.write(f"defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
                    f"frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n"
                    f"backend b\n  server s 127.0.0.1:{backend} {option}\n")
        process = subprocess.Popen([binary, "-db", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (process.terminate(), process.wait(10)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", front)) == 0:
                    break
            time.sleep(0.05)
        client = Client(b"", want=b"connected;")
        protocol = yield connect(front, client)
        received = yield client.until
        local = protocol.transport.getHost().port
        self.assertIn(f"welcome, you are 127.0.0.1:{local} ".encode(), received)
        protocol.transport.loseConnection()
        yield client.lost

    def test_sendProxy(self) -> Any:
        """Through HAProxy's send-proxy, the hub names the client by its own address and port."""
        return self.behind("send-proxy")

    def test_sendProxyV2(self) -> Any:
        """Through HAProxy's send-proxy-v2, the hub names the client by its own address and port."""
        return self.behind("send-proxy-v2")


class SystemdTests(unittest.TestCase):
    """``systemd:`` sees the socket of plain ``systemd-socket-activate -l`` (no LISTEN_FDNAMES)."""

    timeout = 30

    def test_namesMissing(self) -> None:
        """LISTEN_FDS without LISTEN_FDNAMES still gives the sockets (named "unknown"), for this pid only."""
        fds = readListenFDs({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42)
        self.assertEqual(fds.inheritedDescriptors(), [3, 4])
        self.assertEqual(readListenFDs({"LISTEN_PID": "41", "LISTEN_FDS": "2"}, 42).inheritedDescriptors(), [])
        named = readListenFDs({"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "echo"}, 42)
        self.assertEqual(named.inheritedNamedDescriptors(), {"echo": 3})

    def test_plainSocketActivateEchoes(self) -> None:
        """Under ``systemd-socket-activate -l 127.0.0.1:P`` (no --fdname), ``systemd:domain=INET:index=0`` echoes."""
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise unittest.SkipTest("systemd-socket-activate is not installed (Debian's systemd package)")
        port = freePort()
        process = subprocess.Popen(
            [activate, "-l", f"127.0.0.1:{port}", "-E", f"PYTHONPATH={childEnv()['PYTHONPATH']}",
             *TWISTD, "-n", "--pidfile=", "tcplab-echo", "--listen", "systemd:domain=INET:index=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=childEnv())
        self.addCleanup(lambda: (process.terminate(), process.communicate(timeout=10)))
        deadline = time.monotonic() + 10
        client = socket.socket()
        self.addCleanup(client.close)
        while client.connect_ex(("127.0.0.1", port)) != 0:
            self.assertLess(time.monotonic(), deadline, "systemd-socket-activate did not listen")
            client.close()
            client = socket.socket()
            time.sleep(0.05)
        client.settimeout(15)
        client.sendall(b"activated\n")
        client.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            data = client.recv(4096)
            if not data:
                break
            received += data
        if received != b"activated\n":
            process.terminate()
            self.fail(f"echoed {received!r}; server said: {process.communicate(timeout=10)[0]!r}")


class UsageLogTests(unittest.TestCase):
    """``--usage-log`` writes one JSON object per finished connection and upload, read back here."""

    timeout = 20

    def records(self, path: str) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    @inlineCallbacks
    def test_echoConnectionRecord(self) -> Any:
        """An echoed connection gives one record: peer, 6 bytes in and out, outcome closed, a start and duration."""
        path = os.path.join(scratch(self), "usage.jsonl")
        service = running(self, echotap, ["--port", "0", "--interface", "127.0.0.1", "--usage-log", path])
        client = Client(b"hello\n")
        yield connect(service.tcp.ports[0].getHost().port, client)
        yield client.lost
        yield service.stopService()
        [record] = self.records(path)
        self.assertEqual((record["kind"], record["server"], record["bytes_in"], record["bytes_out"],
                          record["outcome"]), ("connection", "echo", 6, 6, "closed"))
        self.assertRegex(record["peer"], r"^127\.0\.0\.1:\d+$")
        self.assertGreaterEqual(record["duration"], 0)
        self.assertLess(abs(record["start"] - time.time()), 60)

    @inlineCallbacks
    def test_uploadRecordsHoldNoToken(self) -> Any:
        """A stored upload's record has its name, size and hash; a bad token's has the code; no token is logged."""
        folder = scratch(self)
        tokenFile = os.path.join(folder, "token")
        with open(tokenFile, "w") as f:
            f.write("s3cret-token-value\n")
        path = os.path.join(scratch(self), "usage.jsonl")
        service = running(self, filetap, ["--port", "0", "--interface", "127.0.0.1", "--dir", folder,
                                          "--token-file", tokenFile, "--usage-log", path])
        port = service.tcp.ports[0].getHost().port
        for line in (b"PUT token=s3cret-token-value 5 a.txt\nhello", b"PUT token=wrong-guess-token 5 b.txt\nhello",
                     b"PUT token=s3cret-token-value 5 \x1b[2J.txt\nhello"):
            client = Client(line)
            yield connect(port, client)
            yield client.lost
        yield service.stopService()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("s3cret", text)
        self.assertNotIn("wrong-guess", text)
        uploads = [r for r in self.records(path) if r["kind"] == "upload"]
        self.assertEqual([(r["name"], r["outcome"]) for r in uploads],
                         [("received_a.txt", "stored"), ("b.txt", "bad-token"), ("\\x1b[2J.txt", "bad-name")])
        self.assertEqual((uploads[0]["size"], uploads[0]["sha256"]),
                         (5, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"))
        connections = [r for r in self.records(path) if r["kind"] == "connection"]
        self.assertEqual([r["outcome"] for r in connections], ["closed", "error", "error"])

    def test_unwritableFileIsOneLine(self) -> None:
        """--usage-log in a missing folder is a one-line usage error naming the folder."""
        options = ServerOptions()
        with self.assertRaises(Exception) as caught:
            options.parseOptions(["--usage-log", "/nonexistent-folder/usage.jsonl"])
        self.assertIn("the folder /nonexistent-folder does not exist", str(caught.exception))
