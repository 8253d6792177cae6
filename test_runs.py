"""Run summaries and run ends: the pure core (PROTOCOL.md "Runs (v2)").

No server and no clock: tasks are built by hand, `now` is a number the test picks, and a
task's shown status is its stored status (the tests set `stale` and `stalled` directly,
as a sweep would report them). `run_summary()` is the definition, checked against values
worked out by hand; `RunIndex` keeps the same figures by running totals, checked by hand
and against `run_summary()` over a long random sequence of changes.
"""

import json
import random

import pytest

import progressista
from progressista import RunIndex, Task, run_summary


def bar(task_id, run="r1", **fields):
    """A task as the store holds it, its fields set by hand."""
    task = Task(task_id, fields.pop("created_at", 0.0))
    task.run = run
    task.updated_at = task.created_at
    for name, value in fields.items():
        setattr(task, name, value)
    return task


def stored_status(task, now):
    return task.status


def summary_of(*tasks, now=1000.0):
    return run_summary("r1", list(tasks), now, stored_status)


class Tracked:
    """A store's tasks and its RunIndex, changed together as a store would."""

    def __init__(self, run_settle_s=10.0):
        self.by_id = {}
        self.index = RunIndex(self.by_id.get, stored_status, run_settle_s)

    def put(self, task):
        self.by_id[task.task_id] = task
        self.index.changed([task.task_id])
        return task

    def update(self, task_id, **fields):
        task = self.by_id[task_id]
        for name, value in fields.items():
            setattr(task, name, value)
        self.index.changed([task_id])

    def delete(self, *task_ids):
        for task_id in task_ids:
            del self.by_id[task_id]
        self.index.removed(task_ids)

    def tasks_of(self, run_id):
        return [task for task in self.by_id.values() if task.run == run_id]


# --- progress --------------------------------------------------------------------------


def test_progress_counts_an_open_child_as_a_fraction_of_one_more_step():
    # run_summary's docstring example: E = (3 + 50/100) / 10 = 0.35 (the closed batch
    # bar adds nothing), V = 4/4 = 1, W = 1/2 = 0.5 (its parent is in another run),
    # X has no total: (0.35 + 1 + 0.5) / 3.
    summary = summary_of(
        bar("E", n=3, total=10),
        bar("B1", parent="E", n=100, total=100, status="close"),
        bar("B2", parent="E", n=50, total=100),
        bar("V", n=4, total=4, status="close"),
        bar("W", parent="elsewhere", n=1, total=2),
        bar("X", n=7))
    assert summary["progress"] == pytest.approx((0.35 + 1 + 0.5) / 3)


def test_progress_counts_grandchildren_through_their_parent():
    # G = 1/4; C = (1 + 0.25) / 2 = 0.625; E = (1 + 0.625) / 4 = 0.40625.
    summary = summary_of(bar("E", n=1, total=4),
                         bar("C", parent="E", n=1, total=2),
                         bar("G", parent="C", n=1, total=4))
    assert summary["progress"] == pytest.approx(0.40625)


def test_child_without_total_adds_nothing_to_its_parent():
    summary = summary_of(bar("E", n=1, total=4), bar("C", parent="E", n=5))
    assert summary["progress"] == pytest.approx(0.25)


def test_progress_of_a_bar_stops_at_its_total():
    # 10/10 plus an open child's half step would be 1.05; n past total (tqdm allows it)
    # would be 1.5.
    summary = summary_of(bar("A", n=10, total=10), bar("C", parent="A", n=1, total=2),
                         bar("B", n=15, total=10))
    assert summary["progress"] == 1.0


def test_progress_is_null_when_no_top_level_bar_has_a_total():
    # The child has a total, but it is not top-level: its parent is in the run.
    summary = summary_of(bar("A", n=3), bar("C", parent="A", n=1, total=2))
    assert summary["progress"] is None


def test_a_bar_with_total_zero_is_done():
    assert summary_of(bar("A", total=0), bar("B", n=0, total=4))["progress"] == 0.5


