"""Progressista: every tqdm bar of every job, live in one browser page.

One file, one asyncio loop, one TCP port: the HTTP API that progress senders POST to,
the dashboard page, and the ``/ws`` live feed (WebSocket, run by the ``websockets``
package's Sans-I/O layer). Start it with::

    python progressista.py --port 8000        # or, installed: progressista serve

then open http://localhost:8000/ . The wire protocol is documented in docs/PROTOCOL.md;
``progressista --help`` lists every command and setting.
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import difflib
import hashlib
import hmac
import html.parser
import http
import http.client
import ipaddress
import json
import logging
import math
import operator
import os
import re
import signal
import socket
import sqlite3
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
__version__ = "0.3.0"

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
MAX_TASK_ID_CHARS = 256
MAX_DESC_CHARS = 1000
MAX_UNIT_CHARS = 32
MAX_POSTFIX_CHARS = 1000
MAX_ERROR_CHARS = 2000
MAX_META_BYTES = 4 * 1024  # meta, as compact JSON
FD_RESERVE = 64  # file descriptors kept free for the store, logs and the listening socket
MAX_CONNECTIONS_FALLBACK = 10_000  # where the descriptor limit cannot be read
MAX_WS_MESSAGE_BYTES = 64 * 1024  # clients have nothing to say; keep what they send small
MAX_REMOVED_REMEMBERED = 100_000  # deletions GET /tasks?since= can list; older: resync
MAX_PAGE_TASKS = 100_000  # GET /tasks?limit= at most
SNAPSHOT_CHUNK_TASKS = 2_000  # a /ws snapshot of more tasks goes out in chunks of this many
MAX_DISCARD_BYTES = 64 << 20  # of a refused body, read and dropped so the 413 arrives
LISTENER_BUFFER_HIGH_BYTES = 8 << 20  # a listener with this much unsent falls behind...
LISTENER_BUFFER_LOW_BYTES = 1 << 20  # ...and gets a fresh snapshot once drained to this

# Timeouts
HEADER_TIMEOUT_S = 10.0  # from the first byte of a request to the end of its headers
BODY_TIMEOUT_S = 30.0  # from the end of the headers to the end of the body
KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this
LISTENER_BEHIND_TIMEOUT_S = 30.0  # a listener that stays behind this long is closed
WS_PING_INTERVAL_S = 20.0  # the Sans-I/O layer sends no pings of its own
WS_PING_TIMEOUT_S = 20.0  # a listener that leaves a ping unanswered this long is closed
DISCARD_TIMEOUT_S = 5.0  # to send the rest of a refused body before we close
SHUTDOWN_TIMEOUT_S = 5.0
REAP_INTERVAL_S = 1.0  # how often connection deadlines and pings are checked

# Defaults of docs/PROTOCOL.md ("Lifetimes", "The live feed")
BROADCAST_INTERVAL_S = 0.1
STALE_SECONDS = 60.0
RETENTION_SECONDS = 86400.0
MAX_TASK_AGE_S = 0.0
CLEANUP_INTERVAL_S = 1.0
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
NOTIFY_EVENTS = ("close", "error", "stale")  # what --notify-on may name, and its default
NOTIFY_INTERVAL_S = 10.0  # default batching window of notifications; --notify-interval

ENV_PREFIX = "PROGRESSISTA_"
INDEX_FILE = "index.html"


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
    retention_seconds: float = RETENTION_SECONDS
    max_task_age: float = MAX_TASK_AGE_S
    cleanup_interval: float = CLEANUP_INTERVAL_S
    broadcast_interval: float = BROADCAST_INTERVAL_S
    max_tasks: int = MAX_TASKS
    max_body_bytes: int = MAX_BODY_BYTES
    ws_compression: bool = False
    store: str = "memory://"
    log_level: str = "info"
    notify: tuple = ()
    notify_on: tuple = NOTIFY_EVENTS
    notify_min_duration: float = 0.0
    notify_interval: float = NOTIFY_INTERVAL_S
    notify_name: str = ""

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
        for key in ("api_tokens", "read_tokens", "allow_origins", "notify", "notify_on"):
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


def _notify_events(text):
    events = tuple(event.strip().lower()
                   for event in (_csv(text) if isinstance(text, str) else text))
    for event in events:
        if event not in NOTIFY_EVENTS:
            raise argparse.ArgumentTypeError(
                f"unknown event {event!r}: name one or more of close, error, stale")
    if not events:  # nothing would ever be sent: without --notify, nothing is
        raise argparse.ArgumentTypeError("name one or more of close, error, stale")
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
    _Setting("retention_seconds", "RETENTION_SECONDS", _seconds,
             "close/error tasks are deleted this long after their last update; 0 keeps"),
    _Setting("max_task_age", "MAX_TASK_AGE", _seconds,
             "any task is deleted after this long without an update; 0 is off"),
    _Setting("cleanup_interval", "CLEANUP_INTERVAL", _positive_seconds,
             "seconds between sweeps that apply the three rules above"),
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
             "which of close, error, stale are notified (comma-separated; default all)"),
    _Setting("notify_min_duration", "NOTIFY_MIN_DURATION", _seconds,
             "a task that ran less than this many seconds is not notified; 0 notifies all"),
    _Setting("notify_interval", "NOTIFY_INTERVAL", _positive_seconds,
             "seconds of events batched into one message per webhook"),
    _Setting("notify_name", "NOTIFY_NAME", str,
             "this server's name in notifications (default: the host name)"),
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


STATUSES = ("running", "stale", "close", "error")
FINAL_STATUSES = ("close", "error")
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


def _check_seq(value, where):
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise InvalidUpdate(f"{where}: must be an integer")
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
            bound += MAX_META_BYTES  # a huge int: let json.dumps measure it
        else:
            raise InvalidUpdate(f"{where}.{key}: must be a string, number, true, false or null")
        interned[sys.intern(key) if len(key) <= 64 else key] = item
    value = interned
    if bound <= MAX_META_BYTES:
        return value
    size = len(json.dumps(value, separators=(",", ":")))
    if size > MAX_META_BYTES:
        raise InvalidUpdate(f"{where}: must be at most {MAX_META_BYTES} bytes as JSON, not {size}")
    return value


# field -> check(value, where) returning the value to store; unknown fields are ignored.
FIELD_CHECKS = {
    "task_id": _check_task_id,
    "desc": lambda value, where: _text(value, where, MAX_DESC_CHARS),
    "n": lambda value, where: _number(value, where),
    "total": lambda value, where: _number(value, where, nullable=True),
    "unit": lambda value, where: _text(value, where, MAX_UNIT_CHARS, nullable=False),
    "unit_scale": _check_unit_scale,
    "unit_divisor": _check_unit_divisor,
    "rate": lambda value, where: _number(value, where, nullable=True),
    "elapsed": lambda value, where: _number(value, where),
    "postfix": lambda value, where: _text(value, where, MAX_POSTFIX_CHARS),
    "status": _check_status,
    "error": lambda value, where: _text(value, where, MAX_ERROR_CHARS),
    "meta": _check_meta,
    "seq": _check_seq,
    "timestamp": _check_timestamp,
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
                    update[key] = value
                    continue
            elif key == "seq":
                if vtype is int:
                    update[key] = value
                    continue
            elif key == "timestamp":
                if -_MAX_FLOAT <= value <= _MAX_FLOAT:
                    update[key] = value
                    continue
        elif vtype is str:
            limit = _TEXT_LIMITS.get(key)
            if limit is not None:
                if len(value) <= limit and _is_unicode(value):
                    update[key] = sys.intern(value) if len(value) <= 32 else value
                    continue
            elif key == "task_id":
                if 0 < len(value) <= MAX_TASK_ID_CHARS and _is_unicode(value):
                    update[key] = value
                    continue
            elif key == "status":
                status = STATUS_ALIASES.get(value)
                if status is not None:
                    update[key] = status
                    continue
        elif value is None:
            if key in _NULLABLE:
                update[key] = None
                continue
        elif vtype is bool and key == "unit_scale":
            update[key] = value
            continue
        check = FIELD_CHECKS.get(key)
        if check is not None:  # unknown fields are ignored and not stored
            update[key] = check(value, key if index is None else f"tasks[{index}].{key}")
    return update


_MAX_FLOAT = sys.float_info.max  # also refuses inf, NaN and ints beyond any float
_NON_NEGATIVE = frozenset(("n", "total", "rate", "elapsed", "unit_divisor", "unit_scale"))
_TEXT_LIMITS = {"desc": MAX_DESC_CHARS, "unit": MAX_UNIT_CHARS, "postfix": MAX_POSTFIX_CHARS,
                "error": MAX_ERROR_CHARS}
_NULLABLE = frozenset(("desc", "total", "rate", "postfix", "error"))


class Task:
    """One progress bar as stored. `as_dict(now, stale_after_s)` is the wire form."""

    __slots__ = ("task_id", "desc", "n", "total", "unit", "unit_scale", "unit_divisor",
                 "rate", "elapsed", "postfix", "status", "error", "meta", "seq",
                 "timestamp", "created_at", "updated_at")

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
        self.meta = {}
        self.seq = None
        self.timestamp = None
        self.created_at = now
        self.updated_at = now

    def shown_status(self, now, stale_after_s):
        """The status a reader sees: a silent running task reads stale between sweeps too."""
        if (self.status == "running" and stale_after_s
                and now - self.updated_at >= stale_after_s):
            return "stale"
        return self.status

    def as_dict(self, now=None, stale_after_s=0):
        wire = dict(zip(Task.__slots__, _task_fields(self)))
        if now is not None:
            wire["status"] = self.shown_status(now, stale_after_s)
        return wire

    def copy(self):
        twin = Task.__new__(Task)
        for name, value in zip(Task.__slots__, _task_fields(self)):
            setattr(twin, name, value)
        return twin

    @classmethod
    def from_dict(cls, stored):
        """Rebuild a task from `as_dict()` output (persistent stores)."""
        task = cls(stored["task_id"], stored.get("created_at", 0.0))
        for name in cls.__slots__:
            if name in stored:
                setattr(task, name, stored[name])
        return task


_task_fields = operator.attrgetter(*Task.__slots__)


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
    for name, value in update.items():
        setattr(task, name, value)
    if task.status == "stale" and "status" not in update:
        task.status = "running"  # any sign of life revives a stale bar
    task.updated_at = now
    return True


def expired(task, now, lifetimes):
    """True when a lifetime rule deletes `task` at `now` (docs/PROTOCOL.md "Lifetimes")."""
    silent_s = now - task.updated_at
    if lifetimes.max_task_age and silent_s >= lifetimes.max_task_age:
        return True
    return (task.status in FINAL_STATUSES and lifetimes.retention_seconds
            and silent_s >= lifetimes.retention_seconds)


def sweep_plan(tasks, now, lifetimes):
    """What a sweep at `now` does: (the tasks to mark stale, the ids that expired). A task
    that expired is only deleted, never marked stale on its way out."""
    stale, expired_ids = [], []
    for task in tasks:
        if expired(task, now, lifetimes):
            expired_ids.append(task.task_id)
        elif task.shown_status(now, lifetimes.stale_seconds) != task.status:
            stale.append(task)
    return stale, expired_ids


class Store:
    """The contract every store keeps, written once; subclass it for a store of your own.

    A store holds the tasks and answers reads from memory. Each method that may wait for
    I/O (apply, delete, sweep, open, flush, close) returns its result or an awaitable of
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


