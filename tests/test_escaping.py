"""The one escaping policy (tcplab/escaping.py): the unsafe set, its spellings, and reversibility."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcplab.escaping import (
    escapeLine,
    escapeName,
    escapeText,
    isUnsafe,
    safeText,
    showable,
    unescapeLine,
    unescapeName,
    unescapeText,
)

#: Every character the policy names, with why, and its chat spelling.
NAMED = {
    "\x00": ("NUL", b"\\x00"),
    "\x07": ("BEL", b"\\x07"),
    "\x08": ("backspace", b"\\x08"),
    "\n": ("LF: a fake line", b"\\x0a"),
    "\x0b": ("vertical tab", b"\\x0b"),
    "\x0c": ("form feed", b"\\x0c"),
    "\r": ("CR: overwrites the line", b"\\x0d"),
    "\x1b": ("ESC: terminal sequences", b"\\x1b"),
    "\x1f": ("unit separator", b"\\x1f"),
    "\x7f": ("DEL", b"\\x7f"),
    "\x80": ("C1 padding", b"\\u0080"),
    "\x85": ("C1 next line", b"\\u0085"),
    "\x9b": ("C1 CSI", b"\\u009b"),
    "\x9d": ("C1 OSC", b"\\u009d"),
    "\x9f": ("C1 APC", b"\\u009f"),
    "\u00ad": ("soft hyphen (invisible)", b"\\u00ad"),
    "\u061c": ("Arabic letter mark", b"\\u061c"),
    "\u200b": ("zero width space", b"\\u200b"),
    "\u200c": ("zero width non-joiner", b"\\u200c"),
    "\u200d": ("zero width joiner", b"\\u200d"),
    "\u200e": ("left-to-right mark", b"\\u200e"),
    "\u200f": ("right-to-left mark", b"\\u200f"),
    "\u2028": ("line separator", b"\\u2028"),
    "\u2029": ("paragraph separator", b"\\u2029"),
    "\u202a": ("left-to-right embedding", b"\\u202a"),
    "\u202b": ("right-to-left embedding", b"\\u202b"),
    "\u202c": ("pop directional formatting", b"\\u202c"),
    "\u202d": ("left-to-right override", b"\\u202d"),
    "\u202e": ("right-to-left override", b"\\u202e"),
    "\u2060": ("word joiner", b"\\u2060"),
    "\u2061": ("function application", b"\\u2061"),
    "\u2062": ("invisible times", b"\\u2062"),
    "\u2063": ("invisible separator", b"\\u2063"),
    "\u2064": ("invisible plus", b"\\u2064"),
    "\u2066": ("left-to-right isolate", b"\\u2066"),
    "\u2067": ("right-to-left isolate", b"\\u2067"),
    "\u2068": ("first strong isolate", b"\\u2068"),
    "\u2069": ("pop directional isolate", b"\\u2069"),
    "\ufeff": ("zero width no-break space (BOM)", b"\\ufeff"),
    "\U000e0001": ("language tag", b"\\U000e0001"),
}

#: Characters the policy leaves as they are.
KEPT = ["a", " ", "~", "\t", "\u00e9", "\u00ff", "\u05d0", "\u0627", "\u65e5", "\U0001f600"]

#: What must never reach a terminal raw (except LF and tab where ``showable`` keeps them).
_RAW_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064"
                         "\u2066-\u2069\ufeff\udc80-\udcff]")


class UnsafeSetTests(SynchronousTestCase):
    def test_eachNamedCharacterIsEscapedInALine(self) -> None:
        """Every control, bidi and invisible character the policy names is spelled out in chat, reversibly."""
        for ch, (why, spelled) in NAMED.items():
            raw = ("a" + ch + "b").encode("utf-8")
            with self.subTest(why):
                self.assertEqual(escapeLine(raw), b"a" + spelled + b"b", why)
                self.assertEqual(unescapeLine(escapeLine(raw)), raw, why)

    def test_eachNamedCharacterIsEscapedInText(self) -> None:
        """Names and paths escape the same set in the same spelling as chat lines."""
        for ch, (why, spelled) in NAMED.items():
            self.assertEqual(escapeText("a" + ch + "b"), "a" + spelled.decode() + "b", why)

    def test_eachNamedCharacterIsEscapedInNames(self) -> None:
        """File names escape the same set, in the file protocol's code-point spelling."""
        for ch, (why, _) in NAMED.items():
            escaped = escapeName("a" + ch + "b")
            self.assertNotIn(ch, escaped, why)
            self.assertEqual(unescapeName(escaped), "a" + ch + "b", why)

    def test_eachNamedCharacterIsEscapedWhenShown(self) -> None:
        """What a client prints of a server's data has none of the set but LF, whatever the server sent."""
        for ch, (why, spelled) in NAMED.items():
            shown = showable(("a" + ch + "b").encode("utf-8"))
            self.assertEqual(shown, b"a\nb" if ch == "\n" else b"a" + spelled + b"b", why)

    def test_undecodableBytesAreEscaped(self) -> None:
        """Bytes that are not UTF-8 come out as ``\\xHH``, one per byte, and come back as those bytes."""
        for raw, spelled in [(b"\xff", b"\\xff"), (b"\xc3", b"\\xc3"), (b"\xed\xa0\x80", b"\\xed\\xa0\\x80")]:
            self.assertEqual(escapeLine(b"x" + raw), b"x" + spelled)
            self.assertEqual(unescapeLine(b"x" + spelled), b"x" + raw)
            self.assertEqual(escapeText("x" + raw.decode("utf-8", "surrogateescape")), "x" + spelled.decode())
            self.assertEqual(showable(b"x" + raw), b"x" + spelled)

    def test_backslashIsEscapedForReversibility(self) -> None:
        """A typed ``\\x1b`` cannot be mistaken for an escaped ESC: the backslash is doubled."""
        self.assertEqual(escapeLine(b"\\x1b"), b"\\\\x1b")
        self.assertEqual(unescapeLine(b"\\\\x1b"), b"\\x1b")
        self.assertEqual(escapeText("a\\b"), "a\\\\b")
        self.assertEqual(escapeName("a\\b"), "a\\\\b")
        self.assertEqual(safeText("a\\b\x1b"), "a\\b\\x1b")

    def test_printableTextIsKept(self) -> None:
        """Letters of every script, emoji, space and tab reach others as they are."""
        for ch in KEPT:
            self.assertFalse(isUnsafe(ch), ch)
            raw = ("x" + ch + "y").encode("utf-8")
            self.assertEqual(escapeLine(raw), raw, ch)
            self.assertEqual(showable(raw), raw, ch)
        self.assertTrue(isUnsafe("\\"))

    def test_plainAsciiIsTheSameObject(self) -> None:
        """The hub's hot path: a plain ASCII line is not decoded or copied."""
        line = b"nothing\tto escape here"
        self.assertIs(escapeLine(line), line)
        data = b"<bob> a\\x1b b\n* notice\n"
        self.assertIs(showable(data), data)

    def test_showableKeepsEscapedHubLines(self) -> None:
        """The hub's escapes are shown as they are, not doubled; a raw CR or ESC is still escaped."""
        self.assertEqual(showable(b"<bob> \\x1b[2J\\\\\n"), b"<bob> \\x1b[2J\\\\\n")
        self.assertEqual(showable(b"evil\r* fake\x1b[2J\n"), b"evil\\x0d* fake\\x1b[2J\n")

    def test_namesEscapeTabAndKeepTheirSpelling(self) -> None:
        """File names keep the file protocol's spelling (``\\xHH`` is U+00HH) and escape a tab too."""
        self.assertEqual(escapeName("a\tb"), "a\\x09b")
        self.assertEqual(escapeName("bad\udcffbyte"), "bad\\udcffbyte")
        self.assertEqual(escapeName("nb\u00a0sp"), "nb\\xa0sp")
        self.assertEqual(unescapeName("nb\\xa0sp"), "nb\u00a0sp")


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.one_of(st.binary(max_size=200),
                     st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.lists(st.sampled_from(sorted(NAMED) + KEPT + ["\\", "\\x1b", "\\u202e"]), max_size=30)
                     .map(lambda cs: "".join(cs).encode("utf-8"))))
    def test_lineRoundTrip(self, raw: bytes) -> None:
        """unescapeLine(escapeLine(x)) == x for any bytes, and the escaped form has nothing unsafe in it."""
        escaped = escapeLine(raw)
        self.assertEqual(unescapeLine(escaped), raw)
        text = escaped.decode("utf-8")
        self.assertTrue(all(not isUnsafe(ch) or ch == "\\" for ch in text))
        self.assertIsNone(_RAW_UNSAFE.search(text))

    @settings(max_examples=300, deadline=None)
    @given(st.text(st.characters(codec=None, categories=None), max_size=60))
    def test_textRoundTrip(self, text: str) -> None:
        """unescapeText(escapeText(s)) == s for any str, lone surrogates included."""
        escaped = escapeText(text)
        self.assertEqual(unescapeText(escaped), text)
        self.assertTrue(all(not isUnsafe(ch) or ch == "\\" for ch in escaped))

    @settings(max_examples=300, deadline=None)
    @given(st.text(st.characters(codec=None, categories=None), max_size=60))
    def test_codePointsRoundTrip(self, text: str) -> None:
        """unescapeName(escapeName(s)) == s, and the result is printable on one line."""
        escaped = escapeName(text)
        self.assertEqual(unescapeName(escaped), text)
        self.assertTrue(escaped.isprintable())

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_showableIsSafe(self, data: bytes) -> None:
        """Whatever a server sends, what the client prints has no control but LF and tab, no bidi, no ESC."""
        shown = showable(data).decode("utf-8")
        self.assertIsNone(_RAW_UNSAFE.search(shown.replace("\n", "")))
        self.assertTrue(all(ch in "\t\n" or ch.isprintable() for ch in shown))
