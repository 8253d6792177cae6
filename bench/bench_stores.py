"""Batched ingest through each store, side by side in one run.

    python bench/bench_stores.py                  # about a minute on 2 cores
    python bench/bench_stores.py --seconds 8 --rounds 3

Starts real servers (``python progressista.py --store ...``, subprocesses on 127.0.0.1)
and, for each store, drives one with the same load from a separate process: 8 keep-alive
connections posting batches of 100 realistic updates over 1,000 task ids, every update
with a higher seq so that every one is applied. It prints task-updates/s for:

- the memory store (the reference);
- the SQLite store (target: at least 50% of the memory store);
- one server on Redis, and two servers on the same Redis driven at once (target: the two
  together at least 1.5x one).

Redis needs Debian's redis-server; it is started on a free port and stopped at the end.
Only the processes this script started are stopped, by their PID.
"""

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_server import free_port  # noqa: E402  (bench/ is not a package)

IDS = 1000
BATCH = 100
CONNECTIONS = 8

UPDATE = ('{"task_id":"task-%04d","desc":"shard %d","n":%d,"total":100000,"unit":"it",'
          '"unit_scale":false,"unit_divisor":1000,"rate":%d.5,"elapsed":%d.25,'
          '"postfix":"loss=0.%03d","status":"running","meta":{"host":"node%02d",'
          '"pid":%d,"job_id":"81234"},"seq":%d,"timestamp":1790000000.5}')


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def answers(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def start_server(store, started):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "progressista.py"), "--host", "127.0.0.1",
         "--port", str(port), "--store", store, "--log-level", "warning",
         "--max-tasks", "200000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(process)
    wait_until(lambda: answers(port), 15, f"the server on {store}")
    return port


def start_redis(workdir, started):
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(process)

    def pong():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(pong, 10, "redis-server")
    return f"redis://127.0.0.1:{port}/0"


def batch_request(port, first_seq, offset):
    """One POST of BATCH updates to consecutive task ids, every seq new."""
    updates = []
    for k in range(BATCH):
        seq = first_seq + k
        i = (offset + k) % IDS
        updates.append(UPDATE % (i, i, seq % 100000, seq % 997, seq % 3600, seq % 1000,
                                 i % 64, 4000 + i, seq))
    body = ("[" + ",".join(updates) + "]").encode()
    return (b"POST /progress HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % (port, len(body))) + body


async def drive_connection(port, seconds, seq_base, counts):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seq, offset = seq_base, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        writer.write(batch_request(port, seq, offset))
        seq += BATCH
        offset += BATCH
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"the server answered {head.splitlines()[0]!r}")
        counts[0] += BATCH
    writer.close()


def drive(port, seconds, seq_base, result):
    """In a separate process: CONNECTIONS keep-alive connections posting batches."""
    counts = [0]

    async def main():
        await asyncio.gather(*(
            drive_connection(port, seconds, seq_base + c * 10**9, counts)
            for c in range(CONNECTIONS)))

    started = time.monotonic()
    asyncio.run(main())
    result.put(counts[0] / (time.monotonic() - started))


def ingest(ports, seconds, seq_base):
    """Drive every port at once (one driver process each); updates/s per port."""
    results = [multiprocessing.Queue() for _ in ports]
    drivers = [multiprocessing.Process(target=drive, args=(port, seconds, seq_base, result))
               for port, result in zip(ports, results)]
    for driver in drivers:
        driver.start()
    rates = [result.get(timeout=seconds + 60) for result in results]
    for driver in drivers:
        driver.join(10)
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (5)")
    parser.add_argument("--rounds", type=int, default=2, help="best of N rounds (2)")
    args = parser.parse_args(argv)
    command = "python bench/bench_stores.py " + " ".join(argv or sys.argv[1:])
    started = []
    workdir = tempfile.mkdtemp(prefix="progressista-bench-")
    figures = {}
    try:
        memory = start_server("memory://", started)
        sqlite = start_server("sqlite://" + os.path.join(workdir, "tasks.db"), started)
        redis_url = start_redis(workdir, started)
        redis_ports = [start_server(redis_url, started) for _ in range(2)] if redis_url else []
        seq = 1
        for round_number in range(args.rounds):
            measured = {"memory": ingest([memory], args.seconds, seq)[0]}
            seq += 10**12
            measured["sqlite"] = ingest([sqlite], args.seconds, seq)[0]
            seq += 10**12
            if redis_ports:
                measured["redis, one server"] = ingest(redis_ports[:1], args.seconds, seq)[0]
                seq += 10**12
                measured["redis, two servers"] = sum(ingest(redis_ports, args.seconds, seq))
                seq += 10**12
            for name, rate in measured.items():
                figures[name] = max(figures.get(name, 0.0), rate)
            print(f"round {round_number + 1}: " + ", ".join(
                f"{name} {rate:,.0f}/s" for name, rate in measured.items()), flush=True)
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [("memory store", figures["memory"], "reference", None)]
    sqlite_ratio = figures["sqlite"] / figures["memory"]
    rows.append(("SQLite store", figures["sqlite"], f"{sqlite_ratio:.2f}x memory (>= 0.50)",
                 sqlite_ratio >= 0.5))
    if "redis, one server" in figures:
        one, two = figures["redis, one server"], figures["redis, two servers"]
        rows.append(("Redis, one server", one, f"{one / figures['memory']:.2f}x memory", None))
        rows.append(("Redis, two servers at once", two, f"{two / one:.2f}x one (>= 1.50)",
                     two / one >= 1.5))
    else:
        rows.append(("Redis", 0.0, "skipped: redis-server not installed", None))
    print(f"\nBatched ingest, {BATCH} updates per POST, {CONNECTIONS} connections per "
          f"server, best of {args.rounds} x {args.seconds:g} s; "
          f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs")
    print(f"{'store':<28} {'task-updates/s':>15}  ratio")
    for name, rate, ratio, ok in rows:
        verdict = "" if ok is None else ("  PASS" if ok else "  MISS")
        print(f"{name:<28} {rate:>15,.0f}  {ratio}{verdict}")
    print(f"\ncommand: {command.strip()}")
    print(json.dumps({name: round(rate) for name, rate in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
