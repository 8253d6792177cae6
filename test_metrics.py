"""GET /metrics: the Prometheus text format, read back by prometheus_client's own parser.

Every test runs a real server and real traffic, then checks the counts it must show. The
parser is the one Prometheus' Python client uses, so what passes here is what a scraper
reads. Locally the tests skip without prometheus_client; under CI (`CI` set) that fails.
"""

import json
import sqlite3

import pytest

import progressista
from conftest import (FakeClock, bearer, http, missing, on_server_loop, open_listener, post,
                      raw_request, running_server, wait_for)

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - depends on the environment
    text_string_to_metric_families = None

TOKEN = "metrics-token"
AUTH = bearer(TOKEN)


@pytest.fixture(autouse=True)
def parser():
    if text_string_to_metric_families is None:
        missing("prometheus_client is not installed (pip install -e .[test])")


def scrape(server, headers=None):
    """{(sample name, frozenset of labels): value}, and {family name: type}."""
    status, body, response_headers = http("GET", server.url + "/metrics", headers=headers)
    assert status == 200, body
    assert response_headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples, types = {}, {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples, types


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def test_counts_follow_known_traffic():
    with running_server() as server:
        assert post(server, {"task_id": "a", "n": 1, "seq": 1})[0] == 200
        assert post(server, {"task_id": "a", "n": 1, "seq": 1})[0] == 200  # a retry
        assert post(server, [{"task_id": "b", "status": "close"},
                             {"task_id": "c", "status": "error", "error": "boom"}])[0] == 200
        assert post(server, {"task_id": "d", "n": -1})[0] == 400
        assert http("GET", server.url + "/nowhere")[0] == 404
        assert http("GET", server.url + "/tasks/a")[0] == 200
        assert http("PUT", server.url + "/tasks")[0] == 405
        samples, types = scrape(server)
    assert value(samples, "progressista_updates_received_total") == 4
    assert value(samples, "progressista_updates_applied_total") == 3  # not the retry
    requests = "progressista_http_requests_total"
    assert value(samples, requests, route="/progress", method="POST", status="200") == 3
    assert value(samples, requests, route="/progress", method="POST", status="400") == 1
    assert value(samples, requests, route="other", method="GET", status="404") == 1
    assert value(samples, requests, route="/tasks/{task_id}", method="GET", status="200") == 1
    assert value(samples, requests, route="/tasks", method="PUT", status="405") == 1
    rejected = "progressista_rejected_requests_total"
    assert value(samples, rejected, reason="bad_request") == 1
    assert value(samples, rejected, reason="not_found") == 1
    assert value(samples, rejected, reason="method_not_allowed") == 1
    for status, count in (("running", 1), ("close", 1), ("error", 1), ("stale", 0)):
        assert value(samples, "progressista_tasks", status=status) == count, status
    assert value(samples, "progressista_info", version=progressista.__version__,
                 store="memory") == 1
    assert types["progressista_http_requests"] == "counter"
    assert types["progressista_tasks"] == "gauge"


def test_stale_tasks_are_counted_as_stale():
    with running_server(stale_seconds=0.05, cleanup_interval=0.05) as server:
        post(server, {"task_id": "quiet"})
        wait_for(lambda: value(scrape(server)[0], "progressista_tasks", status="stale") == 1,
                 message="the task to read stale")


def test_runs_are_counted_by_the_runs_status():
    clock = FakeClock()
    with running_server(clock=clock, stale_seconds=60, cleanup_interval=3600) as server:
        post(server, [{"task_id": "a1", "run": "going", "n": 1, "total": 9},
                      {"task_id": "a2", "run": "going", "n": 9, "total": 9, "status": "close"},
                      {"task_id": "b1", "run": "done", "n": 1, "status": "close"},
                      {"task_id": "b2", "run": "done", "n": 1, "status": "close"},
                      {"task_id": "c1", "run": "failed", "n": 1, "status": "close"},
                      {"task_id": "c2", "run": "failed", "status": "error", "error": "boom"},
                      {"task_id": "loose", "n": 1}])  # no run: counted as a task only
        samples, types = scrape(server)
        assert types["progressista_runs"] == "gauge"
        assert {status: value(samples, "progressista_runs", status=status)
                for status in progressista.STATUSES} == {
            "running": 1, "stalled": 0, "stale": 0, "close": 1, "error": 1}
        clock.now += 61  # "going" and "loose" fall silent; the sweep finds them stale
        post(server, {"task_id": "d1", "run": "fresh", "n": 1})
        on_server_loop(server, server.app.sweep)
        samples, _ = scrape(server)
    assert value(samples, "progressista_runs", status="stale") == 1
    assert value(samples, "progressista_runs", status="running") == 1  # "fresh"
    assert value(samples, "progressista_tasks", status="stale") == 2


def test_listeners_and_broadcast_messages_and_bytes_are_counted():
    with running_server(broadcast_interval=0.02) as server:
        with open_listener(server) as first, open_listener(server) as second:
            snapshots = [first.recv(timeout=3), second.recv(timeout=3)]
            post(server, {"task_id": "seen", "n": 1})
            updates = [first.recv(timeout=3), second.recv(timeout=3)]
            assert all(json.loads(text)["type"] == "update" for text in updates)
            samples, _ = scrape(server)
            assert value(samples, "progressista_ws_listeners") == 2
            assert value(samples, "progressista_ws_listeners_opened_total") == 2
            sent = value(samples, "progressista_broadcast_messages_total")
            assert sent >= 4  # two snapshots and one update to each
            assert value(samples, "progressista_broadcast_bytes_total") >= sum(
                len(text.encode()) for text in snapshots + updates)
            assert value(samples, "progressista_http_requests_total", route="/ws",
                         method="GET", status="101") == 2
        wait_for(lambda: value(scrape(server)[0], "progressista_ws_listeners") == 0,
                 message="the listeners to be gone")


def test_metrics_need_the_token_like_the_api_and_a_read_token_may_scrape():
    with running_server(api_tokens=[TOKEN], read_tokens=["viewer"]) as server:
        status, body, headers = http("GET", server.url + "/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        scrape(server, headers=bearer("viewer"))
        assert post(server, {"task_id": "x"}, bearer("viewer"))[0] == 403
        samples, _ = scrape(server, AUTH)
    rejected = "progressista_rejected_requests_total"
    assert value(samples, rejected, reason="unauthorized") == 1
    assert value(samples, rejected, reason="read_only_token") == 1


def test_refusals_before_routing_are_counted_by_reason():
    with running_server(max_body_bytes=100, max_tasks=1) as server:
        assert raw_request(server, b"GARBAGE\r\n\r\n")[0] == 400
        assert raw_request(server, b"POST /progress HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 500\r\n\r\n")[0] == 413
        too_long = b"GET /tasks HTTP/1.1\r\nX-Pad: " + b"a" * (20 * 1024) + b"\r\n\r\n"
        assert raw_request(server, too_long)[0] == 431
        assert post(server, {"task_id": "first"})[0] == 200
        assert post(server, {"task_id": "second"})[0] == 503
        samples, _ = scrape(server)
    rejected = "progressista_rejected_requests_total"
    assert value(samples, rejected, reason="bad_request") == 1
    assert value(samples, rejected, reason="body_too_large") == 1
    assert value(samples, rejected, reason="headers_too_large") == 1
    assert value(samples, rejected, reason="store_full") == 1
    assert value(samples, "progressista_http_requests_total", route="unparsed",
                 method="other", status="400") == 1
    assert value(samples, "progressista_http_requests_total", route="/progress",
                 method="POST", status="413") == 1


def test_store_write_failures_are_counted_and_the_store_reads_down(tmp_path, monkeypatch):
    def failing_write(store, rows, deleted):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(progressista.SqliteStore, "_write", failing_write)
    with running_server(store=f"sqlite:///{tmp_path}/tasks.db",
                        broadcast_interval=0.02) as server:
        post(server, {"task_id": "waiting"})
        samples = wait_for(lambda: (lambda s: value(s, "progressista_store_errors_total") >= 2
                                    and s)(scrape(server)[0]),
                           message="failed writes to be counted")
        assert value(samples, "progressista_store_up") == 0
        monkeypatch.undo()  # the disk has room again
        wait_for(lambda: value(scrape(server)[0], "progressista_store_up") == 1,
                 message="the store to read up again")


def test_label_values_are_escaped_so_any_path_or_reason_stays_parseable():
    metrics = progressista.Metrics(started_at=0.0)
    metrics.request_done('we"ird\\route\n', "BREW", 418, reason='odd "reason"')
    gauges = {"tasks_by_status": {}, "listeners": 0, "connections": 0, "store_kind": "memory",
              "store_up": True, "store_errors": 0, "notifications": {}}
    text = progressista.render_metrics(metrics, gauges).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    (sample,) = families["progressista_http_requests"].samples
    assert sample.labels == {"route": 'we"ird\\route\n', "method": "other", "status": "418"}
    (sample,) = families["progressista_rejected_requests"].samples
    assert sample.labels == {"reason": 'odd "reason"'}
