"""``/v1/models/<id>/fingerprint`` and ``/trace`` on a real server: who may call them, what they
reveal (never the key or the real values), precise 4xx on malformed input with nothing written,
the audit record of a trace, and the fingerprint values in ``wk`` of an activation."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from ls_helpers import activate, issue, new_machine, register, snapshot

from layerlock.license_server.store import P
from layerlock.shared.fingerprint import Secret, chips, extract, license_values
from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.lockfile import protect
from layerlock.shared.selection import LockPolicy
from layerlock.shared.tokens import verify_token
from layerlock.shared.wrap import MachineKemKeys, binding_info, open_sealed, seal_for_server


@pytest.fixture(scope="module")
def fingerprinted(server, tmp_path_factory):
    """A fingerprinted model registered on the module's server: (model id, secret, original tensors)."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("fp")
    rng = np.random.default_rng(3)
    tensors = {"a.weight": rng.standard_normal((64, 48)).astype(np.float32),
               "a.bias": rng.standard_normal(64).astype(np.float32),
               "b.weight": rng.standard_normal((10, 64)).astype(np.float32)}
    save_file(tensors, str(root / "m.safetensors"))
    res = protect(root / "m.safetensors", root / "out", model_id="fp-model", policy=LockPolicy(fingerprint=True))
    assert res.fingerprint is not None
    doc = seal_for_server(res.data_key, x25519_public(b64u_decode(server.intake_pub)), "fp-model", res.fingerprint)
    resp = server.api("POST", "/v1/models", {"model_id": "fp-model", "sealed_key": doc})
    assert resp.status_code == 201, resp.text
    assert resp.json()["fingerprint_positions"] == res.fingerprint_positions > 0
    return "fp-model", Secret.from_bytes(res.fingerprint), tensors


def _b64(values: np.ndarray) -> str:
    return base64.urlsafe_b64encode(values.astype("<f4").tobytes()).rstrip(b"=").decode()


def test_activation_carries_this_licenses_values(server, fingerprinted):
    model_id, secret, _ = fingerprinted
    m = new_machine()
    register(server, m)
    lic = issue(server, m, model_id)
    resp = activate(server, m, model_id)
    assert resp.status_code == 200, resp.text
    claims = verify_token(resp.json()["token"], _jwks(server), machine_code=m.code, model_id=model_id,
                          issuer="layerlock", leeway=60)
    unlock = open_sealed(claims.wrapped_key, MachineKemKeys(m.kx).private_for(claims.suite), claims.suite,
                         binding_info(lic["license_id"], m.code, model_id))
    assert unlock[32:] == license_values(secret, lic["license_id"])  # exactly this license's values
    assert unlock[32:] != b"".join(s.original for s in secret.sites)


def test_public_layout_reveals_neither_key_nor_values(server, fingerprinted):
    model_id, secret, _ = fingerprinted
    resp = server.api("GET", f"/v1/models/{model_id}/fingerprint")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["positions"] == secret.n and set(doc) == {"model_id", "positions", "sites"}
    text = json.dumps(doc)
    assert "original" not in text and "key" not in doc
    assert base64.urlsafe_b64encode(secret.key).rstrip(b"=").decode() not in text


def test_roles(server, fingerprinted):
    model_id, secret, _ = fingerprinted
    operator = server.api("POST", "/v1/keys", {"role": "operator"}).json()["api_key"]
    auditor = server.api("POST", "/v1/keys", {"role": "auditor"}).json()["api_key"]
    body = {"suspect": "x.safetensors", "values": [_b64(np.zeros(secret.n))]}
    assert server.api("GET", f"/v1/models/{model_id}/fingerprint", key=operator).status_code == 403
    assert server.api("POST", f"/v1/models/{model_id}/trace", body, key=operator).status_code == 403
    assert server.api("POST", f"/v1/models/{model_id}/trace", body, key="").status_code == 401
    assert server.api("POST", f"/v1/models/{model_id}/trace", body, key=auditor).status_code == 200


