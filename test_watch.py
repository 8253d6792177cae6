"""Tests of `progressista watch`: the remote bars, live in a terminal.

The pure core (format_row, render_table, apply_feed_message, watch_urls) is tested with
a fixed `now` and no terminal; `watch --once` and `--json` run as subprocesses against a
real server; the live mode runs as a subprocess in a pseudo-terminal (os.openpty, with a
window size set through TIOCSWINSZ) whose output is read back frame by frame.
"""

import argparse
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading

import pytest
import tqdm

import progressista
from conftest import (ServerThread, bearer, clean_env, free_port, http, new_id, post_ok, run_cli,
                      running_server, wait_for)

pytestmark = pytest.mark.timeout(30)

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "progressista.py")
NOW = 1_000_000.0
TOKEN = "watch-token"

def task(**fields):
    """A task in its wire form, as GET /tasks and /ws send it."""
    wire = {"task_id": new_id("watch"), "desc": "train", "n": 30, "total": 100, "unit": "it",
            "unit_scale": False, "unit_divisor": 1000, "rate": 2.5, "elapsed": 12.0,
            "postfix": None, "status": "running", "error": None, "meta": {}, "seq": 1,
            "timestamp": NOW - 1, "created_at": NOW - 20, "updated_at": NOW - 1}
    wire.update(fields)
    return wire


def tasks_by_id(*tasks):
    return {one["task_id"]: one for one in tasks}


def cells(text):
    return progressista._cells(text)


# --- One row: format_row ----------------------------------------------------------------


def test_row_is_tqdms_own_meter_after_a_blank_status_column():
    row = progressista.format_row(task(updated_at=NOW), NOW, None)
    expected = tqdm.tqdm.format_meter(30, 100, 12.0, prefix="train", unit="it", rate=2.5)
    assert row == " " * progressista.STATUS_COLUMN_CELLS + expected


def test_row_uses_tqdm_when_it_is_importable():
    assert progressista.default_meter() is progressista.tqdm_meter
    one = task(postfix="loss=0.12", unit="B", unit_scale=True, unit_divisor=1024,
               n=3 * 2 ** 30, total=6 * 2 ** 30, rate=None, updated_at=NOW)
    expected = tqdm.tqdm.format_meter(3 * 2 ** 30, 6 * 2 ** 30, 12.0, ncols=74, prefix="train",
                                      unit="B", unit_scale=True, unit_divisor=1024,
                                      postfix="loss=0.12")
    assert progressista.format_row(one, NOW, 80) == " " * 6 + expected


def test_row_falls_back_to_the_built_in_meter_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert progressista.default_meter() is progressista.plain_meter
    row = progressista.format_row(task(updated_at=NOW), NOW, 80)
    assert re.fullmatch(r" {6}train:  30%\|█+ *\| 30/100 \[00:12<00:28,  2\.50it/s\]", row)
    assert cells(row) == 80


@pytest.mark.parametrize("fields", [
    {},
    {"postfix": "loss=0.12, acc=0.9"},
    {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "n": 3.1e9, "total": 6e9},
    {"rate": 0.02, "n": 3},
    {"total": None},
    {"n": 150},
    {"unit_scale": 0.5, "n": 100, "total": 400},
    {"rate": None, "elapsed": 0},
    {"status": "error", "rate": None},
    {"status": "close", "n": 100},
], ids=lambda fields: ",".join(fields) or "plain")
def test_built_in_meter_reads_as_tqdms_apart_from_the_bar(fields):
    one = progressista.meter_fields(task(**fields), NOW)
    bar = re.compile(r"\|[^|]*\|")
    plain, real = progressista.plain_meter(one, 70), progressista.tqdm_meter(one, 70)
    assert bar.sub("||", plain) == bar.sub("||", real)
    assert cells(plain) == cells(real)


def test_running_rows_elapsed_keeps_counting_between_updates():
    row = progressista.format_row(task(elapsed=12.0, updated_at=NOW - 5), NOW, None)
    assert "[00:17<" in row


def test_stale_row_says_so_and_for_how_long_with_no_eta():
    one = task(status="stale", elapsed=12.0, updated_at=NOW - 75)
    row = progressista.format_row(one, NOW, None)
    assert row.startswith("stale ")
    assert "[00:12<?," in row  # its clock stopped; a silent task has no honest ETA
    assert row.endswith("no update for 01:15")


def test_error_row_shows_the_first_line_of_its_error_after_the_bar():
    one = task(status="error", error="ValueError: bad batch\n  File \"train.py\", line 3")
    row = progressista.format_row(one, NOW, 120)
    assert row.startswith("error train:  30%|")
    assert "[00:12<?," in row
    assert row.endswith("]  ValueError: bad batch")
    assert cells(row) == 120


def test_error_row_of_a_raw_traceback_shows_its_last_line_the_exception():
    one = task(status="error", error="Traceback (most recent call last):\n  File \"x.py\", "
                                     "line 1\nRuntimeError: CUDA out of memory\n")
    row = progressista.format_row(one, NOW, 120)
    assert row.endswith("]  RuntimeError: CUDA out of memory")


def test_narrow_error_row_keeps_the_bar_and_cuts_the_error():
    one = task(status="error", error="RuntimeError: " + "x" * 200)
    row = progressista.format_row(one, NOW, 90)
    assert cells(row) == 90
    assert "|███" in row and "30/100" in row
    assert row.endswith("…") and "RuntimeError" in row


def test_narrow_error_row_gives_up_the_postfix_before_the_error():
    one = task(status="error", error="KeyError: 'date'", postfix="loss=0.0123, lr=3e-4")
    assert "loss=" in progressista.format_row(one, NOW, 200)
    row = progressista.format_row(one, NOW, 75)
    assert row.endswith("]  KeyError: 'date'") and "loss=" not in row
    assert cells(row) <= 75


