"""Shared test helpers: real Progressista servers on ephemeral loopback ports, and one
helper per job for talking to them.

`running_server(**settings)` starts `progressista.create_app(**settings)` on its own
asyncio loop in a background thread and yields a handle with `.url` (the base URL,
``http://127.0.0.1:PORT``, or ``https://`` with tls_cert), `.port`, `.app`, `.loop` and
`.stop()`. Pass ``port=`` to restart a server on the port a previous one used.

The fixtures are named for the server they give: `memory_server` (a fresh one per test),
`shared_server` (one per test module: its tests use task ids of their own, `new_id()`),
`token_server`, `read_token_server`, `cors_server`, `clocked_server` (its clock is the
`clock` fixture), `quick_lifetimes_server`, `quick_timeouts_server`; `sqlite_url` and
`redis_server` give a store to start servers on.

Where the peer is not Progressista (a webhook, a proxy, a server that misbehaves), a test
writes a `QuietHandler` subclass, answers with `send_body()` or `send_json()`, and serves
it with `http_server_thread(handler_class)`, which yields the base URL.
"""

import asyncio
import contextlib
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from websockets.sync.client import connect as ws_connect

import progressista

IN_CI = bool(os.environ.get("CI"))
HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "progressista.py")

# What the access fixtures are configured with.
TOKENS = ["alpha-token", "beta-token"]
READ_TOKEN = "viewer-token"
ALLOWED_ORIGIN = "http://allowed.example"
FOREIGN_ORIGIN = "http://evil.example"


# --- Clocks ------------------------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand (create_app(clock=...), Sender(clock=...))."""

    def __init__(self, start=1_000_000.0):
        self.now = start

    def __call__(self):
        return self.now


class Clock:
    """The wall clock, moved forward by `offset` instead of waiting: for a server whose
    lifetimes must run on across a restart."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset


# --- Environment -------------------------------------------------------------------------


def free_port():
    """A loopback port nothing listens on (bound a moment ago, then freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port):
    """True when a new socket can listen on loopback `port` (nothing listens there)."""
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not in use
    try:
        probe.bind(("127.0.0.1", port))
        probe.listen()
        return True
    except OSError:
        return False
    finally:
        probe.close()


def clean_env(**extra):
    """This environment for a subprocess, without PROGRESSISTA_* settings or a terminal
    size from the test runner, plus `extra`."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PROGRESSISTA_") and name not in ("COLUMNS", "LINES")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def missing(reason):
    """Skip the test for something it needs that is not here; under CI, fail it."""
    if IN_CI:
        pytest.fail(reason + " - under CI this is a failure, not a skip")
    pytest.skip(reason)


def require_binary(path_or_name, what):
    """Skip locally when a system binary is missing; under CI a missing one fails."""
    found = shutil.which(path_or_name)
    if found:
        return found
    missing(f"{what} not installed ({path_or_name} not found); .ci/run installs it")


# --- A server in a thread ----------------------------------------------------------------


class ServerThread:
    """A Progressista app served from a daemon thread, for tests and benchmarks."""

    def __init__(self, host="127.0.0.1", port=0, **settings):
        self.app = progressista.create_app(host=host, port=port, **settings)
        self.loop = None
        self.thread = None
        self.port = None
        self.url = None

    def start(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.app.start(), self.loop).result(10)
        self.port = self.app.port
        scheme = "https" if self.app.settings.tls_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    def stop(self):
        if self.loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.app.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.loop = None


@contextlib.contextmanager
def running_server(**settings):
    server = ServerThread(**settings).start()
    try:
        yield server
    finally:
        server.stop()


def on_server_loop(server, function):
    """Call function() on the server's own loop thread and return its result."""
    async def call():
        return function()
    return asyncio.run_coroutine_threadsafe(call(), server.loop).result(5)


def memory_store_of(*updates, now=100.0, max_tasks=100):
    """A MemoryStore holding `updates` (raw, validated here), applied at `now`."""
    store = progressista.MemoryStore(max_tasks)
    store.apply([progressista.validate_update(u) for u in updates], now)
    return store


# --- Fixtures: the servers ---------------------------------------------------------------


@pytest.fixture
def memory_server():
    """A fresh server on the memory store with default settings, for one test."""
    with running_server() as running:
        yield running


@pytest.fixture
def server(memory_server):
    """The old name of `memory_server`, which test_client.py's tests still use."""
    return memory_server


