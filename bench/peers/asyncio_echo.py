"""An asyncio echo server as the Python docs write one.

Default: the protocol version (asyncio-protocol.html, "TCP Echo Server"), whose
``data_received`` writes the data back; the docs' example closes after one
message, this one keeps echoing. ``--streams``: the streams version
(asyncio-stream.html), reading and writing with ``await writer.drain()``.
The protocol version buffers without bound for a client that does not read;
the streams version stops reading while ``drain()`` waits for its write buffer
to fall below the high-water mark, so it has backpressure. ``--uvloop``: the
same server on uvloop's event loop (the optional ``bench`` extra installs it).

usage: python bench/peers/asyncio_echo.py PORT [--streams] [--uvloop]
"""

import asyncio
import sys


class EchoServerProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def handle_echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def main(port: int, streams: bool) -> None:
    if streams:
        server = await asyncio.start_server(handle_echo, "127.0.0.1", port)
    else:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if "--uvloop" in sys.argv[2:]:
        import uvloop

        uvloop.run(main(int(sys.argv[1]), "--streams" in sys.argv[2:]))
    else:
        asyncio.run(main(int(sys.argv[1]), "--streams" in sys.argv[2:]))
