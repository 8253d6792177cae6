"""The HTTP/1.1 layer: connections, request framing, limits, deadlines, malformed requests.

Requests go out byte by byte on raw sockets (conftest.raw_connection, request_bytes,
read_response) or through http.client, to a real server on a loopback port; deadlines are
checked on a server whose timeouts are shortened to tenths of a second
(`quick_timeouts_server`), so that nothing waits for seconds.
"""

from http.client import HTTPConnection
import json
import socket
import time

import pytest

import progressista
from conftest import (closed_by_server, get_task, http, new_id, post, raw_connection,
                      port_is_free, read_response, request_bytes, running_server,
                      wait_for)

pytestmark = pytest.mark.timeout(60)


# --- Connections: keep-alive, pipelining, close ------------------------------------------


def test_keep_alive_serves_several_requests_on_one_socket(shared_server):
    conn = HTTPConnection("127.0.0.1", shared_server.port, timeout=5)
    task_id = new_id()
    conn.request("GET", "/health")
    conn.getresponse().read()
    sock = conn.sock
    local = sock.getsockname()
    for n in range(3):
        conn.request("POST", "/progress", json.dumps({"task_id": task_id, "n": n}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and not response.will_close
        response.read()
    conn.request("GET", "/tasks/" + task_id)
    assert json.loads(conn.getresponse().read())["n"] == 2
    assert conn.sock is sock and sock.getsockname() == local
    conn.close()


def test_connection_close_request_is_answered_then_closed(shared_server):
    with raw_connection(shared_server, timeout=3) as (sock, reader):
        sock.sendall(request_bytes("GET", "/health", headers=[("Connection", "close")]))
        status, _, _ = read_response(reader)
        assert status == 200
        assert closed_by_server(reader)


def test_pipelined_requests_are_answered_in_order(shared_server):
    task_id = new_id()
    body = json.dumps({"task_id": task_id, "n": 11}).encode()
    requests = (request_bytes("GET", "/health")
                + request_bytes("POST", "/progress", body, [("Content-Type", "application/json")])
                + request_bytes("GET", "/tasks/" + task_id)
                + request_bytes("GET", "/nowhere"))
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(requests)
        answers = [read_response(reader) for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 404]
    assert json.loads(answers[0][2])["status"] == "ok"
    assert json.loads(answers[2][2])["n"] == 11


def test_nothing_pipelined_behind_connection_close_is_read_or_applied(shared_server):
    closing_id, behind_id = new_id(), new_id()
    requests = (request_bytes("POST", "/progress", json.dumps({"task_id": closing_id}).encode(),
                              [("Connection", "close")])
                + request_bytes("POST", "/progress", json.dumps({"task_id": behind_id}).encode()))
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(requests)
        status, _, _ = read_response(reader)
        assert status == 200 and closed_by_server(reader)
    assert get_task(shared_server, closing_id)[0] == 200
    assert get_task(shared_server, behind_id)[0] == 404  # never answered, so never stored


def test_http10_keep_alive_is_confirmed_in_the_answer(shared_server):
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        sock.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(reader)[0] == 200  # the same connection answers again


def test_head_answers_headers_without_body(shared_server):
    conn = HTTPConnection("127.0.0.1", shared_server.port, timeout=5)
    conn.request("HEAD", "/health")
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length")) > 0
    assert response.read() == b""
    conn.request("GET", "/health")  # the connection is still in step: no stray body
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.close()


def test_body_split_across_packets_is_reassembled(shared_server):
    task_id = new_id()
    body = json.dumps({"task_id": task_id, "n": 8}).encode()
    request = request_bytes("POST", "/progress", body, [("Content-Type", "application/json")])
    with raw_connection(shared_server) as (sock, reader):
        for i in range(0, len(request), 7):
            sock.sendall(request[i:i + 7])
            time.sleep(0.001)
        status, _, _ = read_response(reader)
    assert status == 200
    assert get_task(shared_server, task_id)[1]["n"] == 8


# --- Request framing: Content-Length, Expect, the request line ---------------------------


def test_expect_100_continue_gets_interim_response_before_body(shared_server):
    task_id = new_id()
    body = json.dumps({"task_id": task_id, "n": 5}).encode()
    head = request_bytes("POST", "/progress", headers=[
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("Expect", "100-continue")])
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(head)
        interim, _, _ = read_response(reader)
        sock.sendall(body)
        final, _, answer = read_response(reader)
    assert (interim, final) == (100, 200)
    assert json.loads(answer)["accepted"] == 1


def test_expect_100_continue_over_limit_is_413_without_continue(shared_server):
    head = request_bytes("POST", "/progress", headers=[
        ("Content-Length", str(progressista.MAX_BODY_BYTES * 2)), ("Expect", "100-continue")])
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(head)
        status, _, _ = read_response(reader)
    assert status == 413


def test_post_without_content_length_is_411(shared_server):
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 411 and "Content-Length" in json.loads(body)["error"]


def test_chunked_body_is_refused_with_a_clear_error(shared_server):
    with raw_connection(shared_server, timeout=3) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"f\r\n{\"task_id\":\"a\"}\r\n0\r\n\r\n")
        status, _, body = read_response(reader)
    assert status in (400, 411) and "Content-Length" in json.loads(body)["error"]


def test_conflicting_content_lengths_are_400_and_close_the_connection(shared_server):
    task_id = new_id()
    body = json.dumps({"task_id": task_id}).encode()
    request = (b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(body)) + body
    with raw_connection(shared_server, timeout=3) as (sock, reader):
        sock.sendall(request)
        status, _, _ = read_response(reader)
        assert status == 400
        assert closed_by_server(reader)  # no second, smuggled request is answered
    assert get_task(shared_server, task_id)[0] == 404


def test_absolute_form_request_target_is_routed_by_its_path(shared_server):
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_bare_lf_request_is_answered_400_at_once(shared_server):
    with raw_connection(shared_server, timeout=3) as (sock, reader):
        sock.sendall(b"GET /health HTTP/1.1\nHost: x\n\n")
        status, _, body = read_response(reader)
    assert status == 400 and "CRLF" in json.loads(body)["error"]


# --- Limits: body, headers, connections --------------------------------------------------


def test_body_over_default_limit_is_413_without_reading_it(shared_server):
    head = request_bytes("POST", "/progress", headers=[
        ("Content-Type", "application/json"),
        ("Content-Length", str(progressista.MAX_BODY_BYTES + 1))])
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(head)  # the body is never sent: the answer must not wait for it
        status, _, body = read_response(reader)
    assert status == 413
    assert json.loads(body)["error"]


def test_body_over_limit_sent_in_full_still_gets_413(shared_server):
    big = json.dumps([{"task_id": "x", "desc": "d" * 1000}] * 1100).encode()
    assert len(big) > progressista.MAX_BODY_BYTES
    status, body, _ = post(shared_server, big)
    assert status == 413 and body["error"]


def test_body_over_configured_max_body_bytes_is_413():
    with running_server(max_body_bytes=256) as server:
        task_id = new_id()
        status, body, _ = post(server, {"task_id": task_id, "desc": "d" * 400})
        assert status == 413 and body["error"]
        assert get_task(server, task_id)[0] == 404


def test_body_at_configured_max_body_bytes_is_accepted():
    with running_server(max_body_bytes=256) as server:
        raw = json.dumps({"task_id": new_id(), "desc": ""}).encode()
        raw = raw[:-2] + b"d" * (256 - len(raw)) + raw[-2:]
        assert len(raw) == 256
        assert post(server, raw)[0] == 200


def test_oversized_headers_are_431(shared_server):
    request = request_bytes("GET", "/health", headers=[("X-Padding", "p" * 20_000)])
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(request)
        status, _, body = read_response(reader)
    assert status == 431
    assert json.loads(body)["error"]


def test_connections_past_the_descriptor_budget_are_refused_and_others_served():
    with running_server() as server:
        server.app.max_connections = 2
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                for _ in range(2)]
        try:
            wait_for(lambda: len(server.app.connections) == 2, message="two connections")
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as third:
                try:
                    assert third.recv(1) == b""  # closed at once, unanswered
                except ConnectionResetError:
                    pass
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: len(server.app.connections) == 0, message="the sockets to close")
        assert http("GET", server.url + "/health")[0] == 200


