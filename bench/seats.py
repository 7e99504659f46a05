"""Benchmark: 1,000 machines renewing against 100 floating seats, vs plain node-locked activation.

Not a test: it prints figures.  One stack as in ``bench/activate.py`` (its own Redis, gunicorn
with ``deploy/gunicorn.conf.py``, rate limits lifted), plus 1,000 enrolled machines of one
customer and one floating license with 100 seats (both bulk-loaded with the store's key layout).
Three series, measured in alternating rounds (best of ``--rounds``), each a fixed-duration
``wrk`` run through ``bench/wrk_activate.lua`` with single-use signed requests:

* ``node``: the 32 machines with their own (node) licenses — today's activation, the baseline;
* ``holders``: the 100 machines holding a seat renewing (every one a 200: the seat path, with
  its guard and seat write in the same one read + one commit);
* ``fleet``: all 1,000 machines renewing round-robin — 100 keep their seats, 900 are refused
  ``seats_exhausted`` (409, each audited, so a refusal costs a commit too).

After the runs it checks that no more than 100 seats were ever live.  ``wrk`` required
(Debian package ``wrk``).  Last line: ``figures: name=value …``.

    python bench/seats.py [--duration 5] [--rounds 3] [--connections 16] [--machines 1000] [--seats 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from bench.activate import WRK_LUA, Stack, group_cpu_s, start_stack  # noqa: E402
from layerlock.license_server.store import licenses, machines, seats  # noqa: E402
from layerlock.shared.activation import make_request  # noqa: E402
from layerlock.shared.enrollment import parse_code  # noqa: E402
from tests.license_server.ls_helpers import new_machine  # noqa: E402

CUSTOMER = "bench-fleet"


def wrk(url: str, bodies: list[dict[str, Any]], connections: int, duration: int, tmp: Path) -> dict[str, float]:
    """One fixed-duration run; unlike bench/activate.py, non-200 answers are expected here (409s)."""
    path = tmp / "bodies.jsonl"
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--timeout", "10s", "-s",
                          str(WRK_LUA), url, "--", "POST", str(path), "1"], capture_output=True, text=True,
                         timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line[len("WRKJSON "):])
    if r["exhausted_threads"]:
        raise SystemExit(f"used up all {len(bodies)} bodies within {duration} s; raise --max-rate")
    errors = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"]
    if errors or r["requests"] == 0:
        raise SystemExit(f"{url}: socket errors {errors}, requests {r['requests']}")
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "requests": r["requests"], "ok": r["ok"], "non200": r["non200"],
            "first_bad": r["first_bad"]}


def load_fleet(stack: Stack, n: int) -> list[Any]:
    """n enrolled machines of one customer, written with the store's own record layout."""
    fleet = [new_machine() for _ in range(n)]
    with stack.redis.pipeline(transaction=False) as pipe:
        for m in fleet:
            rec = machines.record(m.code, CUSTOMER, {"bench": "seats"}, parse_code(m.enrollment))
            pipe.hset(machines.key(m.code), mapping=rec)
            pipe.zadd(machines.ALL, {m.code: int(rec["created_at"])})
        pipe.execute()
    return fleet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--seats", type=int, default=100)
    ap.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 1))
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--max-rate", type=int, default=3000, help="bodies per run = max-rate * duration")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found (apt-get install wrk)")
    print("load at start: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    tmp = Path(tempfile.mkdtemp(prefix="llseats-"))
    stack = start_stack(tmp / "stack", args.workers)
    try:
        t0 = time.perf_counter()
        fleet = load_fleet(stack, args.machines)
        load_s = time.perf_counter() - t0
        now = int(time.time())
        lic = licenses.record("", stack.model_id, CUSTOMER, now, now + 30 * 86_400, 3600, 3 * 86_400, terms={
            "kind": "floating", "seats": str(args.seats), "lease_ttl": "3600", "revive_ttl": "3600"})
        stack.redis.hset(licenses.key(lic["license_id"]), mapping=lic)
        stack.redis.zadd(licenses.ALL, {lic["license_id"]: int(lic["issued_at"])})
        stack.redis.sadd(licenses.index_key(lic), lic["license_id"])
        license_id = lic["license_id"]
        url = stack.base + "/v1/activate"
        holders = []
        for m in fleet:  # take the seats: the first `seats` machines to ask get them
            ok = requests.post(url, json=make_request(m.code, stack.model_id, m.sk).to_dict(), timeout=10)
            if ok.status_code == 200:
                holders.append(m)
        assert len(holders) == args.seats, len(holders)
        print(f"bulk-loaded {args.machines} machines in {load_s:.1f} s; {len(holders)} hold the {args.seats} seats")
        n = args.max_rate * args.duration

        def bodies(group: list[Any]) -> list[dict[str, Any]]:
            return [make_request(group[i % len(group)].code, stack.model_id, group[i % len(group)].sk).to_dict()
                    for i in range(n)]

        series = {"node": stack.fleet, "holders": holders, "fleet": fleet}
        for group in series.values():  # warm-up
            wrk(url, bodies(group)[:2000], args.connections, 1, tmp)
        best: dict[str, dict[str, float]] = {}
        seen: dict[str, list[float]] = {}
        pgids = {p.pid for p in stack.procs}
        for _ in range(args.rounds):
            for name, group in series.items():
                cpu0 = group_cpu_s(pgids)
                res = wrk(url, bodies(group), args.connections, args.duration, tmp)
                res["server_cpu_ms_per_req"] = (group_cpu_s(pgids) - cpu0) * 1000 / res["requests"]
                seen.setdefault(name, []).append(res["rps"])
                if name not in best or res["rps"] > best[name]["rps"]:
                    best[name] = res
        live = stack.redis.zcount(seats.key(license_id), time.time(), "+inf")
        assert live == args.seats, live
        audit = stack.redis.xlen("{ll}:audit")
        print("rates per round: " + "  ".join(f"{k}=" + "/".join(f"{x:.0f}" for x in v) for k, v in seen.items()))
        for name, res in best.items():
            print(f"{name:<8} {res['rps']:7.0f}/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms  "
                  f"200s {res['ok']}/{res['requests']}  server+redis CPU {res['server_cpu_ms_per_req']:.2f} ms/req"
                  + (f"  (other answers: {res['first_bad'][:60]!r})" if res["non200"] else ""))
        figures = {f"{k}_{m}": round(v[m], 2) for k, v in best.items() for m in ("rps", "p50_ms", "p99_ms")}
        figures["holders_over_node"] = round(best["holders"]["rps"] / best["node"]["rps"], 3)
        figures["fleet_over_node"] = round(best["fleet"]["rps"] / best["node"]["rps"], 3)
        figures["fleet_granted_fraction"] = round(best["fleet"]["ok"] / best["fleet"]["requests"], 3)
        figures["seats_live_after"] = live
        figures["audit_records"] = audit
        print(f"(workers={args.workers} gthread, wrk -t1 -c{args.connections} -d{args.duration}s, best of "
              f"{args.rounds} alternating rounds, cpus={os.cpu_count()})")
        print("load at end: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        print("figures: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
