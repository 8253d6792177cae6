"""Shared test helpers: a real Progressista server on an ephemeral loopback port.

`running_server(**settings)` starts `progressista.create_app(**settings)` on its own
asyncio loop in a background thread and yields a handle with `.url` (the base URL,
``http://127.0.0.1:PORT``, or ``https://`` with tls_cert), `.port`, `.app` and `.stop()`.
Pass ``port=`` to restart a server on the port a previous one used.
"""

import asyncio
import contextlib
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import progressista

IN_CI = bool(os.environ.get("CI"))


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


def free_port():
    """A loopback port nothing listens on (bound a moment ago, then freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra):
    """This environment for a subprocess, without PROGRESSISTA_* settings or a terminal
    size from the test runner, plus `extra`."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PROGRESSISTA_") and name not in ("COLUMNS", "LINES")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


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


@pytest.fixture
def server():
    with running_server() as running:
        yield running


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
