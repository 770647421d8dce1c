"""tcplab-file at its edges (issues 11 and 13): owned resumes, free space counted once, empty
token sources, the crash window at commit, folder fsyncs, hostile names and whole-token checks."""

from __future__ import annotations

import os
import subprocess

from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcplab.file import tap as filetap
from tcplab.file.names import checkPath
from tcplab.file.store import FileStore, NoSpace, Upload, synchronous
from tcplab.file.wire import Err, Have, Ok, WireError, formatPut, formatStat, formatTrailer, loadToken
from tests.support import TWISTD, childEnv, scratch
from tests.test_fileserver import ServerTestCase, feed, put, sha
from tests.test_filestore import result


class OwnedResumeTests(ServerTestCase):
    """Issue 11 item 8: a resume never stores bytes the resuming client did not send."""

    size = 128 * 1024
    half = 64 * 1024

    def interrupt(self, data: bytes, got: int) -> None:
        protocol, _ = self.send(formatPut(len(data), "big", trailer=True) + data[:got])
        protocol.connectionLost(Failure(Exception("dropped")))

    def test_otherClientsBytesBetweenStatAndPutAreNotStored(self) -> None:
        """Another upload of the same name and size between a STAT and the resuming PUT on one
        connection: the server does not answer OK with a file whose first half is the other's."""
        victim, other = os.urandom(self.size), os.urandom(self.size)
        self.interrupt(victim, self.half)
        protocol, transport = self.send(formatStat(self.size, "big"))
        self.assertEqual(self.replies(transport), [Have(self.half, sha(victim[:self.half]))])
        self.interrupt(other, self.half)  # same name and size, from 0, dropped at the same length
        feed(protocol, put("big", victim, trailer=True, offset=self.half), 4096)
        reply = self.replies(transport)[-1]
        self.assertFalse(isinstance(reply, Ok), f"OK for a file holding another client's bytes: {reply}")
        self.assertEqual(reply, Err("checksum-mismatch", reply.message))
        self.assertEqual(self.visible(), {}, "nothing stored")

    def test_coarseFileTimesDoNotHideTheOtherWriter(self) -> None:
        """Where file times are too coarse to show the other write, the server still knows of it."""
        from tcplab.file import store as filestore

        self.patch(filestore, "_identity", lambda st: (st.st_dev, st.st_ino, st.st_size))
        self.test_otherClientsBytesBetweenStatAndPutAreNotStored()

    def test_sameConnectionResumeStillWorks(self) -> None:
        """With nobody in between, STAT then PUT offset= on one connection stores the file."""
        data = os.urandom(self.size)
        self.interrupt(data, self.half)
        protocol, transport = self.send(formatStat(self.size, "big"))
        feed(protocol, put("big", data, trailer=True, offset=self.half), 4096)
        self.assertEqual(self.replies(transport)[-1], Ok(self.size, sha(data), "received_big"))
        self.assertEqual(self.visible(), {"received_big": data})

    def test_unchangedPrefixIsNotHashedTwice(self) -> None:
        """The STAT's hash is reused when nothing wrote the partial since, and not after a writer."""
        from tcplab.file import store as filestore

        reads: list[int] = []
        real = filestore.hashRange
        self.patch(filestore, "hashRange", lambda fd, n, h, *a: (reads.append(n), real(fd, n, h, *a)))
        data = os.urandom(self.size)
        self.interrupt(data, self.half)
        protocol, transport = self.send(formatStat(self.size, "big"))
        feed(protocol, put("big", data, trailer=True, offset=self.half))
        self.assertEqual(reads, [self.half], "hashed once, for the STAT")
        self.assertEqual(self.replies(transport)[-1], Ok(self.size, sha(data), "received_big"))

    def test_twoUploadsNeverShareAPartial(self) -> None:
        """Two uploads of one name and size at once each store exactly their own bytes."""
        first, second = os.urandom(self.size), os.urandom(self.size)
        p1, t1 = self.send(formatPut(self.size, "big", trailer=True) + first[:self.half])
        p2, t2 = self.send(formatPut(self.size, "big", trailer=True) + second[:self.half])
        feed(p1, first[self.half:] + formatTrailer(sha(first)))
        feed(p2, second[self.half:] + formatTrailer(sha(second)))
        stored = {r.name for r in self.replies(t1) + self.replies(t2) if isinstance(r, Ok)}
        self.assertEqual(stored, {"received_big", "received_big (1)"})
        self.assertEqual(sorted(self.visible().values()), sorted([first, second]))


