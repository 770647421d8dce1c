"""The tcplab-multi line format: terminal-safe escaping, names, commands and server lines.

Everything a client receives from the hub is one of three kinds of line:
its own lines, back exactly as sent; ``<NAME> TEXT`` for another client's line,
where TEXT is escaped so it cannot move the cursor, clear a screen or start a
fake line; and ``* TEXT`` from the server itself (notices, replies, errors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The longest name ``/nick`` accepts.
MAX_NICK = 32

NICK = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_NICK}}}")

#: Bytes that are certainly safe as they are (tab and printable ASCII except the backslash):
#: a line made only of these is passed on without decoding it.
_NEEDS_A_LOOK = re.compile(rb"[^\t\x20-\x5b\x5d-\x7e]")

#: What is escaped once a line is decoded (invalid bytes decode to U+DC80..U+DCFF with
#: surrogateescape): the backslash, C0 controls but tab, DEL, C1 controls, line and paragraph
#: separators, and the bidirectional overrides and isolates that reorder what a terminal shows.
_UNSAFE = re.compile("[\\\\\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\udc80-\udcff]")

_ESCAPE = re.compile(rb"\\(?:\\|x([0-9a-f]{2})|u([0-9a-f]{4}))")


def escapeLine(line: bytes) -> bytes:
    """``line`` (without its line end) made safe to show in a terminal, reversibly.

    Valid UTF-8 text stays as it is; ``\\`` becomes ``\\\\``; a control byte or an
    invalid byte becomes ``\\xHH``; a C1 control, U+2028/U+2029 or a bidi control
    becomes ``\\uHHHH``. :func:`unescapeLine` gives the original bytes back.
    """
    if _NEEDS_A_LOOK.search(line) is None:
        return line
    return _UNSAFE.sub(_escapeCharacter, line.decode("utf-8", "surrogateescape")).encode("utf-8")


def _escapeCharacter(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x5C:
        return "\\\\"
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def unescapeLine(escaped: bytes) -> bytes:
    """The bytes a client sent, from the TEXT of a ``<NAME> TEXT`` line."""

    def replace(match: re.Match[bytes]) -> bytes:
        byte, code = match.group(1), match.group(2)
        if byte is not None:
            return bytes([int(byte, 16)])
        if code is not None:
            return chr(int(code, 16)).encode("utf-8")
        return b"\\"

    return _ESCAPE.sub(replace, escaped)


def escapeText(text: str) -> str:
    """``text`` (a peer name, a path) with the same escaping, for logs and notices."""
    return escapeLine(text.encode("utf-8", "surrogateescape")).decode("utf-8")


def isValidNick(name: str) -> bool:
    return NICK.fullmatch(name) is not None


def prefixFor(name: str) -> bytes:
    """What goes before every line of ``name`` that others receive."""
    return b"<" + name.encode("utf-8") + b"> "


def serverLine(text: str) -> bytes:
    """A line from the server itself: ``* TEXT``."""
    return b"* " + text.encode("utf-8") + b"\n"


@dataclass(frozen=True)
class Command:
    """A line starting with ``/`` (but not ``//``): ``name`` lower-cased, ``argument`` stripped."""

    name: str
    argument: bytes


def parseCommand(text: bytes) -> Command | None:
    """The command in ``text`` (a line without its line end), or None for a line to broadcast."""
    if text[:1] != b"/" or text[:2] == b"//":
        return None
    word, _, argument = text[1:].partition(b" ")
    return Command(word.decode("ascii", "replace").lower(), argument.strip(b" \t"))


def unslash(text: bytes) -> bytes:
    """What others see of a plain line: ``//text`` is sent as ``/text``."""
    return text[1:] if text[:2] == b"//" else text


HELP = (
    "commands: /nick NAME (1-32 letters, digits, _ - or .), /who, /quit, /help;"
    " start a line with // to send one that begins with /"
)
