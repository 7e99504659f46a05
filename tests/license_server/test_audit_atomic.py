"""Every state change and its audit record are one atomic unit — through the API, in the AOF
(what survives a crash), under a torn AOF tail (a crash mid-write), and under concurrency."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from ls_helpers import activate, add_model, issue, new_machine, register, world

from layerlock.license_server.store import P
from tests.conftest import RedisServer

STREAM = "{ll}:audit"
#: Keys that are activation guards, not state: written without an audit record of their own.
# counters, not state: rate-limit windows and the per-hour tallies of unauthenticated rejections
GUARD_PREFIXES = ("{ll}:rl:", "{ll}:rejects:")


def _last(r, n: int = 1) -> list[dict]:
    import json

    return [json.loads(entry["rec"]) for _, entry in reversed(r.xrevrange(STREAM, count=n))]


def test_each_mutating_endpoint_writes_state_and_exactly_one_record(server):
    r = server.redis()
    m, other = new_machine(), new_machine()
    model_id = f"atomic-{m.code[:6].lower()}"
    steps = [  # (method, path, body, expected status, expected record type, state check)
        ("POST", "/v1/machines", {"machine": m.code, "customer": "c1"}, 201, "machine_registered",
         lambda: r.hget(f"{P}machine:{m.code}", "customer") == "c1"),
        ("PATCH", f"/v1/machines/{m.code}", {"customer": "c2"}, 200, "machine_updated",
         lambda: r.hget(f"{P}machine:{m.code}", "customer") == "c2"),
        ("POST", f"/v1/machines/{m.code}/deactivate", None, 200, "machine_deactivated",
         lambda: r.hget(f"{P}machine:{m.code}", "status") == "inactive"),
        ("POST", f"/v1/machines/{m.code}/reactivate", None, 200, "machine_reactivated",
         lambda: r.hget(f"{P}machine:{m.code}", "status") == "active"),
        ("POST", "/v1/keys", {"role": "auditor"}, 201, "apikey_created", lambda: r.zcard("{ll}:apikeys") >= 2),
    ]
    for method, path, body, status, type_, check in steps:
        n0 = r.xlen(STREAM)
        resp = server.api(method, path, body)
        assert resp.status_code == status, (path, resp.text)
        assert r.xlen(STREAM) == n0 + 1, path
        assert _last(r)[0]["type"] == type_ and check(), path
    key_id = _last(r)[0]["key_id"]
    n0 = r.xlen(STREAM)
    assert server.api("POST", f"/v1/keys/{key_id}/revoke").status_code == 200
    assert r.xlen(STREAM) == n0 + 1 and r.hget(f"{P}apikey:{key_id}", "status") == "revoked"

    n0 = r.xlen(STREAM)
    add_model(server, model_id)
    assert r.xlen(STREAM) == n0 + 1 and _last(r)[0] == {**_last(r)[0], "type": "model_registered", "model": model_id}
    register(server, other)
    for days in (3, 4):
        n0 = r.xlen(STREAM)
        lic = issue(server, m, model_id, days=days)
        assert r.xlen(STREAM) == n0 + 1 and _last(r)[0]["license"] == lic["license_id"]
        assert r.sismember(f"{P}lic:{m.code}:{model_id}", lic["license_id"])
    lid = lic["license_id"]
    for path, body, type_ in ((f"/v1/licenses/{lid}/extend", {"days": 1}, "license_extended"),
                              (f"/v1/licenses/{lid}/revoke", {"reason": "t"}, "license_revoked")):
        n0 = r.xlen(STREAM)
        assert server.api("POST", path, body).status_code == 200
        assert r.xlen(STREAM) == n0 + 1 and _last(r)[0]["type"] == type_
    # activation: grant and denial each exactly one record; the grant counts on the license
    m2, model2, _, lic2 = world(server)
    for expect in ("granted", "granted"):
        n0 = r.xlen(STREAM)
        assert activate(server, m2, model2).status_code == 200
        assert r.xlen(STREAM) == n0 + 1 and _last(r)[0]["outcome"] == expect
    assert r.hget(f"{P}license:{lic2['license_id']}", "activations") == "2"
    req = m2.request(model2)
    requests.post(server.url + "/v1/activate", json=req, timeout=5)
    n0 = r.xlen(STREAM)
    assert requests.post(server.url + "/v1/activate", json=req, timeout=5).json()["error"] == "replay"
    assert r.xlen(STREAM) == n0  # a replayed capture proves nothing: counted, not audited
    assert r.hget(f"{P}license:{lic2['license_id']}", "activations") == "3"
    # a claim, then its redemption: each its state and exactly one record
    m3 = new_machine()
    register(server, m3, enrolled=False)
    n0 = r.xlen(STREAM)
    claim = server.api("POST", f"/v1/machines/{m3.code}/claims", {}).json()
    assert r.xlen(STREAM) == n0 + 1 and _last(r)[0]["type"] == "claim_created"
    assert r.hget(f"{P}machine:{m3.code}", "claim_id") == claim["claim_id"]
    resp = requests.post(server.url + "/v1/enroll", json={"enrollment": m3.enrollment, "claim": claim["claim"]},
                         timeout=5)
    assert resp.status_code == 200 and r.xlen(STREAM) == n0 + 2 and _last(r)[0]["type"] == "machine_enrolled"
    assert r.hexists(f"{P}machine:{m3.code}", "sig_pub")
    # refused changes write neither state nor a record
    snap_len = r.xlen(STREAM)
    for method, path, body, status in [
            ("POST", "/v1/machines", {"machine": m.code}, 409),
            ("POST", f"/v1/licenses/{lid}/revoke", {"reason": "again"}, 409),
            ("POST", f"/v1/licenses/{lid}/extend", {"days": 1}, 409),
            ("POST", f"/v1/machines/{m.code}/reactivate", None, 409),
            ("POST", "/v1/models", {"model_id": model_id, "sealed_key": "x"}, 400)]:
        assert server.api(method, path, body).status_code == status, path
    assert r.xlen(STREAM) == snap_len
    assert server.api("GET", "/v1/audit/verify").json()["ok"] is True


# --- the AOF: what a crash leaves behind ---------------------------------------------------------
def _aof_files(directory: Path) -> list[Path]:
    aof_dir = directory / "appendonlydir"
    manifest = (aof_dir / "appendonly.aof.manifest").read_text().split("\n")
    names = [line.split()[1] for line in manifest if " type i" in line]
    return [aof_dir / name for name in names]


def _commands(data: bytes) -> list[tuple[int, int, list[str]]]:
    """(start offset, end offset, argv) of every RESP command in an AOF file."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        assert data[pos:pos + 1] == b"*", data[pos:pos + 40]
        end = data.index(b"\r\n", pos)
        argc, pos = int(data[pos + 1:end]), end + 2
        argv = []
        for _ in range(argc):
            end = data.index(b"\r\n", pos)
            n = int(data[pos + 1:end])
            argv.append(data[end + 2:end + 2 + n].decode())
            pos = end + 2 + n + 2
        out.append((start, pos, argv))
    return out


