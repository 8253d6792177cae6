"""Tests of progressista.py, the server, against PROTOCOL.md version 1.

Most tests talk to a real server on an ephemeral loopback port (conftest.running_server)
through urllib, http.client, raw sockets and a real websockets client; the pure cores
(validate_update, apply_update, MemoryStore.sweep, Feed) are tested with an injected
`now`; the command line runs as a subprocess. Every test uses task ids of its own, so
tests that share a module-scoped server do not interfere.
"""

import asyncio
import base64
import contextlib
import hashlib
from http.client import HTTPConnection
import itertools
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import progressista
from conftest import (FakeClock, ServerThread, clean_env, free_port, http, running_server,
                      wait_for)

pytestmark = pytest.mark.timeout(60)

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "progressista.py")
TOKENS = ["alpha-token", "beta-token"]
ALLOWED_ORIGIN = "http://allowed.example"
FOREIGN_ORIGIN = "http://evil.example"

_ids = itertools.count()


def new_id(label="task"):
    """A task id no other test uses."""
    return f"{label}-{next(_ids)}-{os.getpid()}"


# --- Helpers -----------------------------------------------------------------------------


def post(server, body, headers=None):
    return http("POST", server.url + "/progress", body, headers)


def get_task(server, task_id, headers=None):
    return http("GET", task_url(server, task_id), headers=headers)


def task_url(server, task_id):
    return server.url + "/tasks/" + urllib.parse.quote(task_id, safe="")


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


