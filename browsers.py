"""One way to drive a page in Chromium, Firefox and WebKit, for the dashboard's browser tests.

Test support, not shipped (setup.cfg's py_modules lists only the two product modules).
Each engine comes from Debian's packages and is driven by what it speaks natively:

- Chromium (`chromium`): Playwright's sync API with `executable_path=/usr/bin/chromium`;
- Firefox (`firefox-esr`): WebDriver BiDi over a `websockets` client
  (`firefox-esr --headless --remote-debugging-port PORT --profile DIR`);
- WebKit (`webkit2gtk-driver`, `xvfb`): W3C classic WebDriver over HTTP+JSON with `urllib`
  (`xvfb-run -a WebKitWebDriver --port=PORT`, which starts WebKitGTK's MiniBrowser).

`launch(engine)` starts one browser process; `browser.new_page()` gives a fresh page.
A `Page` has one API on every engine: `goto`, `evaluate(js_function, arg)`, `locator(css)`,
`press`, `type`, `mouse_move`, `set_viewport`, `emulate_media`, `add_init_script`,
`screenshot`, `console_messages`, `console_errors` and `csp_violations`; `expect(...)` waits for a locator or
page condition with a deadline. Where an engine cannot do something, the call skips the
test with the reason (`pytest.skip`). docs/browsers.md is the guide.
"""

import base64
import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

from conftest import free_port, wait_for   # one helper per job: the suite's own

__all__ = ["ENGINES", "EngineMissing", "launch", "expect", "Page", "Locator"]

ENGINES = ("chromium", "firefox", "webkit")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIREFOX = "firefox-esr"
WEBKIT_DRIVER = "WebKitWebDriver"
XVFB_RUN = "xvfb-run"
MINIBROWSER_GLOB = "/usr/lib/*/webkit2gtk-4.*/MiniBrowser"

# Timeouts
START_TIMEOUT_S = 30.0        # a browser and its driver answering, on a loaded 2-core machine
COMMAND_TIMEOUT_S = 30.0      # one driver command (a navigation waits for the page's load event)
EXPECT_TIMEOUT_S = 10.0       # default deadline of an `expect(...)` assertion
POLL_INTERVAL_S = 0.05        # between two looks at the page while waiting
STOP_TIMEOUT_S = 10.0         # a browser closing by itself before it is killed
RESIZE_TIMEOUT_S = 2.0        # MiniBrowser's window taking the size WebDriver asked for

DEFAULT_VIEWPORT = (1200, 800)

# Firefox must not call home: there is no network here, and a test must not depend on one.
FIREFOX_PREFS = {
    "app.normandy.enabled": False,
    "app.update.auto": False,
    "app.update.enabled": False,
    "browser.aboutwelcome.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.ping-centre.telemetry": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.search.update": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage": "about:blank",
    "browser.startup.page": 0,
    "captivedetect.canonicalURL": "",
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.http.speculative-parallel-limit": 0,
    "network.prefetch-next": False,
    "remote.prefs.recommended": True,
    "services.settings.server": "http://127.0.0.1:9/",   # remote settings: a closed port
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.server": "",
    "toolkit.telemetry.unified": False,
}

# Firefox's BiDi has no media emulation yet (emulation.setColorSchemeOverride is unknown to
# 153 ESR), so the Firefox driver flips the prefs behind these media queries, in the parent
# process (`--remote-allow-system-access`), for one page, and puts them back after it.
FIREFOX_MEDIA_PREFS = {
    ("color_scheme", "dark"): {"ui.systemUsesDarkTheme": 1,
                               "layout.css.prefers-color-scheme.content-override": 2},
    ("color_scheme", "light"): {"ui.systemUsesDarkTheme": 0,
                                "layout.css.prefers-color-scheme.content-override": 2},
    ("forced_colors", "active"): {"browser.display.document_color_use": 2},
    ("reduced_motion", "reduce"): {"ui.prefersReducedMotion": 1},
}

CONSOLE_LEVELS = ("debug", "info", "log", "warn", "error")

# Page-side recorder of CSP violations (every engine) and of console messages and uncaught
# errors (for WebKit, whose classic WebDriver has no log), installed before the page's own
# script where the engine can (Chromium, Firefox), right after the load where it cannot.
RECORDER_JS = """() => {
    if (window.__browserLog) return;
    const log = window.__browserLog = { csp: [], console: [] };
    addEventListener('securitypolicyviolation', (event) => log.csp.push(
        `${event.violatedDirective} blocked ${event.blockedURI || 'inline'}`));
    addEventListener('error', (event) => log.console.push(['error', String(event.message)]));
    addEventListener('unhandledrejection', (event) => log.console.push(['error', String(event.reason)]));
    for (const level of %s) {
        const original = console[level].bind(console);
        console[level] = (...args) => { log.console.push([level, args.map(String).join(' ')]); original(...args); };
    }
}""" % json.dumps(CONSOLE_LEVELS)