def test_done_row_says_done_with_no_time_left():
    row = progressista.format_row(task(status="close", n=60), NOW, None)
    assert row.startswith("done  train:  60%|")
    assert "[00:12<00:00," in row


def test_task_without_desc_is_labelled_by_its_id():
    one = task(desc=None, task_id="job-17")
    assert "job-17:  30%|" in progressista.format_row(one, NOW, 80)


@pytest.mark.parametrize("width", [1, 5, 6, 7, 12, 20, 33, 50, 80, 200])
@pytest.mark.parametrize("fields", [
    {},
    {"desc": "処理中のデータセット" * 8, "postfix": "損失=0.12"},
    {"status": "error", "error": "E" * 300, "postfix": "p" * 300},
    {"status": "stale"},
    {"total": None, "desc": "d" * 500},
    {"desc": "e\u0301" * 40},  # combining accents take no cell
], ids=["plain", "wide", "long-error", "stale", "no-total", "combining"])
def test_row_never_exceeds_the_width(width, fields):
    assert cells(progressista.format_row(task(**fields), NOW, width)) <= width


def test_long_description_is_cut_so_the_numbers_still_show():
    row = progressista.format_row(task(desc="d" * 500), NOW, 100)
    assert "…:  30%|" in row and row.endswith("2.50it/s]")


def test_control_characters_in_task_fields_cannot_reach_the_terminal():
    one = task(desc="evil\x1b[2J\x1b]0;title\x07", postfix="a\x9bb\nc", status="error",
               error="\x1b[31mboom\u202e", task_id="id\x00", meta={"k": "\x1b"})
    for width in (None, 200):
        row = progressista.format_row(one, NOW, width)
        assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", row), row
    lines = progressista.render_table(tasks_by_id(one), NOW, 200, 10, source="http://h\x1b")
    assert not re.search("[\x00-\x1f\x7f-\x9f]", "".join(lines))


# --- The table: render_table ------------------------------------------------------------


def test_table_has_a_header_then_one_row_per_task():
    lines = progressista.render_table(tasks_by_id(task(desc="a"), task(desc="b")), NOW, 100,
                                      20, source="http://dash:8000")
    assert lines[0] == "progressista · http://dash:8000 · 2 tasks: 2 running"
    assert [line[6:8] for line in lines[1:]] == ["a:", "b:"]


def test_table_cut_to_the_height_ends_with_how_many_more_by_status():
    many = [task(desc=f"run {i}") for i in range(5)] + [
        task(desc=f"done {i}", status="close") for i in range(3)] + [task(status="error")]
    lines = progressista.render_table(tasks_by_id(*many), NOW, 80, 5)
    assert len(lines) == 5
    assert [line[6:11] for line in lines[1:4]] == ["run 0", "run 1", "run 2"]
    assert lines[4] == "+6 more (2 running, 3 done, 1 error)"


def test_table_that_fits_has_no_more_line():
    lines = progressista.render_table(tasks_by_id(task(), task(), task()), NOW, 80, 4)
    assert len(lines) == 4 and not lines[-1].startswith("+")


def test_table_lines_never_exceed_the_width_or_the_height():
    many = tasks_by_id(*[task(desc="処理" * 30, status=status)
                         for status in ("running", "stale", "close", "error") * 5])
    for width, height in ((1, 1), (10, 2), (40, 3), (80, 30), (7, 100)):
        lines = progressista.render_table(many, NOW, width, height, notice="reconnecting " * 9)
        assert len(lines) <= height
        assert all(cells(line) <= width for line in lines)


def test_unfinished_tasks_come_first_in_server_order_then_errors_then_done_latest_first():
    listed = [task(desc="old done", status="close", updated_at=NOW - 50),
              task(desc="first run"),
              task(desc="new done", status="close", updated_at=NOW - 5),
              task(desc="failed", status="error"),
              task(desc="silent", status="stale"),
              task(desc="last run")]
    lines = progressista.render_table(tasks_by_id(*listed), NOW, None, None)
    labels = [line[6:].split(":")[0] for line in lines[1:]]
    assert labels == ["first run", "silent", "last run", "failed", "new done", "old done"]


def test_unfinished_tasks_are_in_creation_order_however_an_update_listed_them():
    listed = {name: task(task_id=name, desc=name, created_at=NOW - age)
              for name, age in (("second", 5), ("third", 1), ("first", 9))}
    lines = progressista.render_table(listed, NOW, None, None)
    assert [line[6:].split(":")[0] for line in lines[1:]] == ["first", "second", "third"]


@pytest.mark.parametrize("text", ["RESNET", "host=gpu7", "loss=0.3", "CUDA out", "job-x",
                                  "done"])
def test_filter_matches_id_description_postfix_error_meta_and_status(text):
    wanted = [task(desc="ResNet-50"), task(meta={"host": "gpu7"}), task(postfix="loss=0.31"),
              task(status="error", error="CUDA out of memory"), task(task_id="job-x-1"),
              task(status="close")]
    other = task(desc="other", task_id="zzz")
    matching = [one for one in wanted + [other] if progressista.task_matches(one, text)]
    assert other not in matching and len(matching) == 1


@pytest.mark.parametrize("status, expected", [
    ("running", {"r"}), ("stale", {"s"}), ("close", {"c"}), ("error", {"e"}),
    ("active", {"r", "s"}), (None, {"r", "s", "c", "e"})])
def test_status_filter_keeps_one_status_or_the_active_ones(status, expected):
    listed = tasks_by_id(*[task(desc=name, status=full) for name, full in
                           (("r", "running"), ("s", "stale"), ("c", "close"), ("e", "error"))])
    lines = progressista.render_table(listed, NOW, None, None, status=status)
    assert {line[6:].split(":")[0] for line in lines[1:]} == expected


