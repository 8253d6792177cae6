"""Reading at scale (docs/PROTOCOL.md "Reading tasks: GET /tasks", "The live feed"):
pollers' deltas with GET /tasks?since=, and big snapshots sent in chunks.

Strategy: the ChangeLog is pure and tested with a hand-moved clock; the rest runs a real
server on an ephemeral port and checks that a reader who applies what it was sent ends
equal to what GET /tasks says, while other threads add, update and delete tasks.
"""

import contextlib
import json
import threading
import time
import urllib.parse

import pytest
from websockets.sync.client import connect as ws_connect

import progressista
from conftest import FakeClock, http, post_ok as post, running_server, tasks_of as all_tasks


# --- ChangeLog (pure) ----------------------------------------------------------------------


def change_log_after(*steps):
    """A ChangeLog on a FakeClock that went through `steps`, each (time, "changed" or
    "removed", task ids), oldest first."""
    clock = FakeClock(steps[0][0])
    log = progressista.ChangeLog(clock)
    for now, what, ids in steps:
        clock.now = now
        getattr(log, what)(ids)
    return log


def test_change_log_lists_what_changed_at_or_after_a_time_oldest_change_first():
    log = change_log_after((100.0, "changed", ["a", "b"]), (110.0, "changed", ["c", "a"]))
    assert log.since(105.0) == (["c", "a"], [], False)
    assert log.since(100.0) == (["b", "c", "a"], [], False)
    assert log.since(111.0) == ([], [], False)


def test_change_log_lists_deletions_once_and_not_a_task_sent_again():
    log = change_log_after((100.0, "changed", ["a", "b"]), (101.0, "removed", ["a", "b"]),
                           (102.0, "changed", ["b"]))  # b came back
    assert log.since(100.5) == (["b"], ["a"], False)


def test_change_log_asks_for_a_resync_once_it_forgot_deletions_or_before_it_started():
    clock = FakeClock(100.0)
    log = progressista.ChangeLog(clock, max_removed=2)
    assert log.since(99.0)[2] is True  # before the server started: anything may be gone
    clock.now = 101.0
    log.removed(["a"])
    clock.now = 102.0
    log.removed(["b", "c"])  # "a" is forgotten now
    assert log.since(100.5)[2] is True
    assert log.since(102.0) == ([], ["c", "b"], False)


# --- GET /tasks?since= ---------------------------------------------------------------------


@contextlib.contextmanager
def churning(step):
    """Run `step(seq)` for seq = 2, 3, ... in a thread while the block runs; the block gets
    a `stop()` that ends it early (and waits for the step under way)."""
    stopping = threading.Event()

    def run():
        seq = 2
        while not stopping.is_set():
            step(seq)
            seq += 1

    worker = threading.Thread(target=run, daemon=True)
    worker.start()

    def stop():
        stopping.set()
        worker.join(10)

    try:
        yield stop
    finally:
        stop()


def poll_deltas(server, tasks, since, times=1):
    """Apply `times` GET /tasks?since= answers to the poller's copy `tasks`, each since
    the last one's `now`; return the last `now`."""
    for _ in range(times):
        status, delta, _ = http("GET", server.url + f"/tasks?since={since}")
        assert status == 200 and "resync" not in delta
        for task_id in delta["removed"]:
            tasks.pop(task_id, None)
        tasks.update(delta["tasks"])
        since = delta["now"]
    return since


def test_a_poller_that_applies_deltas_ends_equal_to_get_tasks_while_tasks_churn():
    with running_server() as server:
        post(server, [{"task_id": f"t{i}", "n": 0, "seq": 1} for i in range(50)])
        status, first, _ = http("GET", server.url + "/tasks?since=0")
        assert status == 200 and first.get("resync") is True  # before the server started
        copy, since = dict(first["tasks"]), first["now"]

        def churn(seq):
            post(server, [{"task_id": f"t{i}", "n": seq, "seq": seq} for i in range(0, 50, 3)])
            post(server, [{"task_id": f"new{seq}", "seq": 1}])
            http("DELETE", server.url + f"/tasks/new{seq - 1}")
            http("DELETE", server.url + f"/tasks/t{seq % 50}")

        with churning(churn):
            since = poll_deltas(server, copy, since, times=30)
        poll_deltas(server, copy, since)  # what changed until the churn stopped
        assert copy == all_tasks(server)


