"""The dashboard (index.html) in real browsers: Chromium, Firefox and WebKit.

Every test runs once per engine (`test_x[chromium]`, `test_x[firefox]`, `test_x[webkit]`),
through the one page API of browsers.py (docs/browsers.md): Chromium by Playwright, Firefox
by WebDriver BiDi, WebKit by classic WebDriver, each from Debian's packages. One browser per
engine for the module, a fresh page for each test, and every test talks to a real
Progressista server started by `running_server`. Locally an engine that is not installed
skips its tests with the reason; under CI (`CI` set) that is a failure. What an engine
cannot do (e.g. a 390 px window in WebKit's MiniBrowser) skips that one test on that engine,
with the reason. Screenshots of a realistic mix of tasks are saved to artifacts/.

Assertions wait with `expect(...)`, which looks at the page until the condition holds or a
deadline passes; `page.evaluate` runs outside the page's Content-Security-Policy on every
engine, so the CSP stays as strict as users get it.
"""

import asyncio
import base64
import contextlib
import hashlib
import pathlib
import re
import threading
import time

import pytest

import browsers
from browsers import expect
from conftest import http, missing, running_server, wait_for

TOKEN = "s3cret"
READ_TOKEN = "v1ewer"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HERE = pathlib.Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"
VISIBLE_TASK_ROWS = ".row.task:not([hidden])"


# --- Fixtures and helpers ---------------------------------------------------------------


def not_on(*engines, reason):
    """Mark a test that these engines cannot run (what they lack, in `reason`): it is not
    made for them at all, rather than skipped, so a skip under CI still means something
    is missing. docs/browsers.md lists each."""
    return pytest.mark.not_on(engines=engines, reason=reason)


def pytest_generate_tests(metafunc):
    """Every test that uses a browser runs once per engine, less those it is marked not_on."""
    if "browser" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("not_on")
    excluded = marker.kwargs["engines"] if marker is not None else ()
    metafunc.parametrize("browser", [engine for engine in browsers.ENGINES
                                     if engine not in excluded],
                         indirect=True, scope="module")


@pytest.fixture(scope="module")
def browser(request):
    """One browser of each engine for the module (pytest runs an engine's tests together)."""
    try:
        launched = browsers.launch(request.param)
    except browsers.EngineMissing as error:
        missing(f"{request.param}: {error}; .ci/run installs it")
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture(scope="module")
def server():
    """One server for the module; `clean_server` empties it before each test."""
    with running_server(api_tokens=[TOKEN], read_tokens=[READ_TOKEN]) as running:
        yield running


@pytest.fixture
def clean_server(server):
    status, _, _ = http("DELETE", server.url + "/tasks", headers=AUTH)
    assert status == 200
    return server


@pytest.fixture
def page(browser):
    """A fresh 1200x800 page that records console errors and CSP violations."""
    new_page = browser.new_page()
    try:
        yield new_page
    finally:
        new_page.close()


def post(server, tasks):
    status, body, _ = http("POST", server.url + "/progress", tasks, headers=AUTH)
    assert status == 200, body
    return body


def task(task_id, **fields):
    return {"task_id": task_id, "desc": task_id, "n": 0, "total": 100, **fields}


def open_dashboard(page, server, query=f"?token={TOKEN}", connected="Connected"):
    page.goto(f"{server.url}/static/index.html{query}")
    if connected:
        expect(page.locator("#conn")).to_have_text(connected)


def row(page, text):
    return page.locator(VISIBLE_TASK_ROWS, has_text=text)


# What is on screen, not what the DOM says: the `.row`s that are drawn (have a box), each with
# its text, box, and whether a click at its centre lands on it (elementFromPoint).
PAINTED_ROWS_JS = """() => [...document.querySelectorAll('#list .row')]
    .filter(row => row.getClientRects().length > 0)
    .map(row => {
        const box = row.getBoundingClientRect();
        const x = box.left + box.width / 2, y = box.top + box.height / 2;
        const inView = y > 0 && y < innerHeight;
        const hit = inView ? document.elementFromPoint(x, y) : null;
        return { desc: (row.querySelector('.desc, .toggle') || row).textContent, top: box.top,
                 bottom: box.bottom, inView, hitsItself: inView ? row.contains(hit) : null };
    })"""


def painted_rows(page):
    return page.evaluate(PAINTED_ROWS_JS)


def csp_messages(page):
    """CSP violations: the page's securitypolicyviolation events, and what the engine logged."""
    logged = [text for text in page.console_errors
              if re.search(r"Content[ -]Security[ -]Policy", text, re.I)]
    return page.csp_violations + logged


def evaluate_until(page, expression, timeout=5.0, message=None):
    """Poll a JS expression until it is truthy (page.evaluate is exempt from the CSP)."""
    return wait_for(lambda: page.evaluate(expression), timeout=timeout, interval=0.05,
                    message=message or expression)


# --- Serving, CSP, formatting -------------------------------------------------------------


def test_page_has_one_inline_script_allowed_by_the_csp_and_runs_without_violations(
        page, clean_server):
    source = (HERE / "index.html").read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", source, re.S)
    assert len(scripts) == 1 and b"<script " not in source
    assert not re.search(rb"<[^>]*\son[a-z]+\s*=", source), "an inline event handler attribute"
    digest = base64.b64encode(hashlib.sha256(scripts[0]).digest()).decode()

    open_dashboard(page, clean_server)
    _, _, headers = http("GET", clean_server.url + f"/static/index.html?token={TOKEN}")
    policy = headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "unsafe-eval" not in policy
    post(clean_server, task("csp-check", n=5))
    expect(row(page, "csp-check")).to_contain_text("5%")
    assert csp_messages(page) == []
    assert page.console_errors == []