class MemoryStore(Store):
    """Tasks in a dict, oldest first: the default store, and the in-memory table the
    persistent stores serve reads from."""

    kind = "memory"

    def __init__(self, max_tasks=MAX_TASKS):
        self.max_tasks = max_tasks
        self.by_id = {}

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
            else:  # the dict key's string, not the equal one json.loads just made
                update["task_id"] = task.task_id
            if apply_update(task, update, now):
                changed.append(task_id)
        return changed

    def get(self, task_id):
        return self.by_id.get(task_id)

    def tasks(self):
        return list(self.by_id.values())

    def delete(self, task_ids):
        return self.forget(task_ids)

    def put(self, task):
        """Hold `task` as it is: one another server wrote (Redis)."""
        self.by_id[task.task_id] = task

    def replace_all(self, tasks_by_id):
        """Hold exactly these tasks (a resync from a shared store), in their order."""
        self.by_id = dict(tasks_by_id)

    def forget(self, task_ids):
        """Drop `task_ids`; return the ones the store held. delete() is what a user
        asked for; forget() also serves the sweep."""
        by_id = self.by_id
        return [task_id for task_id in task_ids if by_id.pop(task_id, None) is not None]

    def sweep(self, now, lifetimes):
        """Mark silent running tasks stale and delete expired ones, as of `now`."""
        stale, removed_ids = sweep_plan(self.by_id.values(), now, lifetimes)
        for task in stale:
            task.status = "stale"
        self.forget(removed_ids)
        return [task.task_id for task in stale], removed_ids



# --- Stores that persist: SQLite and Redis (I/O) ---------------------------------------


class StoreError(Exception):
    """A store that cannot be opened; the message says what to fix."""


