"""The dashboard's runs view and its time that moves, in Chromium, Firefox and WebKit.

Same harness and strategy as test_dashboard.py (docs/browsers.md): one browser per engine
for the module, a fresh page per test, a real server from `running_server`, and every
assertion waits with `expect(...)` for what the user sees (text, aria attributes, the DOM's
tree levels), never with a sleep. What is checked: the page opens on runs when runs exist
and on the flat list when none; a run's bars nest by host, process and parent; a failed
rank shows on the run's collapsed row; finished transient bars fold into their parent; the
view switch round-trips through the URL; a stalled bar reads differently from a stale one,
with the reason; a close short of its total reads "stopped at"; sparklines, the wall-clock
ETA, the history chart, and elapsed time ticking between updates.
"""

import re
import time

import pytest

import browsers
from browsers import expect
from conftest import http, running_server
from test_dashboard import (  # fixtures and helpers of the dashboard tests; no tests imported
    ARTIFACTS, AUTH, TOKEN, browser, clean_server, open_dashboard, page, path_prefix_proxy, post, row,
    pytest_generate_tests, server, task)

__all__ = ["browser", "clean_server", "page", "server",  # fixtures used by name
           "pytest_generate_tests"]  # a test per engine, as in test_dashboard.py

RUN_ROWS = ".row.run:not([hidden])"
WALL_CLOCK = re.compile(r"ends ≈ (tomorrow |yesterday |\w+ )?\d\d:\d\d")


def run_row(page, text):
    return page.locator(RUN_ROWS, has_text=text)


def torchrun_job(run="exp-142", name="train.py --lr 3e-4", failed_rank=5, folded_batches=3):
    """2 hosts x 4 ranks, each with an epoch bar and a running batch bar nested in it; rank 0's
    earlier batch bars ended with leave=False (transient); one rank failed."""
    tasks = []
    now = time.time()
    for rank in range(8):
        host = f"gpu-0{1 + rank // 4}"
        meta = {"host": host, "rank": rank, "pid": 4000 + rank}
        epoch = task(f"{run}-r{rank}-epoch", desc=f"epoch r{rank}", n=3, total=10, rate=0.05,
                     elapsed=60, run=run, run_name=name, meta=meta, timestamp=now)
        batch = task(f"{run}-r{rank}-batch", desc=f"batch r{rank}", n=120, total=500, rate=8.0,
                     elapsed=15, run=run, run_name=name, parent=epoch["task_id"], meta=meta,
                     timestamp=now)
        if rank == failed_rank:
            batch.update(status="error", error="RuntimeError: NCCL timeout")
        tasks += [epoch, batch]
    for i in range(folded_batches):
        tasks.append(task(f"{run}-r0-batch-old{i}", desc=f"old batch {i}", n=500, total=500,
                          rate=8.0, elapsed=62, run=run, run_name=name, parent=f"{run}-r0-epoch",
                          status="close", transient=True,
                          meta={"host": "gpu-01", "rank": 0, "pid": 4000}))
    return tasks


# --- Runs, tree, folding, view switch -----------------------------------------------------


def test_the_page_opens_on_runs_when_runs_exist_and_on_the_flat_list_when_none(page, clean_server):
    post(clean_server, task("loose", desc="a bar without a run", n=5))
    open_dashboard(page, clean_server)
    expect(row(page, "a bar without a run")).to_be_visible()
    expect(page.locator(RUN_ROWS)).to_have_count(0)
    expect(page.locator("#view-switch")).to_have_value("bars")

    post(clean_server, torchrun_job())
    open_dashboard(page, clean_server)
    line = run_row(page, "train.py --lr 3e-4")
    expect(line).to_be_visible()
    expect(page.locator("#view-switch")).to_have_value("runs")
    expect(line.locator(".done")).to_have_text("3/19 bars done")   # 3 folded batches ended
    expect(line).to_contain_text("on gpu-01, gpu-02")
    # collapsed: none of its bars is drawn; the bar without a run still is, as today
    expect(row(page, "epoch r0")).to_have_count(0)
    expect(row(page, "a bar without a run")).to_be_visible()
    expect(page.locator(".row.head:not([hidden])")).to_contain_text("Bars without a run")