def _units(cmds: list[tuple[int, int, list[str]]]) -> list[list[tuple[int, int, list[str]]]]:
    """Group into what Redis replays atomically: MULTI … EXEC blocks, or single commands."""
    units, block = [], None
    for c in cmds:
        name = c[2][0].upper()
        if name == "MULTI":
            block = [c]
        elif name == "EXEC":
            units.append([*block, c])
            block = None
        elif block is not None:
            block.append(c)
        else:
            units.append([c])
    return units


def _mutate_everything(srv) -> dict:
    m, model_id, _, lic = world(srv)
    srv.api("PATCH", f"/v1/machines/{m.code}", {"labels": {"a": "b"}})
    srv.api("POST", f"/v1/licenses/{lic['license_id']}/extend", {"days": 2})
    assert activate(srv, m, model_id).status_code == 200
    req = m.request(model_id)
    for _ in range(2):  # grant, then replay
        requests.post(srv.url + "/v1/activate", json=req, timeout=5)
    key_id = srv.api("POST", "/v1/keys", {"role": "operator"}).json()["id"]
    srv.api("POST", f"/v1/keys/{key_id}/revoke")
    srv.api("POST", "/v1/keys/rotate-kek")
    t = new_machine()
    register(srv, t, enrolled=False)
    issue(srv, t, model_id)
    claim = srv.api("POST", f"/v1/machines/{t.code}/claims", {}).json()["claim"]
    assert requests.post(srv.url + "/v1/enroll", json={"enrollment": t.enrollment, "claim": claim},
                         timeout=5).status_code == 200  # claim + key bind: one unit
    assert activate(srv, t, model_id).status_code == 200
    srv.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "done"})
    srv.api("POST", f"/v1/machines/{m.code}/deactivate")
    srv.api("POST", f"/v1/models/{model_id}/retire")
    return {"machine": m, "model": model_id, "license": lic["license_id"]}


