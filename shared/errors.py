"""One exception hierarchy for the whole product, rooted in :class:`LayerlockError`.

Every error carries a stable machine-readable ``code`` (what scripts and the verifier branch on),
so the REST API, the CLI and the sidecar all agree on what a failure *is*.  ``shared`` knows no
transport: which HTTP status a failure becomes is the server's business
(:mod:`layerlock.license_server.statuses`).  Messages never contain secrets: they name the
field or file that is wrong, never the key or token itself.
"""

from __future__ import annotations

from enum import StrEnum


class LayerlockError(Exception):
    """Base class: anything layerlock raises on purpose."""

    code: str = "error"

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


class ConfigError(LayerlockError):
    """A configuration file or environment variable is wrong."""

    code = "config_error"


class MachineCodeError(InvalidInput):
    """A machine code does not parse or its check character is wrong (a typo)."""

    code = "bad_machine_code"


# --- lock format -------------------------------------------------------------------------------
class LockError(LayerlockError):
    """The lock format: protecting or restoring a model failed."""

    code = "lock_error"


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


class WrapError(LayerlockError):
    """Sealing or opening a wrapped key failed (wrong key, wrong binding, tampered)."""

    code = "bad_wrap"


class SignatureError(LayerlockError):
    """An enrollment code or activation request signature does not verify."""

    code = "bad_signature"


# --- server-side outcomes ----------------------------------------------------------------------
class Unauthorized(LayerlockError):
    code = "unauthorized"


class Forbidden(LayerlockError):
    code = "forbidden"


class NotFound(LayerlockError):
    code = "not_found"


class Conflict(LayerlockError):
    code = "conflict"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class Denial(StrEnum):
    """Why the license server refused an activation: the one list the server, the OpenAPI
    document and the sidecar all read.

    The sidecar sorts them in two kinds (:data:`DEFINITIVE`): a *definitive* answer about this
    machine's license drops a served model at once; anything else (a flood, a clock problem, a
    replayed or unverifiable request — which an outsider can provoke without the machine key)
    leaves a served model alone and lets a restarted sidecar unlock from its cached token.

    ``seats_exhausted`` (every seat of the customer's pool licence is taken by another machine)
    is *transient*: the licence does cover this machine, only not right now, and the pool frees
    up as other machines' leases lapse or ops release a seat.  A floating token never outlives
    its lease, so the machine that lost its seat (offline past its lease and revive window) holds
    no valid token anyway; a node-locked seat released by ops keeps serving until its token
    expires (what the server signed), then stops.  Dropping the cached token would gain nothing
    and make a restarted sidecar fail where it may legitimately serve.  The sidecar keeps the
    model ``locked`` with that reason and retries on its back-off, so it gets the next free seat.
    ``not_entitled`` (a family licence whose version rule excludes this version) is definitive,
    like ``no_license``.
    """

    UNKNOWN_MACHINE = "unknown_machine"
    NOT_ENROLLED = "not_enrolled"
    MACHINE_INACTIVE = "machine_inactive"
    UNKNOWN_MODEL = "unknown_model"
    NO_LICENSE = "no_license"
    REVOKED = "revoked"
    EXPIRED = "expired"
    SUITE_REQUIRED = "suite_required"
    BAD_SIGNATURE = "bad_signature"
    STALE_REQUEST = "stale_request"
    REPLAY = "replay"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    SEATS_EXHAUSTED = "seats_exhausted"
    NOT_ENTITLED = "not_entitled"


#: Answers that say the machine may not have this model: the sidecar drops it.
DEFINITIVE = frozenset({Denial.UNKNOWN_MACHINE, Denial.NOT_ENROLLED, Denial.MACHINE_INACTIVE,
                        Denial.UNKNOWN_MODEL, Denial.NO_LICENSE, Denial.REVOKED, Denial.EXPIRED,
                        Denial.SUITE_REQUIRED, Denial.NOT_ENTITLED})

#: Denials of requests that did not prove possession of the machine key (or that anyone holding
#: a captured request could provoke): counted in metrics and per-hour aggregates, never audited
#: one by one, never counted against the machine.
UNAUTHENTICATED = frozenset({Denial.UNKNOWN_MACHINE, Denial.NOT_ENROLLED, Denial.BAD_SIGNATURE,
                             Denial.STALE_REQUEST, Denial.REPLAY, Denial.RATE_LIMITED, Denial.BUSY})


class ActivationDenied(LayerlockError):
    """The server refused an activation; ``code`` is one of :class:`Denial`."""

    code = "denied"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=str(reason))


class ClaimRefused(LayerlockError):
    """An enrollment claim secret was unknown, used, expired, or for another machine."""

    code = "bad_claim"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason)


class Unavailable(LayerlockError):
    """A dependency (Redis) is down; the client should retry later."""

    code = "unavailable"


class NotReplicated(Unavailable):
    """A write was applied on the Redis primary but no replica confirmed it in time (``WAIT``).

    Not a refusal: the change *did* happen on the primary and is normally replicated moments
    later; it is only not *guaranteed* to survive a failover, so it is not acknowledged (503 +
    ``Retry-After``).  A client retrying must expect either outcome: the change may already be
    there (a retried registration gets 409 ``conflict``, a retried revocation 409 "already
    revoked"; a retried issuance issues a second license — read back before retrying it).  When
    Redis refused the write outright (``min-replicas-to-write``: no replica connected) nothing
    was written; the code is the same because a client cannot tell the two apart anyway.
    """

    code = "not_replicated"


class Overloaded(Unavailable):
    """The server shed the request unread (its queue was too long): nothing was done; retry
    after the ``Retry-After`` it sent."""

    code = "overloaded"


class RetryLater(Unavailable):
    """The server could not be asked and said when to come back (its ``Retry-After``, seconds):
    what the sidecar's back-off honours (capped by its own ``retry_max``)."""

    def __init__(self, message: str, retry_after: float, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class VerifierError(LayerlockError):
    """The sidecar refused a request (model not unlocked, dropped, unknown)."""

    code = "verifier_error"


class ProtocolError(LayerlockError):
    """A socket frame is malformed, oversized or truncated."""

    code = "protocol_error"