def test_a_bar_naming_itself_as_parent_is_top_level():
    assert summary_of(bar("A", parent="A", n=1, total=4))["progress"] == 0.25


def test_bars_nested_in_a_cycle_are_not_top_level():
    # A and B name each other: neither is top-level, so only T counts.
    summary = summary_of(bar("A", parent="B", n=1, total=2), bar("B", parent="A", total=2),
                         bar("T", n=3, total=4))
    assert summary["progress"] == 0.75


def test_a_deep_chain_of_parents_stops_counting_at_the_depth_limit():
    # 2,000 nested bars each half done: without the bound, recursion would fail.
    tasks = [bar("b0", n=0, total=1)]
    tasks += [bar(f"b{i}", parent=f"b{i - 1}", n=0, total=1) for i in range(1, 2000)]
    summary = summary_of(*tasks)
    # Each level is one open child's fraction of one step of its parent, and the deepest
    # counted level (RUN_MAX_DEPTH) has n=0 and adds nothing: every fraction is 0.
    assert summary["progress"] == 0.0
    tasks[progressista.RUN_MAX_DEPTH].n = 1  # the deepest level that still counts
    assert summary_of(*tasks)["progress"] == 1.0
    tasks[progressista.RUN_MAX_DEPTH].n = 0
    tasks[progressista.RUN_MAX_DEPTH + 1].n = 1  # one level too deep
    assert summary_of(*tasks)["progress"] == 0.0


# --- eta -------------------------------------------------------------------------------


def test_eta_is_when_the_slowest_top_level_bar_ends_counted_from_the_runs_update():
    # A: 100 - (20 + 1/2 from its open child) = 79.5 left at 4/s from t=100: ends 119.875.
    # B: 5 left at 1/s from t=110: ends 115. The run last changed at 112 (the child).
    summary = summary_of(
        bar("A", n=20, total=100, rate=4.0, updated_at=100.0),
        bar("C", parent="A", n=1, total=2, rate=9.0, updated_at=112.0),
        bar("B", n=5, total=10, rate=1.0, updated_at=110.0))
    assert summary["eta"] == pytest.approx(119.875 - 112.0)


def test_eta_leaves_out_ended_bars_and_bars_without_total():
    summary = summary_of(
        bar("A", n=5, total=10, rate=1.0, updated_at=100.0),
        bar("F", n=1, total=1000, rate=0.001, status="error", updated_at=100.0),
        bar("U", n=5, rate=0.001, updated_at=100.0))
    assert summary["eta"] == 5.0


def test_eta_is_null_while_a_top_level_bar_with_work_left_has_no_rate():
    summary = summary_of(bar("A", n=5, total=10, rate=1.0, updated_at=100.0),
                         bar("B", n=0, total=10, rate=None, updated_at=100.0))
    assert summary["eta"] is None
    assert summary_of(bar("A", n=5, total=10, rate=0.0))["eta"] is None


def test_eta_of_a_finished_but_open_bar_is_zero():
    assert summary_of(bar("A", n=10, total=10, updated_at=100.0))["eta"] == 0.0


def test_eta_is_null_once_the_run_has_ended_and_when_it_would_be_infinite():
    assert summary_of(bar("A", n=10, total=10, status="close"))["eta"] is None
    assert summary_of(bar("A", n=0, total=1e308, rate=1e-300))["eta"] is None
    tracked = Tracked()
    tracked.put(bar("A", n=0, total=1e308, rate=1e-300))
    assert tracked.index.summary("r1", 0.0)["eta"] is None


# --- status, counts, hosts, name, times ------------------------------------------------


@pytest.mark.parametrize("statuses, expected", [
    (["running", "stalled", "stale", "close", "error"], "stale"),
    (["running", "stalled", "close", "error"], "stalled"),
    (["running", "close", "error"], "running"),
    (["close", "error", "close"], "error"),
    (["close", "close"], "close"),
])
def test_run_status_follows_the_protocols_precedence(statuses, expected):
    tasks = [bar(f"t{i}", status=status) for i, status in enumerate(statuses)]
    assert summary_of(*tasks)["status"] == expected


