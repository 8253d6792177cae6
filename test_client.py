"""Tests of progressista_client.py: real server on an ephemeral port, real tqdm, real HTTP.

The features added with protocol v2 have files of their own: test_client_live.py,
test_client_endings.py, test_client_runs.py, test_client_transport.py.

Timing is never synchronised by sleeping: `wait_for` polls a condition with a deadline,
and the Sender's backoff and heartbeat are driven by an injected clock where the network
is not the point.
"""

import contextlib
import datetime
import io
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import progressista_client as pc
from conftest import (FakeClock, QuietHandler, free_port, http, http_server_thread,
                      running_server, send_body, wait_for)

ROOT = os.path.dirname(os.path.abspath(__file__))
FAST_TIMEOUT_S = 0.3
SUBPROCESS_TIMEOUT_S = 30


# --- Helpers and fixtures ---

class RecordingOpener:
    """The real transport (one kept-alive connection per server), counting the requests."""

    def __init__(self):
        self.calls = 0
        self.post = pc._PersistentPoster()

    def __call__(self, url, body, headers, timeout):
        self.calls += 1
        return self.post(url, body, headers, timeout)


@pytest.fixture(autouse=True)
def sender(monkeypatch):
    """A fresh shared sender per test (fast backoff), and no PROGRESSISTA_* from outside."""
    for name in list(os.environ):
        if name.startswith("PROGRESSISTA_") or name in (
                "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "POD_NAME",
                "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(name)
    opener = RecordingOpener()
    fresh = pc.Sender(opener=opener, backoff_initial_s=0.05, backoff_max_s=0.2)
    monkeypatch.setattr(pc, "_sender", fresh)
    yield fresh
    fresh.stop()
    opener.post.close()


@pytest.fixture
def client_log(caplog):
    caplog.set_level(logging.INFO, logger="progressista.client")
    return caplog


def bar(server_url, **kwargs):
    """A remote bar drawing to a throwaway file, refreshing on every update."""
    kwargs.setdefault("file", io.StringIO())
    kwargs.setdefault("mininterval", 0)
    kwargs.setdefault("push_every", 0)
    return pc.tqdm(server_url=server_url, **kwargs)


def tasks(server):
    status, body, _ = http("GET", server.url + "/tasks")
    assert status == 200, body
    return body["tasks"]


def task(server, task_id, headers=None):
    status, body, _ = http("GET", server.url + "/tasks/" + task_id, headers=headers)
    return body if status == 200 else None


def warnings_in(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def run_python(code, *args, env=None, timeout=SUBPROCESS_TIMEOUT_S, cwd=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)] + list(args),
                          env=full_env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def run_cli(*args, env=None, timeout=SUBPROCESS_TIMEOUT_S, cwd=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "progressista.py")] + list(args),
                          env=full_env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


# --- A bar's life on a real server ---

def test_a_bar_appears_moves_and_closes_with_n_equal_total(server):
    remote = bar(server.url, total=50, desc="train")
    wait_for(lambda: task(server, remote.task_id), message="the bar to appear")
    remote.update(20)
    moved = wait_for(lambda: (task(server, remote.task_id) or {}).get("n") == 20 and
                     task(server, remote.task_id))
    assert moved["status"] == "running" and moved["desc"] == "train" and moved["total"] == 50
    remote.update(30)
    remote.close()
    final = wait_for(lambda: task(server, remote.task_id)["status"] == "close" and
                     task(server, remote.task_id))
    assert final["n"] == 50 == final["total"]
    assert final["unit"] == "it" and final["elapsed"] >= 0 and final["seq"] > moved["seq"]


def test_trange_sends_a_closed_bar_that_reached_its_total(server):
    loop = pc.trange(7, server_url=server.url, file=io.StringIO(), desc="epochs")
    for _ in loop:
        pass
    final = wait_for(lambda: (task(server, loop.task_id) or {}).get("status") == "close" and
                     task(server, loop.task_id))
    assert (final["n"], final["total"], final["desc"]) == (7, 7, "epochs")


def test_postfix_unit_and_scale_are_sent_as_tqdm_has_them(server):
    remote = bar(server.url, total=2048, unit="B", unit_scale=True, unit_divisor=1024)
    remote.set_postfix(loss=0.5)
    remote.set_description("copy")
    remote.close()
    final = wait_for(lambda: (task(server, remote.task_id) or {}).get("status") == "close" and
                     task(server, remote.task_id))
    assert (final["unit"], final["unit_scale"], final["unit_divisor"]) == ("B", True, 1024)
    assert final["postfix"] == "loss=0.5" and final["desc"] == "copy"


def test_a_disabled_bar_is_neither_drawn_nor_sent(server, sender):
    quiet = pc.tqdm(range(3), disable=True, server_url=server.url)
    assert list(quiet) == [0, 1, 2]
    assert quiet.task_id is None and sender.flush(1) and tasks(server) == {}


def test_nested_bars_are_sent_as_two_tasks(server):
    outer = bar(server.url, total=2, desc="outer")
    for _ in range(2):
        for _ in bar(server.url, iterable=range(3), desc="inner", leave=False):
            pass
        outer.update()
    outer.close()
    wait_for(lambda: sorted((t["desc"], t["status"]) for t in tasks(server).values()) ==
             [("inner", "close"), ("inner", "close"), ("outer", "close")])


# --- meta, tokens, URLs ---

def test_meta_has_host_and_pid_and_the_users_keys_win(server):
    remote = bar(server.url, meta={"run": "r7", "host": "renamed"})
    remote.close()
    final = wait_for(lambda: (task(server, remote.task_id) or {}).get("status") == "close" and
                     task(server, remote.task_id))
    assert final["meta"] == {"host": "renamed", "pid": os.getpid(), "run": "r7"}


