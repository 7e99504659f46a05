"""License token: round trip and the classic JWT attacks, each rejected with a precise reason."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared.errors import TokenError
from shared.keys import jwk_thumbprint
from shared.tokens import AUDIENCE, LicenseClaims, jwks, parse_jwks, sign_token, verify_token

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
        verify_token("a" * 20000 + ".b.c", pinned, machine_code=MACHINE)
    payload = _claims().to_dict()
    payload["wk"] = 12345
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": jwk_thumbprint(key.public_key())})
    with pytest.raises(TokenError, match="'wk' must be a string"):
        verify_token(token, pinned, machine_code=MACHINE)