@pytest.mark.single_redis  # reads one server's AOF
def test_every_state_write_shares_its_aof_transaction_with_one_audit_record(license_server, redis_server):
    """Redis replays an AOF transaction whole or not at all (a torn tail is dropped), so state
    and record written in one MULTI/EXEC can never be separated by a crash of anything."""
    _mutate_everything(license_server)
    data = b"".join(p.read_bytes() for p in _aof_files(redis_server.dir))
    units = _units(_commands(data))
    state_units = 0
    for unit in units:
        argvs = [argv for _, _, argv in unit if argv[0].upper() not in ("MULTI", "EXEC", "SELECT")]
        written = [argv[1] for argv in argvs if len(argv) > 1]
        state = [k for k in written if k.startswith("{ll}:") and not k.startswith(GUARD_PREFIXES)]
        if not state:
            continue
        xadds = [argv for argv in argvs if argv[0].upper() == "XADD"]
        assert len(xadds) == 1 and xadds[0][1] == STREAM, f"state written without its audit record: {argvs}"
        assert ["SET", "{ll}:audit:head"] in [[a[0].upper(), a[1]] for a in argvs], argvs
        state_units += 1
    assert state_units == int(license_server.redis().xlen(STREAM)) >= 15


@pytest.mark.single_redis  # reads one server's AOF
def test_a_torn_aof_tail_drops_state_and_record_together(license_server, redis_server, tmp_path):
    """Simulate a crash at every command boundary inside the last issuance's transaction."""
    m, model_id, _, _ = world(license_server)
    lid = issue(license_server, m, model_id, days=7)["license_id"]
    redis_server.stop()
    files = _aof_files(redis_server.dir)
    data = files[-1].read_bytes()
    unit = next(u for u in reversed(_units(_commands(data)))
                if any(argv[:2] == ["HSET", f"{P}license:{lid}"] for _, _, argv in u))
    cuts = [end for _, end, _ in unit[:-1]] + [unit[-1][1] - 1, unit[-1][1]]  # inside, and right after EXEC
    for i, cut in enumerate(cuts):
        copy = tmp_path / f"crash{i}"
        shutil.copytree(redis_server.dir, copy, ignore=shutil.ignore_patterns("*.log"))
        (copy / "appendonlydir" / files[-1].name).write_bytes(data[:cut])
        rs = RedisServer(copy)
        rs.start()
        try:
            r = rs.client()
            has_state = r.exists(f"{P}license:{lid}") == 1
            records = [e for _, e in r.xrevrange(STREAM, count=5) if f'"license":"{lid}"' in e["rec"]]
            complete = cut == unit[-1][1]
            assert has_state == bool(records) == complete, (i, cut, has_state, records)
            assert r.sismember(f"{P}lic:{m.code}:{model_id}", lid) == complete
            # and the survivor's chain is whole: the head is the last surviving record's hash
            last = r.xrevrange(STREAM, count=1)[0][1]
            assert r.get("{ll}:audit:head") == last["h"]
        finally:
            rs.kill()
    redis_server.start()


def test_concurrent_mutations_from_many_threads_keep_one_unbroken_chain(server):
    """Registrations, issuances, activations, extensions and revocations from 12 threads against
    two gunicorn workers: every request adds exactly one record and the chain verifies."""
    r = server.redis()
    n0 = r.xlen(STREAM)
    model_id, _ = add_model(server)
    made = [1]  # the model registration
    lock = threading.Lock()

    def count(n: int = 1) -> None:
        with lock:
            made[0] += n

    def life(i: int) -> dict:
        m = new_machine()
        register(server, m)
        lic = issue(server, m, model_id, days=5)
        count(2)
        granted = 0
        for _ in range(3):
            granted += activate(server, m, model_id).status_code == 200
            count()
        resp = server.api("POST", f"/v1/licenses/{lic['license_id']}/extend", {"days": 1 + i % 3})
        count(resp.status_code == 200)
        if i % 2:
            assert server.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "x"}).status_code == 200
            count()
            assert activate(server, m, model_id).json()["error"] == "revoked"
            count()
        return {"license": lic["license_id"], "granted": granted}

    with ThreadPoolExecutor(12) as pool:
        lives = list(pool.map(life, range(36)))
    assert r.xlen(STREAM) == n0 + made[0]
    doc = server.api("GET", "/v1/audit/verify").json()
    assert doc["ok"] is True, doc
    for life_ in lives:
        assert life_["granted"] == 3
        assert r.hget(f"{P}license:{life_['license']}", "activations") == "3"


