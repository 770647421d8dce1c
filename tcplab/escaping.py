"""The one escaping policy for everything tcplab shows to a person.

Chat lines, peer names, paths in logs and file names in client output all go
through here, so what one terminal is protected from, every terminal is.

**The unsafe set** is one rule: a character is unsafe when ``str.isprintable()``
says it is not printable, except the tab; the backslash is unsafe too, so that
every escape can be undone. ``isprintable()`` is False for whole Unicode
categories, which is what makes the set complete rather than a list to keep up:

* Cc: C0 controls (ESC, CR, LF, BEL, NUL, ...), DEL and the C1 controls;
* Cf: every bidi control (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069)
  and every invisible format character (U+00AD, U+200B-U+200D, U+2060-U+2064,
  U+FEFF, tag characters, ...);
* Zl, Zp: U+2028 and U+2029; Zs other than the space (U+00A0, U+3000, ...);
* Cs: undecodable bytes (they decode to U+DC80-U+DCFF with ``surrogateescape``);
* Co, Cn: private-use and unassigned code points (this Python does not know
  what they look like; an emoji newer than its Unicode tables is escaped too,
  reversibly).

It stays fast on the hub's hot path: plain ASCII is checked by one regular
expression on the bytes (no decoding, the same object back); other text is
decoded and checked whole by ``isprintable()``, which runs in C (still the same
object back when it is safe); only a line that really holds something unsafe is
rewritten, run by run. (Measured against the old list-based escaper: the same
for ASCII, faster for printable non-ASCII, about twice as slow, ~5 us, for a
line full of controls, which is rare.)

**Spellings.** ``escapeLine``/``escapeText`` (chat, logs, peer names) write a
control or an undecodable byte as ``\\xHH`` (the byte), any other unsafe
character as ``\\uHHHH`` (``\\UHHHHHHHH`` above U+FFFF) and ``\\`` as ``\\\\``.
``escapeName`` is the same set in the file protocol's spelling, where
``\\xHH`` is the code point U+00HH (a wire format, kept as it was so clients
and servers of different versions read each other's names); names escape the
tab as well, as a name is one field.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Bytes that are certainly safe as they are (tab and printable ASCII except the backslash):
#: a line made only of these is passed on without decoding it.
_NEEDS_A_LOOK = re.compile(rb"[^\t\x20-\x5b\x5d-\x7e]")
#: Runs of characters that may be unsafe, once decoded.
_MAYBE_UNSAFE = re.compile(r"[^\t\x20-\x5b\x5d-\x7e]+")
#: In names the tab is escaped too, so it starts a run as well.
_MAYBE_UNSAFE_NAMES = re.compile(r"[^\x20-\x5b\x5d-\x7e]+")

#: For ``showable``: tab, LF and the backslash are kept, so only these need a look.
_SHOW_NEEDS_A_LOOK = re.compile(rb"[^\t\n\x20-\x7e]")
_SHOW_MAYBE_UNSAFE = re.compile(r"[^\t\n\x20-\x7e]+")

_UNESCAPE_BYTES = re.compile(rb"\\(?:\\|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")
_UNESCAPE_TEXT = re.compile(r"\\(?:\\|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")
_UNESCAPE_CODE_POINTS = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def isUnsafe(ch: str) -> bool:
    """True for a character that is escaped before a person sees it (the module's one rule)."""
    return ch == "\\" or (ch != "\t" and not ch.isprintable())


def _spellByte(ch: str) -> str:
    """The chat spelling: a control or undecodable byte as ``\\xHH``, others as ``\\u``/``\\U``."""
    code = ord(ch)
    if code == 0x5C:
        return "\\\\"
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _spellCodePoint(ch: str) -> str:
    """The file protocol's spelling: ``\\xHH`` is the code point U+00HH."""
    code = ord(ch)
    if code == 0x5C:
        return "\\\\"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escapeRuns(text: str, runs: re.Pattern[str], spell: Callable[[str], str], keep: str, backslash: bool) -> str:
    """``text`` with every unsafe character ``spell``-ed, looking only at the ``runs`` that may hold one."""

    def run(match: re.Match[str]) -> str:
        chunk = match.group()
        if chunk.isprintable() and not (backslash and "\\" in chunk):
            return chunk
        return "".join(
            spell(ch) if (ch == "\\" and backslash) or not (ch.isprintable() or ch in keep) else ch
            for ch in chunk
        )

    return runs.sub(run, text)


def escapeLine(line: bytes) -> bytes:
    """``line`` (without its line end) made safe to show in a terminal, reversibly.

    Valid UTF-8 text that is printable stays as it is (a line of plain ASCII is
    returned as the same object); ``\\`` becomes ``\\\\``; a control byte or an
    invalid byte becomes ``\\xHH``; any other unsafe character becomes
    ``\\uHHHH``. :func:`unescapeLine` gives the original bytes back.
    """
    if _NEEDS_A_LOOK.search(line) is None:
        return line
    text = line.decode("utf-8", "surrogateescape")
    if "\\" not in text and text.replace("\t", " ").isprintable():
        return line
    return _escapeRuns(text, _MAYBE_UNSAFE, _spellByte, "\t", True).encode("utf-8")


def unescapeLine(escaped: bytes) -> bytes:
    """The bytes a client sent, from their :func:`escapeLine` form (the TEXT of ``<NAME> TEXT``)."""

    def replace(match: re.Match[bytes]) -> bytes:
        byte, code, wide = match.groups()
        if byte is not None:
            return bytes([int(byte, 16)])
        if code is not None or wide is not None:
            value = int(code if code is not None else wide, 16)
            if value > 0x10FFFF:
                return match.group()
            return chr(value).encode("utf-8", "surrogatepass")
        return b"\\"

    return _UNESCAPE_BYTES.sub(replace, escaped)


def escapeText(text: str) -> str:
    """``text`` (a peer name, a path, ``surrogateescape``-decoded bytes) escaped as :func:`escapeLine` does.

    For text that came from bytes, ``escapeText(b.decode("utf-8", "surrogateescape"))``
    equals ``escapeLine(b).decode()``; :func:`unescapeText` undoes it for any str.
    """
    if "\\" not in text and text.replace("\t", " ").isprintable():
        return text
    return _escapeRuns(text, _MAYBE_UNSAFE, _spellByte, "\t", True)


def unescapeText(escaped: str) -> str:
    """Undo :func:`escapeText` (``\\xHH`` of 0x80 and above is the undecodable byte, as ``surrogateescape``)."""
    if "\\" not in escaped:
        return escaped

    def replace(match: re.Match[str]) -> str:
        byte, code, wide = match.groups()
        if byte is not None:
            value = int(byte, 16)
            return chr(value) if value < 0x80 else chr(0xDC00 + value)
        if code is not None or wide is not None:
            value = int(code if code is not None else wide, 16)
            return chr(value) if value <= 0x10FFFF else match.group()
        return "\\"

    return _UNESCAPE_TEXT.sub(replace, escaped)


def showable(data: bytes) -> bytes:
    """What a server sent, safe to write raw to a terminal: for a client printing it.

    The same unsafe set as :func:`escapeLine`, in the same spelling, except that
    LF and tab stay (the data is many lines) and backslashes stay as they are
    (the hub's lines are already escaped and must not be escaped twice). There is
    no ESC, CR, bidi control or invisible character left in what comes back; it
    is for showing only, not reversible.
    """
    if _SHOW_NEEDS_A_LOOK.search(data) is None:
        return data
    text = data.decode("utf-8", "surrogateescape")
    if text.replace("\t", " ").replace("\n", " ").isprintable():
        return data
    return _escapeRuns(text, _SHOW_MAYBE_UNSAFE, _spellByte, "\t\n", False).encode("utf-8")


def escapeName(text: str) -> str:
    """A file name on one terminal line, reversibly, in the file protocol's spelling
    (``\\xHH`` = U+00HH): the same unsafe set, and the tab as well (a name is one field)."""
    return _escapeName(text, backslash=True)


def safeText(text: str) -> str:
    """Like :func:`escapeName`, but backslashes stay: for messages, which may already quote
    escaped names and are only ever shown, never parsed back."""
    return _escapeName(text, backslash=False)


def _escapeName(text: str, backslash: bool) -> str:
    if text.isprintable() and not (backslash and "\\" in text):
        return text
    return _escapeRuns(text, _MAYBE_UNSAFE_NAMES, _spellCodePoint, "", backslash)


def unescapeName(text: str) -> str:
    """Undo :func:`escapeName` (anything that is not one of its escapes stays as it is)."""
    if "\\" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        body = match.group(1)
        if body == "\\":
            return "\\"
        value = int(body[1:], 16)
        return chr(value) if value <= 0x10FFFF else match.group()

    return _UNESCAPE_CODE_POINTS.sub(one, text)
