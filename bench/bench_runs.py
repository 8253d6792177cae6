"""Run summaries in process: what RunIndex costs, without HTTP.

    python bench/bench_runs.py                     # about 30 s on 2 cores
    python bench/bench_runs.py --tasks 10000 --runs 100

Builds a memory store of 100,000 tasks in 1,000 runs (each run: 50 top-level bars, each
with one nested bar; four hosts; a few bars closed or failed), indexes it with RunIndex,
and prints:

- all summaries (GET /runs' dict) cold, warm, and encoded as JSON, and after N updates
  spread over random tasks (the runs they touch catch up; the target for GET /runs as a
  whole is 50 ms);
- the per-update cost of single-update applies without the index and with it, in
  alternate rounds of the same process: what noting a change adds to the apply, and what
  catching up on it adds at the next read of the runs (the worst case: every update is
  to a different task, so nothing coalesces).

Figures are this process's CPU time (on an idle machine, the wall time); they still
move with the machine's load (caches, frequency): the first line prints the load average.

With --http it measures the real server instead (a subprocess, driven by Debian's wrk
as bench_server.py does): single-update ingest where every update names one of 1,000
runs, against the same load without runs, in alternate rounds (target: at least 0.9x
the requests/s, and the server CPU per request beside it); then GET /runs over HTTP with
--tasks tasks in --runs runs (target: under 50 ms, wall time, median of 20).
"""

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_server, for --http

import progressista  # noqa: E402  (after the path set-up above)

THRESHOLDS = progressista.Thresholds()  # the default stale and stall settings
NOW = 1_790_000_000.0


def shown_status(task, now):
    return task.shown_status(now, THRESHOLDS)