def test_a_delta_with_a_status_filter_lists_a_task_that_left_the_filter_as_removed():
    with running_server() as server:
        post(server, [{"task_id": "a", "seq": 1}, {"task_id": "b", "seq": 1}])
        status, first, _ = http("GET", server.url + "/tasks?status=running")
        post(server, {"task_id": "a", "status": "close", "seq": 2})
        status, delta, _ = http("GET", server.url
                                + f"/tasks?status=running&since={first['now']}")
        assert status == 200
        assert delta["tasks"] == {} and delta["removed"] == ["a"]


def test_a_delta_from_before_a_restart_says_resync_and_holds_every_task(tmp_path):
    store = f"sqlite:///{tmp_path / 'tasks.db'}"
    with running_server(store=store) as server:
        post(server, [{"task_id": "a", "status": "close"}, {"task_id": "b", "status": "close"}])
        since = http("GET", server.url + "/tasks")[1]["now"]
    with running_server(store=store) as server:
        status, delta, _ = http("GET", server.url + f"/tasks?since={since}")
    assert status == 200 and delta["resync"] is True
    assert sorted(delta["tasks"]) == ["a", "b"] and "removed" not in delta


@pytest.mark.parametrize("since", ["yesterday", "nan", "inf", "1_000", "%205", "%2B5", "%D9%A1",
                                   "1e400", "5."])
def test_a_since_that_is_not_a_time_is_refused_naming_the_parameter(since):
    with running_server() as server:
        status, body, _ = http("GET", server.url + f"/tasks?since={since}")
    assert status == 400 and body["error"].startswith("since: must be a server time")


# --- Chunked snapshots ---------------------------------------------------------------------


def read_feed(socket, tasks, until=None, quiet_s=0.5, deadline_s=10.0):
    """Apply the messages that arrive until one is `until` (a (type, more) pair) or none
    comes for `quiet_s`; fail after `deadline_s`. Returns the (type, more) pairs read."""
    kinds = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            message = json.loads(socket.recv(timeout=quiet_s))
        except TimeoutError:
            return kinds
        kinds.append((message["type"], message.get("more")))
        progressista.apply_feed_message(tasks, message)
        if kinds[-1] == until:
            return kinds
    raise AssertionError(f"the feed did not reach {until} in {deadline_s} s: {kinds[-5:]}")


def test_a_big_snapshot_comes_in_chunks_and_ends_equal_to_the_store_despite_updates(
        monkeypatch):
    monkeypatch.setattr(progressista, "SNAPSHOT_CHUNK_TASKS", 40)
    with running_server() as server:
        post(server, [{"task_id": f"t{i:03}", "n": 0, "seq": 1} for i in range(400)])

        def churn(seq):
            post(server, [{"task_id": f"t{i:03}", "n": seq, "seq": seq}
                          for i in range(seq % 7, 400, 37)])
            post(server, {"task_id": f"late{seq}"})
            http("DELETE", server.url + f"/tasks/t{seq % 400:03}")

        tasks = {}
        with churning(churn) as stop:
            with ws_connect(server.url.replace("http", "ws") + "/ws") as socket:
                first = json.loads(socket.recv(timeout=5))
                assert first["type"] == "snapshot" and first["more"] is True
                assert len(first["tasks"]) <= 40
                progressista.apply_feed_message(tasks, first)
                kinds = read_feed(socket, tasks, until=("snapshot_more", False), quiet_s=5.0)
                assert kinds[-1] == ("snapshot_more", False)
                stop()
                read_feed(socket, tasks, quiet_s=1.0)  # what changed until the churn stopped
        assert tasks == all_tasks(server)


