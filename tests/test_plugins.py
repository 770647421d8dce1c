"""twistd finds tcplab's plugins, and each plugin builds its service."""

from __future__ import annotations

import os
import subprocess

from twisted.application import service
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial import unittest

from tests.support import TWISTD, childEnv

NAMES = {"tcplab-echo", "tcplab-multi", "tcplab-file"}


class PluginDiscoveryTests(unittest.TestCase):
    def test_getPlugins(self) -> None:
        """twistd finds the tcplab plugins, each with options it can parse."""
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


class TacFileTests(unittest.TestCase):
    """``twistd -ny tac/NAME.tac`` builds the same server as the plugin, with the documented port."""

    def test_eachTacFileBuildsItsServer(self) -> None:
        """Each tac file builds its one server, named for its wing and listening on its usual port."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for name, port in (("echo", 7000), ("multi", 7001), ("file", 9000)):
            application = service.loadApplication(os.path.join(root, "tac", f"{name}.tac"), "python")
            top = service.IService(application)
            services = list(top)
            self.assertEqual(len(services), 1, name)
            self.assertEqual(services[0].name, f"tcplab-{name}")
            self.assertIn(f"tcp:{port}:", " ".join(_descriptions(services[0])), name)


def _descriptions(svc: object) -> list[str]:
    found = list(getattr(svc, "descriptions", []))
    for child in getattr(svc, "services", []):
        found += _descriptions(child)
    return found