@pytest.fixture(scope="module")
def shared_server():
    """One default server for a whole test module; its tests use ids of their own."""
    with running_server() as running:
        yield running


@pytest.fixture(scope="module")
def token_server():
    """A shared server that needs one of TOKENS for the API."""
    with running_server(api_tokens=TOKENS) as running:
        yield running


@pytest.fixture(scope="module")
def read_token_server():
    """A shared server with TOKENS to write and READ_TOKEN that may only read."""
    with running_server(api_tokens=TOKENS, read_tokens=[READ_TOKEN]) as running:
        yield running


@pytest.fixture(scope="module")
def cors_server():
    """A shared server that lets ALLOWED_ORIGIN's pages call it."""
    with running_server(allow_origins=[ALLOWED_ORIGIN]) as running:
        yield running


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def clocked_server(clock):
    """A fresh server whose clock the test moves (the sweep never runs on its own)."""
    with running_server(clock=clock, cleanup_interval=3600) as running:
        yield running


@pytest.fixture(scope="module")
def quick_lifetimes_server():
    """A shared server where tasks go stale after 0.3 s, and finished (or stale) ones
    expire 1 s after their last update: time for a test to see a stale task come back."""
    with running_server(stale_seconds=0.3, retention_seconds=1.0,
                        cleanup_interval=0.05) as running:
        yield running


