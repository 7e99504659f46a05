"""The air-gapped exchange on the site's side: the request file, and what `import` accepts."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from verifier_helpers import FakeServer, write_config

from layerlock.shared.activation import parse_request, verify_signature
from layerlock.shared.errors import LayerlockError
from layerlock.shared.keys import jwk_thumbprint
from layerlock.shared.tokens import jwks, sign_endorsement
from layerlock.verifier.config import load_config
from layerlock.verifier.daemon import Daemon
from layerlock.verifier.offline import import_response, write_request
from tests.conftest import wait_for


def _request(machine, tmp_path, model="model-a"):
    out = tmp_path / f"{model}-{len(list(tmp_path.iterdir()))}.llr"
    return write_request(machine.state, model, out), out


def _response(site, tmp_path, request, *, model="model-a", **over) -> object:
    token = site.token(model, jti=request["request"]["nonce"], **over)
    path = tmp_path / "resp.llt"
    path.write_text(json.dumps({"layerlock": "offline-response", "v": 1, "machine": site.code, "model": model,
                                "token": token}))
    return path


def test_the_request_is_the_signed_activation_request(machine, tmp_path):
    doc, path = _request(machine, tmp_path)
    on_disk = json.loads(path.read_text())
    assert on_disk == doc and (on_disk["layerlock"], on_disk["v"]) == ("offline-request", 1)
    req = parse_request(on_disk["request"])
    verify_signature(req, machine.state.load_keys().sign.public_key())
    assert req.machine == machine.code and req.model == "model-a"
    with pytest.raises(LayerlockError, match="exists"):
        write_request(machine.state, "model-a", path)


def test_import_accepts_the_answer_to_the_latest_request_once(machine, tmp_path):
    first, _ = _request(machine, tmp_path)
    latest, _ = _request(machine, tmp_path)  # a newer request supersedes the first
    with pytest.raises(LayerlockError, match="answers another request"):
        import_response(machine.state, _response(machine, tmp_path, first))
    claims = import_response(machine.state, _response(machine, tmp_path, latest))
    assert claims.jti == latest["request"]["nonce"] and claims.sub == machine.code
    assert machine.state.load_token("model-a")
    with pytest.raises(LayerlockError, match="no pending request"):
        import_response(machine.state, _response(machine, tmp_path, latest))


@pytest.mark.parametrize("forgery, match", [
    ("other_signer", "not pinned"), ("other_machine", "another machine"), ("other_model", "another model"),
    ("expired", "expired"),
])
def test_import_checks_the_token_like_an_online_one(machine, tmp_path, forgery, match):
    req, _ = _request(machine, tmp_path)
    over = {"other_signer": {"signer": ed25519.Ed25519PrivateKey.generate()},
            "other_machine": {"machine": "LLK-OTHER"},
            "other_model": {"binding_model": "model-b", "mdl": "model-b"},
            "expired": {"ttl": -120}}[forgery]
    with pytest.raises(LayerlockError, match=match):
        import_response(machine.state, _response(machine, tmp_path, req, **over))
    assert machine.state.load_token("model-a") is None and machine.state.load_request("model-a")


def test_import_pins_a_rotated_key_only_through_an_endorsement(machine, tmp_path):
    req, _ = _request(machine, tmp_path)
    new_key = ed25519.Ed25519PrivateKey.generate()
    path = _response(machine, tmp_path, req, signer=new_key)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "jwks": jwks([new_key.public_key()])}))  # unendorsed: refused
    with pytest.raises(LayerlockError, match="not pinned"):
        import_response(machine.state, path)
    endorsed = jwks([machine.server_key.public_key(), new_key.public_key()],
                    {jwk_thumbprint(new_key.public_key()): sign_endorsement(machine.server_key, new_key.public_key())})
    path.write_text(json.dumps({**doc, "jwks": endorsed}))
    import_response(machine.state, path)
    assert len(machine.state.load_jwks()) == 2


def test_a_running_offline_daemon_unlocks_with_an_import_and_takes_a_renewal(tmp_path, machine, protected):
    cfg = load_config(write_config(tmp_path / "v.toml", machine, [protected]))
    down = FakeServer(machine)
    down.mode = "down"
    d = Daemon(cfg, machine.state, down)
    d.start()
    try:
        assert d.wait_settled(10) and d.status()["models"][0]["reason"] == "server_unreachable"
        req, _ = _request(machine, tmp_path)
        import_response(machine.state, _response(machine, tmp_path, req, ttl=120))
        assert wait_for(lambda: d.status()["models"][0]["state"] == "unlocked", timeout=8)
        exp = d.status()["models"][0]["expires_at"]
        renewal, _ = _request(machine, tmp_path)  # the renewal is the same exchange
        import_response(machine.state, _response(machine, tmp_path, renewal, ttl=600))
        assert wait_for(lambda: d.status()["models"][0]["expires_at"] > exp, timeout=8)
        assert d.status()["models"][0]["state"] == "unlocked"
    finally:
        d.stop()
