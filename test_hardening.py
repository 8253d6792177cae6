"""The holes an outside attack found (issue 13, "What to build" 4), one test each.

Parser rules are checked on `parse_head()` directly (bytes in, a Request or a 400 out) and
differentially against `h11` over generated heads; what only a connection shows (a
smuggled second request, back-pressure, /ws listeners that never read) runs against a
real server on an ephemeral 127.0.0.1 port with raw sockets, so that each test sends
exactly the bytes of the attack.
"""

import json
import logging
import random
import socket
import sqlite3
import threading

import h11
import pytest

import progressista
from conftest import QuietHandler, http, http_server_thread, running_server, send_body, wait_for


# --- Helpers ---------------------------------------------------------------------------


def exchange(server, data, timeout=5.0):
    """Send raw bytes, read until the server closes or goes quiet; return all it sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return received


def statuses(raw):
    """The status codes of the HTTP responses in `raw`, in order."""
    return [int(line.split(b" ")[1]) for line in raw.split(b"\r\n")
            if line.startswith(b"HTTP/1.1 ")]


def parse_refused(head):
    """The HTTPError parse_head() raises for `head`, or None when it accepts it."""
    try:
        progressista.parse_head(head)
    except progressista.HTTPError as error:
        return error
    return None


# --- Request smuggling: what a head may carry ---------------------------------------------


@pytest.mark.parametrize("value", [b"a\nContent-Length: 43", b"a\rb", b"a\x00b", b"a\x01b",
                                   b"a\x7fb", b"a\x1bb"],
                         ids=["LF", "CR", "NUL", "SOH", "DEL", "ESC"])
def test_control_byte_in_a_field_value_is_400(value):
    error = parse_refused(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + value)
    assert error is not None and error.status == 400


def test_tab_and_8_bit_bytes_in_a_field_value_are_accepted():
    request = progressista.parse_head(b"GET /health HTTP/1.1\r\nHost: h\r\nX-A: a\tb \xe9")
    assert request.headers["x-a"] == "a\tb \xe9"


@pytest.mark.parametrize("name", [b"X A", b"X\tA", b"X\x00A", b"X(A)", b"X\xe9"])
def test_space_control_or_separator_in_a_field_name_is_400(name):
    error = parse_refused(b"GET /health HTTP/1.1\r\nHost: h\r\n" + name + b": v")
    assert error is not None and error.status == 400


@pytest.mark.parametrize("target", [b"/health\x01", b"/h\x7fealth", b"/t\xe9sks", b"/a\tb"])
def test_control_or_8_bit_byte_in_the_target_is_400(target):
    error = parse_refused(b"GET " + target + b" HTTP/1.1\r\nHost: h")
    assert error is not None and error.status == 400


def test_http11_request_without_host_is_400_naming_host():
    error = parse_refused(b"GET /health HTTP/1.1\r\nX-A: b")
    assert error is not None and error.status == 400 and "Host" in error.message


def test_http10_request_without_host_is_accepted():
    assert progressista.parse_head(b"GET /health HTTP/1.0").path == "/health"


@pytest.mark.parametrize("second", [b"127.0.0.1", b"evil.example"])
def test_two_host_lines_are_400(second):
    error = parse_refused(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: " + second)
    assert error is not None and error.status == 400


def test_obsolete_line_folding_is_400():
    error = parse_refused(b"GET /health HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b")
    assert error is not None and error.status == 400


def test_bare_lf_in_a_header_does_not_smuggle_a_hidden_delete():
    with running_server() as server:
        assert http("POST", server.url + "/progress", {"task_id": "kept"})[0] == 200
        hidden = b"DELETE /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        attack = (b"POST /progress HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\nContent-Length: "
                  + str(len(hidden)).encode() + b"\r\nContent-Length: 0\r\n\r\n" + hidden)
        answered = statuses(exchange(server, attack))
        assert answered == [400]
        assert http("GET", server.url + "/tasks/kept")[0] == 200


def test_http10_request_gets_no_100_continue():
    with running_server() as server:
        body = json.dumps({"task_id": "old"}).encode()
        head = (b"POST /progress HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                % len(body))
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head)
            sock.settimeout(0.5)  # a 100 would come at once; none may come at all
            with pytest.raises(socket.timeout):
                sock.recv(100)
            sock.settimeout(5)
            sock.sendall(body)
            answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")


def test_refused_ws_handshake_with_a_body_never_runs_the_body_as_a_request():
    with running_server(api_tokens=("secret",)) as server:
        assert http("POST", server.url + "/progress", {"task_id": "kept"},
                    headers={"Authorization": "Bearer secret"})[0] == 200
        hidden = b"DELETE /tasks?token=secret HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        attack = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\nContent-Length: "
                  + str(len(hidden)).encode() + b"\r\n\r\n" + hidden)
        answered = statuses(exchange(server, attack))
        assert answered and answered[0] in (400, 401) and len(answered) == 1
        assert http("GET", server.url + "/tasks/kept?token=secret")[0] == 200


# --- Content-Length ----------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["\u00b2", "\u0663", "1" * 4301, "+5", "-1", "5 5", "0x10",
                                      "1" * 21])
def test_content_length_that_is_not_plain_ascii_digits_is_400(declared):
    request = progressista.parse_head(
        b"POST /progress HTTP/1.1\r\nHost: h\r\nContent-Length: " + declared.encode("utf-8"))
    with pytest.raises(progressista.HTTPError) as refused:
        progressista.body_length(request, progressista.MAX_BODY_BYTES)
    assert refused.value.status == 400 and "Content-Length" in refused.value.message


def test_superscript_content_length_is_answered_400_not_dropped(caplog):
    with running_server() as server, caplog.at_level(logging.ERROR, "progressista"):
        raw = exchange(server, b"POST /progress HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Length: \xc2\xb2\r\n\r\n{}")
        assert statuses(raw) == [400]
        raw = exchange(server, b"POST /progress HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Length: " + b"9" * 4400 + b"\r\n\r\n{}")
        assert statuses(raw) == [400]
    assert not [record for record in caplog.records if record.exc_info]


# --- The parser against h11 ---------------------------------------------------------------

# Pieces both parsers must agree on. Left out on purpose (each has its own test above):
# bare LF (h11 takes it as a line end, which is the smuggling this server refuses),
# controls other than NUL/CR/TAB in values (h11 lets them through; we refuse), obs-fold
# (h11 unfolds; we refuse), lower-case or non-letter methods, HTTP versions other than
# 1.0/1.1 and Transfer-Encoding (answered 411 here).
GOOD_NAMES = ["Host", "host", "X-A", "Content-Length", "Accept", "X_B", "X:Y", "X-\"q\""]
BAD_NAMES = ["X A", "", "X\x00", "X\r", "X\xe9"]
GOOD_VALUES = ["127.0.0.1", "a b", "\tpadded\t", " ", "", "\xe9\xff", "5", "05", "a\tb",
               "x" * 30]
BAD_VALUES = ["v\x00", "v\rw", "5, 6", "\u00b2", "1" * 22]
GOOD_TARGETS = ["/health", "/tasks?x=1", "*", "/a%00b", "http://h/p"]
BAD_TARGETS = ["/a\xe9", "/a\x00", "/a b", "/\x7f"]


def generated_heads(count, seed):
    rng = random.Random(seed)

    def pick(good, bad):
        return rng.choice(good if rng.random() < 0.9 else bad)

    for _ in range(count):
        method = rng.choice(["GET", "POST", "DELETE"])
        version = rng.choice(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])
        lines = [f"{method} {pick(GOOD_TARGETS, BAD_TARGETS)} {version}"]
        if rng.random() < 0.8:
            lines.append("Host: 127.0.0.1:8000")
        for _ in range(rng.randrange(0, 4)):
            lines.append(f"{pick(GOOD_NAMES, BAD_NAMES)}:{rng.choice(['', ' ', '  ', chr(9)])}"
                         f"{pick(GOOD_VALUES, BAD_VALUES)}")
        yield "\r\n".join(lines).encode("latin-1")


def h11_verdict(head):
    """h11's reading of `head`: (method, target, [(name, value)]) or None (refused)."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head + b"\r\n\r\n")
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    headers = [(name.decode("latin-1"), value.decode("latin-1"))
               for name, value in event.headers]
    return event.method.decode(), event.target.decode("latin-1"), headers


