"""Soak and faults: hundreds of real tqdm bars through the real client, several /ws
listeners, the server killed and restarted on its SQLite store, and a proxy that drops
the clients' connections for a while. Nothing may be lost.

    python bench/soak.py [--duration 60] [--processes 8] [--bars 40] [--listeners 3]
                         [--kill-signal KILL|TERM] [--seed N] [--json] [--keep]

What runs (127.0.0.1 only; every process it starts is ended by its PID, on Ctrl-C and on
an exception too, and dies with this script if it is killed):

- the server: ``python progressista.py --host 127.0.0.1 --port P --store
  sqlite:///<tmp>/soak.db --retention-seconds R`` on a port chosen at start, so that it
  can be restarted on the same port with the same file;
- a TCP proxy (asyncio, in this process) in front of the server; the clients are pointed
  at it (PROGRESSISTA_SERVER_URL), the listeners are not;
- PROCESSES client processes (this script with --worker), each running BARS threads;
  each thread runs real ``progressista_client`` tqdm bars one after another, with unique
  ids (``soak-<run>-<process>-<thread>-<k>``), random totals and small sleeps per step,
  so that PROCESSES x BARS bars are alive at any moment. Most bars end normally (``close``,
  n == total); about one in ten raises inside its ``with tqdm(...)`` block (final state
  ``error``, n = the steps done). Anything else that escapes into the job is a client
  error, and must not happen. Each thread draws its bars at its own fixed ``position``,
  as tqdm advises for threads: with automatic positions, tqdm's own close() can reach a
  bar that another thread is still constructing and raise AttributeError ('sp'), plain
  tqdm included (tqdm 4.70 on a busy machine). Each worker wraps the client's HTTP
  function (only to count the states it posts and the final states the server
  acknowledged) and writes its figures to a JSON file at the end;
- LISTENERS WebSocket clients on /ws (the ``websockets`` package), each reconnecting
  after the restart, recording every final state it sees.

Phases, as fractions of the duration D (so that a 10 s run goes through all of them):

    0 - 0.15 D            warm-up (the memory figure "start" is taken at its end)
    0.30 D, for D/12      the proxy drops connections: it resets every new one and cuts the
                          open ones (1 to 20 s)
    0.50 D                the server is killed with --kill-signal (KILL: a crash; TERM: a
                          graceful stop) and restarted D/30 later (0.5 to 5 s) on the
                          same port and file
    0.85 D                the clients start no new bar; their last bars end (bars last
                          at most D/20, 0.5 to 5 s), they flush and exit
    then                  at most SETTLE_S for the listeners to see the last final
                          states, then one GET /tasks, then everything is stopped

The retention is D/10 (3 to 30 s): finished tasks expire during the run, so the server's
memory reaches a working set and must stay there. Because they expire, final states are
checked as the listeners see them, not only at the end:

- a final state is *found* when a listener saw that task with the expected status and n,
  or GET /tasks at the end shows it so;
- it is *lost after it was seen* when a listener saw it and later saw the same task
  non-final again (the restarted server loaded an older state from its file): the
  server then shows the bar running, later stale, and never removes it;
- every other expected final is *missing*; the report names up to 10 of each, and says
  whether the server had acknowledged it (HTTP 200) to the client.

Memory: the server's RSS (VmRSS from /proc/PID/status) every MEMORY_SAMPLE_INTERVAL_S.
The working set after the last restart is reached once every task from before it has
expired and the bars alive then have ended (restart + retention + longest bar); "flat"
means the largest RSS over the last MEMORY_WINDOW_FRACTION of the load (before 0.85 D) is
at most MEMORY_TOLERANCE (10%, and at least MEMORY_SLACK_KIB) above the largest RSS over
the same length of time from the working-set point. A run too short to hold both windows
(under about 40 s) prints the figures and "n/a" instead of a verdict.

Prints a table (and with --json, the figures as one JSON object on the last line) and
exits 0 when everything passed, 1 otherwise (2 for a bad flag). Wall time: about 0.9 D
(the load ends at 0.85 D, then the last bars, the flush, the checks and the shutdown: a
few seconds), and never more than D + WORKER_EXIT_GRACE_S + SETTLE_S + a few stop timeouts.
"""

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # also when loaded by path (test_soak.py), not run from bench/

from bench_server import free_port  # noqa: E402  (bench/ is not a package)

# --- Settings ------------------------------------------------------------------------

DEFAULT_DURATION_S = 60.0
MIN_DURATION_S = 10.0                   # shorter, the phases would overlap
MAX_DURATION_S = 24 * 3600.0            # bounded, whatever is typed
DEFAULT_PROCESSES = 8
DEFAULT_BARS_PER_PROCESS = 40           # 8 x 40 = 320 bars alive at a time
DEFAULT_LISTENERS = 3
ERROR_BAR_FRACTION = 0.1                # bars that end by raising inside their `with`
MIN_STEPS, MAX_STEPS = 5, 60            # tqdm update(1) calls per bar
MIN_BAR_S = 0.2                         # the shortest bar, in seconds

