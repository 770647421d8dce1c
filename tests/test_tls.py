"""TLS through endpoint strings: servers take ssl:..., clients verify against --ca."""

from __future__ import annotations

import os

from twisted.trial import unittest

from tcplab.errors import ExitCode
from tests.support import ServerProcess, runTcplab
from tests.tlsutil import makeCertificates


class EchoOverTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.certs = makeCertificates(_folder(self))
        self.server = ServerProcess(
            "tcplab-echo", "--listen", f"ssl:0:privateKey={self.certs['server']}:interface=127.0.0.1"
        )
        self.addCleanup(self.server.stop)

    def test_trustedWithTLSFlag(self) -> None:
        result = runTcplab("echo", "--tls", "--ca", self.certs["ca"], "--host", "localhost",
                           "--port", str(self.server.port), "hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello\n"), result.stderr)

    def test_trustedWithConnectString(self) -> None:
        result = runTcplab("echo", "--ca", self.certs["ca"],
                           "--connect", f"tls:host=127.0.0.1:port={self.server.port}", "hello")
        self.assertEqual((result.returncode, result.stdout), (0, b"hello\n"), result.stderr)

    def test_untrustedCertificateIsRefused(self) -> None:
        """Verification is on by default: a certificate from another CA is a clear connect error."""
        for ca in (["--ca", self.certs["other-ca"]], []):
            result = runTcplab("echo", *ca, "--connect", f"tls:host=localhost:port={self.server.port}", "hello")
            self.assertEqual(result.returncode, ExitCode.CONNECT, result.stderr)
            self.assertEqual(result.stdout, b"")
            self.assertEqual(result.stderr.count(b"\n"), 1)
            self.assertIn(b"TLS handshake failed (certificate verify failed)", result.stderr)

    def test_caOptionErrors(self) -> None:
        result = runTcplab("echo", "--ca", self.certs["ca"], "hi")
        self.assertEqual(result.returncode, ExitCode.USAGE)
        result = runTcplab("echo", "--tls", "--ca", "/nonexistent.pem", "hi")
        self.assertEqual(result.returncode, ExitCode.USAGE)
        self.assertIn(b"cannot read --ca", result.stderr)


def _folder(case: unittest.TestCase) -> str:
    path = case.mktemp()
    os.makedirs(path)
    return path