def test_header_counts_the_matching_tasks_out_of_all_and_names_the_filters():
    listed = tasks_by_id(task(desc="a"), task(desc="b", status="error"), task(desc="ab"))
    lines = progressista.render_table(listed, NOW, None, None, text_filter="a",
                                      status="running")
    assert lines[0] == "progressista · 2 tasks of 3: 2 running · filter 'a' · status running"


def test_notice_shows_under_the_header_above_the_rows():
    lines = progressista.render_table(tasks_by_id(task()), NOW, 100, 10,
                                      notice="reconnecting to ws://h/ws: connection refused")
    assert lines[1] == "reconnecting to ws://h/ws: connection refused"
    assert "train:" in lines[2]


def test_empty_table_says_why():
    assert progressista.render_table({}, NOW, 80, 10)[1:] == ["no tasks yet"]
    lines = progressista.render_table(tasks_by_id(task()), NOW, 80, 10, text_filter="nope")
    assert lines[1:] == ["no task matches"]


def test_terminal_that_cannot_show_blocks_gets_tqdms_ascii_bar():
    row = progressista.format_row(task(), NOW, 80, ascii=True)
    assert row.isascii() and "|###" in row


# --- Runs: run rows with their bars, --runs, --bars ---------------------------------------


def summary(run="exp-142", **fields):
    """A run's summary in its wire form (docs/PROTOCOL.md "Runs")."""
    wire = {"run": run, "name": run, "status": "running", "counts": {"running": 2, "close": 1},
            "tasks": 3, "hosts": ["gpu-01", "gpu-02"], "progress": 0.4, "eta": 30.0,
            "created_at": NOW - 65, "updated_at": NOW - 10, "ended_at": None}
    wire.update(fields)
    return wire


def a_run():
    """exp-142: an epoch bar with a batch bar nested in it on gpu-01, a rank on gpu-02, a
    failed rank; and a bar of no run."""
    epoch = task(task_id="epoch", desc="epoch", run="exp-142", n=3, total=10, created_at=NOW - 60,
                 meta={"host": "gpu-01"})
    batch = task(task_id="batch", desc="batch", run="exp-142", parent="epoch", n=50, total=100,
                 created_at=NOW - 50, meta={"host": "gpu-01", "rank": 0})
    other = task(task_id="rank1", desc="a much longer description of rank 1", run="exp-142",
                 created_at=NOW - 55, meta={"host": "gpu-02", "rank": 1})
    failed = task(task_id="rank2", desc="rank2", run="exp-142", status="error",
                  error="KeyError: 'date'", meta={"host": "gpu-02", "rank": 2})
    loose = task(task_id="loose", desc="loose", created_at=NOW - 70)
    runs = {"exp-142": summary(counts={"running": 3, "error": 1}, tasks=4)}
    return tasks_by_id(epoch, batch, other, failed, loose), runs


def bar_column(line):
    """Where a row's bar starts: the cell of the "|" after its percentage."""
    match = re.search(r"\d+%\|", line)
    return cells(line[:match.end()]) if match else None


def test_with_runs_each_run_row_has_its_bars_indented_under_it_children_under_parents():
    tasks, runs = a_run()
    lines = progressista.render_table(tasks, NOW, 120, None, runs=runs)
    assert lines[0] == "progressista · 1 run, 5 tasks: 4 running, 1 error"
    labels = [line[6:].split(":")[0] for line in lines[1:]]
    assert labels == ["exp-142", "  epoch", "    batch", "  a much longer description of rank 1",
                      "  rank2", "loose"]


def test_run_row_shows_status_progress_bars_done_failed_hosts_and_eta():
    row = progressista.format_run_row(summary(counts={"running": 2, "close": 1, "error": 1},
                                              tasks=4), NOW, None, label_cells=10,
                                      host_cells=16)
    assert row == ("      exp-142:   gpu-01, gpu-02    40%|████      | 1/4 bars, 1 failed "
                   "[01:05<00:20]")  # eta: 30 s after updated_at, 10 s ago
    ended = summary(status="close", counts={"close": 3}, ended_at=NOW - 5, progress=1.0,
                    eta=None, hosts=["a", "b", "c", "d"])
    assert progressista.format_run_row(ended, NOW, None, label_cells=8, host_cells=8) == (
        "done  exp-142: a, b +2  100%|██████████| 3/3 bars [01:00<00:00]")
    unknown = summary(status="stale", progress=None, hosts=[])
    assert progressista.format_run_row(unknown, NOW, None) == (
        "stale exp-142: 1/3 bars [01:05<?]")


def test_bars_start_in_one_column_whatever_their_descriptions_length_and_show_their_host():
    tasks, runs = a_run()
    for view in ("tree", "runs", "bars"):
        lines = progressista.render_table(tasks, NOW, 120, None, runs=runs, view=view)
        columns = {bar_column(line) for line in lines[1:] if bar_column(line)}
        assert len(columns) == 1, (view, lines)
    lines = progressista.render_table(tasks, NOW, 120, None, runs=runs)
    assert re.search(r"    batch: +gpu-01 r0 +50%\|", lines[3])
    assert re.search(r"exp-142: +gpu-01, gpu-02 +\d+%\|", lines[1])


def test_runs_view_lists_run_rows_and_the_bars_without_a_run_only():
    tasks, runs = a_run()
    lines = progressista.render_table(tasks, NOW, 120, None, runs=runs, view="runs")
    assert [line[6:].split(":")[0] for line in lines[1:]] == ["exp-142", "loose"]
    assert "0/4 bars, 1 failed" in lines[1]