def test_a_slurm_job_id_in_the_environment_is_attached_to_the_bar(server, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    remote = bar(server.url)
    remote.close()
    final = wait_for(lambda: (task(server, remote.task_id) or {}).get("status") == "close" and
                     task(server, remote.task_id))
    assert final["meta"]["job_id"] == "4242" and final["meta"]["scheduler"] == "slurm"


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "11", "SLURM_ARRAY_TASK_ID": "3"},
     {"scheduler": "slurm", "job_id": "11", "array_index": "3"}),
    ({"PBS_JOBID": "12.pbs"}, {"scheduler": "pbs", "job_id": "12.pbs"}),
    ({"LSB_JOBID": "13"}, {"scheduler": "lsf", "job_id": "13"}),
    ({"JOB_ID": "14", "SGE_TASK_ID": "undefined"}, {"scheduler": "sge", "job_id": "14"}),
    ({"SLURM_JOB_ID": "11", "SLURM_ARRAY_TASK_ID": "0"},
     {"scheduler": "slurm", "job_id": "11", "array_index": "0"}),  # the first of --array=0-9
    ({"PBS_JOBID": "12[0]", "PBS_ARRAYID": "0"},
     {"scheduler": "pbs", "job_id": "12[0]", "array_index": "0"}),
    ({"PBS_JOBID": "12[5]", "PBS_ARRAY_INDEX": "5"},  # PBS Pro
     {"scheduler": "pbs", "job_id": "12[5]", "array_index": "5"}),
    ({"LSB_JOBID": "13", "LSB_JOBINDEX": "0"}, {"scheduler": "lsf", "job_id": "13"}),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "trainer-0"}, {"pod": "trainer-0"}),
    ({"POD_NAME": "etl-7"}, {"pod": "etl-7"}),
    ({"HOSTNAME": "laptop"}, {}),
])
def test_default_meta_names_the_schedulers_job(environ, expected):
    meta = pc.default_meta(environ)
    assert meta.pop("pid") == os.getpid() and meta.pop("host")
    assert meta == expected


def test_token_given_as_argument_is_sent_as_bearer():
    with running_server(api_tokens=["s3cret"]) as server:
        remote = bar(server.url, token="s3cret")
        remote.close()
        auth = {"Authorization": "Bearer s3cret"}
        wait_for(lambda: (task(server, remote.task_id, auth) or {}).get("status") == "close")


def test_token_from_the_environment_is_sent_as_bearer(monkeypatch):
    monkeypatch.setenv("PROGRESSISTA_API_TOKEN", "from-env")
    with running_server(api_tokens=["from-env"]) as server:
        remote = bar(server.url)
        remote.close()
        auth = {"Authorization": "Bearer from-env"}
        wait_for(lambda: (task(server, remote.task_id, auth) or {}).get("status") == "close")


def test_a_wrong_token_is_warned_about_once_and_never_raises(client_log):
    with running_server(api_tokens=["right"]) as server:
        for _ in range(3):
            remote = bar(server.url, token="wrong", total=3)
            remote.update(3)
            remote.close()
        pc.flush(2)
        refused = [r for r in warnings_in(client_log) if "401" in r.getMessage()]
        assert len(refused) == 1


def test_flush_is_false_when_the_server_refused_updates_for_good(sender):
    with running_server(api_tokens=["right"]) as server:
        pc.send_update({"task_id": "x", "n": 1, "status": "close"}, server_url=server.url,
                       token="wrong")
        assert pc.flush(2) is False  # refused is not delivered
        assert "HTTP 401" in sender.last_refusal
        pc.send_update({"task_id": "y", "n": 1, "status": "close"}, server_url=server.url,
                       token="right")
        assert pc.flush(2) is True  # each flush() answers for what came since the last one


def test_send_update_with_a_malformed_url_warns_and_never_raises(client_log):
    pc.send_update({"task_id": "x", "n": 1}, server_url="127.0.0.1:9")
    assert len(warnings_in(client_log)) == 1 and pc.flush(1)


def test_send_update_without_a_task_id_warns_once_and_never_raises(client_log, monkeypatch):
    monkeypatch.setattr(pc, "_warned", set())  # warnings are once per process
    for _ in range(2):
        pc.send_update({"n": 1})
    assert len(warnings_in(client_log)) == 1 and pc.flush(1)


def test_send_update_with_a_value_json_cannot_encode_drops_it_with_one_warning(
        server, client_log, monkeypatch):
    monkeypatch.setattr(pc, "_warned", set())
    for task_id in ("dated", "dated again"):
        pc.send_update({"task_id": task_id, "n": 1, "started": datetime.datetime.now()},
                       server_url=server.url)
    pc.send_update({"task_id": "plain", "n": 2, "status": "close"}, server_url=server.url)
    assert pc.flush(2) is False  # not everything was delivered
    assert task(server, "plain")["status"] == "close" and task(server, "dated") is None
    assert len(warnings_in(client_log)) == 1


@pytest.mark.parametrize("suffix", ["", "/", "/progress"])
def test_both_url_forms_reach_the_server(server, suffix):
    remote = bar(server.url + suffix)
    remote.close()
    wait_for(lambda: (task(server, remote.task_id) or {}).get("status") == "close")


def test_server_url_comes_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("PROGRESSISTA_SERVER_URL", server.url)
    remote = pc.tqdm(total=1, file=io.StringIO())
    remote.close()
    wait_for(lambda: (task(server, remote.task_id) or {}).get("status") == "close")


@pytest.mark.parametrize("given, expected", [
    ("http://h:8000", "http://h:8000/progress"),
    ("http://h:8000/", "http://h:8000/progress"),
    ("http://h:8000/progress", "http://h:8000/progress"),
    ("https://h/prefix/", "https://h/prefix/progress"),
    ("http://h:1/progress/?token=t", "http://h:1/progress?token=t"),
])
def test_normalize_server_url_accepts_a_base_url_or_the_endpoint(given, expected):
    assert pc.normalize_server_url(given) == expected


@pytest.mark.parametrize("bad", ["localhost:8000", "ftp://h/", ""])
def test_normalize_server_url_rejects_what_is_not_http(bad):
    with pytest.raises(ValueError, match="server_url"):
        pc.normalize_server_url(bad)