def test_listeners_that_come_one_after_another_share_parts_and_each_ends_equal_to_the_store(
        monkeypatch):
    monkeypatch.setattr(progressista, "SNAPSHOT_CHUNK_TASKS", 40)
    with running_server() as server:
        post(server, [{"task_id": f"t{i:03}", "n": 0, "seq": 1} for i in range(400)])

        def churn(seq):  # a few tasks change, some go, some come: most parts hold
            post(server, {"task_id": f"t{(seq * 37) % 400:03}", "n": seq, "seq": seq})
            post(server, {"task_id": f"late{seq}"})
            http("DELETE", server.url + f"/tasks/t{(seq * 11) % 400:03}")

        copies = []
        with churning(churn) as stop:
            with contextlib.ExitStack() as sockets:
                for _ in range(3):
                    socket = sockets.enter_context(
                        ws_connect(server.url.replace("http", "ws") + "/ws"))
                    tasks = {}
                    read_feed(socket, tasks, until=("snapshot_more", False), quiet_s=5.0)
                    copies.append((socket, tasks))
                shared = server.app.hub.shared_parts
                assert shared is not None and len(shared.lows) >= 10
                stop()
                for socket, tasks in copies:
                    read_feed(socket, tasks, quiet_s=1.0)  # what changed until the churn stopped
        expected = all_tasks(server)
    for _, tasks in copies:
        assert tasks == expected


def store_of(count, now=100.0):
    store = progressista.MemoryStore()
    store.apply([progressista.validate_update({"task_id": f"t{i}", "seq": 1})
                 for i in range(count)], now)
    return store


def parts_read(parts, now):
    """Every part from the first, as ({task_id: task}, encoded now) pairs."""
    read, low = [], parts.first()
    while low is not None:
        body, low, encoded = parts.part(low, now)
        read.append((json.loads(b"{" + body + b"}"), encoded))
    return read


def test_each_part_reads_the_store_as_it_is_when_it_is_encoded():
    store = store_of(7)
    parts = progressista.SnapshotParts(store, progressista.Thresholds(), 3)
    body, low, _ = parts.part(parts.first(), 100.0)
    assert list(json.loads(b"{" + body + b"}")) == ["t0", "t1", "t2"]
    store.delete(["t4"])
    store.apply([progressista.validate_update({"task_id": "t5", "n": 9, "seq": 2}),
                 progressista.validate_update({"task_id": "new", "seq": 1})], 101.0)
    second, low, _ = parts.part(low, 101.0)
    second = json.loads(b"{" + second + b"}")
    assert list(second) == ["t3", "t5", "t6"] and second["t5"]["n"] == 9
    third, low, _ = parts.part(low, 101.0)
    assert list(json.loads(b"{" + third + b"}")) == ["new"] and low is None


def test_a_part_message_is_the_bytes_of_the_message_as_a_dict():
    store = store_of(2)
    parts = progressista.SnapshotParts(store, progressista.Thresholds(), 5)
    body, _, _ = parts.part(parts.first(), 100.5)
    tasks = {task.task_id: task.as_dict(100.5, progressista.Thresholds())
             for task in store.tasks()}
    runs = {"r": {"tasks": 1}}
    for first, more, runs_json, expected in [
            (True, True, progressista._encode(runs),
             {"type": "snapshot", "tasks": tasks, "more": True, "now": 100.5, "runs": runs}),
            (False, False, None,
             {"type": "snapshot_more", "tasks": tasks, "more": False, "now": 100.5})]:
        message = progressista.snapshot_part_message(body, first, more, 100.5, runs_json)
        assert message == progressista._encode(expected)