def our_verdict(head):
    try:
        request = progressista.parse_head(head)
        progressista.body_length(request, 1 << 70)  # framing errors are parse errors too
    except progressista.HTTPError as error:
        if error.status == 411:  # a POST without a length: well formed, just unwelcome
            return "411"
        return None
    return request


def test_parse_head_agrees_with_h11_on_generated_heads():
    disagreements = []
    for head in generated_heads(3000, seed=13):
        theirs, ours = h11_verdict(head), our_verdict(head)
        if ours == "411":
            continue
        if (theirs is None) != (ours is None):
            disagreements.append((head, "h11 refused" if theirs is None else "h11 accepted"))
            continue
        if ours is None:
            continue
        method, target, headers = theirs
        expected = {}
        for name, value in headers:
            if name in expected and name not in ("content-length",):
                expected[name] += ", " + value
            else:
                expected[name] = value
        # An absolute-form target is routed by its path, as RFC 9112 3.2.2 says.
        target = progressista.Request(method, target, "HTTP/1.1", {}).target
        if (ours.method, ours.target, ours.headers) != (method, target, expected):
            disagreements.append((head, "read differently"))
    assert not disagreements, disagreements[:5]


def test_generated_heads_include_both_verdicts():
    # The differential test means something only if both parsers accept some heads and
    # refuse others.
    verdicts = [h11_verdict(head) is None for head in generated_heads(3000, seed=13)]
    assert 300 < sum(verdicts) < 2700


