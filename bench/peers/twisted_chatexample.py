"""The other chat server in Twisted's documentation: docs/core/examples/chatserver.py ("The most basic chat
protocol possible").

Kept as the docs have it: a ``LineReceiver`` (lines end in ``\\r\\n`` coming in) that adds a client to the
room when it connects and sends every line it reads to *every* client, the sender included, with ``\\n``
after it; it prints a line for every connection and every line it receives (to the bench's log file here).
Unlike the howto chat (twisted_chat.py) it echoes to the sender and takes clients in at connect, as
tcplab-multi does, so in a storm it does the same broadcasting. The docs run it with ``twistd -y`` on port
1025; here only the port comes from argv, on loopback, under a bare reactor (like the other peers).

usage: python bench/peers/twisted_chatexample.py PORT
"""

import sys

from twisted.protocols import basic


class MyChat(basic.LineReceiver):
    def connectionMade(self):
        print("Got new client!")
        self.factory.clients.append(self)

    def connectionLost(self, reason):
        print("Lost a client!")
        self.factory.clients.remove(self)

    def lineReceived(self, line):
        print("received", repr(line))
        for c in self.factory.clients:
            c.message(line)

    def message(self, message):
        self.transport.write(message + b"\n")


def main(port: int) -> None:
    from twisted.internet import protocol, reactor

    factory = protocol.ServerFactory()
    factory.protocol = MyChat
    factory.clients = []  # type: ignore[attr-defined]
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    main(int(sys.argv[1]))
