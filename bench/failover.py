"""Benchmark: SIGKILL the Redis primary N times under load; what do clients see, what is lost?

Not a test: it prints figures.  The topology of README "Scaling out", all real processes on
loopback (tests/license_server/ha_topology.py): Redis primary + replica (deploy/redis.conf,
deploy/redis-replica.conf), three Sentinels (deploy/sentinel.conf as shipped: down after 3 s,
failover timeout 10 s), two gunicorn server replicas (``LAYERLOCK_REDIS_WAIT_REPLICAS=1`` unless
``--wait-replicas``) behind deploy/nginx-tls.conf, sidecar threads activating (the verifier's
``ServerClient``) and an ops client issuing, revoking and taking a checkpoint a second.

Each cycle: steady load for ``--steady`` seconds, SIGKILL the primary, Sentinel promotes the
replica, the killed node is restarted as a replica of the new primary once Sentinel names it (as a
supervisor running deploy/redis-replica.conf's start line would), and synced.  Per cycle:

* promoted: kill → the sentinels name the new primary;
* serving again: kill → the first write (activation, issuance or revocation) acknowledged among
  those sent after the kill.  With one replica and ``WAIT 1``, writes are confirmed again only
  once the killed node is back as a replica: that restart is inside this figure.  With
  ``--replicas 2`` the killed node stays down until writes are acknowledged again;
* failed: requests answered non-2xx from the kill until then, by status and error code.

After the last cycle every acknowledged write is looked up on the final primary (each
activation's record by its token's jti, each issued license, each revocation), the chain is
walked from genesis against every checkpoint the auditor thread was handed, and the server's
``/v1/audit/verify`` is asked: "acknowledged but lost" must be 0.

``--cluster``: the same on a Redis Cluster (deploy/redis-cluster.conf, cluster-node-timeout as
shipped): three primaries and a replica of the one that serves the ledger's slot ``{ll}``; the
cluster promotes the replica itself and the killed node, restarted, rejoins as its replica.

    python bench/failover.py [--cycles 20] [--steady 4] [--fleet 12] [--sidecars 3] [--wait-replicas 1] [--cluster]

Last line: ``figures: name=value …`` (seconds; counts).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "license_server")]

from ha_topology import Load, audit_after, failover_figures, ha_stack  # noqa: E402

from tests.conftest import wait_for  # noqa: E402

WRITES = ("activate", "issue", "revoke")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--steady", type=float, default=4.0, help="seconds of steady load before each kill")
    ap.add_argument("--fleet", type=int, default=12, help="machines activating (one license each)")
    ap.add_argument("--sidecars", type=int, default=3, help="activating threads")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers per server replica")
    ap.add_argument("--wait-replicas", type=int, default=1, help="LAYERLOCK_REDIS_WAIT_REPLICAS (0: asynchronous)")
    ap.add_argument("--replicas", type=int, default=1,
                    help="Redis replicas; with 2 or more the killed node is restarted only once writes are "
                         "acknowledged again (the remaining replica confirms them), not before")
    ap.add_argument("--cluster", action="store_true", help="a Redis Cluster instead of Sentinel's group")
    args = ap.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
          f"load {uptime.split('load average:')[-1].strip()}")
    base = Path(tempfile.mkdtemp(prefix="llfailover-"))
    env = {"LAYERLOCK_REDIS_WAIT_REPLICAS": str(args.wait_replicas)}
    rows = []
    print(f"topology: {'Redis Cluster, 3 primaries' if args.cluster else 'Sentinel'}, {args.replicas} replica(s) "
          f"of the ledger's primary, WAIT {args.wait_replicas}")
    with ha_stack(base, fleet=args.fleet, workers=args.workers, replicas=args.replicas, env=env,
                  cluster=args.cluster) as stack:
        load = Load(stack, sidecars=args.sidecars).start()
        try:
            for cycle in range(1, args.cycles + 1):
                since = time.monotonic()
                time.sleep(args.steady)
                if not wait_for(lambda since=since: all(
                        any(a.kind == k and a.ok and a.started >= since for a in list(load.answers)) for k in WRITES),
                        60):
                    raise SystemExit(f"cycle {cycle}: no steady load before the kill")
                old = stack.group.primary()
                assert old is not None, "no primary"
                killed = time.monotonic()
                old.kill()
                if not wait_for(lambda old=old: stack.group.primary_port() not in (None, old.port), 60):
                    raise SystemExit(f"cycle {cycle}: no replica was promoted")
                promoted = time.monotonic()
                if args.replicas >= 2 and not wait_for(lambda killed=killed: any(
                        a.ok and a.kind in WRITES and a.started >= killed for a in list(load.answers)), 60):
                    raise SystemExit(f"cycle {cycle}: no write acknowledged with the killed node still down")
                stack.group.rejoin(old)
                rejoined = time.monotonic()
                if not wait_for(lambda rejoined=rejoined: any(a.ok and a.kind in WRITES and a.started >= rejoined
                                                              for a in list(load.answers)), 60):
                    raise SystemExit(f"cycle {cycle}: no write acknowledged after the rejoin")
                fig = failover_figures(list(load.answers), killed)
                row = {"killed": killed, "promoted": promoted - killed, "serving": fig["serving_again_s"],
                       "rejoined": rejoined - killed, "failed": sum(fig["failed"].values()), "by": fig["failed"]}
                rows.append(row)
                print(f"cycle {cycle:2d}: promoted {row['promoted']:5.2f} s, serving again {row['serving']:5.2f} s, "
                      f"replica back {row['rejoined']:5.2f} s, failed {row['failed']:4d} {row['by']}", flush=True)
        finally:
            answers = load.stop()
        verdict = audit_after(stack, answers)
    ok = sum(1 for a in answers if a.ok)
    by_kind = {k: sum(1 for a in answers if a.ok and a.kind == k) for k in (*WRITES, "checkpoint")}
    print(f"requests: {len(answers)}, acknowledged {ok} {by_kind}; audit records {verdict.records}; "
          f"checkpoints walked {verdict.checkpoints}; "
          f"chain {'ok' if verdict.chain_ok else 'BROKEN: ' + verdict.chain_reason}")
    print(f"acknowledged but lost: {len(verdict.lost)} {verdict.lost[:5]}")
    ends = [r["killed"] for r in rows[1:]] + [float("inf")]
    for r, end in zip(rows, ends, strict=True):  # every failure in the cycle, also after serving again
        r["all"] = sum(1 for a in answers if not a.ok and r["killed"] <= a.ended < end)
    print(f"failed per cycle, all of it (kill to next kill): {[r['all'] for r in rows]}")
    serving = [r["serving"] for r in rows]
    promoted = [r["promoted"] for r in rows]
    failed = [r["failed"] for r in rows]
    print(f"serving again: median {statistics.median(serving):.1f} s, max {max(serving):.1f} s; promoted: median "
          f"{statistics.median(promoted):.1f} s, max {max(promoted):.1f} s; failed per failover: median "
          f"{statistics.median(failed):.0f}, max {max(failed)}")
    print(f"figures: cycles={len(rows)} serving_again_median={statistics.median(serving):.2f} "
          f"serving_again_max={max(serving):.2f} promoted_median={statistics.median(promoted):.2f} "
          f"failed_median={statistics.median(failed):.0f} failed_max={max(failed)} acknowledged={ok} "
          f"lost={len(verdict.lost)} chain_ok={verdict.chain_ok}")
    if verdict.lost or not verdict.chain_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
