"""Storage rules of tcplab-file (tcplab.file.store): temp files, atomic placement, clashes, resume."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcplab import hashing
from tcplab.file import sender as fileclient
from tcplab.file import store as filestore
from tcplab.file.names import MAX_NAME_BYTES
from tcplab.file.store import (
    BadOffset,
    FileStore,
    NameTaken,
    NoSpace,
    PathBlocked,
    StorageError,
    StoreIOError,
    Upload,
    synchronous,
    uniqueName,
)
from tcplab.file.wire import Clash
from tests.support import scratch


def result(d: Any) -> Any:
    """The result of an already-fired Deferred (the store runs synchronously in these tests)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def hidden(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".tcplab-"))


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = scratch(self)
        self.store = self.makeStore()

    def makeStore(self, **kwargs: Any) -> FileStore:
        store = FileStore(self.dir, runBlocking=synchronous, **kwargs)
        self.addCleanup(store.close)
        return store

    def upload(self, parts: tuple[str, ...], data: bytes, clash: Clash | None = None,
               resumable: bool = False, store: FileStore | None = None) -> str:
        store = store or self.store
        upload: Upload = result(store.begin(parts, len(data), 0, resumable))
        upload.write(data)
        self.assertEqual(upload.sha256(), hashlib.sha256(data).hexdigest())
        return result(upload.commit(clash))  # type: ignore[no-any-return]

    def read(self, *parts: str) -> bytes:
        with open(os.path.join(self.dir, *parts), "rb") as f:
            return f.read()


