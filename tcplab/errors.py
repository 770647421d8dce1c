"""What can go wrong for a client, as exceptions that carry their exit code.

The CLI is the one place that turns these into a line on stderr and an exit
status; protocol code only raises or errbacks with them.
"""

from __future__ import annotations

from enum import IntEnum

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.python.failure import Failure


class ExitCode(IntEnum):
    """Exit statuses of the ``tcplab`` command (documented in README)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONNECT = 3
    LOST = 4
    TIMEOUT = 5
    LOCAL_FILE = 6
    REFUSED = 7
    EXISTS = 8
    VERIFY = 9
    INTERRUPTED = 130
    BROKEN_PIPE = 141


class TcplabError(Exception):
    """An error the user should read as one line; ``code`` is the exit status."""

    code = ExitCode.FAILURE
    #: The ERR code of the server reply this error stands for, if any (set by ``tcplab send``).
    serverCode: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageProblem(TcplabError):
    code = ExitCode.USAGE


class ConnectFailed(TcplabError):
    code = ExitCode.CONNECT


class ConnectionLostError(TcplabError):
    code = ExitCode.LOST


class TimedOut(TcplabError):
    code = ExitCode.TIMEOUT


class LocalFileError(TcplabError):
    code = ExitCode.LOCAL_FILE


class RefusedByServer(TcplabError):
    code = ExitCode.REFUSED


class AlreadyExists(TcplabError):
    code = ExitCode.EXISTS


class VerificationFailed(TcplabError):
    code = ExitCode.VERIFY


def connectFailure(failure: Failure, where: str) -> TcplabError:
    """Turn a failed ``endpoint.connect`` into one line that says what to check."""
    if failure.check(TcplabError):
        return failure.value
    if failure.check(ierror.ConnectionRefusedError):
        return ConnectFailed(f"connection to {where} refused: is the server running on that port?")
    if failure.check(ierror.DNSLookupError):
        return ConnectFailed(f"cannot resolve the host of {where}: check the name")
    if failure.check(ierror.TimeoutError, defer.TimeoutError):
        return TimedOut(f"connecting to {where} timed out: is the host reachable?")
    if failure.check(ierror.NoRouteError):
        return ConnectFailed(f"no route to {where}: check the address and network")
    if (tls := tlsFailure(failure, where)) is not None:
        return tls
    return ConnectFailed(f"cannot connect to {where}: {_reason(failure)}")


def tlsFailure(reason: Failure | None, where: str | None = None) -> TcplabError | None:
    """A TLS handshake or verification failure hidden in a lost connection, as one line
    (or the one-line error a connection's stand-in already put there, see tcplab.tlsclient)."""
    if reason is not None and reason.check(TcplabError):
        return reason.value
    try:
        from OpenSSL.SSL import Error as SSLError
    except ImportError:  # pragma: no cover
        return None
    if reason is None or not reason.check(SSLError, ierror.SSLError):
        return None
    detail = _reason(reason)
    errors = reason.value.args[0] if reason.value.args else None
    if isinstance(errors, list) and errors and isinstance(errors[-1], tuple):
        detail = str(errors[-1][-1])
    with_ = f" with {where}" if where else ""
    if "certificate" in detail:
        hint = ": is --ca the CA that signed the server's certificate?"
    else:
        hint = f": is {where or 'the server'} a TLS port? (leave out --tls, or use tcp:, if it is plain TCP)"
    return ConnectFailed(f"TLS handshake failed ({detail}){with_}{hint}")


def _reason(failure: Failure) -> str:
    text = failure.getErrorMessage().strip() or failure.type.__name__
    return " ".join(text.split())


def handshakeTimedOut(seconds: float) -> TimedOut:
    """A TLS handshake that did not finish: said as such, never as a missing echo or reply."""
    return TimedOut(f"the TLS handshake with the server did not finish in {seconds:g}s: "
                    "is it a TLS server, and reachable? (--timeout)")