def test_shared_parts_are_reused_until_a_task_in_them_changes_or_goes():
    clock = FakeClock(100.0)
    store = store_of(9)
    changes = progressista.ChangeLog(clock)
    changes.changed([task.task_id for task in store.tasks()])
    parts = progressista.SnapshotParts(store, progressista.Thresholds(), 3, changes)
    clock.now = 101.0
    assert [encoded for _, encoded in parts_read(parts, 101.0)] == [True, True, True]
    assert [encoded for _, encoded in parts_read(parts, 102.0)] == [False, False, False]

    clock.now = 103.0
    store.apply([progressista.validate_update({"task_id": "t4", "n": 5, "seq": 2})], 103.0)
    changes.changed(["t4"])
    store.delete(["t7"])
    changes.removed(["t7"])
    clock.now = 104.0  # (a change at the very time of a look is taken again, to be safe)
    read = parts_read(parts, 104.0)
    assert [encoded for _, encoded in read] == [False, True, True]
    assert read[1][0]["t4"]["n"] == 5 and "t7" not in read[2][0]

    clock.now = 105.0
    store.apply([progressista.validate_update({"task_id": f"new{i}"}) for i in range(4)], 105.0)
    changes.changed([f"new{i}" for i in range(4)])
    read = parts_read(parts, 106.0)
    # Only the last part takes new tasks, and splits when they are too many for it.
    assert [encoded for _, encoded in read] == [False, False, True, True]
    assert [list(tasks) for tasks, _ in read[2:]] == [["t6", "t8", "new0"],
                                                      ["new1", "new2", "new3"]]


def test_shared_parts_are_encoded_again_the_moment_time_alone_changes_a_status():
    thresholds = progressista.Thresholds(stale_seconds=60.0, stall_seconds=5.0,
                                         stall_factor=10.0)
    clock = FakeClock(100.0)
    store = store_of(4)  # created and last heard of at 100
    store.apply([progressista.validate_update({"task_id": "t1", "n": 1, "seq": 2})], 100.2)
    store.apply([progressista.validate_update({"task_id": "t1", "n": 2, "seq": 3})], 100.3)
    store.apply([progressista.validate_update({"task_id": "t1", "seq": 4})], 101.0)
    changes = progressista.ChangeLog(clock)  # no sweep runs here: nothing marks a task
    parts = progressista.SnapshotParts(store, thresholds, 10, changes)
    clock.now = 101.0
    status_at = {}
    for now in (101.0, 105.2, 105.4, 159.9, 160.0):
        (tasks, encoded), = parts_read(parts, now)
        status_at[now] = (encoded, tasks["t0"]["status"], tasks["t1"]["status"])
    assert status_at == {
        101.0: (True, "running", "running"),
        105.2: (False, "running", "running"),
        105.4: (True, "running", "stalled"),  # its pace: 0.1 s a step, heard from since
        159.9: (False, "running", "stalled"),
        160.0: (True, "stale", "stalled"),  # 60 s after its last word, not a sweep later
    }


def test_a_task_deleted_sent_again_and_deleted_again_between_two_looks_leaves_no_trace():
    clock, store, changes, parts = parts_read_once(9)
    clock.now = 102.0
    for step, what in enumerate(["delete", "send", "delete"]):
        if what == "delete":
            changes.removed(store.forget(["t4"]))
        else:
            store.apply([progressista.validate_update({"task_id": "t4", "n": 7})], 102.0)
            changes.changed(["t4"])
    clock.now = 103.0
    ids = [task_id for tasks, _ in parts_read(parts, 103.0) for task_id in tasks]
    assert "t4" not in ids and len(ids) == 8


def test_a_small_store_still_gets_one_snapshot_message():
    with running_server() as server:
        post(server, [{"task_id": "a"}, {"task_id": "b"}])
        with ws_connect(server.url.replace("http", "ws") + "/ws") as socket:
            first = json.loads(socket.recv(timeout=5))
    assert first["type"] == "snapshot" and sorted(first["tasks"]) == ["a", "b"]
    assert "more" not in first


