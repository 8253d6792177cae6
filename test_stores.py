"""The stores: memory (capacity, order, a custom store), SQLite across restarts and
crashes, Redis across servers and outages.

Servers run on each store for real (conftest.running_server, or the command line where a
crash is the point, killed with SIGKILL); lifetimes across a restart use a wall clock moved
forward (conftest.Clock). Redis tests run a real `redis-server` on a free loopback port
(conftest.redis_server); they skip locally when it is not installed, and fail under CI
(where .ci/run installs it).
"""

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import time

import pytest

import progressista
from conftest import (HERE, Clock, cli_server, free_port, get_task, http, memory_store_of,
                      open_listener, post, run_cli, running_server, tasks_of, wait_for)


def stored_rows(path):
    with sqlite3.connect(path) as db:
        return {task_id: json.loads(task)
                for task_id, task in db.execute("SELECT task_id, task FROM tasks")}


def serve_and_fail(store_url):
    """`progressista serve` on `store_url`, for a store that must fail at startup."""
    return run_cli("--host", "127.0.0.1", "--port", "0", "--store", store_url, timeout=20)


# --- Memory: capacity (max_tasks), order, a custom store ---------------------------------


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


def test_memory_store_refuses_new_task_past_cap_and_applies_nothing():
    store = memory_store_of({"task_id": "a"}, {"task_id": "b"}, max_tasks=2)
    updates = [progressista.validate_update(u) for u in ({"task_id": "a", "n": 9},
                                                         {"task_id": "c"})]
    with pytest.raises(progressista.StoreFull):
        store.apply(updates, 200.0)
    assert (store.get("a").n, store.get("c")) == (0, None)


def test_memory_store_lists_tasks_oldest_created_first():
    store = memory_store_of({"task_id": "z"}, now=1.0)
    store.apply([progressista.validate_update({"task_id": "a"})], 2.0)
    store.apply([progressista.validate_update({"task_id": "z", "n": 1})], 3.0)
    assert [task.task_id for task in store.tasks()] == ["z", "a"]


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


# --- SQLite: across restarts -------------------------------------------------------------


def test_sqlite_tasks_come_back_after_a_restart_with_fields_and_times(sqlite_url):
    with running_server(store=sqlite_url) as server:
        post(server, [{"task_id": "train", "desc": "epoch 3", "n": 30, "total": 100,
                       "unit": "img", "meta": {"host": "node7"}, "seq": 4},
                      {"task_id": "etl", "n": 5, "status": "close", "seq": 1}])
        before = tasks_of(server)
    with running_server(store=sqlite_url) as server:
        after = tasks_of(server)
    assert list(after) == ["train", "etl"]
    for task_id in after:
        for field in ("desc", "n", "total", "unit", "meta", "seq", "status",
                      "created_at", "updated_at"):
            assert after[task_id][field] == before[task_id][field], (task_id, field)


def test_sqlite_writes_reach_the_file_while_the_server_runs(sqlite_url):
    path = sqlite_url[len("sqlite://"):]
    with running_server(store=sqlite_url, broadcast_interval=0.05) as server:
        for n in range(20):
            post(server, {"task_id": "live", "n": n, "seq": n})
        wait_for(lambda: stored_rows(path).get("live", {}).get("n") == 19,
                 message="the last update in the SQLite file")
        http("DELETE", server.url + "/tasks/live")
        wait_for(lambda: "live" not in stored_rows(path), message="the delete in the file")


def test_sqlite_closed_task_past_retention_while_down_is_gone_after_restart(sqlite_url):
    clock = Clock()
    with running_server(store=sqlite_url, retention_seconds=60, clock=clock) as server:
        post(server, [{"task_id": "done", "status": "close"}, {"task_id": "busy", "n": 1}])
    clock.offset = 120  # the server was down for two minutes
    with running_server(store=sqlite_url, retention_seconds=60, stale_seconds=0,
                        clock=clock) as server:
        assert list(tasks_of(server)) == ["busy"]