def request_bytes(method, path, body=b"", headers=()):
    """A raw HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def raw_connection(server, timeout=5.0):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        yield sock, sock.makefile("rb")
    finally:
        sock.close()


def closed_by_server(reader):
    """True when the server closes the connection (EOF or reset) within the timeout."""
    try:
        return reader.read(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def open_listener(server, path="/ws", **options):
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


# --- Fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv():
    """One plain server (no token, no CORS) shared by the tests that cannot interfere."""
    with running_server() as running:
        yield running


@pytest.fixture(scope="module")
def auth_srv():
    with running_server(api_tokens=TOKENS) as running:
        yield running


@pytest.fixture(scope="module")
def cors_srv():
    with running_server(allow_origins=[ALLOWED_ORIGIN]) as running:
        yield running


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def clocked_srv(clock):
    """A fresh server whose clock the test moves (the sweep never runs on its own)."""
    with running_server(clock=clock, cleanup_interval=3600) as running:
        yield running


@pytest.fixture(scope="module")
def lifetime_srv():
    with running_server(stale_seconds=0.3, retention_seconds=0.3,
                        cleanup_interval=0.05) as running:
        yield running


# --- POST /progress ----------------------------------------------------------------------


def test_post_single_update_answers_ok_and_accepted_one(srv):
    status, body, _ = post(srv, {"task_id": new_id(), "n": 1})
    assert (status, body) == (200, {"ok": True, "accepted": 1})


def test_post_batch_answers_accepted_count(srv):
    batch = [{"task_id": new_id(), "n": i} for i in range(5)]
    status, body, _ = post(srv, batch)
    assert (status, body) == (200, {"ok": True, "accepted": 5})


def test_posted_fields_are_stored_as_sent(srv):
    task_id = new_id()
    update = {"task_id": task_id, "desc": "training", "n": 3, "total": 10, "unit": "B",
              "unit_scale": True, "unit_divisor": 1024, "rate": 2.5, "elapsed": 1.5,
              "postfix": "loss=0.12", "meta": {"host": "gpu1", "rank": 0}, "seq": 7,
              "timestamp": 1700000000.5}
    post(srv, update)
    status, task, _ = get_task(srv, task_id)
    assert status == 200
    assert {key: task[key] for key in update} == update


def test_new_task_gets_protocol_defaults(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id})
    _, task, _ = get_task(srv, task_id)
    assert (task["n"], task["total"], task["unit"], task["status"]) == (0, None, "it",
                                                                        "running")


@pytest.mark.parametrize("sent", ["start", "update", "running"])
def test_start_update_and_running_are_stored_as_running(srv, sent):
    task_id = new_id()
    post(srv, {"task_id": task_id, "status": sent})
    assert get_task(srv, task_id)[1]["status"] == "running"


@pytest.mark.parametrize("final", ["close", "error"])
def test_close_and_error_statuses_are_stored(srv, final):
    task_id = new_id()
    post(srv, {"task_id": task_id, "status": final, "error": "boom"})
    assert get_task(srv, task_id)[1]["status"] == final


def test_unknown_fields_are_ignored_and_not_stored(srv):
    task_id = new_id()
    status, body, _ = post(srv, {"task_id": task_id, "n": 1, "colour": "red",
                                 "nested": {"deep": [1, 2]}})
    assert (status, body["accepted"]) == (200, 1)
    task = get_task(srv, task_id)[1]
    assert "colour" not in task and "nested" not in task


def test_update_keeps_fields_it_does_not_name(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "desc": "epoch 1", "total": 100, "unit": "img",
               "meta": {"job": "j1"}})
    post(srv, {"task_id": task_id, "n": 50})
    task = get_task(srv, task_id)[1]
    assert (task["desc"], task["total"], task["unit"], task["meta"], task["n"]) == (
        "epoch 1", 100, "img", {"job": "j1"}, 50)


def test_update_replaces_fields_it_names_including_null(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "desc": "first", "total": 10})
    post(srv, {"task_id": task_id, "desc": "second", "total": None})
    task = get_task(srv, task_id)[1]
    assert (task["desc"], task["total"]) == ("second", None)


def test_boundary_lengths_are_accepted(srv):
    meta_value = "x" * (progressista.MAX_META_BYTES - len('{"a":""}'))
    task_id = "i" * 255 + new_id()[:1]  # 256 characters
    update = {"task_id": task_id, "desc": "d" * 1000, "unit": "u" * 32,
              "postfix": "p" * 1000, "error": "e" * 2000, "meta": {"a": meta_value}}
    assert post(srv, update)[0] == 200
    assert get_task(srv, task_id)[1]["desc"] == "d" * 1000


# --- seq ordering ------------------------------------------------------------------------


def test_lower_seq_is_ignored_but_counted_accepted(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "n": 5, "seq": 5})
    status, body, _ = post(srv, {"task_id": task_id, "n": 2, "seq": 2})
    assert (status, body["accepted"]) == (200, 1)
    assert get_task(srv, task_id)[1]["n"] == 5


def test_equal_seq_is_ignored(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "n": 5, "seq": 5})
    post(srv, {"task_id": task_id, "n": 9, "seq": 5})
    assert get_task(srv, task_id)[1]["n"] == 5


def test_higher_seq_is_applied(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "n": 5, "seq": 5})
    post(srv, {"task_id": task_id, "n": 6, "seq": 6})
    task = get_task(srv, task_id)[1]
    assert (task["n"], task["seq"]) == (6, 6)


def test_late_retry_does_not_reopen_closed_task(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "n": 10, "status": "close", "seq": 3})
    post(srv, {"task_id": task_id, "n": 9, "status": "update", "seq": 2})
    task = get_task(srv, task_id)[1]
    assert (task["status"], task["n"]) == ("close", 10)


def test_reordered_batch_keeps_highest_seq(srv):
    task_id = new_id()
    post(srv, [{"task_id": task_id, "n": 3, "seq": 3}, {"task_id": task_id, "n": 1, "seq": 1}])
    assert get_task(srv, task_id)[1]["n"] == 3


# --- created_at / updated_at (clock injected) --------------------------------------------


def test_created_at_and_updated_at_are_server_time_of_first_update(clocked_srv, clock):
    post(clocked_srv, {"task_id": "t", "timestamp": 5.0})
    task = get_task(clocked_srv, "t")[1]
    assert (task["created_at"], task["updated_at"]) == (clock.now, clock.now)


def test_applied_update_moves_updated_at_but_not_created_at(clocked_srv, clock):
    first = clock.now
    post(clocked_srv, {"task_id": "t", "seq": 1})
    clock.now += 5
    post(clocked_srv, {"task_id": "t", "seq": 2})
    task = get_task(clocked_srv, "t")[1]
    assert (task["created_at"], task["updated_at"]) == (first, first + 5)


def test_ignored_update_does_not_move_updated_at(clocked_srv, clock):
    first = clock.now
    post(clocked_srv, {"task_id": "t", "seq": 2})
    clock.now += 5
    post(clocked_srv, {"task_id": "t", "seq": 1})
    assert get_task(clocked_srv, "t")[1]["updated_at"] == first


# --- GET /tasks --------------------------------------------------------------------------


def test_get_tasks_lists_oldest_created_first(clocked_srv, clock):
    for task_id in ("charlie", "alpha", "bravo"):
        post(clocked_srv, {"task_id": task_id})
        clock.now += 1
    post(clocked_srv, {"task_id": "charlie", "n": 5})  # an update does not reorder
    status, body, _ = http("GET", clocked_srv.url + "/tasks")
    assert status == 200
    assert list(body["tasks"]) == ["charlie", "alpha", "bravo"]


def test_get_tasks_reports_server_now(clocked_srv, clock):
    assert http("GET", clocked_srv.url + "/tasks")[1]["now"] == clock.now


def test_get_tasks_status_filter_returns_only_that_status(clocked_srv):
    post(clocked_srv, [{"task_id": "r", "status": "running"}, {"task_id": "c", "status": "close"},
                       {"task_id": "e", "status": "error"}])
    status, body, _ = http("GET", clocked_srv.url + "/tasks?status=close")
    assert status == 200
    assert list(body["tasks"]) == ["c"]


def test_get_tasks_status_filter_finds_stale_tasks(clocked_srv, clock):
    post(clocked_srv, [{"task_id": "old"}])
    clock.now += progressista.STALE_SECONDS + 1
    post(clocked_srv, [{"task_id": "new"}])
    body = http("GET", clocked_srv.url + "/tasks?status=stale")[1]
    assert list(body["tasks"]) == ["old"]


def test_get_tasks_with_unknown_status_filter_is_400(srv):
    status, body, _ = http("GET", srv.url + "/tasks?status=finished")
    assert status == 400
    assert "status" in body["error"]


# --- GET and DELETE /tasks/{task_id} -----------------------------------------------------


@pytest.mark.parametrize("label", ["with/slash", "with space", "ünïcødé✓", "q?#%&="])
def test_get_task_by_url_encoded_id(srv, label):
    task_id = new_id(label)
    post(srv, {"task_id": task_id, "n": 4})
    status, task, _ = get_task(srv, task_id)
    assert status == 200
    assert (task["task_id"], task["n"]) == (task_id, 4)


def test_get_missing_task_is_404_json(srv):
    status, body, headers = get_task(srv, new_id("missing"))
    assert status == 404
    assert headers["Content-Type"].startswith("application/json") and body["error"]


@pytest.mark.parametrize("label", ["with/slash and space", "ünïcødé✓"])
def test_delete_task_by_url_encoded_id_removes_it(srv, label):
    task_id = new_id(label)
    post(srv, {"task_id": task_id})
    status, body, _ = http("DELETE", task_url(srv, task_id))
    assert (status, body) == (200, {"removed": True})
    assert get_task(srv, task_id)[0] == 404


def test_delete_missing_task_reports_removed_false(srv):
    status, body, _ = http("DELETE", task_url(srv, new_id("missing")))
    assert (status, body) == (200, {"removed": False})


# --- DELETE /tasks -----------------------------------------------------------------------


def test_delete_tasks_by_status_removes_only_that_status(clocked_srv):
    post(clocked_srv, [{"task_id": "r"}, {"task_id": "c1", "status": "close"},
                       {"task_id": "e", "status": "error"}, {"task_id": "c2", "status": "close"}])
    status, body, _ = http("DELETE", clocked_srv.url + "/tasks?status=close")
    assert status == 200
    assert sorted(body["removed"]) == ["c1", "c2"]
    assert sorted(http("GET", clocked_srv.url + "/tasks")[1]["tasks"]) == ["e", "r"]


def test_delete_tasks_older_than_removes_only_silent_tasks(clocked_srv, clock):
    post(clocked_srv, {"task_id": "old"})
    clock.now += 10
    post(clocked_srv, {"task_id": "new"})
    clock.now += 5
    status, body, _ = http("DELETE", clocked_srv.url + "/tasks?older_than=10")
    assert (status, body) == (200, {"removed": ["old"]})


def test_delete_tasks_with_status_and_older_than_needs_both(clocked_srv, clock):
    post(clocked_srv, [{"task_id": "old-close", "status": "close"}, {"task_id": "old-run"}])
    clock.now += 10
    post(clocked_srv, {"task_id": "new-close", "status": "close"})
    clock.now += 5
    body = http("DELETE", clocked_srv.url + "/tasks?status=close&older_than=10")[1]
    assert body == {"removed": ["old-close"]}


def test_delete_tasks_without_filters_removes_every_task(clocked_srv):
    post(clocked_srv, [{"task_id": "a"}, {"task_id": "b", "status": "close"}])
    body = http("DELETE", clocked_srv.url + "/tasks")[1]
    assert sorted(body["removed"]) == ["a", "b"]
    assert http("GET", clocked_srv.url + "/tasks")[1]["tasks"] == {}


@pytest.mark.parametrize("query", ["older_than=-1", "older_than=soon", "status=done"])
def test_delete_tasks_with_bad_filter_is_400_and_removes_nothing(clocked_srv, query):
    post(clocked_srv, {"task_id": "keep"})
    status, body, _ = http("DELETE", clocked_srv.url + "/tasks?" + query)
    assert status == 400 and body["error"]
    assert list(http("GET", clocked_srv.url + "/tasks")[1]["tasks"]) == ["keep"]


# --- GET /health, /, /static/index.html, HEAD, 404, 405 ----------------------------------


def test_health_reports_tasks_and_running_ones(clocked_srv):
    post(clocked_srv, [{"task_id": "r1"}, {"task_id": "r2"}, {"task_id": "c", "status": "close"}])
    status, body, _ = http("GET", clocked_srv.url + "/health")
    assert status == 200
    assert (body["status"], body["tasks"], body["active"]) == ("ok", 3, 2)


def test_health_does_not_count_stale_tasks_as_active(clocked_srv, clock):
    post(clocked_srv, {"task_id": "silent"})
    clock.now += progressista.STALE_SECONDS + 1
    body = http("GET", clocked_srv.url + "/health")[1]
    assert (body["tasks"], body["active"]) == (1, 0)


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


def test_root_redirects_to_dashboard_keeping_query_string(srv):
    status, location = redirect_of(srv, "/?token=abc&view=grid")
    assert status in (302, 307)
    assert location == "/static/index.html?token=abc&view=grid"


def test_root_redirect_without_query_has_no_question_mark(srv):
    assert redirect_of(srv, "/")[1] == "/static/index.html"


def test_dashboard_page_is_served_as_html(srv):
    status, body, headers = http("GET", srv.url + "/static/index.html")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<html" in body.lower()


def test_dashboard_csp_allows_its_inline_script_by_sha256_hash(srv):
    _, page, headers = http("GET", srv.url + "/static/index.html")
    policy = headers["Content-Security-Policy"]
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    assert scripts, "the dashboard has an inline script"
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";")[0]


@pytest.mark.parametrize("path", ["/static/../progressista.py", "/static/%2e%2e/progressista.py",
                                  "/static/..%2fprogressista.py", "/static/"])
def test_static_serves_nothing_but_the_dashboard(srv, path):
    with raw_connection(srv) as (sock, reader):
        sock.sendall(request_bytes("GET", path))
        status, _, body = read_response(reader)
    assert status == 404
    assert b"import" not in body


def test_head_answers_headers_without_body(srv):
    conn = HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("HEAD", "/health")
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length")) > 0
    assert response.read() == b""
    conn.request("GET", "/health")  # the connection is still in step: no stray body
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.close()


def test_unknown_path_is_404_json(srv):
    status, body, headers = http("GET", srv.url + "/nowhere")
    assert status == 404
    assert headers["Content-Type"].startswith("application/json") and body["error"]


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/progress", "POST"),
    ("PUT", "/progress", "POST"),
    ("POST", "/health", "GET"),
    ("POST", "/tasks", "DELETE"),
    ("PATCH", "/tasks/some-id", "GET"),
])
def test_wrong_method_is_405_with_allow_header(srv, method, path, allowed):
    status, body, headers = http(method, srv.url + path, body=b"" if method != "GET" else None)
    assert status == 405 and body["error"]
    assert allowed in [part.strip() for part in headers["Allow"].split(",")]


# --- 400: bad bodies and bad fields ------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"task_id": "x",}', b"\xff\xfe"],
                         ids=["broken", "empty", "trailing-comma", "not-utf8"])
def test_malformed_json_is_400(srv, raw):
    status, body, _ = post(srv, raw)
    assert status == 400 and "JSON" in body["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_is_400(srv, literal):
    task_id = new_id()
    status, body, _ = post(srv, f'{{"task_id": "{task_id}", "n": {literal}}}'.encode())
    assert status == 400 and body["error"]
    assert get_task(srv, task_id)[0] == 404


@pytest.mark.parametrize("field", ["n", "total", "rate", "elapsed", "timestamp"])
def test_number_overflowing_to_infinity_is_400_naming_the_field(srv, field):
    task_id = new_id()
    status, body, _ = post(srv, f'{{"task_id": "{task_id}", "{field}": 1e999}}'.encode())
    assert status == 400
    assert field in body["error"]


def test_overflowing_number_in_meta_is_400(srv):
    status, body, _ = post(srv, b'{"task_id": "m", "meta": {"big": 1e999}}')
    assert status == 400 and "meta" in body["error"]


@pytest.mark.parametrize("field", ["n", "total", "elapsed", "timestamp", "unit_divisor"])
def test_integer_too_big_for_a_float_is_400_naming_the_field(srv, field):
    huge = "1" + "0" * 400  # a valid JSON integer beyond float range
    status, body, _ = post(srv, f'{{"task_id": "{new_id()}", "{field}": {huge}}}'.encode())
    assert status == 400, body
    assert field in body["error"]


def test_deeply_nested_json_is_400(srv):
    status, body, _ = post(srv, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"]


@pytest.mark.parametrize("raw", [b"42", b'"text"', b"null", b"true"])
def test_body_that_is_neither_object_nor_array_is_400(srv, raw):
    assert post(srv, raw)[0] == 400


BAD_FIELDS = [
    ("n-string", {"n": "5"}, "n"),
    ("n-bool", {"n": True}, "n"),
    ("n-negative", {"n": -1}, "n"),
    ("n-null", {"n": None}, "n"),
    ("total-negative", {"total": -3}, "total"),
    ("total-bool", {"total": False}, "total"),
    ("total-string", {"total": "10"}, "total"),
    ("desc-1001", {"desc": "d" * 1001}, "desc"),
    ("desc-number", {"desc": 7}, "desc"),
    ("unit-33", {"unit": "u" * 33}, "unit"),
    ("unit-number", {"unit": 1}, "unit"),
    ("unit_scale-string", {"unit_scale": "yes"}, "unit_scale"),
    ("unit_divisor-zero", {"unit_divisor": 0}, "unit_divisor"),
    ("unit_divisor-bool", {"unit_divisor": True}, "unit_divisor"),
    ("rate-string", {"rate": "fast"}, "rate"),
    ("elapsed-negative", {"elapsed": -0.5}, "elapsed"),
    ("postfix-1001", {"postfix": "p" * 1001}, "postfix"),
    ("postfix-object", {"postfix": {"loss": 1}}, "postfix"),
    ("error-2001", {"status": "error", "error": "e" * 2001}, "error"),
    ("status-unknown", {"status": "done"}, "status"),
    ("status-number", {"status": 1}, "status"),
    ("status-stale", {"status": "stale"}, "status"),
    ("meta-list", {"meta": [1, 2]}, "meta"),
    ("meta-string", {"meta": "job=1"}, "meta"),
    ("meta-nested-object", {"meta": {"a": {"b": 1}}}, "meta"),
    ("meta-list-value", {"meta": {"a": [1]}}, "meta"),
    ("meta-over-4KiB", {"meta": {"a": "x" * progressista.MAX_META_BYTES}}, "meta"),
    ("seq-fraction", {"seq": 1.5}, "seq"),
    ("seq-string", {"seq": "3"}, "seq"),
    ("seq-bool", {"seq": True}, "seq"),
    ("timestamp-string", {"timestamp": "now"}, "timestamp"),
]


@pytest.mark.parametrize("fields, named", [case[1:] for case in BAD_FIELDS],
                         ids=[case[0] for case in BAD_FIELDS])
def test_bad_field_is_400_naming_the_field(srv, fields, named):
    status, body, headers = post(srv, {"task_id": new_id(), **fields})
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert re.match(rf"{named}\b", body["error"]), body["error"]


@pytest.mark.parametrize("task_id", [None, "", "x" * 257, 42, ["a"]],
                         ids=["missing", "empty", "257-chars", "number", "list"])
def test_bad_task_id_is_400_naming_task_id(srv, task_id):
    update = {"n": 1} if task_id is None else {"task_id": task_id, "n": 1}
    status, body, _ = post(srv, update)
    assert status == 400
    assert "task_id" in body["error"]


def test_rejected_update_stores_nothing(srv):
    task_id = new_id()
    assert post(srv, {"task_id": task_id, "desc": "ok", "n": -1})[0] == 400
    assert get_task(srv, task_id)[0] == 404


def test_rejected_update_leaves_existing_task_unchanged(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "n": 1, "desc": "before"})
    post(srv, {"task_id": task_id, "n": 2, "desc": "after", "total": -1})
    task = get_task(srv, task_id)[1]
    assert (task["n"], task["desc"]) == (1, "before")


def test_batch_error_names_index_and_field(srv):
    batch = [{"task_id": new_id(), "n": 1} for _ in range(5)]
    batch[3]["n"] = "three"
    status, body, _ = post(srv, batch)
    assert status == 400
    assert "tasks[3].n" in body["error"]


def test_batch_element_that_is_not_an_object_is_named_by_index(srv):
    status, body, _ = post(srv, [{"task_id": new_id()}, "oops"])
    assert status == 400
    assert "tasks[1]" in body["error"]


def test_batch_of_1000_with_one_bad_element_stores_nothing(srv):
    prefix = new_id("batch")
    batch = [{"task_id": f"{prefix}-{i}", "n": i} for i in range(1000)]
    batch[617]["total"] = -1
    status, body, _ = post(srv, batch)
    assert status == 400 and "tasks[617].total" in body["error"]
    stored = http("GET", srv.url + "/tasks")[1]["tasks"]
    assert not [task_id for task_id in stored if task_id.startswith(prefix)]


def test_batch_of_1000_updates_is_accepted(srv):
    prefix = new_id("batch")
    status, body, _ = post(srv, [{"task_id": f"{prefix}-{i}", "n": i} for i in range(1000)])
    assert (status, body) == (200, {"ok": True, "accepted": 1000})
    assert get_task(srv, f"{prefix}-999")[1]["n"] == 999


def test_batch_of_1001_updates_is_refused_and_stores_nothing(srv):
    prefix = new_id("batch")
    status, body, _ = post(srv, [{"task_id": f"{prefix}-{i}"} for i in range(1001)])
    assert status in (400, 413) and "1000" in body["error"]
    assert get_task(srv, f"{prefix}-0")[0] == 404


# --- 413, 431, garbage, limits -----------------------------------------------------------


def test_body_over_default_limit_is_413_without_reading_it(srv):
    head = request_bytes("POST", "/progress", headers=[
        ("Content-Type", "application/json"),
        ("Content-Length", str(progressista.MAX_BODY_BYTES + 1))])
    with raw_connection(srv) as (sock, reader):
        sock.sendall(head)  # the body is never sent: the answer must not wait for it
        status, _, body = read_response(reader)
    assert status == 413
    assert json.loads(body)["error"]


def test_body_over_configured_max_body_bytes_is_413():
    with running_server(max_body_bytes=256) as server:
        task_id = new_id()
        status, body, _ = post(server, {"task_id": task_id, "desc": "d" * 400})
        assert status == 413 and body["error"]
        assert get_task(server, task_id)[0] == 404


def test_body_at_configured_max_body_bytes_is_accepted():
    with running_server(max_body_bytes=256) as server:
        raw = json.dumps({"task_id": new_id(), "desc": ""}).encode()
        raw = raw[:-2] + b"d" * (256 - len(raw)) + raw[-2:]
        assert len(raw) == 256
        assert post(server, raw)[0] == 200


def test_oversized_headers_are_431(srv):
    request = request_bytes("GET", "/health", headers=[("X-Padding", "p" * 20_000)])
    with raw_connection(srv) as (sock, reader):
        sock.sendall(request)
        status, _, body = read_response(reader)
    assert status == 431
    assert json.loads(body)["error"]


def test_garbage_instead_of_request_line_is_400(srv):
    with raw_connection(srv) as (sock, reader):
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 400 and json.loads(body)["error"]


def test_garbage_request_line_connection_is_closed(srv):
    with raw_connection(srv, timeout=3) as (sock, reader):
        sock.sendall(b"hello there\r\n\r\n")
        read_response(reader)
        assert closed_by_server(reader)


def test_server_keeps_serving_others_after_garbage(srv):
    with raw_connection(srv) as (other, other_reader):  # opened before, used after
        with raw_connection(srv) as (bad, bad_reader):
            bad.sendall(b"\x00\xff" * 100 + b"\r\n\r\n")
            read_response(bad_reader)
        other.sendall(request_bytes("GET", "/health"))
        status, _, _ = read_response(other_reader)
    assert status == 200
    assert http("GET", srv.url + "/health")[0] == 200


def test_body_over_limit_sent_in_full_still_gets_413(srv):
    big = json.dumps([{"task_id": "x", "desc": "d" * 1000}] * 1100).encode()
    assert len(big) > progressista.MAX_BODY_BYTES
    status, body, _ = post(srv, big)
    assert status == 413 and body["error"]


def test_conflicting_content_lengths_are_400_and_close_the_connection(srv):
    task_id = new_id()
    body = json.dumps({"task_id": task_id}).encode()
    request = (b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(body)) + body
    with raw_connection(srv, timeout=3) as (sock, reader):
        sock.sendall(request)
        status, _, _ = read_response(reader)
        assert status == 400
        assert closed_by_server(reader)  # no second, smuggled request is answered
    assert get_task(srv, task_id)[0] == 404


def test_chunked_body_is_refused_with_a_clear_error(srv):
    with raw_connection(srv, timeout=3) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"f\r\n{\"task_id\":\"a\"}\r\n0\r\n\r\n")
        status, _, body = read_response(reader)
    assert status in (400, 411) and "Content-Length" in json.loads(body)["error"]


def test_ws_path_without_upgrade_headers_is_refused(srv):
    status, body, headers = http("GET", srv.url + "/ws")
    assert status == 426
    assert headers["Upgrade"] == "websocket"
    assert "Connection header" in body["error"]


def test_head_on_ws_is_answered_like_a_get_without_upgrade(srv):
    status, body, headers = http("HEAD", srv.url + "/ws")
    assert status == 426
    assert headers["Upgrade"] == "websocket"


def test_ws_refusal_for_a_foreign_origin_is_json_that_says_what_to_do(srv):
    with raw_connection(srv) as (sock, reader):
        sock.sendall(WS_HANDSHAKE.replace(b"\r\n\r\n",
                                          f"\r\nOrigin: {FOREIGN_ORIGIN}\r\n\r\n".encode()))
        status, headers, body = read_response(reader)
    assert status == 403
    assert headers["content-type"] == "application/json"
    assert "PROGRESSISTA_ALLOW_ORIGINS" in json.loads(body)["error"]


def test_new_task_past_max_tasks_is_refused_with_503_or_429():
    with running_server(max_tasks=3) as server:
        post(server, [{"task_id": f"t{i}"} for i in range(3)])
        status, body, _ = post(server, {"task_id": "t3"})
        assert status in (429, 503)
        assert "max" in body["error"].lower()
        assert get_task(server, "t3")[0] == 404


def test_existing_task_still_updates_when_max_tasks_is_reached():
    with running_server(max_tasks=3) as server:
        post(server, [{"task_id": f"t{i}"} for i in range(3)])
        assert post(server, {"task_id": "t1", "n": 42})[0] == 200
        assert get_task(server, "t1")[1]["n"] == 42


def test_batch_with_a_new_task_past_max_tasks_stores_nothing():
    with running_server(max_tasks=2) as server:
        post(server, [{"task_id": "t0"}, {"task_id": "t1"}])
        status, _, _ = post(server, [{"task_id": "t0", "n": 7}, {"task_id": "new"}])
        assert status in (429, 503)
        assert get_task(server, "t0")[1]["n"] == 0


# --- Connection handling -----------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_socket(srv):
    conn = HTTPConnection("127.0.0.1", srv.port, timeout=5)
    task_id = new_id()
    conn.request("GET", "/health")
    conn.getresponse().read()
    sock = conn.sock
    local = sock.getsockname()
    for n in range(3):
        conn.request("POST", "/progress", json.dumps({"task_id": task_id, "n": n}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and not response.will_close
        response.read()
    conn.request("GET", "/tasks/" + task_id)
    assert json.loads(conn.getresponse().read())["n"] == 2
    assert conn.sock is sock and sock.getsockname() == local
    conn.close()


def test_connection_close_request_is_answered_then_closed(srv):
    with raw_connection(srv, timeout=3) as (sock, reader):
        sock.sendall(request_bytes("GET", "/health", headers=[("Connection", "close")]))
        status, _, _ = read_response(reader)
        assert status == 200
        assert closed_by_server(reader)


def test_pipelined_requests_are_answered_in_order(srv):
    task_id = new_id()
    body = json.dumps({"task_id": task_id, "n": 11}).encode()
    requests = (request_bytes("GET", "/health")
                + request_bytes("POST", "/progress", body, [("Content-Type", "application/json")])
                + request_bytes("GET", "/tasks/" + task_id)
                + request_bytes("GET", "/nowhere"))
    with raw_connection(srv) as (sock, reader):
        sock.sendall(requests)
        answers = [read_response(reader) for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 404]
    assert json.loads(answers[0][2])["status"] == "ok"
    assert json.loads(answers[2][2])["n"] == 11


def test_nothing_pipelined_behind_connection_close_is_read_or_applied(srv):
    closing_id, behind_id = new_id(), new_id()
    requests = (request_bytes("POST", "/progress", json.dumps({"task_id": closing_id}).encode(),
                              [("Connection", "close")])
                + request_bytes("POST", "/progress", json.dumps({"task_id": behind_id}).encode()))
    with raw_connection(srv) as (sock, reader):
        sock.sendall(requests)
        status, _, _ = read_response(reader)
        assert status == 200 and closed_by_server(reader)
    assert get_task(srv, closing_id)[0] == 200
    assert get_task(srv, behind_id)[0] == 404  # never answered, so never stored


def test_expect_100_continue_gets_interim_response_before_body(srv):
    task_id = new_id()
    body = json.dumps({"task_id": task_id, "n": 5}).encode()
    head = request_bytes("POST", "/progress", headers=[
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("Expect", "100-continue")])
    with raw_connection(srv) as (sock, reader):
        sock.sendall(head)
        interim, _, _ = read_response(reader)
        sock.sendall(body)
        final, _, answer = read_response(reader)
    assert (interim, final) == (100, 200)
    assert json.loads(answer)["accepted"] == 1


def test_expect_100_continue_over_limit_is_413_without_continue(srv):
    head = request_bytes("POST", "/progress", headers=[
        ("Content-Length", str(progressista.MAX_BODY_BYTES * 2)), ("Expect", "100-continue")])
    with raw_connection(srv) as (sock, reader):
        sock.sendall(head)
        status, _, _ = read_response(reader)
    assert status == 413


def test_body_split_across_packets_is_reassembled(srv):
    task_id = new_id()
    body = json.dumps({"task_id": task_id, "n": 8}).encode()
    request = request_bytes("POST", "/progress", body, [("Content-Type", "application/json")])
    with raw_connection(srv) as (sock, reader):
        for i in range(0, len(request), 7):
            sock.sendall(request[i:i + 7])
            time.sleep(0.001)
        status, _, _ = read_response(reader)
    assert status == 200
    assert get_task(srv, task_id)[1]["n"] == 8


# --- Tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("GET", "/tasks"), ("POST", "/progress"),
                                          ("GET", "/tasks/x"), ("DELETE", "/tasks"),
                                          ("DELETE", "/tasks/x")])
def test_missing_token_is_401_with_www_authenticate_bearer(auth_srv, method, path):
    status, body, headers = http(method, auth_srv.url + path,
                                 body={"task_id": "x"} if method == "POST" else None)
    assert status == 401 and body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("headers, query", [
    ({"Authorization": "Bearer wrong"}, ""),
    ({}, "?token=wrong"),
    ({"Authorization": "Basic YWxwaGEtdG9rZW46"}, ""),
    ({"Authorization": "Bearer alpha-token-and-more"}, ""),
], ids=["header", "query", "basic-scheme", "prefix-match"])
def test_wrong_token_is_401(auth_srv, headers, query):
    status, _, response_headers = http("GET", auth_srv.url + "/tasks" + query, headers=headers)
    assert status == 401
    assert "Bearer" in response_headers["WWW-Authenticate"]


def test_unauthorised_post_stores_nothing(auth_srv):
    task_id = new_id()
    assert post(auth_srv, {"task_id": task_id}, {"Authorization": "Bearer wrong"})[0] == 401
    status, _, _ = get_task(auth_srv, task_id, {"Authorization": f"Bearer {TOKENS[0]}"})
    assert status == 404


def test_bearer_header_token_is_accepted(auth_srv):
    task_id = new_id()
    status, _, _ = post(auth_srv, {"task_id": task_id}, {"Authorization": f"Bearer {TOKENS[0]}"})
    assert status == 200
    assert get_task(auth_srv, task_id, {"Authorization": f"Bearer {TOKENS[0]}"})[0] == 200


def test_query_token_is_accepted(auth_srv):
    status, body, _ = http("GET", auth_srv.url + f"/tasks?token={TOKENS[0]}")
    assert status == 200 and "tasks" in body


def test_second_of_several_configured_tokens_is_accepted(auth_srv):
    task_id = new_id()
    status, _, _ = post(auth_srv, {"task_id": task_id}, {"Authorization": f"Bearer {TOKENS[1]}"})
    assert status == 200


def test_query_token_works_with_status_filter(auth_srv):
    status, _, _ = http("GET", auth_srv.url + f"/tasks?status=running&token={TOKENS[1]}")
    assert status == 200


@pytest.mark.parametrize("path", ["/health", "/static/index.html"])
def test_public_pages_need_no_token(auth_srv, path):
    assert http("GET", auth_srv.url + path)[0] == 200


def test_root_redirect_needs_no_token(auth_srv):
    assert redirect_of(auth_srv, "/")[0] in (302, 307)


# --- Read-only tokens ----------------------------------------------------------------------

READ_TOKEN = "viewer-token"
WRITE = {"Authorization": f"Bearer {TOKENS[0]}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture(scope="module")
def read_srv():
    with running_server(api_tokens=TOKENS, read_tokens=[READ_TOKEN]) as running:
        yield running


@pytest.mark.parametrize("path", ["/tasks", "/tasks?status=running", "/metrics", "/auth"])
def test_read_token_may_view(read_srv, path):
    assert http("GET", read_srv.url + path, headers=READ)[0] == 200
    assert http("HEAD", read_srv.url + path, headers=READ)[0] == 200


def test_read_token_may_read_one_task_and_open_the_live_feed(read_srv):
    task_id = new_id()
    assert post(read_srv, {"task_id": task_id, "n": 3}, WRITE)[0] == 200
    status, body, _ = get_task(read_srv, task_id, READ)
    assert status == 200 and body["n"] == 3
    with open_listener(read_srv, f"/ws?token={READ_TOKEN}") as ws:
        assert task_id in json.loads(ws.recv(timeout=3))["tasks"]


def test_read_token_may_not_post_and_the_update_is_not_stored(read_srv):
    task_id = new_id()
    status, body, _ = post(read_srv, {"task_id": task_id}, READ)
    assert status == 403
    assert "may only read" in body["error"] and "PROGRESSISTA_API_TOKEN" in body["error"]
    assert get_task(read_srv, task_id, WRITE)[0] == 404


@pytest.mark.parametrize("path", ["/tasks", "/tasks?status=close", "/tasks/{id}"])
def test_read_token_may_not_delete(read_srv, path):
    task_id = new_id()
    assert post(read_srv, {"task_id": task_id, "status": "close"}, WRITE)[0] == 200
    status, body, _ = http("DELETE", read_srv.url + path.format(id=task_id), headers=READ)
    assert status == 403 and "may only read" in body["error"]
    assert get_task(read_srv, task_id, WRITE)[0] == 200


def test_auth_tells_the_dashboard_what_its_token_may_do(read_srv, srv):
    assert http("GET", read_srv.url + "/auth", headers=READ)[1] == {"access": "read"}
    assert http("GET", read_srv.url + f"/auth?token={TOKENS[1]}")[1] == {"access": "write"}
    assert http("GET", read_srv.url + "/auth")[0] == 401
    assert http("GET", srv.url + "/auth")[1] == {"access": "write"}  # no tokens: open


def test_a_wrong_token_is_still_401_when_read_tokens_are_set(read_srv):
    status, _, headers = http("POST", read_srv.url + "/progress", {"task_id": "x"},
                              headers={"Authorization": "Bearer viewer-token-not"})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")


def test_read_tokens_without_an_api_token_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="read tokens need an API token"):
        progressista.Settings.from_env({}, read_tokens=("viewer",))


# --- CORS --------------------------------------------------------------------------------


def preflight(server, origin, path="/progress"):
    return http("OPTIONS", server.url + path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_preflight_from_listed_origin_gets_cors_headers(cors_srv):
    status, _, headers = preflight(cors_srv, ALLOWED_ORIGIN)
    assert status in (200, 204)
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    allowed_headers = headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers


def test_preflight_needs_no_token_when_tokens_are_configured():
    with running_server(api_tokens=TOKENS, allow_origins=[ALLOWED_ORIGIN]) as server:
        status, _, headers = preflight(server, ALLOWED_ORIGIN)
    assert status in (200, 204)
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


def test_preflight_from_unlisted_origin_gets_no_cors_headers(cors_srv):
    status, _, headers = preflight(cors_srv, FOREIGN_ORIGIN)
    assert status == 403 or status < 300
    assert headers.get("Access-Control-Allow-Origin") is None


def test_preflight_without_allow_origins_setting_gets_no_cors_headers(srv):
    _, _, headers = preflight(srv, ALLOWED_ORIGIN)
    assert headers.get("Access-Control-Allow-Origin") is None


def test_request_from_listed_origin_gets_allow_origin_header(cors_srv):
    status, _, headers = post(cors_srv, {"task_id": new_id()}, {"Origin": ALLOWED_ORIGIN})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


def test_error_answer_to_listed_origin_carries_allow_origin_header(cors_srv):
    status, body, headers = post(cors_srv, {"task_id": new_id(), "n": -1},
                                 {"Origin": ALLOWED_ORIGIN})
    assert status == 400
    assert headers.get("Access-Control-Allow-Origin") == ALLOWED_ORIGIN  # else unreadable


def test_post_from_foreign_browser_origin_is_refused_and_stores_nothing(cors_srv):
    task_id = new_id()
    status, _, headers = post(cors_srv, {"task_id": task_id}, {"Origin": FOREIGN_ORIGIN})
    assert status == 403
    assert headers.get("Access-Control-Allow-Origin") is None
    assert get_task(cors_srv, task_id)[0] == 404


# --- /ws ---------------------------------------------------------------------------------


def test_ws_sends_snapshot_of_existing_tasks_on_connect(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id, "n": 3, "desc": "snap"})
    with open_listener(srv) as ws:
        message = json.loads(ws.recv(timeout=3))
    assert message["type"] == "snapshot"
    assert message["tasks"][task_id]["n"] == 3 and isinstance(message["now"], float)


def test_ws_sends_update_after_post(srv):
    task_id = new_id()
    with open_listener(srv) as ws:
        ws.recv(timeout=3)
        post(srv, {"task_id": task_id, "n": 21})
        message = receive_until(ws, updated(task_id, n=21))
    assert isinstance(message["now"], float)


def test_ws_update_carries_only_changed_tasks(srv):
    quiet, busy = new_id("quiet"), new_id("busy")
    with open_listener(srv) as ws:
        ws.recv(timeout=3)
        post(srv, {"task_id": quiet})
        receive_until(ws, updated(quiet))
        post(srv, {"task_id": busy, "n": 1})
        message = receive_until(ws, updated(busy))
    assert quiet not in message["tasks"]


def test_ws_coalesces_updates_within_one_interval_into_one_message_with_latest_state():
    with running_server(broadcast_interval=0.3) as server:
        marker, task_id = new_id("marker"), new_id("busy")
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            post(server, {"task_id": marker})
            receive_until(ws, updated(marker))  # a broadcast tick has just passed
            conn = HTTPConnection("127.0.0.1", server.port, timeout=5)
            for n in range(1, 21):
                conn.request("POST", "/progress",
                             json.dumps({"task_id": task_id, "n": n, "seq": n}),
                             {"Content-Type": "application/json"})
                conn.getresponse().read()
            conn.close()
            messages = [receive_until(ws, updated(task_id), timeout=2)]
            with contextlib.suppress(TimeoutError):
                while True:
                    messages.append(json.loads(ws.recv(timeout=0.7)))
    carrying = [m for m in messages if m["type"] == "update" and task_id in m["tasks"]]
    assert len(carrying) == 1
    assert carrying[0]["tasks"][task_id]["n"] == 20


def test_ws_sends_remove_on_delete(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id})
    with open_listener(srv) as ws:
        ws.recv(timeout=3)
        http("DELETE", task_url(srv, task_id))
        # Other tests share this server: a removal of theirs may come in the same message.
        receive_until(ws, lambda m: m["type"] == "remove" and task_id in m["ids"])


def test_ws_sends_remove_for_bulk_delete(clocked_srv):
    post(clocked_srv, [{"task_id": "a", "status": "close"}, {"task_id": "b", "status": "close"}])
    with open_listener(clocked_srv) as ws:
        ws.recv(timeout=3)
        http("DELETE", clocked_srv.url + "/tasks?status=close")
        message = receive_until(ws, lambda m: m["type"] == "remove")
    assert sorted(message["ids"]) == ["a", "b"]


def test_ws_answers_client_ping_with_pong(srv):
    with open_listener(srv) as ws:
        ws.recv(timeout=3)
        assert ws.ping().wait(2)


def test_ws_listener_that_closes_is_forgotten_by_the_server():
    with running_server() as server:
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            assert on_server_loop(server, lambda: len(server.app.hub.listeners)) == 1
        wait_for(lambda: on_server_loop(server, lambda: len(server.app.hub.listeners)) == 0, 3,
                 message="the listener to be dropped")


def test_ws_ignores_messages_from_the_client(srv):
    task_id = new_id()
    with open_listener(srv) as ws:
        ws.recv(timeout=3)
        ws.send("hello server")
        ws.send(b"\x00binary")
        post(srv, {"task_id": task_id, "n": 2})
        receive_until(ws, updated(task_id, n=2))


@pytest.mark.parametrize("query", ["", "?token=wrong"], ids=["missing", "wrong"])
def test_ws_handshake_without_valid_token_is_refused_401(auth_srv, query):
    with pytest.raises(InvalidStatus) as refused:
        open_listener(auth_srv, "/ws" + query)
    assert refused.value.response.status_code == 401


def test_ws_handshake_with_query_token_is_accepted(auth_srv):
    with open_listener(auth_srv, f"/ws?token={TOKENS[1]}") as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_with_bearer_header_is_accepted(auth_srv):
    with open_listener(auth_srv, additional_headers={"Authorization": f"Bearer {TOKENS[0]}"}) as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_from_foreign_browser_origin_is_refused_403(srv):
    with pytest.raises(InvalidStatus) as refused:
        open_listener(srv, origin=FOREIGN_ORIGIN)
    assert refused.value.response.status_code == 403


def test_ws_handshake_from_own_origin_is_accepted(srv):
    with open_listener(srv, origin=f"http://127.0.0.1:{srv.port}") as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_from_listed_origin_is_accepted(cors_srv):
    with open_listener(cors_srv, origin=ALLOWED_ORIGIN) as ws:
        assert json.loads(ws.recv(timeout=3))["type"] == "snapshot"


def test_ws_handshake_from_unlisted_origin_is_refused_when_origins_are_listed(cors_srv):
    with pytest.raises(InvalidStatus) as refused:
        open_listener(cors_srv, origin=FOREIGN_ORIGIN)
    assert refused.value.response.status_code == 403


WS_HANDSHAKE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()


@contextlib.contextmanager
def stuck_listener(server):
    """A /ws listener that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(WS_HANDSHAKE)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        yield sock
    finally:
        sock.close()


