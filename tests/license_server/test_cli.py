"""The ops CLI: `init`/`serve` contracts and the REST commands against a real server."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from ls_helpers import activate, add_model, new_machine, world

from layerlock.license_server.cli import main
from layerlock.license_server.store import P
from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.tokens import parse_jwks, verify_token
from layerlock.shared.wrap import MachineKemKeys, binding_info, open_sealed, seal_for_server
from tests.conftest import CLI, PYTHON, REPO, LicenseServer, RedisServer, _env, free_port


def cli(server, *args: str, key: str | None = None):
    env = {"LAYERLOCK_SERVER": server.url, "LAYERLOCK_API_KEY": server.admin_key if key is None else key}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_init_contract(tmp_path):
    d = tmp_path / "data"
    res = CliRunner().invoke(main, ["init", "--data-dir", str(d), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert set(doc) == {"admin_api_key", "intake_pub", "data_dir"} and doc["data_dir"] == str(d.resolve())
    assert len(b64u_decode(doc["intake_pub"])) == 32
    keys = d / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for f in keys.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600), f
    assert doc["admin_api_key"] not in "".join(p.read_text(errors="ignore") for p in keys.rglob("*") if p.is_file())
    again = CliRunner().invoke(main, ["init", "--data-dir", str(d)])
    assert again.exit_code == 1 and "already initialised" in again.output
    forced = CliRunner().invoke(main, ["init", "--data-dir", str(d), "--force", "--json"])
    assert forced.exit_code == 0 and json.loads(forced.output)["admin_api_key"] != doc["admin_api_key"]


def test_rest_commands_end_to_end(server, tmp_path):
    m = new_machine()
    res = cli(server, "machines", "add", m.enrollment, "--customer", "globex", "--label", "dc=fra", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["machine"] == m.code
    table = cli(server, "machines", "list", "--customer", "globex").output
    assert m.code in table and "MACHINE" in table
    sealed = tmp_path / "m.key.sealed"
    sealed.write_text(json.dumps(seal_for_server(os.urandom(32), x25519_public(b64u_decode(server.intake_pub)),
                                                 "cli-model")))
    assert cli(server, "models", "add", str(sealed), "--version", "2").exit_code == 0
    assert "cli-model" in cli(server, "models", "list").output
    res = cli(server, "licenses", "issue", "--machine", m.code, "--model", "cli-model", "--days", "3", "--json")
    lid = json.loads(res.output)["license_id"]
    assert json.loads(cli(server, "licenses", "show", lid, "--json").output)["status"] == "active"
    assert cli(server, "licenses", "extend", lid, "--days", "2").exit_code == 0
    assert lid in cli(server, "licenses", "list", "--customer", "globex").output
    assert cli(server, "licenses", "revoke", lid, "--reason", "cli").exit_code == 0
    res = cli(server, "licenses", "revoke", lid)
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "conflict" in res.output
    assert cli(server, "machines", "deactivate", m.code).exit_code == 0
    assert "inactive" in cli(server, "machines", "show", m.code).output
    audit = json.loads(cli(server, "audit", "list", "--license", lid, "--json").output)
    assert [a["type"] for a in audit] == ["license_revoked", "license_extended", "license_issued"]
    exported = [json.loads(line) for line in cli(server, "audit", "export", "--license", lid).output.splitlines()]
    assert [a["type"] for a in exported] == ["license_issued", "license_extended", "license_revoked"]
    assert "audit chain ok" in cli(server, "audit", "verify").output
    res = cli(server, "keys", "create", "--role", "auditor", "--json")
    created = json.loads(res.output)
    assert created["role"] == "auditor" and created["api_key"].startswith("llk_")
    assert created["id"] in cli(server, "keys", "list").output
    res = cli(server, "machines", "list", key=created["api_key"])
    assert res.exit_code == 0
    res = cli(server, "machines", "add", new_machine().code, key=created["api_key"])
    assert res.exit_code == 1 and "forbidden" in res.output
    assert cli(server, "keys", "revoke", created["id"]).exit_code == 0
    res = cli(server, "machines", "list", key="")
    assert res.exit_code == 1 and "API key" in res.output
    res = CliRunner().invoke(main, ["machines", "list", "--server", "http://127.0.0.1:9", "--api-key", "x"])
    assert res.exit_code == 1 and "cannot reach" in res.output


def test_audit_verify_finds_the_first_break(license_server):
    world(license_server)
    r = license_server.redis()
    ids = [sid for sid, _ in r.xrange("{ll}:audit")]
    assert len(ids) >= 4
    res = cli(license_server, "audit", "verify", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True
    r.xdel("{ll}:audit", ids[2])
    doc = license_server.api("GET", "/v1/audit/verify").json()
    assert doc == {"ok": False, "checked": 2, "break_at": ids[3],
                   "reason": "prev does not match the hash of the previous record"}
    res = cli(license_server, "audit", "verify")
    assert res.exit_code == 1 and ids[3] in res.output


def test_signing_rotation_keeps_old_tokens_verifiable_and_kek_rotation_keeps_keys(license_server):
    m, model_id, data_key, _ = world(license_server)
    old_token = activate(license_server, m, model_id).json()["token"]
    res = cli(license_server, "keys", "rotate-signing", "--json")
    assert res.exit_code == 0, res.output
    new_kid = json.loads(res.output)["kid"]
    time.sleep(1.1)  # workers re-read the key dir at most once a second
    jwks = parse_jwks(requests.get(license_server.url + "/.well-known/jwks.json", timeout=5).json())
    assert len(jwks) == 2 and new_kid in jwks
    verify_token(old_token, jwks, machine_code=m.code)
    res = cli(license_server, "keys", "rotate-kek", "--json")
    assert res.exit_code == 0, res.output
    rot = json.loads(res.output)
    assert rot["rewrapped"] >= 1
    assert license_server.redis().hget(f"{P}model:{model_id}", "kek_id") == rot["kek_id"]
    time.sleep(1.1)
    token = activate(license_server, m, model_id).json()["token"]
    import jwt

    assert jwt.get_unverified_header(token)["kid"] == new_kid
    claims = verify_token(token, jwks, machine_code=m.code)
    assert open_sealed(claims.wrapped_key, MachineKemKeys(m.kx).private_for(claims.suite), claims.suite,
                       binding_info(claims.lic, m.code, model_id)) == data_key
    new_model, _ = add_model(license_server)  # models registered after rotation use the new KEK
    assert license_server.redis().hget(f"{P}model:{new_model}", "kek_id") == rot["kek_id"]


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore"):
                    out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.mark.slow
def test_serve_with_embedded_redis_persists_and_stops_cleanly(tmp_path):
    d = tmp_path / "srv"
    admin = json.loads(subprocess.run([PYTHON, "-m", CLI, "init", "--data-dir", str(d), "--json"],
                                      env=_env(), cwd=REPO, capture_output=True, text=True, check=True).stdout)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {admin['admin_api_key']}"}
    m = new_machine()

    def run():
        proc = subprocess.Popen([PYTHON, "-m", CLI, "serve", "--data-dir", str(d), "--bind",
                                 f"127.0.0.1:{port}", "--workers", "1", "--appendfsync", "always"],
                                env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/readyz", timeout=1).status_code == 200:
                    return proc
            except requests.RequestException:
                time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("serve did not become ready")

    def stop(proc):
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert not _procs_mentioning(str(d / "redis" / "redis.sock")), "embedded redis-server left running"

    proc = run()
    try:
        assert (d / "redis" / "redis.sock").exists()
        assert stat.S_IMODE((d / "redis").stat().st_mode) == 0o700
        assert requests.post(url + "/v1/machines", json={"machine": m.code}, headers=headers,
                             timeout=5).status_code == 201
    finally:
        stop(proc)
    proc = run()
    try:
        assert requests.get(url + f"/v1/machines/{m.code}", headers=headers, timeout=5).status_code == 200
    finally:
        stop(proc)


@pytest.mark.parametrize(("url", "cause"), [
    ("cluster://127.0.0.1:{port}", "LAYERLOCK_REDIS_URL must be redis://"),
    ("redis+cluster://127.0.0.1:{port}", "the redis+cluster URL cannot work: 127.0.0.1:{port} is not in cluster mode"),
])
def test_serve_with_a_redis_url_that_can_never_work_exits_2_with_one_line(tmp_path, url, cause):
    """Checked once in the gunicorn master: before, every worker failed to boot with a traceback
    (a cluster URL naming a plain Redis even started, and answered 503 to everything)."""
    d = _initialised(tmp_path / "srv")
    plain = RedisServer(tmp_path / "plain")  # a single Redis, whatever LAYERLOCK_TEST_REDIS says
    plain.start()
    try:
        out = _serve(d, f"127.0.0.1:{free_port()}", "--workers", "1", "--redis-url", url.format(port=plain.port))
    finally:
        plain.stop()
    _refused_at_start(out, cause.format(port=plain.port))


def _initialised(d: Path) -> Path:
    subprocess.run([PYTHON, "-m", CLI, "init", "--data-dir", str(d), "--json"], env=_env(), cwd=REPO,
                   capture_output=True, check=True)
    return d


def _serve(d: Path, bind: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", CLI, "serve", "--data-dir", str(d), "--bind", bind, *args],
                          env={**_env(), **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60)


def _refused_at_start(out: subprocess.CompletedProcess[str], cause: str) -> None:
    """Exit 2 and exactly one error line, naming ``cause``: no traceback, no worker ever booted."""
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [json.loads(line) for line in out.stderr.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1 and errors[0]["msg"].startswith("configuration error, not starting: "), errors
    assert cause in errors[0]["msg"], errors
    assert "Traceback" not in out.stderr and "Booting worker" not in out.stderr


#: (no setting at all: the test makes the data dir's ``redis`` a file instead)
SPOILED: dict[str, str] = {}


@pytest.mark.parametrize(("env", "bind", "cause"), [
    ({"LAYERLOCK_WORKERS": "two"}, None, "LAYERLOCK_WORKERS must be a whole number between 1 and 256"),
    ({"LAYERLOCK_THREADS": "0"}, None, "LAYERLOCK_THREADS must be a whole number between 1 and 256"),
    ({"LAYERLOCK_WORKERS": "\u00b2"}, None, "LAYERLOCK_WORKERS must be a whole number between 1 and 256"),
    ({}, "127.0.0.1:99999", "LAYERLOCK_BIND must be host:port (port 1-65535; an IPv6 host in brackets)"),
    ({}, "", "LAYERLOCK_BIND must be host:port"),  # was: listen nowhere
    ({}, "::1:8700", "LAYERLOCK_BIND must be host:port"),  # was: refused by gunicorn after Redis started
    ({}, "h:8700:9", "LAYERLOCK_BIND must be host:port"),  # was: port 8700, silently
    ({"LAYERLOCK_BACKGROUND": "ture"}, None, "setting 'background' must be true or false (1/0, yes/no, on/off)"),
    ({"LAYERLOCK_LOG_LEVEL": "LOUD"}, None,
     "log_level must be one of DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL, FATAL"),
    ({"LAYERLOCK_POLICY_FILE": "/nonexistent/policy.json"}, None, "cannot read suite policy /nonexistent/policy.json"),
    (SPOILED, None, "File exists"),  # the embedded Redis's dir is a file: waiting will not help
])
def test_serve_with_a_bad_setting_exits_2_with_one_line(tmp_path, env, bind, cause):
    """Settings gunicorn reads and settings only the workers used to load: before, each was a
    traceback -- gunicorn's "Failed to read config file" or every worker failing to boot -- and
    exit 1 or 3, so systemd restarted it forever; a typo in a true/false setting read as false,
    and an empty bind listened nowhere."""
    d = _initialised(tmp_path / "srv")
    if env is SPOILED:
        (d / "redis").write_text("not a directory")
    _refused_at_start(_serve(d, f"127.0.0.1:{free_port()}" if bind is None else bind, env=env), cause)


@pytest.mark.parametrize(("env", "cause"), [
    ({"LAYERLOCK_CLOCK_SKEW": "abc", "LAYERLOCK_REDIS_URL": "redis://127.0.0.1:9"},
     "configuration error: setting 'clock_skew' must be a whole number"),
    ({"LAYERLOCK_REDIS_URL": ""}, "no Redis URL"),
])
def test_the_background_worker_run_alone_refuses_a_bad_setting_with_exit_2(env, cause):
    out = subprocess.run([PYTHON, "-m", "layerlock.license_server.webhooks"], env={**_env(), **env}, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and cause in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_misspelled_setting_is_named_in_a_warning(tmp_path, redis_server):
    """``LAYERLOCK_REDIS_WAIT_REPLICA=1`` (no S) was ignored without a word -- and would have
    acknowledged writes no replica holds."""
    srv = LicenseServer(tmp_path / "srv", redis_server.url, workers=1,
                        env={"LAYERLOCK_REDIS_WAIT_REPLICA": "1", "LAYERLOCK_NONSENSE_XYZ": "1"})
    srv.start()
    try:
        assert srv.api("GET", "/readyz").status_code == 200  # a warning, not a refusal
    finally:
        srv.stop()
    warned = [json.loads(line)["msg"] for line in srv.log.read_text().splitlines()
              if '"WARNING"' in line and "is not a setting" in line]
    assert "LAYERLOCK_REDIS_WAIT_REPLICA is not a setting this server reads " \
           "(did you mean LAYERLOCK_REDIS_WAIT_REPLICAS?)" in warned, warned
    assert "LAYERLOCK_NONSENSE_XYZ is not a setting this server reads" in warned, warned


def test_serve_refuses_a_worker_count_below_one(tmp_path):
    out = subprocess.run([PYTHON, "-m", CLI, "serve", "--data-dir", str(tmp_path), "--workers", "0"], env=_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Invalid value for '--workers': 0 is not in the range 1<=x<=256" in out.stderr, out.stderr


def test_revoked_bootstrap_admin_key_stays_revoked_after_restart(license_server):
    second = license_server.api("POST", "/v1/keys", {"role": "admin", "name": "second"}).json()
    boot = [k for k in license_server.api("GET", "/v1/keys").json()["items"] if k["id"].startswith("key_bootstrap")]
    assert len(boot) == 1
    assert license_server.api("POST", f"/v1/keys/{boot[0]['id']}/revoke", key=second["api_key"]).status_code == 200
    license_server.stop()
    license_server.start()
    assert license_server.api("GET", "/v1/keys").status_code == 401
    assert license_server.api("GET", "/v1/keys", key=second["api_key"]).status_code == 200


def test_signing_rotation_publishes_endorsement_chain(license_server):
    """Each rotated-in key is endorsed by the key it replaced; `init`'s key carries none."""
    from layerlock.shared.tokens import extend_pinned

    def document() -> dict:
        return requests.get(license_server.url + "/.well-known/jwks.json", timeout=5).json()

    first = document()
    assert len(first["keys"]) == 1 and "llk_endorsement" not in first["keys"][0]
    pinned = parse_jwks(first)
    kids = []
    for _ in range(2):
        res = cli(license_server, "keys", "rotate-signing", "--json")
        assert res.exit_code == 0, res.output
        kids.append(json.loads(res.output)["kid"])
    time.sleep(1.1)  # workers re-read the key dir at most once a second
    doc = document()
    by_kid = {k["kid"]: k for k in doc["keys"]}
    assert set(by_kid) == set(pinned) | set(kids)
    assert all("llk_endorsement" in by_kid[k] for k in kids)
    assert set(extend_pinned(pinned, doc)) == set(by_kid)  # the chain of two rotations resolves
    assert parse_jwks(doc).keys() == by_kid.keys()  # still a plain JWKS to its old consumers


