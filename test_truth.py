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
from conftest import FakeClock, RedisServer, http, post_ok, running_server, wait_for
from progressista import (InvalidUpdate, MemoryStore, Task, Thresholds, apply_update,
                          validate_update)

DEFAULTS = Thresholds()


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
    wire = task.as_dict(10.0, DEFAULTS)
    assert (wire["run"], wire["run_name"], wire["parent"], wire["transient"]) == (
        "slurm-81234", "train.py", "outer", True)


def test_v2_fields_default_to_null_and_false():
    wire = Task("t", 5.0).as_dict(5.0, DEFAULTS)
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
    assert task.as_dict(140.0, DEFAULTS)["progressed_at"] == 140.0


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


# --- stalled: the threshold (pure, injected clock) ---------------------------------------

STALL_30_S = Thresholds(stale_seconds=60.0, stall_seconds=30.0, stall_factor=10.0)


def steady_bar(store, step_s, steps, heartbeat_s=15.0, start=0.0):
    """Task "t" moving one step every `step_s` with heartbeats in between, from `start`;
    return the time of its last step."""
    seq, now = 1, start
    applied(store, now, n=0, seq=seq)
    for n in range(1, steps + 1):
        beat = now + heartbeat_s
        while beat < now + step_s:  # the client re-sends its unchanged state
            seq += 1
            applied(store, beat, n=n - 1, seq=seq)
            beat += heartbeat_s
        now += step_s
        seq += 1
        applied(store, now, n=n, seq=seq)
    return now


def heartbeat(store, now):
    task = store.get("t")
    return applied(store, now, n=task.n, seq=task.seq + 1)


def test_steady_slow_cadence_does_not_go_stalled_within_its_factor():
    store = MemoryStore()
    last_step = steady_bar(store, step_s=40.0, steps=6)  # slower than --stall-seconds
    task = store.get("t")
    assert task.typical_step_s == pytest.approx(40.0)
    for now in (last_step + 15.0, last_step + 30.0, last_step + 45.0, last_step + 390.0):
        heartbeat(store, now)
        assert task.shown_status(now, STALL_30_S) == "running", now
    heartbeat(store, last_step + 399.0)
    assert task.shown_status(last_step + 400.5, STALL_30_S) == "stalled"  # past 10 x 40 s


def test_a_fast_bar_that_stops_goes_stalled_after_stall_seconds():
    store = MemoryStore()
    last_step = steady_bar(store, step_s=0.5, steps=20)
    task = store.get("t")
    heartbeat(store, last_step + 15.0)
    assert task.stall_after_s(STALL_30_S) == 30.0  # 10 x 0.5 s is below the floor
    assert task.shown_status(last_step + 29.9, STALL_30_S) == "running"
    assert task.shown_status(last_step + 30.1, STALL_30_S) == "stalled"


def test_a_bar_that_has_not_moved_uses_stall_seconds_alone():
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    heartbeat(store, 15.0)
    assert task.typical_step_s is None
    assert task.shown_status(30.0, STALL_30_S) == "running"
    assert task.shown_status(30.5, STALL_30_S) == "stalled"


def test_a_stalled_bar_runs_again_when_it_moves():
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    heartbeat(store, 20.0)
    assert store.sweep(40.0, STALL_30_S_SETTINGS) == (["t"], [])
    assert task.status == "stalled"
    heartbeat(store, 45.0)  # heard from, still not moving
    assert task.shown_status(45.0, STALL_30_S) == "stalled"
    assert store.sweep(46.0, STALL_30_S_SETTINGS) == ([], [])  # nothing new to say
    applied(store, 50.0, n=1, seq=task.seq + 1)
    assert (task.status, task.shown_status(50.0, STALL_30_S)) == ("running", "running")
    assert task.progressed_at == 50.0


def test_stale_wins_over_stalled():
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    heartbeat(store, 20.0)
    assert task.shown_status(50.0, STALL_30_S) == "stalled"
    assert task.shown_status(80.0, STALL_30_S) == "stale"  # 60 s since the last heartbeat
    assert store.sweep(80.0, STALL_30_S_SETTINGS) == (["t"], [])
    assert task.status == "stale"


def test_a_task_not_heard_from_since_it_moved_is_not_stalled():
    # With stale off nothing judges silence: a task that sent nothing after its last
    # step is silent, not "alive and not moving".
    no_stale = Thresholds(stale_seconds=0.0, stall_seconds=30.0)
    store = MemoryStore()
    task = applied(store, 0.0, n=5, seq=1)
    assert task.shown_status(1e6, no_stale) == "running"
    heartbeat(store, 1.0)
    assert task.shown_status(1e6, no_stale) == "stalled"