SERVER_START_TIMEOUT_S = 15.0
SERVER_STOP_TIMEOUT_S = 10.0            # a graceful stop that takes longer is killed
LISTENER_CONNECT_TIMEOUT_S = 10.0
LISTENER_RETRY_S = 0.2                  # between two reconnection attempts
PROXY_CONNECT_TIMEOUT_S = 2.0           # the client's own request timeout is 2 s
PROXY_CONNECTION_MAX_S = 30.0           # a proxied connection is cut after this long
WORKER_FLUSH_TIMEOUT_S = 15.0           # a worker's last flush, after its last bar
WORKER_EXIT_GRACE_S = 25.0              # workers still alive this long after D are killed
SETTLE_S = 10.0                         # at most this long for the last finals to show
SETTLE_QUIET_S = 2.0                    # ... or this long after the last new one
HTTP_TIMEOUT_S = 10.0
MEMORY_SAMPLE_INTERVAL_S = 1.0
MEMORY_WINDOW_FRACTION = 0.05           # of D, at least 3 s: the two windows compared
MEMORY_TOLERANCE = 0.10                 # end-of-load RSS may exceed the working set by 10%
MEMORY_SLACK_KIB = 2048                 # ... and always by 2 MiB (allocator noise)
MISSING_SHOWN = 10                      # ids listed per kind of loss

FINAL_STATUSES = ("close", "error")
PR_SET_PDEATHSIG = 1                    # linux/prctl.h


@dataclasses.dataclass(frozen=True)
class Plan:
    """When each phase happens, in seconds from the start of the load."""

    duration_s: float
    warmup_end_s: float
    drop_start_s: float
    drop_end_s: float
    kill_at_s: float
    restart_after_s: float
    clients_stop_s: float
    retention_s: float
    bar_max_s: float
    memory_window_s: float


def _clamp(value, low, high):
    return max(low, min(high, value))


def plan_phases(duration_s):
    """The phases of a run of `duration_s` seconds (see the module docstring)."""
    drop_start_s = 0.30 * duration_s
    return Plan(
        duration_s=duration_s,
        warmup_end_s=0.15 * duration_s,
        drop_start_s=drop_start_s,
        drop_end_s=drop_start_s + _clamp(duration_s / 12, 1.0, 20.0),
        kill_at_s=0.50 * duration_s,
        restart_after_s=_clamp(duration_s / 30, 0.5, 5.0),
        clients_stop_s=0.85 * duration_s,
        retention_s=_clamp(duration_s / 10, 3.0, 30.0),
        bar_max_s=_clamp(duration_s / 20, 0.5, 5.0),
        memory_window_s=max(3.0, MEMORY_WINDOW_FRACTION * duration_s),
    )


# --- Checking (pure) -------------------------------------------------------------------


class FeedChecker:
    """What the /ws listeners saw of the soak's tasks: every final state, and any task
    that a listener saw final and later non-final again (lost by a restart)."""

    def __init__(self, prefix, listeners):
        self.prefix = prefix
        self.final_seen = {}                        # task_id -> (status, n), last final seen
        self.finals_by_listener = [set() for _ in range(listeners)]
        self.reverted = {}                          # task_id -> (status, n) seen after its final
        self.last_seen = {}                         # task_id -> (status, n), any listener
        self.states = [0] * listeners               # task states in `update` messages
        self.snapshots = [0] * listeners
        self.removed = [0] * listeners

    def receive(self, index, message):
        kind = message.get("type")
        if kind == "remove":
            self.removed[index] += len(message.get("ids") or ())
            return
        if kind == "snapshot":
            self.snapshots[index] += 1
        elif kind != "update":
            return
        tasks = message.get("tasks") or {}
        if kind == "update":
            self.states[index] += len(tasks)
        prefix, finals = self.prefix, self.finals_by_listener[index]
        for task_id, task in tasks.items():
            if not task_id.startswith(prefix):
                continue
            state = (task.get("status"), task.get("n"))
            self.last_seen[task_id] = state
            if state[0] in FINAL_STATUSES:
                self.final_seen[task_id] = state
                finals.add(task_id)
            elif task_id in finals:
                # close and error are final: only a server that forgot one shows it running
                self.reverted[task_id] = state

    def all_seen(self, expected):
        """True when every expected final state has been seen as expected."""
        final_seen = self.final_seen
        return all(_same(final_seen.get(task_id), final) for task_id, final in expected.items())


def _same(state, expected):
    if state is None or state[0] != expected[0]:
        return False
    try:
        return float(state[1]) == float(expected[1])
    except (TypeError, ValueError):
        return False


