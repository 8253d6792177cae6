"""Progressista at a cluster's scale: a million stored tasks and /ws clients connecting.

    python bench/bench_scale.py                     # 1,000,000 tasks, a few minutes
    python bench/bench_scale.py --tasks 200000 --seconds 5

In one run, against 127.0.0.1 only, it starts the real server (``python progressista.py
--max-tasks N``) as a subprocess, fills it with N realistic tasks in batches of 1,000, and
measures

1. memory per stored task: the server's VmRSS growth divided by N (target <= 1 KiB);
2. single-update ingest with `wrk` (as bench_server.py part 1) without /ws clients, then
   the same while a /ws client connects every second and reads a whole snapshot
   (`snapshot`, then `snapshot_more` parts until "more": false): requests/s ratio
   (target >= 0.7), the p99 latency of the ingest while clients connect (target
   < 50 ms), and how long each client waited for its whole snapshot (target < 10 s).

Every part is bounded in time; only the processes it started are stopped, by their PID.
"""

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_server as bench  # noqa: E402 (the wrk driver, process control, tasks)

TARGETS = {"bytes_per_task": 1024, "rps_ratio": 0.7, "p99_ms": 50.0, "snapshot_s": 10.0}


def start_server(args, logdir):
    port = bench.free_port()
    store = args.store.replace("LOGDIR", logdir)
    child = bench.Child("server", [sys.executable, args.server, "--host", "127.0.0.1",
                                   "--port", str(port), "--log-level", "warning",
                                   "--max-tasks", str(args.tasks + 10_000),
                                   "--store", store], logdir=logdir)
    bench.wait_http(port, child)
    return child, port


def fill(port, count, running_fraction, per_post=1000):
    """Post `count` realistic tasks, generated a batch at a time (a million dicts at once
    would cost this process gigabytes): the newest `running_fraction` of them running,
    the others finished, as in a store that holds a cluster's last day or days."""
    rng = random.Random(42)
    running_from = count - int(count * running_fraction)
    for start in range(0, count, per_post):
        tasks = bench.realistic_tasks(min(per_post, count - start), rng)
        for index, task in enumerate(tasks, start):
            if index < running_from:
                task["status"] = "error" if index % 50 == 0 else "close"
        bench.post_all(port, tasks, per_post)


def reconnector(url, seconds):
    """Connect to /ws every second for `seconds`; print one JSON line per snapshot read."""
    from websockets.sync.client import connect

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        first_s = None
        tasks = 0
        with connect(url, max_size=None, open_timeout=10) as socket:
            while True:
                # The bytes, not json.loads: parsing a million tasks a second in Python
                # would take this process a core, and the server is what is measured.
                message = socket.recv(timeout=60, decode=False)
                head = message[:40]
                if not (head.startswith(b'{"type":"snapshot"')
                        or head.startswith(b'{"type":"snapshot_more"')):
                    continue
                if first_s is None:
                    first_s = time.monotonic() - started
                tasks += message.count(b'"task_id":')
                if message.rfind(b'},"more":true,"now":') < 0:  # the last part
                    break
        took = time.monotonic() - started
        print(json.dumps({"first_s": first_s, "whole_s": took, "tasks": tasks}), flush=True)
        time.sleep(max(0.0, 1.0 - took))


def part_memory(args, server, port, results):
    base = bench.settled_rss(server.pid, 0.5)
    started = time.monotonic()
    fill(port, args.tasks, args.running)
    took = time.monotonic() - started
    filled = bench.settled_rss(server.pid)
    results["bytes_per_task"] = (filled - base) * 1024 / args.tasks
    results["fill_s"] = took
    print(f"1. {args.tasks:,} tasks posted in {took:.1f} s; VmRSS {base / 1024:.1f} MiB "
          f"empty, {filled / 1024:.1f} MiB full: {results['bytes_per_task']:.0f} B/task",
          flush=True)


