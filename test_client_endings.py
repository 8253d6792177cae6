"""Tests of how a bar ends (issue 11, "What to build" 5): the status a job's way of ending
gives its bars, a leave=False bar marked transient, the end by SIGTERM or SIGHUP under the
one-line change, and `progressista run` cleaning up after itself.

Every job is a real Python subprocess with real tqdm, sending to a real server on an
ephemeral port; what the server holds afterwards is the verdict.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import progressista_client as pc
from conftest import clean_env, running_server, wait_for
from test_client import ROOT, SUBPROCESS_TIMEOUT_S, bar, run_cli, sender, tasks  # noqa: F401


def run_job(folder, code, server, *args, env=None):
    """Run `code` as `folder`/job.py under the one-line change (no `run`), sending to `server`."""
    script = folder / "job.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)] + list(args), cwd=ROOT, text=True,
        capture_output=True, timeout=SUBPROCESS_TIMEOUT_S,
        env=clean_env(PYTHONPATH=ROOT, PROGRESSISTA_SERVER_URL=server.url, **(env or {})))


def by_desc(server):
    return {t["desc"]: t for t in tasks(server).values()}


# --- A loop left by sys.exit or an exception ---

LOOP_LEFT_BY_EXIT = """\
import sys
from progressista_client import tqdm
for i in tqdm(range(100), desc="loop"):
    if i == 40:
        sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("exit_code", [3, 0])
def test_a_loop_left_by_sys_exit_ends_error_unless_the_status_is_zero(server, tmp_path, exit_code):
    result = run_job(tmp_path, LOOP_LEFT_BY_EXIT, server, str(exit_code))
    assert result.returncode == exit_code, result.stderr
    ended = by_desc(server)["loop"]
    assert ended["n"] == 40
    if exit_code:
        assert ended["status"] == "error"
        assert ended["error"] == "sys.exit(3) at job.py:5: sys.exit(int(sys.argv[1]))"
    else:
        assert ended["status"] == "close"


OPEN_BARS_AT_EXIT = """\
import sys
from progressista_client import tqdm
bar = tqdm(total=100, desc="manual")  # never closed
bar.update(40)
with tqdm(total=10, desc="with-block") as inner:
    inner.update(4)
    sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("exit_code", [3, 0])
def test_bars_open_when_the_program_exits_failing_end_error_and_name_only_its_frames(
        server, tmp_path, exit_code):
    result = run_job(tmp_path, OPEN_BARS_AT_EXIT, server, str(exit_code))
    assert result.returncode == exit_code, result.stderr
    ended = by_desc(server)
    if not exit_code:
        assert (ended["manual"]["status"], ended["with-block"]["status"]) == ("close", "close")
        return
    assert ended["manual"]["status"] == "error"
    assert ended["manual"]["error"] == "the program exited with sys.exit(3)"
    assert ended["with-block"]["status"] == "error"
    assert ended["with-block"]["error"].startswith("SystemExit: 3")
    assert "job.py" in ended["with-block"]["error"]
    assert "progressista_client.py" not in ended["with-block"]["error"]  # not our wrapper


def test_a_loop_left_by_sys_exit_ends_error_under_run(server, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(LOOP_LEFT_BY_EXIT.replace("progressista_client", "tqdm"))
    result = run_cli("run", "--server-url", server.url, str(script), "--", "3")
    assert result.returncode == 3, result.stderr
    ended = by_desc(server)["loop"]
    assert (ended["status"], ended["n"]) == ("error", 40)
    assert ended["error"] == "sys.exit(3) at job.py:5: sys.exit(int(sys.argv[1]))"


DETACHED_CHILD = """\
import subprocess, sys, time
from tqdm import tqdm
for _ in tqdm(range(2), desc="main"):
    pass
subprocess.Popen([sys.executable, "-c", "import time\\nfrom tqdm import tqdm\\n"
                  "for _ in tqdm(range(30), desc='bg-upload'):\\n    time.sleep(0.05)"])
time.sleep(0.5)  # the child's bar has begun when the program ends
"""


def test_run_leaves_alone_the_bars_of_a_child_that_outlives_the_program(server, tmp_path):
    script = tmp_path / "detach.py"
    script.write_text(DETACHED_CHILD)
    result = run_cli("run", "--server-url", server.url, str(script))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: by_desc(server).get("bg-upload", {}).get("status") == "close", 10,
             message="the child's bar to finish")
    child = by_desc(server)["bg-upload"]
    assert (child["n"], child["error"]) == (30, None)  # never called dead while it ran


WORKER_RAISES_CAUGHT_BY_FUTURE = """\
from concurrent.futures import ThreadPoolExecutor
from progressista_client import tqdm