def post_many_big_updates(server, prefix, batches=40, per_batch=100):
    """Post batches * per_batch updates of about 2 KB each over keep-alive."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
    for batch in range(batches):
        updates = [{"task_id": f"{prefix}-{i}", "n": batch, "desc": "d" * 1000,
                    "postfix": "p" * 900} for i in range(per_batch * batch,
                                                         per_batch * (batch + 1))]
        conn.request("POST", "/progress", json.dumps(updates),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    conn.close()


def test_health_answers_promptly_while_a_listener_never_reads():
    with running_server() as server, stuck_listener(server):
        post_many_big_updates(server, new_id("flood"))
        started = time.monotonic()
        status, _, _ = http("GET", server.url + "/health", timeout=2)
        assert status == 200
        assert time.monotonic() - started < 1.0


def test_other_listeners_keep_getting_updates_while_one_never_reads():
    with running_server() as server, stuck_listener(server):
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            prefix = new_id("flood")
            post_many_big_updates(server, prefix)
            last = f"{prefix}-{40 * 100 - 1}"
            receive_until(ws, updated(last, n=39), timeout=5)


def on_server_loop(server, function):
    """Call function() on the server's own loop thread and return its result."""
    async def call():
        return function()
    return asyncio.run_coroutine_threadsafe(call(), server.loop).result(5)


