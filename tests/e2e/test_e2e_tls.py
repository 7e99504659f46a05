"""TLS end to end: the license server behind nginx (``deploy/nginx-tls.conf``) with a certificate
from a private CA, reached by ``layerlock-verifier enroll --ca-bundle`` and by the sidecar with
``ca_bundle`` in its config.

Everything is real: a CA and a server certificate for 127.0.0.1/localhost made with
``cryptography``, nginx running the shipped example (only its ports, certificate paths and
upstream rewritten, like ``tests/license_server/test_deploy.py`` does for ``nginx -t``), gunicorn
behind it with ``LAYERLOCK_TRUST_PROXY=1`` as the example asks, and the verifier CLI and sidecar as
subprocesses.  With the right CA bundle enrollment pins the server's keys and the sidecar
activates; without it, or with another CA, both refuse with a one-line TLS error (exit 1, no
traceback; the sidecar keeps running and reports the model locked, ``server_unreachable``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e_helpers import (
    ENV,
    MODEL_ID,
    PY,
    REPO,
    Sidecar,
    cleanup,
    make_model,
    public_dir,
    run_client,
    wait_for,
    write_config,
)

from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.lockfile import protect
from layerlock.shared.wrap import seal_for_server
from tests.conftest import LicenseServer, RedisServer, free_port

DEPLOY = REPO / "deploy"
# The verifier must trust only what it is given: no CA bundle from the environment.
VENV = {k: v for k, v in ENV.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
                                                   "SSL_CERT_DIR")}


# --- a private PKI -------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
                 ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


@dataclass
class Pki:
    ca: Path  # the private CA that signed the server certificate
    other_ca: Path  # a CA that did not
    fullchain: Path
    privkey: Path


def _pki(directory: Path) -> Pki:
    directory.mkdir()
    ca_key, ca = _ca("layerlock test CA")
    _, other = _ca("some other CA")
    key, cert = _server_cert(ca_key, ca)
    pki = Pki(directory / "ca.pem", directory / "other-ca.pem", directory / "fullchain.pem", directory / "privkey.pem")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.other_ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    pem = serialization.Encoding.PEM
    pki.fullchain.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    pki.privkey.write_bytes(_pem_key(key))
    return pki


# --- nginx with the shipped example --------------------------------------------------------------
def _nginx_site(upstream_port: int, https_port: int, http_port: int, pki: Pki) -> str:
    text = (DEPLOY / "nginx-tls.conf").read_text()
    edits = [("server 127.0.0.1:8700;", f"server 127.0.0.1:{upstream_port};"),
             ("listen 80;", f"listen 127.0.0.1:{http_port};"), ("listen [::]:80;", ""),
             ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"), ("listen [::]:443 ssl http2;", ""),
             ("/etc/ssl/layerlock/fullchain.pem", str(pki.fullchain)),
             ("/etc/ssl/layerlock/privkey.pem", str(pki.privkey))]
    for old, new in edits:
        assert text.count(old) == 1, f"deploy/nginx-tls.conf changed ({old!r}): update this test"
        text = text.replace(old, new)
    return text


class Nginx:
    def __init__(self, root: Path, site: str) -> None:
        self.root = root
        (root / "logs").mkdir(parents=True)
        (root / "site.conf").write_text(site)
        user = "user root root;\n" if os.getuid() == 0 else ""  # workers must reach the 0700 tmp dirs
        temp = "".join(f"    {kind}_temp_path {root}/{kind}_temp;\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf = root / "nginx.conf"
        self.conf.write_text(f"{user}daemon off;\npid {root}/nginx.pid;\nerror_log {root}/logs/error.log;\n"
                             f"events {{}}\nhttp {{\n    access_log {root}/logs/access.log;\n{temp}"
                             f"    include {root}/site.conf;\n}}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, https_port: int, ca: Path) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        assert Path(nginx).exists(), "nginx is a test requirement: apt-get install -y --no-install-recommends nginx"
        self.proc = subprocess.Popen([nginx, "-p", str(self.root), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.root / "logs" / "stderr", "wb"),  # noqa: SIM115
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "logs" / "error.log").read_text()
            try:
                if requests.get(f"https://127.0.0.1:{https_port}/readyz", verify=str(ca), timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"nginx not ready: {(self.root / 'logs' / 'error.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Site:
    server: LicenseServer
    url: str  # https://127.0.0.1:<port>, through nginx
    pki: Pki
    nginx: Nginx


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("tls")
    pki = _pki(base / "pki")
    rs = RedisServer(base / "redis")
    rs.start()
    server = LicenseServer(base / "server", rs.url, env={"LAYERLOCK_TRUST_PROXY": "1"})
    https_port, http_port = free_port(), free_port()
    nginx = Nginx(base / "nginx", _nginx_site(server.port, https_port, http_port, pki))
    try:
        server.start()
        nginx.start(https_port, pki.ca)
        yield Site(server, f"https://127.0.0.1:{https_port}", pki, nginx)
    finally:
        nginx.stop()
        server.stop()
        rs.kill()


def _verifier(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "layerlock.verifier", *args], env=VENV, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def _enroll(site: Site, root: Path, *ca: str) -> subprocess.CompletedProcess[str]:
    mid = root / "machine-id"
    if not mid.exists():
        root.mkdir(parents=True, exist_ok=True)
        mid.write_text(os.urandom(16).hex() + "\n")
    return _verifier("enroll", "--state-dir", str(root / "state"), "--server", site.url, "--machine-id-file",
                     str(mid), *ca, "--json")


def _assert_tls_refusal(out: subprocess.CompletedProcess[str]) -> None:
    """Exit 1 with one line naming the server and the TLS failure; no traceback, nothing on stdout."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "SSLError" in lines[0] and "127.0.0.1" in lines[0], lines[0]


