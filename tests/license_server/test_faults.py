"""Faults against real gunicorn + real Redis: outage, crash durability, concurrent operators,
and ``layerlock serve``'s embedded Redis being killed (supervised restart, file modes)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from ls_helpers import activate, add_model, issue, new_machine, register, world

from layerlock.license_server.store import P
from tests.conftest import CLI, PYTHON, REPO, LicenseServer, _env, fresh_minute, wait_for


def test_redis_outage_is_503_with_retry_after_and_recovers_without_restart(license_server, redis_server):
    m, model_id, _, _ = world(license_server)
    redis_server.stop()
    for method, path, body, key in [("GET", "/readyz", None, ""), ("GET", "/v1/machines", None, None),
                                    ("POST", "/v1/licenses", {"machine": m.code, "model": model_id, "days": 1},
                                     None)]:
        t0 = time.monotonic()
        resp = license_server.api(method, path, body, key=key)
        assert time.monotonic() - t0 < 3
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "unavailable" and int(resp.headers["Retry-After"]) > 0
    t0 = time.monotonic()
    resp = requests.post(license_server.url + "/v1/activate", json=m.request(model_id), timeout=10)
    assert resp.status_code == 503 and "Retry-After" in resp.headers and time.monotonic() - t0 < 3
    assert requests.get(license_server.url + "/healthz", timeout=5).status_code == 200
    redis_server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if activate(license_server, m, model_id).status_code == 200:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("server did not recover after Redis came back")
    assert license_server.api("GET", "/v1/machines").status_code == 200


def test_acknowledged_licenses_survive_a_redis_process_crash(license_server, redis_server):
    """SIGKILL of redis-server right after the last reply: every acknowledged license and its audit
    record are replayed from the AOF, chain intact.

    This is a crash of the Redis *process* only: its AOF writes are already in the kernel's page
    cache, so ``everysec`` (the default) survives it as well (README: nothing lost "on a crash of
    the Redis process alone").  What ``appendfsync always`` adds -- surviving a power cut or kernel
    crash -- needs the machine to go down and is not shown here."""
    m = new_machine()
    register(license_server, m)
    model_id, _ = add_model(license_server)
    issued = [issue(license_server, m, model_id, days=i + 1)["license_id"] for i in range(20)]
    redis_server.kill()  # SIGKILL right after the last acknowledgement
    redis_server.start()
    r = redis_server.client()
    for lid in issued:
        assert r.hget(f"{P}license:{lid}", "machine") == m.code
    deadline = time.monotonic() + 10
    while license_server.api("GET", "/readyz", key="").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    audit_ids = {rec.get("license") for rec in license_server.api(
        "GET", "/v1/audit", params={"type": "license_issued", "limit": 100}).json()["items"]}
    assert set(issued) <= audit_ids
    assert license_server.api("GET", "/v1/audit/verify").json()["ok"] is True


def test_concurrent_revoke_and_extend_end_in_a_serial_order(license_server):
    m = new_machine()
    register(license_server, m)
    model_id, _ = add_model(license_server)
    lics = [issue(license_server, m, model_id, days=10) for _ in range(12)]

    def run(lic):
        barrier = threading.Barrier(2)
        out = {}

        def revoke():
            barrier.wait()
            out["revoke"] = license_server.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {"reason": "r"})

        def extend():
            barrier.wait()
            out["extend"] = license_server.api("POST", f"/v1/licenses/{lic['license_id']}/extend", {"days": 5})

        threads = [threading.Thread(target=revoke), threading.Thread(target=extend)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return lic, out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, lics))
    for lic, out in results:
        final = license_server.api("GET", f"/v1/licenses/{lic['license_id']}").json()
        assert out["revoke"].status_code == 200 and final["status"] == "revoked"
        if out["extend"].status_code == 200:  # extend first, then revoke
            assert final["expires_at"] == lic["expires_at"] + 5 * 86400
        else:  # revoke first: extend refused, nothing changed
            assert out["extend"].status_code == 409
            assert final["expires_at"] == lic["expires_at"]
    assert license_server.api("GET", "/v1/audit/verify").json()["ok"] is True


def test_activations_racing_a_revocation_are_serializable(tmp_path, redis_server):
    with own_server(tmp_path, redis_server, LAYERLOCK_RATE_MACHINE_PER_MIN="100000") as srv:
        _race(srv)


def _race(license_server):
    m, model_id, _, lic = world(license_server)
    lid = lic["license_id"]
    stop = threading.Event()
    granted: list[int] = []
    after_revoke: list[requests.Response] = []
    revoked_at = [float("inf")]

    def hammer():
        while not stop.is_set():
            t0 = time.monotonic()
            resp = activate(license_server, m, model_id)
            if resp.status_code == 200:
                granted.append(1)
            if t0 > revoked_at[0]:
                after_revoke.append(resp)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:  # waits on what happened, not on sleeps: a loaded CI box may take a second per activation
        assert wait_for(lambda: len(granted) >= 4, 20), "no activation happened before the revocation"
        assert license_server.api("POST", f"/v1/licenses/{lid}/revoke", {"reason": "race"}).status_code == 200
        revoked_at[0] = time.monotonic()
        assert wait_for(lambda: len(after_revoke) >= 4, 20), "no activation started after the revocation"
    finally:
        stop.set()
    for t in threads:
        t.join()
    assert granted, "no activation happened before the revocation"
    assert after_revoke and all(r.json().get("error") == "revoked" for r in after_revoke)
    final = license_server.api("GET", f"/v1/licenses/{lid}").json()
    assert final["activations"] == len(granted)  # every grant committed before the revoke, none after
    audit = license_server.api("GET", "/v1/audit", params={"license": lid, "limit": 1000}).json()["items"]
    types = [rec["type"] for rec in audit]
    assert types.count("license_revoked") == 1


def test_rate_limit_per_machine(tmp_path, redis_server):
    with own_server(tmp_path, redis_server, LAYERLOCK_RATE_MACHINE_PER_MIN="3") as srv:
        m, model_id, _, _ = world(srv)
        fresh_minute()  # the budget is per minute: all six activations in one
        codes = [activate(srv, m, model_id).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        assert activate(srv, m, model_id).json()["error"] == "rate_limited"
        # a flood is counted, not audited: otherwise its own key holder could grow the trail at will
        assert not srv.api("GET", "/v1/audit", params={"reason": "rate_limited"}).json()["items"]
        assert 'layerlock_rejected_total{reason="rate_limited"} 3.0' in requests.get(srv.url + "/metrics",
                                                                                   timeout=5).text


@contextlib.contextmanager
def own_server(tmp_path, redis_server, **env):
    """A license server with non-default settings (the shared fixture uses the defaults)."""
    from tests.conftest import LicenseServer

    srv = LicenseServer(tmp_path / "own", redis_server.url, env=env)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Served(LicenseServer):
    """``layerlock serve`` with its embedded, supervised Redis (``LAYERLOCK_REDIS_URL`` unset), on
    a free loopback port; ``api()``/``url``/``admin_key`` as in :class:`LicenseServer`."""

    def __init__(self, data_dir):
        super().__init__(data_dir, "", workers=1)
        self.redis_dir = data_dir / "redis"
        self.seen_redis: set[int] = set()

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", CLI, "serve", "--data-dir", str(self.data_dir), "--bind", f"127.0.0.1:{self.port}",
                 "--workers", "1"], env=_env(**self.extra_env), cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise AssertionError("layerlock serve did not become ready")

    def redis_pid(self) -> int | None:
        """The master's redis-server child (``layerlock serve`` execs gunicorn: the master is proc.pid)."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")], stat_line.rsplit(")", 1)[1]
            if comm == "redis-server" and int(rest.split()[1]) == self.proc.pid and rest.split()[0] != "Z":
                self.seen_redis.add(int(entry.name))
                return int(entry.name)
        return None

    def stop(self) -> None:
        super().stop()
        for pid in self.seen_redis:  # only if the master itself was killed: never leave a redis-server behind
            with contextlib.suppress(OSError):  # already gone
                if "redis.sock" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore"):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def served(tmp_path):
    srv = Served(tmp_path / "srv")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _serving_again(srv, m, model_id, deadline):
    """Poll until /readyz is 200 and a license can be issued (a write); the new license's id."""
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if srv.api("GET", "/readyz", key="", timeout=1).status_code == 200:
                resp = srv.api("POST", "/v1/licenses", {"machine": m.code, "model": model_id, "days": 1}, timeout=2)
                if resp.status_code == 201:
                    return resp.json()["license_id"]
        time.sleep(0.05)
    raise AssertionError(f"not serving again in time: {srv.log.read_text()[-1500:]}")


def _modes(directory):
    """{relative path: mode} of everything but the socket."""
    return {str(p.relative_to(directory)): stat.S_IMODE(p.lstat().st_mode)
            for p in [directory, *directory.rglob("*")] if not p.is_socket()}


def _private(modes):
    return {p: oct(m) for p, m in modes.items() if m not in (0o700, 0o600)}


@pytest.mark.slow
def test_killed_embedded_redis_is_restarted_and_nothing_acknowledged_is_lost(tmp_path):
    """SIGKILL of ``layerlock serve``'s redis-server: the master restarts it on the same socket, the
    AOF replays (default ``appendfsync everysec``: the kernel has every acknowledged write), and
    the server answers again within 5 s — without any restart of the server itself."""
    with served(tmp_path) as srv:
        m, model_id, _, lic = world(srv)
        issued = [lic["license_id"]] + [issue(srv, m, model_id, days=i + 1)["license_id"] for i in range(15)]
        first = srv.redis_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)  # right after the last acknowledgement
        killed_at = time.monotonic()
        issued.append(_serving_again(srv, m, model_id, killed_at + 5))
        print(f"serving again {time.monotonic() - killed_at:.2f} s after the SIGKILL")
        assert srv.proc.poll() is None
        assert srv.redis_pid() not in (None, first)
        for lid in issued:
            resp = srv.api("GET", f"/v1/licenses/{lid}")
            assert resp.status_code == 200 and resp.json()["machine"] == m.code, lid
        audit = srv.api("GET", "/v1/audit", params={"type": "license_issued", "limit": 100}).json()["items"]
        assert set(issued) <= {rec.get("license") for rec in audit}
        assert srv.api("GET", "/v1/audit/verify").json()["ok"] is True
        assert "embedded redis-server restarted" in srv.log.read_text()


