"""The signed activation request a sidecar sends to ``POST /v1/activate``.

Signing a request with the machine key is what makes a stolen token, or a copied machine code,
useless: only the holder of the enrolled Ed25519 key can ask for a token, and the token's ``wk``
opens only with the enrolled X25519 key.  The timestamp bounds how long a captured request
stays interesting and the nonce (remembered by the server for that window) stops replays.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.errors import InvalidInput, SignatureError
from layerlock.shared.ids import check_model_id
from layerlock.shared.keys import b64u_decode, b64u_encode
from layerlock.shared.machine import normalize_code

_DOMAIN = b"layerlock-activate-v1\0"
NONCE_BYTES = 16
FIELDS = ("machine", "model", "ts", "nonce", "sig")


@dataclass(frozen=True)
class ActivationRequest:
    machine: str
    model: str
    ts: int
    nonce: str
    sig: str

    def signed_bytes(self) -> bytes:
        return _signed_bytes(self.machine, self.model, self.ts, self.nonce)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "model": self.model, "ts": self.ts, "nonce": self.nonce, "sig": self.sig}


def _signed_bytes(machine: str, model: str, ts: int, nonce: str) -> bytes:
    payload = {"machine": machine, "model": model, "ts": ts, "nonce": nonce}
    return _DOMAIN + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def make_request(machine: str, model: str, key: ed25519.Ed25519PrivateKey,
                 *, now: float | None = None) -> ActivationRequest:
    ts = int(time.time() if now is None else now)
    nonce = b64u_encode(os.urandom(NONCE_BYTES))
    sig = b64u_encode(key.sign(_signed_bytes(machine, model, ts, nonce)))
    return ActivationRequest(machine=machine, model=model, ts=ts, nonce=nonce, sig=sig)


def parse_request(body: Any) -> ActivationRequest:
    """Shape-check a request body (no signature check yet: that needs the registered key)."""
    if not isinstance(body, dict):
        raise InvalidInput("activation request must be a JSON object")
    unknown = set(body) - set(FIELDS)
    if unknown:
        names = ", ".join(sorted(str(u)[:32] for u in unknown)[:5])
        raise InvalidInput(f"unknown field(s): {names}")
    missing = [f for f in FIELDS if f not in body]
    if missing:
        raise InvalidInput(f"missing field(s): {', '.join(missing)}")
    ts = body["ts"]
    # below 2**53: exact as a float, so the clock-skew arithmetic on it never overflows
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 2**53:
        raise InvalidInput(f"ts must be an integer between 0 and {2**53 - 1} (Unix seconds)")
    nonce = body["nonce"]
    if not isinstance(nonce, str) or len(b64u_decode(nonce, field="nonce")) != NONCE_BYTES:
        raise InvalidInput(f"nonce must be {NONCE_BYTES} random bytes, base64url")
    sig = body["sig"]
    if not isinstance(sig, str) or len(b64u_decode(sig, field="sig")) != 64:
        raise InvalidInput("sig must be a 64-byte Ed25519 signature, base64url")
    return ActivationRequest(machine=normalize_code(body["machine"]), model=check_model_id(body["model"]),
                             ts=ts, nonce=nonce, sig=sig)


def verify_signature(req: ActivationRequest, key: ed25519.Ed25519PublicKey) -> None:
    try:
        key.verify(b64u_decode(req.sig, field="sig"), req.signed_bytes())
    except InvalidSignature:
        raise SignatureError("activation request signature does not verify with the machine's key") from None
