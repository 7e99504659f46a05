"""Benchmark: a renewal storm — 10,000 sidecars coming back at once after an outage.

Not a test: it prints figures.  Two license-server replicas (real gunicorn, deploy/gunicorn.conf.py
defaults but ``--workers`` each) on one real Redis (``appendfsync always``, as deploy/redis.conf),
behind the shipped deploy/nginx-tls.conf (TLS).  ``--sidecars`` machines, each with its own
Ed25519/X25519 keys, are bulk-loaded with a license each (the store modules' key layout, as
bench/activate.py does); every one then activates once at a gentle pace, so each holds a cached
token, as a fleet does before an outage.

The storm: every simulated sidecar sends its first renewal at a uniformly random moment within
``--window`` seconds (the fleet's jittered retries converging when the server comes back), from
its own loopback source address (127.x.y.z: nginx's per-address ``limit_conn`` and the server's
per-source budgets see a fleet, not one host), over a fresh TLS connection, a signed request as
``layerlock-verifier`` makes it.  Until it gets a token it follows the sidecar's own schedule —
:func:`layerlock.verifier.daemon.retry_delay` (exponential from ``retry_min`` 2 s, jittered, capped
at ``retry_max`` 300 s, never sooner than the server's ``Retry-After``, never past half of the
cached token's remaining life) — with the sidecar's 10 s request timeout.

Reported: the time from the storm's start until every sidecar holds a fresh token (each one is
verified afterwards: signature under the server's JWKS, this machine, this model); the answers
(200, 503 ``overloaded`` shed by the server, other); timeouts; the server's latency while it
happens — nginx's ``$upstream_response_time`` per proxied request (gunicorn's queue + work) and
``$request_time`` — p50/p99, and the client-side p99; the smallest remaining life of a cached
token at the storm's start; and "lost models": sidecars whose cached token expired before they
got a fresh one (they would have stopped serving).  The client is one asyncio process on the
same cores as the servers: its own lateness (first requests sent later than planned) is printed
so a client that cannot keep up is visible.

    python bench/storm.py [--sidecars 10000] [--window 10] [--workers 2] [--grace 600]

Last line: ``figures: name=value …`` (seconds, milliseconds, counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "license_server")]

import jwt  # noqa: E402
import requests  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519  # noqa: E402
from test_deploy import nginx_in_front  # noqa: E402

from layerlock.license_server.store import licenses, machines  # noqa: E402
from layerlock.shared.activation import make_request  # noqa: E402
from layerlock.shared.enrollment import DeviceClass, Enrollment  # noqa: E402
from layerlock.shared.keys import b64u_decode, x25519_public  # noqa: E402
from layerlock.shared.machine import MachineSources, derive_code  # noqa: E402
from layerlock.shared.tokens import parse_jwks, verify_token  # noqa: E402
from layerlock.shared.wrap import seal_for_server  # noqa: E402
from layerlock.verifier.activation import retry_after  # noqa: E402
from layerlock.verifier.daemon import retry_delay  # noqa: E402
from tests.conftest import LicenseServer, RedisServer, free_port  # noqa: E402

MODEL = "storm-model"
RETRY_MIN, RETRY_MAX, TIMEOUT = 2.0, 300.0, 10.0  # the sidecar's defaults (verifier/config.py)


@dataclass
class Sidecar:
    code: str
    sk: ed25519.Ed25519PrivateKey
    source: str
    token: str = ""
    exp: float = 0.0          # of the token it holds
    got_at: float = 0.0       # wall time it got its fresh token (storm)
    failures: int = 0
    planned: float = 0.0
    first_sent: float = 0.0
    lost: bool = False


@dataclass
class Answer:
    status: int   # 0: no answer (timeout, connection error)
    error: str
    ms: float


class Client:
    """One request per connection, like a sidecar renewing after an outage (HTTPS when ``cert``)."""

    def __init__(self, port: int, cert: Path | None) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(cert)) if cert else None
        self.answers: list[Answer] = []

    async def activate(self, sc: Sidecar) -> tuple[int, float | None, dict[str, Any]]:
        body = json.dumps(make_request(sc.code, MODEL, sc.sk).to_dict()).encode()
        head = (f"POST /v1/activate HTTP/1.1\r\nHost: licenses.example.com\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        t0 = time.monotonic()
        writer = None
        try:
            async with asyncio.timeout(TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, ssl=self.ctx, server_hostname="127.0.0.1" if self.ctx else None,
                    local_addr=(sc.source, 0))
                writer.write(head + body)
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                doc = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as exc:
            self.answers.append(Answer(0, type(exc).__name__, (time.monotonic() - t0) * 1000))
            return 0, None, {}
        finally:
            if writer is not None:
                writer.close()
        self.answers.append(Answer(status, "" if status == 200 else str(doc.get("error", "")),
                                   (time.monotonic() - t0) * 1000))
        return status, retry_after(headers.get("retry-after")), doc


async def settle(client: Client, fleet: list[Sidecar], concurrency: int) -> None:
    """Before the outage: every sidecar activates once (gently) and caches its token."""
    sem = asyncio.Semaphore(concurrency)

    async def one(sc: Sidecar) -> None:
        async with sem:
            for _ in range(20):
                status, ra, doc = await client.activate(sc)
                if status == 200:
                    sc.token = doc["token"]
                    sc.exp = float(jwt.decode(sc.token, options={"verify_signature": False})["exp"])
                    return
                await asyncio.sleep(ra or 1.0)
            raise SystemExit(f"{sc.code}: no token before the storm")

    await asyncio.gather(*(one(sc) for sc in fleet))


async def storm(client: Client, fleet: list[Sidecar], window: float) -> float:
    start = time.time()
    loop_start = time.monotonic()

    async def one(sc: Sidecar) -> None:
        sc.planned = random.uniform(0, window)
        await asyncio.sleep(sc.planned)
        sc.first_sent = time.monotonic() - loop_start
        while True:
            status, ra, doc = await client.activate(sc)
            now = time.time()
            if now >= sc.exp:
                sc.lost = True  # its cached token ran out: the model would have been dropped
            if status == 200 and isinstance(doc.get("token"), str):
                sc.token, sc.got_at = doc["token"], now
                return
            sc.failures += 1
            await asyncio.sleep(retry_delay(sc.failures, RETRY_MIN, RETRY_MAX, retry_after=ra,
                                            until_expiry=sc.exp - now))

    await asyncio.gather(*(one(sc) for sc in fleet))
    return start


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


def bulk_load(r: Any, fleet: list[Sidecar], kex: list[x25519.X25519PrivateKey], grace: int) -> None:
    now = int(time.time())
    with r.pipeline(transaction=False) as pipe:
        for i, (sc, kx) in enumerate(zip(fleet, kex, strict=True)):
            e = Enrollment(machine=sc.code, sig_pub=sc.sk.public_key().public_bytes_raw(),
                           kex_pub=kx.public_key().public_bytes_raw(), pq_pub=None,
                           device=DeviceClass(vendor="Storm", type="x86_64", os="Linux", aes=True))
            rec = machines.record(sc.code, "fleet", {}, e)
            pipe.hset(machines.key(sc.code), mapping=rec)
            pipe.zadd(machines.ALL, {sc.code: int(rec["created_at"])})
            lic = licenses.record(sc.code, MODEL, "fleet", now - 60, now + 365 * 86400, grace, grace)
            pipe.hset(licenses.key(lic["license_id"]), mapping=lic)
            pipe.zadd(licenses.ALL, {lic["license_id"]: int(lic["issued_at"])})
            pipe.sadd(licenses.index_key(lic), lic["license_id"])
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()


def nginx_times(log: Path, since: float, until: float) -> tuple[list[float], list[float], dict[str, int]]:
    """(upstream ms, request ms, statuses) of the requests nginx finished in [since, until]."""
    upstream, total, statuses = [], [], {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) != 4 or not since <= float(parts[0]) <= until:
            continue
        statuses[parts[1]] = statuses.get(parts[1], 0) + 1
        total.append(float(parts[2]) * 1000)
        if parts[3] != "-":
            upstream.append(sum(float(x) for x in parts[3].replace(":", ",").split(",") if x.strip()) * 1000)
    return upstream, total, statuses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sidecars", type=int, default=10_000)
    ap.add_argument("--window", type=float, default=10.0, help="seconds over which first renewals arrive")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers per replica (2 replicas)")
    ap.add_argument("--grace", type=int, default=600, help="the licenses' token life / offline grace (s)")
    ap.add_argument("--shed-ms", type=int, default=None, help="LAYERLOCK_SHED_QUEUE_MS (default: the server's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tls", action="store_true",
                    help="sidecars connect with TLS (the default is nginx's same server block without TLS: the "
                         "Python client's TLS handshakes cost more CPU than the server it measures)")
    args = ap.parse_args()
    random.seed(args.seed)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
          f"load {uptime.split('load average:')[-1].strip()}")
    base = Path(tempfile.mkdtemp(prefix="llstorm-"))
    rs = RedisServer(base / "redis")
    rs.start()
    servers: list[LicenseServer] = []
    try:
        env = {"LAYERLOCK_TRUST_PROXY": "1", "LAYERLOCK_LOG_LEVEL": "WARNING", "LAYERLOCK_BACKGROUND": "false"}
        if args.shed_ms is not None:
            env["LAYERLOCK_SHED_QUEUE_MS"] = str(args.shed_ms)
        first = LicenseServer(base / "server-a", rs.url, workers=args.workers, env=env, shed_queue_ms=None)
        servers = [first, first.replica(base / "server-b")]
        for s in servers:
            s.start()
        sealed = seal_for_server(os.urandom(32), x25519_public(b64u_decode(first.intake_pub)), MODEL)
        first.api("POST", "/v1/models", {"model_id": MODEL, "name": MODEL, "version": "1",
                                         "sealed_key": sealed}).raise_for_status()
        t0 = time.monotonic()
        fleet, kex = [], []
        for i in range(args.sidecars):
            source = f"127.{10 + i // 62500}.{i // 250 % 250}.{1 + i % 250}"  # one address per sidecar
            code = derive_code(MachineSources(machine_id=f"storm-{i:06d}-{os.urandom(4).hex()}"))
            fleet.append(Sidecar(code, ed25519.Ed25519PrivateKey.generate(), source))
            kex.append(x25519.X25519PrivateKey.generate())
        bulk_load(rs.client(), fleet, kex, args.grace)
        print(f"{args.sidecars} machines with their own keys and a license each, bulk-loaded in "
              f"{time.monotonic() - t0:.1f} s")
        (base / "nginx").mkdir()
        log = base / "nginx" / "access.log"
        plain = free_port()
        with nginx_in_front(base / "nginx", [s.port for s in servers], access_log=str(log),
                               plain_port=plain) as front:
            client = Client(front.port, front.cert) if args.tls else Client(plain, None)
            t0 = time.monotonic()
            asyncio.run(settle(client, fleet, 32))
            print(f"before the outage: every sidecar activated once and cached its token "
                  f"({time.monotonic() - t0:.1f} s)")
            client.answers.clear()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            cpu0 = ru0.ru_utime + ru0.ru_stime
            start = asyncio.run(storm(client, fleet, args.window))
            end = max(sc.got_at for sc in fleet)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(0.5)  # nginx writes its last log lines
            upstream, total, statuses = nginx_times(log, start, end + 1)
            keys = parse_jwks(requests.get(front.url + "/.well-known/jwks.json", verify=str(front.cert),
                                           timeout=10).json())
        bad = 0
        for sc in fleet:
            try:
                verify_token(sc.token, keys, machine_code=sc.code, model_id=MODEL)
            except Exception:  # noqa: BLE001 - counted and reported
                bad += 1
        remaining = min(sc.exp for sc in fleet) - start
        answers = client.answers
        codes: dict[str, int] = {}
        for a in answers:
            k = f"{a.status} {a.error}".strip()
            codes[k] = codes.get(k, 0) + 1
        late = [sc.first_sent - sc.planned for sc in fleet]
        lost = sum(1 for sc in fleet if sc.lost)
        all_in = end - start
        print(f"storm: {args.sidecars} sidecars, first renewals planned within {args.window:.0f} s "
              f"(client lateness p50 {statistics.median(late):.2f} s, max {max(late):.2f} s)")
        print(f"every sidecar holds a fresh token after {all_in:.1f} s ({bad} tokens failed verification)")
        print(f"requests {len(answers)} ({len(answers) / args.sidecars:.2f} per sidecar): "
              f"{dict(sorted(codes.items()))}")
        print(f"nginx statuses {dict(sorted(statuses.items()))}")
        print(f"server latency (nginx $upstream_response_time): p50 {pct(upstream, 0.5):.0f} ms, "
              f"p99 {pct(upstream, 0.99):.0f} ms, max {max(upstream):.0f} ms; nginx $request_time p99 "
              f"{pct(total, 0.99):.0f} ms; client-side p99 {pct([a.ms for a in answers], 0.99):.0f} ms")
        print(f"cached tokens at the storm's start: at least {remaining:.0f} s left; lost models: {lost}")
        print(f"client CPU {ru1.ru_utime + ru1.ru_stime - cpu0:.1f} s for the storm")
        no_answer = sum(1 for a in answers if a.status == 0)  # timeouts, resets: no HTTP answer at all
        shed = codes.get("503 overloaded", 0)
        print(f"figures: sidecars={args.sidecars} all_hold_token_s={all_in:.1f} requests={len(answers)} "
              f"shed={shed} no_answer={no_answer} server_p50_ms={pct(upstream, 0.5):.0f} "
              f"server_p99_ms={pct(upstream, 0.99):.0f} client_p99_ms={pct([a.ms for a in answers], 0.99):.0f} "
              f"lost_models={lost} bad_tokens={bad} min_cached_left_s={remaining:.0f}")
    finally:
        for s in servers:
            s.stop()
        rs.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
