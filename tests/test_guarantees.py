"""docs/GUARANTEES.md maps every documented promise to the tests that hold it: every test it
names must exist, and every row must name one."""

from __future__ import annotations

import importlib
import os
import re

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = os.path.join(ROOT, "docs", "GUARANTEES.md")
TEST_ID = re.compile(r"`(tests/test_\w+\.py)::(\w+)::(test_\w+)`")


def rows(text: str) -> list[tuple[str, int, list[str]]]:
    """(heading, line number, cells) for each body row of each table."""
    found = []
    heading = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if cells != ["Promise", "Stated in", "Held by"]:
                found.append((heading, number, cells))
    return found


def problems(text: str) -> list[str]:
    """What is wrong with a guarantees map: rows without a holder, names of tests that do not exist."""
    found = []
    for _, number, cells in rows(text):
        where = f"GUARANTEES.md line {number}"
        if len(cells) != 3:
            found.append(f"{where}: a row needs 3 cells (Promise | Stated in | Held by), has {len(cells)}")
            continue
        held = cells[2]
        ids = TEST_ID.findall(held)
        leftover = TEST_ID.sub("", held).replace(",", "").strip()
        if not ids:
            found.append(f"{where}: names no test")
        elif leftover:
            found.append(f"{where}: not a test id: {leftover!r}")
        for path, cls, method in ids:
            found.extend(f"{where}: {error}" for error in missingTest(path, cls, method))
    return found


def missingTest(path: str, cls: str, method: str) -> list[str]:
    """Why ``path::cls::method`` is not a test of the suite, if it is not one."""
    name = f"{path}::{cls}::{method}"
    if not os.path.isfile(os.path.join(ROOT, path)):
        return [f"{name}: no file {path}"]
    module = importlib.import_module(path[:-3].replace("/", "."))
    case = getattr(module, cls, None)
    if not isinstance(case, type):
        return [f"{name}: no class {cls} in {path}"]
    if not callable(getattr(case, method, None)):
        return [f"{name}: no method {method} in {cls}"]
    return []


class GuaranteesMapTests(SynchronousTestCase):
    def test_everyNamedTestExists(self) -> None:
        """Every row of docs/GUARANTEES.md names at least one test, and each test it names exists."""
        with open(MAP, encoding="utf-8") as f:
            text = f.read()
        self.assertGreater(len(rows(text)), 50, "the map was read")
        self.assertEqual(problems(text), [])

    def test_eachDocumentHasRows(self) -> None:
        """README.md, docs/PROTOCOL.md and docs/SECURITY.md each have promises in the map."""
        with open(MAP, encoding="utf-8") as f:
            stated = [cells[1] for _, _, cells in rows(f.read()) if len(cells) == 3]
        for doc in ("R ", "P ", "S "):
            self.assertTrue(any(doc in f" {s}" for s in stated), doc)

    def test_checkerCatchesBadRows(self) -> None:
        """The checker refuses a missing module, class or method, a row without a test, and words
        where a test id belongs; it accepts a row of real test ids."""
        header = "| Promise | Stated in | Held by |\n|---|---|---|\n"
        good = "`tests/test_echo.py::EchoProtocolTests::test_everyFragmentSize`"
        cases = {
            "`tests/test_nothing.py::A::test_b`": "no file",
            "`tests/test_echo.py::NoSuchTests::test_everyFragmentSize`": "no class",
            "`tests/test_echo.py::EchoProtocolTests::test_noSuchThing`": "no method",
            f"{good}, and more": "not a test id",
            "": "names no test",
            "pending: issue 11 item 1": "names no test",
        }
        for held, error in cases.items():
            with self.subTest(held=held):
                found = problems(f"## Echo\n\n{header}| p | R x | {held} |\n")
                self.assertEqual(len(found), 1, found)
                self.assertIn(error, found[0])
        self.assertEqual(problems(f"## Echo\n\n{header}| p | R x | {good} |\n"), [])
