"""Benchmark: what the client's transport costs the server (issue 13, "Performance").

    python bench/bench_transport.py [--senders 100] [--processes 4] [--seconds 10] [--tls]

Server CPU per push from the real client sender, with its persistent connection (one
kept-alive HTTP/1.1 connection per sender, the default) against a new connection per push
(`progressista_client._post_once`, the reference: what `urlopen` per POST used to cost).

How the load is made: `--senders` Sender objects, each standing for one process of a busy
node (100 processes' worth by default), spread over `--processes` worker processes (so
that they do not share one GIL), each Sender a thread of its own with its own connection
and one live bar whose count moves at every read: the sender's own live reading sends it
every push interval, 0.25 s, so each sender pushes 4 times a second, as a real bar does.
The server (`progressista.py serve`, a subprocess on a free loopback port) is measured
by its CPU time from /proc/PID/stat over `--seconds` after a one-second warm-up, divided
by the pushes it acknowledged in that window. Both modes run in the same invocation; the
ratio is what matters (target: persistent <= 0.5x new connection per push, over plain
HTTP).

--tls also measures both modes over https:// in the same run (a second server, given
--tls-cert/--tls-key made by `trustme` here; the senders verify it with
PROGRESSISTA_CA_BUNDLE) and prints what the persistent sender costs over TLS against plain
HTTP (target <= 1.5x). It needs a server that speaks TLS (the transport part of issue 13);
until then the script says the server did not start.
Only the processes it started are stopped, by their PID.
"""

import argparse
import datetime
import multiprocessing
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]  # the client; bench_server's free_port

from bench_server import free_port  # noqa: E402  (bench/ is not a package)
import progressista_client  # noqa: E402

SERVER_START_TIMEOUT_S = 10.0
WARMUP_S = 1.0
PUSH_INTERVAL_S = 0.25
TARGET_RATIO = 0.5  # the persistent sender costs the server at most half of a new connection per push
TLS_TARGET_RATIO = 1.5  # over TLS, the persistent sender costs at most 1.5x what it costs over HTTP
MODES = ("persistent", "new connection per push")


def cpu_seconds(pid):
    """utime + stime of a process, from /proc/PID/stat (Linux)."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port, tls_files):
    command = [sys.executable, os.path.join(ROOT, "progressista.py"), "serve", "--host",
               "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if tls_files:
        command += ["--tls-cert", tls_files[0], "--tls-key", tls_files[1]]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scheme = "https" if tls_files else "http"
    context = ssl.create_default_context(cafile=tls_files[2]) if tls_files else None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen("%s://127.0.0.1:%d/health" % (scheme, port), timeout=1,
                                   context=context).read()
            return server
        except OSError:
            time.sleep(0.05)
    if server.poll() is None:
        server.kill()
    server.wait()
    message = server.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    raise SystemExit("bench_transport: the server did not start on port %d over %s (%s)%s"
                     % (port, scheme, message[0],
                        "; --tls needs a server that speaks TLS" if tls_files else ""))


class CountingOpener:
    def __init__(self, post):
        self.post = post
        self.acknowledged = 0

    def __call__(self, url, body, headers, timeout):
        status, answer = self.post(url, body, headers, timeout)
        if status == 200:
            self.acknowledged += 1
        return status, answer


def live_bar(task_id):
    """A source whose count moves at every read: every read is news, so it is sent."""
    state = {"task_id": task_id, "desc": "bench", "n": 0, "total": None, "unit": "it",
             "status": "running", "meta": {"bench": "transport"}}

    def read():
        state["n"] += 1
        return dict(state, timestamp=time.time())
    return read


def worker(mode, url, senders, start_at, measure_from, stop_at, results):
    """One process: `senders` Senders pushing 4 times a second until `stop_at`."""
    endpoint = progressista_client.make_endpoint(url, request_timeout=5)
    openers = []
    running = []
    time.sleep(max(0.0, start_at - time.time()))
    for index in range(senders):
        post = progressista_client._PersistentPoster() if mode == "persistent" \
            else progressista_client._post_once
        opener = CountingOpener(post)
        sender = progressista_client.Sender(opener=opener)
        source = live_bar("bench-%d-%d" % (os.getpid(), index))
        sender.put(endpoint, source(), push_every=PUSH_INTERVAL_S, source=source)
        openers.append(opener)
        running.append(sender)
        time.sleep(PUSH_INTERVAL_S / senders)  # staggered, as independent processes are
    time.sleep(max(0.0, measure_from - time.time()))
    at_start = sum(opener.acknowledged for opener in openers)
    time.sleep(max(0.0, stop_at - time.time()))
    at_end = sum(opener.acknowledged for opener in openers)
    for sender in running:
        sender.stop(0.5)
    for opener in openers:
        close = getattr(opener.post, "close", None)
        if close is not None:
            close()
    results.put(at_end - at_start)


def measure(mode, server, url, args):
    """Server CPU seconds and acknowledged pushes over the measured window."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start_at = time.time() + 0.5
    measure_from = start_at + PUSH_INTERVAL_S + WARMUP_S
    stop_at = measure_from + args.seconds
    per_process = [args.senders // args.processes + (1 if i < args.senders % args.processes else 0)
                   for i in range(args.processes)]
    processes = [context.Process(target=worker, args=(mode, url, count, start_at, measure_from,
                                                      stop_at, results))
                 for count in per_process]
    for process in processes:
        process.start()
    time.sleep(max(0.0, measure_from - time.time()))
    cpu_start = cpu_seconds(server.pid)
    time.sleep(max(0.0, stop_at - time.time()))
    cpu_end = cpu_seconds(server.pid)
    pushes = sum(results.get(timeout=30) for _ in processes)
    for process in processes:
        process.join(10)
    return cpu_end - cpu_start, pushes