# --- the store's optimistic retries, deterministically ---------------------------------------------
def test_a_commit_hashed_against_a_moved_head_is_rehashed_once_and_counted(redis_server):
    """The chain never forks: a record hashed against a head another commit already moved is sent
    again against the current head (one more round trip), and the race shows in /metrics."""
    from prometheus_client import REGISTRY

    from layerlock.license_server.store.audit import AuditLog
    from layerlock.license_server.store.commit import Commits

    r = redis_server.client()
    commits = Commits(r)
    first = commits.append("note", actor="t", n=1)
    races0 = REGISTRY.get_sample_value("layerlock_audit_head_races_total") or 0.0
    stale = "0" * 64  # the head this commit believes in: someone appended since
    commits.append("note", actor="t", head=stale, n=2)
    assert REGISTRY.get_sample_value("layerlock_audit_head_races_total") == races0 + 1
    records = [json.loads(e["rec"]) for _, e in r.xrange(STREAM)]
    assert [x["n"] for x in records] == [1, 2] and records[1]["prev"] != stale
    assert first and AuditLog(r).verify()["ok"] is True
    commits.append("note", actor="t", n=3)  # no head given: the one this process's last commit left
    assert REGISTRY.get_sample_value("layerlock_audit_head_races_total") == races0 + 1


def test_one_process_commits_from_many_threads_without_a_single_head_race(redis_server, monkeypatch):
    """Threads of one process commit one at a time, each against the head the previous one left:
    no re-hash at all (racing each other for the head cost 1.7-2.4 round trips per activation)."""
    from prometheus_client import REGISTRY

    from layerlock.license_server.store import commit as commit_module
    from layerlock.license_server.store.audit import AuditLog
    from layerlock.license_server.store.commit import Commits

    # a commit slowed past SERIAL_WAIT_S (an fsync stall on a busy CI disk: appendfsync always) lets
    # the next go ahead and race, by design; here only the serialisation is under test
    monkeypatch.setattr(commit_module, "SERIAL_WAIT_S", 60.0)

    r = redis_server.client()
    commits = Commits(r)
    stale = "f" * 64  # what a request read at its start; its first commit corrects it
    commits.append("note", actor="t", head=stale, n=-1)
    races0 = REGISTRY.get_sample_value("layerlock_audit_head_races_total") or 0.0
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: commits.append("note", actor="t", head=stale, head_read_at=0.0, n=i), range(200)))
    assert REGISTRY.get_sample_value("layerlock_audit_head_races_total") == races0
    assert r.xlen(STREAM) == 201 and AuditLog(r).verify()["ok"] is True
    # a head read after this process last committed is believed (another replica may have moved it)
    other = Commits(r)
    other.append("note", actor="t", n=1000)
    commits.append("note", actor="t", head=r.get("{ll}:audit:head"), head_read_at=time.monotonic(), n=1001)
    assert REGISTRY.get_sample_value("layerlock_audit_head_races_total") == races0


def test_a_commit_whose_reply_was_lost_and_resent_is_applied_once(redis_server):
    """redis-py resends a command whose reply timed out; if the first send went through, the resend
    answers that send's record id -- it does not append the record twice, nor call a fresh grant
    "replayed" because the first send burnt its nonce."""
    from layerlock.license_server.store.commit import Change, Commits

    r = redis_server.client()
    commits = Commits(r)
    commits.append("note", actor="t", n=0)
    real, first = commits._run, []

    def lost_reply(keys, args):
        if not first:
            first.append(real(keys, args))  # applied by Redis; the reply never reaches us
        return real(keys, args)  # the client's automatic resend, same arguments

    commits._run = lost_reply
    change = Change().once("{ll}:nonce:test", 60).write("INCR", "{ll}:counter")
    got = commits.commit("activation", change, actor="t", outcome="granted")
    assert first[0][0] == 1 and got == str(first[0][1])  # the id of the one record the first send wrote
    assert r.xlen(STREAM) == 2 and r.get("{ll}:counter") == "1"
    # a new call is a new commit: its own key, so an identical record is not mistaken for a resend
    commits._run = real
    commits.commit("activation", Change().write("INCR", "{ll}:counter"), actor="t", outcome="granted")
    assert r.xlen(STREAM) == 3 and r.get("{ll}:counter") == "2"


