"""``tcplab demo``: the whole lab in one command, on loopback, with the real servers and clients.

Servers run in this process (the same ``makeService`` twistd calls), clients are the
same protocol classes ``tcplab echo`` and ``tcplab send`` use, and everything talks
over real sockets on 127.0.0.1. Server log lines are shown as they happen.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from tcplab.cli import send as sendcli
from tcplab.cli.common import ClientOptions, CommandOptions, connect
from tcplab.echo import tap as echotap
from tcplab.echo.client import EchoClient, LineBuffer
from tcplab.errors import LocalFileError, TcplabError
from tcplab.file import tap as filetap
from tcplab.interfaces import IReactor
from tcplab.multi import tap as multitap

Say = Callable[[str], None]


class Options(CommandOptions):
    command = "demo"
    synopsis = "[--dir DIR]"
    description = "Replay the lab's three tasks on loopback: echo, a multi-client storm and chat, a verified upload."

    @classmethod
    def addArguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-d", "--dir", default=None, help="Folder for Task 3's files "
                            "(default: a temporary folder, removed afterwards).")


class DemoFailed(TcplabError):
    """A demo step did not show what it should."""


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextmanager
def serverLog(out: Say, namespaces: tuple[str, ...]) -> Iterator[list[str]]:
    """Show the servers' own log lines (those of ``namespaces``) as ``server | ...``."""
    seen: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith(namespaces):
            text = formatEvent(event)
            seen.append(text)
            try:
                out(f"    server | {text}")
            except BrokenPipeError:
                pass  # the command's own next write ends it quietly

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


def startServer(tap: ModuleType, argv: list[str]) -> tuple[IService, int]:
    """Build and start a server exactly as twistd would, on a free loopback port."""
    options = tap.Options()
    options.parseOptions(["--port", "0", "--interface", "127.0.0.1", *argv])
    service = tap.makeService(options)
    service.startService()
    return service, _listeningPort(service)


def _listeningPort(service: object) -> int:
    for candidate in _walk(service):
        ports = getattr(candidate, "ports", None)
        if ports:
            return int(ports[0].getHost().port)
    raise DemoFailed("the server did not report a listening port")


def _walk(service: object) -> Iterator[object]:
    yield service
    for child in getattr(service, "services", []) or []:
        yield from _walk(child)