def check_finals(expected, checker, end_tasks, acknowledged):
    """Sort every expected final state into found, lost after it was seen, or missing.

    `expected`: task_id -> (status, n); `end_tasks`: GET /tasks's tasks at the end;
    `acknowledged`: ids whose final state the server answered 200 to. Returns a dict."""
    found = {"close": 0, "error": 0}
    lost_after_seen, missing = [], []
    for task_id, final in sorted(expected.items()):
        end = end_tasks.get(task_id)
        end_state = None if end is None else (end.get("status"), end.get("n"))
        if _same(end_state, final):
            found[final[0]] += 1
            continue
        acked = task_id in acknowledged
        if task_id in checker.reverted:
            lost_after_seen.append({
                "task_id": task_id, "expected": list(final), "acknowledged": acked,
                "seen_after_restart": list(checker.reverted[task_id]),
                "at_end": None if end_state is None else list(end_state)})
        elif _same(checker.final_seen.get(task_id), final):
            found[final[0]] += 1
        else:
            seen = checker.last_seen.get(task_id)
            missing.append({
                "task_id": task_id, "expected": list(final), "acknowledged": acked,
                "last_seen": None if seen is None else list(seen),
                "at_end": None if end_state is None else list(end_state)})
    return {"found": found["close"] + found["error"], "found_close": found["close"],
            "found_error": found["error"], "lost_after_seen": lost_after_seen,
            "missing": missing}


def memory_verdict(samples, ready_at_s, plan):
    """Judge the server's RSS after its last restart. `samples`: (seconds, KiB) of that
    server process only; `ready_at_s`: when it answered again. Returns a dict whose
    "verdict" is PASS, FAIL, or n/a when the run is too short to hold both windows."""
    window_s = plan.memory_window_s
    working_set_from_s = ready_at_s + plan.retention_s + plan.bar_max_s
    end_from_s = plan.clients_stop_s - window_s
    result = {"working_set_from_s": round(working_set_from_s, 1), "window_s": window_s,
              "working_set_kib": None, "end_of_load_kib": None, "allowed_kib": None}
    if working_set_from_s + window_s > end_from_s:
        result["verdict"] = "n/a"
        result["why"] = (f"too short: the working set is reached at {working_set_from_s:.0f} s, "
                         f"the load ends at {plan.clients_stop_s:.0f} s")
        return result
    working_set_to_s = working_set_from_s + window_s
    working = [rss for at, rss in samples if working_set_from_s <= at < working_set_to_s]
    end = [rss for at, rss in samples if end_from_s <= at < plan.clients_stop_s]
    if not working or not end:
        result["verdict"] = "FAIL"
        result["why"] = "no RSS samples in a window (the server was down, or /proc unreadable)"
        return result
    working_set_kib, end_kib = max(working), max(end)
    allowed_kib = working_set_kib + max(working_set_kib * MEMORY_TOLERANCE, MEMORY_SLACK_KIB)
    result.update(working_set_kib=working_set_kib, end_of_load_kib=end_kib,
                  allowed_kib=int(allowed_kib),
                  verdict="PASS" if end_kib <= allowed_kib else "FAIL")
    return result


# --- The clients (worker processes) ----------------------------------------------------


class SoakFailure(Exception):
    """The exception a bar raises on purpose, so that it ends as `error`."""


class CountingTransport:
    """Wraps the client's HTTP function: counts what it posts and what the server
    acknowledged, and remembers the ids of acknowledged final states."""

    def __init__(self, post):
        self.post = post
        self.lock = threading.Lock()
        self.posts = self.posts_failed = self.states_posted = self.states_acknowledged = 0
        self.acknowledged_finals = set()

    def __call__(self, url, body, headers, timeout):
        try:
            states = json.loads(body)
        except ValueError:
            states = []
        if isinstance(states, dict):
            states = [states]
        try:
            status, answer = self.post(url, body, headers, timeout)
        except BaseException:
            with self.lock:
                self.posts += 1
                self.posts_failed += 1
                self.states_posted += len(states)
            raise
        with self.lock:
            self.posts += 1
            self.states_posted += len(states)
            if 200 <= status < 300:
                self.states_acknowledged += len(states)
                self.acknowledged_finals.update(
                    state["task_id"] for state in states if state.get("status") in FINAL_STATUSES)
            else:
                self.posts_failed += 1
        return status, answer


