"""Where a fingerprint is invisible: how much each weight matters to the vendor's task.

A fingerprint moves about a thousand weights by ±δ.  Whether a user notices depends on *which*
weights: on the demo digits model, the largest-magnitude locked weights (the data-free choice)
change 0.68 of 450 held-out predictions per license on average and up to 4 (0.89 points), 0.13
and up to 2 when kept off the output head; placed where the task's loss is flattest (70 % as many
at the same energy), none of 1,024 licenses changes a prediction (README "Tracing a leak").

The measure is the diagonal of the empirical Fisher information of the task's loss,
``F_i = Σ_batches (∂loss/∂w_i)²`` over the vendor's own training data: to second order a
perturbation ``δ·s`` costs ``½·Σ δ²·F_i`` of loss, so the positions of least ``F_i·δ²`` are those
whose fingerprint the model's outputs feel least.  Small batch gradients of a trained model are
mostly per-sample noise, so their squares sum to a multiple of the per-sample Fisher -- the
ranking is all :func:`layerlock.shared.fingerprint.choose` uses.  A bonus: a weight with a small
gradient on the vendor's data also moves little when an attacker fine-tunes on similar data.

The task is the module ``layerlock assess`` runs (:mod:`layerlock.shared.assess`): ``build``,
``data``, ``batches`` and ``loss``.  Only the vendor runs this, at protect time, on its own model
and data; nothing it computes is stored beyond the positions it picks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from layerlock.shared.errors import InvalidInput

BATCHES = 64  # mini-batch gradients summed: the ranking is stable from ~20 on (digits: 22 vs 200 agree)


def fisher(task_spec: str, tensors: Mapping[str, np.ndarray], names: Collection[str], *, batches: int = BATCHES,
           seed: int = 0, on_batch: Callable[[], object] | None = None) -> dict[str, np.ndarray]:
    """Per-element ``Σ (∂loss/∂w)²`` (flat float64) for each tensor in ``names``.

    ``tensors`` is the whole model (name -> array); the task builds it, draws ``batches`` batches
    of all its training data (``data(1.0, seed)``) and back-propagates its loss.  A parameter the
    loss does not reach gets zeros (perturbing it changes nothing the task measures); a name that
    is not a parameter of the task's model (a buffer) is left out: its cost is unknown.  A task that
    cannot be loaded, a ``build`` whose parameters are not named like the file's tensors, or a
    loss that is not a finite scalar: InvalidInput naming the task.  ``on_batch`` is called after
    each batch (a progress bar: on a large model this is the slow part of protect)."""
    from layerlock.shared.assess import load_task

    if batches < 1:
        raise InvalidInput("sensitivity needs at least one batch")
    task = load_task(task_spec)
    try:
        import torch
    except ImportError:
        raise InvalidInput("--fingerprint-task needs PyTorch: pip install 'layerlock[torch]'") from None
    try:
        model = task.build(dict(tensors))
        params = dict(model.named_parameters())
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report it, do not crash protect
        raise InvalidInput(_user_error(task_spec, "build", exc)) from None
    wanted = [n for n in names if n in tensors]
    known = [n for n in wanted if n in params]
    if wanted and not known:
        raise InvalidInput(f"task {task_spec}: its model has no parameter named like the file's tensors "
                           f"(e.g. {wanted[0]!r}); build() must keep the state dict's names")
    out = {n: np.zeros(tensors[n].size, dtype=np.float64) for n in known}
    torch.manual_seed(seed)
    try:
        stream = iter(task.module.batches(task.module.data(1.0, seed), seed))
        for _ in range(batches):
            model.zero_grad(set_to_none=True)
            loss: Any = task.module.loss(model, next(stream))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not bool(torch.isfinite(loss)):
                raise InvalidInput(f"task {task_spec}: loss() must return a finite scalar tensor")
            loss.backward()  # type: ignore[no-untyped-call]
            for n in known:
                grad = params[n].grad
                if grad is not None:
                    out[n] += grad.detach().double().numpy().ravel() ** 2
            if on_batch is not None:
                on_batch()
    except (InvalidInput, KeyboardInterrupt):
        raise
    except StopIteration:
        raise InvalidInput(f"task {task_spec}: batches() ended; it must be an endless iterator") from None
    except Exception as exc:  # noqa: BLE001 - user code
        raise InvalidInput(_user_error(task_spec, "data/batches/loss", exc)) from None
    return out


def _user_error(task: str, where: str, exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"task {task}: {where} failed ({type(exc).__name__}: {first})"
