"""Which tensors to lock, by name: layers, name patterns, and where the default policy looks.

A *layer* is the group of tensors that share a module prefix: everything up to and including
the first purely numeric name component (``encoder.layer.3.attention.query.weight`` ->
``encoder.layer.3``), otherwise the name without its last component (``fc1.weight`` and
``fc1.bias`` -> ``fc1``).  Layers are listed in *execution order* where the format knows it (a
PyTorch state dict's own order, ONNX graph order: ``order``), otherwise by a natural sort of
their names (``layer.2`` before ``layer.10``) -- safetensors keeps no module order.
``layerlock inspect`` prints this list, so ``--layers START:COUNT`` is never a guess.

Integer and bool tensors (``position_ids``, masks, counters) are *buffers*: a decoy there
changes nothing an attacker cares about and can break the model (an index out of range), so
no policy locks them unless asked -- ``include_int``, or a ``--pattern`` that is exactly the
tensor's name.  8-bit integers are quantized *weights* and are locked like floats.

The default policy (no start/count, no patterns) is value-aware and lives in
:mod:`layerlock.shared.plan`; here, :func:`input_tensors` names the tensors it looks at.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerlock.shared.errors import InvalidInput
from layerlock.shared.formats import TensorInfo

# Integer dtypes that are buffers (indices, masks, counters), never decoyed unless asked.
BUFFER_DTYPES = frozenset({"BOOL", "I16", "U16", "I32", "U32", "I64", "U64"})
_EMBEDDING = re.compile(r"(^|[._])(embed|embeddings|embedding|wte|wpe|tok_embeddings|embed_tokens|word_embeddings|"
                        r"position_embeddings|token_type_embeddings|shared)([._]|$)")
_WILDCARDS = set("*?[")


@dataclass(frozen=True)
class LockPolicy:
    """Start layer + count, fnmatch name patterns, or both (union); or a public base model.

    Neither given -> the default policy (:mod:`layerlock.shared.plan`).  ``base``: lock what
    differs from this model (``--base``); ``base_min_change``: leave clear the rows whose change
    from the base is below this fraction of their norm (0: lock every row that differs).
    ``include_int``: integer and bool buffers may be locked too.  ``fingerprint``: reserve
    per-license fingerprint positions in the locked tensors (:mod:`layerlock.shared.fingerprint`),
    their δ scaled by ``fingerprint_strength``, placed where the task ``fingerprint_task`` (a
    ``layerlock assess`` task spec) is least sensitive when one is named.
    """

    start: int | None = None
    count: int | None = None
    patterns: tuple[str, ...] = ()
    include_int: bool = False
    base: str | None = None
    base_min_change: float = 0.0
    fingerprint: bool = False
    fingerprint_strength: float = 1.0
    fingerprint_task: str | None = None

    @property
    def is_default(self) -> bool:
        return self.start is None and self.count is None and not self.patterns and self.base is None

    @classmethod
    def parse_layers(cls, spec: str, patterns: Sequence[str] = (), include_int: bool = False) -> LockPolicy:
        """``START:COUNT`` (or ``START`` alone: one layer) -> a policy; malformed -> InvalidInput."""
        # ASCII digits, at most 9: int() of a many-thousand-digit string raises ValueError, not InvalidInput.
        m = re.fullmatch(r"\s*([0-9]{1,9})\s*(?::\s*([0-9]{1,9})\s*)?", spec)
        if not m:
            raise InvalidInput(f"--layers must be START:COUNT with non-negative integers, got {spec!r}")
        count = int(m.group(2)) if m.group(2) is not None else 1
        if count < 1:
            raise InvalidInput("--layers COUNT must be at least 1")
        return cls(start=int(m.group(1)), count=count, patterns=tuple(patterns), include_int=include_int)


def layer_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def _natural(key: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key) if p]


def group_layers(names: list[str], order: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """Tensors grouped into layers: in execution order (a layer where its first tensor runs) when
    ``order`` is given, else in natural name order; tensor names in the given order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    if order:
        rank = {n: i for i, n in enumerate(order)}
        first = {key: min(rank.get(m, len(rank)) for m in members) for key, members in groups.items()}
        return sorted(groups.items(), key=lambda kv: (first[kv[0]], _natural(kv[0])))
    return sorted(groups.items(), key=lambda kv: _natural(kv[0]))