def work():
    for j in tqdm(range(50), desc="worker"):
        if j == 20:
            raise ValueError("shard 7 is corrupt")

with ThreadPoolExecutor(1) as pool:
    try:
        pool.submit(work).result()
    except ValueError as error:
        print("caught", error)
for _ in tqdm(range(3), desc="after"):
    pass
"""


def test_a_worker_loop_left_by_an_exception_caught_elsewhere_ends_error(server, tmp_path):
    result = run_job(tmp_path, WORKER_RAISES_CAUGHT_BY_FUTURE, server)
    assert result.returncode == 0 and "caught shard 7 is corrupt" in result.stdout, result.stderr
    ended = by_desc(server)
    assert (ended["worker"]["status"], ended["worker"]["n"]) == ("error", 20)
    assert ended["worker"]["error"] == (
        "the loop was left by an exception at job.py:7: raise ValueError(\"shard 7 is corrupt\")")
    assert ended["after"]["status"] == "close"


LOOPS_LEFT_NORMALLY = """\
from progressista_client import tqdm

def first_over(limit):
    for i in tqdm(range(100), desc="return"):
        if i > limit:
            return i

for i in tqdm(range(100), desc="break"):
    if i == 10:
        break
first_over(5)
try:
    for i in tqdm(range(100), desc="caught"):
        if i == 7:
            raise KeyError(i)
except KeyError:
    pass
