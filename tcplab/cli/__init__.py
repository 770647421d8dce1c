"""The ``tcplab`` command: parse arguments, run one client command, map errors to exit codes.

This is the only place that turns an error into a line on stderr and an exit
status (see ``tcplab.errors.ExitCode``); commands and protocols just fail.

Only the standard library is imported at module level: ``main`` installs the
Ctrl-C handler first, so an interrupt while Twisted is still being imported ends
with one line too, not a traceback.
"""

from __future__ import annotations

import os
import sys

try:  # the C module: ``signal`` builds enums on import, which takes longer than Ctrl-C may wait
    import _signal as signal  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - not CPython
    import signal

TYPE_CHECKING = False  # typing itself takes a while to import: not before the handler is in place
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn, TextIO

    from tcplab.interfaces import IReactor

#: name -> (module holding ``Options`` and ``run``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "echo": ("tcplab.cli.echo", "Send lines to an echo or multi server and print what comes back."),
    "send": ("tcplab.cli.send", "Upload files to a tcplab-file server, verified."),
    "demo": ("tcplab.cli.demo", "Replay the whole lab on loopback: echo, multi-client, file transfer."),
}

INTERRUPTED = 130
INTERRUPTED_LINE = b"tcplab: interrupted\n"

#: While the reactor runs: what a Ctrl-C does (stop it, then exit 130).
_onInterrupt: Callable[[], None] | None = None
_interrupted = False


def _interrupt(signum: int, frame: object) -> None:
    global _interrupted
    if _interrupted or _onInterrupt is None:
        # Still starting (nothing to clean up yet), or a second Ctrl-C: do not wait for anything.
        # Not KeyboardInterrupt: raised inside an import or a C callback, it can print a traceback.
        _stdoutDone()
        os.write(2, INTERRUPTED_LINE)
        os._exit(INTERRUPTED)
    _interrupted = True
    _onInterrupt()


def _stdoutDone() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _stillInterrupted() -> None:
    """A Ctrl-C once the reactor is done: the exit status says so (130), nothing else to stop."""


def main(argv: Sequence[str] | None = None, reactor: Any = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> NoReturn:
    """Entry point of the ``tcplab`` console script and ``python -m tcplab``: exits with the command's status.

    ``reactor`` (a fresh, not yet running one; default: the global reactor) and ``stdout`` /
    ``stderr`` (text streams; a command's bytes go to ``stdout.buffer``) let a test run the
    command in-process (even in a thread of its own) and read its exit status and output.  Given
    a reactor, Ctrl-C is left to the caller: no SIGINT handler is installed.
    """
    if reactor is None:
        signal.signal(signal.SIGINT, _interrupt)
        code = _guarded(argv, None)
    else:
        global _interrupted, _onInterrupt
        _interrupted, _onInterrupt = False, None
        previous = signal.getsignal(signal.SIGINT)
        try:
            with _redirected(stdout, stderr):
                code = _guarded(argv, reactor)
        finally:
            if signal.getsignal(signal.SIGINT) is not previous:
                signal.signal(signal.SIGINT, previous)
    sys.exit(code)


def _guarded(argv: Sequence[str] | None, reactor: Any) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv), reactor)
    except KeyboardInterrupt:
        code = INTERRUPTED
    except BrokenPipeError:  # ``tcplab echo --help | head -1``
        from tcplab.cli.common import silenceStdout

        silenceStdout()
        code = 141
    if _interrupted:
        code = INTERRUPTED
    if code == INTERRUPTED:
        _message("tcplab: interrupted")
    return code


class _redirected:
    """``sys.stdout`` / ``sys.stderr`` swapped for the given streams while a command runs in-process."""

    def __init__(self, stdout: TextIO | None, stderr: TextIO | None) -> None:
        self.streams = (stdout, stderr)

    def __enter__(self) -> None:
        self.saved = (sys.stdout, sys.stderr)
        sys.stdout = self.streams[0] or sys.stdout
        sys.stderr = self.streams[1] or sys.stderr

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self.saved


