"""The dashboard with thousands of tasks, in Chromium, Firefox and WebKit.

Same harness as test_dashboard.py (docs/browsers.md): one browser per engine for the module,
a fresh page per test, a real server. With more than 2,000 tasks the server sends its
snapshot in parts (PROTOCOL.md, "The live feed"), and the page keeps its sorted list up to
date by merging each change into it rather than sorting everything again; these tests check
that what it shows is what a full sort of the server's tasks gives: the order the page holds
(`window.progressista.state.items`) against one computed here from `GET /tasks`, and the rows
drawn on screen after scrolling far down, filtering and sorting. The expected orders are
computed in Python, with names for which Python's order and the page's collator agree
(one prefix, zero-padded numbers). Every wait polls a condition with a deadline; how fast
is for bench/bench_dashboard.py.
"""

import threading

from browsers import expect
from conftest import http, wait_for
from test_dashboard import (  # fixtures and helpers of the dashboard tests; no tests imported
    AUTH, TOKEN, browser, clean_server, not_on, open_dashboard, page, post, pytest_generate_tests,
    server, task)

__all__ = ["browser", "clean_server", "page", "server",  # fixtures used by name
           "pytest_generate_tests"]  # a test per engine, as in test_dashboard.py

RUN_ROWS = ".row.run:not([hidden])"
TASKS = 5000            # three parts of a snapshot (2,000 a part)
TOTAL = 1000            # each task's total: its progress is n / 1000
SCRAMBLE = 7919         # a prime: names and counts in no order the page could profit from


def bulk_task(i, **fields):
    """Task i of the large list: its name and count scrambled, so that each sort moves it."""
    return task(f"big-{i:05d}", **{"desc": f"item {i * SCRAMBLE % 100_000:05d}", "n": i * SCRAMBLE % TOTAL,
                                   "total": TOTAL, **fields})


def post_in_batches(server, tasks):
    for start in range(0, len(tasks), 1000):  # the server's batch limit
        post(server, tasks[start:start + 1000])


def server_tasks(server):
    """The server's tasks, oldest first (the order GET /tasks answers)."""
    status, body, _ = http("GET", server.url + "/tasks", headers=AUTH)
    assert status == 200
    return list(body["tasks"].values())


def expected_order(tasks, sort="newest", needle=""):
    """The ids in the order the page should show them (docs/dashboard.md, "Controls and filters")."""
    kept = [t for t in tasks if needle in t["desc"].lower()]
    if sort == "newest":  # newest first; tasks created together: the last one sent first
        return [t["task_id"] for t in reversed(kept)]
    if sort == "name":
        return [t["task_id"] for t in sorted(kept, key=lambda t: (t["desc"], t["task_id"]))]
    if sort == "progress":  # least done first; ties by id
        return [t["task_id"] for t in sorted(kept, key=lambda t: (t["n"] / t["total"], t["task_id"]))]
    raise ValueError(sort)


SHOWN_IDS_JS = "() => progressista.state.items.map((item) => item.task_id)"

# The descriptions of the task rows wholly inside the window, top to bottom
ROWS_IN_VIEW_JS = """() => [...document.querySelectorAll('#list .row.task')]
    .filter((row) => row.getClientRects().length > 0)
    .map((row) => [row.getBoundingClientRect(), row.querySelector('.desc').textContent])
    .filter(([box]) => box.top >= -1 && box.bottom <= innerHeight + 1)   // a pixel for rounding
    .sort(([a], [b]) => a.top - b.top)
    .map(([, desc]) => desc)"""


def scroll_to_row(page, index):
    """Scroll so that the index-th row of the list is at the top of the window."""
    page.evaluate("""(index) => {
        const list = document.getElementById('list');
        window.scrollTo(0, list.getBoundingClientRect().top + scrollY + index * progressista.state.rowHeight);
    }""", index)


def until(page, js, predicate, message, timeout=10.0):
    """Poll `js` in the page until its value satisfies `predicate`; that value."""
    seen = {}

    def holds():
        seen["value"] = page.evaluate(js)
        return predicate(seen["value"])
    wait_for(holds, timeout=timeout, interval=0.05, message=message)
    return seen["value"]


def expect_shown(page, ids, message):
    """Wait until the page's list holds exactly `ids`, in this order."""
    until(page, SHOWN_IDS_JS, lambda shown: shown == ids, message)


