"""Tests of the client's transport (issue 13, "What to build" 1, client side): one kept-alive
HTTP/1.1 connection per server, reconnected when it ends; https:// verified against a CA
file; redirects refused.

Real parts: the real client and a real Progressista server on an ephemeral loopback port,
seen through a small TCP proxy that counts the connections it accepts (and, for https://,
terminates TLS with a certificate from a throwaway CA made by `trustme`: the server does
not speak TLS on this branch yet). Where a server must misbehave (close a kept-alive
connection unanswered, redirect), a small http.server of the test's own plays it.
"""

import contextlib
import select
import socket
import ssl
import subprocess
import sys
import threading

import pytest

import progressista_client as pc
from conftest import (QuietHandler, clean_env, http_server_thread, missing, running_server,
                      send_body)
from test_client import (ROOT, SUBPROCESS_TIMEOUT_S, bar, client_log, run_cli,  # noqa: F401
                         sender, task, tasks, warnings_in)

try:
    import trustme  # a test extra
except ImportError:
    trustme = None


class CountingProxy:
    """A TCP proxy on 127.0.0.1:0 to `upstream_port`, counting the connections it accepts;
    with `tls` (an ssl.SSLContext), it terminates TLS; with `connect`, it is an HTTP proxy
    that opens a tunnel on CONNECT (to `upstream_port`, whatever the request names, which
    it keeps in `requests`)."""

    def __init__(self, upstream_port, tls=None, connect=False):
        self.upstream_port = upstream_port
        self.tls = tls
        self.connect = connect
        self.requests = []
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            if self.connect:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += client.recv(4096) or b"\r\n\r\n"
                self.requests.append(head.decode("latin-1").split("\r\n\r\n")[0])
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except (OSError, ssl.SSLError):
            client.close()
            return
        self.sockets += [client, upstream]
        with client, upstream:
            while not self.stopped.is_set():
                pending = isinstance(client, ssl.SSLSocket) and client.pending()
                ready = [client] if pending else select.select([client, upstream], [], [], 0.2)[0]
                for source in ready:
                    try:
                        data = source.recv(65536)
                    except (OSError, ssl.SSLError):
                        data = b""
                    if not data:
                        return
                    (upstream if source is client else client).sendall(data)

    def close(self):
        self.stopped.set()
        self.listener.close()


@contextlib.contextmanager
def counting_proxy(upstream_port, tls=None, connect=False):
    proxy = CountingProxy(upstream_port, tls, connect)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def persistent(sender, monkeypatch):
    """The shared sender with the real default transport (the other tests' opener counts)."""
    poster = pc._PersistentPoster()
    monkeypatch.setattr(sender, "_open", poster)
    yield poster
    poster.close()


def pushes_of_one_bar(url, count=20):
    """Move a bar `count` times, each move seen by the server before the next."""
    remote = bar(url, total=count)
    for step in range(count):
        remote.update(1)
        assert pc.flush(5), "push %d was not delivered" % step
    remote.close()
    assert pc.flush(5)
    return remote


# --- One connection ---

def test_one_kept_alive_connection_carries_every_push_to_the_server(server, persistent):
    with counting_proxy(server.port) as proxy:
        remote = pushes_of_one_bar("http://127.0.0.1:%d" % proxy.port)
        final = task(server, remote.task_id)
        assert (final["n"], final["status"]) == (20, "close")
        assert proxy.accepted == 1


def test_a_new_connection_per_push_is_what_the_reference_transport_costs(server, sender,
                                                                         monkeypatch):
    # The benchmark's reference (bench/bench_transport.py), checked to be what it claims.
    monkeypatch.setattr(sender, "_open", pc._post_once)
    with counting_proxy(server.port) as proxy:
        pushes_of_one_bar("http://127.0.0.1:%d" % proxy.port, count=5)
        assert proxy.accepted >= 6


def test_the_sender_reconnects_to_a_server_restarted_on_the_same_port(persistent, client_log):
    with running_server() as first:
        port = first.port
        remote = bar(first.url, total=10)
        remote.update(3)
        assert pc.flush(5) and task(first, remote.task_id)["n"] == 3
    with running_server(port=port) as second:
        remote.update(4)
        assert pc.flush(5)
        assert task(second, remote.task_id)["n"] == 7
    assert not warnings_in(client_log)