# W3C WebDriver key codes (shared by classic WebDriver and BiDi input.performActions).
KEYS = {"Enter": "\ue007", "Tab": "\ue004", "Escape": "\ue00c", "Shift": "\ue008",
        "Control": "\ue009", "Alt": "\ue00a", "Meta": "\ue03d", "Backspace": "\ue003",
        "Delete": "\ue017", "ArrowLeft": "\ue012", "ArrowUp": "\ue013", "ArrowRight": "\ue014",
        "ArrowDown": "\ue015", "Home": "\ue011", "End": "\ue010", "PageUp": "\ue00e",
        "PageDown": "\ue00f", "Space": " "}



# Scrolls an element to the middle of the window unless it is wholly in view: what a
# pointer action on it needs first, in the engines driven by WebDriver.
SCROLL_INTO_VIEW_JS = """(el) => { const box = el.getBoundingClientRect();
    if (box.top < 0 || box.bottom > innerHeight || box.left < 0 || box.right > innerWidth)
        el.scrollIntoView({ block: 'center', inline: 'center' }); }"""

class EngineMissing(Exception):
    """An engine's binary or package is not installed here."""


def key_actions(chord):
    """WebDriver key actions for a chord like "Enter", "/", "Shift+Tab" (press in order,
    release in reverse)."""
    names = chord.split("+") if len(chord) > 1 else [chord]
    values = [KEYS.get(name, name) for name in names]
    for value in values:
        if len(value) != 1:
            raise ValueError(f"unknown key {value!r} in {chord!r}: use a name from browsers.KEYS")
    return ([{"type": "keyDown", "value": v} for v in values]
            + [{"type": "keyUp", "value": v} for v in reversed(values)])


def type_actions(text):
    return [action for char in text for action in
            ({"type": "keyDown", "value": char}, {"type": "keyUp", "value": char})]


def wait_until(condition, timeout, message):
    return wait_for(condition, timeout=timeout, interval=POLL_INTERVAL_S, message=message)


