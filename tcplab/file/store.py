"""Where tcplab-file puts bytes: a folder, held open by a directory descriptor.

Every upload streams into a hidden file of the server's own in the top folder,
created exclusively with ``O_NOFOLLOW`` (a random ``.tcplab-<hex>.tmp``, or for a
client that sends a SHA-256 the resumable ``.tcplab-<hash of name and size>.partial``,
locked with ``flock`` while in use). Once the body is complete and verified it is
fsync'ed, hard-linked under its final name (``link`` fails on any existing name,
a planted symlink included, so clashes are detected race-free and a unique
``name (1).ext`` is taken instead), the temp name is removed and the folders are
fsync'ed. Only then does the caller hear of success. (With ``--overwrite`` the
temp is renamed over the old file instead; should the folder fsync fail after
that, the new file stays and the error says so: the old one is gone already.)

Blocking steps (fsync, link, folder fsync, hashing a kept prefix, cleaning) run
through ``runBlocking`` (a thread by default; tests pass a synchronous one).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger

from tcplab.escaping import escapeName
from tcplab.file.names import MAX_NAME_BYTES, RESERVED_PREFIX
from tcplab.file.wire import Clash, ErrorCode
from tcplab.hashing import hashRange

log = Logger(namespace="tcplab.file.store")

T = TypeVar("T")
RunBlocking = Callable[..., "Deferred[Any]"]

TEMP_SUFFIX = ".tmp"
PARTIAL_SUFFIX = ".partial"
#: How many ``name (n).ext`` a clash may try before giving up.
MAX_UNIQUE = 10000
#: Start the kernel's writeback of a body every this many bytes.
WRITEBACK_STEP = 32 << 20
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: Partials whose last writer the store remembers (see HeldPrefix); past it, none is reused.
MAX_TRACKED_PARTIALS = 10000


class StorageError(Exception):
    """Storing failed; ``code`` is the ERR code to reply, the message says why."""

    code = ErrorCode.IO_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSpace(StorageError):
    code = ErrorCode.NO_SPACE


class NameTaken(StorageError):
    """``clash=fail`` and the name is taken: the one case of ``ERR exists``."""

    code = ErrorCode.EXISTS


class PathBlocked(StorageError):
    """A file or symlink sits where the path needs a folder, or a folder where the file
    would go with --overwrite: the name cannot be used (``bad-name``), whatever ``clash=`` says."""

    code = ErrorCode.BAD_NAME


class BadOffset(StorageError):
    code = ErrorCode.BAD_OFFSET


class StoreIOError(StorageError):
    code = ErrorCode.IO_ERROR


def _ioError(e: OSError, doing: str, then: str = "") -> StorageError:
    reason = e.strerror or type(e).__name__
    if e.errno in _NO_SPACE_ERRNOS:
        return NoSpace(f"{doing}: {reason} (the server's disk is full){then}")
    return StoreIOError(f"{doing}: {reason}{then}")


def synchronous(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """A ``runBlocking`` that runs on the calling thread (for tests and tools)."""
    return maybeDeferred(f, *args, **kwargs)


class HeldPrefix:
    """What a STAT found: a partial file's identity, its length and the hash of those bytes.

    A PUT that resumes at ``length`` on the same file reuses the hash instead of reading
    the prefix again, but only if no upload has opened that partial for writing since
    (``mark``): same inode and size alone would let another client's bytes, written from 0
    in between, pass under the hash of the first client's.
    """

    def __init__(self, key: str, st: os.stat_result, hasher: Any, mark: tuple[int, int]) -> None:
        self.key = key
        self.identity = _identity(st)
        self.length = st.st_size
        self.hasher = hasher
        self.mark = mark

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()


class Upload:
    """One body being received into an open temp or partial file; hashes what it writes."""

    def __init__(self, store: FileStore, fd: int, tempName: str, parts: tuple[str, ...], size: int,
                 offset: int, hasher: Any, resumable: bool) -> None:
        self.store = store
        self.fd = fd
        self.tempName = tempName
        self.parts = parts
        self.size = size
        self.offset = offset
        self.position = offset
        self.hasher = hasher
        self.resumable = resumable
        #: What this upload still holds of ``store.reserved``: the bytes it has yet to write
        #: (the free space the file system reports already counts those it wrote).
        self.reserved = size - offset
        self.closed = False
        self._flushed = offset

    @property
    def remaining(self) -> int:
        return self.size - self.position

    def write(self, data: memoryview | bytes) -> None:
        """Hash and write ``data`` (never more than ``remaining``); raise StorageError on failure."""
        self.hasher.update(data)
        view = memoryview(data)
        write = self.store.write
        try:
            while view:
                written = write(self.fd, view)
                view = view[written:]
                self.position += written
        except OSError as e:
            raise _ioError(e, "cannot write") from None
        finally:
            self.store._written(self)
        if self.position - self._flushed >= WRITEBACK_STEP:
            self._startWriteback()

    def _startWriteback(self) -> None:
        """Have the kernel start writing what we wrote so far (and forget the pages already
        written), so the fsync at the end waits for the last few megabytes, not the whole file."""
        start = max(self._flushed - WRITEBACK_STEP, 0)
        try:
            os.posix_fadvise(self.fd, start, self.position - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        self._flushed = self.position

    def sha256(self) -> str:
        return self.hasher.hexdigest()

    def abort(self, keep: bool = False) -> None:
        """Give up: close the file, and remove it unless ``keep`` and it is a resumable partial."""
        if self.closed:
            return
        self.closed = True
        self.store._release(self)
        if not (keep and self.resumable):
            self.store._unlink(self.tempName)
        self.store._close(self.fd)

    def commit(self, clash: Clash | None) -> Deferred[str]:
        """fsync, link under the final name, fsync the folders; fires with the stored path."""
        self.closed = True
        self.store._release(self)
        return self.store.runBlocking(self.store._commit, self, clash)


class FileStore:
    """The ``--dir`` folder and the rules for writing into it."""

    def __init__(self, directory: str, overwrite: bool = False, runBlocking: RunBlocking | None = None,
                 freeSpace: Callable[[int], int] | None = None) -> None:
        self.directory = directory
        self.overwrite = overwrite
        self.runBlocking: RunBlocking = runBlocking or threads.deferToThread
        self.dirFd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        mask = os.umask(0o022)
        os.umask(mask)
        self.fileMode = 0o666 & ~mask
        self.reserved = 0
        #: partial name -> serial of the last upload that opened it for writing (bounded:
        #: when full it is emptied and the epoch moves on, so no old mark can match again).
        self._writers: dict[str, int] = {}
        self._writerSerial = 0
        self._writerEpoch = 0
        # Seams for tests that need a disk to fail at a given step.
        self.write: Callable[[int, Any], int] = os.write
        self.fsync: Callable[[int], None] = os.fsync
        self.link: Callable[..., None] = os.link
        #: The bytes free to an unprivileged user on the file system of the folder ``fd``.
        self.freeSpace: Callable[[int], int] = freeSpace or _statvfsFree

    def close(self) -> None:
        if self.dirFd >= 0:
            os.close(self.dirFd)
            self.dirFd = -1

    # -- space ------------------------------------------------------------------

    def freeBytes(self) -> int:
        return self.freeSpace(self.dirFd)

    def checkSpace(self, needed: int) -> None:
        """Raise NoSpace unless ``needed`` more bytes fit next to the uploads already under way."""
        try:
            free = self.freeBytes() - self.reserved
        except OSError as e:
            raise _ioError(e, "cannot check the free space") from None
        if needed > free:
            raise NoSpace(f"{needed} bytes do not fit: the server has {max(free, 0)} bytes free")

    def _written(self, upload: Upload) -> None:
        """Shrink the upload's reservation to the bytes it has still to write."""
        left = min(upload.reserved, max(upload.size - upload.position, 0))
        self.reserved -= upload.reserved - left
        upload.reserved = left

    def _release(self, upload: Upload) -> None:
        self.reserved -= upload.reserved
        upload.reserved = 0

    # -- starting an upload -----------------------------------------------------

    def partialName(self, parts: tuple[str, ...], size: int) -> str:
        """The deterministic hidden name under which (stored path, size) is kept between attempts."""
        key = hashlib.sha256("\0".join((*parts, str(size))).encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{RESERVED_PREFIX}{key}{PARTIAL_SUFFIX}"

    def begin(self, parts: tuple[str, ...], size: int, offset: int, resumable: bool,
              held: HeldPrefix | None = None) -> Deferred[Upload]:
        """Open the file a body goes into.

        ``offset`` > 0 continues the partial file of (``parts``, ``size``); its first
        ``offset`` bytes are hashed again from disk (in a thread) unless ``held``
        already has them. A partial in use by another transfer cannot be shared:
        then a fresh random temp is used and ``offset`` must be 0.
        """
        needed = size - offset
        try:
            self.checkSpace(needed)
            if resumable:
                opened = self._openPartial(self.partialName(parts, size), create=not offset)
            else:
                opened = None
            if opened is None:
                if offset:
                    raise BadOffset(f"the server holds no free partial copy to resume at {offset}: send from 0")
                fd, name = self._openTemp()
                resumable = False
            else:
                fd, name = opened
        except StorageError as e:
            return fail(e)
        self.reserved += needed
        upload = Upload(self, fd, name, parts, size, offset, hashlib.sha256(), resumable)
        if not resumable:
            return succeed(upload)
        unchanged = offset > 0 and self._unchanged(fd, name, held, offset)
        self._markWriting(name)
        if offset == 0:
            return maybeDeferred(self._truncate, upload).addErrback(self._abandon, upload)
        if unchanged:
            assert held is not None
            upload.hasher = held.hasher.copy()
            return maybeDeferred(self._truncate, upload).addErrback(self._abandon, upload)
        return self.runBlocking(self._resume, upload).addErrback(self._abandon, upload)

    def _abandon(self, failure: Any, upload: Upload) -> Any:
        upload.abort(keep=failure.check(BadOffset) is not None)
        return failure

    def _writerMark(self, name: str) -> tuple[int, int]:
        return self._writerEpoch, self._writers.get(name, 0)

    def _markWriting(self, name: str) -> None:
        """An upload opened the partial ``name`` to write: any hash taken of it before is stale."""
        if name not in self._writers and len(self._writers) >= MAX_TRACKED_PARTIALS:
            self._writers.clear()
            self._writerEpoch += 1
        self._writerSerial += 1
        self._writers[name] = self._writerSerial

    def _unchanged(self, fd: int, name: str, held: HeldPrefix | None, offset: int) -> bool:
        """Whether ``held`` (what a STAT hashed) is still exactly what the partial holds."""
        if held is None or held.key != name or held.length != offset or held.mark != self._writerMark(name):
            return False
        try:
            return _identity(os.fstat(fd)) == held.identity
        except OSError:
            return False

    def _openTemp(self) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(8):
            name = f"{RESERVED_PREFIX}{secrets.token_hex(16)}{TEMP_SUFFIX}"
            try:
                fd = os.open(name, flags, 0o600, dir_fd=self.dirFd)
            except FileExistsError:
                continue
            except OSError as e:
                raise _ioError(e, "cannot create a temporary file") from None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, name
        raise StoreIOError("cannot create a temporary file: every random name was taken")

    def _openPartial(self, name: str, create: bool) -> tuple[int, str] | None:
        """Open and lock the partial ``name``; None when another transfer holds it or it is not ours."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            if not create:
                raise FileExistsError
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.dirFd)
        except FileExistsError:
            try:
                fd = os.open(name, flags, dir_fd=self.dirFd)
            except OSError:
                return None  # a symlink (ELOOP), vanished meanwhile, ...: not resumable
        except OSError as e:
            raise _ioError(e, "cannot create a partial file") from None
        if not self._lockOwned(fd, name):
            os.close(fd)
            return None
        return fd, name

    def _lockOwned(self, fd: int, name: str) -> bool:
        """Lock ``fd``; True when it is a plain file of ours, with one link, still under ``name``."""
        st = self._lockOurs(fd, name)
        return st is not None and st.st_nlink == 1

    def _lockOurs(self, fd: int, name: str) -> os.stat_result | None:
        """Lock ``fd``; its stat when it is a plain file of ours still under ``name``, else None."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            now = os.stat(name, dir_fd=self.dirFd, follow_symlinks=False)
        except OSError:
            return None
        if (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)):
            return st
        return None

    def _truncate(self, upload: Upload) -> Upload:
        try:
            os.ftruncate(upload.fd, upload.offset)
            os.lseek(upload.fd, upload.offset, os.SEEK_SET)
        except OSError as e:
            raise _ioError(e, "cannot prepare the partial file") from None
        return upload

    def _resume(self, upload: Upload) -> Upload:
        """Hash the kept first ``offset`` bytes from disk; the partial must hold at least that many."""
        try:
            length = os.fstat(upload.fd).st_size
            if length < upload.offset:
                raise BadOffset(f"the server holds {length} bytes, not {upload.offset}: send from 0")
            hashRange(upload.fd, upload.offset, upload.hasher)
        except OSError as e:
            raise _ioError(e, "cannot read the partial file") from None
        return self._truncate(upload)

    def exists(self, parts: tuple[str, ...]) -> bool:
        """Whether something already has this stored path (symlinks not followed): lets a
        ``clash=fail`` upload be refused before its body. The commit checks again, race-free.
        Raises PathBlocked when a folder of the path is a file or symlink."""
        fds: list[int] = []
        try:
            parent = self.dirFd
            for part in parts[:-1]:
                try:
                    parent = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     dir_fd=parent)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _notAFolder(part) from None
                    raise
                fds.append(parent)
            os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return False  # the commit will say what is wrong
        finally:
            for fd in fds:
                os.close(fd)

    def held(self, parts: tuple[str, ...], size: int) -> Deferred[HeldPrefix | None]:
        """What the server holds of (``parts``, ``size``): None when nothing (or it is in use)."""
        name = self.partialName(parts, size)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dirFd)
        except OSError:
            return succeed(None)
        if not self._lockOwned(fd, name):
            os.close(fd)
            return succeed(None)
        mark = self._writerMark(name)  # no writer can start while this holds the lock

        def hashIt() -> HeldPrefix | None:
            try:
                st = os.fstat(fd)
                if st.st_size > size:
                    return None
                hasher = hashlib.sha256()
                hashRange(fd, st.st_size, hasher)
                return HeldPrefix(name, st, hasher, mark)
            except OSError:
                return None
            finally:
                os.close(fd)

        return self.runBlocking(hashIt)

    # -- finishing --------------------------------------------------------------

    def _commit(self, upload: Upload, clash: Clash | None) -> str:
        """(Blocking.) Make the verified temp durable under a final name; return that path."""
        created: list[tuple[int, str]] = []
        dirFds: list[int] = []
        linked: tuple[int, str] | None = None
        tempGone = False
        try:
            try:
                self.fsync(upload.fd)
                os.fchmod(upload.fd, self.fileMode)
            except OSError as e:
                raise _ioError(e, "cannot flush the file to disk") from None
            target = self.dirFd
            for part in upload.parts[:-1]:
                target = self._openFolder(target, part, created)
                dirFds.append(target)
            final, replaced = self._place(upload, target, upload.parts[-1], clash)
            tempGone = True
            stored = "/".join((*upload.parts[:-1], final))
            if not replaced:
                linked = (target, final)
            try:
                for fd in {target, self.dirFd, *(parent for parent, _ in created)}:
                    self.fsync(fd)
            except OSError as e:
                if replaced:
                    # The old file is gone already: removing the new one would lose both.
                    raise _ioError(e, f"{escapeName(stored)} was written over the old file, but the folder "
                                      "could not be flushed to disk", "; it may be lost in a crash: send it again"
                                   ) from None
                raise _ioError(e, "cannot flush the folder to disk") from None
            linked = None
            return stored
        except BaseException:
            if linked is not None:
                _quietly(os.unlink, linked[1], dir_fd=linked[0])
            if not tempGone:
                # Once placed, the temp name is free: a partial of that name may be another upload's by now.
                _quietly(os.unlink, upload.tempName, dir_fd=self.dirFd)
            raise
        finally:
            for fd in dirFds:
                _quietly(os.close, fd)
            _quietly(os.close, upload.fd)

    def _openFolder(self, parent: int, name: str, created: list[tuple[int, str]]) -> int:
        try:
            os.mkdir(name, 0o777, dir_fd=parent)
            created.append((parent, name))
        except FileExistsError:
            pass
        except OSError as e:
            raise _ioError(e, f"cannot create the folder {escapeName(name)}") from None
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _notAFolder(name) from None
            raise _ioError(e, f"cannot open the folder {escapeName(name)}") from None

    def _place(self, upload: Upload, target: int, name: str, clash: Clash | None) -> tuple[str, bool]:
        """Put the temp file under ``name`` (or a free ``name (n).ext``); return the name used,
        and whether it replaced what was there (--overwrite)."""
        if clash is None and self.overwrite:
            try:
                os.replace(upload.tempName, name, src_dir_fd=self.dirFd, dst_dir_fd=target)
            except OSError as e:
                if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise PathBlocked(f"{escapeName(name)} is a folder on the server, which --overwrite does not "
                                      "replace: send under another name") from None
                raise _ioError(e, "cannot rename the file into place") from None
            return name, True
        for n in range(MAX_UNIQUE):
            candidate = uniqueName(name, n)
            try:
                self.link(upload.tempName, candidate, src_dir_fd=self.dirFd, dst_dir_fd=target,
                          follow_symlinks=False)
            except FileExistsError:
                if clash is Clash.FAIL:
                    raise NameTaken(f"{escapeName(name)} already exists on the server") from None
                continue
            except OSError as e:
                raise _ioError(e, "cannot link the file into place") from None
            try:
                os.unlink(upload.tempName, dir_fd=self.dirFd)
            except OSError as e:
                _quietly(os.unlink, candidate, dir_fd=target)
                raise _ioError(e, "cannot remove the temporary name") from None
            return candidate, False
        raise NameTaken(f"{escapeName(name)} and {MAX_UNIQUE} numbered variants already exist")

    # -- housekeeping -----------------------------------------------------------

    def cleanStale(self, maxAge: float, now: float | None = None) -> int:
        """(Blocking.) Remove temp and partial files untouched for ``maxAge`` seconds and not in use.

        One with more than one link, whatever its age, is what a crash between the ``link`` and
        the ``unlink`` of a commit leaves: the file is already stored under its final name (it
        was verified and fsync'ed first), so only the hidden name goes; a live commit holds the
        lock and is left alone.
        """
        now = time.time() if now is None else now
        removed = 0
        with os.scandir(self.dirFd) as entries:
            for entry in entries:
                name = entry.name
                if not name.startswith(RESERVED_PREFIX) or not name.endswith((TEMP_SUFFIX, PARTIAL_SUFFIX)):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or (now - st.st_mtime < maxAge and st.st_nlink == 1):
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dirFd)
                except OSError:
                    continue
                try:
                    locked = self._lockOurs(fd, name)
                    if locked is not None and (locked.st_nlink > 1 or now - locked.st_mtime >= maxAge):
                        os.unlink(name, dir_fd=self.dirFd)
                        removed += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
        return removed

    def _unlink(self, name: str) -> None:
        _quietly(os.unlink, name, dir_fd=self.dirFd)

    def _close(self, fd: int) -> None:
        _quietly(os.close, fd)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Which file, how long, last changed when: a partial written by anything else differs."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _statvfsFree(fd: int) -> int:
    st = os.statvfs(fd)
    return st.f_bavail * st.f_frsize


def uniqueName(name: str, n: int) -> str:
    """``name`` for n == 0, else ``stem (n).ext``, shortened to fit ``MAX_NAME_BYTES``."""
    if n == 0:
        return name
    stem, ext = os.path.splitext(name)
    tag = f" ({n})"
    while len((stem + tag + ext).encode("utf-8")) > MAX_NAME_BYTES:
        if stem:
            stem = stem[:-1]
        else:
            ext = ext[:-1]
    return stem + tag + ext


def _notAFolder(name: str) -> PathBlocked:
    return PathBlocked(f"{escapeName(name)} is a file or symlink on the server, not a folder: "
                       "send under another name")


def _quietly(f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        f(*args, **kwargs)
    except OSError:
        pass