def test_run_status_uses_the_shown_status_at_now():
    # Stored as running, but the status function reads it stale at t=100.
    def shown(task, now):
        return "stale" if now - task.updated_at >= 60 else task.status
    summary = run_summary("r1", [bar("A", updated_at=30.0), bar("B", updated_at=95.0)],
                          100.0, shown)
    assert (summary["status"], summary["counts"]) == ("stale", {"stale": 1, "running": 1})


def test_counts_are_tasks_by_status():
    summary = summary_of(bar("a"), bar("b"), bar("c", status="close"),
                         bar("d", status="error"), bar("e", status="stalled"))
    assert summary["counts"] == {"running": 2, "close": 1, "error": 1, "stalled": 1}
    assert summary["tasks"] == 5


def test_hosts_are_distinct_sorted_string_values_at_most_100():
    tasks = [bar(f"t{i}", meta={"host": f"h{149 - i % 150:03d}"}) for i in range(300)]
    tasks += [bar("no-meta", meta={}), bar("number", meta={"host": 7}),
              bar("null", meta={"host": None})]
    assert summary_of(*tasks)["hosts"] == [f"h{i:03d}" for i in range(100)]
    tracked = Tracked()
    for task in tasks:
        tracked.put(task)
    assert tracked.index.summary("r1", 0.0)["hosts"] == [f"h{i:03d}" for i in range(100)]


def test_name_is_the_run_name_of_the_latest_updated_bar_that_sent_one():
    tasks = [bar("a", run_name="first", updated_at=10.0),
             bar("b", run_name="second", updated_at=20.0),
             bar("c", updated_at=30.0)]  # updated last, but sent no name
    assert summary_of(*tasks)["name"] == "second"
    tasks[0].updated_at = 40.0
    assert summary_of(*tasks)["name"] == "first"


def test_name_is_the_run_id_when_no_bar_sent_one():
    assert summary_of(bar("a"))["name"] == "r1"


def test_times_are_earliest_created_latest_updated_and_ended_once_all_ended():
    tasks = [bar("a", created_at=5.0, updated_at=50.0, status="close"),
             bar("b", created_at=3.0, updated_at=40.0),
             bar("c", created_at=8.0, updated_at=60.0, status="error")]
    summary = summary_of(*tasks)
    assert (summary["created_at"], summary["updated_at"], summary["ended_at"]) == (
        3.0, 60.0, None)
    tasks[1].status, tasks[1].updated_at = "close", 70.0
    summary = summary_of(*tasks)
    assert (summary["updated_at"], summary["ended_at"]) == (70.0, 70.0)


def test_summary_has_the_protocols_fields_and_is_json():
    summary = summary_of(bar("a", n=1, total=2, meta={"host": "gpu-01"}))
    assert list(summary) == ["run", "name", "status", "counts", "tasks", "hosts", "progress",
                             "eta", "created_at", "updated_at", "ended_at"]
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


# --- the index: membership, changes, removal -------------------------------------------


def test_index_summaries_are_keyed_by_run_and_leave_out_bars_without_run():
    tracked = Tracked()
    tracked.put(bar("a", run="r1", n=1, total=2))
    tracked.put(bar("b", run="r2"))
    tracked.put(bar("loose", run=None))
    summaries = tracked.index.summaries(0.0)
    assert sorted(summaries) == ["r1", "r2"]
    assert summaries["r1"]["progress"] == 0.5
    assert tracked.index.task_ids("r1", 0.0) == ["a"]


def test_a_task_moving_to_another_run_leaves_the_first():
    tracked = Tracked()
    tracked.put(bar("a", run="r1"))
    tracked.put(bar("b", run="r1"))
    tracked.index.take_changed(0.0)
    tracked.update("a", run="r2")
    summaries = tracked.index.summaries(0.0)
    assert (summaries["r1"]["tasks"], summaries["r2"]["tasks"]) == (1, 1)
    assert tracked.index.task_ids("r1", 0.0) == ["b"]
    assert tracked.index.take_changed(0.0) == (["r1", "r2"], [])


