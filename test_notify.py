"""Notifications: a webhook POST when a task closes, fails or goes stale.

The servers here post to a real HTTP receiver on a loopback port (`Receiver`), which
records every POST and can be told to answer errors first or to hang until the test lets
it go. The pure parts (events, message text, the Notifier's detection and windows, the
backoff) are tested with an injected clock; the settings through the command line.
"""

import asyncio
import base64
import contextlib
import json
import re
import signal
import threading
import time

import pytest

import progressista
from conftest import (Clock, FakeClock, QuietHandler, cli_server, http, http_server_thread,
                      on_server_loop, post_ok, run_cli, running_server, send_body, wait_for)

SLACK_URL = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX"


# --- A real webhook --------------------------------------------------------------------


class Receiver:
    """A webhook on 127.0.0.1:0 that records each POST. `statuses` are answered in order
    before it answers 200; while `hold` is set, every POST waits until `release` is."""

    def __init__(self, statuses=(), headers=None, hold=False):
        self.statuses = list(statuses)
        self.headers = headers or {}
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.lock = threading.Lock()
        self.attempts = []  # (status answered, parsed body, request headers), in order
        self.arrived = 0  # POSTs received, answered or not
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.arrived += 1
                receiver.release.wait(30)
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.attempts.append((status, body, self.headers))
                send_body(self, b"ok", status, receiver.headers.items())

        self.serving = contextlib.ExitStack()
        self.base_url = self.serving.enter_context(http_server_thread(Handler))
        self.url = self.base_url + "/hooks/SECRET-PATH"

    def messages(self):
        """The bodies it answered 200 to, oldest first."""
        with self.lock:
            return [body for status, body, _ in self.attempts if status == 200]

    def events(self):
        return [event for message in self.messages() for event in message["events"]]

    def close(self):
        self.release.set()
        self.serving.close()


@contextlib.contextmanager
def receiver_at(**kwargs):
    receiver = Receiver(**kwargs)
    try:
        yield receiver
    finally:
        receiver.close()


def notifying(receiver, **settings):
    """A server that notifies `receiver`, with a short window."""
    settings.setdefault("notify_interval", 0.2)
    settings.setdefault("broadcast_interval", 0.02)
    return running_server(notify=[receiver.url], **settings)


def events_for(receiver, task_id):
    return [event for event in receiver.events() if event.get("task_id") == task_id]


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(progressista, "NOTIFY_RETRY_INITIAL_S", 0.01)
    monkeypatch.setattr(progressista, "NOTIFY_RETRY_MAX_S", 0.05)


# --- Against a real server and a real webhook ------------------------------------------


def test_closed_task_is_one_message_with_text_content_and_events():
    with receiver_at() as receiver, notifying(receiver, notify_name="gpu-box") as server:
        post_ok(server, {"task_id": "abc", "desc": "train", "n": 1000, "total": 1000,
                         "elapsed": 3723, "status": "close", "meta": {"host": "node7"}})
        message = wait_for(receiver.messages, message="the close message")[0]
        assert message["count"] == 1 and message["server"] == "gpu-box"
        assert message["text"] == ("\u2705 train (task abc) on node7: done 1000/1000 it "
                                   "in 1:02:03")
        assert message["content"] == message["text"]
        event = message["events"][0]
        assert (event["event"], event["task_id"], event["status"]) == ("close", "abc", "close")
        assert (event["n"], event["total"], event["elapsed"], event["duration"]) == (
            1000, 1000, 3723, 3723)
        headers = receiver.attempts[0][2]
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == "progressista/" + progressista.__version__


def test_closes_within_one_window_go_out_as_one_message():
    with receiver_at() as receiver:
        with notifying(receiver, notify_interval=60) as server:
            for index in range(5):
                post_ok(server, {"task_id": f"batch-{index}", "n": 1, "status": "close"})
            wait_for(lambda: len(server.app.notifier.pending_events) == 5,
                     message="five events in the window")
            assert receiver.messages() == []  # the window is still open
        (message,) = receiver.messages()  # stop() sent the window as one message
        assert message["count"] == 5
        assert sorted(event["task_id"] for event in message["events"]) == [
            f"batch-{index}" for index in range(5)]
        assert len(message["text"].splitlines()) == 5


def test_failed_task_event_carries_the_error_text():
    with receiver_at() as receiver, notifying(receiver) as server:
        post_ok(server, {"task_id": "etl", "n": 50, "total": 100, "status": "error",
                         "error": "KeyError: 'date'\n  File \"etl.py\", line 3"})
        (event,) = wait_for(lambda: events_for(receiver, "etl"), message="the error event")
        assert event["event"] == "error"
        assert event["error"] == "KeyError: 'date'\n  File \"etl.py\", line 3"
        assert receiver.messages()[0]["text"] == (
            "\u274c task etl: failed at 50/100 it: KeyError: 'date'")