class Disk:
    """A 20 MiB file system as statvfs would report it: its size less what the folder holds."""

    def __init__(self, directory: str, size: int) -> None:
        self.directory = directory
        self.size = size

    def free(self, dirFd: int) -> int:
        used = sum(entry.stat(follow_symlinks=False).st_size for entry in os.scandir(self.directory))
        return self.size - used


class FreeSpaceTests(SynchronousTestCase):
    """Issue 11 item 10: the free-space check counts bytes already written once."""

    MiB = 1 << 20

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.disk = Disk(self.dir, 20 * self.MiB)
        self.store = FileStore(self.dir, runBlocking=synchronous, freeSpace=self.disk.free)
        self.addCleanup(self.store.close)

    def begin(self, name: str, size: int) -> Upload:
        return result(self.store.begin((name,), size, 0, False))  # type: ignore[no-any-return]

    def test_uploadUnderWayCountsItsRemainingBytes(self) -> None:
        """An 8 MiB upload 7 MiB in on a 20 MiB disk leaves room for a 6 MiB one (12 MiB really free)."""
        first = self.begin("first", 8 * self.MiB)
        chunk = b"x" * self.MiB
        for _ in range(7):
            first.write(chunk)
        second = self.begin("second", 6 * self.MiB)  # refused with no-space when 7 MiB count twice
        self.assertEqual(self.store.reserved, 7 * self.MiB)
        second.abort()
        first.abort()
        self.assertEqual(self.store.reserved, 0)

    def test_whatReallyDoesNotFitIsStillRefused(self) -> None:
        """12 MiB are free next to the upload under way: a 13 MiB upload is refused before its body."""
        first = self.begin("first", 8 * self.MiB)
        for _ in range(7):
            first.write(b"x" * self.MiB)
        with self.assertRaises(NoSpace) as caught:
            self.begin("second", 13 * self.MiB)
        self.assertIn(f"{12 * self.MiB} bytes free", caught.exception.message)
        first.abort()

    def test_resumedUploadReservesTheRest(self) -> None:
        """A resumed upload holds only what it has yet to write, and frees it as it writes."""
        upload = result(self.store.begin(("a",), 4 * self.MiB, 0, True))
        upload.write(b"y" * self.MiB)
        upload.abort(keep=True)
        resumed = result(self.store.begin(("a",), 4 * self.MiB, self.MiB, True))
        self.assertEqual(self.store.reserved, 3 * self.MiB)
        resumed.write(b"y" * self.MiB)
        self.assertEqual(self.store.reserved, 2 * self.MiB)
        resumed.abort()
        self.assertEqual(self.store.reserved, 0)


class EmptyTokenSourceTests(SynchronousTestCase):
    """Issue 11 item 11: an empty token source never opens the server."""

    def setUp(self) -> None:
        self.dir = scratch(self)

    def test_emptyTokenFileOptionIsAUsageError(self) -> None:
        """``--token-file ''`` (an unset variable in a unit file) is a one-line usage error."""
        error = self.assertRaises(usage.UsageError, filetap.Options().parseOptions,
                                  ["--dir", self.dir, "--token-file", ""])
        self.assertEqual(str(error), "--token-file is empty: give the path of the file that holds the token")

    def test_setButEmptyEnvironmentIsAnError(self) -> None:
        """A ``TCPLAB_TOKEN`` that is set but empty is refused, not read as "no token"."""
        before = os.environ.get("TCPLAB_TOKEN")
        os.environ["TCPLAB_TOKEN"] = ""
        self.addCleanup(lambda: os.environ.pop("TCPLAB_TOKEN") if before is None
                        else os.environ.__setitem__("TCPLAB_TOKEN", before))
        error = self.assertRaises(usage.UsageError, filetap.Options().parseOptions, ["--dir", self.dir])
        self.assertIn("$TCPLAB_TOKEN is set but empty", str(error))
        self.assertNotIn("\n", str(error))
        self.assertIsNone(loadToken(None, {}), "unset is still no token")

    def test_twistdExitsOneWithOneLine(self) -> None:
        """Under twistd both end the process with exit 1 and one line naming the problem, before listening."""
        env = {k: v for k, v in childEnv().items() if k != "TCPLAB_TOKEN"}
        for extra, environ, message in ((["--token-file", ""], env, b"--token-file is empty"),
                                        ([], {**env, "TCPLAB_TOKEN": ""}, b"$TCPLAB_TOKEN is set but empty")):
            with self.subTest(message=message):
                done = subprocess.run([*TWISTD, "-n", "--pidfile=", "tcplab-file", "--dir", self.dir,
                                       "--port", "0", *extra], capture_output=True, timeout=15, env=environ)
                self.assertEqual(done.returncode, 1, done)
                lines = [line for line in (done.stdout + done.stderr).splitlines() if message in line]
                self.assertEqual(len(lines), 1, done)
                self.assertNotIn(b"Traceback", done.stdout + done.stderr)
                self.assertNotIn(b"starting on", done.stdout + done.stderr)


