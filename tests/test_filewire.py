"""The tcplab-file wire format: request lines, names, replies (tcplab.file.wire, tcplab.file.names)."""

from __future__ import annotations

import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcplab.escaping import escapeName, unescapeName
from tcplab.file.names import MAX_NAME_BYTES, checkPart, checkPath, storedParts
from tcplab.file.wire import (
    EMPTY_SHA256,
    Clash,
    Err,
    ErrorCode,
    Have,
    Ok,
    Put,
    Stat,
    TokenError,
    WireError,
    checkToken,
    formatErr,
    formatHave,
    formatOk,
    formatPut,
    formatStat,
    formatTrailer,
    loadToken,
    parseReply,
    parseRequest,
    parseTrailer,
)
from tests.support import scratch

SHA = hashlib.sha256(b"hello").hexdigest()

#: Names people really have: they must all work.
ORDINARY_NAMES = [
    "important_secret_file.txt",
    "report (1) [final].txt",
    "звіт 2025.txt",
    "日本語のファイル.pdf",
    "emoji 👨\u200d👩\u200d👧.png",
    "a=b.txt",
    "-rf",
    "...hidden",
    ".bashrc",
    "name with  two spaces",
    " leading space",
    "100% done; #1 & more!.txt",
    "PUT 5 x",
]

#: Names that must never reach the disk as they are.
HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../etc/passwd",
    "a/../../b",
    "/etc/passwd",
    "a//b",
    "a/",
    "dir\\..\\x",
    "x\x00y",
    "x\ty",
    "evil\x1b[2Jname",
    "bell\x07",
    "del\x7f",
    "c1\x9bcsi",
    "line\u2028sep",
    "gpj\u202eexe.txt",
    "isolate\u2066x",
]


