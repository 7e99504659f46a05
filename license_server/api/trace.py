"""``/v1/models/<id>/fingerprint`` and ``/v1/models/<id>/trace``: whose copy is this?

Tracing needs the real values at the fingerprint positions and the chip key, which never leave
the server; the suspect file never has to reach it.  So the work is split where the secrets are:
the client (``layerlock trace``) fetches the *public* part (positions, shapes, alignment
descriptors), reads the suspect file locally and extracts its values at the positions (as found,
and re-aligned for permuted hidden units); the server computes the residual against the real
values and the statistic for every license, and audits the trace.  Auditors and admins only: a
trace reveals which licenses exist and is evidence in a dispute.

Why the bound still holds when the client extracts: the candidate vectors depend only on the
suspect and the public descriptors, never on a license's chips (which only the server can
compute), so each is a fixed vector in Hoeffding's bound; the server caps how many a request
may submit (:data:`MAX_CANDIDATES`) and counts them in the union bound it reports.  That holds
only if the caller cannot learn chips from earlier answers: so no answer (and no audit record)
ever carries the score of a license that was not named.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import numpy as np
from flask import Blueprint, g

from layerlock.license_server.api.common import body, require
from layerlock.license_server.app import services
from layerlock.license_server.fingerprints import secret_for
from layerlock.license_server.roles import AUDITORS
from layerlock.license_server.store import licenses, models
from layerlock.shared.errors import InvalidInput, NotFound
from layerlock.shared.fingerprint import Secret, false_positive_bound, scores, threshold
from layerlock.shared.ids import check_model_id

bp = Blueprint("trace", __name__)

MAX_CANDIDATES = 2
RANKED = 10  # named licenses listed in the answer at most, best first
STATISTIC = ("normalized correlation z = sum(s_i * y_i) / ||y||, y_i = clip((x_i - w_i) / delta_i, -3, 3) at the "
             "fingerprint positions (0 where x_i is missing, or exactly 0 with w_i not: pruned), s_i = the "
             "license's +-1 chips (AES-256-CTR keystream under the model's key); max over the submitted alignments; "
             "Hoeffding: P(innocent license >= z) <= K * L * exp(-z^2 / 2)")


def _secret(model_id: str) -> Secret:
    svc = services()
    rec = models.get(svc.redis, model_id)
    if not rec.get("fp_positions"):
        raise NotFound(f"model {model_id} carries no fingerprint (protected with --no-fingerprint, or before them)")
    return secret_for(svc, model_id, rec)


@bp.get("/v1/models/<model_id>/fingerprint")
@require(*AUDITORS)
def public(model_id: str) -> dict[str, Any]:
    """Positions and alignment descriptors: what ``layerlock trace`` extracts from a suspect."""
    return _secret(check_model_id(model_id)).public()


@bp.post("/v1/models/<model_id>/trace")
@require(*AUDITORS)
def trace(model_id: str) -> dict[str, Any]:
    model_id = check_model_id(model_id)
    doc = body(("suspect", "sha256", "values"), required=("suspect", "values"))
    suspect = doc["suspect"]
    if not isinstance(suspect, str) or not 0 < len(suspect) <= 256:
        raise InvalidInput("suspect must be a name of 1-256 characters (the file traced)")
    digest = doc.get("sha256")
    if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise InvalidInput("sha256 must be 64 lowercase hex digits")
    secret = _secret(model_id)
    candidates = _candidates(doc["values"], secret.n)
    svc = services()
    ids: list[str] = [str(i) for i in svc.redis.zrange(licenses.ALL, 0, -1)]
    z = scores(secret, candidates, ids) if ids else np.zeros(0)
    k, count = len(candidates), len(ids)
    tau = threshold(count, k)
    hits = [i for i in np.argsort(-z)[:RANKED] if z[i] >= tau]
    # Scores of licenses under the threshold are never shown (nor audited): they would be an
    # oracle for their chips -- a caller crafting vectors from earlier answers could learn an
    # innocent license's chips and then frame it.  A named license's score tells nothing new.
    ranking = [{"license_id": ids[i], "score": round(float(z[i]), 3),
                "false_positive_bound": false_positive_bound(float(z[i]), count, k)} for i in hits]
    named = [str(r["license_id"]) for r in ranking]
    svc.commits.commit("model_traced", None, actor=g.actor, model=model_id, suspect=suspect, sha256=digest,
                       named=named, scores=[r["score"] for r in ranking] or None, licenses_scanned=count)
    return {"model_id": model_id, "suspect": suspect, "sha256": digest, "positions": secret.n,
            "licenses_scanned": count, "alignments": k, "threshold": round(tau, 3),
            "false_accusation_bound": 1e-9, "named": named, "traced": bool(named), "ranking": ranking,
            "statistic": STATISTIC}


def _candidates(raw: object, n: int) -> list[np.ndarray]:
    """1..MAX_CANDIDATES base64url float32 (little-endian) vectors of exactly ``n`` values."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CANDIDATES:
        raise InvalidInput(f"values must be a list of 1 to {MAX_CANDIDATES} base64url float32 vectors")
    out = []
    for i, text in enumerate(raw):
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True) \
                if isinstance(text, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None or len(data) != 4 * n:
            raise InvalidInput(f"values[{i}] must be base64url of {n} little-endian float32s "
                               "(one per fingerprint position)")
        out.append(np.frombuffer(data, dtype="<f4").astype(np.float64))
    return out