def read_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def read_frame(sock):
    """One unmasked server-to-client WebSocket frame: (opcode, payload)."""
    first, second = read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exactly(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exactly(sock, 8))[0]
    return first & 0x0F, read_exactly(sock, length)


def test_listener_that_falls_behind_has_bounded_buffer_and_resyncs_or_is_closed():
    settings = {"broadcast_interval": 0.02, "max_body_bytes": 8 << 20}
    with running_server(**settings) as server, stuck_listener(server) as sock:
        prefix, marker = new_id("flood"), new_id("marker")
        conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
        most_unsent = 0
        for round_ in range(8):  # about 4 MB of task state per round, one round per tick
            batch = [{"task_id": f"{prefix}-{i}", "n": round_, "desc": "d" * 1000,
                      "postfix": "p" * 1000, "error": "e" * 2000} for i in range(1000)]
            conn.request("POST", "/progress", json.dumps(batch),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(0.03)  # let a broadcast tick pass, as a steady sender would
            most_unsent = max([most_unsent] + on_server_loop(server, lambda: [
                listener.unsent_bytes() for listener in server.app.hub.listeners]))
        conn.close()
        assert most_unsent < 2 * progressista.LISTENER_BUFFER_HIGH_BYTES
        post(server, {"task_id": marker, "n": 1})
        state, deadline = {}, time.monotonic() + 15
        sock.settimeout(5)
        while not (state.get(marker, {}).get("n") == 1
                   and state.get(f"{prefix}-999", {}).get("n") == 7):
            assert time.monotonic() < deadline, "the listener never caught up"
            try:
                opcode, payload = read_frame(sock)
            except (ConnectionError, socket.timeout):
                return  # closing a listener that fell behind is allowed too
            if opcode == 8:
                return
            if opcode != 1:
                continue
            message = json.loads(payload)
            if message["type"] == "snapshot":
                state = dict(message["tasks"])
            elif message["type"] == "update":
                state.update(message["tasks"])
            else:
                for task_id in message["ids"]:
                    state.pop(task_id, None)


def test_graceful_stop_sends_listeners_close_frame_1001():
    server = ServerThread().start()
    try:
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 3
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=3)
    finally:
        server.stop()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_stop_frees_the_port():
    with running_server() as server:
        port = server.port
        http("GET", server.url + "/health")
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
        probe.listen()
    finally:
        probe.close()


