"""Entitlements: whether a license covers the model a machine asks for.

A license names one model id, or a model ``family`` with a version rule (``versions``):

* ``all`` — every version of the family, present and future;
* ``max`` — versions up to ``max_version`` (dotted numbers compared numerically: 1.10 > 1.9; a
  version that is not dotted numbers is never covered by this rule);
* ``maintain`` — versions *released* (``released_at`` of the model, its registration time unless
  ops gave one) before the license's expiry, and those stay licensed after it expires: a lapsed
  customer keeps what they paid for, without the versions released since (Keygen's
  MAINTAIN_ACCESS).  A revoked license covers nothing.

A retired version is refused before any of this (``unknown_model``).  Pure functions: the
decision (:mod:`layerlock.license_server.decision`) calls them on the snapshot.
"""

from __future__ import annotations

import re

from layerlock.license_server.store import licenses

_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,7}")


def version_key(version: str) -> tuple[int, ...] | None:
    """``"1.10.2"`` → (1, 10, 2); None for anything but dotted numbers."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        return None
    return tuple(int(part) for part in version.split("."))


def released_at(model: dict[str, str]) -> int:
    if model.get("released_at"):
        return int(model["released_at"])
    return int(model.get("created_at", "0")) // 1000


def covers(lic: dict[str, str], model_id: str, model: dict[str, str]) -> bool:
    """Whether ``lic`` names this model, or its family under a rule this version satisfies."""
    family = lic.get("family")
    if not family:
        return lic.get("model") == model_id
    if model.get("family") != family:
        return False
    rule = lic.get("versions") or "all"
    if rule == "max":
        have, limit = version_key(model.get("version", "")), version_key(lic.get("max_version", ""))
        return have is not None and limit is not None and have <= limit
    if rule == "maintain":
        return released_at(model) < int(lic["expires_at"])
    return rule == "all"


def standing(lic: dict[str, str], now: float) -> str:
    """:func:`licenses.state`, except that an expired ``maintain`` license is ``lapsed``: still
    good for the versions it covers (and its tokens are not capped by its expiry)."""
    state = licenses.state(lic, now)
    if state == "expired" and lic.get("family") and lic.get("versions") == "maintain":
        return "lapsed"
    return state