@contextlib.contextmanager
def racing_server():
    """Answers the first request of each connection and keeps it open, then closes it at the
    next request without answering: the server's idle close crossing the client's reuse."""
    seen = {"connections": 0, "requests": 0, "answered": 0}

    class Racing(QuietHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            seen["connections"] += 1
            self.requests_here = 0

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen["requests"] += 1
            self.requests_here += 1
            if self.requests_here > 1:
                self.close_connection = True
                return  # closed unanswered
            seen["answered"] += 1
            send_body(self, b'{"ok": true, "accepted": 1}')

    with http_server_thread(Racing) as url:
        yield url, seen


def test_a_kept_alive_connection_closed_unanswered_is_retried_once_on_a_new_one(persistent):
    with racing_server() as (url, seen):
        endpoint = pc.make_endpoint(url)
        for n in range(3):
            assert persistent(endpoint.url, b'{"task_id": "a"}', dict(endpoint.headers), 2)[0] == 200
        assert seen == {"connections": 3, "requests": 5, "answered": 3}


def test_a_new_connection_closed_unanswered_is_a_failure_not_retried():
    poster = pc._PersistentPoster()

    class Closing(QuietHandler):
        def do_POST(self):
            self.close_connection = True

    with http_server_thread(Closing) as url:
        with pytest.raises(ConnectionError):
            poster(url + "/progress", b"{}", {}, 2)


# --- https:// ---

@pytest.fixture(scope="module")
def certificate_authority():
    if trustme is None:
        missing("trustme not installed (pip install -e '.[test]')")
    return trustme.CA()


@pytest.fixture
def tls_proxy(server, certificate_authority):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with counting_proxy(server.port, tls=context) as proxy:
        yield proxy


@pytest.fixture
def ca_file(certificate_authority, tmp_path):
    path = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("variable", ["PROGRESSISTA_CA_BUNDLE", "SSL_CERT_FILE"])
def test_https_is_verified_with_the_ca_file_and_keeps_one_connection(
        server, tls_proxy, ca_file, persistent, monkeypatch, variable):
    monkeypatch.setenv(variable, ca_file)
    remote = pushes_of_one_bar("https://127.0.0.1:%d" % tls_proxy.port)
    assert (task(server, remote.task_id)["n"], tls_proxy.accepted) == (20, 1)


def test_run_and_demo_send_over_https_with_the_ca_bundle(server, tls_proxy, ca_file, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("from tqdm import tqdm\nfor _ in tqdm(range(3), desc='over tls'):\n    pass\n")
    url = "https://127.0.0.1:%d" % tls_proxy.port
    env = clean_env(PROGRESSISTA_CA_BUNDLE=ca_file)
    ran = run_cli("run", "--server-url", url, str(script), env=env)
    assert ran.returncode == 0, ran.stderr
    demo = run_cli("demo", "--bars", "2", "--total", "3", "--delay", "0", "--server-url", url,
                   env=env)
    assert demo.returncode == 0, demo.stderr
    ended = sorted((t["desc"], t["status"]) for t in tasks(server).values()
                   if t["parent"] is None)
    assert ended == [("demo bar 1", "close"), ("demo bar 2", "close"), ("over tls", "close")]


def test_a_certificate_that_fails_verification_is_one_warning_and_the_job_goes_on(
        server, tls_proxy, tmp_path):
    other_ca = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))  # not the CA that signed the proxy's
    job = subprocess.run(
        [sys.executable, "-c",
         "import logging, progressista_client as pc\nlogging.basicConfig()\n"
         "for _ in pc.tqdm(range(50), mininterval=0, push_every=0): pass\n"
         "print('loop done', pc.flush(1))\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        env=clean_env(PYTHONPATH=ROOT, PROGRESSISTA_CA_BUNDLE=str(other_ca),
                      PROGRESSISTA_SERVER_URL="https://127.0.0.1:%d" % tls_proxy.port))
    assert job.returncode == 0 and "loop done False" in job.stdout, job.stderr
    assert job.stderr.count("cannot deliver") == 1 and "Traceback" not in job.stderr
    assert "certificate verify failed" in job.stderr and "PROGRESSISTA_CA_BUNDLE" in job.stderr
    assert not tasks(server)