# --- Lifetimes on a real server (sub-second settings) ------------------------------------


def test_silent_running_task_reads_stale(lifetime_srv):
    task_id = new_id()
    post(lifetime_srv, {"task_id": task_id})
    wait_for(lambda: get_task(lifetime_srv, task_id)[1]["status"] == "stale", 2,
             message="the task to read stale")


def test_task_going_stale_is_broadcast_as_update(lifetime_srv):
    task_id = new_id()
    with open_listener(lifetime_srv) as ws:
        ws.recv(timeout=3)
        post(lifetime_srv, {"task_id": task_id})
        receive_until(ws, updated(task_id, status="stale"), timeout=2)


def test_update_after_stale_makes_task_running_again(lifetime_srv):
    task_id = new_id()
    post(lifetime_srv, {"task_id": task_id, "n": 1, "seq": 1})
    wait_for(lambda: get_task(lifetime_srv, task_id)[1]["status"] == "stale", 2,
             message="the task to read stale")
    post(lifetime_srv, {"task_id": task_id, "n": 2, "seq": 2})
    task = get_task(lifetime_srv, task_id)[1]
    assert (task["status"], task["n"]) == ("running", 2)


def test_stale_task_coming_back_is_broadcast_as_running(lifetime_srv):
    task_id = new_id()
    with open_listener(lifetime_srv) as ws:
        ws.recv(timeout=3)
        post(lifetime_srv, {"task_id": task_id, "n": 1})
        receive_until(ws, updated(task_id, status="stale"), timeout=2)
        post(lifetime_srv, {"task_id": task_id, "n": 2})
        receive_until(ws, updated(task_id, status="running", n=2), timeout=2)


