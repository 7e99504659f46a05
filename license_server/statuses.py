"""Which HTTP status each failure becomes: the one table, read by the app's error handler.

The errors themselves (:mod:`layerlock.shared.errors`) carry only a stable ``code``; the
sidecar and the CLIs share them without any idea of HTTP.  Lookup order: an activation
denial or claim refusal by its reason code, then the error's class, nearest in its MRO first.
"""

from __future__ import annotations

from layerlock.license_server.checkpoints import CheckpointError
from layerlock.shared.errors import (
    ActivationDenied,
    ClaimRefused,
    ConfigError,
    Conflict,
    Denial,
    Forbidden,
    InvalidInput,
    LayerlockError,
    LockError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    SignatureError,
    TokenError,
    Unauthorized,
    Unavailable,
    VerifierError,
    WrapError,
)

#: Activation denials: 401 when the request proved nothing, 409 for a replayed nonce or a seat
#: pool in use (retry later), 429 for a flood, 503 when the server could not settle a racing
#: change; every other reason is 403.
BY_DENIAL: dict[str, int] = {
    Denial.BAD_SIGNATURE: 401,
    Denial.NOT_ENROLLED: 401,
    Denial.STALE_REQUEST: 401,
    Denial.REPLAY: 409,
    Denial.SEATS_EXHAUSTED: 409,
    Denial.RATE_LIMITED: 429,
    Denial.BUSY: 503,
}

BY_CLASS: dict[type[LayerlockError], int] = {
    PayloadTooLarge: 413,
    InvalidInput: 400,
    LockError: 400,
    WrapError: 400,
    ProtocolError: 400,
    TokenError: 401,
    SignatureError: 401,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    CheckpointError: 409,
    Unavailable: 503,
    VerifierError: 503,
    ConfigError: 500,
}


def status_of(err: LayerlockError) -> int:
    if isinstance(err, ActivationDenied):
        return BY_DENIAL.get(err.code, 403)
    if isinstance(err, ClaimRefused):
        return 401 if err.code == "bad_claim" else 409
    for cls in type(err).__mro__:
        if cls in BY_CLASS:
            return BY_CLASS[cls]
    return 500
