"""A highly available deployment on loopback, from the shipped files, for the failover test and
``bench/failover.py``: one Redis primary and one replica (``deploy/redis.conf`` +
``deploy/redis-replica.conf``), three Sentinels (``deploy/sentinel.conf``, its tuned timeouts as
shipped), two license-server replicas (real gunicorn, ``LAYERLOCK_REDIS_WAIT_REPLICAS=1``) behind
the shipped nginx config, and :class:`Load`: sidecars (the verifier's own ``ServerClient``,
signed requests, real machine keys) and an ops client issuing, revoking and taking checkpoints,
recording every answer so that :func:`audit_after` can tell which acknowledged writes survived.

Only ports, directories and the primary's address are substituted in the shipped files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import redis
import redis.cluster
import requests
from ls_helpers import Machine, new_machine
from test_deploy import Front, nginx_in_front

from layerlock.license_server.checkpoints import ChainWalk, verify
from layerlock.license_server.embedded_redis import find_redis_server
from layerlock.license_server.store import licenses
from layerlock.license_server.store.audit import STREAM
from layerlock.shared.errors import ActivationDenied, LayerlockError, RetryLater, Unavailable
from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.wrap import seal_for_server
from layerlock.verifier.activation import ServerClient
from tests.conftest import REPO, LicenseServer, RedisClusterServer, RedisServer, free_port, wait_for

DEPLOY = REPO / "deploy"
SERVICE = "llmaster"
#: The hash slot of ``{ll}``: where a cluster keeps all of layerlock's state.
LEDGER_SLOT = redis.cluster.key_slot(b"{ll}")


def _substitute(text: str, replacements: dict[str, str], drop: tuple[str, ...] = ()) -> str:
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the shipped file: update tests/license_server/ha_topology.py"
        text = text.replace(old, new)
    return "\n".join(line for line in text.splitlines() if not line.startswith(drop)) + "\n"


class RedisNode:
    """One redis-server from deploy/redis-replica.conf (which includes deploy/redis.conf)."""

    def __init__(self, directory: Path, primary_port: int | None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.port = free_port()
        base = self.dir / "redis-layerlock.conf"
        base.write_text(_substitute((DEPLOY / "redis.conf").read_text(), {
            "dir /var/lib/redis-layerlock": f"dir {self.dir}", "port 6379": f"port {self.port}"}))
        self.conf = self.dir / "redis-replica.conf"  # Sentinel rewrites it (CONFIG REWRITE)
        self.conf.write_text(_substitute(
            (DEPLOY / "redis-replica.conf").read_text(),
            {"include /etc/redis/redis-layerlock.conf": f"include {base}", "port 6379": f"port {self.port}",
             "replicaof 10.0.0.11 6379": f"replicaof 127.0.0.1 {primary_port}"},
            drop=() if primary_port else ("replicaof ",)))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, replicaof: int | None = None) -> None:
        extra = ["--replicaof", "127.0.0.1", str(replicaof)] if replicaof else []
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen([find_redis_server() or "redis-server", str(self.conf), *extra],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        client = self.client(timeout=1)
        assert wait_for(lambda: self._pings(client), 20), (self.dir / "redis.log").read_text()[-2000:]

    def _pings(self, client: redis.Redis) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (self.dir / "redis.log").read_text()[-2000:]
        try:
            return bool(client.ping())
        except redis.exceptions.MasterDownError:  # up, a replica still syncing (replica-serve-stale-data no)
            return True
        except (redis.ConnectionError, redis.BusyLoadingError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 5) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=timeout, retry_on_error=[])

    def replica_online(self) -> bool:
        """A replica whose link to its primary is up and synced."""
        try:
            info = self.client(timeout=1).info("replication")
        except redis.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up" \
            and not info.get("master_sync_in_progress")


class SentinelNode:
    def __init__(self, directory: Path, primary_port: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(_substitute((DEPLOY / "sentinel.conf").read_text(), {
            "port 26379": f"port {self.port}", "dir /var/lib/redis-sentinel": f"dir {self.dir}",
            f"sentinel monitor {SERVICE} 10.0.0.11 6379 2": f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2"}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.dir / "sentinel.log", "ab") as log:
            self.proc = subprocess.Popen([find_redis_server() or "redis-server", str(self.conf), "--sentinel"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=1, retry_on_error=[])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class RedisGroup:
    """Primary + ``replicas`` replicas + three sentinels; ``nodes`` swap roles as Sentinel fails over."""

    def __init__(self, base: Path, replicas: int = 1) -> None:
        primary = RedisNode(base / "redis-a", None)
        self.nodes = [primary] + [RedisNode(base / f"redis-{chr(ord('b') + i)}", primary.port) for i in range(replicas)]
        self.sentinels = [SentinelNode(base / f"sentinel-{i}", primary.port) for i in range(3)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{SERVICE}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        assert wait_for(lambda: all(n.replica_online() for n in self.nodes[1:]), 30), "the replicas did not sync"
        for s in self.sentinels:
            s.start()
        assert wait_for(self.ready, 40), "the sentinels did not find each other and the replica"

    def ready(self) -> bool:
        """Every sentinel names a live primary, knows the other two and a synced replica."""
        try:
            for s in self.sentinels:
                c = s.client()
                master = c.sentinel_master(SERVICE)
                if not master["is_master"] or master["is_sdown"] or master["is_odown"] \
                        or len(c.sentinel_sentinels(SERVICE)) < 2:
                    return False
                replicas = c.sentinel_slaves(SERVICE)
                if not any(not r["is_sdown"] and r.get("master-link-status") == "ok" for r in replicas):
                    return False
        except redis.RedisError:
            return False
        return self.primary() is not None and any(n.replica_online() for n in self.nodes)

    def primary_port(self) -> int | None:
        """The primary the sentinels agree on (None while they disagree or are unreachable)."""
        ports = set()
        for s in self.sentinels:
            try:
                addr = s.client().sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                return None
            ports.add(int(addr[1]) if addr else None)
        return ports.pop() if len(ports) == 1 else None

    def primary(self) -> RedisNode | None:
        port = self.primary_port()
        return next((n for n in self.nodes if n.port == port and n.alive()), None)

    def rejoin(self, node: RedisNode) -> float:
        """Restart a killed node the way deploy/redis-replica.conf says: as a replica of the primary
        Sentinel names (once Sentinel has named another one), and wait until it is synced.
        Returns when (``time.monotonic()``) the sentinels were seen naming the new primary."""
        assert wait_for(lambda: self.primary_port() not in (None, node.port), 60), "no failover happened"
        promoted = time.monotonic()
        node.start(replicaof=self.primary_port())
        assert wait_for(node.replica_online, 30), (node.dir / "redis.log").read_text()[-2000:]
        assert wait_for(self.ready, 60), "the sentinels did not see the rejoined replica"
        return promoted

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for n in self.nodes:
            n.kill()

    def client(self) -> redis.Redis:
        node = self.primary()
        assert node is not None, "no primary"
        return node.client()


class ClusterGroup:
    """The same interface as :class:`RedisGroup` on a Redis Cluster (deploy/redis-cluster.conf):
    three primaries and ``replicas`` replicas of the one serving the ledger's slot ``{ll}``.  The
    cluster itself fails over (no Sentinel); a killed node restarted with its ``nodes.conf``
    rejoins as a replica of the node that replaced it."""

    def __init__(self, base: Path, replicas: int = 1) -> None:
        self.cluster = RedisClusterServer(base / "cluster", replicas=replicas)
        self.nodes = self.cluster.nodes

    @property
    def url(self) -> str:
        return self.cluster.url

    def start(self) -> None:
        self.cluster.start()

    def _role(self, node: RedisServer) -> dict[str, Any]:
        try:
            with redis.Redis(port=node.port, decode_responses=True, socket_timeout=1, retry_on_error=[]) as c:
                return dict(c.info("replication"))
        except redis.RedisError:
            return {}

    def primary_port(self) -> int | None:
        """The node that serves the ``{ll}`` slot as a primary, as the live nodes see it."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            try:
                with redis.Redis(port=node.port, decode_responses=True, socket_timeout=1, retry_on_error=[]) as c:
                    for lo, hi, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                        if int(lo) <= LEDGER_SLOT <= int(hi):
                            port = int(primary[1])
                            alive = next((n for n in self.nodes if n.port == port), None)
                            ok = alive is not None and alive.proc is not None and alive.proc.poll() is None
                            return port if ok and self._role(alive).get("role") == "master" else None
            except redis.RedisError:
                continue
        return None

    def primary(self) -> RedisServer | None:
        port = self.primary_port()
        return next((n for n in self.nodes if n.port == port), None)

    def rejoin(self, node: RedisServer) -> float:
        """Restart a killed node once the cluster promoted another, and wait until it is its synced replica."""
        assert wait_for(lambda: self.primary_port() not in (None, node.port), 60), "no failover happened"
        promoted = time.monotonic()
        node.start()
        assert wait_for(lambda: self._role(node).get("role") == "slave"
                        and self._role(node).get("master_link_status") == "up", 30), \
            (node.dir / "redis.log").read_text()[-2000:]
        return promoted

    def stop(self) -> None:
        self.cluster.kill()

    def client(self) -> redis.Redis:
        node = self.primary()
        assert node is not None, "no primary"
        return redis.Redis(port=node.port, decode_responses=True, socket_timeout=5)


