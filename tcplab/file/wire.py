"""The tcplab-file wire format: request lines, trailers and replies (docs/PROTOCOL.md).

Pure functions and frozen dataclasses, no network I/O: the server and the client
both parse and format through here, so the two cannot drift apart. (``loadToken``
reads the shared token the same way for both: a file, or ``$TCPLAB_TOKEN``.)

A request is one UTF-8 line of at most ``MAX_HEADER`` bytes (LF included)::

    PUT [key=value ...] <size> <name>      then exactly <size - offset> bytes of body
    STAT [token=<t>] <size> <name>         answered by HAVE <offset> <sha256>

and every PUT gets one reply line, ``OK <size> <sha256> <stored-name>`` or
``ERR <code> <message>``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from tcplab.escaping import escapeName, safeText, unescapeName

#: A request line, LF included, is at most this long.
MAX_HEADER = 4096
#: The ``SHA256 <hex>`` trailer line, LF included, is at most this long.
MAX_TRAILER = 128
#: A reply line the client accepts, LF included.
MAX_REPLY = 8192
#: Largest size the protocol accepts (what a signed 64-bit file offset can hold).
MAX_SIZE = 2**63 - 1
MAX_TOKEN = 1024
#: Where the token comes from when no token file is given.
TOKEN_ENV = "TCPLAB_TOKEN"
#: SHA-256 of no bytes: what ``HAVE 0`` carries.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")


class ErrorCode(str, Enum):
    """The stable codes of ``ERR`` replies (the client maps them to exit statuses)."""

    BAD_HEADER = "bad-header"
    HEADER_TOO_LONG = "header-too-long"
    BAD_NAME = "bad-name"
    TOO_LARGE = "too-large"
    NO_SPACE = "no-space"
    BAD_TOKEN = "bad-token"
    EXISTS = "exists"
    CHECKSUM_MISMATCH = "checksum-mismatch"
    SHORT_BODY = "short-body"
    BAD_OFFSET = "bad-offset"
    IO_ERROR = "io-error"
    TOO_MANY_FILES = "too-many-files"
    TIMEOUT = "timeout"
    TOO_MANY_CONNECTIONS = "too-many-connections"

    def __str__(self) -> str:
        return self.value


class Clash(str, Enum):
    """What a PUT asks the server to do when the stored name is taken."""

    RENAME = "rename"
    FAIL = "fail"


class WireError(Exception):
    """A request or reply that does not follow the protocol; ``code`` is what to reply."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Put:
    """``PUT``: store ``size`` bytes under ``name``; the body is bytes ``offset..size-1``."""

    size: int
    name: str
    sha256: str | None = None
    trailer: bool = False
    offset: int = 0
    token: str | None = None
    clash: Clash | None = None

    @property
    def hashed(self) -> bool:
        """The client vouches for the content (up front or in a trailer), so it may resume."""
        return self.trailer or self.sha256 is not None

    @property
    def bodySize(self) -> int:
        return self.size - self.offset


@dataclass(frozen=True)
class Stat:
    """``STAT``: how much of (``name``, ``size``) does the server already hold?"""

    size: int
    name: str
    token: str | None = None


@dataclass(frozen=True)
class Ok:
    """The file is stored and verified; ``name`` is the stored path, unescaped."""

    size: int
    sha256: str
    name: str


@dataclass(frozen=True)
class Err:
    code: str
    message: str


@dataclass(frozen=True)
class Have:
    """The server holds the first ``offset`` bytes, whose SHA-256 is ``sha256``."""

    offset: int
    sha256: str


Request = Put | Stat
Reply = Ok | Err | Have


def _decode(line: bytes) -> str:
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(ErrorCode.BAD_HEADER, "the request line is not UTF-8") from None


def _number(text: str, what: str) -> int:
    if not _DIGITS.match(text):
        raise WireError(ErrorCode.BAD_HEADER, f"{what} must be a whole number of bytes, not {quoted(text)}")
    return int(text)


