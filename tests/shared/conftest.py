"""Helpers for the lock-format tests: small real model files written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp


def mlp_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.normal(0, 0.5, (32, 16)).astype(np.float32),
        "fc1.bias": rng.normal(0, 0.1, 32).astype(np.float32),
        "fc2.weight": rng.normal(0, 0.5, (24, 32)).astype(np.float32),
        "fc2.bias": rng.normal(0, 0.1, 24).astype(np.float32),
        "fc3.weight": rng.normal(0, 0.5, (10, 24)).astype(np.float32),
        "fc3.bias": rng.normal(0, 0.1, 10).astype(np.float32),
    }


@pytest.fixture
def mlp() -> dict[str, np.ndarray]:
    """A tiny 16-32-24-10 MLP's weights (seeded, so every test sees the same values)."""
    return mlp_tensors()


@pytest.fixture
def small_model(tmp_path: Path, mlp: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "small.safetensors"
    stnp.save_file(mlp, path)
    return path
