"""/ws, the live feed: the snapshot, updates coalesced per broadcast interval, removals,
listeners that do not read (back-pressure), pings, and the close at shutdown.

A real websockets client (conftest.open_listener) listens to a real server; listeners
that never read or never answer a ping are raw sockets; the coalescing core (`Feed`) is
also tested on its own with an injected `now`.
"""

import contextlib
from http.client import HTTPConnection
import json
import socket
import struct
import time

import pytest
from websockets.exceptions import ConnectionClosed

import progressista
from conftest import (WS_HANDSHAKE, ServerThread, http, memory_store_of, new_id, on_server_loop,
                      open_listener, post, raw_connection, read_response, receive_until,
                      running_server, task_url, updated, wait_for)

pytestmark = pytest.mark.timeout(60)

STALE_60 = progressista.Thresholds(stale_seconds=60.0)  # the feed's derived statuses


# --- The handshake -----------------------------------------------------------------------


def test_ws_path_without_upgrade_headers_is_refused(shared_server):
    status, body, headers = http("GET", shared_server.url + "/ws")
    assert status == 426
    assert headers["Upgrade"] == "websocket"
    assert body == {"error": "/ws is a WebSocket: connect with a WebSocket client"}


def test_head_on_ws_is_answered_like_a_get_without_upgrade(shared_server):
    status, body, headers = http("HEAD", shared_server.url + "/ws")
    assert status == 426
    assert headers["Upgrade"] == "websocket"
    _, _, got = http("GET", shared_server.url + "/ws")
    assert headers["Content-Length"] == got["Content-Length"]  # the same answer, no body


# --- Messages: snapshot, update, remove --------------------------------------------------


def test_ws_sends_snapshot_of_existing_tasks_on_connect(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "n": 3, "desc": "snap"})
    with open_listener(shared_server) as ws:
        message = json.loads(ws.recv(timeout=3))
    assert message["type"] == "snapshot"
    assert message["tasks"][task_id]["n"] == 3 and isinstance(message["now"], float)


def test_ws_sends_update_after_post(shared_server):
    task_id = new_id()
    with open_listener(shared_server) as ws:
        ws.recv(timeout=3)
        post(shared_server, {"task_id": task_id, "n": 21})
        message = receive_until(ws, updated(task_id, n=21))
    assert isinstance(message["now"], float)


def test_ws_update_carries_only_changed_tasks(shared_server):
    quiet, busy = new_id("quiet"), new_id("busy")
    with open_listener(shared_server) as ws:
        ws.recv(timeout=3)
        post(shared_server, {"task_id": quiet})
        receive_until(ws, updated(quiet))
        post(shared_server, {"task_id": busy, "n": 1})
        message = receive_until(ws, updated(busy))
    assert quiet not in message["tasks"]


def test_ws_coalesces_updates_within_one_interval_into_one_message_with_latest_state():
    with running_server(broadcast_interval=0.3) as server:
        marker, task_id = new_id("marker"), new_id("busy")
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            post(server, {"task_id": marker})
            receive_until(ws, updated(marker))  # a broadcast tick has just passed
            conn = HTTPConnection("127.0.0.1", server.port, timeout=5)
            for n in range(1, 21):
                conn.request("POST", "/progress",
                             json.dumps({"task_id": task_id, "n": n, "seq": n}),
                             {"Content-Type": "application/json"})
                conn.getresponse().read()
            conn.close()
            messages = [receive_until(ws, updated(task_id), timeout=2)]
            with contextlib.suppress(TimeoutError):
                while True:
                    messages.append(json.loads(ws.recv(timeout=0.7)))
    carrying = [m for m in messages if m["type"] == "update" and task_id in m["tasks"]]
    assert len(carrying) == 1
    assert carrying[0]["tasks"][task_id]["n"] == 20


def test_ws_sends_remove_on_delete(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id})
    with open_listener(shared_server) as ws:
        ws.recv(timeout=3)
        http("DELETE", task_url(shared_server, task_id))
        # Other tests share this server: a removal of theirs may come in the same message.
        receive_until(ws, lambda m: m["type"] == "remove" and task_id in m["ids"])