class ParseRequestTests(SynchronousTestCase):
    def test_minimalPut(self) -> None:
        """What ``printf 'PUT %d %s\\n'`` sends: size and name, nothing else."""
        self.assertEqual(parseRequest(b"PUT 123 important_secret_file.txt"), Put(123, "important_secret_file.txt"))

    def test_carriageReturnDropped(self) -> None:
        """A header ending in CRLF, as telnet or nc -C send it, is read as if it ended in LF."""
        self.assertEqual(parseRequest(b"PUT 1 a.txt\r"), Put(1, "a.txt"))

    def test_allOptions(self) -> None:
        """A PUT with checksum (in any case), offset, token and clash options parses into all of them, and only the
        bytes after the offset are expected."""
        request = parseRequest(f"PUT sha256={SHA.upper()} offset=3 token=t0k clash=fail 10 my file.txt".encode())
        self.assertEqual(request, Put(10, "my file.txt", sha256=SHA, offset=3, token="t0k", clash=Clash.FAIL))
        self.assertTrue(request.hashed)
        self.assertEqual(request.bodySize, 7)

    def test_trailer(self) -> None:
        """sha256=trailer means the checksum comes after the body rather than up front."""
        request = parseRequest(b"PUT sha256=trailer 5 x")
        self.assertTrue(request.trailer)
        self.assertIsNone(request.sha256)

    def test_nameIsRestOfLine(self) -> None:
        """Spaces, '=' and digits in the name are the name's, not fields."""
        self.assertEqual(parseRequest(b"PUT 5 12 a=b c").name, "12 a=b c")

    def test_zeroSize(self) -> None:
        """A PUT of size zero is a valid empty file."""
        self.assertEqual(parseRequest(b"PUT 0 empty").size, 0)

    def test_stat(self) -> None:
        """A STAT request parses its token, size and a name with spaces."""
        self.assertEqual(parseRequest(b"STAT token=x 99 a b"), Stat(99, "a b", "x"))

    def test_malformed(self) -> None:
        """Each bad line is refused with bad-header (syntax) before anything else happens."""
        for line in [
            b"",
            b"PUT",
            b"PUT ",
            b"PUT 5",
            b"PUT  5 x",
            b"PUT 5x y",
            b"PUT -5 x",
            b"PUT +5 x",
            b"PUT 0x10 x",
            b"PUT 1e3 x",
            b"PUT x 5",
            b"PUT 123456789012345678901 x",
            b"put 5 x",
            b"GET / HTTP/1.1",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PUT sha256=abc 5 x",
            b"PUT sha256=" + b"g" * 64 + b" 5 x",
            b"PUT offset=6 5 x",
            b"PUT offset=2 5 x",
            b"PUT offset=-1 sha256=trailer 5 x",
            b"PUT clash=maybe 5 x",
            b"PUT colour=blue 5 x",
            b"PUT token=a token=b 5 x",
            b"PUT token= 5 x",
            b"PUT sha256=trailer",
            b"STAT sha256=trailer 5 x",
            b"STAT 5",
            b"PUT 5 \xff\xfe",
        ]:
            with self.subTest(line=line):
                with self.assertRaises(WireError) as caught:
                    parseRequest(line)
                self.assertEqual(caught.exception.code, ErrorCode.BAD_HEADER)

    def test_hugeSize(self) -> None:
        """A size no file can have is too-large, not a crash or a wrap-around."""
        with self.assertRaises(WireError) as caught:
            parseRequest(b"PUT 99999999999999999999 x")
        self.assertEqual(caught.exception.code, ErrorCode.TOO_LARGE)

    def test_messagesAreSafe(self) -> None:
        """An error message quoting hostile input cannot carry a terminal escape."""
        with self.assertRaises(WireError) as caught:
            parseRequest(b"\x1b[2J\x1b]0;pwned\x07 5 x")
        self.assertNotIn("\x1b", caught.exception.message)
        self.assertTrue(caught.exception.message.isprintable())

    @given(st.binary(max_size=300))
    @settings(max_examples=500, deadline=None)
    def test_anyBytes(self, line: bytes) -> None:
        """Whatever arrives, the parser answers with a request or a WireError, nothing else."""
        try:
            request = parseRequest(line)
        except WireError as e:
            self.assertIn(e.code, set(ErrorCode))
            self.assertNotIn("\n", e.message)
        else:
            self.assertIsInstance(request, (Put, Stat))

    @settings(deadline=None)
    @given(
        size=st.integers(0, 2**63 - 1),
        name=st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), min_size=1,
                     max_size=40),
        sha=st.one_of(st.none(), st.just("trailer"), st.binary(min_size=32, max_size=32).map(bytes.hex)),
        token=st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1)),
        clash=st.one_of(st.none(), st.sampled_from(Clash)),
    )
    def test_roundTrip(self, size: int, name: str, sha: str | None, token: str | None, clash: Clash | None) -> None:
        """formatPut and parseRequest agree on every field, whatever the name."""
        line = formatPut(size, name, sha256=None if sha == "trailer" else sha, trailer=sha == "trailer",
                         token=token, clash=clash)
        self.assertTrue(line.endswith(b"\n"))
        request = parseRequest(line[:-1])
        expected = Put(size, name, None if sha == "trailer" else sha, sha == "trailer", 0, token, clash)
        if name.endswith("\r"):
            self.assertEqual(request.name, name[:-1])
        else:
            self.assertEqual(request, expected)

    def test_unwritableNames(self) -> None:
        """The sender refuses to write a header for a name with a line break, a lone surrogate or too many bytes."""
        for name in ["line\nbreak", "lone \ud800 surrogate", "x" * 5000]:
            with self.subTest(name=name[:10]), self.assertRaises(WireError):
                formatPut(1, name)

    def test_statRoundTrip(self) -> None:
        """A STAT the sender formats is read back by the server exactly."""
        self.assertEqual(parseRequest(formatStat(7, "a b", "tok")[:-1]), Stat(7, "a b", "tok"))


class TrailerTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """A SHA256 trailer the sender writes is read back, and one in upper case or ending in CR is accepted too."""
        self.assertEqual(parseTrailer(formatTrailer(SHA)[:-1]), SHA)
        self.assertEqual(parseTrailer(f"SHA256 {SHA.upper()}\r".encode()), SHA)

    def test_bad(self) -> None:
        """An empty, short, lower-case, non-SHA256 or double-spaced trailer is refused."""
        for line in [b"", b"SHA256", b"SHA256 " + b"0" * 63, b"sha256 " + SHA.encode(), b"MD5 " + SHA.encode(),
                     b"SHA256  " + SHA.encode()]:
            with self.subTest(line=line), self.assertRaises(WireError):
                parseTrailer(line)