def parseRequest(line: bytes) -> Request:
    """Parse one request line (without its LF; a trailing CR is dropped).

    Checks the syntax only: the name still has to pass ``checkPath``.
    """
    text = _decode(line)
    verb, sep, rest = text.partition(" ")
    if verb not in ("PUT", "STAT"):
        raise WireError(ErrorCode.BAD_HEADER, f"unknown request {quoted(verb[:20])}: expected PUT or STAT")
    if not sep:
        raise WireError(ErrorCode.BAD_HEADER, f"{verb} needs a size and a name")
    options: dict[str, str] = {}
    while True:
        token, sep, after = rest.partition(" ")
        if "=" not in token:
            break
        key, _, value = token.partition("=")
        if key in options:
            raise WireError(ErrorCode.BAD_HEADER, f"option {quoted(key)} given twice")
        options[key] = value
        if not sep:
            raise WireError(ErrorCode.BAD_HEADER, f"{verb} needs a size and a name after its options")
        rest = after
    if not token:
        raise WireError(ErrorCode.BAD_HEADER, "fields must be separated by one space")
    if not sep:
        raise WireError(ErrorCode.BAD_HEADER, f"{verb} needs a name after the size")
    size = _number(token, "the size")
    if size > MAX_SIZE:
        raise WireError(ErrorCode.TOO_LARGE, f"{size} bytes is more than any file can hold")
    name = after
    token_ = options.pop("token", None)
    if token_ is not None and not 0 < len(token_) <= MAX_TOKEN:
        raise WireError(ErrorCode.BAD_HEADER, f"token= must be 1 to {MAX_TOKEN} characters")
    if verb == "STAT":
        if options:
            raise WireError(ErrorCode.BAD_HEADER, f"unknown STAT option {quoted(sorted(options)[0])}")
        return Stat(size, name, token_)
    return _put(size, name, token_, options)


def _put(size: int, name: str, token: str | None, options: dict[str, str]) -> Put:
    sha256: str | None = None
    trailer = False
    value = options.pop("sha256", None)
    if value == "trailer":
        trailer = True
    elif value is not None:
        if not _HEX64.match(value):
            raise WireError(ErrorCode.BAD_HEADER, "sha256= must be 64 hex digits or 'trailer'")
        sha256 = value.lower()
    offset = 0
    value = options.pop("offset", None)
    if value is not None:
        offset = _number(value, "offset=")
        if offset > size:
            raise WireError(ErrorCode.BAD_HEADER, f"offset={offset} is beyond the size {size}")
        if offset and sha256 is None and not trailer:
            raise WireError(ErrorCode.BAD_HEADER, "offset= needs sha256= (a resumed file must be verified)")
    clash: Clash | None = None
    value = options.pop("clash", None)
    if value is not None:
        try:
            clash = Clash(value)
        except ValueError:
            raise WireError(ErrorCode.BAD_HEADER, "clash= must be 'rename' or 'fail'") from None
    if options:
        raise WireError(ErrorCode.BAD_HEADER, f"unknown PUT option {quoted(sorted(options)[0])}")
    return Put(size, name, sha256, trailer, offset, token, clash)


def parseTrailer(line: bytes) -> str:
    """Parse ``SHA256 <64 hex>`` (without LF) into a lowercase hex digest."""
    text = _decode(line)
    word, _, value = text.partition(" ")
    if word != "SHA256" or not _HEX64.match(value):
        raise WireError(ErrorCode.BAD_HEADER, "expected the trailer line 'SHA256 <64 hex digits>'")
    return value.lower()


def formatPut(size: int, name: str, *, sha256: str | None = None, trailer: bool = False, offset: int = 0,
              token: str | None = None, clash: Clash | None = None) -> bytes:
    """The PUT request line, LF included."""
    fields = ["PUT"]
    if trailer:
        fields.append("sha256=trailer")
    elif sha256 is not None:
        fields.append(f"sha256={sha256}")
    if offset:
        fields.append(f"offset={offset}")
    if token is not None:
        fields.append(f"token={token}")
    if clash is not None:
        fields.append(f"clash={clash.value}")
    return _line(" ".join([*fields, str(size), name]))