# --- Malformed requests ------------------------------------------------------------------


def test_garbage_instead_of_request_line_is_400(shared_server):
    with raw_connection(shared_server) as (sock, reader):
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 400 and json.loads(body)["error"]


def test_garbage_request_line_connection_is_closed(shared_server):
    with raw_connection(shared_server, timeout=3) as (sock, reader):
        sock.sendall(b"hello there\r\n\r\n")
        read_response(reader)
        assert closed_by_server(reader)


def test_server_keeps_serving_others_after_garbage(shared_server):
    with raw_connection(shared_server) as (other, other_reader):  # opened before, used after
        with raw_connection(shared_server) as (bad, bad_reader):
            bad.sendall(b"\x00\xff" * 100 + b"\r\n\r\n")
            read_response(bad_reader)
        other.sendall(request_bytes("GET", "/health"))
        status, _, _ = read_response(other_reader)
    assert status == 200
    assert http("GET", shared_server.url + "/health")[0] == 200


# --- Deadlines (the timeouts shortened) --------------------------------------------------


def test_client_that_never_finishes_its_headers_is_disconnected(quick_timeouts_server):
    with raw_connection(quick_timeouts_server) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(reader)
    assert http("GET", quick_timeouts_server.url + "/health")[0] == 200


def test_client_that_never_finishes_its_body_is_disconnected(quick_timeouts_server):
    with raw_connection(quick_timeouts_server) as (sock, reader):
        sock.sendall(b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert closed_by_server(reader)


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(quick_timeouts_server):
    with raw_connection(quick_timeouts_server) as (sock, reader):
        sock.sendall(request_bytes("GET", "/health"))
        assert read_response(reader)[0] == 200
        assert closed_by_server(reader)


def trickle_until_closed(sock, first, byte, seconds=3.0):
    """Send `first`, then `byte` every 50 ms; True once the server has closed on us."""
    sock.settimeout(0.05)
    sock.sendall(first)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(byte)
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue  # nothing to read yet: keep trickling
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_client_trickling_its_headers_is_disconnected_at_the_header_deadline(quick_timeouts_server):
    with raw_connection(quick_timeouts_server) as (sock, _):
        assert trickle_until_closed(sock, b"GET /health HTTP/1.1\r\nX-Slow: ", b"a")


def test_client_trickling_its_body_is_disconnected_at_the_body_deadline(quick_timeouts_server):
    with raw_connection(quick_timeouts_server) as (sock, _):
        assert trickle_until_closed(
            sock, b"POST /progress HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n", b" ")


# --- Stopping ----------------------------------------------------------------------------


def test_stop_frees_the_port():
    with running_server() as server:
        port = server.port
        http("GET", server.url + "/health")
        assert not port_is_free(port)
    assert port_is_free(port)


def test_another_http_version_is_505_saying_which_this_server_speaks(memory_server):
    with raw_connection(memory_server) as (sock, reader):
        sock.sendall(b"GET /health HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 505
    assert json.loads(body)["error"].startswith("this server speaks HTTP/1.1")


def test_an_empty_host_header_is_400_not_a_host_to_allow(memory_server):
    with raw_connection(memory_server) as (sock, reader):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: \r\n\r\n")
        status, _, body = read_response(reader)
    assert status == 400 and "Host header is empty" in json.loads(body)["error"]


def test_a_head_parsed_again_gives_a_new_request_with_its_own_headers_and_query():
    # parse_head() remembers what it parsed; nothing a middleware changes may carry over.
    head = b"POST /progress?token=t&x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2"
    first = progressista.parse_head(head, peer=("10.0.0.1", 1))
    first.headers["host"] = "changed"
    first.query["x"] = "changed"
    first.body = b"{}"
    second = progressista.parse_head(head, peer=("10.0.0.2", 2))
    assert second is not first
    assert second.headers == {"host": "h", "content-length": "2"}
    assert second.query == {"token": "t", "x": "1"}
    assert (second.method, second.path, second.target, second.version, second.body,
            second.peer) == ("POST", "/progress", "/progress?token=t&x=1", "HTTP/1.1", b"",
                             ("10.0.0.2", 2))


def test_a_head_refused_once_is_refused_again():
    head = b"GET /health HTTP/1.1\r\nHost: h\r\nBad Header: x"
    for _ in range(2):
        with pytest.raises(progressista.HTTPError):
            progressista.parse_head(head)
