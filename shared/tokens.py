"""The license token: an EdDSA (Ed25519) JWT that carries the wrapped data key.

Verification is deliberately narrow.  The algorithm allow-list is ``["EdDSA"]`` and nothing
else, the key is chosen only by ``kid`` from keys the verifier pinned at enrollment (never from
the token's own header: no ``jwk``/``jku`` honoured), every claim below is required, and the
subject, model and audience must equal what the caller expects.  ``alg: none``, HS256 signed with
a public key as the secret, an unknown ``kid`` and a flipped bit all fail the same way: as a
:class:`~layerlock.shared.errors.TokenError` that says which check failed, never echoing the token.

Key endorsement: a signing-key rotation makes the outgoing key sign a small EdDSA JWS naming the
incoming key (:func:`sign_endorsement`), published as the extra ``llk_endorsement`` member of the
new key's JWKS entry.  :func:`extend_pinned` lets a verifier trust a new key only through such
a chain that starts at a key it already pinned, so rotation needs no re-enrollment and the JWKS
fetch itself never has to be trusted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.errors import LayerlockError, TokenError
from layerlock.shared.keys import b64u_decode, b64u_encode, ed25519_public, jwk_thumbprint

ALGORITHMS = ["EdDSA"]
DEFAULT_ISSUER = "layerlock"
AUDIENCE = "layerlock-verifier"
DEFAULT_LEEWAY_S = 60
MAX_TOKEN_LEN = 65536  # wk: the data key (hybrid suite: ~1.6 KB sealed) + up to 32 KiB of fingerprint values
ENDORSEMENT_TYP = "llk-endorse+jwt"
ENDORSEMENT_MEMBER = "llk_endorsement"
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
    wk: str = field(repr=False)  # sealed to one machine, yet no reason to print it
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


def jwks(public_keys: list[ed25519.Ed25519PublicKey],
         endorsements: Mapping[str, str] | None = None) -> dict[str, list[dict[str, str]]]:
    """A JWKS document (RFC 7517) of the given signing keys.

    ``endorsements`` (kid → JWS) go into the matching entries as ``llk_endorsement``; JWKS
    consumers ignore members they do not know, so the document stays a plain JWKS.
    """
    out = []
    for key in public_keys:
        jwk = public_jwk(key)
        if endorsements and jwk["kid"] in endorsements:
            jwk[ENDORSEMENT_MEMBER] = endorsements[jwk["kid"]]
        out.append(jwk)
    return {"keys": out}


def sign_endorsement(endorser: ed25519.Ed25519PrivateKey, new_key: ed25519.Ed25519PublicKey, *,
                     now: float | None = None) -> str:
    """The outgoing signing key vouches for ``new_key``: a compact EdDSA JWS over its kid and x."""
    payload = {"endorses": jwk_thumbprint(new_key), "x": b64u_encode(new_key.public_bytes_raw()),
               "iat": int(time.time() if now is None else now)}
    return jwt.encode(payload, endorser, algorithm="EdDSA",
                      headers={"kid": jwk_thumbprint(endorser.public_key()), "typ": ENDORSEMENT_TYP})


def _endorsed(endorsement: object, kid: str, x: str, trusted: Mapping[str, ed25519.Ed25519PublicKey]) -> bool:
    """Whether ``endorsement`` is a valid JWS by a ``trusted`` key naming exactly (kid, x)."""
    if not isinstance(endorsement, str) or len(endorsement) > 4096 or endorsement.count(".") != 2:
        return False
    try:
        header = jwt.get_unverified_header(endorsement)
        signer = header.get("kid")
        if header.get("alg") not in ALGORITHMS or header.get("typ") != ENDORSEMENT_TYP or \
                not isinstance(signer, str) or signer not in trusted:
            return False
        options: Any = {"require": ["endorses", "x", "iat"], "verify_exp": False, "verify_nbf": False,
                        "verify_iat": False}
        payload = jwt.decode(endorsement, trusted[signer], algorithms=ALGORITHMS, options=options)
    except jwt.PyJWTError:
        return False
    return payload.get("endorses") == kid and payload.get("x") == x


def extend_pinned(pinned: Mapping[str, ed25519.Ed25519PublicKey],
                  document: Mapping[str, Any]) -> dict[str, ed25519.Ed25519PublicKey]:
    """``pinned`` plus every key of the JWKS ``document`` endorsed, through a chain of any length
    and in any order, by an already-trusted key.  Malformed, unendorsed or wrongly endorsed
    entries are skipped, never trusted, and never make the whole document fail."""
    trusted = dict(pinned)
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        return trusted
    candidates: dict[str, tuple[str, ed25519.Ed25519PublicKey, object]] = {}
    for jwk in entries:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        x = jwk.get("x")
        if not isinstance(x, str):
            continue
        try:
            key = ed25519_public(b64u_decode(x, field="jwk.x"), field="jwk.x")
        except LayerlockError:
            continue
        kid = jwk_thumbprint(key)
        if jwk.get("kid") == kid:
            candidates[kid] = (x, key, jwk.get(ENDORSEMENT_MEMBER))
    grew = True
    while grew:
        grew = False
        for kid, (x, key, endorsement) in candidates.items():
            if kid not in trusted and _endorsed(endorsement, kid, x, trusted):
                trusted[kid] = key
                grew = True
    return trusted


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


def sign_token(claims: LicenseClaims, private_key: ed25519.Ed25519PrivateKey, *, kid: str | None = None) -> str:
    """``kid``: the key's RFC 7638 thumbprint if the caller already knows it (the server does)."""
    kid = kid or jwk_thumbprint(private_key.public_key())
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