def test_stale_task_is_notified_and_after_it_comes_back_its_close_too():
    clock = Clock()
    with receiver_at() as receiver, notifying(receiver, clock=clock, stale_seconds=60,
                                              cleanup_interval=0.02) as server:
        post_ok(server, {"task_id": "sim", "n": 500, "total": 1000, "seq": 1})
        clock.offset += 61
        (stale,) = wait_for(lambda: events_for(receiver, "sim"), message="the stale event")
        assert stale["event"] == "stale"
        assert re.search(r"stale, no update for 6\d s at 500/1000 it$",
                         receiver.messages()[0]["text"])
        post_ok(server, {"task_id": "sim", "n": 600, "total": 1000, "seq": 2})  # back
        post_ok(server, {"task_id": "sim", "n": 1000, "total": 1000, "seq": 3,
                         "status": "close"})
        wait_for(lambda: len(events_for(receiver, "sim")) == 2, message="the close event")
        assert [event["event"] for event in events_for(receiver, "sim")] == ["stale", "close"]


def test_notify_on_sends_only_the_chosen_events():
    with receiver_at() as receiver:
        with notifying(receiver, notify_on="error") as server:
            post_ok(server, [{"task_id": "ok", "n": 1, "status": "close"},
                             {"task_id": "bad", "n": 1, "status": "error", "error": "boom"}])
            wait_for(lambda: events_for(receiver, "bad"), message="the error event")
        assert [event["task_id"] for event in receiver.events()] == ["bad"]


def test_task_shorter_than_the_minimum_duration_is_not_notified():
    with receiver_at() as receiver:
        with notifying(receiver, notify_min_duration=60) as server:
            post_ok(server, [{"task_id": "quick", "n": 1, "elapsed": 5, "status": "close"},
                             {"task_id": "long", "n": 1, "elapsed": 120, "status": "close"}])
            wait_for(lambda: events_for(receiver, "long"), message="the long task's close")
        assert [event["task_id"] for event in receiver.events()] == ["long"]


def test_close_sent_again_is_notified_once():
    with receiver_at() as receiver:
        with notifying(receiver) as server:
            closing = {"task_id": "retried", "n": 1, "status": "close", "seq": 7}
            old_client = {"task_id": "no-seq", "n": 1, "status": "close", "timestamp": 5.0}
            post_ok(server, [closing, old_client])
            wait_for(lambda: events_for(receiver, "retried"), message="the first close")
            post_ok(server, [closing, old_client])  # the client's retry of the same updates
            post_ok(server, {"task_id": "after", "n": 1, "status": "close"})
            wait_for(lambda: events_for(receiver, "after"), message="a later close")
        assert sorted(event["task_id"] for event in receiver.events()) == [
            "after", "no-seq", "retried"]


def notification_outcomes(server):
    """progressista_notifications_total from GET /metrics, by outcome."""
    text = http("GET", server.url + "/metrics")[1].decode()
    return {outcome: int(count) for outcome, count in re.findall(
        r'^progressista_notifications_total\{outcome="(\w+)"\} (\d+)$', text, re.M)}


def test_webhook_answering_500_gets_the_message_on_a_retry(quick_retries):
    with receiver_at(statuses=[500]) as receiver, notifying(receiver) as server:
        post_ok(server, {"task_id": "flaky", "n": 1, "status": "close"})
        wait_for(lambda: events_for(receiver, "flaky"), message="the retried message")
        first, second = receiver.attempts
        assert (first[0], second[0]) == (500, 200) and first[1] == second[1]
        wait_for(lambda: notification_outcomes(server) == {"sent": 1, "failed": 0,
                                                            "dropped": 0},
                 message="/metrics to count one message sent")


def test_webhook_answering_429_is_retried_after_its_retry_after(monkeypatch):
    # A backoff of its own far past the test's deadline: only Retry-After (0 s) gets the
    # retry in time.
    monkeypatch.setattr(progressista, "NOTIFY_RETRY_INITIAL_S", 30.0)
    with receiver_at(statuses=[429], headers={"Retry-After": "0"}) as receiver, \
            notifying(receiver) as server:
        post_ok(server, {"task_id": "limited", "n": 1, "status": "close"})
        wait_for(lambda: events_for(receiver, "limited"), message="the retried message")
        assert [attempt[0] for attempt in receiver.attempts] == [429, 200]


