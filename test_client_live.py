"""Tests of the client's live state: what is sent is the bar as it is now, not as tqdm last
drew it (issue 11, "What to build" 1; PROTOCOL.md, the last paragraph of "Client settings").

A real server on an ephemeral port and real tqdm in a subprocess for the user's view; the
Sender with an injected clock and opener for the rules (read at the push interval, sent
only when it changed, a heartbeat whatever).
"""

import subprocess
import sys

import pytest

from conftest import FakeClock, clean_env, wait_for
from test_client import ENDPOINT, ROOT, SUBPROCESS_TIMEOUT_S, FakeServer, sender, tasks  # noqa: F401
import progressista_client as pc

QUICK_STEPS_THEN_WAIT = """\
import sys
from progressista_client import tqdm
bar = tqdm(total=100, desc="quick", mininterval=60)  # tqdm draws none of the 25 steps
for _ in range(25):
    bar.update(1)
print("stepped", flush=True)
sys.stdin.readline()  # a long validation, a slow file: the bar waits at 25
bar.close()
"""


def test_a_bar_that_made_quick_steps_then_waits_shows_them_on_the_server(server):
    job = subprocess.Popen(
        [sys.executable, "-c", QUICK_STEPS_THEN_WAIT], cwd=ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(PYTHONPATH=ROOT, PROGRESSISTA_SERVER_URL=server.url))
    try:
        assert job.stdout.readline() == "stepped\n"
        shown = wait_for(lambda: [t for t in tasks(server).values() if t["n"] == 25],
                         timeout=2.0, message="the server to show n = 25")
        assert shown[0]["status"] == "running" and shown[0]["desc"] == "quick"
        job.stdin.write("\n")
        job.stdin.flush()
        assert job.wait(SUBPROCESS_TIMEOUT_S) == 0, job.stderr.read()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        for stream in (job.stdin, job.stdout, job.stderr):
            stream.close()
    (ended,) = tasks(server).values()
    assert (ended["n"], ended["status"]) == (25, "close")


class LiveBar:
    """A source the test moves by hand, as update() moves a bar without drawing it."""

    def __init__(self, task_id="a"):
        self.state = {"task_id": task_id, "n": 0, "status": "running", "timestamp": 1.0}
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return dict(self.state)


def live_sender():
    clock, opener = FakeClock(1000.0), FakeServer()
    return pc.Sender(clock=clock, opener=opener, autostart=False), clock, opener


def test_sender_reads_a_live_bar_at_its_push_interval_and_sends_the_change():
    sender, clock, opener = live_sender()
    live = LiveBar()
    sender.put(ENDPOINT, dict(live.state), push_every=0.25, source=live)
    sender.tick()
    live.state["n"] = 25  # no put(): tqdm did not draw
    assert sender.tick() == 0.25
    clock.now += 0.25
    sender.tick()
    assert [body["n"] for body in opener.bodies] == [0, 25]


def test_sender_does_not_resend_an_unchanged_live_bar_before_the_heartbeat():
    sender, clock, opener = live_sender()
    live = LiveBar()
    sender.put(ENDPOINT, dict(live.state), push_every=0.25, source=live)
    sender.tick()
    for _ in range(10):
        clock.now += 0.25
        sender.tick()
    assert live.reads == 11 and len(opener.bodies) == 1
    clock.now += sender.heartbeat_s
    sender.tick()
    assert len(opener.bodies) == 2 and opener.bodies[1]["n"] == 0


def test_sender_sends_a_queued_state_as_the_bar_is_when_it_goes():
    sender, clock, opener = live_sender()
    live = LiveBar()
    sender.put(ENDPOINT, dict(live.state), push_every=1.0, source=live)
    sender.tick()
    sender.put(ENDPOINT, dict(live.state, n=3), push_every=1.0, source=live)
    live.state["n"] = 7  # moved on between the draw and the send
    clock.now += 1.0
    sender.tick()
    assert [body["n"] for body in opener.bodies] == [0, 7]


def test_sender_keeps_the_put_state_of_a_bar_that_can_no_longer_be_read():
    sender, clock, opener = live_sender()
    sender.put(ENDPOINT, {"task_id": "a", "n": 4}, source=lambda: None)
    sender.tick()
    assert opener.bodies[0]["n"] == 4


def test_an_unchanged_live_read_leaves_nothing_in_flight_so_flush_returns_at_once():
    sender, clock, opener = live_sender()
    live = LiveBar()
    sender.put(ENDPOINT, dict(live.state), push_every=0.25, source=live)
    sender.tick()
    clock.now += 0.25
    sender.tick()  # read, unchanged, not sent
    assert live.reads == 2 and sender._in_flight == 0
    assert sender.flush(0.1) is True


def test_a_process_with_thousands_of_open_bars_reads_each_less_often():
    sender, clock, opener = live_sender()
    bars = [LiveBar("bar-%d" % index) for index in range(4000)]
    for live in bars:
        sender.put(ENDPOINT, dict(live.state), push_every=0.25, source=live)
    sender.tick()  # each read once, as it is sent
    assert sender.tick() == pytest.approx(4000 / pc.LIVE_READS_PER_S_LIMIT)  # 2 s, not 0.25
    clock.now += 1.0
    sender.tick()
    assert {live.reads for live in bars} == {1}
    clock.now += 1.0
    sender.tick()
    assert {live.reads for live in bars} == {2}
