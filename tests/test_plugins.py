"""twistd finds tcplab's plugins, and each plugin builds its service."""

from __future__ import annotations

import subprocess

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial import unittest

from tests.support import TWISTD, childEnv

NAMES = {"tcplab-echo", "tcplab-multi", "tcplab-file"}


class PluginDiscoveryTests(unittest.TestCase):
    def test_getPlugins(self) -> None:
        found = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertTrue(NAMES <= set(found), sorted(found))
        for name in NAMES:
            self.assertTrue(hasattr(found[name].options(), "parseOptions"))

    def test_twistdHelpListsThem(self) -> None:
        """As installed: twistd (run from outside the checkout) lists every server."""
        env = childEnv()
        env.pop("PYTHONPATH")
        out = subprocess.run([*TWISTD, "--help"], capture_output=True, timeout=60, env=env, cwd="/").stdout
        for name in NAMES:
            self.assertIn(name.encode(), out)
