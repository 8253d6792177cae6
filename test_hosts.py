"""What a browser brings (PROTOCOL.md, "Transport (v2)"): the Host check against DNS
rebinding, and the cookie a shared dashboard link's ?token= becomes.

A page on evil.example that rebinds its name to 127.0.0.1 reaches a loopback server with
`Host: evil.example[:port]` and, being same-origin with itself, passes the Origin check:
only the Host tells it apart. Real servers on 127.0.0.1; requests carry the Host a
rebound browser would send (urllib keeps a Host header it is given; the /ws handshake is
sent by hand, since a WebSocket client sets its own). The cookie tests send the Cookie
header a browser would send back, and read Set-Cookie as the browser would get it.
"""

import socket
import urllib.parse

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import progressista
from conftest import http, running_server

REBOUND = ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil",
           "EVIL.example:80", "[::2]:8000"]


def as_host(host, server):
    return host.replace("PORT", str(server.port))


@pytest.fixture(scope="module")
def loopback_server():
    with running_server() as server:
        yield server


@pytest.mark.parametrize("host", REBOUND)
@pytest.mark.parametrize("method, path", [("GET", "/tasks"), ("GET", "/health"),
                                          ("GET", "/static/index.html"), ("DELETE", "/tasks")])
def test_rebinding_style_host_is_421_naming_the_setting(loopback_server, host, method, path):
    status, body, _ = http(method, loopback_server.url + path, headers={"Host": host})
    assert status == 421
    assert "PROGRESSISTA_ALLOWED_HOSTS" in body["error"] and "--allowed-hosts" in body["error"]


def test_rebound_post_stores_nothing(loopback_server):
    status, _, _ = http("POST", loopback_server.url + "/progress", {"task_id": "rebound"},
                        headers={"Host": "evil.example", "Origin": "http://evil.example"})
    assert status == 421
    assert http("GET", loopback_server.url + "/tasks/rebound")[0] == 404


@pytest.mark.parametrize("host", ["127.0.0.1:PORT", "127.0.0.1", "localhost:PORT",
                                  "LocalHost", "[::1]:PORT", "[::1]"])
def test_loopback_names_with_any_port_are_answered(loopback_server, host):
    status, _, _ = http("GET", loopback_server.url + "/tasks",
                        headers={"Host": as_host(host, loopback_server)})
    assert status == 200