class NameTests(SynchronousTestCase):
    def test_ordinaryNamesWork(self) -> None:
        """Odd but ordinary names pass (croc's over-strict fix broke some of these)."""
        for name in ORDINARY_NAMES:
            with self.subTest(name=name):
                self.assertEqual(checkPath(name), (name,))
                self.assertEqual(storedParts((name,), "received_"), ("received_" + name,))

    def test_hostileNamesRefused(self) -> None:
        """Every hostile name is refused as bad-name with a printable message."""
        for name in HOSTILE_NAMES:
            with self.subTest(name=name):
                with self.assertRaises(WireError) as caught:
                    checkPath(name)
                self.assertEqual(caught.exception.code, ErrorCode.BAD_NAME)
                self.assertTrue(caught.exception.message.isprintable())

    def test_relativePath(self) -> None:
        """A relative path splits into its folders and only the top part gets the prefix."""
        self.assertEqual(checkPath("folder/sub dir/file.txt"), ("folder", "sub dir", "file.txt"))
        self.assertEqual(storedParts(("folder", "f"), "received_"), ("received_folder", "f"))

    def test_tooDeep(self) -> None:
        """A path deeper than the folder limit is refused."""
        with self.assertRaises(WireError):
            checkPath("/".join(["d"] * 65))

    def test_lengthLimitIncludesPrefix(self) -> None:
        """255 UTF-8 bytes for the stored name, prefix included; multi-byte characters count as bytes."""
        fits = "x" * (MAX_NAME_BYTES - len("received_"))
        self.assertEqual(storedParts((fits,), "received_"), ("received_" + fits,))
        for name in [fits + "x", "я" * 124]:
            with self.subTest(name=name[:5]), self.assertRaises(WireError) as caught:
                storedParts((name,), "received_")
            self.assertEqual(caught.exception.code, ErrorCode.BAD_NAME)
        self.assertEqual(storedParts(("я" * 123,), "received_"), ("received_" + "я" * 123,))

    def test_partHasNoSlash(self) -> None:
        """A part is one name: with a '/' it would be a path (``--prefix ../escaped_`` stored outside --dir)."""
        for part in ("../escaped_", "a/b", "/", "sub/"):
            with self.subTest(part=part), self.assertRaises(WireError) as caught:
                checkPart(part)
            self.assertEqual(caught.exception.code, ErrorCode.BAD_NAME)
        checkPart("received_")

    def test_prefixStaysOnePart(self) -> None:
        """A prefix that would climb out or add a folder is refused as bad-name."""
        for prefix in ("../escaped_", "sub/", "a\\b"):
            with self.subTest(prefix=prefix), self.assertRaises(WireError) as caught:
                storedParts(("a.txt",), prefix)
            self.assertEqual(caught.exception.code, ErrorCode.BAD_NAME)

    def test_reservedPrefix(self) -> None:
        """Stored names cannot pose as the server's own temp or partial files."""
        with self.assertRaises(WireError):
            storedParts((".tcplab-0123.partial",), "")
        self.assertEqual(storedParts((".tcplab-x",), "received_"), ("received_.tcplab-x",))

    @given(st.text(max_size=60))
    @settings(max_examples=500, deadline=None)
    def test_acceptedNamesAreSafe(self, name: str) -> None:
        """Anything checkPath accepts stays inside the folder and shows as itself on one line."""
        try:
            parts = checkPath(name)
        except WireError as e:
            self.assertEqual(e.code, ErrorCode.BAD_NAME)
            return
        for part in parts:
            self.assertNotIn(part, ("", ".", ".."))
            self.assertNotIn("/", part)
            self.assertNotIn("\\", part)
            self.assertFalse(any(ord(ch) < 32 or ord(ch) == 127 for ch in part))
            self.assertNotIn("\n", escapeName(part))
            self.assertNotIn("\x1b", escapeName(part))


class EscapeTests(SynchronousTestCase):
    def test_plainNamesUnchanged(self) -> None:
        """Ordinary names are shown exactly as they are."""
        for name in ORDINARY_NAMES[:4]:
            self.assertEqual(escapeName(name), name)

    def test_escapes(self) -> None:
        """Terminal escapes, line breaks, bidi marks, backslashes and undecodable bytes in names are shown as visible
        escapes."""
        self.assertEqual(escapeName("a\x1b[31mb"), "a\\x1b[31mb")
        self.assertEqual(escapeName("x\ny"), "x\\x0ay")
        self.assertEqual(escapeName("gpj\u202eexe"), "gpj\\u202eexe")
        self.assertEqual(escapeName("back\\slash"), "back\\\\slash")
        self.assertEqual(escapeName("bad\udcffbyte"), "bad\\udcffbyte")

    @given(st.text())
    @settings(deadline=None)
    def test_roundTripAndPrintable(self, name: str) -> None:
        """Any name escapes to printable text that unescapes back to the same name."""
        escaped = escapeName(name)
        self.assertTrue(escaped.isprintable())
        self.assertEqual(unescapeName(escaped), name)


