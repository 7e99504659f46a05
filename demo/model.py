"""A small digits classifier that trains in seconds, so the demo needs no model hub.

A three-layer perceptron in plain numpy on scikit-learn's bundled 8×8 digits set (shipped
inside the scikit-learn wheel: nothing is downloaded).  It is deliberately an ordinary model
saved as an ordinary safetensors file: the same path a vendor's real model takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYERS = ("fc1", "fc2", "fc3")


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test split of the digits set, features scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.75 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def predict(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = x
    for i, name in enumerate(LAYERS):
        h = h @ weights[f"{name}.weight"].astype(np.float32).T + weights[f"{name}.bias"].astype(np.float32)
        if i < len(LAYERS) - 1:
            h = np.maximum(h, 0.0)
    out: np.ndarray = np.argmax(h, axis=1)
    return out


def accuracy(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    with np.errstate(all="ignore"):  # decoy weights may overflow: that is the point
        return float(np.mean(predict(weights, x) == y))


def train(x: np.ndarray, y: np.ndarray, *, hidden: tuple[int, int] = (64, 32), epochs: int = 60,
          lr: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """Mini-batch SGD with momentum on softmax cross-entropy; about a second on one core."""
    rng = np.random.default_rng(seed)
    sizes = [x.shape[1], *hidden, 10]
    w: dict[str, np.ndarray] = {}
    for name, (n_in, n_out) in zip(LAYERS, zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        w[f"{name}.weight"] = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        w[f"{name}.bias"] = np.zeros(n_out, dtype=np.float32)
    velocity = {k: np.zeros_like(v) for k, v in w.items()}
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 32):
            idx = order[start:start + 32]
            acts = [x[idx]]
            for i, name in enumerate(LAYERS):
                z = acts[-1] @ w[f"{name}.weight"].T + w[f"{name}.bias"]
                acts.append(np.maximum(z, 0.0) if i < len(LAYERS) - 1 else z)
            logits = acts[-1] - acts[-1].max(axis=1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            grad = (probs - onehot[idx]) / len(idx)
            for i in reversed(range(len(LAYERS))):
                name = LAYERS[i]
                gw, gb = grad.T @ acts[i], grad.sum(axis=0)
                if i > 0:
                    grad = (grad @ w[f"{name}.weight"]) * (acts[i] > 0)
                for key, g in ((f"{name}.weight", gw), (f"{name}.bias", gb)):
                    velocity[key] = 0.9 * velocity[key] - lr * g
                    w[key] += velocity[key]
    return w


def build(path: Path, seed: int = 0) -> float:
    """Train, save to ``path`` as safetensors, return the test accuracy."""
    from safetensors.numpy import save_file

    x_train, y_train, x_test, y_test = load_data(seed)
    weights = train(x_train, y_train, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))
    return accuracy(weights, x_test, y_test)