def test_bars_view_is_the_flat_list_without_run_rows():
    tasks, runs = a_run()
    lines = progressista.render_table(tasks, NOW, 120, None, runs=runs, view="bars")
    assert lines[0] == "progressista · 5 tasks: 4 running, 1 error"
    assert [line[6:].split(":")[0] for line in lines[1:]] == [
        "loose", "epoch", "a much longer description of rank 1", "batch", "rank2"]
    assert progressista.render_table(tasks, NOW, 120, None)[1:] == lines[1:]  # no runs: flat


def test_filter_keeps_a_run_for_its_matching_bars_or_for_its_own_name():
    tasks, runs = a_run()
    by_error = progressista.render_table(tasks, NOW, 120, None, status="error", runs=runs)
    assert [line[6:].split(":")[0] for line in by_error[1:]] == ["exp-142", "  rank2"]
    by_name = progressista.render_table(tasks, NOW, 120, None, "exp-142", runs=runs)
    assert len(by_name) == 1 + 5  # the run matched: all its bars under it
    by_bar = progressista.render_table(tasks, NOW, 120, None, "loose", runs=runs)
    assert [line[6:].split(":")[0] for line in by_bar[1:]] == ["loose"]


@pytest.mark.parametrize("width", [1, 7, 20, 40, 80, 200])
@pytest.mark.parametrize("view", ["tree", "runs", "bars"])
def test_run_tables_never_exceed_the_width_or_the_height(width, view):
    tasks, runs = a_run()
    lines = progressista.render_table(tasks, NOW, width, 5, runs=runs, view=view)
    assert len(lines) <= 5 and all(cells(line) <= width for line in lines)


def test_run_table_cut_to_the_height_says_how_many_runs_and_bars_are_hidden():
    tasks, runs = a_run()
    runs["other"] = summary("other", status="close", counts={"close": 1}, tasks=1)
    tasks["o1"] = task(task_id="o1", run="other", status="close")
    lines = progressista.render_table(tasks, NOW, 120, 5, runs=runs)
    assert lines[-1] == "+5 more (1 run; 2 running, 1 done, 1 error)"


def test_finished_leave_false_bars_fold_into_one_row_under_their_parent():
    tasks, runs = a_run()
    for index in range(3):  # three finished inner bars of a leave=False loop
        tasks[f"old{index}"] = task(task_id=f"old{index}", desc="batch", run="exp-142",
                                    parent="epoch", status="close", transient=True)
    tasks["kept"] = task(task_id="kept", desc="kept", run="exp-142", parent="epoch",
                         status="close")  # leave=True: stays a row
    lines = progressista.render_table(tasks, NOW, 120, None, runs=runs)
    assert [line[6:].split(":")[0] for line in lines[1:4]] == ["exp-142", "  epoch", "    batch"]
    assert lines[4].startswith("done      kept:")
    assert lines[5] == "done      +3 finished inner bars"
    filtered = progressista.render_table(tasks, NOW, 120, None, status="close", runs=runs)
    assert sum("batch" in line for line in filtered) == 3  # asked for: shown one by one
    rows = progressista.watch_rows(tasks, runs, fold=False)
    assert {"old0", "old1", "old2"} <= {item["task_id"] for kind, item, _ in rows
                                        if kind == "bar"}


def test_feed_messages_keep_the_runs_current():
    tasks, runs = {}, {"old": summary("old")}
    snapshot = {"type": "snapshot", "tasks": {}, "runs": {"a": summary("a")}, "more": True,
                "now": NOW}
    progressista.apply_feed_message(tasks, snapshot, runs)
    assert list(runs) == ["a"]
    progressista.apply_feed_message(tasks, {"type": "snapshot_more", "tasks": {}, "now": NOW},
                                    runs)
    update = {"type": "update", "tasks": {}, "runs": {"a": summary("a", progress=0.9),
                                                       "b": summary("b")}, "now": NOW}
    progressista.apply_feed_message(tasks, update, runs)
    assert list(runs) == ["a", "b"] and runs["a"]["progress"] == 0.9
    progressista.apply_feed_message(tasks, {"type": "remove", "ids": [], "runs": ["a"],
                                            "now": NOW}, runs)
    assert list(runs) == ["b"]
    progressista.apply_feed_message(tasks, {"type": "snapshot", "tasks": {}, "now": NOW}, runs)
    assert runs == {}  # a server without runs


# --- The feed and the URLs ----------------------------------------------------------------


def test_feed_messages_keep_a_dict_of_tasks_in_the_servers_order():
    tasks = {"old": {"task_id": "old"}}
    a, b = task(task_id="a"), task(task_id="b")
    snapshot = {"type": "snapshot", "tasks": {"a": a, "b": b}, "now": NOW}
    assert progressista.apply_feed_message(tasks, snapshot) == NOW
    assert list(tasks) == ["a", "b"]
    update = {"type": "update", "tasks": {"a": dict(a, n=99), "c": task(task_id="c")},
              "now": NOW + 1}
    assert progressista.apply_feed_message(tasks, update) == NOW + 1
    assert list(tasks) == ["a", "b", "c"] and tasks["a"]["n"] == 99
    progressista.apply_feed_message(tasks, {"type": "remove", "ids": ["b", "zz"], "now": NOW})
    assert list(tasks) == ["a", "c"]


def test_feed_message_of_unknown_kind_changes_nothing():
    tasks = {"a": task(task_id="a")}
    assert progressista.apply_feed_message(tasks, {"type": "hello", "tasks": {}}) is None
    assert progressista.apply_feed_message(tasks, ["not", "an", "object"]) is None
    progressista.apply_feed_message(tasks, {"type": "update", "tasks": {"x": "not a task"}})
    assert list(tasks) == ["a"]


