"""The chat server from Twisted's documentation ("Writing Servers" howto, listings/servers/chat.py).

Kept as the docs have it: a ``LineReceiver`` (lines end in ``\\r\\n``, its default delimiter)
whose first line is the client's name ("What's your name?"), after which every line goes to
every *other* client as ``<NAME> LINE``. It does not echo a line to its sender, sends no join or
leave notices, and has no flow control: a client that does not read makes it buffer everything
sent to that client. Only the port comes from argv, and it listens on loopback (the docs use
port 8123 and all interfaces; ``listenTCP``'s backlog stays at Twisted's default of 50).

usage: python bench/peers/twisted_chat.py PORT
"""

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class Chat(LineReceiver):
    def __init__(self, users):
        self.users = users
        self.name = None
        self.state = "GETNAME"

    def connectionMade(self):
        self.sendLine(b"What's your name?")

    def connectionLost(self, reason):
        if self.name in self.users:
            del self.users[self.name]

    def lineReceived(self, line):
        if self.state == "GETNAME":
            self.handle_GETNAME(line)
        else:
            self.handle_CHAT(line)

    def handle_GETNAME(self, name):
        if name in self.users:
            self.sendLine(b"Name taken, please choose another.")
            return
        self.sendLine(f"Welcome, {name.decode('utf-8')}!".encode("utf-8"))  # noqa: UP012 (as in the docs)
        self.name = name
        self.users[name] = self
        self.state = "CHAT"

    def handle_CHAT(self, message):
        message = f"<{self.name.decode('utf-8')}> {message.decode('utf-8')}".encode("utf-8")  # noqa: UP012
        for name, protocol in self.users.items():  # noqa: B007 (as in the docs)
            if protocol != self:
                protocol.sendLine(message)


class ChatFactory(Factory):
    def __init__(self):
        self.users = {}  # maps user names to Chat instances

    def buildProtocol(self, addr):
        return Chat(self.users)


def main(port: int) -> None:
    reactor.listenTCP(port, ChatFactory(), interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    main(int(sys.argv[1]))