def _main(args: list[str], reactor: Any = None) -> int:
    import argparse
    import importlib

    from tcplab import __version__
    from tcplab.cli.common import _Parser
    from tcplab.errors import ExitCode, UsageProblem

    top = _Parser(prog="tcplab", usage="tcplab COMMAND [options]   (tcplab COMMAND --help for each)",
                  description="Clients for the tcplab servers. Options may come before or after operands; "
                              "-- ends them.",
                  epilog="Exit codes: " + ", ".join(f"{c.value} {c.name.lower().replace('_', ' ')}" for c in ExitCode),
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"tcplab {__version__}",
                     help="Print tcplab's version and exit.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, description) in COMMANDS.items():
        commands.add_parser(name, help=description, add_help=False)
    command = "tcplab"
    try:
        parsed, rest = top.parse_known_args(args)
        command = f"tcplab {parsed.command}"
        module = importlib.import_module(COMMANDS[parsed.command][0])
        options = module.Options()
        options.parseOptions(rest)
    except UsageProblem as e:
        _message(f"{command}: {e} (see {command} --help)")
        return int(ExitCode.USAGE)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    return _runCommand(module.run, options, reactor)


def _runCommand(run: Callable[[Any, Any], Any], options: Any, reactor: IReactor | None = None) -> int:
    """Run one command on the reactor (the global one unless a test passes its own); the first way
    it ends decides the exit status."""
    global _onInterrupt
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import ILogObserver, LogLevel, globalLogBeginner, globalLogPublisher
    from twisted.python.failure import Failure
    from zope.interface import provider

    from tcplab.cli import common
    from tcplab.errors import ExitCode
    from tcplab.interfaces import globalReactor

    inProcess = reactor is not None
    running = globalReactor() if reactor is None else reactor

    outcome: list[int] = []

    def finish(code: int) -> None:
        if not outcome:
            outcome.append(code)
        try:
            running.stop()
        except ReactorNotRunning:
            pass

    def ended(result: object) -> None:
        if outcome or _interrupted:
            return  # already ending (Ctrl-C, stdout gone): what the command makes of it is moot
        finish(_exitFor(result) if isinstance(result, Failure) else int(ExitCode.OK))

    @provider(ILogObserver)
    def unhandled(event: dict[str, Any]) -> None:
        """An error Twisted would print as a traceback: one line instead, and the command ends."""
        failure = event.get("log_failure")
        if failure is None or event.get("log_level") != LogLevel.critical or outcome or _interrupted:
            return
        if failure.check(BrokenPipeError):
            common.outputGone()
            return
        finish(_exitFor(failure))

    common.whenOutputGone = lambda: finish(int(ExitCode.BROKEN_PIPE))
    if inProcess:  # someone else (a test runner) owns logging: listen in, and leave again after
        globalLogPublisher.addObserver(unhandled)
    else:
        globalLogBeginner.beginLoggingTo([unhandled], discardBuffer=True, redirectStandardIO=False)
    _onInterrupt = lambda: running.callFromThread(finish, INTERRUPTED)  # noqa: E731
    running.callWhenRunning(lambda: ensureDeferred(run(running, options)).addBoth(ended))
    if _interrupted:
        return INTERRUPTED
    try:
        running.run(installSignalHandlers=False)  # type: ignore[call-arg]  # IReactorCore.run names no arguments
    finally:
        if inProcess:
            globalLogPublisher.removeObserver(unhandled)
            common.whenOutputGone = None
    _onInterrupt = _stillInterrupted
    return INTERRUPTED if _interrupted else outcome[0] if outcome else int(ExitCode.FAILURE)


def _exitFor(failure: Any) -> int:
    """The one mapping from a failure to a line on stderr and an exit status."""
    from tcplab.cli import common
    from tcplab.errors import ExitCode, TcplabError

    if failure.check(TcplabError):
        error: TcplabError = failure.value
        _message(f"tcplab: {error}")
        return int(error.code)
    if failure.check(SystemExit):
        return int(failure.value.code or 0)
    if failure.check(BrokenPipeError):
        # The reader of our output went away (``tcplab send | head``): end quietly, as cat does.
        common.silenceStdout()
        return int(ExitCode.BROKEN_PIPE)
    if failure.check(KeyboardInterrupt):
        return INTERRUPTED
    text = " ".join(failure.getErrorMessage().split())
    _message(f"tcplab: unexpected error ({failure.type.__name__}: {text}): please report it")
    return int(ExitCode.FAILURE)


def _message(line: str) -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    print(line, file=sys.stderr, flush=True)
