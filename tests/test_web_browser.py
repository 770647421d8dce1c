"""The web pages in a real headless Chromium (selenium + Debian's chromium and chromium-driver),
against tcplab servers running as processes, as users run them."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import TCPLAB, ServerProcess, childEnv, scratch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where the pages' screenshots go: README's pictures with TCPLAB_SCREENSHOTS=1 (to refresh them),
#: else a scratch folder, so a test run leaves the checkout as it was.
SHOTS = os.path.join(ROOT, "docs", "img") if os.environ.get("TCPLAB_SCREENSHOTS") == "1" else tempfile.mkdtemp(
    prefix="tcplab-shots-")

try:
    import selenium
except ImportError:
    selenium = None


def browser(case: TestCase) -> Any:
    """A fresh headless Chromium with its own profile, quit after the test (or a skip saying what is missing)."""
    if selenium is None:
        raise SkipTest("selenium is not installed (pip install -e '.[test]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        raise SkipTest("needs chromium and chromedriver (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="tcplab-chromium-")
    case.addCleanup(shutil.rmtree, profile, True)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    case.addCleanup(driver.quit)
    driver.set_page_load_timeout(20)
    return driver


def waitFor(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns something true, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class WebServer(ServerProcess):
    """A server started with ``--port 0 --web tcp:0:interface=127.0.0.1``: ``port`` is its TCP port, ``web``
    the page's."""

    def __init__(self, plugin: str, *argv: str) -> None:
        super().__init__(plugin, "--port", "0", "--interface", "127.0.0.1", "--web", "tcp:0:interface=127.0.0.1",
                         *argv)
        self.web = self._nextPort()
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _nextPort(self) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode("utf-8", "replace")
            if not line:
                break
            self.log.append(line)
            match = re.search(r"Site starting on (\d+)", line)
            if match:
                return int(match.group(1))
        self.stop()
        raise RuntimeError("the web page did not start:\n" + "".join(self.log))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.log.append(raw.decode("utf-8", "replace"))

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return "".join(self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web}/"


def logText(driver: Any) -> str:
    return driver.find_element("id", "log").text


