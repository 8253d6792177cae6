"""Request bodies decode the same with orjson as with the standard library alone.

`--json-parser` (auto, stdlib, orjson) chooses what decodes POST bodies; the answers must
not depend on it. Strategy: a differential test. `Request.json()` runs with and without
orjson's `loads` on a corpus of bodies (hand-written edge cases, generated JSON spelt in
every way the grammar allows and some it does not, and byte-level mutations of realistic
updates, all from fixed seeds), and each pair of outcomes must be equal: the same value
with the same types (int or float, -0.0, the order of keys) or the same 400 message. Then
two real servers, `--json-parser stdlib` and `--json-parser orjson`, are sent the same
bodies and must answer the same status and bytes and store the same tasks. Locally the
orjson tests skip when it is not installed; under CI (`CI` set) that fails.
"""

import codecs
import json
import random
import subprocess
import sys

import pytest

import progressista
from conftest import (PROGRAM, clean_env, cli_server, http, missing, raw_connection,
                      read_response, request_bytes, run_cli)

try:
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None


@pytest.fixture
def orjson_loads():
    if orjson is None:
        missing("orjson is not installed (pip install -e '.[test]')")
    return orjson.loads


# --- Outcomes ----------------------------------------------------------------------------


class _Key(str):
    """A dict key in typed()'s flat token list."""