def test_webhook_answering_404_is_not_retried(quick_retries):
    with receiver_at(statuses=[404] * 10) as receiver:
        with notifying(receiver) as server:
            post_ok(server, {"task_id": "gone-1", "n": 1, "status": "close"})
            wait_for(lambda: receiver.arrived == 1, message="the first POST")
            post_ok(server, {"task_id": "gone-2", "n": 1, "status": "close"})
            wait_for(lambda: receiver.arrived == 2, message="the second POST")
            wait_for(lambda: notification_outcomes(server) == {"sent": 0, "failed": 2,
                                                                "dropped": 0},
                     message="/metrics to count both as failed")
        # One thread sends in order: a retry of the first would have come second.
        sent = [attempt[1]["events"][0]["task_id"] for attempt in receiver.attempts]
        assert sent == ["gone-1", "gone-2"]


def test_hung_webhook_leaves_ingest_and_reads_unaffected():
    with receiver_at(hold=True) as receiver, notifying(receiver) as server:
        try:
            post_ok(server, {"task_id": "held", "n": 1, "status": "close"})
            wait_for(lambda: receiver.arrived == 1, message="the webhook to be held")
            for n in range(1, 4):
                assert post_ok(server, {"task_id": "alive", "n": n})["accepted"] == 1
            post_ok(server, {"task_id": "also-closed", "n": 1, "status": "close"})
            status, body, _ = http("GET", server.url + "/tasks")
            assert status == 200
            assert body["tasks"]["alive"]["n"] == 3
            assert body["tasks"]["also-closed"]["status"] == "close"
            assert receiver.messages() == []
        finally:
            receiver.release.set()
        wait_for(lambda: events_for(receiver, "also-closed"), message="the queued message")
        assert [event["task_id"] for event in receiver.events()] == ["held", "also-closed"]


def test_stop_sends_the_pending_window():
    with receiver_at() as receiver:
        with notifying(receiver, notify_interval=3600) as server:
            post_ok(server, {"task_id": "last-words", "n": 1, "status": "close"})
            wait_for(lambda: server.app.notifier.pending_events, message="the event")
        assert [event["task_id"] for event in receiver.events()] == ["last-words"]


def test_stop_does_not_wait_for_a_hung_webhook_and_says_what_it_misses(monkeypatch, caplog):
    monkeypatch.setattr(progressista, "NOTIFY_SHUTDOWN_S", 0.2)
    with receiver_at(hold=True) as receiver:
        try:
            with notifying(receiver) as server:
                post_ok(server, {"task_id": "stuck", "n": 1, "status": "close"})
                wait_for(lambda: receiver.arrived == 1, message="the webhook to be held")
                stopping = time.monotonic()
            # The webhook holds the POST for 30 s; stop() gives it 0.2 s, then goes on.
            assert time.monotonic() - stopping < 3
            assert server.app.server is None
        finally:
            receiver.release.set()
    assert any("not delivered: it did not answer within 0.2 s" in record.getMessage()
               and "SECRET-PATH" not in record.getMessage() for record in caplog.records)


def test_events_of_one_request_keep_the_order_the_sender_gave_them():
    ids = [f"bulk{n}" for n in range(1, 26)]
    with receiver_at() as receiver, notifying(receiver) as server:
        post_ok(server, [{"task_id": task_id, "status": "close"} for task_id in ids])
        message = wait_for(receiver.messages, message="the batch's message")[0]
    assert [event["task_id"] for event in message["events"]] == ids


def test_no_notifier_without_a_webhook():
    with running_server() as server:
        assert server.app.notifier is None


def test_tasks_closed_or_stale_before_a_restart_are_not_notified_again(tmp_path):
    store = "sqlite://" + str(tmp_path / "tasks.db")
    two_minutes_ago = Clock()
    two_minutes_ago.offset = -120
    with running_server(store=store, clock=two_minutes_ago) as server:
        post_ok(server, [{"task_id": "old", "n": 1, "status": "close"},
                         {"task_id": "silent", "n": 1}])  # stale at the restart's first sweep
    with receiver_at() as receiver:
        with notifying(receiver, store=store) as server:
            post_ok(server, {"task_id": "new", "n": 1, "status": "close"})
            wait_for(lambda: events_for(receiver, "new"), message="the new close")
        assert [event["task_id"] for event in receiver.events()] == ["new"]


def test_with_redis_one_message_comes_from_the_sweeper_only(redis_server):
    with receiver_at() as receiver:
        with notifying(receiver, store=redis_server.url) as one, \
                notifying(receiver, store=redis_server.url) as two:
            assert one.app.store.is_sweeper != two.app.store.is_sweeper
            post_ok(one, {"task_id": "shared-1", "n": 1, "status": "close"})
            post_ok(two, {"task_id": "shared-2", "n": 1, "status": "close"})
            wait_for(lambda: events_for(receiver, "shared-1")
                     and events_for(receiver, "shared-2"), message="both closes")
        # Both servers stopped and sent all they had: still one event each.
        assert sorted(event["task_id"] for event in receiver.events()) == [
            "shared-1", "shared-2"]


