"""Redis Cluster (``redis+cluster://``): the server on a real 3-primary cluster, the key layout,
``WAIT`` on the ledger's primary, a cluster failover, and the move from the old ``ll:`` layout.

Every key carries the hash tag ``{ll}`` (see ``license_server/store/__init__.py``): each commit
appends to the one audit chain atomically with the state it changes, so the ledger is one slot.
These tests check that claim on a real cluster — nothing lands on the other primaries — and that
the server follows a failover of that slot's primary without a restart and without losing an
acknowledged write.  ``make test-cluster`` runs the whole API suite on a cluster as well.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from layerlock.license_server.redis_conn import connect
from layerlock.license_server.store import P
from layerlock.shared.errors import ConfigError
from tests.conftest import LicenseServer, RedisClusterServer, RedisServer, free_port, serving, wait_for
from tests.license_server.ls_helpers import activate, add_model, issue, new_machine, register
from tests.license_server.test_console import console


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def _keys_by_node(cluster: RedisClusterServer) -> dict[int, list[str]]:
    out = {}
    for n in cluster.nodes:
        if n.proc is not None and n.proc.poll() is None:
            out[n.port] = sorted(_node(n.port).keys("*"))
    return out


@pytest.mark.parametrize(("url", "message"), [
    ("redis+cluster://127.0.0.1:7000/1", "only database 0"),
    ("redis+cluster://127.0.0.1:7000?ssl_ca_certs=/x", "need a rediss+cluster:// URL"),
    ("rediss+cluster://127.0.0.1:7000?nope=1", "unknown redis+cluster URL option(s): nope"),
    ("redis+cluster://127.0.0.1:70x0", "bad host:port '127.0.0.1:70x0'"),
    ("redis+cluster://:7000", "bad host:port ':7000'"),
    ("cluster://127.0.0.1:7000", "must be redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"),
])
def test_a_bad_cluster_url_is_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        connect(url, 1.0)
    assert message in str(err.value)


def test_a_cluster_url_that_cannot_work_fails_at_startup_and_never_quotes_the_password(tmp_path: Path) -> None:
    plain, other = RedisServer(tmp_path / "plain"), RedisServer(tmp_path / "other")
    plain.start()
    other.start()
    a, b, dead = f"127.0.0.1:{plain.port}", f"127.0.0.1:{other.port}", f"127.0.0.1:{free_port()}"
    try:
        for _ in range(4):  # redis-py shuffles the nodes: the answer must not depend on the order
            with pytest.raises(ConfigError) as err:  # waiting would not help: a 503 for every request hid it
                connect(f"redis+cluster://{a},{b}", 1.0)
            assert f"{a} is not in cluster mode; {b} is not in cluster mode" in str(err.value)
            assert "for a single Redis use redis://host:port" in str(err.value)
            # a node that is down may be the cluster: deferred (the server starts, 503 until it answers)
            assert type(connect(f"redis+cluster://{a},{dead}", 1.0)).__name__ == "DeferredCluster"
        for userinfo, why in (("ops:s3cret", "refused the user name and password"),  # no such ACL user
                              (":s3cret", "is not in cluster mode")):  # a password it does not ask for
            with pytest.raises(ConfigError) as err:
                connect(f"redis+cluster://{userinfo}@{a}", 1.0)
            assert f"{a} {why}" in str(err.value) and "s3cret" not in str(err.value)
    finally:
        plain.stop()
        other.stop()
    assert type(connect(f"redis+cluster://{a}", 1.0)).__name__ == "DeferredCluster"


@pytest.mark.parametrize("url", ["redis+cluster://u:pa#ss@127.0.0.1:7000", "redis://u:p/ss@127.0.0.1:6379/0",
                                 "redis://127.0.0.1:63x79/0", "redis+sentinel://u:pa?ss@127.0.0.1:26379/m"])
def test_an_unparsable_url_is_a_config_error_that_quotes_no_password(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        connect(url, 1.0)
    message = str(err.value)
    assert "percent-encoded" in message
    assert not any(piece in message for piece in ("'u:pa'", "pa#ss", "p/ss", "u:p", "pa?ss"))


@pytest.mark.parametrize(("url", "message"), [
    ("redis://127.0.0.1:6379/0?socket_timout=1", "an option redis-py does not know: 'socket_timout'"),
    # with credentials, never named: an unencoded '?' in the password makes its tail an "option"
    ("redis://:?S3cretTail=1@127.0.0.1:6379", "an option redis-py does not know (or a password with '?'"),
    ("redis://:s3cret@127.0.0.1:6379/0?socket_timout=1", "an option redis-py does not know (or a password"),
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "an option redis-py does not know: 'ssl_cert_reqs'"),  # no TLS
    ("redis://:s3cret@127.0.0.1:6379/notadb", "the database in LAYERLOCK_REDIS_URL (its path) must be a number"),
])
def test_a_url_option_redis_py_would_trip_on_later_is_refused_now(url: str, message: str) -> None:
    """Before: a TypeError at the first connection (every request a 500), or database 0 in silence."""
    with pytest.raises(ConfigError) as err:
        connect(url, 1.0)
    assert message in str(err.value) and "s3cret" not in str(err.value).lower(), str(err.value)  # (S3cretTail too)
    connect("redis://:s3cret@127.0.0.1:6379/3?socket_keepalive=true", 1.0).close()  # good options still work


@pytest.fixture(scope="module")
def on_cluster(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("cluster")
    rc = RedisClusterServer(base / "redis")
    with serving(rc, base / "server") as ls:
        yield rc, ls


def test_the_whole_ledger_lives_in_one_slot_and_verifies(on_cluster) -> None:
    rc, ls = on_cluster
    m, other = new_machine(), new_machine()
    register(ls, m)
    register(ls, other, customer="globex")
    model_id, _ = add_model(ls)
    lic = issue(ls, m, model_id)
    pool = ls.api("POST", "/v1/licenses", {"customer": "globex", "model": model_id, "kind": "floating",
                                           "seats": 1, "days": 30})
    assert pool.status_code == 201, pool.text
    assert activate(ls, m, model_id).status_code == 200
    assert activate(ls, other, model_id).status_code == 200  # takes the pool's one seat
    assert activate(ls, new_machine(), model_id).status_code in (401, 403)  # counted per source
    assert ls.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "test"}).status_code == 200
    assert activate(ls, m, model_id).status_code == 403
    assert ls.api("POST", "/v1/keys", {"role": "auditor", "name": "a"}).status_code == 201
    console(ls)  # a console session is a key too

    verified = ls.api("GET", "/v1/audit/verify").json()
    assert verified["ok"] is True and verified["checked"] >= 8
    cp = ls.api("GET", "/v1/audit/checkpoint")
    assert cp.status_code == 200 and cp.json()["checkpoint"]["head"] == verified["head"]

    slot = rc.client().cluster_keyslot(P + "audit")
    by_node = _keys_by_node(rc)
    holders = [port for port, keys in by_node.items() if keys]
    assert len(holders) == 1, {p: len(k) for p, k in by_node.items()}  # one primary holds the ledger...
    keys = by_node[holders[0]]
    assert len(keys) > 20 and all(k.startswith(P) for k in keys), keys
    owner = _node(holders[0])
    assert {owner.cluster("keyslot", k) for k in keys} == {slot}  # ...all of it in the one slot
    assert any(k.startswith(P + "console:session:") for k in keys)


def test_wait_confirms_on_the_ledger_primary_and_a_cluster_failover_loses_nothing(tmp_path: Path) -> None:
    rc = RedisClusterServer(tmp_path / "redis", replicas=1)
    rc.start()
    ls = LicenseServer(tmp_path / "server", rc.url, env={"LAYERLOCK_REDIS_WAIT_REPLICAS": "1"})
    try:
        ls.start()
        m = new_machine()
        register(ls, m)
        model_id, _ = add_model(ls)
        before = issue(ls, m, model_id)  # acknowledged only once the replica holds it
        replica = _node(rc.replica_of_ledger().port)
        assert replica.execute_command("READONLY") and replica.exists(P + "license:" + before["license_id"])

        rc.ledger_primary().kill()  # SIGKILL: the replica is promoted (cluster-node-timeout 2 s)
        start = time.monotonic()
        assert wait_for(lambda: replica.execute_command("ROLE")[0] == "master", 30)
        # the server follows without a restart; writes need a replica again, so reads come first
        assert wait_for(lambda: ls.api("GET", f"/v1/licenses/{before['license_id']}").status_code == 200, 30)
        serving = time.monotonic() - start
        assert ls.api("GET", f"/v1/licenses/{before['license_id']}").json()["status"] == "active"
        after = ls.api("POST", "/v1/licenses", {"machine": m.code, "model": model_id, "days": 5})
        assert after.status_code == 503 and after.json()["error"] in ("not_replicated", "unavailable"), after.text
        assert ls.api("GET", "/v1/audit/verify").json()["ok"] is True
        assert serving < 30
    finally:
        ls.stop()
        rc.kill()


def test_a_server_started_while_the_cluster_is_down_serves_once_it_is_up(tmp_path: Path) -> None:
    rc = RedisClusterServer(tmp_path / "redis")  # ports chosen, nothing started
    ls = LicenseServer(tmp_path / "server", rc.url)
    try:
        ls.start(ready=503)  # boots (the cluster client is made on first use) and says it is not ready
        down = ls.api("GET", "/v1/machines")
        assert down.status_code == 503 and down.json()["error"] == "unavailable" and "Retry-After" in down.headers
        rc.start()
        assert wait_for(lambda: ls.api("GET", "/readyz", key="").status_code == 200, 30)
        m = new_machine()
        register(ls, m)  # the bootstrap admin key reached Redis on the way, and the scripts run
        model_id, _ = add_model(ls)
        issue(ls, m, model_id)
        assert activate(ls, m, model_id).status_code == 200
        assert ls.api("GET", "/v1/audit/verify").json()["ok"] is True
    finally:
        ls.stop()
        rc.kill()


def test_an_old_ll_database_moves_to_the_new_layout_once(tmp_path: Path) -> None:
    rs = RedisServer(tmp_path / "redis")
    rs.start()
    ls = LicenseServer(tmp_path / "server", rs.url)
    try:
        ls.start()
        m = new_machine()
        register(ls, m)
        model_id, _ = add_model(ls)
        lic = issue(ls, m, model_id)
        assert activate(ls, m, model_id).status_code == 200
        ls.stop()
        r = rs.client()
        n = r.eval("local ks = redis.call('KEYS', ARGV[1] .. '*') "  # what a server before 2026-11-27 wrote
                   "for _, k in ipairs(ks) do redis.call('RENAME', k, 'll:' .. string.sub(k, #ARGV[1] + 1)) end "
                   "return #ks", 0, P)
        assert n > 5 and not r.keys(P + "*")

        ls.start()
        assert ls.api("GET", f"/v1/licenses/{lic['license_id']}").json()["status"] == "active"
        verified = ls.api("GET", "/v1/audit/verify").json()
        assert verified["ok"] is True and verified["checked"] >= 4
        assert not r.keys("ll:*") and len(r.keys(P + "*")) >= n
        assert '"event": "layout_migrated"' in ls.log.read_text()
        assert activate(ls, m, model_id).status_code == 200

        ls.stop()  # an old server writing beside a new one: refused, nothing renamed
        r.set("ll:machine:stray", "x")  # what an old server's commit writes: a record and its audit entry
        r.xadd("ll:audit", {"rec": "{}", "h": "0" * 64})
        with pytest.raises(RuntimeError, match="license server exited"):
            ls.start(timeout=15)
        assert "keys under both the old prefix 'll:' and the new '{ll}:'" in ls.log.read_text()
        assert r.exists("ll:machine:stray", "ll:audit") == 2 and r.exists(P + "audit:head")
    finally:
        ls.stop()
        rs.kill()