def test_a_malformed_server_url_warns_and_the_bar_still_draws(client_log):
    drawn = io.StringIO()
    for _ in pc.tqdm(range(3), server_url="not a url", file=drawn):
        pass
    assert "3/3" in drawn.getvalue()
    assert len(warnings_in(client_log)) == 1


# --- How a bar ends ---

def test_an_exception_inside_a_with_block_ends_the_bar_as_error(server):
    with pytest.raises(ValueError):
        with bar(server.url, total=10) as remote:
            remote.update(4)
            raise ValueError("disk full")
    final = wait_for(lambda: (task(server, remote.task_id) or {}).get("status") == "error" and
                     task(server, remote.task_id))
    assert final["error"].startswith("ValueError: disk full") and final["n"] == 4
    assert "test_client.py" in final["error"]  # the last traceback lines


def test_an_exception_in_a_loop_inside_a_with_block_ends_the_bar_as_error(server):
    with pytest.raises(KeyError):
        with bar(server.url, iterable=range(10)) as loop:
            for item in loop:
                if item == 3:
                    raise KeyError("missing")
    final = wait_for(lambda: (task(server, loop.task_id) or {}).get("status") == "error" and
                     task(server, loop.task_id))
    assert final["error"].startswith("KeyError: 'missing'")


def test_an_exception_from_the_iterable_ends_the_bar_as_error(server):
    def broken():
        yield 1
        raise OSError("read failed")

    loop = bar(server.url, iterable=broken())
    with pytest.raises(OSError):
        for _ in loop:
            pass
    final = wait_for(lambda: (task(server, loop.task_id) or {}).get("status") == "error" and
                     task(server, loop.task_id))
    assert final["error"].startswith("OSError: read failed") and final["n"] == 1


def test_breaking_out_of_a_loop_closes_the_bar_where_it_stopped(server, sender):
    loop = bar(server.url, iterable=range(10))
    for item in loop:
        if item == 4:
            break
    assert sender.flush(2)  # sends the close on hold at once
    (final,) = tasks(server).values()
    assert final["status"] == "close" and final["n"] == 4


@pytest.mark.parametrize("ending", ["close", "with"])
def test_closing_a_loop_left_early_ends_its_hold(server, sender, ending):
    # Only the implicit close of `for x in tqdm(...): break` waits for an exception.
    if ending == "close":
        loop = bar(server.url, iterable=range(10))
        for item in loop:
            if item == 4:
                break
        loop.close()
    else:
        with bar(server.url, iterable=range(10)) as loop:
            for item in loop:
                if item == 4:
                    break
    pc.end_bars_with_error("RuntimeError: unrelated, after the bar was finished")
    assert sender.flush(2)
    assert (task(server, loop.task_id)["status"], task(server, loop.task_id)["n"]) == ("close", 4)


def test_an_uncaught_exception_ends_every_open_bar_as_error(server):
    result = run_python("""
        import io, sys, progressista_client as pc
        left_open = pc.tqdm(total=5, file=io.StringIO(), desc="open", server_url=sys.argv[1])
        left_open.update(2)
        loop = pc.tqdm(range(5), file=io.StringIO(), desc="looping", server_url=sys.argv[1])
        for item in loop:
            if item == 2:
                raise RuntimeError("out of memory")
    """, server.url)
    assert "RuntimeError: out of memory" in result.stderr  # the program's own traceback
    ended = {t["desc"]: t for t in tasks(server).values()}
    assert {desc: t["status"] for desc, t in ended.items()} == {"open": "error", "looping": "error"}
    assert all(t["error"].startswith("RuntimeError: out of memory") for t in ended.values())
    assert "line" in ended["open"]["error"]


def test_an_uncaught_exception_in_a_thread_ends_only_that_threads_bars(server):
    run_python("""
        import io, sys, threading, progressista_client as pc
        main_bar = pc.tqdm(total=5, file=io.StringIO(), desc="main", server_url=sys.argv[1])
        def work():
            worker_bar = pc.tqdm(total=5, file=io.StringIO(), desc="worker", server_url=sys.argv[1])
            raise ValueError("bad shard")
        thread = threading.Thread(target=work)
        thread.start(); thread.join()
        main_bar.update(5); main_bar.close()
    """, server.url)
    ended = {t["desc"]: t for t in tasks(server).values()}
    assert ended["worker"]["status"] == "error" and "bad shard" in ended["worker"]["error"]
    assert ended["main"]["status"] == "close" and ended["main"]["n"] == 5


@pytest.mark.parametrize("raised", ["ZeroDivisionError('uncaught')", "KeyboardInterrupt()"])
def test_an_uncaught_exception_in_the_body_of_an_inline_loop_ends_its_bar_as_error(server, raised):
    # `for x in tqdm(it):` holds the bar only through the loop's generator, freed as the
    # exception unwinds, before the excepthook runs.
    result = run_python("""
        import io, sys, progressista_client as pc
        def train():
            for i in pc.tqdm(range(100), file=io.StringIO(), desc="inline", server_url=sys.argv[1]):
                if i == 30:
                    raise %s
        train()
    """ % raised, server.url)
    assert result.returncode != 0
    (ended,) = tasks(server).values()
    assert ended["status"] == "error" and ended["n"] == 30
    assert ended["error"].startswith(raised.split("(")[0])


def test_a_bar_left_open_at_a_clean_exit_is_closed(server):
    run_python("""
        import io, sys, progressista_client as pc
        left_open = pc.tqdm(total=9, file=io.StringIO(), server_url=sys.argv[1])
        left_open.update(3)
    """, server.url)
    (final,) = tasks(server).values()
    assert final["status"] == "close" and final["n"] == 3


# --- A server that is down, hangs, fails, restarts ---

def loop_and_time(server_url, iterations=2000):
    started = time.monotonic()
    remote = bar(server_url, total=iterations, request_timeout=FAST_TIMEOUT_S)
    for _ in range(iterations):
        remote.update()
    remote.close()
    return time.monotonic() - started