def typed(value):
    """`value` as a flat list of (type, value) tokens: equal only for equal JSON values of
    equal types (1 and 1.0 differ, as do 0.0 and -0.0), keys in their order. Iterative, so
    a value nested a thousand deep needs no recursion."""
    tokens, stack = [], [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is _Key:
            tokens.append(("key", str(item)))
        elif kind is dict:
            tokens.append(("dict", len(item)))
            for key, child in reversed(list(item.items())):
                stack += [child, _Key(key)]
        elif kind is list:
            tokens.append(("list", len(item)))
            stack += reversed(item)
        elif kind is float:
            tokens.append(("float", item.hex()))  # "-0x0.0p+0", "inf": exact
        else:
            tokens.append((kind.__name__, item))  # str, int, bool, None
    return tokens


def outcome(body, loads):
    """What POST /progress makes of `body` before validation: the value, or the 400."""
    request = progressista.Request("POST", "/progress", "HTTP/1.1", {"host": "h"})
    request.body = body
    try:
        return ("value", typed(request.json(loads)))
    except progressista.HTTPError as error:
        return ("error", error.status, error.message)


def assert_same(bodies, loads):
    differ = []
    for body in bodies:
        plain, fast = outcome(body, None), outcome(body, loads)
        if plain != fast:
            differ.append((body[:120], plain[:3] if plain[0] == "error" else "a value",
                           fast[:3] if fast[0] == "error" else "a value"))
    assert not differ, f"{len(differ)} of {len(bodies)} bodies differ, e.g. {differ[:3]}"


# --- The corpus --------------------------------------------------------------------------

REALISTIC = {"task_id": "benchtask0001", "desc": "train epoch 3", "n": 5, "total": 100000,
             "unit": "it", "unit_scale": False, "unit_divisor": 1000, "rate": 123.456,
             "elapsed": 12.345, "postfix": "loss=0.1234, lr=3e-4", "status": "running",
             "meta": {"host": "gpu-node-001", "pid": 1234}, "seq": 1, "timestamp": 1.7e9}

EDGE_CASES = [
    # numbers
    b"[0]", b"[-0]", b"[-0.0]", b"[0.0]", b"[0e0]", b"[-0e0]", b"[-0E-0]", b"[1E5]",
    b"[1e+2]", b"[1e-2]", b"[1.5E+3]", b"[0.1e1]", b"[1e400]", b"[-1e400]", b"[1e-400]",
    b"[1e999999999999999999]", b"[1e00000000000000000001]", b"[4.9e-324]", b"[2e-324]",
    b"[1.7976931348623157e308]", b"[1.7976931348623159e308]", b"[2.2250738585072011e-308]",
    b"[9007199254740993]", b"[9007199254740993.0]", b"[0.30000000000000004]",
    b"[9223372036854775807]", b"[9223372036854775808]", b"[-9223372036854775808]",
    b"[-9223372036854775809]", b"[18446744073709551615]", b"[18446744073709551616]",
    b"[100000000000000000000]", b"[-100000000000000000000]", b"[1234567890123456789]",
    b"[123456789012345678901234567890]", b"[123456789012345678901234567890.5]",
    b"[" + b"9" * 4300 + b"]", b"[" + b"9" * 4301 + b"]", b"[0." + b"1" * 5000 + b"]",
    b'{"n": 100000000000000000000, "task_id": "a"}', b'{"seq": 9223372036854775808}',
    b"[01]", b"[-01]", b"[1.]", b"[.5]", b"[+1]", b"[-]", b"[1e]", b"[1e+]", b"[0x10]",
    b"[1_000]", b"[--1]", b"[1.5.5]",
    # constants
    b"[NaN]", b"[-NaN]", b"[Infinity]", b"[-Infinity]", b'{"n": NaN}', b"[nan]",
    b"[true,false,null]", b"[tru]", b"[True]", b"[null,]", b"[undefined]",
    # strings
    b'["\\ud800"]', b'["\\udc00"]', b'["\\ud800\\udc00"]', b'["\\ud800x"]', b'["\\udbff\\udfff"]',
    b'{"\\ud800": 1}', b'{"task_id": "\\ud800"}', b'["\\u00e9"]', b'["\\U00e9"]', b'["\\x41"]',
    b'["\\/"]', b'["\\u0000"]', b'["\\u"]', b'["\\u12"]', b'["\\u12g4"]', b'["\\\'"]',
    b'["a\x01"]', b'["a\x1f"]', b'["a\x7f"]', b'["a\x00"]', b'["tab\there"]', b'["nl\nhere"]',
    '["\u00e9\u4e2d\U0001f600"]'.encode(), b'["\xed\xa0\x80"]', b'["\xef\xbf\xbf"]',
    b'["\xc0\x80"]', b'["\xf4\x90\x80\x80"]', b'["\xf0\x80\x80\x80"]', b'["\xe9"]', b'["\xff"]',
    b'["\xc3"]', b'["\xe2\x82"]', b'["unterminated]', b"['single']",
    # objects, duplicate keys, structure
    b'{"a":1,"b":2,"a":3}', b'{"a":1,"a":1.0}', b'{"task_id":"x","n":1,"task_id":"y"}',
    b'{"a" :1}', b'{"a":1,}', b"[1,]", b"[,1]", b"{1:2}", b'{"a"}', b'{"a":}', b"{}", b"[]",
    b"{", b"[", b"}", b"]", b"[[]", b"[]]", b'{"a":[}', b"[{}]", b"[[],[[]],{}]",
    # whitespace and what follows the document
    b"[1] ", b"[1]\n\t\r ", b"[1] \x0c", b"[1]\x0c", b"[1]\x00", b"[1\x0c]", b"[1\x0b]",
    b"[1]x", b"[1][2]", b"{} {}", b"[1]\xa0", b"[1]\xef\xbb\xbf", b"[ 1 , 2 ]", b"{ }",
    b'{\n  "a" : [ 1 ,\t2 ]\r\n}',
    # encodings: these never take the fast path, but the outcome must not change
    b"\xef\xbb\xbf[1]", b"\xef\xbb\xbf{\"a\": 1}", "[1]".encode("utf-16-le"),
    "[1]".encode("utf-16-be"), "[1]".encode("utf-16"), "[1]".encode("utf-32"),
    '{"a": "\u00e9"}'.encode("utf-16-le"), codecs.BOM_UTF16_LE + b"[", b"", b" [1]",
    b"\n{}", b"1", b"-1", b'"s"', b"null", b"true",
    # nesting: the standard library's recursion limit against orjson's 1,024
    *[b"[" * depth + b"]" * depth for depth in
      (1, 2, 100, 255, 256, 257, 300, 500, 900, 980, 990, 1000, 1023, 1024, 1025, 3000)],
    *[b'{"a":' * depth + b"1" + b"}" * depth for depth in (256, 257, 990, 1024, 1025)],
    b"[" * 400 + b"1",
    json.dumps([{"task_id": "t", "x": [[[[[[1]]]]]]}] * 300).encode(),
    json.dumps({"task_id": "t", "deep": json.loads(b"[" * 900 + b"]" * 900)}).encode(),
    # realistic
    json.dumps(REALISTIC).encode(), json.dumps([REALISTIC] * 100).encode(),
    json.dumps([REALISTIC] * 1000).encode(), json.dumps(REALISTIC, ensure_ascii=False).encode(),
    json.dumps(dict(REALISTIC, postfix="[" * 300)).encode(),
    json.dumps(dict(REALISTIC, task_id="9" * 30)).encode(),
]


def realistic_update(rng, index):
    update = {"task_id": f"job-{rng.randrange(10**6)}-{index}",
              "desc": rng.choice(["train", "eval epoch 3", "d\u00e9j\u00e0 vu", None, ""]),
              "n": rng.choice([0, 5, 12.5, rng.random() * 1e6, rng.randrange(2**40)]),
              "total": rng.choice([None, 100, 1e6, 7_340_032_000]),
              "unit": rng.choice(["it", "B", "rows"]), "unit_scale": rng.choice([False, True, 1.5]),
              "unit_divisor": rng.choice([1000, 1024]), "rate": rng.choice([None, rng.random()]),
              "elapsed": rng.uniform(0, 3600), "postfix": rng.choice([None, "loss=0.1, lr=3e-4"]),
              "status": rng.choice(["running", "close", "error", "start"]),
              "meta": {"host": "gpu-node-001", "pid": rng.randrange(10**5),
                       "ok": rng.choice([True, False, None])},
              "seq": rng.randrange(2**31), "timestamp": 1.7e9 + rng.random()}
    for key in rng.sample(sorted(update), rng.randrange(4)):
        del update[key]
    return update


def spelt_number(rng):
    """A number as a sender might spell it, or a near-miss of the grammar."""
    choice = rng.randrange(12)
    if choice == 0:
        return repr(rng.uniform(-1e6, 1e6))
    if choice == 1:  # any finite double, shortest spelling
        return repr(abs(rng.choice([1.0, -1.0]) * rng.random() * 10 ** rng.randrange(-320, 309)))
    if choice == 2:
        return str(rng.randrange(-2**70, 2**70))
    if choice == 3:  # long mantissas: the rounding of each parser
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 40)))
        return f"{rng.choice(['', '-'])}{rng.choice('123456789')}{digits}." \
               f"{rng.randrange(10**rng.randrange(1, 20))}e{rng.randrange(-330, 330)}"
    if choice == 4:
        return rng.choice(["0", "-0", "0.0", "-0.0", "1e0", "1E+0", "-0e-0", "1e308", "1e309",
                           "2.5e-324", "5e-324", "1e-325", "4.4501477170144023e-308"])
    if choice == 5:  # halfway cases between two doubles
        mantissa = rng.randrange(2**52, 2**53) * 2 + 1
        return f"{mantissa}e{rng.randrange(-340, 290)}"
    if choice == 6:
        return rng.choice(["01", "1.", ".5", "+1", "-", "1e", "0x1", "1e+", "--1", "NaN",
                           "Infinity", "-Infinity", "1_0", "١"])
    if choice == 7:
        return str(rng.randrange(10**17, 10**21)) if rng.random() < 0.5 else \
               str(-rng.randrange(10**17, 10**21))
    if choice == 8:
        return f"{rng.randrange(10)}.{rng.randrange(10**6):06d}"
    return str(rng.randrange(-1000, 10**6))


