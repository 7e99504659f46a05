"""The air-gapped exchange, site side: write a signed request file, import the response file.

``layerlock-verifier request --model ID --out req.llr`` writes the same signed activation
request the sidecar sends online (:mod:`layerlock.shared.activation`: machine, model, time,
nonce, Ed25519 signature by the machine key), wrapped as ``{"layerlock": "offline-request",
"v": 1, "request": {…}}``, and remembers its nonce in ``requests/<model>.json``.  Ops answer it
anywhere the server is (``layerlock activate-offline req.llr --out resp.llt``).
``layerlock-verifier import resp.llt`` checks the token exactly as the daemon checks an online
one (:func:`layerlock.verifier.unlock.accept_token`: pinned key, this machine, this model, ``wk``
opens with this machine's key), and that its ``jti`` is the nonce of this machine's pending
request for that model — so a response is imported once, and only the answer to the latest
request — then caches it where the daemon looks (``tokens/<model>.jwt``).  A running daemon picks
it up at its next retry (at most ``retry_max``); a fresh response also clears a clock rollback
(:mod:`layerlock.verifier.clock`).  Nothing in either file is secret: the request is signed, the
token's data key is sealed to this machine.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any

from layerlock.shared.activation import make_request
from layerlock.shared.errors import ConfigError, InvalidInput, LayerlockError, TokenError
from layerlock.shared.ids import check_model_id
from layerlock.shared.machine import machine_code
from layerlock.shared.tokens import LicenseClaims, extend_pinned, jwks
from layerlock.verifier.clock import ClockGuard
from layerlock.verifier.state import StateDir
from layerlock.verifier.unlock import accept_token

REQUEST_FORMAT, RESPONSE_FORMAT = "offline-request", "offline-response"


def enrolled_machine(state: StateDir) -> str:
    """This host's machine code, which must be the one the state directory was enrolled as."""
    record = state.load_machine()
    source = record.get("machine_id_file")
    code = machine_code(machine_id_path=source) if source else machine_code()
    if code != record["machine"]:
        raise ConfigError(f"this host's machine code {code} is not the enrolled {record['machine']} "
                          f"(state dir {state.path} copied from another host?)")
    return code


def write_request(state: StateDir, model_id: str, out: Path, *, force: bool = False,
                  now: float | None = None) -> dict[str, Any]:
    """Sign a request for ``model_id``, write it to ``out`` and remember its nonce."""
    state.check()
    model_id = check_model_id(model_id)
    machine = enrolled_machine(state)
    req = make_request(machine, model_id, state.load_keys().sign, now=now)
    doc = {"layerlock": REQUEST_FORMAT, "v": 1, "request": req.to_dict()}
    try:
        with open(out, "w" if force else "x") as fh:
            fh.write(json.dumps(doc, indent=2) + "\n")
    except FileExistsError:
        raise ConfigError(f"{out} exists (--force overwrites)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from None
    state.save_request(model_id, {"nonce": req.nonce, "ts": req.ts})
    return doc


def _response(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except ValueError:
        raise InvalidInput(f"{path} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("layerlock") != RESPONSE_FORMAT or doc.get("v") != 1 or \
            not isinstance(doc.get("token"), str):
        raise InvalidInput(f"{path} is not an offline activation response (from `layerlock activate-offline`)")
    return doc


def import_response(state: StateDir, path: Path, *, issuer: str = "layerlock", leeway: int = 60,
                    tolerance: float = 300, now: float | None = None) -> LicenseClaims:
    """Verify the response's token like an online one, match it to the pending request, cache it."""
    state.check()
    doc = _response(path)
    model_id = check_model_id(doc.get("model"), field="model")
    machine = enrolled_machine(state)
    pending = state.load_request(model_id)
    if pending is None:
        raise InvalidInput(f"no pending request for model {model_id} on this machine (already imported, or "
                           "the request was made elsewhere): run layerlock-verifier request again")
    keys, pinned = state.load_keys(), state.load_jwks()
    t = time.time() if now is None else now

    def accept(trusted: dict[str, Any]) -> LicenseClaims:
        claims, data_key = accept_token(doc["token"], keys=trusted, kem=keys.kem, machine_code=machine,
                                        model_id=model_id, issuer=issuer, leeway=leeway, now=t)
        del data_key  # it opened: the token is for this machine's key; the daemon restores from the cache
        return claims

    try:
        claims = accept(pinned)
    except TokenError:  # a rotated signing key: pin it only through an endorsement chain from ours
        extended = extend_pinned(pinned, doc["jwks"]) if isinstance(doc.get("jwks"), dict) else pinned
        if extended == pinned:
            raise
        claims = accept(extended)
        state.save_jwks(jwks(list(extended.values())))
    if not hmac.compare_digest(claims.jti, str(pending.get("nonce", ""))):
        raise TokenError("this response answers another request of this machine (an older one?): import the "
                         "response to the latest request, or make a new one")
    state.save_token(model_id, doc["token"])
    state.delete_request(model_id)
    guard = ClockGuard(state.clock_file, keys.sign, tolerance=tolerance)
    try:
        guard.load(t, state.file_times())
        guard.resync(max(t, claims.iat))  # the token's iat is server time: a clock still behind it stays flagged
    except (OSError, LayerlockError):
        pass  # the token is in place; the daemon re-checks the clock itself
    return claims