"""


def test_loops_left_by_break_or_return_close_and_one_left_by_a_caught_exception_errs(server,
                                                                                   tmp_path):
    result = run_job(tmp_path, LOOPS_LEFT_NORMALLY, server)
    assert result.returncode == 0, result.stderr
    ended = by_desc(server)
    assert {desc: (t["status"], t["n"]) for desc, t in ended.items()} == {
        "break": ("close", 10), "return": ("close", 6), "caught": ("error", 7)}
    assert ended["caught"]["error"].endswith("raise KeyError(i)")


def test_an_uncaught_exception_names_itself_in_place_of_the_loops_guess(server, tmp_path):
    result = run_job(tmp_path, """\
        from progressista_client import tqdm
        for i in tqdm(range(10), desc="loop"):
            if i == 2:
                {}["missing"]
    """, server)
    assert result.returncode == 1 and "KeyError" in result.stderr
    assert by_desc(server)["loop"]["error"].startswith("KeyError: 'missing'")


# --- leave=False ---

class BodyRecorder:
    """The real opener, keeping each update it sends."""

    def __init__(self):
        self.updates = []

    def __call__(self, url, body, headers, timeout):
        sent = json.loads(body)
        self.updates += sent if isinstance(sent, list) else [sent]
        return pc._transport(url, body, headers, timeout)


@pytest.mark.parametrize("leave, transient", [(False, True), (True, False)])
def test_a_closed_bar_with_leave_false_is_sent_as_transient(server, sender, monkeypatch,
                                                            leave, transient):
    recorder = BodyRecorder()
    monkeypatch.setattr(sender, "_open", recorder)
    for _ in bar(server.url, iterable=range(3), leave=leave):
        pass
    assert sender.flush(5)
    (final,) = [u for u in recorder.updates if u["status"] == "close"]
    assert final.get("transient", False) is transient
    assert all("transient" not in u for u in recorder.updates if u["status"] != "close")


def test_a_bar_with_leave_false_that_fails_is_not_transient(server, sender, monkeypatch):
    recorder = BodyRecorder()
    monkeypatch.setattr(sender, "_open", recorder)
    with pytest.raises(RuntimeError):
        with bar(server.url, total=3, leave=False):
            raise RuntimeError("boom")
    assert sender.flush(5)
    (final,) = [u for u in recorder.updates if u["status"] == "error"]
    assert "transient" not in final


# --- SIGTERM and SIGHUP under the one-line change ---

WAITS_FOR_A_SIGNAL = """\
import os, signal, sys, time
import progressista_client
from progressista_client import tqdm
if sys.argv[1] == "own-handler":
    def stop(signum, frame):
        print("own handler", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
outer = tqdm(total=10, desc="open")
outer.update(4)
inner = tqdm(total=5, desc="inner")
inner.update(2)
outer.refresh(); inner.refresh()
progressista_client.flush(5)
print("ready", flush=True)
time.sleep(60)
"""


def start_waiting_job(server, mode):
    job = subprocess.Popen(
        [sys.executable, "-c", WAITS_FOR_A_SIGNAL, mode], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(PYTHONPATH=ROOT, PROGRESSISTA_SERVER_URL=server.url))
    assert job.stdout.readline() == "ready\n"
    return job


def finish(job):
    try:
        return job.wait(SUBPROCESS_TIMEOUT_S), job.stdout.read()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        job.stdout.close()
        job.stderr.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_default_ending_signal_ends_open_bars_as_error_then_kills_as_before(server, signum):
    job = start_waiting_job(server, "default")
    job.send_signal(signum)
    returncode, _ = finish(job)
    assert returncode == -signum
    ended = by_desc(server)
    name = signal.Signals(signum).name
    assert {d: (t["status"], t["n"], t["error"]) for d, t in ended.items()} == {
        "open": ("error", 4, "killed by " + name), "inner": ("error", 2, "killed by " + name)}


def test_a_sigterm_handler_of_the_programs_own_is_left_alone(server):
    job = start_waiting_job(server, "own-handler")
    job.send_signal(signal.SIGTERM)
    returncode, out = finish(job)
    assert returncode == 0 and "own handler" in out
    assert {t["status"] for t in tasks(server).values()} == {"close"}


# --- `progressista run` cleans up ---

def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_dirs(root):
    return sorted(name for name in os.listdir(root) if name.startswith(pc.RUN_DIR_PREFIX))


def test_run_removes_the_folders_of_earlier_runs_that_were_killed(server, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    abandoned = temp / ("%s%d-abcd" % (pc.RUN_DIR_PREFIX, dead_pid()))
    abandoned.mkdir()
    (abandoned / "bars-1.json").write_text("{}")
    alive = temp / ("%s%d-efgh" % (pc.RUN_DIR_PREFIX, os.getpid()))  # this test is alive
    alive.mkdir()
    script = tmp_path / "job.py"
    script.write_text("print('ran')\n")
    result = run_cli("run", "--server-url", server.url, str(script), env={"TMPDIR": str(temp)})
    assert result.returncode == 0 and "ran" in result.stdout, result.stderr
    assert run_dirs(temp) == [alive.name]


def test_a_run_killed_by_sigkill_leaves_a_folder_the_next_run_removes(server, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = tmp_path / "job.py"
    script.write_text("import os, sys, time\nprint(os.getpid(), flush=True)\n"
                      "if sys.argv[1] == 'wait':\n    time.sleep(60)\n")
    env = dict(clean_env(TMPDIR=str(temp)))
    runner = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "progressista.py"), "run", "--server-url",
         server.url, str(script), "--", "wait"], env=env, stdout=subprocess.PIPE, text=True)
    program_pid = int(runner.stdout.readline())
    try:
        runner.kill()
        runner.wait(SUBPROCESS_TIMEOUT_S)
        assert len(run_dirs(temp)) == 1  # SIGKILL: no chance to clean up
        again = run_cli("run", "--server-url", server.url, str(script), "--", "once",
                        env={"TMPDIR": str(temp)})
        assert again.returncode == 0
        assert len(run_dirs(temp)) == 1  # the orphaned program still runs: kept
    finally:
        os.kill(program_pid, signal.SIGKILL)
        runner.stdout.close()
    wait_for(lambda: not pc._alive(program_pid), message="the program to be gone")
    assert run_cli("run", "--server-url", server.url, str(script), "--", "once",
                   env={"TMPDIR": str(temp)}).returncode == 0
    assert run_dirs(temp) == []


def test_run_with_the_server_down_and_logging_configured_warns_once(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import logging\nlogging.basicConfig()\nfrom tqdm import tqdm\n"
                      "for _ in tqdm(range(3)):\n    pass\n")
    with running_server() as gone:
        url = gone.url
    result = run_cli("run", "--server-url", url, str(script),
                     env={"PROGRESSISTA_FLUSH_TIMEOUT": "0.5"})
    assert result.returncode == 0
    assert result.stderr.count("cannot deliver") == 1, result.stderr
