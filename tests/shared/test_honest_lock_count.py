"""The locked count is true: a tensor counts as locked only if its bytes differ in the locked file.

A constant tensor (MiniLM's ``pooler.dense.bias`` is all zeros) used to get decoys of its own mean
and standard deviation, 0 -- i.e. itself -- and was still reported as locked.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors.numpy as stnp
from click.testing import CliRunner
from safetensors import safe_open

from layerlock.license_server.cli import main
from layerlock.shared.lockfile import protect, restore
from layerlock.shared.selection import LockPolicy


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "encoder.weight": rng.normal(0, 0.1, (16, 8)).astype(np.float32),
        "pooler.dense.bias": np.zeros(16, np.float32),             # all zeros
        "norm.weight": np.ones(16, np.float32),                     # constant, nonzero
        "half.weight": np.full((4, 4), -2.5, np.float16),
        "ids.buffer": np.full((1,), 7, np.int64),                   # one constant integer
        "mask": np.ones((3, 3), np.bool_),                          # all True
        "empty.weight": np.zeros((0, 4), np.float32),               # nothing to hide
    }


def _differing(src, locked) -> list[str]:
    with safe_open(str(src), "np") as a, safe_open(str(locked), "np") as b:
        return [n for n in a.keys() if a.get_tensor(n).tobytes() != b.get_tensor(n).tobytes()]  # noqa: SIM118


def test_locked_count_is_the_number_of_tensors_that_differ(tmp_path):
    src = tmp_path / "const.safetensors"
    stnp.save_file(_tensors(), src)
    for run in range(5):  # a fresh data key each time
        res = protect(src, tmp_path / f"o{run}", policy=LockPolicy(patterns=("*",), include_int=True))
        differ = _differing(src, res.locked_path)
        assert sorted(res.locked_tensors) == sorted(differ)
        assert set(_tensors()) - set(differ) == {"empty.weight"} and res.left_as_is == ["empty.weight"]
        assert res.locked_params == sum(_tensors()[n].size for n in differ)
        assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()
        zeros = stnp.load_file(res.locked_path)["pooler.dense.bias"]
        assert np.count_nonzero(zeros) > 8 and 0.001 < float(zeros.std()) < 0.1  # a plausible small spread


def test_protect_cli_reports_the_true_count(tmp_path):
    src = tmp_path / "m.safetensors"
    stnp.save_file(_tensors(), src)
    res = CliRunner().invoke(main, ["protect", str(src), "--pattern", "*", "--include-int",
                                    "--data-key-out", str(tmp_path / "k"),
                                    "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)[0]
    assert doc["locked_tensors"] == len(_differing(src, tmp_path / "m.locked.safetensors")) == len(_tensors()) - 1
