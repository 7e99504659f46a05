"""Fixtures shared by the whole suite: a real Redis and a real license server (gunicorn).

No fakes: ``redis_server`` is a ``redis-server`` process and ``license_server`` is gunicorn with
``deploy/gunicorn.conf.py`` serving ``layerlock.license_server.wsgi:app`` on a loopback port, initialised
with ``layerlock init``.  Both are always stopped at teardown (process groups are killed), so
no test leaves processes behind.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
import requests

from layerlock.license_server.embedded_redis import find_redis_server

REPO = Path(__file__).resolve().parents[1]
CLI = "layerlock.license_server.cli"
WSGI_APP = "layerlock.license_server.wsgi:app"
PYTHON = sys.executable


#: Ports :func:`free_port` handed out: a port drawn for one server but not bound yet is free again
#: for the OS, so without this a cluster's six ports could include the same one twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.add(port)
    return port


def fresh_minute(need: float = 20) -> None:
    """Sleep into the next wall-clock minute unless ``need`` seconds are left in this one.

    The server's rate budgets are fixed one-minute windows (``int(time.time() // 60)``): a test
    that spends a budget and then counts must run inside one of them.  An hour ends with a
    minute, so this also keeps the hourly rejection counts (``{ll}:rejects:<YYYYMMDDHH>``) in one."""
    if time.time() % 60 > 60 - need:
        time.sleep(60 - time.time() % 60 + 0.05)


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
        self.extra_args: list[str] = []

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [find_redis_server() or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log"), *self.extra_args],
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1, retry_on_error=[])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-1000:]}")
            try:
                if client.ping():
                    return
            except redis.exceptions.MasterDownError:  # up: a replica still syncing (replica-serve-stale-data no)
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


class RedisClusterServer:
    """A real 3-primary Redis Cluster: three ``redis-server`` processes with deploy/redis-cluster.conf on
    loopback, the 16,384 slots split between them (``CLUSTER ADDSLOTSRANGE``), joined with
    ``CLUSTER MEET`` — what ``redis-cli --cluster create`` does, without needing redis-cli.

    Same interface as :class:`RedisServer`: ``url`` (``redis+cluster://h:p,h:p,h:p``), ``start()``,
    ``stop()``, ``kill()``, ``client()`` (a ``RedisCluster``); plus ``nodes`` (one
    :class:`RedisServer` per primary, then the replicas).  ``replicas=1`` adds a replica of the
    primary serving the ledger's slot (:meth:`ledger_primary`, :meth:`replica_of_ledger`).
    """

    PRIMARIES = 3
    SLOTS = 16384

    def __init__(self, directory: Path, appendfsync: str = "always", replicas: int = 0) -> None:
        self.dir = directory
        self.replicas = replicas
        self.nodes = [RedisServer(directory / f"node{i}", appendfsync=appendfsync)
                      for i in range(self.PRIMARIES + replicas)]
        self.bus_ports = [free_port() for _ in self.nodes]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:self.PRIMARIES])
        shipped = [line for line in (REPO / "deploy" / "redis-cluster.conf").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "include ", "port ", "cluster-config-file "))]
        for node, bus in zip(self.nodes, self.bus_ports, strict=True):  # deploy/redis-cluster.conf as shipped
            (node.dir / "cluster.conf").write_text("\n".join(
                [*shipped, f"cluster-config-file {node.dir / 'nodes.conf'}", f"cluster-port {bus}", ""]))
            node.extra_args = ["--include", str(node.dir / "cluster.conf")]

    def start(self, timeout: float = 20.0) -> None:
        for node in self.nodes:
            node.start()
        plain = [redis.Redis(port=n.port, decode_responses=True, socket_timeout=5) for n in self.nodes]
        if int(plain[0].cluster("info").get("cluster_slots_assigned", 0)) == 0:  # first start: form it
            step = self.SLOTS // self.PRIMARIES
            for i, c in enumerate(plain[:self.PRIMARIES]):
                last = self.SLOTS - 1 if i == self.PRIMARIES - 1 else (i + 1) * step - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
            for n, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                plain[0].execute_command("CLUSTER", "MEET", "127.0.0.1", n.port, bus)
            if self.replicas:
                assert wait_for(lambda: all(int(c.cluster("info").get("cluster_known_nodes", 0)) == len(self.nodes)
                                            for c in plain), timeout), "nodes did not meet"
                primary = plain[self.nodes.index(self.ledger_primary())].execute_command("CLUSTER", "MYID")
                for c in plain[self.PRIMARIES:]:
                    c.execute_command("CLUSTER", "REPLICATE", primary)
        ok = wait_for(lambda: all(c.cluster("info").get("cluster_state") == "ok"
                                  and int(c.cluster("info").get("cluster_known_nodes", 0)) == len(self.nodes)
                                  for c in plain), timeout)
        if ok and self.replicas:  # and each replica synced with its primary
            ok = wait_for(lambda: all(c.info("replication").get("master_link_status") == "up"
                                      for c in plain[self.PRIMARIES:]), timeout)
        for c in plain:
            c.close()
        if not ok:
            raise RuntimeError("the Redis Cluster did not reach cluster_state:ok with its replicas in sync")

    def client(self) -> Any:
        return redis_client(self.url)

    def reset(self) -> None:
        """Empty again for the next test (a shared cluster: forming one takes ~2 s); nodes a test
        stopped or killed are started first."""
        if any(n.proc is None or n.proc.poll() is not None for n in self.nodes):
            self.kill()
            self.start()
        for n in self.nodes[:self.PRIMARIES]:
            with redis.Redis(port=n.port, socket_timeout=5) as c:
                c.flushall()

    def ledger_primary(self) -> RedisServer:
        """The primary the slots were first given to that holds the ``{ll}`` slot (all the state)."""
        slot = redis.cluster.key_slot(b"{ll}")
        return self.nodes[min(slot // (self.SLOTS // self.PRIMARIES), self.PRIMARIES - 1)]

    def replica_of_ledger(self) -> RedisServer:
        assert self.replicas, "started without replicas"
        return self.nodes[self.PRIMARIES]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def redis_client(url: str) -> Any:
    """A test's own client on ``url`` (``redis://…`` or ``redis+cluster://…``), replies decoded."""
    if url.startswith("redis+cluster://"):
        from redis.cluster import ClusterNode, RedisCluster
        nodes = [ClusterNode(h, int(p)) for h, p in (x.split(":") for x in url.split("//", 1)[1].split(","))]
        return RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=5)
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