@pytest.mark.parametrize("server, base, ws", [
    ("http://dash:8000", "http://dash:8000", "ws://dash:8000/ws"),
    ("http://dash:8000/progress", "http://dash:8000", "ws://dash:8000/ws"),
    ("https://example.org/prog/", "https://example.org/prog", "wss://example.org/prog/ws"),
    ("https://example.org/prog/progress?x=1", "https://example.org/prog",
     "wss://example.org/prog/ws"),
    ("ws://dash:8000/ws", "http://dash:8000", "ws://dash:8000/ws"),
    ("http://dash:8000/static/index.html?token=t&q=x", "http://dash:8000",
     "ws://dash:8000/ws"),
])
def test_server_url_gives_the_http_base_and_the_feed_url(server, base, ws):
    assert progressista.watch_urls(server) == (base, ws)


@pytest.mark.parametrize("server", ["dash:8000", "ftp://dash", "http://", "",
                                    "http://127.0.0.1:99999", "http://host:port", "http://[::1"])
def test_server_url_that_is_not_http_is_refused(server):
    with pytest.raises(ValueError, match="expected http"):
        progressista.watch_urls(server)


def test_status_flag_accepts_done_for_close_and_names_the_choices_otherwise():
    assert progressista.watch_status("Done") == "close"
    assert progressista.watch_status("active") == "active"
    with pytest.raises(argparse.ArgumentTypeError,
                       match="running, stalled, stale, close, error, active"):
        progressista.watch_status("finished")


class FakeTerminal:
    def __init__(self):
        self.written = []

    def isatty(self):
        return True

    def write(self, text):
        self.written.append(text)

    def flush(self):
        pass


def test_screen_redraws_from_the_top_of_the_last_frame(monkeypatch):
    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((40, 10)))
    terminal = FakeTerminal()
    screen = progressista._Screen(terminal, colour=False)
    screen.draw(["header", "row 1", "row 2"])
    screen.draw(["header", "row 1"])
    assert terminal.written[0] == "\x1b[?25l\x1b[Jheader\r\nrow 1\r\nrow 2"
    assert terminal.written[1] == "\r\x1b[2A\x1b[Jheader\r\nrow 1"
    screen.close()
    assert terminal.written[2] == "\r\n\x1b[?25h"


def test_screen_after_a_resize_counts_the_rows_the_old_lines_wrapped_into(monkeypatch):
    size = [os.terminal_size((40, 10))]
    monkeypatch.setattr("shutil.get_terminal_size", lambda: size[0])
    terminal = FakeTerminal()
    screen = progressista._Screen(terminal, colour=False)
    screen.draw(["h" * 40, "r" * 25])
    size[0] = os.terminal_size((20, 10))
    screen.draw(["h" * 20])
    assert terminal.written[1].startswith("\r\x1b[3A\x1b[J")  # 2 rows + 2 rows, less 1


# --- The command line: --once and --json against a real server --------------------------


def run_watch(*args, **variables):
    """`progressista watch ARGS` to its end, in a clean environment plus `variables`."""
    return run_cli("watch", *args, timeout=10, **variables)


def test_once_prints_the_table_whole_when_not_a_terminal(shared_server):
    long_desc = " ".join(["a description much longer than any terminal"] * 5)
    post_ok(shared_server, [
        {"task_id": new_id(), "desc": long_desc, "n": 5, "total": 10, "elapsed": 3},
        {"task_id": new_id(), "desc": "once-failed", "n": 1, "total": 4, "status": "error",
         "error": "OSError: disk full"}])
    result = run_watch("--once", "--server", shared_server.url)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert result.stdout.startswith(f"progressista · {shared_server.url} · ")
    # Elapsed is 3 s as sent, plus however long a busy machine took to run watch.
    assert re.search(rf"^      {re.escape(long_desc)}:  50%\|█████     \| 5/10 \[00:\d\d<",
                     result.stdout, re.MULTILINE)
    assert re.search(r"^error once-failed: +25%\|.*\]  OSError: disk full$", result.stdout,
                     re.MULTILINE)


def test_once_with_a_status_shows_only_those_tasks(shared_server):
    failed, running = new_id("failed"), new_id("running")
    post_ok(shared_server, [{"task_id": failed, "status": "error", "error": "boom"},
                            {"task_id": running}])
    result = run_watch("--once", "--status", "error", "--server", shared_server.url)
    assert result.returncode == 0, result.stderr
    assert failed in result.stdout and running not in result.stdout
    rows = result.stdout.splitlines()[1:]
    assert rows and all(row.startswith("error ") for row in rows)


def test_once_with_a_status_that_matches_nothing_counts_what_there_is():
    with running_server() as empty_of_errors:
        post_ok(empty_of_errors, [{"task_id": "a"}, {"task_id": "b", "status": "close"}])
        result = run_watch("--once", "--status", "error", "--server", empty_of_errors.url)
    assert result.returncode == 0, result.stderr
    header, body = result.stdout.splitlines()
    assert "0 tasks of 2" in header and body == "no task matches"


def test_an_empty_server_flag_is_refused_not_read_as_the_default():
    result = run_watch("--once", "--server", "")
    assert result.returncode == 2 and "--server ''" in result.stderr


def test_json_prints_the_filtered_snapshot(shared_server):
    label = new_id("json")
    post_ok(shared_server, [
        {"task_id": label + "-a", "desc": "JSON target", "n": 2, "meta": {"k": "v"}},
        {"task_id": label + "-b", "desc": "JSON target", "status": "close"},
        {"task_id": new_id(), "desc": "something else"}])
    result = run_watch("--json", "--filter", label, "--status", "active",
                       "--server", shared_server.url)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert list(snapshot["tasks"]) == [label + "-a"]
    assert snapshot["tasks"][label + "-a"]["meta"] == {"k": "v"}
    assert isinstance(snapshot["now"], float)


