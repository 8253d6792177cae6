"""Progressista client: tqdm bars that also show live in a Progressista dashboard.

The one-line change::

    from progressista_client import tqdm, trange   # was: from tqdm import tqdm, trange

Every bar still draws where tqdm would draw, and is also sent to the server named by
``PROGRESSISTA_SERVER_URL`` (default ``http://localhost:8000/progress``). Or change nothing
and run ``progressista run script.py -- --flags``. One file, standard library only (tqdm
itself aside, imported only when a bar class is used), so it can be vendored. It speaks the
wire protocol of docs/PROTOCOL.md, version 2; docs/client.md documents every option.

What it promises: the program's own thread never waits on the network (one background
sender thread per process sends the live state of each bar, batched, over one kept-alive
connection); a server that is down, slow or wrong never raises into the program (one
warning, then retries with capped backoff); the final state of every bar is flushed at
exit, waiting a bounded time.
"""

import atexit
import base64
import collections
import http.client
import importlib
import importlib.util
import itertools
import json
import logging
import linecache
import math
import opcode
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid
import warnings
import weakref

__all__ = [
    "RemoteTqdm", "tqdm", "trange", "make_remote_tqdm", "patch", "unpatch",
    "Sender", "Endpoint", "make_endpoint", "normalize_server_url", "default_meta",
    "default_sender", "send_update", "flush", "demo", "run_program", "run_from_environment",
]
__version__ = "0.4.0"  # one version for the package: progressista.__version__

log = logging.getLogger("progressista.client")

# --- Configuration ---

DEFAULT_SERVER_URL = "http://localhost:8000/progress"
DEFAULT_PUSH_INTERVAL_S = 0.25      # minimum seconds between two sends of one bar
DEFAULT_REQUEST_TIMEOUT_S = 2.0     # one request is given up after this long
DEFAULT_FLUSH_TIMEOUT_S = 2.0       # the exit hook waits at most this long for the last sends
# Well inside the server's default 60 s stale timeout, so only a dead sender goes stale.
DEFAULT_HEARTBEAT_INTERVAL_S = 15.0
# A live bar's state is read by the sender thread at its push interval, but never more often
# than this: a bar with push_every=0 must not make the thread spin.
MIN_LIVE_READ_INTERVAL_S = 0.05
# ...and the sender reads at most this many live bars a second in all (each read costs some
# 20 us of the GIL): a process with thousands of open bars reads each less often.
LIVE_READS_PER_S_LIMIT = 2000
BACKOFF_INITIAL_S = 0.5             # first retry delay after a failed send
BACKOFF_MAX_S = 10.0                # retry delays double up to this
# A loop left early (break, or its body raised) is closed only after this grace, so that an
# uncaught exception reaching the excepthook can still report it as an error.
EARLY_CLOSE_HOLD_S = 1.0
# Holds end on this grid, so that many short held bars cost the sender one tick per step,
# not one each.
HOLD_GRID_S = 0.1
# While the server is down, final states wait in memory; beyond this many the oldest are
# dropped (with one warning), so a job of millions of short bars never grows without bound.
MAX_PENDING_FINALS = 10000

# Protocol limits (PROTOCOL.md, "The task"): states are clipped to them, so that one odd bar
# never gets a whole batch refused.
MAX_BATCH_TASKS = 1000
MAX_BATCH_BYTES = 512 * 1024        # well under the server's default 1 MiB body limit
MAX_TASK_ID_CHARS = 256
MAX_RUN_CHARS = 256                 # a run id (a parent is a task_id)
MAX_RUN_NAME_CHARS = 1000
MAX_DESC_CHARS = 1000
MAX_UNIT_CHARS = 32
MAX_POSTFIX_CHARS = 1000
MAX_ERROR_CHARS = 2000
MAX_META_BYTES = 4096
MAX_META_VALUE_CHARS = 256
MAX_RESPONSE_BYTES = 64 * 1024      # we only read the server's short JSON answers
TRACEBACK_LINES = 6                 # last lines of a traceback kept in an error report

ENV_SERVER_URL = "PROGRESSISTA_SERVER_URL"
ENV_API_TOKEN = "PROGRESSISTA_API_TOKEN"
ENV_PUSH_INTERVAL = "PROGRESSISTA_PUSH_INTERVAL"
ENV_REQUEST_TIMEOUT = "PROGRESSISTA_REQUEST_TIMEOUT"
ENV_FLUSH_TIMEOUT = "PROGRESSISTA_FLUSH_TIMEOUT"
ENV_HEARTBEAT_INTERVAL = "PROGRESSISTA_HEARTBEAT_INTERVAL"
ENV_CA_BUNDLE = "PROGRESSISTA_CA_BUNDLE"        # a CA file to verify an https:// server with
ENV_SSL_CERT_FILE = "SSL_CERT_FILE"             # OpenSSL's own, honoured too
ENV_RUN = "PROGRESSISTA_RUN"                    # the run (job) every bar of this process joins
ENV_RUN_NAME = "PROGRESSISTA_RUN_NAME"          # the run's readable name
# Set by `progressista run` for the program it watches (and inherited by its children).
ENV_RUN_DIR = "PROGRESSISTA_RUN_DIR"            # where each process records its open bars
ENV_PATCH = "PROGRESSISTA_PATCH"                # JSON keyword arguments for patch()
ENV_CLIENT_PATH = "PROGRESSISTA_CLIENT_PATH"    # this file, loaded by the run's sitecustomize
ENV_RUN_PID = "PROGRESSISTA_RUN_PID"            # `run` itself: the parent of the program it watches

USER_AGENT = "progressista-client/" + __version__
FINAL_STATUSES = ("close", "error")

_warned = set()
_warned_lock = threading.Lock()


def _warn_once(key, message, *args):
    """Log `message` once per process for `key`: a broken setting or server, not a flood."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def _env_seconds(name, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        _warn_once(("env", name), "progressista: ignoring %s=%r (expected seconds >= 0)", name, raw)
        return default
    return value


# --- URLs, endpoints and task states ---

Endpoint = collections.namedtuple("Endpoint", "url headers timeout")
Endpoint.__doc__ = "Where and how to send: the /progress URL, HTTP headers (sorted pairs), timeout in s."


def normalize_server_url(url):
    """Return the ``/progress`` endpoint for `url`, given either as a base URL or as the endpoint.

    Raises ValueError for anything that is not an http(s) URL with a host.
    """
    parts = urllib.parse.urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("server_url %r: expected http(s)://host[:port][/progress]" % (url,))
    path = parts.path.rstrip("/")
    if not path.endswith("/progress"):
        path += "/progress"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def make_endpoint(server_url=None, token=None, headers=None, request_timeout=None):
    """Build an Endpoint from explicit values, falling back to the PROGRESSISTA_* variables."""
    url = normalize_server_url(server_url or os.environ.get(ENV_SERVER_URL) or DEFAULT_SERVER_URL)
    all_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    all_headers.update({str(k): str(v) for k, v in (headers or {}).items()})
    token = token or os.environ.get(ENV_API_TOKEN)
    if token:
        all_headers["Authorization"] = "Bearer " + token
    if request_timeout is None:
        request_timeout = _env_seconds(ENV_REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT_S)
    return Endpoint(url, tuple(sorted(all_headers.items())), float(request_timeout))


_host = None


def _hostname():
    # Cached: gethostname() can cost more than a whole short bar.
    global _host
    if _host is None:
        _host = socket.gethostname()
    return _host


# Each scheduler's job id, its array index variables (Torque's, then PBS Pro's), and the
# value it uses for "not an array job". 0 is a real index for SLURM and PBS (--array=0-9).
_SCHEDULERS = (
    ("SLURM_JOB_ID", "slurm", ("SLURM_ARRAY_TASK_ID",), None),
    ("PBS_JOBID", "pbs", ("PBS_ARRAYID", "PBS_ARRAY_INDEX"), None),
    ("LSB_JOBID", "lsf", ("LSB_JOBINDEX",), "0"),
    ("JOB_ID", "sge", ("SGE_TASK_ID",), "undefined"))
# Where a launcher puts a process's rank: torchrun, SLURM's srun, Open MPI, MPICH and Intel MPI.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
TORCHRUN_RUN_ID = "TORCHELASTIC_RUN_ID"     # "none" when torchrun was given no --rdzv-id


def _scheduler_job(env):
    """(scheduler, job id, array index or None) of the batch job this process is in, or None."""
    for job_var, scheduler, index_vars, not_an_array in _SCHEDULERS:
        if env.get(job_var):
            index = next((env[name] for name in index_vars if env.get(name)), None)
            return scheduler, env[job_var], index if index != not_an_array else None
    return None


def default_meta(environ=None):
    """Host name, pid, and the scheduler's job id, the rank and pod name when one set them."""
    env = os.environ if environ is None else environ
    meta = {"host": _hostname(), "pid": os.getpid()}
    job = _scheduler_job(env)
    if job is not None:
        meta["scheduler"], meta["job_id"] = job[0], job[1]
        if job[2]:
            meta["array_index"] = job[2]
    rank = next((env[name].strip() for name in RANK_VARIABLES if env.get(name, "").strip()), None)
    if rank is not None:
        meta["rank"] = int(rank) if rank.isdigit() else rank
    pod = env.get("POD_NAME") or (env.get("HOSTNAME") if env.get("KUBERNETES_SERVICE_HOST") else None)
    if pod:
        meta["pod"] = pod
    return meta