def test_a_task_moving_out_of_its_only_run_removes_that_run():
    tracked = Tracked()
    tracked.put(bar("a", run="r1"))
    tracked.index.take_changed(0.0)
    tracked.update("a", run=None)
    assert tracked.index.summaries(0.0) == {}
    assert tracked.index.take_changed(0.0) == ([], ["r1"])


def test_deleting_the_last_task_of_a_run_removes_the_run():
    tracked = Tracked()
    tracked.put(bar("a"))
    tracked.put(bar("b"))
    tracked.index.take_changed(0.0)
    tracked.delete("a")
    assert tracked.index.summary("r1", 0.0)["tasks"] == 1
    assert tracked.index.take_changed(0.0) == (["r1"], [])
    tracked.delete("b")
    assert tracked.index.summary("r1", 0.0) is None
    assert len(tracked.index) == 0
    assert tracked.index.take_changed(0.0) == ([], ["r1"])


def test_a_run_that_goes_and_comes_back_before_the_feed_asks_is_only_changed():
    tracked = Tracked()
    tracked.put(bar("a"))
    tracked.index.take_changed(0.0)
    tracked.delete("a")
    tracked.put(bar("b"))
    assert tracked.index.take_changed(0.0) == (["r1"], [])


def test_removing_an_id_the_index_never_saw_changes_nothing():
    tracked = Tracked()
    tracked.put(bar("a"))
    tracked.index.take_changed(0.0)
    tracked.index.removed(["unknown"])
    assert tracked.index.take_changed(0.0) == ([], [])


def test_changing_one_task_rebuilds_only_its_runs_summary():
    tracked = Tracked()
    for run in ("r1", "r2", "r3"):
        for i in range(3):
            tracked.put(bar(f"{run}-{i}", run=run, n=i, total=10))
    first = tracked.index.summaries(0.0)
    warm = tracked.index.summaries(0.0)
    assert all(warm[run] is first[run] for run in first)  # served from the cache
    tracked.update("r2-1", n=7)
    second = tracked.index.summaries(0.0)
    assert second["r1"] is first["r1"] and second["r3"] is first["r3"]
    assert second["r2"] is not first["r2"]
    assert second["r2"]["progress"] == pytest.approx((0 + 7 + 2) / 30)
    assert first["r2"]["progress"] == pytest.approx((0 + 1 + 2) / 30)  # left as it was


def test_the_index_reads_the_shown_status_when_it_catches_up_on_a_change():
    # Time-dependent statuses reach a run when the sweep reports the task changed.
    def shown(task, now):
        return "stale" if now - task.updated_at >= 60 else task.status
    task = bar("a", updated_at=0.0)
    index = RunIndex({"a": task}.get, shown)
    index.changed(["a"])
    assert index.summary("r1", 10.0)["status"] == "running"
    assert index.summary("r1", 70.0)["status"] == "running"  # cached until a change
    index.changed(["a"])  # the sweep at t=60 reports it
    summary = index.summary("r1", 60.0)
    assert (summary["status"], summary["counts"]) == ("stale", {"stale": 1})


def test_changes_between_two_reads_are_counted_once_at_the_read():
    looked_up = []
    task = bar("a", n=1, total=4)

    def get_task(task_id):
        looked_up.append(task_id)
        return task
    index = RunIndex(get_task, stored_status)
    for n in (2, 3, 4):
        task.n = n
        index.changed(["a"])
    assert looked_up == []  # noting a change does no work
    assert index.summary("r1", 0.0)["progress"] == 1.0
    assert looked_up == ["a"]


