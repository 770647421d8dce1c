"""The ``tcplab`` command as a user types it: options anywhere, --help and --version, one-line usage
errors, --connect mistakes named, pipes that end quietly and Ctrl-C that is always "interrupted"."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tcplab import __version__
from tcplab.cli import _main
from tcplab.cli import demo as democli
from tcplab.cli import echo as echocli
from tcplab.cli import send as sendcli
from tcplab.errors import ExitCode, UsageProblem
from tests.support import TCPLAB, ServerProcess, childEnv, scratch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def run(*argv: str) -> tuple[int, str, str]:
    """``tcplab ARGV`` in this process, up to (not including) running the command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main(list(argv))
    return code, out.getvalue(), err.getvalue()


def parsed(options: type, *argv: str) -> dict:  # type: ignore[type-arg]
    result = options()
    result.parseOptions(list(argv))
    return result  # type: ignore[no-any-return]


class OptionsAnywhereTests(SynchronousTestCase):
    """Options may come before or after operands, as in cp, curl and git; ``--`` ends them."""

    def setUp(self) -> None:
        self.file = os.path.join(scratch(self), "a.txt")
        with open(self.file, "w") as f:
            f.write("x")

    def test_echoOptionsAfterMessages(self) -> None:
        """``tcplab echo hello --port 7001`` sends one line, hello, to port 7001."""
        options = parsed(echocli.Options, "hello", "--port", "7001", "world", "-t", "3")
        self.assertEqual((options["messages"], options["port"], options["timeout"]), ([b"hello", b"world"], 7001, 3.0))

    def test_sendOptionsAfterFiles(self) -> None:
        """``tcplab send a.txt --quiet`` reads --quiet as the option, not as a file."""
        options = parsed(sendcli.Options, self.file, "--quiet", "-r", "--no-rename", "--port=9001")
        self.assertEqual(options["files"], [self.file])
        self.assertTrue(options["quiet"] and options["recursive"] and options["no-rename"])
        self.assertEqual(options["port"], 9001)

    def test_doubleDashEndsOptions(self) -> None:
        """After ``--`` everything is an operand, even at the very start."""
        self.assertEqual(parsed(echocli.Options, "--", "--port", "-q")["messages"], [b"--port", b"-q"])
        self.assertEqual(parsed(echocli.Options, "a", "--", "--")["messages"], [b"a", b"--"])
        options = parsed(sendcli.Options, "-q", "--", "--quiet")
        self.assertEqual((options["files"], options["quiet"]), (["--quiet"], True))

    def test_defaultsAndShortFlags(self) -> None:
        """The option names, short flags and defaults are those of the usage.Options parser they replace."""
        echo = parsed(echocli.Options)
        self.assertEqual((echo["host"], echo["port"], echo["timeout"], echo["udp"], echo["tls"], echo["messages"]),
                         ("localhost", 7000, 10.0, False, False, []))
        send = parsed(sendcli.Options, self.file)
        self.assertEqual((send["port"], send["resume"], send["token-file"]), (9000, False, None))
        short = parsed(sendcli.Options, "-H", "127.0.0.1", "-p", "1", "-t", "2", "-q", "-r", self.file)
        self.assertEqual((short["host"], short["port"], short["timeout"], short["quiet"], short["recursive"]),
                         ("127.0.0.1", 1, 2.0, True, True))
        self.assertTrue(parsed(echocli.Options, "-u", "x")["udp"])
        self.assertEqual(parsed(echocli.Options, "-c", "unix:path=/tmp/x.sock")["connect"], "unix:path=/tmp/x.sock")
        self.assertEqual(parsed(democli.Options, "-d", "/tmp/x")["dir"], "/tmp/x")

    def test_messagesSplitAtNewlines(self) -> None:
        """A message with a line break in it is sent as two lines, as before."""
        self.assertEqual(parsed(echocli.Options, "a\nb")["messages"], [b"a", b"b"])


class HelpAndVersionTests(SynchronousTestCase):
    """``--help`` shows one synopsis line and the real defaults; ``--version`` is tcplab's."""

    def test_version(self) -> None:
        """``tcplab --version`` and ``tcplab echo --version`` print tcplab's version, not Twisted's."""
        for argv in (["--version"], ["echo", "--version"], ["send", "--version"], ["demo", "--version"]):
            self.assertEqual(run(*argv), (0, f"tcplab {__version__}\n", ""), argv)

    def test_helpHasOneSynopsisLineAndTheDefaults(self) -> None:
        """``tcplab echo --help`` says the port is 7000, ``tcplab send --help`` says 9000."""
        for command, options, port in (("echo", echocli.Options, 7000), ("send", sendcli.Options, 9000),
                                       ("demo", democli.Options, None)):
            code, out, err = run(command, "--help")
            self.assertEqual((code, err), (0, ""))
            lines = out.split("\n")
            self.assertEqual(lines[0], f"usage: tcplab {command} {options.synopsis}")
            self.assertEqual(lines[1], "", "the synopsis is one line")
            if port is not None:
                self.assertIn(f"(default: {port})", " ".join(out.split()))
                self.assertIn("--tls", lines[0])
                self.assertIn("--ca PEM", lines[0])

    def test_readmeSynopsisIsTheHelpSynopsis(self) -> None:
        """README shows exactly the synopsis ``--help`` prints (with --tls and --ca)."""
        with open(README, encoding="utf-8") as f:
            readme = f.read()
        for command, options in (("echo", echocli.Options), ("send", sendcli.Options)):
            line = f"tcplab {command} {options.synopsis}"
            self.assertTrue(f"\n{line}\n" in readme, f"README lacks the synopsis line {line!r}")