@pytest.fixture
def hanging_server():
    """A listener that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % listener.getsockname()[1]
    stop.set()
    thread.join(2)
    for connection in accepted:
        connection.close()
    listener.close()


@contextlib.contextmanager
def answering_server(answer):
    """An HTTP server on port 0 that answers each POST with `answer(body) -> (status, bytes)`."""
    class Answering(QuietHandler):
        def do_POST(self):
            status, body = answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            send_body(self, body, status)

    with http_server_thread(Answering) as url:
        yield url


@pytest.fixture
def failing_server():
    """An HTTP server that answers 500 to everything."""
    with answering_server(lambda body: (500, b'{"error": "database on fire"}')) as url:
        yield url


@pytest.mark.parametrize("kind", ["down", "hanging", "failing"])
def test_a_bad_server_never_slows_or_breaks_the_loop_and_is_warned_about_once(
        kind, sender, client_log, request):
    url = {"down": lambda: "http://127.0.0.1:%d" % free_port(),
           "hanging": lambda: request.getfixturevalue("hanging_server"),
           "failing": lambda: request.getfixturevalue("failing_server")}[kind]()
    assert loop_and_time(url) < 1.0  # microseconds of work; the network is never awaited
    wait_for(lambda: sender._open.calls >= 3, timeout=10, message="three failed attempts")
    started = time.monotonic()
    assert sender.flush(0.5) is False
    assert time.monotonic() - started < 1.5  # bounded, even when the server hangs
    down = [r for r in warnings_in(client_log) if "cannot deliver" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in down]


def test_the_final_state_arrives_when_the_server_comes_back(client_log):
    with running_server() as first:
        port = first.port
        remote = bar(first.url, total=10)
        wait_for(lambda: task(first, remote.task_id))
    remote.update(10)
    remote.close()
    wait_for(lambda: warnings_in(client_log), message="the outage to be noticed")
    with running_server(port=port) as second:
        final = wait_for(lambda: task(second, remote.task_id), timeout=10)
        assert final["status"] == "close" and final["n"] == 10
    assert any("answers again" in r.getMessage() for r in client_log.records)


def test_a_restarted_empty_server_learns_every_live_bar_back_at_the_next_heartbeat(sender):
    sender.heartbeat_s = 0.2
    with running_server() as first:
        live = [bar(first.url, total=10, desc="bar %d" % index) for index in range(3)]
        for index, remote in enumerate(live):
            remote.update(index + 1)
        wait_for(lambda: len(tasks(first)) == 3)
        port = first.port
    with running_server(port=port) as second:
        back = wait_for(lambda: len(tasks(second)) == 3 and tasks(second), timeout=10)
        assert {t["desc"]: t["status"] for t in back.values()} == {
            "bar 0": "running", "bar 1": "running", "bar 2": "running"}
        assert sorted(t["n"] for t in back.values()) == [1, 2, 3]


# --- Threads and processes ---

def test_bars_of_eight_threads_all_arrive_closed(server):
    def work(index):
        for _ in bar(server.url, iterable=range(200), desc="thread %d" % index):
            pass

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: sorted((t["status"], t["n"]) for t in tasks(server).values()) ==
             [("close", 200)] * 8)


def pool_job(args):
    server_url, index = args
    for _ in pc.tqdm(range(50), server_url=server_url, file=io.StringIO(), desc="job %d" % index,
                     mininterval=0, push_every=0):
        pass
    return os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_bars_of_a_multiprocessing_pool_all_arrive_closed(server, method):
    with multiprocessing.get_context(method).Pool(2) as pool:
        pids = pool.map(pool_job, [(server.url, index) for index in range(6)])
    assert os.getpid() not in pids
    # A deadline, not a wait: spawned workers start slowly on a busy CI machine.
    done = wait_for(lambda: all(t["status"] == "close" for t in tasks(server).values()) and
                    len(tasks(server)) == 6 and tasks(server), timeout=15)
    assert sorted(t["desc"] for t in done.values()) == ["job %d" % i for i in range(6)]
    assert all(t["n"] == 50 for t in done.values())
    assert {t["meta"]["pid"] for t in done.values()} <= set(pids)


def unanswered_pool_job(args):
    server_url, index = args
    for _ in range(3):  # several bars per worker: the short wait is paid once, not per bar
        for _ in pc.tqdm(range(20), server_url=server_url, file=io.StringIO(), leave=False):
            pass
    return index


def test_a_hanging_server_costs_a_recycled_worker_at_most_the_flush_timeout(hanging_server,
                                                                            monkeypatch):
    monkeypatch.setenv("PROGRESSISTA_FLUSH_TIMEOUT", "0.3")
    started = time.monotonic()
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=2) as pool:
        assert sorted(pool.imap_unordered(unanswered_pool_job, [(hanging_server, i) for i in range(8)])) \
            == list(range(8))
    # Four worker processes in two slots, each exit waiting 0.3 s, not the 2 s request timeout.
    assert time.monotonic() - started < 2.0


@pytest.fixture
def slow_server(server):
    """A proxy that answers each POST 0.4 s late: a server that is up but slow."""
    def forward_late(body):
        time.sleep(0.4)
        status, answer, _ = http("POST", server.url + "/progress", body)
        return status, json.dumps(answer).encode()

    with answering_server(forward_late) as url:
        yield url


def timed_pool_job(args):
    server_url, index = args
    started = time.monotonic()
    for _ in pc.tqdm(range(20), server_url=server_url, file=io.StringIO(), desc="job %d" % index,
                     mininterval=0, push_every=0):
        pass
    return time.monotonic() - started


@pytest.mark.parametrize("ending", ["recycled", "terminated"])
def test_a_slow_server_neither_slows_pool_tasks_nor_loses_their_final_states(
        server, slow_server, ending):
    jobs = [(slow_server, index) for index in range(4)]
    if ending == "recycled":  # each worker exits after its task
        pool = multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1)
        durations = pool.map(timed_pool_job, jobs)
        pool.close()
        pool.join()
    else:  # `with Pool()` terminates its workers (SIGTERM) as soon as the work is done
        with multiprocessing.get_context("fork").Pool(2) as pool:
            durations = pool.map(timed_pool_job, jobs)
    # Well under the server's 0.4 s delay: close() did not wait for its answer.
    assert max(durations) < 0.3
    done = wait_for(lambda: len(tasks(server)) == 4 and tasks(server), timeout=5)
    assert sorted((t["desc"], t["status"], t["n"]) for t in done.values()) == [
        ("job %d" % i, "close", 20) for i in range(4)]


def test_a_forked_child_does_not_send_or_end_its_parents_bars(server, sender):
    parent_bar = bar(server.url, total=5)
    wait_for(lambda: task(server, parent_bar.task_id))
    pid = os.fork()
    if pid == 0:  # the child: touch the inherited bar, then die of an error
        code = 0
        try:
            parent_bar.update(5)
            parent_bar.close()
            code = 0 if pc._sender is None else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sender.flush(2)
    assert task(server, parent_bar.task_id)["status"] == "running"
    parent_bar.close()


# --- The Sender, with an injected clock and opener ---

class FakeServer:
    """An opener that records each POST body and answers with the next scripted status."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.bodies = []

    def __call__(self, url, body, headers, timeout):
        self.bodies.append(json.loads(body))
        status = self.statuses.pop(0) if self.statuses else 200
        if status is None:
            raise ConnectionRefusedError("refused")
        return status, b'{"error": "nope"}' if status >= 400 else b'{"ok": true}'