def test_a_task_gone_from_the_store_leaves_its_run_at_the_next_read():
    tracked = Tracked()
    tracked.put(bar("a"))
    tracked.put(bar("b"))
    assert tracked.index.summary("r1", 0.0)["tasks"] == 2
    del tracked.by_id["a"]
    tracked.index.changed(["a"])  # e.g. a resync that dropped it
    assert tracked.index.summary("r1", 0.0)["tasks"] == 1
    assert tracked.index.task_ids("r1", 0.0) == ["b"]


def test_a_task_put_again_as_a_new_object_replaces_its_old_figures():
    # Redis mirrors replace a task's object on every write.
    tracked = Tracked()
    tracked.put(bar("a", n=1, total=4, meta={"host": "h1"}))
    tracked.put(bar("a", n=3, total=4, meta={"host": "h2"}))
    summary = tracked.index.summary("r1", 0.0)
    assert (summary["progress"], summary["tasks"], summary["hosts"]) == (0.75, 1, ["h2"])


def test_a_parent_arriving_after_its_child_takes_it_under_it_and_leaving_frees_it():
    tracked = Tracked()
    tracked.put(bar("C", parent="E", n=1, total=2))  # top-level while E is not in the run
    assert tracked.index.summary("r1", 0.0)["progress"] == 0.5
    tracked.put(bar("E", n=3, total=10))
    assert tracked.index.summary("r1", 0.0)["progress"] == pytest.approx(0.35)
    tracked.delete("E")
    assert tracked.index.summary("r1", 0.0)["progress"] == 0.5


def test_a_child_closing_leaves_its_parents_count_to_the_parent():
    tracked = Tracked()
    tracked.put(bar("E", n=3, total=10))
    tracked.put(bar("C", parent="E", n=1, total=2))
    assert tracked.index.summary("r1", 0.0)["progress"] == pytest.approx(0.35)
    tracked.update("C", n=2, status="close")
    assert tracked.index.summary("r1", 0.0)["progress"] == pytest.approx(0.3)
    tracked.update("E", n=4)
    assert tracked.index.summary("r1", 0.0)["progress"] == pytest.approx(0.4)


def test_eta_follows_the_slowest_bar_when_it_speeds_up_or_leaves():
    tracked = Tracked()
    tracked.put(bar("A", n=0, total=10, rate=1.0, updated_at=100.0))  # ends at 110
    tracked.put(bar("B", n=0, total=10, rate=0.5, updated_at=100.0))  # ends at 120
    assert tracked.index.summary("r1", 0.0)["eta"] == 20.0
    tracked.update("B", rate=5.0)  # now ends at 102: A is the slowest
    assert tracked.index.summary("r1", 0.0)["eta"] == 10.0
    tracked.update("B", rate=0.25)  # ends at 140
    assert tracked.index.summary("r1", 0.0)["eta"] == 40.0
    tracked.delete("B")
    assert tracked.index.summary("r1", 0.0)["eta"] == 10.0


def test_the_times_and_name_are_found_again_when_their_bar_leaves():
    tracked = Tracked()
    tracked.put(bar("a", run_name="old", created_at=1.0, updated_at=5.0))
    tracked.put(bar("b", run_name="new", created_at=2.0, updated_at=9.0))
    summary = tracked.index.summary("r1", 0.0)
    assert (summary["name"], summary["created_at"], summary["updated_at"]) == ("new", 1.0, 9.0)
    tracked.delete("b")
    summary = tracked.index.summary("r1", 0.0)
    assert (summary["name"], summary["created_at"], summary["updated_at"]) == ("old", 1.0, 5.0)
    tracked.delete("a")
    tracked.put(bar("c", created_at=3.0))
    assert tracked.index.summary("r1", 0.0)["name"] == "r1"


def test_a_task_whose_update_time_goes_back_lowers_the_runs():
    # A Redis mirror can bring another server's write stamped by a clock behind ours.
    tracked = Tracked()
    tracked.put(bar("a", updated_at=5.0))
    tracked.put(bar("b", updated_at=9.0))
    tracked.update("b", updated_at=7.0)
    assert tracked.index.summary("r1", 0.0)["updated_at"] == 7.0


