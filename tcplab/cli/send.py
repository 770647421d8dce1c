"""``tcplab send``: upload files to a tcplab-file server, verified (Task 3 client)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tcplab.cli.common import ClientOptions, connect
from tcplab.errors import (
    AlreadyExists,
    ConnectionLostError,
    LocalFileError,
    RefusedByServer,
    TcplabError,
    TimedOut,
    UsageProblem,
    VerificationFailed,
)
from tcplab.escaping import escapeName
from tcplab.file.sender import CHUNK_SIZE, ServerBusy, Uploader, UploadProtocol
from tcplab.file.wire import TOKEN_ENV, Clash, TokenError, loadToken
from tcplab.interfaces import IReactor


class Options(ClientOptions):
    command = "send"
    synopsis = ("FILE... [-r] [--host H] [--port P] [--connect ENDPOINT] [--tls] [--ca PEM] [--token-file F] "
                "[--resume] [--quiet] [--no-rename] [--timeout S]")
    description = (
        "Send each FILE (with -r, folders too, relative paths kept) to a tcplab-file server, which stores "
        "it verified by SHA-256; print the name it was stored under. Exit 0 only when every file is stored: "
        "2 usage, 3 cannot connect, 4 connection lost, 5 timed out, 6 local file problem, 7 refused by the "
        f"server, 8 already exists (--no-rename), 9 verification failed, 130 interrupted. The token can also "
        f"come from ${TOKEN_ENV}."
    )
    defaultPort = 9000
    operands = "files"
    operandName = "FILE"
    operandHelp = "Files to send (folders with -r)."

    @classmethod
    def addArguments(cls, parser: argparse.ArgumentParser) -> None:
        super().addArguments(parser)
        parser.add_argument("-r", "--recursive", action="store_true",
                            help="Send folders and everything in them (default: off).")
        parser.add_argument("--resume", action="store_true",
                            help="Continue interrupted uploads from what the server already holds (default: off).")
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="No progress bar; stored names are still printed (default: off).")
        parser.add_argument("--no-rename", dest="no-rename", action="store_true",
                            help="Fail (exit 8) instead of storing under a new name when the name is taken "
                                 "(default: off).")
        parser.add_argument("--token-file", dest="token-file", default=None, metavar="F",
                            help=f"Send the token in this file (default: ${TOKEN_ENV}).")

    def postOptions(self) -> None:
        if not self["files"]:
            raise UsageProblem("name at least one FILE to send")
        super().postOptions()
        try:
            self["token"] = loadToken(self["token-file"])
        except TokenError as e:
            raise UsageProblem(str(e)) from None  # a bad option value, like an unreadable --ca


@dataclass(frozen=True)
class Item:
    """A local file and the name it is sent under; ``identity`` (device, inode) is the file a
    folder walk found, which the file opened at send time must still be."""

    path: str
    name: str
    size: int
    identity: tuple[int, int] | None = None


Warn = Callable[[str], None]


def _ignore(text: str) -> None:
    pass


def collectFiles(paths: list[str], recursive: bool, warn: Warn = _ignore) -> list[Item | LocalFileError]:
    """The files to send, in order, checked before connecting. A path that cannot be sent is a
    LocalFileError in its place, so the others still go; inside a folder, what is not a file to
    send (a symlink, fifo, socket, device) is skipped with a ``warn`` line, and what cannot be
    read is a LocalFileError too. Paths named here are followed if they are symlinks (the user
    chose them); nothing inside a folder ever is."""
    items: list[Item | LocalFileError] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            items.append(LocalFileError(f"cannot read {escapeName(path)}: {e.strerror}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                items.append(LocalFileError(f"{escapeName(path)} is a folder: use -r to send it and what it holds"))
            else:
                items.extend(_walk(path, warn))
        elif not stat.S_ISREG(st.st_mode):
            items.append(LocalFileError(f"{escapeName(path)} is not a regular file"))
        elif not os.access(path, os.R_OK):
            items.append(LocalFileError(f"cannot read {escapeName(path)}: Permission denied"))
        else:
            items.append(_item(path, os.path.basename(os.path.abspath(path)), st))
    return items


def _item(path: str, name: str, st: os.stat_result, identity: tuple[int, int] | None = None) -> Item | LocalFileError:
    try:
        return Item(path, wireName(path, name), st.st_size, identity)
    except LocalFileError as e:
        return e


def _walk(top: str, warn: Warn) -> list[Item | LocalFileError]:
    """Every regular file under ``top``, depth first in name order, never following a symlink
    (``lstat`` only): a link inside a folder could point anywhere, e.g. at ~/.ssh."""
    base = os.path.basename(os.path.abspath(top))
    if not base:
        return [LocalFileError(f"cannot send {escapeName(top)}: name a folder inside it instead")]
    items: list[Item | LocalFileError] = []
    seen: set[tuple[int, int]] = set()  # a bind mount can make a folder its own descendant
    stack: list[tuple[str, list[str]]] = [(top, [base])]
    while stack:
        folder, parts = stack.pop()
        try:
            st = os.lstat(folder)
            if (st.st_dev, st.st_ino) in seen:
                warn(f"tcplab: skipping {escapeName(folder)}: a folder already being sent")
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as e:
            items.append(LocalFileError(f"cannot read the folder {escapeName(folder)}: {e.strerror}"))
            continue
        folders = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                items.append(LocalFileError(f"cannot read {escapeName(path)}: {e.strerror}"))
                continue
            if stat.S_ISLNK(st.st_mode):
                warn(f"tcplab: skipping {escapeName(path)}: a symlink (symlinks in a folder are never followed)")
            elif stat.S_ISDIR(st.st_mode):
                folders.append((path, [*parts, entry.name]))
            elif not stat.S_ISREG(st.st_mode):
                warn(f"tcplab: skipping {escapeName(path)}: not a regular file")
            elif not os.access(path, os.R_OK):
                items.append(LocalFileError(f"cannot read {escapeName(path)}: Permission denied"))
            else:
                items.append(_item(path, "/".join([*parts, entry.name]), st, (st.st_dev, st.st_ino)))
        sendable = []
        for path, subparts in folders:
            try:
                wireName(path, "/".join(subparts))
            except LocalFileError as e:
                items.append(LocalFileError(f"{e} (nothing in it is sent)"))
                continue
            sendable.append((path, subparts))
        stack.extend(reversed(sendable))
    return items


def wireName(path: str, name: str) -> str:
    """``name`` if it can be written on a request line (UTF-8, no line breaks), else LocalFileError."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalFileError(f"cannot send {escapeName(path)}: its name is not valid UTF-8") from None
    if "\n" in name or "\r" in name:
        raise LocalFileError(f"cannot send {escapeName(path)}: its name has a line break in it")
    if not name:
        raise LocalFileError(f"cannot send {escapeName(path)}: it has no file name")
    return name