#: ``LAYERLOCK_TEST_REDIS=cluster`` runs the API tests on a 3-primary Redis Cluster (``make
#: test-cluster``); unset, on one redis-server.
TEST_REDIS = os.environ.get("LAYERLOCK_TEST_REDIS", "single")


def make_redis(directory: Path) -> RedisServer | RedisClusterServer:
    """The Redis the API tests run on: one server, or a cluster under ``LAYERLOCK_TEST_REDIS=cluster``."""
    if TEST_REDIS == "cluster":
        return RedisClusterServer(directory)
    if TEST_REDIS != "single":
        raise RuntimeError(f"LAYERLOCK_TEST_REDIS must be 'single' or 'cluster', not {TEST_REDIS!r}")
    return RedisServer(directory)


class LicenseServer:
    """A real license server: ``layerlock init`` + gunicorn on a free loopback port.

    Attributes: ``url`` (``http://127.0.0.1:<port>``), ``port``, ``admin_key`` (the first admin
    API key printed by init), ``data_dir`` (``Path``; keys in ``data_dir/keys``), ``intake_pub``
    (b64url X25519 string to seal data keys to), ``redis_url``, ``log`` (path of the server's
    stderr log).  Methods: ``api(method, path, json=None, key=None) -> requests.Response``
    (``key`` defaults to the admin key; pass ``key=""`` for no Authorization header),
    ``stop()`` / ``start()`` (same port and data dir), ``redis()`` (a client on its Redis).
    Settings: ``min_lifetime`` is 2 s, so licenses may use ``token_ttl``/``offline_grace`` of a
    few seconds to test renewal and expiry; load shedding is off (``shed_queue_ms``; None: the
    server's default); other ``LAYERLOCK_*`` settings via ``env``.
    """

    def __init__(self, data_dir: Path, redis_url: str, *, workers: int = 2,
                 env: dict[str, str] | None = None, shed_queue_ms: int | None = 0) -> None:
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        # Shedding off by default: a test's burst (50 activations at once) on a loaded CI box may
        # wait over shed_queue_ms and be answered 503 overloaded; test_shedding.py sets its own,
        # benchmarks pass None (the server's default) or their own.
        shed = {} if shed_queue_ms is None else {"LAYERLOCK_SHED_QUEUE_MS": str(shed_queue_ms)}
        self.extra_env = {"LAYERLOCK_MIN_LIFETIME": "2", **shed, **(env or {})}
        self.log = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        out = subprocess.run([PYTHON, "-m", CLI, "init", "--data-dir", str(data_dir), "--json"],
                             env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
        doc = json.loads(out.stdout)
        self.admin_key: str = doc["admin_api_key"]
        self.intake_pub: str = doc["intake_pub"]

    def start(self, timeout: float = 30.0, ready: int = 200) -> None:
        """Start gunicorn; return once ``/readyz`` answers ``ready`` (503: started while Redis is down)."""
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
                if requests.get(self.url + "/readyz", timeout=2).status_code == ready:
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

    def replica(self, data_dir: Path) -> LicenseServer:
        """Another server on the same Redis with a copy of this one's key directory (a second
        host: no new ``init``, the same signing keys, KEK and intake key); not started."""
        shutil.copytree(self.data_dir, data_dir)
        second = copy.copy(self)
        second.data_dir = data_dir
        second.port = free_port()
        second.url = f"http://127.0.0.1:{second.port}"
        second.log = data_dir.parent / f"{data_dir.name}-server.log"
        second.proc = None
        return second

    def api(self, method: str, path: str, json: Any = None, key: str | None = None,
            **kwargs: Any) -> requests.Response:
        key = self.admin_key if key is None else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.request(method, self.url + path, json=json, headers=headers,
                                timeout=kwargs.pop("timeout", 10), **kwargs)

    def redis(self) -> Any:
        return redis_client(self.redis_url)


@contextmanager
def serving(redis_srv: RedisServer | RedisClusterServer, data_dir: Path, **kw: Any) -> Iterator[LicenseServer]:
    """Start ``redis_srv`` and a :class:`LicenseServer` on it; stop both afterwards (module fixtures)."""
    redis_srv.start()
    server = LicenseServer(data_dir, redis_srv.url, **kw)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        redis_srv.kill()


@pytest.fixture(scope="session")
def _shared_cluster(tmp_path_factory: pytest.TempPathFactory):
    """Under ``LAYERLOCK_TEST_REDIS=cluster``: one cluster for every test's ``redis_server``, emptied
    between tests (module-scoped servers start their own: :func:`make_redis`); else None."""
    if TEST_REDIS != "cluster":
        yield None
        return
    cluster = RedisClusterServer(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.kill()


@contextmanager
def own_stack(base: Path, env: dict[str, str] | None = None) -> Iterator[LicenseServer]:
    """A license server with settings of its own (``env``) on a Redis of its own, both stopped at
    the end: for a module's fixture whose background worker or limits must not touch other tests."""
    rs = make_redis(base / "redis")
    rs.start()
    ls = LicenseServer(base / "server", rs.url, env=env)
    try:
        ls.start()
        yield ls
    finally:
        ls.stop()
        rs.kill()


@pytest.fixture
def redis_server(tmp_path: Path, _shared_cluster: RedisClusterServer | None):
    """A real redis-server (see :class:`RedisServer`); under ``LAYERLOCK_TEST_REDIS=cluster`` the
    shared cluster, emptied."""
    if _shared_cluster is not None:
        _shared_cluster.reset()
        yield _shared_cluster
        return
    server = make_redis(tmp_path / "redis")
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
