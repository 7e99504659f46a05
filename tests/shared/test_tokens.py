"""License token: round trip and the classic JWT attacks, each rejected with a precise reason."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.errors import TokenError
from layerlock.shared.keys import jwk_thumbprint
from layerlock.shared.tokens import (
    AUDIENCE,
    MAX_TOKEN_LEN,
    LicenseClaims,
    jwks,
    parse_jwks,
    sign_token,
    verify_token,
)

MACHINE = "LLK-S0QXV-GBENN-A5THD-M288J-U"


def _claims(**over: object) -> LicenseClaims:
    now = int(time.time())
    base = dict(iss="layerlock", aud=AUDIENCE, sub=MACHINE, lic="lic_1", mdl="model-a", iat=now, nbf=now,
                exp=now + 600, jti="j1", wk="AAAA", suite="X25519-SHA256-AES256GCM", rna=now + 400)
    base.update(over)
    return LicenseClaims(**base)  # type: ignore[arg-type]


@pytest.fixture()
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture()
def pinned(key: ed25519.Ed25519PrivateKey) -> dict[str, ed25519.Ed25519PublicKey]:
    return parse_jwks(jwks([key.public_key()]))


def test_round_trip(key, pinned):
    claims = _claims()
    token = sign_token(claims, key)
    assert jwt.get_unverified_header(token)["kid"] == jwk_thumbprint(key.public_key())
    assert verify_token(token, pinned, machine_code=MACHINE, model_id="model-a") == claims


def test_kid_is_rfc7638_thumbprint():
    # RFC 8037 appendix A.3 gives the thumbprint of its example Ed25519 key.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    pub = ed25519.Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))
    assert jwk_thumbprint(pub) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return ".".join([enc(json.dumps(header).encode()), enc(json.dumps(payload).encode()), enc(signature)])


def test_alg_none_rejected(key, pinned):
    token = _forge({"alg": "none", "kid": jwk_thumbprint(key.public_key())}, _claims().to_dict())
    with pytest.raises(TokenError, match="not allowed"):
        verify_token(token, pinned, machine_code=MACHINE)


def test_hs256_with_public_key_as_secret_rejected(key, pinned):
    pub_raw = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    import hashlib
    import hmac  # noqa: E401
    header = {"alg": "HS256", "kid": jwk_thumbprint(key.public_key()), "typ": "JWT"}
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    signing_input = enc(json.dumps(header).encode()) + "." + enc(json.dumps(_claims().to_dict()).encode())
    sig = hmac.new(pub_raw, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(TokenError, match="not allowed"):
        verify_token(signing_input + "." + enc(sig), pinned, machine_code=MACHINE)


def test_unknown_kid_rejected(pinned):
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(TokenError, match="not pinned"):
        verify_token(sign_token(_claims(), other), pinned, machine_code=MACHINE)


def test_kid_of_pinned_key_but_signed_by_another_rejected(key, pinned):
    other = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(_claims().to_dict(), other, algorithm="EdDSA", headers={"kid": jwk_thumbprint(key.public_key())})
    with pytest.raises(TokenError, match="signature"):
        verify_token(token, pinned, machine_code=MACHINE)


@pytest.mark.parametrize("field,value,match", [
    ("aud", "someone-else", "audience"),
    ("iss", "evil", "issuer"),
    ("sub", "LLK-00000-00000-00000-00000-0", "another machine"),
    ("mdl", "model-b", "another model"),
])
def test_wrong_binding_rejected(key, pinned, field, value, match):
    with pytest.raises(TokenError, match=match):
        verify_token(sign_token(_claims(**{field: value}), key), pinned, machine_code=MACHINE, model_id="model-a")


def test_expired_and_not_yet_valid(key, pinned):
    now = int(time.time())
    expired = sign_token(_claims(iat=now - 1000, nbf=now - 1000, exp=now - 100), key)
    with pytest.raises(TokenError, match="expired") as info:
        verify_token(expired, pinned, machine_code=MACHINE, leeway=10)
    assert info.value.code == "token_expired"
    future = sign_token(_claims(nbf=now + 1000, exp=now + 2000), key)
    with pytest.raises(TokenError, match="not valid yet"):
        verify_token(future, pinned, machine_code=MACHINE, leeway=10)
    # Within leeway: accepted (clock skew between server and host).
    skewed = sign_token(_claims(nbf=now + 5), key)
    assert verify_token(skewed, pinned, machine_code=MACHINE, leeway=10).nbf == now + 5


def test_bit_flipped_signature_rejected(key, pinned):
    token = sign_token(_claims(), key)
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 0x01
    flipped = ".".join([head, body, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()])
    with pytest.raises(TokenError, match="signature"):
        verify_token(flipped, pinned, machine_code=MACHINE)


def test_missing_claim_rejected(key, pinned):
    payload = _claims().to_dict()
    del payload["wk"]
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": jwk_thumbprint(key.public_key())})
    with pytest.raises(TokenError, match="'wk'"):
        verify_token(token, pinned, machine_code=MACHINE)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b", "a.b.c", "....", 42])
def test_garbage_rejected(pinned, garbage):
    with pytest.raises(TokenError):
        verify_token(garbage, pinned, machine_code=MACHINE)  # type: ignore[arg-type]


def test_jwks_rejects_mislabelled_kid(key):
    doc = jwks([key.public_key()])
    doc["keys"][0]["kid"] = "not-the-thumbprint"
    with pytest.raises(TokenError, match="thumbprint"):
        parse_jwks(doc)
    with pytest.raises(TokenError):
        parse_jwks({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]})
    with pytest.raises(TokenError):
        parse_jwks({})


def test_oversized_and_mistyped_claims_rejected(key, pinned):
    with pytest.raises(TokenError, match="compact JWS"):
        verify_token("a" * (MAX_TOKEN_LEN + 1) + ".b.c", pinned, machine_code=MACHINE)
    payload = _claims().to_dict()
    payload["wk"] = 12345
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": jwk_thumbprint(key.public_key())})
    with pytest.raises(TokenError, match="'wk' must be a string"):
        verify_token(token, pinned, machine_code=MACHINE)


# --- key endorsement (signing-key rotation without re-enrollment) ------------------------------

def _rotated(endorser: ed25519.Ed25519PrivateKey, **jws_over: object) -> tuple[ed25519.Ed25519PrivateKey, dict]:
    """A new key and its JWKS entry carrying ``endorser``'s endorsement."""
    from layerlock.shared.tokens import public_jwk, sign_endorsement

    new = ed25519.Ed25519PrivateKey.generate()
    entry = public_jwk(new.public_key())
    entry["llk_endorsement"] = sign_endorsement(endorser, new.public_key())
    entry.update(jws_over)  # type: ignore[arg-type]
    return new, entry