def test_a_ca_file_that_cannot_be_read_is_one_warning_naming_it(persistent, monkeypatch,
                                                                 client_log, tmp_path):
    monkeypatch.setenv("PROGRESSISTA_CA_BUNDLE", str(tmp_path / "missing.pem"))
    remote = bar("https://127.0.0.1:9", total=2)
    remote.update(2)
    remote.close()
    assert pc.flush(1) is False
    (warning,) = warnings_in(client_log)
    assert "missing.pem" in warning.getMessage() and "PROGRESSISTA_CA_BUNDLE" in warning.getMessage()


# --- Through the proxy the environment names, as urllib did ---

@contextlib.contextmanager
def forward_proxy():
    """An HTTP proxy for http:// URLs that answers every POST itself, keeping its request
    line and Proxy-Authorization header."""
    seen = {"connections": 0, "requests": []}

    class Forward(QuietHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            seen["connections"] += 1

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen["requests"].append((self.requestline, self.headers.get("Proxy-Authorization")))
            send_body(self, b'{"ok": true, "accepted": 1}')

    with http_server_thread(Forward) as url:
        yield url.replace("http://", "http://user:p%40ss@", 1), seen


@pytest.fixture
def no_proxy_settings(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_http_goes_through_the_http_proxy_of_the_environment_on_one_connection(
        persistent, no_proxy_settings):
    with forward_proxy() as (proxy_url, seen):
        no_proxy_settings.setenv("http_proxy", proxy_url)
        for _ in range(3):
            status, _ = persistent("http://dash.example:8000/progress", b"{}", {}, 2)
            assert status == 200
    assert seen["connections"] == 1
    assert seen["requests"] == [("POST http://dash.example:8000/progress HTTP/1.1",
                                 "Basic dXNlcjpwQHNz")] * 3  # user:p@ss


def test_no_proxy_sends_straight_to_the_server(server, persistent, no_proxy_settings):
    with forward_proxy() as (proxy_url, seen):
        no_proxy_settings.setenv("http_proxy", proxy_url)
        no_proxy_settings.setenv("no_proxy", "127.0.0.1")
        remote = pushes_of_one_bar(server.url, count=2)
    assert task(server, remote.task_id)["status"] == "close" and seen["connections"] == 0


def test_https_goes_through_a_connect_tunnel_of_the_https_proxy(
        server, tls_proxy, ca_file, persistent, no_proxy_settings):
    no_proxy_settings.setenv("PROGRESSISTA_CA_BUNDLE", ca_file)
    with counting_proxy(tls_proxy.port, connect=True) as tunnel:
        no_proxy_settings.setenv("https_proxy", "http://127.0.0.1:%d" % tunnel.port)
        remote = pushes_of_one_bar("https://127.0.0.1:%d" % tls_proxy.port, count=3)
        assert task(server, remote.task_id)["n"] == 3
        assert tunnel.accepted == 1
        assert tunnel.requests[0].startswith("CONNECT 127.0.0.1:%d HTTP/1." % tls_proxy.port)


# --- Redirects ---

def test_a_redirect_is_a_refusal_reported_once_and_never_followed(persistent, client_log):
    elsewhere = []

    class Elsewhere(QuietHandler):
        def do_POST(self):
            elsewhere.append(self.headers.get("Authorization"))
            send_body(self)

    class Redirecting(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            send_body(self, status=307, headers=[("Location", target + "/progress")])

    with http_server_thread(Elsewhere) as target, http_server_thread(Redirecting) as url:
        for _ in range(2):
            remote = bar(url, total=3, token="secret")
            remote.update(3)
            remote.close()
            assert pc.flush(5) is False  # the final state was lost: never reported as sent
    assert elsewhere == []
    refusals = [r.getMessage() for r in warnings_in(client_log)]
    assert len(refusals) == 1 and "HTTP 307" in refusals[0] and "redirect" in refusals[0]