def test_console_messages_errors_and_csp_violations_are_seen_on_every_engine(page, clean_server):
    # what makes `console_errors == []` and `csp_messages(page) == []` above mean something
    open_dashboard(page, clean_server)
    assert page.console_errors == [] and csp_messages(page) == []
    page.evaluate("""() => {
        console.error('logged on purpose');
        console.log('a plain log');
        console.warn('a warning');
        setTimeout(() => { throw new Error('thrown on purpose'); });
        const script = document.createElement('script');   // not the page's hash: blocked
        script.textContent = 'window.__injected = 1;';
        document.body.append(script);
    }""")
    expect(page).to_be_true("() => window.__browserLog.csp.length > 0")
    wait_for(lambda: any("thrown on purpose" in text for text in page.console_errors),
             message="the uncaught error in console_errors")
    assert any("logged on purpose" in text for text in page.console_errors), page.console_errors
    assert {("log", "a plain log"), ("warn", "a warning")} <= set(page.console_messages), \
        page.console_messages
    assert any("script-src" in text for text in csp_messages(page)), csp_messages(page)
    assert page.evaluate("() => window.__injected") is None


def test_a_new_page_keeps_no_cookie_or_storage_of_the_last_one(browser, clean_server):
    # tests must not leak a token cookie or saved view into the next one (WebKit's windows
    # share one cookie jar and storage: the harness clears them when a page closes)
    first = browser.new_page()
    try:
        open_dashboard(first, clean_server)
        first.evaluate("""() => { document.cookie = 'left=behind; path=/';
            localStorage.setItem('left', 'behind'); sessionStorage.setItem('left', 'behind'); }""")
        assert "left=behind" in first.evaluate("() => document.cookie")
    finally:
        first.close()
    second = browser.new_page()
    try:
        open_dashboard(second, clean_server)
        assert second.evaluate("""() => [document.cookie, localStorage.getItem('left'),
            sessionStorage.getItem('left')]""") == ["", None, None]
    finally:
        second.close()


def test_numbers_are_formatted_as_tqdm_formats_them(page, clean_server):
    tqdm = pytest.importorskip("tqdm").tqdm
    open_dashboard(page, clean_server)
    cases = [
        dict(n=450, total=1000, elapsed=5, rate=90),
        dict(n=4.5e6, total=1e7, elapsed=65, unit="B", unit_scale=True, unit_divisor=1024, rate=70800),
        dict(n=37, total=None, elapsed=3700, rate=0.01),
        dict(n=3, total=10, elapsed=30, unit_scale=2, rate=None),
        dict(n=12345678, total=None, elapsed=7, unit="B", unit_scale=True, rate=None),
        # past the total, tqdm drops it: "150it [00:15, 10.00it/s]"
        dict(n=150, total=100, elapsed=15, rate=10),
        # a numeric unit_scale multiplies n, total and rate, and Python prints floats: "50.0/200.0"
        dict(n=100, total=400, elapsed=10, unit_scale=0.5, rate=None),
        # Python rounds exact ties to even: 12.5% is "12%", 2.125 it/s is "2.12it/s"
        dict(n=1, total=8, elapsed=1, rate=2.125),
        dict(n=197, total=200, elapsed=4, rate=None),
        dict(n=1, total=200, elapsed=4, rate=None),
        dict(n=2.5, total=None, elapsed=1, unit="B", unit_scale=True, rate=None),   # "2.50B"
        dict(n=1, total=3, elapsed=2, unit_scale=0.25, rate=1.5),
    ]
    for case in cases:
        meter = page.evaluate("t => window.progressista.meterOf(t)", {"unit": "it", **case})
        line = tqdm.format_meter(case["n"], case["total"], case["elapsed"], rate=case["rate"],
                                 unit=case.get("unit", "it"), unit_scale=case.get("unit_scale", False),
                                 unit_divisor=case.get("unit_divisor", 1000))
        if meter["percentFmt"]:
            assert "|" in line, (line, meter)  # tqdm draws a bar exactly when the page shows a percent
            assert f"{meter['nFmt']}/{meter['totalFmt']} [" in line
            assert f"{meter['elapsedFmt']}<{meter['remainingFmt']}," in line
            assert line.lstrip().startswith(meter["percentFmt"] + "|"), (line, meter)
        else:
            assert line.startswith(f"{meter['nFmt']}{meter['unit']} [{meter['elapsedFmt']},"), (line, meter)
        assert re.search(r"[ ,]\s*" + re.escape(meter["rateFmt"].strip()) + r"\]", line), (line, meter)


# --- Live updates and states --------------------------------------------------------------


def test_posted_task_appears_with_text_percent_and_an_accessible_bar(page, clean_server):
    open_dashboard(page, clean_server)
    post(clean_server, task("job-1", desc="Resize images", n=30, total=200, unit="img",
                            postfix="batch=3", meta={"host": "gpu-7"}))
    line = row(page, "Resize images")
    expect(line).to_contain_text("15%")
    expect(line).to_contain_text("30/200img")
    expect(line).to_contain_text("batch=3")
    bar = line.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "15")
    expect(bar).to_have_attribute("aria-label", "Progress of Resize images")
    expect(page).to_have_title("1 running · Progressista")


def test_an_update_moves_the_bar(page, clean_server):
    post(clean_server, task("mover", n=10, seq=1))
    open_dashboard(page, clean_server)
    bar = row(page, "mover").get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "10")
    post(clean_server, task("mover", n=75, seq=2))
    expect(bar).to_have_attribute("aria-valuenow", "75")
    expect(row(page, "mover")).to_contain_text("75%")
    assert page.evaluate(
        "() => getComputedStyle(document.querySelector('.row.task .fill')).transform") != "none"


def test_unknown_total_shows_an_indeterminate_bar(page, clean_server):
    open_dashboard(page, clean_server)
    post(clean_server, task("open-ended", n=1234, total=None))
    bar = row(page, "open-ended").get_by_role("progressbar")
    expect(bar).to_have_class(re.compile(r"\bindeterminate\b"))
    expect(row(page, "open-ended")).to_contain_text("1234it")
    assert bar.get_attribute("aria-valuenow") is None