def expect_rows_in_view(page, descs, message):
    """Wait until the rows wholly in view, top to bottom, begin with `descs` (at least 5 rows)."""
    until(page, ROWS_IN_VIEW_JS, lambda rows: len(rows) >= 5 and rows == descs[:len(rows)], message)


def desc_of(tasks):
    by_id = {t["task_id"]: t["desc"] for t in tasks}
    return lambda ids: [by_id[i] for i in ids]


# --- Order, scrolling, filtering and sorting ---------------------------------------------------


def test_scrolling_far_down_a_large_list_shows_the_right_rows(page, clean_server):
    post_in_batches(clean_server, [bulk_task(i) for i in range(TASKS)])
    tasks = server_tasks(clean_server)
    descs = desc_of(tasks)(expected_order(tasks))
    open_dashboard(page, clean_server)
    expect(page.locator("#summary")).to_contain_text(f"{TASKS} tasks")
    expect_shown(page, expected_order(tasks), "newest first")
    scroll_to_row(page, 3210)
    expect_rows_in_view(page, descs[3210:], "rows 3210 on, in view")
    page.evaluate("() => window.scrollTo(0, document.documentElement.scrollHeight)")
    until(page, ROWS_IN_VIEW_JS, lambda rows: len(rows) >= 5 and rows == descs[-len(rows):],
          "the last rows at the bottom")


def test_filtering_and_sorting_a_large_list_show_the_right_rows_after_scrolling(page, clean_server):
    post_in_batches(clean_server, [bulk_task(i) for i in range(TASKS)])
    tasks = server_tasks(clean_server)
    descs = desc_of(tasks)
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=name")
    expect(page.locator("#summary")).to_contain_text(f"{TASKS} tasks")
    by_name = expected_order(tasks, "name")
    expect_shown(page, by_name, "sorted by name")
    scroll_to_row(page, 4000)
    expect_rows_in_view(page, descs(by_name[4000:]), "sorted by name, rows 4000 on")

    page.locator("#filter").fill("item 1")
    filtered = expected_order(tasks, "name", "item 1")
    expect(page.locator("#summary")).to_contain_text(f"showing {len(filtered)}")
    page.locator("#filter").fill("item 12")   # typed on: a filter over the tasks shown already
    filtered = expected_order(tasks, "name", "item 12")
    expect_shown(page, filtered, "filtered by 'item 12'")
    page.locator("#filter").fill("item 1")   # erased back: the tasks dropped come back in their places
    filtered = expected_order(tasks, "name", "item 1")
    expect_shown(page, filtered, "filtered by 'item 1' again")
    scroll_to_row(page, 300)
    expect_rows_in_view(page, descs(filtered[300:]), "filtered by name, rows 300 on")

    page.locator("#sort").select_option("progress")
    by_progress = expected_order(tasks, "progress", "item 1")
    expect_shown(page, by_progress, "filtered tasks sorted by progress")
    scroll_to_row(page, 250)
    expect_rows_in_view(page, descs(by_progress[250:]), "filtered by progress, rows 250 on")


