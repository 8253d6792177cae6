"""Progressista server benchmark: one command, every server figure of "Performance".

    python bench/bench_server.py                 # about a minute on 2 cores
    python bench/bench_server.py --seconds 8 --rounds 3 --json /tmp/bench.json

In one run, against 127.0.0.1 only, it starts

* the real server, ``python progressista.py --host 127.0.0.1 --port P --log-level
  warning --max-tasks 200000`` (a subprocess, so that its CPU time can be read from
  /proc/PID/stat),
* the floor, bench/floor_server.py: a bare asyncio.Protocol answering every request with
  a fixed 200 (the least Python asyncio HTTP can cost on this machine),

and drives them from separate processes: Debian's ``wrk`` (1 thread, 8 keep-alive
connections) with bench/wrk_post.lua, which builds realistic tqdm updates of about 260
bytes over 1,000 task ids with increasing seq (so every update is applied), and
bench/ws_listeners.py (100 /ws listeners that read and discard). It measures

1. single-update ingest: requests/s and server CPU microseconds per request, for the
   server and the floor, and their ratios (targets: CPU/request <= 2x the floor's,
   requests/s >= 0.5x the floor's), for the server as it starts by default
   (``--json-parser auto``: orjson when it is installed) and with ``--json-parser
   stdlib`` (``--json-parsers`` chooses; the table says which one the default is);
2. batched ingest, 100 updates per POST: task-updates/s (target >= 150,000), for the
   same servers;
3. single-update ingest with 100 /ws listeners connected (default broadcast interval)
   against the same without them (target: ratio >= 0.70);
4. memory per stored task: the server's VmRSS growth from posting 100,000 realistic
   tasks, divided by 100,000 (target <= 1 KiB);

then prints a table with figures, targets, PASS/MISS, the date and the command. Every
part is bounded in time; only the processes it started are stopped, by their PID. The
machine may be shared: each measurement also shows how busy the other processes kept
the CPUs ("others"), and with --rounds > 1 the best round of each figure is kept.
Ratios within one run are what matter.
"""

import argparse
import datetime
import http.client
import importlib.util
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LUA = os.path.join(HERE, "wrk_post.lua")
TICKS = os.sysconf("SC_CLK_TCK")
IDS = 1000
BATCH = 100

TARGETS = {
    "cpu_ratio": 2.0,  # server CPU/request at most 2x the floor's
    "rps_ratio": 0.5,  # server requests/s at least half the floor's
    "batched": 150_000,  # task-updates/s
    "listeners_ratio": 0.70,
    "bytes_per_task": 1024,
}


# --- Processes ---------------------------------------------------------------------------


def free_port():
    """A loopback port nothing listens on (bound a moment ago, then freed); the one copy
    every script in bench/ uses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_ticks(pid):
    """utime + stime of `pid`, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError):
        return 0


def machine_busy_ticks():
    """Busy clock ticks of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle


def vm_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class Child:
    """A subprocess this bench started; stopped by its own PID, never by name."""

    def __init__(self, name, argv, logdir, stdin=None):
        self.name = name
        self.log_path = os.path.join(logdir, name + ".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=self.log)
        self.pid = self.proc.pid
        self.pending = b""
        RUNNING.append(self)

    def wait_line(self, prefix, timeout):
        """The first stdout line that starts with `prefix`; never blocks past `timeout`."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            lines = self.pending.split(b"\n")
            for index, line in enumerate(lines[:-1]):
                if line.startswith(prefix.encode()):
                    self.pending = b"\n".join(lines[index + 1:])
                    return line.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.pending += chunk
        raise RuntimeError(f"{self.name}: no {prefix!r} line within {timeout} s; it printed "
                           f"{self.pending[-300:]!r}; see {self.log_path}: {self.tail()}")

    def tail(self):
        try:
            with open(self.log_path, "rb") as file:
                return file.read()[-600:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=5.0):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdin:
            self.proc.stdin.close()
        self.log.close()
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING = []


def stop_all():
    for child in list(reversed(RUNNING)):
        try:
            child.stop()
        except Exception as error:  # keep stopping the others
            print(f"warning: could not stop {child.name} (pid {child.pid}): {error}",
                  file=sys.stderr)


