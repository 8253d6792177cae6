"""Lifetimes: a silent task goes stale, a finished one is deleted after the retention, any
one after the maximum age; each change reaches /ws listeners.

The sweep, a pure function of (store, now, settings), is tested with an injected `now`;
the same rules run on a real server with sub-second settings
(conftest.quick_lifetimes_server), where the tests wait for them with deadlines.
"""

import time

import pytest

import progressista
from conftest import (get_task, http, memory_store_of, new_id, open_listener, post,
                      receive_until, running_server, updated, wait_for)

pytestmark = pytest.mark.timeout(60)


def lifetimes(stale=60.0, retention=86400.0, max_age=0.0):
    return progressista.Settings(stale_seconds=stale, retention_seconds=retention,
                                 max_task_age=max_age)


# --- Stale -------------------------------------------------------------------------------


def test_silent_running_task_reads_stale(quick_lifetimes_server):
    task_id = new_id()
    post(quick_lifetimes_server, {"task_id": task_id})
    wait_for(lambda: get_task(quick_lifetimes_server, task_id)[1]["status"] == "stale", 2,
             message="the task to read stale")


def test_task_going_stale_is_broadcast_as_update(quick_lifetimes_server):
    task_id = new_id()
    with open_listener(quick_lifetimes_server) as ws:
        ws.recv(timeout=3)
        post(quick_lifetimes_server, {"task_id": task_id})
        receive_until(ws, updated(task_id, status="stale"), timeout=2)


def test_update_after_stale_makes_task_running_again(quick_lifetimes_server):
    task_id = new_id()
    post(quick_lifetimes_server, {"task_id": task_id, "n": 1, "seq": 1})
    wait_for(lambda: get_task(quick_lifetimes_server, task_id)[1]["status"] == "stale", 2,
             message="the task to read stale")
    post(quick_lifetimes_server, {"task_id": task_id, "n": 2, "seq": 2})
    task = get_task(quick_lifetimes_server, task_id)[1]
    assert (task["status"], task["n"]) == ("running", 2)


def test_stale_task_coming_back_is_broadcast_as_running(quick_lifetimes_server):
    task_id = new_id()
    with open_listener(quick_lifetimes_server) as ws:
        ws.recv(timeout=3)
        post(quick_lifetimes_server, {"task_id": task_id, "n": 1})
        receive_until(ws, updated(task_id, status="stale"), timeout=2)
        post(quick_lifetimes_server, {"task_id": task_id, "n": 2})
        receive_until(ws, updated(task_id, status="running", n=2), timeout=2)


def test_apply_update_revives_stale_task():
    task = progressista.Task("a", 0.0)
    task.status = "stale"
    progressista.apply_update(task, {"task_id": "a", "n": 1}, 1.0)
    assert task.status == "running"


def test_sweep_marks_silent_running_task_stale_at_timeout():
    store = memory_store_of({"task_id": "a"}, now=100.0)
    assert store.sweep(160.0, lifetimes(stale=60)) == (["a"], [])
    assert store.get("a").status == "stale"


def test_sweep_leaves_running_task_alone_before_timeout():
    store = memory_store_of({"task_id": "a"}, now=100.0)
    assert store.sweep(159.9, lifetimes(stale=60)) == ([], [])
    assert store.get("a").status == "running"


def test_sweep_reports_a_stale_task_only_once():
    store = memory_store_of({"task_id": "a"}, now=100.0)
    store.sweep(200.0, lifetimes(stale=60))
    assert store.sweep(300.0, lifetimes(stale=60)) == ([], [])


def test_sweep_with_zero_stale_seconds_never_marks_stale():
    store = memory_store_of({"task_id": "a"}, now=100.0)
    assert store.sweep(1e9, lifetimes(stale=0, retention=0)) == ([], [])


def test_sweep_never_marks_closed_task_stale():
    store = memory_store_of({"task_id": "a", "status": "close"}, now=100.0)
    assert store.sweep(200.0, lifetimes(stale=60, retention=0)) == ([], [])


# --- Retention of finished tasks ---------------------------------------------------------