class ReplyTests(SynchronousTestCase):
    def test_ok(self) -> None:
        """An OK reply carries the size, checksum and stored name (spaces and brackets included) and reads back the
        same."""
        line = formatOk(5, SHA, "received_report (1).txt")
        self.assertEqual(line, f"OK 5 {SHA} received_report (1).txt\n".encode())
        self.assertEqual(parseReply(line[:-1]), Ok(5, SHA, "received_report (1).txt"))

    def test_okNameEscapedOnTheWire(self) -> None:
        """An invisible character in a stored name is escaped on the wire and restored by the sender."""
        line = formatOk(1, SHA, "zero\u200bwidth")
        self.assertNotIn("\u200b".encode(), line)
        self.assertEqual(parseReply(line[:-1]).name, "zero\u200bwidth")

    def test_errAndHave(self) -> None:
        """ERR and HAVE replies read back to their code, message, length and checksum."""
        self.assertEqual(parseReply(formatErr(ErrorCode.EXISTS, "x exists")[:-1]), Err("exists", "x exists"))
        self.assertEqual(parseReply(formatHave(0, EMPTY_SHA256)[:-1]), Have(0, EMPTY_SHA256))

    def test_errMessageOneSafeLine(self) -> None:
        """An error message is sent as one short line with no line breaks or terminal escapes, however it was built."""
        line = formatErr(ErrorCode.BAD_NAME, "a\nb\x1b[2J" + "x" * 1000)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertNotIn(b"\x1b", line)
        self.assertLess(len(line), 400)

    def test_errMessageQuotingAnEscapedName(self) -> None:
        """A message quotes names already escaped: they are not escaped twice."""
        with self.assertRaises(WireError) as caught:
            checkPath("evil\x1b[2J")
        line = formatErr(caught.exception.code, caught.exception.message)
        self.assertIn(b"'evil\\x1b[2J'", line)
        self.assertNotIn(b"\\\\", line)

    def test_garbageReply(self) -> None:
        """Empty, HTTP, short or malformed replies are refused by the sender."""
        for line in [b"", b"HTTP/1.1 200 OK", b"OK 5", b"OK x " + SHA.encode() + b" n", b"HAVE 1", b"ERR"]:
            with self.subTest(line=line), self.assertRaises(WireError):
                parseReply(line)


class TokenTests(SynchronousTestCase):
    def test_token(self) -> None:
        """A token is trimmed of surrounding whitespace, and empty, spaced, tabbed or overlong tokens are refused."""
        self.assertEqual(checkToken("  s3cret\n"), "s3cret")
        for bad in ["", " \n", "two words", "tab\there", "x" * 2000]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                checkToken(bad)


class LoadTokenTests(SynchronousTestCase):
    """One way to read the token for the server and the client: a file, else $TCPLAB_TOKEN."""

    def write(self, data: bytes) -> str:
        path = os.path.join(scratch(self), "token")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_fromFile(self) -> None:
        """A --token-file wins over $TCPLAB_TOKEN."""
        self.assertEqual(loadToken(self.write(b"s3cret\n"), {"TCPLAB_TOKEN": "other"}), "s3cret")

    def test_fromEnvironment(self) -> None:
        """Without a token file the token comes trimmed from $TCPLAB_TOKEN, and there is none if it is unset."""
        self.assertEqual(loadToken(None, {"TCPLAB_TOKEN": " s3cret "}), "s3cret")
        self.assertIsNone(loadToken(None, {}))

    def test_problemsAreOneKindOfError(self) -> None:
        """Every problem loading a token (unreadable, spaced, not UTF-8 or empty file, bad or empty variable, empty
        option) is one printable error saying what is wrong."""
        missing = os.path.join(scratch(self), "missing\x1b")
        cases = [
            (missing, {}, "cannot read --token-file '" + escapeName(missing) + "': No such file or directory"),
            (self.write(b"two words"), {}, "may not contain spaces"),
            (self.write(b"\xff\xfe"), {}, "is not UTF-8 text"),
            (self.write(b""), {}, "the token is empty"),
            (None, {"TCPLAB_TOKEN": "tab\there"}, "$TCPLAB_TOKEN: "),
            (None, {"TCPLAB_TOKEN": ""}, "$TCPLAB_TOKEN is set but empty"),
            ("", {"TCPLAB_TOKEN": "s3cret"}, "--token-file is empty"),
        ]
        for path, environ, message in cases:
            with self.subTest(message=message), self.assertRaises(TokenError) as caught:
                loadToken(path, environ)
            self.assertIn(message, str(caught.exception))
            self.assertTrue(str(caught.exception).isprintable())
