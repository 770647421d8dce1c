"""Which file names tcplab-file accepts, and the names it stores them under (docs/PROTOCOL.md, "Names").

Checked before anything is created: one safe name per part, nothing that climbs out of the folder,
nothing that can play tricks on a terminal, nothing that collides with the server's own files.
"""

from __future__ import annotations

import unicodedata

from tcplab.file.wire import ErrorCode, WireError, quoted

#: Longest stored file or folder name, in UTF-8 bytes (the Linux NAME_MAX).
MAX_NAME_BYTES = 255
#: Most path parts (folders + file) in one name.
MAX_PARTS = 64
#: Stored names may not start with this: the server keeps its temp and partial files under it.
RESERVED_PREFIX = ".tcplab-"
#: Characters that reorder how the text around them is shown (Trojan Source, "gpj.exe" tricks).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def checkPart(part: str) -> None:
    """Raise ``WireError(bad-name)`` unless ``part`` is one safe file or folder name."""
    if not part:
        raise WireError(ErrorCode.BAD_NAME, "empty name (or a doubled or trailing '/')")
    if part in (".", ".."):
        raise WireError(ErrorCode.BAD_NAME, f"{part!r} is not a file name")
    if "/" in part:
        raise WireError(ErrorCode.BAD_NAME, f"{quoted(part)} has a '/' (a path separator)")
    if "\\" in part:
        raise WireError(ErrorCode.BAD_NAME, f"{quoted(part)} has a backslash (a path separator on Windows)")
    for ch in part:
        if ch in _BIDI or unicodedata.category(ch) in _BAD_CATEGORIES:
            raise WireError(ErrorCode.BAD_NAME, f"{quoted(part)} has a control character (U+{ord(ch):04X})")


def checkPath(name: str) -> tuple[str, ...]:
    """Split a wire name into its parts (``folder/sub/file``), each checked by ``checkPart``."""
    if name.startswith("/"):
        raise WireError(ErrorCode.BAD_NAME, f"{quoted(name)} is an absolute path: send a relative name")
    parts = tuple(name.split("/"))
    if len(parts) > MAX_PARTS:
        raise WireError(ErrorCode.BAD_NAME, f"more than {MAX_PARTS} folders deep")
    for part in parts:
        checkPart(part)
    return parts


def storedParts(parts: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """The stored path: ``prefix`` on the first part, every part within ``MAX_NAME_BYTES``.

    The server's temp and partial files have names of their own (fixed length,
    see ``RESERVED_PREFIX``), so no temp suffix has to fit into a stored name.
    """
    stored = (prefix + parts[0], *parts[1:])
    if prefix:
        checkPart(stored[0])  # the prefix is checked at startup; this keeps any prefix inside the folder
    for part in stored:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise WireError(ErrorCode.BAD_NAME, f"{quoted(part[:40])}... is longer than {MAX_NAME_BYTES} bytes")
        if part.startswith(RESERVED_PREFIX):
            raise WireError(ErrorCode.BAD_NAME, f"names starting with {RESERVED_PREFIX!r} are the server's own")
    return stored