def build_updates(tasks, runs):
    """One creating update per task: top-level bars and their nested bars, by run."""
    per_run = tasks // runs
    updates = []
    for r in range(runs):
        run = f"run-{r:04d}"
        for k in range(per_run):
            top = k % 2 == 0
            task_id = f"{run}/{k:03d}"
            update = {
                "task_id": task_id, "desc": "epoch" if top else "batch", "n": k,
                "total": 100 if top else 500, "rate": 1.5, "run": run,
                "run_name": f"python train.py --seed {r}", "seq": 1,
                "meta": {"host": f"gpu-{r % 50:02d}-{k % 4}", "rank": k // 2},
                "status": "error" if k == 7 else "close" if k % 25 == 1 else "running",
            }
            if not top:
                update["parent"] = f"{run}/{k - 1:03d}"
            updates.append(update)
    return updates


def timed(action):
    """(CPU seconds this process spent on `action`, its result): on a shared machine the
    wall clock also counts the time other processes held the CPU."""
    gc.collect()
    started = time.process_time()
    result = action()
    return time.process_time() - started, result


def moves(store, count, seq, rng):
    """`count` single updates, each moving a random running task on by one step."""
    ids = [task.task_id for task in store.tasks() if task.status == "running"]
    picked = [rng.choice(ids) for _ in range(count)]
    return [[{"task_id": task_id, "n": seq + i, "seq": seq + i, "rate": 2.0}]
            for i, task_id in enumerate(picked)]


def ingest(store, index, batches, now):
    """Apply each batch as the server would; with an index, tell it what changed."""
    apply = store.apply
    if index is None:
        for batch in batches:
            apply(batch, now)
        return
    changed = index.changed
    for batch in batches:
        changed(apply(batch, now))


def http_part(args):
    """The server's figures: ingest with and without runs, and GET /runs."""
    import http.client
    import tempfile
    import bench_server as bench

    class WrkArgs:  # what bench_server's wrk driver reads
        threads, connections = 1, 8
        wrk = bench.shutil.which("wrk") or "/usr/bin/wrk"

    logdir = tempfile.mkdtemp(prefix="progressista-bench-runs-")
    port = bench.free_port()
    server = bench.Child("server", [sys.executable, os.path.join(bench.ROOT, "progressista.py"),
                                    "--host", "127.0.0.1", "--port", str(port), "--log-level",
                                    "warning", "--max-tasks", str(args.tasks * 2)], logdir)
    try:
        bench.wait_http(port, server)
        bench.run_wrk_timed(WrkArgs, port, 1, "single", "w0000001", [server], args.runs)
        plain, with_runs = [], []
        for round_number in range(args.rounds):
            for runs, into in ([(0, plain), (args.runs, with_runs)] if round_number % 2 == 0
                               else [(args.runs, with_runs), (0, plain)]):
                run = bench.run_wrk_timed(WrkArgs, port, args.seconds, "single",
                                          "r%07d" % runs, [server], runs)
                bench.show(f"{'with' if runs else 'without'} runs, round {round_number + 1}",
                           run, "server")
                into.append(run)
        best_plain = max(run["rps"] for run in plain)
        best_runs = max(run["rps"] for run in with_runs)
        cpu = [min(run["cpu_s"]["server"] * 1e6 / run["requests"] for run in runs)
               for runs in (plain, with_runs)]
        print(f"single-update ingest, every update in one of {args.runs:,} runs: "
              f"{best_runs:,.0f} req/s against {best_plain:,.0f} without runs: "
              f"x{best_runs / best_plain:.2f} (target >= 0.9); CPU per request "
              f"{cpu[1]:.1f} us against {cpu[0]:.1f} us (x{cpu[1] / cpu[0]:.2f})")
        bench.request(port, "DELETE", "/tasks")
        for start in range(0, args.tasks, 1000):
            batch = [{"task_id": f"t{i:07d}", "run": f"run-{i % args.runs:04d}", "n": i % 97,
                      "total": 100, "meta": {"host": f"node-{i % 16:02d}"}}
                     for i in range(start, min(start + 1000, args.tasks))]
            status, body = bench.request(port, "POST", "/progress", json.dumps(batch).encode())
            assert status == 200, body
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        took = []
        for _ in range(20):
            started = time.perf_counter()
            connection.request("GET", "/runs")
            response = connection.getresponse()
            body = response.read()
            took.append(time.perf_counter() - started)
        runs_seen = len(json.loads(body)["runs"])
        connection.close()
        print(f"GET /runs with {args.tasks:,} tasks in {runs_seen:,} runs: "
              f"{statistics.median(took) * 1000:.1f} ms (median of 20, wall; "
              f"{len(body) / 1024:.0f} KiB; target < 50 ms)")
    finally:
        bench.stop_all()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--updates", type=int, default=20_000,
                        help="single updates per ingest round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--http", action="store_true",
                        help="measure the real server over HTTP instead (needs wrk)")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run (--http)")
    args = parser.parse_args(argv)
    if args.http:
        return http_part(args)
    rng = random.Random(42)

    store = progressista.MemoryStore(max_tasks=args.tasks * 2)
    build_s, _ = timed(lambda: store.apply(build_updates(args.tasks, args.runs), NOW))
    index = progressista.RunIndex(store.get, shown_status)
    load_s, _ = timed(lambda: index.load(list(store.by_id), NOW))
    print(f"{len(store):,} tasks in {len(index):,} runs (store built in {build_s:.2f} s, "
          f"indexed in {load_s * 1000:.0f} ms); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    cold_s, first = timed(lambda: index.summaries(NOW))
    warm = [timed(lambda: index.summaries(NOW))[0] for _ in range(20)]
    print(f"all summaries, cold: {cold_s * 1000:.1f} ms; warm: "
          f"{statistics.median(warm) * 1000:.2f} ms (median of 20)")
    assert len(first) == args.runs
    encoded = [timed(lambda: json.dumps({"runs": index.summaries(NOW), "now": NOW},
                                        separators=(",", ":")))[0] for _ in range(20)]
    print(f"GET /runs' body, warm summaries encoded as JSON: "
          f"{statistics.median(encoded) * 1000:.1f} ms (median of 20)")

    seq = 10
    for count in (100, 1_000, 10_000):
        took, touched = [], []
        for _ in range(args.rounds):
            batches = moves(store, count, seq, rng)
            seq += count
            ingest(store, index, batches, NOW + 1)
            took.append(timed(lambda: index.summaries(NOW + 1))[0])
            touched.append(len(index.take_changed(NOW + 1)[0]))
        print(f"all summaries after {count:,} updates to random tasks (about "
              f"{statistics.median(touched):,.0f} runs touched): "
              f"{statistics.median(took) * 1000:.1f} ms (median of {args.rounds})")

    # The same updates to two equal stores, one indexed, in alternate rounds. Every
    # update goes to a different task, so no change coalesces before the next read: the
    # catch-up figure is the worst case.
    twin = progressista.MemoryStore(max_tasks=args.tasks * 2)
    twin.apply(build_updates(args.tasks, args.runs), NOW)
    plain, noted, caught_up = [], [], []
    for round_number in range(args.rounds):
        batches = moves(store, args.updates, seq, rng)
        seq += args.updates
        copies = [[dict(update) for update in batch] for batch in batches]
        if round_number % 2:  # which goes first alternates: neither gets the warmer cache
            plain.append(timed(lambda: ingest(twin, None, copies, NOW + 2))[0])
        noted.append(timed(lambda: ingest(store, index, batches, NOW + 2))[0])
        caught_up.append(timed(lambda: index.summaries(NOW + 2))[0])
        if not round_number % 2:
            plain.append(timed(lambda: ingest(twin, None, copies, NOW + 2))[0])
    per_update_us = [statistics.median(times) / args.updates * 1e6
                     for times in (plain, noted, caught_up)]
    plain_us, noted_us, caught_up_us = per_update_us
    print(f"single-update apply: {plain_us:.2f} us without the index; with it "
          f"{noted_us:.2f} us (x{noted_us / plain_us:.2f}), plus {caught_up_us:.2f} us "
          f"at the next read of the runs (x{(noted_us + caught_up_us) / plain_us:.2f} "
          f"in all; median of {args.rounds} rounds of {args.updates:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