class CountingHandler(logging.Handler):
    """Counts the client's warnings (a server that is down is one each outage)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0
        self.first = []

    def emit(self, record):
        self.count += 1
        if len(self.first) < 5:
            self.first.append(record.getMessage()[:300])


def run_bars(bar_class, config, thread_index, out):
    """One thread of a worker: bars one after another until config["stop_at"] (epoch s)."""
    rng = random.Random(f"{config['seed']}-{config['process']}-{thread_index}")
    null = out["null"]
    prefix = f"{config['prefix']}{config['process']}-{thread_index}-"
    k = 0
    while time.time() < config["stop_at"]:
        task_id = f"{prefix}{k}"
        k += 1
        total = rng.randint(MIN_STEPS, MAX_STEPS)
        step_s = rng.uniform(MIN_BAR_S, config["bar_max_s"]) / total
        fail_at = rng.randrange(total) if rng.random() < ERROR_BAR_FRACTION else None
        done = 0
        out["started"] += 1
        try:
            # A fixed position per thread, as tqdm advises for threads: with automatic
            # positions, tqdm's own close() can reach a bar another thread is still
            # constructing (AttributeError: no attribute 'sp'), in plain tqdm too.
            with bar_class(total=total, desc=f"soak {task_id}", task_id=task_id, file=null,
                           position=thread_index, leave=False,
                           meta={"soak": config["prefix"]}) as bar:
                for step in range(total):
                    if step == fail_at:
                        raise SoakFailure(f"deliberate failure at step {step} of {total}")
                    time.sleep(step_s)
                    bar.update(1)
                    done += 1
            out["expected"][task_id] = ("close", total)
        except SoakFailure:
            out["expected"][task_id] = ("error", done)
        except Exception as error:  # anything else reached the job: the client's fault
            where = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            out["job_errors"].append(f"{task_id}: {type(error).__name__}: {error}\n{where}"[:4000])
            out["expected"][task_id] = None
        out["updates"] += done


def run_worker(config):
    """A client process: BARS threads of bars, one flush, figures to a JSON file."""
    sys.path.insert(0, ROOT)
    import progressista_client
    # Before the first bar makes the sender; the repo's own client, so it has this.
    counting = CountingTransport(progressista_client._default_opener)
    progressista_client._default_opener = counting
    warnings = CountingHandler()
    logging.getLogger("progressista.client").addHandler(warnings)
    outs = []
    threads = []
    with open(os.devnull, "w") as null:
        for thread_index in range(config["bars"]):
            out = {"null": null, "started": 0, "updates": 0, "expected": {}, "job_errors": []}
            outs.append(out)
            thread = threading.Thread(target=run_bars, name=f"soak-{thread_index}", daemon=True,
                                      args=(progressista_client.tqdm, config, thread_index, out))
            threads.append(thread)
            thread.start()
        for thread in threads:
            thread.join(max(0.0, config["stop_at"] - time.time()) + 4 * config["bar_max_s"] + 5)
        hung = sum(thread.is_alive() for thread in threads)
        flush_started = time.monotonic()
        flushed = progressista_client.flush(WORKER_FLUSH_TIMEOUT_S)
        flush_s = time.monotonic() - flush_started
    expected = {}
    job_errors = []
    for out in outs:
        expected.update((task_id, final) for task_id, final in out["expected"].items()
                        if final is not None)
        job_errors += out["job_errors"]
    if hung:
        job_errors.append(f"{hung} bar threads still running after their deadline")
    result = {
        "process": config["process"], "pid": os.getpid(),
        "bars_started": sum(out["started"] for out in outs),
        "updates": sum(out["updates"] for out in outs),
        "expected": expected, "job_errors": job_errors,
        "flushed": flushed, "flush_s": round(flush_s, 3),
        "warnings": warnings.count, "first_warnings": warnings.first,
    }
    with counting.lock:
        result.update(posts=counting.posts, posts_failed=counting.posts_failed,
                      states_posted=counting.states_posted,
                      states_acknowledged=counting.states_acknowledged,
                      acknowledged_finals=sorted(counting.acknowledged_finals))
    path = config["result_path"]
    with open(path + ".tmp", "w") as file:
        json.dump(result, file)
    os.replace(path + ".tmp", path)
    return 0


# --- Processes -------------------------------------------------------------------------

_started = []  # every Popen this script made: ended by PID at exit, whatever happens


def _die_with_parent():
    # Linux: the child gets SIGKILL if this script dies without cleaning up (kill -9).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def clean_environment(**settings):
    """This process's environment without PROGRESSISTA_* variables (a token or a store
    set in the shell must not change the run), plus `settings`."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("PROGRESSISTA_")}
    environment.update(settings)
    return environment


def spawn(command, **kwargs):
    process = subprocess.Popen(command, preexec_fn=_die_with_parent, **kwargs)
    _started.append(process)
    return process


def end_started_processes():
    """Kill, by PID, every process this script started that is still running."""
    for process in _started:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


def read_rss_kib(pid):
    """The resident set size of `pid` in KiB, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


async def http_get(port, path, timeout_s=HTTP_TIMEOUT_S):
    """GET http://127.0.0.1:port/path with Connection: close; (status, parsed JSON)."""
    async def exchange():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            return await reader.read()
        finally:
            writer.close()
    raw = await asyncio.wait_for(exchange(), timeout_s)
    if not raw:
        raise ConnectionError(f"127.0.0.1:{port} closed the connection without an answer")
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