def test_live_updates_keep_a_filtered_sorted_large_list_in_order(page, clean_server):
    post_in_batches(clean_server, [bulk_task(i) for i in range(TASKS)])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=progress&q=item%203")
    expect(page.locator("#summary")).to_contain_text(f"{TASKS} tasks")
    # every tenth task moves; some names change into and out of the filter; some tasks are new
    changes = [bulk_task(i, n=(i * 31) % TOTAL, seq=2) for i in range(0, TASKS, 10)]
    changes += [bulk_task(i, seq=3, desc=f"item 3{i:05d} renamed") for i in range(1, 200, 7)]
    changes += [bulk_task(i, seq=3, desc=f"item 9{i:05d} renamed") for i in range(3, 900, 11)]
    changes += [bulk_task(TASKS + i) for i in range(40)]
    post_in_batches(clean_server, changes)
    http("DELETE", clean_server.url + "/tasks/big-00005", headers=AUTH)
    tasks = server_tasks(clean_server)
    expected = expected_order(tasks, "progress", "item 3")
    expect_shown(page, expected, "the filtered list in progress order after the updates")
    expect(page.locator("#summary")).to_contain_text(f"{len(tasks)} tasks")
    scroll_to_row(page, len(expected) // 2)
    expect_rows_in_view(page, desc_of(tasks)(expected[len(expected) // 2:]), "the middle of the filtered list")


def test_updates_during_and_after_a_chunked_snapshot_all_show(page, clean_server):
    post_in_batches(clean_server, [bulk_task(i) for i in range(TASKS)])
    stop = threading.Event()
    sent = {"late": 0}

    def keep_updating():  # while the page loads: moves early and late tasks, adds new ones
        seq = 10
        while not stop.is_set():
            seq += 1
            post(clean_server, [bulk_task(i, n=seq % TOTAL, seq=seq) for i in (0, 1999, 2000, 4999)]
                 + [task(f"late-{sent['late']:03d}", desc=f"late {sent['late']:03d}", n=seq % 100)])
            sent["late"] += 1
            stop.wait(0.02)

    updater = threading.Thread(target=keep_updating, daemon=True)
    updater.start()
    try:
        open_dashboard(page, clean_server)
        expect(page.locator("#summary")).to_contain_text("tasks")
    finally:
        stop.set()
        updater.join(10)
    post(clean_server, [bulk_task(4999, n=777, seq=10_000), task("after", desc="after the snapshot", n=42)])
    tasks = server_tasks(clean_server)
    expect(page.locator("#summary")).to_contain_text(f"{len(tasks)} tasks")
    counts = {t["task_id"]: t["n"] for t in tasks}
    until(page, "() => Object.fromEntries([...progressista.state.tasks].map(([id, task]) => [id, task.n]))",
          lambda shown: shown == counts, "every task's count as the server has it")
    expect_shown(page, expected_order(tasks), "newest first")
    expect_rows_in_view(page, desc_of(tasks)(expected_order(tasks)), "the newest rows at the top")
    page.locator("#filter").fill("big-04999")
    expect(page.locator(".row.task:not([hidden])")).to_have_count(1)
    expect(page.locator(".row.task:not([hidden])")).to_contain_text("78%")


# Types into the filter the moment an update message arrives (window.__typeOnUpdate = text), so
# that the page draws the new filter and the update in one frame: deterministic, where typing
# from outside would meet an update between frames only by chance.
TYPE_ON_UPDATE_JS = """
window.__typeOnUpdate = null;
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (event) => {
      const text = window.__typeOnUpdate;
      if (text == null || !String(event.data).startsWith('{"type":"update"')) return;
      window.__typeOnUpdate = null;
      const filter = document.getElementById("filter");
      filter.value = text;
      filter.dispatchEvent(new Event("input", { bubbles: true }));
    });
  }
};
"""


@not_on("webkit", reason="classic WebDriver has no preload scripts to wrap the page's WebSocket")
def test_typing_on_in_the_filter_as_updates_arrive_keeps_every_update(page, clean_server):
    post_in_batches(clean_server, [bulk_task(i) for i in range(TASKS)])
    page.add_init_script(TYPE_ON_UPDATE_JS)
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=progress&q=item")
    expect(page.locator("#summary")).to_contain_text(f"{TASKS} tasks")
    page.evaluate("() => { window.__typeOnUpdate = 'item 3'; }")
    # tasks that pass the longer filter move, in the message that arrives with the keystroke
    post(clean_server, [bulk_task(i, n=(i * 37) % TOTAL, seq=2) for i in range(0, TASKS, 3)][:1000])
    until(page, "() => window.__typeOnUpdate", lambda pending: pending is None, "the keystroke with the update")
    tasks = server_tasks(clean_server)
    expect_shown(page, expected_order(tasks, "progress", "item 3"), "the narrowed list with the update in place")


# --- Groups and runs, kept up to date change by change -------------------------------------
# The page makes a grouped view's groups, and a runs view's runs, once per view and then merges
# each change into the group or run it touches; these check that the result is what making
# them again from the server's tasks gives, through moves between groups, groups that appear
# and empty, bars that join and leave runs, a new run, and a filter the updates cross.

GROUPED = 3000
HOSTS = ["host-a", "host-b", "host-c", "host-d", "host-e"]

# The grouped list as the page holds it: a group header as "#value:count", a task as its id
GROUPED_ITEMS_JS = """() => progressista.state.items.map((item) =>
    item.isGroup ? `#${item.value}:${item.summary.total}` : item.task_id)"""


def hosted_task(i, host=None, **fields):
    """Task i of the large list on one of HOSTS (every 50th on none: the "(none)" group)."""
    meta = {} if i % 50 == 0 and host is None else {"host": host or HOSTS[i % len(HOSTS)]}
    return bulk_task(i, meta=meta, **fields)


def expected_grouped(tasks, sort, needle=""):
    """The grouped list: groups by meta.host (in name order, "(none)" last), each in `sort` order."""
    order = expected_order(tasks, sort, needle)
    host_of = {t["task_id"]: (t.get("meta") or {}).get("host", "(none)") for t in tasks}
    values = sorted({host_of[i] for i in order}, key=lambda v: (v == "(none)", v))
    items = []
    for value in values:
        members = [i for i in order if host_of[i] == value]
        items += [f"#{value}:{len(members)}"] + members
    return items


def test_a_grouped_large_list_follows_moves_between_groups_filtering_and_sorting(page, clean_server):
    post_in_batches(clean_server, [hosted_task(i) for i in range(GROUPED)])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&group=host&sort=progress")
    expect(page.locator("#summary")).to_contain_text(f"{GROUPED} tasks")
    until(page, GROUPED_ITEMS_JS, lambda items: items == expected_grouped(server_tasks(clean_server), "progress"),
          "grouped by host, each group by progress")

    # counts move; tasks change host (host-b empties: all of its tasks go to host-f, a new group);
    # some lose their host; new tasks; removals
    changes = [hosted_task(i, n=(i * 31) % TOTAL, seq=2) for i in range(0, GROUPED, 7)]
    changes += [hosted_task(i, host="host-f", seq=3) for i in range(1, GROUPED, 5)]   # every host-b task
    changes += [bulk_task(i, meta={}, seq=4) for i in range(2, 300, 10)]
    changes += [hosted_task(GROUPED + i, host="host-0") for i in range(30)]
    post_in_batches(clean_server, changes)
    for i in (3, 4, 8):
        http("DELETE", clean_server.url + f"/tasks/big-{i:05d}", headers=AUTH)
    tasks = server_tasks(clean_server)
    expected = expected_grouped(tasks, "progress")
    assert "#host-b" not in " ".join(expected) and "#host-f:" in " ".join(expected)
    until(page, GROUPED_ITEMS_JS, lambda items: items == expected, "the groups after moves, new and emptied groups")
    # a header counts its tasks and averages their progress, as the server's tasks say
    first = [t for t in tasks if (t.get("meta") or {}).get("host") == "host-0"]
    mean = sum(t["n"] / t["total"] for t in first) / len(first)
    progress = page.evaluate("() => progressista.state.items[0].summary.progress")
    assert abs(progress - mean) < 1e-9
    expect(page.locator(".row.group:not([hidden])").first).to_contain_text(f"{len(first)} tasks")

    page.locator("#filter").fill("item 1")
    until(page, GROUPED_ITEMS_JS, lambda items: items == expected_grouped(tasks, "progress", "item 1"),
          "the groups filtered by 'item 1'")
    # while filtered: tasks move into and out of the filter and between groups
    changes = [bulk_task(i, seq=5, desc=f"item 1{i:04d}x renamed", meta={"host": "host-c"}) for i in range(5, 400, 9)]
    changes += [hosted_task(i, seq=5, desc=f"item 9{i:04d}x renamed") for i in range(6, 900, 13)]
    post_in_batches(clean_server, changes)
    tasks = server_tasks(clean_server)
    until(page, GROUPED_ITEMS_JS, lambda items: items == expected_grouped(tasks, "progress", "item 1"),
          "the filtered groups after the updates")
    page.locator("#sort").select_option("name")
    until(page, GROUPED_ITEMS_JS, lambda items: items == expected_grouped(tasks, "name", "item 1"),
          "the filtered groups by name")
    page.locator("#filter").fill("")
    post(clean_server, [hosted_task(i, n=(i * 17) % TOTAL, seq=6) for i in range(10, 1000, 3)])
    tasks = server_tasks(clean_server)
    until(page, GROUPED_ITEMS_JS, lambda items: items == expected_grouped(tasks, "name"),
          "every group by name after more updates")


RUN_TASKS = 3000        # in RUNS runs, and LOOSE bars without a run
RUNS = 30
LOOSE = 200

# The runs view as the page holds it: a run as "run:id:bars", a tree header as "head", a bar as its id
RUN_ITEMS_JS = """() => progressista.state.items.map((item) => item.isRun ? `run:${item.id}:${item.tasks.length}`
    : item.isHead ? "head" : item.isNode ? item.task.task_id : item.task_id)"""


def run_task(i, run=None, **fields):
    """Task i as a bar of a run (task i in run i % RUNS), all on one host and rank: a flat tree."""
    run = run or f"run-{i % RUNS:02d}"
    return bulk_task(i, run=run, run_name=f"job {run[4:]}", meta={"host": "gpu-1", "rank": 0}, **fields)


def expected_runs_view(tasks, needle="", sort="name", expanded=()):
    """The runs view's list with runs by name: each run that a bar (or its name) matches, the
    bars of an expanded one (all of them, oldest first, under its host and process headers),
    then the matching bars without a run under their header, in `sort` order."""
    by_run = {}
    for t in tasks:
        if t.get("run"):
            by_run.setdefault(t["run"], []).append(t)
    items = []
    for run in sorted(by_run):   # run-NN and "job NN": name order is id order
        bars = by_run[run]
        if needle and needle not in run and needle not in f"job {run[4:]}" and not any(
                needle in t["desc"].lower() for t in bars):
            continue
        items.append(f"run:{run}:{len(bars)}")
        if run in expanded:
            items += ["head", "head"] + [t["task_id"] for t in sorted(bars, key=lambda t: (t["created_at"], t["task_id"]))]
    loose = expected_order([t for t in tasks if not t.get("run")], sort, needle)
    if loose and items:
        items.append("head")
    return items + loose


def test_the_runs_view_of_a_large_store_follows_bars_joining_leaving_and_matching_runs(page, clean_server):
    post_in_batches(clean_server, [run_task(i) for i in range(RUN_TASKS)]
                    + [bulk_task(RUN_TASKS + i) for i in range(LOOSE)])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=name&q=item%2000")
    expect(page.locator("#summary")).to_contain_text(f"{RUN_TASKS + LOOSE} tasks")
    until(page, RUN_ITEMS_JS, lambda items: items == expected_runs_view(server_tasks(clean_server), "item 00"),
          "the runs with a bar matching 'item 00', then the loose bars matching it")

    # bars renamed into and out of the filter, bars added to runs and removed, a new run, loose changes
    changes = [run_task(i, seq=2, desc=f"item 00{i:03d} renamed") for i in range(1, 120, 11)]
    changes += [run_task(i, seq=2, desc=f"item 7{i:04d} renamed") for i in range(0, RUN_TASKS, 37)]
    changes += [run_task(RUN_TASKS + LOOSE + i) for i in range(40)]
    changes += [run_task(RUN_TASKS + LOOSE + 100 + i, run="run-99", desc=f"item 00{i:03d} new") for i in range(3)]
    changes += [bulk_task(RUN_TASKS + i, seq=2, desc=f"item 00{i:03d} loose") for i in range(0, LOOSE, 9)]
    post_in_batches(clean_server, changes)
    for i in (4, 5, RUN_TASKS + 1):
        http("DELETE", clean_server.url + f"/tasks/big-{i:05d}", headers=AUTH)
    tasks = server_tasks(clean_server)
    until(page, RUN_ITEMS_JS, lambda items: items == expected_runs_view(tasks, "item 00"),
          "the filtered runs view after the updates")

    page.locator("#filter").fill("")
    until(page, RUN_ITEMS_JS, lambda items: items == expected_runs_view(tasks), "every run, unfiltered")
    page.locator(RUN_ROWS, has_text="job 03").locator(".name").click()
    until(page, RUN_ITEMS_JS, lambda items: items == expected_runs_view(tasks, expanded={"run-03"}),
          "run-03 expanded: every bar of it, oldest first")
    post_in_batches(clean_server, [run_task(i, n=(i * 13) % TOTAL, seq=3) for i in range(3, RUN_TASKS, 30)]
                    + [run_task(RUN_TASKS + LOOSE + 200 + i, run="run-03") for i in range(5)])
    http("DELETE", clean_server.url + "/tasks/big-00033", headers=AUTH)
    tasks = server_tasks(clean_server)
    until(page, RUN_ITEMS_JS, lambda items: items == expected_runs_view(tasks, expanded={"run-03"}),
          "run-03's tree after bars moved, joined and left")
    expect(page.locator(RUN_ROWS, has_text="job 03").locator(".done")).to_contain_text(
        f"/{sum(t.get('run') == 'run-03' for t in tasks)} bars")

    page.locator("#sort").select_option("progress")
    until(page, "() => progressista.state.items.filter((item) => !item.isRun && !item.isNode && !item.isHead)"
                ".map((item) => item.task_id)",
          lambda loose: loose == expected_order([t for t in tasks if not t.get("run")], "progress"),
          "the bars without a run by progress")
