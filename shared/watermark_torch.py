"""Embedding the owner watermark (:mod:`layerlock.shared.watermark`) with PyTorch.

Two ways in, one hinge:

* :func:`embed` -- post-hoc, on a finished model (``layerlock watermark embed``), in two stages.

  1. **The mark.**  Only the marked positions move: Adam on
     ``HINGE * mean(relu(1.25 margin - s_j (X w)_j / rms)^2) + (w - w0)^2 / rms^2``, where ``rms``
     is the marked weights' RMS (the margin is in units of the weights' own scale).  This is the
     smallest change that carries the bits, and all there is without a task (the model cannot
     be run).  On a large model it is already invisible (MiniLM: sentence embeddings at cosine
     0.9998 to the original's, 0.7 % change in the marked matrices); on a small one it costs
     (the digits perceptron: 2 to 5 predictions in a hundred change).
  2. **Fidelity** (with ``--task``).  From there, every float parameter except embedding tables
     trains on hinge + ``FIDELITY *`` the relative MSE between the model's outputs and the
     original's on random **probe inputs** shaped like the model's input -- no training data
     needed -- + a weak L2 anchor to the original.  The rest of the model absorbs the mark.
     Probes come from the task's own ``probe(seed)`` when it defines one (returning the
     arguments of ``model(*inputs)``), else from the model's first layer: a ``Linear`` gets rows
     mixing Gaussian, uniform and sparse uniform values (signed and non-negative features
     alike), an ``Embedding`` gets random token ids (and an all-ones mask when ``forward`` takes
     two arguments).  The step size is found, not guessed: Adam starts at 3 % of each tensor's
     RMS per step (what a small model needs to win its outputs back: digits then keeps every
     prediction) and halves, back to the best checkpoint, whenever fidelity gets 10 % worse than
     the best seen (a deep pretrained model tolerates only a small fraction of that step; on
     MiniLM this stage measurably gains nothing over stage 1, at minutes of CPU).

* :class:`WatermarkRegularizer` -- the same hinge as a term of a vendor's own training loss.

Stopping: train until every bit has its margin, then (stage 2, or stage 1 without a task) on
while the stage's measure (fidelity on held-out probes, or the drift) still gains 2 % per 12
checks of 25 steps, and keep the best checkpoint among those where every bit has its margin.
The margin (0.1 of the marked weights' RMS) is deliberately small: detection needs only most
bits (256 bits tolerate 72 errors at p < 1e-12), and the cost of a mark grows with the square
of the margin.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from layerlock.shared.errors import InvalidInput, LayerlockError
from layerlock.shared.selection import is_embedding
from layerlock.shared.watermark import Detection, WatermarkKey, check_fits, detect, place

if TYPE_CHECKING:
    import torch

    from layerlock.shared.assess import Task

MARGIN = 0.1  # every bit's s_j (X w)_j / rms must reach this
TARGET = 1.25  # the hinge aims a quarter above the margin, so settling can give some back
HINGE = 10.0
FIDELITY = 10.0
ANCHOR = 0.01  # stage 2's pull back to the original (stage 1's anchor has weight 1)
LR = 3e-2  # Adam's step, relative to each tensor's RMS (stage 2: the first one; halved while fidelity worsens)
MAX_HALVINGS = 8
WORSE = 0.1  # a check 10 % worse than the best checkpoint: the step is too large
WARMUP = 100  # steps of ramp after a (re)start, during which a worse check is the ramp's, not the step's
MAX_STEPS = 4000
MIN_SETTLE = 200
CHECK_EVERY = 25
PATIENCE = 12  # checks without a real gain in fidelity before settling stops
GAIN = 0.02  # a real gain: 2 % better than the last one
PROBE_BATCHES = 128  # fixed probe batches cycled through (their original outputs computed once)
CHECK_BATCHES = 4  # held-out probe batches that measure fidelity for the checkpoint choice
SMALL_MODEL = 1_000_000  # elements: below this, embed on one thread


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise LayerlockError("embedding a watermark needs torch: pip install 'layerlock[torch]' (detecting "
                             "one does not)", code="needs_torch") from None
    return torch


# --- probes ------------------------------------------------------------------------------------------
Probe = Callable[[int], tuple["torch.Tensor", ...]]


def default_probe(model: torch.nn.Module, what: str = "the model") -> Probe:
    """Random inputs for ``model`` from its first layer (see the module docstring), by seed."""
    require_torch()
    import torch

    nn = torch.nn
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)), None)
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(first, nn.Embedding) and 1 <= len(params) <= 2:
        vocab = first.num_embeddings

        def tokens(seed: int) -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, vocab, (8, 32), generator=g)
            return (ids,) if len(params) == 1 else (ids, torch.ones_like(ids))
        return tokens
    if isinstance(first, nn.Linear) and len(params) == 1:
        width = first.in_features

        def rows(seed: int) -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(seed)
            k = 256 // 3
            return (torch.cat([torch.randn(k, width, generator=g), torch.rand(k, width, generator=g),
                               torch.rand(256 - 2 * k, width, generator=g)
                               * (torch.rand(256 - 2 * k, width, generator=g) < 0.5)]),)
        return rows
    kind = type(first).__name__ if first is not None else "no Linear or Embedding"
    raise InvalidInput(f"{what}: cannot make probe inputs for this model (first layer: {kind}, forward takes "
                       f"{len(params)} arguments); define probe(seed) in the task, returning model(*inputs)'s inputs")


def _flat(out: Any) -> torch.Tensor:
    import torch
    if isinstance(out, torch.Tensor):
        return out.reshape(out.shape[0], -1).float() if out.ndim else out.reshape(1, 1).float()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, list | tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
        return torch.cat([_flat(o).reshape(-1) for o in out]).reshape(1, -1)
    raise InvalidInput(f"the task's model returns {type(out).__name__}: fidelity needs a tensor (or tensors)")


# --- the hinge ---------------------------------------------------------------------------------------
class _Hinge:
    """The marked weights of named parameters, their projection and the hinge loss on it."""

    def __init__(self, key: WatermarkKey, params: Mapping[str, torch.Tensor], margin: float) -> None:
        import torch
        check_fits(key, {n: tuple(p.shape) for n, p in params.items()})
        self.key, self.margin = key, margin
        self.index = [(m.name, torch.from_numpy(m.positions.astype(np.int64))) for m in key.marks]
        self.x = torch.from_numpy(key.projection())
        self.s = torch.from_numpy(key.signature().astype(np.float32))
        with torch.no_grad():
            w = self.marked(params)
            self.scale = float(w.pow(2).mean().sqrt()) or 1.0

    def marked(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch
        first = params[self.index[0][0]]
        if first.device != self.x.device:  # a model on a GPU: move the projection there once
            self.x, self.s = self.x.to(first.device), self.s.to(first.device)
            self.index = [(n, i.to(first.device)) for n, i in self.index]
        return torch.cat([params[n].reshape(-1).float()[i] for n, i in self.index])

    def margins(self, w: torch.Tensor) -> torch.Tensor:
        """s_j (X w)_j in units of the marked weights' RMS (at the start)."""
        return self.s * (self.x @ w) / self.scale

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.relu(TARGET * self.margin - self.margins(w)).pow(2).mean()