def test_sqlite_running_task_reads_stale_after_a_restart_from_its_stored_time(sqlite_url):
    clock = Clock()
    with running_server(store=sqlite_url, stale_seconds=60, clock=clock) as server:
        post(server, {"task_id": "quiet", "n": 1})
    clock.offset = 61
    with running_server(store=sqlite_url, stale_seconds=60, clock=clock) as server:
        assert tasks_of(server)["quiet"]["status"] == "stale"
        post(server, {"task_id": "quiet", "n": 2})
        assert tasks_of(server)["quiet"]["status"] == "running"


def test_sqlite_max_task_age_continues_from_stored_times(sqlite_url):
    clock = Clock()
    with running_server(store=sqlite_url, max_task_age=30, clock=clock) as server:
        post(server, {"task_id": "forgotten", "n": 1})
        clock.offset = 20
        post(server, {"task_id": "recent", "n": 1})
    clock.offset = 31
    with running_server(store=sqlite_url, max_task_age=30, clock=clock) as server:
        assert list(tasks_of(server)) == ["recent"]  # stored, and only the old one expired


def test_sqlite_task_forgotten_and_sent_again_before_a_flush_is_written(tmp_path):
    path = str(tmp_path / "tasks.db")

    async def scenario():
        store = progressista.SqliteStore(path)
        store.apply([progressista.validate_update({"task_id": "x", "n": 1})], 100.0)
        await store.flush()
        store.forget(["x"])  # expired by a sweep...
        store.apply([progressista.validate_update({"task_id": "x", "n": 2})], 101.0)
        await store.flush()  # ...and back within the same flush interval
        await store.close()

    asyncio.run(scenario())
    assert stored_rows(path)["x"]["n"] == 2


def test_health_reports_the_store_kind(sqlite_url):
    with running_server(store=sqlite_url) as server:
        health = http("GET", server.url + "/health")[1]
    assert health["store"]["kind"] == "sqlite"
    assert health["store"]["ok"] is True


# --- SQLite: crashes and failing writes --------------------------------------------------


def test_sqlite_acknowledged_final_state_survives_a_kill_9(sqlite_url):
    # Flushes only every 30 s: what is on disk right after the answer was written for it.
    args = ("--host", "127.0.0.1", "--port", "0", "--store", sqlite_url,
            "--broadcast-interval", "30")
    with cli_server(*args) as server:
        assert post(server, {"task_id": "finished", "n": 10, "total": 10, "seq": 1})[0] == 200
        assert post(server, [{"task_id": "failed", "n": 3, "status": "error", "error": "boom"},
                             {"task_id": "finished", "n": 10, "status": "close", "seq": 2}]
                    )[0] == 200
        server.proc.kill()  # SIGKILL: no shutdown, no last flush
        server.proc.wait()
    with cli_server(*args) as server:
        tasks = tasks_of(server)
    assert (tasks["finished"]["status"], tasks["finished"]["n"]) == ("close", 10)
    assert (tasks["failed"]["status"], tasks["failed"]["error"]) == ("error", "boom")


def test_sqlite_answered_delete_survives_a_kill_9(sqlite_url):
    args = ("--host", "127.0.0.1", "--port", "0", "--store", sqlite_url)
    with cli_server(*args) as server:
        post(server, [{"task_id": "kept", "status": "close"},
                      {"task_id": "cleared", "status": "close"},
                      {"task_id": "cleared-too", "status": "error"}])
        assert http("DELETE", server.url + "/tasks/cleared")[1] == {"removed": True}
        assert http("DELETE", server.url + "/tasks?status=error")[1] == {
            "removed": ["cleared-too"]}
        server.proc.kill()  # SIGKILL, within the broadcast interval of the deletes
        server.proc.wait()
    with cli_server(*args) as server:
        assert sorted(tasks_of(server)) == ["kept"]