def test_a_failed_rank_shows_on_the_collapsed_run_row_in_words(page, clean_server):
    post(clean_server, torchrun_job(failed_rank=5))
    open_dashboard(page, clean_server)
    line = run_row(page, "train.py")
    expect(line.locator(".failed")).to_have_text("1 failed")
    expect(line.locator(".name")).to_have_attribute("aria-expanded", "false")
    assert line.locator(".failed").evaluate("e => getComputedStyle(e).color") != \
        line.locator(".done").evaluate("e => getComputedStyle(e).color")


# The drawn rows of the list in screen order: kind, tree level, text, left edge of the text.
TREE_JS = """() => [...document.querySelectorAll('#list .row:not([hidden])')]
    .sort((a, b) => a.getBoundingClientRect().top - b.getBoundingClientRect().top)
    .map(row => ({ kind: row.classList.contains('run') ? 'run' : row.classList.contains('head') ? 'head' : 'task',
                   level: Number(row.getAttribute('aria-level') || 1),
                   text: (row.querySelector('.desc, .name, .hlabel') || row).textContent,
                   parent: row.dataset.parent || null,
                   left: (row.querySelector('.desc, .name, .hlabel') || row).getBoundingClientRect().left }))"""


def test_expanding_a_run_nests_its_bars_by_host_process_and_parent(page, clean_server):
    post(clean_server, torchrun_job())
    page.set_viewport(1200, 2400)   # the whole expanded run on screen
    open_dashboard(page, clean_server)
    run_row(page, "train.py").locator(".name").click()
    expect(run_row(page, "train.py").locator(".name")).to_have_attribute("aria-expanded", "true")
    expect(row(page, "batch r7")).to_be_visible()
    rows = page.evaluate(TREE_JS)
    texts = [r["text"] for r in rows]
    by_text = {r["text"]: r for r in rows}
    assert rows[0]["kind"] == "run" and rows[0]["level"] == 1
    # host, then process, then the epoch bar, then its batch bar one level deeper, right below it
    host = texts.index("gpu-02")
    assert by_text["gpu-02"]["level"] == 2 and texts[host + 1] == "rank 4 · pid 4004"
    assert by_text["rank 4 · pid 4004"]["level"] == 3
    assert texts[host + 2:host + 4] == ["epoch r4", "batch r4"]
    epoch, batch = by_text["epoch r4"], by_text["batch r4"]
    assert (epoch["level"], batch["level"]) == (4, 5)
    assert batch["parent"] == "exp-142-r4-epoch"
    assert batch["left"] > epoch["left"] > by_text["rank 4 · pid 4004"]["left"] > by_text["gpu-02"]["left"]
    # the failed batch bar is inside, with its error
    expect(row(page, "batch r5")).to_contain_text("RuntimeError: NCCL timeout")


def test_finished_transient_bars_fold_into_their_parent(page, clean_server):
    post(clean_server, torchrun_job(folded_batches=3))
    page.set_viewport(1200, 2400)
    open_dashboard(page, clean_server)
    run_row(page, "train.py").locator(".name").click()
    epoch = row(page, "epoch r0")
    fold = epoch.get_by_role("button", name="Show 3 finished inner bars of epoch r0")
    expect(fold).to_have_text("+ 3 finished")
    expect(row(page, "old batch")).to_have_count(0)
    expect(row(page, "batch r0")).to_have_count(1)   # the running one is not folded
    fold.click()
    expect(row(page, "old batch")).to_have_count(3)
    levels = page.evaluate(TREE_JS)
    assert {r["level"] for r in levels if r["text"].startswith("old batch")} == {5}
    epoch.get_by_role("button", name="Hide 3 finished inner bars of epoch r0").click()
    expect(row(page, "old batch")).to_have_count(0)


