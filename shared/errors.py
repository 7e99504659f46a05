"""One exception hierarchy for the whole product, rooted in :class:`LayerlockError`.

Every error carries a stable machine-readable ``code`` (what scripts and the verifier branch on)
and the HTTP status it maps to.  The mapping lives here, in one place, so the REST API, the CLI
and the sidecar all agree on what a failure *is*.  Messages never contain secrets: they name the
field or file that is wrong, never the key or token itself.
"""

from __future__ import annotations


class LayerlockError(Exception):
    """Base class: anything layerlock raises on purpose."""

    code: str = "error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


# --- input and configuration -------------------------------------------------------------------
class InvalidInput(LayerlockError):
    """A request body, CLI argument or file field is malformed."""

    code = "invalid_input"
    http_status = 400


class ConfigError(LayerlockError):
    """A configuration file or environment variable is wrong."""

    code = "config_error"
    http_status = 500


class MachineCodeError(InvalidInput):
    """A machine code does not parse or its check character is wrong (a typo)."""

    code = "bad_machine_code"


# --- lock format -------------------------------------------------------------------------------
class LockError(LayerlockError):
    """The lock format: protecting or restoring a model failed."""

    code = "lock_error"
    http_status = 400


class BundleFormatError(LockError):
    """The restoration bundle is not a well-formed .llk file (bad magic, header, truncation)."""

    code = "bundle_format"


class BundleIntegrityError(LockError):
    """Authentication failed: tampered bytes, reordered or missing chunks, or the wrong key."""

    code = "bundle_integrity"


class LockedFileMismatch(LockError):
    """The locked model file is not the one this bundle was made with."""

    code = "locked_file_mismatch"


class UnsupportedModel(LockError):
    """The input model cannot be read safely (unknown format, a pickle needing arbitrary code)."""

    code = "unsupported_model"


# --- tokens and key wrapping -------------------------------------------------------------------
class TokenError(LayerlockError):
    """A license token failed verification."""

    code = "bad_token"
    http_status = 401


class WrapError(LayerlockError):
    """Sealing or opening a wrapped key failed (wrong key, wrong binding, tampered)."""

    code = "bad_wrap"
    http_status = 400


class SignatureError(LayerlockError):
    """An enrollment code or activation request signature does not verify."""

    code = "bad_signature"
    http_status = 401


# --- server-side outcomes ----------------------------------------------------------------------
class Unauthorized(LayerlockError):
    code = "unauthorized"
    http_status = 401


class Forbidden(LayerlockError):
    code = "forbidden"
    http_status = 403


class NotFound(LayerlockError):
    code = "not_found"
    http_status = 404


class Conflict(LayerlockError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413


class ActivationDenied(LayerlockError):
    """The server refused an activation; ``code`` is one of the documented reasons.

    Reasons: ``unknown_machine``, ``machine_inactive``, ``no_license``, ``revoked``, ``expired``,
    ``bad_signature``, ``stale_request``, ``replay``, ``rate_limited``, ``unknown_model``.
    """

    code = "denied"
    http_status = 403

    STATUS_BY_REASON = {
        "bad_signature": 401,
        "stale_request": 401,
        "replay": 409,
        "rate_limited": 429,
    }

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason)
        self.http_status = self.STATUS_BY_REASON.get(reason, 403)


class RateLimited(LayerlockError):
    code = "rate_limited"
    http_status = 429


class Unavailable(LayerlockError):
    """A dependency (Redis) is down; the client should retry later."""

    code = "unavailable"
    http_status = 503


class VerifierError(LayerlockError):
    """The sidecar refused a request (model not unlocked, dropped, unknown)."""

    code = "verifier_error"
    http_status = 503


class ProtocolError(LayerlockError):
    """A socket frame is malformed, oversized or truncated."""

    code = "protocol_error"
    http_status = 400