@dataclass
class Stack:
    group: RedisGroup | ClusterGroup
    servers: list[LicenseServer]
    front: Front
    admin: dict[str, str]
    fleet: list[Machine] = field(default_factory=list)
    model: str = "fleet-model"
    ops_model: str = "ops-model"
    intake_pub: str = ""

    def api(self, method: str, path: str, body: Any = None, session: requests.Session | None = None,
            timeout: float = 10) -> requests.Response:
        return (session or requests).request(method, self.front.url + path, json=body, headers=self.admin,
                                             verify=str(self.front.cert), timeout=timeout)


@contextmanager
def ha_stack(base: Path, *, fleet: int = 12, workers: int = 2, replicas: int = 1,
             env: dict[str, str] | None = None, cluster: bool = False) -> Iterator[Stack]:
    """The whole topology, started, with a registered fleet, a model for it and a license each.
    ``cluster``: a Redis Cluster (:class:`ClusterGroup`) instead of Sentinel's group."""
    group: RedisGroup | ClusterGroup = ClusterGroup(base, replicas) if cluster else RedisGroup(base, replicas)
    servers: list[LicenseServer] = []
    try:
        group.start()
        settings = {"LAYERLOCK_REDIS_WAIT_REPLICAS": "1", "LAYERLOCK_TRUST_PROXY": "1",
                    "LAYERLOCK_RATE_MACHINE_PER_MIN": "100000", "LAYERLOCK_RATE_UNAUTH_PER_MIN": "100000",
                    "LAYERLOCK_LOG_LEVEL": "WARNING", **(env or {})}
        first = LicenseServer(base / "server-a", group.url, workers=workers, env=settings, shed_queue_ms=None)
        servers = [first, first.replica(base / "server-b")]
        for s in servers:
            s.start()
        (base / "nginx").mkdir()
        with nginx_in_front(base / "nginx", [s.port for s in servers]) as front:
            stack = Stack(group, servers, front, {"Authorization": f"Bearer {first.admin_key}"},
                          intake_pub=first.intake_pub)
            for model in (stack.model, stack.ops_model):
                sealed = seal_for_server(os.urandom(32), x25519_public(b64u_decode(first.intake_pub)), model)
                resp = stack.api("POST", "/v1/models", {"model_id": model, "name": model, "version": "1",
                                                        "sealed_key": sealed})
                assert resp.status_code == 201, resp.text
            for _ in range(fleet):
                m = new_machine()
                resp = stack.api("POST", "/v1/machines", {"enrollment": m.enrollment, "customer": "acme"})
                assert resp.status_code == 201, resp.text
                resp = stack.api("POST", "/v1/licenses", {"machine": m.code, "model": stack.model, "days": 30})
                assert resp.status_code == 201, resp.text
                stack.fleet.append(m)
            yield stack
    finally:
        for s in servers:
            s.stop()
        group.stop()