# --- seq is bounded ------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [2**63, -1, int("9" * 4300)])
def test_seq_out_of_range_is_400_naming_seq(seq):
    with pytest.raises(progressista.InvalidUpdate, match=r"^seq: .*2\*\*63|^seq: .*9223372"):
        progressista.validate_update({"task_id": "a", "seq": seq})


def test_largest_seq_is_accepted_over_http():
    with running_server() as server:
        body = json.dumps({"task_id": "big", "seq": 2**63 - 1}).encode()
        assert http("POST", server.url + "/progress", body)[0] == 200
        status, answer, _ = http("POST", server.url + "/progress",
                                 json.dumps([{"task_id": "x", "seq": 2**63}]).encode())
        assert status == 400 and answer["error"].startswith("tasks[0].seq:")


# --- What the stores hand back is checked like input ------------------------------------


def test_bad_sqlite_rows_are_skipped_and_logged_and_the_rest_load(tmp_path, caplog):
    path = str(tmp_path / "tasks.db")
    with running_server(store="sqlite://" + path) as server:
        assert http("POST", server.url + "/progress", {"task_id": "good"})[0] == 200
    bad_rows = {"not-json": "{nope", "bad-status": json.dumps({"task_id": "bad-status",
                                                                 "status": "bogus"}),
                "bad-n": json.dumps({"task_id": "bad-n", "n": "many"}),
                "huge-seq": json.dumps({"task_id": "huge-seq", "seq": 10**30}),
                "array": "[1, 2]"}
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO tasks VALUES (?, ?, 0)", list(bad_rows.items()))
    with caplog.at_level(logging.WARNING, "progressista"), \
            running_server(store="sqlite://" + path) as server:
        assert list(http("GET", server.url + "/tasks")[1]["tasks"]) == ["good"]
        assert http("GET", server.url + "/health")[0] == 200
        assert http("GET", server.url + "/metrics")[0] == 200
    skipped = [record for record in caplog.records if "skipping" in record.getMessage()]
    assert len(skipped) == len(bad_rows)
    assert not [record for record in caplog.records if record.exc_info]


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


