"""A plain Twisted chat doing per connection what tcplab-multi does: the equal-work peer of the storm.

Written the way the Twisted docs write a chat (a ``LineReceiver`` and a factory holding the
room), changed only where tcplab-multi's work differs from the howto chat's: a client joins the
room when it is accepted, under its address (``host:port``) as its name; every line goes back to
its sender as it came and to every *other* client as ``<NAME> LINE``; lines end in ``\\n``. No
welcome line, no notices, no limits, no logging and no flow control: a client that does not read
makes it buffer everything sent to that client. Only the port comes from argv, on loopback, with
tcplab-multi's backlog of 1,024 (Twisted's default of 50 overflows in a storm of 100 at a time,
and the retries would measure the kernel's SYN back-off instead of the server).

usage: python bench/peers/twisted_chatequal.py PORT
"""

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class Chat(LineReceiver):
    delimiter = b"\n"

    def __init__(self, users):
        self.users = users
        self.name = None

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.name = f"{peer.host}:{peer.port}".encode()
        self.users[self] = None

    def connectionLost(self, reason):
        self.users.pop(self, None)

    def lineReceived(self, line):
        self.sendLine(line)
        message = b"<" + self.name + b"> " + line
        for protocol in self.users:
            if protocol is not self:
                protocol.sendLine(message)


class ChatFactory(Factory):
    def __init__(self):
        self.users = {}  # the room: every connected Chat, in join order

    def buildProtocol(self, addr):
        return Chat(self.users)


def main(port: int) -> None:
    reactor.listenTCP(port, ChatFactory(), backlog=1024, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    main(int(sys.argv[1]))
