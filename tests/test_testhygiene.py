"""The suite's own hygiene: every test says, in its docstring, what behaviour a user would notice."""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

TESTS = os.path.dirname(os.path.abspath(__file__))


def undocumented(source: str, filename: str) -> list[str]:
    """``Class.test_x`` for every test method, in any class of ``source``, whose body opens without a docstring."""
    missing = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test")
                        and not (ast.get_docstring(item) or "").strip()):
                    missing.append(f"{node.name}.{item.name}")
    return missing


class DocstringTests(SynchronousTestCase):
    def test_everyTestMethodHasADocstring(self) -> None:
        """Every test method under tests/ has a docstring, so a failure's name comes with what it protects."""
        missing = []
        for name in sorted(os.listdir(TESTS)):
            if name.endswith(".py"):
                path = os.path.join(TESTS, name)
                with open(path, encoding="utf-8") as f:
                    missing += [f"tests/{name}::{test}" for test in undocumented(f.read(), path)]
        self.assertEqual(missing, [], f"{len(missing)} test(s) without a one-sentence docstring")

    def test_theCheckSeesAMissingDocstring(self) -> None:
        """The check finds a test without a docstring, sync or async, and accepts one that has it."""
        source = (
            "class T:\n"
            "    def test_bare(self):\n        pass\n"
            "    async def test_bareAsync(self):\n        pass\n"
            "    def test_said(self):\n        '''It says.'''\n"
            "    def test_emptyDoc(self):\n        ''''''\n"
            "    def helper(self):\n        pass\n"
        )
        self.assertEqual(undocumented(source, "<t>"), ["T.test_bare", "T.test_bareAsync", "T.test_emptyDoc"])
