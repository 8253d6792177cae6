"""Progressista: every tqdm bar of every job, live in one browser page.

One file, one asyncio loop, one TCP port: the HTTP API that progress senders POST to,
the dashboard page, and the ``/ws`` live feed (WebSocket, run by the ``websockets``
package's Sans-I/O layer). Start it with::

    python progressista.py --port 8000        # or, installed: progressista serve

then open http://localhost:8000/ . The wire protocol is documented in docs/PROTOCOL.md;
``progressista --help`` lists every command and setting.
"""

import argparse
import array
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import dataclasses
import difflib
import hashlib
import heapq
import hmac
import html.parser
import http
import http.client
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import re
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import resource  # POSIX: the file descriptor limit
except ImportError:  # pragma: no cover - Windows
    resource = None

try:  # optional: a faster decoder of request bodies (--json-parser)
    import orjson
except ImportError:
    orjson = None

__all__ = [
    "App",
    "DomainError",
    "HTTPError",
    "InvalidUpdate",
    "json_response",
    "MemoryStore",
    "Request",
    "Response",
    "Settings",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "SqliteStore",
    "RedisStore",
    "Store",
    "Task",
    "create_app",
    "main",
    "validate_update",
]
__version__ = "0.4.0"

log = logging.getLogger("progressista")
# The Sans-I/O layer logs every frame at debug level; --log-level debug means one line
# per HTTP request, so its logger starts at info (lower it by hand to see frames).
ws_log = logging.getLogger("progressista.websocket")
ws_log.setLevel(logging.INFO)


# --- Configuration ---------------------------------------------------------------------

# Limits
MAX_BODY_BYTES = 1 << 20  # default body limit; --max-body-bytes
MAX_HEADER_BYTES = 16 * 1024  # request line plus headers
MAX_BATCH_ITEMS = 1000
MAX_TASKS = 100_000  # default cap on stored tasks; --max-tasks
MAX_TASK_ID_CHARS = 256  # also of `parent`, which names a task
MAX_RUN_CHARS = 256  # a run id
MAX_RUN_NAME_CHARS = 1000
MAX_DESC_CHARS = 1000
MAX_UNIT_CHARS = 32
MAX_POSTFIX_CHARS = 1000
MAX_ERROR_CHARS = 2000
MAX_META_BYTES = 4 * 1024  # meta, as compact JSON
MAX_HISTORY_PAIRS = 120  # [t, n] pairs of a task's history, the current one included
FD_RESERVE = 64  # file descriptors kept free for the store, logs and the listening socket
MAX_CONNECTIONS_FALLBACK = 10_000  # where the descriptor limit cannot be read
MAX_WS_MESSAGE_BYTES = 64 * 1024  # clients have nothing to say; keep what they send small
MAX_REMOVED_REMEMBERED = 100_000  # deletions GET /tasks?since= can list; older: resync
MAX_PAGE_TASKS = 100_000  # GET /tasks?limit= at most
SNAPSHOT_CHUNK_TASKS = 2_000  # a /ws snapshot of more tasks goes out in chunks of this many
# While updates come in, making and sending snapshot parts takes at most this share of
# the loop (the rest is the ingest's).
SNAPSHOT_CPU_SHARE = 0.1
SNAPSHOT_CACHE_IDLE_S = 15.0  # encoded snapshot parts unused this long are dropped
SNAPSHOT_DRAIN_POLL_S = 0.005  # how often a snapshot held up by a reader looks again
# A snapshot's next part waits until each reader has at most this much unsent: more
# would only sit in the transport's buffer, which costs a copy per send to keep.
SNAPSHOT_AHEAD_BYTES = 1 << 20
MAX_DISCARD_BYTES = 64 << 20  # of a refused body, read and dropped so the 413 arrives
LISTENER_BUFFER_HIGH_BYTES = 8 << 20  # a listener with this much unsent falls behind...
LISTENER_BUFFER_LOW_BYTES = 1 << 20  # ...and gets a fresh snapshot once drained to this
# Pongs a listener's pings made us queue, beyond its high-water mark, before it is closed:
# a ping flood from a client that does not read must not buffer pongs without end.
LISTENER_PONG_BACKLOG_BYTES = 256 * 1024
# An HTTP connection with this much unsent stops being read (and answered) until its
# peer has read most of it: pipelined requests never read back cannot fill our memory.
HTTP_UNSENT_HIGH_BYTES = 256 * 1024

# Timeouts
HEADER_TIMEOUT_S = 10.0  # from the first byte of a request to the end of its headers
BODY_TIMEOUT_S = 30.0  # from the end of the headers to the end of the body
KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this
LISTENER_BEHIND_TIMEOUT_S = 30.0  # a listener that stays behind this long is closed
WS_PING_INTERVAL_S = 20.0  # the Sans-I/O layer sends no pings of its own
WS_PING_TIMEOUT_S = 20.0  # a listener that leaves a ping unanswered this long is closed
DISCARD_TIMEOUT_S = 5.0  # to send the rest of a refused body before we close
# A connection (HTTP or /ws) whose unsent bytes have not shrunk for this long is dropped,
# its unsent bytes with it: a peer that stopped reading holds no memory for long.
UNSENT_STALL_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 5.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a client that stalls mid-handshake is dropped after this
REAP_INTERVAL_S = 1.0  # how often connection deadlines and pings are checked

# Defaults of docs/PROTOCOL.md ("Lifetimes", "The live feed")
CLIENT_HEARTBEAT_S = 15.0  # the client's default heartbeat (progressista_client.py)
BROADCAST_INTERVAL_S = 0.1
STALE_SECONDS = 60.0
STALL_SECONDS = 300.0  # least time without a change of n before a task reads stalled
STALL_FACTOR = 10.0  # ...or this many times its typical time between two changes, if longer
RETENTION_SECONDS = 86400.0
MAX_TASK_AGE_S = 0.0
CLEANUP_INTERVAL_S = 1.0
RUN_SETTLE_S = 10.0  # an ended run is news once none of its tasks changed this long
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
NOTIFY_EVENTS = ("close", "error", "stale", "stalled")  # what --notify-on may name
# Not stalled by default: an outer bar (epochs) that has not moved yet reads stalled
# after --stall-seconds, as its pace is not known; a user who wants it says so.
NOTIFY_DEFAULT_EVENTS = ("close", "error", "stale")
NOTIFY_INTERVAL_S = 10.0  # default batching window of notifications; --notify-interval

ENV_PREFIX = "PROGRESSISTA_"
INDEX_FILE = "index.html"
# What decodes request bodies: orjson when importable (auto), or always the standard
# library; either way the answers are the standard library's (see Request.json).
JSON_PARSERS = ("auto", "stdlib", "orjson")


