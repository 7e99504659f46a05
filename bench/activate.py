"""Benchmark: activations/s and latency vs the trivial /v1/ping, on real gunicorn + real Redis.

Not a test: it prints figures.  Same gunicorn config (deploy/gunicorn.conf.py) for both
endpoints, in the same run, loopback only, bounded runs (fixed duration with wrk, a fixed number
of requests with the Python client), keep-alive connections.  Then 100,000 machines and licenses are
bulk-loaded with a Redis pipeline (using the store modules' key layout) and the activation run
is compared, to show throughput does not depend on fleet size.  The empty and the loaded case
run as two identical stacks (own Redis, own gunicorn) measured in alternating rounds, so drift
in the host's load (a shared box) hits both alike; the best of the rounds is reported.

The empty stack also serves ``POST /bench/floor`` (``bench/floor_wsgi.py``, unless ``--no-floor``):
the least any activation with the same guarantees must do (parse, one Redis read, the Ed25519
check of the request, a signed JWT, one atomic nonce + counter + audit write).  ``floor ÷ ping``
says how far this host and stack let *any* activation go; ``activate ÷ floor`` what the
decision's rules, guards and full audit record cost on top.  Every ratio is printed twice: from
the rates, and from the server + Redis CPU per request (``*_cpu``), which is steadier when other
jobs share the cores.

    python bench/activate.py [--client wrk|python] [--duration 5] [--connections 16]
                             [--requests 2000] [--clients 2] [--threads 8] [--workers N]

Load generator: ``wrk`` (C; Debian package ``wrk``) when installed, else ``--client python``
(``requests`` threads in forked processes).  The Python client spends ~1 ms of CPU per request on
the same cores as the server, which drags both endpoints and squeezes the cheap one's rate the
most; wrk's is ~0.05-0.1 ms (printed per series as "client CPU"), through the same Lua
request()/response() path for both endpoints.  With wrk each run is fixed-duration; every
activation body is distinct and used at most once (nonces are single-use), responses other than
200 are counted and a run with < 99 % 200s aborts.  p50/p99 are wrk's latency histogram
(``bench/wrk_activate.lua``'s done()).

Last line: ``figures: name=value …`` (rates in 1/s, latencies in ms, memory in MB, ratios unitless).
Redis runs with ``appendfsync everysec`` here (the default); ``always`` adds an fsync per write.
The client processes run on the same CPUs as the server, so absolute figures are a floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
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
CLI = "layerlock.license_server.cli"
WSGI_APP = "layerlock.license_server.wsgi:app"
#: The same app plus ``POST /bench/floor`` (bench/floor_wsgi.py): the least an activation must do.
FLOOR_APP = "bench.floor_wsgi:app"
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import requests  # noqa: E402

from layerlock.license_server.store import licenses, machines  # noqa: E402
from layerlock.shared.activation import make_request  # noqa: E402
from layerlock.shared.keys import b64u_decode, x25519_public  # noqa: E402
from layerlock.shared.machine import MachineSources, derive_code  # noqa: E402
from layerlock.shared.wrap import seal_for_server  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.license_server.ls_helpers import new_machine  # noqa: E402


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


def group_cpu_s(pgids: set[int]) -> float:
    """utime+stime (s) of the live processes in these process groups (gunicorn master + workers, redis)."""
    total = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) in pgids:  # after "comm)": state, ppid, pgrp, ...; utime, stime
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


WRK_LUA = Path(__file__).resolve().with_name("wrk_activate.lua")


def load_wrk(url: str, method: str, bodies: list[dict | None], connections: int, wrk_threads: int,
             duration: int, tmp: Path, strict: bool = True) -> dict[str, float]:
    """One fixed-duration wrk run; each POST body is sent at most once (the Lua script stops a
    thread that runs out rather than replaying a nonce, and a measured run that ran out aborts).
    Latencies are wrk's own histogram (all responses; < 99 % HTTP 200 aborts)."""
    bodies_file = tmp / "bodies.jsonl"
    with open(bodies_file, "w") as f:
        for body in bodies:
            f.write(json.dumps(body) + "\n")
    cmd = ["wrk", "-t", str(wrk_threads), "-c", str(connections), "-d", f"{max(1, duration)}s", "--timeout", "10s",
           "-s", str(WRK_LUA), url, "--", method, str(bodies_file), str(wrk_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line[len("WRKJSON "):])
    errors = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"]
    if r["requests"] == 0 or r["ok"] < 0.99 * r["requests"]:
        raise SystemExit(f"{url}: only {r['ok']}/{r['requests']} HTTP 200 (first other: {r['first_bad']!r}, "
                         f"socket errors {errors})")
    if r["exhausted_threads"] and strict:  # wrk still divides by the full -d: the rate would be wrong
        raise SystemExit(f"{url}: used up all {len(bodies)} distinct bodies within {duration} s; "
                         "raise --max-rate (bodies per run = max-rate * duration)")
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "requests": r["requests"], "non200": r["non200"], "errors": errors}


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


