"""Memory per stored task, with and without its history, at 100,000 tasks.

    python bench/bench_memory.py                  # a few minutes on 2 cores
    python bench/bench_memory.py --tasks 20000 --lengths 2,101

For each history length it starts a fresh Python process (this script, --one), which
builds the store the server builds, in process, with an injected clock: the realistic
tasks of bench_server.py (a JSON body each, parsed and validated as POST /progress does)
applied to a MemoryStore, then updated once a second until each task's history holds
the given number of [t, n] pairs. It prints the growth of the process's VmRSS divided by
the number of tasks (the figure bench_server.py's part 4 measures through a real server),
and the bytes the history arrays themselves take.

"without history" is the same store after two updates per task with the history never
kept: what the task costs with the other v2 fields. The target (issue 11): at most 1.5 KiB
per task with history at 100,000 tasks. A long-running bar's history holds between 51
and 101 pairs (the server thins 101 to 51, MAX_HISTORY_SETTLED), about 75 on average:
"realistic" below.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import progressista  # noqa: E402
from bench_server import realistic_tasks, vm_kib  # noqa: E402

TARGET_BYTES = 1536  # 1.5 KiB
START = 1.79e9  # server time of the first update


def build(tasks, pairs, drop_history):
    """The store after each task's first update and `pairs - 1` more, one second apart."""
    bodies = [json.dumps(task).encode() for task in tasks]  # what arrives, kept as base
    if drop_history:  # history never kept (a no-op settle): the v2 task without it
        progressista.settle_history = lambda task, now: None
    gc_settled()
    base = vm_kib(os.getpid())
    store = progressista.MemoryStore(max_tasks=len(tasks))
    for index, body in enumerate(bodies):
        store.apply([progressista.validate_update(json.loads(body))], START + index * 1e-6)
    for step in range(1, max(pairs, 2)):
        for index, task in enumerate(tasks):
            update = {"task_id": task["task_id"], "n": task["n"] + step, "seq": 1 + step}
            store.apply([update], START + step + index * 1e-6)  # a new float each, as live
    gc_settled()
    grown = vm_kib(os.getpid()) - base
    stored = store.tasks()
    shown = [len(progressista.history_pairs(task)) for task in stored[:100]]
    arrays = sum(sys.getsizeof(task.history) for task in stored if task.history is not None)
    return {"bytes_per_task": grown * 1024 / len(tasks), "pairs_shown": max(shown),
            "history_bytes_per_task": arrays / len(tasks)}


def gc_settled():
    import gc

    gc.collect()
    time.sleep(0.2)


def one(args):
    tasks = realistic_tasks(args.tasks, random.Random(42))
    figures = build(tasks, args.pairs, args.drop_history)
    print(json.dumps(figures))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--lengths", default="2,30,51,75,101",
                        help="history lengths (pairs) to measure (default 2,30,51,75,101)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--drop-history", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one(args)
    runs = [("without history (2 updates)", 2, True)]
    runs += [(f"history of {pairs} pairs" + (" (realistic)" if pairs == 75 else ""),
              pairs, False) for pairs in map(int, args.lengths.split(","))]
    rows = []
    for label, pairs, drop in runs:
        argv_one = [sys.executable, os.path.abspath(__file__), "--one", "--tasks",
                    str(args.tasks), "--pairs", str(pairs)] + (["--drop-history"] if drop else [])
        started = time.monotonic()
        result = json.loads(subprocess.run(argv_one, check=True, capture_output=True,
                                           text=True).stdout)
        rows.append((label, result))
        print(f"{label:34} {result['bytes_per_task']:6.0f} B/task "
              f"({result['bytes_per_task'] / 1024:.2f} KiB; history arrays "
              f"{result['history_bytes_per_task']:.0f} B; {result['pairs_shown']} pairs shown; "
              f"{time.monotonic() - started:.0f} s)", flush=True)
    worst = max(result["bytes_per_task"] for _, result in rows)
    print(f"\n{args.tasks:,} tasks, Python {sys.version.split()[0]}: at most "
          f"{worst / 1024:.2f} KiB per task (target <= {TARGET_BYTES / 1024:.1f} KiB): "
          f"{'PASS' if worst <= TARGET_BYTES else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
