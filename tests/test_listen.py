"""Where servers listen, as users start them: owner-only unix sockets, README's commands side by side
in one folder, and one-line errors in the user's terms for every bad listening option."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import time

from twisted.internet import reactor
from twisted.trial import unittest

from tcplab.listening import EndpointError, serverEndpoint, splitEndpoint
from tests.support import TWISTD, ServerProcess, childEnv, scratch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_ONLY = b"--backlog"  # in every server's --help text, in no error line


def twistd(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``twistd`` to its end."""
    return subprocess.run([*TWISTD, *argv], capture_output=True, timeout=30, env=childEnv(), cwd=cwd,
                          stdin=subprocess.DEVNULL)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class UnixSocketModeTests(unittest.TestCase):
    """``--listen unix:PATH`` makes a socket only its owner can use, unless ``mode=`` says otherwise."""

    timeout = 30

    def serve(self, plugin: str, *argv: str) -> None:
        """Start ``plugin`` with ``argv``; the TCP port it logs last means the unix sockets are ready."""
        server = ServerProcess(plugin, *argv, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)

    def test_defaultIsOwnerOnly(self) -> None:
        """The socket a real tcplab-file creates is mode 0600 (Twisted's default is 0666: any local user)."""
        path = os.path.join(scratch(self), "drop.sock")
        self.serve("tcplab-file", "--listen", f"unix:{path}", "--dir", scratch(self))
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        self.assertEqual(oct(mode(path)), oct(0o600))
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(path)

    def test_explicitModeIsKept(self) -> None:
        """``mode=660`` (group access, e.g. for a proxy) is applied as given."""
        folder = scratch(self)
        self.serve("tcplab-echo", "--listen", f"unix:{folder}/a.sock:mode=660",
                   "--listen", f"unix:address={folder}/b.sock:mode=0644")
        self.assertEqual((oct(mode(f"{folder}/a.sock")), oct(mode(f"{folder}/b.sock"))), (oct(0o660), oct(0o644)))

    def test_modeParsing(self) -> None:
        """Endpoint strings split as Twisted splits them; a bad mode is a one-line error naming the fix."""
        self.assertEqual(splitEndpoint(r"unix:/tmp/a\:b.sock:mode=660"), (["unix", "/tmp/a:b.sock"], {"mode": "660"}))
        self.assertEqual(splitEndpoint("ssl:0:privateKey=k=v.pem"), (["ssl", "0"], {"privateKey": "k=v.pem"}))
        for bad in ("mode=rw", "mode=1777", "mode=-1"):
            error = self.assertRaises(EndpointError, serverEndpoint, reactor, f"unix:/tmp/x.sock:{bad}")
            self.assertIn("is not an octal file mode: write e.g. mode=660", str(error))


