"""A ``layerlock assess`` task for the demo digits model (``layerlock.demo.model``).

A task module tells the attack battery how to turn a state dict into a model, how to score it
and how to train it; see :mod:`layerlock.shared.assess` for the interface.  This one: a
perceptron with layers ``fc1``, ``fc2``, ``fc3`` (sizes read from the tensors; 64-64-32-10 when
freshly made), ReLU between them, scored by accuracy on the 450 held-out digits of
``layerlock.demo.model.load_data`` (chance 0.10); the attacker's data is a class-balanced share
of the 1,347 training digits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from layerlock.demo.model import load_data

name = "digits accuracy (450 held-out 8x8 digits)"
chance = 0.10
finetune = {"steps": 300, "lrs": [1e-3, 1e-2], "restarts": 3}

_data: dict[str, Any] = {}


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if "split" not in _data:
        _data["split"] = load_data(0)
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] = _data["split"]
    return split


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (64, 64, 32, 10)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build(tensors: dict[str, torch.Tensor] | None) -> MLP:
    """The MLP holding ``tensors`` (``fc{1,2,3}.{weight,bias}``), or a freshly initialised one."""
    if tensors is None:
        return MLP()
    w = [tensors[f"fc{i}.weight"] for i in (1, 2, 3)]
    model = MLP((w[0].shape[1], w[0].shape[0], w[1].shape[0], w[2].shape[0]))
    model.load_state_dict({k: torch.as_tensor(v).float() for k, v in tensors.items()})
    return model


def score(model: MLP) -> float:
    _, _, x, y = _split()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def data(fraction: float, seed: int, classes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced share of the training digits (at least one per class)."""
    x, y, _, _ = _split()
    rng = np.random.default_rng(1000 + seed)
    per = max(1, round(fraction * len(x) / 10))
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in (classes or range(10))])
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def batches(items: tuple[torch.Tensor, torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of 64 (the whole share when smaller), epoch after epoch."""
    x, y = items
    rng = np.random.default_rng(seed)
    while True:
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            yield x[idx], y[idx]


def loss(model: MLP, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def train(tensors: dict[str, torch.Tensor] | None, items: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float,
          seed: int = 0, frozen: tuple[str, ...] = ()) -> MLP:
    """Adam on ``items``; parameters named in ``frozen`` stay as they are (to make bench models)."""
    torch.manual_seed(seed)
    model = build(tensors)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n not in frozen], lr=lr)
    stream = batches(items, seed)
    for _ in range(steps):
        opt.zero_grad()
        loss(model, next(stream)).backward()
        opt.step()
    return model
