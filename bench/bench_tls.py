"""What TLS costs the server: single-update ingest over HTTPS keep-alive against plain HTTP.

    python bench/bench_tls.py                    # about 30 s on 2 cores
    python bench/bench_tls.py --seconds 8 --rounds 3 --json /tmp/tls.json

In one run, against 127.0.0.1 only, it makes a throwaway self-signed certificate with
``openssl req -x509`` (the README's command), starts two real servers as subprocesses,
``python progressista.py --host 127.0.0.1 --log-level warning`` and the same with
``--tls-cert``/``--tls-key``, and drives each in turn with Debian's ``wrk`` (1 thread, 8
keep-alive connections: one handshake per connection, then requests) and
bench/wrk_post.lua's realistic ~260-byte updates. It prints requests/s and the server's CPU
per request (from /proc/PID/stat) for both, and their ratio (target: TLS costs at most
1.5x the CPU per request of plain HTTP). With --rounds > 1 the best round of each counts.
Only the processes it started are stopped, by their PID.
"""

import argparse
import datetime
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_server import (  # noqa: E402  (bench/ is not a package)
    IDS, LUA, ROOT, SEQ, Child, cpu_ticks, free_port, stop_all, TICKS, wrk_figures)

TARGET_CPU_RATIO = 1.5  # TLS CPU per request at most this times plain HTTP's


def self_signed(folder):
    """(cert, key) for 127.0.0.1 and localhost, made by openssl in one command."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return cert, key


def start(name, logdir, extra=()):
    port = free_port()
    child = Child(name, [sys.executable, os.path.join(ROOT, "progressista.py"), "--host",
                         "127.0.0.1", "--port", str(port), "--log-level", "warning",
                         *extra], logdir=logdir)
    tls = bool(extra)
    deadline = time.monotonic() + 15
    while True:
        if not child.alive():
            raise RuntimeError(f"{name} exited: {child.tail()}")
        try:
            if tls:  # the bench's own throwaway certificate: nothing to verify it against
                connection = http.client.HTTPSConnection(
                    "127.0.0.1", port, timeout=1, context=ssl._create_unverified_context())
            else:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                connection.close()
                return child, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer on port {port}")
        time.sleep(0.05)


def run_wrk(args, scheme, port, seconds, tag, server):
    seq0 = SEQ[0]
    SEQ[0] += 500_000_000
    argv = [args.wrk, "-t1", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "5s",
            "-s", LUA, f"{scheme}://127.0.0.1:{port}", "--", "single", str(IDS), "100",
            str(seq0), tag]
    before = cpu_ticks(server.pid)
    out = subprocess.run(argv, capture_output=True, timeout=seconds + 30)
    used_s = (cpu_ticks(server.pid) - before) / TICKS
    result = wrk_figures(out.returncode, out.stdout, out.stderr, f"{scheme}://...:{port}")
    requests = result["requests"]
    return {"rps": requests / (result["duration_us"] / 1e6),
            "us_per_request": used_s * 1e6 / requests, "requests": requests}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per measurement (5)")
    parser.add_argument("--rounds", type=int, default=2, help="best of (2)")
    parser.add_argument("--connections", type=int, default=8, help="wrk -c (8)")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    if not shutil.which(args.wrk) or not shutil.which("openssl"):
        print("bench_tls: needs wrk and openssl (apt-get install wrk openssl)", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    logdir = tempfile.mkdtemp(prefix="progressista-bench-tls-")
    results = {"plain": [], "tls": []}
    try:
        cert, key = self_signed(logdir)
        plain, plain_port = start("plain", logdir)
        tls, tls_port = start("tls", logdir, ("--tls-cert", cert, "--tls-key", key))
        run_wrk(args, "http", plain_port, 1, "a1000000", plain)  # warm-up: 1,000 tasks each
        run_wrk(args, "https", tls_port, 1, "a1000000", tls)
        print(f"single-update ingest, wrk -t1 -c{args.connections} keep-alive, "
              f"{args.seconds} s per run", flush=True)
        for round_ in range(args.rounds):
            for name, scheme, port, child in (("plain", "http", plain_port, plain),
                                              ("tls", "https", tls_port, tls)):
                run = run_wrk(args, scheme, port, args.seconds, "a1000000", child)
                results[name].append(run)
                print(f"  {scheme + '://':<9} round {round_ + 1}: {run['rps']:>9,.0f} req/s  "
                      f"{run['us_per_request']:>6.1f} us server CPU/request", flush=True)
    finally:
        stop_all()
    best = {name: min(run["us_per_request"] for run in runs) for name, runs in results.items()}
    rps = {name: max(run["rps"] for run in runs) for name, runs in results.items()}
    ratio = best["tls"] / best["plain"]
    verdict = "pass" if ratio <= TARGET_CPU_RATIO else "MISS"
    print(f"\nserver CPU per request: TLS {best['tls']:.1f} us, plain {best['plain']:.1f} us: "
          f"x{ratio:.2f} (target <= x{TARGET_CPU_RATIO}) {verdict}")
    print(f"requests/s: TLS {rps['tls']:,.0f}, plain {rps['plain']:,.0f}: "
          f"x{rps['tls'] / rps['plain']:.2f}")
    print(f"measured {started:%Y-%m-%d %H:%M} UTC, Python {sys.version.split()[0]}, "
          f"{ssl.OPENSSL_VERSION}; logs in {logdir}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"us_per_request": best, "rps": rps, "cpu_ratio": ratio,
                       "runs": results}, file, indent=2)
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