def test_the_view_switch_round_trips_through_the_url(page, clean_server):
    post(clean_server, torchrun_job())
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&view=bars")
    expect(page.locator("#view-switch")).to_have_value("bars")
    expect(page.locator(RUN_ROWS)).to_have_count(0)
    expect(row(page, "epoch r0")).to_be_visible()   # the flat list: every bar, no tree
    page.locator("#view-switch").select_option("runs")
    expect(run_row(page, "train.py")).to_be_visible()
    assert "view=runs" in page.evaluate("() => location.search")
    page.locator("body").press("v")   # the keyboard switch
    expect(page.locator(RUN_ROWS)).to_have_count(0)
    search = page.evaluate("() => location.search")
    assert search.count("view=bars") == 1, search
    page.goto(page.url)   # reloaded: the URL keeps the view
    expect(page.locator("#conn")).to_have_text("Connected")
    expect(page.locator("#view-switch")).to_have_value("bars")
    expect(row(page, "batch r3")).to_be_visible()


def test_a_run_row_and_its_name_stay_readable_on_a_narrow_window(page, clean_server):
    page.set_viewport(480, 800)   # WebKit's MiniBrowser goes no narrower than 447 px
    post(clean_server, torchrun_job(name="finetune llama-3-8b on support tickets"))
    open_dashboard(page, clean_server)
    name = run_row(page, "finetune").locator(".name")
    expect(name).to_have_text("▸ finetune llama-3-8b on support tickets")
    box = name.evaluate("""n => ({ width: n.getBoundingClientRect().width, fits: n.scrollWidth <= n.clientWidth + 1,
                                   right: n.getBoundingClientRect().right })""")
    assert box["fits"] and box["right"] <= 480, box   # the whole name, on its own line
    failed = run_row(page, "finetune").locator(".failed")
    expect(failed).to_have_text("1 failed")
    assert failed.evaluate("f => f.scrollWidth <= f.clientWidth + 1"), "the failed count is cut"
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 480


def test_runs_come_from_get_runs_while_polling(page, clean_server):
    # the GET /tasks?since= answers carry no runs: a polling page asks GET /runs alongside
    post(clean_server, torchrun_job())
    with path_prefix_proxy(clean_server.port, first_script="delete window.WebSocket;") as base:
        page.goto(f"{base}/static/index.html?token={TOKEN}")
        expect(page.locator("#conn")).to_have_text(re.compile(r"Connected \(polling"))
        expect(run_row(page, "train.py").locator(".failed")).to_have_text("1 failed")
        post(clean_server, task("exp-142-r2-batch", desc="batch r2", n=500, total=500, run="exp-142",
                                status="error", error="killed", seq=9))
        expect(run_row(page, "train.py").locator(".failed")).to_have_text("2 failed", timeout=10)


def test_runs_keep_their_places_under_the_pointer(page, clean_server):
    post(clean_server, [task("a1", n=10, run="slow-run", run_name="slow run"),
                        task("b1", n=50, run="fast-run", run_name="fast run")])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=progress")
    names = page.locator(f"{RUN_ROWS} .name")
    expect(names).to_have_text(["▸ slow run", "▸ fast run"])
    run_row(page, "slow run").locator(".pct").hover()
    post(clean_server, task("b1", n=5, run="fast-run", seq=2))
    expect(run_row(page, "fast run").locator(".pct")).to_have_text("5%")
    expect(names).to_have_text(["▸ slow run", "▸ fast run"])   # held while the pointer is over the list
    page.mouse_move(5, 5)
    expect(names).to_have_text(["▸ fast run", "▸ slow run"])


# --- Statuses in words ------------------------------------------------------------------------