def test_server_url_from_the_environment_may_be_the_client_url(shared_server):
    marker = new_id("env")
    post_ok(shared_server, {"task_id": marker})
    result = run_watch("--json", "--filter", marker,
                       PROGRESSISTA_SERVER_URL=shared_server.url + "/progress")
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)["tasks"]) == [marker]


def test_once_with_the_token_from_the_environment_is_let_in():
    with running_server(api_tokens=[TOKEN]) as guarded:
        post_ok(guarded, {"task_id": "guarded-task"}, bearer(TOKEN))
        result = run_watch("--once", "--server", guarded.url,
                           PROGRESSISTA_API_TOKEN=TOKEN)
        assert result.returncode == 0, result.stderr
        assert "guarded-task" in result.stdout


@pytest.mark.parametrize("path", ["/", "/static/index.html"])
def test_a_shared_dashboard_link_with_its_token_lets_watch_in(path):
    with running_server(api_tokens=[TOKEN], read_tokens=["viewer"]) as guarded:
        post_ok(guarded, {"task_id": "shared-task"}, bearer(TOKEN))
        result = run_watch("--once", "--server", f"{guarded.url}{path}?token=viewer")
    assert result.returncode == 0, result.stderr
    assert "shared-task" in result.stdout


def test_once_without_the_token_exits_1_with_the_servers_message():
    with running_server(api_tokens=[TOKEN]) as guarded:
        result = run_watch("--once", "--server", guarded.url, "--token", "wrong")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"progressista watch: {guarded.url}/tasks: HTTP 401: missing or wrong token: send "
        "'Authorization: Bearer <token>' or add ?token=<token> to the URL")


def test_once_against_no_server_exits_1_with_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_watch("--once", "--server", url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"progressista watch: cannot reach {url}: ")


@pytest.mark.parametrize("args, message", [
    (["--status", "finished"], "--status: must be one of"),
    (["--server", "dash:8000", "--once"], "expected http(s)://host"),
    (["--interval", "0"], "--interval: must be a number of seconds > 0"),
])
def test_bad_flags_exit_2_saying_what_to_fix(args, message):
    result = run_watch(*args)
    assert result.returncode == 2
    assert message in result.stderr


# --- The live mode ---------------------------------------------------------------------------