class UsageErrorTests(SynchronousTestCase):
    """A usage mistake is one line, says where to look, and exits 2."""

    def refused(self, *argv: str) -> str:
        code, out, err = run(*argv)
        self.assertEqual((code, out), (ExitCode.USAGE, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        return err

    def test_oneLineAndWhereToLook(self) -> None:
        """Unknown options, bad values, missing operands and unknown commands: one line each."""
        for argv, said, see in (
            (["echo", "hi", "--bogus"], "unrecognized arguments: --bogus", "tcplab echo"),
            (["echo", "--port", "nope"], "--port must be a whole number", "tcplab echo"),
            (["echo", "--port"], "expected one argument", "tcplab echo"),
            (["send"], "name at least one FILE to send", "tcplab send"),
            (["send", "a", "--timeout", "-1"], "--timeout", "tcplab send"),
            (["demo", "extra"], "unrecognized arguments: extra", "tcplab demo"),
            (["demo", "--", "extra"], "unrecognized arguments: extra", "tcplab demo"),
            ([], "COMMAND", "tcplab"),
            (["frobnicate"], "invalid choice: 'frobnicate'", "tcplab"),
        ):
            with self.subTest(argv=argv):
                err = self.refused(*argv)
                self.assertIn(said, err)
                self.assertTrue(err.startswith(f"{see}: "), err)
                self.assertTrue(err.endswith(f"(see {see} --help)\n"), err)

    def test_programmaticMistakesAreUsageProblems(self) -> None:
        """What the demo and tests build in-process fails the same way (a UsageProblem, exit 2)."""
        error = self.assertRaises(UsageProblem, parsed, echocli.Options, "--udp", "--connect", "tcp:host=a:port=1")
        self.assertEqual(error.code, ExitCode.USAGE)


class ConnectStringTests(SynchronousTestCase):
    """Every mistake in a ``--connect`` endpoint string is one line naming the missing or bad part."""

    def refused(self, description: str) -> str:
        code, out, err = run("echo", "--connect", description, "hi")
        self.assertEqual((code, out), (ExitCode.USAGE, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertNotIn("__init__", err)
        self.assertNotIn("positional argument", err)
        return err

    def test_eachMistakeNamed(self) -> None:
        """No port, a bad port, an unknown type or key, no path: each message names that part."""
        for description, said in (
            ("tcp:host=127.0.0.1", "has no port: add port="),
            ("tcp:port=7000", "has no host: add host="),
            ("tcp:port=x", "port= must be a whole number from 1 to 65535, not 'x'"),
            ("tcp:host=a:port=70000", "port= must be a whole number from 1 to 65535, not '70000'"),
            ("tcp:host=a:port=1:timeout=soon", "timeout= must be a whole number"),
            ("tcp:host=a:port=1:prot=2", "unknown key 'prot' (tcp: takes host, port, timeout, bindAddress)"),
            ("tcp:host=a:port=1:port=2", "port= is given twice"),
            ("tcp:a:1:2", "one value too many ('2')"),
            ("tcp:", "has no host"),
            ("tcp:host=:port=1", "has no host"),
            ("foo:bar=1", "unknown endpoint type 'foo'"),
            ("localhost:7000", "unknown endpoint type 'localhost'"),
            ("localhost", "has no endpoint type"),
            ("unix:", "has no path: add path="),
            ("unix:path=/tmp/x.sock:lockfile=yes", "lockfile= must be 0 or 1"),
            ("tls:host=localhost", "has no port"),
            ("tls:port=1", "has no host"),
            ("tls:host=a:port=1:trustRoots=/nonexistent", "trustRoots= must be a folder"),
            ("tls:host=a:port=1:certificate=/nonexistent", "cannot read certificate="),
            ("tls:host=a:port=1:sni=x", "unknown key 'sni'"),
        ):
            with self.subTest(description=description):
                self.assertIn(said, self.refused(description))

    def test_goodStringsAccepted(self) -> None:
        """Twisted's spellings, positional or by key, still work."""
        for description in ("tcp:host=127.0.0.1:port=7000", "tcp:127.0.0.1:7000", "tcp:host=h:7000",
                            "tcp:host=h:port=1:timeout=3", "unix:path=/tmp/x.sock", "unix:/tmp/x.sock:timeout=2",
                            "tls:host=localhost:port=7443", "TCP:host=h:port=1", "tcp:host=fe80\\:\\:1:port=1"):
            with self.subTest(description=description):
                self.assertEqual(parsed(echocli.Options, "--connect", description)["connect"], description)


def _needSeqAndHead(case: SynchronousTestCase) -> None:
    for tool in ("seq", "head"):
        if shutil.which(tool) is None:
            raise case.skipTest(f"{tool} is not installed")  # type: ignore[misc]


class PipeTests(SynchronousTestCase):
    """``tcplab echo | head -1`` ends as ``seq | head`` does."""

    def setUp(self) -> None:
        self.server = ServerProcess("tcplab-echo", "--port", "0", "--interface", "127.0.0.1")
        self.addCleanup(self.server.stop)

    def test_readerGoneIsQuiet141(self) -> None:
        """``seq 1 200000 | tcplab echo --port P | head -1``: one line out, exit 141, nothing on stderr."""
        _needSeqAndHead(self)
        seq = subprocess.Popen(["seq", "1", "200000"], stdout=subprocess.PIPE)
        client = subprocess.Popen([*TCPLAB, "echo", "--host", "127.0.0.1", "--port", str(self.server.port)],
                                  stdin=seq.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=childEnv())
        head = subprocess.Popen(["head", "-1"], stdin=client.stdout, stdout=subprocess.PIPE)
        assert seq.stdout is not None and client.stdout is not None and client.stderr is not None
        seq.stdout.close()
        client.stdout.close()
        out, _ = head.communicate(timeout=30)
        err = client.stderr.read()
        client.wait(timeout=30)
        seq.wait(timeout=30)
        self.assertEqual((out, client.returncode, err), (b"1\n", ExitCode.BROKEN_PIPE, b""))


class InterruptTests(SynchronousTestCase):
    """Ctrl-C is "interrupted", exit 130, one line, whenever it comes."""

    def spawn(self, port: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([*TCPLAB, "echo", "--host", "127.0.0.1", "--port", str(port)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=childEnv(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def assertInterrupted(self, process: subprocess.Popen[bytes], context: object) -> None:
        out, err = process.communicate(timeout=20)
        self.assertNotIn(b"Traceback", err, context)
        if process.returncode == -signal.SIGINT:
            # Killed before Python had its own handler in place: the shell reports 130, nothing printed.
            self.assertEqual(err, b"", context)
        else:
            self.assertEqual((process.returncode, err), (ExitCode.INTERRUPTED, b"tcplab: interrupted\n"), context)

    def test_whileWaitingForInput(self) -> None:
        """``sleep 30 | tcplab echo --port P`` then Ctrl-C, 12 times at staggered moments: always 130."""
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(16)
            server.settimeout(20)
            port = server.getsockname()[1]
            for attempt in range(12):
                process = self.spawn(port)
                connection, _ = server.accept()  # the client is connected and waiting for stdin
                with connection:
                    time.sleep(attempt * 0.004)  # spread the signal over the reactor's turns
                    process.send_signal(signal.SIGINT)
                    self.assertInterrupted(process, attempt)

    def test_whileStarting(self) -> None:
        """Ctrl-C while tcplab is importing Twisted (or just after): one line, 130, never a traceback or 0."""
        if not os.path.exists("/proc/self/maps"):
            raise self.skipTest("needs /proc to see the imports happen")
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(16)
            port = server.getsockname()[1]
            for attempt in range(8):
                process = self.spawn(port)
                deadline = time.monotonic() + 20
                # zope.interface's C module is mapped once Twisted's import has begun, inside main().
                while time.monotonic() < deadline and process.poll() is None:
                    with contextlib.suppress(OSError), open(f"/proc/{process.pid}/maps") as f:
                        if re.search(r"_zope_interface_coptimizations", f.read()):
                            break
                time.sleep(attempt * 0.01)
                process.send_signal(signal.SIGINT)
                self.assertInterrupted(process, attempt)


class UnexpectedErrorTests(SynchronousTestCase):
    """An error Twisted would print as an "Unhandled Error" traceback is one line and exit 1."""

    def test_unhandledErrorIsOneLine(self) -> None:
        """A bug raising inside a reactor callback ends the command at once: exit 1, one line, no traceback."""
        script = (
            "import sys\n"
            "from twisted.internet.defer import Deferred\n"
            "from tcplab.cli import _runCommand\n"
            "async def run(reactor, options):\n"
            "    reactor.callLater(0, lambda: 1 / 0)\n"
            "    await Deferred()\n"
            "sys.exit(_runCommand(run, {}))\n"
        )
        result = subprocess.run([TCPLAB[0], "-c", script], capture_output=True, timeout=30, env=childEnv())
        self.assertEqual((result.returncode, result.stdout), (ExitCode.FAILURE, b""), result.stderr)
        self.assertEqual(result.stderr, b"tcplab: unexpected error (ZeroDivisionError: division by zero): "
                                        b"please report it\n")
