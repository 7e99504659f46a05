"""End to end, air-gapped: the sidecar never reaches the license server (its server_url is a dead
port); the signed request and the signed, sealed response travel as files through the real CLIs."""

from __future__ import annotations

import hashlib
import json
import time

import requests
from e2e_deploy import deploy
from e2e_helpers import MODEL_ID, cleanup, cli, ops, run_client, wait_for

from tests.conftest import free_port


def test_air_gapped_request_response_import_unlocks_and_renews(license_server, tmp_path):
    dep = deploy(license_server, tmp_path)
    try:
        # the site cannot reach the server: its sidecar points at a port nobody listens on
        dead = f"http://127.0.0.1:{free_port()}"
        dep.config.write_text(dep.config.read_text().replace(license_server.url, dead))
        lic = dep.issue(days=30, offline_grace=3600, airgap_ttl=10 * 86_400)
        work = dep.root / "exchange"
        work.mkdir()
        dep.sidecar.start()  # READY with the model locked: no server, no token yet
        assert dep.sidecar.model_state()["reason"] == "server_unreachable"

        # site: a request file signed with the machine key ...
        req = work / "req.llr"
        out = json.loads(cli("request", "--model", MODEL_ID, "--out", str(req), "--state-dir", str(dep.state_dir),
                             "--json").stdout)
        assert out["machine"] == dep.machine and json.loads(req.read_text())["request"]["nonce"] == out["nonce"]
        # ... ops answer it wherever the server is ...
        resp = work / "resp.llt"
        ops(license_server, "activate-offline", str(req), "--out", str(resp))
        assert resp.stat().st_mode & 0o777 == 0o600  # the token's file is the site's business only
        answer = json.loads(resp.read_text())
        assert answer["license_id"] == lic
        assert answer["expires_at"] - time.time() > 9 * 86_400  # airgap_ttl, not the hour of offline grace
        # ... once: the nonce is burnt (a replay is refused, and audited: ops submitted it)
        again = ops(license_server, "activate-offline", str(req), "--out", str(work / "again.llt"), check=False)
        assert again.returncode == 1 and "replay" in again.stderr
        # site: import verifies the token like an online one; the running sidecar unlocks with it
        imported = json.loads(cli("import", str(resp), "--state-dir", str(dep.state_dir), "--json").stdout)
        assert imported["license"] == lic and imported["model"] == MODEL_ID
        assert wait_for(lambda: dep.sidecar.model_state()["state"] == "unlocked", timeout=10)
        want = hashlib.sha256(dep.original.read_bytes()).hexdigest()
        assert run_client(MODEL_ID, dep.socket)["sha256"] == want
        assert cli("import", str(resp), "--state-dir", str(dep.state_dir), check=False).returncode == 1  # single use

        # renewal is the same exchange
        exp = dep.sidecar.model_state()["expires_at"]
        time.sleep(1.1)
        cli("request", "--model", MODEL_ID, "--out", str(work / "req2.llr"), "--state-dir", str(dep.state_dir))
        ops(license_server, "activate-offline", str(work / "req2.llr"), "--out", str(work / "resp2.llt"))
        cli("import", str(work / "resp2.llt"), "--state-dir", str(dep.state_dir))
        assert wait_for(lambda: dep.sidecar.model_state()["expires_at"] > exp, timeout=10)
        assert run_client(MODEL_ID, dep.socket)["sha256"] == want

        audit = license_server.api("GET", "/v1/audit", params={"type": "activation", "machine": dep.machine}).json()
        offline = [a for a in audit["items"] if a.get("channel") == "offline"]
        assert [a["outcome"] for a in offline] == ["granted", "denied", "granted"]
        assert offline[1]["reason"] == "replay" and all(a["actor"] for a in offline)
        assert not any("token" in a for a in offline)
        # the server never heard from the sidecar itself
        assert not [a for a in audit["items"] if a.get("channel") != "offline"]
    finally:
        dep.sidecar.stop()
        cleanup(dep.socket.parent)


def test_the_offline_endpoint_needs_an_api_key_and_a_request_file(license_server):
    url = license_server.url + "/v1/activate/offline"
    assert requests.post(url, json={}, timeout=10).status_code == 401
    bad = license_server.api("POST", "/v1/activate/offline", {"layerlock": "offline-response", "v": 1, "request": {}})
    assert bad.status_code == 400 and "offline activation request" in bad.json()["message"]
