"""``layerlock trace SUSPECT --model ID --original ORIGINAL`` against a real server: a copy drifted
far enough to hide from the default trace is named when the vendor gives the original; the
original never travels (the server's API is unchanged); bad ``--original`` input is a precise
error with exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ls_helpers import issue, new_machine, register

from layerlock.shared.fingerprint import Secret, license_values
from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.lockfile import protect
from layerlock.shared.selection import LockPolicy
from layerlock.shared.wrap import seal_for_server

REPO = Path(__file__).resolve().parents[2]
MODEL = "fp-informed"


def _save(tensors: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def leaked(server, tmp_path_factory) -> dict[str, Any]:
    """A fingerprinted model, one license, and that license's copy after a heavy uneven drift."""
    root = tmp_path_factory.mktemp("informed")
    rng = np.random.default_rng(11)
    tensors = {"a.weight": rng.standard_normal((64, 64)).astype(np.float32),
               "a.bias": rng.standard_normal(64).astype(np.float32)}
    original = _save(tensors, root / "original.safetensors")
    res = protect(original, root / "out", model_id=MODEL, policy=LockPolicy(fingerprint=True))
    assert res.fingerprint is not None
    doc = seal_for_server(res.data_key, x25519_public(b64u_decode(server.intake_pub)), MODEL, res.fingerprint)
    assert server.api("POST", "/v1/models", {"model_id": MODEL, "sealed_key": doc}).status_code == 201
    m = new_machine()
    register(server, m)
    lic = issue(server, m, MODEL)["license_id"]
    secret = Secret.from_bytes(res.fingerprint)
    copy = {k: v.copy() for k, v in tensors.items()}
    values, pos = license_values(secret, lic), 0
    for site in secret.sites:
        k = len(site.index)
        copy[site.tensor].ravel()[site.index] = np.frombuffer(values[4 * pos:4 * (pos + k)], "<f4")
        pos += k
    # fine-tuning's shape: inputs that are never active do not move, the others move by many δ
    delta = max(s.scale for s in secret.sites)
    cols = np.where(np.arange(64) % 8 == 0, 0.05, 8.0) * delta
    copy["a.weight"] = copy["a.weight"] + rng.standard_normal((64, 64)).astype(np.float32) * cols[None, :]
    return {"license": lic, "original": original, "suspect": _save(copy, root / "leak.safetensors"), "root": root}


def _trace(server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAYERLOCK_SERVER": server.url,
           "LAYERLOCK_API_KEY": server.admin_key}
    return subprocess.run([sys.executable, "-m", "layerlock.license_server.cli", "trace", *args, "--model", MODEL],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_original_names_the_license_the_default_trace_misses(server, leaked):
    plain = _trace(server, str(leaked["suspect"]), "--json")
    assert plain.returncode == 3, plain.stderr
    doc = json.loads(plain.stdout)
    assert doc["named"] == [] and doc["detection"] == "uninformed"
    informed = _trace(server, str(leaked["suspect"]), "--original", str(leaked["original"]), "--json")
    assert informed.returncode == 0, informed.stderr
    doc = json.loads(informed.stdout)
    assert doc["named"] == [leaked["license"]] and doc["detection"] == "informed"
    assert doc["original"] == "original.safetensors" and doc["alignments"] == 2  # same bound: K = 2
    assert doc["ranking"][0]["score"] >= doc["threshold"] and doc["ranking"][0]["false_positive_bound"] < 1e-9
    text = _trace(server, str(leaked["suspect"]), "--original", str(leaked["original"]))
    assert text.returncode == 0 and "detection: informed" in text.stdout and leaked["license"] in text.stdout
    # the original traced against itself: nobody
    itself = _trace(server, str(leaked["original"]), "--original", str(leaked["original"]), "--json")
    assert itself.returncode == 3 and json.loads(itself.stdout)["named"] == []


def test_a_bad_original_is_a_precise_error(server, leaked):
    missing = _trace(server, str(leaked["suspect"]), "--original", str(leaked["root"] / "nope.safetensors"))
    assert missing.returncode == 1 and "nope.safetensors: no such file" in missing.stderr
    other = _save({"z": np.zeros((3, 3), np.float32)}, leaked["root"] / "other.safetensors")
    wrong = _trace(server, str(leaked["suspect"]), "--original", str(other))
    assert wrong.returncode == 1 and "original model has no tensor 'a.weight'" in wrong.stderr
    garbage = leaked["root"] / "garbage.safetensors"
    garbage.write_bytes(b"not a model")
    bad = _trace(server, str(leaked["suspect"]), "--original", str(garbage))
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
