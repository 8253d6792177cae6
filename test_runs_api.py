"""Runs over the wire (docs/PROTOCOL.md "Runs"): GET /runs, GET /runs/{run}, the ?run=
filter of GET and DELETE /tasks, run summaries in the /ws feed, and a run's end told once.

Strategy: a real server on an ephemeral port and a real websockets client; the run
figures themselves are checked against hand-computed values in test_runs.py, so these
tests check that the wiring carries them (and keeps them current) everywhere. Times move
by an injected clock; the sweep is run by hand where a test needs it at a given time.
"""

import json
import urllib.parse

import pytest

import progressista
from conftest import (FakeClock, http, on_server_loop, open_listener, post_ok, receive_until,
                      running_server, tasks_of, wait_for)


def bar(task_id, run, **fields):
    return {"task_id": task_id, "run": run, **fields}


def get(server, path):
    status, body, _ = http("GET", server.url + path)
    return status, body


# --- GET /runs and GET /runs/{run} -----------------------------------------------------------


def test_get_runs_lists_each_runs_summary_and_bars_without_a_run_belong_to_none():
    with running_server() as server:
        post_ok(server, [bar("a", "exp-1", n=5, total=10, run_name="train.py --lr 3"),
                         bar("b", "exp-1", n=10, total=10, status="close"),
                         bar("c", "exp-2", status="error", error="boom"),
                         {"task_id": "loose"}])
        status, body = get(server, "/runs")
    assert status == 200 and sorted(body["runs"]) == ["exp-1", "exp-2"]
    one = body["runs"]["exp-1"]
    assert (one["name"], one["status"], one["tasks"]) == ("train.py --lr 3", "running", 2)
    assert one["counts"] == {"running": 1, "close": 1}
    assert one["progress"] == pytest.approx((0.5 + 1.0) / 2)
    assert body["runs"]["exp-2"]["status"] == "error"


def test_get_run_answers_its_summary_and_its_tasks_oldest_first():
    with running_server() as server:
        post_ok(server, [bar("z", "job"), bar("a", "job"), bar("other", "elsewhere")])
        status, body = get(server, "/runs/job")
    assert status == 200 and body["run"]["run"] == "job"
    assert list(body["tasks"]) == ["z", "a"]
    assert "history" not in body["tasks"]["z"]  # bulk answers leave history out


def test_a_run_id_is_url_encoded_in_the_path_and_an_unknown_run_is_404():
    with running_server() as server:
        post_ok(server, bar("t", "slurm-42_3/rank 0"))
        quoted = urllib.parse.quote("slurm-42_3/rank 0", safe="")
        assert get(server, "/runs/" + quoted)[1]["run"]["run"] == "slurm-42_3/rank 0"
        status, body = get(server, "/runs/nope")
    assert status == 404 and body == {"error": "no run 'nope'"}


def test_get_tasks_with_run_lists_only_that_runs_tasks():
    with running_server() as server:
        post_ok(server, [bar("a", "r1"), bar("b", "r2"), bar("c", "r1"), {"task_id": "d"}])
        assert list(get(server, "/tasks?run=r1")[1]["tasks"]) == ["a", "c"]
        assert list(get(server, "/tasks?run=r1&status=running&limit=1")[1]["tasks"]) == ["a"]


def test_delete_tasks_with_run_removes_the_run_and_nothing_else():
    with running_server() as server:
        post_ok(server, [bar("a", "r1"), bar("b", "r2"), bar("c", "r1", status="close")])
        status, body, _ = http("DELETE", server.url + "/tasks?run=r1")
        assert status == 200 and sorted(body["removed"]) == ["a", "c"]
        assert list(tasks_of(server)) == ["b"]
        assert get(server, "/runs/r1")[0] == 404
        assert list(get(server, "/runs")[1]["runs"]) == ["r2"]


def test_a_task_that_moves_to_another_run_leaves_the_first():
    with running_server() as server:
        post_ok(server, bar("a", "first", seq=1))
        post_ok(server, bar("a", "second", seq=2))
        assert sorted(get(server, "/runs")[1]["runs"]) == ["second"]


# --- The feed -------------------------------------------------------------------------------