class WatermarkRegularizer:
    """The watermark loss as a regularizer for a vendor's own training loop.

    Example (``model`` any ``nn.Module``; the key is placed on its weights as they are now, so
    build the regularizer from a trained or pretrained model when you can -- positions are the
    largest 30 % magnitudes *now*)::

        from layerlock.shared.watermark import new_key
        from layerlock.shared.watermark_torch import WatermarkRegularizer
        reg = WatermarkRegularizer(new_key(256), model)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + reg.loss(model)
            opt.zero_grad(); loss.backward(); opt.step()
        reg.key.save(Path("owner.wmkey"))  # secret: `layerlock watermark detect SUSPECT --key owner.wmkey`

    ``weight`` scales the term; ``reg.detection(model)`` checks the bits at any time.  The hinge
    is zero once every bit has its margin, so it stops pulling once the mark is in.
    """

    def __init__(self, key: WatermarkKey, model: torch.nn.Module, *, margin: float = MARGIN,
                 weight: float = 1.0) -> None:
        params = dict(model.named_parameters())
        if not key.marks:
            key = place(key, {n: p.detach().cpu().float().numpy() for n, p in params.items()})
        self.key, self.weight = key, weight
        self._hinge = _Hinge(key, params, margin)

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        """``weight`` x the hinge on the model's current weights (a scalar with gradients)."""
        params = dict(model.named_parameters())
        return self.weight * self._hinge.loss(self._hinge.marked(params))

    def detection(self, model: torch.nn.Module) -> Detection:
        """:func:`layerlock.shared.watermark.detect` on the model's current weights."""
        import torch

        with torch.no_grad():
            named = dict(model.named_parameters())
            return detect(self.key, {m.name: named[m.name].detach().cpu().float().numpy() for m in self.key.marks})


