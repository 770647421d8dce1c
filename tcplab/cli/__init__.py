"""The ``tcplab`` command: parse arguments, run one client command, map errors to exit codes.

This is the only place that turns an error into a line on stderr and an exit
status (see ``tcplab.errors.ExitCode``); commands and protocols just fail.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python import usage
from twisted.python.failure import Failure

from tcplab import __version__
from tcplab.errors import ExitCode, TcplabError

#: name -> (module holding ``Options`` and ``run``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "echo": ("tcplab.cli.echo", "Send lines to an echo or multi server and print what comes back."),
    "send": ("tcplab.cli.send", "Upload files to a tcplab-file server, verified."),
    "demo": ("tcplab.cli.demo", "Replay the whole lab on loopback: echo, multi-client, file transfer."),
}


def _commandOptions(module: str) -> type[usage.Options]:
    return importlib.import_module(module).Options  # type: ignore[no-any-return]


class Options(usage.Options):
    synopsis = "tcplab COMMAND [options]   (tcplab COMMAND --help for each)"
    longdesc = "Clients for the tcplab servers. Exit codes: " + ", ".join(
        f"{c.value} {c.name.lower()}" for c in ExitCode
    )

    @property
    def subCommands(self):  # type: ignore[no-untyped-def]
        return [
            (name, None, lambda module=module: _commandOptions(module)(), description)
            for name, (module, description) in COMMANDS.items()
        ]

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"tcplab {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(f"name a command: {', '.join(COMMANDS)}")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``tcplab`` console script and ``python -m tcplab``."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = Options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        command = f"tcplab {options.subCommand}" if options.subCommand else "tcplab"
        _fail(f"{command}: {e} (see {command} --help)", ExitCode.USAGE)
    except TcplabError as e:
        _fail(f"tcplab: {e}", e.code)
    module = importlib.import_module(COMMANDS[options.subCommand][0])
    finished = interrupted = False

    def _run(reactor: object) -> Deferred[None]:
        def onShutdown() -> None:
            nonlocal interrupted
            interrupted = not finished

        def done(result: object) -> object:
            nonlocal finished
            finished = True
            if interrupted:
                _message("tcplab: interrupted")
                raise SystemExit(int(ExitCode.INTERRUPTED))
            return result

        # A signal stops the reactor, which closes stdin and connections: that must
        # not pass for success, whatever the command makes of it.
        reactor.addSystemEventTrigger("before", "shutdown", onShutdown)  # type: ignore[attr-defined]
        return ensureDeferred(module.run(reactor, options.subOptions)).addBoth(done).addErrback(_exitFor)

    try:
        task.react(_run)
    except SystemExit:
        if not finished:
            _fail("tcplab: interrupted", ExitCode.INTERRUPTED)
        raise
    raise AssertionError("react returned")  # pragma: no cover


def _exitFor(failure: Failure) -> NoReturn:
    """The one mapping from a failure to a line on stderr and an exit status."""
    if failure.check(TcplabError):
        error: TcplabError = failure.value  # type: ignore[assignment]
        _message(f"tcplab: {error}")
        raise SystemExit(int(error.code))
    if failure.check(SystemExit):
        failure.raiseException()
    if failure.check(BrokenPipeError):
        # The reader of our output went away (``tcplab echo | head``): end quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(int(ExitCode.BROKEN_PIPE))
    if failure.check(KeyboardInterrupt):
        _message("tcplab: interrupted")
        raise SystemExit(int(ExitCode.INTERRUPTED))
    _message(f"tcplab: unexpected error: {failure.type.__name__}: {failure.getErrorMessage()}")
    raise SystemExit(int(ExitCode.FAILURE))


def _message(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def _fail(line: str, code: int) -> NoReturn:
    _message(line)
    sys.exit(int(code))
