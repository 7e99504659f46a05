"""Pool licenses against a real server: seats hold under races, leases lapse, revive and are culled,
ops see and release seats — each change atomic with its audit record."""

from __future__ import annotations

import os
import threading
import time

import pytest
import requests
from click.testing import CliRunner
from ls_helpers import activate, add_model, new_machine, register

from layerlock.license_server.cli import main as layerlock_main
from layerlock.license_server.store import seats
from tests.conftest import own_stack, wait_for


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """A server whose background worker culls every 0.2 s (leases of a few seconds)."""
    with own_stack(tmp_path_factory.mktemp("seats"), {"LAYERLOCK_BACKGROUND_INTERVAL": "0.2"}) as ls:
        yield ls


def _customer() -> str:
    return f"cust-{os.urandom(3).hex()}"


def _fleet(server, customer: str, n: int) -> list:
    out = []
    for _ in range(n):
        m = new_machine()
        register(server, m, customer=customer)
        out.append(m)
    return out


def _pool(server, customer: str, model: str, seats_: int, **terms) -> dict:
    resp = server.api("POST", "/v1/licenses", {"customer": customer, "model": model, "seats": seats_, "days": 1,
                                               **terms})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _race(server, machines: list, model: str) -> list[int]:
    """Every machine activates at the same instant (a barrier), each from its own thread."""
    barrier = threading.Barrier(len(machines))
    bodies = [m.request(model) for m in machines]
    statuses: list[int] = [0] * len(machines)

    def go(i: int) -> None:
        barrier.wait()
        statuses[i] = requests.post(server.url + "/v1/activate", json=bodies[i], timeout=60).status_code

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(machines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_fifty_machines_racing_for_ten_seats_get_exactly_ten_grants(fast):
    model, _ = add_model(fast)
    r = fast.redis()
    for _round in range(3):  # "in every run": three fresh pools, three races
        customer = _customer()
        machines = _fleet(fast, customer, 50)
        lic = _pool(fast, customer, model, 10, kind="floating", lease_ttl=600)
        statuses = _race(fast, machines, model)
        assert statuses.count(200) == 10 and statuses.count(409) == 40, statuses
        assert r.zcard(seats.key(lic["license_id"])) == 10
        audit = fast.api("GET", "/v1/audit", params={"type": "activation", "limit": 1000}).json()["items"]
        mine = [a for a in audit if a.get("machine") in {m.code for m in machines}]
        assert sum(a["outcome"] == "granted" for a in mine) == 10
        assert sum(a.get("reason") == "seats_exhausted" for a in mine) == 40
    assert fast.api("GET", "/v1/audit/verify").json()["ok"]


def test_node_locked_seats_are_held_until_ops_release_one(fast):
    model, _ = add_model(fast)
    customer = _customer()
    a, b, c = _fleet(fast, customer, 3)
    lic = _pool(fast, customer, model, 2)
    assert lic["kind"] == "seats" and lic["seats"] == 2 and lic["lease_ttl"] == 0
    for m in (a, b):
        assert activate(fast, m, model).status_code == 200
    denied = activate(fast, c, model)
    assert (denied.status_code, denied.json()["error"]) == (409, "seats_exhausted")
    assert "in use" in denied.json()["message"]
    assert activate(fast, a, model).status_code == 200  # a renewal keeps the seat it has
    shown = fast.api("GET", f"/v1/licenses/{lic['license_id']}").json()
    assert shown["used"] == 2 and {h["machine"] for h in shown["holders"]} == {a.code, b.code}
    assert all(h["until"] is None and h["live"] for h in shown["holders"])
    # ops release a's seat: c gets it, a is now the one left out
    resp = fast.api("POST", f"/v1/licenses/{lic['license_id']}/seats/{a.code}/release", {"reason": "dead box"})
    assert resp.status_code == 200 and resp.json()["used"] == 1, resp.text
    assert fast.api("POST", f"/v1/licenses/{lic['license_id']}/seats/{a.code}/release").status_code == 404
    assert activate(fast, c, model).status_code == 200
    assert activate(fast, a, model).json()["error"] == "seats_exhausted"
    rec = fast.api("GET", "/v1/audit", params={"type": "seat_released"}).json()["items"][0]
    assert (rec["license"], rec["machine"], rec["reason"], rec["actor"]) == (lic["license_id"], a.code, "dead box",
                                                                              rec["actor"])
    assert rec["actor"]


def test_another_customers_machine_never_takes_a_seat(fast):
    model, _ = add_model(fast)
    customer = _customer()
    _pool(fast, customer, model, 5)
    (outsider,) = _fleet(fast, _customer(), 1)
    assert activate(fast, outsider, model).json()["error"] == "no_license"


def test_a_floating_lease_caps_the_token_revives_within_its_window_and_is_then_culled(fast):
    model, _ = add_model(fast)
    customer = _customer()
    a, b = _fleet(fast, customer, 2)
    lic = _pool(fast, customer, model, 1, kind="floating", lease_ttl=2, revive_ttl=6, token_ttl=2,
                offline_grace=3600)
    doc = activate(fast, a, model).json()
    assert doc["expires_at"] - time.time() <= 2.5  # the token never outlives the lease (not the hour of grace)
    time.sleep(2.4)  # a's lease is over, its revive window is not: nobody else may take the seat ...
    assert activate(fast, b, model).json()["error"] == "seats_exhausted"
    assert activate(fast, a, model).status_code == 200  # ... and a revives it
    # a goes silent: after lease + revive the worker culls the lease, audited, and b gets the seat
    assert wait_for(lambda: fast.api("GET", "/v1/audit", params={"type": "lease_culled", "license": lic["license_id"]})
                    .json()["items"], timeout=20)
    culled = fast.api("GET", "/v1/audit", params={"type": "lease_culled", "license": lic["license_id"]}).json()
    assert [(x["machine"], x["actor"]) for x in culled["items"]] == [(a.code, "system")]
    assert activate(fast, b, model).status_code == 200
    assert fast.api("GET", f"/v1/licenses/{lic['license_id']}/seats").json()["used"] == 1


def test_seat_usage_and_release_through_the_cli(fast):
    model, _ = add_model(fast)
    customer = _customer()
    (m,) = _fleet(fast, customer, 1)
    runner = CliRunner()
    auth = ["--server", fast.url, "--api-key", fast.admin_key]
    out = runner.invoke(layerlock_main, ["licenses", "issue", "--customer", customer, "--model", model, "--seats", "3",
                                         "--floating", "--lease", "10m", "--days", "30", "--json", *auth])
    assert out.exit_code == 0, out.output
    import json

    lic = json.loads(out.output)
    assert (lic["kind"], lic["seats"], lic["lease_ttl"], lic["revive_ttl"]) == ("floating", 3, 600, 600)
    assert activate(fast, m, model).status_code == 200
    shown = runner.invoke(layerlock_main, ["licenses", "show", lic["license_id"], *auth])
    assert shown.exit_code == 0 and "1 of 3 in use" in shown.output, shown.output
    listed = runner.invoke(layerlock_main, ["licenses", "seats", lic["license_id"], "--json", *auth])
    assert json.loads(listed.output)["holders"][0]["machine"] == m.code
    released = runner.invoke(layerlock_main, ["licenses", "release", lic["license_id"], m.code, *auth])
    assert released.exit_code == 0 and "0 of 3 now in use" in released.output, released.output


@pytest.mark.parametrize("body, error", [
    ({"customer": "x", "model": "m-1", "days": 1}, "a node license names a machine"),
    ({"customer": "x", "machine": "LLK-X", "model": "m-1", "seats": 2, "days": 1}, "names a customer"),
    ({"customer": " ", "model": "m-1", "seats": 2, "days": 1}, "customer must not be empty"),
    ({"customer": "x", "model": "m-1", "seats": 0, "days": 1}, "seats must be"),
    ({"customer": "x", "model": "m-1", "seats": 2, "kind": "floating", "lease_ttl": 60, "token_ttl": 120,
      "days": 1}, "token_ttl must not exceed lease_ttl"),
    ({"customer": "x", "family": "f", "max_version": "2", "seats": 2, "days": 1}, "max_version goes with"),
    ({"customer": "x", "family": "f", "versions": "max", "max_version": "v2", "seats": 2, "days": 1},
     "dotted numbers"),
    ({"customer": "x", "model": "m-1", "family": "f", "seats": 2, "days": 1}, "exactly one of model or family"),
])
def test_issue_refuses_inconsistent_terms_before_writing(fast, body, error):
    resp = fast.api("POST", "/v1/licenses", body)
    assert resp.status_code == 400 and error in resp.json()["message"], resp.text


def test_the_seat_guard_refuses_a_grant_decided_on_a_stale_count(fast):
    """What makes races safe: the commit re-counts live seats in the same Lua script as the write."""
    from layerlock.license_server.store.commit import Change, Commits, GuardFailed

    commits = Commits(fast.redis())
    rec = {"license_id": f"lic_{os.urandom(8).hex()}", "seats": "1", "lease_ttl": "0"}
    now = time.time()
    commits.commit("seat_test", seats.take(Change(), rec, "LLK-ONE", now, int(now)))
    with pytest.raises(GuardFailed):  # decided when the seat looked free; it is not any more
        commits.commit("seat_test", seats.take(Change(), rec, "LLK-TWO", now, int(now)))
    commits.commit("seat_test", seats.take(Change(), rec, "LLK-ONE", now, int(now)))  # the holder renews
    assert fast.redis().zrange(seats.key(rec["license_id"]), 0, -1) == ["LLK-ONE"]