# --- post-hoc embedding ------------------------------------------------------------------------------
@dataclass
class EmbedReport:
    """What :func:`embed` did and what it cost."""

    detection: Detection
    steps: int
    seconds: float
    min_margin: float  # the smallest s_j (X w)_j / rms over the bits at the kept checkpoint
    weight_change: float  # ||w' - w|| / ||w|| over the marked tensors
    trained: list[str] = field(default_factory=list)
    fidelity: float | None = None  # relative output MSE on held-out probes (task only)
    score_before: float | None = None
    score_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 6)
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "min_margin": round(self.min_margin, 4),
                "weight_change": r(self.weight_change), "fidelity_mse": r(self.fidelity),
                "score_before": r(self.score_before), "score_after": r(self.score_after),
                "trained_tensors": len(self.trained), "detection": self.detection.as_dict()}


def embed(tensors: Mapping[str, torch.Tensor], key: WatermarkKey, task: Task | None = None, *,
          margin: float = MARGIN, max_steps: int = MAX_STEPS,
          progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], EmbedReport]:
    """Mark ``tensors`` (a state dict) with ``key``; returns the new state dict (same names and
    dtypes; only float tensors the optimisation touched differ) and a report.

    ``task``: a :class:`layerlock.shared.assess.Task` that builds the model, for the output
    fidelity term; without it only the marked positions move.  ``progress(step, bits_ok)``
    is called every step.
    """
    require_torch()
    import torch

    # A small model's steps are too short to share between threads: on a busy machine OpenMP's
    # hand-offs made digits steps ten times slower with 2 threads than with 1 (measured).
    threads = torch.get_num_threads()
    if sum(t.numel() for t in tensors.values()) < SMALL_MODEL:
        torch.set_num_threads(1)
    try:
        return _embed(tensors, key, task, margin, max_steps, progress)
    finally:
        torch.set_num_threads(threads)


def _embed(tensors: Mapping[str, torch.Tensor], key: WatermarkKey, task: Task | None, margin: float, max_steps: int,
           progress: Callable[[int, int], None] | None) -> tuple[dict[str, torch.Tensor], EmbedReport]:
    import torch

    t0 = time.monotonic()
    check_fits(key, {n: tuple(t.shape) for n, t in tensors.items()}, what="MODEL")
    for mk in key.marks:
        if not tensors[mk.name].is_floating_point():
            raise InvalidInput(f"{mk.name} is {tensors[mk.name].dtype}: only float tensors can carry the mark")
    names = [mk.name for mk in key.marks]
    before = {n: tensors[n].detach().float() for n in names}
    hinge = _Hinge(key, before, margin)
    out = dict(tensors)
    fidelity: float | None = None
    scores: tuple[float | None, float | None] = (None, None)
    # Stage 1: the marked values only, as one vector (whole tensors whose other elements never
    # get a gradient would also make Adam take square roots of zeros: measured 15 ms per 4,096).
    v0 = hinge.marked(before)
    v = torch.nn.Parameter(v0.clone())
    ms = float(v0.pow(2).mean()) or 1.0
    opt = torch.optim.Adam([v], lr=LR * math.sqrt(ms))
    # With a task to follow, stage 1 stops as soon as every bit has its margin: stage 2 settles.
    steps, final_margin = _optimise(hinge, lambda: v, [v], opt, lambda _: (v - v0).pow(2).mean() / ms,
                                    lambda: float((v - v0).pow(2).mean()), max_steps, progress, backoff=False,
                                    settle=task is None)
    with torch.no_grad():
        start = 0
        for n, idx in hinge.index:
            flat = before[n].clone().reshape(-1)
            flat[idx] = v[start:start + idx.numel()]
            start += idx.numel()
            out[n] = flat.reshape(tensors[n].shape).to(tensors[n].dtype).contiguous()
    trained = list(names)
    if task is not None and steps < max_steps:
        trained, fidelity, scores, more, final_margin = _fidelity(tensors, out, key, hinge, task, max_steps - steps,
                                                                   progress, steps)
        steps += more
    num = sum(float((out[n].float() - before[n]).pow(2).sum()) for n in names)
    den = sum(float(before[n].pow(2).sum()) for n in names)
    found = detect(key, {n: out[n].detach().float().numpy() for n in names})
    if found.matches < key.bits:
        raise LayerlockError(f"the mark did not take: {key.bits - found.matches} of {key.bits} bits wrong after "
                             f"{steps} steps (use fewer --bits, mark more tensors with --pattern, or raise --steps)",
                             code="watermark_failed")
    report = EmbedReport(found, steps, time.monotonic() - t0, final_margin, math.sqrt(num / den) if den else 0.0,
                         trained, fidelity, *scores)
    return out, report


