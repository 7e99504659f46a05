"""Which tensors to lock: layers by name prefix, and the lock policy.

A *layer* is the group of tensors that share a module prefix: everything up to and including
the first purely numeric name component (``encoder.layer.3.attention.query.weight`` ->
``encoder.layer.3``), otherwise the name without its last component (``fc1.weight`` and
``fc1.bias`` -> ``fc1``).  Layers are ordered by a *natural* sort of their names (``layer.2``
before ``layer.10``): safetensors does not keep module order, so this is the one order every
format shares and that a user can predict when writing ``--layers START:COUNT``.

The default policy (no start/count, no patterns) must make the model useless, not merely
worse.  It locks

1. the first and the last *weight layer* (a layer holding a floating tensor of rank >= 2):
   the first scrambles every input feature, the last scrambles every output;
2. every other weight layer in between, so no two consecutive healthy layers remain that an
   attacker could reuse as a block, and
3. more weight layers, largest first, until at least ``DEFAULT_MIN_FRACTION`` (50 %) of all
   parameters are locked, so retraining the missing part costs about as much as training
   from scratch.

Measured with ``tests/shared/test_digits_accuracy.py`` (a 64-64-32-10 MLP on scikit-learn's
digits, 0.974 test accuracy): the default locks ``fc1`` and ``fc3`` (first and last; with three
layers the alternation adds nothing), 68 % of the parameters, and the locked file scores
0.000-0.259 depending on the (random) data key, mean 0.100 over 10,000 keys -- chance is 0.1 --
while the restored file scores exactly 0.974 again.  On the transformer-shaped model of
``bench/protect.py`` it locks 55 %.  Locking more costs little: restoring decrypts at several
GB/s, faster than reading the file.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerlock.shared.errors import InvalidInput
from layerlock.shared.formats import FLOAT_DTYPES, TensorInfo

DEFAULT_MIN_FRACTION = 0.5


@dataclass(frozen=True)
class LockPolicy:
    """Start layer + count (the "SL to SL+EL" scheme), fnmatch name patterns, or both (union).

    Neither given -> the default policy described in the module docstring.
    """

    start: int | None = None
    count: int | None = None
    patterns: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.start is None and self.count is None and not self.patterns

    @classmethod
    def parse_layers(cls, spec: str, patterns: Sequence[str] = ()) -> LockPolicy:
        """``START:COUNT`` (or ``START`` alone: one layer) -> a policy; malformed -> InvalidInput."""
        # ASCII digits, at most 9: int() of a many-thousand-digit string raises ValueError, not InvalidInput.
        m = re.fullmatch(r"\s*([0-9]{1,9})\s*(?::\s*([0-9]{1,9})\s*)?", spec)
        if not m:
            raise InvalidInput(f"--layers must be START:COUNT with non-negative integers, got {spec!r}")
        count = int(m.group(2)) if m.group(2) is not None else 1
        if count < 1:
            raise InvalidInput("--layers COUNT must be at least 1")
        return cls(start=int(m.group(1)), count=count, patterns=tuple(patterns))


def layer_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def _natural(key: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key) if p]


def group_layers(names: list[str]) -> list[tuple[str, list[str]]]:
    """Tensors grouped into layers, layers in natural order, tensor names in given order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    return sorted(groups.items(), key=lambda kv: _natural(kv[0]))


def _numel(t: TensorInfo | Sequence[int]) -> int:
    return t.numel if isinstance(t, TensorInfo) else math.prod(t)


def _is_weight(t: TensorInfo | Sequence[int]) -> bool:
    if isinstance(t, TensorInfo):
        return len(t.shape) >= 2 and t.dtype in FLOAT_DTYPES
    return len(tuple(t)) >= 2


def select(tensors: Mapping[str, TensorInfo | Sequence[int]], policy: LockPolicy) -> list[str]:
    """The tensor names to lock, in the order of ``tensors``; nothing selected -> InvalidInput."""
    names = list(tensors)
    layers = group_layers(names)
    chosen: set[str] = set()
    if policy.is_default:
        chosen = _default(tensors, layers)
    if policy.start is not None or policy.count is not None:
        start = policy.start or 0
        count = 1 if policy.count is None else policy.count
        if start < 0 or count < 1:
            raise InvalidInput("layer start must be >= 0 and count >= 1")
        if start >= len(layers):
            raise InvalidInput(f"start layer {start} is out of range: the model has {len(layers)} layers "
                               f"(0..{len(layers) - 1})")
        for _, members in layers[start:start + count]:
            chosen.update(members)
    for pattern in policy.patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise InvalidInput(f"pattern {pattern!r} matches no tensor")
        chosen.update(matched)
    result = [n for n in names if n in chosen]
    if not result:
        raise InvalidInput("the lock policy selects no tensor")
    return result


def _default(tensors: Mapping[str, TensorInfo | Sequence[int]],
             layers: list[tuple[str, list[str]]]) -> set[str]:
    total = sum(_numel(t) for t in tensors.values())
    weight = [(key, members) for key, members in layers if any(_is_weight(tensors[m]) for m in members)]
    if not weight:  # no matrices at all (odd, but possible): lock everything there is
        return set(tensors)
    picked = {0, len(weight) - 1} | set(range(0, len(weight), 2))
    chosen = {m for i in picked for m in weight[i][1]}
    locked = sum(_numel(tensors[m]) for m in chosen)
    rest = sorted((i for i in range(len(weight)) if i not in picked),
                  key=lambda i: -sum(_numel(tensors[m]) for m in weight[i][1]))
    for i in rest:
        if total and locked / total >= DEFAULT_MIN_FRACTION:
            break
        chosen.update(weight[i][1])
        locked += sum(_numel(tensors[m]) for m in weight[i][1])
    return chosen