# --- Runs: one line per run that ends -------------------------------------------------
# The server's clock is a FakeClock and its sweep (which finds the runs that ended) runs
# only when the test calls it; `told()` runs the broadcast on the server's loop, so that
# every change posted so far has been seen by the notifier before the test looks.


def rank(task_id, host, **fields):
    return {"task_id": task_id, "run": "exp-142", "desc": "train", "total": 10,
            "meta": {"host": host}, **fields}


def told(server):
    """The events of the open window (tests that read it keep it open: notify_interval)."""
    on_server_loop(server, server.app.broadcast)
    return list(server.app.notifier.pending_events)


def sweep(server):
    """One sweep on the server's loop, waited for (Redis's is a coroutine)."""
    async def swept():
        await progressista.resolved(server.app.sweep())
    asyncio.run_coroutine_threadsafe(swept(), server.loop).result(5)


def run_server(receiver, clock, **settings):
    return notifying(receiver, clock=clock, run_settle_seconds=10, cleanup_interval=3600,
                     **settings)


def test_run_whose_bars_end_one_after_another_is_one_line_after_the_settle_time():
    clock = FakeClock()
    with receiver_at() as receiver:
        with run_server(receiver, clock) as server:
            post_ok(server, [rank("r0", "gpu-01", n=0), rank("r1", "gpu-02", n=0)])
            clock.now += 3600
            post_ok(server, rank("r0", "gpu-01", n=10, elapsed=3600, status="close"))
            sweep(server)
            clock.now += 123
            post_ok(server, rank("r1", "gpu-02", n=10, elapsed=3723, status="close"))
            clock.now += 9  # all ended, not yet settled
            sweep(server)
            assert told(server) == []  # no line per bar, and the run has not settled
            clock.now += 1
            sweep(server)
            (message,) = wait_for(receiver.messages, message="the run's message")
            sweep(server)  # its end is news once
            clock.now += 60
            sweep(server)
            assert told(server) == []
        assert receiver.messages() == [message]
    assert message["text"] == "\u2705 exp-142 on gpu-01, gpu-02: 2 bars done in 1:02:03"
    (event,) = message["events"]
    assert (event["event"], event["run"], event["status"], event["tasks"]) == (
        "run", "exp-142", "close", 2)
    assert (event["counts"], event["failed"], event["duration"]) == ({"close": 2}, 0, 3723)
    assert "first_error" not in event


def test_failed_rank_is_its_own_line_at_once_and_named_in_the_runs_line():
    clock = FakeClock()
    traceback = "Traceback (most recent call last):\n  File \"train.py\"\nKeyError: 'date'"
    with receiver_at() as receiver:
        with run_server(receiver, clock) as server:
            post_ok(server, [rank("r0", "gpu-01", n=0, run_name="resnet"),
                             rank("r1", "gpu-02", n=0, desc="rank1")])
            clock.now += 65
            post_ok(server, rank("r1", "gpu-02", n=4, desc="rank1", status="error",
                                 error=traceback))
            post_ok(server, rank("r0", "gpu-01", n=10, status="close"))
            (first,) = wait_for(receiver.messages, message="the failed bar's message")
            clock.now += 10
            sweep(server)
            wait_for(lambda: len(receiver.messages()) == 2, message="the run's message")
        second = receiver.messages()[1]
    assert first["text"] == "\u274c rank1 (task r1) on gpu-02: failed at 4/10 it: KeyError: 'date'"
    assert [event["task_id"] for event in first["events"]] == ["r1"]  # r0's close: no line
    assert second["text"] == (
        "\u274c resnet (run exp-142) on gpu-01, gpu-02: 1 of 2 bars failed in 01:05; "
        "first: rank1 (task r1) on gpu-02: KeyError: 'date'")
    (event,) = second["events"]
    assert (event["status"], event["failed"], event["counts"]) == (
        "error", 1, {"close": 1, "error": 1})
    assert event["first_error"]["task_id"] == "r1"
    assert event["first_error"]["error"] == traceback


def test_bars_without_a_run_still_notify_each_close():
    clock = FakeClock()
    with receiver_at() as receiver, run_server(receiver, clock, notify_interval=60) as server:
        post_ok(server, [{"task_id": "lone", "n": 1, "status": "close"},
                         rank("in-run", "gpu-01", n=10, status="close")])
        assert [event["task_id"] for event in told(server)] == ["lone"]


