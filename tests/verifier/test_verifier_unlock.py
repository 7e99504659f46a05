"""Token acceptance: only a token for this machine, this model, from the pinned key, unexpired,
whose ``wk`` opens with this machine's key, yields a data key."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from verifier_helpers import DATA_KEY

from layerlock.shared.errors import TokenError, WrapError
from layerlock.verifier.unlock import accept_token, restore_model


def accept(machine, token, model="model-a"):
    return accept_token(token, keys=machine.state.load_jwks(), kem=machine.state.load_keys().kem,
                        machine_code=machine.code, model_id=model, issuer="layerlock", leeway=5)


def test_good_token(machine):
    claims, key = accept(machine, machine.token("model-a"))
    assert key == DATA_KEY and claims.sub == machine.code and claims.mdl == "model-a"


@pytest.mark.parametrize("kind, match", [
    ("other_signer", "not pinned"),
    ("other_machine", "another machine"),
    ("other_model", "another model"),
    ("expired", "expired"),
    ("not_yet", "not valid yet"),
    ("issuer", "issuer"),
    ("audience", "audience"),
])
def test_bad_tokens(machine, kind, match):
    now = int(time.time())
    token = {
        "other_signer": lambda: machine.token(signer=ed25519.Ed25519PrivateKey.generate()),
        "other_machine": lambda: machine.token(machine="LLK-S0QXV-GBENN-A5THD-M288J-U"),
        "other_model": lambda: machine.token("model-b"),
        "expired": lambda: machine.token(exp=now - 120, iat=now - 300, nbf=now - 300),
        "not_yet": lambda: machine.token(nbf=now + 300),
        "issuer": lambda: machine.token(iss="evil"),
        "audience": lambda: machine.token(aud="someone-else"),
    }[kind]()
    with pytest.raises(TokenError, match=match):
        accept(machine, token)


def test_wk_for_another_machine_key_does_not_open(machine):
    token = machine.token(kex_pub=x25519.X25519PrivateKey.generate().public_key())
    with pytest.raises(WrapError):
        accept(machine, token)


def test_wk_bound_to_another_model_does_not_open(machine):
    with pytest.raises(WrapError):
        accept(machine, machine.token("model-a", binding_model="model-b"))


def test_wk_bound_to_another_license_does_not_open(machine):
    token = machine.token("model-a", lic="lic_1")
    # re-sign the same wk under another license id: the binding no longer matches
    import jwt
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = machine.token("model-a", lic="lic_2", wk=claims["wk"])
    with pytest.raises(WrapError):
        accept(machine, forged)


def test_restore_model_into_memfd_is_bit_exact(protected):
    model = restore_model("model-a", protected.locked, protected.bundle, DATA_KEY)
    fd = model.open_readonly()
    try:
        import os
        assert os.pread(fd, model.size + 1, 0) == protected.original.read_bytes()
        assert model.format == "safetensors"
    finally:
        os.close(fd)
        model.drop()


def test_restore_with_wrong_key_refused(protected):
    from layerlock.shared.errors import LockError

    with pytest.raises(LockError):
        restore_model("model-a", protected.locked, protected.bundle, bytes(32))
    with pytest.raises(WrapError, match="belongs to model"):
        restore_model("model-b", protected.locked, protected.bundle, DATA_KEY)


def test_hybrid_pq_suite_opens_with_the_mlkem_seed(machine):
    import jwt

    from layerlock.shared.keys import b64u_encode
    from layerlock.shared.wrap import binding_info, public_for, seal

    machine.state.add_pq_key()
    keys = machine.state.load_keys()
    suite = "MLKEM768X25519-SHA256-AES256GCM"
    pub = public_for(suite, keys.kem.x25519.public_key(), keys.kem.mlkem768.public_key())
    wk = seal(DATA_KEY, pub, suite, binding_info("lic_pq", machine.code, "model-a"))
    token = machine.token("model-a", lic="lic_pq", wk=b64u_encode(wk), suite=suite)
    claims, key = accept(machine, token)
    assert key == DATA_KEY and claims.suite == suite
    # the same token on a machine without the ML-KEM key cannot open it
    machine.state.pq_key.unlink()
    with pytest.raises(WrapError):
        accept(machine, token)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
