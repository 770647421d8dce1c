"""``tcplab echo``: the Task 1 client, which is also the Task 2 chat client."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable

from tcplab.cli.common import ClientOptions, connect, readStdin, writeStdout
from tcplab.echo.client import EchoClient, InputLines, TerminalText, UDPEchoClient
from tcplab.errors import ConnectFailed, UsageProblem
from tcplab.escaping import showable
from tcplab.interfaces import IReactor

#: With --udp, stdin is read whole before the datagrams go (each line one datagram).
MAX_UDP_INPUT = 1 << 20
#: The largest UDP payload over IPv4 (65535 less the IP and UDP headers).
MAX_DATAGRAM = 65507


class Options(ClientOptions):
    command = "echo"
    synopsis = ("[--host H] [--port P] [--connect ENDPOINT] [--tls] [--ca PEM] [--timeout S] [--udp] "
                "[MESSAGE ...]")
    description = (
        "With MESSAGEs: send each as a line, print each echo, exit 0 once all came back. "
        "Without: send stdin's lines and print everything the server sends (a chat client for "
        "tcplab-multi); at end of input wait up to --timeout for the echoes still due."
    )
    operands = "messages"
    operandName = "MESSAGE"
    operandHelp = "Lines to send (default: stdin's lines)."

    @classmethod
    def addArguments(cls, parser: argparse.ArgumentParser) -> None:
        super().addArguments(parser)
        parser.add_argument("-u", "--udp", action="store_true",
                            help="Use UDP datagrams (one per message) instead of TCP (default: off).")

    def postOptions(self) -> None:
        self["messages"] = [line for m in self["messages"] for line in os.fsencode(m).split(b"\n")]
        super().postOptions()
        if self["udp"] and self["connect"]:
            raise UsageProblem("--udp takes --host/--port, not --connect")


async def run(reactor: IReactor, options: Options) -> None:
    terminal = TerminalText() if sys.stdout.isatty() else None

    def output(data: bytes) -> None:
        """Byte-exact into a pipe (RFC 862 users pipe binary through); escaped on a terminal,
        so no server, tcplab or not, can clear the screen, retitle it or forge a line."""
        writeStdout(data if terminal is None else terminal.feed(data))

    if options["udp"]:
        await _runUDP(reactor, options, (lambda data: writeStdout(showable(data))) if terminal else writeStdout)
        return
    client = EchoClient(output, reactor, options["timeout"], _notice)
    await connect(reactor, options, client)
    if options["messages"]:
        client.sendLines(options["messages"])
        client.endInput()
    else:
        client.readFrom(readStdin(reactor, InputLines(client)))
    try:
        await client.done
    finally:
        if terminal is not None and terminal.held:
            writeStdout(terminal.flush())


def _notice(text: str) -> None:
    print(f"tcplab: {text}", file=sys.stderr, flush=True)


async def _runUDP(reactor: IReactor, options: Options, output: Callable[[bytes], None]) -> None:
    messages = options["messages"]
    if not messages:
        if os.isatty(0):
            raise UsageProblem("with --udp, give MESSAGEs or pipe lines into stdin")
        data = sys.stdin.buffer.read(MAX_UDP_INPUT + 1)
        if len(data) > MAX_UDP_INPUT:
            raise UsageProblem(f"with --udp, stdin may hold at most {MAX_UDP_INPUT} bytes (one datagram a line)")
        messages = [line for line in data.split(b"\n") if line]
    longest = max(map(len, messages), default=0)
    if longest > MAX_DATAGRAM:
        raise UsageProblem(f"a UDP message may be at most {MAX_DATAGRAM} bytes (one has {longest}): use TCP for more")
    try:
        infos = socket.getaddrinfo(options["host"], options["port"], type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ConnectFailed(f"cannot resolve {options['host']}: {e.strerror}") from None
    # IPv4 first: the servers bind IPv4 by default, and "localhost" often resolves to ::1 first.
    family, _, _, _, address = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    client = UDPEchoClient(messages, output, reactor, options["timeout"])
    interface = "::" if family == socket.AF_INET6 else ""
    # Twisted reads at most 8192 bytes of a datagram by default: a longer echo would pass for truncated.
    port = reactor.listenUDP(0, client, interface=interface, maxPacketSize=MAX_DATAGRAM + 1)
    port.connect(address[0], address[1])  # type: ignore[attr-defined]  # listenUDP's port is an IUDPTransport
    client.send()
    try:
        await client.done
    finally:
        port.stopListening()