def test_a_commit_stuck_on_redis_does_not_hold_the_others_of_its_process(redis_server):
    """One commit waiting on a hung Redis holds the process's commit lock: the next one goes ahead
    after SERIAL_WAIT_S (and races for the head) instead of queueing for a whole timeout."""
    from layerlock.license_server.store.commit import SERIAL_WAIT_S, Commits

    r = redis_server.client()
    commits = Commits(r)
    assert commits._serial is not None and commits._serial.acquire()  # the stuck commit
    try:
        t0 = time.monotonic()
        commits.append("note", actor="t", n=1)
        waited = time.monotonic() - t0
    finally:
        commits._serial.release()
    assert SERIAL_WAIT_S <= waited < SERIAL_WAIT_S + 5 and r.xlen(STREAM) == 1
    assert Commits(r, wait_replicas=1)._serial is None  # commits that wait for replicas never queue


def test_a_change_computed_from_a_stale_read_is_recomputed_not_applied(redis_server):
    """A concurrent writer slips in between the read and the commit: the guard catches it, nothing
    is written, and the change is recomputed from fresh data (licenses, machines, models)."""
    from layerlock.license_server.store import licenses, machines, models
    from layerlock.license_server.store.audit import AuditLog
    from layerlock.license_server.store.commit import Change, Commits, GuardFailed

    r = redis_server.client()
    audit = Commits(r)
    rec = licenses.record("M", "mdl", "acme", 0, 2_000_000_000, 60, 60)
    licenses.create(audit, rec, actor="t", license=rec["license_id"])
    k = licenses.key(rec["license_id"])
    seen = []

    def extend(before):
        seen.append(before["expires_at"])
        if len(seen) == 1:  # someone else extends first, after our read
            r.hset(k, "expires_at", "2000000100")
        return {"expires_at": str(int(before["expires_at"]) + 10)}

    n0 = r.xlen(STREAM)
    _, after = licenses.mutate(audit, rec["license_id"], extend, lambda b, a: ("license_extended", {}), actor="t")
    assert seen == ["2000000000", "2000000100"] and after["expires_at"] == r.hget(k, "expires_at") == "2000000110"
    assert r.xlen(STREAM) == n0 + 1
    r.hincrby(k, "activations", 1)  # activations do not make a revoke retry
    calls = []
    licenses.mutate(audit, rec["license_id"], lambda b: calls.append(1) or {"status": "revoked"},
                    lambda b, a: ("license_revoked", {}), actor="t")
    assert calls == [1] and r.hget(k, "status") == "revoked"

    mrec = machines.record("M", "acme", {}, None)
    machines.create(audit, mrec, actor="t", machine="M")
    flips = []

    def rename(cur):
        flips.append(cur["customer"])
        if len(flips) == 1:
            r.hset(machines.key("M"), "customer", "other")
        return {"labels": "{}"}

    machines.update(audit, "M", rename, "machine_updated", actor="t", machine="M")
    assert flips == ["acme", "other"]

    models.create(audit, models.record("mdl", "n", "1", "blob", "kek-1"), actor="t", model="mdl")

    class Keys:  # stands in for the KeyStore: the re-wrap's retry, not its crypto, is under test
        opened: list[str] = []

        def open_data_key(self, blob, kek_id, model_id):
            self.opened.append(blob)
            if len(self.opened) == 1:  # another rotation re-wraps it between our read and our commit
                r.hset(models.key("mdl"), mapping={"wrapped_key": "blob2", "kek_id": "kek-9"})
            return b"k"

        def seal_data_key(self, key, model_id):
            return "new", "kek-2"

    models.rewrap(audit, Keys(), "mdl", kek_id="kek-2", actor="t")
    assert Keys.opened == ["blob", "blob2"] and r.hget(models.key("mdl"), "wrapped_key") == "new"
    n1 = r.xlen(STREAM)
    try:
        audit.commit("x", Change().guard("absent", machines.key("M")).hset(machines.key("M"), {"customer": "evil"}))
    except GuardFailed:
        pass
    else:
        raise AssertionError("guard did not hold")
    assert r.xlen(STREAM) == n1 and r.hget(machines.key("M"), "customer") == "other"
    assert AuditLog(r).verify()["ok"] is True


def test_secret_looking_fields_never_reach_an_audit_record(redis_server):
    """The write path refuses a record naming a token, wk, key or signature, before any write."""
    from layerlock.license_server.store.commit import Commits, SecretInRecord

    r = redis_server.client()
    commits = Commits(r)
    for field in ("token", "wk", "api_key", "key", "sealed_key", "data_key", "sig", "claim_secret"):
        with pytest.raises(SecretInRecord):
            commits.append("x", **{field: "v"})
    assert r.xlen(STREAM) == 0 and r.get("{ll}:audit:head") is None
    commits.append("x", machine="M")
    assert r.xlen(STREAM) == 1
