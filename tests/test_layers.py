"""The package's layers (docs/ARCHITECTURE.md): imports point down, wings stay apart, and only the
command prints or reads argv."""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tcplab")
WINGS = ("echo", "multi", "file")


def modules() -> dict[str, ast.Module]:
    """Every module of the package, by dotted name, parsed."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path, encoding="utf-8") as f:
                    found[dotted] = ast.parse(f.read(), path)
    return found


def imported(tree: ast.Module, module: str) -> set[str]:
    """The tcplab modules ``module`` imports, wherever in it (functions included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "tcplab" or n.startswith("tcplab.")}


def layer(module: str) -> str:
    """``cli``, a wing's name, ``main`` or ``base``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("cli", *WINGS):
        return parts[1]
    return "main" if module == "tcplab.__main__" else "base"


def allowed(source: str, target: str) -> bool:
    """May a module of layer ``source`` import one of layer ``target``?"""
    if source in ("cli", "main"):
        return True
    if source in WINGS:
        return target in ("base", source)
    return target == "base"


class LayerTests(SynchronousTestCase):
    def test_importsPointDown(self) -> None:
        """No wing imports another wing or the command, and the base imports no wing."""
        known = modules()
        self.assertIn("tcplab.multi.hub", known)
        wrong = []
        for module, tree in sorted(known.items()):
            for target in sorted(imported(tree, module)):
                if target in known and not allowed(layer(module), layer(target)):
                    wrong.append(f"{module} imports {target}")
        self.assertEqual(wrong, [])

    def test_onlyTheCommandPrints(self) -> None:
        """Protocol, tap and base modules neither print nor read sys.argv (the command does both)."""
        wrong = []
        for module, tree in sorted(modules().items()):
            if layer(module) in ("cli", "main"):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    wrong.append(f"{module}:{node.lineno} calls print")
                if isinstance(node, ast.Attribute) and node.attr == "argv":
                    wrong.append(f"{module}:{node.lineno} reads argv")
        self.assertEqual(wrong, [])

    def test_checkerSeesAWrongImport(self) -> None:
        """The layer rule refuses a wing importing another wing, and the base importing a wing."""
        tree = ast.parse("from tcplab.multi.wire import escapeLine\nfrom tcplab import flow\n")
        self.assertEqual(imported(tree, "tcplab.file.store"), {"tcplab.multi.wire", "tcplab.multi.wire.escapeLine",
                                                              "tcplab", "tcplab.flow"})
        self.assertFalse(allowed(layer("tcplab.file.store"), layer("tcplab.multi.wire")))
        self.assertFalse(allowed(layer("tcplab.flow"), layer("tcplab.echo.server")))
        self.assertTrue(allowed(layer("tcplab.echo.tap"), layer("tcplab.listening")))
        self.assertTrue(allowed(layer("tcplab.cli.demo"), layer("tcplab.file.tap")))