def test_retention_deletes_closed_and_errored_tasks_but_not_running_ones():
    # Stale off: in version 2 a running task that reads stale for the retention period
    # is deleted too (test_truth.py); here a running one must simply stay.
    with running_server(stale_seconds=0, retention_seconds=0.3,
                        cleanup_interval=0.05) as server:
        closed, failed, running = new_id("close"), new_id("error"), new_id("run")
        post(server, [{"task_id": closed, "status": "close"},
                      {"task_id": failed, "status": "error", "error": "x"},
                      {"task_id": running}])
        wait_for(lambda: get_task(server, closed)[0] == 404
                 and get_task(server, failed)[0] == 404, 2, message="retention")
        assert get_task(server, running)[0] == 200


def test_retention_deletion_is_broadcast_as_remove(quick_lifetimes_server):
    task_id = new_id()
    with open_listener(quick_lifetimes_server) as ws:
        ws.recv(timeout=3)
        post(quick_lifetimes_server, {"task_id": task_id, "status": "close"})
        receive_until(ws, lambda m: m["type"] == "remove" and task_id in m["ids"], timeout=4)


def test_sweep_deletes_closed_and_errored_tasks_after_retention():
    store = memory_store_of({"task_id": "c", "status": "close"},
                            {"task_id": "e", "status": "error"}, now=100.0)
    assert store.sweep(109.9, lifetimes(retention=10)) == ([], [])
    stale_ids, removed_ids = store.sweep(110.0, lifetimes(retention=10))
    assert sorted(removed_ids) == ["c", "e"] and len(store) == 0


def test_sweep_with_zero_retention_keeps_closed_tasks():
    store = memory_store_of({"task_id": "c", "status": "close"}, now=100.0)
    assert store.sweep(1e9, lifetimes(retention=0)) == ([], [])
    assert len(store) == 1


def test_sweep_keeps_a_stale_task_until_the_retention_period_after_its_last_update():
    # Version 2 deletes a stale task like a finished one (test_truth.py), but only once
    # the retention period has passed since its last update; before that it stays.
    store = memory_store_of({"task_id": "a"}, now=100.0)
    assert store.sweep(200.0, lifetimes(stale=60, retention=1000)) == (["a"], [])
    assert store.sweep(1099.0, lifetimes(stale=60, retention=1000)) == ([], [])
    assert store.get("a").status == "stale"


# --- Maximum age -------------------------------------------------------------------------


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


def test_sweep_max_age_deletes_every_status():
    store = memory_store_of({"task_id": "r"}, {"task_id": "c", "status": "close"}, now=100.0)
    store.apply([progressista.validate_update({"task_id": "s"})], 0.0)
    store.sweep(61.0, lifetimes(stale=60, retention=0))  # s goes stale
    stale_ids, removed_ids = store.sweep(130.0, lifetimes(stale=60, retention=0, max_age=30))
    assert sorted(removed_ids) == ["c", "r", "s"] and len(store) == 0


# --- The sweep's schedule: only tasks whose time has come ---------------------------------


def test_a_sweep_looks_only_at_tasks_whose_time_has_come(monkeypatch):
    looked_at = []
    plan = progressista.sweep_plan
    monkeypatch.setattr(progressista, "sweep_plan",
                        lambda tasks, now, settings: (looked_at.append(len(tasks)),
                                                      plan(tasks, now, settings))[1])
    settings = lifetimes(stale=60, retention=3600)
    store = memory_store_of(*({"task_id": f"t{i}"} for i in range(1000)), now=100.0,
                            max_tasks=2000)
    assert store.sweep(100.5, settings) == ([], [])  # the first sweep: every task, once
    for now in (101.0, 120.0, 159.0):
        assert store.sweep(now, settings) == ([], [])
    store.apply([progressista.validate_update({"task_id": "t7", "n": 1})], 150.0)
    assert store.sweep(159.5, settings) == ([], [])  # an update schedules nothing new
    marked, removed = store.sweep(160.0, settings)  # 60 s after their update: stale
    assert len(marked) == 999 and "t7" not in marked and removed == []
    assert looked_at == [1000, 0, 0, 0, 0, 1000]
    assert store.sweep(210.0, settings) == (["t7"], [])  # t7's own time
    assert looked_at[-1] == 1


def test_a_task_closed_after_its_check_was_made_still_expires_on_time():
    settings = lifetimes(stale=0, retention=10)
    store = memory_store_of({"task_id": "a"}, now=100.0)
    store.sweep(100.0, settings)  # running, stale off: nothing will happen by time alone
    store.apply([progressista.validate_update({"task_id": "a", "status": "close"})], 105.0)
    assert store.sweep(114.0, settings) == ([], [])
    assert store.sweep(115.0, settings) == ([], ["a"])