# --- Paging: GET /tasks?limit=&after= ------------------------------------------------------


def read_pages(server, limit, between_pages=lambda: None, query=""):
    """Every page of GET /tasks, following `next`; `between_pages()` runs after each."""
    seen, after = [], None
    while True:
        url = f"{server.url}/tasks?limit={limit}{query}"
        if after is not None:
            url += "&after=" + urllib.parse.quote(after, safe="")
        status, body, _ = http("GET", url)
        assert status == 200, body
        assert len(body["tasks"]) <= limit
        seen.extend(body["tasks"])
        between_pages()
        after = body.get("next")
        if after is None:
            return seen


def test_pages_list_every_task_exactly_once_while_tasks_are_added_and_deleted():
    with running_server() as server:
        post(server, [{"task_id": f"t{i:03}"} for i in range(100)])
        kept = {f"t{i:03}" for i in range(100) if i % 10}  # never deleted
        churn = iter(range(1000))

        def add_and_delete():
            step = next(churn)
            post(server, {"task_id": f"new{step}"})
            http("DELETE", server.url + f"/tasks/t{step * 10:03}")  # incl. a page's last

        seen = read_pages(server, 7, add_and_delete)
    assert len(seen) == len(set(seen))  # nothing twice
    assert kept <= set(seen)  # every task that lived throughout, once
    assert [task_id for task_id in seen if task_id in kept] == sorted(kept)  # in order


def test_a_page_can_follow_a_task_deleted_since_it_was_listed():
    with running_server() as server:
        post(server, [{"task_id": name} for name in "abcde"])
        status, first, _ = http("GET", server.url + "/tasks?limit=2")
        assert list(first["tasks"]) == ["a", "b"] and first["next"] == "b"
        http("DELETE", server.url + "/tasks/b")
        status, second, _ = http("GET", server.url + "/tasks?limit=2&after=b")
    assert status == 200 and list(second["tasks"]) == ["c", "d"] and second["next"] == "d"


def test_the_last_page_has_no_next_and_filters_apply_within_pages():
    with running_server() as server:
        post(server, [{"task_id": f"t{i}", "status": "close" if i % 2 else "running"}
                      for i in range(6)])
        assert read_pages(server, 2, query="&status=close") == ["t1", "t3", "t5"]
        status, body, _ = http("GET", server.url + "/tasks?limit=3&after=t2")
    assert list(body["tasks"]) == ["t3", "t4", "t5"] and "next" not in body


@pytest.mark.parametrize("query, message", [
    ("limit=0", "limit: must be a whole number from 1 to 100,000"),
    ("limit=100001", "limit: must be a whole number from 1 to 100,000"),
    ("limit=two", "limit: must be a whole number from 1 to 100,000"),
    ("limit=5&after=ghost", "after: no task 'ghost' here"),
])
def test_a_bad_page_request_is_refused_saying_what_to_fix(query, message):
    with running_server() as server:
        post(server, {"task_id": "a"})
        status, body, _ = http("GET", server.url + "/tasks?" + query)
    assert status == 400 and body["error"].startswith(message)


def test_a_page_after_a_task_deleted_and_sent_again_goes_on_from_its_old_place():
    with running_server() as server:
        post(server, [{"task_id": f"rr{i}", "run": "rr"} for i in range(10)])
        status, first, _ = http("GET", server.url + "/tasks?run=rr&limit=3")
        assert first["next"] == "rr2"
        http("DELETE", server.url + "/tasks/rr2")
        post(server, {"task_id": "rr2", "run": "rr"})  # a heartbeat after a ✕
        seen = list(first["tasks"])
        after = first["next"]
        while after is not None:
            status, page, _ = http("GET", server.url + f"/tasks?run=rr&limit=3&after={after}")
            seen.extend(page["tasks"])
            after = page.get("next")
    assert [task_id for task_id in seen if task_id != "rr2"] == [f"rr{i}" for i in range(10)
                                                                 if i != 2]
    assert seen.count("rr2") <= 2 and seen[:3] == ["rr0", "rr1", "rr2"]