def test_retention_deletes_closed_and_errored_tasks_but_not_running_ones(lifetime_srv):
    closed, failed, running = new_id("close"), new_id("error"), new_id("run")
    post(lifetime_srv, [{"task_id": closed, "status": "close"},
                        {"task_id": failed, "status": "error", "error": "x"},
                        {"task_id": running}])
    wait_for(lambda: get_task(lifetime_srv, closed)[0] == 404
             and get_task(lifetime_srv, failed)[0] == 404, 2, message="retention")
    assert get_task(lifetime_srv, running)[0] == 200


def test_retention_deletion_is_broadcast_as_remove(lifetime_srv):
    task_id = new_id()
    with open_listener(lifetime_srv) as ws:
        ws.recv(timeout=3)
        post(lifetime_srv, {"task_id": task_id, "status": "close"})
        receive_until(ws, lambda m: m["type"] == "remove" and task_id in m["ids"], timeout=2)


def test_max_task_age_deletes_tasks_whatever_their_status():
    with running_server(max_task_age=0.5, retention_seconds=0, cleanup_interval=0.05) as server:
        ids = [new_id(status) for status in ("running", "close", "error")]
        post(server, [{"task_id": task_id, "status": task_id.split("-")[0]} for task_id in ids])
        assert http("GET", server.url + "/health")[1]["tasks"] == 3
        wait_for(lambda: http("GET", server.url + "/health")[1]["tasks"] == 0, 2,
                 message="max task age")


def test_max_task_age_spares_tasks_that_keep_updating():
    with running_server(max_task_age=0.5, cleanup_interval=0.05) as server:
        lively, silent = new_id("lively"), new_id("silent")
        post(server, [{"task_id": lively}, {"task_id": silent}])
        deadline = time.monotonic() + 2
        while get_task(server, silent)[0] != 404:
            assert time.monotonic() < deadline, "the silent task was never deleted"
            post(server, {"task_id": lively})
            time.sleep(0.05)  # a sender's pace, not synchronisation
        assert get_task(server, lively)[0] == 200


# --- Pure cores: validate_update, apply_update, MemoryStore.sweep, Feed ------------------


def lifetimes(stale=60.0, retention=86400.0, max_age=0.0):
    return progressista.Settings(stale_seconds=stale, retention_seconds=retention,
                                 max_task_age=max_age)


def store_with(*updates, now=100.0, max_tasks=100):
    store = progressista.MemoryStore(max_tasks)
    store.apply([progressista.validate_update(u) for u in updates], now)
    return store


def test_validate_update_names_batch_index_in_error():
    with pytest.raises(progressista.InvalidUpdate) as error:
        progressista.validate_update({"task_id": "a", "n": -1}, 3)
    answered = progressista.as_http_error(error.value)
    assert answered.status == 400
    assert answered.message.startswith("tasks[3].n")


def test_validate_update_drops_unknown_fields():
    assert progressista.validate_update({"task_id": "a", "x": 1, "n": 2}) == {"task_id": "a",
                                                                              "n": 2}


def test_validate_update_maps_start_to_running():
    assert progressista.validate_update({"task_id": "a", "status": "start"})["status"] == "running"


def test_apply_update_ignores_lower_seq_and_reports_it():
    task = progressista.Task("a", 0.0)
    assert progressista.apply_update(task, {"task_id": "a", "n": 5, "seq": 5}, 1.0)
    assert not progressista.apply_update(task, {"task_id": "a", "n": 1, "seq": 4}, 2.0)
    assert (task.n, task.updated_at) == (5, 1.0)


def test_apply_update_revives_stale_task():
    task = progressista.Task("a", 0.0)
    task.status = "stale"
    progressista.apply_update(task, {"task_id": "a", "n": 1}, 1.0)
    assert task.status == "running"


def test_apply_update_without_seq_orders_old_clients_by_timestamp():
    task = progressista.Task("a", 0.0)
    progressista.apply_update(task, {"task_id": "a", "status": "close", "timestamp": 20.0}, 1.0)
    progressista.apply_update(task, {"task_id": "a", "status": "running", "timestamp": 19.0}, 2.0)
    assert task.status == "close"


def test_sweep_marks_silent_running_task_stale_at_timeout():
    store = store_with({"task_id": "a"}, now=100.0)
    assert store.sweep(160.0, lifetimes(stale=60)) == (["a"], [])
    assert store.get("a").status == "stale"


def test_sweep_leaves_running_task_alone_before_timeout():
    store = store_with({"task_id": "a"}, now=100.0)
    assert store.sweep(159.9, lifetimes(stale=60)) == ([], [])
    assert store.get("a").status == "running"


def test_sweep_reports_a_stale_task_only_once():
    store = store_with({"task_id": "a"}, now=100.0)
    store.sweep(200.0, lifetimes(stale=60))
    assert store.sweep(300.0, lifetimes(stale=60)) == ([], [])


def test_sweep_with_zero_stale_seconds_never_marks_stale():
    store = store_with({"task_id": "a"}, now=100.0)
    assert store.sweep(1e9, lifetimes(stale=0, retention=0)) == ([], [])


def test_sweep_never_marks_closed_task_stale():
    store = store_with({"task_id": "a", "status": "close"}, now=100.0)
    assert store.sweep(200.0, lifetimes(stale=60, retention=0)) == ([], [])


def test_sweep_deletes_closed_and_errored_tasks_after_retention():
    store = store_with({"task_id": "c", "status": "close"}, {"task_id": "e", "status": "error"},
                       now=100.0)
    assert store.sweep(109.9, lifetimes(retention=10)) == ([], [])
    stale_ids, removed_ids = store.sweep(110.0, lifetimes(retention=10))
    assert sorted(removed_ids) == ["c", "e"] and len(store) == 0


def test_sweep_with_zero_retention_keeps_closed_tasks():
    store = store_with({"task_id": "c", "status": "close"}, now=100.0)
    assert store.sweep(1e9, lifetimes(retention=0)) == ([], [])
    assert len(store) == 1


def test_sweep_does_not_delete_stale_task_by_retention():
    store = store_with({"task_id": "a"}, now=100.0)
    store.sweep(200.0, lifetimes(stale=60, retention=10))
    assert store.sweep(1000.0, lifetimes(stale=60, retention=10)) == ([], [])


def test_sweep_max_age_deletes_every_status():
    store = store_with({"task_id": "r"}, {"task_id": "c", "status": "close"}, now=100.0)
    store.apply([progressista.validate_update({"task_id": "s"})], 0.0)
    store.sweep(61.0, lifetimes(stale=60, retention=0))  # s goes stale
    stale_ids, removed_ids = store.sweep(130.0, lifetimes(stale=60, retention=0, max_age=30))
    assert sorted(removed_ids) == ["c", "r", "s"] and len(store) == 0


def test_memory_store_refuses_new_task_past_cap_and_applies_nothing():
    store = store_with({"task_id": "a"}, {"task_id": "b"}, max_tasks=2)
    updates = [progressista.validate_update(u) for u in ({"task_id": "a", "n": 9},
                                                         {"task_id": "c"})]
    with pytest.raises(progressista.StoreFull):
        store.apply(updates, 200.0)
    assert (store.get("a").n, store.get("c")) == (0, None)


def test_memory_store_lists_tasks_oldest_created_first():
    store = store_with({"task_id": "z"}, now=1.0)
    store.apply([progressista.validate_update({"task_id": "a"})], 2.0)
    store.apply([progressista.validate_update({"task_id": "z", "n": 1})], 3.0)
    assert [task.task_id for task in store.tasks()] == ["z", "a"]


def decoded(messages):
    return [json.loads(message) for message in messages]


def test_feed_coalesces_many_changes_into_one_update_with_latest_state():
    store = store_with({"task_id": "a", "n": 1})
    feed = progressista.Feed()
    for n in range(2, 50):
        store.apply([progressista.validate_update({"task_id": "a", "n": n})], 100.0 + n)
        feed.changed(["a"])
    (message,) = decoded(feed.take(store, 200.0, 60))
    assert (message["type"], message["tasks"]["a"]["n"], message["now"]) == ("update", 49, 200.0)


def test_feed_take_forgets_what_it_sent():
    store = store_with({"task_id": "a"})
    feed = progressista.Feed()
    feed.changed(["a"])
    feed.take(store, 101.0, 60)
    assert feed.take(store, 102.0, 60) == []


def test_feed_removal_cancels_a_pending_change():
    store = store_with({"task_id": "a"})
    feed = progressista.Feed()
    feed.changed(["a"])
    store.delete(["a"])
    feed.removed(["a"])
    assert decoded(feed.take(store, 101.0, 60)) == [{"type": "remove", "ids": ["a"],
                                                     "now": 101.0}]


def test_feed_update_lists_a_batchs_new_tasks_in_the_order_they_were_created():
    ids = [f"task-{n:02d}" for n in range(40)][::-1]
    store = progressista.MemoryStore()
    feed = progressista.Feed()
    feed.changed(store.apply([progressista.validate_update({"task_id": task_id})
                              for task_id in ids], 100.0))
    (message,) = decoded(feed.take(store, 101.0, 60))
    assert list(message["tasks"]) == ids == [task.task_id for task in store.tasks()]


def test_feed_update_shows_stale_status_as_of_now():
    store = store_with({"task_id": "a"}, now=100.0)
    feed = progressista.Feed()
    feed.changed(["a"])
    (message,) = decoded(feed.take(store, 170.0, 60))
    assert message["tasks"]["a"]["status"] == "stale"


# --- Concurrency -------------------------------------------------------------------------