def test_notify_on_error_tells_a_failed_run_and_not_a_closed_one():
    clock = FakeClock()
    with receiver_at() as receiver:
        with run_server(receiver, clock, notify_on="error", notify_interval=60) as server:
            post_ok(server, [{"task_id": "a", "run": "fine", "n": 1, "status": "close"},
                             {"task_id": "b", "run": "broken", "status": "error",
                              "error": "boom"}])
            assert [event["task_id"] for event in told(server)] == ["b"]
            clock.now += 10
            sweep(server)
            assert [(event["event"], event.get("run")) for event in told(server)] == [
                ("error", "broken"), ("run", "broken")]


def test_run_shorter_than_the_minimum_duration_is_not_told():
    clock = FakeClock()
    with receiver_at() as receiver:
        with run_server(receiver, clock, notify_min_duration=60,
                        notify_interval=60) as server:
            post_ok(server, [{"task_id": "q", "run": "quick", "status": "close", "elapsed": 5},
                             {"task_id": "l1", "run": "long", "status": "close",
                              "elapsed": 30},
                             {"task_id": "l2", "run": "long", "status": "close"}])
            clock.now += 50
            post_ok(server, {"task_id": "l2", "run": "long", "status": "close",
                             "elapsed": 50})  # started 50 s ago: the run ran 50 + ...
            clock.now += 10
            post_ok(server, {"task_id": "l3", "run": "long", "status": "close",
                             "elapsed": 1})  # ... till now: 60 s in all
            clock.now += 10
            sweep(server)
            assert [event.get("run") for event in told(server)] == ["long"]


def test_run_that_ended_before_a_restart_is_not_told_again(tmp_path):
    store = "sqlite://" + str(tmp_path / "tasks.db")
    two_minutes_ago = Clock()
    two_minutes_ago.offset = -120
    with running_server(store=store, clock=two_minutes_ago) as server:
        post_ok(server, [{"task_id": "a", "run": "old-run", "status": "close"},
                         {"task_id": "b", "run": "old-run", "status": "error", "error": "x"}])
    with receiver_at() as receiver:
        with notifying(receiver, store=store, cleanup_interval=0.02) as server:
            post_ok(server, {"task_id": "new", "n": 1, "status": "close"})
            wait_for(lambda: events_for(receiver, "new"), message="the new close")
            sweep(server)  # a sweep after the restart's first: the old run stays told
            post_ok(server, {"task_id": "newer", "n": 1, "status": "close"})
            wait_for(lambda: events_for(receiver, "newer"), message="the newer close")
        assert [event.get("task_id") for event in receiver.events()] == ["new", "newer"]


def test_with_redis_a_runs_end_comes_from_the_sweeper_only(redis_server):
    clock = FakeClock()
    with receiver_at() as receiver:
        with run_server(receiver, clock, store=redis_server.url) as one, \
                run_server(receiver, clock, store=redis_server.url) as two:
            assert one.app.store.is_sweeper != two.app.store.is_sweeper
            post_ok(one, {"task_id": "on-one", "run": "shared", "n": 1, "status": "close"})
            post_ok(two, {"task_id": "on-two", "run": "shared", "n": 1, "status": "close"})
            clock.now += 10
            for server in (one, two):
                wait_for(lambda: on_server_loop(server, lambda: server.app.runs.summary(
                    "shared", clock()))["tasks"] == 2, message="both bars seen by each server")
                sweep(server)
            wait_for(receiver.messages, message="the run's message")
        # Both servers stopped and sent all they had: one event.
        assert [event["run"] for event in receiver.events()] == ["shared"]


# --- The command line --------------------------------------------------------------------


def test_serve_announces_a_close_that_came_just_before_sigterm_and_logs_no_secret():
    with receiver_at() as receiver:
        with cli_server("--host", "127.0.0.1", "--port", "0", "--notify", receiver.url,
                        "--notify-interval", "3600") as server:
            post_ok(server, {"task_id": "at-exit", "n": 1, "status": "close"})
            assert server.stop(signal.SIGTERM, timeout=15) == 0
        log = server.stderr
        assert [event["task_id"] for event in receiver.events()] == ["at-exit"]
        assert receiver.base_url + "/***" in log  # http://127.0.0.1:PORT/***
        assert "SECRET-PATH" not in log


def test_show_config_masks_the_webhook_urls():
    result = run_cli("show-config", "--notify", SLACK_URL,
                     "--notify", "http://user:pw@127.0.0.1:9000/hook?token=t0k3n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["notify"] == ["https://hooks.slack.com/***",
                                                   "http://127.0.0.1:9000/***"]
    for secret in ("XXXXSECRET", "t0k3n", "pw"):
        assert secret not in result.stdout