class ServerProcess:
    """The real server as a subprocess, restartable on the same port and SQLite file."""

    def __init__(self, port, db_path, retention_s, log_path):
        self.port = port
        self.command = [sys.executable, os.path.join(ROOT, "progressista.py"),
                        "--host", "127.0.0.1", "--port", str(port),
                        "--store", "sqlite:///" + db_path,
                        "--retention-seconds", f"{retention_s:g}", "--log-level", "warning"]
        self.log_path = log_path
        self.process = None
        self.starts = 0

    def start(self):
        with open(self.log_path, "a") as log_file:
            log_file.write(f"--- start {self.starts + 1}\n")
            log_file.flush()
            self.process = spawn(self.command, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, cwd=ROOT, env=clean_environment())
        self.starts += 1

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def alive(self):
        return self.process is not None and self.process.poll() is None

    async def wait_ready(self, timeout_s=SERVER_START_TIMEOUT_S):
        """Poll /health until it answers 200; raise RuntimeError saying what went wrong."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited with status {self.process.returncode} "
                                   f"at start; see {self.log_path}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError):
                status, _ = await http_get(self.port, "/health", 1.0)
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the server did not answer /health within {timeout_s:g} s; "
                           f"see {self.log_path}")

    async def stop(self, signum, timeout_s=SERVER_STOP_TIMEOUT_S):
        """Send `signum`, wait for the exit; a process that outlives the wait is killed.
        Returns True if it ended by itself."""
        if not self.alive():
            return True
        os.kill(self.process.pid, signum)
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
            return False
        return True


# --- The proxy that drops connections --------------------------------------------------


def _reset(writer):
    """Close a connection with a TCP reset, as a crashed or overloaded middlebox does."""
    with contextlib.suppress(OSError, AttributeError):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class DropProxy:
    """A TCP proxy on 127.0.0.1 to `upstream_port`. While `dropping`, every new connection
    is reset as soon as it is accepted; `drop(True)` also cuts the open ones."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.dropping = False
        self.pairs = set()
        self.handlers = set()  # the task of every connection still being handled
        self.server = None
        self.port = None
        self.proxied = self.refused = self.cut = self.upstream_failures = 0

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self):
        """Stop listening, cut every connection, and wait for their handlers to end."""
        self.server.close()
        self.drop(True)
        if self.handlers:
            _, pending = await asyncio.wait(self.handlers, timeout=PROXY_CONNECT_TIMEOUT_S + 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.server.wait_closed()

    def drop(self, dropping):
        self.dropping = dropping
        if dropping:
            for pair in list(self.pairs):
                self.cut += 1
                for writer in pair:
                    _reset(writer)
            self.pairs.clear()

    async def handle(self, reader, writer):
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            await self.forward(reader, writer)
        except asyncio.CancelledError:  # close() gave up on it: end quietly, it is cut
            writer.transport.abort()
        finally:
            self.handlers.discard(task)

    async def forward(self, reader, writer):
        if self.dropping:
            self.refused += 1
            _reset(writer)
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), PROXY_CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            self.upstream_failures += 1  # the server is down: the client sees a reset
            _reset(writer)
            return
        up_reader, up_writer = upstream
        if self.dropping:  # the drop began while we connected
            self.refused += 1
            _reset(writer)
            _reset(up_writer)
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)
        self.proxied += 1
        try:
            both_ways = asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            await asyncio.wait_for(both_ways, PROXY_CONNECTION_MAX_S)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.pairs.discard(pair)
            for side in pair:
                side.transport.abort()


async def _pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):  # reset, or written after the other side went away
        pass


# --- The listeners ---------------------------------------------------------------------


