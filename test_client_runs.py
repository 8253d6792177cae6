"""Tests of runs on the client side (issue 12, "What to build" 1; PROTOCOL.md, "Client
settings"): every bar names its run, its rank and the bar it is nested in.

The server on this branch does not store `run`, `parent` or `run_name` yet (unknown fields
are ignored), so the jobs send to a small recording HTTP server on an ephemeral loopback
port, and the test reads what really went over the wire. Jobs are real Python subprocesses
with real tqdm: nested loops, a multiprocessing pool with fork and spawn, a subprocess the
program starts, and the variables of SLURM and torchrun set by the test.
"""

import contextlib
import json
import subprocess
import sys
import textwrap
import threading

import pytest

import progressista_client as pc
from conftest import QuietHandler, clean_env, http_server_thread, send_json
from test_client import ROOT, SUBPROCESS_TIMEOUT_S, run_cli, sender  # noqa: F401


@contextlib.contextmanager
def recording_server():
    """Yield (base URL, the list of every update POSTed), answering each POST 200."""
    updates, lock = [], threading.Lock()

    class Recording(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            sent = sent if isinstance(sent, list) else [sent]
            with lock:
                updates.extend(sent)
            send_json(self, {"ok": True, "accepted": len(sent)})

    with http_server_thread(Recording) as url:
        yield url, updates


def finals(updates):
    """The last update of each bar, keyed by its description."""
    latest = {}
    for update in sorted(updates, key=lambda u: u["seq"]):
        latest[update["task_id"]] = update
    return {u["desc"]: u for u in latest.values()}


def run_job(folder, code, url, *args, **env):
    script = folder / "job.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, str(script)] + list(args), cwd=str(folder), text=True,
        capture_output=True, timeout=SUBPROCESS_TIMEOUT_S,
        env=clean_env(PYTHONPATH=ROOT, PROGRESSISTA_SERVER_URL=url, **env))
    assert result.returncode == 0, result.stderr
    return result


# --- One run for a whole job ---

FAMILY = """\
import multiprocessing, subprocess, sys
from progressista_client import tqdm

CHILD = "from progressista_client import tqdm\\nfor _ in tqdm(range(2), desc='child'): pass"

def work(args):
    method, index = args
    for _ in tqdm(range(3), desc="%s worker %d" % (method, index)):
        pass

if __name__ == "__main__":
    # The pools come before any bar of this process: the run is settled at import.
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            pool.map(work, [(method, 0), (method, 1)])
    for epoch in tqdm(range(2), desc="epoch"):
        for batch in tqdm(range(3), desc="batch %d" % epoch):
            pass
    subprocess.run([sys.executable, "-c", CHILD], check=True)
"""


def test_every_bar_of_a_job_its_pool_workers_and_its_subprocess_shares_one_run(tmp_path):
    with recording_server() as (url, updates):
        run_job(tmp_path, FAMILY, url)
        ended = finals(updates)
    assert sorted(ended) == ["batch 0", "batch 1", "child", "epoch", "fork worker 0",
                             "fork worker 1", "spawn worker 0", "spawn worker 1"]
    (run,) = {u["run"] for u in updates}
    assert run.startswith("run-")
    assert len({u["meta"]["pid"] for u in ended.values()}) >= 4  # the job, 2+ workers, the child
    assert all("run_name" not in u for u in updates)


def test_an_inner_loops_bar_names_its_outer_loops_bar_as_parent(tmp_path):
    with recording_server() as (url, updates):
        run_job(tmp_path, FAMILY, url)
        ended = finals(updates)
    epoch = ended["epoch"]["task_id"]
    assert [ended["batch %d" % i].get("parent") for i in (0, 1)] == [epoch, epoch]
    assert {desc for desc, u in ended.items() if "parent" in u} == {"batch 0", "batch 1"}