class PlacementTests(StoreTestCase):
    def test_store(self) -> None:
        """A stored file appears under its name with exactly its bytes and no temporary file is left behind."""
        self.assertEqual(self.upload(("received_a.txt",), b"hello"), "received_a.txt")
        self.assertEqual(self.read("received_a.txt"), b"hello")
        self.assertEqual(hidden(self.dir), [])

    def test_modeFollowsUmask(self) -> None:
        """A stored file gets the permissions the umask allows, as any file the user creates would."""
        self.upload(("f",), b"x")
        mask = os.umask(0)
        os.umask(mask)
        self.assertEqual(os.stat(os.path.join(self.dir, "f")).st_mode & 0o777, 0o666 & ~mask)

    def test_tempIsHiddenAndExclusive(self) -> None:
        """While the body streams in, nothing exists under the final name; the temp is private."""
        upload = result(self.store.begin(("final.txt",), 3, 0, False))
        upload.write(b"ab")
        self.assertEqual(os.listdir(self.dir), [upload.tempName])
        self.assertTrue(upload.tempName.startswith(".tcplab-") and upload.tempName.endswith(".tmp"))
        self.assertEqual(os.stat(os.path.join(self.dir, upload.tempName)).st_mode & 0o777, 0o600)
        upload.abort()
        self.assertEqual(os.listdir(self.dir), [])

    def test_clashGetsUniqueName(self) -> None:
        """Each further file of a taken name is stored as "name (1)", "name (2)" and so on, leaving the earlier ones
        as they were."""
        self.assertEqual(self.upload(("received_report.txt",), b"1"), "received_report.txt")
        self.assertEqual(self.upload(("received_report.txt",), b"2"), "received_report (1).txt")
        self.assertEqual(self.upload(("received_report.txt",), b"3"), "received_report (2).txt")
        self.assertEqual(self.read("received_report.txt"), b"1")
        self.assertEqual(self.read("received_report (2).txt"), b"3")

    def test_clashFail(self) -> None:
        """With clash set to fail, a taken name raises NameTaken, keeps the old file and leaves no temporary file."""
        self.upload(("a",), b"1")
        with self.assertRaises(NameTaken):
            self.upload(("a",), b"2", clash=Clash.FAIL)
        self.assertEqual(self.read("a"), b"1")
        self.assertEqual(hidden(self.dir), [])

    def test_symlinkNotFollowed(self) -> None:
        """A symlink planted at the final name is left alone: the file gets another name."""
        victim = os.path.join(scratch(self), "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")
        os.symlink(os.path.abspath(victim), os.path.join(self.dir, "received_x"))
        os.symlink("/nonexistent/dangling", os.path.join(self.dir, "received_x (1)"))
        self.assertEqual(self.upload(("received_x",), b"evil"), "received_x (2)")
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")
        self.assertTrue(os.path.islink(os.path.join(self.dir, "received_x")))

    def test_overwrite(self) -> None:
        """With overwrite on, a file of a taken name replaces the old one under the same name."""
        store = self.makeStore(overwrite=True)
        self.upload(("a",), b"old", store=store)
        self.assertEqual(self.upload(("a",), b"new", store=store), "a")
        self.assertEqual(self.read("a"), b"new")

    def test_overwriteReplacesSymlinkItself(self) -> None:
        """Overwriting a name that is a symlink replaces the link with the file and never writes to the link's
        target."""
        victim = os.path.join(scratch(self), "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")
        os.symlink(os.path.abspath(victim), os.path.join(self.dir, "a"))
        self.upload(("a",), b"new", store=self.makeStore(overwrite=True))
        self.assertFalse(os.path.islink(os.path.join(self.dir, "a")))
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")

    def test_overwriteRespectsClashFail(self) -> None:
        """Even with overwrite on, clash set to fail still refuses a taken name."""
        store = self.makeStore(overwrite=True)
        self.upload(("a",), b"old", store=store)
        with self.assertRaises(NameTaken):
            self.upload(("a",), b"new", clash=Clash.FAIL, store=store)

    def test_overwriteFolderRefused(self) -> None:
        """A folder is not replaced by a file; that is no name clash (exit 8) but a name that cannot be used."""
        os.mkdir(os.path.join(self.dir, "a"))
        with self.assertRaises(PathBlocked) as caught:
            self.upload(("a",), b"new", store=self.makeStore(overwrite=True))
        self.assertEqual(caught.exception.code.value, "bad-name")
        self.assertIn("is a folder", caught.exception.message)
        self.assertEqual(hidden(self.dir), [])

    def test_subfolders(self) -> None:
        """A path stores the file in subfolders created as needed, and a clash there gets a unique name in the same
        folder."""
        self.assertEqual(self.upload(("received_top", "sub", "f.txt"), b"1"), "received_top/sub/f.txt")
        self.assertEqual(self.upload(("received_top", "sub", "f.txt"), b"2"), "received_top/sub/f (1).txt")
        self.assertEqual(self.read("received_top", "sub", "f.txt"), b"1")
        self.assertEqual(hidden(self.dir), [])

    def test_symlinkedFolderNotFollowed(self) -> None:
        """A symlinked folder on the path is refused as PathBlocked and nothing is written where it points."""
        outside = scratch(self)
        os.symlink(os.path.abspath(outside), os.path.join(self.dir, "received_top"))
        with self.assertRaises(PathBlocked):
            self.upload(("received_top", "f.txt"), b"x")
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(hidden(self.dir), [])

    def test_exists(self) -> None:
        """exists() is true for stored files, folders and dangling links, false for missing names, and refuses a path
        through a symlinked folder."""
        self.upload(("received_top", "f.txt"), b"x")
        os.symlink("/etc", os.path.join(self.dir, "link"))
        os.symlink("/nonexistent", os.path.join(self.dir, "dangling"))
        self.assertTrue(self.store.exists(("received_top", "f.txt")))
        self.assertTrue(self.store.exists(("received_top",)))
        self.assertTrue(self.store.exists(("dangling",)))
        with self.assertRaises(PathBlocked, msg="a symlinked folder is in the way"):
            self.store.exists(("link", "passwd"))
        self.assertFalse(self.store.exists(("received_top", "g.txt")))
        self.assertFalse(self.store.exists(("nothing", "g.txt")))

    def test_fileWhereFolderShouldBe(self) -> None:
        """Not ``exists`` (that is for a taken name, exit 8 with --no-rename) but ``bad-name``,
        whatever ``clash=`` says: no new name would help."""
        self.upload(("received_top",), b"x")
        for clash in (None, Clash.FAIL, Clash.RENAME):
            with self.subTest(clash=clash), self.assertRaises(PathBlocked) as caught:
                self.upload(("received_top", "f.txt"), b"y", clash=clash)
            self.assertEqual(caught.exception.code.value, "bad-name")
            self.assertIn("received_top is a file or symlink on the server, not a folder", caught.exception.message)
        with self.assertRaises(PathBlocked):
            self.store.exists(("received_top", "f.txt"))
        self.assertEqual(hidden(self.dir), [])

    def test_uniqueNameFitsLimit(self) -> None:
        """A unique name keeps the extension after the " (n)" and never grows past the file system's name limit, even
        for long multibyte names."""
        self.assertEqual(uniqueName("report.txt", 1), "report (1).txt")
        self.assertEqual(uniqueName(".bashrc", 3), ".bashrc (3)")
        self.assertEqual(uniqueName("archive.tar.gz", 2), "archive.tar (2).gz")
        long = "я" * 120 + ".txt"
        self.assertEqual(len(long.encode()), 244)
        for n in (1, 99, 12345):
            name = uniqueName(long, n)
            self.assertLessEqual(len(name.encode()), MAX_NAME_BYTES)
            self.assertTrue(name.endswith(f" ({n}).txt"))
        self.assertLessEqual(len(uniqueName("a." + "x" * 253, 7).encode()), MAX_NAME_BYTES)

    def test_writebackAlongTheWay(self) -> None:
        """Writeback is started every few megabytes (so the final fsync is short); the bytes stay right."""
        self.patch(filestore, "WRITEBACK_STEP", 1000)
        data = os.urandom(10_000)
        upload = result(self.store.begin(("big",), len(data), 0, False))
        for i in range(0, len(data), 300):
            upload.write(data[i:i + 300])
        self.assertGreater(upload._flushed, 8000)
        result(upload.commit(None))
        self.assertEqual(self.read("big"), data)

    def test_clashAtLongestName(self) -> None:
        """A clash on a name of the longest allowed length still gets a unique name that fits the limit."""
        name = "x" * MAX_NAME_BYTES
        self.upload((name,), b"1")
        stored = self.upload((name,), b"2")
        self.assertEqual(len(stored.encode()), MAX_NAME_BYTES)
        self.assertTrue(stored.endswith(" (1)"))