def _numel(t: TensorInfo | Sequence[int]) -> int:
    return t.numel if isinstance(t, TensorInfo) else math.prod(t)


def is_buffer(t: TensorInfo | Sequence[int]) -> bool:
    """An integer or bool tensor other than 8-bit (quantized weights): indices, masks, counters."""
    return isinstance(t, TensorInfo) and t.dtype in BUFFER_DTYPES


def is_weight(t: TensorInfo | Sequence[int]) -> bool:
    """A matrix or higher-rank tensor of floats (or quantized 8-bit integers)."""
    if isinstance(t, TensorInfo):
        return len(t.shape) >= 2 and not is_buffer(t) and t.numel > 0
    return len(tuple(t)) >= 2


def is_embedding(name: str, t: TensorInfo | Sequence[int]) -> bool:
    shape = t.shape if isinstance(t, TensorInfo) else tuple(t)
    return len(shape) == 2 and not is_buffer(t) and _EMBEDDING.search(name.lower()) is not None


def ordered(names: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """``names`` in execution order where known, else natural name order."""
    if order:
        rank = {n: i for i, n in enumerate(order)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), _natural(n)))
    return sorted(names, key=_natural)


def input_tensors(tensors: Mapping[str, TensorInfo | Sequence[int]], order: Sequence[str] | None = None) -> list[str]:
    """Where the model reads its input: every embedding table, else the first weight tensor run."""
    names = ordered(list(tensors), order)
    emb = [n for n in names if is_embedding(n, tensors[n])]
    if emb:
        return emb
    weights = [n for n in names if is_weight(tensors[n])]
    return weights[:1] if weights else [n for n in names if not is_buffer(tensors[n])][:1]


def select(tensors: Mapping[str, TensorInfo | Sequence[int]], policy: LockPolicy,
           order: Sequence[str] | None = None) -> list[str]:
    """The tensor names to lock, in the order of ``tensors``; nothing selected -> InvalidInput.

    For the default policy these are the tensors it looks at (:func:`input_tensors`);
    :func:`layerlock.shared.plan.make_plan` then picks which parts of them to lock.
    """
    return select_detail(tensors, policy, order)[0]


def select_detail(tensors: Mapping[str, TensorInfo | Sequence[int]], policy: LockPolicy,
                  order: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(names to lock, integer/bool buffers the policy matched but left alone)."""
    names = list(tensors)
    chosen: set[str] = set()
    asked: set[str] = set()  # named exactly by a pattern: explicitly asked for
    if policy.is_default:
        chosen.update(input_tensors(tensors, order))
    if policy.start is not None or policy.count is not None:
        layers = group_layers(names, order)
        start = policy.start or 0
        count = 1 if policy.count is None else policy.count
        if start < 0 or count < 1:
            raise InvalidInput("layer start must be >= 0 and count >= 1")
        if start >= len(layers):
            raise InvalidInput(f"start layer {start} is out of range: the model has {len(layers)} layers "
                               f"(0..{len(layers) - 1}; `layerlock inspect` lists them)")
        for _, members in layers[start:start + count]:
            chosen.update(members)
    for pattern in policy.patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise InvalidInput(f"pattern {pattern!r} matches no tensor")
        chosen.update(matched)
        if not _WILDCARDS & set(pattern):
            asked.update(matched)
    skipped = [n for n in names if n in chosen and is_buffer(tensors[n]) and not policy.include_int
               and n not in asked]
    result = [n for n in names if n in chosen and n not in skipped]
    if not result:
        if skipped:
            raise InvalidInput(f"the lock policy selects only integer/bool buffers ({', '.join(skipped[:5])}"
                               f"{', ...' if len(skipped) > 5 else ''}), which are never decoyed unless asked "
                               "(--include-int); `layerlock inspect` lists the layers")
        raise InvalidInput("the lock policy selects no tensor")
    return result, skipped