def test_fifty_concurrent_senders_end_with_correct_final_states():
    senders, steps, shared_count = 50, 20, 5
    prefix = new_id("sender")
    errors = []

    def send(index):
        try:
            conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
            for step in range(1, steps + 1):
                status = "close" if step == steps else "update"
                seq = step * 100 + index  # unique across senders of one shared id
                batch = [{"task_id": f"{prefix}-own-{index}", "n": step, "seq": step,
                          "status": status},
                         {"task_id": f"{prefix}-shared-{index % shared_count}", "n": seq,
                          "seq": seq}]
                conn.request("POST", "/progress", json.dumps(batch),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors.append((index, step, response.status))
            conn.close()
        except Exception as error:  # reported below, in the test's thread
            errors.append((index, repr(error)))

    with running_server() as server:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        tasks = http("GET", server.url + "/tasks")[1]["tasks"]
    for index in range(senders):
        own = tasks[f"{prefix}-own-{index}"]
        assert (own["n"], own["seq"], own["status"]) == (steps, steps, "close")
    for shared in range(shared_count):
        top = max(steps * 100 + i for i in range(senders) if i % shared_count == shared)
        assert tasks[f"{prefix}-shared-{shared}"]["n"] == top
    assert len(tasks) == senders + shared_count


# --- create_app: middleware and store ----------------------------------------------------


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


class RecordingStore(progressista.Store):
    """A custom store: the Store contract by delegation, recording every apply."""

    kind = "recording"

    def __init__(self):
        self.inner = progressista.MemoryStore()
        self.applied = []

    def apply(self, updates, now):
        self.applied.extend(update["task_id"] for update in updates)
        return self.inner.apply(updates, now)

    def get(self, task_id):
        return self.inner.get(task_id)

    def tasks(self):
        return self.inner.tasks()

    def delete(self, task_ids):
        return self.inner.delete(task_ids)

    def sweep(self, now, lifetimes):
        return self.inner.sweep(now, lifetimes)

    def __len__(self):
        return len(self.inner)


def test_custom_store_object_replaces_memory_store():
    store = RecordingStore()
    with running_server(store=store) as server:
        assert server.app.store is store
        post(server, [{"task_id": "a", "n": 1}, {"task_id": "b"}])
        assert store.applied == ["a", "b"]
        assert get_task(server, "a")[1]["n"] == 1
        assert http("GET", server.url + "/health")[1]["tasks"] == 2


# --- Command line (subprocess) -----------------------------------------------------------


def run_cli(*args, env=None, timeout=15):
    return subprocess.run([sys.executable, PROGRAM, *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout)


PORT_LINE = re.compile(r"listening on \S+?:(\d+)")


class CliServer:
    """`python progressista.py ARGS` in a subprocess, its stderr collected line by line."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, PROGRAM, *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env or clean_env())
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
def cli_server(*args, env=None):
    server = CliServer(*args, env=env)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_cli_port_zero_listens_on_the_port_it_prints():
    with cli_server("--host", "127.0.0.1", "--port", "0") as server:
        assert server.port > 0
        assert http("GET", server.url + "/health")[1]["status"] == "ok"


def test_cli_serve_subcommand_means_the_same():
    with cli_server("serve", "--host", "127.0.0.1", "--port", "0") as server:
        assert http("GET", server.url + "/health")[0] == 200


def test_cli_startup_line_names_dashboard_url():
    with cli_server("--host", "127.0.0.1", "--port", "0") as server:
        assert f"http://127.0.0.1:{server.port}/" in server.stderr


def test_cli_version_prints_version():
    result = run_cli("version")
    assert result.returncode == 0
    assert progressista.__version__ in result.stdout


def test_cli_show_config_prints_json_settings_with_tokens_masked():
    result = run_cli("show-config", "--port", "9123",
                     env=clean_env(PROGRESSISTA_API_TOKEN="s3cret-value",
                                   PROGRESSISTA_STALE_SECONDS="5"))
    assert result.returncode == 0
    config = json.loads(result.stdout)
    assert (config["port"], config["stale_seconds"]) == (9123, 5.0)
    assert len(config["api_tokens"]) == 1
    assert "s3cret" not in result.stdout + result.stderr


def test_cli_flags_win_over_environment():
    result = run_cli("show-config", "--port", "9001", env=clean_env(PROGRESSISTA_PORT="9002"))
    assert json.loads(result.stdout)["port"] == 9001


def test_cli_tokens_from_both_environment_variables_are_all_accepted():
    env = clean_env(PROGRESSISTA_API_TOKEN="one", PROGRESSISTA_API_TOKENS="two, three")
    with cli_server("--host", "127.0.0.1", "--port", "0", env=env) as server:
        assert http("GET", server.url + "/tasks")[0] == 401
        for token in ("one", "two", "three"):
            status, _, _ = http("GET", server.url + "/tasks",
                                headers={"Authorization": f"Bearer {token}"})
            assert status == 200, token


def test_cli_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    # In the list of subcommands, not just anywhere: the epilog names them all too.
    for command in ("serve", "demo", "run", "version", "show-config", "watch"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


def test_cli_help_lists_environment_variables():
    result = run_cli("--help")
    for name in ("PROGRESSISTA_PORT", "PROGRESSISTA_HOST", "PROGRESSISTA_API_TOKEN",
                 "PROGRESSISTA_STALE_SECONDS", "PROGRESSISTA_RETENTION_SECONDS"):
        assert name in result.stdout, name


def test_cli_serve_help_lists_every_flag_with_its_environment_variable():
    result = run_cli("serve", "--help")
    for flag, env in (("--port", "PROGRESSISTA_PORT"), ("--stale-seconds",
                                                        "PROGRESSISTA_STALE_SECONDS"),
                      ("--max-tasks", "PROGRESSISTA_MAX_TASKS"),
                      ("--allow-origins", "PROGRESSISTA_ALLOW_ORIGINS")):
        assert flag in result.stdout and env in result.stdout, flag


@pytest.mark.parametrize("args", [["--port", "-1"], ["--port", "abc"], ["--port", "70000"],
                                  ["--stale-seconds", "x"], ["--max-tasks", "0"],
                                  ["--log-level", "loud"]],
                         ids=lambda args: " ".join(args))
def test_cli_bad_flag_value_exits_2_with_one_line_error(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr


@pytest.mark.parametrize("name, value", [("PROGRESSISTA_PORT", "abc"),
                                         ("PROGRESSISTA_STALE_SECONDS", "-5")])
def test_cli_bad_env_var_exits_2_with_one_line_error_naming_it(name, value):
    result = run_cli("--port", "0", env=clean_env(**{name: value}))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], result.stderr


def test_cli_debug_log_has_one_line_per_request_and_never_the_token():
    secret = "tok-s3cret-xyz"
    with cli_server("--host", "127.0.0.1", "--port", "0", "--log-level", "debug",
                    "--api-token", secret) as server:
        assert http("GET", server.url + f"/tasks?token={secret}")[0] == 200
        assert post(server, {"task_id": "a"}, {"Authorization": f"Bearer {secret}"})[0] == 200
        assert http("GET", server.url + "/tasks?token=wrong-guess")[0] == 401
        with open_listener(server, f"/ws?token={secret}") as ws:
            ws.recv(timeout=3)
        wait_for(lambda: len(re.findall(r"GET /tasks\S* 401", server.stderr)) == 1, 3,
                 message="the request log lines")
        assert server.stop() == 0
    log_text = server.stderr
    assert secret not in log_text and "wrong-guess" not in log_text
    assert len(re.findall(r"GET /tasks\?token=\S* 200 [\d.]+ ?ms", log_text)) == 1
    assert len(re.findall(r"POST /progress 200 [\d.]+ ?ms", log_text)) == 1
    assert len(re.findall(r"GET /ws\?token=\S* 101", log_text)) == 1


def test_cli_warning_log_level_quiets_the_websocket_lines_too():
    port = free_port()  # no startup line to read the port from at this level
    server = subprocess.Popen([sys.executable, PROGRAM, "--host", "127.0.0.1", "--port",
                               str(port), "--log-level", "warning"], env=clean_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/health"), timeout=10, message="the server")
        with ws_connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
            ws.recv(timeout=3)
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0 and stderr == ""


def _answers(url):
    try:
        return http("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_exits_0_promptly_and_frees_the_port(signum):
    with cli_server("--host", "127.0.0.1", "--port", "0") as server:
        idle = HTTPConnection("127.0.0.1", server.port, timeout=5)
        idle.request("GET", "/health")  # an idle keep-alive connection must not hold it up
        idle.getresponse().read()
        with open_listener(server) as listener:
            listener.recv(timeout=3)
            started = time.monotonic()
            assert server.stop(signum, timeout=5) == 0
            assert time.monotonic() - started < 3
        idle.close()
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", server.port))
        probe.listen()
    finally:
        probe.close()


def test_cli_warns_when_listening_on_all_interfaces_without_token():
    with cli_server("--host", "0.0.0.0", "--port", "0") as server:
        wait_for(lambda: "WARNING" in server.stderr, 3, message="the warning")
        assert "token" in server.stderr.split("WARNING", 1)[1].lower()


def test_cli_does_not_warn_on_loopback_or_with_a_token():
    with cli_server("--host", "0.0.0.0", "--port", "0", "--api-token", "t") as public, \
            cli_server("--host", "127.0.0.1", "--port", "0") as loopback:
        http("GET", public.url + "/health")
        http("GET", loopback.url + "/health")
        public.stop()
        loopback.stop()
    assert "WARNING" not in public.stderr and "WARNING" not in loopback.stderr


# --- Timeouts (the constants shortened, so nothing waits for seconds) ------------------


@pytest.fixture
def quick_timeouts(monkeypatch):
    monkeypatch.setattr(progressista, "REAP_INTERVAL_S", 0.05)
    monkeypatch.setattr(progressista, "HEADER_TIMEOUT_S", 0.3)
    monkeypatch.setattr(progressista, "BODY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(progressista, "KEEPALIVE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(progressista, "WS_PING_INTERVAL_S", 0.05)
    monkeypatch.setattr(progressista, "WS_PING_TIMEOUT_S", 0.3)
    with running_server() as server:
        yield server


def test_client_that_never_finishes_its_headers_is_disconnected(quick_timeouts):
    with raw_connection(quick_timeouts) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(reader)
    assert http("GET", quick_timeouts.url + "/health")[0] == 200


def test_client_that_never_finishes_its_body_is_disconnected(quick_timeouts):
    with raw_connection(quick_timeouts) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert closed_by_server(reader)


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(quick_timeouts):
    with raw_connection(quick_timeouts) as (sock, reader):
        sock.sendall(request_bytes("GET", "/health"))
        assert read_response(reader)[0] == 200
        assert closed_by_server(reader)


def test_listener_that_never_answers_pings_is_disconnected(quick_timeouts):
    with raw_connection(quick_timeouts) as (sock, reader):
        sock.sendall(WS_HANDSHAKE)
        assert read_response(reader, head_only=True)[0] == 101
        # Read frames (the snapshot, then pings) but never answer one.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not sock.recv(4096):
                    break
            except ConnectionResetError:
                break
        else:
            pytest.fail("a listener that never answered a ping was not disconnected")


def test_listener_that_answers_pings_stays_connected(quick_timeouts):
    with open_listener(quick_timeouts) as ws:  # the websockets client answers pings
        ws.recv(timeout=3)
        time.sleep(0.6)  # twice the ping timeout: the point is that nothing happens
        post(quick_timeouts, {"task_id": new_id("alive"), "n": 1})
        assert json.loads(ws.recv(timeout=3))["type"] == "update"


# --- Details found in review ---------------------------------------------------------


def test_cli_debug_log_masks_a_token_whose_name_was_percent_escaped():
    secret = "tok-escaped-name"
    with cli_server("--host", "127.0.0.1", "--port", "0", "--log-level", "debug",
                    "--api-token", secret) as server:
        assert http("GET", server.url + f"/tasks?tok%65n={secret}&x=1")[0] == 200
        wait_for(lambda: "GET /tasks?" in server.stderr, 3, message="the request line")
        assert server.stop() == 0
    assert secret not in server.stderr
    assert "token=***" in server.stderr


def test_csp_hashes_the_real_script_even_after_a_script_tag_in_a_style():
    page = ("<!doctype html><style>/* no <script>here</script> */</style>"
            "<script>document.title = 'ok';</script>")
    finder = progressista._InlineScripts()
    finder.feed(page)
    assert finder.scripts == ["document.title = 'ok';"]


def trickle_until_closed(sock, first, byte, seconds=3.0):
    """Send `first`, then `byte` every 50 ms; True once the server has closed on us."""
    sock.settimeout(0.05)
    sock.sendall(first)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(byte)
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue  # nothing to read yet: keep trickling
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_client_trickling_its_headers_is_disconnected_at_the_header_deadline(quick_timeouts):
    with raw_connection(quick_timeouts) as (sock, _):
        assert trickle_until_closed(sock, b"GET /health HTTP/1.1\r\nX-Slow: ", b"a")


def test_client_trickling_its_body_is_disconnected_at_the_body_deadline(quick_timeouts):
    with raw_connection(quick_timeouts) as (sock, _):
        assert trickle_until_closed(
            sock, b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n", b" ")


@pytest.mark.parametrize("task_id", [".", "..", "a/b"])
def test_delete_tasks_takes_a_task_id_filter_for_ids_a_path_cannot_carry(srv, task_id):
    other = new_id()
    post(srv, [{"task_id": task_id}, {"task_id": other}])
    query = urllib.parse.urlencode({"task_id": task_id})
    status, body, _ = http("DELETE", srv.url + "/tasks?" + query)
    assert (status, body) == (200, {"removed": [task_id]})
    assert get_task(srv, other)[0] == 200
    assert http("DELETE", srv.url + "/tasks?" + query)[1] == {"removed": []}


@pytest.mark.parametrize("field, update", [
    ("task_id", {"task_id": "x\ud800"}),
    ("desc", {"task_id": "lone", "desc": "a\udc00b"}),
    ("meta.host", {"task_id": "lone", "meta": {"host": "\ud800"}}),
    ("meta", {"task_id": "lone", "meta": {"\udfff": 1}}),
], ids=["task_id", "desc", "meta-value", "meta-key"])
def test_lone_surrogate_is_400_naming_the_field(srv, field, update):
    body = json.dumps(update).encode()  # ASCII, with the surrogate as a \\u escape
    status, answer, _ = http("POST", srv.url + "/progress", body)
    assert status == 400
    assert answer["error"].startswith(field + ": must be valid Unicode")


# --- HTTP details found by outside QA ---------------------------------------------------


def test_absolute_form_request_target_is_routed_by_its_path(srv):
    with raw_connection(srv) as (sock, reader):
        sock.sendall(b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_bare_lf_request_is_answered_400_at_once(srv):
    with raw_connection(srv, timeout=3) as (sock, reader):
        sock.sendall(b"GET /health HTTP/1.1\nHost: x\n\n")
        status, _, body = read_response(reader)
    assert status == 400 and "CRLF" in json.loads(body)["error"]


def test_http10_keep_alive_is_confirmed_in_the_answer(srv):
    with raw_connection(srv) as (sock, reader):
        sock.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        sock.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(reader)[0] == 200  # the same connection answers again


def test_post_without_content_length_is_411(srv):
    with raw_connection(srv) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 411 and "Content-Length" in json.loads(body)["error"]


def test_allow_header_lists_head_where_get_is_allowed(srv):
    status, _, headers = http("PUT", srv.url + "/health")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD, OPTIONS"


def test_connections_past_the_descriptor_budget_are_refused_and_others_served():
    with running_server() as server:
        server.app.max_connections = 2
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                for _ in range(2)]
        try:
            wait_for(lambda: len(server.app.connections) == 2, message="two connections")
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as third:
                try:
                    assert third.recv(1) == b""  # closed at once, unanswered
                except ConnectionResetError:
                    pass
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: len(server.app.connections) == 0, message="the sockets to close")
        assert http("GET", server.url + "/health")[0] == 200


@pytest.mark.parametrize("url, shown", [
    ("redis://user:hunter2@db:6379/0", "redis://user:***@db:6379/0"),
    ("redis://db:6379/0?password=hunter2&db=1", "redis://db:6379/0?password=***&db=1"),
    ("redis://db/0?timeout=1&Password=hunter2", "redis://db/0?timeout=1&Password=***"),
])
def test_masked_url_hides_a_password_however_redis_takes_it(url, shown):
    assert progressista.masked_url(url) == shown  # it is what public /health shows


@pytest.mark.parametrize("body, message", [
    ([1], "tasks[0]: each update must be a JSON object"),
    ([{"task_id": "a", "timestamp": float("inf")}],
     "tasks[0].timestamp: must be a finite number, not inf"),
])
def test_errors_for_a_non_object_and_a_non_finite_timestamp_read_cleanly(body, message):
    with pytest.raises(progressista.InvalidUpdate) as refused:
        progressista.validate_update(body[0], 0)
    assert str(refused.value) == message


def test_without_index_html_the_server_runs_and_the_page_404_says_where_it_looked(
        monkeypatch):
    monkeypatch.setattr(progressista, "find_dashboard",
                        lambda: (None, ["/here/index.html", "/there/index.html"]))
    with running_server() as server:
        status, body, _ = http("GET", server.url + "/static/index.html")
        assert status == 404
        assert body["error"] == ("dashboard file index.html not found; looked in: "
                                 "/here/index.html, /there/index.html")
        assert http("GET", server.url + "/health")[0] == 200


def test_cli_show_config_masks_a_password_in_the_store_url():
    result = run_cli("show-config", "--store", "redis://user:hunter2@db.internal:6379/0")
    assert result.returncode == 0
    assert "hunter2" not in result.stdout
    assert json.loads(result.stdout)["store"] == "redis://user:***@db.internal:6379/0"


def test_cli_read_tokens_from_the_environment_may_only_read():
    env = clean_env(PROGRESSISTA_API_TOKEN="writer", PROGRESSISTA_READ_TOKENS="r1, r2")
    with cli_server("--host", "127.0.0.1", "--port", "0", env=env) as server:
        for token in ("r1", "r2"):
            auth = {"Authorization": f"Bearer {token}"}
            assert http("GET", server.url + "/tasks", headers=auth)[0] == 200, token
            assert http("POST", server.url + "/progress", {"task_id": "x"},
                        headers=auth)[0] == 403, token
        assert http("POST", server.url + "/progress", {"task_id": "x"},
                    headers={"Authorization": "Bearer writer"})[0] == 200


def test_cli_read_token_alone_is_a_one_line_error_and_show_config_masks_it():
    result = run_cli("--read-token", "viewer", "--port", "0")
    assert result.returncode == 2
    assert "read tokens need an API token" in result.stderr and "Traceback" not in result.stderr
    shown = run_cli("show-config", "--read-token", "viewer", "--read-token", "guest",
                    "--api-token", "writer")
    assert shown.returncode == 0 and json.loads(shown.stdout)["read_tokens"] == ["***", "***"]
    assert not {"viewer", "guest", "writer"} & set(re.findall(r"\w+", shown.stdout))


def test_cli_empty_api_token_is_a_one_line_error():
    result = run_cli("--api-token", "", "--port", "0")
    assert result.returncode == 2
    assert "must not be empty" in result.stderr and "Traceback" not in result.stderr


def test_delete_tasks_with_a_misspelt_filter_deletes_nothing(srv):
    task_id = new_id()
    post(srv, {"task_id": task_id})
    status, body, _ = http("DELETE", srv.url + "/tasks?taskid=" + task_id)
    assert status == 400 and "unknown filter 'taskid'" in body["error"]
    assert get_task(srv, task_id)[0] == 200


# --- Command line: a newcomer's mistakes --------------------------------------------------


def test_a_mistyped_command_says_unknown_command_and_lists_the_commands(capsys):
    assert progressista.main(["servee"]) == 2
    message = capsys.readouterr().err
    assert "unknown command 'servee'" in message and "did you mean 'serve'?" in message
    for command in ("serve", "demo", "run", "watch", "version", "show-config"):
        assert command in message


def test_serve_help_shows_every_settings_default(capsys):
    with pytest.raises(SystemExit):
        progressista.main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "PROGRESSISTA_STALE_SECONDS; default 60]" in shown
    assert "PROGRESSISTA_STORE; default memory://]" in shown
    assert "PROGRESSISTA_WS_COMPRESSION; default off]" in shown


def test_the_startup_line_names_the_store_and_how_many_tasks_it_loaded(tmp_path, caplog):
    path = tmp_path / "tasks.db"
    with running_server(store=f"sqlite:///{path}") as server:
        post(server, [{"task_id": "a"}, {"task_id": "b", "status": "close"}])
    caplog.set_level(logging.INFO, logger="progressista")
    with running_server(store=f"sqlite:///{path}"):
        pass
    assert any("store: sqlite, 2 tasks loaded" in record.getMessage()
               for record in caplog.records)