def readmeServerCommands() -> dict[str, list[str]]:
    """The server command of each lab task in README's table, as argv."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = {}
    for task, command in re.findall(r"^\| (\d)\. [^|]+\| `([^`]+)` \|", text, re.MULTILINE):
        found[task] = shlex.split(command)
    return found


class ReadmeSideBySideTests(unittest.TestCase):
    """README's commands for tasks 1 and 2, started from one folder, both serve."""

    timeout = 60

    def start(self, argv: list[str], cwd: str) -> tuple[subprocess.Popen[bytes], int]:
        self.assertEqual(argv[0], "twistd", argv)
        process = subprocess.Popen([*TWISTD, *argv[1:], "--port", "0", "--interface", "127.0.0.1"], cwd=cwd,
                                   env=childEnv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(self.stop, process)
        assert process.stdout is not None
        log = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            log += line
            match = re.search(rb"starting on (\d+)", line)
            if match:
                return process, int(match.group(1))
        self.fail(f"{shlex.join(argv)} did not start:\n{log.decode(errors='replace')}")

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()

    def assertEchoes(self, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"side by side\n")
            received = b""
            while b"side by side\n" not in received:
                data = client.recv(4096)
                self.assertTrue(data, received)
                received += data

    def test_echoAndMultiFromOneFolder(self) -> None:
        """Both servers run, and answer, when started with README's commands from the same folder."""
        commands = readmeServerCommands()
        folder = scratch(self)
        echo, echoPort = self.start(commands["1"], folder)
        multi, multiPort = self.start(commands["2"], folder)
        self.assertEchoes(echoPort)
        self.assertEchoes(multiPort)
        self.assertEqual((echo.poll(), multi.poll()), (None, None))
        self.assertEqual(commands["1"][-1], "tcplab-echo")
        self.assertEqual(commands["2"][-1], "tcplab-multi")


class UsageErrorTests(unittest.TestCase):
    """The real ``twistd``: a bad server option is one line on stderr naming the problem and the fix,
    then "see --help", exit status 1, and no help text or traceback."""

    timeout = 30

    def assertOneLine(self, plugin: str, argv: list[str], *expected: bytes) -> bytes:
        result = twistd("-n", "--pidfile=", plugin, *argv)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn(HELP_ONLY, result.stdout + result.stderr)
        self.assertNotIn(b"Traceback", result.stdout + result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertTrue(result.stderr.startswith(f"twistd {plugin}: ".encode()), result.stderr)
        self.assertTrue(result.stderr.endswith(f"(see twistd {plugin} --help)\n".encode()), result.stderr)
        for text in expected:
            self.assertIn(text, result.stderr)
        return result.stderr

    def test_portNotANumber(self) -> None:
        """``tcp:notaport`` says the port is not a port number and shows one (not "invalid literal for int()")."""
        self.assertOneLine("tcplab-echo", ["--listen", "tcp:notaport"],
                           b"--listen tcp:notaport: port 'notaport' is not a port number from 0 to 65535: "
                           b"write e.g. tcp:7000")

    def test_unknownEndpointKey(self) -> None:
        """``tcp:0:foo=bar`` names the unknown key and the keys tcp takes (not "_parseTCP() got ...")."""
        self.assertOneLine("tcplab-multi", ["--listen", "tcp:0:foo=bar"],
                           b"tcp endpoints take no foo= (only port=, interface=, backlog=)")

    def test_unixSocketInMissingFolder(self) -> None:
        """A unix socket in a folder that does not exist names the folder (not a lock-file path)."""
        missing = os.path.join(scratch(self), "no", "such")
        stderr = self.assertOneLine("tcplab-echo", ["--listen", f"unix:{missing}/echo.sock"],
                                    f"the folder {missing} does not exist: create it".encode())
        self.assertNotIn(b".lock", stderr)

    def test_systemdWithoutSocket(self) -> None:
        """``systemd:`` with no inherited socket says so and how to get one (not "list index out of range")."""
        self.assertOneLine("tcplab-file", ["--listen", "systemd:domain=INET:index=0", "--dir", scratch(self)],
                           b"systemd passed this process no socket: start it from a .socket unit")

    def test_missingDir(self) -> None:
        """``--dir /nonexistent`` says it does not exist and how to create it."""
        missing = os.path.join(scratch(self), "nonexistent")
        self.assertOneLine("tcplab-file", ["--dir", missing],
                           f"--dir {missing} does not exist: create it (mkdir -p {missing})".encode())
        self.assertFalse(os.path.exists(missing))

    def test_dirIsAFile(self) -> None:
        """``--dir`` naming a file says it is a file, not a folder."""
        path = os.path.join(scratch(self), "file")
        open(path, "w").close()
        self.assertOneLine("tcplab-file", ["--dir", path], b"is a file, not a folder")

    def test_unknownOptionIsShort(self) -> None:
        """Any usage error, even one Twisted's option parser raises, is the one line, not the whole help."""
        self.assertOneLine("tcplab-multi", ["--frob"], b"option --frob not recognized")

    def test_missingTLSKey(self) -> None:
        """An ``ssl:`` endpoint whose key file cannot be read names the file."""
        self.assertOneLine("tcplab-echo", ["--listen", "ssl:0:privateKey=/nonexistent/key.pem"],
                           b"cannot read privateKey=/nonexistent/key.pem (No such file or directory)")

    def test_helpStillPrintsHelp(self) -> None:
        """``--help`` is not an error: the help text, exit status 0."""
        result = twistd("tcplab-echo", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(HELP_ONLY, result.stdout)


class SystemdSocketTests(unittest.TestCase):
    """The ``systemd:`` check does not get in the way of a socket systemd really passes."""

    timeout = 30

    def test_inheritedUnixSocketServes(self) -> None:
        """Under systemd-socket-activate, ``--listen systemd:domain=UNIX:index=0`` echoes on the passed socket."""
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise unittest.SkipTest("systemd-socket-activate is not installed")
        path = os.path.join(scratch(self), "echo.sock")
        process = subprocess.Popen(
            [activate, "-l", path, "--fdname=echo", "-E", f"PYTHONPATH={childEnv()['PYTHONPATH']}",
             *TWISTD, "-n", "--pidfile=", "tcplab-echo", "--listen", "systemd:domain=UNIX:index=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=childEnv())
        self.addCleanup(ReadmeSideBySideTests.stop, process)
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(15)
            client.connect(path)
            client.sendall(b"activated\n")
            received = b""
            while b"activated\n" not in received:
                data = client.recv(4096)
                self.assertTrue(data, received)
                received += data
