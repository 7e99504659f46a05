"""deploy/: each file exercised — Redis accepts its config, systemd parses the unit, nginx -t passes,
and the recommended deployment (the shipped nginx config run by a real nginx in front of a real
gunicorn) keeps serving with slow clients and answers its own errors in the API's JSON shape.

No skips: the tools are test requirements (``apt-get install -y --no-install-recommends nginx``
for ``nginx``; ``systemd-analyze`` comes with ``systemd``), and a missing one fails the test.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import REPO, free_port, wait_for

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
            .not_valid_after(now + datetime.timedelta(days=1))
            # its own trust anchor, valid for the loopback address the nginx tests connect to
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("licenses.example.com"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
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


class Front:
    """The shipped nginx config run by a real nginx on loopback, in front of a gunicorn."""

    def __init__(self, url: str, port: int, cert: Path, limit_conn: int) -> None:
        self.url, self.port, self.cert, self.limit_conn = url, port, cert, limit_conn

    def tls(self, source: str = "127.0.0.1") -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
        return ssl.create_default_context(cafile=str(self.cert)).wrap_socket(raw, server_hostname="127.0.0.1")

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.request(kwargs.pop("method", "GET"), self.url + path, verify=str(self.cert),
                                timeout=kwargs.pop("timeout", 5), **kwargs)


@contextlib.contextmanager
def nginx_in_front(tmp_path: Path, upstream_ports: int | list[int], *, access_log: str = "off",
                   plain_port: int | None = None) -> Iterator[Front]:
    """``deploy/nginx-tls.conf`` as shipped with one ``server`` line per upstream port (its listen
    addresses and certificate paths changed; IPv6 listeners dropped: loopback IPv4 is enough).
    ``access_log``: a path to log ``$msec $status $request_time $upstream_response_time`` per
    request (benchmarks); ``plain_port``: the TLS server also listens there without TLS
    (benchmarks whose Python client would spend more CPU on TLS than the server it measures)."""
    nginx = _tool("nginx", "nginx")
    cert, key = _self_signed(tmp_path)
    https_port, http_port = free_port(), free_port()
    ports = [upstream_ports] if isinstance(upstream_ports, int) else upstream_ports
    servers = "\n    ".join(f"server 127.0.0.1:{p};" for p in ports)
    text = (DEPLOY / "nginx-tls.conf").read_text()
    for shipped in ("/etc/ssl/layerlock/fullchain.pem", "/etc/ssl/layerlock/privkey.pem", "listen 443 ssl http2;",
                    "listen 80;", "server 127.0.0.1:8700;"):
        assert shipped in text, f"the example changed ({shipped} is gone): update this test"
    site = (text.replace("/etc/ssl/layerlock/fullchain.pem", str(cert))
            .replace("/etc/ssl/layerlock/privkey.pem", str(key))
            .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"
                     + (f"\n    listen 127.0.0.1:{plain_port};" if plain_port else ""))
            .replace("listen 80;", f"listen 127.0.0.1:{http_port};")
            .replace("server 127.0.0.1:8700;", servers))
    site = "\n".join(line for line in site.splitlines() if not line.strip().startswith("listen [::]"))
    limit = re.search(r"^\s*limit_conn layerlock_conn (\d+);", site, re.M)
    assert limit, "the example no longer caps connections per address (limit_conn)"
    (tmp_path / "logs").mkdir()
    (tmp_path / "site.conf").write_text(site)
    # As root, nginx's workers would run as nobody, who cannot enter tmp_path.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"{user}pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\n"
                    f"worker_processes 1;\nworker_rlimit_nofile 16384;\nevents {{ worker_connections 8192; }}\n"
                    "http {\n    log_format timing '$msec $status $request_time $upstream_response_time';\n"
                    f"    access_log {access_log}{' timing' if access_log != 'off' else ''};\n"
                    f"    include {tmp_path}/site.conf;\n}}\n")
    with open(tmp_path / "logs" / "nginx.out", "wb") as out:
        proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    front = Front(f"https://127.0.0.1:{https_port}", https_port, cert, int(limit.group(1)))
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "logs" / "nginx.out").read_text()
            try:
                front.tls().close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield front
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _slow_body(front: Front, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """Headers announcing a 4 KiB body, then only its first byte (the rest trickles later).
    /v1/activate needs no API key, so gunicorn would read the body before answering."""
    sock = front.tls(source)
    sock.sendall(b"POST /v1/activate HTTP/1.1\r\nHost: licenses.example.com\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 4096\r\n\r\n{")
    return sock


def _reply(sock: ssl.SSLSocket, wait: float) -> bytes:
    """What the server sent so far (b"" if nothing within ``wait`` seconds)."""
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except (TimeoutError, ssl.SSLWantReadError):
        return b""


def _json_error(resp: requests.Response, status: int, error: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    doc = resp.json()
    assert doc["error"] == error and isinstance(doc["message"], str) and doc["message"], doc


SLOW_CLIENTS = 16  # > gunicorn's 2 workers × 4 threads here: sent straight to gunicorn they stall /v1/ping


@pytest.mark.slow
def test_slow_clients_do_not_stall_the_server_behind_the_shipped_nginx(tmp_path, license_server):
    """16 connections trickling a request body one byte a second: through nginx, /v1/ping still
    answers at once (nginx holds the partial requests, gunicorn never sees them), and an address
    holding more than limit_conn requests open gets nginx's 503 in the API's JSON shape."""
    with nginx_in_front(tmp_path, license_server.port) as front:
        slow = [_slow_body(front) for _ in range(SLOW_CLIENTS)]
        stop, send_errors = threading.Event(), []

        def trickle() -> None:
            for _ in range(30):  # at most 30 s
                if stop.wait(1.0):
                    return
                for sock in slow:
                    try:
                        sock.sendall(b" ")
                    except OSError as exc:
                        send_errors.append(exc)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        extra: list[ssl.SSLSocket] = []
        try:
            time.sleep(1.5)  # every slow request is in, and trickling
            latencies = []
            for _ in range(6):
                t0 = time.monotonic()
                resp = front.get("/v1/ping")
                latencies.append(time.monotonic() - t0)
                assert resp.status_code == 200, resp.text
                time.sleep(0.5)
            print(f"/v1/ping through nginx with {SLOW_CLIENTS} slow clients: max {max(latencies) * 1000:.0f} ms")
            # stalled behind the slow bodies, a ping would wait for the 30 s trickle to end; the
            # bound leaves room for a loaded CI box, not for a stall
            assert max(latencies) < 5.0, latencies
            # the slow requests were held open all along (not dropped, not answered)
            assert not send_errors and all(_reply(sock, 0.01) == b"" for sock in slow)

            # One address may hold limit_conn requests open; nginx refuses the next ones itself.
            extra = [_slow_body(front, source="127.0.0.2") for _ in range(front.limit_conn + 3)]
            refused = [reply for reply in (_reply(sock, 0.2) for sock in extra) if reply]
            assert len(refused) == 3, refused
            head, _, body = refused[0].partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 2" in head, head
            assert b"application/json" in head and b'"error": "unavailable"' in body, refused[0]
            assert front.get("/v1/ping").status_code == 200  # other addresses are not affected
        finally:
            stop.set()
            trickler.join(5)
            for sock in slow + extra:
                sock.close()


@pytest.mark.slow
def test_errors_are_json_from_gunicorn_and_from_nginx(tmp_path, license_server):
    """The replies gunicorn and nginx write themselves use {"error", "message"} like the API."""
    # gunicorn directly (its limits: request line 4096, header field 8192)
    _json_error(requests.get(license_server.url + "/" + "a" * 5000, timeout=5), 414, "request_uri_too_long")
    _json_error(requests.get(license_server.url + "/v1/ping", headers={"X-Big": "b" * 9000}, timeout=5), 431,
                "request_header_fields_too_large")
    with socket.create_connection(("127.0.0.1", license_server.port), timeout=5) as sock:
        sock.sendall(b"NOT A REQUEST LINE\r\n\r\n")
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head and b'"error": "bad_request"' in body
    assert license_server.api("GET", "/v1/ping").status_code == 200  # and the workers carry on
    # a header line that lost its colon: gunicorn would quote it whole, API key and all, in its log
    with socket.create_connection(("127.0.0.1", license_server.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/machines HTTP/1.1\r\nHost: x\r\nAuthorization Bearer llk_SECRETKEY123\r\n\r\n")
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and "Authorization ..." in json.loads(body)["message"], body
    assert wait_for(lambda: "Invalid request from" in license_server.log.read_text(), 5)
    assert "SECRETKEY123" not in body.decode() and "SECRETKEY123" not in license_server.log.read_text()

    with nginx_in_front(tmp_path, license_server.port) as front:
        _json_error(front.get("/" + "a" * 9000), 414, "request_uri_too_long")  # nginx's own limit (8k)
        _json_error(front.get("/" + "a" * 5000), 414, "request_uri_too_long")  # gunicorn's, passed through
        _json_error(front.get("/v1/machines", method="POST", data=b"{" + b" " * 70000), 413, "payload_too_large")
        _json_error(front.get("/v1/ping", headers={"X-Big": "b" * 9000}), 400, "bad_request")
        license_server.stop()
        resp = front.get("/v1/ping")
        _json_error(resp, 502, "unavailable")
        assert resp.headers["Retry-After"] == "2"


def test_gunicorn_warns_when_bound_beyond_loopback():
    from layerlock.license_server.gunicorn_conf import _exposed

    binds = ["127.0.0.1:8700", "[::1]:8700", "localhost:8700", "unix:/run/layerlock/s.sock", "fd://3",
             "0.0.0.0:8700", "[::]:8700", "10.1.2.3:8700", "licenses.example.com:443"]
    assert _exposed(binds) == ["0.0.0.0:8700", "[::]:8700", "10.1.2.3:8700", "licenses.example.com:443"]


def test_the_bind_is_checked_before_gunicorn_starts():
    """Every form gunicorn accepts passes; what it would refuse after the embedded Redis started
    (or read as something else) stops the master first, exit 2."""
    from layerlock.license_server.gunicorn_conf import CONFIG_ERROR_EXIT, _bind

    for good in ("127.0.0.1:8700", "[::1]:8700", "0.0.0.0:8700", ":8700", "localhost:1", "tcp://h:65535",
                 "unix:/run/layerlock/s.sock", "fd://3"):
        assert _bind(good) == good
    for bad in ("", "8700", "h:0", "h:65536", "::1:8700", "[::1:8700", "h:8700:9", "fd://x", "unix:"):
        with pytest.raises(SystemExit) as stopped:
            _bind(bad)
        assert stopped.value.code == CONFIG_ERROR_EXIT, bad
