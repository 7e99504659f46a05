"""The license token: an EdDSA (Ed25519) JWT that carries the wrapped data key.

Verification is deliberately narrow.  The algorithm allow-list is ``["EdDSA"]`` and nothing
else, the key is chosen only by ``kid`` from keys the verifier pinned at enrollment (never from
the token's own header: no ``jwk``/``jku`` honoured), every claim below is required, and the
subject, model and audience must equal what the caller expects.  ``alg: none``, HS256 signed with
a public key as the secret, an unknown ``kid`` and a flipped bit all fail the same way: as a
:class:`~shared.errors.TokenError` that says which check failed, never echoing the token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared.errors import TokenError
from shared.keys import b64u_decode, b64u_encode, ed25519_public, jwk_thumbprint

ALGORITHMS = ["EdDSA"]
DEFAULT_ISSUER = "layerlock"
AUDIENCE = "layerlock-verifier"
DEFAULT_LEEWAY_S = 60
MAX_TOKEN_LEN = 16384  # the hybrid suite's wk is ~1.6 KB; anything far bigger is not ours
REQUIRED_CLAIMS = ["iss", "aud", "sub", "lic", "mdl", "iat", "nbf", "exp", "jti", "wk", "suite", "rna"]


@dataclass(frozen=True)
class LicenseClaims:
    """What a verified token says.  ``wk`` is the HPKE-sealed data key (base64url)."""

    iss: str
    aud: str
    sub: str  # machine code
    lic: str  # license id
    mdl: str  # model id
    iat: int
    nbf: int
    exp: int
    jti: str
    wk: str
    suite: str
    rna: int  # renew-not-after-this: the sidecar renews at about two thirds of the token's life

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def wrapped_key(self) -> bytes:
        return b64u_decode(self.wk, field="wk")


def public_jwk(public_key: ed25519.Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64u_encode(public_key.public_bytes_raw()),
            "kid": jwk_thumbprint(public_key), "alg": "EdDSA", "use": "sig"}


def jwks(public_keys: list[ed25519.Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    """A JWKS document (RFC 7517) of the given signing keys."""
    return {"keys": [public_jwk(k) for k in public_keys]}


def parse_jwks(document: Mapping[str, Any]) -> dict[str, ed25519.Ed25519PublicKey]:
    """Pinned keys by kid.  Only Ed25519 OKP keys are accepted; the kid must be their thumbprint."""
    keys = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(keys, list) or not keys:
        raise TokenError("JWKS has no 'keys' list")
    out: dict[str, ed25519.Ed25519PublicKey] = {}
    for jwk in keys:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise TokenError("JWKS holds a key that is not Ed25519 (OKP)")
        x = jwk.get("x")
        if not isinstance(x, str):
            raise TokenError("JWKS key lacks its 'x' member")
        key = ed25519_public(b64u_decode(x, field="jwk.x"), field="jwk.x")
        kid = jwk_thumbprint(key)
        if jwk.get("kid") != kid:
            raise TokenError("JWKS key's kid is not its RFC 7638 thumbprint")
        out[kid] = key
    return out


def sign_token(claims: LicenseClaims, private_key: ed25519.Ed25519PrivateKey) -> str:
    kid = jwk_thumbprint(private_key.public_key())
    return jwt.encode(claims.to_dict(), private_key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"})


def verify_token(
    token: str,
    keys: Mapping[str, ed25519.Ed25519PublicKey],
    *,
    machine_code: str,
    model_id: str | None = None,
    issuer: str = DEFAULT_ISSUER,
    audience: str = AUDIENCE,
    leeway: int = DEFAULT_LEEWAY_S,
    now: float | None = None,
    verify_exp: bool = True,
) -> LicenseClaims:
    """Verify a token against pinned keys and the expected machine/model; return its claims."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN or token.count(".") != 2:
        raise TokenError("token is not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("token header does not parse") from None
    if header.get("alg") not in ALGORITHMS:
        raise TokenError(f"token algorithm {str(header.get('alg'))[:16]!r} is not allowed (EdDSA only)")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError("token is signed by a key that is not pinned (unknown kid)")
    options: Any = {"require": REQUIRED_CLAIMS, "verify_exp": False, "verify_nbf": False,
                               "verify_iat": False}
    try:
        raw = jwt.decode(token, keys[kid], algorithms=ALGORITHMS, audience=audience, issuer=issuer,
                         options=options)
    except jwt.InvalidAudienceError:
        raise TokenError("token audience is wrong") from None
    except jwt.InvalidIssuerError:
        raise TokenError("token issuer is wrong") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"token lacks the required claim {exc.claim!r}") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"token is invalid ({type(exc).__name__})") from None
    try:
        claims = LicenseClaims(**{name: raw[name] for name in REQUIRED_CLAIMS})
    except TypeError:
        raise TokenError("token claims have the wrong shape") from None
    for name in ("iss", "aud", "sub", "lic", "mdl", "jti", "wk", "suite"):
        if not isinstance(getattr(claims, name), str):
            raise TokenError(f"token claim {name!r} must be a string")
    for name in ("iat", "nbf", "exp", "rna"):
        if not isinstance(getattr(claims, name), int) or isinstance(getattr(claims, name), bool):
            raise TokenError(f"token claim {name!r} must be an integer")
    t = time.time() if now is None else now
    if verify_exp and t > claims.exp + leeway:
        raise TokenError("token has expired", code="token_expired")
    if t + leeway < claims.nbf:
        raise TokenError("token is not valid yet (nbf in the future)")
    if claims.sub != machine_code:
        raise TokenError("token was issued to another machine")
    if model_id is not None and claims.mdl != model_id:
        raise TokenError("token was issued for another model")
    return claims