def test_a_stalled_bar_shows_its_mark_and_reason_distinct_from_a_stale_one(page):
    with running_server(api_tokens=[TOKEN], stale_seconds=3, stall_seconds=0.5) as server:
        post(server, [task("moving-then-stuck", n=1, seq=1), task("silent", n=5, seq=1)])
        post(server, task("moving-then-stuck", n=2, seq=2))   # it moved: its pace is known
        post(server, task("moving-then-stuck", n=2, seq=3))   # a heartbeat: alive, not moving
        open_dashboard(page, server)
        stuck = row(page, "moving-then-stuck")
        expect(stuck.locator(".status")).to_have_text("○ stalled")
        expect(stuck).to_have_attribute("data-status", "stalled")
        expect(stuck.locator(".extra")).to_contain_text(
            re.compile(r"stalled: no progress for 00:0\d; usually a step every [\d.]+ s"))
        expect(row(page, "silent").locator(".status")).to_have_text("‖ stale", timeout=15)
        expect(row(page, "silent").locator(".extra")).to_contain_text("no update for")
        assert "no progress" not in row(page, "silent").locator(".extra").evaluate("e => e.textContent")


def test_a_close_short_of_its_total_reads_stopped_never_done(page, clean_server):
    post(clean_server, [task("left-early", n=40, total=100, elapsed=40, status="close"),
                        task("finished", n=100, total=100, elapsed=83, status="close")])
    open_dashboard(page, clean_server)
    early = row(page, "left-early")
    expect(early.locator(".status")).to_have_text("■ stopped")
    expect(early.locator(".extra")).to_contain_text("stopped at 40% (40/100it)")
    expect(early).to_have_attribute("data-status", "stopped")
    assert "done" not in early.evaluate("r => r.textContent")
    done = row(page, "finished")
    expect(done.locator(".status")).to_have_text("✓ done")
    expect(done.locator(".extra")).to_contain_text(re.compile(r"ended \d\d:\d\d · took 01:23"))
    fills = [r.locator(".fill").evaluate("f => getComputedStyle(f).backgroundColor")
             for r in (early, done)]
    assert fills[0] != fills[1], fills   # not the green of done


# --- Time that moves: sparklines, ETA on the clock, ticking -----------------------------------


def test_sparklines_wall_clock_eta_and_the_history_chart(page, clean_server):
    open_dashboard(page, clean_server)
    for seq, n in enumerate([10, 25, 32, 50, 61], start=1):
        post(clean_server, task("sparked", n=n, total=1000, rate=3.0, elapsed=10 + seq,
                                seq=seq, run="job-7", run_name="nightly etl"))
        # each value reaches the page before the next is sent: one sample per update
        if seq == 1:
            page.locator("#view-switch").select_option("bars")
        expect(row(page, "sparked").locator(".count")).to_have_text(f"{n}/1000it")
    path = row(page, "sparked").locator(".spark path")
    expect(path).to_have_attribute("d", re.compile(r"^M[\d.]+ [\d.]+(L[\d.]+ [\d.]+){2,}$"))
    expect(row(page, "sparked").locator(".extra")).to_contain_text(WALL_CLOCK)
    # the run row: its own ETA on the clock and a sparkline of its progress rate
    page.locator("#view-switch").select_option("runs")
    expect(run_row(page, "nightly etl").locator(".rtime")).to_contain_text(WALL_CLOCK)
    expect(run_row(page, "nightly etl").locator(".spark path")).to_have_attribute(
        "d", re.compile(r"^M.+L"))
    # the info panel draws the history GET /tasks/{id} answers
    page.locator("#view-switch").select_option("bars")
    row(page, "sparked").locator("button.info").click()
    expect(page.locator("#details-history")).to_be_visible()
    expect(page.locator("#details-chart .count-line")).to_have_attribute("d", re.compile(r"^M.+L"))
    expect(page.locator("#details-legend")).to_contain_text("samples; peak rate")
    expect(page.locator("#details")).to_contain_text(re.compile(r"≈ (tomorrow )?\d\d:\d\d"))
    # the wording of wall-clock times, whatever the engine's locale and zone: 24-hour, then
    # "tomorrow", then a weekday within the week; and the step as the server's messages say it
    said = page.evaluate("""() => { const p = window.progressista, now = p.state.clock.serverNow;
        return [p.wallClock(now), p.wallClock(now + 86400), p.wallClock(now + 3 * 86400),
                p.formatStep(3), p.formatStep(0.25), p.formatStep(45), p.formatStep(720)]; }""")
    assert re.fullmatch(r"\d\d:\d\d", said[0]) and said[1] == "tomorrow " + said[0], said
    assert re.fullmatch(r"\S+ \d\d:\d\d", said[2]) and not said[2].startswith("tomorrow"), said
    assert said[3:] == ["3 s", "0.25 s", "45 s", "12 min"], said