def test_plain_clients_see_the_private_ca_certificate(site):
    """The set-up itself: nginx serves the API over TLS with the private CA's certificate, HTTP redirects."""
    assert requests.get(site.url + "/readyz", verify=str(site.pki.ca), timeout=5).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(site.url + "/readyz", verify=str(site.pki.other_ca), timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(site.url + "/readyz", timeout=5)  # certifi's bundle
    # the API itself answers through the proxy
    resp = requests.get(site.url + "/v1/machines", verify=str(site.pki.ca), timeout=5,
                        headers={"Authorization": f"Bearer {site.server.admin_key}"})
    assert resp.status_code == 200, resp.text


def test_enroll_pins_the_server_keys_only_with_its_ca_bundle(site, tmp_path):
    jwks = requests.get(site.url + "/.well-known/jwks.json", verify=str(site.pki.ca), timeout=5).json()
    kids = sorted(k["kid"] for k in jwks["keys"])
    for label, ca in (("none", ()), ("other", ("--ca-bundle", str(site.pki.other_ca)))):
        out = _enroll(site, tmp_path / label, *ca)
        _assert_tls_refusal(out)
        assert not (tmp_path / label / "state" / "jwks.json").exists()  # nothing pinned
    out = _enroll(site, tmp_path / "good", "--ca-bundle", str(site.pki.ca))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["pinned_kids"] == kids and doc["enrollment_code"].startswith("LLE1.")
    assert (tmp_path / "good" / "state" / "jwks.json").exists()


def test_sidecar_activates_through_tls_with_ca_bundle_and_refuses_another_ca(site, tmp_path):
    server = site.server
    root = tmp_path / "host"
    original = tmp_path / "mlp.safetensors"
    make_model(original)
    result = protect(original, tmp_path / "protected", model_id=MODEL_ID)
    sealed = seal_for_server(result.data_key, x25519_public(b64u_decode(server.intake_pub)), MODEL_ID)
    resp = server.api("POST", "/v1/models", {"model_id": MODEL_ID, "name": "mlp", "version": "1",
                                             "sealed_key": sealed})
    assert resp.status_code == 201, resp.text
    out = _enroll(site, root, "--ca-bundle", str(site.pki.ca))
    assert out.returncode == 0, out.stderr
    enrolled = json.loads(out.stdout)
    resp = server.api("POST", "/v1/machines", {"enrollment": enrolled["enrollment_code"], "customer": "acme"})
    assert resp.status_code == 201, resp.text
    resp = server.api("POST", "/v1/licenses", {"machine": enrolled["machine"], "model": MODEL_ID, "days": 1})
    assert resp.status_code == 201, resp.text

    # A fresh copy of the enrolled state (keys and pinned JWKS, no cached token) for the sidecar
    # that is given the wrong CA, so it cannot fall back on a token the good one cached.
    wrong_state = root / "state-wrong-ca"
    shutil.copytree(root / "state", wrong_state)
    sock_dir = public_dir()
    sidecars: list[Sidecar] = []
    try:
        def sidecar(name: str, state: Path, ca: Path) -> Sidecar:
            config = write_config(root / f"{name}.toml", server=site.url, state_dir=state,
                                  machine_id_file=root / "machine-id", socket_path=sock_dir / f"{name}.sock",
                                  locked=result.locked_path, bundle=result.bundle_path, extra=f'ca_bundle = "{ca}"')
            sc = Sidecar(config, root / f"{name}.log")
            sidecars.append(sc)
            return sc

        good = sidecar("good", root / "state", site.pki.ca)
        good.start()
        st = good.model_state()
        assert st["state"] == "unlocked" and st["source"] == "server", st
        assert run_client(MODEL_ID, sock_dir / "good.sock")["sha256"] == __import__("hashlib").sha256(
            original.read_bytes()).hexdigest()

        bad = sidecar("bad", wrong_state, site.pki.other_ca)
        bad.start()  # READY once the first attempt is over, the model still locked
        st = bad.model_state()
        assert st["state"] == "locked" and st["reason"] == "server_unreachable", st
        assert "SSLError" in st["message"] and site.url in st["message"], st
        assert run_client(MODEL_ID, sock_dir / "bad.sock")["refused"] == "server_unreachable"
        assert wait_for(lambda: sum(e["event"] == "server_unreachable" for e in bad.events()) >= 2, timeout=10)
        assert bad.proc is not None and bad.proc.poll() is None  # retrying, not crashed
        assert all("SSLError" in e["detail"] for e in bad.events() if e["event"] == "server_unreachable")
        assert "Traceback" not in bad.log.read_text()
        assert not (wrong_state / "tokens" / f"{MODEL_ID}.jwt").exists()
    finally:
        for sc in sidecars:
            sc.stop()
        cleanup(sock_dir)
