"""What one sweep costs with many stored tasks: the scheduled sweep against a walk of
every task (what the sweep did before it kept a schedule), in one process.

    python bench/bench_sweep.py                  # 1,000,000 tasks, about a minute
    python bench/bench_sweep.py --tasks 100000

Builds a MemoryStore of N tasks (one update each), runs the first sweep (which looks at
every task once and schedules each), then times, alternately, sweeps at later seconds
while 1% of the tasks are updated between sweeps, and a plain sweep_plan() walk over
every task at the same moment. Prints the median of each and the ratio.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import progressista  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    settings = progressista.Settings(max_tasks=args.tasks + 1)
    store = progressista.MemoryStore(max_tasks=args.tasks + 1)
    now = 1_000.0
    for start in range(0, args.tasks, 10_000):
        store.apply([progressista.validate_update({"task_id": f"t{i}", "n": 1, "total": 10})
                     for i in range(start, min(start + 10_000, args.tasks))], now)
    started = time.process_time()
    store.sweep(now, settings)
    first_s = time.process_time() - started
    scheduled, walked = [], []
    for round_number in range(args.rounds):
        now += 1.0
        moved = [progressista.validate_update({"task_id": f"t{i}", "n": 2 + round_number})
                 for i in range(round_number, args.tasks, 100)]  # 1% of them
        store.apply(moved, now)
        started = time.process_time()
        store.sweep(now, settings)
        scheduled.append(time.process_time() - started)
        started = time.process_time()
        progressista.sweep_plan(store.by_id.values(), now, settings)
        walked.append(time.process_time() - started)
    one, every = statistics.median(scheduled), statistics.median(walked)
    print(f"{args.tasks:,} tasks, 1% updated between sweeps; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"first sweep (looks at every task, schedules each): {first_s * 1000:.0f} ms")
    print(f"a sweep with the schedule: {one * 1000:.2f} ms; a walk of every task: "
          f"{every * 1000:.0f} ms (x{every / max(one, 1e-9):,.0f}); median of {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