ENDPOINT = pc.make_endpoint("http://127.0.0.1:9", request_timeout=1)


def unit_sender(statuses=(), **kwargs):
    clock, opener = FakeClock(1000.0), FakeServer(statuses)
    return pc.Sender(clock=clock, opener=opener, autostart=False, **kwargs), clock, opener


def state(task_id, n=0, status="running"):
    return {"task_id": task_id, "n": n, "status": status, "elapsed": 1.0, "timestamp": time.time()}


def test_sender_sends_all_due_bars_in_one_batch_post_per_tick():
    sender, _, opener = unit_sender()
    for task_id in "abc":
        sender.put(ENDPOINT, state(task_id))
    sender.tick()
    assert len(opener.bodies) == 1 and [s["task_id"] for s in opener.bodies[0]] == list("abc")


def test_sender_keeps_only_the_latest_state_of_a_bar():
    sender, _, opener = unit_sender()
    for n in range(5):
        sender.put(ENDPOINT, state("a", n))
    sender.tick()
    assert len(opener.bodies) == 1 and opener.bodies[0]["n"] == 4


def test_sender_waits_push_every_between_two_sends_of_one_bar():
    sender, clock, opener = unit_sender()
    sender.put(ENDPOINT, state("a", 1), push_every=1.0)
    sender.tick()
    sender.put(ENDPOINT, state("a", 2), push_every=1.0)
    assert sender.tick() == pytest.approx(1.0) and len(opener.bodies) == 1
    clock.now += 1.0
    sender.tick()
    assert opener.bodies[-1]["n"] == 2


def test_sender_sends_a_final_state_at_once_and_a_late_running_one_never_reopens_it():
    sender, _, opener = unit_sender()
    sender.put(ENDPOINT, state("a", 1), push_every=5.0)
    sender.tick()
    sender.put(ENDPOINT, state("a", 9, "close"), final=True)
    sender.put(ENDPOINT, state("a", 3), push_every=5.0)
    sender.tick()
    assert [b["status"] for b in opener.bodies] == ["running", "close"] and opener.bodies[1]["n"] == 9


def test_sender_seq_increases_with_every_send_of_a_bar():
    sender, clock, opener = unit_sender()
    for n in range(3):
        sender.put(ENDPOINT, state("a", n))
        sender.tick()
        clock.now += 1
    seqs = [body["seq"] for body in opener.bodies]
    assert seqs == sorted(set(seqs)) and seqs[0] > int((time.time() - 60) * 1e6)


def test_sender_backs_off_exponentially_up_to_a_cap_then_delivers():
    sender, clock, opener = unit_sender([None] * 6, backoff_initial_s=0.5, backoff_max_s=4.0)
    sender.put(ENDPOINT, state("a", 1, "close"), final=True)
    delays = []
    for _ in range(6):
        delays.append(sender.tick())
        clock.now += delays[-1]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert sender.tick() is None and len(opener.bodies) == 7 and opener.bodies[-1]["status"] == "close"


def test_sender_does_not_retry_before_the_backoff_delay():
    sender, clock, opener = unit_sender([503])
    sender.put(ENDPOINT, state("a", 1, "close"), final=True)
    sender.tick()
    clock.now += 0.1
    sender.tick()
    assert len(opener.bodies) == 1


def test_sender_resends_a_live_bar_as_a_heartbeat_with_a_new_seq():
    sender, clock, opener = unit_sender()  # the default: well inside the 60 s stale timeout
    sender.put(ENDPOINT, state("a", 3))
    assert sender.tick() == pytest.approx(15.0)
    clock.now += 15.0
    sender.tick()
    first, beat = opener.bodies
    assert beat["n"] == 3 and beat["seq"] > first["seq"] and beat["timestamp"] >= first["timestamp"]


def test_sender_sends_no_heartbeat_for_a_closed_bar():
    sender, clock, opener = unit_sender()
    sender.put(ENDPOINT, state("a", 3, "close"), final=True)
    sender.tick()
    clock.now += 100
    assert sender.tick() is None and len(opener.bodies) == 1