@pytest.mark.parametrize(("args", "message"), [
    (["audit", "list", "--since", "nan"], "Invalid value for '--since': 'nan' is not a time"),
    (["audit", "list", "--until", "-5"], "Invalid value for '--until': '-5' is not a time"),
    (["audit", "list", "--limit", "0"], "Invalid value for '--limit': 0 is not in the range x>=1"),
    (["webhooks", "deliveries", "--limit", "-1"], "Invalid value for '--limit': -1 is not in the range x>=1"),
    (["machines", "list", "--limit", "0"], "Invalid value for '--limit'"),
    (["licenses", "issue", "--machine", "LLK-x", "--model", "m", "--days", "0"], "Invalid value for '--days'"),
    (["licenses", "issue", "--customer", "c", "--model", "m", "--seats", "0"], "Invalid value for '--seats'"),
    (["licenses", "issue", "--machine", "LLK-x", "--model", "m", "--token-ttl", "-1"], "'--token-ttl'"),
    (["licenses", "extend", "lic_x", "--days", "-1"], "Invalid value for '--days'"),
])
def test_a_bad_number_is_a_usage_error_before_any_request(args, message):
    """Exit 2 naming the option, without asking the server (port 9: nothing listens) -- before,
    ``webhooks deliveries --limit 0`` printed "(none)" and exit 0, and the rest were refused by the
    server under the API's parameter names, needing a reachable server to say so."""
    out = CliRunner().invoke(main, [*args, "--server", "http://127.0.0.1:9", "--api-key", "k"])
    assert out.exit_code == 2 and message in out.output, out.output
    assert "cannot reach" not in out.output