def _task_json(task):
    return json.dumps(task.as_dict(), separators=(",", ":"))


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
            for (stored,) in rows:
                task = Task.from_dict(json.loads(stored))
                self.by_id[task.task_id] = task
        except (sqlite3.Error, ValueError, KeyError, TypeError, AttributeError) as error:
            raise StoreError(f"cannot read SQLite store {self.path!r}: a stored task is "
                             f"unreadable ({error!r})") from None

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

    def sweep(self, now, lifetimes):
        stale_ids, removed_ids = super().sweep(now, lifetimes)
        self.dirty_ids.update(dict.fromkeys(stale_ids))
        return stale_ids, removed_ids

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
REDIS_WRITE_SCRIPT = """
local written = {}
local same_ok = ARGV[2] == '1'
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 5
  local seq, created, ttl, id, body = ARGV[base+1], ARGV[base+2], ARGV[base+3], ARGV[base+4], ARGV[base+5]
  local stored = redis.call('HGET', key, 'seq')
  if seq == '' or not stored or stored == '' or tonumber(seq) > tonumber(stored)
     or (same_ok and tonumber(seq) == tonumber(stored)) then
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


def redis_ttl_ms(task, lifetimes):
    """Server-side expiry for a task's key: Redis deletes it when a lifetime rule would."""
    limits = []
    if lifetimes.max_task_age:
        limits.append(lifetimes.max_task_age)
    if task.status in FINAL_STATUSES and lifetimes.retention_seconds:
        limits.append(lifetimes.retention_seconds)
    # A margin past the sweep, so that the sweeper broadcasts the removal first.
    return int((min(limits) + 2 * lifetimes.cleanup_interval) * 1000) if limits else 0


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
                if stored is not None:
                    fresh[task_id] = Task.from_dict(json.loads(stored))
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
                        self.mirror(json.loads(message["data"]))
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
        """Apply a change another server published."""
        if event.get("origin") == self.origin:
            return
        changed = []
        for stored in event.get("changed", ()):
            task = Task.from_dict(stored)
            held = self.local.get(task.task_id)
            if held is None or held.seq is None or task.seq is None or task.seq >= held.seq:
                self.local.put(task)
                changed.append(task.task_id)
        self.feed.changed(changed)
        self.feed.removed(self.local.forget(event.get("removed", ())))

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

    async def sweep(self, now, lifetimes):
        """Mark stale and expire for every server, if this one holds the sweeper lease."""
        try:
            lease_ms = int(max(3 * lifetimes.cleanup_interval, 1.0) * 1000)
            self.is_sweeper = bool(await self.lease_script(keys=[self.lease_key],
                                                           args=[self.origin, lease_ms]))
            if not self.is_sweeper:
                return [], []
            stale, doomed = sweep_plan(self.local.tasks(), now, lifetimes)
            for task in stale:
                task.status = "stale"
            if stale:
                await self.write_and_publish(stale, same_seq_ok=True)
            removed = await self.delete(doomed)
        except self.errors as error:
            self.is_sweeper = False
            self.went_down(error)
            return [], []
        except StoreUnavailable:  # delete() found Redis down and said so
            return [], []
        return [task.task_id for task in stale], removed


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

    Every change to the store goes through `changed()` / `removed()`; `take()` turns
    what is pending into at most one remove and one update message. A ChangeLog, when
    given, hears of every change too."""

    def __init__(self, log=None):
        # A dict as an ordered set: an update message lists tasks in the order they first
        # changed, so the tasks of one batch arrive in the order they were created.
        self.changed_ids = {}
        self.removed_ids = set()
        self.log = log

    def changed(self, task_ids):
        changed_ids = self.changed_ids
        for task_id in task_ids:
            changed_ids[task_id] = None
        if self.removed_ids:
            self.removed_ids.difference_update(task_ids)
        if self.log is not None:
            self.log.changed(task_ids)

    def removed(self, task_ids):
        self.removed_ids.update(task_ids)
        changed_ids = self.changed_ids
        for task_id in task_ids:
            changed_ids.pop(task_id, None)
        if self.log is not None:
            self.log.removed(task_ids)

    def clear(self):
        self.changed_ids = {}
        self.removed_ids = set()

    def take(self, store, now, stale_after_s):
        """Return the encoded messages pending (possibly none) and forget them."""
        messages = []
        if self.removed_ids:
            messages.append(_encode({"type": "remove", "ids": sorted(self.removed_ids),
                                     "now": now}))
        if self.changed_ids:
            tasks = {}
            for task_id in self.changed_ids:
                task = store.get(task_id)
                if task is not None:
                    tasks[task_id] = task.as_dict(now, stale_after_s)
            if tasks:
                messages.append(_encode({"type": "update", "tasks": tasks, "now": now}))
        self.clear()
        return messages


def snapshot_message(store, now, stale_after_s):
    """The whole snapshot as one message (a store of at most SNAPSHOT_CHUNK_TASKS)."""
    tasks = {task.task_id: task.as_dict(now, stale_after_s) for task in store.tasks()}
    return _encode({"type": "snapshot", "tasks": tasks, "now": now})


def snapshot_chunks(store, clock, stale_after_s, chunk_tasks=None):
    """Yield a big store's snapshot as messages of at most `chunk_tasks` tasks, one per
    step, so that no step of the loop encodes more than that: `snapshot` with "more":
    true, then `snapshot_more` messages, the last with "more": false.

    Each step reads the store as it is then: a task changed meanwhile goes out in its
    latest state (its update message may come too, which is the same or newer); a task
    deleted meanwhile is left out (its remove message tells the listener); a task
    created meanwhile comes as an update, since the listener gets updates from the
    first chunk on."""
    chunk_tasks = chunk_tasks or SNAPSHOT_CHUNK_TASKS
    held = store.tasks()  # the order, fixed now; each task is read again at its step
    for start in range(0, max(len(held), 1), chunk_tasks):
        now = clock()
        tasks = {}
        for old in held[start:start + chunk_tasks]:
            task = store.get(old.task_id)
            if task is not None:
                tasks[task.task_id] = task.as_dict(now, stale_after_s)
        yield _encode({"type": "snapshot_more" if start else "snapshot", "tasks": tasks,
                       "more": start + chunk_tasks < len(held), "now": now})


# --- Notifications ---------------------------------------------------------------------
# When a task closes, fails or goes stale, a message to webhooks. The pure part decides
# which changes are events and turns a window of them into one message (`Notifier`,
# `notify_event()`, `notify_message()`); one daemon thread per webhook does the POSTs
# (`WebhookSender`), so a slow or dead webhook never holds up the event loop or ingest.

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
NOTIFY_READ_BYTES = 1024  # of a webhook's answer: kept only for the log
NOTIFY_LOG_BODY_CHARS = 200  # of a refusing webhook's answer, in the log
DISCORD_MAX_CHARS = 2000  # Discord refuses a longer `content`
NOTIFY_MARKS = {"close": "\u2705", "error": "\u274c", "stale": "\u26a0\ufe0f"}
ELLIPSIS = "\u2026"
NOTIFY_USER_AGENT = "progressista/" + __version__
NOTIFY_OUTCOMES = ("sent", "failed", "dropped")  # what /metrics counts of each message


def task_duration(task):
    """Seconds the task ran: the sender's `elapsed` when it sent one, else our own times."""
    if task.elapsed is not None:
        return task.elapsed
    return max(task.updated_at - task.created_at, 0.0)


def notify_event(task, event, now):
    """The JSON-able event for `task`, which just turned `event` (close, error, stale): the
    task's fields as GET /tasks shows them, plus `event`, `duration` and `at`."""
    return {"event": event, **task.as_dict(), "status": event,
            "duration": task_duration(task), "at": now}


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