def start_stack(tmp: Path, workers: int, server_threads: int | None = None, wsgi_app: str = WSGI_APP) -> Stack:
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
        init = subprocess.run([sys.executable, "-m", CLI, "init", "--data-dir", str(tmp / "srv"),
                               "--json"], env=env, cwd=REPO, capture_output=True, text=True, check=True)
        admin = json.loads(init.stdout)
        genv = dict(env, LAYERLOCK_DATA_DIR=str(tmp / "srv"), LAYERLOCK_REDIS_URL=f"redis://127.0.0.1:{rport}/0",
                    LAYERLOCK_BIND=f"127.0.0.1:{port}", LAYERLOCK_WORKERS=str(workers),
                    LAYERLOCK_RATE_MACHINE_PER_MIN="100000000", LAYERLOCK_RATE_UNAUTH_PER_MIN="100000000",
                    LAYERLOCK_LOG_LEVEL="WARNING")
        if server_threads:
            genv["LAYERLOCK_THREADS"] = str(server_threads)
        with open(tmp / "gunicorn.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                                           str(REPO / "deploy" / "gunicorn.conf.py"), wsgi_app],
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


def head_races(stack: Stack) -> float:
    """The server's count of audit commits re-hashed because another moved the chain head first."""
    text = requests.get(stack.base + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("layerlock_audit_head_races_total"))


def wait_for_aof_rewrite(r: redis.Redis) -> None:
    """A bulk load grows the AOF past auto-aof-rewrite-percentage; let that forked rewrite finish."""
    time.sleep(1.0)
    for _ in range(600):
        info = r.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        time.sleep(0.1)


def show(phase: str, name: str, res: dict[str, float]) -> None:
    print(f"{phase:<12} {name:<9} {res['rps']:8.0f}/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms  "
          f"(CPU per request: client {res['client_cpu_ms_per_req']:.3f} ms, "
          f"server+redis {res['server_cpu_ms_per_req']:.3f} ms)")


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
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                    help="load generator: wrk (C, default when installed) or python (requests threads)")
    ap.add_argument("--duration", type=int, default=5, help="wrk: whole seconds per run")
    ap.add_argument("--connections", type=int, default=None, help="wrk: connections (default clients*threads)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk: threads (one keeps the client's CPU small)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the floor series (bench/floor_wsgi.py: what any activation must cost)")
    ap.add_argument("--max-rate", type=int, default=5000,
                    help="wrk: activation bodies generated per run = max-rate * duration (nonces are single-use)")
    args = ap.parse_args()
    n, c, t = args.requests, args.clients, args.threads
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--client wrk: wrk not found (apt-get install wrk)")
    conns = args.connections or c * t
    n_wrk = max(1000, int(args.max_rate * args.duration))
    print("load at start: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    tmp = Path(tempfile.mkdtemp(prefix="llbench-"))
    stacks: list[Stack] = []
    try:
        empty = start_stack(tmp / "empty", args.workers, args.server_threads,
                            WSGI_APP if args.no_floor else FLOOR_APP)
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
        if not args.no_floor:
            series["floor"] = (empty, "POST", "/bench/floor")

        def measure(stack: Stack, method: str, path: str, count: int, seconds: int,
                    strict: bool = True) -> dict[str, float]:
            bodies = stack.bodies(count) if method == "POST" else ([] if client == "wrk" else [None] * count)
            pgids = {p.pid for p in stack.procs}
            races0 = head_races(stack)
            srv0 = group_cpu_s(pgids)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children only: wrk / the client pool
            if client == "wrk":
                res = load_wrk(stack.base + path, method, bodies, conns, args.wrk_threads, seconds, tmp, strict)
            else:
                res = load(stack.base + path, method, bodies, c, t)
                res["requests"] = len(bodies)
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            res["client_cpu_ms_per_req"] = cpu * 1000 / max(1, res["requests"])
            res["server_cpu_ms_per_req"] = (group_cpu_s(pgids) - srv0) * 1000 / max(1, res["requests"])
            res["head_races_per_req"] = (head_races(stack) - races0) / max(1, res["requests"])
            return res

        for stack in (empty, loaded):  # warm-up: connections, imports, caches
            measure(stack, "GET", "/v1/ping", 200, 1, strict=False)
            measure(stack, "POST", "/v1/activate", 200 if client == "python" else 2000, 1, strict=False)
        if not args.no_floor:
            measure(empty, "POST", "/bench/floor", 200 if client == "python" else 2000, 1, strict=False)
        best: dict[str, dict[str, float]] = {}
        non200: dict[str, int] = {}
        rounds_seen: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, (stack, method, path) in series.items():
                res = measure(stack, method, path, n if client == "python" else n_wrk, args.duration)
                non200[name] = non200.get(name, 0) + int(res.get("non200", 0))
                rounds_seen.setdefault(name, []).append(res["rps"])
                if name not in best or res["rps"] > best[name]["rps"]:
                    best[name] = res
        print("rates per round: " + "  ".join(f"{k}=" + "/".join(f"{x:.0f}" for x in v)
                                              for k, v in rounds_seen.items()))
        for name in series:
            show("100k fleet" if name.endswith("100k") else "empty fleet", name.split("_")[0], best[name])
        print(f"audit head races per activation (a re-hash and one more round trip each): "
              f"{best['activate']['head_races_per_req']:.2f} empty, {best['activate_100k']['head_races_per_req']:.2f} "
              "with the fleet")
        if "floor" in best:
            print("floor: parse + one read + Ed25519 verify + signed JWT + one atomic nonce/count/audit write "
                  "(bench/floor_wsgi.py) -- what any activation with these guarantees costs here")
        if client == "wrk":
            print(f"(workers={args.workers} gthread, client=wrk -t{args.wrk_threads} -c{conns} -d{args.duration}s, "
                  f"requests per run: " + ", ".join(f"{k}={int(v['requests'])}" for k, v in best.items()) +
                  f"; best (by rate) of {args.rounds} alternating rounds, cpus={os.cpu_count()})")
            print("non-200 responses over all rounds: " + " ".join(f"{k}={v}" for k, v in non200.items()))
        else:
            print(f"(workers={args.workers} gthread, client=python {c}x{t} threads, {n} requests per run, "
                  f"best (by rate) of {args.rounds} alternating rounds, cpus={os.cpu_count()})")
        figures: dict[str, float | str] = {}
        for name, res in best.items():
            figures[f"{name}_rps"] = round(res["rps"])
            figures[f"{name}_p50_ms"] = round(res["p50_ms"], 2)
            figures[f"{name}_p99_ms"] = round(res["p99_ms"], 2)
        figures["activate_over_ping"] = round(best["activate"]["rps"] / best["ping"]["rps"], 3)
        # the same ratios from server + Redis CPU per request: steadier than rates on a shared box
        cpu = {k: v["server_cpu_ms_per_req"] for k, v in best.items()}
        figures["activate_over_ping_cpu"] = round(cpu["ping"] / cpu["activate"], 3)
        if "floor" in best:
            figures["floor_over_ping"] = round(best["floor"]["rps"] / best["ping"]["rps"], 3)
            figures["floor_over_ping_cpu"] = round(cpu["ping"] / cpu["floor"], 3)
            figures["activate_over_floor"] = round(best["activate"]["rps"] / best["floor"]["rps"], 3)
            figures["activate_over_floor_cpu"] = round(cpu["floor"] / cpu["activate"], 3)
        figures["activate_head_races_per_req"] = round(best["activate"]["head_races_per_req"], 3)
        figures["activate_100k_over_empty"] = round(best["activate_100k"]["rps"] / best["activate"]["rps"], 3)
        figures["bulk_load_s"] = round(load_s, 1)
        figures["redis_100k_MB"] = round((mem1 - mem0) / 2**20, 1)
        figures["client"] = client
        print("load at end: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        print("figures: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        for stack in stacks:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
