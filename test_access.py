"""Who may do what: API tokens, read-only tokens, CORS and the Origin check, over HTTP
and on the /ws handshake.

Each policy has a shared real server configured for it (conftest.token_server,
read_token_server, cors_server); each test asks as one caller (no token, a wrong one,
a read token, a foreign origin) and checks the answer and that nothing was stored.
"""

import json

import pytest
from websockets.exceptions import InvalidStatus

import progressista
from conftest import (ALLOWED_ORIGIN, FOREIGN_ORIGIN, READ_TOKEN, TOKENS, WS_HANDSHAKE, bearer,
                      get_task, http, new_id, open_listener, post, raw_connection,
                      read_response, redirect_of, running_server)

pytestmark = pytest.mark.timeout(60)

WRITE = bearer(TOKENS[0])
READ = bearer(READ_TOKEN)


# --- API tokens over HTTP ----------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("GET", "/tasks"), ("POST", "/progress"),
                                          ("GET", "/tasks/x"), ("DELETE", "/tasks"),
                                          ("DELETE", "/tasks/x")])
def test_missing_token_is_401_with_www_authenticate_bearer(token_server, method, path):
    status, body, headers = http(method, token_server.url + path,
                                 body={"task_id": "x"} if method == "POST" else None)
    assert status == 401 and body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("headers, query", [
    ({"Authorization": "Bearer wrong"}, ""),
    ({}, "?token=wrong"),
    ({"Authorization": "Basic YWxwaGEtdG9rZW46"}, ""),
    ({"Authorization": "Bearer alpha-token-and-more"}, ""),
], ids=["header", "query", "basic-scheme", "prefix-match"])
def test_wrong_token_is_401(token_server, headers, query):
    status, _, response_headers = http("GET", token_server.url + "/tasks" + query, headers=headers)
    assert status == 401
    assert "Bearer" in response_headers["WWW-Authenticate"]


def test_unauthorised_post_stores_nothing(token_server):
    task_id = new_id()
    assert post(token_server, {"task_id": task_id}, {"Authorization": "Bearer wrong"})[0] == 401
    status, _, _ = get_task(token_server, task_id, bearer(TOKENS[0]))
    assert status == 404


def test_bearer_header_token_is_accepted(token_server):
    task_id = new_id()
    status, _, _ = post(token_server, {"task_id": task_id}, bearer(TOKENS[0]))
    assert status == 200
    assert get_task(token_server, task_id, bearer(TOKENS[0]))[0] == 200


def test_query_token_is_accepted(token_server):
    status, body, _ = http("GET", token_server.url + f"/tasks?token={TOKENS[0]}")
    assert status == 200 and "tasks" in body


def test_second_of_several_configured_tokens_is_accepted(token_server):
    task_id = new_id()
    status, _, _ = post(token_server, {"task_id": task_id}, bearer(TOKENS[1]))
    assert status == 200


def test_query_token_works_with_status_filter(token_server):
    status, _, _ = http("GET", token_server.url + f"/tasks?status=running&token={TOKENS[1]}")
    assert status == 200


@pytest.mark.parametrize("path", ["/health", "/static/index.html"])
def test_public_pages_need_no_token(token_server, path):
    assert http("GET", token_server.url + path)[0] == 200


def test_root_redirect_needs_no_token(token_server):
    assert redirect_of(token_server, "/")[0] in (302, 307)


# --- Read-only tokens --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/tasks", "/tasks?status=running", "/metrics", "/auth"])
def test_read_token_may_view(read_token_server, path):
    assert http("GET", read_token_server.url + path, headers=READ)[0] == 200
    assert http("HEAD", read_token_server.url + path, headers=READ)[0] == 200


def test_read_token_may_read_one_task_and_open_the_live_feed(read_token_server):
    task_id = new_id()
    assert post(read_token_server, {"task_id": task_id, "n": 3}, WRITE)[0] == 200
    status, body, _ = get_task(read_token_server, task_id, READ)
    assert status == 200 and body["n"] == 3
    with open_listener(read_token_server, f"/ws?token={READ_TOKEN}") as ws:
        assert task_id in json.loads(ws.recv(timeout=3))["tasks"]


def test_read_token_may_not_post_and_the_update_is_not_stored(read_token_server):
    task_id = new_id()
    status, body, _ = post(read_token_server, {"task_id": task_id}, READ)
    assert status == 403
    assert "may only read" in body["error"] and "PROGRESSISTA_API_TOKEN" in body["error"]
    assert get_task(read_token_server, task_id, WRITE)[0] == 404


@pytest.mark.parametrize("path", ["/tasks", "/tasks?status=close", "/tasks/{id}"])
def test_read_token_may_not_delete(read_token_server, path):
    task_id = new_id()
    assert post(read_token_server, {"task_id": task_id, "status": "close"}, WRITE)[0] == 200
    status, body, _ = http("DELETE", read_token_server.url + path.format(id=task_id), headers=READ)
    assert status == 403 and "may only read" in body["error"]
    assert get_task(read_token_server, task_id, WRITE)[0] == 200


