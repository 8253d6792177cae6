"""TLS on the one port (PROTOCOL.md, "Transport (v2)"), with a throwaway CA.

Each test server gets a certificate for 127.0.0.1 from a CA made in the test (`trustme`);
clients trust that CA through an SSL context or PROGRESSISTA_CA_BUNDLE. The failures that
must cost one connection only (plain HTTP to the TLS port, a handshake that never ends)
are raw sockets, with the handshake timeout made small rather than waited for.
"""

import json
import logging
import socket
import ssl
import urllib.request

import pytest
import trustme
from websockets.sync.client import connect

import progressista
from conftest import running_server, wait_for


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca, tmp_path_factory):
    """(cert file, key file, CA file) for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("tls")
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    with open(cert, "wb") as file:
        for blob in issued.cert_chain_pems:
            file.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert), str(key), str(ca_file)


@pytest.fixture(scope="module")
def tls_server(tls_files):
    cert, key, _ = tls_files
    with running_server(tls_cert=cert, tls_key=key) as server:
        yield server


@pytest.fixture(scope="module")
def trusting(tls_files):
    return ssl.create_default_context(cafile=tls_files[2])


def https(method, url, context, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        return response.status, json.loads(response.read())


def test_the_server_url_is_https(tls_server):
    assert tls_server.url == f"https://127.0.0.1:{tls_server.port}"


def test_https_routes_answer(tls_server, trusting):
    assert https("POST", tls_server.url + "/progress", trusting,
                 {"task_id": "over-tls", "n": 3})[0] == 200
    status, body = https("GET", tls_server.url + "/tasks", trusting)
    assert status == 200 and body["tasks"]["over-tls"]["n"] == 3
    assert https("GET", tls_server.url + "/health", trusting)[1]["status"] == "ok"


def test_wss_feed_sends_snapshot_and_updates(tls_server, trusting):
    url = tls_server.url.replace("https://", "wss://") + "/ws"
    with connect(url, ssl=trusting, open_timeout=5, max_size=None, proxy=None) as feed:
        assert json.loads(feed.recv(timeout=5))["type"] == "snapshot"
        https("POST", tls_server.url + "/progress", trusting, {"task_id": "wss", "n": 7})
        wait_for(lambda: json.loads(feed.recv(timeout=5)).get("tasks", {}).get(
            "wss", {}).get("n") == 7, message="the update over wss://")


def test_a_client_without_the_ca_is_refused_by_its_own_verification(tls_server):
    with pytest.raises(urllib.error.URLError) as refused:
        https("GET", tls_server.url + "/health", ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_server_refuses_tls_older_than_1_2(tls_server):
    assert tls_server.app.tls.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_plain_http_to_the_tls_port_costs_one_connection_without_a_traceback(
        tls_server, trusting, caplog):
    with caplog.at_level(logging.DEBUG, "asyncio"), \
            socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert https("GET", tls_server.url + "/health", trusting)[0] == 200  # meanwhile
        answer = b""
        while True:  # closed by the server (after, at most, a TLS alert)
            try:
                chunk = plain.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        assert not answer.startswith(b"HTTP/")
    assert https("GET", tls_server.url + "/health", trusting)[0] == 200
    assert not [record for record in caplog.records
                if record.levelno >= logging.WARNING or record.exc_info]


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["nothing", "half-a-client-hello"])
def test_a_handshake_that_never_finishes_is_dropped_and_blocks_nobody(
        tls_files, trusting, monkeypatch, caplog, sent):
    monkeypatch.setattr(progressista, "TLS_HANDSHAKE_TIMEOUT_S", 0.3)
    cert, key, _ = tls_files
    with caplog.at_level(logging.DEBUG, "asyncio"), \
            running_server(tls_cert=cert, tls_key=key) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                   for _ in range(3)]
        try:
            for sock in stalled:
                sock.sendall(sent)
            assert https("GET", server.url + "/health", trusting)[0] == 200
            for sock in stalled:  # each dropped after the handshake timeout, not 5 s
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
        finally:
            for sock in stalled:
                sock.close()
        assert https("GET", server.url + "/health", trusting)[0] == 200
    assert not [record for record in caplog.records
                if record.levelno >= logging.WARNING or record.exc_info]


def test_the_startup_line_shows_https(tls_files, caplog):
    cert, key, _ = tls_files
    with caplog.at_level(logging.INFO, "progressista"), \
            running_server(tls_cert=cert, tls_key=key) as server:
        pass
    assert f"dashboard: https://127.0.0.1:{server.port}/" in caplog.text


def test_cert_without_key_is_a_clear_settings_error(tls_files):
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        progressista.Settings.from_env({}, tls_cert=tls_files[0])
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        progressista.Settings.from_env({"PROGRESSISTA_TLS_KEY": tls_files[1]})


def test_unreadable_tls_file_is_a_startup_error_naming_it(tls_files, tmp_path, capsys):
    missing = str(tmp_path / "missing.pem")
    status = progressista.main(["serve", "--port", "0", "--host", "127.0.0.1",
                                "--tls-cert", tls_files[0], "--tls-key", missing])
    assert status == 1
    error = capsys.readouterr().err
    assert "--tls-key" in error and "missing.pem" in error and "Traceback" not in error


def test_a_key_that_is_not_pem_is_a_startup_error(tls_files, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(progressista.StartupError, match="PEM"):
        progressista.create_app(tls_cert=tls_files[0], tls_key=str(junk))


def test_watch_once_verifies_with_the_ca_bundle(tls_server, tls_files, trusting,
                                                monkeypatch, capsys):
    https("POST", tls_server.url + "/progress", trusting,
          {"task_id": "watched", "desc": "watched-over-tls"})
    monkeypatch.setenv("PROGRESSISTA_CA_BUNDLE", tls_files[2])
    assert progressista.main(["watch", "--once", "--server", tls_server.url]) == 0
    assert "watched-over-tls" in capsys.readouterr().out
    assert progressista.main(["watch", "--json", "--server", tls_server.url]) == 0
    assert "watched" in json.loads(capsys.readouterr().out)["tasks"]


def test_watch_says_once_that_the_certificate_does_not_verify(tls_server, monkeypatch,
                                                              capsys):
    monkeypatch.delenv("PROGRESSISTA_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert progressista.main(["watch", "--once", "--server", tls_server.url]) == 1
    once = capsys.readouterr().err
    assert once.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in once
    assert "PROGRESSISTA_CA_BUNDLE" in once  # what to do, as in live mode
    assert progressista.main(["watch", "--server", tls_server.url]) == 1  # live: no retries
    live = capsys.readouterr().err
    assert live.count("\n") == 1 and "PROGRESSISTA_CA_BUNDLE" in live


def test_demo_sends_over_tls_verifying_with_the_ca_file(tls_server, tls_files, trusting):
    import subprocess
    import sys

    from conftest import clean_env

    env = clean_env(SSL_CERT_FILE=tls_files[2], PROGRESSISTA_CA_BUNDLE=tls_files[2])
    result = subprocess.run([sys.executable, progressista.__file__, "demo", "--bars", "1",
                             "--total", "2", "--delay", "0", "--server-url", tls_server.url],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    tasks = https("GET", tls_server.url + "/tasks", trusting)[1]["tasks"]
    assert any(task_id.startswith("demo-") for task_id in tasks)


def test_token_cookie_is_secure_under_tls(tls_files, trusting):
    cert, key, _ = tls_files
    with running_server(tls_cert=cert, tls_key=key, api_tokens=("t",)) as server:
        request = urllib.request.Request(server.url + "/static/index.html?token=t")
        with urllib.request.urlopen(request, timeout=5, context=trusting) as response:
            set_cookie = response.headers["Set-Cookie"]
        assert "; Secure" in set_cookie and "HttpOnly" in set_cookie
        cookie = set_cookie.split(";", 1)[0]
        request = urllib.request.Request(server.url + "/tasks", headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=5, context=trusting) as response:
            assert response.status == 200


def test_the_dashboard_over_https_connects_by_wss_and_keeps_the_token_in_a_secure_cookie(
        tls_files, trusting):
    """Chromium, over https://: the page and its CSP, the feed over wss://, and a share
    link's token turned into an HttpOnly, Secure, SameSite=Strict cookie. The browser does
    not know the test's CA: this one context ignores certificate errors, nothing else."""
    import browsers

    try:
        chromium = browsers.launch("chromium")
    except browsers.EngineMissing as reason:
        from conftest import missing
        missing(str(reason))
    cert, key, _ = tls_files
    try:
        with running_server(tls_cert=cert, tls_key=key, api_tokens=("s3cret",)) as server:
            body = json.dumps({"task_id": "over-tls", "n": 3, "total": 4}).encode()
            request = urllib.request.Request(server.url + "/progress", data=body, headers={
                "Authorization": "Bearer s3cret", "Content-Type": "application/json"})
            urllib.request.urlopen(request, context=trusting, timeout=5).read()
            context = chromium.browser.new_context(ignore_https_errors=True)
            try:
                page = context.new_page()
                violations = []
                page.on("console", lambda message: violations.append(message.text)
                        if "Content Security Policy" in message.text else None)
                page.goto(server.url + "/?token=s3cret")
                page.wait_for_function(
                    "() => document.querySelector('#conn').textContent === 'Connected'",
                    timeout=10_000)
                page.wait_for_function(
                    "() => document.body.textContent.includes('over-tls')", timeout=10_000)
                assert page.url.startswith("https://") and "token" not in page.url
                assert page.evaluate("() => document.cookie") == ""
                (cookie,) = [c for c in context.cookies() if c["name"] == "progressista_token"]
                assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (
                    True, True, "Strict")
                assert violations == []
            finally:
                context.close()
    finally:
        chromium.close()