def test_timing_settings_come_from_the_environment_and_an_argument_wins(
        sender, monkeypatch, client_log):
    monkeypatch.setattr(sender, "_open", FakeServer())  # the bars' states go nowhere
    monkeypatch.setattr(pc, "_warned", set())  # warnings are once per process
    settings = {"PROGRESSISTA_PUSH_INTERVAL": "0.5", "PROGRESSISTA_REQUEST_TIMEOUT": "3",
                "PROGRESSISTA_HEARTBEAT_INTERVAL": "7"}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)

    def read(push_every=None, request_timeout=None, heartbeat_s=None):
        remote = pc.tqdm(total=1, file=io.StringIO(), server_url=ENDPOINT.url,
                         push_every=push_every, request_timeout=request_timeout)
        remote.close()
        return (remote._remote_push_every, remote._remote_endpoint.timeout,
                pc.Sender(heartbeat_s=heartbeat_s, autostart=False).heartbeat_s)

    assert read() == (0.5, 3.0, 7.0)
    assert read(push_every=0.1, request_timeout=1, heartbeat_s=4.0) == (0.1, 1.0, 4.0)
    for name in settings:
        monkeypatch.setenv(name, "soon")
    assert read() == (pc.DEFAULT_PUSH_INTERVAL_S, pc.DEFAULT_REQUEST_TIMEOUT_S,
                      pc.DEFAULT_HEARTBEAT_INTERVAL_S)
    ignored = [r.getMessage() for r in warnings_in(client_log)]
    assert len(ignored) == 3 and all(
        any(name + "='soon'" in message for message in ignored) for name in settings)


def test_sender_splits_a_refused_batch_so_good_states_still_arrive():
    sender, _, opener = unit_sender([400, 200, 400])
    for task_id in "ab":
        sender.put(ENDPOINT, state(task_id, status="close"), final=True)
    sender.tick()
    assert [b["task_id"] if isinstance(b, dict) else len(b) for b in opener.bodies] == [2, "a", "b"]
    assert sender.tick() is None  # the refused one is dropped, not retried forever


def test_sender_drops_a_state_json_cannot_encode_and_sends_the_others_of_its_tick(
        client_log, monkeypatch):
    monkeypatch.setattr(pc, "_warned", set())
    sender, _, opener = unit_sender()
    sender.put(ENDPOINT, state("a", 1))
    sender.put(ENDPOINT, dict(state("dated", 2), started=datetime.date(2026, 1, 1)), final=True)
    sender.put(ENDPOINT, state("b", 3, "close"), final=True)
    sender.tick()
    sender.tick()  # refused for good: not retried
    assert len(opener.bodies) == 1 and [s["task_id"] for s in opener.bodies[0]] == ["a", "b"]
    assert len(warnings_in(client_log)) == 1


def test_a_state_json_cannot_encode_does_not_stop_the_record_for_run(tmp_path):
    sender, _, opener = unit_sender(run_dir=str(tmp_path))
    sender.put(ENDPOINT, dict(state("dated", 2), started=datetime.date(2026, 1, 1)))
    sender.put(ENDPOINT, state("a", 1))
    sender.tick()
    (path,) = tmp_path.glob("bars-*.json")
    assert list(json.loads(path.read_text())) == ["a"] and len(opener.bodies) == 1


def test_sender_records_open_bars_for_run(tmp_path):
    sender, _, _ = unit_sender(run_dir=str(tmp_path))
    sender.put(ENDPOINT, state("open", 2))
    sender.put(ENDPOINT, state("done", 5, "close"), final=True)
    sender.tick()
    (path,) = tmp_path.glob("bars-%d-*.json" % os.getpid())  # one file per sender
    record = json.loads(path.read_text())
    assert list(record) == ["open"] and record["open"]["state"]["seq"] > 0


def test_sender_records_a_bar_for_run_before_its_request_returns(tmp_path):
    called, release = threading.Event(), threading.Event()

    def slow_opener(url, body, headers, timeout):
        called.set()
        release.wait(5)
        return 200, b"{}"

    sender = pc.Sender(opener=slow_opener, run_dir=str(tmp_path), autostart=False)
    sender.put(ENDPOINT, state("a", 2))
    ticking = threading.Thread(target=sender.tick)
    ticking.start()
    try:
        assert called.wait(5)
        (path,) = tmp_path.glob("bars-*.json")  # a process killed now still leaves its record
        assert json.loads(path.read_text())["a"]["state"]["n"] == 2
    finally:
        release.set()
        ticking.join(5)


def test_sender_keeps_a_bounded_number_of_final_states_while_the_server_is_down(
        monkeypatch, client_log):
    monkeypatch.setattr(pc, "MAX_PENDING_FINALS", 5)
    sender, clock, opener = unit_sender([None] * 100)
    for index in range(8):
        sender.put(ENDPOINT, state("bar %d" % index, 1, "close"), final=True)
        clock.now += sender.tick() or 0
    assert sorted(sender._pending) == ["bar %d" % i for i in range(3, 8)]  # the newest
    dropped = [r for r in warnings_in(client_log) if "dropped" in r.getMessage()]
    assert len(dropped) == 1


# --- patch() and unpatch() ---

def test_patch_makes_from_tqdm_import_tqdm_remote_and_unpatch_restores_it(server):
    import tqdm as tqdm_package
    import tqdm.auto
    import tqdm.std
    originals = (tqdm_package.tqdm, tqdm_package.trange, tqdm.std.tqdm, tqdm.auto.tqdm,
                 tqdm.auto.trange)
    pc.patch(server_url=server.url, push_every=0)
    try:
        from tqdm import tqdm as patched_tqdm
        from tqdm.auto import trange as patched_auto_trange
        for _ in patched_tqdm(range(3), file=io.StringIO(), desc="plain"):
            pass
        for _ in patched_auto_trange(4, file=io.StringIO(), desc="auto"):
            pass
        assert issubclass(tqdm.auto.tqdm, originals[3])  # its own display, made remote
    finally:
        pc.unpatch()
    assert (tqdm_package.tqdm, tqdm_package.trange, tqdm.std.tqdm, tqdm.auto.tqdm,
            tqdm.auto.trange) == originals
    done = wait_for(lambda: len(tasks(server)) == 2 and tasks(server))
    assert sorted((t["desc"], t["n"], t["status"]) for t in done.values()) == [
        ("auto", 4, "close"), ("plain", 3, "close")]


