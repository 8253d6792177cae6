"""The soak-and-fault script (bench/soak.py): its checks, its proxy, and a 10 s run of it.

The run is real: the server as a subprocess on the SQLite store, killed with SIGKILL (a
crash) and restarted on the same port mid-run, client processes with real tqdm bars
sending through a proxy that drops connections for a while, and /ws listeners. It asserts
that nothing is lost; the checks and the proxy are also tested on their own.
"""

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import running_server

ROOT = os.path.dirname(os.path.abspath(__file__))
SOAK_PATH = os.path.join(ROOT, "bench", "soak.py")
SOAK_RUN_TIMEOUT_S = 90  # a 10 s run takes 10-15 s; this is only a backstop

spec = importlib.util.spec_from_file_location("soak", SOAK_PATH)
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


# --- The phases and the checks (pure) --------------------------------------------------


@pytest.mark.parametrize("duration_s", [10, 60, 600])
def test_every_phase_happens_in_order_within_the_duration(duration_s):
    plan = soak.plan_phases(duration_s)
    assert 0 < plan.warmup_end_s < plan.drop_start_s < plan.drop_end_s < plan.kill_at_s
    assert plan.kill_at_s + plan.restart_after_s < plan.clients_stop_s < duration_s
    # the last bars end before the duration is over
    assert plan.clients_stop_s + plan.bar_max_s <= duration_s


def feed(checker, index, kind, **tasks):
    checker.receive(index, {"type": kind, "tasks": {
        task_id: {"status": status, "n": n} for task_id, (status, n) in tasks.items()}})


def test_a_final_seen_on_the_feed_counts_as_found_though_it_expired_before_the_end():
    checker = soak.FeedChecker("soak-", listeners=2)
    feed(checker, 0, "update", **{"soak-a": ("running", 3)})
    feed(checker, 0, "update", **{"soak-a": ("close", 10)})
    checker.receive(0, {"type": "remove", "ids": ["soak-a"]})
    verdict = soak.check_finals({"soak-a": ("close", 10)}, checker, end_tasks={},
                                acknowledged={"soak-a"})
    assert verdict["found"] == verdict["found_close"] == 1
    assert verdict["missing"] == verdict["lost_after_seen"] == []


def test_a_final_shown_running_again_after_a_restart_counts_as_lost():
    checker = soak.FeedChecker("soak-", listeners=1)
    feed(checker, 0, "update", **{"soak-a": ("error", 4)})
    feed(checker, 0, "snapshot", **{"soak-a": ("running", 3)})  # the restarted server
    verdict = soak.check_finals({"soak-a": ("error", 4)}, checker,
                                end_tasks={"soak-a": {"status": "running", "n": 3}},
                                acknowledged={"soak-a"})
    assert verdict["found"] == 0
    assert verdict["lost_after_seen"] == [{
        "task_id": "soak-a", "expected": ["error", 4], "acknowledged": True,
        "seen_after_restart": ["running", 3], "at_end": ["running", 3]}]


def test_a_final_never_seen_is_missing_and_says_whether_the_server_acknowledged_it():
    checker = soak.FeedChecker("soak-", listeners=1)
    feed(checker, 0, "update", **{"soak-a": ("running", 2), "soak-b": ("close", 9)})
    expected = {"soak-a": ("close", 5), "soak-b": ("close", 10), "soak-c": ("close", 1)}
    verdict = soak.check_finals(expected, checker, end_tasks={}, acknowledged={"soak-a"})
    assert verdict["found"] == 0
    assert [(item["task_id"], item["acknowledged"], item["last_seen"])
            for item in verdict["missing"]] == [
        ("soak-a", True, ["running", 2]), ("soak-b", False, ["close", 9]),
        ("soak-c", False, None)]


def test_the_state_at_the_end_counts_as_found_when_no_listener_saw_the_final():
    checker = soak.FeedChecker("soak-", listeners=1)
    verdict = soak.check_finals({"soak-a": ("close", 5)}, checker,
                                end_tasks={"soak-a": {"status": "close", "n": 5.0}},
                                acknowledged=set())
    assert verdict["found"] == 1


def test_other_tasks_on_the_feed_are_not_checked():
    checker = soak.FeedChecker("soak-1-", listeners=1)
    feed(checker, 0, "update", **{"someone-else": ("close", 1), "soak-1-a": ("close", 2)})
    assert checker.final_seen == {"soak-1-a": ("close", 2)}
    assert checker.states == [2]


