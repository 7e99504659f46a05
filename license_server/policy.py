"""Which HPKE suite a machine's wrapped key uses: a device-class policy tree.

The tree walks vendor → device type → OS version (a prefix match on the OS string); the most
specific ``suite`` found wins.  Two facts then override the choice, because a wrong suite is a
machine that cannot unlock: a device without AES instructions gets ChaCha20-Poly1305 (constant
time in software) instead of AES-GCM, and a post-quantum suite asked for a machine that has no
ML-KEM key falls back to the classic one — unless the node that chose it says
``"require": true``: then such a machine is *denied* (``suite_required``) instead of silently
downgraded, because a policy that demands post-quantum protection must not be defeated by
enrolling without the ML-KEM key.  File format (JSON or TOML, ``LAYERLOCK_POLICY_FILE``)::

    {"suite": "X25519-SHA256-AES256GCM",
     "vendors": {"Dell Inc.": {"suite": "...",
                              "types": {"x86_64": {"suite": "MLKEM768X25519-SHA256-AES256GCM", "require": true,
                                                   "os": {"Ubuntu 24.04": "MLKEM768X25519-SHA256-AES256GCM"}}}}}}

``"*"`` matches any vendor or type.  ``require`` applies to the suite of the node it stands in
(and to an ``os`` entry below it).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from layerlock.shared.enrollment import DeviceClass
from layerlock.shared.errors import ActivationDenied, ConfigError, Denial
from layerlock.shared.wrap import DEFAULT_SUITE, HYBRID_SUITES, SUITES

CHACHA = "X25519-SHA256-CHACHA20POLY1305"
DEFAULT_TREE: dict[str, Any] = {"suite": DEFAULT_SUITE, "vendors": {}}
#: The keys each level of the tree may hold, and the key of its branches (os: prefix → suite).
_LEVELS: tuple[tuple[frozenset[str], str | None], ...] = (
    (frozenset({"suite", "require", "vendors"}), "vendors"),
    (frozenset({"suite", "require", "types"}), "types"),
    (frozenset({"suite", "require", "os"}), "os"),
)


class SuitePolicy:
    def __init__(self, tree: dict[str, Any] | None = None) -> None:
        self.tree = DEFAULT_TREE if tree is None else tree
        self._check(self.tree)

    @classmethod
    def from_file(cls, path: str) -> SuitePolicy:
        if not path:
            return cls()
        try:
            raw = Path(path).read_bytes()
            tree = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read suite policy {path}: {exc}") from None
        return cls(tree)

    def _check(self, node: Any, where: str = "top level", level: int = 0) -> None:
        """Strict, because a lax check fails open: a misspelled ``requires`` silently dropped
        would turn a post-quantum requirement into a silent downgrade, and a wrong shape would
        only surface as a 500 on every activation."""
        allowed, child = _LEVELS[level]
        if not isinstance(node, dict):
            raise ConfigError(f"suite policy: {where} must be a table/object")
        unknown = sorted(set(node) - allowed)
        if unknown:
            raise ConfigError(f"suite policy: unknown key {unknown[0]!r} at {where} "
                              f"(allowed: {', '.join(sorted(allowed))})")
        if "require" in node and not isinstance(node["require"], bool):
            raise ConfigError(f"suite policy: 'require' at {where} must be true or false")
        if "suite" in node and not (isinstance(node["suite"], str) and node["suite"] in SUITES):
            raise ConfigError(f"suite policy names an unknown suite {node['suite']!r} at {where}")
        if child is None:
            return
        branches = node.get(child, {})
        if not isinstance(branches, dict):
            raise ConfigError(f"suite policy: {child!r} at {where} must be a table/object")
        for name, sub in branches.items():
            if child == "os":
                if not (isinstance(sub, str) and sub in SUITES):
                    raise ConfigError(f"suite policy names an unknown suite {sub!r} for os {name!r} at {where}")
            else:
                self._check(sub, f"{child} {name!r}" if level == 0 else f"{where} / {child} {name!r}", level + 1)

    def choose(self, device: DeviceClass, has_pq: bool) -> str:
        """The suite for this device; raises ActivationDenied(suite_required) when the policy
        requires a post-quantum suite and the machine enrolled without an ML-KEM key."""
        suite = self.tree.get("suite", DEFAULT_SUITE)
        required = bool(self.tree.get("require", False))
        vendors = self.tree.get("vendors", {})
        vnode = vendors.get(device.vendor) or vendors.get("*")
        if vnode:
            suite, required = vnode.get("suite", suite), bool(vnode.get("require", required))
            types = vnode.get("types", {})
            tnode = types.get(device.type) or types.get("*")
            if tnode:
                suite, required = tnode.get("suite", suite), bool(tnode.get("require", required))
                for prefix, s in sorted(tnode.get("os", {}).items(), key=lambda kv: -len(kv[0])):
                    if device.os.startswith(prefix):
                        suite = s
                        break
        if suite in HYBRID_SUITES and not has_pq:
            if required:
                raise ActivationDenied(Denial.SUITE_REQUIRED,
                                       f"the suite policy requires {suite} for this device class, and this "
                                       "machine enrolled without an ML-KEM key: re-enroll it with "
                                       "'layerlock-verifier enroll --pq'")
            suite = DEFAULT_SUITE
        if not device.aes and suite == DEFAULT_SUITE:
            suite = CHACHA
        return str(suite)
