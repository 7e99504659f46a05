"""deploy/: each file exercised — Redis accepts its config, systemd parses the unit, nginx (if present)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from tests.conftest import REPO

DEPLOY = REPO / "deploy"


def test_redis_conf_is_accepted_with_durable_settings(tmp_path):
    sock = tmp_path / "r.sock"
    conf = tmp_path / "redis.conf"  # the production dir does not exist here: point it at tmp_path
    conf.write_text("\n".join(f"dir {tmp_path}" if line.startswith("dir ") else line
                              for line in (DEPLOY / "redis.conf").read_text().splitlines()))
    proc = subprocess.Popen(["redis-server", str(conf), "--port", "0",
                             "--unixsocket", str(sock), "--daemonize", "no", "--logfile", str(tmp_path / "log")])
    try:
        client = redis.Redis(unix_socket_path=str(sock), decode_responses=True, retry_on_error=[])
        for _ in range(100):
            assert proc.poll() is None, (tmp_path / "log").read_text()
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_parses_and_is_hardened():
    unit = DEPLOY / "layerlock-server.service"
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "/opt/layerlock" not in line]  # the install path does not exist here
    assert not problems, problems
    text = unit.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=layerlock", "PrivateTmp=yes",
                      "ProtectHome=yes", "CapabilityBoundingSet=", "deploy/gunicorn.conf.py"):
        assert directive in text


def test_nginx_example_points_at_gunicorn_and_caps_bodies(tmp_path):
    text = (DEPLOY / "nginx-tls.conf").read_text()
    assert "server 127.0.0.1:8700" in text and "client_max_body_size 64k" in text and "ssl_protocols" in text
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed: syntax not checked")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"events {{}}\nhttp {{\n{text}\n}}\n")
    out = subprocess.run(["nginx", "-t", "-c", str(conf)], capture_output=True, text=True)
    assert out.returncode == 0 or "ssl_certificate" in out.stderr, out.stderr