def run_from_environment(environ=None):
    """The run id the environment names, or None (PROTOCOL.md, "Client settings").

    PROGRESSISTA_RUN, else the scheduler's job (`slurm-<job>_<array index>`; `pbs-<job>`,
    whose id already holds the index; `lsf-`, `sge-` as SLURM), else torchrun's run id.
    """
    env = os.environ if environ is None else environ
    run = env.get(ENV_RUN, "").strip()
    if not run:
        job = _scheduler_job(env)
        if job is not None:
            scheduler, job_id, index = job
            run = "%s-%s" % (scheduler, job_id)
            if index and scheduler != "pbs":
                run += "_" + index
        elif env.get(TORCHRUN_RUN_ID, "none").strip() not in ("", "none"):
            run = env[TORCHRUN_RUN_ID].strip()
    return run[:MAX_RUN_CHARS] or None


def _join_run():
    """At import: find this process's run, or make one, and put it in the environment, so
    that the child processes it starts (fork, spawn, subprocesses) join it."""
    run = run_from_environment()
    if run is None:
        run = "run-" + uuid.uuid4().hex[:16]
    # Assigned, not setdefault: a blank PROGRESSISTA_RUN names no run, and children left
    # with it would each make their own.
    os.environ[ENV_RUN] = run
    return run


def _current_run():
    # Per bar, not once: a program may set PROGRESSISTA_RUN itself before its bars.
    return run_from_environment() or _process_run


def _clean_meta(meta):
    """Meta as the protocol wants it: string keys, JSON scalars, at most 4 KiB."""
    cleaned = {}
    for key, value in (meta or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            value = str(value)
        if isinstance(value, str):
            value = value[:MAX_META_VALUE_CHARS]
        cleaned[str(key)[:MAX_META_VALUE_CHARS]] = value
    while cleaned and len(json.dumps(cleaned)) > MAX_META_BYTES:
        _warn_once("meta-size", "progressista: meta over %d bytes as JSON; dropping keys", MAX_META_BYTES)
        cleaned.popitem()
    return cleaned


def _clip(text, limit):
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _finite(value, default=None, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    if minimum is not None and value < minimum:
        return minimum
    return value


def describe_exception(exc_type, exc, tb):
    """'Type: message' and the last lines of the traceback, clipped for the `error` field."""
    head = exc_type.__name__ if exc_type is not None else "Exception"
    message = str(exc) if exc is not None else ""
    text = head + (": " + message if message else "")
    # Our own frames (the sys.exit wrapper, the bar) say nothing about the program.
    frames = [frame for frame in traceback.extract_tb(tb) if frame.filename != __file__]
    lines = "".join(traceback.format_list(frames)).rstrip("\n").splitlines()
    if lines:
        text += "\n" + "\n".join(lines[-TRACEBACK_LINES:])
    return _clip(text, MAX_ERROR_CHARS)


def _time_seq(wall_clock):
    # Microseconds of wall time: a restarted client, or `run` ending a killed program's
    # bars, still sends seqs greater than anything sent before.
    return int(wall_clock() * 1e6)


# --- Sender ---

class _Entry:
    """One queued state: where it goes, and the rules for when it may go.

    `text`, the state as JSON, is set when the state is delivered (after its seq), not here:
    put() is on the bar's display path. `source()`, when given, reads the task's live state
    (None once it has ended); `read_at` is when the sender last read it.
    """

    __slots__ = ("endpoint", "state", "push_every", "final", "not_before", "text", "source",
                 "read_at", "heartbeat", "polled")

    def __init__(self, endpoint, state, push_every=0.0, final=False, not_before=0.0,
                 source=None, heartbeat=False, polled=False):
        self.endpoint = endpoint
        self.state = state
        self.push_every = push_every
        self.final = final
        self.not_before = not_before
        self.source = source
        self.read_at = -math.inf  # not read yet
        self.heartbeat = heartbeat  # re-sent because heartbeat_s passed since the last send
        self.polled = polled        # only a read of a delivered task: sent if it changed

    def read_every(self, live_count=1):
        return max(self.push_every, MIN_LIVE_READ_INTERVAL_S, live_count / LIVE_READS_PER_S_LIMIT)


# The fields whose change is news: a live read that changes none of them is not sent (until
# the heartbeat), so an idle bar costs the server nothing.
_PROGRESS_FIELDS = ("n", "total", "desc", "postfix", "unit", "status")


def _progress_of(state):
    return tuple(state.get(name) for name in _PROGRESS_FIELDS)


class _Outage:
    __slots__ = ("failures", "retry_at", "flush_id")

    def __init__(self):
        self.failures = 0
        self.retry_at = 0.0
        self.flush_id = 0


_tls_contexts = {}  # CA file (or None: the system's store) -> ssl.SSLContext


def _tls_context():
    """The context that verifies an https:// server: PROGRESSISTA_CA_BUNDLE, else
    SSL_CERT_FILE, else the system's trust store."""
    cafile = os.environ.get(ENV_CA_BUNDLE) or os.environ.get(ENV_SSL_CERT_FILE) or None
    context = _tls_contexts.get(cafile)
    if context is None:
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as error:
            raise OSError("cannot load the CA file %s (%s or %s): %s"
                          % (cafile, ENV_CA_BUNDLE, ENV_SSL_CERT_FILE, error)) from None
        _tls_contexts[cafile] = context
    return context


def _proxy_for(parts):
    """The proxy the environment names for this URL (http_proxy, https_proxy, no_proxy, as
    urllib reads them, which the client used before it kept connections), or None."""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return proxy_parts if proxy_parts.hostname else None


class _Link:
    """One connection to a server: direct, or through the proxy the environment names (a
    CONNECT tunnel for https://, absolute request targets for http://)."""

    def __init__(self, parts, timeout):
        self.target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.proxy_headers = {}
        proxy = _proxy_for(parts)
        host, port = parts.hostname, parts.port
        if proxy is not None:
            host, port = proxy.hostname, proxy.port or 80
            if proxy.username is not None:
                credentials = "%s:%s" % (urllib.parse.unquote(proxy.username),
                                         urllib.parse.unquote(proxy.password or ""))
                self.proxy_headers["Proxy-Authorization"] = \
                    "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        if parts.scheme == "https":
            self.connection = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                          context=_tls_context())
            if proxy is not None:
                self.connection.set_tunnel(parts.hostname, parts.port or 443,
                                           headers=self.proxy_headers)
                self.proxy_headers = {}  # said once, to open the tunnel
        else:
            self.connection = http.client.HTTPConnection(host, port, timeout=timeout)
            if proxy is not None:
                self.target = urllib.parse.urlunsplit(
                    (parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))

    def post(self, body, headers, timeout):
        """(status, answer, whether the connection may be used again)."""
        connection = self.connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request("POST", self.target, body=body, headers=dict(headers, **self.proxy_headers))
        response = connection.getresponse()
        answer = response.read(MAX_RESPONSE_BYTES)
        # Reusable once the answer was read to its end and the server keeps the connection.
        return response.status, answer, response.isclosed() and not response.will_close

    def closed_by_peer(self):
        """True if this idle connection can be seen to be over (the server closed it: it is
        readable, at its end) or has no socket any more."""
        sock = self.connection.sock
        if sock is None:
            return True
        try:
            if hasattr(select, "poll"):  # select() fails on descriptors above 1023
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def close(self):
        self.connection.close()


class _PersistentPoster:
    """POSTs over one kept-alive HTTP/1.1 connection per server, reconnecting when it is over.

    Called as `poster(url, body, headers, timeout) -> (status, answer body)`; network
    failures raise. Redirects are answers like any other (never followed: a redirect would
    carry the token to another host). A connection is taken out while a request uses it,
    so two senders at once (a vendored copy's beside this one's) each get their own.
    """

    def __init__(self):
        self._idle = {}  # (scheme, host:port) -> the _Link kept for the next request
        self._lock = threading.Lock()

    def __call__(self, url, body, headers, timeout):
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc)
        with self._lock:
            link = self._idle.pop(key, None)
        if link is not None and link.closed_by_peer():
            link.close()  # the server's idle timeout, or a restart
            link = None
        reused = link is not None
        if link is None:
            link = _Link(parts, timeout)
        try:
            try:
                status, answer, keep = link.post(body, headers, timeout)
            except ConnectionError:
                if not reused:
                    raise
                # The keep-alive race: the server closed the connection as we reused it,
                # before answering. Once more on a fresh one. Even if the server applied
                # the first, resending is safe: it ignores an update whose seq is not
                # greater than the one it stored (PROTOCOL.md, "The task").
                link.close()
                link = _Link(parts, timeout)
                status, answer, keep = link.post(body, headers, timeout)
        except BaseException:
            link.close()
            raise
        with self._lock:
            if keep and key not in self._idle:
                self._idle[key] = link
                link = None
        if link is not None:
            link.close()
        return status, answer

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, {}
        for link in idle.values():
            link.close()

    def forget(self):
        """In a forked child: drop the parent's connections (its sockets), unclosed."""
        self._idle = {}
        self._lock = threading.Lock()


# The process's transport, shared by its senders; _default_opener is what a Sender made
# without an opener uses (bench/soak.py wraps it to count what is posted).
_transport = _PersistentPoster()
_default_opener = _transport


def _post_once(url, body, headers, timeout):
    """POST on a connection of its own: the transport before keep-alive, kept as the
    benchmark's reference (bench/bench_transport.py)."""
    link = _Link(urllib.parse.urlsplit(url), timeout)
    try:
        return link.post(body, headers, timeout)[:2]
    finally:
        link.close()


def _server_message(body):
    try:
        return str(json.loads(body.decode("utf-8", "replace")).get("error", ""))[:200]
    except (ValueError, AttributeError):
        return ""


# What json.dumps raises for a value it cannot encode (a datetime, a circular reference).
_JSON_ERRORS = (TypeError, ValueError, RecursionError)


def _encodable(value):
    try:
        json.dumps(value)
    except _JSON_ERRORS:
        return False
    return True