class CommitCrashTests(SynchronousTestCase):
    """Issue 11 item 12: a kill between the link() and the unlink() of a commit is cleaned up."""

    data = os.urandom(5000)

    def setUp(self) -> None:
        self.dir = scratch(self)

    def crashAfterLink(self) -> str:
        """What a server killed inside the commit leaves: the verified partial linked under its
        final name, and the partial's own name still there (two links); returns that name."""
        store = FileStore(self.dir, runBlocking=synchronous)
        upload = result(store.begin(("received_a",), len(self.data), 0, True))
        upload.write(self.data)
        os.fsync(upload.fd)
        os.link(upload.tempName, "received_a", src_dir_fd=store.dirFd, dst_dir_fd=store.dirFd)
        os.close(upload.fd)  # the process is gone: its lock with it
        store.close()
        self.assertEqual(os.stat(os.path.join(self.dir, upload.tempName)).st_nlink, 2)
        return upload.tempName

    def test_startUpCleaningRemovesTheSecondLink(self) -> None:
        """Cleaning at start-up removes the hidden name at once (however young) and keeps the file."""
        partial = self.crashAfterLink()
        store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(store.close)
        self.assertEqual(store.cleanStale(86400), 1)
        self.assertEqual(os.listdir(self.dir), ["received_a"])
        with open(os.path.join(self.dir, "received_a"), "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(os.stat(os.path.join(self.dir, "received_a")).st_nlink, 1)
        upload = result(store.begin(("received_a",), len(self.data), 0, True))
        self.assertEqual((upload.resumable, upload.tempName), (True, partial), "the partial name is usable again")
        upload.abort()

    def test_liveCommitIsLeftAlone(self) -> None:
        """A partial with two links whose commit is still running (locked) is not touched."""
        store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(store.close)
        upload = result(store.begin(("received_a",), 3, 0, True))
        upload.write(b"abc")
        os.link(upload.tempName, "received_a", src_dir_fd=store.dirFd, dst_dir_fd=store.dirFd)
        self.assertEqual(store.cleanStale(0), 0)
        self.assertIn(upload.tempName, os.listdir(self.dir))
        upload.abort()


class CommitCrashServiceTests(TestCase):
    """Issue 11 item 12, as twistd runs it."""

    def test_serviceCleansAtStart(self) -> None:
        """``twistd tcplab-file`` starting on the folder runs that cleaning before anything else."""
        self.dir = scratch(self)
        CommitCrashTests.crashAfterLink(self)  # type: ignore[arg-type]
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", self.dir, "--partial-ttl", "3600"])
        service = filetap.FileService(options)
        service.store.runBlocking = synchronous
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(os.listdir(self.dir), ["received_a"])

    data = CommitCrashTests.data


class NestedFsyncTests(ServerTestCase):
    """Issue 13 item 5: every folder a nested upload created is fsync'ed, and the top folder."""

    def setUp(self) -> None:
        super().setUp()
        self.synced: list[tuple[int, int]] = []

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.synced.append((st.st_dev, st.st_ino))
            os.fsync(fd)

        self.store.fsync = fsync  # type: ignore[method-assign]

    def inode(self, *parts: str) -> tuple[int, int]:
        st = os.stat(os.path.join(self.dir, *parts))
        return st.st_dev, st.st_ino

    def test_newFolderAndTopAreFsynced(self) -> None:
        """``newdir/a`` with newdir new: the file, received_newdir (the file's entry) and --dir
        (received_newdir's entry) all reach the disk before OK."""
        _, transport = self.send(put("newdir/a", b"hello"))
        self.assertEqual(self.replies(transport), [Ok(5, sha(b"hello"), "received_newdir/a")])
        for parts in (("received_newdir", "a"), ("received_newdir",), ()):
            self.assertIn(self.inode(*parts), self.synced, f"{'/'.join(parts) or '--dir'} not fsync'ed")

    def test_everyCreatedFolderIsFsynced(self) -> None:
        """``n1/n2/n3/a`` with every folder new: each of them and --dir are fsync'ed."""
        _, transport = self.send(put("n1/n2/n3/a", b"x"))
        self.assertIsInstance(self.replies(transport)[0], Ok)
        for parts in (("received_n1", "n2", "n3", "a"), ("received_n1", "n2", "n3"), ("received_n1", "n2"),
                      ("received_n1",), ()):
            self.assertIn(self.inode(*parts), self.synced, f"{'/'.join(parts) or '--dir'} not fsync'ed")


#: Characters that make a name display as something else: each is refused in a file name.
HOSTILE = {
    "U+061C ARABIC LETTER MARK": "\u061c",
    "U+200E LEFT-TO-RIGHT MARK": "\u200e",
    "U+200F RIGHT-TO-LEFT MARK": "\u200f",
    "U+2029 PARAGRAPH SEPARATOR": "\u2029",
    "U+202A LEFT-TO-RIGHT EMBEDDING": "\u202a",
    "U+202B RIGHT-TO-LEFT EMBEDDING": "\u202b",
    "U+202C POP DIRECTIONAL FORMATTING": "\u202c",
    "U+202D LEFT-TO-RIGHT OVERRIDE": "\u202d",
    "U+2067 RIGHT-TO-LEFT ISOLATE": "\u2067",
    "U+2068 FIRST STRONG ISOLATE": "\u2068",
    "U+2069 POP DIRECTIONAL ISOLATE": "\u2069",
}


class HostileNameTests(ServerTestCase):
    """Issue 13 item 6: bidi and invisible characters in file names are refused."""

    def test_checkPathRefusesEach(self) -> None:
        """The name check refuses each character, in a file name and in a folder name."""
        for what, ch in HOSTILE.items():
            for name in (f"invoice{ch}fdp.exe", f"dir{ch}/a.txt"):
                with self.subTest(what=what, name=name), self.assertRaises(WireError) as caught:
                    checkPath(name)
                self.assertEqual(caught.exception.code, "bad-name")

    def test_serverStoresNothing(self) -> None:
        """A PUT with such a name gets ERR bad-name and nothing is stored."""
        for what, ch in HOSTILE.items():
            with self.subTest(what=what):
                _, transport = self.send(put(f"invoice{ch}fdp.exe", b"data"))
                self.assertRefused(transport, "bad-name")
        self.assertEqual(self.files(), {})


class WholeTokenTests(ServerTestCase):
    """Issue 13 item 7: the token is compared whole."""

    def test_prefixesAndCaseVariantAreBadTokens(self) -> None:
        """``s``, ``s3c``, ``s3cre`` and ``S3cret`` for the token ``s3cret``: bad-token, nothing stored."""
        self.factory = self.makeFactory(token=b"s3cret")
        for token in ("s", "s3c", "s3cre", "S3cret", "S3CRET"):
            with self.subTest(token=token):
                _, transport = self.send(put("a", b"payload", token=token))
                self.assertRefused(transport, "bad-token")
                _, transport = self.send(formatStat(7, "a", token=token))
                self.assertRefused(transport, "bad-token")
        self.assertEqual(self.files(), {})
        _, transport = self.send(put("a", b"payload", token="s3cret"))
        self.assertEqual(self.replies(transport), [Ok(7, sha(b"payload"), "received_a")])

