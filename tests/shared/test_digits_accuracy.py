"""The default policy makes a real (small) model useless, and restore gives it back exactly.

A 64-64-32-10 MLP trained on scikit-learn's digits (a second or two), saved as safetensors,
protected with the default policy: the locked file must score near chance, the restored one
exactly the original accuracy.
"""

from __future__ import annotations

import warnings

import numpy as np
import safetensors.numpy as stnp

from layerlock.shared.lockfile import protect, restore
from layerlock.shared.selection import LockPolicy


def _forward(t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = x
    for i in (1, 2, 3):
        h = h @ t[f"fc{i}.weight"].T.astype(np.float64) + t[f"fc{i}.bias"]
        if i < 3:
            h = np.maximum(h, 0)
    return h.argmax(axis=1)


def test_default_policy_makes_digits_model_useless(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=200, random_state=0).fit(xtr, ytr)
    tensors = {}
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True), start=1):
        tensors[f"fc{i}.weight"] = np.ascontiguousarray(w.T, dtype=np.float32)
        tensors[f"fc{i}.bias"] = b.astype(np.float32)
    src = tmp_path / "digits.safetensors"
    stnp.save_file(tensors, src)
    original = float((_forward(tensors, xte) == yte).mean())
    assert original > 0.9

    res = protect(src, policy=LockPolicy())
    locked = float((_forward(stnp.load_file(res.locked_path), xte) == yte).mean())
    restored_bytes = restore(res.locked_path, res.bundle_path, res.data_key)
    restored = float((_forward(stnp.load(restored_bytes), xte) == yte).mean())
    print(f"\ndigits: original={original:.3f} locked={locked:.3f} restored={restored:.3f} "
          f"locked {res.fraction:.1%} of {res.total_params} params ({', '.join(res.locked_tensors)})")
    assert locked <= 0.25
    assert restored == original and restored_bytes == src.read_bytes()