@pytest.mark.parametrize("env, run, rank", [
    ({"SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "4", "SLURM_PROCID": "2"}, "slurm-77_4", 2),
    ({"TORCHELASTIC_RUN_ID": "exp142", "RANK": "5"}, "exp142", 5),
    ({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "exp142", "RANK": "1"}, "slurm-77", 1),
    ({"PROGRESSISTA_RUN": "mine", "PROGRESSISTA_RUN_NAME": "sweep 3", "SLURM_JOB_ID": "77"},
     "mine", None),
])
def test_a_launchers_variables_give_every_bar_its_run_and_rank(tmp_path, env, run, rank):
    with recording_server() as (url, updates):
        run_job(tmp_path, FAMILY, url, **env)
        ended = finals(updates)
    assert {u["run"] for u in updates} == {run}
    assert {u["meta"].get("rank") for u in ended.values()} == {rank}
    assert {u.get("run_name") for u in updates} == {env.get("PROGRESSISTA_RUN_NAME")}


def test_torchruns_none_run_id_is_no_run_id(tmp_path):
    with recording_server() as (url, updates):
        run_job(tmp_path, "from progressista_client import tqdm\n"
                          "for _ in tqdm(range(2), desc='x'): pass\n",
                url, TORCHELASTIC_RUN_ID="none")
    assert {u["run"][:4] for u in updates} == {"run-"}


def test_run_and_parent_arguments_win_and_an_empty_one_means_none(tmp_path):
    with recording_server() as (url, updates):
        run_job(tmp_path, """\
            from progressista_client import tqdm
            outer = tqdm(total=1, desc="outer", run="exp-9", run_name="nine")
            adopted = tqdm(total=1, desc="adopted", parent="elsewhere")
            orphan = tqdm(total=1, desc="orphan", parent="", run="")
            nested = tqdm(total=1, desc="nested", parent=outer)
            for bar in (nested, orphan, adopted, outer):
                bar.close()
        """, url, PROGRESSISTA_RUN="from-env")
        ended = finals(updates)
    summary = {desc: (u.get("run"), u.get("run_name"), u.get("parent")) for desc, u in ended.items()}
    assert summary == {"outer": ("exp-9", "nine", None),
                       "adopted": ("from-env", None, "elsewhere"),
                       "orphan": (None, None, None),
                       "nested": ("from-env", None, ended["outer"]["task_id"])}


def test_run_ids_and_names_are_clipped_to_the_protocols_limits(tmp_path):
    with recording_server() as (url, updates):
        run_job(tmp_path, "from progressista_client import tqdm\n"
                          "for _ in tqdm(range(2), desc='x', parent='p' * 300): pass\n",
                url, PROGRESSISTA_RUN="r" * 300, PROGRESSISTA_RUN_NAME="n" * 1200)
    (update,) = finals(updates).values()
    assert (len(update["run"]), len(update["parent"]), len(update["run_name"])) == (256, 256, 1000)


# --- `progressista run` names the run ---

def test_progressista_run_puts_the_program_and_its_children_in_one_run_named_by_its_command(
        tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""\
        import subprocess, sys
        from tqdm import tqdm
        for _ in tqdm(range(2), desc="main"):
            pass
        subprocess.run([sys.executable, "-c",
                        "from tqdm import tqdm\\nfor _ in tqdm(range(2), desc='child'): pass"])
        left_open = tqdm(total=5, desc="open")
        left_open.update(2)
    """))
    with recording_server() as (url, updates):
        result = run_cli("run", "--server-url", url, str(script), "--", "--lr", "0.1",
                         env=clean_env())
        assert result.returncode == 0, result.stderr
        ended = finals(updates)
    assert sorted(ended) == ["child", "main", "open"]
    assert ended["open"]["status"] == "close"  # ended by `run` itself, from its record
    assert {(u["run"][:4], u["run_name"]) for u in updates} == {("run-", "%s --lr 0.1" % script)}
    assert len({u["run"] for u in updates}) == 1


# --- The rules, as pure functions ---

@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"PROGRESSISTA_RUN": " exp-1 ", "SLURM_JOB_ID": "11"}, "exp-1"),
    ({"SLURM_JOB_ID": "11"}, "slurm-11"),
    ({"SLURM_JOB_ID": "11", "SLURM_ARRAY_TASK_ID": "0"}, "slurm-11_0"),
    ({"PBS_JOBID": "12[5].head", "PBS_ARRAY_INDEX": "5"}, "pbs-12[5].head"),
    ({"LSB_JOBID": "13", "LSB_JOBINDEX": "0"}, "lsf-13"),
    ({"LSB_JOBID": "13", "LSB_JOBINDEX": "2"}, "lsf-13_2"),
    ({"JOB_ID": "14", "SGE_TASK_ID": "undefined"}, "sge-14"),
    ({"JOB_ID": "14", "SGE_TASK_ID": "3"}, "sge-14_3"),
    ({"TORCHELASTIC_RUN_ID": "none"}, None),
    ({"TORCHELASTIC_RUN_ID": "42abc"}, "42abc"),
])
def test_run_from_environment_follows_the_protocols_order(environ, expected):
    assert pc.run_from_environment(environ) == expected


@pytest.mark.parametrize("environ, rank", [
    ({"RANK": "3", "SLURM_PROCID": "9"}, 3),
    ({"SLURM_PROCID": "9"}, 9),
    ({"OMPI_COMM_WORLD_RANK": "4"}, 4),
    ({"PMI_RANK": "6"}, 6),
    ({"RANK": "head"}, "head"),
    ({}, None),
])
def test_the_rank_comes_from_the_first_launcher_variable_set(environ, rank):
    assert pc.default_meta(environ).get("rank") == rank


def test_the_module_puts_its_run_in_the_environment_for_child_processes():
    result = subprocess.run(
        [sys.executable, "-c", "import os, progressista_client as pc\n"
                               "print(os.environ['PROGRESSISTA_RUN'] == pc._process_run)"],
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        env=clean_env(PYTHONPATH=ROOT))
    assert result.stdout.strip() == "True", result.stderr