def make_tls_files(folder):
    try:
        import trustme
    except ImportError:
        raise SystemExit("bench_transport: --tls needs trustme (pip install trustme)")
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    paths = [os.path.join(folder, name) for name in ("cert.pem", "key.pem", "ca.pem")]
    certificate.cert_chain_pems[0].write_to_path(paths[0])
    certificate.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tls", action="store_true", help="https:// (needs a TLS server)")
    args = parser.parse_args(argv)

    print("bench_transport: %s, Python %s, %d cores, %d senders in %d processes, %d pushes/s "
          "each, %.0f s per mode, %s" % (
              datetime.date.today().isoformat(), sys.version.split()[0], os.cpu_count(),
              args.senders, args.processes, round(1 / PUSH_INTERVAL_S), args.seconds,
              "http and https" if args.tls else "http"))
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        tls_files = make_tls_files(folder) if args.tls else None
        if tls_files:
            os.environ[progressista_client.ENV_CA_BUNDLE] = tls_files[2]
        for scheme, files in (("http", None), ("https", tls_files)):
            if scheme == "https" and not files:
                continue
            port = free_port()
            server = start_server(port, files)
            try:
                for mode in MODES:
                    cpu_s, pushes = measure(mode, server, "%s://127.0.0.1:%d" % (scheme, port), args)
                    figures[scheme, mode] = cpu_s / pushes if pushes else float("inf")
                    print("%-5s %-24s server CPU %7.1f us/push  (%.2f s CPU for %d pushes, "
                          "%.0f pushes/s)" % (scheme, mode, figures[scheme, mode] * 1e6, cpu_s,
                                              pushes, pushes / args.seconds))
            finally:
                server.terminate()
                server.wait(10)
    worst = 0.0
    checks = [("http: persistent / new connection", figures["http", MODES[0]],
               figures["http", MODES[1]], TARGET_RATIO)]
    if args.tls:
        checks += [("https: persistent / new connection", figures["https", MODES[0]],
                    figures["https", MODES[1]], None),
                   ("persistent: https / http", figures["https", MODES[0]],
                    figures["http", MODES[0]], TLS_TARGET_RATIO)]
    for label, value, reference, target in checks:
        ratio = value / reference
        if target is None:
            print("%-36s ratio %.3f" % (label, ratio))
            continue
        worst = max(worst, ratio / target)
        print("%-36s ratio %.3f (target <= %.2f, %s)"
              % (label, ratio, target, "ok" if ratio <= target else "OVER TARGET"))
    return 0 if worst <= 1 else 1

if __name__ == "__main__":
    sys.exit(main())
