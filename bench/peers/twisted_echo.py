"""The echo server from Twisted's documentation (docs/core/examples/simpleserv.py).

Kept as the docs have it, `Echo(Protocol)` writing back what it receives, served
by ``reactor.listenTCP``; only the port comes from argv and it listens on
loopback, with Twisted's default backlog of 50 unless ``--backlog N`` is given
(the storm gives it tcplab's 1,024, so that neither server loses handshakes to a
full accept queue). It has no backpressure: a client that does not read makes it buffer
everything it is sent. This is the "plain Twisted" baseline of the ratios.

usage: python bench/peers/twisted_echo.py PORT [--backlog N]
"""

import sys

from twisted.internet import protocol, reactor


class Echo(protocol.Protocol):
    """This is just about the simplest possible protocol"""

    def dataReceived(self, data):
        "As soon as any data is received, write it back."
        self.transport.write(data)


def main(port: int, backlog: int = 50) -> None:
    """This runs the protocol on port PORT"""
    factory = protocol.ServerFactory()
    factory.protocol = Echo
    reactor.listenTCP(port, factory, backlog=backlog, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]), int(args[args.index("--backlog") + 1]) if "--backlog" in args else 50)
