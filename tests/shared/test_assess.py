"""``layerlock assess``: a small, fast version of every attack on both shipped tasks, and its errors.

The full figures (3 seeds, 1/5/10 % data, MiniLM) come from ``bench/strength.py``; here the
battery runs with one seed, one budget and a few training steps, so what is checked is that
every attack runs and reports, that RU means what it says, and that bad input is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
from click.testing import CliRunner

from layerlock.license_server.cli import main
from layerlock.shared.assess import (
    Report,
    Row,
    assess,
    detect,
    load_task,
    locked_masks,
    residual,
    resolution_notes,
    verdict,
)
from layerlock.shared.errors import InvalidInput


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    from layerlock.demo.model import build

    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    build(path)
    return path


def test_residual_utility():
    assert residual(0.9, 1.0, 0.5) == pytest.approx(0.8)
    assert residual(0.5, 1.0, 0.5) == 0.0 and residual(0.3, 1.0, 0.5) < 0
    assert residual(0.99, 1.0, 0.99) is None  # the file adds nothing over the alternative: undefined


def test_a_small_gap_to_the_original_gets_a_note_on_how_coarse_ru_is():
    rows = [Row("A2", "whole model", 0.01, 0.64, 0.60, residual(0.64, 0.99, 0.60)),
            Row("C", "start from random values", 0.1, 0.89, 0.899, None),
            Row("A2", "whole model", 0.1, 0.91, 0.899, residual(0.91, 0.99, 0.899))]
    notes = resolution_notes(rows, 0.99)
    assert len(notes) == 1  # 1 %: the gap is 0.39, RU is fine there
    assert notes[0].startswith("at 10% data") and "0.8990" in notes[0]
    assert "one point of score is RU 0.11" in notes[0]  # 0.01 / (0.99 - 0.899)
    assert resolution_notes(rows[:1], 0.99) == []
    # under MIN_GAP RU is undefined anyway (n/a): no note about its resolution
    assert resolution_notes([Row("A2", "whole model", 0.1, 0.98, 0.985, None)], 0.99) == []


def test_masks_and_detector():
    rng = np.random.default_rng(0)
    a = {f"l{i}.weight": rng.normal(size=(20, 20)).astype(np.float32) for i in range(6)}
    b = dict(a)
    b["l0.weight"] = a["l0.weight"].copy()
    b["l0.weight"][:, :5] = 0.0
    masks = locked_masks(a, b)
    assert list(masks) == ["l0.weight"] and masks["l0.weight"].sum() == 100
    det = detect(b, masks)
    assert det["auc"] is None and "fewer than 2" in det["why"]  # one locked tensor: nothing to train on
    assert det["slices"]["l0.weight columns"] > 0.9  # zeroed columns stand out


def test_detector_reports_what_the_choice_of_tensors_gives_away():
    """Lock every tensor of one kind (heavy-tailed tables) with decoys that keep each one's
    statistics: the detector still tells them apart -- by kind, as it does on the original."""
    rng = np.random.default_rng(1)
    orig = {f"table{i}": rng.standard_t(2, size=(40, 16)).astype(np.float32) for i in range(6)}
    orig |= {f"layer{i}.weight": rng.normal(size=(16, 16)).astype(np.float32) for i in range(12)}
    locked = dict(orig)
    for i in range(6):
        t = orig[f"table{i}"]
        locked[f"table{i}"] = rng.permutation(t.ravel()).reshape(t.shape)  # same values, shuffled
    masks = locked_masks(orig, locked)
    det = detect(locked, masks, original=orig)
    assert det["kind_auc"] > 0.9 and det["auc"] > 0.9
    assert "kind_auc" not in detect(locked, masks)


@pytest.mark.parametrize(("detector", "words"), [
    ({"auc": 0.55}, "strong"),
    ({"auc": 0.70, "kind_auc": 0.76}, "tell the locked tensors (AUC 0.70; 0.76 on the original: the choice"),
    ({"auc": 0.80, "kind_auc": 0.60}, "tell the locked tensors (AUC 0.80)"),
])
def test_verdict_says_why_a_lock_with_no_attack_above_goal_is_only_fair(detector, words):
    rows = [Row("A0", "locked file as shipped", 0.0, 0.05, 0.021, 0.03), Row("A2", "whole model", 0.1, 0.3, 0.3, -0.1)]
    report = Report("t", 0.021, 0.97, 0.3, 4, rows, detector, 1.0, 3)
    assert words in verdict(report)


def test_digits_battery_every_attack(digits_model, tmp_path):
    r = cli("assess", str(digits_model), "--task", "digits", "--budgets", "0.1", "--seeds", "1", "--steps", "20",
            "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0.3 <= doc["locked_fraction"] <= 0.34 and doc["original"] > 0.95
    attacks = {(a["attack"], a["variant"]) for a in doc["attacks"]}
    assert {("A0", "locked file as shipped"), ("A1", "reset to zeros"), ("A1", "reset to init"),
            ("A1", "reset to mean"), ("A1", "reset to draw"), ("A2", "locked tensors only"), ("A2", "whole model"),
            ("A2", "reset, then whole model")} <= attacks
    a0 = next(a for a in doc["attacks"] if a["attack"] == "A0")
    assert a0["score"] <= 0.3 and a0["alternative"] == 0.1
    assert "auc" in doc["detector"] and doc["verdict"]
    r = cli("assess", str(digits_model), "--task", "digits", "--budgets", "0.1", "--seeds", "1", "--steps", "5",
            "--pattern", "fc2.*")  # text output, another policy
    assert r.exit_code == 0, r.output
    assert "A3      neighbour substitution" not in r.stdout  # fc2 has no same-shape neighbour
    assert r.stdout.splitlines()[-1].startswith("verdict: ") and "RU" in r.stdout


def test_base_attacks_on_a_fine_tune(tmp_path):
    """A4 runs with a base; with --base, substituting the base gives the base, not the fine-tune."""
    import safetensors.torch as sttorch

    from layerlock.demo import digits_task as task

    base = task.train(None, task.data(1.0, 0, classes=(0, 1, 2, 3, 4)), steps=100, lr=3e-3)
    tuned = task.train({k: v.detach() for k, v in base.state_dict().items()}, task.data(1.0, 0), steps=100,
                       lr=3e-3, seed=1, frozen=("fc1.weight", "fc1.bias"))
    sttorch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    sttorch.save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tmp_path / "ft.safetensors")
    r = cli("assess", str(tmp_path / "ft.safetensors"), "--task", "digits", "--base",
            str(tmp_path / "base.safetensors"), "--budgets", "0.1", "--seeds", "1", "--steps", "10", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # fc2 and fc3 rows: what the fine-tune changed (rows of units that never fire did not move)
    assert 0.1 < doc["locked_fraction"] < 0.37 and doc["locked_tensors"] <= 4
    rows = {(a["attack"], a["variant"]): a for a in doc["attacks"]}
    a4 = rows[("A4", "base substituted")]
    assert a4["ru"] is not None and a4["ru"] <= 0.05 and a4["score"] == rows[("A0", "locked file as shipped")]["score"]
    assert ("A4", "base substituted, then whole model") in rows
    assert any(n.startswith("base alone scores") for n in doc["notes"])


def test_tiny_encoder_battery(tmp_path):
    """The encoder task on a tiny BERT (2 layers, 64 wide, word-level vocabulary)."""
    import safetensors.torch as sttorch

    from layerlock.demo import encoder_task as task

    task.configure(tiny=True)
    try:
        model = task.train(None, task.queries("train"), steps=30, lr=1e-3)
        sttorch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "enc.safetensors")
        original = stnp.load_file(tmp_path / "enc.safetensors")
        r = cli("protect", str(tmp_path / "enc.safetensors"), "--data-key-out", str(tmp_path / "k"), "--json")
        assert r.exit_code == 0, r.output
        [doc] = json.loads(r.stdout)
        parts = {lock["name"]: lock["part"] for lock in doc["locks"]}
        assert parts["embeddings.word_embeddings.weight"] == "whole (121 rows)"  # a small table: all of it
        assert "embeddings.position_ids" not in parts
        locked = stnp.load_file(tmp_path / "enc.locked.safetensors")
        report = assess(original, locked, load_task("encoder"), budgets=(0.1,), seeds=1, steps=3)
        variants = {(row.attack, row.variant) for row in report.rows}
        assert ("A3", "neighbour substitution") in variants and ("A2", "whole model") in variants
        assert report.original > 0.3 and report.rows[0].score < report.original
    finally:
        task.configure(tiny=False)


def test_task_errors_are_one_line(digits_model, tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_anywhere\n")
    (tmp_path / "partial.py").write_text("def build(t):\n    return None\n")
    (tmp_path / "wrongmodel.py").write_text(
        "name = 'x'\nchance = 0.1\n"
        "def build(t):\n    raise RuntimeError('expected fc9.weight')\n"
        "def score(m):\n    return 0.0\ndef data(f, s):\n    return []\ndef batches(i, s):\n    yield from i\n"
        "def loss(m, b):\n    return 0\n")
    for spec, message in (("broken.py", "failed to import (ModuleNotFoundError"), ("partial.py", "missing score"),
                          ("nope.py", "no such file"), ("wrongmodel.py", "failed on this model: RuntimeError"),
                          ("no.such.module", "failed to import")):
        target = str(tmp_path / spec) if spec.endswith(".py") else spec
        r = cli("assess", str(digits_model), "--task", target, "--budgets", "0.1", "--seeds", "1")
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and message in r.stderr, (spec, r.output)
        assert r.stderr.count("\n") == 1
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    for args, message in ((["--budgets", "2"], "fractions in (0, 1]"),
                          (["--locked", str(tmp_path / "junk.safetensors")], "not a safetensors file"),
                          (["--base", str(tmp_path / "junk.safetensors")], "not a safetensors file")):
        r = cli("assess", str(digits_model), "--task", "digits", *args)
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and message in r.stderr, (args, r.output)
    with pytest.raises(InvalidInput, match="nothing is locked"):
        t = stnp.load_file(digits_model)
        assess(t, t, load_task("digits"))