class FailureTests(StoreTestCase):
    """Write errors at each step become a StorageError, and leave nothing behind."""

    def failing(self, error: int) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise OSError(error, os.strerror(error))

        return fail

    def test_writeError(self) -> None:
        """A disk error while writing is raised with the system's reason in its message, and aborting leaves the
        folder empty."""
        self.store.write = self.failing(errno.EIO)
        upload = result(self.store.begin(("a",), 5, 0, False))
        with self.assertRaises(StoreIOError) as caught:
            upload.write(b"hello")
        self.assertIn("Input/output error", caught.exception.message)
        upload.abort()
        self.assertEqual(os.listdir(self.dir), [])

    def test_diskFullWhileWriting(self) -> None:
        """A full disk while writing is raised as NoSpace."""
        self.store.write = self.failing(errno.ENOSPC)
        upload = result(self.store.begin(("a",), 5, 0, False))
        with self.assertRaises(NoSpace):
            upload.write(b"hello")

    def test_fsyncError(self) -> None:
        """A disk error while syncing the file fails the upload and leaves the folder empty."""
        self.store.fsync = self.failing(errno.EIO)
        with self.assertRaises(StoreIOError):
            self.upload(("a",), b"hello")
        self.assertEqual(os.listdir(self.dir), [])

    def test_linkError(self) -> None:
        """A disk error while linking the file into place fails the upload and leaves the folder empty."""
        self.store.link = self.failing(errno.EIO)
        with self.assertRaises(StoreIOError):
            self.upload(("a",), b"hello")
        self.assertEqual(os.listdir(self.dir), [])

    def test_folderFsyncErrorUndoesTheLink(self) -> None:
        """A disk error while syncing the folder undoes the link, so a file that may not survive a crash is not left
        visible."""
        calls = []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) > 1:
                raise OSError(errno.EIO, "folder fsync failed")

        self.store.fsync = fsync
        with self.assertRaises(StoreIOError):
            self.upload(("a",), b"hello")
        self.assertEqual(os.listdir(self.dir), [])

    def test_folderFsyncErrorAfterOverwriteKeepsTheNewFile(self) -> None:
        """With --overwrite the old file is gone once the rename is done: a failing folder fsync
        after it must not remove the new one too. The error says the file is there, but not safe."""
        store = self.makeStore(overwrite=True)
        self.upload(("a",), b"old", store=store)
        fsyncs = []

        def fsync(fd: int) -> None:
            fsyncs.append(fd)
            if len(fsyncs) > 1:
                raise OSError(errno.EIO, "folder fsync failed")
            os.fsync(fd)

        store.fsync = fsync
        with self.assertRaises(StoreIOError) as caught:
            self.upload(("a",), b"new", store=store)
        self.assertEqual(self.read("a"), b"new")
        self.assertEqual(os.listdir(self.dir), ["a"])
        self.assertIn("a was written over the old file, but the folder could not be flushed to disk",
                      caught.exception.message)
        self.assertIn("send it again", caught.exception.message)

    def test_noSpaceBeforeTheBody(self) -> None:
        """An upload larger than the free space is refused as NoSpace before anything is written."""
        self.store.freeBytes = lambda: 1000  # type: ignore[method-assign]
        with self.assertRaises(NoSpace):
            result(self.store.begin(("a",), 1001, 0, False))
        self.assertEqual(os.listdir(self.dir), [])

    def test_spaceReservedForUploadsUnderWay(self) -> None:
        """Space promised to an upload under way counts against the next one, and is given back when the upload is
        aborted."""
        self.store.freeBytes = lambda: 1000  # type: ignore[method-assign]
        first = result(self.store.begin(("a",), 600, 0, False))
        with self.assertRaises(NoSpace):
            result(self.store.begin(("b",), 600, 0, False))
        first.abort()
        result(self.store.begin(("b",), 600, 0, False)).abort()
        self.assertEqual(self.store.reserved, 0)

    def test_storageErrorsCarryCodes(self) -> None:
        """Each storage error carries the error code the client will see on the wire."""
        self.assertEqual({c.code.value for c in (NoSpace, NameTaken, BadOffset, StoreIOError, StorageError)},
                         {"no-space", "exists", "bad-offset", "io-error"})
        self.assertEqual(PathBlocked.code.value, "bad-name")


