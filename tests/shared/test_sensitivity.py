"""Fingerprint positions placed by a task's sensitivity (``protect --fingerprint-task``).

The claim: on the demo digits model the same number of positions at the same δ, placed where the
task's loss is flattest, changes far fewer held-out predictions than the data-free choice (the
largest locked weights) -- while every position stays among the larger weights, so magnitude
pruning still keeps them and the trace still names the license.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import x25519

from layerlock.demo.model import build, load_data, predict
from layerlock.license_server.cli import main
from layerlock.shared import fingerprint as fp
from layerlock.shared.bundle import read_header
from layerlock.shared.errors import InvalidInput
from layerlock.shared.keys import b64u_encode
from layerlock.shared.lockfile import protect
from layerlock.shared.restore import restore, write_fingerprint
from layerlock.shared.selection import LockPolicy
from layerlock.shared.sensitivity import fisher

LICENSES = 192


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    build(path)
    return path


def _copy(result, license_id: str) -> dict[str, np.ndarray]:
    """A license's unlocked model, the sidecar's way."""
    import io

    secret = fp.Secret.from_bytes(result.fingerprint)
    out = io.BytesIO(restore(result.locked_path, result.bundle_path, result.data_key))
    out.seek(0, io.SEEK_END)
    write_fingerprint(out, 0, read_header(result.bundle_path), fp.license_values(secret, license_id))
    return stnp.load(out.getvalue())


def test_fisher_is_zero_exactly_where_the_data_never_reaches(digits):
    tensors = stnp.load_file(digits)
    cost = fisher("digits", tensors, ["fc1.weight", "fc3.weight", "not-a-tensor"])
    assert set(cost) == {"fc1.weight", "fc3.weight"}
    assert cost["fc1.weight"].shape == (tensors["fc1.weight"].size,)
    x_train = load_data(0)[0]
    dead = np.flatnonzero(np.all(x_train == 0, axis=0))  # pixels blank in every training digit
    live = np.flatnonzero(x_train.mean(axis=0) > 0.3)
    assert len(dead) and len(live)
    per_input = cost["fc1.weight"].reshape(tensors["fc1.weight"].shape)  # (hidden, input)
    assert np.all(per_input[:, dead] == 0)
    assert np.all(per_input[:, live].sum(axis=0) > 0)
    assert np.all(cost["fc3.weight"] >= 0) and cost["fc3.weight"].sum() > 0


def test_task_placed_positions_change_far_fewer_predictions(digits, tmp_path):
    _, _, x_test, _ = load_data(0)
    tensors = stnp.load_file(digits)
    original = predict(tensors, x_test)
    ids = [f"lic_{i:016x}" for i in range(LICENSES)]
    changed, positions = {}, {}
    for task in (None, "digits"):
        res = protect(digits, tmp_path / str(task), model_id="digits-1",
                      policy=LockPolicy(fingerprint=True, fingerprint_task=task))
        assert res.fingerprint_task == task
        secret = fp.Secret.from_bytes(res.fingerprint)
        positions[task] = secret
        changed[task] = sum(int(np.sum(predict(_copy(res, lic), x_test) != original)) for lic in ids)
    # data-free: the larger half of the locked weights off the output head (fc1 only); by task: 70 %
    # of the larger half of all locked weights (head included), every one among the larger weights
    # (magnitude pruning keeps them)
    assert {s.tensor for s in positions[None].sites} == {"fc1.weight"}
    assert positions["digits"].n == round(fp.TASK_SHARE * (res.locked_params // 2))
    for site in positions["digits"].sites:
        rel = np.abs(tensors[site.tensor]).ravel() / tensors[site.tensor].std()
        assert rel[site.index].min() >= np.quantile(rel, 0.2)
    # measured (bench/trace.py, 1,024 licenses): 0.13 changed held-out digits per license without the
    # task (0.70 with positions on the head too), 0 with it
    assert changed[None] >= 8, changed
    assert changed["digits"] * 4 <= changed[None], changed


def _pool(n: int = 1000, tensors: int = 2):
    rng = np.random.default_rng(0)
    values = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i in range(tensors)}
    locked = {name: ("F32", (n // 10, 10), n) for name in values}
    return values, locked, (lambda name: (values[name], np.ones(n, dtype=bool)))


def test_choose_takes_the_cheapest_elements_above_the_magnitude_floor():
    values, locked, load = _pool(tensors=1)
    v = np.abs(values["t0"].astype(np.float64))
    secret = fp.choose("m", locked, load, bytes(32), sensitivity=lambda name: v)  # cost grows with magnitude
    plain = fp.choose("m", locked, load, bytes(32))
    assert secret is not None and plain is not None
    assert plain.n == 500 and secret.n == round(500 * fp.TASK_SHARE) == 350
    floor = np.quantile(v, fp.POOL_FLOOR)
    above = np.flatnonzero(v >= floor)
    expected = np.sort(above[np.argsort(v[above], kind="stable")[:350]])
    assert np.array_equal(secret.sites[0].index, expected)  # the 350 cheapest above the floor
    assert np.array_equal(plain.sites[0].index, np.sort(np.argsort(-v)[:500]))  # data-free: the largest half


def test_each_tensor_keeps_its_energy_whatever_its_number_of_positions():
    values, locked, load = _pool(n=20_000)
    # t0 nearly free, t1 dear: most positions land in t0, few in t1 -- each tensor's
    # fingerprint energy (positions x delta^2) stays ENERGY^2 x its locked elements x variance
    secret = fp.choose("m", locked, load, bytes(32),
                       sensitivity=lambda name: np.full(20_000, 1e-6 if name == "t0" else 1.0))
    assert secret is not None
    by = {s.tensor: s for s in secret.sites}
    assert len(by["t0"].index) > 5 * len(by.get("t1", by["t0"]).index) or "t1" not in by
    for site in secret.sites:
        sd = float(values[site.tensor].std(dtype=np.float64))
        alpha = site.scale / sd
        expected = min(fp.MAX_ALPHA, fp.ENERGY * np.sqrt(20_000 / len(site.index)))
        assert alpha == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [np.zeros(999), np.full(1000, np.nan)])
def test_a_malformed_sensitivity_is_refused(bad):
    _, locked, load = _pool()
    with pytest.raises(InvalidInput, match="one finite value per element"):
        fp.choose("m", locked, load, bytes(32), sensitivity=lambda name: bad)


TASKS = {
    "renamed": "build=lambda t: __import__('torch').nn.Linear(64, 64)\n",
    "vector loss": "loss=lambda m, b: m.fc1.weight.sum(dim=0)\n",
    "ends": "batches=lambda items, seed: iter([items])\n",
    "raises": "def loss(m, b):\n    raise RuntimeError('out of cheese')\n",
}


@pytest.mark.parametrize(("case", "message"), [
    ("renamed", "no parameter named like the file's tensors"),
    ("vector loss", "finite scalar"),
    ("ends", "endless iterator"),
    ("raises", "RuntimeError: out of cheese"),
])
def test_a_broken_task_is_one_clear_error(digits, tmp_path, case, message):
    task = tmp_path / "task.py"
    task.write_text("from layerlock.demo.digits_task import *\n" + TASKS[case])
    with pytest.raises(InvalidInput, match=message):
        fisher(str(task), stnp.load_file(digits), ["fc1.weight"])


def _intake(tmp_path: Path) -> Path:
    pub = x25519.X25519PrivateKey.generate().public_key()
    intake = tmp_path / "intake.pub"
    intake.write_text(b64u_encode(pub.public_bytes_raw()) + "\n")
    return intake


def test_cli_places_by_task_and_says_so(digits, tmp_path):
    r = CliRunner().invoke(main, ["protect", str(digits), "--intake-key", str(_intake(tmp_path)), "--out-dir",
                                  str(tmp_path / "out"), "--fingerprint-task", "digits", "--json"])
    assert r.exit_code == 0, r.output
    [item] = json.loads(r.stdout)
    assert item["fingerprint_task"] == "digits" and item["fingerprint_positions"] > 0
    r = CliRunner().invoke(main, ["protect", str(digits), "--intake-key", str(_intake(tmp_path)), "--out-dir",
                                  str(tmp_path / "out2"), "--fingerprint-task", "digits"])
    assert r.exit_code == 0 and "placed by task digits" in r.stdout, r.output


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--fingerprint-task", "no.such.module"], 1, "task no.such.module: failed to import"),
    (["--fingerprint-task", "missing.py"], 1, "no such file"),
    (["--fingerprint-task", "digits", "--no-fingerprint"], 2, "not with --no-fingerprint"),
])
def test_cli_bad_task_writes_nothing(digits, tmp_path, args, code, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["protect", str(digits), "--intake-key", str(_intake(tmp_path)), "--out-dir",
                                  str(out), *args])
    assert r.exit_code == code and message in r.stderr, r.output
    assert not out.exists() or not any(out.iterdir())


def test_cli_task_that_fails_while_measuring_writes_nothing(digits, tmp_path):
    """A task that imports but fails in loss(): one error line, exit 1, no key and no output files."""
    task = tmp_path / "task.py"
    task.write_text("from layerlock.demo.digits_task import *\n" + TASKS["raises"])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["protect", str(digits), "--intake-key", str(_intake(tmp_path)), "--out-dir",
                                  str(out), "--fingerprint-task", str(task)])
    assert r.exit_code == 1, r.output
    assert "RuntimeError: out of cheese" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_cli_task_with_a_raw_key_is_a_usage_error(digits, tmp_path):
    r = CliRunner().invoke(main, ["protect", str(digits), "--data-key-out", str(tmp_path / "k"), "--out-dir",
                                  str(tmp_path / "out"), "--fingerprint-task", "digits"])
    assert r.exit_code == 2 and "not with --no-fingerprint or --data-key-out" in r.stderr, r.output
    assert not (tmp_path / "k").exists() and not (tmp_path / "out").exists()


def test_a_locked_tensor_that_is_no_parameter_of_the_task_model_gets_no_cost(digits, tmp_path):
    """A float buffer's effect on the loss is not measured: it is left out, not priced at 0."""
    task = tmp_path / "buffer_task.py"
    task.write_text("from layerlock.demo.digits_task import *\n"
                    "from layerlock.demo import digits_task as _d\n"
                    "def build(tensors):\n"
                    "    m = _d.build(tensors)\n"
                    "    w = m.fc3.weight.detach().clone()\n"
                    "    del m.fc3.weight\n"
                    "    m.fc3.register_buffer('weight', w)\n"
                    "    return m\n")
    cost = fisher(str(task), stnp.load_file(digits), ["fc1.weight", "fc3.weight"], batches=4)
    assert set(cost) == {"fc1.weight"} and cost["fc1.weight"].sum() > 0


def test_fisher_reports_each_batch_for_the_progress_bar(digits):
    calls: list[int] = []
    fisher("digits", stnp.load_file(digits), ["fc1.weight"], batches=5, on_batch=lambda: calls.append(1))
    assert len(calls) == 5
    with pytest.raises(InvalidInput, match="at least one batch"):
        fisher("digits", stnp.load_file(digits), ["fc1.weight"], batches=0)