def test_sqlite_failed_write_is_retried_and_loses_nothing(sqlite_url, monkeypatch):
    path = sqlite_url[len("sqlite://"):]
    failures = []
    real_write = progressista.SqliteStore._write

    def failing_once(store, rows, deleted):
        if not failures:
            failures.append(rows)
            raise sqlite3.OperationalError("disk I/O error")
        return real_write(store, rows, deleted)

    monkeypatch.setattr(progressista.SqliteStore, "_write", failing_once)
    with running_server(store=sqlite_url, broadcast_interval=0.05) as server:
        post(server, {"task_id": "kept", "n": 3})
        wait_for(lambda: failures, message="the failing write")
        # The next flush writes what the failed one held.
        wait_for(lambda: stored_rows(path).get("kept", {}).get("n") == 3,
                 message="the retried write")
        assert http("GET", server.url + "/health")[1]["store"]["ok"] is True


def test_sqlite_failed_write_reports_not_ok_until_it_succeeds(sqlite_url, monkeypatch):
    monkeypatch.setattr(progressista.SqliteStore, "_write",
                        lambda store, rows, deleted: (_ for _ in ()).throw(
                            sqlite3.OperationalError("database or disk is full")))
    with running_server(store=sqlite_url, broadcast_interval=0.05) as server:
        post(server, {"task_id": "waiting", "n": 1})
        wait_for(lambda: http("GET", server.url + "/health")[1]["store"]["ok"] is False,
                 message="health to report the store as failing")
        monkeypatch.undo()  # the disk recovers
        wait_for(lambda: http("GET", server.url + "/health")[1]["store"]["ok"] is True,
                 message="health to recover")
    with running_server(store=sqlite_url) as server:
        assert tasks_of(server)["waiting"]["n"] == 1


# --- Stores that cannot start ------------------------------------------------------------