# --- the load and what it saw ------------------------------------------------------------------
@dataclass
class Answer:
    kind: str        # activate | issue | revoke | checkpoint
    started: float   # time.monotonic() when sent
    ended: float
    status: int      # HTTP status, 0 when no HTTP answer came back (timeout, connection)
    error: str = ""  # the error code of a non-2xx answer
    retry_after: str = ""
    subject: str = ""  # jti (activate), license id (issue, revoke)
    doc: Any = None    # the checkpoint document

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Load:
    """Steady writes through nginx from several threads until :meth:`stop`: ``sidecars`` threads
    activating the fleet's licenses (the verifier's ``ServerClient``), one ops thread issuing
    licenses for the ops model and another revoking those it saw issued, and a checkpoint every
    ``checkpoint_every`` seconds.  ``pause`` between requests keeps the 2-core host from saturating."""

    def __init__(self, stack: Stack, *, sidecars: int = 3, pause: float = 0.02, checkpoint_every: float = 1.0) -> None:
        self.stack, self.pause, self.checkpoint_every = stack, pause, checkpoint_every
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued: list[str] = []
        self._threads = [threading.Thread(target=self._sidecar, args=(i, sidecars), daemon=True)
                         for i in range(sidecars)]
        self._threads += [threading.Thread(target=t, daemon=True) for t in (self._issuer, self._revoker, self._auditor)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.answers

    def _record(self, a: Answer) -> None:
        with self._lock:
            self.answers.append(a)

    def _http(self, kind: str, session: requests.Session, method: str, path: str, body: Any = None) -> Answer:
        t0 = time.monotonic()
        try:
            resp = self.stack.api(method, path, body, session=session)
        except requests.RequestException:
            return Answer(kind, t0, time.monotonic(), 0, "no_answer")
        doc = resp.json() if resp.headers.get("Content-Type", "").startswith("application/json") else {}
        return Answer(kind, t0, time.monotonic(), resp.status_code, "" if resp.ok else str(doc.get("error", "")),
                      resp.headers.get("Retry-After", ""), doc=doc)

    def _sidecar(self, index: int, of: int) -> None:
        client = ServerClient(self.stack.front.url, ca_bundle=self.stack.front.cert)
        mine = self.stack.fleet[index::of]
        while not self._stop.is_set():
            for m in mine:
                t0 = time.monotonic()
                try:
                    token = client.activate(m.code, self.stack.model, SimpleNamespace(sign=m.sk))
                    jti = str(jwt.decode(token, options={"verify_signature": False})["jti"])
                    self._record(Answer("activate", t0, time.monotonic(), 200, subject=jti))
                except RetryLater as exc:  # a 503 with Retry-After; its code is the server's
                    self._record(Answer("activate", t0, time.monotonic(), 503, exc.code, str(exc.retry_after)))
                except ActivationDenied as exc:
                    self._record(Answer("activate", t0, time.monotonic(), 400, exc.code))
                except Unavailable as exc:  # no answer, or a 5xx without Retry-After
                    self._record(Answer("activate", t0, time.monotonic(), 0, exc.message[:80]))
                time.sleep(self.pause)

    def _issuer(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            m = random.choice(self.stack.fleet)
            a = self._http("issue", session, "POST", "/v1/licenses", {"machine": m.code, "model": self.stack.ops_model,
                                                                      "days": 1})
            if a.ok:
                a.subject = a.doc["license_id"]
                with self._lock:
                    self._issued.append(a.subject)
            self._record(a)
            time.sleep(self.pause)

    def _revoker(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            with self._lock:
                target = self._issued.pop(0) if len(self._issued) > 3 else None
            if target is None:
                time.sleep(self.pause)
                continue
            a = self._http("revoke", session, "POST", f"/v1/licenses/{target}/revoke", {"reason": "churn"})
            a.subject = target
            self._record(a)
            time.sleep(self.pause)

    def _auditor(self) -> None:
        session = requests.Session()
        while not self._stop.wait(self.checkpoint_every):
            self._record(self._http("checkpoint", session, "GET", "/v1/audit/checkpoint"))


@dataclass
class Verdict:
    lost: list[str]
    chain_ok: bool
    chain_reason: str
    records: int
    checkpoints: int


def audit_after(stack: Stack, answers: list[Answer]) -> Verdict:
    """Is every acknowledged write still there?  Reads the current primary's audit stream and
    license hashes directly, walks the chain from genesis against every checkpoint an auditor
    was handed (signature pinned to the server's checkpoint key), and asks the server's own
    ``/v1/audit/verify`` too."""
    r = stack.group.client()
    jtis: set[str] = set()
    records = r.xrange(STREAM)
    pinned = None
    docs = [a.doc for a in answers if a.kind == "checkpoint" and a.ok]
    if docs:
        from layerlock.license_server.checkpoints import parse_key

        pinned = parse_key((stack.servers[0].data_dir / "keys" / "checkpoint.pub").read_text())
    walk = ChainWalk(verify(d, pinned) for d in docs)
    reason = ""
    try:
        for ident, entry in records:
            walk.feed(ident, entry["rec"], entry["h"])
            rec = json.loads(entry["rec"])
            if rec.get("type") == "activation" and rec.get("outcome") == "granted":
                jtis.add(str(rec.get("jti")))
        walk.finish()
    except LayerlockError as exc:
        reason = exc.message
    lost = []
    for a in answers:
        if not a.ok:
            continue
        if a.kind == "activate" and a.subject not in jtis:
            lost.append(f"activation {a.subject}")
        elif a.kind == "issue" and not r.exists(licenses.key(a.subject)):
            lost.append(f"license {a.subject}")
        elif a.kind == "revoke" and r.hget(licenses.key(a.subject), "status") != "revoked":
            lost.append(f"revocation of {a.subject}")
    server_view = stack.api("GET", "/v1/audit/verify").json()
    ok = not reason and server_view.get("ok") is True
    return Verdict(lost, ok, reason or json.dumps(server_view)[:300], len(records), len(docs))


def failover_figures(answers: list[Answer], killed_at: float) -> dict[str, Any]:
    """What the clients saw around one kill: failed requests (by error code) from the kill until
    the first write acknowledged after it, and that delay ("serving again", seconds)."""
    writes_after = [a for a in answers if a.ok and a.kind in ("activate", "issue", "revoke") and a.started >= killed_at]
    back = min((a.ended for a in writes_after), default=float("nan"))
    failed: dict[str, int] = {}
    for a in answers:
        if not a.ok and a.ended >= killed_at and a.started <= back:
            failed[f"{a.status} {a.error}"] = failed.get(f"{a.status} {a.error}", 0) + 1
    return {"serving_again_s": back - killed_at, "failed": failed}