class PartialTests(StoreTestCase):
    data = bytes(range(256)) * 40

    def interrupted(self, parts: tuple[str, ...], got: int) -> Upload:
        upload = result(self.store.begin(parts, len(self.data), 0, True))
        upload.write(self.data[:got])
        upload.abort(keep=True)
        return upload

    def test_keptForResume(self) -> None:
        """An interrupted resumable upload is kept as a hidden .partial file whose length and hash of what arrived
        are reported for resuming."""
        upload = self.interrupted(("a",), 1000)
        self.assertEqual(hidden(self.dir), [upload.tempName])
        self.assertTrue(upload.tempName.endswith(".partial"))
        held = result(self.store.held(("a",), len(self.data)))
        self.assertEqual(held.length, 1000)
        self.assertEqual(held.sha256, hashlib.sha256(self.data[:1000]).hexdigest())

    def test_nothingHeld(self) -> None:
        """No partial is offered when there is none, when the size differs, or for another name."""
        self.assertIsNone(result(self.store.held(("a",), 10)))
        self.interrupted(("a",), 10)
        self.assertIsNone(result(self.store.held(("a",), 11)), "another size is another file")
        self.assertIsNone(result(self.store.held(("b",), len(self.data))))

    def test_resume(self) -> None:
        """The final hash covers the whole file: the kept prefix is hashed again from disk."""
        self.interrupted(("a",), 1000)
        upload = result(self.store.begin(("a",), len(self.data), 600, True))
        self.assertEqual(upload.remaining, len(self.data) - 600)
        upload.write(self.data[600:])
        self.assertEqual(upload.sha256(), hashlib.sha256(self.data).hexdigest())
        self.assertEqual(result(upload.commit(None)), "a")
        self.assertEqual(self.read("a"), self.data)
        self.assertEqual(hidden(self.dir), [])

    def test_resumeWithHeldPrefix(self) -> None:
        """Resuming from a held partial continues its hash, so the finished file's checksum covers every byte."""
        self.interrupted(("a",), 1000)
        held = result(self.store.held(("a",), len(self.data)))
        upload = result(self.store.begin(("a",), len(self.data), 1000, True, held))
        upload.write(self.data[1000:])
        self.assertEqual(upload.sha256(), hashlib.sha256(self.data).hexdigest())

    def test_resumeBeyondHeld(self) -> None:
        """An offset past what the partial holds is refused as BadOffset, keeps the partial and reserves no space."""
        self.interrupted(("a",), 100)
        with self.assertRaises(BadOffset):
            result(self.store.begin(("a",), len(self.data), 200, True))
        self.assertEqual(len(hidden(self.dir)), 1, "the partial is kept")
        self.assertEqual(self.store.reserved, 0)

    def test_resumeWithoutPartial(self) -> None:
        """A resume offset with no partial on disk is refused as BadOffset and writes nothing."""
        with self.assertRaises(BadOffset):
            result(self.store.begin(("a",), 10, 5, True))
        self.assertEqual(os.listdir(self.dir), [])

    def test_inUseMeansFreshTemp(self) -> None:
        """A partial held by a live transfer is not shared: the second upload is not resumable."""
        first = result(self.store.begin(("a",), 10, 0, True))
        second = result(self.store.begin(("a",), 10, 0, True))
        self.assertTrue(first.resumable)
        self.assertFalse(second.resumable)
        self.assertTrue(second.tempName.endswith(".tmp"))
        self.assertIsNone(result(self.store.held(("a",), 10)))
        first.abort()
        second.abort()

    def test_plantedSymlinkAtPartialName(self) -> None:
        """A symlink planted at the partial's name is not resumed from or written through, so its target is
        untouched."""
        victim = os.path.join(scratch(self), "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")
        os.symlink(victim, os.path.join(self.dir, self.store.partialName(("a",), 5)))
        upload = result(self.store.begin(("a",), 5, 0, True))
        self.assertFalse(upload.resumable)
        upload.write(b"hello")
        result(upload.commit(None))
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")

    def test_plantedHardLinkAtPartialName(self) -> None:
        """A hard link planted at the partial's name is not resumed from, and aborting leaves the linked file
        untouched."""
        victim = os.path.join(self.dir, "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")
        os.link(victim, os.path.join(self.dir, self.store.partialName(("a",), 5)))
        upload = result(self.store.begin(("a",), 5, 0, True))
        self.assertFalse(upload.resumable)
        upload.abort()
        self.assertIsNone(result(self.store.held(("a",), 5)))
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")

    def test_checksumFailureDiscardsPartial(self) -> None:
        """An upload aborted because its checksum failed leaves no partial behind."""
        upload = result(self.store.begin(("a",), 10, 0, True))
        upload.write(b"x" * 10)
        upload.abort(keep=False)
        self.assertEqual(os.listdir(self.dir), [])


