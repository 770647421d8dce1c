"""The tcplab-multi line format: terminal-safe escaping, names, commands and server lines.

Everything a client receives from the hub is one of three kinds of line:
its own lines, back exactly as sent; ``<NAME> TEXT`` for another client's line,
where TEXT is escaped (:mod:`tcplab.escaping`) so it cannot move the cursor, clear
a screen, reorder the text around it or start a fake line; and ``* TEXT`` from
the server itself (notices, replies, errors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The chat escaping lives in tcplab.escaping (one policy for everything shown); re-exported here.
from tcplab.escaping import escapeLine as escapeLine
from tcplab.escaping import escapeText as escapeText
from tcplab.escaping import unescapeLine as unescapeLine

#: The longest name ``/nick`` accepts.
MAX_NICK = 32

NICK = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_NICK}}}")

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


HELP = (
    "commands: /nick NAME (1-32 letters, digits, _ - or .), /who, /quit, /help;"
    " start a line with // to send one that begins with /"
)