def _chunks(entries):
    """Split encoded entries into batches within the protocol's count and our byte budget."""
    batch, size = [], 2
    for entry in entries:
        encoded = len(entry.text) + 1
        if batch and (len(batch) >= MAX_BATCH_TASKS or size + encoded > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 2
        batch.append(entry)
        size += encoded
    if batch:
        yield batch


class Sender:
    """One daemon thread that delivers the latest state of every task, batched per endpoint.

    `put()` never waits on the network. Each tick sends every due state in one POST per
    endpoint; a failed endpoint is retried with capped exponential backoff and warned about
    once per outage. A task put with a `source` is read again at its push interval and sent
    when it changed, so the server sees its live state, not the last one put. Live tasks are
    re-sent every `heartbeat_s`. `flush()` waits, bounded, for the queue to drain. `clock`,
    `wall_clock` and `opener(url, body, headers, timeout) -> (status, body)` are injectable
    (the default keeps one connection per server); with `autostart=False` tests drive
    `tick()` by hand.
    """

    def __init__(self, *, clock=time.monotonic, wall_clock=time.time, opener=None,
                 heartbeat_s=None, backoff_initial_s=BACKOFF_INITIAL_S,
                 backoff_max_s=BACKOFF_MAX_S, run_dir=None, autostart=True):
        self._clock = clock
        self._wall_clock = wall_clock
        self._open = opener or _default_opener
        if heartbeat_s is None:
            heartbeat_s = _env_seconds(ENV_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_INTERVAL_S)
        self.heartbeat_s = heartbeat_s or DEFAULT_HEARTBEAT_INTERVAL_S
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._run_dir = run_dir
        self._autostart = autostart
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._pending = {}      # task_id -> _Entry; latest wins, but a final is never undone
        self._live = {}         # task_id -> _Entry last delivered, for tasks not yet final
        self._last_sent = {}    # task_id -> clock() of its last delivery
        self._outages = {}      # Endpoint -> _Outage, while its server fails
        self._final_ids = {}    # task ids of the final states in _pending, oldest first
        self._wake_at = math.inf  # clock() at which the thread next ticks by itself
        self._refused_since_flush = False
        self.last_refusal = None  # what the server said when it last refused an update for good
        self._seq = 0
        self._in_flight = 0
        self._flush_id = 0
        self._flush_waiters = 0
        self._version = 0       # bumps on every change, so the run record is written only then
        self._written_version = 0
        self._thread = None
        self._stopped = False

    # Public API

    def put(self, endpoint, state, *, push_every=0.0, final=False, hold_s=0.0, source=None):
        """Queue `state` (a dict with `task_id`) for `endpoint`; the latest state per task wins.

        A final state (close or error) is sent at the next tick; a later non-final state of
        the same task is ignored. `hold_s` delays a final state (see EARLY_CLOSE_HOLD_S).
        `source()`, called from the sender thread, returns the task's state as it is now (or
        None once it ended): each send of a non-final state reads it afresh, and while the
        task lives it is read every `push_every` (at least MIN_LIVE_READ_INTERVAL_S) and sent
        when it changed. It must be quick and must not raise into the sender.
        """
        task_id = state["task_id"]
        now = self._clock()
        not_before = math.ceil((now + hold_s) / HOLD_GRID_S) * HOLD_GRID_S if hold_s else 0.0
        entry = _Entry(endpoint, state, push_every, final, not_before, None if final else source)
        with self._lock:
            queued = self._pending.get(task_id)
            if queued is not None and queued.final and not final:
                return  # close and error are final: a late display must not reopen the bar
            self._pending[task_id] = entry
            self._version += 1
            if final:
                self._final_ids[task_id] = None
                if len(self._final_ids) > MAX_PENDING_FINALS:
                    self._drop_oldest_final()
            # Wake the thread only if this is due before it wakes anyway: while the server is
            # down, or for held closes, a wake per bar would cost a walk of the queue per bar.
            outage = self._outages.get(endpoint)
            due_at = max(not_before, now, outage.retry_at if outage is not None else 0.0)
            wake = (queued is None or final) and due_at < self._wake_at
        if queued is None or final:
            self._start()
        if wake:
            self._wake.set()

    def _drop_oldest_final(self):
        # Called with the lock held.
        task_id = next(iter(self._final_ids))
        del self._final_ids[task_id]
        self._pending.pop(task_id, None)
        self._live.pop(task_id, None)   # no heartbeat either: the server lets it go stale
        self._last_sent.pop(task_id, None)
        _warn_once("pending-finals", "progressista: more than %d final states wait for the "
                   "server; the oldest are dropped", MAX_PENDING_FINALS)

    def known_down(self, endpoint):
        """Treat `endpoint` as failing already (someone warned): no second warning for it."""
        with self._lock:
            self._outages.setdefault(endpoint, _Outage())

    def pending_final(self, task_id):
        """True while a final state of `task_id` waits to be sent."""
        with self._lock:
            entry = self._pending.get(task_id)
            return entry is not None and entry.final

    def flush(self, timeout=None):
        """Send everything queued, waiting at most `timeout` s; True if all was delivered.

        False also when an update was refused for good since the previous flush(): by the
        server (see `last_refusal`), or because JSON cannot encode it.

        Backoff and holds are ignored for one attempt per endpoint; an endpoint that fails
        during the flush is not waited for.
        """
        if timeout is None:
            timeout = _env_seconds(ENV_FLUSH_TIMEOUT, DEFAULT_FLUSH_TIMEOUT_S)
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._pending and not self._in_flight:
                return self._take_delivered()
            self._flush_id += 1
            flush_id = self._flush_id
            self._flush_waiters += 1
        try:
            self._start(force=True)
            self._wake.set()
            with self._idle:
                while self._in_flight or any(
                        not self._tried_in_flush(entry, flush_id) for entry in self._pending.values()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._idle.wait(remaining)
                return not self._pending and not self._in_flight and self._take_delivered()
        finally:
            with self._lock:
                self._flush_waiters -= 1

    def _take_delivered(self):
        # Called with the lock held. A refused update was not delivered: flush() says so once.
        refused, self._refused_since_flush = self._refused_since_flush, False
        return not refused

    def stop(self, timeout=1.0):
        """Stop the thread (tests); queued states are kept."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # The thread

    def _start(self, force=False):
        if self._thread is not None or self._stopped or not (self._autostart or force):
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="progressista-sender", daemon=True)
                self._thread.start()

    def _run(self):
        while not self._stopped:
            self._wake.clear()
            try:
                delay = self.tick()
            except Exception:
                # The one broad catch: a bug here must never kill the thread, or bars stop.
                log.debug("progressista: sender tick failed", exc_info=True)
                delay = 1.0
            if self._stopped:
                break
            self._wake.wait(delay)

    def tick(self):
        """Send what is due now; return seconds until something is next due (None: nothing)."""
        now = self._clock()
        if self._run_dir is not None:
            # Before sending: a process killed while its request is out (a pool worker whose
            # server is slow) must leave a record for `run` to end its bars from.
            self._write_run_record()
        with self._lock:
            flush_id = self._flush_id if self._flush_waiters else 0
            due = self._take_due(now, flush_id)
            if due:
                self._in_flight += 1
        if due:
            read = []
            try:
                # Outside the lock: a bar's state is read while its own thread runs on.
                due = read = self._read_live(due, now)
            finally:
                if not read:  # nothing changed (or the read failed): no delivery ends this round
                    with self._lock:
                        self._in_flight -= 1
                        self._idle.notify_all()
        if due:
            by_endpoint = collections.defaultdict(list)
            for entry in due:
                by_endpoint[entry.endpoint].append(entry)
            try:
                for endpoint, entries in by_endpoint.items():
                    self._deliver(endpoint, entries, now, flush_id)
            finally:
                with self._lock:
                    self._version += 1
                # Recorded before a flush() can return: `run` must never read a stale record.
                if self._run_dir is not None:
                    self._write_run_record()
                with self._lock:
                    self._in_flight -= 1
                    self._idle.notify_all()
        with self._lock:
            now = self._clock()  # again: the delivery took time
            delay = self._next_due(now)
            self._wake_at = math.inf if delay is None else now + delay
            return delay

    def _take_due(self, now, flush_id):
        due = []
        for task_id, entry in list(self._pending.items()):
            if self._may_send(entry, task_id, now, flush_id):
                due.append(self._pending.pop(task_id))
                self._final_ids.pop(task_id, None)
        due_ids = {entry.state["task_id"] for entry in due}
        for task_id, entry in self._live.items():
            if task_id in self._pending or task_id in due_ids:
                continue
            if not self._endpoint_ready(entry.endpoint, now, flush_id):
                continue
            heartbeat = now - self._last_sent.get(task_id, -math.inf) >= self.heartbeat_s
            if heartbeat or (entry.source is not None and
                             now - entry.read_at >= entry.read_every(len(self._live))):
                due.append(_Entry(entry.endpoint, entry.state, entry.push_every,
                                  source=entry.source, heartbeat=heartbeat, polled=True))
        return due

    def _read_live(self, due, now):
        """Give each due non-final entry its task's live state; drop the unchanged live reads.

        A heartbeat is sent changed or not (a restarted server learns the bar back).
        """
        kept = []
        for entry in due:
            live = None
            if entry.source is not None:
                try:
                    live = entry.source()
                except Exception:  # one bar's odd attribute must not stop the others
                    log.debug("progressista: reading a live bar failed", exc_info=True)
                entry.read_at = now
            with self._lock:
                delivered = self._live.get(entry.state["task_id"])
                if delivered is not None:
                    delivered.read_at = now
            if live is not None:
                news = delivered is None or _progress_of(live) != _progress_of(delivered.state)
                if news or entry.heartbeat or not entry.polled:
                    entry.state = live
                    kept.append(entry)
            elif entry.heartbeat:
                entry.state = self._refreshed(entry.state)
                kept.append(entry)
            elif not entry.polled:
                kept.append(entry)  # as it was put: the bar ended (its final follows) or cannot be read
        return kept

    def _endpoint_ready(self, endpoint, now, flush_id):
        outage = self._outages.get(endpoint)
        if outage is None or now >= outage.retry_at:
            return True
        return bool(flush_id) and outage.flush_id < flush_id

    def _may_send(self, entry, task_id, now, flush_id):
        if not self._endpoint_ready(entry.endpoint, now, flush_id):
            return False
        if flush_id:
            return True
        if entry.not_before and now < entry.not_before:
            return False
        return entry.final or now - self._last_sent.get(task_id, -math.inf) >= entry.push_every

    def _tried_in_flush(self, entry, flush_id):
        outage = self._outages.get(entry.endpoint)
        return outage is not None and outage.flush_id >= flush_id

    def _next_due(self, now):
        times = []
        for task_id, entry in self._pending.items():
            at = self._last_sent.get(task_id, -math.inf) + (0 if entry.final else entry.push_every)
            at = max(at, entry.not_before)
            outage = self._outages.get(entry.endpoint)
            if outage is not None:
                at = max(at, outage.retry_at)
            times.append(at)
        for task_id, entry in self._live.items():
            at = self._last_sent.get(task_id, now) + self.heartbeat_s
            if entry.source is not None:
                at = min(at, entry.read_at + entry.read_every(len(self._live)))
            outage = self._outages.get(entry.endpoint)
            times.append(max(at, outage.retry_at) if outage is not None else at)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _refreshed(self, state):
        # A heartbeat re-sends the full state (a restarted server learns the bar back), as a
        # new update: fresh timestamp, elapsed moved on by the wall time since it was made.
        wall_now = self._wall_clock()
        state = dict(state)
        if isinstance(state.get("elapsed"), (int, float)) and "timestamp" in state:
            state["elapsed"] = max(0.0, state["elapsed"] + wall_now - state["timestamp"])
        state["timestamp"] = wall_now
        return state

    def _next_seq(self):
        self._seq = max(self._seq + 1, _time_seq(self._wall_clock))
        return self._seq

    # Delivery

    def _deliver(self, endpoint, entries, now, flush_id):
        encoded, unencodable = [], []
        for entry in entries:
            entry.state = dict(entry.state, seq=self._next_seq())
            try:
                entry.text = json.dumps(entry.state)
            except _JSON_ERRORS as error:
                # A value of the caller's (a datetime, a numpy int): only this state is lost.
                unencodable.append(entry)
                _warn_once("unencodable", "progressista: an update of task %r cannot be encoded "
                           "as JSON (%s); such updates are dropped", entry.state["task_id"], error)
            else:
                encoded.append(entry)
        delivered, retry, refused = [], [], unencodable
        batches = list(_chunks(encoded))
        for index, batch in enumerate(batches):
            ok, again, never = self._post(endpoint, batch)
            delivered += ok
            refused += never
            if again:
                # The server is failing: keep this batch and the rest for the next attempt.
                retry += again + [entry for later in batches[index + 1:] for entry in later]
                break
        delivered_ids = {id(entry) for entry in delivered}
        with self._lock:
            if unencodable:
                self._refused_since_flush = True
            for entry in delivered + refused:
                task_id = entry.state["task_id"]
                self._last_sent[task_id] = now
                if entry.final:
                    self._live.pop(task_id, None)
                    self._last_sent.pop(task_id, None)
                elif id(entry) in delivered_ids:
                    self._live[task_id] = entry
            for entry in retry:
                if self._pending.setdefault(entry.state["task_id"], entry) is entry and entry.final:
                    self._final_ids[entry.state["task_id"]] = None
            if retry:
                outage = self._outages[endpoint]  # made by _warn_down()
                outage.failures += 1
                delay = min(self.backoff_initial_s * 2 ** (outage.failures - 1), self.backoff_max_s)
                outage.retry_at = now + delay
                outage.flush_id = flush_id
            elif delivered and endpoint in self._outages:
                del self._outages[endpoint]
                log.info("progressista: %s answers again; bars are being delivered", endpoint.url)

    def _post(self, endpoint, entries):
        """Send one batch; return its entries split as (delivered, to retry, refused for good)."""
        texts = [entry.text for entry in entries]
        body = (texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]").encode("utf-8")
        try:
            status, answer = self._open(endpoint.url, body, dict(endpoint.headers), endpoint.timeout)
        except Exception as error:  # any network failure, timeout, or odd answer
            reason = "%s: %s" % (type(error).__name__, error)
            if isinstance(error, ssl.SSLCertVerificationError):
                reason += "; to trust the server's certificate, set %s to its CA file" % ENV_CA_BUNDLE
            self._warn_down(endpoint, reason)
            return [], entries, []
        if 200 <= status < 300:
            return entries, [], []
        message = _server_message(answer)
        if 300 <= status < 400:
            message = ("a redirect, not followed: set the server URL to the address the "
                       "server answers at")
        if status == 429 or status >= 500:
            self._warn_down(endpoint, "HTTP %d %s" % (status, message))
            return [], entries, []
        if status in (400, 413) and len(entries) > 1:
            # A batch is all or nothing: split it, so one bad state does not sink the rest.
            half = len(entries) // 2
            first, second = self._post(endpoint, entries[:half]), self._post(endpoint, entries[half:])
            return tuple(a + b for a, b in zip(first, second))
        reason = "HTTP %d %s" % (status, message)
        with self._lock:
            self._refused_since_flush = True
            self.last_refusal = "%s refused an update (%s)" % (endpoint.url, reason.strip())
        _warn_once(("refused", endpoint.url, status),
                   "progressista: %s refused an update (%s); such updates are dropped",
                   endpoint.url, reason)
        return [], [], entries

    def _warn_down(self, endpoint, reason):
        with self._lock:
            first = endpoint not in self._outages
            if first:
                self._outages[endpoint] = _Outage()
        if first:
            log.warning("progressista: cannot deliver to %s (%s); bars go on locally and are "
                        "retried in the background", endpoint.url, reason)

    # The record `progressista run` reads when the program it watches is gone

    def _write_run_record(self):
        with self._lock:
            if self._version == self._written_version:
                return
            self._written_version = self._version
            record = {}
            for task_id, entry in list(self._live.items()) + list(self._pending.items()):
                seq = self._live[task_id].state.get("seq", 0) if task_id in self._live else 0
                record[task_id] = {"server_url": entry.endpoint.url,
                                   "state": dict(entry.state, seq=seq)}
                if entry.endpoint in self._outages:
                    record[task_id]["server_down"] = True  # and this process said so
        try:
            text = json.dumps(record)
        except _JSON_ERRORS:
            # A state JSON cannot encode (its delivery drops it) must not stop the record.
            text = json.dumps({task_id: r for task_id, r in record.items() if _encodable(r)})
        # One file per sender: a vendored copy of this module runs its own sender alongside.
        path = os.path.join(self._run_dir, "bars-%d-%x.json" % (os.getpid(), id(self)))
        try:
            with open(path + ".tmp", "w") as file:
                file.write(text)
            os.replace(path + ".tmp", path)
        except OSError as error:
            _warn_once("run-record", "progressista: cannot write %s: %s", path, error)


_sender = None
_sender_lock = threading.Lock()


def default_sender():
    """The process's shared Sender (a forked child gets a new one)."""
    global _sender
    sender = _sender
    if sender is None:
        with _sender_lock:
            if _sender is None:
                _sender = Sender(run_dir=os.environ.get(ENV_RUN_DIR) or None)
                _install_hooks()
                _arm_worker_exit()
            sender = _sender
    return sender


def send_update(state, *, server_url=None, token=None, headers=None, request_timeout=None,
                push_every=None):
    """Queue one task update (a dict with at least `task_id`) on the shared sender.

    Works without tqdm. A `status` of close or error makes it final. Never blocks, never
    raises: what cannot be sent is warned about once and dropped.
    """
    try:
        endpoint = make_endpoint(server_url, token, headers, request_timeout)
    except ValueError as error:  # as for bars: a bad setting is warned about, never raised
        _warn_once(("bad-url", str(error)), "progressista: %s; this update is not sent", error)
        return
    try:
        state = dict(state)
    except (TypeError, ValueError):
        state = {}
    if not isinstance(state.get("task_id"), str) or not state["task_id"]:
        _warn_once("no-task-id", "progressista: send_update() needs a dict with a task_id "
                   "(a non-empty string); this update is not sent")
        return
    if push_every is None:
        push_every = _env_seconds(ENV_PUSH_INTERVAL, DEFAULT_PUSH_INTERVAL_S)
    state.setdefault("timestamp", time.time())
    default_sender().put(endpoint, state, push_every=push_every,
                         final=state.get("status") in FINAL_STATUSES)


def flush(timeout=None):
    """Deliver what the shared sender holds, waiting at most `timeout` s (default 2)."""
    sender = _sender
    return True if sender is None else sender.flush(timeout)


# --- Bars ---

_REMOTE_OPTIONS = ("server_url", "task_id", "push_every", "request_timeout", "meta", "headers",
                   "token", "run", "run_name", "parent")
_open_bars = weakref.WeakSet()      # remote bars not yet ended, for the exception and exit hooks
# task_id -> _HeldClose of a loop left early, its close on hold. Strong references: the bar
# of `for x in tqdm(it):` is freed as an exception unwinds the loop, before the excepthook.
_held_closes = {}
_held_order = collections.deque()   # (hold end, _HeldClose), oldest first: expired ones leave in O(1)
_bars_lock = threading.Lock()
_tqdm_iter_code = None              # tqdm.std.tqdm.__iter__'s code, set when tqdm is loaded
_tqdm_del_code = None               # tqdm.std.tqdm.__del__'s code


class _RemoteBar:
    """The remote half of a remote tqdm class; use make_remote_tqdm() to build one.

    It hooks `display()`, which tqdm calls only at its own refresh cadence (miniters,
    mininterval), never `update()` or `__iter__`: the hot loop costs what tqdm's does. What
    is sent is the bar's live state all the same: the sender thread reads `n`, `total`,
    the description and the postfix at each push interval. (A bar driven by iteration keeps
    its count in tqdm's loop, which stores it in `n` when it redraws, at the latest at the
    first iteration after `maxinterval`.)
    """

    _remote_defaults = {}

    def __init__(self, *args, server_url=None, task_id=None, push_every=None,
                 request_timeout=None, meta=None, headers=None, token=None, run=None,
                 run_name=None, parent=None, **kwargs):
        defaults = self._remote_defaults
        for name, value in defaults.items():
            if name not in _REMOTE_OPTIONS:
                kwargs.setdefault(name, value)
        self._remote_sender = None  # tqdm's __init__ displays once; we publish after it
        super().__init__(*args, **kwargs)
        if self.disable:
            return  # a disabled bar (e.g. disable=rank != 0) is neither drawn nor sent
        try:
            self._remote_endpoint = make_endpoint(
                server_url or defaults.get("server_url"), token or defaults.get("token"),
                dict(defaults.get("headers") or {}, **(headers or {})),
                request_timeout if request_timeout is not None else defaults.get("request_timeout"))
        except ValueError as error:
            _warn_once(("bad-url", str(error)), "progressista: %s; this bar is not sent", error)
            return
        if push_every is None:
            push_every = defaults.get("push_every")
        if push_every is None:
            push_every = _env_seconds(ENV_PUSH_INTERVAL, DEFAULT_PUSH_INTERVAL_S)
        self._remote_push_every = float(push_every)
        self._remote_task_id = str(task_id)[:MAX_TASK_ID_CHARS] if task_id else _new_task_id()
        merged_meta = default_meta()  # the user's keys win
        merged_meta.update(defaults.get("meta") or {})
        merged_meta.update(meta or {})
        self._remote_meta = _clean_meta(merged_meta)
        self._remote_thread = threading.get_ident()
        self._remote_order = next(_bar_order)
        self._remote_run = _clip_id(_first(run, defaults.get("run"), _current_run), MAX_RUN_CHARS)
        self._remote_run_name = _clip(_first(run_name, defaults.get("run_name"),
                                             lambda: os.environ.get(ENV_RUN_NAME)) or None,
                                      MAX_RUN_NAME_CHARS)
        parent = _first(parent, defaults.get("parent"), self._remote_enclosing_bar)
        self._remote_parent = _clip_id(getattr(parent, "task_id", parent), MAX_TASK_ID_CHARS)
        self._remote_error = None
        self._remote_source = _live_reader(weakref.ref(self))
        self._remote_sender = default_sender()
        with _bars_lock:
            _open_bars.add(self)
        if self.delay <= 0:
            self._remote_publish()

    def _remote_enclosing_bar(self):
        """The innermost bar of this thread still open: the loop this bar's loop is nested in."""
        with _bars_lock:
            mine = [bar for bar in _open_bars if bar._remote_thread == self._remote_thread]
        return max(mine, key=lambda bar: bar._remote_order, default=None)

    @property
    def task_id(self):
        """The id this bar has on the server (None if it is not sent)."""
        return getattr(self, "_remote_task_id", None)

    def display(self, *args, **kwargs):
        if self._remote_sender is not None and not self.disable:
            self._remote_publish()
        return super().display(*args, **kwargs)

    def __exit__(self, exc_type, exc_value, tb):
        if exc_type is not None and not _is_clean_exit(exc_value):
            error = describe_exception(exc_type, exc_value, tb)
            if getattr(self, "_remote_sender", None) is not None:
                self._remote_error = error
            else:  # a loop over this bar already closed it, on hold
                with _bars_lock:
                    held = _held_closes.pop(getattr(self, "_remote_task_id", None), None)
                if held is not None:
                    _fail_held(held, error)
        return super().__exit__(exc_type, exc_value, tb)

    def close(self):
        sender = getattr(self, "_remote_sender", None)
        if sender is None:
            if sys._getframe(1).f_code is not _tqdm_del_code:
                # An explicit close() or a clean `with` exit after a loop left early: the
                # bar is known to be finished, so its close need not wait for an exception.
                _release_held(getattr(self, "_remote_task_id", None))
            return super().close()
        error, hold_s = self._remote_error, 0.0
        caller = sys._getframe(1)
        if error is None and caller.f_code is _tqdm_iter_code:
            # Closed by tqdm's own loop: tell an exception from the iterable apart from the
            # normal end. GeneratorExit means the loop was left early: by break or return, or
            # by an exception (which something may catch later, a future.result(), so the
            # excepthook may never see it). Hold the close either way, so that an excepthook
            # can still name the exception.
            exc = sys.exc_info()[1]
            if exc is not None and _raised_through(exc, caller):
                if isinstance(exc, GeneratorExit):
                    hold_s = EARLY_CLOSE_HOLD_S
                    error = _why_loop_was_left(caller.f_back)
                else:
                    error = describe_exception(type(exc), exc, exc.__traceback__)
        try:
            return super().close()
        finally:
            # Never waits, not even in a pool worker: _arm_worker_exit() delivers at its exit.
            self._remote_end("error" if error else "close", error, hold_s)

    # Remote side

    def _remote_fields(self):
        # What format_dict gives, read from the attributes: this also runs on the sender
        # thread, and format_dict would resize the bar there (dynamic_ncols).
        ema_dt = self._ema_dt()
        return {
            "n": self.n, "total": self.total,
            "elapsed": self._time() - self.start_t if hasattr(self, "start_t") else 0,
            "prefix": self.desc, "unit": self.unit, "unit_scale": self.unit_scale,
            "rate": self._ema_dn() / ema_dt if ema_dt else None, "postfix": self.postfix,
            "unit_divisor": self.unit_divisor, "initial": self.initial}

    def _remote_leaves(self):
        # tqdm's own rule (close()): leave=None keeps only the bar at position 0.
        leave = getattr(self, "leave", True)
        return abs(getattr(self, "pos", 0) or 0) == 0 if leave is None else bool(leave)

    def _remote_live(self):
        """The state as it is now, for the sender thread; None once the bar has ended."""
        if self._remote_sender is None or self.disable:
            return None
        return self._remote_state()

    def _remote_state(self, status="running", error=None):
        fd = self._remote_fields()
        n = _finite(fd.get("n"), 0, minimum=0)
        elapsed = _finite(fd.get("elapsed"), 0.0, minimum=0.0)
        rate = _finite(fd.get("rate"), minimum=0.0)
        if rate is None and elapsed > 0:
            rate = max(0.0, (n - _finite(fd.get("initial"), 0)) / elapsed)
        desc = fd.get("prefix") or None
        if desc and desc.endswith(": "):
            desc = desc[:-2]  # set_description() appends ": " for display only
        unit_scale = fd.get("unit_scale")
        state = {
            "task_id": self._remote_task_id,
            "desc": _clip(desc, MAX_DESC_CHARS),
            "n": n,
            "total": _finite(fd.get("total"), minimum=0),
            "unit": _clip(fd.get("unit") or "it", MAX_UNIT_CHARS),
            "unit_scale": unit_scale if isinstance(unit_scale, (bool, int, float)) else bool(unit_scale),
            "unit_divisor": _finite(fd.get("unit_divisor"), 1000),
            "rate": rate,
            "elapsed": elapsed,
            "postfix": _clip(fd.get("postfix") or None, MAX_POSTFIX_CHARS),
            "status": status,
            "meta": self._remote_meta,
            "timestamp": time.time(),
        }
        if self._remote_run:
            state["run"] = self._remote_run
        if self._remote_run_name:
            state["run_name"] = self._remote_run_name
        if self._remote_parent:
            state["parent"] = self._remote_parent
        if error is not None:
            state["error"] = _clip(error, MAX_ERROR_CHARS)
        return state

    def _remote_publish(self):
        try:
            self._remote_sender.put(self._remote_endpoint, self._remote_state(),
                                    push_every=self._remote_push_every, source=self._remote_source)
        except Exception:  # never let reporting break the user's loop
            _warn_once("publish", "progressista: could not queue a bar update")
            log.debug("progressista: publish failed", exc_info=True)

    def _remote_end(self, status, error=None, hold_s=0.0):
        """Hand this bar's final state to the sender; the bar is not sent again."""
        sender = self._remote_sender
        if sender is None:
            return
        self._remote_sender = None
        with _bars_lock:
            _open_bars.discard(self)
        try:
            state = self._remote_state(status, error)
            if status == "close" and not self._remote_leaves():
                state["transient"] = True  # leave=False: the page may fold it away
            sender.put(self._remote_endpoint, state, final=True, hold_s=hold_s)
            if hold_s:
                _hold_close(_HeldClose(sender, self._remote_endpoint, state, self._remote_thread))
        except Exception:
            log.debug("progressista: could not queue a final state", exc_info=True)


_bar_order = itertools.count()  # the order bars were opened in, to find the innermost open one


def _first(*choices):
    """The first choice that is not None; a callable is called only when it is reached."""
    for choice in choices:
        if callable(choice):
            choice = choice()
        if choice is not None:
            return choice
    return None


def _clip_id(value, limit):
    # run and parent: 1 to `limit` characters; "" (or False) means none.
    return str(value)[:limit] if value else None


def _live_reader(bar_ref):
    # Weak: a queued state must not keep a dropped bar alive (its __del__ closes it).
    def read():
        bar = bar_ref()
        return None if bar is None else bar._remote_live()
    return read


_id_prefix = None
_id_count = itertools.count(1)


def _new_task_id():
    # A random prefix per process and a counter: unique like uuid4() per bar, without
    # reading os.urandom for each of many short bars.
    global _id_prefix
    if _id_prefix is None:
        _id_prefix = uuid.uuid4().hex[:20]
    return "%s%012x" % (_id_prefix, next(_id_count))


_HeldClose = collections.namedtuple("_HeldClose", "sender endpoint state thread")


def _hold_close(held):
    now = time.monotonic()
    with _bars_lock:
        while _held_order and _held_order[0][0] <= now:  # the hold is over
            old = _held_order.popleft()[1]
            if _held_closes.get(old.state["task_id"]) is old:
                del _held_closes[old.state["task_id"]]
        _held_closes[held.state["task_id"]] = held
        _held_order.append((now + EARLY_CLOSE_HOLD_S + HOLD_GRID_S, held))


def _release_held(task_id):
    """Send a close on hold now."""
    with _bars_lock:
        held = _held_closes.pop(task_id, None)
    if held is not None and held.sender.pending_final(task_id):
        held.sender.put(held.endpoint, held.state, final=True)


def _fail_held(held, error):
    """Turn a close still on hold into `error` (if it was not sent already)."""
    if not held.sender.pending_final(held.state["task_id"]):
        return
    error_state = dict(held.state, status="error", error=_clip(error, MAX_ERROR_CHARS))
    held.sender.put(held.endpoint, error_state, final=True)


# What a frame is doing when it lets go of a loop's iterator on its normal path: break and
# return (POP_TOP, POP_ITER, SWAP), the end of an outer loop (FOR_ITER, END_FOR), an outer
# generator closed early (YIELD_VALUE, RESUME, SEND, CLEANUP_THROW), a name rebound or
# deleted (STORE_*, DELETE_*). Anything else (a CALL, RAISE_VARARGS, BINARY_OP...) is the
# instruction that raised while the exception unwinds the frame. Looked up in the frame's
# bytecode because the exception itself is out of reach: CPython sets it aside while it
# closes the generator.
_RELEASE_OPNAMES = frozenset((
    "POP_TOP", "POP_ITER", "SWAP", "ROT_TWO", "FOR_ITER", "END_FOR", "YIELD_VALUE", "RESUME",
    "SEND", "CLEANUP_THROW", "RETURN_VALUE", "RETURN_CONST", "POP_BLOCK", "POP_EXCEPT",
    "END_ASYNC_FOR", "NOP", "JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_ABSOLUTE"))
_code_bytes = {}    # code object -> its bytecode (co_code is a fresh copy on each access)
CODE_CACHE_ENTRIES = 256   # code objects whose bytecode _unwinding() keeps


def _unwinding(frame):
    """True when `frame` let go of an iterator while an exception unwinds it."""
    code = frame.f_code
    co_code = _code_bytes.get(code)
    if co_code is None:
        if len(_code_bytes) >= CODE_CACHE_ENTRIES:
            _code_bytes.clear()
        co_code = _code_bytes[code] = code.co_code
    if frame.f_lasti < 0:
        return False  # not started
    try:
        name = opcode.opname[co_code[frame.f_lasti]]
    except (IndexError, TypeError):
        return False
    return not (name in _RELEASE_OPNAMES or name.startswith(("STORE_", "DELETE_")))


def _where(frame):
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    line = linecache.getline(filename, lineno).strip()
    return "%s:%s%s" % (os.path.basename(filename), lineno, (": " + line) if line else "")


def _why_loop_was_left(frame):
    """None for a loop left by break or return (or sys.exit(0)); else what left it, in words."""
    try:
        return _reason_loop_was_left(frame)
    except Exception:  # it runs inside tqdm's loop: it must never raise into the program
        log.debug("progressista: could not tell how a loop was left", exc_info=True)
        return None


def _reason_loop_was_left(frame):
    if frame is None or not _unwinding(frame):
        return None
    exited = _exits.get(threading.get_ident())
    if exited is not None and (id(frame), frame.f_lasti) in exited[1]:
        if _is_clean_exit(exited[0]):
            return None
        return "sys.exit(%r) at %s" % (exited[0].code, _where(frame))
    return "the loop was left by an exception at %s" % _where(frame)


# thread ident -> (SystemExit, {(id(frame), f_lasti) of each frame that was calling},
# monotonic time), for the last sys.exit() of each thread: a loop left by it knows its exit
# status, and so do the bars still open when the process ends (_at_exit).
_exits = {}
# A sys.exit() of the main thread this recent when the process ends is taken to be what
# ends it (Python does not tell atexit the exit status); an older one was caught.
EXIT_RECENT_S = 5.0


class _RecordingExit:
    """sys.exit (and the builtins exit, quit), noting the exit status where it was raised."""

    def __init__(self, exit_function):
        self._exit = exit_function

    def __repr__(self):
        return repr(self._exit)

    def __call__(self, *args, **kwargs):
        try:
            return self._exit(*args, **kwargs)
        except SystemExit as exc:
            calling, frame = set(), sys._getframe(1)
            while frame is not None:
                calling.add((id(frame), frame.f_lasti))
                frame = frame.f_back
            _exits[threading.get_ident()] = (exc, calling, time.monotonic())
            raise


def _record_exits():
    import builtins
    if not isinstance(sys.exit, _RecordingExit):
        sys.exit = _RecordingExit(sys.exit)
    for name in ("exit", "quit"):
        function = getattr(builtins, name, None)
        # Only site's own: IPython's exit works by its type (typed without parentheses).
        if type(function).__name__ == "Quitter":
            setattr(builtins, name, _RecordingExit(function))


def _is_clean_exit(exc):
    return isinstance(exc, GeneratorExit) or (
        isinstance(exc, SystemExit) and exc.code in (None, 0))


def _raised_through(exc, frame):
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame is frame:
            return True
        tb = tb.tb_next
    return False


def _in_worker_process():
    multiprocessing = sys.modules.get("multiprocessing")
    return multiprocessing is not None and multiprocessing.parent_process() is not None


_remote_classes = {}


def make_remote_tqdm(base_class, **defaults):
    """Return the remote variant of a tqdm class (tqdm.notebook.tqdm, tqdm.asyncio.tqdm, ...).

    It keeps the base class's own display. `defaults` are default keyword arguments for
    every bar: the remote options (server_url, token, meta, ...) or any of tqdm's.
    """
    if not (isinstance(base_class, type) and issubclass(base_class, _tqdm_base())):
        raise TypeError("make_remote_tqdm: %r is not a tqdm class" % (base_class,))
    if issubclass(base_class, _RemoteBar):
        if not defaults:
            return base_class
        defaults = dict(base_class._remote_defaults, **defaults)
    key = (base_class, json.dumps(defaults, sort_keys=True, default=repr))
    cls = _remote_classes.get(key)
    if cls is None:
        name = base_class.__name__ if issubclass(base_class, _RemoteBar) else \
            "Remote" + base_class.__name__
        bases = (base_class,) if issubclass(base_class, _RemoteBar) else (_RemoteBar, base_class)
        cls = type(name, bases, {
            "_remote_defaults": dict(defaults), "__module__": __name__,
            "__doc__": (base_class.__doc__ or "") + "\n\nRemote variant: see progressista_client."})
        _remote_classes[key] = cls
    return cls


def _make_range(bar_class, name):
    def remote_range(*args, **kwargs):
        return bar_class(range(*args), **kwargs)
    remote_range.__name__ = remote_range.__qualname__ = name
    remote_range.__doc__ = "Shortcut for %s(range(*args), **kwargs)." % bar_class.__name__
    return remote_range


# --- How a program ends: uncaught exceptions, exit, fork ---

_hooks_installed = False
_previous_excepthook = None
_previous_threading_excepthook = None


def _install_hooks():
    global _hooks_installed, _previous_excepthook, _previous_threading_excepthook
    if _hooks_installed:
        return
    _hooks_installed = True
    _previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    _previous_threading_excepthook = threading.excepthook
    threading.excepthook = _threading_excepthook
    atexit.register(_at_exit)
    _record_exits()
    if not _watched_by_run():  # under `run`, `run` ends the bars knowing the signal
        _end_bars_on_signals()


def end_bars_with_error(error, thread_ident=None):
    """End the open bars (of one thread, or all) as `error`, and early-closed ones on hold."""
    with _bars_lock:
        bars = list(_open_bars)
        held = [h for h in _held_closes.values() if thread_ident is None or h.thread == thread_ident]
        for h in held:
            del _held_closes[h.state["task_id"]]
    for bar in bars:
        if thread_ident is None or bar._remote_thread == thread_ident:
            bar._remote_end("error", error)
    for h in held:
        _fail_held(h, error)


def _excepthook(exc_type, exc, tb):
    try:
        if not issubclass(exc_type, SystemExit):
            end_bars_with_error(describe_exception(exc_type, exc, tb))
    except Exception:
        pass  # reporting must never hide the program's own traceback
    (_previous_excepthook or sys.__excepthook__)(exc_type, exc, tb)


def _threading_excepthook(args):
    try:
        if args.exc_type is not SystemExit and args.thread is not None:
            end_bars_with_error(describe_exception(args.exc_type, args.exc_value, args.exc_traceback),
                                thread_ident=args.thread.ident)
    except Exception:
        pass
    (_previous_threading_excepthook or threading.__excepthook__)(args)


def _watched_by_run():
    """True in the program `run` started (not in its children): `run` ends its open bars."""
    return bool(os.environ.get(ENV_RUN_DIR)) and os.environ.get(ENV_RUN_PID) == str(os.getppid())


def _at_exit():
    sender = _sender
    if sender is None:
        return
    with _bars_lock:
        bars = list(_open_bars)
    watched = _watched_by_run()
    failure = None if watched else _exit_failure()
    for bar in bars:
        if watched:
            # `run` ends these from the record, knowing the exit code or signal: record where
            # each bar stands now, not its last display (updates within mininterval of it).
            bar._remote_publish()
        elif failure is not None:
            bar._remote_end("error", failure)  # the program ended with a failing status
        else:
            # A bar the program never closed ends where it stands.
            bar._remote_end("close")
    sender.flush()


def _exit_failure():
    """'the program exited with sys.exit(3)' when a failing sys.exit() of the main thread
    is what ends the process (as far as can be told), else None."""
    exited = _exits.get(threading.main_thread().ident)
    if exited is None or time.monotonic() - exited[2] > EXIT_RECENT_S:
        return None
    if _is_clean_exit(exited[0]):
        return None
    return "the program exited with sys.exit(%r)" % (exited[0].code,)


def _arm_worker_exit():
    """In a multiprocessing child, deliver the pending states before the process ends.

    Such a process leaves through os._exit (no atexit), and a pool ends its workers as soon
    as their tasks are done: recycled (maxtasksperchild) or closed, they exit normally and
    run multiprocessing's finalizers; terminated (terminate(), `with Pool()`), they get
    SIGTERM. Either way the wait is bounded by the flush timeout, as at any exit.
    """
    if not _in_worker_process():
        return
    import multiprocessing.util
    multiprocessing.util.Finalize(None, _at_exit, exitpriority=100)
    # Its open bars end "killed by SIGTERM" as a program's do (a fork child may inherit
    # that handler already; one under `run` does not, its parent being watched).
    _end_bars_on_signals()


def _flush():
    sender = _sender
    if sender is not None:
        sender.flush()


def _then_die(signum, work):
    """Run `work` (deliver what is pending), bounded by the flush timeout, then die by
    `signum` as its default action would have. The work runs in another thread: the
    signal may have stopped this one inside a lock, and then the join's bound is what
    ends the wait."""
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(_env_seconds(ENV_FLUSH_TIMEOUT, DEFAULT_FLUSH_TIMEOUT_S) + 0.1)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# Signals whose default action ends the process: a scheduler's SIGTERM (scancel, a pod
# eviction), SIGHUP from a closed terminal or ssh session.
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _end_bars_on_signals():
    """Where the program left SIGTERM and SIGHUP at their default (death), end its open bars
    as `error` naming the signal before dying by it. A handler of the program's own is left
    alone, and so is a process that is not its main thread here (Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _ENDING_SIGNALS:
        try:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _end_bars_then_die)
        except (ValueError, OSError):
            pass


def _end_bars_then_die(signum, frame):
    def end_and_flush():
        end_bars_with_error("killed by %s" % signal.Signals(signum).name)
        _flush()
    _then_die(signum, end_and_flush)


def _after_fork_in_child():
    # The child gets its own sender thread; bars inherited from the parent stay the
    # parent's (same task ids), so the child neither sends nor ends them.
    global _sender, _sender_lock, _bars_lock, _open_bars, _held_closes, _held_order, _id_prefix
    _id_prefix = None  # a child must not make the task ids its parent makes
    _transport.forget()
    _sender = None
    _sender_lock = threading.Lock()
    _bars_lock = threading.Lock()
    for bar in list(_open_bars):
        bar._remote_sender = None
    _open_bars = weakref.WeakSet()
    _held_closes = {}
    _held_order = collections.deque()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- patch() and unpatch() ---

_PATCHED_MODULES = ("tqdm", "tqdm.std", "tqdm.asyncio", "tqdm.autonotebook", "tqdm.auto",
                    "tqdm.notebook", "tqdm.rich", "tqdm.gui")
_IMPORTED_BY_PATCH = ("tqdm.std", "tqdm.asyncio", "tqdm.autonotebook", "tqdm.auto", "tqdm.notebook")
# Each range shortcut, and the class name it wraps in the same module.
_RANGE_FUNCTIONS = {"trange": "tqdm", "tarange": "tqdm_asyncio", "tnrange": "tqdm_notebook",
                    "trrange": "tqdm_rich", "tgrange": "tqdm_gui"}
_patched = []       # (namespace dict, name, original value), in the order they were replaced


def patch(**defaults):
    """Make every tqdm bar the program creates remote, each keeping its own display.

    Replaces the classes and range shortcuts of tqdm, tqdm.std, tqdm.auto, tqdm.autonotebook,
    tqdm.notebook and tqdm.asyncio (and tqdm.rich, tqdm.gui if imported), the names other
    modules already imported from them, and the default `tqdm_class` of tqdm.contrib
    helpers. `defaults` are as for make_remote_tqdm().
    """
    unpatch()
    base = _tqdm_base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _IMPORTED_BY_PATCH:
            try:
                importlib.import_module(name)
            except Exception:
                pass  # a tqdm without that module, or one whose optional deps fail
    remote_by_original = {}

    def remote(cls):
        if cls not in remote_by_original:
            remote_by_original[cls] = make_remote_tqdm(cls, **defaults)
        return remote_by_original[cls]

    def replace(namespace, name, value):
        _patched.append((namespace, name, namespace[name]))
        namespace[name] = value

    def replace_defaults(function, by_id):
        # tqdm.contrib's helpers (tenumerate, thread_map, ...) take `tqdm_class=tqdm_auto`
        # as a default argument, bound when they were imported.
        positional, keyword = function.__defaults__ or (), function.__kwdefaults__ or {}
        if any(id(v) in by_id for v in positional):
            _patched.append((function, "__defaults__", function.__defaults__))
            function.__defaults__ = tuple(by_id.get(id(v), v) for v in positional)
        if any(id(v) in by_id for v in keyword.values()):
            _patched.append((function, "__kwdefaults__", function.__kwdefaults__))
            function.__kwdefaults__ = {k: by_id.get(id(v), v) for k, v in keyword.items()}

    for module_name in _PATCHED_MODULES:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        namespace = vars(module)
        originals = dict(namespace)
        for name, value in originals.items():
            # By attribute, not by class: a remote class of another copy of this module
            # (vendored, patching on top of `run`) is not wrapped again.
            if isinstance(value, type) and issubclass(value, base) \
                    and not hasattr(value, "_remote_defaults"):
                replace(namespace, name, remote(value))
        for name, class_name in _RANGE_FUNCTIONS.items():
            cls = originals.get(class_name)
            if callable(originals.get(name)) and isinstance(cls, type) and issubclass(cls, base) \
                    and not hasattr(cls, "_remote_defaults"):
                replace(namespace, name, _make_range(remote(cls), name))
    # Modules that did `from tqdm import tqdm` before patch() hold the original class.
    by_id = {id(cls): remote_cls for cls, remote_cls in remote_by_original.items()}
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if module_name in _PATCHED_MODULES or module_name == __name__ or not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if id(value) in by_id and isinstance(value, type):
                replace(namespace, name, by_id[id(value)])
            elif isinstance(value, types.FunctionType) and module_name.startswith("tqdm.") \
                    and value.__module__ == module_name:
                replace_defaults(value, by_id)


def unpatch():
    """Undo patch(): every replaced name and default argument gets its original object back."""
    while _patched:
        target, name, original = _patched.pop()
        if isinstance(target, dict):
            target[name] = original
        else:
            setattr(target, name, original)


def _import_tqdm_std():
    try:
        import tqdm.std
    except ImportError as error:
        raise ImportError("progressista_client needs the tqdm package for its bars "
                          "(pip install tqdm); send_update() works without it") from error
    return tqdm.std


_original_tqdm = None


def _tqdm_base():
    """tqdm.std.tqdm as tqdm defines it, even while patch() has replaced the name."""
    global _original_tqdm, _tqdm_iter_code, _tqdm_del_code
    if _original_tqdm is None:
        # By attribute, not by class: a vendored copy of this module, imported after `run`
        # patched tqdm, must skip the other copy's remote class too.
        cls = next(c for c in _import_tqdm_std().tqdm.__mro__ if not hasattr(c, "_remote_defaults"))
        _original_tqdm = cls
        _tqdm_iter_code = cls.__iter__.__code__
        _tqdm_del_code = cls.__del__.__code__
    return _original_tqdm


class _PatchTqdmOnImport:
    """Meta path finder for `run`: patch tqdm when, and only if, the program imports it."""

    def __init__(self, defaults):
        self.defaults = defaults

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tqdm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("tqdm")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader, self.defaults)
        return spec


class _PatchingLoader:
    def __init__(self, loader, defaults):
        self.loader = loader
        self.defaults = defaults

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            patch(**self.defaults)
        except Exception as error:
            sys.stderr.write("progressista: could not patch tqdm: %s\n" % error)


def _run_defaults():
    """The bar defaults `run` was given (--unit, --meta, --headers); {} outside `run`."""
    try:
        defaults = json.loads(os.environ.get(ENV_PATCH) or "{}")
    except ValueError:
        return {}
    return defaults if isinstance(defaults, dict) else {}


def install_run_hook():
    """Used by `run` at the start of each Python process: patch tqdm when it is imported."""
    defaults = _run_defaults()
    if "tqdm" in sys.modules:
        patch(**defaults)
    elif not any(isinstance(finder, _PatchTqdmOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchTqdmOnImport(defaults))


# --- demo and run ---

DEMO_INNER_STEPS = 5  # batches of each demo bar's nested inner bar, per step


def demo(bars=3, total=50, delay=0.05, server_url=None, token=None):
    """Send `bars` fake bars of one run to the server, each with a nested inner bar, moving
    to `total` and closing; return an exit status."""
    try:
        endpoint = make_endpoint(server_url, token)
    except ValueError as error:
        sys.stderr.write("progressista demo: %s\n" % error)
        return 1
    sender = default_sender()
    started = time.time()
    meta = _clean_meta(dict(default_meta(), demo=True))
    run = "demo-" + uuid.uuid4().hex[:8]
    task_ids = ["%s-%d" % (run, index + 1) for index in range(bars)]
    units = ("it", "B", "img")
    for step in range(total + 1):
        final = step == total
        for sub_step in range(1 if final else DEMO_INNER_STEPS):
            elapsed = time.time() - started
            for index, task_id in enumerate(task_ids):
                common = {"unit_scale": False, "elapsed": elapsed, "meta": meta, "run": run,
                          "run_name": "progressista demo", "timestamp": time.time(),
                          "status": "close" if final else "running"}
                if sub_step == 0:
                    # Each bar has its own pace curve; all reach `total` at the last step.
                    n = int(total * (step / total) ** (index + 1)) if total else 0
                    sender.put(endpoint, dict(
                        common, task_id=task_id, desc="demo bar %d" % (index + 1), n=n,
                        total=total, unit=units[index % len(units)],
                        rate=n / elapsed if elapsed > 0 else None), push_every=0.1,
                        final=final)
                # Its inner loop, nested under it (as tqdm's nested bars are): a pass of
                # DEMO_INNER_STEPS batches per step, reset at each step.
                inner = DEMO_INNER_STEPS if final else sub_step + 1
                sender.put(endpoint, dict(
                    common, task_id=task_id + ".batches", desc="batches", n=inner,
                    total=DEMO_INNER_STEPS, unit="batch", parent=task_id,
                    rate=None), push_every=0.1, final=final)
            if not final:
                time.sleep(delay / DEMO_INNER_STEPS)
    timeout = max(_env_seconds(ENV_FLUSH_TIMEOUT, DEFAULT_FLUSH_TIMEOUT_S), endpoint.timeout + 1)
    if sender.flush(timeout):
        print("progressista demo: sent %d bar%s to %s" % (bars, "" if bars == 1 else "s", endpoint.url))
        return 0
    if sender.last_refusal:  # reached, but refused: a wrong token or URL, not a server that is down
        sys.stderr.write("progressista demo: %s; check --server-url and --api-token\n"
                         % sender.last_refusal)
    else:
        sys.stderr.write("progressista demo: could not deliver to %s; is the server running?\n"
                         % endpoint.url)
    return 1


_SITECUSTOMIZE = '''\
# Written by progressista run: patches tqdm in every Python process of the watched program.
import os as _os, sys as _sys


def _progressista_start():
    import importlib.util
    module = _sys.modules.get("progressista_client")
    if module is None:
        spec = importlib.util.spec_from_file_location(
            "progressista_client", _os.environ["PROGRESSISTA_CLIENT_PATH"])
        module = importlib.util.module_from_spec(spec)
        _sys.modules["progressista_client"] = module
        spec.loader.exec_module(module)
    module.install_run_hook()


def _progressista_chain():
    # Then run the sitecustomize this one shadows, if there is one.
    import importlib
    here = _os.path.dirname(_os.path.abspath(__file__))
    saved = list(_sys.path)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != here]
    mine = _sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        if mine is not None:
            _sys.modules["sitecustomize"] = mine
    finally:
        _sys.path[:] = saved


try:
    _progressista_start()
except Exception as _error:
    _sys.stderr.write("progressista: could not watch tqdm bars: %s\\n" % (_error,))
_progressista_chain()
'''


def _reason_for(returncode):
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal %d" % -returncode
        return "was killed by %s" % name
    return "exited with code %d" % returncode


def run_program(target, args, module=False, server_url=None, token=None, push_every=None,
                request_timeout=None, unit=None, meta=None, headers=None):
    """Run a Python program with tqdm patched and watch it; return its exit code (128+N on signal N).

    Bars still open when it ends are ended: `error` naming the signal or exit code, or
    `close` after a clean exit. Its child Python processes are patched too; their bars
    left open by a process that died without exiting (SIGKILL) end as `error`.
    """
    defaults = {key: value for key, value in (("unit", unit), ("meta", meta), ("headers", headers))
                if value is not None}
    _remove_abandoned_run_dirs()
    run_dir = tempfile.mkdtemp(prefix="%s%d-" % (RUN_DIR_PREFIX, os.getpid()))
    try:
        with open(os.path.join(run_dir, "sitecustomize.py"), "w") as file:
            file.write(_SITECUSTOMIZE)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (run_dir, env.get("PYTHONPATH")) if p)
        env[ENV_RUN_DIR] = run_dir
        env[ENV_PATCH] = json.dumps(defaults)
        env[ENV_CLIENT_PATH] = os.path.abspath(__file__)
        env[ENV_RUN_PID] = str(os.getpid())
        for name, value in ((ENV_SERVER_URL, server_url), (ENV_API_TOKEN, token),
                            (ENV_PUSH_INTERVAL, push_every), (ENV_REQUEST_TIMEOUT, request_timeout)):
            if value is not None:
                env[name] = str(value)
        command = [sys.executable] + (["-m", target] if module else [target]) + list(args)
        # One run for the program, its children and `run`'s own ending of their bars; named
        # after the command line unless the caller named it.
        env[ENV_RUN] = run_from_environment(env) or _process_run
        if not env.get(ENV_RUN_NAME, "").strip():
            import shlex
            env[ENV_RUN_NAME] = _clip(" ".join(shlex.quote(part) for part in command[1:]),
                                      MAX_RUN_NAME_CHARS)
        program_pid, returncode = _run_watched(command, env, run_dir)
        _end_leftover_bars(run_dir, program_pid, returncode, server_url, token, headers,
                           request_timeout)
    finally:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
    return 128 - returncode if returncode < 0 else returncode


RUN_DIR_PREFIX = "progressista-run-"  # then the pid of `run`, a dash, and mkdtemp's letters
PROGRAM_PID_FILE = "program.pid"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove_abandoned_run_dirs():
    """Remove the folders of earlier runs killed by SIGKILL (no chance to clean up then):
    ours, and neither that `run` nor the program it watched is alive."""
    import shutil
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        owner = name[len(RUN_DIR_PREFIX):].split("-")[0]
        if not (name.startswith(RUN_DIR_PREFIX) and owner.isdigit()):
            continue
        path = os.path.join(root, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or _alive(int(owner)):
                continue
            with open(os.path.join(path, PROGRAM_PID_FILE)) as file:
                program_pid = int(file.read() or 0)
        except FileNotFoundError:
            program_pid = 0  # killed before it started the program
        except (OSError, ValueError):
            continue
        if program_pid and _alive(program_pid):
            continue  # the program outlived its `run`, and its processes still write here
        shutil.rmtree(path, ignore_errors=True)


def _run_watched(command, env, run_dir):
    child = subprocess.Popen(command, env=env)
    try:
        with open(os.path.join(run_dir, PROGRAM_PID_FILE), "w") as file:
            file.write(str(child.pid))
    except OSError:
        pass
    forwarded = {}

    def forward(signum, frame):
        # A scheduler's SIGTERM to `run` is meant for the program: pass it on and keep watching.
        try:
            child.send_signal(signum)
        except OSError:
            pass

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                forwarded[signum] = signal.signal(signum, forward)
        # Ctrl-C reaches the program directly (same process group); `run` waits for it to end.
        forwarded[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.pid, child.wait()
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)


def _end_leftover_bars(run_dir, program_pid, returncode, server_url, token, headers,
                       request_timeout):
    records = {}    # task_id -> (pid of the process that recorded it, record)
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("bars-") and name.endswith(".json"):
            try:
                pid = int(name[len("bars-"):-len(".json")].split("-")[0])
                with open(os.path.join(run_dir, name)) as file:
                    records.update((task_id, (pid, record)) for task_id, record in json.load(file).items())
            except (OSError, ValueError):
                continue
    if not records:
        return
    sender = Sender(autostart=False)
    for task_id, (pid, record) in records.items():
        state = dict(record["state"])
        if state.get("status") in FINAL_STATUSES:
            pass
        elif pid != program_pid and _alive(pid):
            continue  # still running (a detached child, a pool worker): it ends its own
        elif pid != program_pid:
            # Any other process ends its own bars at exit, as without `run`: one still
            # open was left by a process that died without exiting (the OOM killer's SIGKILL).
            state["status"] = "error"
            state["error"] = "process %d of the program ended without closing this bar" % pid
        elif returncode:
            state["status"] = "error"
            state["error"] = "the program " + _reason_for(returncode)
        else:
            state["status"] = "close"
        try:
            endpoint = make_endpoint(server_url or record.get("server_url"), token, headers,
                                     request_timeout)
        except ValueError:
            continue
        # Greater than anything the program sent, whichever clock step it was at.
        sender._seq = max(sender._seq, int(state.pop("seq", 0) or 0))
        if record.get("server_down"):
            sender.known_down(endpoint)  # the program warned already: one warning, not two
        sender.put(endpoint, state, final=True)
    sender.flush()


_process_run = _join_run()


# Aliases
# `tqdm` is imported only when a bar class is first used, so that this module imports
# (and `send_update`, `demo`, `run` work) without it.

def _missing_tqdm(name):
    def unavailable(*args, **kwargs):
        _import_tqdm_std()
    return type(name, (), {"__init__": unavailable, "__module__": __name__,
                           "__doc__": "Unavailable: tqdm is not installed."})


def __getattr__(name):
    if name not in ("RemoteTqdm", "tqdm", "trange"):
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    try:
        base = _tqdm_base()
    except ImportError:
        remote_class = _missing_tqdm("RemoteTqdm")
    else:
        # Under `run`, its --unit/--meta/--headers apply to the one-line change's bars too.
        remote_class = make_remote_tqdm(base, **_run_defaults())
        remote_class.__name__ = remote_class.__qualname__ = "RemoteTqdm"
    globals().update(RemoteTqdm=remote_class, tqdm=remote_class,
                     trange=_make_range(remote_class, "trange"))
    return globals()[name]
