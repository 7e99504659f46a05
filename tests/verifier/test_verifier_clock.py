"""Clock-rollback detection, with the clock source faked: the MAC'd high-water mark, and what the
daemon does when the clock goes back while it cannot ask the server."""

from __future__ import annotations

import json
import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from verifier_helpers import FakeServer, write_config

from layerlock.verifier.clock import ClockGuard
from layerlock.verifier.config import load_config
from layerlock.verifier.daemon import Daemon
from tests.conftest import wait_for

T0 = 1_900_000_000.0


def _guard(machine, tolerance=300):
    return ClockGuard(machine.state.clock_file, machine.state.load_keys().sign, tolerance=tolerance)


def test_the_mark_rises_with_time_and_a_clock_set_back_is_caught(machine):
    g = _guard(machine)
    g.load(T0)
    assert g.check(T0 + 100) == ("", False)
    assert g.check(T0 - 200) == ("", False)  # within the tolerance: NTP steps, leap smears
    reason, newly = g.check(T0 - 400)
    assert newly and "set back" in reason and g.status()["ok"] is False
    assert g.check(T0 + 1000) == (reason, False)  # moving it forward again does not clear it ...
    again = _guard(machine)  # ... nor does a restart: the flag is in the (MAC'd) file
    again.load(T0 + 1000)
    assert again.rolled_back == reason
    assert again.resync(T0 - 400) and again.check(T0 - 399) == ("", False)  # an online success: new baseline


def test_the_mark_persists_and_token_iats_raise_it(machine):
    g = _guard(machine)
    g.load(T0)
    g.observe(T0 + 5000)  # a cached token issued (server time) later than our clock
    fresh = _guard(machine)
    fresh.load(T0)
    assert fresh.hwm == pytest.approx(T0 + 5000)
    assert fresh.check(T0)[0]


@pytest.mark.parametrize("tamper", ["edit", "garbage", "other_key"])
def test_an_edited_or_foreign_mark_counts_as_a_rollback(machine, tamper):
    g = _guard(machine)
    g.load(T0 + 10_000)
    path = machine.state.clock_file
    doc = json.loads(path.read_text())
    if tamper == "edit":  # wind the mark back by hand
        path.write_text(json.dumps({**doc, "hwm": T0}))
    elif tamper == "garbage":
        path.write_text("{")
    else:  # a valid file, but MAC'd with another machine's key
        ClockGuard(path, ed25519.Ed25519PrivateKey.generate()).resync(T0)
    g2 = _guard(machine)
    g2.load(T0)
    reason, _ = g2.check(T0)
    assert "does not verify" in reason


def test_a_missing_mark_restarts_from_the_clock_and_the_state_files_times(machine):
    machine.state.clock_file.unlink(missing_ok=True)
    g = _guard(machine)
    g.load(T0, [T0 + 3600])  # a state file written "in the future"
    assert g.check(T0)[0] and "set back" in g.rolled_back
    assert json.loads(machine.state.clock_file.read_text())["flag"]


# --- the daemon with a fake clock ---------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


_RUNNING: list[Daemon] = []


@pytest.fixture(autouse=True)
def _stop_daemons():
    yield
    while _RUNNING:
        _RUNNING.pop().stop()


def _start(cfg, machine, server, clock):
    d = Daemon(cfg, machine.state, server, clock=clock)
    _RUNNING.append(d)
    d.start()
    assert d.wait_settled(10)
    return d


def _poke(d) -> bool:
    """Wake the model loops (they sleep until renewal otherwise): a notify can land while a loop is
    busy, so callers poke again at every poll."""
    with d._wake:
        d._wake.notify_all()
    return True


@pytest.fixture()
def cfg(tmp_path, machine, protected):
    return load_config(write_config(tmp_path / "v.toml", machine, [protected]))


def _state(d):
    return d.status()["models"][0]


def test_clock_set_back_while_offline_stops_serving_until_an_online_activation(cfg, machine, capsys):
    clock, server = FakeClock(), FakeServer(machine, ttl=60)
    d = _start(cfg, machine, server, clock)
    assert _state(d)["state"] == "unlocked" and d.status()["clock"]["ok"]
    server.mode = "down"
    clock.offset = -3600  # an hour back: the token would now look good for an hour more
    assert wait_for(lambda: _poke(d) and _state(d)["state"] == "refused", timeout=5)
    st = _state(d)
    assert st["reason"] == "clock_rollback" and "set back" in st["message"]
    assert d.status()["clock"]["ok"] is False and "set back" in d.status()["clock"]["reason"]
    assert (machine.state.tokens / "model-a.jwt").exists()  # kept: the token is fine, the clock is not
    clock.offset = 0  # putting the clock right is not enough while the server cannot vouch for it
    calls = server.calls
    assert wait_for(lambda: server.calls >= calls + 2, timeout=5)
    assert _state(d)["reason"] == "clock_rollback" and not d.status()["clock"]["ok"]
    server.mode = "ok"  # the server answers again: an online activation clears it
    assert wait_for(lambda: _state(d)["state"] == "unlocked", timeout=8)
    assert d.status()["clock"]["ok"] and _state(d)["source"] == "server"
    events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert "clock_rollback" in events and "clock_resynced" in events


def test_a_restart_with_the_clock_set_back_refuses_the_cached_token(cfg, machine):
    clock, server = FakeClock(), FakeServer(machine, ttl=600)
    _start(cfg, machine, server, clock).stop()
    server.mode = "down"
    clock.offset = -86_400  # the host was switched off, its clock set a day back, restarted offline
    d = _start(cfg, machine, server, clock)
    st = _state(d)
    assert (st["state"], st["reason"]) == ("refused", "clock_rollback"), st


def test_without_a_rollback_offline_use_from_the_cache_is_untouched(cfg, machine):
    clock, server = FakeClock(), FakeServer(machine, ttl=600)
    _start(cfg, machine, server, clock).stop()
    server.mode = "down"
    clock.offset = -30  # within the tolerance (and the token leeway)
    d = _start(cfg, machine, server, clock)
    assert _state(d)["state"] == "unlocked" and _state(d)["source"] == "cache"


def test_seats_exhausted_is_transient_serving_goes_on_and_the_cache_is_kept(cfg, machine):
    server = FakeServer(machine, ttl=600)
    d = _start(cfg, machine, server, FakeClock())
    server.mode = "seats_exhausted"
    d.slots["model-a"].renew_at = 0
    assert wait_for(lambda: _poke(d) and server.calls >= 2)
    assert _state(d)["state"] == "unlocked" and (machine.state.tokens / "model-a.jwt").exists()
    d.stop()
    os.unlink(machine.state.tokens / "model-a.jwt")  # a host that never had a seat: locked, with the reason
    d2 = _start(cfg, machine, server, FakeClock())
    st = _state(d2)
    assert (st["state"], st["reason"]) == ("locked", "seats_exhausted"), st
    server.mode = "ok"  # a seat frees: the retry gets it
    assert wait_for(lambda: _state(d2)["state"] == "unlocked", timeout=8)