class Progress:
    """A tqdm bar on stderr (bytes, rate, ETA) when it is a terminal; lines printed around it."""

    def __init__(self, total: int, enabled: bool, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                            dynamic_ncols=True, miniters=1, mininterval=0.2)

    def file(self, name: str) -> None:
        if self.bar is not None:
            label = escapeName(name)
            self.bar.set_description_str(label if len(label) <= 30 else "…" + label[-29:], refresh=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def line(self, text: str, error: bool = False) -> None:
        stream = sys.stderr if error else self.out
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            stream.flush()
            print(text, file=stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run(reactor: IReactor, options: Options) -> None:
    progress = Progress(0, False)
    items = collectFiles(options["files"], options["recursive"], lambda text: progress.line(text, error=True))
    total = sum(item.size for item in items if isinstance(item, Item))
    progress = Progress(total, not options["quiet"] and sys.stderr.isatty())

    def newConnection() -> Any:
        return connect(reactor, options, UploadProtocol(reactor, options["timeout"], CHUNK_SIZE))

    uploader = Uploader(newConnection, token=options["token"], resume=options["resume"],
                        clash=Clash.FAIL if options["no-rename"] else None)
    first: TcplabError | None = None
    held: TcplabError | None = None  # the latest failure, shown once it is not the only one
    failed = 0

    def showHeld() -> None:
        nonlocal held
        if held is not None:
            progress.line(f"tcplab: {held}", error=True)
            held = None

    try:
        for item in items:
            try:
                if isinstance(item, LocalFileError):
                    raise item
                progress.file(item.name)
                sent = await uploader.send(item.path, item.name, progress.update, item.identity)
            except TcplabError as e:
                showHeld()
                if not _perFile(e):
                    raise
                first, held, failed = first or e, e, failed + 1
                continue
            resumed = f", resumed at {sent.resumedAt}" if sent.resumedAt else ""
            progress.line(f"{escapeName(item.path)} -> {escapeName(sent.stored)} "
                          f"({sent.size} bytes, sha256 {sent.sha256}{resumed})")
    except (ConnectionLostError, TimedOut) as e:
        if not options["resume"]:
            e.message += " (run again with --resume to continue)"
        raise
    finally:
        progress.close()
        await uploader.close()
    if failed == 1 and held is not None:
        raise held
    if first is not None:
        showHeld()
        raise type(first)(f"{failed} of {len(items)} files were not stored (see above)")


def _perFile(error: TcplabError) -> bool:
    """Errors about one file (the others can still go); connection trouble ends the run."""
    if isinstance(error, ServerBusy):
        return False
    return isinstance(error, (LocalFileError, RefusedByServer, AlreadyExists, VerificationFailed))
