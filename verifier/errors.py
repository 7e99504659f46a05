"""Verifier-side refinements of :class:`layerlock.shared.errors.VerifierError`.

The inference process branches on ``code`` (the sidecar's reason: ``revoked``, ``token_expired``,
``peer_not_allowed``…), so every refusal that crosses the socket comes back as one of these with
the sidecar's reason code intact, never as a bare OSError or a KeyError.
"""

from __future__ import annotations

from layerlock.shared.errors import VerifierError


class SidecarRefused(VerifierError):
    """The sidecar answered with a refusal frame; ``code`` is its reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message or reason, code=reason or "refused")

    @property
    def reason(self) -> str:
        return self.code


class SidecarUnavailable(VerifierError):
    """Nothing listens on the socket (daemon not running) or it hung up mid-answer."""

    code = "sidecar_unavailable"


class ModelUnavailable(VerifierError):
    """Daemon-side: a model is not servable right now (locked, refused, dropped, unknown)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason)
