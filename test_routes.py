"""Every route's answers: GET and DELETE /tasks, /tasks/{task_id}, /health, the dashboard
page and its redirect, unknown paths and wrong methods.

A shared real server (conftest.shared_server) answers the tests that use ids of their own;
those that list or delete every task, or need time to pass, get a fresh server whose clock
they move (`clocked_server`).
"""

import base64
import hashlib
import re
import urllib.parse

import pytest

import progressista
from conftest import (get_task, http, new_id, post, raw_connection, read_response,
                      redirect_of, request_bytes, running_server, task_url)

pytestmark = pytest.mark.timeout(60)


# --- GET /tasks --------------------------------------------------------------------------


def test_get_tasks_lists_oldest_created_first(clocked_server, clock):
    for task_id in ("charlie", "alpha", "bravo"):
        post(clocked_server, {"task_id": task_id})
        clock.now += 1
    post(clocked_server, {"task_id": "charlie", "n": 5})  # an update does not reorder
    status, body, _ = http("GET", clocked_server.url + "/tasks")
    assert status == 200
    assert list(body["tasks"]) == ["charlie", "alpha", "bravo"]


def test_get_tasks_reports_server_now(clocked_server, clock):
    assert http("GET", clocked_server.url + "/tasks")[1]["now"] == clock.now


def test_get_tasks_status_filter_returns_only_that_status(clocked_server):
    post(clocked_server, [{"task_id": "r", "status": "running"},
                          {"task_id": "c", "status": "close"},
                          {"task_id": "e", "status": "error"}])
    status, body, _ = http("GET", clocked_server.url + "/tasks?status=close")
    assert status == 200
    assert list(body["tasks"]) == ["c"]


def test_get_tasks_status_filter_finds_stale_tasks(clocked_server, clock):
    post(clocked_server, [{"task_id": "old"}])
    clock.now += progressista.STALE_SECONDS + 1
    post(clocked_server, [{"task_id": "new"}])
    body = http("GET", clocked_server.url + "/tasks?status=stale")[1]
    assert list(body["tasks"]) == ["old"]


def test_get_tasks_with_unknown_status_filter_is_400(shared_server):
    status, body, _ = http("GET", shared_server.url + "/tasks?status=finished")
    assert status == 400
    assert "status" in body["error"]


# --- GET and DELETE /tasks/{task_id} -----------------------------------------------------


@pytest.mark.parametrize("label", ["with/slash", "with space", "ünïcødé✓", "q?#%&="])
def test_get_task_by_url_encoded_id(shared_server, label):
    task_id = new_id(label)
    post(shared_server, {"task_id": task_id, "n": 4})
    status, task, _ = get_task(shared_server, task_id)
    assert status == 200
    assert (task["task_id"], task["n"]) == (task_id, 4)


def test_get_missing_task_is_404_json(shared_server):
    status, body, headers = get_task(shared_server, new_id("missing"))
    assert status == 404
    assert headers["Content-Type"].startswith("application/json") and body["error"]


@pytest.mark.parametrize("label", ["with/slash and space", "ünïcødé✓"])
def test_delete_task_by_url_encoded_id_removes_it(shared_server, label):
    task_id = new_id(label)
    post(shared_server, {"task_id": task_id})
    status, body, _ = http("DELETE", task_url(shared_server, task_id))
    assert (status, body) == (200, {"removed": True})
    assert get_task(shared_server, task_id)[0] == 404


def test_delete_missing_task_reports_removed_false(shared_server):
    status, body, _ = http("DELETE", task_url(shared_server, new_id("missing")))
    assert (status, body) == (200, {"removed": False})


# --- DELETE /tasks -----------------------------------------------------------------------


def test_delete_tasks_by_status_removes_only_that_status(clocked_server):
    post(clocked_server, [{"task_id": "r"}, {"task_id": "c1", "status": "close"},
                          {"task_id": "e", "status": "error"},
                          {"task_id": "c2", "status": "close"}])
    status, body, _ = http("DELETE", clocked_server.url + "/tasks?status=close")
    assert status == 200
    assert sorted(body["removed"]) == ["c1", "c2"]
    assert sorted(http("GET", clocked_server.url + "/tasks")[1]["tasks"]) == ["e", "r"]


def test_delete_tasks_older_than_removes_only_silent_tasks(clocked_server, clock):
    post(clocked_server, {"task_id": "old"})
    clock.now += 10
    post(clocked_server, {"task_id": "new"})
    clock.now += 5
    status, body, _ = http("DELETE", clocked_server.url + "/tasks?older_than=10")
    assert (status, body) == (200, {"removed": ["old"]})


def test_delete_tasks_with_status_and_older_than_needs_both(clocked_server, clock):
    post(clocked_server, [{"task_id": "old-close", "status": "close"}, {"task_id": "old-run"}])
    clock.now += 10
    post(clocked_server, {"task_id": "new-close", "status": "close"})
    clock.now += 5
    body = http("DELETE", clocked_server.url + "/tasks?status=close&older_than=10")[1]
    assert body == {"removed": ["old-close"]}


def test_delete_tasks_without_filters_removes_every_task(clocked_server):
    post(clocked_server, [{"task_id": "a"}, {"task_id": "b", "status": "close"}])
    body = http("DELETE", clocked_server.url + "/tasks")[1]
    assert sorted(body["removed"]) == ["a", "b"]
    assert http("GET", clocked_server.url + "/tasks")[1]["tasks"] == {}