def _fidelity(original: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor], key: WatermarkKey, hinge: _Hinge,
              task: Task, max_steps: int, progress: Callable[[int, int], None] | None,
              offset: int) -> tuple[list[str], float, tuple[float | None, float | None], int, float]:
    """Stage 2: from the stage-1 mark in ``out``, win the original's outputs back (updates ``out``).

    Returns (trained tensors, fidelity, (score before, score after), steps, smallest margin).
    """
    import torch

    model, fid_fn, check_fn = _task_model(original, key, task)
    score_before = task.score(model)
    model.eval()  # a task's score() may leave it training (dropout would add noise to fidelity)
    named = dict(model.named_parameters())
    marked = {m.name for m in key.marks}
    trained = [n for n, p in named.items() if p.is_floating_point() and n in original
               and (n in marked or not is_embedding(n, tuple(p.shape)))]
    with torch.no_grad():
        starts = {n: named[n].detach().clone() for n in trained}  # the original: the anchor's target
        for n in marked:
            named[n].copy_(out[n].float().reshape(named[n].shape))
    for n, p in named.items():
        p.requires_grad_(n in trained)
    mss = {n: float(starts[n].pow(2).mean()) for n in trained}
    floor = 1e-4 * (sum(mss.values()) / len(mss))
    scale = {n: max(v, floor) for n, v in mss.items()}
    opt = torch.optim.Adam([{"params": [named[n]], "lr": LR * math.sqrt(scale[n])} for n in trained])

    def extra(step: int) -> torch.Tensor:
        drift = sum(((named[n] - starts[n]).pow(2).mean() / scale[n] for n in trained), torch.zeros(()))
        return ANCHOR * drift / len(trained) + FIDELITY * fid_fn(step)

    def shifted(step: int, ok: int) -> None:
        if progress is not None:
            progress(offset + step, ok)
    steps, final_margin = _optimise(hinge, lambda: hinge.marked(named), [named[n] for n in trained], opt, extra,
                                    lambda: float(check_fn()), max_steps, shifted, backoff=True, settle=True)
    with torch.no_grad():
        fidelity = float(check_fn())
        score_after = task.score(model)
        for n in trained:
            out[n] = named[n].detach().to(original[n].dtype).reshape(original[n].shape).contiguous()
    return trained, fidelity, (score_before, score_after), steps, final_margin


