"""Benchmark: activations/s and latency vs the trivial /v1/ping, on real gunicorn + real Redis.

Not a test: it prints figures.  Same gunicorn config (deploy/gunicorn.conf.py) for both
endpoints, in the same run, loopback only, a bounded number of requests from concurrent client
processes (threads inside each, keep-alive sessions).  Then 100,000 machines and licenses are
bulk-loaded with a Redis pipeline (using the store modules' key layout) and the activation run
is compared, to show throughput does not depend on fleet size.  The empty and the loaded case
run as two identical stacks (own Redis, own gunicorn) measured in alternating rounds, so drift
in the host's load (a shared box) hits both alike; the best of the rounds is reported.

    python bench/activate.py [--requests 2000] [--clients 2] [--threads 8] [--workers N]

Last line: ``figures: name=value …`` (rates in 1/s, latencies in ms, memory in MB, ratios unitless).
Redis runs with ``appendfsync everysec`` here (the default); ``always`` adds an fsync per write.
The client processes run on the same CPUs as the server, so absolute figures are a floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import requests  # noqa: E402

from license_server.store import licenses, machines  # noqa: E402
from shared.activation import make_request  # noqa: E402
from shared.keys import b64u_decode, x25519_public  # noqa: E402
from shared.machine import MachineSources, derive_code  # noqa: E402
from shared.wrap import seal_for_server  # noqa: E402
from tests.license_server.ls_helpers import new_machine  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(args: tuple[str, str, list[dict | None], int]) -> list[float]:
    url, method, bodies, threads = args
    lat: list[float] = []
    lock = threading.Lock()
    chunks = [bodies[i::threads] for i in range(threads)]

    def run(chunk: list[dict | None]) -> None:
        session = requests.Session()
        mine = []
        for body in chunk:
            t0 = time.perf_counter()
            resp = session.request(method, url, json=body, timeout=30)
            mine.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise SystemExit(f"{url}: HTTP {resp.status_code} {resp.text[:200]}")
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat


def load(url: str, method: str, bodies: list[dict | None], clients: int, threads: int) -> dict[str, float]:
    parts = [bodies[i::clients] for i in range(clients)]
    with mp.get_context("fork").Pool(clients) as pool:
        t0 = time.perf_counter()
        results = pool.map(_client, [(url, method, p, threads) for p in parts])
        wall = time.perf_counter() - t0
    lat = sorted(x for r in results for x in r)
    return {"rps": len(lat) / wall, "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000}


def bulk_load(r: redis.Redis, n: int, model_id: str, enrolled: dict[str, str]) -> float:
    """n machines + n licenses through a pipeline, with the same hashes/indexes the API writes."""
    t0 = time.perf_counter()
    now = int(time.time())
    batch = 2000
    for start in range(0, n, batch):
        with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + batch)):
                code = derive_code(MachineSources(machine_id=f"bench-{i}"))
                rec = {**machines.record(code, f"cust{i % 500}", {"bench": "1"}, None), **enrolled, "code": code}
                pipe.hset(machines.key(code), mapping=rec)
                pipe.zadd(machines.ALL, {code: int(rec["created_at"])})
                lic = licenses.record(code, model_id, rec["customer"], now, now + 365 * 86400, 86400, 3 * 86400)
                pipe.hset(licenses.key(lic["license_id"]), mapping=lic)
                pipe.zadd(licenses.ALL, {lic["license_id"]: int(lic["issued_at"])})
                pipe.sadd(licenses.pair_key(code, model_id), lic["license_id"])
            pipe.execute()
    return time.perf_counter() - t0



@dataclass
class Stack:
    """One Redis + one gunicorn (deploy/gunicorn.conf.py) + one enrolled fleet of 32 machines."""

    base: str
    redis: redis.Redis
    procs: list[subprocess.Popen]
    fleet: list[Any]
    model_id: str = "bench-model"

    def bodies(self, n: int) -> list[dict | None]:
        return [make_request(self.fleet[i % len(self.fleet)].code, self.model_id,
                             self.fleet[i % len(self.fleet)].sk).to_dict() for i in range(n)]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                proc.kill()


def start_stack(tmp: Path, workers: int, server_threads: int | None = None) -> Stack:
    tmp.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERLOCK_")}
    env["PYTHONPATH"] = str(REPO)
    rport, port = free_port(), free_port()
    procs = [subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--dir", str(tmp),
                               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                               "--logfile", str(tmp / "redis.log")], start_new_session=True)]
    stack = Stack(base=f"http://127.0.0.1:{port}", redis=redis.Redis(port=rport, decode_responses=True),
                  procs=procs, fleet=[])
    try:
        for _ in range(100):
            try:
                stack.redis.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        init = subprocess.run([sys.executable, "-m", "license_server.cli", "init", "--data-dir", str(tmp / "srv"),
                               "--json"], env=env, cwd=REPO, capture_output=True, text=True, check=True)
        admin = json.loads(init.stdout)
        genv = dict(env, LAYERLOCK_DATA_DIR=str(tmp / "srv"), LAYERLOCK_REDIS_URL=f"redis://127.0.0.1:{rport}/0",
                    LAYERLOCK_BIND=f"127.0.0.1:{port}", LAYERLOCK_WORKERS=str(workers),
                    LAYERLOCK_RATE_MACHINE_PER_MIN="100000000", LAYERLOCK_RATE_IP_PER_MIN="100000000",
                    LAYERLOCK_LOG_LEVEL="WARNING")
        if server_threads:
            genv["LAYERLOCK_THREADS"] = str(server_threads)
        with open(tmp / "gunicorn.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                                           str(REPO / "deploy" / "gunicorn.conf.py"), "license_server.wsgi:app"],
                                          env=genv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=log))
        for _ in range(300):
            try:
                if requests.get(stack.base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        hdr = {"Authorization": f"Bearer {admin['admin_api_key']}"}
        sealed = seal_for_server(os.urandom(32), x25519_public(b64u_decode(admin["intake_pub"])), stack.model_id)
        requests.post(stack.base + "/v1/models", json={"model_id": stack.model_id, "sealed_key": sealed},
                      headers=hdr, timeout=10).raise_for_status()
        stack.fleet = [new_machine() for _ in range(32)]
        for m in stack.fleet:
            requests.post(stack.base + "/v1/machines", json={"enrollment": m.enrollment}, headers=hdr,
                          timeout=10).raise_for_status()
            requests.post(stack.base + "/v1/licenses", json={"machine": m.code, "model": stack.model_id,
                                                             "days": 30}, headers=hdr, timeout=10).raise_for_status()
    except BaseException:
        stack.stop()
        raise
    return stack


def wait_for_aof_rewrite(r: redis.Redis) -> None:
    """A bulk load grows the AOF past auto-aof-rewrite-percentage; let that forked rewrite finish."""
    time.sleep(1.0)
    for _ in range(600):
        info = r.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        time.sleep(0.1)


def show(phase: str, name: str, res: dict[str, float]) -> None:
    print(f"{phase:<12} {name:<9} {res['rps']:8.0f}/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--threads", type=int, default=8, help="threads per client process")
    ap.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 1))
    ap.add_argument("--server-threads", type=int, default=None,
                    help="gunicorn threads per worker (default: deploy/gunicorn.conf.py's)")
    ap.add_argument("--fleet", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best run of each is reported")
    args = ap.parse_args()
    n, c, t = args.requests, args.clients, args.threads

    tmp = Path(tempfile.mkdtemp(prefix="llbench-"))
    stacks: list[Stack] = []
    try:
        empty = start_stack(tmp / "empty", args.workers, args.server_threads)
        stacks.append(empty)
        loaded = start_stack(tmp / "loaded", args.workers, args.server_threads)
        stacks.append(loaded)
        mem0 = loaded.redis.info("memory")["used_memory"]
        enrolled = {k: v for k, v in loaded.redis.hgetall(machines.key(loaded.fleet[0].code)).items()
                    if k in ("sig_pub", "kex_pub", "device")}
        load_s = bulk_load(loaded.redis, args.fleet, loaded.model_id, enrolled)
        mem1 = loaded.redis.info("memory")["used_memory"]
        wait_for_aof_rewrite(loaded.redis)
        print(f"bulk-loaded {args.fleet} machines + licenses in {load_s:.1f} s; "
              f"Redis memory +{(mem1 - mem0) / 2**20:.0f} MB")
        series = {"ping": (empty, "GET", "/v1/ping"), "activate": (empty, "POST", "/v1/activate"),
                  "ping_100k": (loaded, "GET", "/v1/ping"), "activate_100k": (loaded, "POST", "/v1/activate")}
        for stack in (empty, loaded):  # warm-up: connections, imports, caches
            load(stack.base + "/v1/ping", "GET", [None] * 200, c, t)
            load(stack.base + "/v1/activate", "POST", stack.bodies(200), c, t)
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for name, (stack, method, path) in series.items():
                bodies = stack.bodies(n) if method == "POST" else [None] * n
                res = load(stack.base + path, method, bodies, c, t)
                if name not in best or res["rps"] > best[name]["rps"]:
                    best[name] = res
        for name in series:
            show("100k fleet" if name.endswith("100k") else "empty fleet", name.split("_")[0], best[name])
        print(f"(workers={args.workers} gthread, clients={c}x{t} threads, {n} requests per run, "
              f"best of {args.rounds} alternating rounds, cpus={os.cpu_count()})")
        figures: dict[str, float] = {}
        for name, res in best.items():
            figures[f"{name}_rps"] = round(res["rps"])
            figures[f"{name}_p50_ms"] = round(res["p50_ms"], 2)
            figures[f"{name}_p99_ms"] = round(res["p99_ms"], 2)
        figures["activate_over_ping"] = round(best["activate"]["rps"] / best["ping"]["rps"], 3)
        figures["activate_100k_over_empty"] = round(best["activate_100k"]["rps"] / best["activate"]["rps"], 3)
        figures["bulk_load_s"] = round(load_s, 1)
        figures["redis_100k_MB"] = round((mem1 - mem0) / 2**20, 1)
        print("figures: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        for stack in stacks:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