def test_patch_also_rebinds_names_imported_before_it(server):
    import types
    from tqdm import tqdm as original
    module = types.ModuleType("imported_early")
    module.tqdm = original
    sys.modules["imported_early"] = module
    try:
        pc.patch(server_url=server.url)
        assert issubclass(module.tqdm, original) and module.tqdm is not original
        pc.unpatch()
        assert module.tqdm is original
    finally:
        pc.unpatch()
        del sys.modules["imported_early"]


def test_patch_reaches_tqdm_contrib_helpers_imported_before_it(server):
    import tqdm.contrib
    import tqdm.contrib.concurrent
    from tqdm.contrib import tenumerate
    from tqdm.contrib.concurrent import thread_map
    originals = (tenumerate.__defaults__, tqdm.contrib.concurrent._executor_map.__kwdefaults__)
    pc.patch(server_url=server.url, push_every=0)
    try:
        for _ in tenumerate(range(3), desc="tenumerate", file=io.StringIO()):
            pass
        thread_map(abs, range(3), desc="thread_map", file=io.StringIO())
    finally:
        pc.unpatch()
    assert (tenumerate.__defaults__, tqdm.contrib.concurrent._executor_map.__kwdefaults__) == originals
    assert tenumerate.__defaults__ is originals[0]  # restored exactly
    done = wait_for(lambda: len(tasks(server)) == 2 and tasks(server))
    assert sorted((t["desc"], t["n"], t["status"]) for t in done.values()) == [
        ("tenumerate", 3, "close"), ("thread_map", 3, "close")]


def test_make_remote_tqdm_keeps_the_base_class_and_applies_defaults(server):
    from tqdm.asyncio import tqdm_asyncio
    remote_class = pc.make_remote_tqdm(tqdm_asyncio, server_url=server.url, unit="rows")
    assert issubclass(remote_class, tqdm_asyncio)
    loop = remote_class(range(2), file=io.StringIO())
    for _ in loop:
        pass
    final = wait_for(lambda: (task(server, loop.task_id) or {}).get("status") == "close" and
                     task(server, loop.task_id))
    assert final["unit"] == "rows"


# --- demo, run, and import without tqdm ---

def test_demo_sends_bars_that_all_end_closed(server):
    result = run_cli("demo", "--bars", "2", "--total", "5", "--delay", "0.01",
                     "--server-url", server.url)
    assert result.returncode == 0, result.stderr
    sent = tasks(server).values()
    assert sorted((t["status"], t["n"]) for t in sent if t["parent"] is None) == [
        ("close", 5), ("close", 5)]
    inner = [t for t in sent if t["parent"] is not None]  # each bar's nested inner bar
    assert sorted(t["parent"] for t in inner) == sorted(
        t["task_id"] for t in sent if t["parent"] is None)
    assert {(t["status"], t["n"], t["total"]) for t in inner} == {("close", 5, 5)}
    assert len({t["run"] for t in sent}) == 1  # one run


@pytest.mark.parametrize("suffix, token, status", [
    ("", "wrong", "HTTP 401"), ("", None, "HTTP 401"), ("/dashboard/", "right", "HTTP 404")])
def test_demo_fails_naming_the_status_when_the_server_refuses_its_bars(suffix, token, status):
    with running_server(api_tokens=["right"]) as server:
        result = run_cli("demo", "--bars", "1", "--total", "2", "--delay", "0",
                         "--server-url", server.url + suffix,
                         *(["--api-token", token] if token else []))
    assert result.returncode == 1 and "sent" not in result.stdout
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("progressista demo:")]
    assert status in line and "refused" in line


def test_demo_with_a_malformed_url_fails_with_one_line():
    result = run_cli("demo", "--server-url", "127.0.0.1:9")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "server_url" in result.stderr


def test_demo_against_a_server_that_is_down_fails_with_a_message():
    url = "http://127.0.0.1:%d" % free_port()
    result = run_cli("demo", "--bars", "1", "--total", "2", "--delay", "0", "--server-url", url)
    assert result.returncode == 1 and "could not deliver" in result.stderr


PROGRAM = """\
import sys
from tqdm import tqdm
print("argv", sys.argv[1:])
with tqdm(range(4), desc="done") as loop:
    for _ in loop:
        pass
left_open = tqdm(total=10, desc="open")
left_open.update(6)
left_open.refresh()
sys.exit(int(sys.argv[-1]))
"""


@pytest.mark.parametrize("exit_code, open_status", [(0, "close"), (3, "error")])
def test_run_passes_arguments_and_exit_code_and_ends_open_bars(server, tmp_path, exit_code,
                                                               open_status):
    script = tmp_path / "job.py"
    script.write_text(PROGRAM)
    result = run_cli("run", "--server-url", server.url, "--meta", '{"team": "ml"}',
                     str(script), "--", "--lr", "0.1", str(exit_code))
    assert result.returncode == exit_code, result.stderr
    assert "argv ['--lr', '0.1', '%d']" % exit_code in result.stdout
    ended = {t["desc"]: t for t in tasks(server).values()}
    assert ended["done"]["status"] == "close" and ended["done"]["n"] == 4
    assert ended["open"]["status"] == open_status and ended["open"]["n"] == 6
    assert ended["open"]["meta"]["team"] == "ml"
    if exit_code:
        assert ended["open"]["error"] == "the program exited with code 3"


def test_run_ends_a_bar_left_open_where_it_stood_not_at_its_last_display(server, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import sys\nfrom tqdm import tqdm\n"
                      "left_open = tqdm(total=100, desc='open', mininterval=60)\n"
                      "left_open.update(40)\nsys.exit(int(sys.argv[1]))\n")
    for exit_code, status in ((0, "close"), (5, "error")):
        assert run_cli("run", "--server-url", server.url, str(script), "--", str(exit_code)) \
            .returncode == exit_code
        ended = [t for t in tasks(server).values() if t["status"] == status]
        assert len(ended) == 1 and ended[0]["n"] == 40


