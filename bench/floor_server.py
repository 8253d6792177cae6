"""The floor: the least a Python asyncio HTTP/1.1 server can do per request.

    python bench/floor_server.py --port PORT

An asyncio.Protocol on the default event loop that answers every request with a fixed
``200 {"ok":true,"accepted":1}``, keep-alive. It parses only what it must to find where
one request ends: the blank line after the head, and the Content-Length of the body
(no JSON, no validation, no routing). bench/bench_server.py drives it with the same load
as the real server to know what the event loop, the sockets and the kernel cost alone.
"""

import argparse
import asyncio
import signal

BODY = b'{"ok":true,"accepted":1}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/json\r\n"
            b"\r\n" % len(BODY)) + BODY


class Floor(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()
        self.need = -1  # total bytes of the current request, once its head is read

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        answers = 0
        while True:
            if self.need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                length = 0
                at = buffer.find(b"ontent-Length:", 0, end)
                if at < 0:
                    at = buffer.find(b"ontent-length:", 0, end)
                if at >= 0:
                    stop = buffer.find(b"\r\n", at, end + 2)
                    length = int(buffer[at + 14:stop])
                self.need = end + 4 + length
            if len(buffer) < self.need:
                break
            del buffer[:self.need]
            self.need = -1
            answers += 1
        if answers:
            self.transport.write(RESPONSE * answers)


async def serve(host, port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, host, port, reuse_address=True, backlog=1024)
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    print("FLOOR_READY", flush=True)
    await stopping.wait()
    server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
