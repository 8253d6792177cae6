"""Tests of the v2 task fields and of what the server says about a task's truth:
`run`, `run_name`, `parent`, `transient`, `progressed_at`, the derived `stalled`, a
task's `history`, and the lifetime of a task that went stale.

Strategy: the pure core (validate_update, apply_update, Task, sweep_plan, the history
thinning) is tested with an injected clock and no sockets; where the network or the disk
is the point (GET /tasks?status=stalled, GET /tasks/{id}, the /ws feed, SQLite across a
restart) a real server runs on 127.0.0.1 through conftest.running_server.
"""

import json

import pytest

import progressista
from conftest import FakeClock, http, running_server, wait_for
from progressista import InvalidUpdate, MemoryStore, Task, apply_update, validate_update


def applied(store, now, **fields):
    """Apply one update of task "t" to `store` at `now`; return the task."""
    update = validate_update({"task_id": "t", **fields})
    store.apply([update], now)
    return store.get("t")


# --- v2 fields ---------------------------------------------------------------------------


def test_v2_fields_are_validated_and_stored():
    update = validate_update({"task_id": "inner", "run": "slurm-81234", "run_name": "train.py",
                              "parent": "outer", "transient": True})
    assert update == {"task_id": "inner", "run": "slurm-81234", "run_name": "train.py",
                      "parent": "outer", "transient": True}
    task = Task("inner", 10.0)
    apply_update(task, update, 10.0)
    wire = task.as_dict(10.0)
    assert (wire["run"], wire["run_name"], wire["parent"], wire["transient"]) == (
        "slurm-81234", "train.py", "outer", True)


def test_v2_fields_default_to_null_and_false():
    wire = Task("t", 5.0).as_dict(5.0)
    assert (wire["run"], wire["run_name"], wire["parent"], wire["transient"]) == (
        None, None, None, False)


def test_v2_fields_accept_null():
    update = validate_update({"task_id": "t", "run": None, "run_name": None, "parent": None})
    assert update == {"task_id": "t", "run": None, "run_name": None, "parent": None}


@pytest.mark.parametrize("field, value, message", [
    ("run", "", "tasks[2].run: must be null or a string of 1 to 256 characters"),
    ("run", "r" * 257, "tasks[2].run: must be null or a string of 1 to 256 characters"),
    ("run", 7, "tasks[2].run: must be null or a string of 1 to 256 characters"),
    ("run", "\ud800", "tasks[2].run: must be valid Unicode"),
    ("parent", "", "tasks[2].parent: must be null or a string of 1 to 256 characters"),
    ("parent", "p" * 257, "tasks[2].parent: must be null or a string of 1 to 256 characters"),
    ("parent", ["outer"], "tasks[2].parent: must be null or a string of 1 to 256 characters"),
    ("run_name", "n" * 1001, "tasks[2].run_name: must be at most 1000 characters, not 1001"),
    ("run_name", 3, "tasks[2].run_name: must be a string or null"),
    ("transient", 1, "tasks[2].transient: must be true or false"),
    ("transient", None, "tasks[2].transient: must be true or false"),
    ("transient", "true", "tasks[2].transient: must be true or false"),
])
def test_bad_v2_field_is_refused_naming_the_field(field, value, message):
    with pytest.raises(InvalidUpdate) as refused:
        validate_update({"task_id": "t", field: value}, index=2)
    assert str(refused.value).startswith(message)


def test_v2_fields_at_their_limits_are_accepted():
    update = validate_update({"task_id": "t", "run": "r" * 256, "parent": "p" * 256,
                              "run_name": "n" * 1000, "transient": False})
    assert (len(update["run"]), len(update["parent"]), len(update["run_name"])) == (
        256, 256, 1000)


def test_bad_v2_field_in_a_batch_is_answered_400_naming_it():
    with running_server() as server:
        status, body, _ = http("POST", server.url + "/progress",
                               [{"task_id": "a"}, {"task_id": "b", "parent": ""}])
        assert status == 400
        assert body["error"].startswith("tasks[1].parent:")
        assert http("GET", server.url + "/tasks")[1]["tasks"] == {}  # all or nothing


def test_run_ids_are_shared_strings():
    # json.loads makes a new string per update; one interned run id serves every bar.
    first = validate_update(json.loads('{"task_id": "a", "run": "exp-142-run"}'))
    second = validate_update(json.loads('{"task_id": "b", "run": "exp-142-run"}'))
    assert first["run"] is second["run"]


# --- progressed_at -----------------------------------------------------------------------


def test_progressed_at_is_set_at_creation_and_moves_only_with_n():
    store = MemoryStore()
    task = applied(store, 100.0, n=0, seq=1)
    assert task.progressed_at == 100.0
    applied(store, 130.0, n=0, seq=2)  # a heartbeat: heard from, no progress
    assert (task.updated_at, task.progressed_at) == (130.0, 100.0)
    applied(store, 140.0, n=3, seq=3)
    assert task.progressed_at == 140.0
    assert task.as_dict(140.0)["progressed_at"] == 140.0


def test_v2_fields_and_progressed_at_survive_a_sqlite_restart(tmp_path):
    clock = FakeClock(1000.0)
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    with running_server(store=url, clock=clock) as server:
        http("POST", server.url + "/progress", {"task_id": "t", "n": 1, "seq": 1,
                                                "run": "r1", "run_name": "train.py",
                                                "parent": "outer"})
        clock.now += 5
        http("POST", server.url + "/progress", {"task_id": "t", "n": 1, "seq": 2,
                                                "transient": True, "status": "close"})
    with running_server(store=url, clock=clock) as server:
        task = http("GET", server.url + "/tasks/t")[1]
    assert (task["run"], task["run_name"], task["parent"], task["transient"]) == (
        "r1", "train.py", "outer", True)
    assert (task["progressed_at"], task["updated_at"]) == (1000.0, 1005.0)