def test_hostile_publish_on_redis_is_skipped_and_the_servers_keep_mirroring(redis_url,
                                                                            caplog):
    import redis

    with caplog.at_level(logging.WARNING, "progressista"), \
            running_server(store=redis_url) as one, running_server(store=redis_url) as two:
        hostile = redis.Redis.from_url(redis_url)
        wait_for(lambda: dict(hostile.pubsub_numsub("progressista:events")).get(
            b"progressista:events") == 2, message="both servers to subscribe")
        for message in ["{nope", "[]", '{"changed": 5}', '{"changed": [{"task_id": "evil", '
                        '"status": "bogus"}]}', '{"changed": [{"task_id": "evil2", '
                        '"n": -1}], "removed": [3]}', '{"changed": [7]}']:
            hostile.publish("progressista:events", message)
        hostile.close()
        assert http("POST", one.url + "/progress", {"task_id": "after", "n": 3})[0] == 200
        wait_for(lambda: "after" in http("GET", two.url + "/tasks")[1]["tasks"],
                 message="the other server to mirror a good update after the hostile ones")
        assert set(http("GET", two.url + "/tasks")[1]["tasks"]) == {"after"}
        assert http("GET", two.url + "/health")[1]["status"] == "ok"
        assert http("GET", two.url + "/metrics")[0] == 200
        # One line per hostile message and server, whichever way each message is bad.
        wait_for(lambda: sum("skipping" in record.getMessage()
                             for record in caplog.records) == 2 * 6,
                 message="each server to log each hostile message once")
    assert not [record for record in caplog.records if record.exc_info]