def test_run_options_apply_to_bars_of_the_one_line_change(server, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("from progressista_client import tqdm\n"
                      "for _ in tqdm(range(2), desc='one-line'):\n    pass\n")
    result = run_cli("run", "--server-url", server.url, "--meta", '{"team": "vision"}',
                     "--unit", "img", str(script))
    assert result.returncode == 0, result.stderr
    (ended,) = tasks(server).values()
    assert ended["meta"]["team"] == "vision" and ended["unit"] == "img"


def test_run_with_a_vendored_copy_sends_each_bar_once(server, tmp_path):
    (tmp_path / "third_party").mkdir()
    (tmp_path / "third_party" / "__init__.py").write_text("")
    with open(os.path.join(ROOT, "progressista_client.py")) as source:
        (tmp_path / "third_party" / "progressista_client.py").write_text(source.read())
    script = tmp_path / "job.py"
    script.write_text("from third_party.progressista_client import tqdm\n"
                      "for _ in tqdm(range(5), desc='loop'):\n    pass\n"
                      "left_open = tqdm(total=10, desc='open')\nleft_open.update(3)\n")
    result = run_cli("run", "--server-url", server.url, str(script), cwd=str(tmp_path),
                     env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert sorted((t["desc"], t["n"], t["status"]) for t in tasks(server).values()) == [
        ("loop", 5, "close"), ("open", 3, "close")]


def test_a_vendored_copys_patch_on_top_of_another_sends_each_bar_once(server):
    result = run_python("""
        import importlib.util, io, sys
        import progressista_client as pc
        pc.patch(server_url=sys.argv[1])
        spec = importlib.util.spec_from_file_location("vendored_pc", pc.__file__)
        vendored = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vendored)
        vendored.patch(server_url=sys.argv[1])
        from tqdm import tqdm, trange
        for _ in tqdm(range(3), desc="loop", file=io.StringIO()):
            pass
        for _ in trange(2, desc="range", file=io.StringIO()):
            pass
        print(pc.flush(5), vendored.flush(5))
    """, server.url)
    assert result.stdout.split() == ["True", "True"], result.stderr
    assert sorted((t["desc"], t["status"]) for t in tasks(server).values()) == [
        ("loop", "close"), ("range", "close")]


WORKER = """\
import os, signal, sys
from tqdm import tqdm
bar = tqdm(total=10, desc="worker-" + sys.argv[1])
bar.update(4)
if sys.argv[1] == "kill":
    import progressista_client
    bar.refresh()  # a SIGKILL leaves no chance to record anything after the last display
    progressista_client.flush(5)
    os.kill(os.getpid(), signal.SIGKILL)
"""

PARENT = """\
import subprocess, sys
for mode in ("kill", "ok"):
    subprocess.run([sys.executable, sys.argv[1], mode])
"""


def test_run_ends_the_bars_of_a_killed_child_process_as_error(server, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "parent.py").write_text(PARENT)
    result = run_cli("run", "--server-url", server.url, str(tmp_path / "parent.py"), "--",
                     str(tmp_path / "worker.py"))
    assert result.returncode == 0, result.stderr
    ended = {t["desc"]: t for t in tasks(server).values()}
    assert (ended["worker-ok"]["status"], ended["worker-ok"]["n"]) == ("close", 4)
    assert (ended["worker-kill"]["status"], ended["worker-kill"]["n"]) == ("error", 4)
    assert "ended without closing this bar" in ended["worker-kill"]["error"]


def test_run_dash_m_runs_a_module(server, tmp_path):
    (tmp_path / "jobpkg").mkdir()
    (tmp_path / "jobpkg" / "__init__.py").write_text("")
    (tmp_path / "jobpkg" / "train.py").write_text(PROGRAM)
    result = run_cli("run", "--server-url", server.url, "-m", "jobpkg.train", "--", "0",
                     cwd=str(tmp_path), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert {t["desc"] for t in tasks(server).values()} == {"done", "open"}


KILLABLE = """\
import os, sys, time
from tqdm import tqdm
import progressista_client
bar = tqdm(total=100, desc="long")
bar.update(7)
bar.refresh()
progressista_client.flush(5)
print(os.getpid(), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_run_ends_the_bars_of_a_killed_program_as_error_naming_the_signal(server, tmp_path, signum):
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    runner = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "progressista.py"), "run", "--server-url", server.url,
         str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        program_pid = int(runner.stdout.readline())
        os.kill(program_pid, signum)
        assert runner.wait(SUBPROCESS_TIMEOUT_S) == 128 + signum
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.stdout.close()
        runner.stderr.close()
    (ended,) = tasks(server).values()
    assert ended["status"] == "error" and ended["n"] == 7
    assert ended["error"] == "the program was killed by %s" % signal.Signals(signum).name


SPAWNING = """\
import multiprocessing
from tqdm import tqdm

def work(index):
    for _ in tqdm(range(5), desc="worker %d" % index):
        pass

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(work, range(2))
"""


def test_run_shows_the_bars_of_the_programs_spawned_workers(server, tmp_path):
    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING)
    result = run_cli("run", "--server-url", server.url, str(script))
    assert result.returncode == 0, result.stderr
    done = {t["desc"]: t["status"] for t in tasks(server).values()}
    assert done == {"worker 0": "close", "worker 1": "close"}


def test_the_module_imports_and_sends_without_tqdm(server):
    result = run_python("""
        import sys
        sys.modules["tqdm"] = None  # as if tqdm were not installed
        import progressista_client as pc
        try:
            pc.tqdm(range(3))
        except ImportError as error:
            print("ImportError:", error)
        pc.send_update({"task_id": "raw", "n": 2, "total": 2, "status": "close"},
                       server_url=sys.argv[1])
        print("flushed", pc.flush(5))
    """, server.url)
    assert "pip install tqdm" in result.stdout and "flushed True" in result.stdout, result.stderr
    assert task(server, "raw")["status"] == "close"
