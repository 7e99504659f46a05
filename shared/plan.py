"""What exactly to lock -- whole tensors or parts of them -- and what each decoy is made of.

:mod:`layerlock.shared.selection` names tensors; a :class:`Plan` says, per tensor, which
elements are locked (all, or *runs*: rows, input columns, input channels) and whether the decoy
is random or the public base's own value.  Protect writes the plan (:mod:`layerlock.shared.decoys`,
bundle version 2 for partial locks); ``layerlock inspect`` shows it before anything is written.

**The default policy** (no base, no ``--layers``/``--pattern``) locks the model's *input
interface*: the input slices of the tensors where the model reads its input -- the rows of the
embedding tables (tokens, positions) and otherwise the input columns (or input channels) of
the first weight tensor in execution order -- those with the largest norms, which is where the
training signal went (an input that carries no information never moves its weights): 70 % of
a large embedding table's rows, 45 % of a weight tensor's input columns or channels.  Tables of
at most 1,024 rows (positions, token types) and convolutions over at most 4 input channels are
locked whole, and so is the output head (the last weight tensor run) when it holds at most
10 % of the parameters: a random head maps whatever the clear layers still compute to random
classes.  If all that is under 5 % of the parameters, the next weight tensors in execution
order contribute their input slices the same way until it is not.

Why the input: every later layer was trained on the representation the first one makes.
With its informative inputs replaced, the clear layers compute on garbage, and an attacker who
resets the locked slices has to rebuild that representation from his own data -- which is
training from scratch with a head start the measurements do not show.  Locking half of every
tensor's elements instead leaks badly (the other half is a noisy copy of the model that
fine-tuning cleans up), and so do locks of middle layers (the clear input layer hands over its
learned features).  Measured by ``bench/strength.py`` (README, *Measured -> Lock strength*).

**With a base** (``--base``): every row (a tensor's slice along its first axis) whose bytes
differ from the base is locked, the decoy is the base's own row, and tensors the base lacks are
locked whole with random decoys.  The locked file is then the public base plus whatever the
vendor left unchanged: substituting the base gains nothing, and the bundle holds only what the
vendor added.  ``base_min_change`` leaves clear the rows whose relative change is below it
(smaller bundle; ``layerlock assess`` measures what that costs).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerlock.shared import formats
from layerlock.shared.decoys import read_array
from layerlock.shared.errors import InvalidInput, LayerlockError
from layerlock.shared.formats import FLOAT_DTYPES, PlainModel, TensorInfo
from layerlock.shared.selection import (
    LockPolicy,
    input_tensors,
    is_buffer,
    is_embedding,
    is_weight,
    ordered,
    select_detail,
)

SMALL_TABLE = 1024  # embedding tables up to this many rows are locked whole
SMALL_CHANNELS = 4  # convolutions over this few input channels (images) are locked whole
INPUT_SHARE = 0.45  # share of a weight tensor's input slices locked, largest norms first
EMBED_SHARE = 0.7  # share of a large embedding table's rows locked, largest norms first
HEAD_CAP = 0.10  # the output head (last weight tensor run) is locked whole when at most this share
MIN_FRACTION = 0.05  # the default keeps adding input slices of later layers up to this
RUNS_PER_TENSOR = 200_000  # more runs than this: the tensor is locked whole instead
LOW_FRACTION = 0.01  # below this, protect warns


@dataclass(frozen=True)
class Lock:
    """One tensor's locked part: ``runs`` of elements ``(start, count)``, or None for all of it."""

    info: TensorInfo
    runs: tuple[tuple[int, int], ...] | None = None
    part: str = "whole"
    decoy: str = "random"  # "random" | "base"
    change: float | None = None  # with a base: relative change of the tensor (how much it matters)
    head: bool = False  # the output head (default policy): its weights move the outputs directly

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def elements(self) -> int:
        return self.info.numel if self.runs is None else sum(n for _, n in self.runs)

    def byte_runs(self) -> list[tuple[int, int]] | None:
        """Locked byte ranges relative to the tensor, or None when the whole tensor is locked."""
        if self.runs is None:
            return None
        item = formats.ITEMSIZE[self.info.dtype]
        return [(s * item, n * item) for s, n in self.runs]

    def mask(self) -> np.ndarray:
        """Boolean mask of the locked elements, in the tensor's shape."""
        flat = np.zeros(self.info.numel, dtype=bool)
        if self.runs is None:
            flat[:] = True
        else:
            for s, n in self.runs:
                flat[s:s + n] = True
        return flat.reshape(self.info.shape)