def test_ws_sends_remove_for_bulk_delete(clocked_server):
    post(clocked_server, [{"task_id": "a", "status": "close"}, {"task_id": "b", "status": "close"}])
    with open_listener(clocked_server) as ws:
        ws.recv(timeout=3)
        http("DELETE", clocked_server.url + "/tasks?status=close")
        message = receive_until(ws, lambda m: m["type"] == "remove")
    assert sorted(message["ids"]) == ["a", "b"]


def test_ws_ignores_messages_from_the_client(shared_server):
    task_id = new_id()
    with open_listener(shared_server) as ws:
        ws.recv(timeout=3)
        ws.send("hello server")
        ws.send(b"\x00binary")
        post(shared_server, {"task_id": task_id, "n": 2})
        receive_until(ws, updated(task_id, n=2))


# --- Feed, the pure core: coalescing -----------------------------------------------------


def decoded(messages):
    return [json.loads(message) for message in messages]


def test_feed_coalesces_many_changes_into_one_update_with_latest_state():
    store = memory_store_of({"task_id": "a", "n": 1})
    feed = progressista.Feed()
    for n in range(2, 50):
        store.apply([progressista.validate_update({"task_id": "a", "n": n})], 100.0 + n)
        feed.changed(["a"])
    (message,) = decoded(feed.take(store, 200.0, STALE_60))
    assert (message["type"], message["tasks"]["a"]["n"], message["now"]) == ("update", 49, 200.0)


def test_feed_take_forgets_what_it_sent():
    store = memory_store_of({"task_id": "a"})
    feed = progressista.Feed()
    feed.changed(["a"])
    feed.take(store, 101.0, STALE_60)
    assert feed.take(store, 102.0, STALE_60) == []


def test_feed_removal_cancels_a_pending_change():
    store = memory_store_of({"task_id": "a"})
    feed = progressista.Feed()
    feed.changed(["a"])
    store.delete(["a"])
    feed.removed(["a"])
    assert decoded(feed.take(store, 101.0, STALE_60)) == [{"type": "remove", "ids": ["a"],
                                                     "now": 101.0}]


def test_feed_update_lists_a_batchs_new_tasks_in_the_order_they_were_created():
    ids = [f"task-{n:02d}" for n in range(40)][::-1]
    store = progressista.MemoryStore()
    feed = progressista.Feed()
    feed.changed(store.apply([progressista.validate_update({"task_id": task_id})
                              for task_id in ids], 100.0))
    (message,) = decoded(feed.take(store, 101.0, STALE_60))
    assert list(message["tasks"]) == ids == [task.task_id for task in store.tasks()]


def test_feed_update_shows_stale_status_as_of_now():
    store = memory_store_of({"task_id": "a"}, now=100.0)
    feed = progressista.Feed()
    feed.changed(["a"])
    (message,) = decoded(feed.take(store, 170.0, STALE_60))
    assert message["tasks"]["a"]["status"] == "stale"


# --- Listeners that do not read: back-pressure -------------------------------------------