class WatchProcess:
    """`progressista watch ARGS` as a subprocess, its output read by a thread."""

    def __init__(self, *args, pty_size=None, env=None):
        command = [sys.executable, PROGRAM, "watch", "--interval", "0.05", *args]
        self.master = None
        if pty_size is None:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=env or clean_env())
            source = self.proc.stdout.fileno()
        else:
            self.master, slave = os.openpty()
            self.resize(*pty_size, fd=slave)
            self.proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave,
                                         env=env or clean_env())
            os.close(slave)
            source = self.master
        self.received = bytearray()
        self.reader = threading.Thread(target=self._read, args=(source,), daemon=True)
        self.reader.start()

    def _read(self, fd):
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its end of the terminal
                return
            if not data:
                return
            self.received += data

    def resize(self, rows, columns, fd=None):
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ,
                    struct.pack("HHHH", rows, columns, 0, 0))

    @property
    def output(self):
        return bytes(self.received).decode("utf-8", "replace")

    def frames(self):
        """The frames drawn in full so far (the last one may be cut short), as plain lines."""
        chunks = self.output.split("\x1b[J")[1:-1]
        return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", chunk).split("\n") for chunk in chunks]

    # Deadlines, not waits: generous, since CI's two cores may be busy with other tests.
    def wait_frame(self, condition, message, timeout=10):
        """The latest complete frame, once one satisfies `condition`."""
        def latest():
            frames = self.frames()
            if self.proc.poll() is not None:
                raise AssertionError(f"watch exited {self.proc.returncode}: {self.output!r}")
            return frames[-1] if frames and condition(frames[-1]) else None
        return wait_for(latest, timeout, message=message)

    def wait_output(self, text, timeout=10):
        return wait_for(lambda: text in self.output, timeout, message=repr(text))

    def stop(self, signum=signal.SIGINT):
        """Send `signum` (Ctrl-C by default); return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(10)
        finally:
            self.reader.join(10)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(2)
        if self.master is not None:
            os.close(self.master)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def watching():
    started = []

    def start(*args, **options):
        started.append(WatchProcess(*args, **options))
        return started[-1]
    yield start
    for process in started:
        process.close()


def has_row(label):
    return lambda frame: any(label in line for line in frame[1:])


def test_watch_in_a_terminal_draws_a_row_per_task_within_its_width(shared_server, watching):
    label = new_id("pty")
    post_ok(shared_server, [{"task_id": f"{label}-{i}", "desc": f"{label} bar {i}", "n": i,
                             "total": 9, "postfix": "x" * 80} for i in range(3)])
    watch = watching("--server", shared_server.url, "--filter", label, pty_size=(20, 60))
    frame = watch.wait_frame(lambda frame: all(has_row(f"bar {i}")(frame) for i in range(3)),
                             "three rows")
    assert frame[0].startswith(f"progressista · {shared_server.url} · 3 tasks of ")
    assert all(cells(line) <= 60 for frame in watch.frames() for line in frame)
    assert watch.output.startswith("\x1b[?25l")  # the cursor is hidden while drawing
    assert watch.stop(signal.SIGINT) == 0
    assert watch.output.endswith("\r\n\x1b[?25h")  # ...and shown again at the end


def test_watch_shows_an_update_and_drops_a_removed_task(shared_server, watching):
    label, kept, gone = new_id("live"), new_id("kept"), new_id("gone")
    post_ok(shared_server, [{"task_id": kept, "desc": label, "n": 1, "total": 10},
                       {"task_id": gone, "desc": label + " gone", "n": 2, "total": 10}])
    watch = watching("--server", shared_server.url, "--filter", label, pty_size=(20, 100))
    watch.wait_frame(lambda frame: "1/10" in "".join(frame) and has_row("gone")(frame),
                     "both tasks")
    post_ok(shared_server, {"task_id": kept, "n": 7})
    watch.wait_frame(lambda frame: "7/10" in "".join(frame), "the update")
    status, body, _ = http("DELETE", shared_server.url + "/tasks/" + gone)
    assert body == {"removed": True}
    frame = watch.wait_frame(lambda frame: not has_row("gone")(frame), "the removal")
    assert "7/10" in "".join(frame)
    assert watch.stop() == 0


def test_watch_in_a_small_window_ends_with_how_many_more(shared_server, watching):
    label = new_id("small")
    post_ok(shared_server, [{"task_id": f"{label}-{i}", "desc": label} for i in range(10)])
    watch = watching("--server", shared_server.url, "--filter", label, pty_size=(5, 80))
    frame = watch.wait_frame(lambda frame: frame[-1].startswith("+"), "the +N more line")
    assert len(frame) == 5
    assert frame[-1] == "+7 more (7 running)"
    assert watch.stop() == 0


def test_watch_fits_each_frame_to_the_terminal_after_a_resize(shared_server, watching):
    label = new_id("resize")
    post_ok(shared_server, {"task_id": label, "desc": label, "n": 3, "total": 9})
    watch = watching("--server", shared_server.url, "--filter", label, pty_size=(20, 100))
    watch.wait_frame(lambda frame: any(cells(line) == 100 for line in frame), "a 100-cell row")
    watch.resize(20, 50)
    frame = watch.wait_frame(lambda frame: has_row(label)(frame) and all(
        cells(line) <= 50 for line in frame), "rows of at most 50 cells")
    assert cells(frame[1]) == 50
    assert watch.stop() == 0


def test_watch_reconnects_when_the_server_restarts_on_the_same_port(watching):
    first = ServerThread().start()
    second = None
    try:
        post_ok(first, {"task_id": "before-restart", "n": 1})
        watch = watching("--server", first.url, pty_size=(20, 100))
        watch.wait_frame(has_row("before-restart"), "the first server's task")
        first.stop()
        frame = watch.wait_frame(lambda frame: frame[1].startswith("reconnecting to "),
                                 "the reconnecting line")
        assert frame[1].startswith(f"reconnecting to ws://127.0.0.1:{first.port}/ws: ")
        assert has_row("before-restart")(frame)  # the last table stays on screen
        second = ServerThread(port=first.port).start()
        post_ok(second, {"task_id": "after-restart", "n": 2})
        frame = watch.wait_frame(has_row("after-restart"), "the second server's task")
        assert not any(line.startswith("reconnecting") for line in frame)
        assert not has_row("before-restart")(frame)  # the new snapshot replaced the old
        assert watch.stop() == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_watch_with_the_token_in_a_header_is_let_in(watching):
    with running_server(api_tokens=[TOKEN]) as guarded:
        post_ok(guarded, {"task_id": "guarded-live"}, bearer(TOKEN))
        watch = watching("--server", guarded.url, "--token", TOKEN, pty_size=(20, 100))
        watch.wait_frame(has_row("guarded-live"), "the guarded task")
        assert watch.stop() == 0


def test_watch_refused_for_its_token_exits_1_with_the_servers_message(watching):
    with running_server(api_tokens=[TOKEN]) as guarded:
        watch = watching("--server", guarded.url, "--token", "wrong", pty_size=(20, 100))
        assert watch.proc.wait(10) == 1
    watch.reader.join(10)
    assert watch.output.strip() == (
        f"progressista watch: ws://127.0.0.1:{guarded.port}/ws: HTTP 401: missing or wrong "
        "token: send 'Authorization: Bearer <token>' or add ?token=<token> to the URL")


def test_watch_stopped_by_sigterm_restores_the_cursor_and_exits_0(shared_server, watching):
    watch = watching("--server", shared_server.url, pty_size=(20, 100))
    watch.wait_output("progressista · ")
    assert watch.stop(signal.SIGTERM) == 0
    assert watch.output.endswith("\x1b[?25h")


def test_watch_not_in_a_terminal_prints_whole_tables_without_ansi(shared_server, watching):
    label = new_id("pipe")
    post_ok(shared_server, {"task_id": label, "desc": label, "n": 1, "total": 3})
    watch = watching("--server", shared_server.url, "--filter", label)
    watch.wait_output(f"{label}:  33%")
    post_ok(shared_server, {"task_id": label, "n": 2})
    watch.wait_output(f"{label}:  67%")
    assert watch.stop() == 0
    assert "\x1b" not in watch.output
    tables = watch.output.strip("\n").split("\n\n")
    assert len(tables) >= 2
    assert all(table.startswith("progressista · ") for table in tables)


def test_watch_not_in_a_terminal_says_when_it_reconnects(watching):
    url = f"http://127.0.0.1:{free_port()}"
    watch = watching("--server", url)
    watch.wait_output(f"reconnecting to ws://{url[7:]}/ws: connection refused (next try in 0.5 s)")
    assert watch.stop() == 0


# --- Runs against a real server: --once, --json, --runs, --bars, live --------------------


RUN_BARS = [
    {"task_id": "ep", "desc": "epoch", "run": "exp-142", "run_name": "resnet", "n": 3,
     "total": 10, "meta": {"host": "gpu-01"}},
    {"task_id": "bt", "desc": "batch", "run": "exp-142", "parent": "ep", "n": 50, "total": 100,
     "meta": {"host": "gpu-01"}},
    {"task_id": "r1", "desc": "rank 1 with a much longer description", "run": "exp-142",
     "n": 1, "total": 4, "status": "error", "error": "KeyError: 'date'",
     "meta": {"host": "gpu-02"}},
    {"task_id": "solo", "desc": "solo", "n": 1, "total": 2},
]


def labels_of(text):
    """The labels of a table's rows (not its header), indentation kept."""
    return [line[6:].split(":")[0] for line in text.splitlines()[1:]]


