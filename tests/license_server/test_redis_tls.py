"""``rediss://`` URLs: the server talks TLS to a real redis-server (skipped if built without TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ls_helpers import new_machine

from layerlock.license_server.store import P
from tests.conftest import LicenseServer, free_port

pytestmark = pytest.mark.single_redis  # a topology of its own


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "redis.crt", tmp_path / "redis.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def test_server_runs_against_redis_over_tls(tmp_path):
    crt, pem = _self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(crt), "--tls-key-file", str(pem), "--tls-ca-cert-file", str(crt),
                             "--tls-auth-clients", "no", "--dir", str(tmp_path), "--save", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    srv = None
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={crt}&ssl_cert_reqs=required"
        client = redis.Redis.from_url(url, retry_on_error=[])
        for _ in range(100):
            if proc.poll() is not None:
                pytest.skip(f"redis-server without TLS support: {proc.stdout.read()[-300:]!r}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        srv = LicenseServer(tmp_path / "srv", url, workers=1)
        srv.start()
        m = new_machine()
        assert srv.api("POST", "/v1/machines", {"machine": m.code}).status_code == 201
        assert client.exists(f"{P}machine:{m.code}")
    finally:
        if srv is not None:
            srv.stop()
        proc.terminate()
        proc.wait(10)