@pytest.fixture
def quick_timeouts_server(monkeypatch):
    """A fresh server whose connection deadlines and /ws pings are a few tenths of a
    second (the module constants shortened), so that nothing waits for seconds."""
    monkeypatch.setattr(progressista, "REAP_INTERVAL_S", 0.05)
    monkeypatch.setattr(progressista, "HEADER_TIMEOUT_S", 0.3)
    monkeypatch.setattr(progressista, "BODY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(progressista, "KEEPALIVE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(progressista, "WS_PING_INTERVAL_S", 0.05)
    monkeypatch.setattr(progressista, "WS_PING_TIMEOUT_S", 0.3)
    with running_server() as running:
        yield running


@pytest.fixture
def sqlite_url(tmp_path):
    """A store URL for a new SQLite file (servers on it keep their tasks across restarts)."""
    return "sqlite://" + str(tmp_path / "tasks.db")


# --- HTTP --------------------------------------------------------------------------------


_ids = itertools.count()


def new_id(label="task"):
    """A task id no other test uses."""
    return f"{label}-{next(_ids)}-{os.getpid()}"


def bearer(token):
    """The header that carries `token`."""
    return {"Authorization": f"Bearer {token}"}


def http(method, url, body=None, headers=None, timeout=5):
    """One real HTTP request; returns (status, parsed JSON or raw bytes, headers)."""
    data = body
    if body is not None and not isinstance(body, (bytes, bytearray)):
        data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, response_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, response_headers = error.code, error.read(), error.headers
    try:
        return status, json.loads(raw), response_headers
    except ValueError:
        return status, raw, response_headers


def post(server, body, headers=None):
    """POST /progress with `body` (an update, a batch, or raw bytes): (status, answer,
    headers), whatever the status."""
    return http("POST", server.url + "/progress", body, headers)


def post_ok(server, body, headers=None):
    """POST /progress that must be accepted; returns the parsed answer."""
    status, answer, _ = post(server, body, headers)
    assert status == 200, answer
    return answer


def task_url(server, task_id):
    return server.url + "/tasks/" + urllib.parse.quote(task_id, safe="")


def get_task(server, task_id, headers=None):
    """GET /tasks/{task_id}: (status, task or error, headers)."""
    return http("GET", task_url(server, task_id), headers=headers)


def tasks_of(server, headers=None):
    """The tasks GET /tasks lists, by id, in its order."""
    status, body, _ = http("GET", server.url + "/tasks", headers=headers)
    assert status == 200, body
    return body["tasks"]


def redirect_of(server, target):
    """(status, Location) of a GET that is not followed (urllib would follow it)."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


def wait_for(condition, timeout=5.0, interval=0.01, message="condition"):
    """Poll `condition()` until it returns something truthy, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


# --- Raw sockets: requests byte by byte ---------------------------------------------------


WS_HANDSHAKE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def request_bytes(method, path, body=b"", headers=()):
    """A raw HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(reader, head_only=False):
    """Read one HTTP response from a socket's binary file: (status, headers, body)."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split(b" ", 2)[1])
    headers = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    body = b"" if head_only or status == 100 else reader.read(length)
    return status, headers, body


@contextlib.contextmanager
def raw_connection(server, timeout=5.0):
    """A plain TCP connection to the server: (socket, its binary file for reading)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        yield sock, sock.makefile("rb")
    finally:
        sock.close()


def raw_request(server, data):
    """Send `data` on a new connection; the first answer: (status, headers, body)."""
    with raw_connection(server) as (sock, reader):
        sock.sendall(data)
        return read_response(reader)


def closed_by_server(reader):
    """True when the server closes the connection (EOF or reset) within the timeout."""
    try:
        return reader.read(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# --- /ws listeners -----------------------------------------------------------------------


def open_listener(server, path="/ws", **options):
    """A websockets client on the server's /ws (a context manager)."""
    options.setdefault("open_timeout", 5)
    options.setdefault("close_timeout", 2)
    return ws_connect(f"ws://127.0.0.1:{server.port}{path}", max_size=None, proxy=None,
                      **options)


def receive_until(ws, matches, timeout=3.0):
    """The first message (parsed) for which matches(message) is true."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching /ws message within {timeout} s; "
                                 f"last seen: {seen[-3:]}")
        try:
            message = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            continue
        seen.append(message)
        if matches(message):
            return message


def updated(task_id, **fields):
    """A matcher for an update message carrying task_id with these field values."""
    def matches(message):
        task = message.get("tasks", {}).get(task_id) if message["type"] == "update" else None
        return task is not None and all(task.get(k) == v for k, v in fields.items())
    return matches


# --- The command line --------------------------------------------------------------------


def run_cli(*args, timeout=15, **variables):
    """`python progressista.py ARGS` to its end, in a clean environment plus `variables`."""
    return subprocess.run([sys.executable, PROGRAM, *args], capture_output=True, text=True,
                          env=clean_env(**variables), timeout=timeout)


PORT_LINE = re.compile(r"listening on \S+?:(\d+)")


class CliServer:
    """`python progressista.py ARGS` in a subprocess (a clean environment plus
    `variables`), its stderr collected line by line."""

    def __init__(self, *args, **variables):
        self.proc = subprocess.Popen([sys.executable, PROGRAM, *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env=clean_env(**variables))
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = int(wait_for(self._port, 10, message="the 'listening on' line").group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def _port(self):
        for line in list(self.lines):
            match = PORT_LINE.search(line)
            if match:
                return match
        if self.proc.poll() is not None:
            self.reader.join(2)
            raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr}")
        return None

    @property
    def stderr(self):
        return "".join(self.lines)

    def stop(self, signum=signal.SIGTERM, timeout=5):
        """Send `signum`; return the exit status (killing it if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout} s of {signum!r}")
        finally:
            self.reader.join(2)


@contextlib.contextmanager
def cli_server(*args, **variables):
    server = CliServer(*args, **variables)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


# --- Stand-in HTTP servers --------------------------------------------------------------
# Where a test needs a peer that is not Progressista (a webhook, a proxy, a server that
# misbehaves), it writes a small http.server handler and serves it with these.


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing: http.server writes every request to stderr."""

    def log_message(self, *args):
        pass


def send_body(handler, body=b"", status=200, headers=()):
    """Answer the request `handler` is serving: `status`, `headers` (name, value pairs), a
    Content-Length and `body` (bytes)."""
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def send_json(handler, payload, status=200, headers=()):
    """Answer the request `handler` is serving with `payload` as JSON."""
    send_body(handler, json.dumps(payload).encode(), status,
              [("Content-Type", "application/json"), *headers])


@contextlib.contextmanager
def http_server_thread(handler_class):
    """Serve `handler_class` on 127.0.0.1:0 from a daemon thread (one thread a connection);
    yield its base URL, ``http://127.0.0.1:PORT``; shut it down at the end."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield "http://127.0.0.1:%d" % httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- Redis -------------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server on a free loopback port, restartable on that port."""

    def __init__(self, workdir):
        self.binary = require_binary("redis-server", "Debian's redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.process = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, timeout=10, message="redis-server to answer")
        return self

    def answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of the test's own (not a Progressista server): `.url`, `.stop()`,
    `.start()`."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