def test_notify_variable_takes_comma_separated_urls_and_the_other_settings():
    result = run_cli("show-config", PROGRESSISTA_NOTIFY=f"{SLACK_URL}, https://b.example/x",
                     PROGRESSISTA_NOTIFY_ON="close, stale", PROGRESSISTA_NOTIFY_INTERVAL="30",
                     PROGRESSISTA_NOTIFY_MIN_DURATION="600", PROGRESSISTA_NOTIFY_NAME="lab")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["notify"] == ["https://hooks.slack.com/***", "https://b.example/***"]
    assert (config["notify_on"], config["notify_interval"], config["notify_min_duration"],
            config["notify_name"]) == (["close", "stale"], 30.0, 600.0, "lab")


@pytest.mark.parametrize("args, env", [
    (("--notify", "ftp://files.example/XXXXSECRET"), {}),
    (("--notify", "hooks.slack.com/services/XXXXSECRET"), {}),
    ((), {"PROGRESSISTA_NOTIFY": SLACK_URL + ",mailto:XXXXSECRET@example.com"}),
])
def test_notify_url_that_is_not_http_is_a_clear_error_that_keeps_the_secret(args, env):
    result = run_cli("show-config", *args, **env)
    assert result.returncode == 2
    assert "is not a webhook URL: give http://host/... or https://host/..." in result.stderr
    assert "XXXXSECRET" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hooks/XXXX SECRET",
                                 "http://127.0.0.1:9/hooks/XXXXSECRET\x01",
                                 "http://127.0.0.1:9/hooks/XXXXSECRET\u00e9"])
def test_notify_url_urllib_cannot_send_is_refused_at_startup_not_at_the_first_event(url):
    result = run_cli("show-config", PROGRESSISTA_NOTIFY=url)
    assert result.returncode == 2
    assert "percent-encode it" in result.stderr and "XXXX" not in result.stderr


def test_webhook_url_with_user_and_password_is_posted_with_basic_auth():
    with receiver_at() as receiver:
        url = receiver.url.replace("http://", "http://bot:p%40ss@")
        with running_server(notify=[url], notify_interval=0.05,
                            broadcast_interval=0.02) as server:
            post_ok(server, {"task_id": "authed", "status": "close"})
            wait_for(lambda: events_for(receiver, "authed"), message="the message")
        headers = receiver.attempts[0][2]
        assert headers["Authorization"] == "Basic " + base64.b64encode(b"bot:p@ss").decode()


def test_a_failure_quoting_the_url_is_logged_without_its_secret(monkeypatch, caplog):
    monkeypatch.setattr(progressista, "NOTIFY_ATTEMPTS", 1)

    def refusing(url, body, timeout_s, headers):
        raise OSError(f"cannot open {url} (path /hooks/T0/XXXXSECRET)")

    sender = progressista.WebhookSender("https://hooks.example/hooks/T0/XXXXSECRET",
                                        post=refusing)
    assert sender.deliver({"text": "x"}) is False
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "https://hooks.example/***" in logged and "XXXXSECRET" not in logged


def test_notify_on_is_not_case_sensitive():
    result = run_cli("show-config", "--notify-on", "CLOSE, Error")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["notify_on"] == ["close", "error"]


@pytest.mark.parametrize("args, env", [
    (("--notify-on", "close,finish"), {}),
    ((), {"PROGRESSISTA_NOTIFY_ON": "finish"}),
])
def test_notify_on_with_an_unknown_event_is_a_clear_error(args, env):
    result = run_cli("show-config", *args, **env)
    assert result.returncode == 2
    assert "unknown event 'finish': name one or more of close, error, stale" in result.stderr


def test_create_app_checks_the_notify_settings_too():
    with pytest.raises(ValueError, match="is not a webhook URL"):
        progressista.create_app(notify="ftp://example/hook")
    with pytest.raises(ValueError, match="unknown event 'done'"):
        progressista.create_app(notify="http://example/hook", notify_on=("close", "done"))


# --- Pure: events, message text --------------------------------------------------------


def make_task(task_id="t", now=1000.0, **fields):
    task = progressista.Task(task_id, now - fields.pop("ran_s", 0.0))
    for name, value in fields.items():
        setattr(task, name, value)
    task.updated_at = now
    return task


def event_of(kind, now=1000.0, **fields):
    return progressista.notify_event(make_task(**fields), kind, now)


