"""Family licenses against a real server: each version rule, a lapsed `maintain` license, a retired version."""

from __future__ import annotations

import json
import os
import time

import jwt
from click.testing import CliRunner
from ls_helpers import activate, new_machine, register

from layerlock.license_server.cli import main as layerlock_main
from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.wrap import seal_for_server
from tests.conftest import wait_for


def _family(server, versions: dict[str, int]) -> str:
    """A fresh family with one registered model per version (released at the given times)."""
    family = f"fam{os.urandom(3).hex()}"
    intake = x25519_public(b64u_decode(server.intake_pub))
    for version, released in versions.items():
        model_id = f"{family}-{version}"
        resp = server.api("POST", "/v1/models", {
            "model_id": model_id, "family": family, "version": version, "released_at": released,
            "sealed_key": seal_for_server(os.urandom(32), intake, model_id)})
        assert resp.status_code == 201 and resp.json()["family"] == family, resp.text
    return family


def _license(server, m, family: str, **terms) -> dict:
    when = {} if "expires_at" in terms else {"days": 30}
    resp = server.api("POST", "/v1/licenses", {"machine": m.code, "family": family, **when, **terms})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _outcome(server, m, model_id: str) -> str:
    resp = activate(server, m, model_id)
    return "granted" if resp.status_code == 200 else resp.json()["error"]


def test_all_max_and_a_retired_version(server):
    now = int(time.time())
    family = _family(server, {"1": now - 300, "2": now - 200, "2.10": now - 100, "3": now - 50})
    every, upto = new_machine(), new_machine()
    for m in (every, upto):
        register(server, m)
    lic = _license(server, every, family)
    assert (lic["family"], lic["versions"], lic["model"]) == (family, "all", "")
    _license(server, upto, family, versions="max", max_version="2.9")
    for version, want_every, want_upto in (("1", "granted", "granted"), ("2", "granted", "granted"),
                                           ("2.10", "granted", "not_entitled"), ("3", "granted", "not_entitled")):
        assert _outcome(server, every, f"{family}-{version}") == want_every, version
        assert _outcome(server, upto, f"{family}-{version}") == want_upto, version
    assert server.api("POST", f"/v1/models/{family}-2/retire").status_code == 200
    assert _outcome(server, every, f"{family}-2") == "unknown_model"  # retired: refused whatever the license
    assert _outcome(server, every, f"{family}-1") == "granted"
    denied = server.api("GET", "/v1/audit", params={"machine": upto.code, "reason": "not_entitled"}).json()["items"]
    assert len(denied) == 2  # a principal's refusal: audited


def test_maintain_keeps_the_versions_released_before_expiry_after_it(server):
    now = int(time.time())
    family = _family(server, {"1": now - 3600, "2": now + 5})  # version 2 "released" after the license ends
    m = new_machine()
    register(server, m)
    lic = _license(server, m, family, versions="maintain", expires_at=now + 5, offline_grace=600)
    assert _outcome(server, m, f"{family}-1") == "granted"
    assert _outcome(server, m, f"{family}-2") == "not_entitled"  # released at/after the expiry
    grants = []

    def lapsed() -> bool:  # until the license lapses, its expiry caps the token
        grants.append(activate(server, m, f"{family}-1"))
        assert grants[-1].status_code == 200, grants[-1].text  # what was paid for stays usable ...
        return jwt.decode(grants[-1].json()["token"], options={"verify_signature": False})["exp"] > lic["expires_at"]

    assert wait_for(lapsed, timeout=15, step=0.5)
    claims = jwt.decode(grants[-1].json()["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600 and claims["lic"] == lic["license_id"]  # ... tokens not capped
    assert server.api("POST", f"/v1/licenses/{lic['license_id']}/revoke", {}).status_code == 200
    assert _outcome(server, m, f"{family}-1") == "revoked"  # revocation still ends it


def test_models_add_with_family_and_version_through_the_cli(server, tmp_path):
    family = f"cli{os.urandom(3).hex()}"
    sealed = tmp_path / "m.key.sealed"
    intake = x25519_public(b64u_decode(server.intake_pub))
    sealed.write_text(json.dumps(seal_for_server(os.urandom(32), intake, f"{family}-4")))
    auth = ["--server", server.url, "--api-key", server.admin_key]
    out = CliRunner().invoke(layerlock_main, ["models", "add", str(sealed), "--family", family, "--version", "4",
                                              "--json", *auth])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.output)
    assert (rec["model_id"], rec["family"], rec["version"]) == (f"{family}-4", family, "4")
    m = new_machine()
    register(server, m)
    out = CliRunner().invoke(layerlock_main, ["licenses", "issue", "--machine", m.code, "--family", family,
                                              "--max-version", "4", "--days", "3", "--json", *auth])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["versions"] == "max"
    assert _outcome(server, m, f"{family}-4") == "granted"