def part_reconnects(args, server, port, logdir, results):
    print(f"2. single-update ingest with {args.tasks:,} tasks stored, without and with a "
          "/ws client connecting every second", flush=True)
    alone = bench.run_wrk_timed(args, port, args.seconds, "single", "scale-a", [server])
    bench.show("no /ws clients", alone, "server")
    clients = bench.Child("reconnector", [sys.executable, os.path.abspath(__file__),
                                          "--reconnector", f"ws://127.0.0.1:{port}/ws",
                                          "--seconds", str(args.seconds + 30)], logdir=logdir)
    try:
        first = json.loads(clients.wait_line("{", 120)[0:])  # the first snapshot, unloaded
        busy = bench.run_wrk_timed(args, port, args.seconds, "single", "scale-b", [server])
        bench.show("a /ws client every second", busy, "server")
        snapshots = [first]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                snapshots.append(json.loads(clients.wait_line("{", 1)))
            except RuntimeError:
                break
    finally:
        clients.stop()
    results["rps_alone"] = alone["rps"]
    results["rps_with_clients"] = busy["rps"]
    results["rps_ratio"] = busy["rps"] / alone["rps"]
    results["p99_ms_alone"] = alone["p99_us"] / 1000
    results["p99_ms"] = busy["p99_us"] / 1000
    results["snapshot_first_part_s"] = max(s["first_s"] for s in snapshots)
    results["snapshot_s"] = snapshots[0]["whole_s"]  # the first: no part encoded before
    results["snapshot_loaded_s"] = [s["whole_s"] for s in snapshots[1:]]
    results["snapshots_read"] = len(snapshots)
    results["snapshot_tasks"] = snapshots[-1]["tasks"]
    print(f"  {len(snapshots)} snapshots of {snapshots[-1]['tasks']:,} tasks read: first "
          f"part within {results['snapshot_first_part_s']:.2f} s; the first whole in "
          f"{results['snapshot_s']:.1f} s, the next ones, under the ingest, in "
          + ", ".join(f"{s:.1f}" for s in results["snapshot_loaded_s"]) + " s", flush=True)


def table(results, args, started, command):
    rows = [
        ("memory per stored task", f"{results['bytes_per_task']:.0f} B",
         f"<= {TARGETS['bytes_per_task']} B",
         results["bytes_per_task"] <= TARGETS["bytes_per_task"]),
        ("ingest req/s with a /ws client every second (none)",
         f"{results['rps_with_clients']:,.0f} ({results['rps_alone']:,.0f}): "
         f"x{results['rps_ratio']:.2f}", f">= x{TARGETS['rps_ratio']}",
         results["rps_ratio"] >= TARGETS["rps_ratio"]),
        ("ingest p99 latency with those clients (none)",
         f"{results['p99_ms']:.1f} ms ({results['p99_ms_alone']:.1f} ms)",
         f"< {TARGETS['p99_ms']:g} ms", results["p99_ms"] < TARGETS["p99_ms"]),
        ("first whole snapshot delivered", f"{results['snapshot_s']:.1f} s",
         f"< {TARGETS['snapshot_s']:g} s", results["snapshot_s"] < TARGETS["snapshot_s"]),
    ]
    print(f"\n{args.tasks:,} tasks ({args.running:.0%} running, {args.store}); "
          f"{started:%Y-%m-%d %H:%M} UTC; "
          f"{command}")
    print("| figure | measured | target | result |\n| --- | --- | --- | --- |")
    for name, measured, target, ok in rows:
        print(f"| {name} | {measured} | {target} | {bench.verdict(ok)} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=8, help="seconds per wrk measurement")
    parser.add_argument("--store", default="memory://",
                        help="the server's --store; LOGDIR is replaced by the run's "
                             "directory, e.g. sqlite://LOGDIR/tasks.db")
    parser.add_argument("--running", type=float, default=0.01,
                        help="the share of stored tasks still running (default 0.01: the "
                             "others finished); at 1.0 they all go stale during the run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server", default=os.path.join(bench.ROOT, "progressista.py"))
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--reconnector", metavar="WS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reconnector:
        reconnector(args.reconnector, args.seconds)
        return 0
    if not os.path.exists(args.wrk):
        parser.error(f"wrk not found at {args.wrk}: apt-get install wrk")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], bench.ROOT)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    logdir = tempfile.mkdtemp(prefix="progressista-scale-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = {}
    try:
        server, port = start_server(args, logdir)
        part_memory(args, server, port, results)
        part_reconnects(args, server, port, logdir, results)
    finally:
        bench.stop_all()
    table(results, args, started, command)
    if args.json:
        results.update(date=started.isoformat(timespec="seconds"), command=command)
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
