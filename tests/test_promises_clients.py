"""Promises of the ``tcplab`` command that no other module held: an internal error is exit 1 in
one line, the line ``tcplab send`` prints per stored file, and empty folders under ``-r``.
(Mapped in docs/GUARANTEES.md.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcplab.cli.send import collectFiles
from tcplab.file import tap as filetap
from tests.support import childEnv, scratch

BOOM = """
import tcplab.cli.echo as echo
async def run(reactor, options):
    raise RuntimeError("boom")
echo.run = run
from tcplab.cli import main
main(["echo", "hi"])
"""


class InternalErrorTests(SynchronousTestCase):
    def test_unexpectedErrorIsExitOneInOneLine(self) -> None:
        """A bug inside a command is exit 1 with one line on stderr, never a traceback."""
        result = subprocess.run([sys.executable, "-c", BOOM], capture_output=True, timeout=30, env=childEnv())
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stderr, b"tcplab: unexpected error (RuntimeError: boom): please report it\n")


class SendOutputTests(TestCase):
    timeout = 30

    async def test_oneLinePerStoredFile(self) -> None:
        """stdout gets ``LOCAL -> STORED (SIZE bytes, sha256 HASH)`` for each stored file."""
        folder, src = scratch(self), scratch(self)
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", folder])
        service = filetap.FileService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.tcp.ports[0].getHost().port
        files = {"a.txt": b"alpha\n", "report (1) [final].txt": b"x" * 1234}
        for name, data in files.items():
            with open(os.path.join(src, name), "wb") as f:
                f.write(data)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tcplab", "send", "--quiet", "--port", str(port), *files], env=childEnv(), path=src)
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out.decode().splitlines(), [
            f"{name} -> received_{name} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})"
            for name, data in files.items()
        ])


class EmptyFolderTests(SynchronousTestCase):
    def test_emptyFoldersAreNotSent(self) -> None:
        """With -r only regular files are sent; an empty folder gives nothing to create."""
        top = scratch(self)
        os.makedirs(os.path.join(top, "photos", "empty", "also-empty"))
        os.makedirs(os.path.join(top, "photos", "sub"))
        with open(os.path.join(top, "photos", "sub", "a.jpg"), "wb") as f:
            f.write(b"jpeg")
        items = collectFiles([os.path.join(top, "photos")], True)
        self.assertEqual([item.name for item in items], ["photos/sub/a.jpg"])
