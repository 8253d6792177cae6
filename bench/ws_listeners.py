"""Many /ws listeners in one process, reading and discarding: the dashboards of a bench.

    python bench/ws_listeners.py --port PORT [--count 100] [--token T]

Opens COUNT WebSocket connections to ws://127.0.0.1:PORT/ws, waits until each has its
snapshot, prints ``LISTENERS_READY``, then reads and discards everything the server sends
(answering pings with pongs, as a browser does) until SIGTERM/SIGINT or stdin closes, and
prints one line ``LISTENERS_JSON {...}`` (messages, bytes, snapshots, closed connections).

It speaks just enough RFC 6455 by hand (handshake, frame headers, masked pong) instead
of using a WebSocket library: on a 2-core machine shared by the server and wrk, what
matters is that the listeners cost as little CPU as possible, so that the benchmark
measures the server's broadcasting and not the clients' frame parsing.
"""

import argparse
import base64
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time


class Listener:
    __slots__ = ("sock", "head", "skip", "control", "opcode", "messages", "snapshots",
                 "bytes", "closed", "fin")

    def __init__(self, sock):
        self.sock = sock
        self.head = bytearray()  # the frame header read so far
        self.skip = 0  # payload bytes of the current data frame still to discard
        self.control = None  # payload of the current control frame, while it is read
        self.opcode = 0
        self.fin = True
        self.messages = 0
        self.snapshots = 0
        self.bytes = 0
        self.closed = False

    def feed(self, data):
        """Consume `data` (a memoryview): skip payloads, answer pings, count messages."""
        self.bytes += len(data)
        pos, size = 0, len(data)
        while pos < size:
            if self.skip:
                take = min(self.skip, size - pos)
                if self.control is not None:
                    self.control += data[pos:pos + take]
                pos += take
                self.skip -= take
                if not self.skip:
                    self.end_frame()
                continue
            # Read a frame header: 2 bytes, then 0, 2 or 8 bytes of length.
            need = 2
            while True:
                if len(self.head) >= 2:
                    short = self.head[1] & 0x7F
                    need = 2 + (2 if short == 126 else 8 if short == 127 else 0)
                if len(self.head) >= need or pos >= size:
                    break
                self.head.append(data[pos])
                pos += 1
            if len(self.head) < need:
                return
            first, short = self.head[0], self.head[1] & 0x7F
            if short == 126:
                length = struct.unpack_from("!H", self.head, 2)[0]
            elif short == 127:
                length = struct.unpack_from("!Q", self.head, 2)[0]
            else:
                length = short
            self.head = bytearray()
            self.opcode = first & 0x0F
            self.fin = bool(first & 0x80)
            if self.opcode >= 8:
                self.control = bytearray()
            elif self.opcode == 1 and data[pos:pos + 12].tobytes() == b'{"type":"sna':
                self.snapshots += 1
            self.skip = length
            if not length:
                self.end_frame()

    def end_frame(self):
        if self.control is not None:
            payload, self.control = bytes(self.control), None
            if self.opcode == 9:  # ping: answer with a masked pong carrying its payload
                self.send_frame(0xA, payload)
            elif self.opcode == 8:  # close: echo it and stop
                self.send_frame(0x8, payload[:2])
                self.closed = True
        elif self.fin and self.opcode in (0, 1, 2):
            self.messages += 1

    def send_frame(self, opcode, payload):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked
        try:
            self.sock.setblocking(True)
            self.sock.sendall(frame)
            self.sock.setblocking(False)
        except OSError:
            self.closed = True


def connect(host, port, token):
    sock = socket.create_connection((host, port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    target = "/ws" + (f"?token={token}" if token else "")
    sock.sendall((f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the /ws handshake")
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"/ws handshake refused: {head[:80]!r}")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    listener = Listener(sock)
    if rest:
        listener.feed(memoryview(rest))
    return listener


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--token", default=None)
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop by itself after this long, whatever happens")
    args = parser.parse_args()

    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))

    selector = selectors.DefaultSelector()
    listeners = []
    for _ in range(args.count):
        listener = connect(args.host, args.port, args.token)
        listeners.append(listener)
        selector.register(listener.sock, selectors.EVENT_READ, listener)
    selector.register(sys.stdin, selectors.EVENT_READ, None)

    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    ready = False
    started = time.monotonic()
    snapshots_at_ready = 0
    while not stop and time.monotonic() - started < args.max_seconds:
        if not ready and all(listener.messages for listener in listeners):
            ready = True
            snapshots_at_ready = sum(listener.snapshots for listener in listeners)
            for listener in listeners:
                listener.messages = 0
                listener.bytes = 0
            print("LISTENERS_READY", flush=True)
        for key, _ in selector.select(timeout=0.5):
            listener = key.data
            if listener is None:  # stdin: closed (or anything) means stop
                if not os.read(sys.stdin.fileno(), 4096):
                    stop.append(True)
                    selector.unregister(sys.stdin)
                continue
            try:
                received = listener.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                received = 0
            if received:
                listener.feed(view[:received])
            if not received or listener.closed:
                listener.closed = True
                selector.unregister(listener.sock)
                listener.sock.close()
    for listener in listeners:
        if not listener.closed:
            listener.sock.close()
    print("LISTENERS_JSON " + json.dumps({
        "listeners": len(listeners),
        "ready": ready,
        "messages": sum(listener.messages for listener in listeners),
        "bytes": sum(listener.bytes for listener in listeners),
        "resync_snapshots": sum(listener.snapshots for listener in listeners)
        - snapshots_at_ready,
        "closed_by_server": sum(listener.closed for listener in listeners),
    }), flush=True)


if __name__ == "__main__":
    main()