STRING_PIECES = ["a", "task", " ", "\u00e9", "\u4e2d", "\U0001f600", "\\n", "\\t", "\\\"",
                 "\\\\", "\\/", "\\u0041", "\\u00e9", "\\ud83d\\ude00", "\\ud800", "\\udc00",
                 "\\uDBFF\\uDFFF", "\\uD800\\u0041", "\\u0000", "\\x", "\\u12", "\x7f", "\x01",
                 "\t", "[", "{", "]", "0123456789"]


def spelt_string(rng):
    return '"' + "".join(rng.choice(STRING_PIECES) for _ in range(rng.randrange(6))) + '"'


WHITESPACE = ["", "", "", " ", "\n", "\t", "\r\n", "  ", "\x0c", "\x0b", "\xa0"]


def spelt_value(rng, depth=0):
    """JSON text built piece by piece, so that it is spelt as no serializer would."""
    space = (lambda: rng.choice(WHITESPACE) if rng.random() < 0.3 else "")
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind in (0, 1):
        return spelt_number(rng)
    if kind == 2:
        return spelt_string(rng)
    if kind == 3:
        return rng.choice(["true", "false", "null", "True", "nul"])
    if kind == 4:
        return spelt_number(rng) if rng.random() < 0.5 else spelt_string(rng)
    if kind in (5, 6):
        keys = [rng.choice(['"a"', '"task_id"', '"n"', '"meta"', '"seq"', spelt_string(rng)])
                for _ in range(rng.randrange(5))]
        items = [f"{space()}{key}{space()}:{space()}{spelt_value(rng, depth + 1)}{space()}"
                 for key in keys]
        return "{" + ",".join(items) + ("," if rng.random() < 0.03 else "") + "}"
    items = [space() + spelt_value(rng, depth + 1) + space() for _ in range(rng.randrange(5))]
    return "[" + ",".join(items) + ("," if rng.random() < 0.03 else "") + "]"


