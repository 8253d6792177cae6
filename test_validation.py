"""POST /progress: what it refuses, how the refusal reads, and that a refusal stores nothing.

Each rule is checked through a shared real server (conftest.shared_server), with task ids
of its own, so that the status, the JSON error and the field it names are what a sender
sees; `validate_update`, the pure core, is checked directly for the messages' wording.
"""

import json
import re

import pytest

import progressista
from conftest import get_task, http, new_id, post

pytestmark = pytest.mark.timeout(60)


# --- Bodies that are not JSON updates ----------------------------------------------------


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"task_id": "x",}', b"\xff\xfe"],
                         ids=["broken", "empty", "trailing-comma", "not-utf8"])
def test_malformed_json_is_400(shared_server, raw):
    status, body, _ = post(shared_server, raw)
    assert status == 400 and "JSON" in body["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_is_400(shared_server, literal):
    task_id = new_id()
    status, body, _ = post(shared_server, f'{{"task_id": "{task_id}", "n": {literal}}}'.encode())
    assert status == 400 and body["error"]
    assert get_task(shared_server, task_id)[0] == 404


@pytest.mark.parametrize("field", ["n", "total", "rate", "elapsed", "timestamp"])
def test_number_overflowing_to_infinity_is_400_naming_the_field(shared_server, field):
    task_id = new_id()
    status, body, _ = post(shared_server, f'{{"task_id": "{task_id}", "{field}": 1e999}}'.encode())
    assert status == 400
    assert field in body["error"]


def test_overflowing_number_in_meta_is_400(shared_server):
    status, body, _ = post(shared_server, b'{"task_id": "m", "meta": {"big": 1e999}}')
    assert status == 400 and "meta" in body["error"]


@pytest.mark.parametrize("field", ["n", "total", "elapsed", "timestamp", "unit_divisor"])
def test_integer_too_big_for_a_float_is_400_naming_the_field(shared_server, field):
    huge = "1" + "0" * 400  # a valid JSON integer beyond float range
    raw = f'{{"task_id": "{new_id()}", "{field}": {huge}}}'.encode()
    status, body, _ = post(shared_server, raw)
    assert status == 400, body
    assert field in body["error"]


def test_deeply_nested_json_is_400(shared_server):
    status, body, _ = post(shared_server, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"]


@pytest.mark.parametrize("raw", [b"42", b'"text"', b"null", b"true"])
def test_body_that_is_neither_object_nor_array_is_400(shared_server, raw):
    assert post(shared_server, raw)[0] == 400


@pytest.mark.parametrize("field, update", [
    ("task_id", {"task_id": "x\ud800"}),
    ("desc", {"task_id": "lone", "desc": "a\udc00b"}),
    ("meta.host", {"task_id": "lone", "meta": {"host": "\ud800"}}),
    ("meta", {"task_id": "lone", "meta": {"\udfff": 1}}),
], ids=["task_id", "desc", "meta-value", "meta-key"])
def test_lone_surrogate_is_400_naming_the_field(shared_server, field, update):
    body = json.dumps(update).encode()  # ASCII, with the surrogate as a \\u escape
    status, answer, _ = http("POST", shared_server.url + "/progress", body)
    assert status == 400
    assert answer["error"].startswith(field + ": must be valid Unicode")


# --- Field rules -------------------------------------------------------------------------


BAD_FIELDS = [
    ("n-string", {"n": "5"}, "n"),
    ("n-bool", {"n": True}, "n"),
    ("n-negative", {"n": -1}, "n"),
    ("n-null", {"n": None}, "n"),
    ("total-negative", {"total": -3}, "total"),
    ("total-bool", {"total": False}, "total"),
    ("total-string", {"total": "10"}, "total"),
    ("desc-1001", {"desc": "d" * 1001}, "desc"),
    ("desc-number", {"desc": 7}, "desc"),
    ("unit-33", {"unit": "u" * 33}, "unit"),
    ("unit-number", {"unit": 1}, "unit"),
    ("unit_scale-string", {"unit_scale": "yes"}, "unit_scale"),
    ("unit_divisor-zero", {"unit_divisor": 0}, "unit_divisor"),
    ("unit_divisor-bool", {"unit_divisor": True}, "unit_divisor"),
    ("rate-string", {"rate": "fast"}, "rate"),
    ("elapsed-negative", {"elapsed": -0.5}, "elapsed"),
    ("postfix-1001", {"postfix": "p" * 1001}, "postfix"),
    ("postfix-object", {"postfix": {"loss": 1}}, "postfix"),
    ("error-2001", {"status": "error", "error": "e" * 2001}, "error"),
    ("status-unknown", {"status": "done"}, "status"),
    ("status-number", {"status": 1}, "status"),
    ("status-stale", {"status": "stale"}, "status"),
    ("meta-list", {"meta": [1, 2]}, "meta"),
    ("meta-string", {"meta": "job=1"}, "meta"),
    ("meta-nested-object", {"meta": {"a": {"b": 1}}}, "meta"),
    ("meta-list-value", {"meta": {"a": [1]}}, "meta"),
    ("meta-over-4KiB", {"meta": {"a": "x" * progressista.MAX_META_BYTES}}, "meta"),
    ("seq-fraction", {"seq": 1.5}, "seq"),
    ("seq-string", {"seq": "3"}, "seq"),
    ("seq-bool", {"seq": True}, "seq"),
    ("timestamp-string", {"timestamp": "now"}, "timestamp"),
]


@pytest.mark.parametrize("fields, named", [case[1:] for case in BAD_FIELDS],
                         ids=[case[0] for case in BAD_FIELDS])
def test_bad_field_is_400_naming_the_field(shared_server, fields, named):
    status, body, headers = post(shared_server, {"task_id": new_id(), **fields})
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert re.match(rf"{named}\b", body["error"]), body["error"]


@pytest.mark.parametrize("task_id", [None, "", "x" * 257, 42, ["a"]],
                         ids=["missing", "empty", "257-chars", "number", "list"])
def test_bad_task_id_is_400_naming_task_id(shared_server, task_id):
    update = {"n": 1} if task_id is None else {"task_id": task_id, "n": 1}
    status, body, _ = post(shared_server, update)
    assert status == 400
    assert "task_id" in body["error"]


def test_boundary_lengths_are_accepted(shared_server):
    meta_value = "x" * (progressista.MAX_META_BYTES - len('{"a":""}'))
    task_id = "i" * 255 + new_id()[:1]  # 256 characters
    update = {"task_id": task_id, "desc": "d" * 1000, "unit": "u" * 32,
              "postfix": "p" * 1000, "error": "e" * 2000, "meta": {"a": meta_value}}
    assert post(shared_server, update)[0] == 200
    assert get_task(shared_server, task_id)[1]["desc"] == "d" * 1000


def test_validate_update_names_batch_index_in_error():
    with pytest.raises(progressista.InvalidUpdate) as error:
        progressista.validate_update({"task_id": "a", "n": -1}, 3)
    answered = progressista.as_http_error(error.value)
    assert answered.status == 400
    assert answered.message.startswith("tasks[3].n")


@pytest.mark.parametrize("body, message", [
    ([1], "tasks[0]: each update must be a JSON object"),
    ([{"task_id": "a", "timestamp": float("inf")}],
     "tasks[0].timestamp: must be a finite number, not inf"),
])
def test_errors_for_a_non_object_and_a_non_finite_timestamp_read_cleanly(body, message):
    with pytest.raises(progressista.InvalidUpdate) as refused:
        progressista.validate_update(body[0], 0)
    assert str(refused.value) == message


# --- A refused update changes nothing ----------------------------------------------------


def test_rejected_update_stores_nothing(shared_server):
    task_id = new_id()
    assert post(shared_server, {"task_id": task_id, "desc": "ok", "n": -1})[0] == 400
    assert get_task(shared_server, task_id)[0] == 404


def test_rejected_update_leaves_existing_task_unchanged(shared_server):
    task_id = new_id()
    post(shared_server, {"task_id": task_id, "n": 1, "desc": "before"})
    post(shared_server, {"task_id": task_id, "n": 2, "desc": "after", "total": -1})
    task = get_task(shared_server, task_id)[1]
    assert (task["n"], task["desc"]) == (1, "before")


# --- Batches -----------------------------------------------------------------------------


def test_batch_error_names_index_and_field(shared_server):
    batch = [{"task_id": new_id(), "n": 1} for _ in range(5)]
    batch[3]["n"] = "three"
    status, body, _ = post(shared_server, batch)
    assert status == 400
    assert "tasks[3].n" in body["error"]


def test_batch_element_that_is_not_an_object_is_named_by_index(shared_server):
    status, body, _ = post(shared_server, [{"task_id": new_id()}, "oops"])
    assert status == 400
    assert "tasks[1]" in body["error"]


def test_batch_of_1000_with_one_bad_element_stores_nothing(shared_server):
    prefix = new_id("batch")
    batch = [{"task_id": f"{prefix}-{i}", "n": i} for i in range(1000)]
    batch[617]["total"] = -1
    status, body, _ = post(shared_server, batch)
    assert status == 400 and "tasks[617].total" in body["error"]
    stored = http("GET", shared_server.url + "/tasks")[1]["tasks"]
    assert not [task_id for task_id in stored if task_id.startswith(prefix)]


def test_batch_of_1000_updates_is_accepted(shared_server):
    prefix = new_id("batch")
    batch = [{"task_id": f"{prefix}-{i}", "n": i} for i in range(1000)]
    status, body, _ = post(shared_server, batch)
    assert (status, body) == (200, {"ok": True, "accepted": 1000})
    assert get_task(shared_server, f"{prefix}-999")[1]["n"] == 999


def test_batch_of_1001_updates_is_refused_and_stores_nothing(shared_server):
    prefix = new_id("batch")
    status, body, _ = post(shared_server, [{"task_id": f"{prefix}-{i}"} for i in range(1001)])
    assert status in (400, 413) and "1000" in body["error"]
    assert get_task(shared_server, f"{prefix}-0")[0] == 404