def test_endorsement_chain_of_two_rotations_accepted_in_any_order(key, pinned):
    from layerlock.shared.tokens import extend_pinned

    k1, e1 = _rotated(key)
    k2, e2 = _rotated(k1)
    doc = {"keys": [e2, e1]}  # the newest first: the chain resolves regardless of order
    extended = extend_pinned(pinned, doc)
    assert set(extended) == set(pinned) | {e1["kid"], e2["kid"]}
    assert pinned == parse_jwks(jwks([key.public_key()]))  # the input is not mutated
    token = sign_token(_claims(), k2)
    assert verify_token(token, extended, machine_code=MACHINE, model_id="model-a").lic == "lic_1"


def test_endorsement_by_unpinned_key_ignored(pinned):
    from layerlock.shared.tokens import extend_pinned

    stranger = ed25519.Ed25519PrivateKey.generate()
    _, entry = _rotated(stranger)
    # even with the stranger itself listed (unendorsed) in the document
    assert extend_pinned(pinned, {"keys": [jwks([stranger.public_key()])["keys"][0], entry]}) == pinned


def test_tampered_endorsement_ignored(key, pinned):
    from layerlock.shared.tokens import extend_pinned

    _, entry = _rotated(key)
    head, body, sig = entry["llk_endorsement"].split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert extend_pinned(pinned, {"keys": [{**entry, "llk_endorsement": f"{head}.{body}.{flipped}"}]}) == pinned
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged = _forge(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))),
                    {**payload, "iat": payload["iat"] + 1}, base64.urlsafe_b64decode(sig + "=="))
    assert extend_pinned(pinned, {"keys": [{**entry, "llk_endorsement": forged}]}) == pinned


def test_endorsement_for_a_different_key_ignored(key, pinned):
    from layerlock.shared.tokens import extend_pinned

    _, endorsed = _rotated(key)
    other = ed25519.Ed25519PrivateKey.generate()
    entry = {**jwks([other.public_key()])["keys"][0], "llk_endorsement": endorsed["llk_endorsement"]}
    assert extend_pinned(pinned, {"keys": [entry]}) == pinned
    # an endorsement whose x names another key than its endorses kid is no good either
    from layerlock.shared.tokens import sign_endorsement

    jws = sign_endorsement(key, other.public_key())
    head, body, _ = jws.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    mixed = jwt.encode({**payload, "endorses": endorsed["kid"]}, key, algorithm="EdDSA",
                       headers={"kid": jwk_thumbprint(key.public_key()), "typ": "llk-endorse+jwt"})
    assert extend_pinned(pinned, {"keys": [{**endorsed, "llk_endorsement": mixed}]}) == pinned


def test_alg_none_and_hs256_endorsements_ignored(key, pinned):
    from layerlock.shared.tokens import extend_pinned

    new = ed25519.Ed25519PrivateKey.generate()
    entry = jwks([new.public_key()])["keys"][0]
    payload = {"endorses": entry["kid"], "x": entry["x"], "iat": int(time.time())}
    header = {"kid": jwk_thumbprint(key.public_key()), "typ": "llk-endorse+jwt"}
    none = _forge({**header, "alg": "none"}, payload)
    secret = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    hs = jwt.api_jws.PyJWS().encode(json.dumps(payload).encode(), key=secret, algorithm="HS256", headers=header)
    for jws in (none, hs):
        assert extend_pinned(pinned, {"keys": [{**entry, "llk_endorsement": jws}]}) == pinned


def test_extend_pinned_skips_malformed_entries(key, pinned):
    from layerlock.shared.tokens import extend_pinned

    _, good = _rotated(key)
    doc = {"keys": ["junk", {"kty": "RSA"}, {"kty": "OKP", "crv": "Ed25519", "x": "!!"},
                    {**good, "kid": "not-the-thumbprint"}, good]}
    assert set(extend_pinned(pinned, doc)) == set(pinned) | {good["kid"]}
    assert extend_pinned(pinned, {"nokeys": 1}) == pinned