async def listen(index, port, checker, connections, stop):
    """One /ws listener: connects, feeds every message to `checker`, reconnects."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException
    uri = f"ws://127.0.0.1:{port}/ws"
    while not stop.is_set():
        try:
            async with connect(uri, max_size=None, open_timeout=LISTENER_CONNECT_TIMEOUT_S,
                               close_timeout=1) as websocket:
                connections[index] += 1
                async for raw in websocket:
                    checker.receive(index, json.loads(raw))
        except (OSError, asyncio.TimeoutError, WebSocketException):
            pass  # the server went away: try again
        if not stop.is_set():
            await asyncio.sleep(LISTENER_RETRY_S)


# --- The run ---------------------------------------------------------------------------


class Run:
    """The orchestration of one soak: state shared by its phases, and the figures."""

    def __init__(self, args, workdir):
        self.args = args
        self.plan = plan_phases(args.duration)
        self.workdir = workdir
        self.prefix = "soak-%s-" % os.urandom(3).hex()
        self.server = ServerProcess(free_port(), os.path.join(workdir, "soak.db"),
                                    self.plan.retention_s, os.path.join(workdir, "server.log"))
        self.checker = FeedChecker(self.prefix, args.listeners)
        self.connections = [0] * args.listeners
        self.samples = []          # (seconds from t0, server start number, RSS KiB)
        self.events = {}           # what happened when, in seconds from t0
        self.problems = []         # reasons for FAIL, one line each
        self.t0 = None
        self.workers = []

    def now(self):
        return time.monotonic() - self.t0

    async def sleep_until(self, at_s):
        delay = at_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def sample_memory(self, stop):
        while not stop.is_set():
            pid = self.server.pid if self.server.alive() else None
            rss = read_rss_kib(pid) if pid else None
            if rss is not None:
                self.samples.append((self.now(), self.server.starts, rss))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), MEMORY_SAMPLE_INTERVAL_S)

    def start_workers(self, proxy_port):
        env = clean_environment(PROGRESSISTA_SERVER_URL=f"http://127.0.0.1:{proxy_port}",
                                PROGRESSISTA_FLUSH_TIMEOUT=f"{WORKER_FLUSH_TIMEOUT_S:g}")
        stop_at = time.time() + self.plan.clients_stop_s - self.now()
        for index in range(self.args.processes):
            config = {"process": index, "bars": self.args.bars, "seed": self.args.seed,
                      "prefix": self.prefix, "stop_at": stop_at, "bar_max_s": self.plan.bar_max_s,
                      "result_path": os.path.join(self.workdir, f"worker-{index}.json")}
            with open(os.path.join(self.workdir, f"worker-{index}.log"), "w") as log_file:
                self.workers.append(spawn(
                    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                    env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    cwd=self.workdir))

    async def faults(self, proxy):
        """The drop window, then the kill and the restart, at their planned times."""
        plan = self.plan
        await self.sleep_until(plan.drop_start_s)
        self.events["drop_start_s"] = self.now()
        proxy.drop(True)
        await self.sleep_until(plan.drop_end_s)
        proxy.drop(False)
        self.events["drop_end_s"] = self.now()
        await self.sleep_until(plan.kill_at_s)
        self.events["kill_at_s"] = self.now()
        signum = getattr(signal, "SIG" + self.args.kill_signal)
        if not await self.server.stop(signum):
            self.problems.append(f"the server ignored SIG{self.args.kill_signal} for "
                                 f"{SERVER_STOP_TIMEOUT_S:g} s and was killed")
        self.events["server_exit_status"] = self.server.process.returncode
        await self.sleep_until(self.events["kill_at_s"] + plan.restart_after_s)
        self.server.start()
        await self.server.wait_ready()
        self.events["ready_again_s"] = self.now()

    async def wait_for_workers(self):
        deadline = self.plan.duration_s + WORKER_EXIT_GRACE_S
        while any(worker.poll() is None for worker in self.workers) and self.now() < deadline:
            await asyncio.sleep(0.1)
        for worker in self.workers:
            if worker.poll() is None:
                self.problems.append(f"worker PID {worker.pid} still running "
                                     f"{WORKER_EXIT_GRACE_S:g} s after the end: killed")
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(5)

    async def settle(self, expected):
        """Wait until the listeners saw every expected final state; give up after SETTLE_S,
        or SETTLE_QUIET_S after the last new final state (the clients have all exited, so
        a final not seen by then was lost)."""
        deadline = time.monotonic() + SETTLE_S
        seen, quiet_since = -1, time.monotonic()
        while not self.checker.all_seen(expected) and time.monotonic() < deadline:
            if len(self.checker.final_seen) != seen:
                seen, quiet_since = len(self.checker.final_seen), time.monotonic()
            elif time.monotonic() - quiet_since > SETTLE_QUIET_S:
                break
            await asyncio.sleep(0.1)

    def worker_results(self):
        results = []
        for index, worker in enumerate(self.workers):
            path = os.path.join(self.workdir, f"worker-{index}.json")
            try:
                with open(path) as file:
                    results.append(json.load(file))
            except (OSError, ValueError):
                self.problems.append(f"worker {index} (PID {worker.pid}) left no figures "
                                     f"(exit status {worker.returncode}); see its log")
        return results

    async def go(self):
        """The whole run; returns the figures (a dict)."""
        args, plan = self.args, self.plan
        # Ctrl-C and SIGTERM cancel the run: the finally blocks end what it started.
        loop, run = asyncio.get_running_loop(), asyncio.current_task()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, run.cancel)
        self.server.start()
        await self.server.wait_ready()
        proxy = await DropProxy(self.server.port).start()
        stop = asyncio.Event()
        self.t0 = time.monotonic()
        listeners = [asyncio.ensure_future(listen(index, self.server.port, self.checker,
                                                  self.connections, stop))
                     for index in range(args.listeners)]
        sampler = asyncio.ensure_future(self.sample_memory(stop))
        try:
            deadline = time.monotonic() + LISTENER_CONNECT_TIMEOUT_S
            while min(self.checker.snapshots) == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self.start_workers(proxy.port)
            faults = asyncio.ensure_future(self.faults(proxy))
            await self.sleep_until(plan.warmup_end_s)
            self.events["rss_start_kib"] = self.samples[-1][2] if self.samples else None
            await self.wait_for_workers()
            if not faults.done():
                self.problems.append("the fault phases had not finished when the clients did")
                faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await faults  # raises what went wrong in them (a server that did not restart)
            results = self.worker_results()
            expected = {}
            for result in results:
                expected.update((task_id, tuple(final))
                                for task_id, final in result["expected"].items())
            await self.settle(expected)
            status, body = await http_get(self.server.port, "/tasks")
            end_tasks = body["tasks"] if status == 200 else {}
            if status != 200:
                self.problems.append(f"GET /tasks at the end answered {status}")
            _, health = await http_get(self.server.port, "/health")
            rss_final = read_rss_kib(self.server.pid)
        finally:
            stop.set()
            for task in listeners + [sampler]:
                task.cancel()
            await asyncio.gather(*listeners, sampler, return_exceptions=True)
            await proxy.close()
        if not await self.server.stop(signal.SIGTERM):
            self.problems.append("the server did not stop on SIGTERM at the end")
        return self.figures(results, expected, end_tasks, health, rss_final, proxy)

    def figures(self, results, expected, end_tasks, health, rss_final, proxy):
        args, plan, events = self.args, self.plan, self.events
        acknowledged = set()
        for result in results:
            acknowledged.update(result["acknowledged_finals"])
        verdict = check_finals(expected, self.checker, end_tasks, acknowledged)
        last_start = self.server.starts
        after_restart = [(at, rss) for at, start, rss in self.samples if start == last_start]
        memory = memory_verdict(after_restart, events.get("ready_again_s", plan.duration_s), plan)
        client_errors = [error for result in results for error in result["job_errors"]]
        def total(name):
            return sum(result[name] for result in results)

        figures = {
            "date": time.strftime("%Y-%m-%d"), "duration_s": plan.duration_s,
            "processes": args.processes, "bars_per_process": args.bars,
            "listeners": args.listeners, "kill_signal": args.kill_signal, "seed": args.seed,
            "retention_s": plan.retention_s,
            "bars_run": sum(result["bars_started"] for result in results),
            "bars_close": sum(1 for final in expected.values() if final[0] == "close"),
            "bars_error": sum(1 for final in expected.values() if final[0] == "error"),
            "updates_made": sum(result["updates"] for result in results),
            "posts": total("posts"), "posts_failed": total("posts_failed"),
            "states_posted": total("states_posted"),
            "states_acknowledged": total("states_acknowledged"),
            "states_seen_per_listener": list(self.checker.states),
            "finals_expected": len(expected), "finals_found": verdict["found"],
            "finals_found_close": verdict["found_close"],
            "finals_found_error": verdict["found_error"],
            "lost_after_seen_count": len(verdict["lost_after_seen"]),
            "lost_after_seen": verdict["lost_after_seen"][:MISSING_SHOWN],
            "missing_count": len(verdict["missing"]),
            "missing": verdict["missing"][:MISSING_SHOWN],
            "missing_acknowledged": sum(1 for item in verdict["missing"]
                                        + verdict["lost_after_seen"] if item["acknowledged"]),
            "client_errors": len(client_errors), "client_error_examples": client_errors[:5],
            "client_warnings": sum(result["warnings"] for result in results),
            "workers_not_flushed": sum(1 for result in results if not result["flushed"]),
            "drop_window_s": [round(events.get("drop_start_s", -1), 1),
                              round(events.get("drop_end_s", -1), 1)],
            "connections_proxied": proxy.proxied, "connections_refused": proxy.refused,
            "connections_cut": proxy.cut, "upstream_failures": proxy.upstream_failures,
            "server_restarts": self.server.starts - 1,
            "kill_at_s": round(events.get("kill_at_s", -1), 1),
            "server_exit_status": events.get("server_exit_status"),
            "ready_again_s": round(events.get("ready_again_s", -1), 1),
            "listeners_connected": sum(1 for count in self.connections if count),
            "listener_connections": list(self.connections),
            "listener_snapshots": list(self.checker.snapshots),
            "tasks_at_end": None if health is None else health.get("tasks"),
            "rss_kib": {"start": events.get("rss_start_kib"),
                        "working_set": memory["working_set_kib"],
                        "end_of_load": memory["end_of_load_kib"],
                        "final": rss_final,
                        "max": max([rss for _, _, rss in self.samples]
                                   + ([rss_final] if rss_final else []), default=None)},
            "memory": memory,
            "wall_s": round(self.now(), 1),
        }
        problems = list(self.problems)
        if figures["finals_found"] != figures["finals_expected"]:
            problems.append(f"{figures['finals_expected'] - figures['finals_found']} final "
                            f"states not found ({figures['lost_after_seen_count']} lost after "
                            f"they were seen, {figures['missing_count']} never seen)")
        if figures["client_errors"]:
            problems.append(f"{figures['client_errors']} errors raised into the job")
        if figures["listeners_connected"] != args.listeners:
            problems.append("not every listener connected")
        if not figures["bars_run"]:
            problems.append("no bar ran")
        if memory["verdict"] == "FAIL":
            problems.append("the server's memory is not flat: " + memory.get(
                "why", f"{memory['end_of_load_kib']} KiB > {memory['allowed_kib']} KiB allowed"))
        figures["problems"] = problems
        figures["pass"] = not problems
        return figures


# --- Report ----------------------------------------------------------------------------


def _mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f}"


def format_report(figures):
    """The human table of a run's figures."""
    rss, memory = figures["rss_kib"], figures["memory"]
    drop_start_s, drop_end_s = figures["drop_window_s"]
    seen = figures["states_seen_per_listener"]
    rows = [
        ("duration", f"{figures['duration_s']:g} s (wall {figures['wall_s']:g} s), retention "
                     f"{figures['retention_s']:g} s"),
        ("clients", f"{figures['processes']} processes x {figures['bars_per_process']} bars = "
                    f"{figures['processes'] * figures['bars_per_process']} bars at a time"),
        ("bars run", f"{figures['bars_run']:,}"),
        ("updates made (tqdm update calls)", f"{figures['updates_made']:,}"),
        ("states posted / acknowledged", f"{figures['states_posted']:,} / "
                                         f"{figures['states_acknowledged']:,} in "
                                         f"{figures['posts']:,} POSTs "
                                         f"({figures['posts_failed']:,} failed)"),
        ("task states applied (seen on /ws)", (f"{min(seen):,} - {max(seen):,} per listener"
                                               if seen else "-")),
        ("final states expected / found", f"{figures['finals_expected']:,} / "
                                          f"{figures['finals_found']:,} (close "
                                          f"{figures['finals_found_close']:,} of "
                                          f"{figures['bars_close']:,}, error "
                                          f"{figures['finals_found_error']:,} of "
                                          f"{figures['bars_error']:,})"),
        ("lost after they were seen", f"{figures['lost_after_seen_count']}"),
        ("missing (never seen)", f"{figures['missing_count']}"),
        ("  of those, acknowledged (HTTP 200)", f"{figures['missing_acknowledged']}"),
        ("client errors raised into the job", f"{figures['client_errors']} (client warnings "
                                              f"logged: {figures['client_warnings']})"),
        ("proxy drop window", f"{drop_start_s:g} - {drop_end_s:g} s: "
                              f"{figures['connections_refused']:,} connections reset, "
                              f"{figures['connections_cut']} cut; "
                              f"{figures['upstream_failures']:,} reset while the server was down"),
        ("server restarts", f"{figures['server_restarts']} (SIG{figures['kill_signal']} at "
                            f"{figures['kill_at_s']:g} s, exit status "
                            f"{figures['server_exit_status']}; answering again at "
                            f"{figures['ready_again_s']:g} s)"),
        ("tasks on the server at the end", f"{figures['tasks_at_end']} (GET /health)"),
        ("listeners", f"{figures['listeners_connected']} of {figures['listeners']} connected; "
                      f"connections {figures['listener_connections']}, snapshots "
                      f"{figures['listener_snapshots']}"),
        ("server RSS, MiB", f"start {_mib(rss['start'])}, working set {_mib(rss['working_set'])}, "
                            f"end of load {_mib(rss['end_of_load'])}, final {_mib(rss['final'])}, "
                            f"max {_mib(rss['max'])}"),
        ("memory flat", (f"{memory['verdict']}: end of load {_mib(memory['end_of_load_kib'])} "
                         f"<= {_mib(memory['allowed_kib'])} allowed (working set + "
                         f"{MEMORY_TOLERANCE:.0%}, >= {MEMORY_SLACK_KIB // 1024} MiB)"
                         if memory["verdict"] != "n/a" and memory["allowed_kib"] is not None
                         else f"{memory['verdict']} ({memory.get('why', '')})")),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}} | {value}" for name, value in rows]
    for key, title in (("lost_after_seen", "lost after they were seen"), ("missing", "missing")):
        for item in figures[key]:
            lines.append(f"  {title}: {item['task_id']} expected {item['expected']}, "
                         + ", ".join(f"{name} {item[name]}" for name in item
                                     if name not in ("task_id", "expected")))
    for example in figures["client_error_examples"]:
        lines.append(f"  client error: {example}")
    for problem in figures["problems"]:
        lines.append(f"FAIL: {problem}")
    lines.append("overall | " + ("PASS" if figures["pass"] else "FAIL"))
    return "\n".join(lines)