def _error_summary(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return ""
    # A raw traceback says what went wrong on its last line; the client's form, first.
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def event_line(event):
    """One line a person reads, e.g. '(check mark) train (task abc): done 1000/1000 it in
    1:02:03', '(cross) etl (task x): failed at 50/100 it: KeyError: 'date''."""
    task_id = _one_line(event["task_id"], NOTIFY_NAME_CHARS)
    who = f"task {task_id}"
    if event.get("desc"):
        who = f"{_one_line(event['desc'], NOTIFY_NAME_CHARS)} ({who})"
    host = (event.get("meta") or {}).get("host")
    if isinstance(host, str) and host:
        who += " on " + _one_line(host, NOTIFY_NAME_CHARS)
    kind = event["event"]
    if kind == "close":
        said = f"done {_progress(event)} in {format_interval(event['duration'])}"
    elif kind == "error":
        said = f"failed at {_progress(event)}"
        summary = _error_summary(event.get("error") or "")
        if summary:
            said += ": " + _one_line(summary, NOTIFY_ERROR_CHARS)
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
    does both); `close(now)` sends the current window at once, at shutdown."""

    def __init__(self, notify_on=NOTIFY_EVENTS, min_duration_s=0.0,
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

    def seed(self, tasks, now, stale_after_s):
        """Count what is already closed, failed or stale as notified: a restart over a
        persistent store does not repeat old news."""
        for task in tasks:
            status = task.shown_status(now, stale_after_s)
            if status in self.notify_on:
                self.notified_by_id[task.task_id] = status

    def observe(self, changed_ids, removed_ids, store, now, stale_after_s):
        """Turn changes (the feed's pending ids) into events of the current window."""
        notified = self.notified_by_id
        for task_id in removed_ids:  # forgotten with the task: memory stays bounded
            notified.pop(task_id, None)
        # With Redis every server sees every change; only the sweeper tells. The others
        # still keep track, so that a new sweeper does not repeat what was sent.
        sending = getattr(store, "is_sweeper", True)
        events = []
        for task_id in changed_ids:
            task = store.get(task_id)
            if task is None:
                continue
            status = task.shown_status(now, stale_after_s)
            if status not in self.notify_on:
                if status == "running":  # back to life: a later close or stale is news
                    notified.pop(task_id, None)
                continue
            if notified.get(task_id) == status or task_duration(task) < self.min_duration_s:
                continue
            notified[task_id] = status
            if sending:
                events.append(notify_event(task, status, now))
        # The feed lists tasks in the order they first changed; the sort is stable, so the
        # events of one request keep the order the sender gave them.
        events.sort(key=lambda event: event["updated_at"])
        for event in events:
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

    def tick(self, now, flush=False):
        """Queue the window's message for every webhook when it is due; never blocks."""
        message = self.take_message(now, flush)
        if message is not None:
            for sender in self.senders:
                sender.put(message)

    def start(self, tasks, now, stale_after_s):
        """Seed from the tasks the store holds and start the sender threads."""
        self.seed(tasks, now, stale_after_s)
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
    500: "internal_error", 503: "unavailable",
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
    is true now: tasks_by_status, listeners, connections, store_kind, store_up,
    store_errors, notifications (outcome -> count)."""
    tasks_by_status = gauges["tasks_by_status"]
    lines = []
    lines += _family("progressista_info", "gauge", "The server's version and store.",
                     [((("version", __version__), ("store", gauges["store_kind"])), 1)])
    lines += _family("progressista_start_time_seconds", "gauge",
                     "When the server started, Unix seconds.",
                     [((), repr(float(metrics.started_at)))])
    lines += _family("progressista_tasks", "gauge", "Tasks stored now, by status.",
                     [((("status", status),), tasks_by_status.get(status, 0))
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

REQUEST_LINE = re.compile(r"([A-Z]+) (\S+) (HTTP/1\.[01])\Z")
SINGLE_HEADERS = ("content-length", "host")


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

    def json(self):
        """The body as JSON; 400 for bad JSON, NaN or Infinity."""
        try:
            body = self.body
            # UTF-8 is what docs/PROTOCOL.md ("Transport") asks for: the fast path
            if body[:1] in (b"{", b"[") and body[1:2] != b"\x00":
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


_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips


def parse_head(head, peer=None):
    """Parse a request head (without its final blank line); raise HTTPError(400)."""
    lines = head.decode("latin-1").split("\r\n")
    match = REQUEST_LINE.match(lines[0])
    if match is None:
        raise HTTPError(400, "malformed request line: expected 'METHOD /path HTTP/1.1'")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip(_ASCII_SPACE):
            raise HTTPError(400, f"malformed header line {line[:40].encode('latin-1')!r}")
        name = name.lower()
        value = value.strip(_ASCII_SPACE)
        if name in headers:
            if name in SINGLE_HEADERS:
                if headers[name] != value:
                    # Two framings of one body are how requests get smuggled.
                    raise HTTPError(400, f"conflicting {name} headers")
                continue
            value = headers[name] + ", " + value
        headers[name] = value
    return Request(*match.groups(), headers, peer)


def body_length(request, max_body_bytes):
    """The declared body length; raise HTTPError for what this server will not read."""
    if "transfer-encoding" in request.headers:
        raise HTTPError(411, "chunked bodies are not supported: send a Content-Length")
    declared = request.headers.get("content-length")
    if declared is None:
        if request.method in ("POST", "PUT", "PATCH"):
            raise HTTPError(411, f"{request.method} needs a Content-Length header")
        return 0
    if not declared.isdigit():
        raise HTTPError(400, f"Content-Length must be a whole number, not {declared!r}")
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


def _token_in(request):
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token")


def token_ok(request, tokens):
    """True when `request` carries one of `tokens` (compared in constant time)."""
    offered = _token_in(request)
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


PUBLIC_PATHS = ("/health", "/")
DELETE_FILTERS = {"status", "older_than", "task_id", "token"}


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
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise HTTPError(400, f"{name}: must be a server time in Unix seconds (the `now` of "
                             f"an earlier answer), not {raw!r}")
    return value


def _path_task_id(request):
    return urllib.parse.unquote(request.path[len("/tasks/"):])


def _status_query(request):
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise HTTPError(400, f"status: must be one of {', '.join(STATUSES)}, not {status!r}")
    return status



def settle(result, then):
    """`then(result)`: at once when `result` is a value, or as a coroutine that awaits it
    first. The one place that tells a store's (or a middleware's) value from a coroutine,
    so that the in-memory store's requests never leave the synchronous fast path."""
    if asyncio.iscoroutine(result):
        return _settled_later(result, then)
    return then(result)


async def _settled_later(result, then):
    return then(await result)


async def resolved(result):
    """`result`, awaited first when it is a coroutine; for code that is already async."""
    return await result if asyncio.iscoroutine(result) else result


def _calling(middleware, call_next):
    """One link of the middleware chain: `middleware` with what comes after it."""
    return lambda request: middleware(request, call_next)


WEBSOCKET_ADMITTED = Response(101)  # what middleware's call_next gives for an admitted /ws


