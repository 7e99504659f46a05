"""``redis+sentinel://`` URLs: the server finds the master through a real Redis Sentinel."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis
from ls_helpers import new_machine

from layerlock.license_server.store import P
from tests.conftest import LicenseServer, free_port

pytestmark = pytest.mark.single_redis  # a topology of its own


def test_server_runs_against_redis_via_sentinel(tmp_path, redis_server):
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor llmaster 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    srv = None
    try:
        client = redis.Redis(port=port, decode_responses=True, retry_on_error=[])
        for _ in range(100):
            try:
                if client.sentinel_master("llmaster"):
                    break
            except redis.RedisError:
                time.sleep(0.05)
        srv = LicenseServer(tmp_path / "srv", f"redis+sentinel://127.0.0.1:{port}/llmaster", workers=1)
        srv.start()
        m = new_machine()
        assert srv.api("POST", "/v1/machines", {"machine": m.code}).status_code == 201
        assert redis_server.client().exists(f"{P}machine:{m.code}")
    finally:
        if srv is not None:
            srv.stop()
        proc.terminate()
        proc.wait(10)