def generated_bodies(count, seed):
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        text = spelt_value(rng)
        if rng.random() < 0.7:  # a document the fast path may take
            text = rng.choice("[{") + text + rng.choice("]}") if rng.random() < 0.2 else (
                "[" + text + "]")
        if rng.random() < 0.1:
            text += rng.choice(WHITESPACE + ["x", "]", "\x00"])
        bodies.append(text.encode("utf-8", "surrogatepass"))
    return bodies


def mutated_bodies(count, seed):
    """Realistic updates and batches with a few bytes changed, cut, doubled or added."""
    rng = random.Random(seed)
    bodies = []
    interesting = [b"0", b"9", b"-", b".", b"e", b"[", b"]", b"{", b"}", b'"', b"\\", b",",
                   b":", b" ", b"\x00", b"\x0c", b"\xff", b"\xed\xa0\x80", b"\xc3\xa9",
                   b"NaN", b"Infinity", b"\\ud800", b"99999999999999999999", b"1e400"]
    for index in range(count):
        payload = realistic_update(rng, index)
        if rng.random() < 0.3:
            payload = [realistic_update(rng, index * 10 + k) for k in range(rng.randrange(1, 8))]
        body = bytearray(json.dumps(payload, ensure_ascii=rng.random() < 0.5).encode())
        for _ in range(rng.randrange(4)):
            at = rng.randrange(len(body) + 1)
            action = rng.randrange(5)
            if action == 0 and at < len(body):
                body[at] = rng.randrange(256)
            elif action == 1:
                body[at:at] = rng.choice(interesting)
            elif action == 2:
                del body[at:at + rng.randrange(1, 4)]
            elif action == 3:
                body[at:at] = body[max(0, at - 8):at]
            else:
                del body[at:]
        bodies.append(bytes(body))
    return bodies


# --- Differential tests ------------------------------------------------------------------


def test_edge_cases_decode_alike_on_both_paths(orjson_loads):
    assert_same(EDGE_CASES, orjson_loads)


def test_generated_json_decodes_alike_on_both_paths(orjson_loads):
    assert_same(generated_bodies(8000, seed=1414), orjson_loads)


def test_mutated_updates_decode_alike_on_both_paths(orjson_loads):
    assert_same(mutated_bodies(8000, seed=2718), orjson_loads)


def test_every_double_reads_back_alike_on_both_paths(orjson_loads):
    # Shortest spellings of random bit patterns: every exponent, subnormals included.
    rng = random.Random(31)
    doubles = [struct_double(rng.getrandbits(64)) for _ in range(20000)]
    bodies = [("[" + ",".join(repr(x) for x in doubles[i:i + 50]) + "]").encode()
              for i in range(0, len(doubles), 50)
              if all(x == x and abs(x) != float("inf") for x in doubles[i:i + 50])]
    assert len(bodies) > 300
    assert_same(bodies, orjson_loads)


def struct_double(bits):
    import struct

    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def test_the_fast_path_is_taken_for_updates_and_batches(orjson_loads):
    # Else the differential tests would pass by never using orjson.
    wrk_id = "a1000000" + "0000" + "9e37" + "%016x" % 100  # bench/wrk_post.lua's ids
    for payload in (REALISTIC, [REALISTIC] * 100, [REALISTIC] * 1000,
                    dict(REALISTIC, task_id=wrk_id), dict(REALISTIC, task_id="1" * 40)):
        body = json.dumps(payload).encode()
        assert progressista._fast_json(orjson_loads, body) == payload


@pytest.mark.parametrize("body", [
    b"[100000000000000000000]",  # orjson: a float
    b"[-9223372036854775809]",  # orjson: a float
    b'{"a": 1, "n":100000000000000000000}',
    b'{"n":\n-100000000000000000000}',
    b"[" * 300 + b"]" * 300,  # the standard library's recursion limit decides
    b"[NaN]",  # an error: the standard library words it
    b'["\\ud800"]',  # orjson refuses a lone surrogate the standard library reads
])
def test_what_orjson_would_read_otherwise_is_left_to_the_standard_library(
        orjson_loads, body):
    assert progressista._fast_json(orjson_loads, body) is progressista._UNSURE