def test_close_error_and_stale_are_told_apart_by_words_not_only_colour(page):
    with running_server(api_tokens=[TOKEN], stale_seconds=1) as server:
        post(server, [task("finished", n=100, status="close"),
                      task("broken", n=40, status="error", error="CUDA out of memory"),
                      task("quiet", n=5), task("no-total", n=5, total=None)])
        open_dashboard(page, server)
        expect(row(page, "finished")).to_contain_text("✓ done")
        expect(row(page, "broken")).to_contain_text("✖ error")
        expect(row(page, "broken")).to_contain_text("Error: CUDA out of memory")
        expect(row(page, "quiet")).to_contain_text("‖ stale")
        expect(row(page, "quiet")).to_contain_text("no update for")
        expect(page.locator("#summary")).to_contain_text("✓ done 1")
        expect(page.locator("#summary")).to_contain_text("✖ error 1")
        # a stale bar with no total stands still: the moving stripe would suggest activity
        expect(row(page, "no-total")).to_contain_text("‖ stale")
        assert row(page, "no-total").locator(".fill").evaluate(
            "fill => getComputedStyle(fill).animationName") == "none"


def test_the_info_panel_shows_no_eta_where_the_row_shows_none(page, clean_server):
    post(clean_server, task("failed-eta", n=30, total=100, elapsed=30, rate=1, status="error",
                            error="boom"))
    open_dashboard(page, clean_server)
    expect(row(page, "failed-eta").locator(".time")).to_have_text("00:30<?")
    row(page, "failed-eta").locator("button.info").click()
    expect(page.locator("#details dd").nth(3)).to_have_text("00:30 < ?")


def test_the_info_panel_lists_the_raw_fields_too(page, clean_server):
    post(clean_server, task("raw", n=1536, total=4096, unit="B", unit_scale=True,
                            unit_divisor=1024, seq=42))
    open_dashboard(page, clean_server)
    row(page, "raw").locator("button.info").click()
    fields = page.locator("#details dt")
    for name in ("n", "total", "unit", "unit_scale", "unit_divisor", "seq"):
        expect(fields.filter(has_text=re.compile(f"^{name}$"))).to_have_count(1)
    expect(page.locator("#details")).to_contain_text("1536")
    expect(page.locator("#details")).to_contain_text("1024")


def test_task_data_is_rendered_as_text_and_runs_nothing_even_without_the_csp(page, clean_server):
    # served through a proxy that drops the CSP header (what Playwright's bypass_csp did, on
    # every engine): the page itself must be safe, the CSP is only the second line of defence
    attack = '<img src=x onerror="window.__pwned=1">'
    post(clean_server, task("xss", desc=attack, postfix="<b>bold</b>", unit="<i>u</i>",
                            meta={"host": "<script>window.__pwned=2</script>"}))
    with path_prefix_proxy(clean_server.port, strip_csp=True) as base:
        _, _, headers = http("GET", f"{base}/static/index.html?token={TOKEN}")
        assert "Content-Security-Policy" not in headers   # no CSP here: the page is on its own
        page.goto(f"{base}/static/index.html?token={TOKEN}")
        expect(page.locator("#conn")).to_have_text("Connected")
        assert page.evaluate("() => document.querySelector('meta[http-equiv]')") is None
        line = row(page, "onerror")
        expect(line.locator(".desc")).to_have_text(attack)
        expect(line).to_contain_text("<b>bold</b>")
        line.locator("button.info").click()
        expect(page.locator("#details")).to_contain_text("<script>window.__pwned=2</script>")
        assert page.locator("#list img, #list b, #list i, #details script").count() == 0
        assert page.evaluate("() => window.__pwned") is None


# --- Tokens and connection --------------------------------------------------------------


def test_token_from_the_root_url_reaches_the_api_and_the_feed(page, clean_server):
    post(clean_server, task("with-token", n=50))
    page.goto(f"{clean_server.url}/?token={TOKEN}&q=token")
    expect(page.locator("#conn")).to_have_text("Connected")
    expect(row(page, "with-token")).to_contain_text("50%")
    # The token became an HttpOnly cookie and left the address bar; the rest stays.
    assert page.url.endswith("/static/index.html?q=token")
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: not for scripts
    page.goto(page.url)  # reloaded: the cookie alone opens the API and the feed now
    expect(page.locator("#conn")).to_have_text("Connected")
    expect(row(page, "with-token")).to_contain_text("50%")


def test_a_wrong_token_shows_a_clear_message(page, clean_server):
    open_dashboard(page, clean_server, query="?token=wrong", connected=None)
    expect(page.locator("#conn")).to_contain_text("Unauthorized — check the ?token= in the URL")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(0)
    expect(page.locator("#summary")).to_have_text("Nothing loaded yet")  # not "0 tasks": it does not know


def test_stopping_the_server_shows_disconnected_and_a_restart_resyncs(page):
    with running_server(api_tokens=[TOKEN]) as server:  # stop() is idempotent
        port = server.port
        post(server, task("before-restart", n=30))
        open_dashboard(page, server)
        expect(row(page, "before-restart")).to_be_visible()
        server.stop()
        expect(page.locator("#conn")).to_contain_text(re.compile(r"Disconnected — retrying"))
        expect(page).to_have_title(re.compile("^⚠"))
        expect(page.locator("#reconnect")).to_be_visible()
        # the rows stay, marked as old data
        expect(page.locator("#summary")).to_contain_text(re.compile(r"Not live: last data \d\d:\d\d ago"))
        expect(page.locator("#list")).to_have_attribute("data-live", "false")
        assert float(row(page, "before-restart").evaluate("r => getComputedStyle(r).opacity")) < 1
        with running_server(api_tokens=[TOKEN], port=port) as restarted:
            post(restarted, task("after-restart", n=60))
            # no waiting for the backoff; dispatch_event because the retry may win the race
            page.locator("#reconnect").dispatch_click()
            expect(page.locator("#conn")).to_have_text("Connected")
            expect(row(page, "after-restart")).to_contain_text("60%")
            expect(page.locator("#list")).to_have_attribute("data-live", "true")
            # the snapshot replaced the old state: the restarted server never knew this task
            expect(row(page, "before-restart")).to_have_count(0)


