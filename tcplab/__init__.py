"""tcplab: echo, broadcast and file-transfer servers and clients on Twisted."""

__version__ = "0.1.0"