def test_bad_task_stored_in_redis_is_skipped_at_resync(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.zadd("progressista:tasks", {"evil": 1, "good": 2})
    client.hset("progressista:task:evil", mapping={"seq": "", "task": json.dumps(
        {"task_id": "evil", "status": "bogus"})})
    client.hset("progressista:task:good", mapping={"seq": "", "task": json.dumps(
        {"task_id": "good", "created_at": 2.0, "updated_at": 2.0})})
    client.close()
    with running_server(store=redis_url) as server:
        assert list(http("GET", server.url + "/tasks")[1]["tasks"]) == ["good"]
        assert http("GET", server.url + "/health")[1]["status"] == "ok"


def test_redis_compares_seqs_beyond_2_to_the_53_exactly(redis_url):
    with running_server(store=redis_url) as one:
        post = lambda seq, n: http("POST", one.url + "/progress",  # noqa: E731
                                   json.dumps({"task_id": "t", "seq": seq, "n": n}).encode())
        assert post(2**53, 1)[0] == 200
        assert post(2**53 + 1, 2)[0] == 200  # a double cannot tell these two apart
        assert post(2**53 - 1, 3)[0] == 200  # older: ignored
        assert post(2**63 - 1, 4)[0] == 200
        assert post(10**18, 5)[0] == 200  # fewer digits: older, ignored
    with running_server(store=redis_url) as fresh:  # what Redis itself holds
        task = http("GET", fresh.url + "/tasks/t")[1]
    assert (task["seq"], task["n"]) == (2**63 - 1, 4)


# --- Peers that send and never read --------------------------------------------------------


def test_unsent_watch_tells_a_slow_reader_from_one_that_stopped(monkeypatch):
    monkeypatch.setattr(progressista, "UNSENT_STALL_TIMEOUT_S", 10.0)
    watch = progressista.UnsentWatch()
    assert not watch.stalled(0, 0.0)
    assert not watch.stalled(500, 1.0)  # bytes appear: the clock starts
    assert not watch.stalled(400, 9.0)  # it read some: the clock starts again
    assert not watch.stalled(900, 18.0)  # more queued, none read, 9 s on
    assert watch.stalled(900, 19.5)  # 10.5 s without reading a byte
    assert not watch.stalled(0, 20.0)  # all read: nothing to hold


def small_window_socket(server):
    """A connected socket whose receive window is tiny: what it does not read backs up."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    return sock


def send_what_fits(sock, data, timeout=2.0):
    """Send `data` until the server stops taking it (it paused reading) or all is sent."""
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
    except (socket.timeout, OSError):
        pass


def test_pipelined_requests_never_read_back_stop_being_answered_and_are_dropped(
        monkeypatch):
    monkeypatch.setattr(progressista, "UNSENT_STALL_TIMEOUT_S", 0.3)
    with running_server() as server:
        page_bytes = len(server.app.api.page)
        sock = small_window_socket(server)
        try:
            send_what_fits(sock, b"GET /static/index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                           * 2000)
            connection = wait_for(lambda: next(iter(server.app.connections), None))
            peak = 0

            def dropped():
                nonlocal peak
                transport = connection.transport
                if transport is None:
                    return True
                peak = max(peak, transport.get_write_buffer_size())
                return False

            wait_for(dropped, timeout=10, message="the server to drop the non-reader")
        finally:
            sock.close()
        # Before the fix: 2,000 pages (over 100 MB) queued for a peer that reads nothing.
        assert peak <= progressista.HTTP_UNSENT_HIGH_BYTES + page_bytes
        assert http("GET", server.url + "/health")[0] == 200


def test_pipelined_requests_are_all_answered_to_a_client_that_reads_late():
    # Back-pressure pauses reading; once the client reads, every request is answered.
    count = 200  # about 11 MB of pages: many pauses and resumes
    with running_server() as server:
        sock = small_window_socket(server)
        try:
            sent = threading.Thread(target=sock.sendall, args=(
                b"GET /static/index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * count,))
            sent.start()
            connection = wait_for(lambda: next(iter(server.app.connections), None))
            wait_for(lambda: connection.writing_paused, message="the server to pause")
            sock.settimeout(10)
            reader = sock.makefile("rb")
            for _ in range(count):
                assert reader.readline().startswith(b"HTTP/1.1 200")
                length = None
                while True:
                    line = reader.readline()
                    if line == b"\r\n":
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                assert len(reader.read(length)) == length
            sent.join(10)
            reader.close()
        finally:
            sock.close()


def ws_handshake(sock):
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")


def client_frame(opcode, payload=b""):
    """A masked client frame (a zero mask: the payload goes as it is)."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


def fill_store(server, tasks=6000):
    for start in range(0, tasks, 1000):
        batch = [{"task_id": f"t{index}", "desc": "d" * 1000}
                 for index in range(start, start + 1000)]
        assert http("POST", server.url + "/progress", json.dumps(batch).encode())[0] == 200


def test_listener_that_never_reads_but_sends_pongs_is_closed(monkeypatch):
    monkeypatch.setattr(progressista, "UNSENT_STALL_TIMEOUT_S", 0.3)
    with running_server() as server:
        fill_store(server)  # a snapshot of about 6 MB: more than the kernel buffers hold
        sock = small_window_socket(server)
        try:
            ws_handshake(sock)
            wait_for(lambda: len(server.app.hub) == 1)

            def closed():
                try:
                    sock.sendall(client_frame(0xA))  # an unsolicited pong: "I am alive"
                except OSError:
                    return True
                return len(server.app.hub) == 0

            wait_for(closed, timeout=10, interval=0.05,
                     message="the non-reading listener to be closed")
        finally:
            sock.close()


def server_frame(reader):
    """(opcode, payload) of the next frame the server sends (servers do not mask)."""
    first, second = reader.read(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(reader.read(2), "big")
    elif length == 127:
        length = int.from_bytes(reader.read(8), "big")
    return first & 0x0F, reader.read(length)


def frames_until(reader, opcode):
    while True:
        kind, payload = server_frame(reader)
        if kind == opcode:
            return payload


def test_only_the_pong_that_answers_our_ping_counts():
    with running_server() as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        reader = sock.makefile("rb")
        try:
            ws_handshake(sock)
            listener = wait_for(lambda: next(iter(server.app.hub.listeners), None))
            server.loop.call_soon_threadsafe(listener.expire, listener.last_ping_at + 1e6)
            ours = frames_until(reader, 0x9)
            # A pong that answers nothing, then a ping of ours: its pong proves the server
            # has read the first one.
            sock.sendall(client_frame(0xA, b"nope") + client_frame(0x9, b"sync1"))
            assert frames_until(reader, 0xA) == b"sync1"
            assert listener.ping_sent_at is not None
            sock.sendall(client_frame(0xA, ours) + client_frame(0x9, b"sync2"))
            assert frames_until(reader, 0xA) == b"sync2"
            assert listener.ping_sent_at is None
        finally:
            reader.close()
            sock.close()


def test_ping_flood_from_a_non_reader_is_cut_at_a_byte_cap(monkeypatch):
    monkeypatch.setattr(progressista, "LISTENER_BUFFER_HIGH_BYTES", 64 * 1024)
    monkeypatch.setattr(progressista, "LISTENER_PONG_BACKLOG_BYTES", 64 * 1024)
    with running_server() as server:
        sock = small_window_socket(server)
        try:
            ws_handshake(sock)
            wait_for(lambda: len(server.app.hub) == 1)
            batch = client_frame(0x9, b"p" * 125) * 1000
            sent = 0
            sock.settimeout(2)
            while sent < 64 << 20 and len(server.app.hub):
                try:
                    sock.sendall(batch)
                except (OSError, socket.timeout):
                    break
                sent += len(batch)
            wait_for(lambda: len(server.app.hub) == 0, message="the ping flooder to be cut")
        finally:
            sock.close()
        assert sent < 64 << 20


# --- What watch prints and what the log writes -------------------------------------------


def test_watch_escapes_a_hostile_close_reason():
    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    error = ConnectionClosedError(Close(1008, "bye\x1b[2J\x1b]0;owned\x07"), None)
    reason = progressista._connection_reason(error)
    assert "\x1b" not in reason and "\x07" not in reason and "bye" in reason


def watch_through_a_redirect(command, scheme, path):
    """Run `progressista watch` with a token (`command` its subcommand and flags) against a
    server that redirects to another one at `scheme`://host:port`path`; return its exit
    status and each request the two servers saw, as (path, Authorization)."""
    seen = []

    class Recorder(QuietHandler):
        protocol_version = "HTTP/1.1"  # a WebSocket client refuses an HTTP/1.0 answer
        location = None

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.location:
                send_body(self, status=302, headers=[("Location", self.location),
                                                     ("Connection", "close")])
            else:
                send_body(self, b'{"tasks": {}, "now": 1}', headers=[("Connection", "close")])

    with http_server_thread(Recorder) as elsewhere:
        class Redirector(Recorder):
            location = f"{scheme}://{elsewhere.split('://', 1)[1]}{path}"

        with http_server_thread(Redirector) as redirector:
            status = progressista.main([*command, "--server", redirector, "--token", "s3cret"])
    return status, seen


def test_watch_once_follows_no_redirect_and_sends_the_token_nowhere_else(capsys):
    status, seen = watch_through_a_redirect(["watch", "--once"], "http", "/tasks")
    assert status == 1
    assert seen == [("/tasks", "Bearer s3cret")]  # the redirector only
    error = capsys.readouterr().err
    assert error.count("302") == 1 and "not followed" in error


def test_debug_log_masks_every_token_spelling_and_escapes_control_bytes(caplog):
    targets = ["/tasks?a=1;token=SECRET1", "/tasks#token=SECRET2", "/tasks?TOKEN=SECRET3",
               "/tasks?%74oken=SECRET4", "/tasks?api_token=SECRET5", "/tasks?x=%1b[31mred",
               "/tasks?%2574oken=SECRET6"]
    with caplog.at_level(logging.DEBUG, "progressista"), running_server() as server:
        for target in targets:
            answer = exchange(server, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      "Connection: close\r\n\r\n".encode())
            assert statuses(answer)
        wait_for(lambda: sum(record.getMessage().startswith("GET /tasks")
                             for record in caplog.records) == len(targets))
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "SECRET" not in logged
    assert "\x1b" not in logged and "\\x1b[31mred" in logged


@pytest.mark.timeout(20)
def test_live_watch_follows_no_redirect_either(capsys):
    status, seen = watch_through_a_redirect(["watch"], "ws", "/ws")
    assert status == 1
    assert seen == [("/ws", "Bearer s3cret")]  # the redirector only
    error = capsys.readouterr().err
    assert error.count("302") == 1 and "not followed" in error