def test_sqlite_corrupt_file_is_a_clear_startup_error(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database\n" * 200)
    result = serve_and_fail("sqlite://" + str(corrupt))
    assert result.returncode == 1
    assert "cannot use SQLite store" in result.stderr
    assert "file is not a database" in result.stderr
    assert "Traceback" not in result.stderr


def test_sqlite_unwritable_path_is_a_clear_startup_error(tmp_path):
    result = serve_and_fail("sqlite://" + str(tmp_path / "missing-folder" / "tasks.db"))
    assert result.returncode == 1
    assert "unable to open database file" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_store_kind_is_a_clear_startup_error():
    result = serve_and_fail("postgres://db/tasks")
    assert result.returncode == 1
    assert "unknown store 'postgres://db/tasks'" in result.stderr


def test_redis_store_without_the_redis_package_says_how_to_install_it():
    code = ("import sys; sys.modules['redis'] = None; sys.modules['redis.asyncio'] = None\n"
            "import progressista\n"
            "try:\n"
            "    progressista.create_app(store='redis://127.0.0.1:1/0')\n"
            "except progressista.StoreError as error:\n"
            "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=HERE, timeout=20)
    assert "pip install 'progressista[redis]'" in result.stdout, result.stderr


# --- Redis: servers that share one store -------------------------------------------------


class Listener:
    """A /ws client that collects every message it receives."""

    def __init__(self, server):
        # Entered by hand: websockets 17 wants a context manager, 15 has no other way.
        self.connection = open_listener(server)
        self.socket = self.connection.__enter__()
        self.messages = [json.loads(self.socket.recv(timeout=5))]

    def receive_until(self, predicate, timeout=5.0, message="a /ws message"):
        deadline = time.monotonic() + timeout
        while True:
            if any(predicate(item) for item in self.messages):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {message}")
            try:
                self.messages.append(json.loads(self.socket.recv(timeout=remaining)))
            except TimeoutError:
                pass

    def removals_of(self, task_id):
        return sum(task_id in item.get("ids", ()) for item in self.messages
                   if item["type"] == "remove")

    def close(self):
        self.connection.__exit__(None, None, None)


def test_redis_update_posted_to_one_server_shows_on_the_other(redis_server):
    with running_server(store=redis_server.url) as one, \
            running_server(store=redis_server.url) as two:
        listener = Listener(two)
        try:
            assert post(one, {"task_id": "shared", "n": 7, "total": 10, "seq": 1})[0] == 200
            wait_for(lambda: tasks_of(two).get("shared", {}).get("n") == 7,
                     message="the task on the other server's /tasks")
            listener.receive_until(
                lambda item: item["type"] == "update"
                and item["tasks"].get("shared", {}).get("n") == 7,
                message="the update on the other server's /ws")
        finally:
            listener.close()


def test_redis_newer_seq_wins_whichever_server_gets_it(redis_server):
    with running_server(store=redis_server.url) as one, \
            running_server(store=redis_server.url) as two:
        post(one, {"task_id": "bar", "n": 5, "seq": 5})
        wait_for(lambda: "bar" in tasks_of(two), message="bar on the second server")
        post(two, {"task_id": "bar", "n": 3, "seq": 3})  # a late retry, via the other
        post(two, {"task_id": "bar", "n": 9, "seq": 9, "status": "close"})
        wait_for(lambda: tasks_of(one)["bar"]["n"] == 9, message="seq 9 on the first")
        assert tasks_of(two)["bar"]["status"] == "close"
    with running_server(store=redis_server.url) as fresh:
        assert tasks_of(fresh)["bar"]["n"] == 9  # what Redis itself holds


def test_redis_refuses_an_older_seq_that_this_servers_mirror_has_not_seen_beaten(
        redis_server):
    with running_server(store=redis_server.url) as one:
        post(one, {"task_id": "bar", "n": 5, "seq": 5})

    async def late_retry_through_an_empty_mirror():
        store = progressista.RedisStore(redis_server.url, progressista.Settings())
        await store.open(progressista.Feed())
        store.local.replace_all({})  # so that only Redis itself (the Lua script) can refuse it
        try:
            return await store.apply(
                [progressista.validate_update({"task_id": "bar", "n": 3, "seq": 3})], 1.0)
        finally:
            await store.close()

    assert asyncio.run(late_retry_through_an_empty_mirror()) == []
    with running_server(store=redis_server.url) as fresh:
        assert tasks_of(fresh)["bar"]["n"] == 5


def test_redis_batch_of_new_tasks_reaches_the_other_server_in_its_order(redis_server):
    ids = [f"batch-{n:02d}" for n in range(30)][::-1]
    with running_server(store=redis_server.url) as one, \
            running_server(store=redis_server.url) as two:
        # Once this arrives, two follows the channel (a resync reads Redis in its own order).
        post(one, {"task_id": "warm-up"})
        wait_for(lambda: "warm-up" in tasks_of(two), message="the second server to follow")
        post(one, [{"task_id": task_id} for task_id in ids])
        wait_for(lambda: len(tasks_of(two)) == 31, message="the batch on the second server")
        assert list(tasks_of(two))[1:] == ids


def test_redis_resync_brings_a_stale_mark_missed_while_cut_off(redis_server):
    with running_server(store=redis_server.url) as one:
        post(one, {"task_id": "quiet", "n": 1})

    async def resync_after_a_missed_stale_mark():
        store = progressista.RedisStore(redis_server.url, progressista.Settings())
        feed = progressista.Feed()
        await store.open(feed)
        try:
            feed.clear()
            key = store.key("quiet")
            stored = json.loads(await store.client.hget(key, "task"))
            stored["status"] = "stale"  # what the sweeper wrote, unpublished to us
            await store.client.hset(key, "task", json.dumps(stored))
            await store.resync()
            return list(feed.changed_ids), store.get("quiet").status
        finally:
            await store.close()

    assert asyncio.run(resync_after_a_missed_stale_mark()) == (["quiet"], "stale")


# --- Redis: lifetimes, swept by one server for all ---------------------------------------


def test_redis_ttl_follows_the_lifetimes():
    settings = progressista.Settings(retention_seconds=10, max_task_age=100,
                                     cleanup_interval=1)
    task = progressista.Task("t", now=0.0)
    assert progressista.redis_ttl_ms(task, settings) == 102_000
    task.status = "close"
    assert progressista.redis_ttl_ms(task, settings) == 12_000
    assert progressista.redis_ttl_ms(task, progressista.Settings(retention_seconds=0)) == 0


def test_redis_retention_and_max_age_expire_once_for_every_listener(redis_server):
    settings = dict(store=redis_server.url, retention_seconds=0.3, max_task_age=0.6,
                    stale_seconds=0, cleanup_interval=0.05)
    with running_server(**settings) as one, running_server(**settings) as two:
        listeners = [Listener(one), Listener(two)]
        try:
            post(one, [{"task_id": "finished", "status": "close"},
                       {"task_id": "abandoned", "n": 1}])
            for listener in listeners:
                for task_id in ("finished", "abandoned"):
                    listener.receive_until(
                        lambda item, task_id=task_id: item["type"] == "remove"
                        and task_id in item["ids"], message=f"remove of {task_id}")
            # Give a second sweeper the chance to remove them twice, then count.
            post(two, {"task_id": "marker", "n": 1})
            for listener in listeners:
                listener.receive_until(lambda item: "marker" in item.get("tasks", {}),
                                       message="the marker update")
                assert listener.removals_of("finished") == 1
                assert listener.removals_of("abandoned") == 1
            assert "finished" not in tasks_of(one) and "finished" not in tasks_of(two)
        finally:
            for listener in listeners:
                listener.close()


@pytest.mark.parametrize("seq", [None, 7], ids=["without-seq", "with-seq"])
def test_redis_stale_mark_made_by_the_sweeper_reaches_every_server(redis_server, seq):
    # A task posted through each server: whichever holds the sweeper lease marks both.
    settings = dict(store=redis_server.url, stale_seconds=0.2, cleanup_interval=0.05)
    with running_server(**settings) as one, running_server(**settings) as two:
        listeners = [Listener(one), Listener(two)]
        try:
            for server, task_id in ((one, "hung-via-one"), (two, "hung-via-two")):
                update = {"task_id": task_id, "n": 1}
                if seq is not None:
                    update["seq"] = seq
                assert post(server, update)[0] == 200
            for listener in listeners:
                for task_id in ("hung-via-one", "hung-via-two"):
                    listener.receive_until(
                        lambda item, task_id=task_id: item["type"] == "update"
                        and item["tasks"].get(task_id, {}).get("status") == "stale",
                        message=f"the stale update of {task_id} on both servers")
            for server in (one, two):
                assert {task["status"] for task in tasks_of(server).values()} == {"stale"}
        finally:
            for listener in listeners:
                listener.close()


# --- Redis: outages ----------------------------------------------------------------------


def test_redis_outage_gives_503_then_service_resumes_by_itself(redis_server):
    with running_server(store=redis_server.url) as one, \
            running_server(store=redis_server.url) as two:
        assert post(one, {"task_id": "before", "n": 1})[0] == 200
        redis_server.stop()
        status, body, headers = post(one, {"task_id": "during", "n": 1})
        assert status == 503
        assert "Redis store is unreachable" in body["error"]
        assert "not stored" in body["error"]
        health = http("GET", one.url + "/health")[1]
        assert health["store"] == {"kind": "redis", "ok": False, "url": redis_server.url}
        metrics = http("GET", one.url + "/metrics")[1].decode()
        assert re.search(r"^progressista_store_up 0$", metrics, re.M)
        assert int(re.search(r"^progressista_store_errors_total (\d+)$", metrics, re.M)[1]) >= 1
        assert http("GET", one.url + "/tasks")[0] == 200  # reads still answer
        redis_server.start()
        wait_for(lambda: post(one, {"task_id": "after", "n": 1})[0] == 200, timeout=10,
                 message="writes to succeed again")
        wait_for(lambda: "after" in tasks_of(two), timeout=10,
                 message="the other server to follow again")
        assert http("GET", two.url + "/health")[1]["store"]["ok"] is True


def test_redis_unreachable_at_startup_is_logged(caplog):
    with running_server(store=f"redis://127.0.0.1:{free_port()}/0") as server:
        assert post(server, {"task_id": "nowhere"})[0] == 503
        assert http("GET", server.url + "/health")[1]["store"]["ok"] is False
    assert any("is unreachable" in record.getMessage() for record in caplog.records)
