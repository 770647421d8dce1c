"""``tcplab demo``: the three lab results in one command, and a failing step is not success."""

from __future__ import annotations

import os
import re

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import reporter, unittest

from tcplab.cli import demo
from tcplab.echo import tap as echotap
from tcplab.echo.client import EchoClient
from tests.support import runTcplab, scratch


class DemoCommandTests(unittest.TestCase):
    def test_showsTheThreeResults(self) -> None:
        """tcplab demo runs the three tasks and shows the echo, the 300-client storm, the chat and a file whose
        checksums match on both sides, then says all passed."""
        folder = scratch(self)
        result = runTcplab("demo", "--dir", folder, timeout=120)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertRegex(out, r"server \| connection from 127\.0\.0\.1:\d+")
        self.assertIn("client | hello", out)
        self.assertRegex(out, r"300 clients served, 0 errors, [\d,]+ connections/s")
        for name in ("alice", "bob", "carol"):
            self.assertRegex(out, rf"{name} \| .*")
        hashes = re.findall(r"sha256 ([0-9a-f]{64})  (\S+)", out)
        self.assertEqual([name for _, name in hashes],
                         ["important_secret_file.txt", "received_important_secret_file.txt"])
        self.assertEqual(hashes[0][0], hashes[1][0])
        self.assertTrue(os.path.isfile(os.path.join(folder, "received_important_secret_file.txt")))
        self.assertIn("All three tasks passed", out)


class Shouting(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())


class BrokenEchoTap:
    """The echo tap, but its server upper-cases what it echoes."""

    Options = echotap.Options

    @staticmethod
    def makeService(options: echotap.Options) -> echotap.EchoService:
        service = echotap.makeService(options)
        service.factory.protocol = Shouting  # type: ignore[assignment]
        service.tcp.factory = Factory.forProtocol(Shouting)
        return service


class DemoFailureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_wrongEchoFailsTheStep(self):  # type: ignore[no-untyped-def]
        """A task whose echo comes back wrong fails its step with a message naming the task and shows what the client
        got."""
        self.patch(demo, "echotap", BrokenEchoTap)
        # The wrong echo never completes, so the step fails at its echo timeout: how long that is is not the point.
        self.patch(demo, "EchoClient", lambda output, reactor, timeout: EchoClient(output, reactor, 0.3))
        lines: list[str] = []
        d = defer.ensureDeferred(demo.step("Task 1", demo.task1(reactor, lines.append)))
        failure = yield self.assertFailure(d, demo.DemoFailed)
        self.assertEqual(failure.code, 1)
        self.assertTrue(str(failure).startswith("Task 1 failed: no echo"), str(failure))
        self.assertIn("    client | HELLO", lines)


class ScratchTests(unittest.SynchronousTestCase):
    """Test folders go to the system's temporary folder and go away: none is left in the checkout."""

    def test_outsideTheWorkingTreeAndRemoved(self) -> None:
        """A test's scratch folder is made outside the working tree and removed when the test ends."""
        made: list[str] = []

        class Case(unittest.SynchronousTestCase):
            def test_it(self) -> None:
                """Make a scratch folder (the case ScratchTests runs)."""
                made.append(scratch(self))

        result = reporter.TestResult()
        Case("test_it").run(result)
        self.assertEqual((result.errors, result.failures), ([], []))
        self.assertEqual(len(made), 1)
        cwd = os.path.realpath(os.getcwd())
        self.assertFalse(os.path.realpath(made[0]).startswith(cwd + os.sep), made[0])
        self.assertFalse(os.path.exists(made[0]))