def request(port, method, path, body=None, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_http(port, child, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited: {child.tail()}")
        try:
            status, _ = request(port, "GET", "/health", timeout=1)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not answer on port {port} within {timeout} s")


def start_server(args, logdir, name="server", extra=(), script=None):
    port = free_port()
    child = Child(name, [sys.executable, script or args.server, "--host", "127.0.0.1", "--port",
                         str(port), "--log-level", "warning", "--max-tasks", "200000",
                         *extra], logdir=logdir)
    wait_http(port, child)
    return child, port


# The servers parts 1 and 2 compare: "default" is started without --json-parser.
JSON_PARSER_FLAGS = {"default": (), "stdlib": ("--json-parser", "stdlib"),
                     "orjson": ("--json-parser", "orjson")}


def default_json_parser():
    """What the server's --json-parser auto picks: it runs on this interpreter."""
    return "orjson" if importlib.util.find_spec("orjson") is not None else "stdlib"


def parser_label(variant):
    if variant == "baseline":
        return "baseline"
    if variant == "default":
        return f"default ({default_json_parser()})"
    return variant


def start_servers(args, logdir):
    """{variant: (child, port)}: one server per --json-parsers variant."""
    servers = {}
    try:
        for variant in args.json_parsers:
            servers[variant] = start_server(args, logdir, f"server-{variant}",
                                            JSON_PARSER_FLAGS[variant])
        if args.baseline:  # older code, measured in the same rounds
            servers["baseline"] = start_server(args, logdir, "server-baseline",
                                               script=args.baseline)
    except BaseException:
        for child, _ in servers.values():
            child.stop()
        raise
    return servers


def start_floor(logdir):
    port = free_port()
    child = Child("floor", [sys.executable, os.path.join(HERE, "floor_server.py"),
                            "--port", str(port)], logdir=logdir)
    child.wait_line("FLOOR_READY", 10)
    return child, port


# --- Load --------------------------------------------------------------------------------

SEQ = [1]  # every wrk run starts its seq above the previous run's: all updates apply


def run_wrk(args, port, seconds, mode, tag, watched, runs=0):
    """Run wrk for `seconds`; return its figures and the CPU each watched child used.
    `runs` > 0: each update names one of that many runs (bench_runs.py --http)."""
    seq0 = SEQ[0]
    SEQ[0] += 500_000_000
    argv = [args.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s",
            "--timeout", "5s", "-s", LUA, f"http://127.0.0.1:{port}", "--",
            mode, str(IDS), str(BATCH), str(seq0), tag, str(runs)]
    before = {child.name: cpu_ticks(child.pid) for child in watched}
    busy_before = machine_busy_ticks()
    wall = time.monotonic()
    wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = wrk.communicate(timeout=seconds + 30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    wall = time.monotonic() - wall
    busy = machine_busy_ticks() - busy_before
    used = {child.name: cpu_ticks(child.pid) - before[child.name] for child in watched}
    result = wrk_figures(wrk.returncode, out, err, f"port {port}")
    seconds_run = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds_run
    result["cpu_s"] = {name: ticks / TICKS for name, ticks in used.items()}
    result["busy_ticks"] = busy - sum(used.values())  # wrk's own share comes off later
    result["wall_s"] = wall
    return result


def wrk_figures(returncode, out, err, target):
    """The figures wrk_post.lua printed (its WRK_JSON line), from wrk's exit status and
    output; RuntimeError if wrk failed or saw any error against `target`."""
    line = next((line for line in out.decode().splitlines() if line.startswith("WRK_JSON ")), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({returncode}): {err.decode()[-500:]}")
    result = json.loads(line[len("WRK_JSON "):])
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors against {target}: {result}")
    return result


OTHERS = []  # how many cores other processes kept busy, per measurement


def run_wrk_timed(args, port, seconds, mode, tag, watched, runs=0):
    """run_wrk, plus the CPU wrk itself used (a reaped child: RUSAGE_CHILDREN)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_wrk(args, port, seconds, mode, tag, watched, runs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["wrk_cpu_s"] = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    others = result["busy_ticks"] / TICKS - result["wrk_cpu_s"]
    result["others_cores"] = max(0.0, others / result["wall_s"])
    OTHERS.append(result["others_cores"])
    return result


def show(label, run, child_name, per="request", count=None):
    count = count or run["requests"]
    cpu = run["cpu_s"].get(child_name, 0.0)
    print(f"  {label:<34} {run['rps']:>10,.0f} req/s  {cpu * 1e6 / count:>8.1f} us CPU/{per}"
          f"  p99 {run['p99_us'] / 1000:>6.1f} ms  wrk {run['wrk_cpu_s'] / run['wall_s']:.0%}"
          f"  others {run['others_cores']:.2f} cores", flush=True)


# --- Parts -------------------------------------------------------------------------------


def part_single(args, logdir, results):
    print("1. single-update ingest (POST /progress, ~260 B, 1,000 ids, keep-alive, "
          f"{args.connections} connections, wrk -t{args.threads}); --json-parser auto "
          f"picks {default_json_parser()} here", flush=True)
    floor, floor_port = start_floor(logdir)
    servers = start_servers(args, logdir)
    floor_runs, server_runs = [], {variant: [] for variant in servers}
    try:
        run_wrk_timed(args, floor_port, 1, "single", "f1000000", [floor])  # warm-up
        for child, port in servers.values():
            run_wrk_timed(args, port, 1, "single", "a1000000", [child])
        for round_ in range(args.rounds):
            run = run_wrk_timed(args, floor_port, args.seconds, "single", "f1000000", [floor])
            show(f"floor, round {round_ + 1}", run, "floor")
            floor_runs.append(run)
            for variant, (child, port) in servers.items():
                run = run_wrk_timed(args, port, args.seconds, "single", "a1000000", [child])
                show(f"progressista {parser_label(variant)}, round {round_ + 1}", run,
                     child.name)
                server_runs[variant].append(run)
        expected = IDS * args.threads  # wrk_post.lua gives each wrk thread its own ids
        for child, port in servers.values():
            status, body = request(port, "GET", "/health")
            health = json.loads(body)
            if health.get("tasks") != expected:
                raise RuntimeError(f"{child.name}: expected {expected} tasks after the run, "
                                   f"/health says {health}")
    finally:
        floor.stop()
        for child, _ in servers.values():
            child.stop()

    def best(runs, name):
        return (max(run["rps"] for run in runs),
                min(run["cpu_s"][name] * 1e6 / run["requests"] for run in runs))

    results["floor_rps"], results["floor_us"] = best(floor_runs, "floor")
    results["json_default"] = default_json_parser()
    results["single"] = {}
    for variant, (child, _) in servers.items():
        rps, us = best(server_runs[variant], child.name)
        results["single"][variant] = {"rps": rps, "us": us,
                                      "rps_ratio": rps / results["floor_rps"],
                                      "cpu_ratio": us / results["floor_us"]}
    first = results["single"][args.json_parsers[0]]  # the headline figures
    results["server_rps"], results["server_us"] = first["rps"], first["us"]
    results["rps_ratio"], results["cpu_ratio"] = first["rps_ratio"], first["cpu_ratio"]
    results["wrk_cpu_floor"] = max(r["wrk_cpu_s"] / r["wall_s"] for r in floor_runs)


def part_batched(args, logdir, results):
    print(f"2. batched ingest ({BATCH} updates per POST, ~26 KB bodies)", flush=True)
    servers = start_servers(args, logdir)
    runs = {variant: [] for variant in servers}
    try:
        for child, port in servers.values():
            run_wrk_timed(args, port, 1, "batch", "b1000000", [child])  # warm-up
        for round_ in range(args.rounds):
            for variant, (child, port) in servers.items():
                run = run_wrk_timed(args, port, args.seconds, "batch", "b1000000", [child])
                run["ups"] = run["rps"] * BATCH
                show(f"progressista {parser_label(variant)}, round {round_ + 1}", run,
                     child.name, per="update", count=run["requests"] * BATCH)
                print(f"  {'':<34} {run['ups']:>10,.0f} task-updates/s", flush=True)
                runs[variant].append(run)
    finally:
        for child, _ in servers.values():
            child.stop()
    results["batched"] = {}
    for variant, (child, _) in servers.items():
        us = min(run["cpu_s"][child.name] * 1e6 / (run["requests"] * BATCH)
                 for run in runs[variant])
        results["batched"][variant] = {"ups": max(run["ups"] for run in runs[variant]),
                                       "us": us, "capacity": 1e6 / us}
    first = results["batched"][args.json_parsers[0]]
    results["batched_ups"], results["batched_us"] = first["ups"], first["us"]
    results["batched_capacity"] = first["capacity"]


def part_listeners(args, logdir, results):
    print(f"3. single-update ingest with {args.listeners} /ws listeners vs none "
          "(1,000 ids, default broadcast interval 0.1 s)", flush=True)
    server, port = start_server(args, logdir)
    without, with_ = [], []
    stats = []
    try:
        run_wrk_timed(args, port, 1, "single", "c1000000", [server])  # warm-up, 1,000 tasks
        for round_ in range(args.rounds):
            run = run_wrk_timed(args, port, args.seconds, "single", "c1000000", [server])
            show(f"no listeners, round {round_ + 1}", run, "server")
            without.append(run)
            listeners = Child(f"listeners{round_}",
                              [sys.executable, os.path.join(HERE, "ws_listeners.py"),
                               "--port", str(port), "--count", str(args.listeners),
                               "--max-seconds", str(args.seconds + 60)],
                              stdin=subprocess.PIPE, logdir=logdir)
            try:
                listeners.wait_line("LISTENERS_READY", 30)
                run = run_wrk_timed(args, port, args.seconds, "single", "c1000000",
                                    [server, listeners])
                _, body = request(port, "GET", "/health")
                connected = json.loads(body)["listeners"]
                show(f"{args.listeners} listeners, round {round_ + 1}", run, "server")
                with_.append(run)
            finally:
                listeners.proc.stdin.close()  # tells it to stop and report
                line = listeners.wait_line("LISTENERS_JSON", 15)
                listeners.stop()
            stat = json.loads(line[len("LISTENERS_JSON "):])
            stat["connected_after_run"] = connected
            stat["listener_cpu_cores"] = run["cpu_s"][listeners.name] / run["wall_s"]
            stats.append(stat)
            print(f"  {'':<34} listeners got {stat['messages']:,} messages, "
                  f"{stat['bytes'] / 1e6:,.0f} MB, {stat['resync_snapshots']} resync "
                  f"snapshots; {connected} still connected; their CPU "
                  f"{stat['listener_cpu_cores']:.2f} cores", flush=True)
    finally:
        server.stop()
    results["no_listeners_rps"] = max(run["rps"] for run in without)
    results["listeners_rps"] = max(run["rps"] for run in with_)
    results["listeners_ratio"] = results["listeners_rps"] / results["no_listeners_rps"]
    results["no_listeners_us"] = min(r["cpu_s"]["server"] * 1e6 / r["requests"] for r in without)
    results["listeners_us"] = min(r["cpu_s"]["server"] * 1e6 / r["requests"] for r in with_)
    # Where the server is the limit, req/s goes as 1 / (CPU per request): the same ratio,
    # free of what the other processes on a shared machine did meanwhile.
    results["listeners_cpu_ratio"] = results["no_listeners_us"] / results["listeners_us"]
    results["listener_stats"] = stats


def realistic_tasks(count, rng):
    """Updates like the tqdm client sends: many processes on many hosts, a few bars each."""
    hosts = [f"gpu-node-{i:03d}.cluster.local" for i in range(64)]
    kinds = [("train epoch {}", "it", False, 1000),
             ("eval {}", "it", False, 1000),
             ("download shard-{:05d}.tar", "B", True, 1024),
             ("preprocess part {}", "rows", True, 1000)]
    tasks = []
    pid = 10_000
    job = 4000
    for index in range(count):
        if index % 8 == 0:  # a new process every 8 bars
            pid += rng.randrange(1, 50)
            host = rng.choice(hosts)
            if index % 256 == 0:
                job += 1
        desc, unit, scale, divisor = kinds[index % len(kinds)]
        total = rng.choice([100, 1000, 50_000, 1_000_000, 7_340_032_000])
        n = rng.randrange(total)
        elapsed = rng.uniform(1, 3600)
        tasks.append({
            "task_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
            "desc": desc.format(index % 97),
            "n": n, "total": total, "unit": unit, "unit_scale": scale,
            "unit_divisor": divisor, "rate": n / elapsed, "elapsed": round(elapsed, 3),
            "postfix": f"loss={rng.random():.4f}, lr=3e-4" if unit == "it" else None,
            "status": "running",
            "meta": {"host": host, "pid": pid, "job": f"slurm-{job}"},
            "seq": 1, "timestamp": 1.7e9 + index / 1000,
        })
    return tasks


def post_all(port, tasks, per_post=1000):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for start in range(0, len(tasks), per_post):
            body = json.dumps(tasks[start:start + per_post]).encode()
            connection.request("POST", "/progress", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"POST of a batch failed: {response.status} {answer[:200]}")
    finally:
        connection.close()


def settled_rss(pid, seconds=1.0):
    """VmRSS once the broadcast loop has dropped what it held for the last change."""
    time.sleep(seconds)
    return vm_kib(pid)


def part_memory(args, logdir, results):
    count = args.tasks
    print(f"4. memory per stored task ({count:,} realistic tasks, VmRSS of the server)",
          flush=True)
    rng = random.Random(42)
    tasks = realistic_tasks(count, rng)
    warm = realistic_tasks(100, random.Random(7))
    server, port = start_server(args, logdir)
    try:
        post_all(port, warm)  # the code paths and the JSON modules, warm
        base = settled_rss(server.pid, 0.5)
        started = time.monotonic()
        post_all(port, tasks)
        took = time.monotonic() - started
        created = settled_rss(server.pid)
        for task in tasks:  # every bar moves on once: new values replace the old ones
            task["seq"] = 2
            task["n"] = min(task["n"] + 1, task["total"])
            task["elapsed"] += 1.0
            task["timestamp"] += 1.0
        post_all(port, tasks)
        updated = settled_rss(server.pid)
        hwm = vm_kib(server.pid, "VmHWM")
        _, body = request(port, "GET", "/health")
        stored = json.loads(body)["tasks"]
        if stored != count + len(warm):
            raise RuntimeError(f"expected {count + len(warm)} tasks, /health says {stored}")
        results["bytes_per_task_created"] = (created - base) * 1024 / count
        results["bytes_per_task"] = (updated - base) * 1024 / count
        results["memory_rss_mib"] = {"base": base / 1024, "created": created / 1024,
                                     "updated": updated / 1024, "peak": hwm / 1024}
        results["memory_post_s"] = took
        print(f"  VmRSS {base / 1024:.1f} MiB empty, {created / 1024:.1f} MiB with {count:,} "
              f"tasks ({results['bytes_per_task_created']:.0f} B/task), {updated / 1024:.1f} "
              f"MiB after one update of each ({results['bytes_per_task']:.0f} B/task); peak "
              f"{hwm / 1024:.1f} MiB; posting took {took:.1f} s "
              f"({count / took:,.0f} task-updates/s from one Python client)", flush=True)
        # How the single-update cost holds up with a full store (1,000 more ids).
        run = run_wrk_timed(args, port, 2, "single", "d1000000", [server])
        show(f"single updates, {stored:,} stored", run, "server")
        results["full_store_us"] = run["cpu_s"]["server"] * 1e6 / run["requests"]
        results["full_store_rps"] = run["rps"]
    finally:
        server.stop()


# --- Report ------------------------------------------------------------------------------


def verdict(ok):
    return "PASS" if ok else "MISS"


def table(results, args, started, command):
    rows = []
    for variant, single in results.get("single", {}).items():
        label = parser_label(variant)
        rows.append((f"single-update CPU/request, {label} (floor)",
                     f"{single['us']:.1f} us ({results['floor_us']:.1f} us)",
                     f"x{single['cpu_ratio']:.2f}", "<= x2.00",
                     verdict(single["cpu_ratio"] <= TARGETS["cpu_ratio"])))
        rows.append((f"single-update req/s, {label} (floor)",
                     f"{single['rps']:,.0f} ({results['floor_rps']:,.0f})",
                     f"x{single['rps_ratio']:.2f}", ">= x0.50",
                     verdict(single["rps_ratio"] >= TARGETS["rps_ratio"])))
    for variant, batched in results.get("batched", {}).items():
        label = parser_label(variant)
        rows.append((f"batched ingest, 100/POST, {label}", f"{batched['ups']:,.0f} upd/s",
                     f"{batched['us']:.2f} us CPU/upd", ">= 150,000/s",
                     verdict(batched["ups"] >= TARGETS["batched"])))
        rows.append(("  same, per server CPU-second", f"{batched['capacity']:,.0f} upd",
                     "(1 / CPU per upd)", ">= 150,000",
                     verdict(batched["capacity"] >= TARGETS["batched"])))
    if "listeners_ratio" in results:
        rows.append((f"{args.listeners} /ws listeners: req/s (none)",
                     f"{results['listeners_rps']:,.0f} ({results['no_listeners_rps']:,.0f})",
                     f"x{results['listeners_ratio']:.2f}", ">= x0.70",
                     verdict(results["listeners_ratio"] >= TARGETS["listeners_ratio"])))
        rows.append(("  same, by CPU/request (none)",
                     f"{results['listeners_us']:.1f} us ({results['no_listeners_us']:.1f} us)",
                     f"x{results['listeners_cpu_ratio']:.2f}", ">= x0.70",
                     verdict(results["listeners_cpu_ratio"] >= TARGETS["listeners_ratio"])))
    if "bytes_per_task" in results:
        rows.append((f"memory per task at {args.tasks:,}",
                     f"{results['bytes_per_task']:,.0f} B",
                     f"{results['bytes_per_task'] / 1024:.2f} KiB", "<= 1 KiB",
                     verdict(results["bytes_per_task"] <= TARGETS["bytes_per_task"])))
        rows.append((f"  single-update CPU/request, {args.tasks // 1000}k stored",
                     f"{results['full_store_us']:.1f} us", f"{results['full_store_rps']:,.0f} req/s",
                     "(info)", ""))
    headers = ("figure", "measured", "ratio / unit", "target", "result")
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(5)]
    line = "+".join("-" * (w + 2) for w in widths)
    others = sum(OTHERS) / len(OTHERS) if OTHERS else 0.0
    results["others_cores_mean"] = others
    print()
    print(f"Progressista server benchmark, {started:%Y-%m-%d %H:%M} UTC")
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} cores ({cpu_model()}), shared; Python "
          f"{platform.python_version()}, websockets {websockets_version()}, "
          f"{wrk_version(args.wrk)}; load average at start {results['loadavg']}")
    print(f"load: wrk -t{args.threads} -c{args.connections}, {args.seconds} s per "
          f"measurement, best of {args.rounds} round(s); other processes kept "
          f"{others:.2f} of {os.cpu_count()} cores busy on average")
    print(line)
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(line)
    if results.get("wrk_cpu_floor", 0) > 0.85:
        print(f"note: against the floor, wrk itself ran at {results['wrk_cpu_floor']:.0%} of a "
              "core: the floor's req/s is the loader's\n      limit as much as the floor's, "
              "so the req/s ratio is, if anything, lenient.")
    if others > 0.3:
        print("note: the machine was busy with other work, so the req/s figures (wall clock)\n"
              "      understate the server and move from run to run; the CPU rows (server\n"
              "      CPU time from /proc/PID/stat per request or update) are the steady ones.")
    return rows


def cpu_model():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def websockets_version():
    try:
        import websockets

        return websockets.__version__
    except ImportError:
        return "missing"


def wrk_version(wrk):
    try:
        out = subprocess.run([wrk, "--version"], capture_output=True, timeout=5).stdout
        return out.decode().split(" [")[0].strip() or "wrk"
    except (OSError, subprocess.TimeoutExpired):
        return "wrk"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4,
                        help="seconds per wrk measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measurements per figure; the best is kept (default 2)")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run (1,2,3,4)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1 or 2)")
    parser.add_argument("--listeners", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=100_000,
                        help="tasks stored for the memory figure")
    parser.add_argument("--server", default=os.path.join(ROOT, "progressista.py"),
                        help="the server script to benchmark (default: the repo's)")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--json-parsers", default="default,stdlib",
                        help="servers of parts 1 and 2, by --json-parser: default (none "
                             "given: auto), stdlib, orjson; the first gives the headline "
                             "figures (default: default,stdlib; an older --server takes "
                             "only default)")
    parser.add_argument("--baseline", metavar="SCRIPT",
                        help="also run parts 1 and 2 against this server script (older "
                             "code, started with its defaults) in the same rounds: a "
                             "before/after comparison on a busy machine")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    args.json_parsers = [name.strip() for name in args.json_parsers.split(",") if name.strip()]
    unknown = [name for name in args.json_parsers if name not in JSON_PARSER_FLAGS]
    if unknown or not args.json_parsers:
        parser.error(f"--json-parsers: name one or more of {', '.join(JSON_PARSER_FLAGS)}")
    if not os.path.exists(args.wrk):
        parser.error(f"wrk not found at {args.wrk}: apt-get install wrk")
    parts = {part.strip() for part in args.parts.split(",")}
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    with open("/proc/loadavg") as file:
        results = {"loadavg": " ".join(file.read().split()[:3])}
    logdir = tempfile.mkdtemp(prefix="progressista-bench-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clock = time.monotonic()
    try:
        if "1" in parts:
            part_single(args, logdir, results)
        if "2" in parts:
            part_batched(args, logdir, results)
        if "3" in parts:
            part_listeners(args, logdir, results)
        if "4" in parts:
            part_memory(args, logdir, results)
    finally:
        stop_all()
    rows = table(results, args, started, command)
    print(f"took {time.monotonic() - clock:.0f} s; server logs in {logdir}")
    if args.json:
        results.update(date=started.isoformat(timespec="seconds"), command=command,
                       rows=rows, server=args.server)
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