def stop_process_group(process):
    """End a browser we started (its own session leader) and everything it started."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)
    # children that outlived the leader (xvfb-run's Xvfb, Firefox's content processes)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def launch(engine):
    """Start one browser of `engine`; raises EngineMissing with the reason when it is not here."""
    return {"chromium": ChromiumBrowser, "firefox": FirefoxBrowser, "webkit": WebKitBrowser}[engine]()


# --- Locators and expect ------------------------------------------------------------------

# Resolves a chain of steps to the matching elements: each step is a CSS selector looked up
# inside every match of the step before (or none, to narrow those down), optionally kept only when its text contains a
# string (or matches a regex), or when its accessible name is exactly `name`, then `nth`.
RESOLVE_JS = """(steps) => {
    const norm = (s) => (s || '').replace(/\\s+/g, ' ').trim();
    const name = (el) => norm(el.getAttribute('aria-label') || el.textContent);
    let found = [document];
    for (const step of steps) {
        const next = step.css === null ? found : [];   // null: narrow down the same elements
        if (step.css !== null)
            for (const scope of found)
                for (const el of scope.querySelectorAll(step.css))
                    if (!next.includes(el)) next.push(el);
        found = next.filter((el) => {
            if (step.text !== null && !norm(el.textContent).includes(step.text)) return false;
            if (step.regex !== null && !new RegExp(step.regex[0], step.regex[1]).test(norm(el.textContent))) return false;
            if (step.name !== null && name(el) !== step.name) return false;
            return true;
        });
        if (step.nth !== null) found = found.at(step.nth) ? [found.at(step.nth)] : [];
    }
    return found;
}"""

# What `expect` looks at: for every match, its text, visibility, focus, value and attributes.
SNAPSHOT_JS = """(steps) => (%s)(steps).map((el) => {
    const box = el.getBoundingClientRect();
    const attributes = {};
    for (const attribute of el.attributes) attributes[attribute.name] = attribute.value;
    return { text: (el.textContent || '').replace(/\\s+/g, ' ').trim(),
             visible: box.width > 0 && box.height > 0 && getComputedStyle(el).visibility !== 'hidden',
             focused: el === document.activeElement, disabled: !!el.disabled,
             value: 'value' in el ? String(el.value) : null, attributes };
})""" % RESOLVE_JS


def _text_filter(has_text):
    if has_text is None:
        return None, None
    if isinstance(has_text, re.Pattern):
        return None, [has_text.pattern, "i" if has_text.flags & re.I else ""]
    return re.sub(r"\s+", " ", has_text).strip(), None


class Locator:
    """A way to find elements, looked up afresh on every use (as Playwright's locators)."""

    def __init__(self, page, steps):
        self.page = page
        self.steps = steps

    def _step(self, css, has_text=None, name=None, nth=None):
        text, regex = _text_filter(has_text)
        return Locator(self.page, self.steps + [{"css": css, "text": text, "regex": regex,
                                                 "name": name, "nth": nth}])

    def locator(self, css, has_text=None):
        return self._step(css, has_text)

    def get_by_role(self, role, name=None):
        roles = {"button": "button, [role=button]", "progressbar": "[role=progressbar], progress"}
        if role not in roles:
            raise ValueError(f"role {role!r}: add its selector to Locator.get_by_role ({sorted(roles)})")
        css = roles[role]
        return self._step(css, name=name)

    def filter(self, has_text):
        return self._step(None, has_text)

    def nth(self, index):
        last = dict(self.steps[-1], nth=index) if self.steps[-1]["nth"] is None else None
        if last is None:
            return self._step(None, nth=index)
        return Locator(self.page, self.steps[:-1] + [last])

    @property
    def first(self):
        return self.nth(0)

    def __repr__(self):
        return " >> ".join((s["css"] or "") + (f" has {s['text'] or s['regex']!r}" if s["text"] or s["regex"] else "")
                           + (f" named {s['name']!r}" if s["name"] else "")
                           + (f" [{s['nth']}]" if s["nth"] is not None else "") for s in self.steps)

    def snapshot(self):
        return self.page.evaluate(SNAPSHOT_JS, self.steps)

    def count(self):
        return len(self.snapshot())

    def _wait_for_one(self, timeout, visible):
        """Wait for exactly one match (and a visible one when `visible`); more than one is an
        error (a vague locator), as with Playwright's strict locators."""
        def one():
            snapshot = self.snapshot()
            if len(snapshot) > 1:
                raise AssertionError(f"{self!r} matches {len(snapshot)} elements, not one")
            return len(snapshot) == 1 and (snapshot[0]["visible"] or not visible)
        wait_until(one, timeout, f"{self!r} to be {'visible' if visible else 'there'}")

    def _call(self, js_function):
        return self.page.evaluate(
            f"(steps) => ({js_function})(({RESOLVE_JS})(steps)[0])", self.steps)

    def _act(self, js_function):
        """What a user does to the one visible match, done by a script."""
        self._wait_for_one(EXPECT_TIMEOUT_S, visible=True)
        return self._call(js_function)

    def element(self, timeout=EXPECT_TIMEOUT_S):
        """An engine handle to the one visible match, waited for."""
        self._wait_for_one(timeout, visible=True)
        return self.page.element(f"(steps) => ({RESOLVE_JS})(steps)[0]", self.steps)

    def evaluate(self, js_function, timeout=EXPECT_TIMEOUT_S):
        """Call `js_function(element)` on the one match, visible or not (as Playwright does)."""
        self._wait_for_one(timeout, visible=False)
        return self._call(js_function)

    def bounding_box(self):
        return self.evaluate("(el) => { const b = el.getBoundingClientRect(); "
                             "return { x: b.x, y: b.y, width: b.width, height: b.height }; }")

    def get_attribute(self, name):
        return self.evaluate(f"(el) => el.getAttribute({json.dumps(name)})")

    def click(self):
        self.page.click_element(self.element())

    def hover(self):
        self.page.hover_element(self.element())

    def focus(self):
        self._act("(el) => el.focus()")

    def dispatch_click(self):
        """A synthetic click event, whatever covers the element (Playwright's dispatch_event)."""
        self._act("(el) => el.click()")

    def press(self, chord):
        self.focus()
        self.page.press(chord)

    def fill(self, text):
        """Focus, select what is there, and type `text` over it (Backspace when empty)."""
        self._act("(el) => { el.focus(); el.select(); }")
        if text:
            self.page.type(text)
        else:
            self.page.press("Backspace")

    def select_option(self, value):
        """Choose an <option> by value, with the input and change events a user's choice fires."""
        self._act(f"""(el) => {{ el.value = {json.dumps(value)};
            el.dispatchEvent(new Event('input', {{ bubbles: true }}));
            el.dispatchEvent(new Event('change', {{ bubbles: true }})); }}""")


def _matches(expected, actual, contain=False):
    if isinstance(expected, re.Pattern):
        return expected.search(actual) is not None
    expected = re.sub(r"\s+", " ", expected).strip()
    return expected in actual if contain else expected == actual


class Expectation:
    """Assertions that wait: each looks at the page until it holds or the deadline passes."""

    def __init__(self, subject, negate=False):
        self.subject = subject
        self.negate = negate

    @property
    def not_(self):
        return Expectation(self.subject, not self.negate)

    def _wait(self, check, description, timeout):
        seen = {}

        def holds():
            result, seen["last"] = check()
            return result != self.negate
        try:
            wait_until(holds, EXPECT_TIMEOUT_S if timeout is None else timeout,
                       f"{self.subject!r} {'not ' if self.negate else ''}{description}")
        except AssertionError as error:
            raise AssertionError(f"{error}; last seen: {seen.get('last')!r}") from None

    def _one(self, check, description, timeout):
        def on_one():
            snapshot = self.subject.snapshot()
            if len(snapshot) > 1:
                raise AssertionError(f"{self.subject!r} matches {len(snapshot)} elements, not one")
            if not snapshot:
                return False, "no element"
            return check(snapshot[0])
        self._wait(on_one, description, timeout)

    # Locator assertions
    def to_have_text(self, expected, timeout=None):
        if isinstance(expected, (list, tuple)):
            def all_texts():
                texts = [e["text"] for e in self.subject.snapshot()]
                return (len(texts) == len(expected)
                        and all(_matches(x, t) for x, t in zip(expected, texts))), texts
            return self._wait(all_texts, f"to have texts {expected!r}", timeout)
        self._one(lambda e: (_matches(expected, e["text"]), e["text"]),
                  f"to have text {expected!r}", timeout)

    def to_contain_text(self, expected, timeout=None):
        self._one(lambda e: (_matches(expected, e["text"], contain=True), e["text"]),
                  f"to contain text {expected!r}", timeout)

    def to_have_attribute(self, name, value, timeout=None):
        self._one(lambda e: (e["attributes"].get(name) is not None
                             and _matches(value, e["attributes"][name]), e["attributes"].get(name)),
                  f"to have {name}={value!r}", timeout)

    def to_have_class(self, expected, timeout=None):
        self._one(lambda e: (_matches(expected, e["attributes"].get("class", "")),
                             e["attributes"].get("class")), f"to have class {expected!r}", timeout)

    def to_have_value(self, expected, timeout=None):
        self._one(lambda e: (e["value"] == expected, e["value"]), f"to have value {expected!r}", timeout)

    def to_have_count(self, expected, timeout=None):
        def count():
            n = len(self.subject.snapshot())
            return n == expected, n
        self._wait(count, f"to have count {expected}", timeout)

    def to_be_visible(self, timeout=None):
        self._one(lambda e: (e["visible"], e), "to be visible", timeout)

    def to_be_hidden(self, timeout=None):
        def hidden():
            snapshot = self.subject.snapshot()
            return not any(e["visible"] for e in snapshot), snapshot
        self._wait(hidden, "to be hidden", timeout)

    def to_be_focused(self, timeout=None):
        self._one(lambda e: (e["focused"], e), "to be focused", timeout)

    def to_be_disabled(self, timeout=None):
        self._one(lambda e: (e["disabled"], e), "to be disabled", timeout)

    # Page assertions
    def to_have_title(self, expected, timeout=None):
        def title():
            actual = self.subject.evaluate("() => document.title")
            return _matches(expected, actual), actual
        self._wait(title, f"to have title {expected!r}", timeout)

    # Any condition
    def to_be_true(self, js_function, arg=None, timeout=None):
        """`js_function(arg)` evaluated in the page (a Page subject) returns something truthy."""
        def truthy():
            value = self.subject.evaluate(js_function, arg)
            return bool(value), value
        self._wait(truthy, f"{js_function} to be truthy", timeout)


def expect(subject):
    return Expectation(subject)


# --- The page API -------------------------------------------------------------------------


class Page:
    """One tab of one engine. Subclasses implement the engine's part; the rest is shared."""

    engine = None
    reports_console = True

    def __init__(self):
        self._console = []   # (level, text) as the engine reports them

    def _unsupported(self, what):
        # A test that needs this is marked not_on(engine) and never made for this engine;
        # reaching here is a test that forgot to say so: under CI, a failure.
        message = (f"{self.engine} cannot {what}: mark the test not_on({self.engine!r}, "
                   "reason=...)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    # To implement per engine
    def goto(self, url):
        raise NotImplementedError

    def evaluate(self, js_function, arg=None):
        """Call the JS function (source text) with one JSON-able argument; return its value
        as JSON. The page's CSP does not apply to it on any engine."""
        raise NotImplementedError

    def element(self, js_function, arg=None):
        """An engine handle to the element `js_function(arg)` returns."""
        raise NotImplementedError

    def click_element(self, element):
        raise NotImplementedError

    def hover_element(self, element):
        raise NotImplementedError

    def mouse_move(self, x, y):
        raise NotImplementedError

    def press(self, chord):
        """Press and release a key or chord ("Enter", "Shift+Tab", "/") on the focused element."""
        raise NotImplementedError

    def type(self, text):
        raise NotImplementedError

    def set_viewport(self, width, height):
        raise NotImplementedError

    def emulate_media(self, *, color_scheme=None, forced_colors=None, reduced_motion=None):
        """Emulate media features for what this page loads next; skips the test where the
        engine cannot."""
        raise NotImplementedError

    def add_init_script(self, js):
        """Run `js` (statements) before the page's own script on every later navigation."""
        raise NotImplementedError

    def screenshot(self, path):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    # Shared
    def locator(self, css, has_text=None):
        return Locator(self, [])._step(css, has_text)

    @property
    def url(self):
        return self.evaluate("() => location.href")

    def _log(self):
        return self.evaluate("() => window.__browserLog || { csp: [], console: [] }")

    @property
    def csp_violations(self):
        """Every securitypolicyviolation event the page fired (directive and what it blocked)."""
        return self._log()["csp"]

    @property
    def console_messages(self):
        """(level, text) of every console message and uncaught error ("error"): as the engine
        reports them (Chromium, Firefox), or as the page-side recorder saw them since the
        load (WebKit). Levels: debug, info, log, warn, error."""
        if self.reports_console:
            return list(self._console)
        return [tuple(message) for message in self._log()["console"]]

    @property
    def console_errors(self):
        """The texts of console.error messages and uncaught errors."""
        return [text for level, text in self.console_messages if level == "error"]


# --- Chromium: Playwright -----------------------------------------------------------------


class ChromiumBrowser:
    engine = "chromium"

    def __init__(self):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise EngineMissing("the playwright Python package is not installed (pip install -e .[test])")
        if not os.path.exists(CHROMIUM):
            raise EngineMissing(f"Debian chromium not installed ({CHROMIUM} not found)")
        self.playwright = sync_playwright().start()
        try:
            self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception:
            self.playwright.stop()
            raise
        self.version = f"Chromium {self.browser.version}"

    def new_page(self):
        return ChromiumPage(self.browser)

    def close(self):
        try:
            self.browser.close()
        finally:
            self.playwright.stop()


class ChromiumPage(Page):
    engine = "chromium"

    def __init__(self, browser):
        super().__init__()
        width, height = DEFAULT_VIEWPORT
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.add_init_script(f"({RECORDER_JS})();")
        self.page = self.context.new_page()
        self._media = {}
        # Playwright says "warning" where the console method and BiDi say "warn"
        self.page.on("console", lambda message: self._console.append(
            ("warn" if message.type == "warning" else message.type, message.text)))
        self.page.on("pageerror", lambda error: self._console.append(("error", str(error))))

    def goto(self, url):
        self.page.goto(url)

    def evaluate(self, js_function, arg=None):
        return self.page.evaluate(js_function, arg)

    def element(self, js_function, arg=None):
        return self.page.evaluate_handle(js_function, arg).as_element()

    def click_element(self, element):
        element.click()

    def hover_element(self, element):
        element.hover()

    def mouse_move(self, x, y):
        self.page.mouse.move(x, y)

    def press(self, chord):
        self.page.keyboard.press(chord)

    def type(self, text):
        self.page.keyboard.type(text)

    def set_viewport(self, width, height):
        self.page.set_viewport_size({"width": width, "height": height})

    def emulate_media(self, *, color_scheme=None, forced_colors=None, reduced_motion=None):
        media = {"color_scheme": color_scheme, "forced_colors": forced_colors,
                 "reduced_motion": reduced_motion}
        self._media.update({k: v for k, v in media.items() if v is not None})
        self.page.emulate_media(**self._media)

    def add_init_script(self, js):
        self.context.add_init_script(js)

    def screenshot(self, path):
        self.page.screenshot(path=str(path))

    def close(self):
        self.context.close()


# --- Firefox: WebDriver BiDi over websockets -----------------------------------------------


class BiDiError(Exception):
    pass


class BiDiConnection:
    """Commands and events over one WebSocket: a reader thread hands each response to the
    command waiting for it and each event to the subscribers."""

    def __init__(self, url):
        from websockets.sync.client import connect
        self.exit_stack = contextlib.ExitStack()   # websockets wants its connect() entered
        self.socket = self.exit_stack.enter_context(
            connect(url, max_size=None, open_timeout=COMMAND_TIMEOUT_S))
        self.ids = itertools.count(1)
        self.pending = {}
        self.lock = threading.Lock()
        self.listeners = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        from websockets.exceptions import ConnectionClosed
        try:
            for raw in self.socket:
                message = json.loads(raw)
                if "id" in message and message["id"] is not None:
                    with self.lock:
                        slot = self.pending.get(message["id"])
                    if slot is not None:
                        slot["message"] = message
                        slot["done"].set()
                elif message.get("type") == "event":
                    for listener in list(self.listeners):
                        listener(message["method"], message["params"])
        except ConnectionClosed:
            pass
        finally:
            with self.lock:
                for slot in self.pending.values():
                    slot["done"].set()

    def command(self, method, params, timeout=COMMAND_TIMEOUT_S):
        command_id = next(self.ids)
        slot = {"done": threading.Event(), "message": None}
        with self.lock:
            self.pending[command_id] = slot
        try:
            self.socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
            if not slot["done"].wait(timeout):
                raise BiDiError(f"{method}: no answer in {timeout} s")
        finally:
            with self.lock:
                self.pending.pop(command_id, None)
        message = slot["message"]
        if message is None:
            raise BiDiError(f"{method}: the connection closed")
        if message.get("type") == "error":
            raise BiDiError(f"{method}: {message['error']}: {message.get('message')}")
        return message["result"]

    def close(self):
        self.exit_stack.close()


def to_bidi(value):
    """A JSON-able Python value as a BiDi LocalValue."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, (int, float)):
        if value != value:
            return {"type": "number", "value": "NaN"}
        if value in (float("inf"), float("-inf")):
            return {"type": "number", "value": "Infinity" if value > 0 else "-Infinity"}
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, (list, tuple)):
        return {"type": "array", "value": [to_bidi(item) for item in value]}
    if isinstance(value, dict):
        return {"type": "object", "value": [[str(k), to_bidi(v)] for k, v in value.items()]}
    if isinstance(value, FirefoxElement):
        return {"sharedId": value.shared_id}
    raise TypeError(f"cannot pass {type(value).__name__} to the page")


def from_bidi(remote):
    """A BiDi RemoteValue as Python, as JSON.stringify would give it (undefined is None)."""
    kind, value = remote["type"], remote.get("value")
    if kind in ("undefined", "null"):
        return None
    if kind == "number":
        return {"NaN": float("nan"), "-0": -0.0, "Infinity": float("inf"),
                "-Infinity": float("-inf")}.get(value, value) if isinstance(value, str) else value
    if kind in ("string", "boolean"):
        return value
    if kind == "bigint":
        return int(value)
    if kind in ("array", "set", "nodelist", "htmlcollection"):
        return [from_bidi(item) for item in value or []]
    if kind in ("object", "map"):
        return {(k if isinstance(k, str) else str(from_bidi(k))): from_bidi(v) for k, v in value or []}
    if kind == "date":
        return value
    if kind == "regexp":
        return value
    return {"type": kind}


class FirefoxElement:
    def __init__(self, shared_id):
        self.shared_id = shared_id


class FirefoxBrowser:
    engine = "firefox"

    def __init__(self):
        binary = shutil.which(FIREFOX)
        if not binary:
            raise EngineMissing(f"Debian firefox-esr not installed ({FIREFOX} not found)")
        self.profile = tempfile.mkdtemp(prefix="progressista-firefox-")
        with open(os.path.join(self.profile, "user.js"), "w") as prefs:
            for name, value in FIREFOX_PREFS.items():
                prefs.write(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n")
        port = free_port()
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-remote", "--remote-debugging-port", str(port),
             "--remote-allow-hosts", "127.0.0.1", "--remote-allow-system-access",
             "--profile", self.profile],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)   # its own process group: close() ends all it started
        try:
            self.bidi = wait_until(lambda: self._connect(port), START_TIMEOUT_S,
                                   f"Firefox's WebDriver BiDi on port {port}")
            session = self.bidi.command("session.new", {"capabilities": {}})
            self.version = f"Firefox {session['capabilities']['browserVersion']}"
            self.bidi.command("session.subscribe", {"events": ["log.entryAdded"]})
            self.listeners = {}
            self.bidi.listeners.append(self._on_event)
            self.chrome_context = None
        except BaseException:
            self.close()
            raise

    def _connect(self, port):
        if self.process.poll() is not None:
            raise EngineMissing(f"firefox-esr exited with {self.process.returncode} at start")
        try:
            return BiDiConnection(f"ws://127.0.0.1:{port}/session")
        except Exception:  # refused until it listens; handshake errors too
            return None

    def _on_event(self, method, params):
        if method == "log.entryAdded":
            listener = self.listeners.get(params.get("source", {}).get("context"))
            if listener:
                # BiDi's level folds console.log into "info": the method keeps it apart
                level = params.get("level")
                if params.get("type") == "console" and params.get("method") in CONSOLE_LEVELS:
                    level = params["method"]
                listener((level, params.get("text") or ""))

    def set_prefs(self, prefs):
        """Set parent-process prefs; returns what they were (None: not set), to set back.
        Raises BiDiError where this Firefox gives BiDi no parent-process realm."""
        if self.chrome_context is None:
            tree = self.bidi.command("browsingContext.getTree", {"moz:scope": "chrome"})
            self.chrome_context = tree["contexts"][0]["context"]
        script = """(prefs) => {
            const old = {};
            for (const [name, value] of Object.entries(prefs)) {
                old[name] = Services.prefs.prefHasUserValue(name) ? Services.prefs.getIntPref(name) : null;
                if (value === null) Services.prefs.clearUserPref(name);
                else Services.prefs.setIntPref(name, value);
            }
            return old;
        }"""
        result = self.bidi.command("script.callFunction", {
            "functionDeclaration": script, "arguments": [to_bidi(prefs)],
            "target": {"context": self.chrome_context}, "awaitPromise": True})
        if result["type"] == "exception":
            raise BiDiError(f"setting prefs {prefs}: {result['exceptionDetails']['text']}")
        return from_bidi(result["result"])

    def new_page(self):
        return FirefoxPage(self)

    def close(self):
        try:
            if getattr(self, "bidi", None):
                with contextlib.suppress(Exception):
                    self.bidi.command("browser.close", {}, timeout=STOP_TIMEOUT_S)
                self.bidi.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT_S)
        finally:
            stop_process_group(self.process)
            shutil.rmtree(self.profile, ignore_errors=True)


class FirefoxPage(Page):
    engine = "firefox"

    def __init__(self, browser):
        super().__init__()
        self.browser = browser
        self.bidi = browser.bidi
        self.old_prefs = {}
        self.user_context = self.bidi.command("browser.createUserContext", {})["userContext"]
        self.context = self.bidi.command(
            "browsingContext.create", {"type": "tab", "userContext": self.user_context})["context"]
        browser.listeners[self.context] = self._console.append
        self.add_init_script(f"({RECORDER_JS})();")
        self.set_viewport(*DEFAULT_VIEWPORT)

    def goto(self, url):
        self.bidi.command("browsingContext.navigate",
                          {"context": self.context, "url": url, "wait": "complete"})

    def _call(self, js_function, args):
        # an element comes back as a node with a sharedId, which input actions and later
        # calls accept; nothing else is kept alive in the page ("resultOwnership": "none")
        result = self.bidi.command("script.callFunction", {
            "functionDeclaration": js_function, "arguments": [to_bidi(a) for a in args],
            "target": {"context": self.context}, "awaitPromise": True,
            "resultOwnership": "none", "serializationOptions": {"maxDomDepth": 0}})
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise BiDiError(f"in the page: {details.get('text')}\n{js_function}")
        return result["result"]

    def evaluate(self, js_function, arg=None):
        return from_bidi(self._call(js_function, [arg]))

    def element(self, js_function, arg=None):
        remote = self._call(js_function, [arg])
        if remote["type"] != "node":
            raise AssertionError(f"{js_function} gave {remote['type']}, not an element")
        return FirefoxElement(remote["sharedId"])

    def _pointer(self, actions):
        self.bidi.command("input.performActions", {"context": self.context, "actions": [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
             "actions": actions}]})

    def _scroll_into_view(self, element):
        self._call(SCROLL_INTO_VIEW_JS, [element])

    def click_element(self, element):
        self._scroll_into_view(element)
        origin = {"type": "element", "element": {"sharedId": element.shared_id}}
        self._pointer([{"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                       {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}])

    def hover_element(self, element):
        self._scroll_into_view(element)
        origin = {"type": "element", "element": {"sharedId": element.shared_id}}
        self._pointer([{"type": "pointerMove", "x": 0, "y": 0, "origin": origin}])

    def mouse_move(self, x, y):
        self._pointer([{"type": "pointerMove", "x": int(x), "y": int(y)}])

    def _keys(self, actions):
        self.bidi.command("input.performActions", {"context": self.context, "actions": [
            {"type": "key", "id": "keyboard", "actions": actions}]})

    def press(self, chord):
        self._keys(key_actions(chord))

    def type(self, text):
        self._keys(type_actions(text))

    def set_viewport(self, width, height):
        self.bidi.command("browsingContext.setViewport", {
            "context": self.context, "viewport": {"width": width, "height": height}})

    def emulate_media(self, *, color_scheme=None, forced_colors=None, reduced_motion=None):
        wanted = {"color_scheme": color_scheme, "forced_colors": forced_colors,
                  "reduced_motion": reduced_motion}
        for feature, value in wanted.items():
            if value is None:
                continue
            prefs = FIREFOX_MEDIA_PREFS.get((feature, value))
            if prefs is None:
                self._unsupported(f"emulate {feature}={value}")
            try:
                old_prefs = self.browser.set_prefs(prefs)
            except BiDiError as error:
                self._unsupported(f"emulate {feature}={value} (setting prefs: {error})")
            for name, old in old_prefs.items():
                self.old_prefs.setdefault(name, old)

    def add_init_script(self, js):
        self.bidi.command("script.addPreloadScript", {
            "functionDeclaration": f"() => {{ {js} }}", "contexts": [self.context]})

    def screenshot(self, path):
        data = self.bidi.command("browsingContext.captureScreenshot", {"context": self.context})["data"]
        with open(path, "wb") as png:
            png.write(base64.b64decode(data))

    def close(self):
        self.browser.listeners.pop(self.context, None)
        try:
            if self.old_prefs:
                self.browser.set_prefs(self.old_prefs)
            self.bidi.command("browsingContext.close", {"context": self.context})
        finally:
            self.bidi.command("browser.removeUserContext", {"userContext": self.user_context})


# --- WebKit: classic WebDriver over HTTP --------------------------------------------------


ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"   # the W3C web element identifier


class WebDriverError(Exception):
    def __init__(self, error, message):
        super().__init__(f"{error}: {message}")
        self.error = error


def minibrowser_path():
    found = sorted(glob.glob(MINIBROWSER_GLOB))
    return found[-1] if found else None


class WebKitBrowser:
    engine = "webkit"

    def __init__(self):
        for binary, package in ((WEBKIT_DRIVER, "webkit2gtk-driver"), (XVFB_RUN, "xvfb")):
            if not shutil.which(binary):
                raise EngineMissing(f"Debian {package} not installed ({binary} not found)")
        minibrowser = minibrowser_path()
        if not minibrowser:
            raise EngineMissing(f"WebKitGTK's MiniBrowser not found ({MINIBROWSER_GLOB}); "
                                "it comes with webkit2gtk-driver's libwebkit2gtk")
        self.port = free_port()
        # xvfb-run gives MiniBrowser a display (it has no headless mode); -a picks a free one
        self.process = subprocess.Popen(
            [XVFB_RUN, "-a", WEBKIT_DRIVER, f"--port={self.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.session = None
        try:
            wait_until(self._ready, START_TIMEOUT_S, f"WebKitWebDriver on port {self.port}")
            created = self.request("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "MiniBrowser",
                "webkitgtk:browserOptions": {"binary": minibrowser, "args": ["--automation"]}}}})
            self.session = f"/session/{created['sessionId']}"
            self.version = f"WebKitGTK {created['capabilities']['browserVersion']}"
            self.first_window = self.request("GET", self.session + "/window")
        except BaseException:
            self.close()
            raise

    def _ready(self):
        if self.process.poll() is not None:
            raise EngineMissing(f"xvfb-run {WEBKIT_DRIVER} exited with {self.process.returncode}")
        try:
            return self.request("GET", "/status", timeout=1)["ready"]
        except (OSError, WebDriverError):
            return False

    def request(self, method, path, body=None, timeout=COMMAND_TIMEOUT_S):
        data = None if body is None else json.dumps(body).encode()
        if method == "POST" and data is None:
            data = b"{}"
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method,
                                         headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read() or b"{}")
            value = answer.get("value") or {}
            raise WebDriverError(value.get("error", error.code), value.get("message", "")) from None
        return answer.get("value")

    def new_page(self):
        return WebKitPage(self)

    def close(self):
        try:
            if self.session:
                with contextlib.suppress(Exception):
                    self.request("DELETE", self.session, timeout=STOP_TIMEOUT_S)
        finally:
            stop_process_group(self.process)


class WebKitPage(Page):
    engine = "webkit"
    reports_console = False   # classic WebDriver has no log: the page-side recorder tells

    def __init__(self, browser):
        super().__init__()
        self.browser = browser
        self.session = browser.session
        # a fresh window per page (a background tab would be hidden: no animation frames, so
        # no rendering); the first window stays open so the session lives on
        self.handle = self._post("/window/new", {"type": "window"})["handle"]
        self._post("/window", {"handle": self.handle})
        self.set_viewport(*DEFAULT_VIEWPORT)

    def _post(self, path, body=None):
        return self.browser.request("POST", self.session + path, body)

    def goto(self, url):
        self._post("/url", {"url": url})
        # no way to run a script before the page's own here: the recorder starts after the load
        self.evaluate(RECORDER_JS)

    def _execute(self, js_function, args):
        script = f"return ({js_function}).apply(null, arguments);"
        try:
            return self._post("/execute/sync", {"script": script, "args": args})
        except WebDriverError as error:
            raise WebDriverError(error.error, f"{error}\n{js_function}") from None

    def evaluate(self, js_function, arg=None):
        # JSON in and out: a value that is an element would come back as a reference
        return self._execute(js_function, [arg])

    def element(self, js_function, arg=None):
        value = self._execute(js_function, [arg])
        if not isinstance(value, dict) or ELEMENT_KEY not in value:
            raise AssertionError(f"{js_function} gave {value!r}, not an element")
        return value[ELEMENT_KEY]

    def click_element(self, element):
        self._post(f"/element/{element}/click")

    def _actions(self, actions):
        self._post("/actions", {"actions": actions})
        self.browser.request("DELETE", self.session + "/actions")

    def hover_element(self, element):
        self._execute(SCROLL_INTO_VIEW_JS, [{ELEMENT_KEY: element}])
        self._actions([{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                        "actions": [{"type": "pointerMove", "x": 0, "y": 0,
                                     "origin": {ELEMENT_KEY: element}}]}])

    def mouse_move(self, x, y):
        self._actions([{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                        "actions": [{"type": "pointerMove", "x": int(x), "y": int(y)}]}])

    def press(self, chord):
        self._actions([{"type": "key", "id": "keyboard", "actions": key_actions(chord)}])

    def type(self, text):
        self._actions([{"type": "key", "id": "keyboard", "actions": type_actions(text)}])

    def set_viewport(self, width, height):
        # classic WebDriver sizes the window: add what MiniBrowser's frame takes around the
        # page (outer minus inner size). A new window settles its size a moment later, so
        # look until the page has the size, and measure the frame again once if not.
        for _ in range(2):
            frame = self.evaluate("() => [outerWidth - innerWidth, outerHeight - innerHeight]")
            rect = self._post("/window/rect", {"width": width + frame[0], "height": height + frame[1]})
            if rect["width"] > width + frame[0]:   # the window will not get that narrow
                break
            with contextlib.suppress(AssertionError):
                wait_until(lambda: self.evaluate("() => [innerWidth, innerHeight]") == [width, height],
                           RESIZE_TIMEOUT_S, "the window size")
                return
            if self.evaluate("() => innerWidth") > width:   # no narrower: no use trying again
                break
        inner = self.evaluate("() => [innerWidth, innerHeight]")
        self._unsupported(f"make a {width}x{height} viewport (MiniBrowser's window gives "
                          f"{inner[0]}x{inner[1]}: GTK sets a minimum window width)")

    def emulate_media(self, *, color_scheme=None, forced_colors=None, reduced_motion=None):
        wanted = {k: v for k, v in (("color_scheme", color_scheme), ("forced_colors", forced_colors),
                                    ("reduced_motion", reduced_motion)) if v is not None}
        if wanted:
            self._unsupported(f"emulate media {wanted} (classic WebDriver has no media emulation "
                              "and MiniBrowser no flag for it)")

    def add_init_script(self, js):
        self._unsupported("run a script before the page's own (classic WebDriver has no "
                          "preload scripts)")

    def screenshot(self, path):
        data = self.browser.request("GET", self.session + "/screenshot")
        with open(path, "wb") as png:
            png.write(base64.b64decode(data))

    def close(self):
        # the session's windows share cookies and storage: leave none of this page's for the
        # next one (cookies of the page's host, whatever the port; storage of its origin)
        with contextlib.suppress(WebDriverError):
            self.browser.request("DELETE", self.session + "/cookie")
            self.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
        with contextlib.suppress(WebDriverError):
            self.browser.request("DELETE", self.session + "/window")
        self._post("/window", {"handle": self.browser.first_window})
