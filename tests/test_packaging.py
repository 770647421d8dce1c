"""What ``pip install .`` installs: every package of the source tree."""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sourcePackages(top: str) -> set[str]:
    """Every folder under ``top`` holding Python modules, as a dotted package name."""
    found = set()
    for folder, subfolders, files in os.walk(os.path.join(ROOT, top)):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    return found


class SetupCfgTests(SynchronousTestCase):
    def test_everyPackageIsListed(self) -> None:
        """setup.cfg's packages names every folder of tcplab/ with modules, so pip install . leaves no wing out."""
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        missing = sorted(sourcePackages("tcplab") - listed)
        self.assertEqual(missing, [], f"add {', '.join(missing)} to [options] packages in setup.cfg")
        self.assertIn("twisted.plugins", listed, "the twistd plugins would not be installed")

    def test_everyPackageHasAnInit(self) -> None:
        """Every folder of tcplab/ with modules has an __init__.py (a namespace package is easy to leave out)."""
        for package in sorted(sourcePackages("tcplab")):
            init = os.path.join(ROOT, *package.split("."), "__init__.py")
            self.assertTrue(os.path.exists(init), f"{package} has no __init__.py")
