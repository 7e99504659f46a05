"""Fixtures shared by the whole suite: a real Redis and a real license server (gunicorn).

No fakes: ``redis_server`` is a ``redis-server`` process and ``license_server`` is gunicorn with
``deploy/gunicorn.conf.py`` serving ``layerlock.license_server.wsgi:app`` on a loopback port, initialised
with ``layerlock init``.  Both are always stopped at teardown (process groups are killed), so
no test leaves processes behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from layerlock.license_server.embedded_redis import find_redis_server

REPO = Path(__file__).resolve().parents[1]
CLI = "layerlock.license_server.cli"
WSGI_APP = "layerlock.license_server.wsgi:app"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Any, timeout: float = 20.0, step: float = 0.05) -> bool:
    """Poll ``pred()`` until it is true (→ True) or ``timeout`` seconds pass (→ False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERLOCK_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1:``port`` with AOF (``appendfsync always``) in ``dir``.

    Attributes: ``url`` (``redis://127.0.0.1:<port>/0``), ``port``, ``dir`` (its working dir,
    where the AOF lives).  Methods: ``start()`` (again after stop/kill: same port, same data),
    ``stop()`` (SIGTERM, clean), ``kill()`` (SIGKILL, like a crash), ``client()`` (a
    ``redis.Redis`` with ``decode_responses=True``).
    """

    def __init__(self, directory: Path, port: int | None = None, appendfsync: str = "always") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [find_redis_server() or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1, retry_on_error=[])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-1000:]}")
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class LicenseServer:
    """A real license server: ``layerlock init`` + gunicorn on a free loopback port.

    Attributes: ``url`` (``http://127.0.0.1:<port>``), ``port``, ``admin_key`` (the first admin
    API key printed by init), ``data_dir`` (``Path``; keys in ``data_dir/keys``), ``intake_pub``
    (b64url X25519 string to seal data keys to), ``redis_url``, ``log`` (path of the server's
    stderr log).  Methods: ``api(method, path, json=None, key=None) -> requests.Response``
    (``key`` defaults to the admin key; pass ``key=""`` for no Authorization header),
    ``stop()`` / ``start()`` (same port and data dir), ``redis()`` (a client on its Redis).
    Settings: ``min_lifetime`` is 2 s, so licenses may use ``token_ttl``/``offline_grace`` of a
    few seconds to test renewal and expiry; other ``LAYERLOCK_*`` settings via ``env``.
    """

    def __init__(self, data_dir: Path, redis_url: str, *, workers: int = 2,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.extra_env = {"LAYERLOCK_MIN_LIFETIME": "2", **(env or {})}
        self.log = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        out = subprocess.run([PYTHON, "-m", CLI, "init", "--data-dir", str(data_dir), "--json"],
                             env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
        doc = json.loads(out.stdout)
        self.admin_key: str = doc["admin_api_key"]
        self.intake_pub: str = doc["intake_pub"]

    def start(self, timeout: float = 30.0) -> None:
        env = _env(LAYERLOCK_DATA_DIR=str(self.data_dir), LAYERLOCK_REDIS_URL=self.redis_url,
                   LAYERLOCK_BIND=f"127.0.0.1:{self.port}", LAYERLOCK_WORKERS=str(self.workers),
                   **self.extra_env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "gunicorn", "-c", str(REPO / "deploy" / "gunicorn.conf.py"), WSGI_APP],
                env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"license server exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("license server did not become ready")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def api(self, method: str, path: str, json: Any = None, key: str | None = None,
            **kwargs: Any) -> requests.Response:
        key = self.admin_key if key is None else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.request(method, self.url + path, json=json, headers=headers,
                                timeout=kwargs.pop("timeout", 10), **kwargs)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path):
    """A real redis-server (see :class:`RedisServer`); stopped at teardown."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def license_server(tmp_path: Path, redis_server: RedisServer):
    """A real license server on ``redis_server`` (see :class:`LicenseServer`); stopped at teardown."""
    server = LicenseServer(tmp_path / "server", redis_server.url)
    server.start()
    try:
        yield server
    finally:
        server.stop()
