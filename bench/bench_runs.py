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

No server and no sockets: the HTTP-level figure comes from the server's benchmark once
GET /runs is routed.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--updates", type=int, default=20_000,
                        help="single updates per ingest round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
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