@pytest.fixture(scope="module")
def run_server():
    with running_server() as server:
        post_ok(server, RUN_BARS)
        yield server


def test_once_shows_each_run_with_its_bars_indented_and_the_host(run_server):
    result = run_watch("--once", "--server", run_server.url)
    assert result.returncode == 0, result.stderr
    assert labels_of(result.stdout) == [
        "resnet", "  epoch", "    batch", "  rank 1 with a much longer description", "solo"]
    lines = result.stdout.splitlines()
    assert re.search(r"^      resnet: +gpu-01, gpu-02 +\d+%\|.*\| 0/3 bars, 1 failed \[", lines[1])
    assert re.search(r"^error   rank 1 with a much longer description: +gpu-02 +25%\|", lines[4])
    assert len({bar_column(line) for line in lines[1:]}) == 1  # the bars in one column


def test_once_with_runs_shows_run_rows_only_and_with_bars_the_flat_list(run_server):
    runs_only = run_watch("--once", "--runs", "--server", run_server.url)
    assert labels_of(runs_only.stdout) == ["resnet", "solo"]
    flat = run_watch("--once", "--bars", "--server", run_server.url)
    assert labels_of(flat.stdout) == [
        "epoch", "batch", "solo", "rank 1 with a much longer description"]
    both = run_watch("--once", "--runs", "--bars", "--server", run_server.url)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_json_includes_the_runs_shown_unless_bars_are_asked_for(run_server):
    tree = json.loads(run_watch("--json", "--server", run_server.url).stdout)
    assert list(tree["runs"]) == ["exp-142"] and tree["runs"]["exp-142"]["name"] == "resnet"
    assert sorted(tree["tasks"]) == ["bt", "ep", "r1", "solo"]
    runs_only = json.loads(run_watch("--json", "--runs", "--server", run_server.url).stdout)
    assert list(runs_only["runs"]) == ["exp-142"] and list(runs_only["tasks"]) == ["solo"]
    flat = json.loads(run_watch("--json", "--bars", "--server", run_server.url).stdout)
    assert "runs" not in flat and sorted(flat["tasks"]) == ["bt", "ep", "r1", "solo"]
    failed = json.loads(run_watch("--json", "--status", "error",
                                  "--server", run_server.url).stdout)
    assert list(failed["runs"]) == ["exp-142"] and list(failed["tasks"]) == ["r1"]


def test_watch_live_shows_a_run_row_that_follows_its_bars_and_its_end(watching):
    with running_server(broadcast_interval=0.02) as server:
        post_ok(server, RUN_BARS[:2])
        watch = watching("--server", server.url, pty_size=(20, 120))
        frame = watch.wait_frame(lambda frame: "0/2 bars" in "".join(frame), "the run row")
        assert [line[6:].split(":")[0] for line in frame[1:]] == ["resnet", "  epoch", "    batch"]
        post_ok(server, [{"task_id": "bt", "run": "exp-142", "parent": "ep", "n": 100,
                          "total": 100, "status": "close"},
                         {"task_id": "ep", "run": "exp-142", "n": 10, "total": 10,
                          "status": "close"}])
        frame = watch.wait_frame(lambda frame: "2/2 bars" in "".join(frame), "the run's end")
        assert frame[1].startswith("done  resnet:") and "100%|" in frame[1]
        http("DELETE", server.url + "/tasks?run=exp-142")
        watch.wait_frame(lambda frame: frame[1:] == ["no tasks yet"], "the run removed")
        assert watch.stop() == 0


def test_a_chain_of_a_thousand_nested_bars_is_drawn_not_a_recursion_error():
    chain = {f"c{i}": task(task_id=f"c{i}", run="chain", parent=f"c{i - 1}" if i else None)
             for i in range(1000)}
    runs = {"chain": {"run": "chain", "name": "chain", "status": "running", "tasks": 1000,
                      "counts": {"running": 1000}, "hosts": [], "progress": None,
                      "eta": None, "created_at": NOW, "updated_at": NOW, "ended_at": None}}
    rows = progressista.watch_rows(chain, runs)
    assert [kind for kind, _, _ in rows].count("bar") == 1000
    # indented under the run row, and no deeper than RUN_MAX_DEPTH levels below it
    assert max(depth for kind, _, depth in rows if kind == "bar") == progressista.RUN_MAX_DEPTH + 1


def test_folded_inner_bars_are_one_row_not_also_listed():
    epoch = task(task_id="e", run="r", desc="epoch")
    inner = {f"b{i}": task(task_id=f"b{i}", run="r", parent="e", transient=True,
                           status="close", desc="batch") for i in range(3)}
    runs = {"r": {"run": "r", "name": "r", "status": "running", "tasks": 4,
                  "counts": {"running": 1, "close": 3}, "hosts": [], "progress": None,
                  "eta": None, "created_at": NOW, "updated_at": NOW, "ended_at": None}}
    rows = progressista.watch_rows({"e": epoch, **inner}, runs)
    assert [(kind, item if kind == "folded" else None) for kind, item, _ in rows
            if kind != "run"] == [("bar", None), ("folded", 3)]