def _optimise(hinge: _Hinge, marked: Callable[[], torch.Tensor], params: list[torch.Tensor], opt: Any,
              extra: Callable[[int], torch.Tensor], quality: Callable[[], float], max_steps: int,
              progress: Callable[[int, int], None] | None, backoff: bool, settle: bool) -> tuple[int, float]:
    """Adam until every bit has its margin, then on while ``quality`` (lower is better) gains;
    restores the best checkpoint among those where every bit has its margin.

    Settling stops after :data:`PATIENCE` checks (with every bit at its margin: the others are
    not comparable) without a 2 % gain, and not before :data:`MIN_SETTLE` steps.  The hinge
    weight grows by a quarter at every check where some bit still lacks its margin: the other
    terms pull back, and a fixed weight can leave the last few bits just short for ever.
    ``backoff``: the step ramps up over :data:`WARMUP` steps after every (re)start, and a later
    check :data:`WORSE` than the best checkpoint restores it and halves the step (at most
    :data:`MAX_HALVINGS` times).  ``settle=False``: stop at the first step where every bit has
    its margin.  Returns (steps taken, smallest
    margin at the kept checkpoint).
    """
    import torch

    best: tuple[float, int, list[torch.Tensor], float] | None = None
    first_ok: int | None = None
    gain, stale = math.inf, 0  # quality at the last real (> GAIN) improvement; all-ok checks since
    weight, halvings, restart = HINGE, 0, 0
    base = [group["lr"] for group in opt.param_groups]
    step = 0
    for step in range(max_steps + 1):
        if backoff:  # warm up after every (re)start: Adam's first steps are sign steps of the full size
            ramp = min(1.0, 0.1 + 0.9 * (step - restart) / WARMUP)
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * ramp / 2 ** halvings
        w = marked()
        with torch.no_grad():
            m = hinge.margins(w)
            ok = int((m >= hinge.margin).sum())
        if progress is not None:
            progress(step, ok)
        if ok < hinge.key.bits and step and step % CHECK_EVERY == 0:
            weight = min(weight * 1.25, HINGE * 1e4)
        if ok == hinge.key.bits and (step % CHECK_EVERY == 0 or first_ok is None):
            first_ok = step if first_ok is None else first_ok
            with torch.no_grad():
                q = quality()
            if best is None or q < best[0]:
                best = (q, step, [p.detach().clone() for p in params], float(m.min()))
            elif backoff and q > (1 + WORSE) * best[0] and step - restart >= WARMUP:
                if halvings == MAX_HALVINGS:
                    break
                halvings, restart = halvings + 1, step
                with torch.no_grad():
                    for p, saved in zip(params, best[2], strict=True):
                        p.copy_(saved)
                opt.state.clear()
                gain, stale = best[0], 0
                continue
            gain, stale = (q, 0) if q < (1 - GAIN) * gain else (gain, stale + 1)
        # Stop only where every bit has its margin: while some lack it, the hinge weight is still growing.
        if step == max_steps:
            break
        if ok == hinge.key.bits and first_ok is not None and (
                not settle or (step - first_ok >= MIN_SETTLE and stale >= PATIENCE)):
            break
        loss = weight * hinge.loss(w) + extra(step)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    with torch.no_grad():
        if best is not None:
            for p, saved in zip(params, best[2], strict=True):
                p.copy_(saved)
        return step, float(hinge.margins(marked()).min())


def _task_model(tensors: Mapping[str, torch.Tensor], key: WatermarkKey,
                task: Task) -> tuple[torch.nn.Module, Callable[[int], torch.Tensor], Callable[[], torch.Tensor]]:
    """The task's model on ``tensors`` (float32), its fidelity loss by step and its held-out check."""
    import torch
    model = task.module.build({n: (t.detach().float() if t.is_floating_point() else t) for n, t in tensors.items()})
    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(f"task {task.name}: build() returned {type(model).__name__}, not a torch module")
    names = dict(model.named_parameters())
    missing = [m.name for m in key.marks if m.name not in names]
    if missing:
        raise InvalidInput(f"task {task.name}: its model has no parameter {missing[0]} (a marked tensor); "
                           "build() must name parameters as the file does")
    model.eval()
    custom = getattr(task.module, "probe", None)
    probe: Probe = custom if callable(custom) else default_probe(model, f"task {task.name}")
    with torch.no_grad():
        batches = [probe(i) for i in range(PROBE_BATCHES + CHECK_BATCHES)]
        refs = [_flat(model(*b)) for b in batches]
    var = float(torch.cat([r.reshape(-1) for r in refs]).var()) or 1.0

    def fidelity(step: int) -> torch.Tensor:
        i = step % PROBE_BATCHES
        return (_flat(model(*batches[i])) - refs[i]).pow(2).mean() / var

    def check() -> torch.Tensor:
        return sum(((_flat(model(*batches[i])) - refs[i]).pow(2).mean() / var
                    for i in range(PROBE_BATCHES, PROBE_BATCHES + CHECK_BATCHES)), torch.zeros(())) / CHECK_BATCHES
    return model, fidelity, check