def byLine(handle: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """An EchoClient output that calls ``handle`` once per received line (newline included)."""
    buffer = LineBuffer()

    def feed(data: bytes) -> None:
        block = buffer.feed(data)
        if block:
            for line in block[:-1].split(b"\n"):
                handle(line + b"\n")

    return feed


def clientOptions(port: int, *argv: str) -> ClientOptions:
    options = ClientOptions()
    options.parseOptions(["--host", "127.0.0.1", "--port", str(port), *argv])
    return options


async def task1(reactor: IReactor, out: Say) -> None:
    out("Task 1: echo server and client (twistd -n --pidfile= tcplab-echo; tcplab echo hello)")
    with serverLog(out, ("tcplab.echo.server",)) as seen:
        service, port = startServer(echotap, [])
        try:
            lines: list[bytes] = []

            def received(line: bytes) -> None:
                lines.append(line)
                out(f"    client | {line.decode('utf-8', 'backslashreplace').rstrip()}")

            client = EchoClient(byLine(received), reactor, 5)
            await connect(reactor, clientOptions(port), client)
            client.sendLines([b"hello"])
            client.endInput()
            await client.done
            await deferLater(reactor, 0.05, lambda: None)
        finally:
            await service.stopService()
    if lines != [b"hello\n"] or not any("connection from" in s for s in seen):
        raise DemoFailed("Task 1: the echo did not come back as sent")
    out("    ok: the server saw its first contact and the client got 'hello' back")


async def task2(reactor: IReactor, out: Say, clients: int = 300, atOnce: int = 50) -> None:
    out(f"Task 2: multi-client server (twistd -n --pidfile= tcplab-multi): "
        f"a storm of {clients} clients, {atOnce} at a time")
    service, port = startServer(multitap, ["--stats-interval", "0"])
    try:
        errors: list[str] = []
        started = time.monotonic()

        async def one(i: int) -> None:
            client = EchoClient(lambda line: None, reactor, 10)
            try:
                await connect(reactor, clientOptions(port), client)
                client.sendLines([b"storm line %d" % i])
                client.endInput()
                await client.done
            except TcplabError as e:
                errors.append(str(e))

        await _bounded(reactor, [one(i) for i in range(clients)], atOnce)
        elapsed = time.monotonic() - started
        out(f"    {clients - len(errors)} clients served, {len(errors)} errors, "
            f"{clients / elapsed:,.0f} connections/s")
        if errors:
            raise DemoFailed(f"Task 2: {len(errors)} storm clients failed, first: {errors[0]}")

        out("    three clients chat: alice, bob and carol")
        seen: dict[str, list[str]] = {}
        chatters: dict[str, EchoClient] = {}
        for name in ("alice", "bob", "carol"):
            lines = seen.setdefault(name, [])

            def record(line: bytes, lines: list[str] = lines) -> None:
                lines.append(line.decode("utf-8", "backslashreplace").rstrip("\n"))

            chatters[name] = client = EchoClient(byLine(record), reactor, 5)
            await connect(reactor, clientOptions(port), client)
            client.sendLines([b"/nick " + name.encode()])
        for said, (name, text) in enumerate((("alice", "hi all"), ("bob", "hello alice"), ("carol", "it works"))):
            chatters[name].sendLines([text.encode()])

            def heard(n: int = said + 1) -> bool:
                return all(sum(s.startswith("<") or not s.startswith(("*", "/")) for s in lines) >= n
                           for lines in seen.values())

            await _until(reactor, heard)
        for client in chatters.values():
            client.endInput()
            await client.done
        for name, lines in seen.items():
            for line in lines:
                if line.startswith("<") or not line.startswith(("*", "/")):
                    out(f"    {name:>5} | {line}")
        for name, lines in seen.items():
            others = [line for line in lines if line.startswith("<")]
            if len(others) != 2:
                raise DemoFailed(f"Task 2: {name} saw {len(others)} of the 2 lines the others sent")
    finally:
        await service.stopService()
    out("    ok: every client got its own lines back and everyone else's, each with the sender's name")


SECRET = "important_secret_file.txt"


async def task3(reactor: IReactor, out: Say, folder: str) -> None:
    out("Task 3: file transfer (twistd -n --pidfile= tcplab-file --port 9000; tcplab send important_secret_file.txt)")
    local = os.path.join(folder, SECRET)
    with open(local, "wb") as f:
        for i in range(20000):
            f.write(b"line %05d of the important secret: the eagle lands at dawn\n" % i)
    with serverLog(out, ("tcplab.file.receiver",)):
        service, port = startServer(filetap, ["--dir", folder])
        try:
            options = sendcli.Options()
            options.parseOptions(["--host", "127.0.0.1", "--port", str(port), local])
            await sendcli.run(reactor, options)
            await deferLater(reactor, 0.05, lambda: None)
        finally:
            await service.stopService()
    stored = os.path.join(folder, "received_" + SECRET)
    if not os.path.isfile(stored):
        raise DemoFailed(f"Task 3: {stored} was not stored")
    sent, got = _sha256(local), _sha256(stored)
    out(f"    sha256 {sent}  {SECRET} (client)")
    out(f"    sha256 {got}  received_{SECRET} (server, {os.path.getsize(stored):,} bytes in {folder})")
    if sent != got:
        raise DemoFailed("Task 3: the stored file differs from the one sent")
    out("    ok: stored as received_important_secret_file.txt, byte for byte")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def _bounded(reactor: IReactor, jobs: list[Coroutine[Any, Any, None]], limit: int) -> None:
    """Run coroutines at most ``limit`` at a time."""
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:
            await job

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(limit)])


async def _until(reactor: IReactor, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoFailed("timed out waiting for the chat lines")
        await deferLater(reactor, 0.01, lambda: None)


async def step(label: str, work: Coroutine[Any, Any, None]) -> None:
    """Run one task; any failure in it is that task's failure, said so."""
    try:
        await work
    except DemoFailed:
        raise
    except TcplabError as e:
        raise DemoFailed(f"{label} failed: {e}") from None


async def run(reactor: IReactor, options: Options) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tcplab-demo-") as temporary:
        folder = options["dir"] or temporary
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise LocalFileError(f"cannot use --dir {folder}: {e.strerror}") from None
        await step("Task 1", task1(reactor, say))
        await step("Task 2", task2(reactor, say))
        await step("Task 3", task3(reactor, say, folder))
    say(f"All three tasks passed in {time.monotonic() - started:.1f}s.")