def test_event_line_reads_as_a_sentence_per_kind():
    line = progressista.event_line
    assert line(event_of("close", desc="train", task_id="abc", n=1000, total=1000,
                         elapsed=3723)) == "\u2705 train (task abc): done 1000/1000 it in 1:02:03"
    assert line(event_of("error", task_id="x", desc="etl", n=50, total=100, status="error",
                         error="ValueError: bad row\n  File x")) == (
        "\u274c etl (task x): failed at 50/100 it: ValueError: bad row")
    stale = progressista.notify_event(make_task("y", now=1000.0, desc="sim", n=500,
                                                total=1000), "stale", 1060.0)
    assert line(stale) == "\u26a0\ufe0f sim (task y): stale, no update for 60 s at 500/1000 it"


def test_event_line_scales_units_and_keeps_one_line():
    event = event_of("close", desc="copy\nfiles", n=1.5e9, total=2e9, unit="B",
                     unit_scale=True, unit_divisor=1024, ran_s=65)
    assert progressista.event_line(event) == (
        "\u2705 copy files (task t): done 1.40G/1.86G B in 01:05")


def test_event_line_of_a_raw_traceback_takes_its_last_line():
    event = event_of("error", error="Traceback (most recent call last):\n  File x\n"
                                    "OSError: disk full\n")
    assert progressista.event_line(event).endswith("failed at 0 it: OSError: disk full")


def test_duration_is_the_senders_elapsed_else_the_servers_times():
    assert event_of("close", elapsed=42.0, ran_s=5)["duration"] == 42.0
    assert event_of("close", ran_s=5)["duration"] == 5.0


def test_message_of_many_events_lists_twenty_lines_then_how_many_more():
    events = [event_of("close", task_id=f"t{index}") for index in range(25)]
    message = progressista.notify_message(events, "srv", 1000.0)
    lines = message["text"].splitlines()
    assert len(lines) == 21 and lines[-1] == "\u2026 and 5 more"
    assert message["count"] == 25 and len(message["events"]) == 25


def test_message_content_fits_discords_limit_in_whole_lines():
    events = [event_of("error", task_id=f"t{index}", desc="d" * 100, error="e" * 300)
              for index in range(20)]
    message = progressista.notify_message(events, "srv", 1000.0)
    content = message["content"]
    assert len(content) <= progressista.DISCORD_MAX_CHARS
    lines = content.splitlines()
    assert lines[-1] == f"\u2026 and {21 - len(lines)} more"
    assert all(line == progressista.event_line(events[index])
               for index, line in enumerate(lines[:-1]))


def test_message_text_cannot_mention_or_link_on_slack_or_discord():
    message = progressista.notify_message(
        [event_of("close", desc="<!channel> @everyone <http://evil|click> & co")], "srv", 1.0)
    assert "<" not in message["text"] and "&lt;!channel&gt;" in message["text"]
    assert "&amp; co" in message["text"]
    assert message["allowed_mentions"] == {"parse": []}


# --- Pure: the Notifier ----------------------------------------------------------------


def notifier(**kwargs):
    kwargs.setdefault("interval_s", 10.0)
    return progressista.Notifier(server="srv", clock=FakeClock(0.0), **kwargs)


def store_with(*tasks):
    store = progressista.MemoryStore()
    for task in tasks:
        store.by_id[task.task_id] = task
    return store


STALE_AFTER_60_S = progressista.Thresholds(stale_seconds=60.0)


def observed(notice, store, ids, removed=(), now=1000.0, thresholds=STALE_AFTER_60_S):
    before = len(notice.pending_events)
    notice.observe(ids, removed, store, now, thresholds)
    return [event["event"] for event in notice.pending_events[before:]]


def test_observe_makes_one_event_per_change_of_notified_status():
    notice = notifier()
    task = make_task("a", n=1)
    store = store_with(task)
    assert observed(notice, store, ["a"]) == []  # running: nothing to say
    task.status = "close"
    assert observed(notice, store, ["a"]) == ["close"]
    assert observed(notice, store, ["a"]) == []  # the same close again


def test_observe_reads_a_silent_running_task_as_stale_and_forgets_it_when_it_runs():
    notice = notifier()
    task = make_task("a", now=1000.0)
    store = store_with(task)
    assert observed(notice, store, ["a"], now=1061.0) == ["stale"]
    task.updated_at = 1062.0  # an update: running again
    assert observed(notice, store, ["a"], now=1062.0) == []
    assert observed(notice, store, ["a"], now=1130.0) == ["stale"]  # stale again is news


def test_observe_forgets_removed_tasks():
    notice = notifier()
    store = store_with(make_task("a", status="close"))
    observed(notice, store, ["a"])
    notice.observe([], ["a"], store, 1000.0, STALE_AFTER_60_S)
    assert "a" not in notice.notified_by_id