def test_reconnects_by_itself_with_backoff(page):
    with running_server(api_tokens=[TOKEN]) as server:
        port = server.port
        open_dashboard(page, server)
        server.stop()
        expect(page.locator("#conn")).to_contain_text("Disconnected")
        with running_server(api_tokens=[TOKEN], port=port) as restarted:
            post(restarted, task("came-back", n=1))
            expect(page.locator("#conn")).to_have_text("Connected", timeout=20)
            expect(row(page, "came-back")).to_be_visible()


def test_polling_takes_over_when_websockets_are_unavailable(page, clean_server):
    # a script before the page's own deletes WebSocket: through the proxy, so that WebKit
    # (no preload scripts in classic WebDriver) runs it too, and the CSP stays in force
    post(clean_server, task("polled", n=20, seq=1))
    with path_prefix_proxy(clean_server.port, first_script="delete window.WebSocket;") as base:
        page.goto(f"{base}/static/index.html?token={TOKEN}")
        expect(page.locator("#conn")).to_have_text(re.compile(r"Connected \(polling"))
        assert page.evaluate("() => typeof window.WebSocket") == "undefined"
        expect(row(page, "polled")).to_contain_text("20%")
        post(clean_server, task("polled", n=90, seq=2))
        expect(row(page, "polled")).to_contain_text("90%")
        assert csp_messages(page) == []


def test_polling_takes_over_when_a_proxy_refuses_the_websocket_but_http_works(page, clean_server):
    # a real proxy that answers the upgrade with 502, as one that does not pass WebSockets
    post(clean_server, task("proxied", n=40))
    with path_prefix_proxy(clean_server.port, refuse_websocket=True) as base:
        page.goto(f"{base}/static/index.html?token={TOKEN}")
        expect(page.locator("#conn")).to_have_text(re.compile(r"Connected \(polling"))
        expect(row(page, "proxied")).to_contain_text("40%")


@contextlib.contextmanager
def path_prefix_proxy(backend_port, prefix=b"/tools/progress", strip_csp=False,
                      refuse_websocket=False, first_script=None):
    """A reverse proxy serving the server under `prefix`: strips it and pipes the bytes,
    WebSocket upgrades included. Yields the proxy's base URL (with the prefix). With
    `strip_csp`, responses lose their Content-Security-Policy header; with
    `refuse_websocket`, an upgrade gets 502 as from a proxy that does not pass WebSockets;
    with `first_script` (JS), HTML pages run it before their own script, allowed by its
    hash added to the CSP (an init script that every engine runs, WebKit's too)."""

    def add_first_script(response_head, body):
        source = first_script.encode()
        digest = base64.b64encode(hashlib.sha256(source).digest())
        response_head = response_head.replace(b"script-src ", b"script-src 'sha256-" + digest + b"' ", 1)
        body = body.replace(b"<script>", b"<script>" + source + b"</script><script>", 1)
        response_head = re.sub(rb"(?im)^content-length:[^\r]*", b"Content-Length: %d" % len(body),
                               response_head)
        return response_head, body

    async def pipe(reader, writer):
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()

    async def handle(client_reader, client_writer):
        backend_writer = None
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
            request_line, rest = head.split(b"\r\n", 1)
            method, target, version = request_line.split(b" ", 2)
            if not target.startswith(prefix + b"/"):
                client_writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            if refuse_websocket and b"upgrade: websocket" in head.lower():
                client_writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\n\r\n")
                return
            if b"upgrade: websocket" not in head.lower():
                # one request per connection, so that every request line gets rewritten
                rest = b"Connection: close\r\n" + re.sub(rb"(?im)^connection:[^\r]*\r\n", b"", rest)
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", backend_port)
            backend_writer.write(b" ".join([method, target[len(prefix):], version]) + b"\r\n" + rest)
            if strip_csp or first_script:
                response_head = await backend_reader.readuntil(b"\r\n\r\n")
                if strip_csp:
                    response_head = re.sub(rb"(?im)^content-security-policy:[^\r]*\r\n", b"",
                                           response_head)
                if first_script and b"text/html" in response_head.lower():
                    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", response_head)[1])
                    response_head, body = add_first_script(
                        response_head, await backend_reader.readexactly(length))
                    response_head += body
                client_writer.write(response_head)
            pipes = [asyncio.ensure_future(pipe(client_reader, backend_writer)),
                     asyncio.ensure_future(pipe(backend_reader, client_writer))]
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for future in pending:
                future.cancel()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for writer in (client_writer, backend_writer):
                if writer is not None:
                    writer.close()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = asyncio.run_coroutine_threadsafe(
        asyncio.start_server(handle, "127.0.0.1", 0), loop).result(10)
    try:
        yield f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}{prefix.decode()}"
    finally:
        async def shutdown():
            proxy.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for handler in handlers:
                handler.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_works_behind_a_reverse_proxy_under_a_path_prefix(page, clean_server):
    post(clean_server, task("proxied-prefix", n=35))
    with path_prefix_proxy(clean_server.port) as base:
        page.goto(f"{base}/static/index.html?token={TOKEN}")
        expect(page.locator("#conn")).to_have_text("Connected")  # the WebSocket went through the prefix
        expect(row(page, "proxied-prefix")).to_contain_text("35%")
        post(clean_server, task("proxied-prefix", n=36, seq=9))
        expect(row(page, "proxied-prefix")).to_contain_text("36%")
        row(page, "proxied-prefix").get_by_role("button", name="Remove proxied-prefix").click()
        expect(row(page, "proxied-prefix")).to_have_count(0)
    assert http("GET", clean_server.url + "/tasks", headers=AUTH)[1]["tasks"] == {}
    assert csp_messages(page) == []


