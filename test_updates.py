"""POST /progress: what an accepted update does to its task.

A shared real server (conftest.shared_server) answers most tests, each with task ids of
its own; the times use a server whose clock the test moves (`clocked_server`); the
ordering rules are also checked on the pure core, `apply_update`, with an injected `now`.
"""

from http.client import HTTPConnection
import json
import threading

import pytest

import progressista
from conftest import get_task, http, new_id, post, running_server

pytestmark = pytest.mark.timeout(60)


# --- The answer, and what is stored ------------------------------------------------------


def test_post_single_update_answers_ok_and_accepted_one(shared_server):
    status, body, _ = post(shared_server, {"task_id": new_id(), "n": 1})
    assert (status, body) == (200, {"ok": True, "accepted": 1})


def test_post_batch_answers_accepted_count(shared_server):
    batch = [{"task_id": new_id(), "n": i} for i in range(5)]
    status, body, _ = post(shared_server, batch)
    assert (status, body) == (200, {"ok": True, "accepted": 5})


def test_posted_fields_are_stored_as_sent(shared_server):
    task_id = new_id()
    update = {"task_id": task_id, "desc": "training", "n": 3, "total": 10, "unit": "B",
              "unit_scale": True, "unit_divisor": 1024, "rate": 2.5, "elapsed": 1.5,
              "postfix": "loss=0.12", "meta": {"host": "gpu1", "rank": 0}, "seq": 7,
              "timestamp": 1700000000.5}
    post(shared_server, update)
    status, task, _ = get_task(shared_server, task_id)
    assert status == 200
    assert {key: task[key] for key in update} == update


def test_new_task_gets_protocol_defaults(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id})
    _, task, _ = get_task(shared_server, task_id)
    assert (task["n"], task["total"], task["unit"], task["status"]) == (0, None, "it",
                                                                        "running")


@pytest.mark.parametrize("sent", ["start", "update", "running"])
def test_start_update_and_running_are_stored_as_running(shared_server, sent):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "status": sent})
    assert get_task(shared_server, task_id)[1]["status"] == "running"


def test_validate_update_maps_start_to_running():
    assert progressista.validate_update({"task_id": "a", "status": "start"})["status"] == "running"


@pytest.mark.parametrize("final", ["close", "error"])
def test_close_and_error_statuses_are_stored(shared_server, final):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "status": final, "error": "boom"})
    assert get_task(shared_server, task_id)[1]["status"] == final


def test_unknown_fields_are_ignored_and_not_stored(shared_server):
    task_id = new_id()
    status, body, _ = post(shared_server, {"task_id": task_id, "n": 1, "colour": "red",
                                           "nested": {"deep": [1, 2]}})
    assert (status, body["accepted"]) == (200, 1)
    task = get_task(shared_server, task_id)[1]
    assert "colour" not in task and "nested" not in task


def test_validate_update_drops_unknown_fields():
    assert progressista.validate_update({"task_id": "a", "x": 1, "n": 2}) == {"task_id": "a",
                                                                              "n": 2}


def test_update_keeps_fields_it_does_not_name(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "desc": "epoch 1", "total": 100, "unit": "img",
                         "meta": {"job": "j1"}})
    post(shared_server, {"task_id": task_id, "n": 50})
    task = get_task(shared_server, task_id)[1]
    assert (task["desc"], task["total"], task["unit"], task["meta"], task["n"]) == (
        "epoch 1", 100, "img", {"job": "j1"}, 50)


def test_update_replaces_fields_it_names_including_null(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "desc": "first", "total": 10})
    post(shared_server, {"task_id": task_id, "desc": "second", "total": None})
    task = get_task(shared_server, task_id)[1]
    assert (task["desc"], task["total"]) == ("second", None)


# --- Order: seq, else the sender's timestamp ---------------------------------------------


def test_lower_seq_is_ignored_but_counted_accepted(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "n": 5, "seq": 5})
    status, body, _ = post(shared_server, {"task_id": task_id, "n": 2, "seq": 2})
    assert (status, body["accepted"]) == (200, 1)
    assert get_task(shared_server, task_id)[1]["n"] == 5


def test_equal_seq_is_ignored(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "n": 5, "seq": 5})
    post(shared_server, {"task_id": task_id, "n": 9, "seq": 5})
    assert get_task(shared_server, task_id)[1]["n"] == 5


def test_higher_seq_is_applied(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "n": 5, "seq": 5})
    post(shared_server, {"task_id": task_id, "n": 6, "seq": 6})
    task = get_task(shared_server, task_id)[1]
    assert (task["n"], task["seq"]) == (6, 6)