def test_observe_filters_by_event_and_by_duration():
    notice = notifier(notify_on=("error",), min_duration_s=10.0)
    store = store_with(make_task("closed", status="close", ran_s=60),
                       make_task("short", status="error", ran_s=5),
                       make_task("short-by-elapsed", status="error", ran_s=60, elapsed=3.0),
                       make_task("long", status="error", ran_s=60))
    notice.observe(list(store.by_id), (), store, 1000.0, STALE_AFTER_60_S)
    assert [event["task_id"] for event in notice.pending_events] == ["long"]


def test_observe_on_a_server_that_is_not_the_sweeper_tracks_but_sends_nothing():
    notice = notifier()
    task = make_task("a", status="close")
    store = store_with(task)
    store.is_sweeper = False
    assert observed(notice, store, ["a"]) == []
    store.is_sweeper = True  # it takes the lease: what it saw is not sent again
    assert observed(notice, store, ["a"]) == []


def test_seed_counts_what_the_store_holds_as_already_notified():
    notice = notifier()
    store = store_with(make_task("done", status="close"), make_task("silent", now=900.0),
                       make_task("live", now=1000.0))
    notice.seed(store.tasks(), 1000.0, STALE_AFTER_60_S)
    assert notice.notified_by_id == {"done": "close", "silent": "stale"}
    assert observed(notice, store, list(store.by_id)) == []


def test_window_gives_one_message_after_its_interval_or_at_a_flush():
    notice = notifier(interval_s=10.0)
    store = store_with(make_task("a", status="close"), make_task("b", status="close"))
    notice.observe(["a"], (), store, 1000.0, STALE_AFTER_60_S)
    notice.clock.now = 5.0
    notice.observe(["b"], (), store, 1005.0, STALE_AFTER_60_S)
    assert notice.take_message(1005.0) is None
    notice.clock.now = 10.0
    message = notice.take_message(1010.0)
    assert [event["task_id"] for event in message["events"]] == ["a", "b"]
    assert notice.take_message(1010.0) is None and notice.take_message(1010, True) is None
    store.by_id["c"] = make_task("c", status="error")
    notice.observe(["c"], (), store, 1011.0, STALE_AFTER_60_S)
    assert notice.take_message(1011.0, flush=True)["count"] == 1


def test_window_lists_at_most_max_events_and_counts_the_rest(monkeypatch):
    monkeypatch.setattr(progressista, "NOTIFY_MAX_EVENTS", 3)
    notice = notifier()
    store = store_with(*[make_task(f"t{index}", status="close") for index in range(5)])
    notice.observe(list(store.by_id), (), store, 1000.0, STALE_AFTER_60_S)
    message = notice.take_message(1000.0, flush=True)
    assert (message["count"], len(message["events"])) == (5, 3)
    assert message["text"].splitlines()[-1] == "\u2026 and 2 more"


# --- Pure: sending ---------------------------------------------------------------------


def test_retry_delay_doubles_honours_retry_after_and_is_capped():
    delays = [progressista.retry_delay(attempt) for attempt in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert progressista.retry_delay(1, retry_after_s=7.0) == 7.0
    assert progressista.retry_delay(1, retry_after_s=3600.0) == progressista.NOTIFY_RETRY_MAX_S


def test_only_timeouts_rate_limits_and_server_errors_are_retried():
    assert [status for status in (200, 301, 400, 404, 408, 410, 429, 500, 503)
            if progressista.retried(status)] == [408, 429, 500, 503]


def test_full_sender_queue_drops_the_oldest_message():
    sender = progressista.WebhookSender("http://127.0.0.1:9/hook")  # never started
    for index in range(progressista.NOTIFY_QUEUE_MESSAGES + 5):
        sender.put({"index": index})
    assert len(sender.queue) == progressista.NOTIFY_QUEUE_MESSAGES
    assert sender.queue[0] == {"index": 5} and sender.dropped == 5


def test_sender_gives_up_after_its_attempts_and_goes_on_with_the_next(monkeypatch):
    monkeypatch.setattr(progressista, "NOTIFY_RETRY_INITIAL_S", 0.0)
    calls = []

    def failing_post(url, body, timeout_s, headers):
        calls.append(json.loads(body)["index"])
        if calls[-1] == 0:
            raise ConnectionRefusedError("refused")
        return 200, "ok", None

    sender = progressista.WebhookSender("http://127.0.0.1:9/hook", post=failing_post)
    assert sender.deliver({"index": 0}) is False
    assert sender.deliver({"index": 1}) is True
    assert calls == [0] * progressista.NOTIFY_ATTEMPTS + [1]