def test_auth_tells_the_dashboard_what_its_token_may_do(read_token_server, shared_server):
    assert http("GET", read_token_server.url + "/auth", headers=READ)[1] == {"access": "read"}
    assert http("GET", read_token_server.url + f"/auth?token={TOKENS[1]}")[1] == {"access": "write"}
    assert http("GET", read_token_server.url + "/auth")[0] == 401
    assert http("GET", shared_server.url + "/auth")[1] == {"access": "write"}  # no tokens: open


def test_a_wrong_token_is_still_401_when_read_tokens_are_set(read_token_server):
    status, _, headers = http("POST", read_token_server.url + "/progress", {"task_id": "x"},
                              headers={"Authorization": "Bearer viewer-token-not"})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")


def test_read_tokens_without_an_api_token_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="read tokens need an API token"):
        progressista.Settings.from_env({}, read_tokens=("viewer",))


# --- CORS: pages of other origins --------------------------------------------------------


def preflight(server, origin, path="/progress"):
    return http("OPTIONS", server.url + path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_preflight_from_listed_origin_gets_cors_headers(cors_server):
    status, _, headers = preflight(cors_server, ALLOWED_ORIGIN)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    allowed_headers = headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers


def test_preflight_needs_no_token_when_tokens_are_configured():
    with running_server(api_tokens=TOKENS, allow_origins=[ALLOWED_ORIGIN]) as server:
        status, _, headers = preflight(server, ALLOWED_ORIGIN)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


def test_preflight_from_unlisted_origin_gets_no_cors_headers(cors_server):
    status, _, headers = preflight(cors_server, FOREIGN_ORIGIN)
    assert status == 403
    assert headers.get("Access-Control-Allow-Origin") is None


def test_preflight_without_allow_origins_setting_gets_no_cors_headers(shared_server):
    _, _, headers = preflight(shared_server, ALLOWED_ORIGIN)
    assert headers.get("Access-Control-Allow-Origin") is None


def test_request_from_listed_origin_gets_allow_origin_header(cors_server):
    status, _, headers = post(cors_server, {"task_id": new_id()}, {"Origin": ALLOWED_ORIGIN})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


def test_error_answer_to_listed_origin_carries_allow_origin_header(cors_server):
    status, body, headers = post(cors_server, {"task_id": new_id(), "n": -1},
                                 {"Origin": ALLOWED_ORIGIN})
    assert status == 400
    assert headers.get("Access-Control-Allow-Origin") == ALLOWED_ORIGIN  # else unreadable


def test_post_from_foreign_browser_origin_is_refused_and_stores_nothing(cors_server):
    task_id = new_id()
    status, _, headers = post(cors_server, {"task_id": task_id}, {"Origin": FOREIGN_ORIGIN})
    assert status == 403
    assert headers.get("Access-Control-Allow-Origin") is None
    assert get_task(cors_server, task_id)[0] == 404


# --- The /ws handshake: token and Origin -------------------------------------------------


@pytest.mark.parametrize("query", ["", "?token=wrong"], ids=["missing", "wrong"])
def test_ws_handshake_without_valid_token_is_refused_401(token_server, query):
    with pytest.raises(InvalidStatus) as refused:
        open_listener(token_server, "/ws" + query)
    assert refused.value.response.status_code == 401


def test_ws_handshake_with_query_token_is_accepted(token_server):
    with open_listener(token_server, f"/ws?token={TOKENS[1]}") as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_with_bearer_header_is_accepted(token_server):
    with open_listener(token_server, additional_headers=bearer(TOKENS[0])) as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_refusal_for_a_foreign_origin_is_json_that_says_what_to_do(shared_server):
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(WS_HANDSHAKE.replace(b"\r\n\r\n",
                                          f"\r\nOrigin: {FOREIGN_ORIGIN}\r\n\r\n".encode()))
        status, headers, body = read_response(reader)
    assert status == 403
    assert headers["content-type"] == "application/json"
    assert "PROGRESSISTA_ALLOW_ORIGINS" in json.loads(body)["error"]


def test_ws_handshake_from_own_origin_is_accepted(shared_server):
    with open_listener(shared_server, origin=f"http://127.0.0.1:{shared_server.port}") as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_from_listed_origin_is_accepted(cors_server):
    with open_listener(cors_server, origin=ALLOWED_ORIGIN) as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_from_unlisted_origin_is_refused_when_origins_are_listed(cors_server):
    with pytest.raises(InvalidStatus) as refused:
        open_listener(cors_server, origin=FOREIGN_ORIGIN)
    assert refused.value.response.status_code == 403
