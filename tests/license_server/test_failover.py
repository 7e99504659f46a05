"""A Redis failover under load loses no acknowledged write, and the audit chain survives it.

The topology of README "Scaling out", all real processes on loopback (tests/license_server/
ha_topology.py): a Redis primary and replica from deploy/redis*.conf, three Sentinels from
deploy/sentinel.conf, two gunicorn server replicas waiting for one replica per write
(``LAYERLOCK_REDIS_WAIT_REPLICAS=1``) behind deploy/nginx-tls.conf, sidecar threads activating
(the verifier's ``ServerClient``) and an ops client issuing, revoking and taking checkpoints.

One kill cycle here (``bench/failover.py`` runs 20 and prints the timings): SIGKILL the primary
mid-load; Sentinel promotes the replica; the killed node rejoins as a replica (as its supervisor
would restart it); the servers follow without a restart.  Then every answer a client got a 2xx
for is checked against the new primary: each activation's record (by its token's ``jti``), each
issued license, each revocation; the chain is walked from genesis against every checkpoint an
auditor was handed, and the server's own ``/v1/audit/verify`` agrees.  Failed requests are
counted, not forbidden -- but each one is a 503 with ``Retry-After``, never a 500 or a hang.
"""

from __future__ import annotations

import time

import pytest
from ha_topology import Load, audit_after, failover_figures, ha_stack

from tests.conftest import wait_for

pytestmark = pytest.mark.single_redis  # a topology of its own

WRITES = ("activate", "issue", "revoke")


def _oks(load: Load, kind: str, since: float) -> int:
    return sum(1 for a in list(load.answers) if a.kind == kind and a.ok and a.started >= since)


@pytest.mark.slow
def test_sigkill_of_the_primary_mid_load_loses_no_acknowledged_write(tmp_path):
    with ha_stack(tmp_path, fleet=8) as stack:
        server_pids = [s.proc.pid for s in stack.servers]
        t0 = time.monotonic()
        load = Load(stack).start()
        try:
            assert wait_for(lambda: all(_oks(load, k, t0) >= 5 for k in (*WRITES, "checkpoint")), 60)
            old = stack.group.primary()
            assert old is not None
            killed_at = time.monotonic()
            old.kill()
            stack.group.rejoin(old)  # Sentinel promoted the other node; the killed one is its replica now
            back = time.monotonic()
            assert stack.group.primary() is not old
            assert wait_for(lambda: all(_oks(load, k, back) >= 5 for k in (*WRITES, "checkpoint")), 60), \
                "the servers did not follow the failover"
        finally:
            answers = load.stop()

        verdict = audit_after(stack, answers)
        figures = failover_figures(answers, killed_at)
        print(f"\nfailover: {len(answers)} requests, serving again after {figures['serving_again_s']:.1f} s, "
              f"failed meanwhile {figures['failed']}, {verdict.records} audit records, "
              f"{verdict.checkpoints} checkpoints, acknowledged but lost {len(verdict.lost)}")
        assert verdict.lost == [], verdict.lost[:10]
        assert verdict.chain_ok, verdict.chain_reason
        assert verdict.checkpoints >= 10
        failed = [a for a in answers if not a.ok]
        assert failed, "the kill went unnoticed: nothing was tested"
        assert all(a.status == 503 and a.retry_after for a in failed), {(a.kind, a.status, a.error) for a in failed}
        assert all(a.ended >= killed_at for a in failed)  # nothing failed before the kill
        assert [s.proc.pid for s in stack.servers] == server_pids and all(s.proc.poll() is None
                                                                          for s in stack.servers)