@dataclass
class Plan:
    """The locks of one model, and what protect should say about them."""

    policy: str  # "default" | "base" | "layers/patterns"
    locks: list[Lock]
    total_params: int
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # integer/bool buffers matched but left alone
    base: dict[str, np.ndarray] | None = None  # base values for "base" decoys

    @property
    def locked_params(self) -> int:
        return sum(lock.elements for lock in self.locks)

    @property
    def fraction(self) -> float:
        return self.locked_params / self.total_params if self.total_params else 0.0


# --- reading ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def mapped(plain: PlainModel) -> Iterator[memoryview]:
    """The plain file's bytes, memory-mapped (released on exit)."""
    with plain.path.open("rb") as fh:
        if not plain.path.stat().st_size:
            yield memoryview(b"")
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                yield view
            except BaseException as exc:
                # Arrays viewing the mapping live on in the traceback's frames; drop them, or
                # closing the mapping fails and hides the real error.
                traceback.clear_frames(exc.__traceback__)
                raise
            finally:
                view.release()


def read_tensors(path: Path, workdir: Path, weights: Path | None = None) -> dict[str, np.ndarray]:
    """Every readable tensor of a model file (any supported format) as numpy arrays (copies)."""
    plain = formats.open_plain(Path(path), workdir, weights)
    try:
        with mapped(plain) as view:
            return tensors_of(plain, view, copy=True)  # copies: the mapping closes
    finally:
        if plain.temporary:
            plain.path.unlink(missing_ok=True)


def tensors_of(plain: PlainModel, view: memoryview, *, copy: bool) -> dict[str, np.ndarray]:
    """Every readable tensor of ``plain`` (mapped as ``view``); without ``copy``, views of the
    mapping, which the caller must drop before it closes."""
    out = {}
    for t in plain.tensors:
        arr = read_array(view, t)
        if arr is not None:
            out[t.name] = np.array(arr) if copy else arr
        del arr
    return out


def execution_order(plain: PlainModel) -> list[str] | None:
    """Tensor names in the order the model runs them, where the format says; else None."""
    if plain.order:
        return list(plain.order)
    if plain.format == "ncnn":
        return [t.name for t in plain.tensors]  # the .bin holds blobs in .param layer order
    if plain.format == "onnx":
        graph = _onnx_graph(plain.path)
        if graph is not None:
            return graph[0]
    return None


def _onnx_graph(path: Path) -> tuple[list[str], set[str]] | None:
    """(initializers in first-use order, initializers stored (in, out): MatMul / Gemm B without transB)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure: fall back to names
        return None
    inits = {t.name for t in model.graph.initializer}
    order: list[str] = []
    seen: set[str] = set()
    in_out: set[str] = set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in inits and name not in seen:
                seen.add(name)
                order.append(name)
            if i == 1 and name in inits:
                trans = any(a.name == "transB" and a.i == 1 for a in node.attribute)
                if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans):
                    in_out.add(name)
    order += [t.name for t in model.graph.initializer if t.name not in seen]
    return order, in_out


# --- slices -> runs ----------------------------------------------------------------------------------
def axis_runs(shape: Sequence[int], axis: int, index: Sequence[int]) -> list[tuple[int, int]]:
    """Element runs (start, count) of the slices ``index`` along ``axis`` of a C-ordered tensor."""
    shape = tuple(shape)
    pre, size, post = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    groups: list[tuple[int, int]] = []
    for i in sorted(set(int(i) for i in index)):
        if groups and groups[-1][0] + groups[-1][1] == i:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((i, 1))
    runs: list[tuple[int, int]] = []
    for p in range(pre):
        base = p * size * post
        for start, n in groups:
            s, c = base + start * post, n * post
            if runs and runs[-1][0] + runs[-1][1] == s:
                runs[-1] = (runs[-1][0], runs[-1][1] + c)
            else:
                runs.append((s, c))
    return runs


def _slice_lock(t: TensorInfo, arr: np.ndarray, axis: int, share: float, what: str) -> Lock:
    """Lock the ``share`` of ``t``'s slices along ``axis`` with the largest L2 norms."""
    size = t.shape[axis]
    norms = np.sqrt(np.square(np.moveaxis(arr.astype(np.float64), axis, 0).reshape(size, -1)).sum(axis=1))
    k = max(1, math.ceil(share * size))
    if k >= size:
        return Lock(t, None, "whole")
    idx = np.argsort(-norms, kind="stable")[:k]
    runs = axis_runs(t.shape, axis, idx.tolist())
    if len(runs) > RUNS_PER_TENSOR:
        return Lock(t, None, f"whole (its {k:,} {what} would be {len(runs):,} runs)")
    return Lock(t, tuple(runs), f"{what} {k:,} of {size:,}")


