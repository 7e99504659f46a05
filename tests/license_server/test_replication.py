"""``redis_wait_replicas``: a write is acknowledged only once a replica holds it (``WAIT``).

Real redis-server processes (a primary, and a replica started with ``--replicaof``) and a real
gunicorn server.  What is shown: with a replica connected, every write the API acknowledged is
already on the replica when the answer arrives (so a failover promoting it loses nothing); with
none, writes are answered 503 ``not_replicated`` + ``Retry-After`` and that answer means what the
docs say — applied on the primary, not confirmed (a retry may conflict) — unless Redis refused
the write outright (``min-replicas-to-write``: nothing written).  A single node with waiting off
(the default) works as before.  Checkpoints are confirmed too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis
from ls_helpers import add_model, new_machine

from layerlock.license_server.config import ServerConfig
from layerlock.license_server.embedded_redis import find_redis_server
from layerlock.license_server.store import licenses, machines, models
from layerlock.license_server.store.audit import HEAD, STREAM
from layerlock.shared.errors import ConfigError
from tests.conftest import LicenseServer, RedisServer, free_port, wait_for

pytestmark = pytest.mark.single_redis  # a topology of its own


def _replica_of(primary: RedisServer, directory: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    directory.mkdir()
    port = free_port()
    proc = subprocess.Popen([find_redis_server() or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(directory), "--save", "", "--appendonly", "yes",
                             "--replicaof", "127.0.0.1", str(primary.port), "--logfile", str(directory / "log")],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, decode_responses=True, socket_timeout=5, retry_on_error=[])
    primary_client = primary.client()

    def synced() -> bool:
        try:
            info = client.info("replication")
        except redis.ConnectionError:
            return False
        if info["master_link_status"] != "up" or info.get("master_sync_in_progress"):
            return False
        # The replica's view is not enough: after a diskless sync the primary counts the replica
        # for WAIT only once its first REPLCONF ACK arrives (up to a second later), so ask the
        # primary itself -- a WAIT that one replica confirms.
        return primary_client.wait(1, 200) >= 1

    assert wait_for(synced, 30), (directory / "log").read_text()[-1000:]
    return proc, client


@pytest.fixture
def waiting_server(tmp_path, redis_server):
    """A server that waits for one replica (none connected yet), 1 s at most per write (below
    redis_timeout, 1.5 s, as the config requires)."""
    redis_server.client().config_set("repl-diskless-sync-delay", "0")
    srv = LicenseServer(tmp_path / "server", redis_server.url,
                        env={"LAYERLOCK_REDIS_WAIT_REPLICAS": "1", "LAYERLOCK_REDIS_WAIT_TIMEOUT_MS": "1000"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _not_replicated(resp) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "not_replicated" and int(resp.headers["Retry-After"]) >= 1, resp.text


def test_single_node_with_waiting_off_acknowledges_writes(license_server, redis_server):
    assert ServerConfig().redis_wait_replicas == 0
    m = new_machine()
    resp = license_server.api("POST", "/v1/machines", {"enrollment": m.enrollment})
    assert resp.status_code == 201, resp.text
    assert redis_server.client().info("replication")["connected_slaves"] == 0
    assert license_server.api("GET", "/v1/audit/checkpoint").status_code == 200


def test_no_replica_means_503_not_replicated_yet_the_write_happened(waiting_server, redis_server):
    r = redis_server.client()
    m = new_machine()
    _not_replicated(waiting_server.api("POST", "/v1/machines", {"enrollment": m.enrollment}))
    # Honest semantics: applied on the primary, only not confirmed -- a retry conflicts.
    assert r.exists(machines.key(m.code))
    resp = waiting_server.api("POST", "/v1/machines", {"enrollment": m.enrollment})
    assert resp.status_code == 409 and resp.json()["error"] == "conflict", resp.text
    assert waiting_server.api("GET", f"/v1/machines/{m.code}").status_code == 200  # reads still work
    _not_replicated(waiting_server.api("GET", "/v1/audit/checkpoint"))
    doc = waiting_server.api("GET", "/v1/audit/verify").json()
    assert doc["ok"] is True, doc


def test_min_replicas_to_write_refuses_with_nothing_written(waiting_server, redis_server):
    r = redis_server.client()
    r.config_set("min-replicas-to-write", "1")
    size = r.xlen(STREAM)
    m = new_machine()
    resp = waiting_server.api("POST", "/v1/machines", {"enrollment": m.enrollment})
    _not_replicated(resp)
    assert "nothing was written" in resp.json()["message"]
    assert not r.exists(machines.key(m.code)) and r.xlen(STREAM) == size


def test_with_a_replica_every_acknowledged_write_is_on_it_when_the_answer_arrives(tmp_path, waiting_server,
                                                                                   redis_server):
    proc, replica = _replica_of(redis_server, tmp_path / "replica")
    try:
        model_id, _ = add_model(waiting_server)
        assert replica.exists(models.key(model_id))
        for _ in range(10):
            m = new_machine()
            resp = waiting_server.api("POST", "/v1/machines", {"enrollment": m.enrollment})
            assert resp.status_code == 201, resp.text
            assert replica.exists(machines.key(m.code))  # no sleep: it was there before the 201
            resp = waiting_server.api("POST", "/v1/licenses", {"machine": m.code, "model": model_id, "days": 1})
            assert resp.status_code == 201, resp.text
            lic = resp.json()["license_id"]
            assert replica.hget(licenses.key(lic), "status") == "active"
            assert waiting_server.api("POST", f"/v1/licenses/{lic}/revoke", {}).status_code == 200
            assert replica.hget(licenses.key(lic), "status") == "revoked"
            head = replica.get(HEAD)
            assert head == redis_server.client().get(HEAD)
        resp = waiting_server.api("GET", "/v1/audit/checkpoint")
        assert resp.status_code == 200, resp.text
        assert resp.json()["checkpoint"]["size"] <= replica.xlen(STREAM)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("env, problem", [
    ({"LAYERLOCK_REDIS_WAIT_REPLICAS": "-1"}, "redis_wait_replicas"),
    ({"LAYERLOCK_REDIS_WAIT_REPLICAS": "1", "LAYERLOCK_REDIS_WAIT_TIMEOUT_MS": "1500"}, "redis_wait_timeout_ms"),
    ({"LAYERLOCK_REDIS_WAIT_REPLICAS": "1", "LAYERLOCK_REDIS_WAIT_TIMEOUT_MS": "0"}, "redis_wait_timeout_ms"),
    ({"LAYERLOCK_REDIS_WAIT_REPLICAS": "one"}, "redis_wait_replicas"),
    ({"LAYERLOCK_SHED_QUEUE_MS": "-5"}, "shed_queue_ms"),
    ({"LAYERLOCK_RETRY_AFTER": "0"}, "retry_after"),
])
def test_bad_settings_are_refused_by_name(env, problem):
    with pytest.raises(ConfigError) as err:
        ServerConfig.load(env)
    assert problem in err.value.message


def test_good_settings_load():
    cfg = ServerConfig.load({"LAYERLOCK_REDIS_WAIT_REPLICAS": "2", "LAYERLOCK_REDIS_WAIT_TIMEOUT_MS": "800",
                             "LAYERLOCK_SHED_QUEUE_MS": "0"})
    assert (cfg.redis_wait_replicas, cfg.redis_wait_timeout_ms, cfg.shed_queue_ms) == (2, 800, 0)