def test_a_summary_already_handed_out_does_not_change_afterwards():
    tracked = Tracked()
    tracked.put(bar("a"))
    before = tracked.index.summary("r1", 0.0)
    tracked.put(bar("b", status="close"))
    assert before["counts"] == {"running": 1}
    assert tracked.index.summary("r1", 0.0)["counts"] == {"running": 1, "close": 1}


def test_a_deep_chain_of_parents_keeps_the_index_within_bounds():
    tracked = Tracked()
    for i in range(2000):
        tracked.put(bar(f"b{i}", parent=f"b{i - 1}" if i else None, n=1, total=2))
    assert 0.0 <= tracked.index.summary("r1", 0.0)["progress"] <= 1.0


def test_bars_naming_each_other_as_parents_do_not_hang_the_index():
    tracked = Tracked()
    tracked.put(bar("A", parent="B", n=1, total=2))
    tracked.put(bar("B", parent="A", n=1, total=2))
    tracked.put(bar("T", n=3, total=4))
    assert tracked.index.summary("r1", 0.0)["progress"] == 0.75


def _random_change(rng, tracked, now):
    task_ids = [f"t{i}" for i in range(24)]
    task_id = rng.choice(task_ids)
    if task_id in tracked.by_id and rng.random() < 0.1:
        tracked.delete(task_id)
        return
    task = tracked.by_id.get(task_id) or Task(task_id, now)
    task.updated_at = now
    task.run = rng.choice(["r1", "r1", "r2", "r3", None])
    task.parent = rng.choice([None, None, *task_ids[:8]])
    task.run_name = rng.choice([None, "a", "b"])
    task.total = rng.choice([None, 0, 10, 100])
    task.n = rng.choice([0, 1, 5, 10, 150])
    task.rate = rng.choice([None, 0.0, 0.5, 3.0])
    task.status = rng.choice(["running", "running", "stale", "stalled", "close", "error"])
    task.meta = {"host": rng.choice(["h1", "h2", 7])}
    tracked.put(task)


def test_the_index_agrees_with_the_definition_over_random_changes():
    rng = random.Random(12)
    tracked = Tracked()
    for step in range(6000):
        _random_change(rng, tracked, now=float(step))
        if rng.random() < 0.7:
            continue  # several changes pile up before the runs are read
        for run_id in ("r1", "r2", "r3"):
            tasks = tracked.tasks_of(run_id)
            kept = tracked.index.summary(run_id, float(step))
            if not tasks:
                assert kept is None
                continue
            assert sorted(tracked.index.task_ids(run_id, float(step))) == sorted(
                task.task_id for task in tasks)
            expected = run_summary(run_id, tasks, float(step), stored_status)
            for field in ("progress", "eta"):
                if expected[field] is not None:
                    assert kept[field] == pytest.approx(expected[field], abs=1e-9), (
                        step, run_id, field)
                    kept, expected = dict(kept), dict(expected)
                    kept[field] = expected[field]
            assert kept == expected, (step, run_id)


# --- run end ---------------------------------------------------------------------------


def test_an_ended_run_is_news_once_after_the_settle_time_and_not_before():
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("a", updated_at=90.0))
    tracked.put(bar("b", updated_at=95.0))
    tracked.update("a", status="close", updated_at=96.0)
    assert tracked.index.ended_runs(200.0) == []  # b is still running
    tracked.update("b", status="error", updated_at=100.0)
    assert tracked.index.ended_runs(109.9) == []
    assert tracked.index.ended_runs(110.0) == ["r1"]
    assert tracked.index.ended_runs(111.0) == []
    assert tracked.index.ended_runs(500.0) == []