def test_trace_names_the_license_and_is_audited(server, fingerprinted):
    model_id, secret, tensors = fingerprinted
    m = new_machine()
    register(server, m)
    lic = issue(server, m, model_id)["license_id"]
    copy = {k: v.copy() for k, v in tensors.items()}
    values = license_values(secret, lic)
    pos = 0
    for site in secret.sites:
        k = len(site.index)
        copy[site.tensor].ravel()[site.index] = np.frombuffer(values[4 * pos:4 * (pos + k)], "<f4")
        pos += k
    candidates = extract(secret.public(), copy)
    resp = server.api("POST", f"/v1/models/{model_id}/trace",
                      {"suspect": "leak.safetensors", "sha256": "ab" * 32, "values": [_b64(c) for c in candidates]})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["named"] == [lic] and doc["traced"] and doc["ranking"][0]["license_id"] == lic
    assert doc["ranking"][0]["score"] >= doc["threshold"] > 8
    assert doc["ranking"][0]["false_positive_bound"] < 1e-9
    assert len(doc["ranking"]) == 1  # only named licenses have their score shown
    # the original (no fingerprint): nobody
    clean = server.api("POST", f"/v1/models/{model_id}/trace",
                       {"suspect": "orig", "values": [_b64(c) for c in extract(secret.public(), tensors)]}).json()
    assert clean["named"] == [] and not clean["traced"] and clean["ranking"] == []
    records = server.api("GET", "/v1/audit", params={"type": "model_traced"}).json()["items"]
    mine = [r for r in records if r.get("suspect") == "leak.safetensors"]
    assert mine and mine[-1]["named"] == [lic] and mine[-1]["sha256"] == "ab" * 32 and mine[-1]["actor"]
    assert np.isclose(chips(secret.key, model_id, lic, secret.n).sum(), 0, atol=6 * np.sqrt(secret.n))


@pytest.mark.parametrize("body, fragment", [
    ({"values": []}, "missing field(s): suspect"),
    ({"suspect": "", "values": ["AAAA"]}, "suspect must be"),
    ({"suspect": "s", "values": []}, "values must be a list of 1 to 2"),
    ({"suspect": "s", "values": ["AAAA", "AAAA", "AAAA"]}, "values must be a list of 1 to 2"),
    ({"suspect": "s", "values": ["AAAA"]}, "values[0] must be base64url of"),
    ({"suspect": "s", "values": ["%%%"]}, "values[0] must be base64url of"),
    ({"suspect": "s", "values": [5]}, "values[0] must be base64url of"),
    ({"suspect": "s", "sha256": "XYZ", "values": ["AAAA"]}, "sha256 must be 64"),
    ({"suspect": "s", "values": ["AAAA"], "extra": 1}, "unknown field(s): extra"),
])
def test_malformed_trace_requests_are_400_and_write_nothing(server, fingerprinted, body, fragment):
    model_id, _, _ = fingerprinted
    before = snapshot(server.redis())
    resp = server.api("POST", f"/v1/models/{model_id}/trace", body)
    assert resp.status_code == 400 and fragment in resp.json()["message"], resp.text
    assert snapshot(server.redis()) == before


def test_unknown_or_unfingerprinted_model_is_404(server):
    from ls_helpers import add_model

    plain, _ = add_model(server)
    body = {"suspect": "s", "values": ["AAAA"]}
    for model in (plain, "no-such-model"):
        assert server.api("GET", f"/v1/models/{model}/fingerprint").status_code == 404
        assert server.api("POST", f"/v1/models/{model}/trace", body).status_code == 404


def _jwks(server):
    from layerlock.shared.tokens import parse_jwks

    return parse_jwks(server.api("GET", "/.well-known/jwks.json").json())


def test_model_registration_has_its_own_body_cap(server):
    """A fingerprinted model's sealed secret is MiBs: /v1/models takes up to max_model_body_bytes,
    every other route stays at max_body_bytes (64 KiB)."""
    big = {"model_id": "big-body", "sealed_key": {"v": 1, "pad": "x" * 200_000}}
    resp = server.api("POST", "/v1/models", big)
    assert resp.status_code == 400 and resp.json()["error"] != "payload_too_large", resp.text  # read, then judged
    resp = server.api("POST", "/v1/licenses", {"machine": "x" * 200_000})
    assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
    huge = {"model_id": "huge-body", "sealed_key": {"pad": "x" * (17 * 1024 * 1024)}}
    assert server.api("POST", "/v1/models", huge, timeout=60).status_code == 413


def test_kek_rotation_reseals_the_fingerprint_secret(server, fingerprinted):
    model_id, secret, _ = fingerprinted
    r = server.redis()
    before = r.get(f"{P}model:{model_id}:fp")
    assert before and r.hget(f"{P}model:{model_id}", "fp_positions") == str(secret.n)
    rot = server.api("POST", "/v1/keys/rotate-kek")
    assert rot.status_code == 200, rot.text
    after = r.get(f"{P}model:{model_id}:fp")
    assert after != before and r.hget(f"{P}model:{model_id}", "kek_id") == rot.json()["kek_id"]
    m = new_machine()
    register(server, m)
    lic = issue(server, m, model_id)["license_id"]
    resp = activate(server, m, model_id)
    assert resp.status_code == 200, resp.text
    claims = verify_token(resp.json()["token"], _jwks(server), machine_code=m.code, model_id=model_id,
                          issuer="layerlock", leeway=60)
    unlock = open_sealed(claims.wrapped_key, MachineKemKeys(m.kx).private_for(claims.suite), claims.suite,
                         binding_info(lic, m.code, model_id))
    assert unlock[32:] == license_values(secret, lic)