# --- the policies ---------------------------------------------------------------------------------------
def make_plan(plain: PlainModel, view: memoryview, policy: LockPolicy,
              infos: Mapping[str, TensorInfo] | None = None, base: Mapping[str, np.ndarray] | None = None) -> Plan:
    """The locks for ``plain`` (whose bytes are ``view``) under ``policy``.

    ``infos``: the tensors that may be locked (default: all of the plain file's); ``base``: the
    base model's tensors, required when ``policy.base`` is set.
    """
    infos = dict(infos) if infos is not None else {t.name: t for t in plain.tensors}
    total = sum(t.numel for t in plain.tensors)
    order = execution_order(plain)
    if policy.base is not None:
        if base is None:
            raise InvalidInput("a base policy needs the base model's tensors")
        if policy.start is not None or policy.patterns:
            raise InvalidInput("--base chooses what to lock itself: it cannot be combined with --layers or --pattern")
        plan = _base_plan(infos, view, base, policy, total)
    elif policy.is_default:
        plan = _default_plan(plain, infos, view, order, total)
    else:
        names, skipped = select_detail(infos, policy, order)
        plan = Plan("layers/patterns", [Lock(infos[n]) for n in names], total, skipped=skipped)
    plan.locks.sort(key=lambda lk: (lk.info.offset, lk.info.length))
    _warn(plan)
    return plan


def _default_plan(plain: PlainModel, infos: dict[str, TensorInfo], view: memoryview, order: list[str] | None,
                  total: int) -> Plan:
    in_out = (_onnx_graph(plain.path) or ([], set()))[1] if plain.format == "onnx" else set()
    first = input_tensors(infos, order)
    locks: list[Lock] = []
    for name in first:
        locks.append(_input_lock(infos[name], view, in_out, is_embedding(name, infos[name])))
    weights = [n for n in ordered(list(infos), order) if is_weight(infos[n]) and not is_embedding(n, infos[n])]
    if weights and weights[-1] not in first and infos[weights[-1]].numel <= HEAD_CAP * total:
        locks.append(Lock(infos[weights[-1]], None, "whole (the output head)", head=True))
    later = [n for n in ordered(list(infos), order) if n not in first and is_weight(infos[n])
             and all(lk.name != n for lk in locks)]
    for name in later:  # a tiny input layer (a 3-channel convolution): continue down the model
        if sum(lk.elements for lk in locks) >= MIN_FRACTION * total:
            break
        locks.append(_input_lock(infos[name], view, in_out, False))
    if not locks:  # no matrices at all (odd, but possible): lock what there is
        locks = [Lock(t) for t in infos.values() if not is_buffer(t)] or [Lock(t) for t in infos.values()]
    return Plan("default", locks, total)


def _input_lock(t: TensorInfo, view: memoryview, in_out: set[str], embedding: bool) -> Lock:
    arr = read_array(view, t)
    if arr is None or len(t.shape) < 2 or t.numel == 0:
        return Lock(t)
    if embedding:
        if t.shape[0] <= SMALL_TABLE:
            return Lock(t, None, f"whole ({t.shape[0]:,} rows)")
        return _slice_lock(t, arr, 0, EMBED_SHARE, "rows")
    if len(t.shape) == 2:
        axis = 0 if t.name in in_out else 1
        return _slice_lock(t, arr, axis, INPUT_SHARE, "input rows" if axis == 0 else "input columns")
    if t.shape[1] <= SMALL_CHANNELS:
        return Lock(t, None, f"whole ({t.shape[1]} input channels)")
    return _slice_lock(t, arr, 1, INPUT_SHARE, "input channels")