@contextlib.contextmanager
def stuck_listener(server):
    """A /ws listener that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(WS_HANDSHAKE)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        yield sock
    finally:
        sock.close()


def post_many_big_updates(server, prefix, batches=40, per_batch=100):
    """Post batches * per_batch updates of about 2 KB each over keep-alive."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
    for batch in range(batches):
        updates = [{"task_id": f"{prefix}-{i}", "n": batch, "desc": "d" * 1000,
                    "postfix": "p" * 900} for i in range(per_batch * batch,
                                                         per_batch * (batch + 1))]
        conn.request("POST", "/progress", json.dumps(updates),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    conn.close()


def read_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def read_frame(sock):
    """One unmasked server-to-client WebSocket frame: (opcode, payload)."""
    first, second = read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exactly(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exactly(sock, 8))[0]
    return first & 0x0F, read_exactly(sock, length)


def test_health_answers_promptly_while_a_listener_never_reads():
    with running_server() as server, stuck_listener(server):
        post_many_big_updates(server, new_id("flood"))
        started = time.monotonic()
        status, _, _ = http("GET", server.url + "/health", timeout=2)
        assert status == 200
        assert time.monotonic() - started < 1.0


def test_other_listeners_keep_getting_updates_while_one_never_reads():
    with running_server() as server, stuck_listener(server):
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            prefix = new_id("flood")
            post_many_big_updates(server, prefix)
            last = f"{prefix}-{40 * 100 - 1}"
            receive_until(ws, updated(last, n=39), timeout=5)


def test_listener_that_falls_behind_has_bounded_buffer_and_resyncs_or_is_closed():
    settings = {"broadcast_interval": 0.02, "max_body_bytes": 8 << 20}
    with running_server(**settings) as server, stuck_listener(server) as sock:
        prefix, marker = new_id("flood"), new_id("marker")
        conn = HTTPConnection("127.0.0.1", server.port, timeout=10)
        most_unsent = 0
        for round_ in range(8):  # about 4 MB of task state per round, one round per tick
            batch = [{"task_id": f"{prefix}-{i}", "n": round_, "desc": "d" * 1000,
                      "postfix": "p" * 1000, "error": "e" * 2000} for i in range(1000)]
            conn.request("POST", "/progress", json.dumps(batch),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(0.03)  # let a broadcast tick pass, as a steady sender would
            most_unsent = max([most_unsent] + on_server_loop(server, lambda: [
                listener.unsent_bytes() for listener in server.app.hub.listeners]))
        conn.close()
        assert most_unsent < 2 * progressista.LISTENER_BUFFER_HIGH_BYTES
        post(server, {"task_id": marker, "n": 1})
        state, deadline = {}, time.monotonic() + 15
        sock.settimeout(5)
        while not (state.get(marker, {}).get("n") == 1
                   and state.get(f"{prefix}-999", {}).get("n") == 7):
            assert time.monotonic() < deadline, "the listener never caught up"
            try:
                opcode, payload = read_frame(sock)
            except (ConnectionError, socket.timeout):
                return  # closing a listener that fell behind is allowed too
            if opcode == 8:
                return
            if opcode != 1:
                continue
            message = json.loads(payload)
            if message["type"] == "snapshot":
                state = dict(message["tasks"])
            elif message["type"] == "update":
                state.update(message["tasks"])
            else:
                for task_id in message["ids"]:
                    state.pop(task_id, None)


# --- Pings, and listeners that leave -----------------------------------------------------


def test_ws_answers_client_ping_with_pong(shared_server):
    with open_listener(shared_server) as ws:
        ws.recv(timeout=3)
        assert ws.ping().wait(2)


def test_listener_that_never_answers_pings_is_disconnected(quick_timeouts_server):
    with raw_connection(quick_timeouts_server) as (sock, reader):
        sock.sendall(WS_HANDSHAKE)
        assert read_response(reader, head_only=True)[0] == 101
        # Read frames (the snapshot, then pings) but never answer one.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not sock.recv(4096):
                    break
            except ConnectionResetError:
                break
        else:
            pytest.fail("a listener that never answered a ping was not disconnected")


def test_listener_that_answers_pings_stays_connected(quick_timeouts_server):
    with open_listener(quick_timeouts_server) as ws:  # the websockets client answers pings
        ws.recv(timeout=3)
        time.sleep(0.6)  # twice the ping timeout: the point is that nothing happens
        post(quick_timeouts_server, {"task_id": new_id("alive"), "n": 1})
        assert json.loads(ws.recv(timeout=3))["type"] == "update"


def test_ws_listener_that_closes_is_forgotten_by_the_server():
    with running_server() as server:
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            assert on_server_loop(server, lambda: len(server.app.hub.listeners)) == 1
        wait_for(lambda: on_server_loop(server, lambda: len(server.app.hub.listeners)) == 0, 3,
                 message="the listener to be dropped")


# --- Shutdown ----------------------------------------------------------------------------


def test_graceful_stop_sends_listeners_close_frame_1001():
    server = ServerThread().start()
    try:
        with open_listener(server) as ws:
            ws.recv(timeout=3)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 3
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=3)
    finally:
        server.stop()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