def test_elapsed_ticks_between_updates(page, clean_server):
    post(clean_server, task("ticking", n=10, total=100, elapsed=30, rate=1.0))
    open_dashboard(page, clean_server)
    time_cell = row(page, "ticking").locator(".time")
    expect(time_cell).to_have_text(re.compile(r"^00:3[0-1]<01:[2-3]\d$"))
    expect(row(page, "ticking").locator(".rate")).to_have_text(re.compile(r"^(1\.00it/s|[\d.]+s/it)$"))
    # no update arrives: the page's own clock moves elapsed on and counts the ETA down
    expect(time_cell).to_have_text(re.compile(r"^00:3[2-9]<01:[0-2]\d$"), timeout=6)
    expect(row(page, "ticking").locator(".extra")).to_contain_text(
        re.compile(r"no update for 00:0[5-9]"), timeout=8)
    # and the shown rate decays: 1 it/s two seconds after the last update, less and less after
    expect(row(page, "ticking").locator(".rate")).to_have_text(re.compile(r"^[\d.]+s/it$"))


# --- Artifact -----------------------------------------------------------------------------------


def test_screenshot_of_the_runs_view_is_saved_as_an_artifact(page, clean_server):
    """A torchrun-like job (2 hosts x 4 ranks, epoch and batch bars, one failed rank) expanded
    under three other runs, each bar updated a few times so that the sparklines have a shape."""
    page.set_viewport(1100, 1000)
    if page.engine != "webkit":
        page.emulate_media(reduced_motion="reduce")
    open_dashboard(page, clean_server)
    for step in range(4):
        job = torchrun_job(name="torchrun train.py --config vit-b16.yaml", folded_batches=step)
        for item in job:
            if item.get("status", "running") == "running":
                item.update(n=item["n"] + step * (1 if "epoch" in item["task_id"] else 37 + step * 9),
                            seq=step + 1)
        post(clean_server, job)
        expect(run_row(page, "torchrun").locator(".done")).to_have_text(f"{step}/{16 + step} bars done")
    others = [
        task("prep-1", desc="tokenize shards", n=512, total=512, unit="shard", rate=3.1, elapsed=165,
             status="close", run="prep-7", run_name="prepare_data.py --shards 512",
             meta={"host": "cpu-07"}),
        task("eval-1", desc="evaluate checkpoint 12", n=430, total=1000, rate=9.8, elapsed=44,
             run="eval-3", run_name="eval.py ckpt-12", meta={"host": "gpu-03"}),
        task("sweep-1", desc="trial 4/20", n=4, total=20, rate=0.01, elapsed=400,
             run="sweep-9", run_name="optuna sweep lr", meta={"host": "gpu-04"}),
    ]
    for step in range(3):
        for item in others:
            if item.get("status") != "close":
                item.update(n=item["n"] + (10 * step + 1 if item["total"] > 100 else 1), seq=step + 1)
        post(clean_server, others)
        expect(run_row(page, "eval.py").locator(".pct")).to_have_text(["43%", "44%", "46%"][step])
    run_row(page, "torchrun").locator(".name").click()
    expect(row(page, "batch r0")).to_be_visible()
    expect(run_row(page, "torchrun").locator(".spark path")).to_have_attribute("d", re.compile("L"))
    page.mouse_move(1090, 10)   # no hover outline in the picture
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / ("runs.png" if page.engine == "chromium" else f"runs-{page.engine}.png")
    page.screenshot(path)
    assert path.stat().st_size > 10_000
