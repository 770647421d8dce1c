"""The broadcast servers of the multi workloads (storm, fanout, multi-memory) and the C client that drives them.

Each server speaks a slightly different line protocol, and the client has to know how:

- tcplab-multi echoes every line to its sender and relays it to the others as ``<NAME> LINE``;
  it greets with ``* welcome`` and announces joins and leaves while at most ``--notice-limit``
  (100) clients are connected. Measured twice: as users get it, and with ``--notice-limit 0``,
  which sends no notices, as the peers send none.
- The equal-work chat (bench/peers/twisted_chatequal.py, the baseline of the storm's "at equal work" ratio)
  is a plain Twisted ``LineReceiver`` doing what tcplab-multi does per connection (join at accept, echo
  to the sender, ``<NAME> LINE`` to the others) and nothing more.
- The Twisted docs' chat (bench/peers/twisted_chat.py, the howto's, the baseline) wants a name as the
  first line, lines end in ``\\r\\n``, and relays only to the others: no echo.
- Twisted's chatserver.py example (bench/peers/twisted_chatexample.py) takes lines ending in ``\\r\\n``
  and sends each to every client, the sender included (ending it with ``\\n``): it echoes.
- ``ncat --broker`` relays whatever bytes a client sends, per read, to every other client: no
  echo, no framing, no names. ``--max-conns`` is raised from ncat's default of 100, which a storm
  of 100 at a time plus the witness would exceed; above about 1,020 clients ncat aborts (it
  watches its sockets with select(), limited to file descriptors below 1024).
- ``ncat --chat`` is ``--broker`` that prefixes each read with ``<userN>`` (optional: the issue
  measured it losing lines).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BenchError, servers
from bench.loadclient import BuildFailed, buildC

SOURCE = Path(__file__).with_name("chatclient.c")

#: ncat's --max-conns for the storm and fan-out: above the 101 connections they need, below the
#: select() limit (file descriptors under 1024) at which ncat aborts.
NCAT_MAX_CONNS = 1000


@dataclass(frozen=True)
class ChatServer:
    """A broadcast server and how to talk to it."""

    spec: servers.ServerSpec
    echoes: bool
    crlf: bool = False
    names: bool = False
    program: str = ""
    about: str = ""
    #: False for a plain echo server: the storm runs without the witness (nothing is relayed to it).
    witness: bool = True
    #: The server that does the same work per connection, the storm's "at equal work" ratio is against it.
    peer: str = "twisted-equal"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.label

    def missing(self) -> str:
        """Why this server cannot run here ("" if it can): its program is not installed."""
        if self.program and shutil.which(self.program) is None:
            return (f"{self.label} skipped: `{self.program}` is not installed "
                    f"(Debian/Ubuntu: apt install {self.program})")
        return ""


def ncat(mode: str, maxConns: int) -> Callable[[int], list[str]]:
    return lambda port: ["ncat", "-l", mode, "-k", "--max-conns", str(maxConns), servers.HOST, str(port)]


def chatServers(ncatMaxConns: int = NCAT_MAX_CONNS) -> dict[str, ChatServer]:
    return {
        "tcplab": ChatServer(
            servers.ServerSpec("tcplab", "tcplab-multi", servers.tcplabServer("tcplab-multi")),
            echoes=True,
            about="defaults: join/leave notices while at most 100 clients are connected",
        ),
        "tcplab-quiet": ChatServer(
            servers.ServerSpec(
                "tcplab-quiet",
                "tcplab-multi --notice-limit 0",
                servers.tcplabServer("tcplab-multi", "--notice-limit", "0"),
            ),
            echoes=True,
            about="no join/leave notices, like the peers",
        ),
        "twisted": ChatServer(
            servers.ServerSpec(
                "twisted", "plain Twisted chat (docs)", servers.peerScript("twisted_chat.py"), baseline=True
            ),
            echoes=False,
            crlf=True,
            names=True,
            about="LineReceiver chat from Twisted's howto: a name first, relays to the others only",
        ),
        "twisted-equal": ChatServer(
            servers.ServerSpec(
                "twisted-equal", "plain Twisted chat, equal work", servers.peerScript("twisted_chatequal.py")
            ),
            echoes=True,
            about="LineReceiver chat doing what tcplab-multi does per connection: joins at accept, echoes a line to "
            "its sender and sends it as <NAME> LINE to the others; no welcome, notices, limits, logs or flow control",
        ),
        "twisted-example": ChatServer(
            servers.ServerSpec(
                "twisted-example", "Twisted chatserver.py example (docs)", servers.peerScript("twisted_chatexample.py")
            ),
            echoes=True,
            crlf=True,
            about="LineReceiver chat from Twisted's examples: joins at connect, sends every line to everyone, "
            "the sender included",
        ),
        "ncat": ChatServer(
            servers.ServerSpec("ncat", "ncat --broker", ncat("--broker", ncatMaxConns)),
            echoes=False,
            program="ncat",
            about=f"`ncat -l --broker -k --max-conns {ncatMaxConns}`: relays each read to the others",
        ),
        "ncat-chat": ChatServer(
            servers.ServerSpec("ncat-chat", "ncat --chat", ncat("--chat", ncatMaxConns)),
            echoes=False,
            program="ncat",
            about=f"`ncat -l --chat -k --max-conns {ncatMaxConns}`: --broker with a <userN> prefix per read",
        ),
    }


def chooseServers(
    names: Sequence[str], table: dict[str, ChatServer], progress: Callable[[str], None]
) -> tuple[list[ChatServer], list[str]]:
    """The servers that can run here, and a note for each one skipped (never faked)."""
    chosen, skipped = [], []
    for name in names:
        server = table[name]
        why = server.missing()
        if why:
            skipped.append(why)
            progress(why)
        else:
            chosen.append(server)
    return chosen, skipped


def serverListType(table: dict[str, ChatServer]) -> Callable[[str], list[str]]:
    import argparse

    def parse(value: str) -> list[str]:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in table]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"servers are a comma list of {', '.join(table)}; got {value!r}")
        return names

    return parse


@dataclass(frozen=True)
class ChatClient:
    """The compiled chatclient.c."""

    binary: Path

    @classmethod
    def build(cls) -> ChatClient:
        return cls(buildC(sourcePath=SOURCE))

    def flags(self, server: ChatServer) -> list[str]:
        flags = []
        if server.echoes:
            flags.append("--echo")
        if server.crlf:
            flags.append("--crlf")
        if server.names:
            flags.append("--names")
        if not server.witness:
            flags.append("--nowitness")
        return flags

    def run(
        self,
        args: Sequence[str],
        limit: float,
        running: servers.RunningServer | None = None,
        sample: Callable[[], None] | None = None,
    ) -> dict:
        """Run the client, calling ``sample`` every 50 ms while it runs; its JSON result, with
        ``error`` set if it failed, and the server's CPU share over the run if ``running`` is given."""
        cpuBefore = running.cpuSeconds() if running else 0.0
        began = time.monotonic()
        with subprocess.Popen(
            [str(self.binary), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as process:
            while process.poll() is None:
                if time.monotonic() - began > limit:
                    process.kill()
                    process.wait()
                    return {"error": f"chat client did not finish within {limit:.0f} s"}
                if sample:
                    sample()
                time.sleep(0.05)
            out, err = process.communicate()
        wall = time.monotonic() - began
        lines = out.strip().splitlines()
        if process.returncode != 0 or not lines:
            why = err.strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
            return {"error": f"chat client failed: {why[0]}"}
        result = json.loads(lines[-1])
        if running is not None:
            try:
                result["server_cpu"] = (running.cpuSeconds() - cpuBefore) / wall if wall else 0.0
            except OSError:
                result["server_cpu"] = None
        return result

    def storm(
        self, server: ChatServer, port: int, connections: int, concurrency: int, timeout: float, deadline: float,
        running: servers.RunningServer | None = None,
    ) -> dict:
        args = ["storm", servers.HOST, str(port), str(connections), str(concurrency), *self.flags(server)]
        args += ["--timeout", repr(timeout), "--deadline", repr(deadline)]
        return self.run(args, deadline + 30, running)

    def fanout(
        self,
        server: ChatServer,
        port: int,
        listeners: int,
        lines: int,
        size: int,
        window: int,
        stall: float,
        deadline: float,
        stuck: bool = False,
        running: servers.RunningServer | None = None,
        sample: Callable[[], None] | None = None,
    ) -> dict:
        args = ["fanout", servers.HOST, str(port), str(listeners), str(lines), *self.flags(server)]
        args += ["--size", str(size), "--window", str(window), "--stall", repr(stall), "--deadline", repr(deadline)]
        if stuck:
            args.append("--stuck")
        return self.run(args, deadline + stall + 30, running, sample)


def clientOrNote(progress: Callable[[str], None]) -> tuple[ChatClient | None, str]:
    """The C chat client, or None and why (these workloads have no Python fallback)."""
    try:
        return ChatClient.build(), ""
    except BuildFailed as e:
        note = f"skipped: the C chat client could not be built ({e}); these workloads have no Python fallback"
        progress(note)
        return None, note


def runRounds(
    options: Any,
    progress: Callable[[str], None],
    table: dict[str, ChatServer],
    measure: Callable[[ChatClient, ChatServer, Any, Any], dict],
    describe: Callable[[dict], str],
    summarize: Callable[[Sequence[ChatServer], dict[str, list[dict]]], list[dict]],
) -> list[dict]:
    """The rounds every chat workload runs: fresh servers each round, each measured once in
    an order that rotates between rounds, a progress line per measurement, then the summary
    rows and a note for every server left out."""
    servers.raiseOpenFilesLimit()
    client, why = clientOrNote(progress)
    if client is None:
        return [{"skipped": why}]
    chosen, skipped = chooseServers(options.servers, table, progress)
    results: dict[str, list[dict]] = {s.name: [] for s in chosen}
    with tempfile.TemporaryDirectory(prefix="tcplab-bench-") as workdir:
        for round_ in range(options.rounds):
            with servers.running([s.spec for s in chosen], Path(workdir)) as started:
                shift = round_ % len(started)
                order = list(zip(chosen, started, strict=True))
                for server, running in order[shift:] + order[:shift]:
                    result = measure(client, server, running, options)
                    results[server.name].append(result)
                    progress(f"round {round_ + 1}/{options.rounds} {server.label:<30} {describe(result)}"
                             + (f"  [{result['error']}]" if result.get("error") else ""))
    return summarize(chosen, results) + [{"skipped": note} for note in skipped]


def finishMeasure(result: dict, server: ChatServer, running: Any, doneKey: str) -> dict:
    """End a chat measurement: a run that did not get as far as ``doneKey`` is an error naming the
    server (with its log), otherwise note whether the server survived and its peak memory."""
    if result.get("error") and doneKey not in result:
        raise BenchError(f"{server.label}: {result['error']}{running.logTail()}")
    result["alive"] = running.alive()
    result["peak_rss_mib"] = running.memory().hwm / servers.MiB if result["alive"] else None
    return result