class Api:
    """The HTTP API: a Request in, a Response (or a coroutine of one) out.

    It owns the routes, the middleware chain and the access policy (tokens, origins,
    CORS), and logs and counts each answered request. It needs no socket: a test can call
    `handle()` with a parsed Request. What it changes in the store it tells `feed`."""

    def __init__(self, settings, store, feed, metrics, clock, server_gauges):
        self.settings = settings
        self.store = store
        self.feed = feed
        self.changes = feed.log  # for GET /tasks?since=
        self.metrics = metrics
        self.clock = clock
        self.server_gauges = server_gauges  # () -> live counts the server keeps (listeners...)
        self.middleware = []
        self.log_requests = False  # set at start: one debug line per request
        self.page, self.script_hashes, self.page_source = load_dashboard()
        self.routes = {
            "/progress": {"POST": self.post_progress},
            "/tasks": {"GET": self.get_tasks, "DELETE": self.delete_tasks},
            "/health": {"GET": self.get_health},
            "/metrics": {"GET": self.get_metrics},
            "/auth": {"GET": self.get_auth},
            "/": {"GET": self.get_root},
            "/static/" + INDEX_FILE: {"GET": self.get_dashboard},
            "/ws": {"GET": self.get_ws_without_upgrade},
        }
        self.task_routes = {"GET": self.get_task, "DELETE": self.delete_task}  # /tasks/{id}

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
        if self.middleware:
            return self.through_middleware(request, lambda request: resolved(
                self.dispatch(request)))
        return self.dispatch(request)

    async def through_middleware(self, request, innermost):
        call = innermost
        for middleware in reversed(self.middleware):
            call = _calling(middleware, call)
        try:
            response = await call(request)
            if not isinstance(response, Response):
                raise TypeError(f"a middleware returned {type(response).__name__}, "
                                "not a Response")
            return response
        except ANSWERED_ERRORS as error:
            return error_response(error)
        except asyncio.CancelledError:  # only at shutdown
            return shutting_down()
        except Exception:
            return internal_error(request)

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
        if asyncio.iscoroutine(response):  # an asynchronous store is still at work
            return self.completed(request, response, cors)
        response.headers.extend(cors)
        return response

    async def completed(self, request, pending, cors):
        try:
            response = await pending
        except ANSWERED_ERRORS as error:
            response = error_response(error)
        except asyncio.CancelledError:  # only at shutdown
            response = shutting_down()
        except Exception:
            response = internal_error(request)
        response.headers.extend(cors)
        return response

    def route(self, request):
        path = request.path
        methods = self.routes.get(path)
        if methods is None:
            if path.startswith("/tasks/") and len(path) > len("/tasks/"):
                methods = self.task_routes
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

    def access(self, request):
        """What the request's token allows: "write" (every route; also when no tokens
        are configured), "read" (GET and HEAD only), or None (no valid token)."""
        settings = self.settings
        if not settings.api_tokens or token_ok(request, settings.api_tokens):
            return "write"
        if settings.read_tokens and token_ok(request, settings.read_tokens):
            return "read"
        return None

    def check_token(self, request):
        if not self.settings.api_tokens:  # Settings refuses read tokens without these
            return
        path = request.path
        if path in PUBLIC_PATHS or path.startswith("/static/"):
            return
        access = self.access(request)
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
        payload = request.json()
        if type(payload) is list:
            if len(payload) > MAX_BATCH_ITEMS:
                raise HTTPError(400, f"batch of {len(payload)} updates is over the limit of "
                                     f"{MAX_BATCH_ITEMS}: split it")
            updates = [validate_update(item, index) for index, item in enumerate(payload)]
        else:
            updates = [validate_update(payload)]
        self.metrics.updates_received += len(updates)
        accepted = Response(200, b'{"ok":true,"accepted":%d}' % len(updates))
        return settle(self.store.apply(updates, self.clock()),
                      lambda changed: self.applied(changed, accepted))

    def applied(self, changed, response):
        self.metrics.updates_applied += len(changed)
        self.feed.changed(changed)
        return response

    def get_tasks(self, request):
        status = _status_query(request)
        since = _time_query(request, "since")
        now = self.clock()
        stale_after_s = self.settings.stale_seconds
        answer = {}
        removed = []
        if since is None:
            candidates = self.store.tasks()
        else:
            # A poller's delta: what changed since its last call (whose `now` it passes),
            # and what was deleted; a filter that a task no longer passes deletes it too.
            changed_ids, removed, resync = self.changes.since(since)
            if resync:
                answer["resync"] = True  # the answer holds every task: replace your copy
                candidates = self.store.tasks()
            else:
                candidates = filter(None, map(self.store.get, changed_ids))
        tasks = {}
        for task in candidates:  # the status first: as_dict() only for those shown
            if status is None or task.shown_status(now, stale_after_s) == status:
                tasks[task.task_id] = task.as_dict(now, stale_after_s)
            elif since is not None:
                removed.append(task.task_id)
        answer.update(tasks=tasks, now=now)
        if since is not None and "resync" not in answer:
            answer["removed"] = removed
        return json_response(answer)

    def get_task(self, request):
        task_id = _path_task_id(request)
        task = self.store.get(task_id)
        if task is None:
            raise HTTPError(404, f"no task {task_id!r}")
        return json_response(task.as_dict(self.clock(), self.settings.stale_seconds))

    def delete_tasks(self, request):
        # With no filter this deletes everything: a misspelt filter must not mean that.
        unknown = set(request.query) - DELETE_FILTERS
        if unknown:
            raise HTTPError(400, f"unknown filter {sorted(unknown)[0]!r}: DELETE /tasks takes "
                                 "status, older_than and task_id (none deletes every task)")
        status = _status_query(request)
        older_than = _seconds_query(request, "older_than")
        # An id as a filter too: a browser cannot put "." or ".." in a path segment.
        task_id = request.query.get("task_id")
        now = self.clock()
        stale_after_s = self.settings.stale_seconds
        candidates = self.store.tasks() if task_id is None else filter(
            None, [self.store.get(task_id)])
        doomed = [task.task_id for task in candidates
                  if (status is None or task.shown_status(now, stale_after_s) == status)
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
        stale_after_s = self.settings.stale_seconds
        counts = dict.fromkeys(STATUSES, 0)
        for task in self.store.tasks():
            counts[task.shown_status(now, stale_after_s)] += 1
        return counts

    def get_health(self, request):
        store = self.store.health()
        return json_response({"status": "ok" if store.get("ok") else "degraded",
                              "tasks": len(self.store),
                              "active": self.tasks_by_status()["running"],
                              "listeners": self.server_gauges()["listeners"], "store": store,
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
        return Response(200, self.page, "text/html; charset=utf-8", headers=[
            ("Content-Security-Policy",
             content_security_policy(self.script_hashes, request.headers.get("host"))),
            ("Cache-Control", "no-cache"),
            ("Referrer-Policy", "no-referrer"),  # the URL may carry ?token=
        ])


    # WebSocket admission

    def admit_websocket(self, request):
        """None when a /ws handshake may go on, else the Response refusing it; a coroutine
        of either when middleware must see the handshake first (as it sees every request)."""
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
        return "other"

    def request_done(self, request, status, reason=None):
        """Count an answered request (None: one too malformed to parse) and log it."""
        if request is None:
            self.metrics.request_done("unparsed", "other", status, reason)
            return
        self.metrics.request_done(self.route_label(request.path), request.method, status,
                                  reason)
        if self.log_requests:
            path = request.target
            if "token" in request.query:  # never log a token, however it was escaped
                path = request.path + "?" + "&".join(
                    urllib.parse.quote(name) + "=" + ("***" if name == "token"
                                                      else urllib.parse.quote(value))
                    for name, value in request.query.items())
            log.debug("%s %s %d %.1fms", request.method, path, status,
                      (time.perf_counter() - request.started) * 1000)


# --- WebSocket -------------------------------------------------------------------------

try:  # keep the file importable for `version` and `--help` when websockets is missing
    from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
    from websockets.frames import Opcode
    from websockets.http11 import Request as WSRequest
    from websockets.protocol import State
    from websockets.server import ServerProtocol
except ImportError:  # pragma: no cover - reported by App.start()
    ServerProtocol = None


class Listener:
    """One /ws client: its Sans-I/O protocol, whether it keeps up, and its ping deadline.

    The hub offers it each broadcast (`offer()`) and asks it to keep its deadlines
    (`expire()`); the listener decides what to send, to skip or to give up."""

    __slots__ = ("connection", "protocol", "behind_since", "high_water", "ping_sent_at",
                 "last_ping_at")

    def __init__(self, connection, protocol, now):
        self.connection = connection
        self.protocol = protocol
        self.behind_since = None  # loop time it stopped getting messages, while behind
        self.high_water = LISTENER_BUFFER_HIGH_BYTES
        self.ping_sent_at = None  # while a ping waits for its pong
        self.last_ping_at = now

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
                log.info("closing /ws listener %s: it stopped reading", self.connection.peer)
                self.connection.abort()
            return None
        if unsent > self.high_water:
            self.behind_since = now  # drop what it has pending, never block the others
            return None
        for message in messages:
            self.send(message)
        return SENT

    def expire(self, now):
        """Ping when one is due; close a listener that left a ping unanswered too long."""
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at > WS_PING_TIMEOUT_S:
                log.info("closing /ws listener %s: no pong", self.connection.peer)
                self.connection.abort()
        elif (now - self.last_ping_at >= WS_PING_INTERVAL_S
              and self.protocol.state is State.OPEN):
            self.ping_sent_at = self.last_ping_at = now
            self.protocol.send_ping(os.urandom(4))
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

    def receive(self, data):
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            # Messages from clients are ignored; only a pong matters, to show liveness.
            if getattr(event, "opcode", None) is Opcode.PONG:
                self.ping_sent_at = None
        self.flush()
        if protocol.state is State.CLOSED:
            self.connection.close()

    def close(self, code=1001, reason="server shutting down"):
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self.flush()


SENT, RESYNC = "sent", "resync"  # what Listener.offer() did


class Hub:
    """The live feed's listeners: a snapshot for each newcomer, each broadcast offered to
    every listener (one that falls behind never slows the others), and their pings.

    A store of at most SNAPSHOT_CHUNK_TASKS tasks gets one snapshot message, built once
    per broadcast interval however many listeners (re)connect in it. A bigger one goes
    out in chunks, one per loop step (`pump()`), to all the listeners that asked within
    one broadcast interval at once; they get the updates from their first chunk on."""

    def __init__(self, feed, store, settings, clock, metrics):
        self.feed = feed
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.listeners = set()  # those that get the updates
        self.waiting = []  # listeners whose chunked snapshot starts at the next broadcast
        self.runs = []  # [chunks, listeners, blocked since] of chunked snapshots under way
        self.cached_snapshot = None

    def __len__(self):
        return len(self.listeners) + len(self.waiting)

    def add(self, listener):
        self.metrics.listeners_opened += 1
        self.send_snapshot(listener)

    def discard(self, listener):
        self.listeners.discard(listener)
        self.leave_snapshots(listener)

    def leave_snapshots(self, listener):
        if listener in self.waiting:
            self.waiting.remove(listener)
        for run in self.runs:
            if listener in run[1]:
                run[1].remove(listener)

    def snapshot(self):
        """The one-message snapshot, built once per broadcast interval however many
        listeners (re)connect in it: what changes after it is built is in the feed, and
        goes to them with the next update."""
        if self.cached_snapshot is None:
            self.cached_snapshot = snapshot_message(self.store, self.clock(),
                                                    self.settings.stale_seconds)
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
        start the chunked snapshot of those waiting for one."""
        self.cached_snapshot = None  # from here on it would miss what the feed hands out
        if not self.listeners:  # nobody to tell: a listener that comes gets a snapshot
            self.feed.clear()
        else:
            messages = self.feed.take(self.store, self.clock(), self.settings.stale_seconds)
            sent_to = 0
            for listener in list(self.listeners):
                outcome = listener.offer(messages, loop_now)
                if outcome is SENT:
                    sent_to += 1
                elif outcome is RESYNC:
                    self.send_snapshot(listener)
            self.metrics.broadcast(messages, sent_to)
        if self.waiting:
            chunks = snapshot_chunks(self.store, self.clock, self.settings.stale_seconds)
            self.runs.append([chunks, self.waiting, None])  # None: not waiting on a reader
            self.waiting = []
        if self.runs:
            self.pump(loop_now)

    def pump(self, loop_now):
        """Send the next chunk of each chunked snapshot under way whose listeners have
        drained the last one; True when a chunk went out and more remain (call again at
        the next step of the loop; the next broadcast calls it anyway)."""
        advanced = False
        for run in list(self.runs):
            chunks, listeners, blocked_since = run
            listeners[:] = [listener for listener in listeners
                            if listener.connection.transport is not None]
            slow = [listener for listener in listeners
                    if listener.unsent_bytes() > LISTENER_BUFFER_HIGH_BYTES]
            if slow:  # wait for them: the chunks of a big store must not pile up unsent
                if run[2] is None:
                    run[2] = loop_now
                elif loop_now - blocked_since > LISTENER_BEHIND_TIMEOUT_S:
                    for listener in slow:
                        log.info("closing /ws listener %s: it stopped reading its "
                                 "snapshot", listener.connection.peer)
                        listener.connection.abort()
                continue
            run[2] = None
            chunk = next(chunks, None)
            if chunk is None or not listeners:
                self.runs.remove(run)
                continue
            self.metrics.broadcast((chunk,), len(listeners))
            for listener in listeners:
                listener.send_snapshot(chunk)
                self.listeners.add(listener)
            advanced = True
        return advanced and bool(self.runs)

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

    # asyncio callbacks

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if not self.app.connection_opened(self):
            transport.abort()  # one refused rather than file descriptors run out for all
            return
        self.deadline = self.app.loop.time() + HEADER_TIMEOUT_S

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
        if now <= self.deadline or self.busy:
            return False
        cut_off = self.pending is not None or self.head_started
        self.close()
        return cut_off

    # HTTP

    def process(self):
        """Answer every complete request in the buffer."""
        buffer = self.buffer
        app = self.app
        while self.transport is not None and not self.busy:
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
                    request.started = time.perf_counter()
                    if request.path == "/ws" and request.method == "GET":
                        self.upgrade(request, head + b"\r\n\r\n")
                        return
                    length = body_length(request, app.settings.max_body_bytes)
                except HTTPError as error:
                    declared = request.headers.get("content-length", "") if request else ""
                    self.fail(error, int(declared) if error.status == 413 else 0, request)
                    return
                if length:
                    if (len(buffer) < length
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
                or (line_end >= 0 and not REQUEST_LINE.match(first.decode("latin-1")))):
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
        if not asyncio.iscoroutine(result):
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
        self.transport.resume_reading()  # closing after the write: this does nothing
        then(shutting_down() if done.cancelled() else done.result())
        if self.listener is None:
            self.process()  # the requests that waited behind this one

    def respond(self, request):
        self.after(self.app.api.handle(request), lambda response: self.write(request, response))

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
        # Every change to the store goes through the feed, to the hub and the change log.
        self.feed = Feed(ChangeLog(clock))
        self.metrics = Metrics(clock())
        self.notifier = Notifier.from_settings(settings)  # None without --notify
        self.hub = Hub(self.feed, self.store, settings, clock, self.metrics)
        self.api = Api(settings, self.store, self.feed, self.metrics, clock, self.gauges)
        self.loop = None
        self.server = None
        self.port = None
        self.connections = set()
        self.max_connections = connection_limit()
        self.refusals_logged_at = -math.inf
        self.background = []
        self.stopping = False

    def add_middleware(self, middleware):
        """Wrap request handling (and /ws handshakes); see `Api.add_middleware()`."""
        return self.api.add_middleware(middleware)

    def gauges(self):
        """What the server counts live, for /health and /metrics."""
        return {"listeners": len(self.hub), "connections": len(self.connections),
                "notifications": self.notification_outcomes()}

    def notification_outcomes(self):
        outcomes = dict.fromkeys(NOTIFY_OUTCOMES, 0)
        for sender in self.notifier.senders if self.notifier is not None else ():
            for outcome, count in sender.outcomes.items():
                outcomes[outcome] += count
        return outcomes

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
            self.notifier.observe(self.feed.changed_ids, self.feed.removed_ids, self.store,
                                  self.clock(), self.settings.stale_seconds)
            self.notifier.tick(self.clock())
        self.hub.broadcast(self.loop.time())
        if self.hub.runs:
            self.loop.call_soon(self.pump)

    def pump(self):
        # One chunk of each snapshot under way per loop step: requests go on in between.
        if not self.stopping and self.hub.pump(self.loop.time()):
            self.loop.call_soon(self.pump)

    def sweep(self):
        return settle(self.store.sweep(self.clock(), self.settings), self.swept)

    def swept(self, outcome):
        changed_ids, removed_ids = outcome
        self.feed.changed(changed_ids)
        self.feed.removed(removed_ids)

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
        self.server = await self.loop.create_server(
            lambda: Connection(self), host, self.settings.port,
            reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        await resolved(self.store.open(self.feed))
        # A persistent store may hold tasks whose lifetime ran out while we were down.
        await resolved(self.sweep())
        if self.notifier is not None:  # after the first sweep: old news is not news
            self.notifier.start(self.store.tasks(), self.clock(), self.settings.stale_seconds)
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
        log.info("Progressista %s listening on %s:%d; dashboard: http://%s:%d/static/%s; "
                 "store: %s, %d tasks loaded", __version__, host or "*", self.port, shown,
                 self.port, INDEX_FILE, store.get("kind", self.store.kind), len(self.store))
        if self.api.page is None:
            log.warning("%s", self.api.page_source)
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
                    "first), then errors and done tasks (latest first). Reconnects by itself.")
    watch.add_argument("--server", "--server-url", dest="server", metavar="URL",
                       help=f"the server; a client URL ending in /progress works too "
                            f"[env PROGRESSISTA_SERVER_URL; default {WATCH_DEFAULT_SERVER}]")
    watch.add_argument("--token", "--api-token", dest="token", metavar="T",
                       help="bearer token to send [env PROGRESSISTA_API_TOKEN]")
    watch.add_argument("--filter", metavar="TEXT",
                       help="only tasks whose id, description, postfix, error, status or "
                            "meta key=value contain TEXT (case-insensitive)")
    watch.add_argument("--status", type=watch_status, metavar="S",
                       help="only tasks in status S: running, stale, close (or done), error, "
                            "or active (running and stale)")
    watch.add_argument("--interval", type=_positive_seconds, default=WATCH_INTERVAL_S,
                       metavar="SEC", help=f"redraw at most every SEC s ({WATCH_INTERVAL_S:g})")
    watch.add_argument("--once", action="store_true",
                       help="print the table once and exit (for scripts and watch -n)")
    watch.add_argument("--json", action="store_true",
                       help='print {"tasks": {...}, "now": T}, filtered, as JSON and exit')
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
    except StoreError as error:
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
WATCH_STATUSES = STATUSES + ("active",)  # active: running or stale, as in the dashboard
WATCH_STATUS_ALIASES = {"done": "close"}  # the word the table shows for close
WATCH_INTERVAL_S = 0.5  # default --interval: the screen is redrawn at most this often
WATCH_RETRY_FIRST_S = 0.5  # reconnect backoff: the first wait, doubled after each failure...
WATCH_RETRY_MAX_S = 5.0  # ...up to this
WATCH_TIMEOUT_S = 5.0  # to open the WebSocket, or for GET /tasks to answer
WATCH_CLOSE_TIMEOUT_S = 1.0  # Ctrl-C waits no longer than this for the closing handshake
# The largest snapshot there can be: MAX_TASKS tasks with every text field at its limit.
WATCH_MAX_MESSAGE_BYTES = 1 << 30
STATUS_COLUMN_CELLS = 6  # "error " in front of each bar; blank for a running task
STATUS_WORDS = {"running": "", "stale": "stale", "close": "done", "error": "error"}
STATUS_COLOURS = {"stale": "33", "close": "32", "error": "31"}  # SGR: yellow, green, red
NATURAL_BAR_CELLS = 10  # tqdm's bar when it is given no ncols
MIN_LABEL_CELLS = 8  # a description is cut to half the row, but never below this
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
    if status == "running":
        # The sender's elapsed is as of its last update; between updates a running bar's
        # clock keeps going, as tqdm's own does. Stale and finished bars stand still.
        elapsed += max(0.0, now - updated_at)
    unit_scale = task.get("unit_scale", False)
    if isinstance(unit_scale, bool) or not isinstance(unit_scale, (int, float)):
        unit_scale = bool(unit_scale)
    has_bar = bool(total) and n < total + 0.5  # tqdm shows no bar past the total
    # A stale or failed bar has no honest ETA, a finished one has none left (as the dashboard).
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
    return ""


def format_row(task, now, width=None, *, meter=None, ascii=False):
    """One line for one task at `now`: a status column (blank while running), the bar as
    tqdm draws it, and why a stale or failed task stopped, in at most `width` cells."""
    meter = meter or default_meter()
    status = task.get("status") or "running"
    column = _pad(_printable(STATUS_WORDS.get(status, status)), STATUS_COLUMN_CELLS - 1) + " "
    fields = meter_fields(task, now, ascii)
    tail = _row_tail(task, status, now)
    if width is None:
        return column + meter(fields, None) + tail
    room = width - STATUS_COLUMN_CELLS
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


def watch_status(text):
    """--status: running, stale, close (or done), error, or active (running and stale)."""
    status = WATCH_STATUS_ALIASES.get(text.strip().lower(), text.strip().lower())
    if status not in WATCH_STATUSES:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(WATCH_STATUSES)} (or done), not {text!r}")
    return status


def task_matches(task, text_filter=None, status=None):
    """The dashboard's filter: `text_filter` in the id, description, postfix, error, status or
    a meta key=value (case-insensitive); `status` one status, or active."""
    shown = task.get("status") or "running"
    if status and (shown not in ("running", "stale") if status == "active" else shown != status):
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


def render_table(tasks, now, width=None, height=None, text_filter=None, status=None, *,
                 source=None, notice=None, meter=None, ascii=False):
    """The lines `watch` shows for `tasks` (task_id -> task, in the server's order) at `now`:
    a header, `notice` when given, one row per matching task (order_tasks), all within
    `width` cells and `height` lines (None: no limit), with "+N more" for what is cut."""
    matching = [task for task in tasks.values() if task_matches(task, text_filter, status)]
    summary = f"{len(matching)} task{'' if len(matching) == 1 else 's'}"
    if len(matching) != len(tasks):
        summary += f" of {len(tasks)}"
    if matching:
        summary += ": " + _status_counts(matching)
    conditions = ([f"filter {text_filter!r}"] if text_filter else []) + (
        [f"status {STATUS_WORDS.get(status) or status}"] if status else [])
    header = " · ".join(["progressista"] + ([source] if source else []) + [summary] + conditions)
    lines = [_printable(header)] + ([_printable(notice)] if notice else [])
    ordered = order_tasks(matching)
    meter = meter or default_meter()
    if not ordered:
        body = ["no task matches" if tasks else "no tasks yet"]
        return [_fit(line, width) for line in (lines + body)[:height]]
    room = len(ordered) if height is None else height - len(lines)
    shown = ordered if room >= len(ordered) else ordered[:max(0, room - 1)]
    lines += [format_row(task, now, width, meter=meter, ascii=ascii) for task in shown]
    if len(shown) < len(ordered):
        hidden = ordered[len(shown):]
        lines.append(f"+{len(hidden)} more ({_status_counts(hidden)})")
    return [_fit(line, width) for line in lines[:height]]


def apply_feed_message(tasks, message):
    """Apply one /ws message (docs/PROTOCOL.md "The live feed") to `tasks`, task_id -> task, in
    place; return the server's `now` it carries, or None for a message of another kind."""
    kind = message.get("type") if isinstance(message, dict) else None
    sent = message.get("tasks") if kind in ("snapshot", "snapshot_more", "update") else None
    sent = {task_id: task for task_id, task in sent.items()
            if isinstance(task, dict)} if isinstance(sent, dict) else {}
    if kind == "snapshot":
        tasks.clear()
        tasks.update(sent)
    elif kind in ("update", "snapshot_more"):  # a big snapshot's later chunks add to it
        tasks.update(sent)  # a known task keeps its place
    elif kind == "remove":
        for task_id in message.get("ids") or ():
            tasks.pop(task_id, None)
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


def fetch_tasks(base, headers, timeout=WATCH_TIMEOUT_S):
    """GET /tasks once: the parsed {"tasks": ..., "now": ...}. Raises urllib's errors, or
    ValueError when the answer is not a task list. Every task, not ?status=: the header
    counts all of them ("3 tasks of 10"), and --status filters here as in live mode."""
    import urllib.request

    request = urllib.request.Request(base + "/tasks", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        snapshot = json.loads(response.read())
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("tasks"), dict):
        raise ValueError("the answer has no task list")
    return snapshot


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
        said = f" ({frame.reason})" if frame is not None and frame.reason else ""
        return f"connection closed{said}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "timed out"
    return _printable(str(error)) or type(error).__name__


class _Watcher:
    """The live mode: the /ws feed into a dict of tasks, drawn at most every `interval` s."""

    def __init__(self, args, base, ws_url, headers, screen, ascii, clock=time.monotonic):
        self.args, self.base, self.ws_url, self.headers = args, base, ws_url, headers
        self.screen, self.ascii, self.clock = screen, ascii, clock
        self.meter = default_meter()
        self.tasks = {}
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
            source=self.base, notice=self.notice, meter=self.meter, ascii=self.ascii))

    def run(self):
        """Watch until interrupted; return 1 when the server refuses us for good."""
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        retry_s = WATCH_RETRY_FIRST_S
        while True:
            try:
                with connect(self.ws_url, additional_headers=self.headers,
                             open_timeout=WATCH_TIMEOUT_S, close_timeout=WATCH_CLOSE_TIMEOUT_S,
                             max_size=WATCH_MAX_MESSAGE_BYTES) as websocket:
                    retry_s = WATCH_RETRY_FIRST_S  # in: the next outage starts from scratch
                    self.follow(websocket)
            except InvalidStatus as error:
                status = error.response.status_code
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
                server_now = apply_feed_message(self.tasks, json.loads(raw))
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

    try:
        snapshot = fetch_tasks(base, headers)
    except urllib.error.HTTPError as error:
        print(f"progressista watch: {base}/tasks: HTTP {error.code}: "
              f"{_error_message(error.read())}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"progressista watch: cannot reach {base}: {_printable(error.reason)}",
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # a timeout, or an answer that is not ours
        print(f"progressista watch: {base}/tasks: {_printable(error) or type(error).__name__}"
              " (is this a Progressista server?)", file=sys.stderr)
        return 1
    tasks = {task_id: task for task_id, task in snapshot["tasks"].items()
             if isinstance(task, dict)}
    now = _number_or(snapshot.get("now"), None) or time.time()
    if args.json:
        matching = {task_id: task for task_id, task in tasks.items()
                    if task_matches(task, args.filter, args.status)}
        print(json.dumps({"tasks": matching, "now": now}, indent=2 if screen.live else None))
        return 0
    width, _ = screen.size()  # one table to read or scroll: every row, fitted to the width
    lines = render_table(tasks, now, width, None, args.filter, args.status, source=base,
                         ascii=ascii)
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
