"""The browser harness's own parts that need no browser (browsers.py).

The engines themselves are tested by test_dashboard.py, which drives every dashboard test
through the harness; here: the WebDriver key actions, the BiDi value conversions, the
process clean-up, and a missing engine reported as EngineMissing with its package.
"""

import math
import os
import subprocess
import sys

import pytest

import browsers
from conftest import wait_for


def test_a_chord_presses_in_order_and_releases_in_reverse():
    assert browsers.key_actions("Shift+Tab") == [
        {"type": "keyDown", "value": "\ue008"}, {"type": "keyDown", "value": "\ue004"},
        {"type": "keyUp", "value": "\ue004"}, {"type": "keyUp", "value": "\ue008"}]


def test_a_single_character_is_its_own_key_even_a_plus():
    assert browsers.key_actions("/") == [{"type": "keyDown", "value": "/"},
                                         {"type": "keyUp", "value": "/"}]
    assert [a["value"] for a in browsers.key_actions("+")] == ["+", "+"]


def test_an_unknown_key_name_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="browsers.KEYS"):
        browsers.key_actions("Shift+Tabb")


def test_typing_presses_each_character():
    assert [a["value"] for a in browsers.type_actions("ab")] == ["a", "a", "b", "b"]


@pytest.mark.parametrize("value", [None, True, 0, -3.5, "é<script>", [1, [None, "x"]],
                                   {"a": {"b": [1, 2]}, "": False}])
def test_json_values_survive_the_trip_through_bidi_values(value):
    assert browsers.from_bidi(browsers.to_bidi(value)) == value


def test_numbers_json_cannot_carry_survive_too():
    assert math.isnan(browsers.from_bidi(browsers.to_bidi(float("nan"))))
    assert browsers.from_bidi(browsers.to_bidi(float("-inf"))) == float("-inf")
    assert browsers.from_bidi({"type": "undefined"}) is None


def test_stopping_a_browser_ends_what_it_started_too():
    # a stand-in browser that starts a child of its own, in its own process group
    process = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time;"
         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
         "print(child.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = int(process.stdout.readline())
    browsers.stop_process_group(process)
    assert process.returncode is not None

    def child_gone():
        try:
            with open(f"/proc/{child_pid}/stat") as stat:
                return stat.read().split(") ")[1].startswith("Z")   # ended, not yet reaped
        except FileNotFoundError:
            return True
    wait_for(child_gone, message=f"the child {child_pid} to end")


@pytest.mark.parametrize("engine, setting, package", [
    ("firefox", "FIREFOX", "firefox-esr"),
    ("webkit", "WEBKIT_DRIVER", "webkit2gtk-driver"),
])
def test_a_missing_engine_names_its_debian_package(monkeypatch, engine, setting, package):
    monkeypatch.setattr(browsers, setting, "/nonexistent/" + setting.lower())
    with pytest.raises(browsers.EngineMissing, match=package):
        browsers.launch(engine)


def test_a_missing_chromium_names_its_debian_package(monkeypatch):
    pytest.importorskip("playwright")
    monkeypatch.setattr(browsers, "CHROMIUM", os.devnull + "/chromium")
    with pytest.raises(browsers.EngineMissing, match="chromium"):
        browsers.launch("chromium")
