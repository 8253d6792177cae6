"""create_app(middleware=...): the extension point for a site's own rules.

Each test starts a real server with a middleware of its own and checks what it sees
(HTTP requests and /ws handshakes), in what order, and that its errors become a 500
while the server keeps serving.
"""

import json

import pytest
from websockets.exceptions import InvalidStatus

import progressista
from conftest import get_task, http, new_id, open_listener, post, running_server

pytestmark = pytest.mark.timeout(60)


# --- Refusing and admitting --------------------------------------------------------------


async def require_team(request, call_next):
    if "x-team" not in request.headers:
        return progressista.Response(403, b'{"error": "X-Team header required"}')
    return await call_next(request)


def test_middleware_can_reject_a_request():
    with running_server(middleware=[require_team]) as server:
        task_id = new_id()
        status, body, _ = post(server, {"task_id": task_id})
        assert (status, body) == (403, {"error": "X-Team header required"})
        assert get_task(server, task_id, {"X-Team": "a"})[0] == 404


def test_middleware_passes_accepted_requests_through():
    with running_server(middleware=[require_team]) as server:
        task_id = new_id()
        assert post(server, {"task_id": task_id, "n": 3}, {"X-Team": "a"})[0] == 200
        assert get_task(server, task_id, {"X-Team": "a"})[1]["n"] == 3


def test_middleware_sees_ws_handshakes_and_can_refuse_them():
    with running_server(middleware=[require_team]) as server:
        with pytest.raises(InvalidStatus) as refused:
            open_listener(server)
        assert refused.value.response.status_code == 403
        with open_listener(server, additional_headers={"X-Team": "a"}) as ws:
            assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_middleware_admitted_ws_still_needs_the_token():
    with running_server(middleware=[require_team], api_tokens=["tok"]) as server:
        with pytest.raises(InvalidStatus) as refused:
            open_listener(server, additional_headers={"X-Team": "a"})
        assert refused.value.response.status_code == 401
        with open_listener(server, "/ws?token=tok", additional_headers={"X-Team": "a"}) as ws:
            assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


# --- Order and errors --------------------------------------------------------------------


def test_middleware_added_after_create_app_runs_outermost_first():
    order = []

    async def outer(request, call_next):
        order.append("outer")
        return await call_next(request)

    async def inner(request, call_next):
        order.append("inner")
        return await call_next(request)

    app_settings = {"middleware": [outer]}
    with running_server(**app_settings) as server:
        server.app.add_middleware(inner)
        assert http("GET", server.url + "/health")[0] == 200
    assert order == ["outer", "inner"]


def test_middleware_error_is_answered_500_and_server_keeps_serving():
    async def broken(request, call_next):
        if request.path == "/tasks":
            raise RuntimeError("bug in middleware")
        return await call_next(request)

    with running_server(middleware=[broken]) as server:
        status, body, _ = http("GET", server.url + "/tasks")
        assert status == 500 and body["error"]
        assert http("GET", server.url + "/health")[0] == 200
