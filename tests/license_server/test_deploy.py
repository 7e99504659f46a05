"""deploy/: each file exercised — Redis accepts its config, systemd parses the unit, nginx -t passes.

No skips: the tools are test requirements (``apt-get install -y --no-install-recommends nginx``
for ``nginx``; ``systemd-analyze`` comes with ``systemd``), and a missing one fails the test.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import time
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).exists()), None)
    assert path, f"{name} is a test requirement: apt-get install -y --no-install-recommends {package}"
    return path


def test_systemd_unit_parses_and_is_hardened():
    unit = DEPLOY / "layerlock-server.service"
    out = subprocess.run([_tool("systemd-analyze", "systemd"), "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "/opt/layerlock" not in line]  # the install path does not exist here
    assert not problems, problems
    text = unit.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=layerlock", "PrivateTmp=yes",
                      "ProtectHome=yes", "CapabilityBoundingSet=", "deploy/gunicorn.conf.py"):
        assert directive in text


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "licenses.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_nginx_example_passes_nginx_t_and_points_at_gunicorn(tmp_path):
    """``nginx -t`` on the example as shipped, only the certificate paths pointed at a throwaway
    self-signed pair, so the whole file is checked (TLS settings included), not just its syntax."""
    text = (DEPLOY / "nginx-tls.conf").read_text()
    assert "server 127.0.0.1:8700" in text and "client_max_body_size 64k" in text and "ssl_protocols" in text
    assert "X-Forwarded-For $remote_addr" in text  # overwrites what the client sent (trust_proxy)
    nginx = _tool("nginx", "nginx")
    cert, key = _self_signed(tmp_path)
    site = text.replace("/etc/ssl/layerlock/fullchain.pem", str(cert)).replace("/etc/ssl/layerlock/privkey.pem",
                                                                               str(key))
    assert site.count(str(tmp_path)) == 2, "the example's certificate paths changed: update this test"
    (tmp_path / "logs").mkdir()
    (tmp_path / "site.conf").write_text(site)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
                    f"http {{\n    include {tmp_path}/site.conf;\n}}\n")
    out = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr and "test is successful" in out.stderr