# --- Command line ----------------------------------------------------------------------


def _within(kind, minimum, maximum=10_000, why=""):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be from {minimum:g} to {maximum:g}{why}, not {text}")
        return value
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default=DEFAULT_DURATION_S,
                        type=_within(float, MIN_DURATION_S, MAX_DURATION_S,
                                     " (shorter, the phases would overlap)"),
                        help="seconds of load; every phase scales with it (default 60)")
    parser.add_argument("--processes", type=_within(int, 1), default=DEFAULT_PROCESSES,
                        help=f"client processes (default {DEFAULT_PROCESSES})")
    parser.add_argument("--bars", type=_within(int, 1), default=DEFAULT_BARS_PER_PROCESS,
                        help="bars run at a time in each process, one thread each "
                             f"(default {DEFAULT_BARS_PER_PROCESS})")
    parser.add_argument("--listeners", type=_within(int, 1), default=DEFAULT_LISTENERS,
                        help=f"/ws listeners (default {DEFAULT_LISTENERS})")
    parser.add_argument("--kill-signal", choices=("KILL", "TERM"), default="KILL",
                        help="how the server is stopped mid-run: KILL (a crash, the default) "
                             "or TERM (a graceful stop)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the bars' totals, speeds and failures (default: random)")
    parser.add_argument("--json", action="store_true",
                        help="also print the figures as one JSON object, on the last line")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (database, logs) even when the run passes")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(json.loads(args.worker))
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    workdir = tempfile.mkdtemp(prefix="progressista-soak-")
    run = Run(args, workdir)
    figures = None
    try:
        figures = asyncio.run(run.go())
    except (RuntimeError, OSError) as error:  # a server that would not start, and the like
        print(f"soak: {error}", file=sys.stderr)
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("soak: interrupted; every process it started is ended", file=sys.stderr)
    finally:
        end_started_processes()
        if figures is not None and figures["pass"] and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"soak: logs and database kept in {workdir}", file=sys.stderr)
    if figures is None:
        return 1
    print(format_report(figures))
    if args.json:
        print(json.dumps(figures, separators=(",", ":")))
    return 0 if figures["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