def test_the_snapshot_carries_every_run_and_updates_carry_the_runs_that_changed():
    with running_server() as server:
        post_ok(server, [bar("a", "r1", n=1, total=4), bar("b", "r2")])
        with open_listener(server) as ws:
            snapshot = json.loads(ws.recv(timeout=5))
            assert sorted(snapshot["runs"]) == ["r1", "r2"]
            post_ok(server, bar("a", "r1", n=2, total=4))
            update = receive_until(ws, lambda m: m["type"] == "update" and "a" in m["tasks"])
            assert update["runs"]["r1"]["progress"] == pytest.approx(0.5)
            post_ok(server, bar("a", "r1", n=3, total=4))
            update = receive_until(ws, lambda m: m["type"] == "update"
                                   and m["tasks"].get("a", {}).get("n") == 3)
    assert list(update["runs"]) == ["r1"]  # only the run that changed
    assert update["runs"]["r1"]["progress"] == pytest.approx(0.75)


def test_deleting_a_runs_last_task_sends_the_run_in_remove():
    with running_server() as server:
        post_ok(server, [bar("a", "r1"), bar("b", "r2")])
        with open_listener(server) as ws:
            ws.recv(timeout=5)
            http("DELETE", server.url + "/tasks/a")
            removal = receive_until(ws, lambda m: m["type"] == "remove")
    assert removal["ids"] == ["a"] and removal["runs"] == ["r1"]


def test_a_runs_end_is_news_once_after_the_settle_time_even_when_its_bars_end_one_by_one():
    clock = FakeClock(1000.0)
    with running_server(clock=clock, cleanup_interval=3600, run_settle_seconds=10) as server:
        sweep = lambda: on_server_loop(server, server.app.sweep)  # noqa: E731
        with open_listener(server) as ws:
            ws.recv(timeout=5)
            post_ok(server, [bar("first", "job", status="close")])
            clock.now += 5
            post_ok(server, [bar("second", "job")])  # opened before the settle time
            post_ok(server, [bar("second", "job", status="close", seq=2)])
            clock.now += 9  # 9 s after the last bar ended: not yet
            sweep()
            clock.now += 1
            sweep()
            news = receive_until(ws, lambda m: m["type"] == "update" and "runs_ended" in m)
            assert news["runs_ended"] == ["job"]
            clock.now += 60
            sweep()
            post_ok(server, bar("loose", None))
            later = receive_until(ws, lambda m: m["type"] == "update" and "loose" in m["tasks"])
    assert "runs_ended" not in later  # told once


def test_a_sqlite_server_keeps_runs_across_a_restart_and_does_not_announce_old_ends(tmp_path):
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    with running_server(store=store) as server:
        post_ok(server, [bar("a", "old", status="close"), bar("b", "live", n=1, total=2)])
    clock = FakeClock(progressista.time.time() + 3600)
    with running_server(store=store, clock=clock, cleanup_interval=3600) as server:
        runs = get(server, "/runs")[1]["runs"]
        assert runs["old"]["status"] == "close" and runs["live"]["progress"] == 0.5
        assert on_server_loop(server, lambda: server.app.runs.ended_runs(clock())) == []


def test_two_servers_on_one_redis_agree_on_a_run_whose_bars_went_to_both(redis_server):
    with running_server(store=redis_server.url) as one, \
            running_server(store=redis_server.url) as two:
        post_ok(one, bar("rank0", "ddp", n=5, total=10, meta={"host": "gpu-01"}))
        post_ok(two, bar("rank1", "ddp", n=10, total=10, status="close",
                         meta={"host": "gpu-02"}))

        def both_see_two_bars():
            runs = [get(server, "/runs/ddp") for server in (one, two)]
            return all(status == 200 and body["run"]["tasks"] == 2 for status, body in runs)

        wait_for(both_see_two_bars, message="the run on both servers")
        seen = [get(server, "/runs/ddp")[1]["run"] for server in (one, two)]
    assert seen[0] == seen[1]
    assert seen[0]["hosts"] == ["gpu-01", "gpu-02"]
    assert seen[0]["counts"] == {"running": 1, "close": 1}
    assert seen[0]["progress"] == pytest.approx(0.75)


def test_a_run_whose_bars_all_ended_reads_exactly_one_done():
    with running_server() as server:
        post_ok(server, [bar(f"b{i}", "thirds", n=i + 1, total=3 * (i + 1), seq=1)
                         for i in range(7)])
        post_ok(server, [bar(f"b{i}", "thirds", n=3 * (i + 1), total=3 * (i + 1),
                             status="close", seq=2) for i in range(7)])
        assert get(server, "/runs/thirds")[1]["run"]["progress"] == 1.0