@pytest.mark.parametrize("query", ["older_than=-1", "older_than=soon", "status=done"])
def test_delete_tasks_with_bad_filter_is_400_and_removes_nothing(clocked_server, query):
    post(clocked_server, {"task_id": "keep"})
    status, body, _ = http("DELETE", clocked_server.url + "/tasks?" + query)
    assert status == 400 and body["error"]
    assert list(http("GET", clocked_server.url + "/tasks")[1]["tasks"]) == ["keep"]


def test_delete_tasks_with_a_misspelt_filter_deletes_nothing(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id})
    status, body, _ = http("DELETE", shared_server.url + "/tasks?taskid=" + task_id)
    assert status == 400 and "unknown filter 'taskid'" in body["error"]
    assert get_task(shared_server, task_id)[0] == 200


@pytest.mark.parametrize("task_id", [".", "..", "a/b"])
def test_delete_tasks_takes_a_task_id_filter_for_ids_a_path_cannot_carry(shared_server, task_id):
    other = new_id()
    post(shared_server, [{"task_id": task_id}, {"task_id": other}])
    query = urllib.parse.urlencode({"task_id": task_id})
    status, body, _ = http("DELETE", shared_server.url + "/tasks?" + query)
    assert (status, body) == (200, {"removed": [task_id]})
    assert get_task(shared_server, other)[0] == 200
    assert http("DELETE", shared_server.url + "/tasks?" + query)[1] == {"removed": []}


# --- GET /health -------------------------------------------------------------------------


def test_health_reports_tasks_and_running_ones(clocked_server):
    post(clocked_server, [{"task_id": "r1"}, {"task_id": "r2"},
                          {"task_id": "c", "status": "close"}])
    status, body, _ = http("GET", clocked_server.url + "/health")
    assert status == 200
    assert (body["status"], body["tasks"], body["active"]) == ("ok", 3, 2)


def test_health_does_not_count_stale_tasks_as_active(clocked_server, clock):
    post(clocked_server, {"task_id": "silent"})
    clock.now += progressista.STALE_SECONDS + 1
    body = http("GET", clocked_server.url + "/health")[1]
    assert (body["tasks"], body["active"]) == (1, 0)


@pytest.mark.parametrize("url, shown", [
    ("redis://user:hunter2@db:6379/0", "redis://user:***@db:6379/0"),
    ("redis://db:6379/0?password=hunter2&db=1", "redis://db:6379/0?password=***&db=1"),
    ("redis://db/0?timeout=1&Password=hunter2", "redis://db/0?timeout=1&Password=***"),
])
def test_masked_url_hides_a_password_however_redis_takes_it(url, shown):
    assert progressista.masked_url(url) == shown  # it is what public /health shows


# --- The dashboard: / and /static/index.html ---------------------------------------------


def test_root_redirects_to_dashboard_keeping_query_string(shared_server):
    status, location = redirect_of(shared_server, "/?token=abc&view=grid")
    assert status in (302, 307)
    assert location == "/static/index.html?token=abc&view=grid"


def test_root_redirect_without_query_has_no_question_mark(shared_server):
    assert redirect_of(shared_server, "/")[1] == "/static/index.html"


def test_dashboard_page_is_served_as_html(shared_server):
    status, body, headers = http("GET", shared_server.url + "/static/index.html")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<html" in body.lower()


def test_dashboard_csp_allows_its_inline_script_by_sha256_hash(shared_server):
    _, page, headers = http("GET", shared_server.url + "/static/index.html")
    policy = headers["Content-Security-Policy"]
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    assert scripts, "the dashboard has an inline script"
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";")[0]


def test_csp_hashes_the_real_script_even_after_a_script_tag_in_a_style():
    page = ("<!doctype html><style>/* no <script>here</script> */</style>"
            "<script>document.title = 'ok';</script>")
    finder = progressista._InlineScripts()
    finder.feed(page)
    assert finder.scripts == ["document.title = 'ok';"]


@pytest.mark.parametrize("path", ["/static/../progressista.py", "/static/%2e%2e/progressista.py",
                                  "/static/..%2fprogressista.py", "/static/"])
def test_static_serves_nothing_but_the_dashboard(shared_server, path):
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(request_bytes("GET", path))
        status, _, body = read_response(reader)
    assert status == 404
    assert b"import" not in body


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


# --- Unknown paths and wrong methods -----------------------------------------------------


def test_unknown_path_is_404_json(shared_server):
    status, body, headers = http("GET", shared_server.url + "/nowhere")
    assert status == 404
    assert headers["Content-Type"].startswith("application/json") and body["error"]


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/progress", "POST"),
    ("PUT", "/progress", "POST"),
    ("POST", "/health", "GET"),
    ("POST", "/tasks", "DELETE"),
    ("PATCH", "/tasks/some-id", "GET"),
])
def test_wrong_method_is_405_with_allow_header(shared_server, method, path, allowed):
    status, body, headers = http(method, shared_server.url + path,
                                 body=b"" if method != "GET" else None)
    assert status == 405 and body["error"]
    assert allowed in [part.strip() for part in headers["Allow"].split(",")]


def test_allow_header_lists_head_where_get_is_allowed(shared_server):
    status, _, headers = http("PUT", shared_server.url + "/health")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD, OPTIONS"