@pytest.mark.slow
def test_embedded_redis_files_are_private(tmp_path):
    """appendonlydir, the AOF files and redis.log: 0700/0600 from the first start (umask 077),
    tightened when a restart finds them more open, and still so for files Redis creates later."""
    with served(tmp_path) as srv:
        m, model_id, _, _ = world(srv)
        modes = _modes(srv.redis_dir)
        assert {"appendonlydir", "redis.log"} <= set(modes) and any(p.endswith(".aof") for p in modes), modes
        assert not _private(modes)
        for path in [srv.redis_dir, *srv.redis_dir.rglob("*")]:  # as an older version left them
            if not path.is_socket():
                path.chmod(0o755 if path.is_dir() else 0o644)
        os.kill(srv.redis_pid(), signal.SIGKILL)
        _serving_again(srv, m, model_id, time.monotonic() + 5)
        assert not _private(_modes(srv.redis_dir))
        client = redis.Redis(unix_socket_path=str(srv.redis_dir / "redis.sock"), socket_timeout=5)
        before = set(_modes(srv.redis_dir))
        client.bgrewriteaof()  # new base + incr files, written by the restarted child
        deadline = time.monotonic() + 10
        while client.info("persistence")["aof_rewrite_in_progress"] or set(_modes(srv.redis_dir)) == before:
            assert time.monotonic() < deadline, "AOF rewrite did not finish"
            time.sleep(0.05)
        modes = _modes(srv.redis_dir)
        assert set(modes) != before and not _private(modes), modes


@pytest.mark.slow
def test_embedded_redis_that_cannot_restart_stops_the_master_nonzero(tmp_path):
    """If redis-server keeps failing to start, the master exits non-zero (systemd's Restart=
    on-failure then restarts the whole service) instead of answering 503 forever."""
    with served(tmp_path) as srv:
        world(srv)
        (srv.redis_dir / "appendonlydir" / "appendonly.aof.manifest").write_text("not a manifest\n")
        os.kill(srv.redis_pid(), signal.SIGKILL)
        try:
            code = srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the master stayed up: {srv.log.read_text()[-1500:]}") from None
        log = srv.log.read_text()
        assert code == 1, log[-1500:]
        assert "could not be restarted" in log and "Invalid AOF manifest" in log
        assert srv.redis_pid() is None and not _mentioning(str(srv.redis_dir / "redis.sock"))


def _mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    out = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="ignore") \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(entry.name))
    return out