def test_late_retry_does_not_reopen_closed_task(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "n": 10, "status": "close", "seq": 3})
    post(shared_server, {"task_id": task_id, "n": 9, "status": "update", "seq": 2})
    task = get_task(shared_server, task_id)[1]
    assert (task["status"], task["n"]) == ("close", 10)


def test_reordered_batch_keeps_highest_seq(shared_server):
    task_id = new_id()
    post(shared_server, [{"task_id": task_id, "n": 3, "seq": 3},
                         {"task_id": task_id, "n": 1, "seq": 1}])
    assert get_task(shared_server, task_id)[1]["n"] == 3


def test_apply_update_ignores_lower_seq_and_reports_it():
    task = progressista.Task("a", 0.0)
    assert progressista.apply_update(task, {"task_id": "a", "n": 5, "seq": 5}, 1.0)
    assert not progressista.apply_update(task, {"task_id": "a", "n": 1, "seq": 4}, 2.0)
    assert (task.n, task.updated_at) == (5, 1.0)


def test_apply_update_without_seq_orders_old_clients_by_timestamp():
    task = progressista.Task("a", 0.0)
    progressista.apply_update(task, {"task_id": "a", "status": "close", "timestamp": 20.0}, 1.0)
    progressista.apply_update(task, {"task_id": "a", "status": "running", "timestamp": 19.0}, 2.0)
    assert task.status == "close"


# --- Server times: created_at and updated_at ---------------------------------------------


def test_created_at_and_updated_at_are_server_time_of_first_update(clocked_server, clock):
    post(clocked_server, {"task_id": "t", "timestamp": 5.0})
    task = get_task(clocked_server, "t")[1]
    assert (task["created_at"], task["updated_at"]) == (clock.now, clock.now)


def test_applied_update_moves_updated_at_but_not_created_at(clocked_server, clock):
    first = clock.now
    post(clocked_server, {"task_id": "t", "seq": 1})
    clock.now += 5
    post(clocked_server, {"task_id": "t", "seq": 2})
    task = get_task(clocked_server, "t")[1]
    assert (task["created_at"], task["updated_at"]) == (first, first + 5)


def test_ignored_update_does_not_move_updated_at(clocked_server, clock):
    first = clock.now
    post(clocked_server, {"task_id": "t", "seq": 2})
    clock.now += 5
    post(clocked_server, {"task_id": "t", "seq": 1})
    assert get_task(clocked_server, "t")[1]["updated_at"] == first


# --- Many senders at once ----------------------------------------------------------------


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


# --- Memory: what equal tasks share ------------------------------------------------------


def test_tasks_with_equal_meta_share_one_dict_but_json_types_stay_apart():
    store = progressista.MemoryStore()
    metas = [{"host": "n1", "pid": 7}, {"host": "n1", "pid": 7}, {"host": "n1", "pid": True},
             {"host": "n1", "pid": 7.0}, {"host": "n1", "pid": -0.0}, {"host": "n1", "pid": 0.0}]
    store.apply([progressista.validate_update({"task_id": f"t{i}", "meta": meta})
                 for i, meta in enumerate(metas)], 1.0)
    held = [store.get(f"t{i}").meta for i in range(len(metas))]
    assert held[0] is held[1]  # one dict for the bars of one process
    wire = [json.dumps(store.get(f"t{i}").as_dict()["meta"]) for i in range(len(metas))]
    assert wire == [json.dumps(meta) for meta in metas]  # 7, true, 7.0, -0.0, 0.0 apart


def test_equal_whole_totals_share_one_int_but_a_float_total_stays_a_float():
    bodies = ['{"task_id": "a", "total": 1000001}', '{"task_id": "b", "total": 1000001}',
              '{"task_id": "c", "total": 1000001.0}']
    updates = [progressista.validate_update(json.loads(body)) for body in bodies]
    assert updates[0]["total"] is updates[1]["total"]
    assert type(updates[2]["total"]) is float


def test_a_meta_seen_before_is_not_let_through_unchecked_when_it_differs_in_type_or_size():
    good = progressista.validate_update({"task_id": "a", "meta": {"k": "v", "n": 1}})
    assert progressista.validate_update({"task_id": "b", "meta": {"k": "v", "n": 1}})["meta"] \
        is good["meta"]
    for bad in ({"k": "v", "n": [1]}, {"k": "v", "n": {"x": 1}}, {"k": "\ud800", "n": 1},
                {"k": "v" * 5000, "n": 1}, {"k": "v", "n": float("nan")},
                {"k": "v", "n": 10**400}):
        with pytest.raises(progressista.InvalidUpdate):
            progressista.validate_update({"task_id": "c", "meta": bad})
