"""The echo server from Twisted's documentation (docs/core/examples/simpleserv.py).

Kept as the docs have it, `Echo(Protocol)` writing back what it receives, served
by ``reactor.listenTCP``; only the port comes from argv and it listens on
loopback. It has no backpressure: a client that does not read makes it buffer
everything it is sent. This is the "plain Twisted" baseline of the ratios.

usage: python bench/peers/twisted_echo.py PORT
"""

import sys

from twisted.internet import protocol, reactor


class Echo(protocol.Protocol):
    """This is just about the simplest possible protocol"""

    def dataReceived(self, data):
        "As soon as any data is received, write it back."
        self.transport.write(data)


def main(port: int) -> None:
    """This runs the protocol on port PORT"""
    factory = protocol.ServerFactory()
    factory.protocol = Echo
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    main(int(sys.argv[1]))