# --- Filters, sorting, grouping, actions ----------------------------------------------------


def mixed_tasks():
    return [
        task("a1", desc="alpha train", n=90, meta={"host": "gpu-1", "job": "17"}),
        task("a2", desc="alpha eval", n=10, meta={"host": "gpu-2", "job": "17"}),
        task("b1", desc="beta train", n=50, status="close", meta={"host": "gpu-1", "job": "18"}),
        task("b2", desc="beta eval", n=30, status="error", error="disk full", meta={"host": "gpu-2"}),
        task("c1", desc="gamma", n=70, meta={}),
    ]


def test_text_and_status_filters_and_sort_work_and_are_kept_in_the_url(page, clean_server):
    post(clean_server, mixed_tasks())
    open_dashboard(page, clean_server)
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(5)

    page.locator("#filter").fill("alpha")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(2)
    expect(page.locator("#summary")).to_contain_text("showing 2")
    page.locator("#filter").fill("gpu-2")  # meta is searched too
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(2)
    page.locator("#filter").fill("")
    page.locator("#status-filter").select_option("error")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(1)
    expect(page.locator(VISIBLE_TASK_ROWS)).to_contain_text("beta eval")
    page.locator("#status-filter").select_option("active")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(3)

    page.locator("#sort").select_option("progress")
    expect(page.locator(f"{VISIBLE_TASK_ROWS} .desc")).to_have_text(["alpha eval", "gamma", "alpha train"])
    page.locator("#sort").select_option("name")
    expect(page.locator(f"{VISIBLE_TASK_ROWS} .desc")).to_have_text(["alpha eval", "alpha train", "gamma"])
    assert "status=active" in page.url and "sort=name" in page.url
    assert "token=" not in page.url  # a shared view never carries the token


def test_typed_filter_text_applies_at_once_and_reaches_the_url(page, clean_server):
    post(clean_server, mixed_tasks())
    open_dashboard(page, clean_server)
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(5)
    page.locator("#filter").focus()
    page.type("beta")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(2)
    # the URL is rewritten once the typing pauses (browsers limit how often a page may)
    wait_for(lambda: "q=beta" in page.url, message="q=beta in the URL")
    page.type(" e")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(1)
    wait_for(lambda: "q=beta+e" in page.url, message="q=beta+e in the URL")


def test_a_shared_url_restores_the_view(page, clean_server):
    post(clean_server, mixed_tasks())
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&q=train&status=running&sort=name&group=job")
    expect(page.locator("#filter")).to_have_value("train")
    expect(page.locator("#status-filter")).to_have_value("running")
    expect(page.locator("#sort")).to_have_value("name")
    expect(page.locator("#group")).to_have_value("job")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(1)
    expect(page.locator(".row.group:not([hidden])")).to_have_count(1)
    expect(page.locator(".row.group:not([hidden])")).to_contain_text("job: 17")


def test_an_unknown_sort_in_the_url_falls_back_to_newest(page, clean_server):
    post(clean_server, mixed_tasks())
    # "constructor" is `in` every object: the page must check its own sorts only
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=constructor")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(5)
    expect(page.locator("#sort")).to_have_value("newest")
    assert page.evaluate("() => window.progressista.state.view.sort") == "newest"
    assert page.console_errors == []


def test_grouping_by_a_meta_key_shows_per_group_totals_and_folds(page, clean_server):
    post(clean_server, mixed_tasks())
    open_dashboard(page, clean_server)
    expect(page.locator("#group option")).to_have_text(["no grouping", "host", "job"])
    page.locator("#group").select_option("host")
    groups = page.locator(".row.group:not([hidden])")
    expect(groups.locator(".toggle")).to_have_text(["▾ host: gpu-1", "▾ host: gpu-2", "▾ host: (none)"])
    expect(groups.nth(0)).to_contain_text("2 tasks · ▶ running 1 · ✓ done 1 · 70% done")
    expect(groups.nth(1)).to_contain_text("2 tasks · ▶ running 1 · ✖ error 1 · 20% done")
    assert "group=host" in page.url

    groups.nth(0).locator(".toggle").click()
    expect(groups.nth(0).locator(".toggle")).to_have_attribute("aria-expanded", "false")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(3)


def test_clear_finished_and_remove_one_delete_on_the_server(page, clean_server):
    post(clean_server, mixed_tasks())
    open_dashboard(page, clean_server)
    clear = page.locator("#clear-finished")
    expect(clear).to_have_text("Clear finished (1)")
    expect(page.locator("#access")).to_be_hidden()  # an API token may change tasks
    clear.focus()
    page.press("Enter")
    expect(row(page, "beta train")).to_have_count(0)
    expect(clear).to_be_disabled()
    expect(page.locator("#list")).to_be_focused()  # not dropped to <body> with the disabled button
    expect(page.locator("#announce")).to_have_text("Removed 1 finished task")
    row(page, "gamma").get_by_role("button", name="Remove gamma").click()
    expect(row(page, "gamma")).to_have_count(0)
    _, body, _ = http("GET", clean_server.url + "/tasks", headers=AUTH)
    assert sorted(body["tasks"]) == ["a1", "a2", "b2"]