# --- The setting -------------------------------------------------------------------------


def test_json_parser_setting_takes_auto_stdlib_or_orjson():
    assert progressista.Settings().json_parser == "auto"
    assert progressista.Settings.from_env({}, json_parser="StdLib").json_parser == "stdlib"
    assert progressista.Settings.from_env(
        {"PROGRESSISTA_JSON_PARSER": "orjson"}).json_parser == "orjson"
    with pytest.raises(ValueError, match="one of auto, stdlib, orjson"):
        progressista.Settings.from_env({}, json_parser="ujson")


def test_json_parser_auto_uses_orjson_when_importable_and_stdlib_when_not(monkeypatch):
    monkeypatch.setattr(progressista, "orjson", None)
    assert progressista.fast_json_loads("auto") is None
    assert progressista.fast_json_loads("stdlib") is None
    with pytest.raises(progressista.StartupError, match="pip install orjson"):
        progressista.fast_json_loads("orjson")


def test_auto_is_orjson_when_it_is_installed(orjson_loads):
    assert progressista.fast_json_loads("auto") is orjson_loads
    assert progressista.fast_json_loads("orjson") is orjson_loads


def test_serve_with_json_parser_orjson_and_no_orjson_is_one_line_and_status_1():
    code = ("import sys; sys.modules['orjson'] = None; sys.argv[0] = 'progressista'; "
            f"sys.path.insert(0, {repr(PROGRAM.rsplit('/', 1)[0])}); import progressista; "
            "sys.exit(progressista.main(['serve', '--port', '0', '--json-parser', 'orjson']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=clean_env(), timeout=15)
    assert result.returncode == 1, result.stderr
    assert "orjson cannot be imported" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_misspelt_json_parser_flag_is_status_2():
    result = run_cli("serve", "--json-parser", "fast")
    assert result.returncode == 2
    assert "must be one of auto, stdlib, orjson" in result.stderr


# --- End to end --------------------------------------------------------------------------

SERVER_TIMES = ("created_at", "updated_at", "progressed_at", "typical_step_s")


def answers(server, bodies):
    """(status, body bytes) of each POST, on one kept-alive connection while it lasts."""
    got = []
    connection = None
    for body in bodies:
        if connection is None:
            connection = raw_connection(server)
            sock, reader = connection.__enter__()
        sock.sendall(request_bytes("POST", "/progress", body,
                                   [("Content-Type", "application/json")]))
        status, headers, answer = read_response(reader)
        got.append((status, answer))
        if headers.get("connection") == "close":
            connection.__exit__(None, None, None)
            connection = None
    if connection is not None:
        connection.__exit__(None, None, None)
    return got


def stored(server):
    status, answer, _ = http("GET", server.url + "/tasks")
    assert status == 200
    tasks = answer["tasks"]
    for task in tasks.values():
        for name in SERVER_TIMES:
            task.pop(name, None)
    return typed(tasks)


def test_servers_with_and_without_orjson_answer_and_store_alike(orjson_loads):
    rng = random.Random(99)
    valid = [json.dumps(realistic_update(rng, index)).encode() for index in range(150)]
    valid.append(json.dumps([realistic_update(rng, 1000 + k) for k in range(100)]).encode())
    bodies = (EDGE_CASES[:-3] + valid + generated_bodies(300, seed=7)
              + mutated_bodies(300, seed=8))
    bodies = [body for body in bodies if len(body) < 1 << 20]
    with cli_server("--host", "127.0.0.1", "--port", "0", "--json-parser", "stdlib") as plain, \
            cli_server("--host", "127.0.0.1", "--port", "0", "--json-parser", "orjson") as fast:
        plain_answers, fast_answers = answers(plain, bodies), answers(fast, bodies)
        differ = [(body[:80], a, b) for body, a, b in zip(bodies, plain_answers, fast_answers)
                  if a != b]
        assert not differ, f"{len(differ)} answers differ, e.g. {differ[:3]}"
        assert sum(status == 200 for status, _ in plain_answers) > 150
        assert sum(status == 400 for status, _ in plain_answers) > 100
        assert stored(plain) == stored(fast)