def test_a_run_whose_first_bar_closes_just_before_its_second_opens_ends_once():
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("first", updated_at=90.0))
    tracked.update("first", status="close", updated_at=100.0)
    assert tracked.index.ended_runs(105.0) == []
    tracked.put(bar("second", updated_at=105.0))
    assert tracked.index.ended_runs(115.0) == []
    tracked.update("second", status="close", updated_at=130.0)
    assert tracked.index.ended_runs(139.0) == []
    assert tracked.index.ended_runs(140.0) == ["r1"]
    assert tracked.index.ended_runs(1000.0) == []


def test_a_run_that_reopens_and_ends_again_is_news_again():
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("a", status="close", updated_at=100.0))
    assert tracked.index.ended_runs(110.0) == ["r1"]
    tracked.put(bar("b", updated_at=200.0))
    assert tracked.index.ended_runs(300.0) == []
    tracked.update("b", status="close", updated_at=210.0)
    assert tracked.index.ended_runs(220.0) == ["r1"]


def test_a_new_bar_that_comes_closed_after_the_end_was_news_is_news_again():
    # A quick bar can send its first and last state as one update (or several updates
    # can fall between two reads): it still opens the run again.
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("a", status="close", updated_at=100.0))
    assert tracked.index.ended_runs(110.0) == ["r1"]
    tracked.put(bar("b", status="close", updated_at=200.0))
    assert tracked.index.ended_runs(209.0) == []
    assert tracked.index.ended_runs(210.0) == ["r1"]


def test_a_late_change_to_an_ended_task_is_not_news_again():
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("a", status="close", updated_at=100.0))
    assert tracked.index.ended_runs(110.0) == ["r1"]
    tracked.update("a", meta={"note": "late"}, updated_at=150.0)
    assert tracked.index.ended_runs(200.0) == []


def test_deleting_a_runs_last_open_task_ends_it():
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("a", status="close", updated_at=100.0))
    tracked.put(bar("b", updated_at=100.0))
    assert tracked.index.ended_runs(200.0) == []
    tracked.delete("b")
    assert tracked.index.ended_runs(200.0) == ["r1"]


def test_a_deleted_run_is_never_news():
    tracked = Tracked(run_settle_s=10.0)
    tracked.put(bar("a", status="close", updated_at=100.0))
    tracked.delete("a")
    assert tracked.index.ended_runs(200.0) == []


def test_runs_that_settle_at_one_sweep_are_news_in_the_order_they_ended():
    tracked = Tracked(run_settle_s=10.0)
    for run in ("r3", "r1", "r2"):
        tracked.put(bar(f"{run}-a", run=run, status="close", updated_at=100.0))
    assert tracked.index.ended_runs(110.0) == ["r3", "r1", "r2"]


def test_load_at_startup_keeps_settled_runs_quiet_and_the_rest_pending():
    by_id = {task.task_id: task for task in (
        bar("old", run="done-long-ago", status="close", updated_at=10.0),
        bar("recent", run="just-ended", status="close", updated_at=995.0),
        bar("live", run="running", updated_at=999.0))}
    index = RunIndex(by_id.get, stored_status, run_settle_s=10.0)
    index.load(by_id, now=1000.0)
    assert index.take_changed(1000.0) == ([], [])
    assert sorted(index.summaries(1000.0)) == ["done-long-ago", "just-ended", "running"]
    assert index.ended_runs(1004.0) == []
    assert index.ended_runs(1005.0) == ["just-ended"]


# --- settings --------------------------------------------------------------------------


def test_run_settle_seconds_comes_from_the_environment_and_the_flag():
    assert progressista.Settings().run_settle_seconds == 10.0
    from_env = progressista.Settings.from_env({"PROGRESSISTA_RUN_SETTLE_SECONDS": "2.5"})
    assert from_env.run_settle_seconds == 2.5
    args = progressista.build_parser().parse_args(["serve", "--run-settle-seconds", "4"])
    assert args.run_settle_seconds == 4.0
    with pytest.raises(ValueError, match="RUN_SETTLE_SECONDS"):
        progressista.Settings.from_env({"PROGRESSISTA_RUN_SETTLE_SECONDS": "-1"})