def rss_samples(plan, before_kib, after_kib):
    """One sample a second: `before_kib`, then `after_kib` just before the end window."""
    grows_at_s = plan.clients_stop_s - plan.memory_window_s - 1
    return [(at, before_kib if at < grows_at_s else after_kib)
            for at in range(int(plan.duration_s) + 1)]


def test_memory_that_stays_within_the_tolerance_of_the_working_set_is_flat():
    plan = soak.plan_phases(60)
    ready_at_s = plan.kill_at_s + plan.restart_after_s
    verdict = soak.memory_verdict(rss_samples(plan, 40_000, 43_000), ready_at_s, plan)
    assert verdict["verdict"] == "PASS"
    assert verdict["working_set_kib"] == 40_000 and verdict["end_of_load_kib"] == 43_000


def test_memory_that_grows_past_the_tolerance_after_the_working_set_is_not_flat():
    plan = soak.plan_phases(60)
    ready_at_s = plan.kill_at_s + plan.restart_after_s
    verdict = soak.memory_verdict(rss_samples(plan, 40_000, 45_000), ready_at_s, plan)
    assert verdict["verdict"] == "FAIL"


def test_a_run_too_short_to_reach_the_working_set_gives_no_memory_verdict():
    plan = soak.plan_phases(10)
    verdict = soak.memory_verdict(rss_samples(plan, 40_000, 90_000),
                                  plan.kill_at_s + plan.restart_after_s, plan)
    assert verdict["verdict"] == "n/a"


# --- The proxy -------------------------------------------------------------------------


def test_the_proxy_forwards_then_resets_new_connections_and_cuts_open_ones_while_dropping():
    async def scenario(port):
        proxy = await soak.DropProxy(port).start()
        try:
            status, health = await soak.http_get(proxy.port, "/health")
            assert status == 200 and health["status"] == "ok"
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            deadline = time.monotonic() + 5
            while not proxy.pairs and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            proxy.drop(True)
            assert proxy.cut == 1
            with pytest.raises(ConnectionError):  # the open one: reset, or closed unanswered
                if not await asyncio.wait_for(reader.read(), 5):
                    raise ConnectionError("closed")
            writer.close()
            with pytest.raises(ConnectionError):
                await soak.http_get(proxy.port, "/health")
            assert proxy.refused == 1
            proxy.drop(False)
            status, _ = await soak.http_get(proxy.port, "/health")
            assert status == 200
            assert proxy.proxied == 3
        finally:
            await proxy.close()

    with running_server() as server:
        asyncio.run(scenario(server.port))


def test_the_proxy_resets_the_client_when_the_server_is_down():
    async def scenario(port):
        proxy = await soak.DropProxy(port).start()
        try:
            with pytest.raises(ConnectionError):
                await soak.http_get(proxy.port, "/health")
            assert proxy.upstream_failures == 1
        finally:
            await proxy.close()

    asyncio.run(scenario(soak.free_port()))  # a port nothing listens on


# --- A 10 s soak -----------------------------------------------------------------------


def test_a_ten_second_soak_through_a_drop_window_and_a_restart_loses_no_final_state():
    # The script's default: the server is killed with SIGKILL, a crash, mid-run.
    command = [sys.executable, SOAK_PATH, "--duration", "10", "--processes", "4",
               "--bars", "50", "--listeners", "3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          timeout=SOAK_RUN_TIMEOUT_S)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["pass"] is True, report
    assert figures["bars_run"] >= 200, report
    assert figures["finals_expected"] == figures["finals_found"] == figures["bars_run"], report
    assert figures["bars_error"] > 0, report  # the deliberate failures, found as error
    assert figures["finals_found_error"] == figures["bars_error"], report
    assert figures["client_errors"] == 0, report
    assert figures["server_restarts"] == 1, report
    assert figures["server_exit_status"] == -signal.SIGKILL, report  # a crash, not a stop
    start, end = figures["drop_window_s"]
    assert 0 < start < end, report
    assert figures["connections_refused"] + figures["connections_cut"] >= 1, report
    assert figures["listeners_connected"] == 3, report
    # every listener reconnected after the restart and resynced from a snapshot
    assert min(figures["listener_snapshots"]) >= 2, report