def _base_plan(infos: dict[str, TensorInfo], view: memoryview, base: Mapping[str, np.ndarray],
               policy: LockPolicy, total: int) -> Plan:
    locks: list[Lock] = []
    skipped: list[str] = []
    values: dict[str, np.ndarray] = {}
    for name, t in infos.items():
        if name not in base:
            if is_buffer(t) and not policy.include_int:
                skipped.append(name)
            elif t.numel:
                locks.append(Lock(t, None, "whole (not in the base)", "random", math.inf))
            continue
        ref = base[name]
        if tuple(ref.shape) != t.shape:
            raise InvalidInput(f"the base does not match the model: {name} is {_shape(ref.shape)} in the base, "
                               f"{_shape(t.shape)} in the model")
        arr = read_array(view, t)
        if arr is None or not t.numel:
            continue
        try:
            ref_cast = ref.astype(arr.dtype) if ref.dtype != arr.dtype else ref
        except (TypeError, ValueError):
            raise InvalidInput(f"the base does not match the model: {name} is {ref.dtype} in the base, "
                               f"{t.dtype} in the model") from None
        rows = t.shape[0] if len(t.shape) >= 1 else 1
        a2, b2 = arr.reshape(rows, -1), ref_cast.reshape(rows, -1)
        differs = (a2.view(np.uint8).reshape(rows, -1) != b2.view(np.uint8).reshape(rows, -1)).any(axis=1)
        if not differs.any():
            continue
        if is_buffer(t) and not policy.include_int:
            skipped.append(name)
            continue
        a64, b64 = a2.astype(np.float64), b2.astype(np.float64)
        with np.errstate(all="ignore"):
            delta = np.sqrt(np.square(a64 - b64).sum(axis=1))
            scale = np.sqrt(np.square(b64).sum(axis=1))
            rel = np.where(scale > 0, delta / np.where(scale > 0, scale, 1.0), np.inf)
        if policy.base_min_change > 0:
            differs &= ~(rel < policy.base_min_change)
            if not differs.any():
                continue
        change = float(np.sqrt(np.square(a64 - b64).sum()) / max(float(np.sqrt(np.square(b64).sum())), 1e-30))
        values[name] = ref_cast
        idx = np.flatnonzero(differs)
        if len(idx) == rows:
            locks.append(Lock(t, None, "whole (differs from the base)", "base", change))
        else:
            runs = axis_runs(t.shape if t.shape else (1,), 0, idx.tolist())
            locks.append(Lock(t, tuple(runs), f"rows {len(idx):,} of {rows:,} (differ from the base)", "base",
                              change))
    if not locks:
        raise InvalidInput("nothing to lock: every tensor equals the base's"
                           + (" (or changed less than --base-min-change)" if policy.base_min_change > 0 else ""))
    return Plan("base", locks, total, skipped=skipped, base=values)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _warn(plan: Plan) -> None:
    if plan.skipped:
        plan.warnings.append(f"left {len(plan.skipped)} integer/bool buffer(s) clear ({', '.join(plan.skipped[:3])}"
                             f"{', ...' if len(plan.skipped) > 3 else ''}): decoys there break the model without "
                             "protecting it; --include-int locks them with values kept in range")
    if plan.locks and all(lk.info.dtype not in FLOAT_DTYPES for lk in plan.locks):
        plan.warnings.append("only non-float tensors are locked: integer buffers and quantized weights alone "
                             "rarely make a model useless; check with `layerlock assess`")
    if plan.total_params and plan.fraction < LOW_FRACTION:
        plan.warnings.append(f"the lock covers {100 * plan.fraction:.3g}% of the parameters (under 1%): "
                             "an attacker who resets or retrains it loses little; check with `layerlock assess`")


def describe(plan: Plan) -> list[dict[str, Any]]:
    """The locks as JSON-able dicts (name, part, elements, decoy), ranked by change with a base."""
    locks = sorted(plan.locks, key=lambda lk: -(lk.change or 0.0)) if plan.policy == "base" else plan.locks
    out = []
    for lk in locks:
        d: dict[str, Any] = {"name": lk.name, "part": lk.part, "params": lk.elements, "dtype": lk.info.dtype,
                             "shape": list(lk.info.shape), "decoy": lk.decoy}
        if lk.change is not None:
            d["change"] = None if math.isinf(lk.change) else round(lk.change, 6)
        out.append(d)
    return out


def load_base(path: Path, workdir: Path) -> dict[str, np.ndarray]:
    """The base model's tensors; a file that does not parse is one clear error."""
    try:
        return read_tensors(Path(path), workdir)
    except LayerlockError as exc:
        raise InvalidInput(f"base model: {exc.message}") from None
