"""A model's fingerprint secret, opened from its KEK-sealed form and kept per worker.

Both the activation (a license's values at the fingerprint positions, sealed into ``wk``) and
the trace endpoints need it; opening it costs a Redis read, AES-GCM over tens of kilobytes and a
parse, so each worker keeps the parsed secret keyed by (model, digest of the sealed blob): a
re-sealed secret (KEK rotation) is a new entry, and nothing is cached across processes.
"""

from __future__ import annotations

from typing import Any

from layerlock.license_server.store import models
from layerlock.shared.errors import ConfigError
from layerlock.shared.fingerprint import Secret

_CACHE: dict[tuple[str, str], Secret] = {}
_CACHE_MAX = 64


def secret_for(svc: Any, model_id: str, model: dict[str, str]) -> Secret:
    """The fingerprint secret of ``model_id`` (its record ``model`` says it has one).
    ``svc``: the app's :class:`~layerlock.license_server.app.Services`."""
    memo = (model_id, model.get("fp_digest", ""))
    hit = _CACHE.get(memo)
    if hit is not None:
        return hit
    sealed = models.fingerprint(svc.redis, model_id)
    if sealed is None:
        raise ConfigError(f"model {model_id} is fingerprinted but its fingerprint secret is missing")
    secret = Secret.from_bytes(svc.keys.open_data_key(sealed, model["kek_id"], model_id + models.FP_BINDING))
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[memo] = secret
    return secret