class MultiPageTests(TestCase):
    """The hub's page: a browser in the same room as terminal clients."""

    def setUp(self) -> None:
        self.driver = browser(self)
        self.server = WebServer("tcplab-multi", "--stats-interval", "0")
        self.addCleanup(self.server.stop)

    def join(self) -> Any:
        self.driver.get(self.server.url)
        waitFor(lambda: "welcome, you are" in logText(self.driver), "the browser's welcome")
        return self.driver

    def say(self, line: str) -> None:
        box = self.driver.find_element("id", "line")
        box.send_keys(line)
        self.driver.find_element("id", "send").click()

    def test_browserAndEchoClientChat(self) -> None:
        """A line typed in the page reaches a `tcplab echo` client and the client's line shows in the page."""
        driver = self.join()
        client = subprocess.Popen([*TCPLAB, "echo", "--host", "127.0.0.1", "--port", str(self.server.port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=childEnv())
        self.addCleanup(lambda: client.poll() is None and client.kill())
        assert client.stdin is not None and client.stdout is not None
        waitFor(lambda: "joined" in logText(driver), "the terminal client's join notice")
        self.say("/nick browser")
        waitFor(lambda: "you are now browser" in logText(driver), "the rename")
        self.say("hello from chromium")
        client.stdin.write(b"hello from the terminal\n")
        client.stdin.flush()
        waitFor(lambda: re.search(r"<127\.0\.0\.1:\d+> hello from the terminal", logText(driver)),
                "the terminal's line in the page")
        self.say("/who")
        waitFor(lambda: "2 connected: " in logText(driver), "the /who reply")
        driver.save_screenshot(os.path.join(SHOTS, "web-multi.png"))
        seen = b""
        deadline = time.monotonic() + 15
        while b"<browser> hello from chromium" not in seen and time.monotonic() < deadline:
            seen += client.stdout.readline()
        client.stdin.close()
        client.wait(timeout=15)
        self.assertIn(b"<browser> hello from chromium\n", seen)

    def test_htmlLineShowsAsText(self) -> None:
        """A line of HTML from another client shows literally in the page: no element is made, no script runs."""
        driver = self.join()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as sock:
            sock.sendall(b"<img src=x onerror=\"document.title='pwned'\"><b>bold</b><script>alert(1)</script>\n")
            waitFor(lambda: "<script>alert(1)</script>" in logText(driver), "the HTML line as text")
            self.assertEqual(driver.find_elements("css selector", "#log b, #log img, #log script"), [])
            self.assertNotEqual(driver.title, "pwned")

    def test_otherOriginCannotOpenWebSocket(self) -> None:
        """A page served from another origin cannot open the hub's WebSocket, while the hub's own page can."""
        other = scratch(self)
        with open(os.path.join(other, "index.html"), "w") as f:
            f.write("<!doctype html><title>other</title><script>"
                    f"const ws = new WebSocket('ws://127.0.0.1:{self.server.web}/ws');"
                    "ws.onopen = () => { document.title = 'opened'; };"
                    "ws.onclose = () => { if (document.title !== 'opened') document.title = 'refused'; };"
                    "</script>")
        elsewhere = subprocess.Popen(
            ["python3", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", other],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: (elsewhere.terminate(), elsewhere.wait()))
        assert elsewhere.stdout is not None
        port = int(re.search(rb"port (\d+)", elsewhere.stdout.readline()).group(1))  # type: ignore[union-attr]
        self.driver.get(f"http://127.0.0.1:{port}/")
        self.assertEqual(waitFor(lambda: self.driver.title in ("opened", "refused") and self.driver.title,
                                 "the WebSocket's outcome"), "refused")
        self.join()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FilePageTests(TestCase):
    """The upload page: into the same verified store as `tcplab send`."""

    def setUp(self) -> None:
        self.driver = browser(self)
        self.dir = os.path.join(scratch(self), "drop")
        os.mkdir(self.dir)
        self.files = scratch(self)

    def start(self, *argv: str) -> WebServer:
        server = WebServer("tcplab-file", "--dir", self.dir, *argv)
        self.addCleanup(server.stop)
        self.driver.get(server.url)
        return server

    def pick(self, path: str) -> str:
        """Upload ``path`` through the file input and return the verdict row's text."""
        self.driver.find_element("id", "files").send_keys(path)
        return waitFor(lambda: (rows := self.driver.find_elements("css selector", "#results tr")) and
                       self.driver.find_element("id", "status").text == "done" and rows[-1].text,
                       "the server's verdict", timeout=60)

    def test_uploadArrivesWithSameHash(self) -> None:
        """A file picked in the page is stored as received_NAME, and the page shows the server's SHA-256 of it."""
        self.start()
        path = os.path.join(self.files, "notes.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(3 * 1024 * 1024 + 17))
        verdict = self.pick(path)
        stored = os.path.join(self.dir, "received_notes.bin")
        self.assertTrue(os.path.exists(stored), verdict)
        self.assertEqual(sha256(stored), sha256(path))
        self.assertIn("stored as received_notes.bin", verdict)
        self.assertIn(sha256(path), verdict)
        self.assertIn("the server's SHA-256", verdict)
        self.driver.save_screenshot(os.path.join(SHOTS, "web-file.png"))

    def test_overMaxSizeShowsServerError(self) -> None:
        """A file over --max-size is refused and the page shows the server's error code and message."""
        self.start("--max-size", "1K")
        path = os.path.join(self.files, "big.bin")
        with open(path, "wb") as f:
            f.write(b"x" * 5000)
        verdict = self.pick(path)
        self.assertIn("too-large", verdict)
        self.assertEqual(os.listdir(self.dir), [])

    def test_tokenIsAsked(self) -> None:
        """With --token-file the page asks for the token, and an upload with it is stored."""
        token = os.path.join(self.files, "token")
        with open(token, "w") as f:
            f.write("s3cret-token\n")
        self.start("--token-file", token)
        box = waitFor(lambda: (e := self.driver.find_element("id", "token")).is_displayed() and e, "the token box")
        box.send_keys("s3cret-token")
        path = os.path.join(self.files, "a.txt")
        with open(path, "wb") as f:
            f.write(b"hello\n")
        self.assertIn("stored as received_a.txt", self.pick(path))


class EchoPageTests(TestCase):
    """tcplab-echo's page: the live view alone, watching connections come and go."""

    def setUp(self) -> None:
        self.driver = browser(self)
        self.server = WebServer("tcplab-echo")
        self.addCleanup(self.server.stop)

    def test_liveViewShowsConnections(self) -> None:
        """While five TCP clients are connected the page says 5 connected, and 0 once they are gone."""
        self.driver.get(self.server.url)
        shown = lambda: self.driver.find_element("id", "live-connections").text  # noqa: E731
        waitFor(lambda: shown() == "0", "the live view's first figures")
        clients = [socket.create_connection(("127.0.0.1", self.server.port), timeout=10) for _ in range(5)]
        try:
            for client in clients:
                client.sendall(b"x" * 4096)
            waitFor(lambda: shown() == "5", "5 connected in the page")
            self.driver.save_screenshot(os.path.join(SHOTS, "web-echo.png"))
        finally:
            for client in clients:
                client.close()
        waitFor(lambda: shown() == "0", "0 connected once the clients left")