def test_a_read_only_token_shows_the_tasks_but_hides_the_controls_that_delete(
        page, clean_server):
    post(clean_server, mixed_tasks())
    open_dashboard(page, clean_server, query=f"?token={READ_TOKEN}")
    expect(row(page, "gamma")).to_have_count(1)
    expect(page.locator("#access")).to_have_text("view only")
    expect(page.locator("#clear-finished")).to_be_hidden()
    expect(row(page, "gamma").get_by_role("button", name="Remove gamma")).to_be_hidden()
    post(clean_server, [task("late", n=5)])  # the live feed still flows to a read token
    expect(row(page, "late")).to_have_count(1)
    # The server refuses a delete from this token whatever the page shows.
    status, body, _ = http("DELETE", clean_server.url + "/tasks",
                           headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert status == 403 and "may only read" in body["error"]
    assert page.console_errors == []


def test_rows_filtered_out_are_not_drawn_and_cannot_be_clicked(page, clean_server):
    # The pool hides rows it does not need; `.row { display: grid }` once overrode `hidden`,
    # leaving stale rows on screen whose ✕ removed other tasks.
    tasks = [task(f"t{i:02d}", desc=f"task {i:02d}", n=i) for i in range(18)]
    tasks += [task(f"e{i}", desc=f"failing {i}", n=5, status="error", error="x") for i in range(2)]
    post(clean_server, tasks)
    open_dashboard(page, clean_server)
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(20)
    page.locator("#status-filter").select_option("error")
    expect(page.locator("#summary")).to_contain_text("showing 2")
    evaluate_until(page, f"() => ({PAINTED_ROWS_JS})().length === 2", message="only 2 rows drawn")
    drawn = painted_rows(page)
    assert sorted(r["desc"] for r in drawn) == ["failing 0", "failing 1"]
    assert all(r["hitsItself"] for r in drawn), drawn
    # where the other rows were, a click finds no row
    below = drawn[-1]["bottom"] + 64 * 3
    assert page.evaluate(f"() => document.elementFromPoint(300, {below}).closest('.row')") is None


def test_filtering_a_scrolled_long_list_shrinks_the_page_to_the_matches(page, clean_server):
    tasks = [task(f"n{i:03d}", desc=f"{'needle' if i % 50 == 0 else 'hay'} {i:03d}") for i in range(300)]
    post(clean_server, tasks)
    open_dashboard(page, clean_server)
    expect(page.locator("#summary")).to_contain_text("300 tasks")
    page.evaluate("() => window.scrollTo(0, 12000)")
    expect(row(page, "hay 1")).not_.to_have_count(0)
    page.locator("#filter").fill("needle")
    expect(page.locator("#summary")).to_contain_text("showing 6")
    evaluate_until(page, "() => document.documentElement.scrollHeight < innerHeight + 600",
                   message="the page shrinks to the six matching rows")
    evaluate_until(page, f"() => ({PAINTED_ROWS_JS})().length === 6", message="six rows drawn")
    assert all(r["desc"].startswith("needle") for r in painted_rows(page))


def test_keyboard_remove_never_leaves_focus_on_another_tasks_remove_button(page, clean_server):
    page.set_viewport(1200, 700)
    post(clean_server, [task(f"k{i:02d}", desc=f"keyed {i:02d}", n=i) for i in range(30)])
    open_dashboard(page, clean_server)
    expect(page.locator("#summary")).to_contain_text("30 tasks")
    doomed = row(page, "keyed 27")  # newest first: the third row
    doomed.get_by_role("button", name="Remove keyed 27").focus()
    page.press("Enter")
    expect(row(page, "keyed 27")).to_have_count(0)
    # focus moved to the harmless info button of the task now in that place, on screen
    expect(row(page, "keyed 26").locator("button.info")).to_be_focused()
    page.press("Enter")  # opens the info panel, deletes nothing
    expect(page.locator("#details")).to_be_visible()
    page.press("Escape")
    page.press("Enter")
    page.press("Escape")
    _, body, _ = http("GET", clean_server.url + "/tasks", headers=AUTH)
    assert len(body["tasks"]) == 29 and "k27" not in body["tasks"]
    expect(page.locator("#announce")).to_have_text("Removed keyed 27")


def test_tasks_with_ids_a_url_path_cannot_carry_can_be_removed(page, clean_server):
    post(clean_server, [task(".", desc="single dot"), task("..", desc="double dot"),
                        task("a/b?c#d %20", desc="odd id"), task("kept", desc="kept")])
    open_dashboard(page, clean_server)
    for name in ("single dot", "double dot", "odd id"):
        row(page, name).get_by_role("button", name=f"Remove {name}").click()
        expect(row(page, name)).to_have_count(0)
    _, body, _ = http("GET", clean_server.url + "/tasks", headers=AUTH)
    assert sorted(body["tasks"]) == ["kept"]


def test_live_updates_do_not_reorder_rows_under_the_pointer(page, clean_server):
    post(clean_server, [task("slow", n=10), task("fast", n=50)])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=progress")
    descs = page.locator(f"{VISIBLE_TASK_ROWS} .desc")
    expect(descs).to_have_text(["slow", "fast"])
    row(page, "slow").locator(".desc").hover()
    post(clean_server, task("fast", n=5, seq=2))
    expect(row(page, "fast")).to_contain_text("5%")
    expect(descs).to_have_text(["slow", "fast"])   # held while the pointer is over the list
    page.mouse_move(5, 5)  # over the header: the order catches up
    expect(descs).to_have_text(["fast", "slow"])


def test_a_click_in_the_list_does_not_hold_the_order_once_the_pointer_leaves(page, clean_server):
    post(clean_server, [task("slow", n=10), task("fast", n=50), task("victim", n=30)])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&sort=progress")
    row(page, "victim").get_by_role("button", name="Remove victim").click()
    expect(row(page, "victim")).to_have_count(0)
    page.mouse_move(5, 5)  # the pointer leaves; focus stays in the list, from a click
    post(clean_server, task("fast", n=5, seq=2))
    expect(page.locator(f"{VISIBLE_TASK_ROWS} .desc")).to_have_text(["fast", "slow"])


def test_a_group_of_unknown_progress_does_not_read_as_done(page, clean_server):
    post(clean_server, [task("crawl", total=None, n=5, meta={"host": "h1"})])
    open_dashboard(page, clean_server, query=f"?token={TOKEN}&group=host")
    fill = page.locator(".row.group:not([hidden]) .bar .fill").first
    expect(fill).to_be_visible()
    assert float(fill.evaluate("el => getComputedStyle(el).opacity")) < 0.5


def test_controls_are_reachable_from_the_keyboard(page, clean_server):
    post(clean_server, task("keyed", meta={"host": "kb-host", "job": "99"}))
    open_dashboard(page, clean_server)
    expect(row(page, "keyed")).to_be_visible()
    page.locator("body").press("/")
    expect(page.locator("#filter")).to_be_focused()
    for _ in range(6):  # filter, status, sort, group, clear finished (disabled: skipped), info
        if page.evaluate("() => document.activeElement.dataset.action") == "details":
            break
        page.press("Tab")
    expect(row(page, "keyed").locator("button.info")).to_be_focused()
    page.press("Enter")
    expect(page.locator("#details")).to_be_visible()
    expect(page.locator("#details")).to_contain_text("meta.host")
    expect(page.locator("#details")).to_contain_text("kb-host")
    for key in ("Tab", "Shift+Tab", "Tab"):  # Tab stays in the panel while it is open
        page.press(key)
        assert page.evaluate("() => document.getElementById('details').contains(document.activeElement)")
    page.press("Escape")
    expect(page.locator("#details")).to_be_hidden()
    expect(row(page, "keyed").locator("button.info")).to_be_focused()


@not_on("webkit", reason="MiniBrowser's window is at least 447 px wide (GTK's minimum)")
def test_phone_width_and_dark_theme_stay_readable(page, clean_server):
    page.set_viewport(390, 800)
    page.emulate_media(color_scheme="dark")
    post(clean_server, realistic_mix())
    open_dashboard(page, clean_server)
    assert page.evaluate("() => matchMedia('(prefers-color-scheme: dark)').matches")
    first = page.locator(VISIBLE_TASK_ROWS).first
    expect(first).to_be_visible()
    assert first.bounding_box()["height"] == 96  # four lines per row on a phone
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # no sideways scroll
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert sum(int(c) for c in re.findall(r"\d+", background)[:3]) < 150, background


def awkward_numbers():
    """Values that are long once formatted: a tiny rate, a huge count, long texts."""
    return [
        task("tiny-rate", desc="Tiny rate", n=1, total=1_000_000, rate=1e-7, elapsed=1e7),
        task("big-download", desc="Downloading images from the archive", n=3.7e9, total=1.5e11,
             unit="B", unit_scale=True, unit_divisor=1024, rate=1.17e8, elapsed=31),
        task("long", desc="L" * 300, n=123456789, total=987654321, unit="sample", rate=123456.78,
             elapsed=99999, postfix="p" * 500),
        task("fails", desc="A failing job", n=5, total=10, status="error", error="E" * 400),
    ]


# Every drawn task row: the boxes of its parts, whether each part's text fits or is clipped,
# and the viewport width.
ROW_BOXES_JS = """() => ({ width: document.documentElement.clientWidth,
    scrollWidth: document.documentElement.scrollWidth,
    rows: [...document.querySelectorAll('#list .row.task')]
        .filter(row => row.getClientRects().length > 0)
        .map(row => ['status', 'desc', 'pct', 'count', 'time', 'rate', 'info', 'remove']
            .map(name => row.querySelector('.' + name))
            .filter(part => part.getClientRects().length > 0)
            .map(part => {
                const box = part.getBoundingClientRect();
                const style = getComputedStyle(part);
                return { name: part.className, left: box.left, right: box.right, top: box.top,
                         bottom: box.bottom, whole: part.scrollWidth <= part.clientWidth + 1,
                         textFits: style.overflow === 'hidden' || part.scrollWidth <= part.clientWidth + 1 };
            })) })"""


# 480: the narrow layout where WebKit can show it too (MiniBrowser windows are >= 447 px)
@pytest.mark.parametrize("width", [720, 480])
def test_long_numbers_never_push_controls_off_screen_or_overlap(page, clean_server, width):
    check_long_numbers_fit(page, clean_server, width)


@not_on("webkit", reason="MiniBrowser's window is at least 447 px wide (GTK's minimum)")
def test_long_numbers_never_push_controls_off_screen_or_overlap_at_phone_width(
        page, clean_server):
    check_long_numbers_fit(page, clean_server, 375)


def check_long_numbers_fit(page, clean_server, width):
    page.set_viewport(width, 800)
    post(clean_server, awkward_numbers())
    open_dashboard(page, clean_server)
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(4)
    layout = page.evaluate(ROW_BOXES_JS)
    assert layout["scrollWidth"] <= width  # no sideways scroll
    for parts in layout["rows"]:
        named = {part["name"]: part for part in parts}
        for name in ("info", "remove"):
            assert named[name]["right"] <= layout["width"], (name, named[name])
        assert named["desc"]["right"] - named["desc"]["left"] >= 60, named["desc"]  # the name shows
        assert "pct" not in named or named["pct"]["whole"], named["pct"]  # the percent is never cut
        for part in parts:
            assert part["textFits"], part  # text that does not fit is clipped in its own box
        for i, a in enumerate(parts):
            for b in parts[i + 1:]:
                same_line = a["top"] < b["bottom"] - 1 and b["top"] < a["bottom"] - 1
                apart = a["right"] <= b["left"] + 0.5 or b["right"] <= a["left"] + 0.5
                assert not same_line or apart, (a, b)


@not_on("webkit", reason="classic WebDriver has no media emulation, MiniBrowser no flag")
def test_progress_bars_stay_visible_in_forced_colors_mode(page, clean_server):
    page.emulate_media(forced_colors="active")
    post(clean_server, task("contrast", n=50))
    open_dashboard(page, clean_server)
    assert page.evaluate("() => matchMedia('(forced-colors: active)').matches")  # emulated indeed
    bar = row(page, "contrast").locator(".bar")
    expect(bar).to_be_visible()
    colors = bar.evaluate("""bar => ({ track: getComputedStyle(bar).backgroundColor,
        border: getComputedStyle(bar).borderTopWidth,
        fill: getComputedStyle(bar.querySelector('.fill')).backgroundColor })""")
    assert colors["fill"] != colors["track"] and colors["fill"] != "rgba(0, 0, 0, 0)", colors
    assert colors["border"] != "0px", colors


# --- Scale ----------------------------------------------------------------------------------


# The largest gap between animation frames, from start to stop: a busy main thread shows as a
# long gap. Stopping waits for one more frame, so the gap after the last busy frame counts.
START_FRAME_GAP_RECORDER_JS = """() => {
    const recorder = window.frameGapRecorder = { largest: 0, last: null, running: true };
    const step = (now) => {
        if (recorder.last !== null) recorder.largest = Math.max(recorder.largest, now - recorder.last);
        recorder.last = now;
        if (recorder.running) requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
}"""
STOP_FRAME_GAP_RECORDER_JS = """() => new Promise(resolve => requestAnimationFrame((now) => {
    const recorder = window.frameGapRecorder;
    recorder.running = false;
    resolve(Math.max(recorder.largest, now - recorder.last));
}))"""


def test_two_thousand_tasks_render_windowed_and_the_page_stays_responsive(page, clean_server):
    tasks = [task(f"bulk-{i:04d}", desc=f"bulk task {i:04d}", n=i % 100,
                  meta={"host": f"node-{i % 20}"}) for i in range(2000)]
    post(clean_server, tasks[:1000])
    post(clean_server, tasks[1000:])
    open_dashboard(page, clean_server)
    expect(page.locator("#summary")).to_contain_text("2000 tasks")
    # only the rows in view exist in the DOM
    assert page.locator(VISIBLE_TASK_ROWS).count() < 80

    started = time.monotonic()
    page.locator("#filter").fill("bulk task 1999")
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(1)
    page.locator("#filter").fill("")
    page.locator("#group").select_option("host")
    expect(page.locator(".row.group:not([hidden])").first).to_contain_text("100 tasks")
    page.locator("#group").select_option("")
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    expect(row(page, "bulk task 0000")).to_be_visible()  # newest first: the oldest is last
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"filter, group and scroll took {elapsed:.1f} s"

    # while the page applies 1,000 updates to 2,000 tasks, no frame takes long: the recorder
    # runs from before the POST until a frame after the updated rows are drawn
    page.evaluate(START_FRAME_GAP_RECORDER_JS)
    post(clean_server, [dict(t, n=99, seq=5) for t in tasks[:1000]])
    expect(row(page, "bulk task 0000")).to_contain_text("99%")
    expect(row(page, "bulk task 0010")).to_contain_text("99%")
    largest_gap_ms = page.evaluate(STOP_FRAME_GAP_RECORDER_JS)
    assert largest_gap_ms < 1000, f"a frame took {largest_gap_ms:.0f} ms while updating"


# --- Artifact --------------------------------------------------------------------------------


def realistic_mix():
    """Tasks like a day of work on a few machines: training, downloads, ETL, a failure."""
    now = time.time()
    mix = [
        task("train-resnet", desc="train resnet50 · epoch 7/30", n=3120, total=5005, rate=41.7,
             elapsed=76, postfix="loss=0.412, acc=0.871", meta={"host": "gpu-01", "job": "exp-142"}),
        task("train-vit", desc="train vit-b16 · epoch 2/10", n=815, total=2502, rate=12.2,
             elapsed=68, postfix="loss=1.03", meta={"host": "gpu-02", "job": "exp-143"}),
        task("download", desc="download imagenet shard 14", n=3.7e9, total=6.4e9, unit="B",
             unit_scale=True, unit_divisor=1024, rate=48e6, elapsed=80,
             meta={"host": "gpu-01", "job": "prep-9"}),
        task("etl-crawl", desc="crawl product pages", n=48211, total=None, unit="page", rate=312.4,
             elapsed=154, meta={"host": "cpu-07", "job": "etl-88"}),
        task("etl-parse", desc="parse logs 2024-05", n=912, total=912, unit="file", rate=55.1,
             elapsed=16.5, status="close", meta={"host": "cpu-07", "job": "etl-88"}),
        task("eval", desc="evaluate checkpoint 12", n=430, total=1000, rate=9.8, elapsed=44,
             status="error", error="RuntimeError: CUDA out of memory (tried to allocate 2.00 GiB)",
             meta={"host": "gpu-02", "job": "exp-143"}),
        task("backup", desc="rsync /data to backup", n=1.2e11, total=3.1e11, unit="B",
             unit_scale=True, unit_divisor=1024, rate=2.1e8, elapsed=590,
             meta={"host": "nas-1", "job": "nightly"}),
        task("render", desc="render frames", n=1440, total=1440, unit="frame", rate=6.0,
             elapsed=240, status="close", meta={"host": "cpu-03", "job": "video-5"}),
        task("embed", desc="embed documents", n=77000, total=250000, unit="doc", rate=1200,
             elapsed=64, postfix="batch=256", meta={"host": "gpu-03", "job": "rag-2"}),
    ]
    for item in mix:
        item["timestamp"] = now
    return mix


def test_screenshot_of_a_realistic_mix_is_saved_as_an_artifact(page, clean_server):
    post(clean_server, realistic_mix())
    page.set_viewport(1100, 760)
    if page.engine != "webkit":  # WebKit has no media emulation: its image may show a stripe
        page.emulate_media(reduced_motion="reduce")  # a still image of the indeterminate bar
    open_dashboard(page, clean_server)
    expect(page.locator(VISIBLE_TASK_ROWS)).to_have_count(9)
    ARTIFACTS.mkdir(exist_ok=True)
    # Chromium's keeps the name it always had; the others are named for their engine
    path = ARTIFACTS / ("dashboard.png" if page.engine == "chromium" else f"dashboard-{page.engine}.png")
    page.screenshot(path)
    assert path.stat().st_size > 10_000