def formatStat(size: int, name: str, token: str | None = None) -> bytes:
    fields = ["STAT"] + ([f"token={token}"] if token is not None else [])
    return _line(" ".join([*fields, str(size), name]))


def formatTrailer(sha256: str) -> bytes:
    return f"SHA256 {sha256}\n".encode("ascii")


def formatOk(size: int, sha256: str, storedName: str) -> bytes:
    return _line(f"OK {size} {sha256} {escapeName(storedName)}")


def formatErr(code: ErrorCode | str, message: str) -> bytes:
    message = " ".join(safeText(message).split())[:300] or str(code)
    return _line(f"ERR {code} {message}")


def formatHave(offset: int, sha256: str) -> bytes:
    return f"HAVE {offset} {sha256}\n".encode("ascii")


def _line(text: str) -> bytes:
    try:
        data = text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        raise WireError(ErrorCode.BAD_NAME, "the line cannot be written as UTF-8") from None
    if b"\n" in data[:-1] or len(data) > MAX_HEADER:
        raise WireError(ErrorCode.BAD_HEADER, "the line is too long or has a line break in it")
    return data


def parseReply(line: bytes) -> Reply:
    """Parse a reply line from the server (without LF). Whatever a server sends
    stays a plain value: names are unescaped here and must be escaped to be shown."""
    text = line.decode("utf-8", "replace")
    if text.endswith("\r"):
        text = text[:-1]
    word, _, rest = text.partition(" ")
    try:
        if word == "OK":
            size, sha256, name = rest.split(" ", 2)
            if _DIGITS.match(size) and _HEX64.match(sha256):
                return Ok(int(size), sha256.lower(), unescapeName(name))
        elif word == "HAVE":
            offset, sha256 = rest.split(" ")
            if _DIGITS.match(offset) and _HEX64.match(sha256):
                return Have(int(offset), sha256.lower())
        elif word == "ERR":
            code, _, message = rest.partition(" ")
            if code:
                return Err(code, message)
    except ValueError:
        pass
    raise WireError("bad-reply", f"the server sent an unexpected line: {quoted(text[:80])}")


def quoted(text: str) -> str:
    """``text`` escaped and in single quotes: how a message names what the client sent."""
    return f"'{escapeName(text)}'"


def checkToken(text: str) -> str:
    """The token as sent in ``token=``: surrounding whitespace dropped, no spaces or controls inside."""
    token = text.strip()
    if not token:
        raise ValueError("the token is empty")
    if len(token) > MAX_TOKEN:
        raise ValueError(f"the token is longer than {MAX_TOKEN} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("the token may not contain spaces or control characters")
    return token


class TokenError(ValueError):
    """The token file cannot be read or holds no usable token (one line, naming its source)."""


def loadToken(path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The shared token from the file ``path``, else from ``$TCPLAB_TOKEN``, else None.

    The server and the client read it alike, so a token file that works for one works
    for the other; each turns ``TokenError`` into its own kind of error. An empty path
    or a set-but-empty ``$TCPLAB_TOKEN`` (an unset variable in a unit file or script)
    is an error, never "no token": a server must not open up by accident.
    """
    if path == "":
        raise TokenError("--token-file is empty: give the path of the file that holds the token")
    if path:
        source = f"--token-file {quoted(path)}"
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 16)
        except OSError as e:
            raise TokenError(f"cannot read {source}: {e.strerror or type(e).__name__}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError(f"{source} is not UTF-8 text") from None
    elif TOKEN_ENV in environ:
        source, text = f"${TOKEN_ENV}", environ[TOKEN_ENV]
        if not text:
            raise TokenError(f"${TOKEN_ENV} is set but empty: set it to the token, or unset it for no token")
    else:
        return None
    try:
        return checkToken(text)
    except ValueError as e:
        raise TokenError(f"{source}: {e}") from None