def test_stall_seconds_zero_turns_stalled_off():
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    heartbeat(store, 20.0)
    off = Thresholds(stale_seconds=60.0, stall_seconds=0.0)
    assert task.shown_status(59.0, off) == "running"
    assert task.stall_after_s(off) is None


def test_typical_step_follows_a_bar_that_slows_down():
    store = MemoryStore()
    last_step = steady_bar(store, step_s=1.0, steps=10)
    task = store.get("t")
    slow_from = last_step
    for n in range(11, 31):  # ten times slower from here on
        slow_from += 10.0
        applied(store, slow_from, n=n, seq=task.seq + 1)
    assert 9.0 < task.typical_step_s <= 10.0


def test_sweep_reports_a_change_to_stalled_and_leaves_final_tasks_alone():
    store = MemoryStore()
    store.apply([validate_update({"task_id": "done", "status": "close"})], 0.0)
    task = applied(store, 0.0, n=0, seq=1)
    heartbeat(store, 20.0)
    marked, expired_ids = progressista.sweep_plan(store.tasks(), 31.0, STALL_30_S_SETTINGS)
    assert [(each.task_id, status) for each, status in marked] == [("t", "stalled")]
    assert (expired_ids, task.status) == ([], "running")  # the plan changes nothing


STALL_30_S_SETTINGS = progressista.Settings(stale_seconds=60.0, stall_seconds=30.0,
                                            stall_factor=10.0)