def test_get_tasks_of_a_big_store_comes_in_parts_equal_to_the_pages(monkeypatch):
    monkeypatch.setattr(progressista, "SNAPSHOT_CHUNK_TASKS", 40)
    with running_server() as server:
        post(server, [{"task_id": f"t{i:03}", "n": i, "seq": 1} for i in range(300)])
        http("DELETE", server.url + "/tasks/t100")
        status, whole, _ = http("GET", server.url + "/tasks")
        assert status == 200 and "resync" not in whole
        pages = read_pages(server, 70)
        assert list(whole["tasks"]) == pages and len(pages) == 299  # oldest first, once each
        post(server, {"task_id": "t005", "n": 99, "seq": 2})
        status, again, _ = http("GET", server.url + "/tasks")  # a part encoded anew
        assert again["tasks"]["t005"]["n"] == 99 and len(again["tasks"]) == 299
        status, resync, _ = http("GET", server.url + "/tasks?since=1")
    assert status == 200 and resync["resync"] is True and resync["tasks"] == again["tasks"]


def test_a_poller_that_starts_from_a_big_listing_misses_nothing_changed_meanwhile(monkeypatch):
    monkeypatch.setattr(progressista, "SNAPSHOT_CHUNK_TASKS", 40)
    with running_server() as server:
        post(server, [{"task_id": f"t{i:03}", "n": 0, "seq": 1} for i in range(400)])

        def churn(seq):
            post(server, {"task_id": f"t{(seq * 37) % 400:03}", "n": seq, "seq": seq})
            http("DELETE", server.url + f"/tasks/t{(seq * 11) % 400:03}")

        with churning(churn):
            status, listing, _ = http("GET", server.url + "/tasks")
            tasks, since = listing["tasks"], listing["now"]
            since = poll_deltas(server, tasks, since, times=3)
        poll_deltas(server, tasks, since)
        held = {task.task_id: task.as_dict() for task in server.app.store.tasks()}
    assert json.loads(json.dumps(held)) == tasks  # the store itself, not another listing


def parts_read_once(count):
    """A store of `count` tasks, its ChangeLog, and SnapshotParts of 3 tasks each, every
    part read once at 101 on the clock returned."""
    clock = FakeClock(100.0)
    store = store_of(count)
    changes = progressista.ChangeLog(clock)
    parts = progressista.SnapshotParts(store, progressista.Thresholds(), 3, changes)
    clock.now = 101.0
    parts_read(parts, 101.0)
    return clock, store, changes, parts


def test_a_task_deleted_and_sent_again_leaves_its_old_part_and_comes_once():
    clock, store, changes, parts = parts_read_once(9)
    clock.now = 102.0
    store.delete(["t4"])
    changes.removed(["t4"])
    store.apply([progressista.validate_update({"task_id": "t4", "n": 7})], 102.0)
    changes.changed(["t4"])  # between two looks: the log says changed, not removed
    clock.now = 103.0
    read = [tasks for tasks, _ in parts_read(parts, 103.0)]
    assert [list(tasks) for tasks in read] == [["t0", "t1", "t2"], ["t3", "t5"],
                                               ["t6", "t7", "t8"], ["t4"]]
    assert read[3]["t4"]["n"] == 7


def test_parts_start_over_when_the_store_ranks_its_tasks_anew():
    clock, store, _, parts = parts_read_once(6)
    store.replace_all({task.task_id: task for task in reversed(store.tasks())})  # a resync
    clock.now = 102.0
    read = parts_read(parts, 102.0)
    ids = [task_id for tasks, _ in read for task_id in tasks]
    assert sorted(ids) == [f"t{i}" for i in range(6)] and len(ids) == 6