def handshake(server, host):
    """The status line of a raw /ws handshake with this Host."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        return sock.makefile("rb").readline()


def test_ws_handshake_with_a_rebound_host_is_421_and_not_upgraded(loopback_server):
    assert handshake(loopback_server, "evil.example:8000").startswith(b"HTTP/1.1 421")
    assert len(loopback_server.app.hub) == 0


def test_ws_handshake_with_a_loopback_host_is_upgraded(loopback_server):
    assert handshake(loopback_server, f"127.0.0.1:{loopback_server.port}").startswith(
        b"HTTP/1.1 101")


def test_star_answers_any_host():
    with running_server(allowed_hosts=("*",)) as server:
        assert http("GET", server.url + "/tasks", headers={"Host": "evil.example"})[0] == 200
        assert handshake(server, "evil.example").startswith(b"HTTP/1.1 101")


def test_listed_names_replace_the_default():
    with running_server(allowed_hosts="dash.example, Other.example:9") as server:
        for host in ("dash.example:8000", "DASH.EXAMPLE", "other.example"):
            assert http("GET", server.url + "/tasks", headers={"Host": host})[0] == 200
        assert http("GET", server.url + "/tasks", headers={"Host": "localhost"})[0] == 421


def test_http10_request_without_host_is_answered():
    with running_server() as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")


def test_refusals_are_counted_under_the_host_reason(loopback_server):
    http("GET", loopback_server.url + "/tasks", headers={"Host": "evil.example"})
    assert loopback_server.app.metrics.rejected.get("host", 0) >= 1


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", {"localhost", "127.0.0.1", "[::1]"}),
    ("::1", {"localhost", "127.0.0.1", "[::1]"}),
    ("127.0.0.2", {"localhost", "127.0.0.1", "[::1]", "127.0.0.2"}),
    ("localhost", {"localhost", "127.0.0.1", "[::1]"}),
    ("0.0.0.0", None), ("", None), ("192.0.2.7", None),
])
def test_default_allowed_hosts_follow_the_listening_address(host, expected):
    assert progressista.allowed_host_names(progressista.Settings(host=host)) == (
        None if expected is None else frozenset(expected))


def test_allowed_hosts_come_from_the_environment():
    settings = progressista.Settings.from_env({"PROGRESSISTA_ALLOWED_HOSTS": "a.example, b:1"})
    assert settings.allowed_hosts == ("a.example", "b:1")
    assert progressista.allowed_host_names(settings) == frozenset({"a.example", "b"})


# --- Share links: ?token= becomes a cookie ------------------------------------------------

WRITE, READ = "write-token", "read;token ,x"  # a read token that needs encoding in a cookie


@pytest.fixture(scope="module")
def share_link_server():
    with running_server(api_tokens=(WRITE,), read_tokens=(READ,)) as server:
        yield server


def page_cookie(server, token):
    """The Set-Cookie of the dashboard opened with ?token=`token`, or None."""
    url = server.url + "/static/index.html?token=" + urllib.parse.quote(token, safe="")
    status, _, headers = http("GET", url)
    assert status == 200
    return headers.get("Set-Cookie")


def cookie_header(set_cookie):
    """What a browser sends back for a Set-Cookie: the name=value part."""
    return set_cookie.split(";", 1)[0]


@pytest.mark.parametrize("token", [WRITE, READ])
def test_valid_token_in_the_dashboard_url_becomes_a_strict_httponly_cookie(share_link_server,
                                                                           token):
    set_cookie = page_cookie(share_link_server, token)
    attributes = [part.strip() for part in set_cookie.split(";")]
    assert attributes[0].startswith("progressista_token=")
    assert set(attributes[1:]) == {"HttpOnly", "SameSite=Strict", "Path=/"}  # no Secure: http


def test_wrong_or_missing_token_sets_no_cookie(share_link_server):
    assert page_cookie(share_link_server, "wrong") is None
    assert http("GET", share_link_server.url + "/static/index.html")[2].get("Set-Cookie") is None


def test_cookie_is_set_once_by_the_page_not_by_the_redirect_to_it(share_link_server):
    status, _, headers = http("GET", share_link_server.url + "/?token=" + WRITE)  # follows the 307
    assert status == 200 and len(headers.get_all("Set-Cookie")) == 1


def test_no_cookie_without_tokens_configured(loopback_server):
    assert page_cookie(loopback_server, "anything") is None


@pytest.mark.parametrize("token", [WRITE, READ])
def test_cookie_is_accepted_by_tasks_as_its_token(share_link_server, token):
    cookie = cookie_header(page_cookie(share_link_server, token))
    assert http("GET", share_link_server.url + "/tasks", headers={"Cookie": cookie})[0] == 200
    assert http("GET", share_link_server.url + "/tasks", headers={
        "Cookie": "other=1; " + cookie + "; more=2"})[0] == 200
    assert http("GET", share_link_server.url + "/tasks")[0] == 401


def test_read_token_keeps_read_only_rights_through_the_cookie(share_link_server):
    cookie = cookie_header(page_cookie(share_link_server, READ))
    origin = {"Cookie": cookie, "Origin": share_link_server.url}
    assert http("GET", share_link_server.url + "/auth", headers={"Cookie": cookie})[1] == {
        "access": "read"}
    assert http("DELETE", share_link_server.url + "/tasks", headers=origin)[0] == 403
    assert http("POST", share_link_server.url + "/progress", {"task_id": "r"},
                headers=origin)[0] == 403


def test_write_token_cookie_may_change_tasks_from_its_own_origin_only(share_link_server):
    cookie = cookie_header(page_cookie(share_link_server, WRITE))
    own = {"Cookie": cookie, "Origin": share_link_server.url}
    assert http("POST", share_link_server.url + "/progress", {"task_id": "c"},
                headers=own)[0] == 200
    assert http("DELETE", share_link_server.url + "/tasks/c", headers={
        "Cookie": cookie, "Origin": "http://evil.example"})[0] == 403
    assert http("DELETE", share_link_server.url + "/tasks/c", headers={"Cookie": cookie})[0] == 403
    assert http("DELETE", share_link_server.url + "/tasks/c", headers=own)[1] == {"removed": True}


def test_a_cookie_write_from_another_origin_is_refused_even_when_all_origins_are_allowed():
    # Another port of localhost is the same site (SameSite does not stop it), and '*'
    # lets its page through CORS: only the dashboard's own origin may write by cookie.
    with running_server(api_tokens=(WRITE,), allow_origins=("*",)) as server:
        cookie = cookie_header(page_cookie(server, WRITE))
        status, body, _ = http("POST", server.url + "/progress", {"task_id": "csrf"},
                               headers={"Cookie": cookie, "Origin": "http://localhost:3000"})
        assert status == 403 and "own origin" in body["error"]
        assert http("POST", server.url + "/progress", {"task_id": "csrf"}, headers={
            "Authorization": "Bearer " + WRITE, "Origin": "http://localhost:3000"})[0] == 200


def test_header_wins_over_the_cookie(share_link_server):
    cookie = cookie_header(page_cookie(share_link_server, WRITE))
    assert http("GET", share_link_server.url + "/tasks", headers={
        "Cookie": cookie, "Authorization": "Bearer wrong"})[0] == 401


def test_ws_accepts_the_cookie_and_refuses_a_wrong_one(share_link_server):
    cookie = cookie_header(page_cookie(share_link_server, READ))
    url = share_link_server.url.replace("http://", "ws://") + "/ws"
    with connect(url, additional_headers={"Cookie": cookie}, open_timeout=5,
                 proxy=None) as feed:
        assert '"snapshot"' in feed.recv(timeout=5)
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, additional_headers={"Cookie": "progressista_token=wrong"},
                     open_timeout=5, proxy=None):
            pass
    assert refused.value.response.status_code == 401


def test_the_page_drops_the_token_from_its_address_bar():
    # The page's one job here (the browser test is the harness's): replaceState without it.
    with open(progressista.find_dashboard()[0], encoding="utf-8") as file:
        page = file.read()
    assert 'clean.searchParams.delete("token")' in page and "history.replaceState(" in page