def test_stall_settings_come_from_flags_and_environment(capsys):
    settings = progressista.Settings.from_env({"PROGRESSISTA_STALL_SECONDS": "120",
                                               "PROGRESSISTA_STALL_FACTOR": "4"})
    assert (settings.stall_seconds, settings.stall_factor) == (120.0, 4.0)
    assert progressista.main(["show-config", "--stall-seconds", "0", "--stall-factor",
                              "2.5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["stall_seconds"], shown["stall_factor"]) == (0.0, 2.5)
    with pytest.raises(ValueError, match="PROGRESSISTA_STALL_FACTOR='-1': must be a number >= 0"):
        progressista.Settings.from_env({"PROGRESSISTA_STALL_FACTOR": "-1"})


def test_default_thresholds_are_the_protocols():
    settings = progressista.Settings()
    assert (settings.stall_seconds, settings.stall_factor) == (300.0, 10.0)
    assert Thresholds() == Thresholds(stale_seconds=60.0, stall_seconds=300.0, stall_factor=10.0)


# --- stalled: a real server ----------------------------------------------------------------


def post(server, **fields):
    post_ok(server, fields)


def test_server_lists_stalled_tasks_and_counts_them():
    clock = FakeClock(1000.0)
    with running_server(clock=clock, stall_seconds=30) as server:
        post(server, task_id="hung", n=3, seq=1)
        post(server, task_id="moving", n=3, seq=1)
        clock.now += 20
        post(server, task_id="hung", n=3, seq=2)  # a heartbeat
        post(server, task_id="moving", n=4, seq=2)
        clock.now += 11  # hung: 31 s without progress; moving: 11 s
        stalled = http("GET", server.url + "/tasks?status=stalled")[1]["tasks"]
        running = http("GET", server.url + "/tasks?status=running")[1]["tasks"]
        assert (list(stalled), list(running)) == (["hung"], ["moving"])
        assert stalled["hung"]["progressed_at"] == 1000.0
        metrics = http("GET", server.url + "/metrics")[1].decode()
        assert 'progressista_tasks{status="stalled"} 1' in metrics
        assert 'progressista_tasks{status="running"} 1' in metrics
        assert http("GET", server.url + "/health")[1]["active"] == 1


def test_feed_broadcasts_a_change_to_stalled_and_back():
    from websockets.sync.client import connect

    clock = FakeClock(1000.0)
    with running_server(clock=clock, stall_seconds=30, cleanup_interval=0.02,
                        broadcast_interval=0.02) as server:
        post(server, task_id="t", n=3, seq=1)
        clock.now += 20
        post(server, task_id="t", n=3, seq=2)
        with connect(f"ws://127.0.0.1:{server.port}/ws", proxy=None, open_timeout=5) as ws:
            snapshot = json.loads(ws.recv(timeout=5))
            assert snapshot["tasks"]["t"]["status"] == "running"
            clock.now += 11  # the sweep sees it stalled and the feed says so
            assert statuses_until(ws, "t", "stalled") <= {"running", "stalled"}
            post(server, task_id="t", n=4, seq=3)
            assert statuses_until(ws, "t", "running") <= {"stalled", "running"}


def statuses_until(ws, task_id, wanted):
    """Read the feed until a message shows `task_id` as `wanted` (else time out and
    fail); return the statuses it showed on the way."""
    seen = set()
    while wanted not in seen:
        message = json.loads(ws.recv(timeout=5))
        if task_id in message.get("tasks", {}):
            seen.add(message["tasks"][task_id]["status"])
    return seen


# --- stalled: notifications and watch ----------------------------------------------------


def test_notifier_tells_stalled_once_per_stall_when_asked():
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    for n in range(1, 11):  # a step every 3 s
        applied(store, 3.0 * n, n=n, seq=task.seq + 1)
    heartbeat(store, 40.0)
    notice = progressista.Notifier(notify_on=("stalled",), clock=FakeClock(0.0))
    notice.observe(["t"], (), store, 30.0 + 720.0, STALL_30_S_NO_STALE)
    notice.observe(["t"], (), store, 30.0 + 721.0, STALL_30_S_NO_STALE)  # the same stall
    assert [event["event"] for event in notice.pending_events] == ["stalled"]
    assert progressista.event_line(notice.pending_events[0]) == (
        "\u23f8\ufe0f task t: stalled at 10 it, no progress for 12 min; usually a step every 3 s")
    applied(store, 800.0, n=11, seq=task.seq + 1)
    notice.observe(["t"], (), store, 800.0, STALL_30_S_NO_STALE)  # moving again...
    heartbeat(store, 810.0)
    again = 800.0 + task.stall_after_s(STALL_30_S_NO_STALE) + 1.0
    notice.observe(["t"], (), store, again, STALL_30_S_NO_STALE)  # ...and stalled again: news
    assert [event["event"] for event in notice.pending_events] == ["stalled", "stalled"]


STALL_30_S_NO_STALE = Thresholds(stale_seconds=0.0, stall_seconds=30.0, stall_factor=10.0)


def test_stalled_is_notified_only_when_named():
    assert "stalled" in progressista.NOTIFY_EVENTS
    assert "stalled" not in progressista.Settings().notify_on
    settings = progressista.Settings.from_env({"PROGRESSISTA_NOTIFY_ON": "stalled,error"})
    assert settings.notify_on == ("stalled", "error")


def test_watch_shows_stalled_with_its_reason_and_counts():
    row = {"task_id": "t", "desc": "train", "n": 10, "total": 100, "status": "stalled",
           "created_at": 0.0, "updated_at": 740.0, "progressed_at": 30.0,
           "typical_step_s": 3.0, "elapsed": 740.0, "rate": 0.33}
    lines = progressista.render_table({"t": row, "u": dict(row, task_id="u", status="running",
                                                           desc="eval")},
                                      750.0, width=120, meter=progressista.plain_meter)
    assert "1 running, 1 stalled" in lines[0]
    stalled_row = next(line for line in lines if "train" in line)
    assert stalled_row.startswith("stalled train:")
    assert stalled_row.endswith("no progress for 12:00; usually a step every 3 s")
    assert [task["task_id"] for task in progressista.order_tasks([row])] == ["t"]
    assert progressista.task_matches(row, status="active")
    assert progressista.watch_status("stalled") == "stalled"


# --- history -------------------------------------------------------------------------------


def updated_every(store, step_s, count, start=0.0, n_per_step=1):
    """Task "t" updated `count` times, `step_s` apart, n moving by `n_per_step`."""
    task = applied(store, start, n=0, seq=1)
    for i in range(1, count + 1):
        applied(store, start + i * step_s, n=i * n_per_step, seq=i + 1)
    return task


def test_history_is_bounded_and_ends_with_the_current_state():
    store = MemoryStore()
    task = updated_every(store, 0.25, 20_000)
    pairs = progressista.history_pairs(task)
    assert len(pairs) <= progressista.MAX_HISTORY_PAIRS == 120
    assert len(pairs) >= 60  # thinned to half, never to nothing
    assert pairs[-1] == [task.updated_at, task.n] == [5000.0, 20_000]
    assert pairs[0] == [0.0, 0]  # the state the first update made: the whole life


def test_history_is_thinned_evenly_over_the_whole_life():
    store = MemoryStore()
    task = updated_every(store, 15.0, 2_000)  # 8 h 20 min of heartbeats
    times = [t for t, _ in progressista.history_pairs(task)]
    gaps = [later - earlier for earlier, later in zip(times, times[1:-1])]
    assert max(gaps) <= 1.01 * min(gaps)  # one spacing from the start to now
    assert times == sorted(times)
    assert max(gaps) * len(gaps) == pytest.approx(times[-2] - times[0])


def test_history_of_a_bar_that_sped_up_stays_even_in_time():
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    seq, now = 1, 0.0
    for step_s, count in ((20.0, 100), (0.25, 20_000), (15.0, 300)):
        for _ in range(count):
            seq, now = seq + 1, now + step_s
            applied(store, now, n=seq, seq=seq)
    times = [t for t, _ in progressista.history_pairs(task)]
    gaps = [later - earlier for earlier, later in zip(times, times[1:-1])]
    assert max(gaps) <= 2.5 * (times[-1] - times[0]) / len(gaps)  # no stretch left sparse
    assert len(times) <= 120


def test_history_pairs_follow_the_count():
    store = MemoryStore()
    task = updated_every(store, 1.0, 400, n_per_step=3)
    for t, n in progressista.history_pairs(task):
        assert n == 3 * round(t)  # each pair is a real (time, count) of the task


def test_history_of_a_new_task_is_its_one_state():
    store = MemoryStore()
    task = applied(store, 10.0, n=5, seq=1)
    assert progressista.history_pairs(task) == [[10.0, 5]]
    assert task.history is None  # nothing stored until there is a past


def test_history_is_kept_per_pair_in_a_few_bytes():
    store = MemoryStore()
    task = updated_every(store, 1.0, 5_000)
    assert task.history.itemsize * len(task.history) <= 4 * 119


def test_history_survives_the_stored_form():
    store = MemoryStore()
    task = updated_every(store, 0.5, 3_000, n_per_step=7)
    twin = Task.from_dict(json.loads(json.dumps(task.as_stored())))
    assert progressista.history_pairs(twin) == progressista.history_pairs(task)
    assert twin.history_step_s == task.history_step_s
    applied(store, 1501.0, n=1, seq=task.seq + 1)  # copies own their history
    assert progressista.history_pairs(twin) != progressista.history_pairs(task)


def test_get_task_has_history_and_bulk_answers_do_not():
    clock = FakeClock(1000.0)
    with running_server(clock=clock) as server:
        for seq in range(1, 6):
            post(server, task_id="t", n=10 * seq, seq=seq)
            clock.now += 2.0
        one = http("GET", server.url + "/tasks/t")[1]
        assert one["history"] == [[1000.0, 10], [1002.0, 20], [1004.0, 30], [1006.0, 40],
                                  [1008.0, 50]]
        listed = http("GET", server.url + "/tasks")[1]["tasks"]["t"]
        assert "history" not in listed and "history_step_s" not in listed
        assert {key: value for key, value in one.items() if key != "history"} == listed


def test_history_survives_a_sqlite_restart(tmp_path):
    clock = FakeClock(1000.0)
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    with running_server(store=url, clock=clock) as server:
        for seq in range(1, 300):
            post(server, task_id="t", n=seq, seq=seq)
            clock.now += 1.5
        before = http("GET", server.url + "/tasks/t")[1]["history"]
    assert len(before) > 60
    with running_server(store=url, clock=clock) as server:
        after = http("GET", server.url + "/tasks/t")[1]["history"]
        post(server, task_id="t", n=1000, seq=1000)
        grown = http("GET", server.url + "/tasks/t")[1]["history"]
    assert after == before
    assert grown[:-1] in (before, before[:-1])  # the old current state, settled if due
    assert grown[-1] == [clock.now, 1000]


def test_history_is_shared_through_redis_and_outlives_a_server(tmp_path):
    redis = RedisServer(tmp_path).start()
    clock = FakeClock(1000.0)
    try:
        with running_server(store=redis.url, clock=clock) as one, \
                running_server(store=redis.url, clock=clock) as two:
            for seq in range(1, 40):
                post(one, task_id="t", n=seq, seq=seq)
                clock.now += 3.0
            history = http("GET", one.url + "/tasks/t")[1]["history"]
            assert len(history) == 39
            wait_for(lambda: http("GET", two.url + "/tasks/t")[1].get("history") == history,
                     message="the other server's mirror to have the history")
        with running_server(store=redis.url, clock=clock) as again:
            assert http("GET", again.url + "/tasks/t")[1]["history"] == history
    finally:
        redis.stop()


@pytest.mark.parametrize("rate, step_s, count", [
    (2500.123, 60.0, 43_200),  # 30 days of a 7.3 GB download, a heartbeat a minute
    (1e-4, 0.25, 4000),  # a bar counting fractions: total=1
    (1e290, 1.0, 500),  # n as large as a float goes
])
def test_history_pairs_stay_within_a_fine_resolution_of_the_truth(rate, step_s, count):
    store = MemoryStore()
    task = applied(store, 0.0, n=0, seq=1)
    for i in range(1, count + 1):
        applied(store, i * step_s, n=i * step_s * rate, seq=i + 1)
    pairs = progressista.history_pairs(task)
    life_s, largest = count * step_s, count * step_s * rate
    for t, n in pairs:
        assert abs(n - t * rate) <= largest / 2 ** 14 + rate * life_s / 2 ** 14, (t, n)
    assert pairs[-1] == [life_s, largest]  # the current pair is exact


# --- Lifetimes: a stale task is deleted like a finished one ------------------------------

LIFETIMES = progressista.Settings(stale_seconds=60.0, retention_seconds=600.0)


def test_a_task_stale_for_the_retention_period_is_deleted():
    store = MemoryStore()
    applied(store, 0.0, n=3, seq=1)
    assert store.sweep(60.0, LIFETIMES) == (["t"], [])  # stale, and broadcast as such
    assert store.sweep(599.9, LIFETIMES) == ([], [])
    assert store.sweep(600.0, LIFETIMES) == ([], ["t"])  # counted from its last update
    assert len(store) == 0


def test_a_task_silent_past_retention_is_marked_stale_before_it_is_deleted():
    # As after a restart over a persistent store: silent since long, never marked. The
    # feed says stale first, then remove: a reader never loses a bar without a reason.
    store = MemoryStore()
    applied(store, 0.0, n=3, seq=1)
    assert store.sweep(10_000.0, LIFETIMES) == (["t"], [])
    assert store.sweep(10_001.0, LIFETIMES) == ([], ["t"])


def test_retention_zero_keeps_stale_tasks_and_a_stalled_task_is_kept():
    keep_all = progressista.Settings(stale_seconds=60.0, retention_seconds=0.0)
    store = MemoryStore()
    applied(store, 0.0, n=3, seq=1)
    store.sweep(100.0, keep_all)
    assert store.sweep(1e9, keep_all) == ([], []) and len(store) == 1
    alive = MemoryStore()
    task = applied(alive, 0.0, n=3, seq=1)
    for beat in range(1, 100):  # heard from every 15 s, never moving: stalled, not stale
        heartbeat(alive, beat * 15.0)
    assert alive.sweep(1490.0, LIFETIMES) == (["t"], [])
    assert task.status == "stalled" and len(alive) == 1


def test_a_stale_task_that_speaks_again_is_not_deleted():
    store = MemoryStore()
    task = applied(store, 0.0, n=3, seq=1)
    store.sweep(100.0, LIFETIMES)
    heartbeat(store, 500.0)
    assert task.status == "running"
    assert store.sweep(1099.9, LIFETIMES) == (["t"], [])  # stale again, not yet expired
    assert store.sweep(1100.0, LIFETIMES) == ([], ["t"])  # 600 s after it last spoke


def test_server_deletes_a_stale_task_after_retention_and_says_so_on_the_feed():
    from websockets.sync.client import connect

    clock = FakeClock(1000.0)
    with running_server(clock=clock, stale_seconds=30, retention_seconds=300,
                        cleanup_interval=0.02, broadcast_interval=0.02) as server:
        post(server, task_id="gone", n=1, seq=1)
        post(server, task_id="done", n=1, seq=1, status="close")
        with connect(f"ws://127.0.0.1:{server.port}/ws", proxy=None, open_timeout=5) as ws:
            json.loads(ws.recv(timeout=5))  # the snapshot
            clock.now += 31
            assert statuses_until(ws, "gone", "stale") <= {"running", "stale"}
            clock.now += 270  # 301 s after the last update of both
            removed = set()
            while removed != {"gone", "done"}:
                message = json.loads(ws.recv(timeout=5))
                removed.update(message.get("ids", ()) if message["type"] == "remove" else ())
        assert http("GET", server.url + "/tasks/gone")[0] == 404


def test_a_bar_whose_first_update_already_counts_has_no_pace_until_it_steps():
    clock = FakeClock(1000.0)
    with running_server(clock=clock) as server:
        post(server, task_id="resumed", n=5, seq=1)  # tqdm(initial=5), a resumed job
        assert http("GET", server.url + "/tasks/resumed")[1]["typical_step_s"] is None
        clock.now += 2
        post(server, task_id="resumed", n=6, seq=2)
        assert http("GET", server.url + "/tasks/resumed")[1]["typical_step_s"] == 2.0
