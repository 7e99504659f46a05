"""The default policy makes a real (small) model useless, and restore gives it back exactly.

A 64-64-32-10 MLP trained on scikit-learn's digits (a second or two), saved as safetensors,
protected with the default policy: the locked file must score near chance, the restored one
exactly the original accuracy.  The locked score depends on the data key (the decoys derive
from it), so the README states a range and a mean over 10,000 keys; this test checks that claim
on 20 fixed keys (deterministic) and one random key, reading the numbers from the README.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import numpy as np
import safetensors.numpy as stnp

from layerlock.shared.lockfile import protect, restore
from layerlock.shared.selection import LockPolicy

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_claim() -> tuple[float, float, float]:
    """(low, high, mean) of the locked score, as the README's Measured section states them."""
    text = " ".join(README.read_text().split())
    m = re.search(r"test_digits_accuracy\.py.*?the locked file scores ([0-9.]+)–([0-9.]+) over [0-9,]+ data keys, "
                  r"mean ([0-9.]+)", text)
    assert m, "README no longer states the locked score range of test_digits_accuracy.py"
    return float(m[1]), float(m[2]), float(m[3])


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

    low, high, mean = readme_claim()
    scores = []
    for i in range(21):  # 20 fixed data keys, then the random one protect picks itself
        key = hashlib.sha256(f"digits-{i}".encode()).digest() if i < 20 else None
        res = protect(src, tmp_path / f"out{i}", policy=LockPolicy(), data_key=key)
        with np.errstate(all="ignore"):  # decoy weights may overflow: that is the point
            scores.append(float((_forward(stnp.load_file(res.locked_path), xte) == yte).mean()))
    restored_bytes = restore(res.locked_path, res.bundle_path, res.data_key)
    restored = float((_forward(stnp.load(restored_bytes), xte) == yte).mean())
    print(f"\ndigits: original={original:.3f} locked={min(scores):.3f}-{max(scores):.3f} "
          f"(mean {np.mean(scores):.3f}) restored={restored:.3f} "
          f"locked {res.fraction:.1%} of {res.total_params} params ({', '.join(res.locked_tensors)})")
    assert all(low <= s <= high for s in scores), (scores, "README says", low, high)
    assert abs(float(np.mean(scores)) - mean) <= 0.03, (scores, "README says mean", mean)  # sd of a 21-mean: 0.007
    assert 0.31 <= res.fraction <= 0.34  # the README's "33 % of parameters locked"
    assert res.locked_tensors == ["fc1.weight", "fc3.weight"]  # fc1's informative input columns, the head
    assert restored == original and restored_bytes == src.read_bytes()