def masked_url(url):
    """`url` with any password replaced by ***, for logs, show-config and /health: the
    one after user: and redis-py's ?password= too."""
    url = re.sub(r"//([^@/]*?):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def _csv(text):
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every server setting, with docs/PROTOCOL.md's defaults. See `Settings.from_env()`."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_tokens: tuple = ()
    read_tokens: tuple = ()
    allow_origins: tuple = ()
    stale_seconds: float = STALE_SECONDS
    stall_seconds: float = STALL_SECONDS
    stall_factor: float = STALL_FACTOR
    retention_seconds: float = RETENTION_SECONDS
    max_task_age: float = MAX_TASK_AGE_S
    cleanup_interval: float = CLEANUP_INTERVAL_S
    run_settle_seconds: float = RUN_SETTLE_S
    broadcast_interval: float = BROADCAST_INTERVAL_S
    max_tasks: int = MAX_TASKS
    max_body_bytes: int = MAX_BODY_BYTES
    ws_compression: bool = False
    store: str = "memory://"
    log_level: str = "info"
    notify: tuple = ()
    notify_on: tuple = NOTIFY_DEFAULT_EVENTS
    notify_min_duration: float = 0.0
    notify_interval: float = NOTIFY_INTERVAL_S
    notify_name: str = ""
    allowed_hosts: tuple = ()  # () is PROTOCOL.md's default; see allowed_host_names()
    tls_cert: str = ""
    tls_key: str = ""
    json_parser: str = "auto"

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Settings from PROGRESSISTA_* variables, then `overrides` (flags win)."""
        environ = os.environ if environ is None else environ
        values = {}
        for setting in SETTINGS_TABLE:
            raw = environ.get(ENV_PREFIX + setting.env)
            if raw is not None and raw.strip() != "":
                try:
                    values[setting.name] = setting.parse(raw)
                except (ValueError, argparse.ArgumentTypeError) as error:
                    raise ValueError(f"{ENV_PREFIX}{setting.env}={raw!r}: {error}") from None
        # PROGRESSISTA_API_TOKEN (one) and PROGRESSISTA_API_TOKENS (several) add up.
        tokens = _csv(environ.get(ENV_PREFIX + "API_TOKEN")) + values.get("api_tokens", ())
        if tokens:
            values["api_tokens"] = tokens
        values.update({key: value for key, value in overrides.items() if value is not None})
        for key in ("api_tokens", "read_tokens", "allow_origins", "notify", "notify_on",
                    "allowed_hosts"):
            if isinstance(values.get(key), str):
                values[key] = _csv(values[key])
            elif key in values:
                values[key] = tuple(values[key])
        for key in ("api_tokens", "read_tokens"):
            if any(not token.strip() for token in values.get(key, ())):
                raise ValueError("a token must not be empty (it would refuse every request)")
        if values.get("read_tokens") and not values.get("api_tokens"):
            # Without a push token anyone could write, so a read-only token would mean nothing.
            raise ValueError("read tokens need an API token too: set PROGRESSISTA_API_TOKEN "
                             "(or --api-token) for the senders, and give the read token "
                             "to viewers")
        _check_notify(values)
        if "json_parser" in values:  # flags are parsed already; keywords (create_app) not
            try:
                values["json_parser"] = _json_parser(values["json_parser"])
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"--json-parser / {ENV_PREFIX}JSON_PARSER: {error}") from None
        if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PROGRESSISTA_TLS_CERT, "
                             "PROGRESSISTA_TLS_KEY): give the certificate and its key, or "
                             "neither for plain HTTP")
        return cls(**values)

    def public(self):
        """The settings as a JSON-able dict with every token masked."""
        shown = dataclasses.asdict(self)
        shown["api_tokens"] = ["***"] * len(self.api_tokens)
        shown["read_tokens"] = ["***"] * len(self.read_tokens)
        shown["allow_origins"] = list(self.allow_origins)
        shown["store"] = masked_url(self.store)
        shown["notify"] = [masked_webhook(url) for url in self.notify]
        shown["notify_name"] = self.notify_name or socket.gethostname()  # what is sent
        shown["notify_on"] = list(self.notify_on)
        names = allowed_host_names(self)  # the default is worked out: show what is in force
        shown["allowed_hosts"] = ["*"] if names is None else sorted(names)
        return shown


def _whole(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _real(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None


def _port(text):
    port = _whole(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text}")
    return port


def _seconds(text):
    value = _real(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text}")
    return value


def _factor(text):
    value = _real(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def _positive_seconds(text):
    value = _real(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return value


def _positive_int(text):
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text}")
    return value


def _log_level(text):
    level = text.strip().lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise argparse.ArgumentTypeError("must be one of debug, info, warning, error, critical")
    return level


def _flag(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, not {text}")


def _json_parser(text):
    choice = text.strip().lower()
    if choice not in JSON_PARSERS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(JSON_PARSERS)}, "
                                         f"not {text!r}")
    return choice


def _notify_events(text):
    events = tuple(event.strip().lower()
                   for event in (_csv(text) if isinstance(text, str) else text))
    for event in events:
        if event not in NOTIFY_EVENTS:
            raise argparse.ArgumentTypeError(
                f"unknown event {event!r}: name one or more of {', '.join(NOTIFY_EVENTS)}")
    if not events:  # nothing would ever be sent: without --notify, nothing is
        raise argparse.ArgumentTypeError(f"name one or more of {', '.join(NOTIFY_EVENTS)}")
    return tuple(dict.fromkeys(events))


def masked_webhook(url):
    """`url` as scheme://host/***: a webhook URL (Slack's, Discord's) is its own secret."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and parts.netloc:
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/***"
    return url.split("/", 1)[0] + "/***" if "/" in url else "***"


WEBHOOK_URL = re.compile(r"[!-~]+\Z")  # printable ASCII: what an HTTP request line can carry


def _check_notify(values):
    # One place for every source (flags, variables, create_app), and no message shows
    # more of a URL than masked_webhook(): a mistyped variable must not leak the others.
    for url in values.get("notify", ()):
        try:
            parts = urllib.parse.urlsplit(url)
            port_ok = parts.port is None or parts.port > 0  # a port that is no number raises
        except ValueError:
            parts, port_ok = None, False
        if not port_ok or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--notify / {ENV_PREFIX}NOTIFY: {masked_webhook(url)!r} is not a "
                             "webhook URL: give http://host/... or https://host/..., like "
                             "https://hooks.slack.com/services/...")
        if not WEBHOOK_URL.match(url):  # urllib would refuse it at the first event
            raise ValueError(f"--notify / {ENV_PREFIX}NOTIFY: {masked_webhook(url)!r} has a "
                             "space, a control or a non-ASCII character: percent-encode it "
                             "(a space is %20)")
    if "notify_on" in values:
        try:
            values["notify_on"] = _notify_events(values["notify_on"])
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"--notify-on / {ENV_PREFIX}NOTIFY_ON: {error}") from None


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a running task reads stale or stalled (docs/PROTOCOL.md, "The task").

    Settings has the same three fields: wherever a status is derived, pass the Settings
    (or one of these, in tests and tools)."""

    stale_seconds: float = STALE_SECONDS
    stall_seconds: float = STALL_SECONDS
    stall_factor: float = STALL_FACTOR


@dataclasses.dataclass(frozen=True)
class _Setting:
    name: str
    env: str
    parse: object
    help: str


SETTINGS_TABLE = (
    _Setting("host", "HOST", str, "address to listen on"),
    _Setting("port", "PORT", _port, "TCP port for the API, the dashboard and /ws"),
    _Setting("api_tokens", "API_TOKENS", _csv,
             "bearer tokens clients must send (the variable: comma-separated)"),
    _Setting("read_tokens", "READ_TOKENS", _csv,
             "tokens that may only view: GET /tasks, /ws, /metrics and the dashboard "
             "(the variable: comma-separated)"),
    _Setting("allow_origins", "ALLOW_ORIGINS", _csv,
             "comma-separated browser origins allowed cross-origin (CORS and /ws)"),
    _Setting("stale_seconds", "STALE_SECONDS", _seconds,
             "a running task with no update this long reads 'stale'; 0 turns it off"),
    _Setting("stall_seconds", "STALL_SECONDS", _seconds,
             "a running task still heard from whose n has not changed this long (or "
             "stall-factor times its usual time per step, if longer) reads 'stalled'; "
             "0 turns it off"),
    _Setting("stall_factor", "STALL_FACTOR", _factor,
             "how many of a task's usual times between two steps without one make it "
             "stalled (when that is longer than stall-seconds)"),
    _Setting("retention_seconds", "RETENTION_SECONDS", _seconds,
             "close/error tasks, and stale ones, are deleted this long after their last "
             "update; 0 keeps"),
    _Setting("max_task_age", "MAX_TASK_AGE", _seconds,
             "any task is deleted after this long without an update; 0 is off"),
    _Setting("cleanup_interval", "CLEANUP_INTERVAL", _positive_seconds,
             "seconds between sweeps that mark stale and stalled tasks and apply the "
             "lifetimes above"),
    _Setting("run_settle_seconds", "RUN_SETTLE_SECONDS", _seconds,
             "a run whose tasks have all ended is news (feed, notifications) once none "
             "has changed this long"),
    _Setting("broadcast_interval", "BROADCAST_INTERVAL", _positive_seconds,
             "seconds between two coalesced /ws update messages"),
    _Setting("max_tasks", "MAX_TASKS", _positive_int,
             "cap on stored tasks; a new task past it is refused with 503"),
    _Setting("max_body_bytes", "MAX_BODY_BYTES", _positive_int,
             "largest request body accepted (413 beyond)"),
    _Setting("ws_compression", "WS_COMPRESSION", _flag,
             "offer permessage-deflate on /ws (less traffic, more server CPU)"),
    _Setting("store", "STORE", str,
             "where tasks live: memory://, sqlite:///path/to/file.db or redis://host:6379/0"),
    _Setting("log_level", "LOG_LEVEL", _log_level,
             "debug logs one line per request; info, warning, error"),
    _Setting("notify", "NOTIFY", _csv,
             "webhook URL to POST to when a task closes, fails or goes stale (repeatable; "
             "the variable: comma-separated)"),
    _Setting("notify_on", "NOTIFY_ON", _notify_events,
             "which of close, error, stale, stalled are notified; close and error also "
             "choose how a run's end is told (comma-separated; default close,error,stale)"),
    _Setting("notify_min_duration", "NOTIFY_MIN_DURATION", _seconds,
             "a task that ran less than this many seconds is not notified; 0 notifies all"),
    _Setting("notify_interval", "NOTIFY_INTERVAL", _positive_seconds,
             "seconds of events batched into one message per webhook"),
    _Setting("notify_name", "NOTIFY_NAME", str,
             "this server's name in notifications (default: the host name)"),
    _Setting("allowed_hosts", "ALLOWED_HOSTS", _csv,
             "Host header names answered, others get 421 (comma-separated, * for any; a "
             "port is ignored); none listed: localhost, 127.0.0.1, [::1] and the "
             "listening address when listening on loopback, else any"),
    _Setting("tls_cert", "TLS_CERT", str,
             "certificate file (PEM, with its chain): serve https:// and wss://"),
    _Setting("tls_key", "TLS_KEY", str, "the certificate's private key file (PEM)"),
    _Setting("json_parser", "JSON_PARSER", _json_parser,
             "what decodes request bodies: auto (orjson when it is installed, else the "
             "standard library), stdlib or orjson; the answers are the same"),
)


# --- Tasks (pure: no I/O) --------------------------------------------------------------


class DomainError(Exception):
    """An error of the tasks or the store. The pure core raises these; the HTTP layer
    maps each kind to one status in `error_response()`."""


class InvalidUpdate(DomainError, ValueError):
    """An update that breaks a rule of docs/PROTOCOL.md; the message names the field
    (``tasks[3].n: must be a finite number >= 0``)."""


class StoreFull(DomainError):
    """The store's task cap refuses a new task_id (existing tasks still update)."""

    def __init__(self, max_tasks, task_id):
        super().__init__(
            f"task limit reached: the server already holds max_tasks={max_tasks} tasks, so "
            f"new task_id {task_id!r} was refused (existing tasks still update). Delete "
            "finished tasks (DELETE /tasks?status=close) or raise --max-tasks")
        self.max_tasks = max_tasks
        self.task_id = task_id


class StoreUnavailable(DomainError):
    """A shared store (Redis) cannot be reached; nothing was stored."""


STATUSES = ("running", "stalled", "stale", "close", "error")
FINAL_STATUSES = ("close", "error")
# Deleted the retention period after their last update: finished, or marked stale (v2).
RETAINED_STATUSES = ("close", "error", "stale")
# How much the newest time between two changes of n moves a task's typical_step_s.
TYPICAL_STEP_WEIGHT = 0.2
# Old (0.2.x) clients send start/update for a bar in progress.
STATUS_ALIASES = {"running": "running", "start": "running", "update": "running",
                  "close": "close", "error": "error"}


def _is_number(value):
    # bool is an int subclass; JSON true is not a number here.
    return type(value) is float or type(value) is int


def _number(value, where, minimum=0.0, nullable=False):
    if value is None and nullable:
        return None
    if not _is_number(value):
        raise InvalidUpdate(f"{where}: must be a number{' or null' if nullable else ''}, "
                            f"not {type(value).__name__ if value is not None else 'null'}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        finite = False
    if not finite or value < minimum:
        shown = value if finite or type(value) is float else "a number too large"
        bound = f" >= {minimum:g}" if minimum > -math.inf else ""
        raise InvalidUpdate(f"{where}: must be a finite number{bound}, not {shown}")
    return value


def _is_unicode(text):
    """False for a string with a lone surrogate: JSON's "\\ud800" decodes to one, and it
    cannot be written as UTF-8 (to SQLite, to Redis, to a browser)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unicode(text, where):
    if not _is_unicode(text):
        raise InvalidUpdate(f"{where}: must be valid Unicode (a lone surrogate like "
                            "\\ud800 is not)")
    return text


def _text(value, where, limit, nullable=True):
    if value is None and nullable:
        return None
    if type(value) is not str:
        raise InvalidUpdate(f"{where}: must be a string{' or null' if nullable else ''}")
    if len(value) > limit:
        raise InvalidUpdate(f"{where}: must be at most {limit} characters, not {len(value)}")
    _check_unicode(value, where)
    return sys.intern(value) if len(value) <= 32 else value


def _check_task_id(value, where):
    if type(value) is not str or not 1 <= len(value) <= MAX_TASK_ID_CHARS:
        raise InvalidUpdate(f"{where}: required, a string of 1 to {MAX_TASK_ID_CHARS} characters")
    return _check_unicode(value, where)


def _id_or_null(value, where, limit):
    # run and parent: shared by many bars, so one interned string serves them all.
    if value is None:
        return None
    if type(value) is not str or not 1 <= len(value) <= limit:
        raise InvalidUpdate(f"{where}: must be null or a string of 1 to {limit} characters")
    return sys.intern(_check_unicode(value, where))


def _check_bool(value, where):
    if type(value) is not bool:
        raise InvalidUpdate(f"{where}: must be true or false")
    return value


def _check_status(value, where):
    status = STATUS_ALIASES.get(value) if type(value) is str else None
    if status is None:
        raise InvalidUpdate(f"{where}: must be one of running, close, error "
                            f"(start and update mean running), not {value!r}")
    return status


def _check_unit_scale(value, where):
    if type(value) is bool:
        return value
    return _number(value, where + " (true, false or a number)")


def _check_unit_divisor(value, where):
    value = _number(value, where)
    if value == 0:
        raise InvalidUpdate(f"{where}: must be a number > 0")
    return value


MAX_SEQ = 2**63 - 1  # bounded: a 4,300-digit seq made every comparison slow


def _check_seq(value, where):
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise InvalidUpdate(f"{where}: must be an integer from 0 to {MAX_SEQ}")
    return value


def _check_timestamp(value, where):
    return _number(value, where, minimum=-math.inf)


def _check_meta(value, where):
    if type(value) is not dict:
        raise InvalidUpdate(f"{where}: must be an object of string keys and scalar values")
    bound = 2  # an upper bound of the compact JSON size: 12 bytes a character at worst
    interned = {}  # keys and short strings shared by every task (json.loads copies them)
    for key, item in value.items():
        kind = type(item)
        _check_unicode(key, where)
        if kind is str:
            _check_unicode(item, f"{where}.{key}")
            bound += 12 * (len(key) + len(item)) + 6
            if len(item) <= 64:
                item = sys.intern(item)
        elif kind is float:
            if not math.isfinite(item):
                raise InvalidUpdate(f"{where}.{key}: must be a finite number")
            bound += 12 * len(key) + 30
        elif item is None or kind is bool or (kind is int and -10**20 < item < 10**20):
            bound += 12 * len(key) + 30
        elif kind is int:
            if not -_MAX_FLOAT <= item <= _MAX_FLOAT:  # as in every other field
                raise InvalidUpdate(f"{where}.{key}: must be a number a float can hold")
            bound += MAX_META_BYTES  # a huge int: let json.dumps measure it
        else:
            raise InvalidUpdate(f"{where}.{key}: must be a string, number, true, false or null")
        interned[sys.intern(key) if len(key) <= 64 else key] = item
    value = interned
    if bound > MAX_META_BYTES:
        size = len(json.dumps(value, separators=(",", ":")))
        if size > MAX_META_BYTES:
            raise InvalidUpdate(f"{where}: must be at most {MAX_META_BYTES} bytes as JSON, "
                                f"not {size}")
    return shared_meta(value)


# Every task's meta with the same items is one dict: the bars of one process all carry
# its host, pid and job, and a dict of three costs about 200 bytes. Sharing is safe as
# a task's meta is never changed in place, only replaced. Bounded: cleared when full.
_SHARED_META = {}
SHARED_META_HELD = 65_536


def shared_meta(meta):
    """The dict held for tasks with the same meta as `meta` (`meta` itself the first
    time). validate_update() takes a meta it finds here as checked."""
    key = _meta_key(meta)
    if key is None:
        return meta
    held = _SHARED_META.get(key)
    if held is not None:
        return held
    if len(_SHARED_META) >= SHARED_META_HELD:
        _SHARED_META.clear()
    _SHARED_META[key] = meta
    return meta


def _meta_key(meta):
    """What tells one meta from another, or None for one that is not shared. Items
    compare with their types (1, 1.0 and true are equal in Python, not in JSON); a meta
    with a float is not shared (0.0 and -0.0 are equal too), nor one that cannot be a
    dict key (a value that is not a scalar, before its check)."""
    kinds = tuple(map(type, meta.values()))
    if float in kinds or not set(kinds) <= _SCALAR_TYPES:
        return None
    # One flat tuple: a tuple of pairs would cost twice as much memory per meta held.
    return (*itertools.chain.from_iterable(meta.items()), *kinds)


_SCALAR_TYPES = {str, int, bool, type(None)}


# The text and id fields' limits, written once: FIELD_CHECKS and validate_update()'s
# fast path both read them.
_TEXT_LIMITS = {"desc": MAX_DESC_CHARS, "unit": MAX_UNIT_CHARS, "postfix": MAX_POSTFIX_CHARS,
                "error": MAX_ERROR_CHARS, "run_name": MAX_RUN_NAME_CHARS}
_ID_LIMITS = {"run": MAX_RUN_CHARS, "parent": MAX_TASK_ID_CHARS}  # 1 to N characters


def _text_check(limit, nullable):
    return lambda value, where: _text(value, where, limit, nullable=nullable)


def _id_check(limit):
    return lambda value, where: _id_or_null(value, where, limit)


# field -> check(value, where) returning the value to store; unknown fields are ignored.
FIELD_CHECKS = {
    "task_id": _check_task_id,
    **{name: _text_check(limit, nullable=name != "unit") for name, limit in _TEXT_LIMITS.items()},
    **{name: _id_check(limit) for name, limit in _ID_LIMITS.items()},
    "n": lambda value, where: _number(value, where),
    "total": lambda value, where: _number(value, where, nullable=True),
    "unit_scale": _check_unit_scale,
    "unit_divisor": _check_unit_divisor,
    "rate": lambda value, where: _number(value, where, nullable=True),
    "elapsed": lambda value, where: _number(value, where),
    "status": _check_status,
    "meta": _check_meta,
    "seq": _check_seq,
    "timestamp": _check_timestamp,
    "transient": _check_bool,
}


def validate_update(obj, index=None):
    """Return the known fields of one update, checked; raise InvalidUpdate naming the
    first bad field (``tasks[3].n: ...`` when `index` is a batch position)."""
    if type(obj) is not dict:
        where = "body" if index is None else f"tasks[{index}]"
        raise InvalidUpdate(f"{where}: each update must be a JSON object")
    if "task_id" not in obj:
        prefix = "" if index is None else f"tasks[{index}]."
        raise InvalidUpdate(f"{prefix}task_id: required, a string of 1 to "
                            f"{MAX_TASK_ID_CHARS} characters")
    update = {}
    for key, value in obj.items():
        # The common valid cases inline, by type; anything else (including every error)
        # goes through FIELD_CHECKS, which names the field.
        vtype = type(value)
        if vtype is float or vtype is int:
            if key in _NON_NEGATIVE:
                if 0 <= value <= _MAX_FLOAT and (value or key != "unit_divisor"):
                    if vtype is int and key in _SHARED_NUMBERS:
                        shared = _SHARED_INTS.get(value)
                        if shared is not None:
                            value = shared
                        elif len(_SHARED_INTS) < SHARED_INTS_HELD:
                            _SHARED_INTS[value] = value
                    update[key] = value
                    continue
            elif key == "seq":
                if vtype is int and 0 <= value <= MAX_SEQ:
                    update[key] = value
                    continue
            elif key == "timestamp":
                if -_MAX_FLOAT <= value <= _MAX_FLOAT:
                    update[key] = value
                    continue
        elif vtype is str:
            limit = _TEXT_LIMITS.get(key)
            if limit is not None:
                if len(value) <= limit and (value.isascii() or _is_unicode(value)):
                    update[key] = sys.intern(value) if len(value) <= 32 else value
                    continue
            elif key == "task_id":
                if 0 < len(value) <= MAX_TASK_ID_CHARS and (value.isascii()
                                                             or _is_unicode(value)):
                    update[key] = value
                    continue
            elif key == "status":
                status = STATUS_ALIASES.get(value)
                if status is not None:
                    update[key] = status
                    continue
            elif key in _ID_LIMITS:  # run, parent
                if 0 < len(value) <= _ID_LIMITS[key] and _is_unicode(value):
                    update[key] = sys.intern(value)
                    continue
        elif value is None:
            if key in _NULLABLE:
                update[key] = None
                continue
        elif vtype is bool and key in _BOOLEAN:
            update[key] = value
            continue
        elif vtype is dict and key == "meta":
            shared_key = _meta_key(value)
            held = _SHARED_META.get(shared_key) if shared_key is not None else None
            if held is not None:  # one seen before (sent with every push): checked then
                update[key] = held
                continue
        check = FIELD_CHECKS.get(key)
        if check is not None:  # unknown fields are ignored and not stored
            update[key] = check(value, key if index is None else f"tasks[{index}].{key}")
    return update


_MAX_FLOAT = sys.float_info.max  # also refuses inf, NaN and ints beyond any float
# Whole totals and divisors repeat across tasks (1000, a dataset's size): one int object
# each rather than 28 bytes per task. Only ints are keys (1 == 1.0 == True in a dict).
_SHARED_NUMBERS = frozenset(("total", "unit_divisor"))
_SHARED_INTS = {}
SHARED_INTS_HELD = 4096  # the first ones seen; a later one is simply not shared
_NON_NEGATIVE = frozenset(("n", "total", "rate", "elapsed", "unit_divisor", "unit_scale"))
_NULLABLE = frozenset(("desc", "total", "rate", "postfix", "error", "run", "run_name",
                       "parent"))
_BOOLEAN = frozenset(("unit_scale", "transient"))


NO_META = {}  # the meta of every task sent none: shared, never changed in place


class Task:
    """One progress bar as stored. `as_dict(now, ...)` is its bulk wire form (GET /tasks,
    the feed), `as_detail(now, ...)` the one with `history` (GET /tasks/{id}), and
    `as_stored()` what a persistent store writes and `from_dict()` reads back."""

    __slots__ = ("task_id", "desc", "n", "total", "unit", "unit_scale", "unit_divisor",
                 "rate", "elapsed", "postfix", "status", "error", "meta", "seq",
                 "timestamp", "run", "run_name", "parent", "transient",
                 "created_at", "updated_at", "progressed_at", "typical_step_s",
                 # Kept, not shown in bulk: see "History" below.
                 "history", "history_step_s", "history_t_exp", "history_n_exp",
                 # The store's own: creation order (paging) and the whole second of the
                 # next sweep that must look at it (None: none yet). Not shown, not stored.
                 "rank", "check_at_s")

    def __init__(self, task_id, now):
        self.task_id = task_id
        self.desc = None
        self.n = 0
        self.total = None
        self.unit = "it"
        self.unit_scale = False
        self.unit_divisor = 1000
        self.rate = None
        self.elapsed = None
        self.postfix = None
        self.status = "running"
        self.error = None
        self.meta = NO_META
        self.seq = None
        self.timestamp = None
        self.run = None
        self.run_name = None
        self.parent = None
        self.transient = False
        self.created_at = now
        self.updated_at = now
        self.progressed_at = now  # server time of the last change of n
        self.typical_step_s = None  # seconds between two changes of n; None until it moved
        self.history = None  # settled pairs, flat: see settle_history()
        self.history_step_s = HISTORY_FIRST_STEP_S  # least time between two of them
        self.history_t_exp = HISTORY_FIRST_T_EXP  # their units: 2**exp seconds...
        self.history_n_exp = HISTORY_FIRST_N_EXP  # ...and 2**exp of n
        self.rank = -1  # set by the store that holds it
        self.check_at_s = None

    def shown_status(self, now, thresholds):
        """The status a reader sees at `now`, derived here and nowhere else: a silent
        running task reads stale, a heard-from one whose n stopped reads stalled (both
        between sweeps too). `thresholds`: the Settings, or a Thresholds."""
        status = self.status
        if status != "running" and status != "stalled":
            return status  # close and error are final; stale lasts until it is heard from
        stale_after_s = thresholds.stale_seconds
        if stale_after_s and now - self.updated_at >= stale_after_s:
            return "stale"  # stale wins: nothing heard says more than nothing moved
        stall_s = thresholds.stall_seconds
        if (stall_s and now - self.progressed_at > stall_s
                # Still heard from: an update came after n last changed. Without it a
                # task is silent, not stalled (what stale says, when it is on).
                and self.updated_at > self.progressed_at
                and (self.typical_step_s is None
                     or now - self.progressed_at > thresholds.stall_factor * self.typical_step_s)):
            return "stalled"
        return "running"

    def stall_after_s(self, thresholds):
        """Seconds without a change of n after which this task reads stalled; None: never."""
        if not thresholds.stall_seconds:
            return None
        if self.typical_step_s is None:  # not moved yet: its pace is not known
            return thresholds.stall_seconds
        return max(thresholds.stall_seconds, thresholds.stall_factor * self.typical_step_s)

    def shown_until(self, now, thresholds):
        """The earliest server time after `now` at which time alone may change what
        shown_status() says (None: not before an update), at the earliest: a reader that
        keeps what it read until then is never wrong."""
        if self.status != "running" and self.status != "stalled":
            return None
        times = []
        if thresholds.stale_seconds:
            times.append(self.updated_at + thresholds.stale_seconds)
        stall_s = self.stall_after_s(thresholds)
        if stall_s is not None and self.updated_at > self.progressed_at:  # as shown_status
            times.append(self.progressed_at + stall_s)
        later = [time_s for time_s in times if time_s > now]
        return min(later) if later else None

    def as_dict(self, now=None, thresholds=None):
        """The bulk wire form; `status` as of `now` when given (see shown_status())."""
        wire = dict(zip(WIRE_FIELDS, _wire_fields(self)))
        if now is not None:
            wire["status"] = self.shown_status(now, thresholds)
        return wire

    def as_detail(self, now=None, thresholds=None):
        """The wire form with `history`: [t, n] pairs, oldest first, the last one now's."""
        wire = self.as_dict(now, thresholds)
        wire["history"] = history_pairs(self)
        return wire

    def as_stored(self):
        stored = dict(zip(STORED_FIELDS, _stored_fields(self)))
        if self.history is not None:
            stored["history"] = history_text(self.history)
        return stored

    def copy(self):
        twin = Task.__new__(Task)
        for name, value in zip(Task.__slots__, _task_fields(self)):
            setattr(twin, name, value)
        if self.history is not None:  # the only mutable field changed in place
            twin.history = array.array(HISTORY_TYPECODE, self.history)
        return twin

    @classmethod
    def from_dict(cls, stored):
        """Rebuild a task from `as_stored()` output (persistent stores)."""
        task = cls(stored["task_id"], stored.get("created_at", 0.0))
        for name in cls.__slots__:
            if name in stored:
                setattr(task, name, stored[name])
        if "progressed_at" not in stored:  # stored by a v1 server: no better guess
            task.progressed_at = task.updated_at
        if task.history is not None:
            task.history = history_from_text(task.history)
        if type(task.meta) is dict:
            task.meta = shared_meta(task.meta)
        return task


WIRE_FIELDS = Task.__slots__[:Task.__slots__.index("history")]
STORED_FIELDS = Task.__slots__[:Task.__slots__.index("rank")]
_wire_fields = operator.attrgetter(*WIRE_FIELDS)
_stored_fields = operator.attrgetter(*STORED_FIELDS)
_task_fields = operator.attrgetter(*Task.__slots__)


# History: [t, n] pairs over a task's whole life, at most MAX_HISTORY_PAIRS, spread
# evenly in time however long it runs.
#
# The last pair shown is the current state, (updated_at, n): the task's own fields, never
# stored twice. Before an update replaces it, that state is "settled" into the stored
# pairs when it lies at least `history_step_s` after the last settled pair, so settled
# pairs are spaced by the step. When they are full, every other one is dropped (the
# first, the start, stays) and the step becomes their mean spacing, at least doubled:
# what is kept and what comes next share one spacing, so the list keeps the shape of the
# whole life. A settle is an append; a thinning, O(MAX_HISTORY_PAIRS), comes after at
# least MAX_HISTORY_PAIRS / 2 settles: O(1) amortised per update.
#
# Stored compactly, for the memory target of 1.5 KiB per task (bench/bench_memory.py):
# one flat array of 16-bit integers per task, (t, n, t, n, ...), t in units of
# 2**history_t_exp seconds after created_at and n in units of 2**history_n_exp; 4 bytes
# a pair, where a list of lists would take about 100. The units start fine and coarsen,
# for every stored value at once, when a value no longer fits: a pair is exact to about
# 1/32,768 of the task's life and of its largest n, plenty for a chart (a rescale is
# O(MAX_HISTORY_PAIRS), once each time the life or n doubles). The current pair, which
# is exact, is not stored.
HISTORY_TYPECODE = "H"
HISTORY_MAX_UNITS = 0xFFFF  # the largest stored value, in units
# The first units are fine (2**-16): a short life or a bar counting fractions (total=1)
# keeps its shape; a longer one coarsens them within its first few pairs.
HISTORY_FIRST_T_EXP = -16
HISTORY_FIRST_N_EXP = -16
HISTORY_FIRST_STEP_S = 1.0  # least spacing of settled pairs until the first thinning
# Settled pairs kept before a thinning halves them: the current state is one more pair,
# so at most 101 of MAX_HISTORY_PAIRS are used. Stopping short of 119 keeps the fullest
# history (an array grows in steps) within 1.5 KiB a task (bench/bench_memory.py).
MAX_HISTORY_SETTLED = 100


def settle_history(task, now):
    """Before an update at `now` replaces `task`'s current state, keep that state as a
    history pair if it is due (see above); thin the pairs when they are full."""
    flat = task.history
    then = task.updated_at - task.created_at
    if flat is None:
        if now <= task.updated_at:  # a new task's blank state, replaced at once
            return
        flat = task.history = array.array(HISTORY_TYPECODE)
    elif then - math.ldexp(flat[-2], task.history_t_exp) < task.history_step_s:
        return  # the common case: one subtraction and one comparison
    then = max(then, 0.0)  # a clock set back: no negative t
    n = task.n
    if then > math.ldexp(HISTORY_MAX_UNITS, task.history_t_exp):
        task.history_t_exp = _rescaled(flat, 0, task.history_t_exp, then)
    if n > math.ldexp(HISTORY_MAX_UNITS, task.history_n_exp):
        task.history_n_exp = _rescaled(flat, 1, task.history_n_exp, n)
    flat.append(_units(then, task.history_t_exp))
    flat.append(_units(n, task.history_n_exp))
    if len(flat) > 2 * MAX_HISTORY_SETTLED:
        task.history_step_s = thinned(flat, task.history_step_s, task.history_t_exp)


def _units(value, exp):
    return round(math.ldexp(value, -exp))


def _rescaled(flat, offset, exp, value):
    """Coarsen every stored t (offset 0) or n (offset 1) so that `value` fits; return the
    new exp. (frexp, not a division: n may be as large as a float goes.)"""
    shift = max(1, math.frexp(value)[1] - 15 - exp)  # value / 2**(exp + shift) < 2**15
    half = 1 << (shift - 1)
    for i in range(offset, len(flat), 2):
        flat[i] = min((flat[i] + half) >> shift, HISTORY_MAX_UNITS)
    return exp + shift


def thinned(flat, step_s, t_exp):
    """Drop every other pair of `flat` in place, the first kept; return the next step."""
    del flat[2::4]  # the t of pairs 1, 3, 5, ...
    del flat[2::3]  # ...and then their n, now every third item from the third
    spacing_s = math.ldexp(flat[-2] - flat[0], t_exp) / (len(flat) // 2 - 1)
    return max(2 * step_s, spacing_s)


def history_pairs(task):
    """`task`'s history as [t, n] pairs, oldest first, ending with its current state."""
    flat = task.history or ()
    start, t_exp, n_exp = task.created_at, task.history_t_exp, task.history_n_exp
    pairs = [[round(start + math.ldexp(flat[i], t_exp), 3),
              _int_if_whole(math.ldexp(flat[i + 1], n_exp))] for i in range(0, len(flat), 2)]
    pairs.append([task.updated_at, task.n])
    return pairs


def _int_if_whole(number):
    return int(number) if number.is_integer() else number


def history_text(flat):
    """The stored pairs as text for a persistent store: base64 of little-endian uint16s
    (a JSON list of them would be longer and slower to write)."""
    if sys.byteorder == "big":
        flat = array.array(HISTORY_TYPECODE, flat)
        flat.byteswap()
    return base64.b64encode(flat.tobytes()).decode("ascii")


def history_from_text(text):
    flat = array.array(HISTORY_TYPECODE)
    flat.frombytes(base64.b64decode(text))
    if sys.byteorder == "big":
        flat.byteswap()
    return flat


def apply_update(task, update, now):
    """Apply one validated update to `task` in place; return False when it is ignored.

    An update whose seq is not above the stored one is a retry or arrived out of order:
    ignoring it means a bar never moves backwards and a closed bar never reopens."""
    seq = update.get("seq")
    if seq is not None:
        if task.seq is not None and seq <= task.seq:
            return False
    elif task.timestamp is not None and update.get("timestamp", math.inf) < task.timestamp:
        return False  # 0.2.x clients send no seq; their timestamp orders them instead
    old_n, old_status = task.n, task.status
    settle_history(task, now)
    for name, value in update.items():
        setattr(task, name, value)
    if task.n != old_n:
        moved(task, now)
    elif old_status == "stalled" and task.status == "running":
        task.status = "stalled"  # a heartbeat is no progress: what the sweep would say
    if task.status == "stale" and "status" not in update:
        task.status = "running"  # any sign of life revives a stale bar
    task.updated_at = now
    return True


def moved(task, now):
    """Note a change of `task`'s n at `now`: progressed_at, and typical_step_s.

    The typical time between two changes of n is an exponentially weighted mean of the
    intervals (the newest weighs TYPICAL_STEP_WEIGHT): O(1) time and one float per task,
    it follows a bar that speeds up or slows down within a few steps, and one long pause
    raises it only for a while. The first interval counts from the task's creation, so
    an epoch bar's first epoch sets its pace. (The sender pushes at most every
    push interval, so a fast bar's steps are seen at that pace: far below the
    --stall-seconds floor, which is what decides for such a bar.)"""
    step_s = now - task.progressed_at
    typical_s = task.typical_step_s
    if step_s > 0 or typical_s is not None:
        # A bar whose very first update already has n > 0 (tqdm(initial=...), a resumed
        # job) took no step yet here: a zero interval would set a pace it never had.
        task.typical_step_s = (step_s if typical_s is None
                               else typical_s + TYPICAL_STEP_WEIGHT * (step_s - typical_s))
    task.progressed_at = now
    if task.status == "stalled":
        task.status = "running"


def expired(task, now, settings):
    """True when a lifetime rule deletes `task` at `now` (docs/PROTOCOL.md "Lifetimes"): a
    finished task, or one marked stale, the retention period after its last update (a
    process that died without a word does not leave its bars forever). Marked, not just
    reading stale: a sweep has told everyone it went stale before one deletes it."""
    silent_s = now - task.updated_at
    if settings.max_task_age and silent_s >= settings.max_task_age:
        return True
    return bool(settings.retention_seconds and silent_s >= settings.retention_seconds
                and task.status in RETAINED_STATUSES)


def sweep_plan(tasks, now, settings):
    """What a sweep at `now` does: (the (task, status) pairs whose status now reads
    differently: went stale, stalled, or back to running; the ids that expired). A task
    that expired is only deleted, never marked on its way out."""
    marked, expired_ids = [], []
    for task in tasks:
        if expired(task, now, settings):
            expired_ids.append(task.task_id)
        else:
            shown = task.shown_status(now, settings)
            if shown != task.status:
                marked.append((task, shown))
    return marked, expired_ids


def next_check_at(task, settings, status=None):
    """The earliest server time at which time alone could change what a sweep does with
    `task` (in `status`, when given: the one a sweep is marking it with): read stale or
    stalled, or expire. None: never, until an update changes it."""
    status = task.status if status is None else status
    times = []
    if settings.max_task_age:
        times.append(task.updated_at + settings.max_task_age)
    if status == "running" or status == "stalled":
        if settings.stale_seconds:
            times.append(task.updated_at + settings.stale_seconds)
        stall_s = task.stall_after_s(settings) if status == "running" else None
        if stall_s is not None:
            times.append(task.progressed_at + stall_s)
    elif settings.retention_seconds:  # RETAINED_STATUSES: deleted after retention
        times.append(task.updated_at + settings.retention_seconds)
    return min(times) if times else None


class Store:
    """The contract every store keeps, written once; subclass it for a store of your own.

    A store holds the tasks and answers reads from memory. Each method that may wait for
    I/O (apply, delete, sweep, open, flush, close) returns its result or a coroutine of
    it: the in-memory store answers at once, so its requests never leave the fast path,
    and the server awaits the others (see `settle()`). The members with a body here are
    optional: their defaults suit a store that needs no I/O."""

    kind = "custom"  # for /health and /metrics
    failures = 0  # failed reads and writes of a persistent store, for GET /metrics
    is_sweeper = True  # the one server on these tasks: it sends the notifications

    def apply(self, updates, now):
        """Apply validated updates (all or nothing); return the ids that changed.
        Raise StoreFull when a new task_id would pass the cap."""
        raise NotImplementedError

    def get(self, task_id):
        """The Task with this id, or None."""
        raise NotImplementedError

    def tasks(self):
        """Every Task, oldest created first."""
        raise NotImplementedError

    def delete(self, task_ids):
        """Delete these tasks; return the ids that were there."""
        raise NotImplementedError

    def sweep(self, now, settings):
        """Apply the lifetimes of `settings` as of `now`: return (ids whose shown status
        changed, ids deleted)."""
        raise NotImplementedError

    def __len__(self):
        raise NotImplementedError

    def page(self, after, limit, keep):
        """Up to `limit` tasks for which `keep(task)` is true, in the order of tasks(),
        after the task with id `after` (None: from the first); and the id to pass as
        `after` for the next page, None when no kept task follows. Raise LookupError
        when `after` is unknown. This default walks tasks(); MemoryStore seeks."""
        tasks = self.tasks()
        start = 0
        if after is not None:
            ids = [task.task_id for task in tasks]
            if after not in ids:
                raise LookupError(after)
            start = ids.index(after) + 1
        return page_of(iter(tasks[start:]), limit, keep)

    def ranked(self):
        """The MemoryStore that holds these tasks with their creation ranks (itself, or
        a mirror), or None: big snapshots then go out without the shared cache of
        encoded parts (`SnapshotParts`)."""
        return None

    def health(self):
        """A JSON-able dict for GET /health; "ok" False marks the server degraded."""
        return {"kind": self.kind, "ok": True}

    def open(self, feed):
        """Called once the loop runs, before the first request; `feed` takes changes
        that reach this store from elsewhere (another server on the same Redis)."""

    def flush(self):
        """Called every broadcast interval: write what is pending."""

    def close(self):
        """Called at shutdown, after the last request."""


def page_of(tasks, limit, keep):
    """The first `limit` kept tasks of the iterator `tasks`, and the id of the last one
    when another kept task follows (the next page's `after`), else None."""
    page = []
    for task in tasks:
        if keep(task):
            if len(page) == limit:
                return page, page[-1].task_id
            page.append(task)
    return page, None


class MemoryStore(Store):
    """Tasks in a dict, oldest first: the default store, and the in-memory table the
    persistent stores serve reads from.

    For paging it also keeps each task's creation rank (`Task.rank`) in a list, in order,
    so that a page after a given task is found by bisection: the entries of deleted tasks
    stay until they outnumber the live ones, and the ranks of the last
    MAX_REMOVED_REMEMBERED deleted ids are kept, so a page can follow a task deleted
    since the last one was read."""

    kind = "memory"

    def __init__(self, max_tasks=MAX_TASKS):
        self.max_tasks = max_tasks
        self.by_id = {}
        self.next_rank = 0
        self.rank_epoch = 0  # moves when the ranks start over (replace_all)
        self.ranked_ids = []  # task ids in creation order; a deleted one until compaction
        self.ranks = []  # their ranks, increasing: what page() bisects
        self.gone_ranks = {}  # task_id -> rank of recently deleted tasks, oldest first
        # The rank of every deletion, the last MAX_REMOVED_REMEMBERED of them, and how many
        # there were: what SnapshotParts reads to drop the parts that held them.
        self.forgotten_ranks = collections.deque(maxlen=MAX_REMOVED_REMEMBERED)
        self.forgotten_count = 0
        # The sweep's schedule (see plan_sweep()): ids to look at, by the whole second
        # their next check comes; a heap of those seconds; and the ids changed with no
        # check scheduled (new, or one that time alone never changes).
        self.checks_at = {}
        self.check_seconds = []
        self.second_objects = {}  # each second in check_seconds -> that same int
        self.unchecked = {}
        self.scheduled_rules = None  # the lifetimes the schedule was made for

    def __len__(self):
        return len(self.by_id)

    def check_room(self, updates):
        """Raise StoreFull when `updates` would add tasks past the cap."""
        by_id = self.by_id
        # A set comprehension with `not in`: `set - by_id.keys()` walks the whole store.
        new_ids = {update["task_id"] for update in updates if update["task_id"] not in by_id}
        if new_ids and len(by_id) + len(new_ids) > self.max_tasks:
            raise StoreFull(self.max_tasks, sorted(new_ids)[0])

    def apply(self, updates, now):
        self.check_room(updates)
        by_id = self.by_id
        changed = []
        for update in updates:
            task_id = update["task_id"]
            task = by_id.get(task_id)
            if task is None:
                task = by_id[task_id] = Task(task_id, now)
                self.rank(task)
            else:  # the dict key's string, not the equal one json.loads just made
                update["task_id"] = task.task_id
            status = task.status
            if apply_update(task, update, now):
                changed.append(task_id)
                # A new status may bring its time closer (closed: the retention period;
                # revived: the stale timeout): the next sweep works out its check anew.
                if task.check_at_s is None or task.status != status:
                    self.unchecked[task_id] = None
                    task.check_at_s = None
        return changed

    def rank(self, task):
        """Give a task new to this store the next creation rank."""
        task.rank = self.next_rank
        self.next_rank += 1
        self.ranked_ids.append(task.task_id)
        self.ranks.append(task.rank)

    def get(self, task_id):
        return self.by_id.get(task_id)

    def tasks(self):
        return list(self.by_id.values())

    def delete(self, task_ids):
        return self.forget(task_ids)

    def put(self, task):
        """Hold `task` as it is: one another server wrote (Redis), or one read back from
        disk (SQLite). A task this store holds already keeps its place."""
        held = self.by_id.get(task.task_id)
        if held is None:
            self.by_id[task.task_id] = task
            self.rank(task)
        else:
            task.rank = held.rank
            self.by_id[task.task_id] = task
        task.check_at_s = None  # a task as another server wrote it: check it anew
        self.unchecked[task.task_id] = None

    def replace_all(self, tasks_by_id):
        """Hold exactly these tasks (a resync from a shared store), in their order."""
        self.by_id = {}
        self.ranked_ids, self.ranks = [], []
        self.rank_epoch += 1  # every task gets a new rank: what was cut by rank is void
        for task in tasks_by_id.values():
            self.put(task)

    def forget(self, task_ids):
        """Drop `task_ids`; return the ones the store held. delete() is what a user
        asked for; forget() also serves the sweep."""
        by_id = self.by_id
        gone = self.gone_ranks
        removed = []
        for task_id in task_ids:
            task = by_id.pop(task_id, None)
            if task is not None:
                removed.append(task_id)
                gone[task_id] = task.rank
                self.forgotten_ranks.append(task.rank)
        self.forgotten_count += len(removed)
        while len(gone) > MAX_REMOVED_REMEMBERED:
            del gone[next(iter(gone))]
        if len(self.ranked_ids) > 2 * len(by_id) + 1024:
            self.ranked_ids = list(by_id)  # the dict is in creation order too
            self.ranks = [task.rank for task in by_id.values()]
        return removed

    def ranked(self):
        return self

    def ranked_tasks(self, low_rank, high_rank, limit):
        """Up to `limit` tasks whose creation rank is in [low_rank, high_rank), oldest
        first, and the rank of the next one in that range (None: there is none)."""
        by_id, ranked_ids, ranks = self.by_id, self.ranked_ids, self.ranks
        tasks = []
        for index in range(bisect.bisect_left(ranks, low_rank),
                           bisect.bisect_left(ranks, high_rank)):
            task = by_id.get(ranked_ids[index])
            if task is not None and task.rank == ranks[index]:
                if len(tasks) == limit:
                    return tasks, task.rank
                tasks.append(task)
        return tasks, None

    def page(self, after, limit, keep):
        start = 0
        if after is not None:
            held = self.by_id.get(after)
            gone_rank = self.gone_ranks.get(after)
            rank = held.rank if held is not None else gone_rank
            if rank is None:
                raise LookupError(after)
            if gone_rank is not None and gone_rank < rank:
                # Deleted and sent again since (a heartbeat after a ✕): the page that named
                # it listed it at its old place, so go on from there; going on from its new
                # place, at the end, would skip every task in between.
                rank = gone_rank
            start = bisect.bisect_right(self.ranks, rank)
        by_id, ranked_ids, ranks = self.by_id, self.ranked_ids, self.ranks

        def live_from_start():
            for index in range(start, len(ranked_ids)):
                task = by_id.get(ranked_ids[index])
                if task is not None and task.rank == ranks[index]:
                    yield task

        return page_of(live_from_start(), limit, keep)

    def sweep(self, now, settings):
        """Mark tasks that went stale or stalled (or back to running), delete expired
        ones, as of `now`; return (the marked ids, the removed ids)."""
        marked, removed_ids = self.plan_sweep(now, settings)
        for task, status in marked:
            task.status = status
        self.forget(removed_ids)
        return [task.task_id for task, _ in marked], removed_ids

    def plan_sweep(self, now, settings):
        """sweep_plan() over the tasks whose time has come, not over every task: those
        whose scheduled check is due at `now`, and those changed since the last sweep with
        none scheduled. Each task looked at gets its next check (next_check_at()).

        A million tasks must not cost a second a sweep: ingest never touches this
        schedule, and a task is looked at when time alone could have changed it (an
        update only ever moves its stale or expiry time later, so a check that comes
        early just finds it not due and schedules the next). One that speeds up while
        stale is off may read stalled up to its old pace's threshold late in the feed;
        readers see its status at once, derived at read time."""
        rules = (settings.stale_seconds, settings.stall_seconds, settings.stall_factor,
                 settings.retention_seconds, settings.max_task_age)
        if rules != self.scheduled_rules:  # the first sweep, or other rules: look at all
            self.scheduled_rules = rules
            self.checks_at, self.check_seconds, self.second_objects = {}, [], {}
            for task in self.by_id.values():
                task.check_at_s = None
            self.unchecked = dict.fromkeys(self.by_id)
        due = self.due_tasks(now)
        marked, expired_ids = sweep_plan(due, now, settings)
        gone = set(expired_ids)
        marking = {task.task_id: status for task, status in marked}
        for task in due:
            if task.task_id not in gone:
                self.schedule(task, next_check_at(task, settings,
                                                  marking.get(task.task_id)))
        return marked, expired_ids

    def due_tasks(self, now):
        """The tasks a sweep at `now` must look at, each once, taken off the schedule."""
        by_id = self.by_id
        due, seen = [], set()
        for task_id in self.unchecked:
            task = by_id.get(task_id)
            if task is not None and task.check_at_s is None:
                seen.add(task_id)
                due.append(task)
        self.unchecked = {}
        seconds = self.check_seconds
        while seconds and seconds[0] <= now:
            second = heapq.heappop(seconds)
            del self.second_objects[second]
            for task_id in self.checks_at.pop(second):
                task = by_id.get(task_id)
                # Its live entry only: a task deleted, or checked since, left old ones.
                if task is not None and task.check_at_s == second and task_id not in seen:
                    seen.add(task_id)
                    due.append(task)
        return due

    def schedule(self, task, at):
        """Have the sweep look at `task` again in the whole second of server time `at`
        (None: only once an update changes it)."""
        if at is None:
            task.check_at_s = None
            return
        second = math.floor(at)
        ids = self.checks_at.get(second)
        if ids is None:
            ids = self.checks_at[second] = []
            heapq.heappush(self.check_seconds, second)
            self.second_objects[second] = second
        # The one int object for that second: a new one per task would cost 28 bytes each.
        task.check_at_s = self.second_objects[second]
        ids.append(task.task_id)


# --- Runs (pure: no I/O) ---------------------------------------------------------------

RUN_MAX_HOSTS = 100  # hosts listed in a run's summary (PROTOCOL.md "Runs")
RUN_MAX_DEPTH = 32  # nesting levels followed in a run's progress: ends cycles, hostile chains


def _steps_done(task, children, depth=0):
    # task.n plus, for each open child with a known total, that child's fraction of one
    # more step; never past task.total. The depth bound keeps a hostile chain of parents
    # from reaching the recursion limit.
    done = task.n
    if depth < RUN_MAX_DEPTH:
        for child in children.get(task.task_id, ()):
            if child.total is not None and child.status not in FINAL_STATUSES:
                done += _fraction(child, children, depth + 1)
    return min(done, task.total)


def _fraction(task, children, depth=0):
    # A bar with a total of 0 has nothing to do: it is done.
    return _steps_done(task, children, depth) / task.total if task.total else 1.0


def run_status(counts, ended):
    """A run's status from its tasks' counts by status (docs/PROTOCOL.md "Runs"): while
    any task is open, stale before stalled before running; once all ended, error before
    close."""
    if not ended:
        return "stale" if "stale" in counts else "stalled" if "stalled" in counts else "running"
    return "error" if "error" in counts else "close"


def run_summary(run_id, tasks, now, shown_status):
    """The summary of run `run_id` (PROTOCOL.md "Runs") from its tasks at `now`, with each
    task's status read through `shown_status(task, now)`.

    Choices where PROTOCOL.md leaves room:

    - name: the `run_name` of the bar with the latest `updated_at` among those that sent
      one (ties: the larger task_id). Senders repeat their fields in every update, so
      that is the latest one sent; and unlike arrival order it survives a restart and is
      the same on every server sharing a Redis store.
    - progress: the mean, over the top-level bars with a known total, of each bar's
      fraction done. A top-level bar has no `parent`, or one that is not a task of this
      run (or itself). A bar's fraction is (n + c) / total, at most 1, where c adds, for
      each of its child bars that is open (not close or error) and has a known total,
      that child's own fraction, computed the same way (so grandchildren count too).
      Closed children add nothing: their parent's `n` already counts them. A total of 0
      is done (1). Example: epoch bar E (n=3, total=10, open) with an open batch bar
      under it (n=50, total=100) and a closed one (n=100, total=100); eval bar V (n=4,
      total=4, close); bar W whose parent is in another run (n=1, total=2); and bar X
      without a total. E = (3 + 0.5) / 10 = 0.35, V = 1, W = 0.5, X does not count:
      progress = (0.35 + 1 + 0.5) / 3 = 0.6167. Nesting is followed RUN_MAX_DEPTH
      levels deep.
    - eta: over the open top-level bars with a known total, each ends at its
      `updated_at` + (total - n - c) / rate (its own rate, with the same c as above);
      eta is the latest such end minus the run's `updated_at`, at least 0 (a reader
      adds it to `updated_at` for the wall-clock end). Null when there is no such bar
      (so once the run has ended), when one of them has work left and no rate (null or
      0), or when the figure is not finite.
    - hosts: the distinct `meta.host` values that are strings; other values are left out.
    """
    by_id = {task.task_id: task for task in tasks}
    counts = {}
    hosts = set()
    created_at, updated_at = math.inf, -math.inf
    named_by = None  # (updated_at, task_id) of the bar whose run_name is shown
    name = run_id
    top, children = [], {}
    for task_id, task in by_id.items():
        status = shown_status(task, now)
        counts[status] = counts.get(status, 0) + 1
        created_at = min(created_at, task.created_at)
        updated_at = max(updated_at, task.updated_at)
        host = task.meta.get("host") if task.meta else None
        if type(host) is str:
            hosts.add(host)
        if task.run_name is not None and (named_by is None
                                          or (task.updated_at, task_id) > named_by):
            named_by, name = (task.updated_at, task_id), task.run_name
        parent = task.parent
        if parent is None or parent == task_id or parent not in by_id:
            top.append(task)
        else:
            children.setdefault(parent, []).append(task)

    ended = all(status in FINAL_STATUSES for status in counts)
    status = run_status(counts, ended)

    fractions, ends = [], []
    for task in top:
        if task.total is None:
            continue
        fractions.append(_fraction(task, children))
        if task.status in FINAL_STATUSES or ends is None:
            continue
        remaining = task.total - _steps_done(task, children) if task.total else 0
        if remaining <= 0:
            ends.append(task.updated_at)
        elif task.rate:
            ends.append(task.updated_at + remaining / task.rate)
        else:
            ends = None  # this bar's end cannot be told, so neither can the slowest's
    eta = max(0.0, max(ends) - updated_at) if ends else None
    return {
        "run": run_id,
        "name": name,
        "status": status,
        "counts": counts,
        "tasks": len(by_id),
        "hosts": sorted(hosts)[:RUN_MAX_HOSTS],
        "progress": sum(fractions) / len(fractions) if fractions else None,
        "eta": eta if eta is not None and math.isfinite(eta) else None,
        "created_at": created_at if by_id else None,
        "updated_at": updated_at if by_id else None,
        "ended_at": updated_at if by_id and ended else None,
    }


class _Member:
    """What RunIndex keeps of one task: the fields a summary reads, copied at catch-up,
    and the task's share of its run's figures as last added (to take it back exactly)."""

    __slots__ = ("task_id", "run_id", "parent", "status", "is_open", "host", "run_name",
                 "created_at", "updated_at", "n", "total", "rate", "is_top", "done", "end")

    def __init__(self, task_id, run_id):
        self.task_id, self.run_id = task_id, run_id
        self.is_top = False
        self.created_at = self.updated_at = self.done = self.end = None

    def fraction(self):
        return self.done / self.total if self.total else 1.0

    def feeds_parent(self):
        # An open child with a total counts in its parent's steps (see run_summary()).
        return (self.is_open and self.total is not None and self.parent is not None
                and self.parent != self.task_id)


class _Run:
    """RunIndex's running totals for one run."""

    __slots__ = ("members", "children", "fed", "fed_count", "counts", "hosts",
                 "created_at", "updated_at", "named_by", "name", "rescan", "top_sum",
                 "top_count", "ends", "eta_end", "eta_by", "eta_unknown", "rescan_eta",
                 "changed_at", "told")

    def __init__(self):
        self.members = {}  # task_id -> _Member, in arrival order
        self.children = {}  # parent id -> ids of the members naming it, present or not
        self.fed = {}  # parent id -> sum of the fractions of its open children with totals
        self.fed_count = {}  # parent id -> how many children `fed` sums
        self.counts = {}  # shown status -> tasks
        self.hosts = {}  # meta.host -> tasks
        self.created_at, self.updated_at = math.inf, -math.inf
        self.named_by, self.name = (-math.inf, ""), None  # (updated_at, task_id) of the name
        self.rescan = False  # a task that held the times or the name left or went back
        self.top_sum, self.top_count = 0.0, 0  # fractions of the top-level bars with totals
        self.ends = {}  # open top-level bars with totals -> when each ends (None: unknown)
        self.eta_end, self.eta_by = -math.inf, None  # the latest end and its bar
        self.eta_unknown = 0  # how many `ends` are None
        self.rescan_eta = False  # the bar that ended last left or moved earlier
        self.changed_at = -math.inf  # the latest updated_at seen: the settle clock
        self.told = False  # its end was news; a new open bar makes it news again


class RunIndex:
    """Which tasks belong to which run, and every run's summary (`run_summary()` defines
    the figures), kept by running totals per run rather than by walking its tasks.

    `changed(task_ids)` only notes the ids (O(1) each, on the ingest path), as the Feed
    does; at its next read (`summary()`, `summaries()`, `task_ids()`, `take_changed()`,
    `ended_runs()`) the index catches up on them, each task's latest state once, at
    O(nesting depth) a task. A summary is cached until one of its run's tasks changes.

    The caller's duty: pass `changed()` every id the store reports changed (apply, sweep,
    a mirror or resync of another server's writes) and `removed()` every id it drops;
    `get_task(task_id)` gives the store's current Task. A task's status is read through
    `shown_status(task, now)` when the index catches up on it: time-dependent statuses
    (stale, stalled) reach a run once the sweep reports the task changed, so a run lags
    its tasks by at most one sweep."""

    def __init__(self, get_task, shown_status, run_settle_s=RUN_SETTLE_S):
        self.get_task = get_task  # task_id -> the store's Task, or None
        self.shown_status = shown_status  # (task, now) -> the status a reader sees
        self.run_settle_s = run_settle_s
        self.runs = {}  # run id -> _Run
        self.member_of = {}  # task_id -> _Member, for the tasks in a run
        self.summary_by_run = {}  # valid until a member changes, which drops it
        self.changed_runs = {}  # ordered set, since take_changed()
        self.removed_runs = set()  # since take_changed()
        self.settling = {}  # ordered set: all ended, not told yet; ended_runs() checks
        self.pending = {}  # ordered set: ids changed since the last catch-up

    def __len__(self):
        return len(self.runs)

    # Keeping the totals

    def changed(self, task_ids):
        """Note that these tasks were added or changed: O(1) each, on the ingest path.
        The index catches up on them, each task's latest state once, at its next read."""
        pending = self.pending
        for task_id in task_ids:
            pending[task_id] = None

    def removed(self, task_ids):
        """Record that the store dropped `task_ids` (deleted or expired)."""
        member_of = self.member_of
        for task_id in task_ids:
            member = member_of.get(task_id)
            if member is not None:
                self._leave(member.run_id, task_id)

    def _catch_up(self, now):
        pending, self.pending = self.pending, {}
        get_task, member_of = self.get_task, self.member_of
        for task_id in pending:
            task = get_task(task_id)
            if task is not None:
                self._count_change(task, now)
            elif task_id in member_of:  # gone from the store: as good as removed
                self._leave(member_of[task_id].run_id, task_id)

    def _count_change(self, task, now):
        task_id, run_id = task.task_id, task.run
        member = self.member_of.get(task_id)
        if member is not None:
            if member.run_id == run_id:
                run = self.runs[run_id]
                if self._update(run, member, task, now):
                    self._touched(run_id, run)
                else:
                    self.summary_by_run.pop(run_id, None)
                    self.changed_runs[run_id] = None
                return
            self._leave(member.run_id, task_id)
        if run_id is None:
            return
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = _Run()
            self.removed_runs.discard(run_id)
        member = self.member_of[task_id] = run.members[task_id] = _Member(task_id, run_id)
        for child_id in run.children.get(task_id, ()):  # no longer top-level
            child = run.members[child_id]
            if child.is_top:
                self._untop(run, child)
                child.is_top = False
        self._update(run, member, task, now, new=True)
        run.told = False  # a new bar reopens the run, even one that came closed
        self._touched(run_id, run)

    def _update(self, run, member, task, now, new=False):
        # Bring `member` up to date with `task`; return True when its counts changed.
        status = self.shown_status(task, now)
        host = task.meta.get("host") if task.meta else None
        host = host if type(host) is str else None
        old_created, old_updated = member.created_at, member.updated_at
        if (not new and status == member.status and host == member.host
                and task.parent == member.parent and task.total == member.total):
            # The common update (the bar moved on): its counts, its links and whether
            # the run has ended stay as they are; its steps, rate and times move.
            member.n, member.rate, member.run_name = task.n, task.rate, task.run_name
            member.created_at, member.updated_at = task.created_at, task.updated_at
            self._refresh_up(run, member)
            self._note_times(run, member, old_created, old_updated)
            return False
        if not new:
            self._uncount(run, member)
        member.parent, member.run_name = task.parent, task.run_name
        member.n, member.total, member.rate = task.n, task.total, task.rate
        member.created_at, member.updated_at = task.created_at, task.updated_at
        member.is_open = task.status not in FINAL_STATUSES
        member.status, member.host = status, host
        self._count(run, member)
        self._note_times(run, member, old_created, old_updated)
        if member.is_open:
            run.told = False  # reopened: its next end is news again
        return True

    def _leave(self, run_id, task_id):
        run = self.runs[run_id]
        member = run.members.pop(task_id)
        del self.member_of[task_id]
        self._uncount(run, member)
        for child_id in run.children.get(task_id, ()):  # top-level again
            child = run.members[child_id]
            child.is_top = True
            self._top(run, child)
        if (member.created_at == run.created_at or member.updated_at == run.updated_at
                or run.named_by[1] == task_id):
            run.rescan = True
        if run.members:
            self._touched(run_id, run)
            return
        # A run is its tasks: with the last one gone, it is gone.
        del self.runs[run_id]
        self.summary_by_run.pop(run_id, None)
        self.changed_runs.pop(run_id, None)
        self.settling.pop(run_id, None)
        self.removed_runs.add(run_id)

    def _count(self, run, member):
        # Add the member's share; its fields are set, its parent link is new.
        run.counts[member.status] = run.counts.get(member.status, 0) + 1
        if member.host is not None:
            run.hosts[member.host] = run.hosts.get(member.host, 0) + 1
        parent, task_id = member.parent, member.task_id
        if parent is not None and parent != task_id:
            run.children.setdefault(parent, set()).add(task_id)
        member.is_top = parent is None or parent == task_id or parent not in run.members
        member.done = self._done(run, member)
        if member.is_top:
            self._top(run, member)
        if member.feeds_parent():
            self._feed(run, member)
            self._refresh_up(run, run.members.get(parent))

    def _uncount(self, run, member):
        # Take back exactly what _count() added, before the member's fields change.
        self._decrement(run.counts, member.status)
        if member.host is not None:
            self._decrement(run.hosts, member.host)
        parent, task_id = member.parent, member.task_id
        if parent is not None and parent != task_id:
            siblings = run.children[parent]
            siblings.discard(task_id)
            if not siblings:
                del run.children[parent]
        if member.is_top:
            self._untop(run, member)
        if member.feeds_parent():
            self._unfeed(run, member)
            self._refresh_up(run, run.members.get(parent), stop_at=task_id)  # not again

    @staticmethod
    def _decrement(counter, key):
        if counter[key] == 1:
            del counter[key]
        else:
            counter[key] -= 1

    @staticmethod
    def _done(run, member):
        # Steps done: n plus the fractions of the open children with totals, at most total.
        if member.total is None:
            return None
        return min(member.n + run.fed.get(member.task_id, 0.0), member.total)

    @staticmethod
    def _feed(run, member):
        parent = member.parent
        run.fed[parent] = run.fed.get(parent, 0.0) + member.fraction()
        run.fed_count[parent] = run.fed_count.get(parent, 0) + 1

    @staticmethod
    def _unfeed(run, member):
        parent = member.parent
        if run.fed_count[parent] == 1:  # start again from 0: no rounding left behind
            del run.fed[parent], run.fed_count[parent]
        else:
            run.fed[parent] -= member.fraction()
            run.fed_count[parent] -= 1

    def _refresh_up(self, run, member, stop_at=None):
        # `member`'s steps done may have changed (its n, or its children's): pass the
        # change of its fraction on to the run's sum or to its parent, and so on up.
        # At most RUN_MAX_DEPTH levels: a cycle of parents, or a hostile chain, ends here.
        members, fed = run.members, run.fed
        for _ in range(RUN_MAX_DEPTH):
            if member is None or member.total is None or member.task_id == stop_at:
                return
            before = member.fraction()
            member.done = self._done(run, member)
            change = member.fraction() - before
            if member.is_top:
                run.top_sum += change
                if member.is_open:
                    self._set_end(run, member)
            if not member.feeds_parent():
                return
            fed[member.parent] += change
            member = members.get(member.parent)

    @staticmethod
    def _end(member):
        # When an open bar with a total would end at its rate; None when it cannot tell.
        remaining = member.total - member.done
        if remaining <= 0:
            return member.updated_at
        return member.updated_at + remaining / member.rate if member.rate else None

    @staticmethod
    def _note_end(run, member, end):
        # Record an open top-level bar's end; eta_end only grows between rescans, so it
        # bounds every end: one at or past it is the latest, even if the previous latest
        # left or moved earlier (the common case: the slowest bar moved on).
        member.end = run.ends[member.task_id] = end
        if end is None:
            run.eta_unknown += 1
        elif end >= run.eta_end:
            run.eta_end, run.eta_by = end, member.task_id
            run.rescan_eta = False
        elif run.eta_by == member.task_id:
            run.rescan_eta = True

    def _set_end(self, run, member):
        if member.end is None:
            run.eta_unknown -= 1
        self._note_end(run, member, self._end(member))

    def _top(self, run, member):
        if member.total is None:
            return
        run.top_sum += member.fraction()
        run.top_count += 1
        if member.is_open:
            self._note_end(run, member, self._end(member))

    @staticmethod
    def _untop(run, member):
        if member.total is None:
            return
        run.top_count -= 1
        run.top_sum = run.top_sum - member.fraction() if run.top_count else 0.0
        if not member.is_open:
            return
        del run.ends[member.task_id]
        if member.end is None:
            run.eta_unknown -= 1
        elif run.eta_by == member.task_id:
            run.rescan_eta = True

    @staticmethod
    def _note_times(run, member, old_created, old_updated):
        updated_at, task_id = member.updated_at, member.task_id
        run.changed_at = max(run.changed_at, updated_at)
        if updated_at >= run.updated_at:
            run.updated_at = updated_at
        elif old_updated == run.updated_at:  # the latest went back (another server's clock)
            run.rescan = True
        if member.created_at <= run.created_at:
            run.created_at = member.created_at
        elif old_created == run.created_at:
            run.rescan = True
        if member.run_name is not None and (updated_at, task_id) >= run.named_by:
            run.named_by, run.name = (updated_at, task_id), member.run_name
        elif run.named_by[1] == task_id:  # the name's bar dropped it or went back
            run.rescan = True

    def _touched(self, run_id, run):
        self.summary_by_run.pop(run_id, None)
        self.changed_runs[run_id] = None
        self._check_end(run_id, run)

    def _check_end(self, run_id, run):
        if not run.told and self._has_ended(run):
            self.settling[run_id] = None

    @staticmethod
    def _has_ended(run):
        counts = run.counts
        return counts.get("close", 0) + counts.get("error", 0) == len(run.members)

    @staticmethod
    def _rescan(run):
        # O(tasks of the run): only after the bar holding a time or the name left.
        run.created_at, run.updated_at = math.inf, -math.inf
        run.named_by, run.name = (-math.inf, ""), None
        for task_id, member in run.members.items():
            run.created_at = min(run.created_at, member.created_at)
            run.updated_at = max(run.updated_at, member.updated_at)
            if member.run_name is not None and (member.updated_at, task_id) >= run.named_by:
                run.named_by, run.name = (member.updated_at, task_id), member.run_name
        run.rescan = False

    @staticmethod
    def _rescan_eta(run):
        run.eta_end, run.eta_by = -math.inf, None
        for task_id, end in run.ends.items():
            if end is not None and end >= run.eta_end:
                run.eta_end, run.eta_by = end, task_id
        run.rescan_eta = False

    # Reading

    def load(self, task_ids, now):
        """Index the tasks a persistent store holds at startup. Runs that had ended and
        settled before `now` are not news again, and nothing is pending for the feed."""
        self.changed(task_ids)
        self.ended_runs(now)
        self.take_changed(now)

    def summary(self, run_id, now):
        """One run's summary (see `run_summary()`), or None when there is no such run;
        noted changes are caught up on at `now` first. The dict is shared with the
        cache: read it, do not change it."""
        if self.pending:
            self._catch_up(now)
        cached = self.summary_by_run.get(run_id)
        if cached is not None:
            return cached
        run = self.runs.get(run_id)
        if run is None:
            return None
        if run.rescan:
            self._rescan(run)
        if run.rescan_eta:
            self._rescan_eta(run)
        counts = dict(run.counts)
        ended = self._has_ended(run)
        status = run_status(counts, ended)
        eta = None
        if run.eta_by is not None and not run.eta_unknown:
            eta = max(0.0, run.eta_end - run.updated_at)
        progress = None
        if run.top_count:  # within 0..1 whatever rounding the running sum gathered
            progress = min(1.0, max(0.0, round(run.top_sum / run.top_count, 12)))
        cached = self.summary_by_run[run_id] = {
            "run": run_id,
            "name": run_id if run.name is None else run.name,
            "status": status,
            "counts": counts,
            "tasks": len(run.members),
            "hosts": sorted(run.hosts)[:RUN_MAX_HOSTS],
            "progress": progress,
            "eta": eta if eta is not None and math.isfinite(eta) else None,
            "created_at": run.created_at,
            "updated_at": run.updated_at,
            "ended_at": run.updated_at if ended else None,
        }
        return cached

    def summaries(self, now):
        """Every run's summary, keyed by run id (GET /runs, a snapshot)."""
        if self.pending:
            self._catch_up(now)
        return {run_id: self.summary(run_id, now) for run_id in self.runs}

    def task_ids(self, run_id, now):
        """The ids of the tasks of `run_id`, in arrival order (GET /runs/{run})."""
        if self.pending:
            self._catch_up(now)
        run = self.runs.get(run_id)
        return list(run.members) if run is not None else []

    def take_changed(self, now):
        """(run ids changed, run ids gone) since the last call, for the feed's update and
        remove messages; a run that went and came back is only changed."""
        if self.pending:
            self._catch_up(now)
        changed, removed = list(self.changed_runs), sorted(self.removed_runs)
        self.changed_runs = {}
        self.removed_runs = set()
        return changed, removed

    def ended_runs(self, now):
        """The runs whose end is news at `now`: all their tasks ended and the latest
        `updated_at` of any of them is run_settle_s old. Each is returned once, until a
        new bar, or a bar that reads open again, reopens it; a later change to an ended
        bar that stays ended is not news again."""
        if self.pending:
            self._catch_up(now)
        news = []
        for run_id in list(self.settling):
            run = self.runs[run_id]
            if run.told or not self._has_ended(run):
                del self.settling[run_id]
            elif now - run.changed_at >= self.run_settle_s:
                run.told = True
                del self.settling[run_id]
                news.append(run_id)
        return news


# --- Stores that persist: SQLite and Redis (I/O) ---------------------------------------


class StoreError(Exception):
    """A store that cannot be opened; the message says what to fix."""


def _task_json(task):
    return json.dumps(task.as_stored(), separators=(",", ":"))


def task_from_store(stored, source):
    """The Task a store handed back, checked as an update from the network is; None when
    it does not pass (logged, once per task): one bad record must not stop the server,
    break /health for everyone, or let anyone who can PUBLISH on Redis do so."""
    if stored is None:  # not JSON: stored_json() said so
        return None
    try:
        if type(stored) is not dict:
            raise InvalidUpdate("not a JSON object")
        # None is what a task holds for a field no update set yet (seq, elapsed...).
        fields = {name: value for name, value in stored.items() if value is not None}
        status = fields.pop("status", "running")
        if status not in STATUSES:
            raise InvalidUpdate(f"status: must be one of {', '.join(STATUSES)}, not "
                                f"{status!r:.60}")
        validate_update(fields)
        for name in ("created_at", "updated_at", "progressed_at", "history_step_s"):
            if name in stored:
                _number(stored[name], name, minimum=-math.inf)
        if stored.get("typical_step_s") is not None:
            _number(stored["typical_step_s"], "typical_step_s")
        for name in ("history_t_exp", "history_n_exp"):  # units of 2**exp: stay in range
            if name in stored and not (type(stored[name]) is int
                                       and -64 <= stored[name] <= 1024):
                raise InvalidUpdate(f"{name}: must be a whole number from -64 to 1024")
        return Task.from_dict(stored)
    except (InvalidUpdate, ValueError, TypeError, KeyError, AttributeError) as error:
        task_id = stored.get("task_id") if type(stored) is dict else None
        log.warning("skipping task %.80r from %s: %s", task_id, source, error)
        return None


def stored_json(text, source):
    """`text` (a store's record) parsed as JSON, or None, logged, when it is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as error:
        log.warning("skipping a record from %s that is not JSON: %s", source, error)
        return None


class SqliteStore(MemoryStore):
    """MemoryStore whose tasks survive a restart, in one SQLite file (WAL mode).

    Reads are served from memory. Changes are marked dirty and written by `flush()`, once
    per broadcast interval, in one transaction on a writer thread: the loop never waits
    on the disk. A request carrying a final state (close, error), and a DELETE, is
    answered once it is written. After a restart the lifetimes go on from the stored
    times."""

    kind = "sqlite"

    def __init__(self, path, max_tasks=MAX_TASKS):
        super().__init__(max_tasks)
        self.path = path
        self.dirty_ids = {}  # a dict as an ordered set: new tasks get rows in order
        self.deleted_ids = set()
        self.failed = False
        self.db = self._connect(path)
        self._load()
        # One writer thread owns the connection from here on.
        self.writer = concurrent.futures.ThreadPoolExecutor(1, "progressista-sqlite")

    @staticmethod
    def _connect(path):
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps this crash-safe
            db.execute("CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, "
                       "task TEXT NOT NULL, created_at REAL NOT NULL)")
            db.execute("PRAGMA user_version=1")  # proves the file is writable now
            return db
        except sqlite3.Error as error:
            raise StoreError(f"cannot use SQLite store {path!r}: {error} (is it a "
                             "writable SQLite database file in an existing folder?)") from None

    def _load(self):
        try:
            rows = self.db.execute("SELECT task FROM tasks ORDER BY created_at, rowid").fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"cannot read SQLite store {self.path!r}: {error}") from None
        source = f"SQLite store {self.path!r}"
        for (stored,) in rows:  # a bad row is skipped and logged; the others load
            task = task_from_store(stored_json(stored, source), source)
            if task is not None:
                self.put(task)

    def apply(self, updates, now):
        changed = super().apply(updates, now)
        self.dirty_ids.update(dict.fromkeys(changed))
        if changed and any(update.get("status") in FINAL_STATUSES for update in updates):
            # A sender stops sending once its final state is acknowledged: answer only when
            # that state is on disk, so that not even a crash (kill -9) right after loses it.
            return self.written(changed)
        return changed

    async def written(self, changed):
        await self.flush()
        # A flush already under way may hold these rows; the writer runs its work in
        # order, so once this no-op has run they are written.
        await asyncio.get_running_loop().run_in_executor(self.writer, int)
        return changed

    def forget(self, task_ids):
        removed = super().forget(task_ids)
        self.deleted_ids.update(removed)
        for task_id in removed:
            self.dirty_ids.pop(task_id, None)
        return removed

    def delete(self, task_ids):
        removed = self.forget(task_ids)
        # Answered once written, as final states are: a crash must not bring back what a
        # user cleared. (An expiry by the sweep needs no wait: it would expire again.)
        return self.written(removed) if removed else removed

    def sweep(self, now, settings):
        marked_ids, removed_ids = super().sweep(now, settings)
        self.dirty_ids.update(dict.fromkeys(marked_ids))
        return marked_ids, removed_ids

    def health(self):
        return {"kind": self.kind, "ok": not self.failed, "path": self.path}

    def _pending_rows(self):
        rows = [(task.task_id, _task_json(task), task.created_at)
                for task in map(self.by_id.get, self.dirty_ids) if task is not None]
        deleted = [(task_id,) for task_id in self.deleted_ids]
        self.dirty_ids, self.deleted_ids = {}, set()
        return rows, deleted

    def _write(self, rows, deleted):
        with self.db:  # one transaction
            self.db.execute("BEGIN")
            # Deletes first: a task deleted and then sent again within one flush is in both.
            self.db.executemany("DELETE FROM tasks WHERE task_id = ?", deleted)
            # An upsert keeps the row id, which orders tasks created in the same batch.
            self.db.executemany("INSERT INTO tasks VALUES (?, ?, ?) ON CONFLICT(task_id) "
                                "DO UPDATE SET task = excluded.task", rows)

    async def flush(self):
        """Write what changed since the last flush, off the loop."""
        if not self.dirty_ids and not self.deleted_ids:
            return
        rows, deleted = self._pending_rows()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.writer, self._write, rows, deleted)
        except Exception as error:  # sqlite3.Error, or anything else: lose nothing
            # Keep the changes to write them next time; say so once, not every tick.
            self.dirty_ids.update(dict.fromkeys(row[0] for row in rows if row[0] in self.by_id))
            self.deleted_ids.update(row[0] for row in deleted)
            self.failures += 1
            if not self.failed:
                log.error("cannot write SQLite store %s: %s; will retry", self.path, error)
            self.failed = True
        else:
            if self.failed:
                log.warning("SQLite store %s is writable again", self.path)
            self.failed = False

    async def close(self):
        await self.flush()
        self.writer.shutdown(wait=True)
        self.db.close()


REDIS_PREFIX = "progressista:"
REDIS_RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # reconnect backoff, capped at the last
REDIS_TIMEOUT_S = 2.0
REDIS_POLL_S = 0.2  # how long the follower waits for a message before checking in

# Write each task only if its seq is newer than the stored one (or either has none), so
# two servers that receive one bar's updates in a different order agree on the last. A
# stale mark keeps the seq it saw, so it may also write over that same seq (ARGV[2] = 1).
# KEYS: task keys; ARGV: index key, same-seq flag, then per task: seq, created_at,
# ttl_ms, task_id, json.
# Seqs are compared as decimal strings (0 to 2**63-1, no leading zeros): tonumber() is a
# double, which cannot tell 2**53 from 2**53 + 1.
REDIS_WRITE_SCRIPT = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local written = {}
local same_ok = ARGV[2] == '1'
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 5
  local seq, created, ttl, id, body = ARGV[base+1], ARGV[base+2], ARGV[base+3], ARGV[base+4], ARGV[base+5]
  local stored = redis.call('HGET', key, 'seq')
  if seq == '' or not stored or stored == '' or newer(seq, stored)
     or (same_ok and seq == stored) then
    redis.call('HSET', key, 'seq', seq, 'task', body)
    if tonumber(ttl) > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
    redis.call('ZADD', ARGV[1], 'NX', created, id)
    written[#written + 1] = id
  end
end
return written
"""

# The sweeper lease: taken when free, renewed by its holder, so one server sweeps.
REDIS_LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def redis_ttl_ms(task, settings):
    """Server-side expiry for a task's key: Redis deletes it when a lifetime rule would."""
    limits = []
    if settings.max_task_age:
        limits.append(settings.max_task_age)
    if task.status in RETAINED_STATUSES and settings.retention_seconds:
        limits.append(settings.retention_seconds)
    # A margin past the sweep, so that the sweeper broadcasts the removal first.
    return int((min(limits) + 2 * settings.cleanup_interval) * 1000) if limits else 0


class RedisStore(Store):
    """Tasks in Redis, shared by every server on it; each server mirrors them in memory.

    Writes go to Redis first (503 when it is unreachable) and are published on a channel;
    every server applies what the others publish, so all show the same tasks. One server
    at a time holds the sweeper lease and marks stale and expires for all."""

    kind = "redis"

    def __init__(self, url, settings):
        self.local = MemoryStore(settings.max_tasks)  # the mirror that answers reads
        try:
            import redis.asyncio as aioredis
            import redis.exceptions
        except ImportError:
            raise StoreError("the redis store needs the redis package: "
                             "pip install 'progressista[redis]'") from None
        self.errors = (redis.exceptions.RedisError, OSError)
        self.shown_url = masked_url(url)  # never log a password
        self.settings = settings
        self.connect = lambda: aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                                 socket_connect_timeout=REDIS_TIMEOUT_S)
        self.client = None  # made in open(): on 3.9 its locks bind to the loop it is made on
        self.index_key = REDIS_PREFIX + "tasks"
        self.channel = REDIS_PREFIX + "events"
        self.lease_key = REDIS_PREFIX + "sweeper"
        self.origin = os.urandom(8).hex()
        self.write_script = self.lease_script = None
        self.ok = None  # not known until the first exchange
        self.feed = None
        self.subscriber = None
        self.closing = False
        self.is_sweeper = False  # holds the sweeper lease (as of the last sweep)

    def get(self, task_id):
        return self.local.get(task_id)

    def tasks(self):
        return self.local.tasks()

    def __len__(self):
        return len(self.local)

    def page(self, after, limit, keep):
        return self.local.page(after, limit, keep)

    def ranked(self):
        return self.local

    def key(self, task_id):
        return REDIS_PREFIX + "task:" + task_id

    def health(self):
        return {"kind": self.kind, "ok": bool(self.ok), "url": self.shown_url}

    def went_down(self, error):
        if self.ok is not False:  # up, or not yet known (at startup): say it once
            log.error("Redis store %s is unreachable: %s; answering 503 to writes until "
                      "it is back", self.shown_url, error)
        self.ok = False
        self.failures += 1
        return StoreUnavailable(f"the Redis store is unreachable ({error}); the update was "
                                "not stored: retry later")

    def came_back(self):
        if self.ok is False:
            log.info("Redis store %s is reachable", self.shown_url)
        self.ok = True

    async def open(self, feed):
        self.feed = feed
        self.client = self.connect()
        self.write_script = self.client.register_script(REDIS_WRITE_SCRIPT)
        self.lease_script = self.client.register_script(REDIS_LEASE_SCRIPT)
        try:  # serve what Redis holds from the first request on
            await self.resync()
            self.came_back()
        except self.errors as error:
            self.went_down(error)
        self.subscriber = asyncio.get_running_loop().create_task(self.follow())

    async def close(self):
        self.closing = True
        if self.subscriber is not None:
            # redis-py can swallow a cancel inside get_message(): ask the follower to
            # stop at its next poll, and cancel only one that does not.
            await asyncio.wait([self.subscriber], timeout=REDIS_TIMEOUT_S + REDIS_POLL_S)
            self.subscriber.cancel()
            await asyncio.wait([self.subscriber], timeout=REDIS_TIMEOUT_S)
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.aclose(), REDIS_TIMEOUT_S)
        except (asyncio.TimeoutError, *self.errors):
            pass  # shutting down: a Redis that does not answer must not hang us

    async def resync(self):
        """Replace the mirror with what Redis holds and broadcast the difference."""
        ids = [task_id.decode() for task_id in await self.client.zrange(self.index_key, 0, -1)]
        fresh = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            pipe = self.client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.hget(self.key(task_id), "task")
            for task_id, stored in zip(chunk, await pipe.execute()):
                task = stored is not None and task_from_store(
                    stored_json(stored, self.shown_url), self.shown_url)
                if task and task.task_id == task_id:
                    fresh[task_id] = task
        gone = [task_id for task_id in ids if task_id not in fresh]
        if gone:  # expired by Redis itself while no server was sweeping
            await self.client.zrem(self.index_key, *gone)
        local = self.local
        removed = [task.task_id for task in local.tasks() if task.task_id not in fresh]
        changed = [task_id for task_id, task in fresh.items()
                   if (local.get(task_id) is None
                       or local.get(task_id).updated_at != task.updated_at
                       or local.get(task_id).status != task.status)]  # a stale mark
        local.replace_all(fresh)
        self.feed.removed(removed)
        self.feed.changed(changed)

    async def follow(self):
        """Mirror what other servers publish; after any outage, resync from Redis."""
        failures = 0
        while not self.closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self.resync()
                self.came_back()
                failures = 0
                while not self.closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=REDIS_POLL_S)
                    if message is not None:
                        self.mirror(stored_json(message["data"], self.channel))
            except asyncio.CancelledError:
                raise
            except self.errors as error:
                self.went_down(error)
            except Exception:
                log.error("Redis follower failed; restarting it", exc_info=True)
            finally:
                try:  # bounded: when cancelled mid-command, aclose() can wait forever
                    await asyncio.wait_for(pubsub.aclose(), REDIS_TIMEOUT_S)
                except (asyncio.TimeoutError, *self.errors):
                    pass
            if not self.closing:
                await asyncio.sleep(REDIS_RETRY_S[min(failures, len(REDIS_RETRY_S) - 1)])
                failures += 1

    def mirror(self, event):
        """Apply a change another server published; skip (and log) what does not pass
        the checks of an update: anyone who can reach Redis can publish."""
        if event is None:  # not JSON, and already logged
            return
        changed_list = removed = None
        if type(event) is dict:
            if event.get("origin") == self.origin:
                return
            changed_list, removed = event.get("changed", []), event.get("removed", [])
        if type(changed_list) is not list or type(removed) is not list or not all(
                type(task_id) is str for task_id in removed):
            log.warning("skipping a message on %s that is not a change of tasks",
                        self.channel)
            return
        changed = []
        for stored in changed_list:
            task = task_from_store(stored, self.channel)
            if task is None:
                continue
            held = self.local.get(task.task_id)
            if held is None or held.seq is None or task.seq is None or task.seq >= held.seq:
                self.local.put(task)
                changed.append(task.task_id)
        self.feed.changed(changed)
        self.feed.removed(self.local.forget(removed))

    async def write_and_publish(self, tasks, same_seq_ok=False):
        """Store `tasks` (where their seq is newest) and tell the other servers; return
        the ids written. Each task is encoded once, for both."""
        encoded = {task.task_id: _task_json(task) for task in tasks}
        keys, args = [], [self.index_key, "1" if same_seq_ok else "0"]
        for task in tasks:
            keys.append(self.key(task.task_id))
            args += ["" if task.seq is None else task.seq, task.created_at,
                     redis_ttl_ms(task, self.settings), task.task_id, encoded[task.task_id]]
        written = {task_id.decode() for task_id in
                   await self.write_script(keys=keys, args=args)}
        if written:  # in the order given: the other mirrors add new tasks in it
            await self.publish([text for task_id, text in encoded.items() if task_id in written],
                               ())
        return written

    async def publish(self, changed_json, removed_ids):
        # Built around the already-encoded tasks rather than decoding them again.
        await self.client.publish(self.channel, '{"origin":%s,"changed":[%s],"removed":%s}' % (
            json.dumps(self.origin), ",".join(changed_json), json.dumps(list(removed_ids))))

    async def apply(self, updates, now):
        """Store in Redis, then in the mirror; all or nothing, 503 when Redis is down."""
        self.local.check_room(updates)
        staged = {}
        for update in updates:
            task_id = update["task_id"]
            task = staged.get(task_id) or self.local.get(task_id)
            task = task.copy() if task is not None else Task(task_id, now)
            if apply_update(task, update, now):
                staged[task_id] = task
        try:
            if staged:
                written = await self.write_and_publish(list(staged.values()))
                staged = {task_id: task for task_id, task in staged.items()
                          if task_id in written}
        except self.errors as error:
            raise self.went_down(error) from None
        self.came_back()
        for task in staged.values():
            self.local.put(task)
        return list(staged)

    async def delete(self, task_ids):
        task_ids = list(task_ids)
        if not task_ids:
            return []
        try:
            pipe = self.client.pipeline(transaction=True)
            for task_id in task_ids:
                pipe.delete(self.key(task_id))
            pipe.zrem(self.index_key, *task_ids)
            deleted = (await pipe.execute())[:-1]
            removed = [task_id for task_id, count in zip(task_ids, deleted) if count]
            if removed:
                await self.publish((), removed)
        except self.errors as error:
            raise self.went_down(error) from None
        self.local.forget(removed)
        return removed

    async def sweep(self, now, settings):
        """Mark stale or stalled and expire for every server, if this one holds the
        sweeper lease."""
        try:
            lease_ms = int(max(3 * settings.cleanup_interval, 1.0) * 1000)
            self.is_sweeper = bool(await self.lease_script(keys=[self.lease_key],
                                                           args=[self.origin, lease_ms]))
            if not self.is_sweeper:
                return [], []
            marked, doomed = self.local.plan_sweep(now, settings)
            for task, status in marked:
                task.status = status
            marked_tasks = [task for task, _ in marked]
            if marked_tasks:
                await self.write_and_publish(marked_tasks, same_seq_ok=True)
            removed = await self.delete(doomed)
        except self.errors as error:
            self.is_sweeper = False
            self.went_down(error)
            return [], []
        except StoreUnavailable:  # delete() found Redis down and said so
            return [], []
        return [task.task_id for task in marked_tasks], removed


def open_store(url, settings):
    """The store a ``--store`` URL names: memory://, sqlite:///path.db or redis://host."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryStore(settings.max_tasks)
    if scheme == "sqlite":
        path = url[len("sqlite://"):]
        if not path:
            raise StoreError("sqlite store needs a path: sqlite:///path/to/file.db")
        return SqliteStore(path, settings.max_tasks)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, settings)
    raise StoreError(f"unknown store {url!r}: use memory://, sqlite:///path/to/file.db "
                     "or redis://host:6379/0")


# --- Live feed (pure: no I/O) ----------------------------------------------------------


def _encode(message):
    # ASCII output: a lone surrogate that json.loads accepted can never break the encode.
    return json.dumps(message, separators=(",", ":")).encode()


class ChangeLog:
    """When each task last changed and which were deleted lately, for pollers
    (GET /tasks?since=T; docs/PROTOCOL.md "Reading tasks: GET /tasks").

    It costs one dict entry per task: its last change time, the dict kept in the order of
    those times, so that the tasks changed since T are read from its end."""

    def __init__(self, clock, max_removed=MAX_REMOVED_REMEMBERED):
        self.clock = clock
        self.changed_at = {}  # task_id -> server time of its last change, oldest first
        self.removed_log = collections.deque()  # (server time, task_id), oldest first
        self.max_removed = max_removed
        self.known_since = clock()  # deletions before this are not known: resync

    def changed(self, task_ids):
        now = self.clock()
        changed_at = self.changed_at
        for task_id in task_ids:
            changed_at.pop(task_id, None)  # to the end: the order is the order of changes
            changed_at[task_id] = now

    def removed(self, task_ids):
        now = self.clock()
        log_ = self.removed_log
        for task_id in task_ids:
            self.changed_at.pop(task_id, None)
            log_.append((now, task_id))
        while len(log_) > self.max_removed:
            self.known_since = log_.popleft()[0]

    def since(self, since_t):
        """(ids changed at or after `since_t`, oldest change first; ids deleted since then
        and not back; True when deletions before `since_t` are forgotten or the server
        started after it, so the caller must resync)."""
        changed = []
        changed_at = self.changed_at
        for task_id in reversed(changed_at):  # newest first; stop at the first older one
            if changed_at[task_id] < since_t:
                break
            changed.append(task_id)
        changed.reverse()
        removed = {}
        for removed_at, task_id in reversed(self.removed_log):
            if removed_at < since_t:
                break
            if task_id not in changed_at:  # deleted and not sent again since
                removed[task_id] = None
        return changed, list(removed), since_t < self.known_since


class Feed:
    """What changed since the last broadcast, coalesced: the latest state per task wins.

    Every change to the store goes through `changed()` / `removed()`, and each observer
    given (the ChangeLog for pollers, the RunIndex) hears of it too. `take()` turns what
    is pending into at most one remove and one update message, with the summaries of
    the runs that changed."""

    def __init__(self, *observers):
        # A dict as an ordered set: an update message lists tasks in the order they first
        # changed, so the tasks of one batch arrive in the order they were created.
        self.changed_ids = {}
        self.removed_ids = set()
        self.ended_run_ids = {}  # ordered set: runs whose end is news (once each)
        self.observers = observers

    def changed(self, task_ids):
        changed_ids = self.changed_ids
        for task_id in task_ids:
            changed_ids[task_id] = None
        if self.removed_ids:
            self.removed_ids.difference_update(task_ids)
        for observer in self.observers:
            observer.changed(task_ids)

    def removed(self, task_ids):
        self.removed_ids.update(task_ids)
        changed_ids = self.changed_ids
        for task_id in task_ids:
            changed_ids.pop(task_id, None)
        for observer in self.observers:
            observer.removed(task_ids)

    def runs_ended(self, run_ids):
        """Runs whose end is news now (RunIndex.ended_runs): the next update says so."""
        self.ended_run_ids.update(dict.fromkeys(run_ids))

    def clear(self):
        self.changed_ids = {}
        self.removed_ids = set()
        self.ended_run_ids = {}

    def pending(self):
        """(the ids changed, the ids removed) since the last take, for the notifier."""
        return self.changed_ids, self.removed_ids

    def discard(self, now, runs=None):
        """Forget what is pending, the runs' changes too: nobody listens, and a listener
        that comes gets a snapshot of everything."""
        self.clear()
        if runs is not None:
            runs.take_changed(now)

    def take(self, store, now, thresholds, runs=None):
        """Return the encoded messages pending (possibly none) and forget them. With
        `runs` (a RunIndex), they carry the summaries of the runs that changed."""
        changed_runs, gone_runs = runs.take_changed(now) if runs is not None else ((), ())
        messages = []
        if self.removed_ids or gone_runs:
            remove = {"type": "remove", "ids": sorted(self.removed_ids), "now": now}
            if gone_runs:
                remove["runs"] = gone_runs
            messages.append(_encode(remove))
        tasks = {}
        for task_id in self.changed_ids:
            task = store.get(task_id)
            if task is not None:
                tasks[task_id] = task.as_dict(now, thresholds)
        summaries = {}
        for run_id in changed_runs:
            summary = runs.summary(run_id, now)
            if summary is not None:
                summaries[run_id] = summary
        if tasks or summaries or self.ended_run_ids:
            update = {"type": "update", "tasks": tasks, "now": now}
            if summaries:
                update["runs"] = summaries
            if self.ended_run_ids:
                update["runs_ended"] = list(self.ended_run_ids)
            messages.append(_encode(update))
        self.clear()
        return messages


def snapshot_message(store, now, thresholds, runs=None):
    """The whole snapshot as one message (a store of at most SNAPSHOT_CHUNK_TASKS), with
    every run's summary when `runs` (a RunIndex) is given."""
    tasks = {task.task_id: task.as_dict(now, thresholds) for task in store.tasks()}
    message = {"type": "snapshot", "tasks": tasks, "now": now}
    if runs is not None:
        message["runs"] = runs.summaries(now)
    return _encode(message)


class ListedTasks:
    """A store without creation ranks (a custom Store) seen as a ranked one: its tasks as
    listed at one moment, ranked by their place in that list, each read again from the
    store when its part is encoded. Nothing of it is reused by a later snapshot."""

    def __init__(self, store):
        self.store = store
        self.held = store.tasks()
        self.next_rank = len(self.held)

    def ranked_tasks(self, low_rank, high_rank, limit):
        stop = min(high_rank, self.next_rank)
        tasks = []
        for rank in range(low_rank, stop):
            if len(tasks) == limit:
                return tasks, rank
            task = self.store.get(self.held[rank].task_id)
            if task is not None:
                tasks.append(task)
        return tasks, None


class _Part:
    """One part of a big snapshot, as last encoded."""

    __slots__ = ("body", "valid_until", "next_rank")

    def __init__(self, tasks, body, now, thresholds, next_rank):
        self.body = body  # the inside of the `tasks` object: "id":{...},"id":{...}
        # From then on time alone may change a status it shows (stale, stalled).
        changes_at = (task.shown_until(now, thresholds) for task in tasks)
        self.valid_until = min((time_s for time_s in changes_at if time_s is not None),
                               default=math.inf)
        self.next_rank = next_rank  # the store's next creation rank when it was built


class SnapshotParts:
    """A big store's snapshot cut into parts of at most `part_tasks` tasks by creation
    rank, each part encoded once and reused by every later snapshot while it still holds:
    at a million tasks a part costs milliseconds to encode and next to nothing to reuse,
    so listeners that (re)connect every second cost the ingest little
    (bench/bench_scale.py). What it costs is memory, about the size of the encoded
    snapshot, while it is held: the Hub drops it once no snapshot has used it for
    SNAPSHOT_CACHE_IDLE_S.

    A part is encoded anew when one of its tasks changed (the ChangeLog `changes` lists
    them since the last look) or was deleted (the store logs every deletion's rank) since,
    when tasks were created within its range (the last part, whose range is open), or
    from the moment time alone may change a status it shows (Task.shown_until()). Part
    boundaries (`lows`) only split, never move, so a part's range
    stays the same between two snapshots. With `changes` None nothing is reused (a store
    without ranks, seen through ListedTasks)."""

    def __init__(self, source, thresholds, part_tasks, changes=None):
        self.source = source  # a MemoryStore, or ListedTasks (then `changes` is None)
        self.thresholds = thresholds
        self.part_tasks = part_tasks
        self.changes = changes
        self.lows = [0]  # the first rank of each part; the last part runs to the end
        self.parts = {}  # a part's first rank -> _Part
        self.looked_at = self.rank_epoch = self.forgotten_seen = 0  # what was looked at
        if changes is not None:  # (only a MemoryStore's parts are reused)
            self.looked_at = changes.clock()
            self.rank_epoch = source.rank_epoch
            self.forgotten_seen = source.forgotten_count
        self.used_at = 0.0  # loop time, for the Hub to drop an idle cache

    def first(self):
        return self.lows[0]

    def part(self, low, now):
        """(the encoded tasks of the part starting at rank `low`, the next part's first
        rank or None after the last, True when it was encoded now rather than reused)."""
        self.forget_changed()
        lows = self.lows
        index = bisect.bisect_right(lows, low) - 1
        high = lows[index + 1] if index + 1 < len(lows) else math.inf
        held = self.parts.get(low)
        if (held is not None and now < held.valid_until
                and (high != math.inf or held.next_rank == self.source.next_rank)):
            return held.body, (None if high == math.inf else high), False
        tasks, rest = self.source.ranked_tasks(low, high, self.part_tasks)
        if rest is not None:  # too many for one part: it ends where the rest begins
            lows.insert(index + 1, rest)
            high = rest
        tasks_json = {task.task_id: task.as_dict(now, self.thresholds) for task in tasks}
        body = _encode(tasks_json)[1:-1]
        if self.changes is not None:
            self.parts[low] = _Part(tasks, body, now, self.thresholds, self.source.next_rank)
        return body, (None if high == math.inf else high), True

    def forget_changed(self):
        """Drop the parts whose tasks changed or went since the last look: a changed task
        is in the part of its rank; every deletion's rank is in the store's log, also a
        task's that was deleted, sent again and deleted again in between."""
        if self.changes is None:
            return
        source = self.source
        now = self.changes.clock()
        deletions = source.forgotten_count - self.forgotten_seen
        self.forgotten_seen = source.forgotten_count
        if not self.parts:
            self.looked_at = now
            return
        changed = self.changes.since(self.looked_at)[0]
        self.looked_at = now  # since() counts changes at that time too: none is missed
        if (source.rank_epoch != self.rank_epoch
                or deletions > len(source.forgotten_ranks)):  # more than it remembers
            self.parts.clear()
            self.rank_epoch = source.rank_epoch
            return
        ranks = [task.rank for task in map(source.get, changed) if task is not None]
        if deletions:
            ranks.extend(itertools.islice(reversed(source.forgotten_ranks), deletions))
        lows, parts = self.lows, self.parts
        for rank in ranks:
            parts.pop(lows[bisect.bisect_right(lows, rank) - 1], None)


class Pacer:
    """How long a big snapshot (or GET /tasks) waits after a step: not at all while no
    updates come in, else long enough that its steps take at most SNAPSHOT_CPU_SHARE of
    the loop: a big read takes longer on a busy server rather than slowing its ingest."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.updates_seen = metrics.updates_received

    def pause_s(self, step_s):
        """The pause after a step that took `step_s` (encoding and sending)."""
        seen, self.updates_seen = self.updates_seen, self.metrics.updates_received
        if seen == self.updates_seen:
            return 0.0
        return step_s * (1 - SNAPSHOT_CPU_SHARE) / SNAPSHOT_CPU_SHARE


def snapshot_part_message(body, first, more, now, runs_json=None):
    """One part of a chunked snapshot: `snapshot` for the `first` part (with every run's
    summary, `runs_json`, encoded), `snapshot_more` for the others; `more` false on the
    last. The same bytes as _encode() of the message as a dict."""
    message = b'{"type":"%s","tasks":{%s},"more":%s,"now":%s' % (
        b"snapshot" if first else b"snapshot_more", body, b"true" if more else b"false",
        _encode(now))
    if runs_json is not None:
        message += b',"runs":' + runs_json
    return message + b"}"


# --- Notifications ---------------------------------------------------------------------
# When a task closes, fails or goes stale, or a run ends, a message to webhooks. The pure
# part decides which changes are events and turns a window of them into one message
# (`Notifier`, `notify_event()`, `run_event()`, `notify_message()`); one daemon thread per
# webhook does the POSTs (`WebhookSender`), so a slow or dead webhook never holds up the
# event loop or ingest.

NOTIFY_TIMEOUT_S = 10.0  # one POST to a webhook is given up after this long
NOTIFY_RETRY_INITIAL_S = 1.0  # the first retry waits this long; each next one twice as long
NOTIFY_RETRY_MAX_S = 60.0  # cap on a retry delay, a 429's Retry-After included
NOTIFY_ATTEMPTS = 6  # POSTs per message, the first included (about 30 s of retries)
NOTIFY_QUEUE_MESSAGES = 100  # messages waiting per webhook; past it the oldest is dropped
NOTIFY_SHUTDOWN_S = 2.0  # how long stop() gives the last messages to go out
NOTIFY_POLL_S = 0.01  # how often stop() checks whether they have
NOTIFY_MAX_EVENTS = 1000  # events listed in one message; its `count` has them all
NOTIFY_MAX_LINES = 20  # event lines in a message's text, then "... and N more"
NOTIFY_NAME_CHARS = 100  # of a desc or task id in a text line
NOTIFY_ERROR_CHARS = 300  # of an error in a text line (the event has all of it)
NOTIFY_RUN_HOSTS = 3  # hosts named in a run's line, then "and N more"
NOTIFY_READ_BYTES = 1024  # of a webhook's answer: kept only for the log
NOTIFY_LOG_BODY_CHARS = 200  # of a refusing webhook's answer, in the log
DISCORD_MAX_CHARS = 2000  # Discord refuses a longer `content`
NOTIFY_MARKS = {"close": "\u2705", "error": "\u274c", "stale": "\u26a0\ufe0f",
                "stalled": "\u23f8\ufe0f"}
ELLIPSIS = "\u2026"
NOTIFY_USER_AGENT = "progressista/" + __version__
NOTIFY_OUTCOMES = ("sent", "failed", "dropped")  # what /metrics counts of each message


def task_duration(task):
    """Seconds the task ran: the sender's `elapsed` when it sent one, else our own times."""
    if task.elapsed is not None:
        return task.elapsed
    return max(task.updated_at - task.created_at, 0.0)


def notify_event(task, event, now):
    """The JSON-able event for `task`, which just turned `event` (close, error, stale,
    stalled): the
    task's fields as GET /tasks shows them, plus `event`, `duration` and `at`."""
    return {"event": event, **task.as_dict(), "status": event,
            "duration": task_duration(task), "at": now}


def run_event(summary, tasks, now):
    """The JSON-able event for a run whose end is news (RunIndex.ended_runs): its summary
    (PROTOCOL.md "Runs") plus `event` ("run"), `duration`, `failed`, `at` and, when a bar
    failed, `first_error`: the task_id, desc, meta and whole error of the first to fail.

    `duration` runs from the earliest start any bar reports (its `updated_at` less its
    duration, so a sender's `elapsed` counts) to the run's `ended_at`."""
    ended_at = summary["ended_at"] if summary["ended_at"] is not None else summary["updated_at"]
    started_at = min((task.updated_at - task_duration(task) for task in tasks),
                     default=summary["created_at"])
    failed = sorted((task for task in tasks if task.status == "error"),
                    key=lambda task: (task.updated_at, task.task_id))
    event = {"event": "run", **summary, "duration": max(ended_at - started_at, 0.0),
             "failed": len(failed), "at": now}
    if failed:
        first = failed[0]
        event["first_error"] = {"task_id": first.task_id, "desc": first.desc,
                                "meta": first.meta, "error": first.error}
    return event


def _one_line(text, limit):
    # Task fields are anyone's text: one line each, so that a message stays one per event.
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + ELLIPSIS


def format_sizeof(number, divisor=1000):
    """tqdm.format_sizeof: three significant digits and an SI prefix (1.50M)."""
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(number) < 999.5:
            if abs(number) < 99.95:
                if abs(number) < 9.995:
                    return f"{number:.2f}{prefix}"
                return f"{number:.1f}{prefix}"
            return f"{number:.0f}{prefix}"
        number /= divisor
    return f"{number:.1f}Y"


def format_interval(seconds):
    """tqdm.format_interval: [H:]MM:SS (05:07, 1:02:03); nothing below 00:00."""
    minutes, secs = divmod(int(max(0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _amount(value, unit_scale, divisor):
    if unit_scale is True:
        return format_sizeof(value, divisor or 1000)
    if not isinstance(unit_scale, bool) and unit_scale:  # a number: tqdm multiplies by it
        value *= unit_scale
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _progress(event):
    scale, divisor = event.get("unit_scale"), event.get("unit_divisor")
    done = _amount(event["n"], scale, divisor)
    if event.get("total") is not None:
        done += "/" + _amount(event["total"], scale, divisor)
    return f"{done} {_one_line(event.get('unit') or 'it', NOTIFY_NAME_CHARS)}"


def _while(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _step_every(seconds):
    if seconds < 10:
        return f"{seconds:.2g} s"  # 3 s, 0.25 s, 2.5 s
    return _while(seconds)


def stall_reason(task, now, duration=_while):
    """Why a task (its wire form) reads stalled, in words: 'no progress for 12 min;
    usually a step every 3 s' (the second half once its pace is known). `duration`
    writes the first number (watch gives format_interval: 00:12:00)."""
    progressed_at, typical_s = task.get("progressed_at"), task.get("typical_step_s")
    reason = "no progress"
    if _is_number(progressed_at):  # a task from the network: any field may be missing
        reason += f" for {duration(max(now - progressed_at, 0.0))}"
    if _is_number(typical_s) and typical_s >= 0:
        reason += f"; usually a step every {_step_every(typical_s)}"
    return reason


def _error_summary(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return ""
    # A raw traceback says what went wrong on its last line; the client's form, first.
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def _task_who(task):
    # 'train (task abc) on node7' from a task's wire form (an event, a first_error).
    who = "task " + _one_line(task["task_id"], NOTIFY_NAME_CHARS)
    if task.get("desc"):
        who = f"{_one_line(task['desc'], NOTIFY_NAME_CHARS)} ({who})"
    host = (task.get("meta") or {}).get("host")
    if isinstance(host, str) and host:
        who += " on " + _one_line(host, NOTIFY_NAME_CHARS)
    return who


def _plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def run_line(event):
    """A run's end in one line: '(check mark) exp-142 on gpu-01, gpu-02: 16 bars done in
    1:02:03', '(cross) exp-142 on gpu-01: 2 of 16 bars failed in 05:07; first: rank3
    (task r3) on gpu-01: KeyError: 'date''. The run id follows a name that differs."""
    who = _one_line(event["name"], NOTIFY_NAME_CHARS)
    if event["name"] != event["run"]:
        who += f" (run {_one_line(event['run'], NOTIFY_NAME_CHARS)})"
    hosts = [_one_line(host, NOTIFY_NAME_CHARS) for host in event.get("hosts") or ()]
    if hosts:
        who += " on " + ", ".join(hosts[:NOTIFY_RUN_HOSTS])
        if len(hosts) > NOTIFY_RUN_HOSTS:
            who += f" and {len(hosts) - NOTIFY_RUN_HOSTS} more"
    took = format_interval(event["duration"])
    if event["status"] != "error":
        return f"{NOTIFY_MARKS['close']} {who}: {_plural(event['tasks'], 'bar')} done in {took}"
    said = f"{event['failed']} of {_plural(event['tasks'], 'bar')} failed in {took}"
    first = event.get("first_error")
    if first:
        said += "; first: " + _task_who(first)
        summary = _error_summary(first.get("error") or "")
        if summary:
            said += ": " + _one_line(summary, NOTIFY_ERROR_CHARS)
    return f"{NOTIFY_MARKS['error']} {who}: {said}"


def event_line(event):
    """One line a person reads, e.g. '(check mark) train (task abc): done 1000/1000 it in
    1:02:03', '(cross) etl (task x): failed at 50/100 it: KeyError: 'date''; a run's end
    as run_line() says it."""
    kind = event["event"]
    if kind == "run":
        return run_line(event)
    who = _task_who(event)
    if kind == "close":
        said = f"done {_progress(event)} in {format_interval(event['duration'])}"
    elif kind == "error":
        said = f"failed at {_progress(event)}"
        summary = _error_summary(event.get("error") or "")
        if summary:
            said += ": " + _one_line(summary, NOTIFY_ERROR_CHARS)
    elif kind == "stalled":
        said = f"stalled at {_progress(event)}, {stall_reason(event, event['at'])}"
    else:
        silent_s = max(event["at"] - event["updated_at"], 0.0)
        said = f"stale, no update for {_while(silent_s)} at {_progress(event)}"
    return f"{NOTIFY_MARKS.get(kind, '')} {who}: {said}"


def _slack_escaped(text):
    # Slack reads <...> as links and mentions (<!channel>): task text must not make one.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _lines_within(lines, unlisted, limit):
    # Whole lines while they fit, then "... and N more" for the rest.
    kept = list(lines)
    while True:
        more = unlisted + len(lines) - len(kept)
        text = "\n".join(kept + ([f"{ELLIPSIS} and {more} more"] if more else []))
        if len(text) <= limit or not kept:
            return text[:limit]
        kept.pop()


def notify_message(events, server, now, count=None):
    """The one message for a window of events: `text` for Slack, `content` for Discord,
    and the events themselves for any other receiver. `count` includes unlisted ones."""
    count = len(events) if count is None else count
    lines = [event_line(event) for event in events[:NOTIFY_MAX_LINES]]
    unlisted = count - len(lines)
    tail = [f"{ELLIPSIS} and {unlisted} more"] if unlisted else []
    return {
        "text": "\n".join(_slack_escaped(line) for line in lines + tail),
        "content": _lines_within(lines, unlisted, DISCORD_MAX_CHARS),
        "allowed_mentions": {"parse": []},  # Discord: an '@everyone' in a desc pings nobody
        "events": list(events),
        "count": count,
        "server": server,
        "now": now,
    }


class Notifier:
    """Which task changes are events, batched into one message per window (pure, with an
    injected clock for the windows), handed to the webhook senders.

    Feed it every change with `observe()` and call `tick(now)` often (the broadcast loop
    does both), and the runs whose end is news with `runs_ended()` (the sweep does);
    `close(now)` sends the current window at once, at shutdown.

    A bar of a run is told when it fails, goes stale or stalls, never when it closes: its
    run's end says that, once, in one line (close for a run whose bars all closed, error
    for one with a failed bar; `notify_on` chooses these words for runs too)."""

    def __init__(self, notify_on=NOTIFY_DEFAULT_EVENTS, min_duration_s=0.0,
                 interval_s=NOTIFY_INTERVAL_S, server="", senders=(), clock=time.monotonic):
        self.notify_on = frozenset(notify_on)
        self.min_duration_s = min_duration_s
        self.interval_s = interval_s
        self.server = server
        self.senders = list(senders)
        self.clock = clock
        self.notified_by_id = {}  # task id -> the status last notified for it
        self.pending_events = []  # the current window's, oldest first
        self.unlisted = 0  # the window's events past NOTIFY_MAX_EVENTS: only counted
        self.window_ends_at = None

    @classmethod
    def from_settings(cls, settings):
        """The Notifier `settings` ask for, or None without a webhook (then it costs nothing)."""
        if not settings.notify:
            return None
        return cls(settings.notify_on, settings.notify_min_duration, settings.notify_interval,
                   server=settings.notify_name or socket.gethostname(),
                   senders=[WebhookSender(url) for url in dict.fromkeys(settings.notify)])

    def seed(self, tasks, now, thresholds):
        """Count what is already closed, failed or stale as notified: a restart over a
        persistent store does not repeat old news."""
        for task in tasks:
            status = task.shown_status(now, thresholds)
            if status in self.notify_on:
                self.notified_by_id[task.task_id] = status

    def observe(self, changed_ids, removed_ids, store, now, thresholds):
        """Turn changes (the feed's pending ids) into events of the current window."""
        notified = self.notified_by_id
        for task_id in removed_ids:  # forgotten with the task: memory stays bounded
            notified.pop(task_id, None)
        # With Redis every server sees every change; only the sweeper tells. The others
        # still keep track, so that a new sweeper does not repeat what was sent.
        sending = store.is_sweeper
        events = []
        for task_id in changed_ids:
            task = store.get(task_id)
            if task is None:
                continue
            status = task.shown_status(now, thresholds)
            if status not in self.notify_on:
                if status == "running":  # back to life: a later close or stale is news
                    notified.pop(task_id, None)
                continue
            if notified.get(task_id) == status or task_duration(task) < self.min_duration_s:
                continue
            notified[task_id] = status
            if sending and not (status == "close" and task.run is not None):
                events.append(notify_event(task, status, now))
        # The feed lists tasks in the order they first changed; the sort is stable, so the
        # events of one request keep the order the sender gave them.
        events.sort(key=lambda event: event["updated_at"])
        for event in events:
            self.add(event)

    def runs_ended(self, run_ids, runs, store, now):
        """One event per run in `run_ids` (RunIndex.ended_runs: each is news once) whose
        status, close or error, is in notify_on and which ran min_duration_s or more."""
        if not store.is_sweeper:  # with Redis, the sweeper tells
            return
        for run_id in run_ids:
            summary = runs.summary(run_id, now)
            if summary is None or summary["status"] not in self.notify_on:
                continue
            tasks = [task for task in map(store.get, runs.task_ids(run_id, now))
                     if task is not None]
            event = run_event(summary, tasks, now)
            if event["duration"] >= self.min_duration_s:
                self.add(event)

    def add(self, event):
        if self.window_ends_at is None:
            self.window_ends_at = self.clock() + self.interval_s
        if len(self.pending_events) < NOTIFY_MAX_EVENTS:
            self.pending_events.append(event)
        else:
            self.unlisted += 1

    def take_message(self, now, flush=False):
        """The window's message once it has ended (or at once with `flush`), else None."""
        if self.window_ends_at is None or (not flush and self.clock() < self.window_ends_at):
            return None
        message = notify_message(self.pending_events, self.server, now,
                                 len(self.pending_events) + self.unlisted)
        self.pending_events, self.unlisted, self.window_ends_at = [], 0, None
        return message

    def outcomes(self):
        """How many messages were sent, failed and dropped, over every webhook."""
        outcomes = dict.fromkeys(NOTIFY_OUTCOMES, 0)
        for sender in self.senders:
            for outcome, count in sender.outcomes.items():
                outcomes[outcome] += count
        return outcomes

    def tick(self, now, flush=False):
        """Queue the window's message for every webhook when it is due; never blocks."""
        message = self.take_message(now, flush)
        if message is not None:
            for sender in self.senders:
                sender.put(message)

    def start(self, tasks, now, thresholds):
        """Seed from the tasks the store holds and start the sender threads."""
        self.seed(tasks, now, thresholds)
        for sender in self.senders:
            sender.start()
        log.info("notifying %s to %s, at most one message per %g s",
                 ", ".join(event for event in NOTIFY_EVENTS if event in self.notify_on),
                 ", ".join(sender.shown_url for sender in self.senders), self.interval_s)

    async def close(self, now):
        """Send the current window now and give the senders NOTIFY_SHUTDOWN_S to deliver."""
        self.tick(now, flush=True)
        deadline = time.monotonic() + NOTIFY_SHUTDOWN_S
        while (not all(sender.idle() for sender in self.senders)
               and time.monotonic() < deadline):
            await asyncio.sleep(NOTIFY_POLL_S)
        for sender in self.senders:
            if not sender.idle():  # a webhook that does not answer: say what it misses
                log.warning("shutting down with notifications to %s not delivered: it did "
                            "not answer within %g s", sender.shown_url, NOTIFY_SHUTDOWN_S)
            sender.stop()


def retry_delay(attempt, retry_after_s=None):
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): doubling, or the
    webhook's Retry-After, capped at NOTIFY_RETRY_MAX_S."""
    if retry_after_s is None:
        retry_after_s = NOTIFY_RETRY_INITIAL_S * 2 ** (attempt - 1)
    return min(max(retry_after_s, 0.0), NOTIFY_RETRY_MAX_S)


def retried(status):
    """True for an answer worth another try: 408, 429 and 5xx. Any other 4xx (a wrong or
    revoked URL) and a redirect would fail the same way again."""
    return status in (408, 429) or status >= 500


def _retry_after_s(value):
    # Seconds only (what Slack and Discord send); an HTTP date falls back to the backoff.
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET that drops the message: a moved
    # webhook is an error to fix in the settings, not to follow.
    def redirect_request(self, *args, **kwargs):
        return None


_webhook_opener = urllib.request.build_opener(_NoRedirects)


def webhook_target(url):
    """(the URL to POST to, its extra headers): a user:password@ in the URL becomes Basic
    authentication, as curl does (urllib would take it for a part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    credentials = (urllib.parse.unquote(parts.username or "") + ":"
                   + urllib.parse.unquote(parts.password or ""))
    netloc = parts.netloc.rpartition("@")[2]
    return (urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
            {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()})


def post_json(url, body, timeout_s, headers=None):
    """POST `body` (JSON bytes) to `url`; return (status, the start of the answer, the
    Retry-After seconds or None). Network failures raise OSError or HTTPException."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": NOTIFY_USER_AGENT,
        **(headers or {})})
    try:
        with _webhook_opener.open(request, timeout=timeout_s) as response:
            answer = response.read(NOTIFY_READ_BYTES)
            return response.status, answer.decode("utf-8", "replace"), None
    except urllib.error.HTTPError as error:
        with error:
            answer = error.read(NOTIFY_READ_BYTES)
        return (error.code, answer.decode("utf-8", "replace"),
                _retry_after_s(error.headers.get("Retry-After")))


class WebhookSender:
    """POSTs messages to one webhook, oldest first, from a daemon thread: `put()` never
    blocks, a failed POST is retried with backoff, a full queue drops its oldest."""

    def __init__(self, url, post=post_json):
        self.url, self.headers = webhook_target(url)
        self.shown_url = masked_webhook(url)  # the URL is the secret: never log it
        self.post = post
        self.queue = collections.deque()
        self.condition = threading.Condition()
        self.busy = False  # a message is out: taken from the queue, not yet done with
        self.dropped = 0  # since the last delivery
        self.outcomes = dict.fromkeys(NOTIFY_OUTCOMES, 0)  # for GET /metrics
        self.failing = False
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self.run, name="progressista-notify",
                                       daemon=True)
        self.thread.start()

    def put(self, message):
        """Queue `message` (a JSON-able dict); the oldest goes when the queue is full."""
        with self.condition:
            if len(self.queue) >= NOTIFY_QUEUE_MESSAGES:
                self.queue.popleft()
                self.outcomes["dropped"] += 1
                if not self.dropped:
                    log.warning("webhook %s is behind by %d messages: dropping the oldest "
                                "until it catches up", self.shown_url, NOTIFY_QUEUE_MESSAGES)
                self.dropped += 1
            self.queue.append(message)
            self.condition.notify()

    def without_secret(self, text):
        # An error message may quote the URL or its path, which are the secret.
        parts = urllib.parse.urlsplit(self.url)
        secret_path = parts.path + ("?" + parts.query if parts.query else "")
        text = text.replace(self.url, self.shown_url)
        return text.replace(secret_path, "/***") if len(secret_path) > 1 else text

    def idle(self):
        with self.condition:
            return not self.queue and not self.busy

    def stop(self):
        """End the thread after the message it is sending; what is still queued is lost."""
        self.stopping.set()
        with self.condition:
            self.condition.notify_all()

    def run(self):
        while True:
            with self.condition:
                while not self.queue and not self.stopping.is_set():
                    self.condition.wait()
                if self.stopping.is_set():
                    if self.queue:
                        log.warning("%d notification(s) to %s not sent: shutting down",
                                    len(self.queue), self.shown_url)
                    return
                message = self.queue.popleft()
                self.busy = True
            delivered = False
            try:
                delivered = self.deliver(message)
            except Exception:  # a dead thread would end every later notification silently
                log.error("notification to %s failed", self.shown_url, exc_info=True)
            finally:
                with self.condition:
                    self.outcomes["sent" if delivered else "failed"] += 1
                    self.busy = False

    def deliver(self, message):
        """POST one message, retrying with backoff; True once the webhook took it."""
        body = json.dumps(message).encode()
        for attempt in range(1, NOTIFY_ATTEMPTS + 1):
            retry_after_s = None
            try:
                status, answer, retry_after_s = self.post(self.url, body, NOTIFY_TIMEOUT_S,
                                                          self.headers)
            except (OSError, http.client.HTTPException) as error:
                reason = self.without_secret(f"{type(error).__name__}: {error}")
            else:
                if 200 <= status < 300:
                    self.delivered()
                    return True
                reason = f"HTTP {status} {answer[:NOTIFY_LOG_BODY_CHARS]!r}"
                if not retried(status):
                    log.error("webhook %s refused a notification (%s); not retrying: check "
                              "the URL", self.shown_url, reason)
                    return False
            if attempt == NOTIFY_ATTEMPTS:
                break
            if not self.failing:
                self.failing = True
                log.warning("webhook %s failed (%s); retrying with backoff",
                            self.shown_url, reason)
            if self.stopping.wait(retry_delay(attempt, retry_after_s)):
                log.warning("a notification to %s was not delivered (%s): shutting down",
                            self.shown_url, reason)
                return False  # stop() waits for nobody
        log.error("gave up on a notification to %s after %d attempts (%s)",
                  self.shown_url, attempt, reason)
        return False

    def delivered(self):
        if self.failing:
            self.failing = False
            log.info("webhook %s takes notifications again", self.shown_url)
        with self.condition:
            dropped, self.dropped = self.dropped, 0
        if dropped:
            log.warning("%d notification(s) to %s were dropped while it was behind",
                        dropped, self.shown_url)


# --- Metrics (pure: no I/O) ------------------------------------------------------------

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
METRIC_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# Why a request was refused, by status, when the error did not name a reason itself.
REJECT_REASONS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 411: "length_required", 413: "body_too_large",
    426: "upgrade_required", 429: "too_many_requests", 431: "headers_too_large",
    500: "internal_error", 503: "unavailable", 505: "http_version",
}


class Metrics:
    """Counters since the server started, for GET /metrics.

    Each count is one dict or integer increment on a path that already does far more."""

    def __init__(self, started_at):
        self.started_at = started_at
        self.requests = {}  # (route, method, status) -> count
        self.rejected = {}  # reason -> count
        self.updates_received = 0  # valid updates accepted by POST /progress
        self.updates_applied = 0  # of those, the ones that changed a task (seq, dedup)
        self.broadcast_messages = 0  # /ws messages sent, counted once per listener
        self.broadcast_bytes = 0  # their JSON text, counted once per listener
        self.listeners_opened = 0

    def request_done(self, route, method, status, reason=None):
        key = (route, method if method in METRIC_METHODS else "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 400:
            self.reject(reason or REJECT_REASONS.get(status, str(status)))

    def reject(self, reason):
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def broadcast(self, messages, listeners):
        self.broadcast_messages += len(messages) * listeners
        self.broadcast_bytes += sum(map(len, messages)) * listeners

    def received(self, count):
        self.updates_received += count

    def applied(self, count):
        self.updates_applied += count

    def listener_opened(self):
        self.listeners_opened += 1


def _label(value):
    value = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{value}"'


def _family(name, kind, help_text, samples):
    """One metric family: its HELP and TYPE lines, then `samples` of (labels, value)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        shown = ",".join(f"{key}={_label(val)}" for key, val in labels)
        lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")
    return lines


def render_metrics(metrics, gauges):
    """The Prometheus text exposition of `metrics` (counters) and `gauges`, a dict of what
    is true now: tasks_by_status, runs_by_status (optional), listeners, connections,
    store_kind, store_up, store_errors, notifications (outcome -> count)."""
    tasks_by_status = gauges["tasks_by_status"]
    runs_by_status = gauges.get("runs_by_status") or {}
    lines = []
    lines += _family("progressista_info", "gauge", "The server's version and store.",
                     [((("version", __version__), ("store", gauges["store_kind"])), 1)])
    lines += _family("progressista_start_time_seconds", "gauge",
                     "When the server started, Unix seconds.",
                     [((), repr(float(metrics.started_at)))])
    lines += _family("progressista_tasks", "gauge", "Tasks stored now, by status.",
                     [((("status", status),), tasks_by_status.get(status, 0))
                      for status in STATUSES])
    lines += _family("progressista_runs", "gauge",
                     "Runs (the tasks sharing a run id) now, by the run's status.",
                     [((("status", status),), runs_by_status.get(status, 0))
                      for status in STATUSES])
    lines += _family("progressista_updates_received_total", "counter",
                     "Valid task updates accepted by POST /progress.",
                     [((), metrics.updates_received)])
    lines += _family("progressista_updates_applied_total", "counter",
                     "Accepted updates that changed a task (not an old seq or a repeat).",
                     [((), metrics.updates_applied)])
    lines += _family("progressista_http_requests_total", "counter",
                     "HTTP requests answered, by route, method and status.",
                     [((("route", route), ("method", method), ("status", status)), count)
                      for (route, method, status), count in sorted(metrics.requests.items())])
    lines += _family("progressista_rejected_requests_total", "counter",
                     "Requests and connections refused, by reason.",
                     sorted(((("reason", reason),), count)
                            for reason, count in metrics.rejected.items()))
    lines += _family("progressista_ws_listeners", "gauge", "Open /ws listeners.",
                     [((), gauges["listeners"])])
    lines += _family("progressista_ws_listeners_opened_total", "counter",
                     "/ws listeners accepted since the start.",
                     [((), metrics.listeners_opened)])
    lines += _family("progressista_connections", "gauge", "Open TCP connections.",
                     [((), gauges["connections"])])
    lines += _family("progressista_broadcast_messages_total", "counter",
                     "/ws messages sent, counted once per listener.",
                     [((), metrics.broadcast_messages)])
    lines += _family("progressista_broadcast_bytes_total", "counter",
                     "Bytes of /ws message text sent, counted once per listener.",
                     [((), metrics.broadcast_bytes)])
    lines += _family("progressista_store_up", "gauge",
                     "1 when the store answers, 0 when it is failing.",
                     [((), 1 if gauges["store_up"] else 0)])
    lines += _family("progressista_store_errors_total", "counter",
                     "Failed store reads and writes (each is retried or answered 503).",
                     [((), gauges["store_errors"])])
    lines += _family("progressista_notifications_total", "counter",
                     "Webhook messages sent, failed (refused or given up) and dropped "
                     "(queue full), over every webhook.",
                     [((("outcome", outcome),), count)
                      for outcome, count in gauges["notifications"].items()])
    return ("\n".join(lines) + "\n").encode()


# --- HTTP ------------------------------------------------------------------------------

# RFC 9112 section 3: the target is visible ASCII only (no controls, no 8-bit bytes).
REQUEST_LINE = re.compile(r"([A-Z]+) ([!-~]+) (HTTP/1\.[01])\Z")
OTHER_HTTP_VERSION = re.compile(r"[A-Z]+ [!-~]+ HTTP/[0-9](\.[0-9])?\Z")  # well formed, not 1.x
FIELD_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")  # a token: no space, no control
# In a field value: no control but HTAB. A bare CR or LF, or a NUL, is how a head that a
# front proxy reads one way is read another way here (request smuggling).
FIELD_VALUE_CONTROL = "\\x00-\\x08\\x0a-\\x1f\\x7f"
# A header line that is not `token ":" value` with no such control: found in one search.
BAD_HEADER_LINE = re.compile(r"\r\n(?![-!#$%&'*+.^_`|~0-9A-Za-z]+:[^" + FIELD_VALUE_CONTROL
                             + r"]*(?:\r\n|\Z))")
CONTENT_LENGTH = re.compile(r"[0-9]{1,20}\Z")  # ASCII digits: "²".isdigit() is True too
SINGLE_HEADERS = ("content-length",)  # may repeat with one value; Host may not repeat


class HTTPError(Exception):
    """An error answered as ``{"error": message}`` with `status` and extra `headers`."""

    def __init__(self, status, message, headers=(), reason=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.reason = reason  # the label GET /metrics counts it under; None: by status


class Request:
    """One parsed HTTP request. `headers` has lower-case names; `query` maps each name to
    its last value."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body",
                 "peer", "started")

    def __init__(self, method, target, version, headers, peer=None):
        self.method = method
        if target[:1] != "/" and "://" in target[:8]:  # absolute form: http://host/path
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {}
        self.version = version
        self.headers = headers
        self.body = b""
        self.peer = peer
        self.started = 0.0

    @property
    def keep_alive(self):
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    def json(self, fast_loads=None):
        """The body as JSON; 400 for bad JSON, NaN or Infinity. `fast_loads` (orjson's,
        see `fast_json_loads()`) decodes first where its value is sure to be the standard
        library's; anything else, and every error, the standard library decides."""
        body = self.body
        # UTF-8 is what docs/PROTOCOL.md ("Transport") asks for: the fast path
        utf8 = body[:1] in (b"{", b"[") and body[1:2] != b"\x00"
        if utf8 and fast_loads is not None:
            value = _fast_json(fast_loads, body)
            if value is not _UNSURE:
                return value
        try:
            if utf8:
                text = body.decode()
                value, end = _JSON_DECODER.raw_decode(text)
                if end != len(text) and text[end:].strip(" \t\n\r"):
                    raise ValueError(f"Extra data at char {end}")
                return value
            # json.loads' detection still serves UTF-16/32 and a BOM
            return _JSON_DECODER.decode(body.decode(json.detect_encoding(body)))
        except HTTPError:
            raise
        except (ValueError, RecursionError) as error:
            raise HTTPError(400, f"body: invalid JSON ({error})") from None


def _reject_constant(name):
    raise HTTPError(400, f"body: {name} is not allowed: numbers must be finite")


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)

# orjson and the standard library read valid JSON alike but for two things: orjson makes
# an integer beyond 64 bits a float, and it reads nesting up to 1,024 deep, where the
# standard library's recursion limit (about 1,000 frames, less the caller's) refuses it.
# Every error orjson raises is left to the standard library, which words the answer; so
# orjson's value is kept only where neither difference can arise. test_json_paths.py
# checks both paths give the same on every body it can think of.
FAST_JSON_MAX_NESTING = 256  # far below the recursion limit, far above any real update
_UNSURE = object()  # what _fast_json() gives when the standard library must decide
# A body's shape for those checks: each digit a "0", each "[" or "{" a "[", each byte
# that may come just before the digits of a number a "+", the rest " ". A run of 19
# digits after "[" or "+" may be a number beyond 64 bits; after anything else (a letter,
# a quote: an id like "a1000000000000000000" or a hex uuid) it is inside a string.
_SHAPE = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x5B if byte in b"[{"
               else 0x2B if byte in b",:-+.eE \t\n\r" else 0x20 for byte in range(256))
_LONG_NUMBERS = (b"+" + b"0" * 19, b"[" + b"0" * 19)


def fast_json_loads(choice):
    """The `loads` that Request.json() tries first for a --json-parser choice ("auto",
    "stdlib" or "orjson"): orjson's, or None for the standard library alone. Raise
    StartupError when "orjson" is asked for and cannot be imported."""
    if choice == "stdlib" or (choice == "auto" and orjson is None):
        return None
    if orjson is None:
        raise StartupError(f"--json-parser orjson ({ENV_PREFIX}JSON_PARSER): orjson cannot be "
                           "imported: pip install orjson (or 'progressista[fast]'), or use "
                           "auto or stdlib")
    return orjson.loads


def _fast_json(loads, body):
    """`loads(body)` where that is sure to be what the standard library decodes, else
    _UNSURE (an error, a long run of digits, deep nesting)."""
    shape = body.translate(_SHAPE)
    if _LONG_NUMBERS[0] in shape or _LONG_NUMBERS[1] in shape:
        return _UNSURE
    try:
        value = loads(body)
    except ValueError:  # orjson.JSONDecodeError: the standard library words the error
        return _UNSURE
    if (shape.count(b"[") > FAST_JSON_MAX_NESTING
            and not _nests_within(value, FAST_JSON_MAX_NESTING)):
        return _UNSURE
    return value


def _nests_within(value, levels):
    """True when `value`, a list or a dict, holds no list or dict more than `levels`
    deep (itself at depth 1)."""
    if levels <= 0:
        return False
    for child in (value.values() if type(value) is dict else value):
        if (type(child) is dict or type(child) is list) and not _nests_within(child, levels - 1):
            return False
    return True


# parse_head() is a function of the head's bytes alone, and a client sends the same head
# again and again (only Content-Length moves): what it parsed is kept for the next time.
PARSED_HEADS_KEPT = 256  # heads remembered; all are forgotten when full
PARSED_HEAD_KEPT_BYTES = 2048  # a longer head is parsed each time
_parsed_heads = {}  # head -> (method, target, path, query, version, headers), never handed out


def parse_head(head, peer=None):
    """Parse a request head (without its final blank line); raise HTTPError(400) for
    anything RFC 9112 does not allow (sections 3.2 and 5), rather than guess. Each call
    gives a new Request, with its own `headers` and `query`."""
    parsed = _parsed_heads.get(head)
    if parsed is None:
        request = _parse_head(head, peer)
        if len(head) <= PARSED_HEAD_KEPT_BYTES:
            if len(_parsed_heads) >= PARSED_HEADS_KEPT:
                _parsed_heads.clear()
            # Copies: a middleware may change the request's own dicts.
            _parsed_heads[head] = (request.method, request.target, request.path,
                                   dict(request.query), request.version, dict(request.headers))
        return request
    request = Request.__new__(Request)
    (request.method, request.target, request.path, query, request.version,
     headers) = parsed
    request.query = dict(query) if query else {}
    request.headers = dict(headers)
    request.body = b""
    request.peer = peer
    request.started = 0.0
    return request


def _parse_head(head, peer):
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    match = REQUEST_LINE.match(lines[0])
    if match is None:
        if OTHER_HTTP_VERSION.match(lines[0]):
            raise HTTPError(505, "this server speaks HTTP/1.1 (and 1.0): send the request "
                                 "as HTTP/1.1")
        raise HTTPError(400, "malformed request line: expected 'METHOD /path HTTP/1.1' with "
                             "a target of visible ASCII (percent-encode the rest)")
    # Fast path: printable ASCII (or Latin-1) but for the line ends and tabs has no
    # control; else one search finds the bad line (8-bit obs-text alone is allowed).
    if not text.replace("\r\n", "").replace("\t", " ").isprintable():
        bad = BAD_HEADER_LINE.search(text, len(lines[0]))
        if bad is not None:
            raise _header_line_error(text[bad.end():].split("\r\n", 1)[0])
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not (colon and name.replace("-", "").isalnum() and name.isascii()) and not (
                colon and FIELD_NAME.match(name)):
            raise _header_line_error(line)
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name == "host":
                raise HTTPError(400, "two Host headers: send exactly one")
            if name in SINGLE_HEADERS:
                if headers[name] != value:
                    # Two framings of one body are how requests get smuggled.
                    raise HTTPError(400, f"conflicting {name} headers")
                continue
            value = headers[name] + ", " + value
        headers[name] = value
    version = match.group(3)
    if version == "HTTP/1.1" and "host" not in headers:
        raise HTTPError(400, "an HTTP/1.1 request needs a Host header (RFC 9112 section 3.2)")
    return Request(match.group(1), match.group(2), version, headers, peer)


def _header_line_error(line):
    name, colon, _ = line.partition(":")
    if colon and FIELD_NAME.match(name):
        return HTTPError(400, f"header {name}: control characters are not allowed in a "
                              "header value")
    # Also a line that starts with a space: obsolete line folding is refused.
    return HTTPError(400, f"malformed header line {line[:40].encode('latin-1')!r}")


def body_length(request, max_body_bytes):
    """The declared body length; raise HTTPError for what this server will not read."""
    if "transfer-encoding" in request.headers:
        raise HTTPError(411, "chunked bodies are not supported: send a Content-Length")
    declared = request.headers.get("content-length")
    if declared is None:
        if request.method in ("POST", "PUT", "PATCH"):
            raise HTTPError(411, f"{request.method} needs a Content-Length header")
        return 0
    if not CONTENT_LENGTH.match(declared):
        raise HTTPError(400, f"Content-Length must be a whole number of at most 20 ASCII "
                             f"digits, not {declared[:40]!r}")
    length = int(declared)
    if length > max_body_bytes:
        raise HTTPError(413, f"body of {length} bytes is over the limit of {max_body_bytes} "
                             "bytes: send smaller batches")
    return length


class Response:
    """What a route returns: a status, a body and extra headers."""

    __slots__ = ("status", "body", "content_type", "headers", "reason")

    def __init__(self, status=200, body=b"", content_type="application/json", headers=None,
                 reason=None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers if headers is not None else []
        self.reason = reason  # why an error was answered, for GET /metrics


def json_response(payload, status=200, headers=None):
    return Response(status, _encode(payload), headers=headers)


# How each domain error is answered: (status, extra headers, metrics reason).
DOMAIN_ERROR_STATUS = {
    InvalidUpdate: (400, (), None),
    StoreFull: (503, (("Retry-After", "5"),), "store_full"),
    StoreUnavailable: (503, (("Retry-After", "2"),), "store_unavailable"),
}
ANSWERED_ERRORS = (HTTPError, DomainError)  # what becomes a JSON error, not a 500


def as_http_error(error):
    """The HTTPError that answers `error`, an HTTPError or a DomainError."""
    if isinstance(error, HTTPError):
        return error
    for kind in type(error).__mro__:
        if kind in DOMAIN_ERROR_STATUS:
            status, headers, reason = DOMAIN_ERROR_STATUS[kind]
            return HTTPError(status, str(error), headers, reason)
    return HTTPError(500, "internal server error; see the server log")


def error_response(error):
    """The JSON answer to an HTTPError or a DomainError."""
    error = as_http_error(error)
    response = json_response({"error": error.message}, error.status, list(error.headers))
    response.reason = error.reason
    return response


def internal_error(request):
    """Log an unexpected error with its traceback; the client gets a plain 500."""
    log.error("error answering %s %s", request.method, request.path, exc_info=True)
    return json_response({"error": "internal server error; see the server log"}, 500)


def shutting_down():
    return json_response({"error": "the server is shutting down"}, 503)


REASONS = {status.value: status.phrase for status in http.HTTPStatus}


_OK_JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"X-Content-Type-Options: nosniff\r\nContent-Length: ")


def serialize_response(response, keep_alive, head_only=False):
    body = response.body
    if (keep_alive and not head_only and response.status == 200 and not response.headers
            and response.content_type == "application/json"):
        return b"%s%d\r\n\r\n%s" % (_OK_JSON_HEAD, len(body), body)
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
             f"Content-Length: {len(body)}\r\n"]
    if response.content_type:
        lines.append(f"Content-Type: {response.content_type}\r\n")
    for name, value in response.headers:
        lines.append(f"{name}: {value}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    lines.append("X-Content-Type-Options: nosniff\r\n\r\n")
    head = "".join(lines).encode("latin-1")
    return head if head_only else head + body


# --- Routes ----------------------------------------------------------------------------


TOKEN_COOKIE = "progressista_token"  # what a ?token= that opened the dashboard becomes


def offered_token(request):
    """(token, where): the request's token and where it was found, "header", "query" or
    "cookie", looked for in that order; (None, None) without one."""
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), "header"
    token = request.query.get("token")
    if token is not None:
        return token, "query"
    cookies = request.headers.get("cookie")
    if cookies and TOKEN_COOKIE in cookies:
        for cookie in re.split("[;,]", cookies):  # a repeated Cookie header joins with ", "
            name, _, value = cookie.strip().partition("=")
            if name == TOKEN_COOKIE:
                return urllib.parse.unquote(value.strip()), "cookie"
    return None, None


def token_in(offered, tokens):
    """True when `offered` is one of `tokens` (compared in constant time)."""
    if not offered:
        return False
    offered = offered.encode()
    # Compare against every token without stopping early, so timing reveals nothing.
    matches = [hmac.compare_digest(offered, token.encode()) for token in tokens]
    return any(matches)


def own_origins(request):
    """The origins the request's own host answers to (as sent, and through a proxy)."""
    hosts = {request.headers.get("host", "")} | set(
        _csv(request.headers.get("x-forwarded-host", "")))
    return {f"{scheme}://{host}" for host in hosts if host for scheme in ("http", "https")}


def origin_allowed(request, allow_origins):
    origin = request.headers.get("origin")
    return (origin is None or "*" in allow_origins or origin in allow_origins
            or origin in own_origins(request))


# A parameter whose name holds "token" (any case, any separator: & ; #), up to its end.
_TOKEN_PARAMETER = re.compile(r"(token[^=&;#]*=)[^&;#]*", re.IGNORECASE)
_UNLOGGABLE = re.compile(r"[^\x20-\x7e]")


def loggable_target(target):
    """A request target as the log shows it: percent-decoded (so that no spelling of
    "token" hides), every token's value masked, control and other bytes escaped."""
    for _ in range(3):  # %2574oken is %74oken is token
        decoded = urllib.parse.unquote(target, "latin-1")
        if decoded == target:
            break
        target = decoded
    target = _TOKEN_PARAMETER.sub(r"\1***", target)
    return _UNLOGGABLE.sub(lambda char: f"\\x{ord(char.group()):02x}", target)


def host_name(host):
    """The name part of a Host header (or of a setting), lower case, without its port."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def allowed_host_names(settings):
    """The Host names the server answers, or None for any (PROTOCOL.md, "Transport").

    By default a server on a loopback address answers only loopback names: a web page
    that rebinds its own DNS name to 127.0.0.1 sends that name, and is refused."""
    if settings.allowed_hosts:
        names = {host_name(name) for name in settings.allowed_hosts}
        return None if "*" in names else frozenset(names)
    if not _is_loopback(settings.host):
        return None
    listening = settings.host.lower()
    if ":" in listening:  # an IPv6 address, as a Host header brackets it
        listening = f"[{listening}]"
    return frozenset(("localhost", "127.0.0.1", "[::1]", listening))


PUBLIC_PATHS = ("/health", "/")
DELETE_FILTERS = {"status", "older_than", "task_id", "run", "token"}


def allowed_methods(methods):
    names = set(methods) | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
    return ", ".join(sorted(names))
HOST_HEADER = re.compile(r"[A-Za-z0-9.\-:\[\]]+\Z")


def find_dashboard(filename=INDEX_FILE):
    """Where index.html is: beside this file, or where pip installed it (data_files)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, filename)]
    for prefix in (sys.prefix, getattr(sys, "base_prefix", sys.prefix),
                   os.path.join(os.path.expanduser("~"), ".local")):
        candidates.append(os.path.join(prefix, "share", "progressista", filename))
    candidates = list(dict.fromkeys(candidates))
    for path in candidates:
        if os.path.isfile(path):
            return path, candidates
    return None, candidates


def load_dashboard():
    """The page's bytes and the hashes of its inline scripts, or the error to show."""
    path, candidates = find_dashboard()
    if path is None:
        return None, (), "dashboard file index.html not found; looked in: " + ", ".join(
            candidates)
    with open(path, "rb") as file:
        page = file.read()
    finder = _InlineScripts()
    finder.feed(page.decode("utf-8"))
    finder.close()
    hashes = tuple(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in finder.scripts)
    return page, hashes, path


class _InlineScripts(html.parser.HTMLParser):
    """Collects the text of each inline <script>, as the browser hashes it for CSP (a
    parser, not a regex, so that '<script>' inside a comment or a style is no script)."""

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.scripts = []
        self.current = None

    def handle_starttag(self, tag, attrs):
        if tag == "script" and "src" not in dict(attrs):
            self.current = []

    def handle_data(self, data):
        if self.current is not None:
            self.current.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self.current is not None:
            self.scripts.append("".join(self.current))
            self.current = None


def content_security_policy(script_hashes, host):
    """Only the page's own scripts run, and it connects only to its own origin."""
    connect = "'self'"
    if host and HOST_HEADER.match(host):
        connect += f" ws://{host} wss://{host}"  # older Safari: 'self' omits ws(s)
    return ("default-src 'none'; script-src " + (" ".join(script_hashes) or "'none'")
            + "; style-src 'unsafe-inline'; img-src 'self' data:; connect-src " + connect
            + "; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _seconds_query(request, name):
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return _seconds(raw)  # the rule of the --*-seconds flags
    except argparse.ArgumentTypeError as error:
        raise HTTPError(400, f"{name}: {error}") from None


def _time_query(request, name):
    """A server time (Unix seconds) from the query, as GET /tasks?since= takes it."""
    raw = request.query.get(name)
    if raw is None:
        return None
    # A JSON number, as `now` is written: float() alone would also take "1_000", " 5",
    # "infinity" or a Unicode digit.
    value = float(raw) if _JSON_NUMBER.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        raise HTTPError(400, f"{name}: must be a server time in Unix seconds (the `now` of "
                             f"an earlier answer), not {raw!r:.60}")
    return value


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?", re.ASCII)


def _count_query(request, name, most):
    """A whole number from 1 to `most` from the query, as GET /tasks?limit= takes it."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and 1 <= int(raw) <= most):
        raise HTTPError(400, f"{name}: must be a whole number from 1 to {most:,}, "
                             f"not {raw!r:.60}")
    return int(raw)


def _path_task_id(request):
    return urllib.parse.unquote(request.path[len("/tasks/"):])


def _status_query(request):
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise HTTPError(400, f"status: must be one of {', '.join(STATUSES)}, not {status!r}")
    return status



# What a route, a middleware chain or a store gives when it is done at once: telling
# these by type first spares the request path asyncio.iscoroutine()'s slower test.
_READY_TYPES = frozenset((Response, list, set, dict, tuple, bool, int, type(None)))


def is_pending(result):
    """True when `result` is a coroutine still to await (middleware, an asynchronous
    store), False for a value. The one test of the two; settle() and the server use it."""
    return type(result) not in _READY_TYPES and asyncio.iscoroutine(result)


def settle(result, then):
    """`then(result)`: at once when `result` is a value, or as a coroutine that awaits it
    first, so that the in-memory store's requests never leave the synchronous fast path."""
    if is_pending(result):
        return _settled_later(result, then)
    return then(result)


async def _settled_later(result, then):
    return then(await result)


async def resolved(result):
    """`result`, awaited first when it is a coroutine; for code that is already async."""
    return await result if asyncio.iscoroutine(result) else result


async def answer_of(request, pending):
    """The Response `pending` (awaitable) gives, or the answer to what it raised: the
    asynchronous side of Api.dispatch()'s catch-all."""
    try:
        return await pending
    except ANSWERED_ERRORS as error:
        return error_response(error)
    except asyncio.CancelledError:  # only at shutdown
        return shutting_down()
    except Exception:
        return internal_error(request)


async def _response_from(call, request):
    response = await call(request)
    if not isinstance(response, Response):
        raise TypeError(f"a middleware returned {type(response).__name__}, not a Response")
    return response


def _calling(middleware, call_next):
    """One link of the middleware chain: `middleware` with what comes after it."""
    return lambda request: middleware(request, call_next)


WEBSOCKET_ADMITTED = Response(101)  # what middleware's call_next gives for an admitted /ws


class Api:
    """The HTTP API: a Request in, a Response (or a coroutine of one) out.

    It owns the routes, the middleware chain and the access policy (tokens, origins,
    CORS), and logs and counts each answered request. It needs no socket: a test can call
    `handle()` with a parsed Request. What it changes in the store it tells `feed`."""

    def __init__(self, settings, store, feed, metrics, clock, server_gauges, *,
                 changes, runs):
        self.settings = settings
        self.store = store
        self.feed = feed
        self.changes = changes  # a ChangeLog, for GET /tasks?since=
        self.runs = runs  # a RunIndex, for GET /runs and ?run=
        # () -> the SnapshotParts of the store (the server's Hub shares its own), or None:
        # GET /tasks of a big store is then encoded in one go.
        self.shared_parts = None
        self.metrics = metrics
        self.clock = clock
        self.server_gauges = server_gauges  # () -> live counts the server keeps (listeners...)
        self.middleware = []
        self.log_requests = False  # set at start: one debug line per request
        self.allowed_hosts = allowed_host_names(settings)  # None: any
        self.fast_json = fast_json_loads(settings.json_parser)  # None: the stdlib alone
        self.page, self.script_hashes, self.page_source = load_dashboard()
        self.routes = {
            "/progress": {"POST": self.post_progress},
            "/tasks": {"GET": self.get_tasks, "DELETE": self.delete_tasks},
            "/runs": {"GET": self.get_runs},
            "/health": {"GET": self.get_health},
            "/metrics": {"GET": self.get_metrics},
            "/auth": {"GET": self.get_auth},
            "/": {"GET": self.get_root},
            "/static/" + INDEX_FILE: {"GET": self.get_dashboard},
            "/ws": {"GET": self.get_ws_without_upgrade},
        }
        self.task_routes = {"GET": self.get_task, "DELETE": self.delete_task}  # /tasks/{id}
        self.run_routes = {"GET": self.get_run}  # /runs/{run}

    # Middleware

    def add_middleware(self, middleware):
        """Wrap request handling: ``async def middleware(request, call_next) -> Response``.

        The first added is the outermost. Return a Response to answer early (e.g. a
        rejection), or ``await call_next(request)`` to go on. It runs before routing and
        token checks; raise HTTPError(status, message) for a JSON error."""
        self.middleware.append(middleware)
        return middleware

    def handle(self, request):
        """A Response, or a coroutine producing one when middleware or an asynchronous
        store is involved. Never raises: any failure is a JSON error or a logged 500."""
        refusal = self.host_refusal(request)
        if refusal is not None:  # before middleware: nothing of the app sees such a request
            return refusal
        if self.middleware:
            return self.through_middleware(request, lambda request: resolved(
                self.dispatch(request)))
        return self.dispatch(request)

    async def through_middleware(self, request, innermost):
        call = innermost
        for middleware in reversed(self.middleware):
            call = _calling(middleware, call)
        return await answer_of(request, _response_from(call, request))

    def dispatch(self, request):
        """Route one request. The one catch-all: an unexpected error is logged and
        answered 500, and the server goes on serving every other connection."""
        cors = self.cors_headers(request)  # on errors too, so a page can read them
        try:
            response = self.route(request)
        except ANSWERED_ERRORS as error:
            response = error_response(error)
        except Exception:
            response = internal_error(request)
        if is_pending(response):  # an asynchronous store is still at work
            return self.completed(request, response, cors)
        response.headers.extend(cors)
        return response

    async def completed(self, request, pending, cors):
        response = await answer_of(request, pending)
        response.headers.extend(cors)
        return response

    def route(self, request):
        path = request.path
        methods = self.routes.get(path)
        if methods is None:
            if path.startswith("/tasks/") and len(path) > len("/tasks/"):
                methods = self.task_routes
            elif path.startswith("/runs/") and len(path) > len("/runs/"):
                methods = self.run_routes
            else:
                raise HTTPError(404, f"no route {path!r}; see GET /static/index.html "
                                     "or docs/PROTOCOL.md (\"Routes\") for the API")
        method = "GET" if request.method == "HEAD" else request.method
        if method == "OPTIONS":
            return self.preflight(request, methods)
        handler = methods.get(method)
        if handler is None:
            allow = allowed_methods(methods)
            raise HTTPError(405, f"{request.method} is not allowed on {path}; "
                                 f"use {allow}", headers=[("Allow", allow)])
        if method != "GET" and not origin_allowed(request, self.settings.allow_origins):
            # A page on another site must not change tasks, even without tokens.
            raise HTTPError(403, f"origin {request.headers.get('origin')!r} is not "
                                 "allowed; list it in PROGRESSISTA_ALLOW_ORIGINS",
                            reason="origin")
        self.check_token(request)
        return handler(request)

    def host_refusal(self, request):
        """None when the request's Host is one this server answers, else the 421."""
        host = request.headers.get("host")
        if host is not None and not host.strip():
            return error_response(HTTPError(400, "the Host header is empty: send the "
                                                 "server's name (and port)"))
        if self.allowed_hosts is None or host is None or host_name(host) in self.allowed_hosts:
            return None  # no Host at all is HTTP/1.0, which no browser sends
        return error_response(HTTPError(
            421, f"host {host[:100]!r} is not allowed: list it in "
                 f"{ENV_PREFIX}ALLOWED_HOSTS (--allowed-hosts)", reason="host"))

    def access(self, request):
        """What the request's token allows: "write" (every route; also when no tokens
        are configured), "read" (GET and HEAD only), or None (no valid token)."""
        return self.access_of(offered_token(request)[0])

    def access_of(self, token):
        settings = self.settings
        if not settings.api_tokens or token_in(token, settings.api_tokens):
            return "write"
        if settings.read_tokens and token_in(token, settings.read_tokens):
            return "read"
        return None

    def check_token(self, request):
        if not self.settings.api_tokens:  # Settings refuses read tokens without these
            return
        path = request.path
        if path in PUBLIC_PATHS or path.startswith("/static/"):
            return
        token, where = offered_token(request)  # read once: it is on the ingest path
        access = self.access_of(token)
        if (access is not None and request.method not in ("GET", "HEAD")
                and where == "cookie"
                and request.headers.get("origin") not in own_origins(request)):
            # CSRF: a browser attaches the cookie itself. SameSite=Strict keeps it off
            # every request another *site* starts, but another port of the same host is
            # the same site, and PROGRESSISTA_ALLOW_ORIGINS may say '*'. Only the page this
            # server serves writes with its cookie: its own origin, sent by every browser
            # on POST and DELETE. Anything else must send the token as a header.
            raise HTTPError(403, "a change authenticated by the dashboard's cookie must come "
                                 "from the dashboard's own origin; send 'Authorization: "
                                 "Bearer <token>'", reason="origin")
        if access == "write" or (access == "read" and request.method in ("GET", "HEAD")):
            return
        if access == "read":
            # A shared dashboard link must not be able to delete or forge tasks.
            raise HTTPError(403, f"this token may only read: {request.method} {path} needs "
                                 "an API token (PROGRESSISTA_API_TOKEN), not a read token",
                            reason="read_only_token")
        raise HTTPError(401, "missing or wrong token: send 'Authorization: Bearer "
                             "<token>' or add ?token=<token> to the URL",
                        headers=[("WWW-Authenticate", "Bearer")], reason="unauthorized")

    def cors_headers(self, request):
        origin = request.headers.get("origin")
        allowed = self.settings.allow_origins
        if origin is None or not allowed or not ("*" in allowed or origin in allowed):
            return []
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]

    def preflight(self, request, methods):
        allow = allowed_methods(methods)
        if request.headers.get("origin") is not None and not self.cors_headers(request):
            raise HTTPError(403, f"origin {request.headers['origin']!r} is not allowed; "
                                 "list it in PROGRESSISTA_ALLOW_ORIGINS", reason="origin")
        return Response(204, content_type=None, headers=[
            ("Allow", allow),
            ("Access-Control-Allow-Methods", allow),
            ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
            ("Access-Control-Max-Age", "600"),
        ])

    # Routes: one small handler each

    def post_progress(self, request):
        payload = request.json(self.fast_json)
        if type(payload) is list:
            if len(payload) > MAX_BATCH_ITEMS:
                raise HTTPError(400, f"batch of {len(payload)} updates is over the limit of "
                                     f"{MAX_BATCH_ITEMS}: split it")
            updates = [validate_update(item, index) for index, item in enumerate(payload)]
        else:
            updates = [validate_update(payload)]
        self.metrics.received(len(updates))
        accepted = Response(200, b'{"ok":true,"accepted":%d}' % len(updates))
        return settle(self.store.apply(updates, self.clock()),
                      lambda changed: self.applied(changed, accepted))

    async def every_task_in_parts(self, now, resync):
        """GET /tasks of a big store: the parts of the /ws snapshot (SnapshotParts, shared
        and paced), one per step of the loop, so that one answer never holds the loop
        for seconds. Its `now` is when it began: a poller that passes it as ?since= next
        gets everything that changed while the answer was being made."""
        parts, pacer = self.shared_parts(), Pacer(self.metrics)
        pieces = [b'{"resync":true,"tasks":{' if resync else b'{"tasks":{']
        low = parts.first()
        while low is not None:
            started = time.perf_counter()
            body, low, _ = parts.part(low, self.clock())
            if body:
                pieces.append(body if len(pieces) == 1 else b"," + body)
            await asyncio.sleep(pacer.pause_s(time.perf_counter() - started))
        pieces.append(b'},"now":%s}' % _encode(now))
        return Response(200, b"".join(pieces))

    def applied(self, changed, response):
        self.metrics.applied(len(changed))
        self.feed.changed(changed)
        return response

    def get_tasks(self, request):
        status = _status_query(request)
        run = request.query.get("run")
        since = _time_query(request, "since")
        limit = _count_query(request, "limit", MAX_PAGE_TASKS)
        after = request.query.get("after")
        now = self.clock()
        settings = self.settings

        def shown(task):
            return ((run is None or task.run == run)
                    and (status is None or task.shown_status(now, settings) == status))

        answer = {}
        if since is not None:
            # A poller's delta: what changed since its last call (whose `now` it passes),
            # and what was deleted; a filter that a task no longer passes deletes it too.
            changed_ids, removed, resync = self.changes.since(since)
            if not resync:
                tasks = {}
                for task in filter(None, map(self.store.get, changed_ids)):
                    if shown(task):
                        tasks[task.task_id] = task.as_dict(now, settings)
                    else:
                        removed.append(task.task_id)
                return json_response({"tasks": tasks, "now": now, "removed": removed})
            answer["resync"] = True  # the answer holds every task: replace your copy
        if limit is None and after is None:
            if (run is None and status is None and self.shared_parts is not None
                    and len(self.store) > SNAPSHOT_CHUNK_TASKS):
                return self.every_task_in_parts(now, resync=bool(answer))
            candidates = self.run_tasks(run, now) if run is not None else self.store.tasks()
            page, next_id = [task for task in candidates if shown(task)], None
        else:
            try:
                page, next_id = self.store.page(after, limit or MAX_PAGE_TASKS, shown)
            except LookupError:
                raise HTTPError(400, f"after: no task {after!r:.300} here (deleted long "
                                     "ago, or never): page again from the start") from None
        answer["tasks"] = {task.task_id: task.as_dict(now, settings) for task in page}
        answer["now"] = now
        if next_id is not None:
            answer["next"] = next_id
        return json_response(answer)

    def run_tasks(self, run, now):
        """The tasks of run `run`, in the store's order (oldest created first)."""
        tasks = filter(None, map(self.store.get, self.runs.task_ids(run, now)))
        return sorted(tasks, key=operator.attrgetter("rank"))

    def get_runs(self, request):
        now = self.clock()
        return json_response({"runs": self.runs.summaries(now), "now": now})

    def get_run(self, request):
        run = urllib.parse.unquote(request.path[len("/runs/"):])
        now = self.clock()
        summary = self.runs.summary(run, now)
        if summary is None:
            raise HTTPError(404, f"no run {run!r:.300}")
        tasks = {task.task_id: task.as_dict(now, self.settings)
                 for task in self.run_tasks(run, now)}
        return json_response({"run": summary, "tasks": tasks, "now": now})

    def get_task(self, request):
        task_id = _path_task_id(request)
        task = self.store.get(task_id)
        if task is None:
            raise HTTPError(404, f"no task {task_id!r:.300}")
        return json_response(task.as_detail(self.clock(), self.settings))

    def delete_tasks(self, request):
        # With no filter this deletes everything: a misspelt filter must not mean that.
        unknown = set(request.query) - DELETE_FILTERS
        if unknown:
            raise HTTPError(400, f"unknown filter {sorted(unknown)[0]!r}: DELETE /tasks takes "
                                 "status, older_than, task_id and run (none deletes every "
                                 "task)")
        status = _status_query(request)
        older_than = _seconds_query(request, "older_than")
        # An id as a filter too: a browser cannot put "." or ".." in a path segment.
        task_id = request.query.get("task_id")
        run = request.query.get("run")
        now = self.clock()
        if task_id is not None:
            candidates = filter(None, [self.store.get(task_id)])
        else:
            candidates = self.run_tasks(run, now) if run is not None else self.store.tasks()
        doomed = [task.task_id for task in candidates
                  if (run is None or task.run == run)
                  and (status is None or task.shown_status(now, self.settings) == status)
                  and (older_than is None or now - task.updated_at >= older_than)]
        return settle(self.store.delete(doomed),
                      lambda removed: self.deleted(removed, removed))

    def delete_task(self, request):
        return settle(self.store.delete([_path_task_id(request)]),
                      lambda removed: self.deleted(removed, bool(removed)))

    def deleted(self, removed, answer):
        self.feed.removed(removed)
        return json_response({"removed": answer})

    def tasks_by_status(self):
        """How many tasks each status has now, as readers see them (stale included)."""
        now = self.clock()
        counts = dict.fromkeys(STATUSES, 0)
        for task in self.store.tasks():
            counts[task.shown_status(now, self.settings)] += 1
        return counts

    def get_health(self, request):
        store = self.store.health()
        return json_response({"status": "ok" if store.get("ok") else "degraded",
                              "tasks": len(self.store),
                              "active": self.tasks_by_status()["running"],
                              "listeners": self.server_gauges(scrape=False)["listeners"],
                              "store": store,
                              "version": __version__})

    def get_metrics(self, request):
        store = self.store.health()
        gauges = {"tasks_by_status": self.tasks_by_status(), **self.server_gauges(),
                  # From health(), which every store has: a store of your own may lack kind.
                  "store_kind": store.get("kind", "custom"), "store_up": store.get("ok"),
                  "store_errors": self.store.failures}
        return Response(200, render_metrics(self.metrics, gauges), METRICS_CONTENT_TYPE)

    def get_auth(self, request):
        # The dashboard asks, to hide the controls a read-only token may not use.
        return json_response({"access": self.access(request)})

    def get_ws_without_upgrade(self, request):
        # A GET with the upgrade headers never gets here (Connection.upgrade takes it).
        raise HTTPError(426, "/ws is a WebSocket: connect with a WebSocket client",
                        headers=[("Upgrade", "websocket")])

    def get_root(self, request):
        query = request.target.partition("?")[2]
        location = "/static/" + INDEX_FILE + ("?" + query if query else "")
        return Response(307, b"", content_type=None, headers=[("Location", location)])

    def get_dashboard(self, request):
        if self.page is None:
            raise HTTPError(404, self.page_source)
        headers = [
            ("Content-Security-Policy",
             content_security_policy(self.script_hashes, request.headers.get("host"))),
            ("Cache-Control", "no-cache"),
            ("Referrer-Policy", "no-referrer"),  # the URL may carry ?token=
        ]
        cookie = self.token_cookie(request)
        if cookie is not None:
            headers.append(("Set-Cookie", cookie))
        return Response(200, self.page, "text/html; charset=utf-8", headers=headers)

    def token_cookie(self, request):
        """The Set-Cookie value for a valid ?token= that opens the dashboard (a shared
        link), or None: the page then drops the token from its address bar, so that it
        stays out of history, bookmarks and screenshots. HttpOnly: no script reads it;
        SameSite=Strict: no other site's request carries it; a session cookie."""
        token = request.query.get("token")
        settings = self.settings
        if not token or not token_in(token, settings.api_tokens + settings.read_tokens):
            return None  # a wrong token sets nothing: the page will show the 401
        return (f"{TOKEN_COOKIE}={urllib.parse.quote(token, safe='')}; HttpOnly; "
                f"SameSite=Strict; Path=/" + ("; Secure" if settings.tls_cert else ""))


    # WebSocket admission

    def admit_websocket(self, request):
        """None when a /ws handshake may go on, else the Response refusing it; a coroutine
        of either when middleware must see the handshake first (as it sees every request)."""
        refusal = self.host_refusal(request)
        if refusal is not None:
            return refusal
        if self.middleware:
            return self.admitted_by_middleware(request)
        return self.check_websocket(request)

    async def admitted_by_middleware(self, request):
        async def innermost(request):
            return self.check_websocket(request) or WEBSOCKET_ADMITTED

        response = await self.through_middleware(request, innermost)
        return None if response is WEBSOCKET_ADMITTED else response

    def check_websocket(self, request):
        try:
            self.check_token(request)
        except ANSWERED_ERRORS as error:
            return error_response(error)
        return None

    def websocket_origins(self, request):
        if "*" in self.settings.allow_origins:
            return None
        return [None, *sorted(own_origins(request)), *self.settings.allow_origins]

    # Logging

    def route_label(self, path):
        """The route a path belongs to, for GET /metrics: a bounded set of labels."""
        if path in self.routes:
            return path
        if path.startswith("/tasks/"):
            return "/tasks/{task_id}"
        if path.startswith("/runs/"):
            return "/runs/{run}"
        return "other"

    def request_done(self, request, status, reason=None):
        """Count an answered request (None: one too malformed to parse) and log it."""
        if request is None:
            self.metrics.request_done("unparsed", "other", status, reason)
            return
        self.metrics.request_done(self.route_label(request.path), request.method, status,
                                  reason)
        if self.log_requests:
            log.debug("%s %s %d %.1fms", request.method, loggable_target(request.target),
                      status, (time.perf_counter() - request.started) * 1000)


# --- WebSocket -------------------------------------------------------------------------

try:  # keep the file importable for `version` and `--help` when websockets is missing
    from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
    from websockets.frames import Opcode
    from websockets.http11 import Request as WSRequest
    from websockets.protocol import State
    from websockets.server import ServerProtocol
except ImportError:  # pragma: no cover - reported by App.start()
    ServerProtocol = None


class UnsentWatch:
    """Tells a peer that reads slowly from one that stopped: `stalled()` is True once the
    unsent bytes have stayed above zero without shrinking for UNSENT_STALL_TIMEOUT_S."""

    __slots__ = ("unsent", "since")

    def __init__(self):
        self.unsent = 0
        self.since = None  # loop time the unsent bytes last shrank (or appeared)

    def stalled(self, unsent, now):
        if not unsent:
            self.since = None
        elif self.since is None or unsent < self.unsent:
            self.since = now  # it reads: the clock starts again
        self.unsent = unsent
        return self.since is not None and now - self.since > UNSENT_STALL_TIMEOUT_S


class Listener:
    """One /ws client: its Sans-I/O protocol, whether it keeps up, and its ping deadline.

    The hub offers it each broadcast (`offer()`) and asks it to keep its deadlines
    (`expire()`); the listener decides what to send, to skip or to give up."""

    __slots__ = ("connection", "protocol", "behind_since", "high_water", "ping_sent_at",
                 "last_ping_at", "ping_data", "drain")

    def __init__(self, connection, protocol, now):
        self.connection = connection
        self.protocol = protocol
        self.behind_since = None  # loop time it stopped getting messages, while behind
        self.high_water = LISTENER_BUFFER_HIGH_BYTES
        self.ping_sent_at = None  # while a ping waits for its pong
        self.ping_data = None  # what that pong must carry
        self.last_ping_at = now
        self.drain = UnsentWatch()  # a snapshot (or anything) left unread too long

    def send(self, payload):
        """Send one text message; the bytes go straight to the transport's buffer."""
        self.protocol.send_text(payload)
        self.flush()

    def send_snapshot(self, snapshot):
        # A snapshot may be bigger than the high-water mark by itself: give it room, or a
        # listener that has not read it by the next tick would fall behind, again and again.
        self.high_water = LISTENER_BUFFER_HIGH_BYTES + len(snapshot)
        self.send(snapshot)

    def offer(self, messages, now):
        """Send this broadcast's `messages` if the listener keeps up. Return SENT, or
        RESYNC when it has drained after falling behind and needs a fresh snapshot, or
        None (skipped: it is behind, or closed for not reading)."""
        unsent = self.unsent_bytes()
        if self.behind_since is not None:
            # It missed messages: once it has drained, a fresh snapshot resyncs it.
            if unsent <= LISTENER_BUFFER_LOW_BYTES:
                self.behind_since = None
                return RESYNC
            if now - self.behind_since > LISTENER_BEHIND_TIMEOUT_S:
                self.drop("it stopped reading")
            return None
        if unsent > self.high_water:
            self.behind_since = now  # drop what it has pending, never block the others
            return None
        for message in messages:
            self.send(message)
        return SENT

    def expire(self, now):
        """Ping when one is due; close a listener that left a ping unanswered too long, or
        whose unsent bytes (its snapshot, say) have not shrunk for UNSENT_STALL_TIMEOUT_S:
        a client that answers pings but never reads must not hold a snapshot forever."""
        if self.drain.stalled(self.unsent_bytes(), now):
            self.drop("it stopped reading")
        elif self.ping_sent_at is not None:
            if now - self.ping_sent_at > WS_PING_TIMEOUT_S:
                self.drop("no pong")
        elif (now - self.last_ping_at >= WS_PING_INTERVAL_S
              and self.protocol.state is State.OPEN):
            self.ping_sent_at = self.last_ping_at = now
            self.ping_data = os.urandom(4)
            self.protocol.send_ping(self.ping_data)
            self.flush()

    def flush(self):
        transport = self.connection.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            else:  # b"": the protocol is done with the stream
                self.connection.close()
                return

    def unsent_bytes(self):
        transport = self.connection.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def is_open(self):
        return self.connection.transport is not None

    def drop(self, reason):
        """Close at once, what is unsent with it, and say why in the log."""
        log.info("closing /ws listener %s: %s", self.connection.peer, reason)
        self.connection.abort()

    def receive(self, data):
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            # Messages from clients are ignored; only the pong that answers our ping shows
            # liveness (an unsolicited pong would let a client that never reads stay).
            if (getattr(event, "opcode", None) is Opcode.PONG and self.ping_data is not None
                    and event.data == self.ping_data):
                self.ping_sent_at = self.ping_data = None
        self.flush()
        if protocol.state is State.CLOSED:
            self.connection.close()
        elif self.unsent_bytes() > self.high_water + LISTENER_PONG_BACKLOG_BYTES:
            # What we sent is within high_water: the rest is pongs to its pings.
            self.drop("it pings but does not read")

    def close(self, code=1001, reason="server shutting down"):
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self.flush()


SENT, RESYNC = "sent", "resync"  # what Listener.offer() did


class _SnapshotPass:
    """One chunked snapshot under way, to the listeners that asked within one broadcast
    interval: the part to send next, by its first rank (None: all sent)."""

    __slots__ = ("parts", "low", "listeners", "first", "blocked_since")

    def __init__(self, parts, listeners):
        self.parts = parts
        self.low = parts.first()
        self.listeners = listeners
        self.first = True  # the next part is the first: a `snapshot`, with the runs
        self.blocked_since = None  # loop time a listener began to hold it up


class Hub:
    """The live feed's listeners: a snapshot for each newcomer, each broadcast offered to
    every listener (one that falls behind never slows the others), and their pings.

    A store of at most SNAPSHOT_CHUNK_TASKS tasks gets one snapshot message, built once
    per broadcast interval however many listeners (re)connect in it. A bigger one goes
    out in parts (`pump()`), to all the listeners that asked within one broadcast interval
    at once; they get the updates from their first part on. The parts are encoded once
    and shared by later snapshots while they hold (`SnapshotParts`); while updates are
    coming in, making and sending them takes at most SNAPSHOT_CPU_SHARE of the loop."""

    def __init__(self, feed, store, settings, clock, metrics, runs=None, changes=None):
        self.feed = feed
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.runs = runs  # a RunIndex: run summaries go with the tasks
        self.changes = changes  # the ChangeLog: which shared parts still hold
        self.listeners = set()  # those that get the updates
        self.waiting = []  # listeners whose chunked snapshot starts at the next broadcast
        self.passes = []  # chunked snapshots under way
        self.shared_parts = None  # SnapshotParts of a ranked store, while in use
        self.cached_snapshot = None
        self.pacer = Pacer(metrics)

    def __len__(self):
        return len(self.listeners) + len(self.waiting)

    def add(self, listener):
        self.metrics.listener_opened()
        self.send_snapshot(listener)

    def discard(self, listener):
        self.listeners.discard(listener)
        self.leave_snapshots(listener)

    def leave_snapshots(self, listener):
        if listener in self.waiting:
            self.waiting.remove(listener)
        for snapshot_pass in self.passes:
            if listener in snapshot_pass.listeners:
                snapshot_pass.listeners.remove(listener)

    def snapshot(self):
        """The one-message snapshot, built once per broadcast interval however many
        listeners (re)connect in it: what changes after it is built is in the feed, and
        goes to them with the next update."""
        if self.cached_snapshot is None:
            self.cached_snapshot = snapshot_message(self.store, self.clock(),
                                                    self.settings, self.runs)
        return self.cached_snapshot

    def send_snapshot(self, listener):
        self.leave_snapshots(listener)  # a listener resyncing starts over
        if len(self.store) > SNAPSHOT_CHUNK_TASKS:
            self.listeners.discard(listener)  # no updates before its first chunk
            self.waiting.append(listener)
            return
        snapshot = self.snapshot()
        self.metrics.broadcast((snapshot,), 1)
        listener.send_snapshot(snapshot)
        self.listeners.add(listener)

    def broadcast(self, loop_now):
        """Send what changed since the last call to every listener that keeps up, and
        start the chunked snapshot of those waiting for one; True while chunked snapshots
        remain to send (pump() them)."""
        self.cached_snapshot = None  # from here on it would miss what the feed hands out
        if not self.listeners:  # nobody to tell: a listener that comes gets a snapshot
            self.feed.discard(self.clock(), self.runs)
        else:
            messages = self.feed.take(self.store, self.clock(), self.settings, self.runs)
            sent_to = 0
            for listener in list(self.listeners):
                outcome = listener.offer(messages, loop_now)
                if outcome is SENT:
                    sent_to += 1
                elif outcome is RESYNC:
                    self.send_snapshot(listener)
            self.metrics.broadcast(messages, sent_to)
        if self.waiting:
            self.passes.append(_SnapshotPass(self.snapshot_parts(loop_now), self.waiting))
            self.waiting = []
        elif (self.shared_parts is not None and not self.passes
              and loop_now - self.shared_parts.used_at > SNAPSHOT_CACHE_IDLE_S):
            self.shared_parts = None  # its memory is worth more than a later snapshot
        return bool(self.passes)

    def snapshot_parts(self, loop_now):
        ranked = self.store.ranked()
        if ranked is None or self.changes is None:
            return SnapshotParts(ListedTasks(self.store), self.settings, SNAPSHOT_CHUNK_TASKS)
        if self.shared_parts is None or self.shared_parts.source is not ranked:
            self.shared_parts = SnapshotParts(ranked, self.settings, SNAPSHOT_CHUNK_TASKS,
                                              self.changes)
        self.shared_parts.used_at = loop_now
        return self.shared_parts

    def pump(self, loop_now):
        """Send the next part of each chunked snapshot under way whose listeners have
        drained the last one. Return the seconds to wait before the next call, or None
        when no pass is under way or waits for a reader.

        Parts go out between requests: while updates come in, the wait after a step is
        such that the steps take at most SNAPSHOT_CPU_SHARE of the loop; when none come,
        the snapshot goes out at full speed."""
        started = time.perf_counter()
        advanced = blocked = False
        for snapshot_pass in list(self.passes):
            listeners = snapshot_pass.listeners
            listeners[:] = [listener for listener in listeners if listener.is_open()]
            slow = [listener for listener in listeners
                    if listener.unsent_bytes() > SNAPSHOT_AHEAD_BYTES]
            if slow:  # wait for them: the parts of a big store must not pile up unsent
                if snapshot_pass.blocked_since is None:
                    snapshot_pass.blocked_since = loop_now
                elif loop_now - snapshot_pass.blocked_since > LISTENER_BEHIND_TIMEOUT_S:
                    for listener in slow:
                        listener.drop("it stopped reading its snapshot")
                blocked = True
                continue
            snapshot_pass.blocked_since = None
            if snapshot_pass.low is None or not listeners:
                self.passes.remove(snapshot_pass)
                continue
            message = self.next_part(snapshot_pass)
            self.metrics.broadcast((message,), len(listeners))
            for listener in listeners:
                listener.send_snapshot(message)
                self.listeners.add(listener)
            advanced = True
        if advanced:
            return self.pacer.pause_s(time.perf_counter() - started)
        # A reader that drains its buffer in milliseconds must not wait for the next
        # broadcast between two parts: a million tasks are 500 of them.
        return SNAPSHOT_DRAIN_POLL_S if blocked else None

    def next_part(self, snapshot_pass):
        """The pass's next message, skipping empty parts (but never the first or the
        last)."""
        parts = snapshot_pass.parts
        while True:
            now = self.clock()
            body, high, _ = parts.part(snapshot_pass.low, now)
            snapshot_pass.low = high
            if body or snapshot_pass.first or high is None:
                break
        runs_json = None
        if snapshot_pass.first and self.runs is not None:  # every run's summary, once
            runs_json = _encode(self.runs.summaries(now))
        message = snapshot_part_message(body, snapshot_pass.first, high is not None, now,
                                        runs_json)
        snapshot_pass.first = False
        return message

    def close_all(self):
        for listener in [*self.listeners, *self.waiting]:
            listener.close()


def upgrade_to_websocket(connection, request, head, origins, compression):
    """Run the /ws handshake on an HTTP connection; return a Listener, or None when the
    handshake was refused (the refusal has already been written)."""
    protocol = ServerProtocol(
        origins=origins,
        extensions=[ServerPerMessageDeflateFactory()] if compression else None,
        max_size=MAX_WS_MESSAGE_BYTES,
        logger=ws_log,
    )
    protocol.receive_data(head)
    events = protocol.events_received()
    if not events or not isinstance(events[0], WSRequest):
        connection.fail(HTTPError(400, "malformed WebSocket handshake"), request=request)
        return None
    response = protocol.accept(events[0])
    if response.status_code != 101:
        # Answer in JSON like every other error, keeping headers such as Upgrade.
        message = " ".join(response.body.decode("utf-8", "replace").split()).rstrip(".")
        if response.status_code == 403:
            message += "; list the origin in PROGRESSISTA_ALLOW_ORIGINS"
        kept = [(name, value) for name, value in response.headers.raw_items()
                if name.lower() not in ("content-length", "content-type", "connection", "date")]
        connection.fail(HTTPError(response.status_code, message, headers=kept,
                                  reason="origin" if response.status_code == 403 else None),
                        request=request)
        return None
    protocol.send_response(response)
    listener = Listener(connection, protocol, connection.app.loop.time())
    listener.flush()
    return listener


# --- Server ----------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP/1.1 requests, kept alive, until it becomes a /ws listener.

    Requests are answered in order; while a middleware or an asynchronous store works on
    one, reading pauses so that pipelined requests wait their turn. The connection keeps
    its own deadline (`expire()`): for the rest of a head, a body, or the next request."""

    def __init__(self, app):
        self.app = app
        self.transport = None
        self.peer = None
        self.buffer = bytearray()
        self.pending = None  # a Request whose head is read and whose body is awaited
        self.busy = False
        self.listener = None
        self.deadline = 0.0
        self.discarding = 0  # bytes of a refused body still to read before closing
        self.head_started = False  # a partial request head is waiting, its deadline set
        self.writing_paused = False  # over HTTP_UNSENT_HIGH_BYTES: not reading meanwhile
        self.drain = UnsentWatch()

    # asyncio callbacks

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if not self.app.connection_opened(self):
            transport.abort()  # one refused rather than file descriptors run out for all
            return
        self.deadline = self.app.loop.time() + HEADER_TIMEOUT_S
        transport.set_write_buffer_limits(high=HTTP_UNSENT_HIGH_BYTES)

    def pause_writing(self):
        # The peer reads our answers slower than it sends requests: answer no more, and
        # read no more, until it has caught up (resume_writing). A listener decides for
        # itself (Listener.offer) and must still read its client's frames.
        self.writing_paused = True
        if self.listener is None:
            self.transport.pause_reading()

    def resume_writing(self):
        self.writing_paused = False
        if self.listener is None and not self.busy and self.transport is not None:
            self.transport.resume_reading()
            self.process()  # what was read before the pause

    def connection_lost(self, exc):
        self.app.connection_closed(self)
        self.transport = None

    def data_received(self, data):
        if self.discarding:
            self.discarding -= len(data)
            if self.discarding <= 0:
                self.close()
            return
        if self.listener is not None:
            try:
                self.listener.receive(data)
            except Exception:  # a protocol error already queued its close frame
                log.debug("closing /ws listener %s after a protocol error", self.peer,
                          exc_info=True)
                self.close()
            return
        self.buffer += data
        if not self.busy:
            self.process()

    def eof_received(self):
        if self.listener is not None:
            self.listener.protocol.receive_eof()
            self.listener.flush()
        return False  # close our side too

    # Deadlines

    def expire(self, now):
        """Close this connection if it is past its deadline at loop time `now`; return
        True when that cut off a request that never finished. A listener keeps its own."""
        if self.listener is not None:
            self.listener.expire(now)
            return False
        if self.transport is not None and self.drain.stalled(
                self.transport.get_write_buffer_size(), now):
            log.info("dropping connection %s: it stopped reading its answers", self.peer)
            self.abort()
            return False
        if now <= self.deadline or self.busy or self.writing_paused:
            return False
        cut_off = self.pending is not None or self.head_started
        if self.transport is not None and self.transport.get_write_buffer_size():
            self.abort()  # close() would wait for a peer that does not read
        else:
            self.close()
        return cut_off

    # HTTP

    def process(self):
        """Answer every complete request in the buffer."""
        buffer = self.buffer
        app = self.app
        while self.transport is not None and not self.busy and not self.writing_paused:
            request = self.pending
            if request is None:
                if not buffer:
                    self.deadline = app.loop.time() + KEEPALIVE_TIMEOUT_S
                    return
                end = buffer.find(b"\r\n\r\n")
                if end < 0 or end > MAX_HEADER_BYTES:
                    self.await_head()
                    return
                head = bytes(buffer[:end])
                del buffer[:end + 4]
                self.head_started = False
                try:
                    request = parse_head(head, self.peer)
                    if app.api.log_requests:  # the only reader of the start time
                        request.started = time.perf_counter()
                    length = body_length(request, app.settings.max_body_bytes)
                    if (request.path == "/ws" and request.method == "GET"
                            and "upgrade" in request.headers):  # else the API's 426
                        if length:
                            # Refused or not, its body must never be read as the next
                            # request: that would run a request no proxy saw.
                            raise HTTPError(400, "a WebSocket handshake has no body")
                        self.upgrade(request, head + b"\r\n\r\n")
                        return
                except HTTPError as error:
                    declared = request.headers.get("content-length", "") if request else ""
                    self.fail(error, int(declared) if error.status == 413 else 0, request)
                    return
                if length:
                    if (len(buffer) < length and request.version == "HTTP/1.1"  # 1.0: no 100
                            and "100-continue" in request.headers.get("expect", "").lower()):
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    request.body = length  # the length, until the body is read
                    self.pending = request
                    # Once per body, not per chunk: a trickle of bytes must not keep
                    # a connection (and its buffer) forever.
                    self.deadline = app.loop.time() + BODY_TIMEOUT_S
                else:
                    self.respond(request)
                    continue
            length = request.body
            if len(buffer) < length:
                return
            request.body = bytes(buffer[:length])
            del buffer[:length]
            self.pending = None
            self.respond(request)

    def await_head(self):
        """Wait for the rest of a request head, or refuse one that cannot become valid."""
        buffer = self.buffer
        line_end = buffer.find(b"\r\n")
        first = buffer[:line_end] if line_end >= 0 else buffer[:MAX_HEADER_BYTES]
        if (not b"A" <= first[:1] <= b"Z"
                or (line_end >= 0 and not REQUEST_LINE.match(first.decode("latin-1"))
                    and not OTHER_HTTP_VERSION.match(first.decode("latin-1")))):
            self.fail(HTTPError(400, "malformed request line: expected 'METHOD /path HTTP/1.1'"))
        elif b"\n\n" in buffer:  # a bare-LF head would otherwise wait for its timeout
            self.fail(HTTPError(400, "request lines must end with CRLF (\\r\\n)"))
        elif len(buffer) > MAX_HEADER_BYTES:
            self.fail(HTTPError(431, f"request headers are over the limit of "
                                     f"{MAX_HEADER_BYTES} bytes"))
        elif not self.head_started:  # the clock starts at the first byte, once
            self.head_started = True
            self.deadline = self.app.loop.time() + HEADER_TIMEOUT_S

    def after(self, result, then):
        """`then(result)` at once, or, when `result` is a coroutine (middleware, an
        asynchronous store), once it is done; reading pauses meanwhile, so requests
        pipelined behind this one wait their turn."""
        if not is_pending(result):
            then(result)
            return
        self.busy = True
        self.transport.pause_reading()
        self.app.loop.create_task(result).add_done_callback(
            lambda done: self.resume(done, then))

    def resume(self, done, then):
        self.busy = False
        if self.transport is None:
            return
        if not self.writing_paused:
            self.transport.resume_reading()  # closing after the write: this does nothing
        then(shutting_down() if done.cancelled() else done.result())
        if self.listener is None:
            self.process()  # the requests that waited behind this one

    def respond(self, request):
        response = self.app.api.handle(request)
        if is_pending(response):
            self.after(response, lambda response: self.write(request, response))
        else:  # the common case, without a closure
            self.write(request, response)

    def write(self, request, response):
        keep_alive = request.keep_alive
        if keep_alive and request.version == "HTTP/1.0":  # 1.0 closes unless told otherwise
            response.headers.append(("Connection", "keep-alive"))
        self.transport.write(serialize_response(response, keep_alive, request.method == "HEAD"))
        self.app.api.request_done(request, response.status, response.reason)
        if not keep_alive:
            # Nothing after a "Connection: close" is read, let alone applied unanswered.
            self.buffer.clear()
            self.close()

    def fail(self, error, unread_body_bytes=0, request=None):
        """Answer an unreadable request with its error and close the connection.

        A client still sending a refused body would get a reset instead of the answer if
        we closed at once, so up to MAX_DISCARD_BYTES of it are read and dropped first."""
        if self.transport is None:
            return
        self.transport.write(serialize_response(error_response(error), keep_alive=False))
        self.app.api.request_done(request, error.status, error.reason)
        self.discarding = unread_body_bytes - len(self.buffer)
        self.buffer.clear()
        if 0 < self.discarding <= MAX_DISCARD_BYTES:
            self.deadline = self.app.loop.time() + DISCARD_TIMEOUT_S
        else:
            self.discarding = 0
            self.close()

    # WebSocket

    def upgrade(self, request, head):
        self.after(self.app.api.admit_websocket(request),
                   lambda refusal: self.open_websocket(request, head, refusal))

    def open_websocket(self, request, head, refusal):
        """Upgrade to a /ws listener, or answer `refusal` and go on with HTTP."""
        app = self.app
        if refusal is not None:
            self.write(request, refusal)
            self.process()  # requests pipelined behind the refused handshake
            return
        listener = upgrade_to_websocket(self, request, head, app.api.websocket_origins(request),
                                        app.settings.ws_compression)
        if listener is None:  # refused, answered and counted
            return
        app.api.request_done(request, 101)
        self.listener = listener
        self.deadline = math.inf  # its listener keeps the deadlines from now on
        app.hub.add(listener)
        if self.buffer:  # bytes that followed the head belong to the WebSocket
            rest, self.buffer = bytes(self.buffer), bytearray()
            self.data_received(rest)

    def close(self):
        if self.transport is not None:
            self.transport.close()

    def abort(self):
        """Close at once, dropping what is unsent (a listener that stopped reading)."""
        if self.transport is not None:
            self.transport.abort()


class StartupError(Exception):
    """A setting the server cannot start with (a TLS file it cannot read); the message
    says what to fix."""


def server_tls_context(cert_file, key_file):
    """The server's TLS context: the standard library's defaults, TLS 1.2 or newer, this
    certificate chain and key. Raise StartupError naming the file that is wrong."""
    for path, flag in ((cert_file, "--tls-cert"), (key_file, "--tls-key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise StartupError(f"{flag} {path!r}: cannot read it ({error.strerror or error})"
                               ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as error:
        raise StartupError(f"--tls-cert {cert_file!r} with --tls-key {key_file!r}: cannot "
                           f"use them ({error.reason or error}): give PEM files, the key "
                           "being the certificate's own") from None
    return context


class App:
    """The server: it builds the parts and runs them on one loop.

    `api` answers requests, `hub` runs the live feed, `store` holds the tasks and
    `notifier` sends webhooks; the App owns the connections, the timers (broadcast,
    sweep, deadlines, store flush) and the lifecycle. Serve it with `run()` (blocking,
    stops on SIGINT/SIGTERM) or `await start()` and `await stop()` from your own loop.
    Extend it with `add_middleware()`."""

    def __init__(self, settings, store=None, clock=time.time):
        self.settings = settings
        self.clock = clock
        self.store = store if store is not None else open_store(settings.store, settings)
        # Every change to the store goes through the feed: to the hub, to the change log
        # of pollers and to the run index.
        self.changes = ChangeLog(clock)
        self.runs = RunIndex(self.store.get, lambda task, now: task.shown_status(now, settings),
                             settings.run_settle_seconds)
        self.feed = Feed(self.changes, self.runs)
        self.metrics = Metrics(clock())
        self.notifier = Notifier.from_settings(settings)  # None without --notify
        self.hub = Hub(self.feed, self.store, settings, clock, self.metrics, self.runs,
                       self.changes)
        self.api = Api(settings, self.store, self.feed, self.metrics, clock, self.gauges,
                       changes=self.changes, runs=self.runs)
        if self.store.ranked() is not None:
            self.api.shared_parts = lambda: self.hub.snapshot_parts(self.loop.time())
        self.tls = (server_tls_context(settings.tls_cert, settings.tls_key)
                    if settings.tls_cert else None)  # None: plain HTTP
        self.loop = None
        self.server = None
        self.port = None
        self.connections = set()
        self.max_connections = connection_limit()
        self.refusals_logged_at = -math.inf
        self.background = []
        self.stopping = False
        self.pump_handle = None  # the next step of the chunked snapshots, when one is due

    def add_middleware(self, middleware):
        """Wrap request handling (and /ws handshakes); see `Api.add_middleware()`."""
        return self.api.add_middleware(middleware)

    def gauges(self, scrape=True):
        """What the server counts live: for /health the cheap counts, for a /metrics
        scrape also the notifications and runs by status."""
        counts = {"listeners": len(self.hub), "connections": len(self.connections)}
        if scrape:
            counts.update(notifications=self.notification_outcomes(),
                          runs_by_status=self.runs_by_status())
        return counts

    def runs_by_status(self):
        # From the run index's cached summaries: O(runs), not O(tasks), per scrape.
        counts = dict.fromkeys(STATUSES, 0)
        for summary in self.runs.summaries(self.clock()).values():
            counts[summary["status"]] = counts.get(summary["status"], 0) + 1
        return counts

    def notification_outcomes(self):
        if self.notifier is None:
            return dict.fromkeys(NOTIFY_OUTCOMES, 0)
        return self.notifier.outcomes()

    # Connections

    def connection_opened(self, connection):
        """Admit a new connection; False when the descriptor limit is reached."""
        if len(self.connections) >= self.max_connections:
            self.metrics.reject("connection_limit")
            now = time.monotonic()
            if now - self.refusals_logged_at > 60:  # a flood of them is one line a minute
                self.refusals_logged_at = now
                log.warning("refusing connections: %d open, the most this process's file "
                            "descriptors allow (raise ulimit -n)", len(self.connections))
            return False
        self.connections.add(connection)
        return True

    def connection_closed(self, connection):
        self.connections.discard(connection)
        if connection.listener is not None:
            self.hub.discard(connection.listener)

    # Timers

    def broadcast(self):
        """Tell the notifier and every listener what changed since the last call."""
        if self.notifier is not None:  # first: the hub clears the feed
            changed_ids, removed_ids = self.feed.pending()
            self.notifier.observe(changed_ids, removed_ids, self.store, self.clock(),
                                  self.settings)
            self.notifier.tick(self.clock())
        if self.hub.broadcast(self.loop.time()) and self.pump_handle is None:
            self.pump()

    def pump(self):
        # One part of each snapshot under way per step, paced by the hub: requests go on
        # in between. One chain of steps at a time: the broadcast only starts one.
        self.pump_handle = None
        delay_s = None if self.stopping else self.hub.pump(self.loop.time())
        if delay_s is not None:
            self.pump_handle = self.loop.call_later(delay_s, self.pump)

    def sweep(self):
        return settle(self.store.sweep(self.clock(), self.settings), self.swept)

    def swept(self, outcome):
        changed_ids, removed_ids = outcome
        self.feed.changed(changed_ids)
        self.feed.removed(removed_ids)
        # Every sweep, listeners or not: a run's end is news once it has settled.
        ended = self.runs.ended_runs(self.clock())
        if ended:
            self.feed.runs_ended(ended)
            if self.notifier is not None:
                self.notifier.runs_ended(ended, self.runs, self.store, self.clock())

    def reap(self):
        """Let every connection keep its deadlines: close the late, ping the listeners."""
        now = self.loop.time()
        for connection in list(self.connections):
            if connection.expire(now):
                self.metrics.reject("timeout")  # a request that never finished

    async def every(self, interval_s, work):
        # Not `while True`: redis-py can swallow a cancel, and the loop must still end.
        while not self.stopping:
            await asyncio.sleep(interval_s)
            try:
                await resolved(work())
            except Exception:
                log.error("%s failed; will retry", work.__name__, exc_info=True)

    # Serving

    async def start(self):
        """Listen on the configured host and port (port 0: any free port; see .port)."""
        if ServerProtocol is None:
            raise RuntimeError("the websockets package is missing: pip install websockets")
        self.loop = asyncio.get_running_loop()
        self.api.log_requests = log.isEnabledFor(logging.DEBUG)
        host = self.settings.host or None
        tls_options = {}
        if self.tls is not None:
            # A failed or stalled handshake (plain HTTP to this port, a scanner) ends in
            # asyncio's SSL layer, before any Connection exists: it costs that connection,
            # and asyncio logs such OSErrors only in its own debug mode (test_tls.py
            # checks that no warning or traceback is logged).
            tls_options = {"ssl": self.tls, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S}
        self.server = await self.loop.create_server(
            lambda: Connection(self), host, self.settings.port,
            reuse_address=True, backlog=1024, **tls_options)
        self.port = self.server.sockets[0].getsockname()[1]
        await resolved(self.store.open(self.feed))
        # A persistent store may hold tasks whose lifetime ran out while we were down.
        await resolved(self.sweep())
        # What it holds is old news: runs that ended before are not announced again.
        self.runs.load([task.task_id for task in self.store.tasks()], self.clock())
        if self.notifier is not None:  # after the first sweep: old news is not news
            self.notifier.start(self.store.tasks(), self.clock(), self.settings)
        interval_s = self.settings.broadcast_interval
        self.background = [
            self.loop.create_task(self.every(interval_s, self.broadcast)),
            self.loop.create_task(self.every(self.settings.cleanup_interval, self.sweep)),
            self.loop.create_task(self.every(min(REAP_INTERVAL_S, WS_PING_INTERVAL_S),
                                             self.reap)),
            # Persistent stores write once per broadcast interval; memory's is a no-op.
            self.loop.create_task(self.every(interval_s, self.store.flush)),
        ]
        self.announce()

    def announce(self):
        host = self.settings.host
        shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        if ":" in shown:
            shown = f"[{shown}]"
        store = self.store.health()
        log.info("Progressista %s listening on %s:%d; dashboard: %s://%s:%d/static/%s; "
                 "store: %s, %d tasks loaded", __version__, host or "*", self.port,
                 "https" if self.tls else "http", shown, self.port, INDEX_FILE,
                 store.get("kind", self.store.kind), len(self.store))
        if self.api.page is None:
            log.warning("%s", self.api.page_source)
        stale_s = self.settings.stale_seconds
        if 0 < stale_s < 2 * CLIENT_HEARTBEAT_S:
            log.warning("--stale-seconds %g is below twice the client's heartbeat (%g s): "
                        "healthy slow bars will flip between stale and running; use %g or "
                        "more", stale_s, CLIENT_HEARTBEAT_S, 2 * CLIENT_HEARTBEAT_S)
        if not self.settings.api_tokens and not _is_loopback(host):
            log.warning("listening on %s without a token: anyone who can reach this port "
                        "can read and change tasks; set PROGRESSISTA_API_TOKEN or "
                        "--host 127.0.0.1", host or "all interfaces")

    async def stop(self):
        """Close every listener with a close frame, free the port, end the loops."""
        if self.server is None:
            return
        self.stopping = True
        self.server.close()
        for task in self.background:
            task.cancel()
        self.broadcast()  # the last changes, before the goodbye
        self.hub.close_all()
        for connection in list(self.connections):
            if connection.listener is None and not connection.busy:
                connection.close()
        deadline = self.loop.time() + SHUTDOWN_TIMEOUT_S
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.abort()
        if self.notifier is not None:  # a job that closed just before SIGTERM is announced
            await self.notifier.close(self.clock())
        # Bounded: a task whose store call swallowed the cancel ends at its next turn.
        if self.background:
            await asyncio.wait(self.background, timeout=SHUTDOWN_TIMEOUT_S)
        await self.server.wait_closed()
        self.server = None
        await resolved(self.store.close())

    def run(self):
        """Serve until SIGINT or SIGTERM, then shut down gracefully."""
        async def serve():
            await self.start()
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(signum, stopping.set)
                except (NotImplementedError, RuntimeError):  # Windows, or not main thread
                    pass
            await stopping.wait()
            log.info("shutting down")
            await self.stop()

        asyncio.run(serve())


def connection_limit():
    """How many connections fit in this process's file descriptors, keeping some free."""
    if resource is None:  # not POSIX
        return MAX_CONNECTIONS_FALLBACK
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_FALLBACK
    return max(soft - FD_RESERVE, 16)


def raise_file_limit():
    """Raise the soft limit on open files to the hard one, as servers do."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; connection_limit() follows it


def _is_loopback(host):
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(store=None, middleware=(), clock=time.time, **settings):
    """An App from keyword settings (the fields of `Settings`) over the environment.

    `store` is a store URL, or an object with MemoryStore's interface that replaces the
    store; each item of `middleware` is added with `App.add_middleware()`."""
    if isinstance(store, str):  # a store URL, as --store takes
        settings["store"], store = store, None
    app = App(Settings.from_env(**settings), store=store, clock=clock)
    for item in middleware:
        app.add_middleware(item)
    return app


# --- Command line ----------------------------------------------------------------------




class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and status 2, as argparse does, without the usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_server_flags(parser):
    for setting in SETTINGS_TABLE:
        flag = "--" + setting.name.replace("_", "-")
        env = ENV_PREFIX + setting.env
        if setting.name == "api_tokens":
            parser.add_argument("--api-token", dest="api_tokens", action="append",
                                help=f"a bearer token clients must send (repeatable); "
                                     f"env {env}, {ENV_PREFIX}API_TOKEN")
            continue
        if setting.name == "read_tokens":
            parser.add_argument("--read-token", dest="read_tokens", action="append",
                                help=f"a token that may only view (repeatable; needs an "
                                     f"API token too); env {env}")
            continue
        if setting.name == "notify":  # checked in Settings.from_env, without echoing it
            parser.add_argument("--notify", dest="notify", action="append", metavar="URL",
                                help=f"{setting.help} [env {env}]")
            continue
        kind = setting.parse
        parser.add_argument(flag, dest=setting.name, type=kind, default=None,
                            metavar=setting.name.upper(),
                            help=f"{setting.help} [env {env}; default "
                                 f"{_shown_default(setting.name)}]")


def _shown_default(name):
    """A setting's default as --help shows it."""
    default = Settings.__dataclass_fields__[name].default
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    if default == "" or default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def settings_help():
    """The server flags and their environment variables, for the top-level --help."""
    rows = []
    for setting in SETTINGS_TABLE:
        flag = "--" + setting.name.replace("_", "-")
        if setting.name == "api_tokens":
            flag = "--api-token"
            env = f"{ENV_PREFIX}API_TOKEN, {ENV_PREFIX}API_TOKENS"
        elif setting.name == "read_tokens":
            flag = "--read-token"
            env = ENV_PREFIX + setting.env
        else:
            env = ENV_PREFIX + setting.env
        rows.append(f"  {flag:<22} {env}\n  {'':<22} {setting.help}")
    return ("server settings (serve, show-config; flags win over the environment):\n"
            + "\n".join(rows)
            + "\n\nclient settings (demo, run, watch, progressista_client):"
            "\n  PROGRESSISTA_SERVER_URL, PROGRESSISTA_API_TOKEN, PROGRESSISTA_PUSH_INTERVAL,"
            "\n  PROGRESSISTA_REQUEST_TIMEOUT, PROGRESSISTA_FLUSH_TIMEOUT,"
            "\n  PROGRESSISTA_HEARTBEAT_INTERVAL, PROGRESSISTA_RUN, PROGRESSISTA_RUN_NAME,"
            "\n  PROGRESSISTA_CA_BUNDLE (see docs/client.md)"
            "\n\nRun 'progressista COMMAND --help' for a command's options.")


def build_parser():
    parser = _Parser(
        prog="progressista",
        description="Live dashboard for tqdm progress bars. Without a command: serve.",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"progressista {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the server (the default command)")
    _add_server_flags(serve)
    config = commands.add_parser("show-config",
                                 help="print the effective settings as JSON, tokens masked")
    _add_server_flags(config)
    commands.add_parser("version", help="print the version")

    demo = commands.add_parser("demo", help="send a few fake bars to a server")
    demo.add_argument("--bars", type=_positive_int, default=3, help="how many bars (3)")
    demo.add_argument("--total", type=_positive_int, default=50, help="steps per bar (50)")
    demo.add_argument("--delay", type=_seconds, default=0.05, help="seconds per step (0.05)")
    _add_client_flags(demo, only=("--server-url", "--api-token"))

    run = commands.add_parser(
        "run", help="run a Python program with every tqdm bar sent to the server",
        usage="progressista run [options] (script.py | -m module) [-- program args]")
    run.add_argument("-m", dest="module", metavar="MODULE", help="run a module, like python -m")
    run.add_argument("target", nargs="?", help="the script to run")
    run.add_argument("program_args", nargs=argparse.REMAINDER,
                     help="arguments for the program (put them after --)")
    _add_client_flags(run)

    watch = commands.add_parser(
        "watch", help="show the server's bars live in this terminal",
        description="Draw the server's tasks as live tqdm bars, one line each, redrawn in "
                    "place and fitted to the terminal: unfinished tasks first (oldest "
                    "first), then errors and done tasks (latest first). With runs, one row "
                    "per run with its bars indented under it (--runs: the run rows only; "
                    "--bars: the flat list). Reconnects by itself.")
    watch.add_argument("--server", "--server-url", dest="server", metavar="URL",
                       help=f"the server; a client URL ending in /progress works too "
                            f"[env PROGRESSISTA_SERVER_URL; default {WATCH_DEFAULT_SERVER}]")
    watch.add_argument("--token", "--api-token", dest="token", metavar="T",
                       help="bearer token to send [env PROGRESSISTA_API_TOKEN]")
    watch.add_argument("--filter", metavar="TEXT",
                       help="only tasks whose id, description, postfix, error, status or "
                            "meta key=value contain TEXT (case-insensitive)")
    watch.add_argument("--status", type=watch_status, metavar="S",
                       help="only tasks in status S: running, stalled, stale, close (or done), "
                            "error, or active (running, stalled and stale)")
    watch.add_argument("--interval", type=_positive_seconds, default=WATCH_INTERVAL_S,
                       metavar="SEC", help=f"redraw at most every SEC s ({WATCH_INTERVAL_S:g})")
    views = watch.add_mutually_exclusive_group()
    views.add_argument("--runs", dest="view", action="store_const", const="runs",
                       help="one row per run, without its bars (bars without a run still "
                            "show); default: each run's row with its bars under it")
    views.add_argument("--bars", dest="view", action="store_const", const="bars",
                       help="every bar in one flat list, runs or not")
    watch.add_argument("--once", action="store_true",
                       help="print the table once and exit (for scripts and watch -n)")
    watch.add_argument("--json", action="store_true",
                       help='print {"tasks": {...}, "runs": {...}, "now": T}, what the table '
                            'would show (no "runs" with --bars), as JSON and exit')
    parser.command_names = tuple(commands.choices)
    return parser


def _json_object(text):
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, like '{\"job\": \"x\"}'")
    return value


def _add_client_flags(parser, only=None):
    flags = (
        ("--server-url", str, "where bars are sent [env PROGRESSISTA_SERVER_URL]"),
        ("--api-token", str, "bearer token to send [env PROGRESSISTA_API_TOKEN]"),
        ("--push-every", _seconds,
         "minimum seconds between two sends of one bar [env PROGRESSISTA_PUSH_INTERVAL]"),
        ("--request-timeout", _positive_seconds,
         "seconds before a request is given up [env PROGRESSISTA_REQUEST_TIMEOUT]"),
        ("--unit", str, "default unit of the bars"),
        ("--meta", _json_object, "JSON object attached to every bar"),
        ("--headers", _json_object, "JSON object of extra HTTP headers"),
    )
    for flag, kind, help_text in flags:
        if only is None or flag in only:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _settings_of(args):
    """The Settings the flags and the environment give, or None once the error is said."""
    overrides = {setting.name: getattr(args, setting.name, None) for setting in SETTINGS_TABLE}
    try:
        return Settings.from_env(**overrides)
    except ValueError as error:
        print(f"progressista: error: {error}", file=sys.stderr)
        return None


def cmd_serve(args):
    settings = _settings_of(args)
    if settings is None:
        return 2
    raise_file_limit()
    level = settings.log_level.upper()
    logging.basicConfig(level=logging.INFO if level == "DEBUG" else level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(level)  # debug is for our request lines, not asyncio's internals
    # Frames stay out of debug (see ws_log), but warning and above quiets them too.
    ws_log.setLevel(max(logging.INFO, logging.getLevelName(level)))
    try:
        app = App(settings)
    except (StoreError, StartupError) as error:
        print(f"progressista: error: {error}", file=sys.stderr)
        return 1
    try:
        app.run()
    except OSError as error:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, error)
        return 1
    return 0


def cmd_show_config(args):
    settings = _settings_of(args)
    if settings is None:
        return 2
    print(json.dumps(settings.public(), indent=2))
    return 0


def cmd_demo(args):
    import progressista_client

    return progressista_client.demo(bars=args.bars, total=args.total, delay=args.delay,
                                    server_url=args.server_url, token=args.api_token)


def cmd_run(args, program_args):
    import progressista_client

    if bool(args.module) == bool(args.target):
        print("progressista run: error: give a script or -m module (not both)",
              file=sys.stderr)
        return 2
    return progressista_client.run_program(
        args.module or args.target, program_args, module=bool(args.module),
        server_url=args.server_url, token=args.api_token, push_every=args.push_every,
        request_timeout=args.request_timeout, unit=args.unit, meta=args.meta,
        headers=args.headers)


# `watch`: the remote bars, live in a terminal. A pure core (format_row, render_table,
# apply_feed_message) and a thin I/O layer (the /ws client, GET /tasks, the screen).

WATCH_DEFAULT_SERVER = f"http://localhost:{DEFAULT_PORT}"
WATCH_STATUSES = STATUSES + ("active",)  # active: not ended, as in the dashboard
WATCH_STATUS_ALIASES = {"done": "close"}  # the word the table shows for close
WATCH_INTERVAL_S = 0.5  # default --interval: the screen is redrawn at most this often
WATCH_RETRY_FIRST_S = 0.5  # reconnect backoff: the first wait, doubled after each failure...
WATCH_RETRY_MAX_S = 5.0  # ...up to this
WATCH_TIMEOUT_S = 5.0  # to open the WebSocket, or for GET /tasks to answer
WATCH_CLOSE_TIMEOUT_S = 1.0  # Ctrl-C waits no longer than this for the closing handshake
# The largest snapshot there can be: MAX_TASKS tasks with every text field at its limit.
WATCH_MAX_MESSAGE_BYTES = 1 << 30
STATUS_COLUMN_CELLS = 6  # "error " in front of each bar; blank for a running task...
STALLED_COLUMN_CELLS = 8  # ..."stalled " when a row shown reads stalled
STATUS_WORDS = {"running": "", "stalled": "stalled", "stale": "stale", "close": "done",
                "error": "error"}
# SGR: magenta (alive, not moving), yellow (not heard from), green, red
STATUS_COLOURS = {"stalled": "35", "stale": "33", "close": "32", "error": "31"}
NATURAL_BAR_CELLS = 10  # tqdm's bar when it is given no ncols
MIN_LABEL_CELLS = 8  # a label is cut to its column (or tqdm's prefix to half the row), never below
LABEL_SHARE = 0.4  # the label column takes at most this share of a row (MIN_LABEL_CELLS at least)
WHOLE_LABEL_CELLS = 40  # the label column of a table not fitted to a width (not a terminal)
INDENT_CELLS = 2  # a bar under its run, and each level of nesting under its parent bar
HOST_COLUMN_MAX_CELLS = 16  # the host column, when a row shown has a host
RUN_ROW_HOSTS = 2  # hosts named on a run's row, then "+N"
RUN_BAR_CHARS = " \u258f\u258e\u258d\u258c\u258b\u258a\u2589\u2588"  # tqdm's unicode blocks
RUN_BAR_ASCII = " 123456789#"  # and tqdm's ascii ones
# Every control character, and the bidirectional overrides that could reorder what a
# row shows: task fields come from the network and must not drive the terminal.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ANSI = {"hide_cursor": "\x1b[?25l", "show_cursor": "\x1b[?25h", "clear_below": "\x1b[J"}


def _printable(text):
    return _UNPRINTABLE.sub(lambda match: " " if match.group() in "\t\n\r\v\f" else "?",
                            str(text))


def _char_cells(char):
    import unicodedata

    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _cells(text):
    """How many terminal cells `text` takes (wide CJK and emoji take two, accents none)."""
    if text.isascii():
        return len(text)
    return sum(_char_cells(char) for char in text)


def _fit(text, width):
    """`text` cut to at most `width` cells, with "…" where it was cut (None: no limit)."""
    if width is None or _cells(text) <= width:
        return text
    if width <= 0:
        return ""
    kept, used = [], 0
    for char in text:
        cells = _char_cells(char)
        if used + cells > width - 1:
            break
        kept.append(char)
        used += cells
    return "".join(kept) + ELLIPSIS


def _pad(text, width):
    text = _fit(text, width)
    return text + " " * (width - _cells(text))


def _json_whole(value):
    # JSON cannot tell 3 from 3.0: show a whole number as tqdm shows an int (as the dashboard)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return value


def _number_or(value, default):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return _json_whole(value)


def meter_fields(task, now, ascii=False):
    """The arguments of tqdm.format_meter for one task (a dict in its wire form) at `now`
    (server time), plus `eta`: what to show for the time left when tqdm's guess is wrong."""
    status = task.get("status") or "running"
    n = _number_or(task.get("n"), 0)
    total = _number_or(task.get("total"), None)
    created_at = _number_or(task.get("created_at"), now)
    updated_at = _number_or(task.get("updated_at"), now)
    # A sender that reports no elapsed (curl) has been seen working since it was created.
    elapsed = _number_or(task.get("elapsed"), max(0.0, updated_at - created_at))
    if status in ("running", "stalled"):
        # The sender's elapsed is as of its last update; between updates a live bar's
        # clock keeps going, as tqdm's own does. Stale and finished bars stand still.
        elapsed += max(0.0, now - updated_at)
    unit_scale = task.get("unit_scale", False)
    if isinstance(unit_scale, bool) or not isinstance(unit_scale, (int, float)):
        unit_scale = bool(unit_scale)
    has_bar = bool(total) and n < total + 0.5  # tqdm shows no bar past the total
    # A stalled, stale or failed bar has no honest ETA, a finished one has none left.
    eta = None if status == "running" or not has_bar else ("00:00" if status == "close" else "?")
    return {
        "n": n, "total": total, "elapsed": elapsed,
        "prefix": _printable(task.get("desc") or task.get("task_id") or ""),
        "unit": _printable(task.get("unit") or "it"), "unit_scale": unit_scale,
        "rate": _number_or(task.get("rate"), None),
        "postfix": _printable(task["postfix"]) if task.get("postfix") else None,
        "unit_divisor": _number_or(task.get("unit_divisor"), 1000) or 1000,
        "ascii": ascii, "has_bar": has_bar, "eta": eta,
    }


def tqdm_meter(fields, ncols=None):
    """One bar drawn by tqdm.format_meter itself, from meter_fields()."""
    import tqdm

    kwargs = {name: value for name, value in fields.items() if name not in ("has_bar", "eta")}
    if fields["eta"] is not None:
        kwargs["bar_format"] = ("{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<%s, "
                                "{rate_fmt}{postfix}]" % fields["eta"])
    return tqdm.tqdm.format_meter(ncols=ncols, **kwargs)


def plain_meter(fields, ncols=None):
    """A bar in tqdm's format without tqdm: desc: pct%|bar| n/total [elapsed<eta, rate]."""
    n, total, rate, unit = fields["n"], fields["total"], fields["rate"], fields["unit"]
    unit_scale, divisor = fields["unit_scale"], fields["unit_divisor"]
    if unit_scale and unit_scale is not True and unit_scale != 1:  # a factor, then no prefixes
        n, total = n * unit_scale, total * unit_scale if total else total
        rate = rate * unit_scale if rate else rate
        unit_scale = False
    elapsed = fields["elapsed"]
    if rate is None and elapsed:
        rate = n / elapsed
    inverse = 1 / rate if rate else None
    if inverse and inverse > 1:
        rate_text = (format_sizeof(inverse) if unit_scale else f"{inverse:5.2f}") + "s/" + unit
    else:
        shown = (format_sizeof(rate) if unit_scale else f"{rate:5.2f}") if rate else "?"
        rate_text = shown + unit + "/s"
    number = (lambda x: format_sizeof(x, divisor)) if unit_scale else str
    postfix = ", " + fields["postfix"] if fields["postfix"] else ""
    prefix = fields["prefix"] + ": " if fields["prefix"] else ""
    if not fields["has_bar"]:
        return f"{prefix}{number(n)}{unit} [{format_interval(elapsed)}, {rate_text}{postfix}]"
    eta = fields["eta"] or (format_interval((total - n) / rate) if rate else "?")
    left = f"{prefix}{n / total * 100:3.0f}%|"
    right = f"| {number(n)}/{number(total)} [{format_interval(elapsed)}<{eta}, {rate_text}{postfix}]"
    cells = max(1, ncols - _cells(left + right)) if ncols else NATURAL_BAR_CELLS
    filled = int(min(1.0, max(0.0, n / total)) * cells)
    return left + ("#" if fields["ascii"] else "█") * filled + " " * (cells - filled) + right


def default_meter():
    """tqdm_meter when tqdm is importable (the server does not depend on it), else plain_meter."""
    try:
        import tqdm
    except ImportError:
        return plain_meter
    return tqdm_meter if hasattr(tqdm.tqdm, "format_meter") else plain_meter


def _row_tail(task, status, now):
    if status == "error" and task.get("error"):
        summary = _error_summary(task["error"]).strip()  # as the notifications say it
        return "  " + _printable(summary) if summary else ""
    if status == "stale":
        silent_s = now - _number_or(task.get("updated_at"), now)
        return f"  no update for {format_interval(silent_s)}"
    if status == "stalled":
        return "  " + stall_reason(task, now, format_interval)
    return ""


def _status_column(status, column_cells):
    return _pad(_printable(STATUS_WORDS.get(status, status)), column_cells - 1) + " "


def _label_columns(label, label_cells, host, host_cells, cut=True):
    # The label, with tqdm's colon, padded to its column, then the host's column when
    # there is one: the bars that follow start in one column whatever the labels' lengths.
    # Without `cut` (no width to fit), a longer label or host is kept whole.
    def column(text, cells):
        return _pad(text, cells) if cut else text + " " * max(0, cells - _cells(text))
    columns = column(label + ":" if label.strip() else label, label_cells) + " "
    return columns + (column(host, host_cells) + " " if host_cells else "")


def task_host(task):
    """The host a bar (its wire form) runs on, as a row shows it: meta.host, and meta.rank
    when the sender gave one ("gpu-01 r3"); "" when it gave neither."""
    meta = task.get("meta") if isinstance(task.get("meta"), dict) else {}
    host = meta.get("host") if isinstance(meta.get("host"), str) else ""
    rank = meta.get("rank")
    if isinstance(rank, (int, str)) and not isinstance(rank, bool) and str(rank) != "":
        host = f"{host} r{rank}".strip()
    return _printable(host)


def format_row(task, now, width=None, *, meter=None, ascii=False,
               column_cells=STATUS_COLUMN_CELLS, label_cells=None, host_cells=0, indent=0):
    """One line for one task at `now`: a status column of `column_cells` (blank while
    running), the bar as tqdm draws it, and why a stalled, stale or failed task stopped,
    in at most `width` cells. With `label_cells`, the description (after `indent` cells)
    and the host (`host_cells`, 0: none) get columns of their own and the bar comes after
    them; without, the description is tqdm's prefix, as tqdm prints it."""
    meter = meter or default_meter()
    status = task.get("status") or "running"
    column = _status_column(status, column_cells)
    fields = meter_fields(task, now, ascii)
    tail = _row_tail(task, status, now)
    if label_cells is not None:
        column += _label_columns(" " * indent + fields["prefix"], label_cells,
                                 task_host(task), host_cells, cut=width is not None)
        column_cells, fields["prefix"] = _cells(column), ""
    if width is None:
        return column + meter(fields, None) + tail
    room = width - column_cells
    if room <= 0:
        return _fit(column, width)
    fields["prefix"] = _fit(fields["prefix"], max(MIN_LABEL_CELLS, room // 2))
    if not fields["has_bar"]:  # nothing to stretch: the text as it is, cut below
        return _fit(column + meter(fields, None) + tail, width)
    if tail and fields["postfix"] and _cells(meter(fields, None)) + _cells(tail) > room:
        fields["postfix"] = None  # why a task stopped matters more than its last postfix
    natural = _cells(meter(fields, None))
    # The bar fills the row; for a tail, it shrinks towards its natural width first.
    ncols = room - _cells(tail) if room - _cells(tail) >= natural else min(room, natural)
    # Never so narrow that tqdm cuts the numbers itself: we cut, and show that we did.
    ncols = max(ncols, natural - NATURAL_BAR_CELLS + 1)
    return _fit(column + meter(fields, ncols) + tail, width)


def _blocks(fraction, cells, ascii=False):
    # tqdm's bar: whole blocks, then one partial block, then blanks.
    chars = RUN_BAR_ASCII if ascii else RUN_BAR_CHARS
    steps = len(chars) - 1
    whole, part = divmod(int(fraction * cells * steps), steps)
    if whole >= cells:
        return chars[-1] * cells
    return chars[-1] * whole + chars[part] + " " * (cells - whole - 1)


def run_meter(summary, now, ncols=None, ascii=False):
    """A run's progress in tqdm's layout: '40%|####      | 6/16 bars, 1 failed
    [05:07<10:14]', from its summary (PROTOCOL.md "Runs") at `now`; the bar fills
    `ncols` cells in all (None: a bar of tqdm's natural width). Without a progress, no
    bar; the ETA is the summary's, counted down from its updated_at."""
    counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else {}
    done, failed = _number_or(counts.get("close"), 0), _number_or(counts.get("error"), 0)
    counted = f"{done}/{_number_or(summary.get('tasks'), 0)} bars"
    if failed:
        counted += f", {failed} failed"
    status = summary.get("status") or "running"
    created_at = _number_or(summary.get("created_at"), now)
    ended_at = _number_or(summary.get("ended_at"), None)
    elapsed = max(0.0, (now if ended_at is None else ended_at) - created_at)
    eta_s = _number_or(summary.get("eta"), None)
    # As a bar's: a stalled, stale or failed run has no honest ETA, a finished one none left.
    if status == "close":
        eta = "00:00"
    elif status != "running" or eta_s is None:
        eta = "?"
    else:
        eta = format_interval(_number_or(summary.get("updated_at"), now) + eta_s - now)
    times = f"[{format_interval(elapsed)}<{eta}]"
    progress = _number_or(summary.get("progress"), None)
    if progress is None:
        return f"{counted} {times}"
    progress = min(1.0, max(0.0, progress))
    left, right = f"{progress * 100:3.0f}%|", f"| {counted} {times}"
    cells = max(1, ncols - _cells(left + right)) if ncols else NATURAL_BAR_CELLS
    return left + _blocks(progress, cells, ascii) + right


def run_hosts(summary):
    """A run's hosts as its row shows them: 'gpu-01, gpu-02 +14'."""
    hosts = [_printable(host) for host in summary.get("hosts") or () if isinstance(host, str)]
    shown = ", ".join(hosts[:RUN_ROW_HOSTS])
    return shown + (f" +{len(hosts) - RUN_ROW_HOSTS}" if len(hosts) > RUN_ROW_HOSTS else "")


def format_run_row(summary, now, width=None, *, ascii=False, column_cells=STATUS_COLUMN_CELLS,
                   label_cells=0, host_cells=0):
    """One line for one run: its status column, its name and hosts in the bars' label and
    host columns, then run_meter(), in at most `width` cells."""
    status = summary.get("status") or "running"
    name = summary.get("name") or summary.get("run") or ""
    column = _status_column(status, column_cells) + _label_columns(
        _printable(name), label_cells, run_hosts(summary), host_cells, cut=width is not None)
    if width is None:
        return column + run_meter(summary, now, None, ascii)
    natural = _cells(run_meter(summary, now, None, ascii))
    room = width - _cells(column)
    # The bar fills the row, never so narrow that the numbers are cut by a shrunk bar.
    return _fit(column + run_meter(summary, now, max(room, natural - NATURAL_BAR_CELLS + 1),
                                   ascii), width)


def run_matches(summary, text_filter=None, status=None):
    """The filter, for a run's own row: `text_filter` in its id, name, status or hosts;
    `status` its status, or active."""
    shown = summary.get("status") or "running"
    if status and (shown in FINAL_STATUSES if status == "active" else shown != status):
        return False
    if not text_filter:
        return True
    haystack = [summary.get("run"), summary.get("name"), shown, STATUS_WORDS.get(shown)] + [
        host for host in summary.get("hosts") or () if isinstance(host, str)]
    needle = text_filter.casefold()
    return any(needle in str(text).casefold() for text in haystack if text)


def _bar_tree(bars, fold=False):
    # (kind, bar, depth) in the order a tree reads: each bar's children right under it,
    # at one more level; siblings as order_tasks() puts them. A bar whose parent is not
    # listed (or a cycle of parents) starts at the top; depth stops growing at
    # RUN_MAX_DEPTH. With `fold`, a parent's finished leave=False children are one
    # ("folded", count, depth) row under it, as the dashboard folds them: a 100-epoch
    # job does not leave 100 finished inner rows.
    listed = {bar.get("task_id") for bar in bars}
    children, top, folded = {}, [], {}
    for bar in bars:
        parent = bar.get("parent")
        if isinstance(parent, str) and parent in listed and parent != bar.get("task_id"):
            if fold and bar.get("transient") is True and bar.get("status") == "close":
                folded[parent] = folded.get(parent, 0) + 1
                continue
            children.setdefault(parent, []).append(bar)
        else:
            top.append(bar)
    rows, seen = [], set()

    def visit(root):
        # Depth first with a stack of its own, not recursion: any sender can nest bars
        # as deep as it likes, and a deep chain must not break the view.
        stack = [(root, 0)]
        while stack:
            bar, depth = stack.pop()
            if isinstance(bar, tuple):  # a parent's folded count, after its children
                rows.append(bar)
                continue
            if bar.get("task_id") in seen:
                continue
            seen.add(bar.get("task_id"))
            rows.append(("bar", bar, depth))
            inner = min(depth + 1, RUN_MAX_DEPTH)
            if bar.get("task_id") in folded:
                stack.append((("folded", folded[bar.get("task_id")], inner), inner))
            kids = order_tasks(children.get(bar.get("task_id"), ()))
            stack.extend((child, inner) for child in reversed(kids))

    for bar in order_tasks(top):
        visit(bar)
    # In a cycle of parents: no way in from the top (folded bars are counted, not shown).
    for bar in order_tasks([child for kids in children.values() for child in kids]):
        if bar.get("task_id") not in seen:
            visit(bar)
    return rows


def watch_rows(tasks, runs, view="tree", text_filter=None, status=None, fold=True):
    """What `watch` lists, in order, as (kind, item, depth): ("run", summary, 0) rows,
    ("bar", task, depth) rows and ("folded", count, depth) rows. `view` "bars" is the flat
    list of matching tasks; "tree" has one row per run (ordered as order_tasks orders
    bars) with its bars under it, nested by parent; "runs" the run rows alone. In both,
    bars without a run (or whose run has no summary) follow the runs, flat. A run is
    listed when its own row matches the filters (run_matches) or one of its bars does;
    under it come the bars that match, or all of them when only the run's row did. In
    "tree" with `fold` and no filter, finished leave=False bars fold into their parent."""
    if view == "bars" or not runs:
        matching = [task for task in tasks.values() if task_matches(task, text_filter, status)]
        return [("bar", task, 0) for task in order_tasks(matching)]
    bars_of, loose = {}, []
    for task in tasks.values():
        run_id = task.get("run")
        if isinstance(run_id, str) and run_id in runs:
            bars_of.setdefault(run_id, []).append(task)
        else:
            loose.append(task)
    rows = []
    summaries = [summary for summary in runs.values() if isinstance(summary, dict)]
    for summary in order_tasks(summaries):
        bars = bars_of.get(summary.get("run"), [])
        matching = [task for task in bars if task_matches(task, text_filter, status)]
        if not matching and not run_matches(summary, text_filter, status):
            continue
        rows.append(("run", summary, 0))
        if view == "tree":
            nested = _bar_tree(matching or bars, fold and not text_filter and not status)
            rows += [(kind, item, depth + 1) for kind, item, depth in nested]
    matching = [task for task in loose if task_matches(task, text_filter, status)]
    return rows + [("bar", task, 0) for task in order_tasks(matching)]


def watch_status(text):
    """--status: running, stalled, stale, close (or done), error, or active (not ended)."""
    status = WATCH_STATUS_ALIASES.get(text.strip().lower(), text.strip().lower())
    if status not in WATCH_STATUSES:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(WATCH_STATUSES)} (or done), not {text!r}")
    return status


def task_matches(task, text_filter=None, status=None):
    """The dashboard's filter: `text_filter` in the id, description, postfix, error, status or
    a meta key=value (case-insensitive); `status` one status, or active."""
    shown = task.get("status") or "running"
    if status and (shown in FINAL_STATUSES if status == "active" else shown != status):
        return False
    if not text_filter:
        return True
    meta = task.get("meta") if isinstance(task.get("meta"), dict) else {}
    haystack = [task.get("task_id"), task.get("desc"), task.get("postfix"), task.get("error"),
                shown, STATUS_WORDS.get(shown)] + [f"{key}={value}" for key, value in meta.items()]
    needle = text_filter.casefold()
    return any(needle in str(text).casefold() for text in haystack if text)


def order_tasks(tasks):
    """Unfinished tasks first, in the server's order (oldest created first), so a running
    row stays put; then errors, then done tasks, the most recently finished first."""
    # Sorted, not taken as they came: an update message lists new tasks in its own order.
    # The sort is stable, so tasks created together keep the order the server sent.
    unfinished = sorted((task for task in tasks if task.get("status") not in FINAL_STATUSES),
                        key=lambda task: _number_or(task.get("created_at"), 0))
    def finished(status):
        return sorted((task for task in tasks if task.get("status") == status),
                      key=lambda task: -_number_or(task.get("updated_at"), 0))
    return unfinished + finished("error") + finished("close")


def _status_counts(tasks):
    counts = {}
    for task in tasks:
        status = task.get("status") or "running"
        counts[status] = counts.get(status, 0) + 1
    order = {status: index for index, status in enumerate(STATUSES)}
    return ", ".join(f"{count} {STATUS_WORDS.get(status) or status}"
                     for status, count in sorted(counts.items(),
                                                 key=lambda item: order.get(item[0], 99)))


def _row_label(kind, item, depth):
    # As _label_columns() shows it, colon included.
    if kind == "folded":
        return ""  # its text is not a label: it takes the row
    if kind == "run":
        label = _printable(item.get("name") or item.get("run") or "")
    else:
        label = " " * (depth * INDENT_CELLS) + _printable(item.get("desc")
                                                          or item.get("task_id") or "")
    return label + ":" if label.strip() else label


def render_table(tasks, now, width=None, height=None, text_filter=None, status=None, *,
                 source=None, notice=None, meter=None, ascii=False, runs=None, view=None):
    """The lines `watch` shows for `tasks` (task_id -> task, in the server's order) and
    `runs` (run id -> summary) at `now`: a header, `notice` when given, the rows of
    watch_rows() in `view` (None: "tree" when there are runs, else "bars"), all within
    `width` cells and `height` lines (None: no limit), with "+N more" for what is cut.
    Labels (indented under their run and parent) and hosts have columns of their own, so
    that every bar starts in one column."""
    runs = runs or {}
    view = view or ("tree" if runs else "bars")
    matching = [task for task in tasks.values() if task_matches(task, text_filter, status)]
    summary = f"{len(matching)} task{'' if len(matching) == 1 else 's'}"
    if len(matching) != len(tasks):
        summary += f" of {len(tasks)}"
    if matching:
        summary += ": " + _status_counts(matching)
    rows = watch_rows(tasks, runs, view, text_filter, status)
    shown_runs = sum(kind == "run" for kind, _, _ in rows)
    if view != "bars" and runs:
        summary = f"{shown_runs} run{'' if shown_runs == 1 else 's'}" + (
            f" of {len(runs)}" if shown_runs != len(runs) else "") + ", " + summary
    conditions = ([f"filter {text_filter!r}"] if text_filter else []) + (
        [f"status {STATUS_WORDS.get(status) or status}"] if status else [])
    header = " · ".join(["progressista"] + ([source] if source else []) + [summary] + conditions)
    lines = [_printable(header)] + ([_printable(notice)] if notice else [])
    meter = meter or default_meter()
    if not rows:
        body = ["no task matches" if tasks else "no tasks yet"]
        return [_fit(line, width) for line in (lines + body)[:height]]
    room = len(rows) if height is None else height - len(lines)
    shown = rows if room >= len(rows) else rows[:max(0, room - 1)]
    # The status column widens for "stalled" only when a row says it: the usual table
    # keeps its bars where they were.
    column_cells = (STALLED_COLUMN_CELLS if any(kind != "folded" and item.get("status") == "stalled"
                                                for kind, item, _ in shown)
                    else STATUS_COLUMN_CELLS)
    label_cells = max((_cells(_row_label(kind, item, depth)) for kind, item, depth in shown),
                      default=0)
    # Fitted: at most a share of the row (longer labels are cut); whole (no width): the
    # column stops at WHOLE_LABEL_CELLS and a longer label pushes its own row's bar on.
    label_cells = min(label_cells, WHOLE_LABEL_CELLS if width is None else max(
        MIN_LABEL_CELLS, int((width - column_cells) * LABEL_SHARE)))
    host_cells = min(HOST_COLUMN_MAX_CELLS, max(
        (_cells(run_hosts(item) if kind == "run" else task_host(item))
         for kind, item, _ in shown if kind != "folded"), default=0))
    for kind, item, depth in shown:
        if kind == "folded":
            lines.append(_fit(_status_column("close", column_cells) + " " * (depth * INDENT_CELLS)
                              + f"+{item} finished inner bar{'' if item == 1 else 's'}", width))
        elif kind == "run":
            lines.append(format_run_row(item, now, width, ascii=ascii, column_cells=column_cells,
                                        label_cells=label_cells, host_cells=host_cells))
        else:
            lines.append(format_row(item, now, width, meter=meter, ascii=ascii,
                                    column_cells=column_cells, label_cells=label_cells,
                                    host_cells=host_cells, indent=depth * INDENT_CELLS))
    if len(shown) < len(rows):
        hidden = rows[len(shown):]
        hidden_bars = [item for kind, item, _ in hidden if kind == "bar"]
        hidden_runs = sum(kind == "run" for kind, _, _ in hidden)
        said = ([f"{hidden_runs} run{'' if hidden_runs == 1 else 's'}"] if hidden_runs else []) + (
            [_status_counts(hidden_bars)] if hidden_bars else [])
        lines.append(f"+{len(hidden)} more ({'; '.join(said)})")
    return [_fit(line, width) for line in lines[:height]]


def apply_feed_message(tasks, message, runs=None):
    """Apply one /ws message (docs/PROTOCOL.md "The live feed") to `tasks`, task_id -> task, and
    to `runs`, run id -> summary, when given, in place; return the server's `now` it
    carries, or None for a message of another kind."""
    kind = message.get("type") if isinstance(message, dict) else None
    sent = message.get("tasks") if kind in ("snapshot", "snapshot_more", "update") else None
    sent = {task_id: task for task_id, task in sent.items()
            if isinstance(task, dict)} if isinstance(sent, dict) else {}
    sent_runs = message.get("runs") if kind in ("snapshot", "snapshot_more", "update") else None
    sent_runs = {run_id: summary for run_id, summary in sent_runs.items()
                 if isinstance(summary, dict)} if isinstance(sent_runs, dict) else {}
    runs = {} if runs is None else runs  # without a dict to keep, runs are read and dropped
    if kind == "snapshot":
        tasks.clear()
        tasks.update(sent)
        runs.clear()  # a v1 server's snapshot has none: no runs
        runs.update(sent_runs)
    elif kind in ("update", "snapshot_more"):  # a big snapshot's later chunks add to it
        tasks.update(sent)  # a known task keeps its place
        runs.update(sent_runs)
    elif kind == "remove":
        for task_id in message.get("ids") or ():
            tasks.pop(task_id, None)
        gone = message.get("runs")
        for run_id in gone if isinstance(gone, list) else ():
            if isinstance(run_id, str):
                runs.pop(run_id, None)
    else:
        return None  # a kind this version does not know: nothing to apply
    return _number_or(message.get("now"), None)


def watch_urls(server):
    """(HTTP base URL, /ws URL) for a server URL; a client URL ending in /progress works.

    Raises ValueError when `server` is not an http(s) URL with a host."""
    expected = f"--server {server!r}: expected http(s)://host[:port][/prefix]"
    try:
        parts = urllib.parse.urlsplit(str(server).strip())
        parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as error:
        raise ValueError(f"{expected} ({error})") from None
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    path = parts.path.rstrip("/")
    # The client's URL, the feed's, or the dashboard's link (what people share) all work.
    for suffix in ("/progress", "/ws", "/static/" + INDEX_FILE):
        if path.endswith(suffix):
            path = path[:-len(suffix)]
    base = urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))
    ws_scheme = "wss" if scheme == "https" else "ws"
    return base, urllib.parse.urlunsplit((ws_scheme, parts.netloc, path + "/ws", "", ""))


def token_in_url(server):
    """The ?token= of a server URL, as a shared dashboard link carries it, or None."""
    query = urllib.parse.urlsplit(str(server).strip()).query
    return urllib.parse.parse_qs(query).get("token", [None])[0]


def _error_message(body):
    """The `error` of a JSON error body, else the body as text, on one line."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
    try:
        text = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        pass
    return _printable(" ".join(str(text).split())) or "(no message)"


def client_tls_context():
    """What `watch` verifies an https:// or wss:// server with: the CA file in
    PROGRESSISTA_CA_BUNDLE, else SSL_CERT_FILE, else the system's trust store."""
    cafile = os.environ.get(ENV_PREFIX + "CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=cafile or None)


def get_json(base, path, headers, timeout=WATCH_TIMEOUT_S):
    """GET `path` once, parsed. Raises urllib's errors. No redirects: a 301/302 to another
    host would carry the token there."""
    request = urllib.request.Request(base + path, headers=headers)
    opener = urllib.request.build_opener(
        _NoRedirects, urllib.request.HTTPSHandler(context=client_tls_context()))
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def fetch_tasks(base, headers, timeout=WATCH_TIMEOUT_S):
    """GET /tasks once: the parsed {"tasks": ..., "now": ...}. Raises urllib's errors, or
    ValueError when the answer is not a task list. Every task, not ?status=: the header
    counts all of them ("3 tasks of 10"), and --status filters here as in live mode."""
    snapshot = get_json(base, "/tasks", headers, timeout)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("tasks"), dict):
        raise ValueError("the answer has no task list")
    return snapshot


def fetch_runs(base, headers, timeout=WATCH_TIMEOUT_S):
    """GET /runs once: run id -> summary; {} from a server of protocol version 1 (404).
    Raises as fetch_tasks() does."""
    try:
        answer = get_json(base, "/runs", headers, timeout)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            error.close()
            return {}
        raise
    if not isinstance(answer, dict) or not isinstance(answer.get("runs"), dict):
        raise ValueError("the answer has no run list")
    return {run_id: summary for run_id, summary in answer["runs"].items()
            if isinstance(summary, dict)}


class _Screen:
    """Where tables go. On a terminal: redrawn in place with ANSI (cursor up, clear to the
    end of the screen), cursor hidden meanwhile; elsewhere: whole tables, blank line between."""

    def __init__(self, stream, colour):
        self.stream = stream
        self.live = stream.isatty()
        self.colour = colour and self.live
        self.drawn = []  # the lines of the last frame, to find its top again
        self.drawn_width = None
        self.started = False

    def size(self):
        """(width, height) to fit to, re-read on every frame: None, None off a terminal."""
        import shutil

        if not self.live:
            return None, None
        columns, lines = shutil.get_terminal_size()
        return max(1, columns), max(1, lines)

    def _coloured(self, line):
        status = next((status for status, word in STATUS_WORDS.items()
                       if word and line.startswith(word + " ")), None)
        if not self.colour or status is None:
            return line
        word = STATUS_WORDS[status]
        return f"\x1b[{STATUS_COLOURS[status]}m{word}\x1b[0m{line[len(word):]}"

    def draw(self, lines):
        if not self.live:
            self.stream.write(("\n" if self.started else "") + "\n".join(lines) + "\n")
            self.started = True
            self.stream.flush()
            return
        width, _ = self.size()
        frame = "" if self.started else _ANSI["hide_cursor"]
        if self.drawn:
            # A terminal that reflows on resize wraps the last frame's lines: count its rows
            # at today's width, so that the cursor goes back to the first of them.
            rows = sum(max(1, -(-_cells(line) // width)) for line in self.drawn)
            frame += "\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "")
        # One write per frame, no newline after the last line: the screen never scrolls.
        frame += _ANSI["clear_below"] + "\r\n".join(self._coloured(line) for line in lines)
        self.stream.write(frame)
        self.stream.flush()
        self.drawn, self.started = list(lines), True

    def say(self, line):
        """One line of news (off a terminal; on one, it is part of the next frame)."""
        if not self.live:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self):
        if self.live and self.started:
            # Below the last table, cursor back: the shell prompt comes after it.
            self.stream.write("\r\n" + _ANSI["show_cursor"] if self.drawn else _ANSI["show_cursor"])
            self.stream.flush()
        self.started = False


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends `watch` as Ctrl-C does: terminal restored, status 0


def _connection_reason(error):
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(error, InvalidStatus):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, ConnectionClosed):
        frame = error.rcvd or error.sent
        # The server's words go to our terminal or log: no escape codes from them.
        said = f" ({_printable(frame.reason)})" if frame is not None and frame.reason else ""
        return f"connection closed{said}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "timed out"
    return _printable(str(error)) or type(error).__name__


def _connect_without_redirects():
    """websockets' sync connect(), following no redirect: a 3xx raises InvalidStatus.
    (websockets 17's connector follows a same-origin redirect, with our Authorization.)"""
    from websockets.sync import client

    connector = getattr(client, "reconnect", None)
    if not isinstance(connector, type) or not hasattr(connector, "process_redirect"):
        return client.connect  # an older websockets: it follows none

    class connect_here_only(connector):
        def process_redirect(self, exc):
            return exc  # "not a redirect to follow": raised as it is

    return connect_here_only


class _Watcher:
    """The live mode: the /ws feed into a dict of tasks, drawn at most every `interval` s."""

    def __init__(self, args, base, ws_url, headers, screen, ascii, clock=time.monotonic):
        self.args, self.base, self.ws_url, self.headers = args, base, ws_url, headers
        self.screen, self.ascii, self.clock = screen, ascii, clock
        self.meter = default_meter()
        self.tasks = {}
        self.runs = {}  # run id -> summary, kept from the feed as the tasks are
        self.server_now, self.received_at = None, None  # the server's clock, and when we read it
        self.notice = f"connecting to {ws_url}"

    def now(self):
        """The server's clock now, from its last message and our monotonic clock since."""
        if self.server_now is None:
            return time.time()
        return self.server_now + (self.clock() - self.received_at)

    def draw(self):
        width, height = self.screen.size()
        self.screen.draw(render_table(
            self.tasks, self.now(), width, height, self.args.filter, self.args.status,
            source=self.base, notice=self.notice, meter=self.meter, ascii=self.ascii,
            runs=self.runs, view=self.args.view))

    def run(self):
        """Watch until interrupted; return 1 when the server refuses us for good."""
        from websockets.exceptions import InvalidStatus, WebSocketException

        connect = _connect_without_redirects()
        try:
            tls = client_tls_context() if self.ws_url.startswith("wss:") else None
        except (OSError, ssl.SSLError) as error:  # a CA file that is missing or not PEM
            self.screen.close()
            print(f"progressista watch: cannot read the CA file: {_printable(error)}",
                  file=sys.stderr)
            return 1
        retry_s = WATCH_RETRY_FIRST_S
        while True:
            try:
                with connect(self.ws_url, additional_headers=self.headers,
                             open_timeout=WATCH_TIMEOUT_S, close_timeout=WATCH_CLOSE_TIMEOUT_S,
                             max_size=WATCH_MAX_MESSAGE_BYTES, ssl=tls) as websocket:
                    retry_s = WATCH_RETRY_FIRST_S  # in: the next outage starts from scratch
                    self.follow(websocket)
            except ssl.SSLCertVerificationError as error:
                # A certificate that fails today fails on every retry: say so once.
                self.screen.close()
                print(f"progressista watch: {self.ws_url}: the server's certificate does not "
                      f"verify ({_printable(error.verify_message or error)}); set "
                      f"{ENV_PREFIX}CA_BUNDLE to the CA file that signed it",
                      file=sys.stderr)
                return 1
            except InvalidStatus as error:
                status = error.response.status_code
                if 300 <= status < 400:  # followed, it would carry the token elsewhere
                    self.screen.close()
                    print(f"progressista watch: {self.ws_url}: HTTP {status}: redirected to "
                          f"{_printable(error.response.headers.get('Location', '?'))}; "
                          "redirects are not followed: give the final URL", file=sys.stderr)
                    return 1
                if 400 <= status < 500 and status not in (408, 429):
                    # A wrong token or URL will not fix itself: say what the server said.
                    self.screen.close()
                    print(f"progressista watch: {self.ws_url}: HTTP {status}: "
                          f"{_error_message(error.response.body or b'')}", file=sys.stderr)
                    return 1
                reason = _connection_reason(error)
            except (OSError, WebSocketException, ValueError) as error:
                reason = _connection_reason(error)  # ValueError: a message that is not JSON
            self.notice = f"reconnecting to {self.ws_url}: {reason} (next try in {retry_s:g} s)"
            if self.received_at is not None:
                self.notice += f"; last data {format_interval(self.clock() - self.received_at)} ago"
            self.screen.say(self.notice)
            if self.screen.live:
                self.draw()
            time.sleep(retry_s)
            retry_s = min(retry_s * 2, WATCH_RETRY_MAX_S)

    def follow(self, websocket):
        """Read the feed until the connection ends (an exception)."""
        next_draw, changed = self.clock(), False
        while True:
            # On a terminal the rows tick (elapsed) even with no news; elsewhere a table is
            # printed only when there is something new.
            due_in = max(0.0, next_draw - self.clock())
            try:
                raw = websocket.recv(timeout=due_in if changed or self.screen.live else None)
            except TimeoutError:
                raw = None
            if raw is not None:
                server_now = apply_feed_message(self.tasks, json.loads(raw), self.runs)
                if server_now is not None:
                    self.server_now, self.received_at = server_now, self.clock()
                self.notice, changed = None, True
            if self.clock() >= next_draw and (changed or self.screen.live):
                self.draw()
                changed, next_draw = False, self.clock() + self.args.interval


def cmd_watch(args):
    try:
        server = args.server
        if server is None:
            server = os.environ.get(ENV_PREFIX + "SERVER_URL") or WATCH_DEFAULT_SERVER
        base, ws_url = watch_urls(server)
    except ValueError as error:
        print(f"progressista watch: error: {error}", file=sys.stderr)
        return 2
    token = args.token or token_in_url(server) or os.environ.get(ENV_PREFIX + "API_TOKEN")
    headers = {"User-Agent": f"progressista-watch/{__version__}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "█▏".encode(encoding)
        ascii = False
    except (UnicodeEncodeError, LookupError):
        ascii = True  # a terminal that cannot show tqdm's blocks gets tqdm's ASCII bar
    screen = _Screen(sys.stdout, colour=not os.environ.get("NO_COLOR"))
    try:
        if args.once or args.json:
            return _watch_once(args, base, headers, screen, ascii)
        try:
            previous = signal.signal(signal.SIGTERM, _interrupt)
        except ValueError:  # main() called from another thread: no handler of our own
            previous = None
        try:
            return _Watcher(args, base, ws_url, headers, screen, ascii).run()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `progressista watch | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        screen.close()


def _watch_once(args, base, headers, screen, ascii):
    import urllib.error

    view = getattr(args, "view", None)
    try:
        snapshot = fetch_tasks(base, headers)
        runs = fetch_runs(base, headers) if view != "bars" else {}
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:  # followed, it would carry the token elsewhere
            print(f"progressista watch: {base}/tasks: HTTP {error.code}: redirected to "
                  f"{_printable(error.headers.get('Location', '?'))}; redirects are not "
                  "followed: give the final URL", file=sys.stderr)
            return 1
        print(f"progressista watch: {base}/tasks: HTTP {error.code}: "
              f"{_error_message(error.read())}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        hint = ""
        if isinstance(error.reason, ssl.SSLCertVerificationError):  # as live mode says it
            hint = (f"; the server's certificate does not verify: set {ENV_PREFIX}CA_BUNDLE "
                    "to the CA file that signed it")
        print(f"progressista watch: cannot reach {base}: {_printable(error.reason)}{hint}",
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # a timeout, or an answer that is not ours
        print(f"progressista watch: {base}/tasks: {_printable(error) or type(error).__name__}"
              " (is this a Progressista server?)", file=sys.stderr)
        return 1
    tasks = {task_id: task for task_id, task in snapshot["tasks"].items()
             if isinstance(task, dict)}
    now = _number_or(snapshot.get("now"), None) or time.time()
    if args.json:  # what the table would show, in its order
        rows = watch_rows(tasks, runs, view or ("tree" if runs else "bars"), args.filter,
                          args.status, fold=False)  # data: every bar, folded or not
        shown = {"tasks": {item["task_id"]: item for kind, item, _ in rows if kind == "bar"}}
        if view != "bars":
            shown["runs"] = {item["run"]: item for kind, item, _ in rows if kind == "run"}
        print(json.dumps({**shown, "now": now}, indent=2 if screen.live else None))
        return 0
    width, _ = screen.size()  # one table to read or scroll: every row, fitted to the width
    lines = render_table(tasks, now, width, None, args.filter, args.status, source=base,
                         ascii=ascii, runs=runs, view=view)
    print("\n".join(screen._coloured(line) for line in lines))
    return 0


def main(argv=None):
    """The command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = parser.command_names
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        guess = difflib.get_close_matches(argv[0], commands, n=1)
        print(f"progressista: unknown command {argv[0]!r}"
              + (f" (did you mean {guess[0]!r}?)" if guess else "")
              + f"; the commands are {', '.join(commands)} (see --help)", file=sys.stderr)
        return 2
    if not argv or argv[0] not in (*commands, "-h", "--help", "--version"):
        argv.insert(0, "serve")  # `python progressista.py --port 8000` means serve
    program_args = []
    if argv[0] == "run" and "--" in argv:
        split = argv.index("--")
        argv, program_args = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"progressista {__version__}")
        return 0
    if args.command == "show-config":
        return cmd_show_config(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "run":
        return cmd_run(args, (args.program_args or []) + program_args)
    if args.command == "watch":
        return cmd_watch(args)
    return cmd_serve(args)


if __name__ == "__main__":
    sys.exit(main())