class CleanupTests(StoreTestCase):
    def test_staleRemoved(self) -> None:
        """Cleaning removes only the server's own old partials and leftovers, keeping fresh ones, ones in use and a
        user's own .partial file."""
        old = PartialTests.interrupted(self, ("a",), 10)  # type: ignore[arg-type]
        temp = result(self.store.begin(("b",), 10, 0, False))
        os.close(os.open(os.path.join(self.dir, ".tcplab-leftover.tmp"), os.O_CREAT | os.O_WRONLY, 0o600))
        for name in (old.tempName, ".tcplab-leftover.tmp", temp.tempName):
            past = time.time() - 7200
            os.utime(os.path.join(self.dir, name), (past, past))
        with open(os.path.join(self.dir, "received_user_file.partial"), "wb") as f:
            f.write(b"not ours to clean")
        os.utime(os.path.join(self.dir, "received_user_file.partial"), (0, 0))
        fresh = PartialTests.interrupted(self, ("c",), 10)  # type: ignore[arg-type]
        self.assertEqual(self.store.cleanStale(3600), 2)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted([temp.tempName, fresh.tempName,
                                                               "received_user_file.partial"]))
        temp.abort()

    data = PartialTests.data


class HashRangeTests(SynchronousTestCase):
    """The one loop both the server (a kept partial) and the client (before resuming) hash with."""

    def test_hashesTheFirstBytes(self) -> None:
        """hashRange hashes exactly the first bytes asked for at any chunk size, leaves the file position alone, and
        fails with EIO if the file is shorter."""
        data = os.urandom(3000)
        path = os.path.join(scratch(self), "f")
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        for length, chunk in ((0, 1024), (1000, 7), (3000, 1024), (3000, 1 << 20)):
            hasher = hashlib.sha256()
            hashing.hashRange(fd, length, hasher, chunk)
            self.assertEqual(hasher.hexdigest(), hashlib.sha256(data[:length]).hexdigest())
        self.assertEqual(os.lseek(fd, 0, os.SEEK_CUR), 0, "the file position is left alone")
        with self.assertRaises(OSError) as caught:
            hashing.hashRange(fd, 3001, hashlib.sha256())
        self.assertEqual(caught.exception.errno, errno.EIO)

    def test_serverAndClientShareIt(self) -> None:
        """The server and the sender hash a resumed prefix with the same function, so they agree on it."""
        self.assertIs(filestore.hashRange, hashing.hashRange)
        self.assertIs(fileclient.hashRange, hashing.hashRange)
