"""Value-aware lock plans: the default (input interface), --base, integer buffers, bundle version 2,
and ``layerlock inspect`` / ``protect`` reporting what they lock."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
from click.testing import CliRunner

from layerlock.license_server.cli import main
from layerlock.shared.bundle import VERSION, VERSION_RUNS, read_header
from layerlock.shared.errors import BundleFormatError, InvalidInput
from layerlock.shared.lockfile import protect, restore
from layerlock.shared.plan import axis_runs
from layerlock.shared.selection import LockPolicy


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _digits_like(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 64-64-32-10 MLP whose first 20 input columns are "trained" (large), the rest near init."""
    w1 = rng.normal(0, 0.05, (64, 64)).astype(np.float32)
    w1[:, :20] = rng.normal(0, 0.5, (64, 20))
    return {"fc1.weight": w1, "fc1.bias": rng.normal(0, 0.1, 64).astype(np.float32),
            "fc2.weight": rng.normal(0, 0.3, (32, 64)).astype(np.float32),
            "fc2.bias": rng.normal(0, 0.1, 32).astype(np.float32),
            "fc3.weight": rng.normal(0, 0.3, (10, 32)).astype(np.float32),
            "fc3.bias": rng.normal(0, 0.1, 10).astype(np.float32)}


def test_axis_runs():
    assert axis_runs((4, 3), 0, [1, 2]) == [(3, 6)]
    assert axis_runs((2, 4), 1, [0, 1, 3]) == [(0, 2), (3, 3), (7, 1)]
    assert axis_runs((2, 3, 2), 1, [2]) == [(4, 2), (10, 2)]


def test_default_locks_the_informative_input_columns_and_the_head(tmp_path):
    src = tmp_path / "m.safetensors"
    t = _digits_like(np.random.default_rng(0))
    stnp.save_file(t, src)
    res = protect(src, tmp_path / "o")
    assert [d["name"] for d in res.locks] == ["fc1.weight", "fc3.weight"]
    assert res.locks[0]["part"] == "input columns 29 of 64" and res.locks[1]["part"] == "whole (the output head)"
    assert res.fraction <= 0.34 and res.policy == "default"
    locked = stnp.load_file(res.locked_path)
    changed = np.flatnonzero((locked["fc1.weight"] != t["fc1.weight"]).all(axis=0))
    assert set(range(20)) <= set(changed.tolist()) and len(changed) == 29  # the large (trained) columns first
    assert (locked["fc1.weight"] == t["fc1.weight"]).sum() == 64 * 35  # every other element untouched
    assert np.array_equal(locked["fc2.weight"], t["fc2.weight"])
    hdr = read_header(res.bundle_path)
    assert hdr.version == VERSION_RUNS and hdr.plain_size == (29 * 64 + 320) * 4
    assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()


def test_default_on_an_encoder_locks_embedding_rows(tmp_path):
    rng = np.random.default_rng(1)
    words = rng.normal(0, 0.02, (3000, 16)).astype(np.float32)
    words[100:1100] *= 40  # the tokens training used
    tensors = {"embeddings.word_embeddings.weight": words,
               "embeddings.position_embeddings.weight": rng.normal(0, 0.02, (64, 16)).astype(np.float32),
               "embeddings.position_ids": np.arange(64, dtype=np.int64)[None],
               "encoder.layer.0.dense.weight": rng.normal(0, 0.1, (16, 16)).astype(np.float32),
               "encoder.layer.1.dense.weight": rng.normal(0, 0.1, (16, 16)).astype(np.float32)}
    stnp.save_file(tensors, tmp_path / "enc.safetensors")
    res = protect(tmp_path / "enc.safetensors", tmp_path / "o")
    parts = {d["name"]: d["part"] for d in res.locks}
    assert parts["embeddings.word_embeddings.weight"] == "rows 2,100 of 3,000"
    assert parts["embeddings.position_embeddings.weight"] == "whole (64 rows)"
    assert "embeddings.position_ids" not in parts  # a buffer: never decoyed unless asked
    locked = stnp.load_file(res.locked_path)
    rows = np.flatnonzero((locked["embeddings.word_embeddings.weight"] != words).any(axis=1))
    assert set(range(100, 1100)) <= set(rows.tolist())
    assert np.array_equal(locked["embeddings.position_ids"], tensors["embeddings.position_ids"])
    assert restore(res.locked_path, res.bundle_path, res.data_key) == (tmp_path / "enc.safetensors").read_bytes()


def test_decoy_rows_have_the_clear_rows_norms_and_do_not_stand_out(tmp_path):
    """Each decoy row mixes two clear rows; a mix of two random rows has a narrower spread of
    norms than the rows themselves, and a row classifier on (spread, norm) found that (MiniLM:
    AUC 0.65).  Partners are now of like norm."""
    from layerlock.shared.assess import detect, locked_masks

    rng = np.random.default_rng(7)
    words = rng.normal(0, 1, (6000, 32)) * rng.lognormal(-4, 0.6, (6000, 1))  # dispersed row norms
    tensors = {"embeddings.word_embeddings.weight": words.astype(np.float32),
               "encoder.layer.0.dense.weight": rng.normal(0, 0.1, (32, 32)).astype(np.float32),
               "encoder.layer.1.dense.weight": rng.normal(0, 0.1, (32, 32)).astype(np.float32)}
    stnp.save_file(tensors, tmp_path / "enc.safetensors")
    res = protect(tmp_path / "enc.safetensors", tmp_path / "o")
    locked = stnp.load_file(res.locked_path)
    masks = locked_masks(tensors, locked)
    name = "embeddings.word_embeddings.weight"
    rows = masks[name].all(axis=1)
    norms = np.linalg.norm(locked[name].astype(np.float64), axis=1)
    q = np.linspace(0.05, 0.95, 19)
    decoy_q, clear_q = np.quantile(norms[rows], q), np.quantile(norms[~rows], q)
    assert np.max(np.abs(np.log(decoy_q / clear_q))) < 0.1  # the same distribution of norms
    assert detect(locked, masks)["slices"][f"{name} rows"] <= 0.6
    assert restore(res.locked_path, res.bundle_path, res.data_key) == (tmp_path / "enc.safetensors").read_bytes()


def test_integer_buffers_only_when_asked_and_then_in_range(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "b.safetensors"
    stnp.save_file({"emb.weight": rng.normal(size=(8, 4)).astype(np.float32),
                    "emb.ids": np.arange(512, dtype=np.int64)[None]}, src)
    with pytest.raises(InvalidInput, match="only integer/bool buffers"):
        protect(src, tmp_path / "a", policy=LockPolicy(patterns=("*.ids",)))
    res = protect(src, tmp_path / "b", policy=LockPolicy(patterns=("emb.*",)))
    assert res.locked_tensors == ["emb.weight"] and "emb.ids" in res.warnings[0]
    for i, policy in enumerate((LockPolicy(patterns=("emb.ids",)), LockPolicy(patterns=("*",), include_int=True))):
        res = protect(src, tmp_path / f"c{i}", policy=policy)  # named exactly, or --include-int
        ids = stnp.load_file(res.locked_path)["emb.ids"]
        assert "emb.ids" in res.locked_tensors and ids.min() >= 0 and ids.max() <= 511
        assert not np.array_equal(ids, np.arange(512)[None])
        assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()


def _base_and_tuned(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    base = _digits_like(rng)
    base["emb.weight"] = rng.normal(0, 1, (100, 8)).astype(np.float32)
    tuned = {k: v.copy() for k, v in base.items()}
    tuned["fc2.weight"] += rng.normal(0, 0.05, tuned["fc2.weight"].shape).astype(np.float32)
    tuned["fc3.weight"] += rng.normal(0, 0.05, tuned["fc3.weight"].shape).astype(np.float32)
    tuned["emb.weight"][[3, 4, 50]] += 0.5  # three tokens the fine-tune used
    tuned["head.weight"] = rng.normal(0, 0.3, (5, 10)).astype(np.float32)  # new: the base lacks it
    stnp.save_file(base, tmp_path / "base.safetensors")
    stnp.save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def test_base_locks_what_differs_with_the_base_as_decoy(tmp_path):
    base_path, src, base, tuned = _base_and_tuned(tmp_path)
    res = protect(src, tmp_path / "o", policy=LockPolicy(base=str(base_path)))
    parts = {d["name"]: (d["part"], d["decoy"]) for d in res.locks}
    assert parts == {"emb.weight": ("rows 3 of 100 (differ from the base)", "base"),
                     "fc2.weight": ("whole (differs from the base)", "base"),
                     "fc3.weight": ("whole (differs from the base)", "base"),
                     "head.weight": ("whole (not in the base)", "random")}
    assert res.locks[0]["name"] == "head.weight"  # ranked: what the base lacks first, then by change
    locked = stnp.load_file(res.locked_path)
    for name in ("emb.weight", "fc1.weight", "fc2.weight", "fc3.weight"):
        assert np.array_equal(locked[name], base[name]), name  # substituting the base gains nothing
    assert not np.array_equal(locked["head.weight"], tuned["head.weight"])
    hdr = read_header(res.bundle_path)
    changed = (3 * 8 + 32 * 64 + 10 * 32 + 5 * 10) * 4
    assert hdr.plain_size == changed  # the bundle holds only what the vendor added
    assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()
    small = protect(src, tmp_path / "s", policy=LockPolicy(base=str(base_path), base_min_change=0.5))
    assert {d["name"] for d in small.locks} == {"emb.weight", "head.weight"}  # fc2/fc3 changed ~10-20 %


def test_base_errors_are_one_line(tmp_path):
    base_path, src, base, _ = _base_and_tuned(tmp_path)
    wrong = dict(base)
    wrong["fc2.weight"] = np.zeros((3, 3), np.float32)
    stnp.save_file(wrong, tmp_path / "wrong.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    for bad, message in ((tmp_path / "wrong.safetensors", "the base does not match the model: fc2.weight is (3, 3) "
                          "in the base, (32, 64) in the model"),
                         (tmp_path / "junk.safetensors", "base model: junk.safetensors: not a safetensors file"),
                         (tmp_path / "missing.safetensors", "no such file")):
        r = cli("protect", str(src), "--base", str(bad), "--data-key-out", str(tmp_path / "k"), "--force")
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    r = cli("protect", str(src), "--base", str(base_path), "--pattern", "fc*", "--data-key-out", str(tmp_path / "k"))
    assert r.exit_code == 1 and "--base chooses what to lock itself" in r.stderr


def test_version_2_runs_are_checked(tmp_path):
    src = tmp_path / "m.safetensors"
    stnp.save_file(_digits_like(np.random.default_rng(4)), src)
    res = protect(src, tmp_path / "o")
    raw = res.bundle_path.read_bytes()
    start = raw.index(b'"runs":[') + len(b'"runs":[')
    first = raw[start:raw.index(b",", start)]
    for new in (b"3", b"999999"):  # misaligned (not a whole element), outside the tensor
        bad = raw[:start] + new.ljust(len(first), b" ") + raw[start + len(first):]
        (tmp_path / "bad.llk").write_bytes(bad)
        with pytest.raises(BundleFormatError):
            read_header(tmp_path / "bad.llk")
    v1 = raw[:8] + VERSION.to_bytes(2, "big") + raw[10:]  # runs in a version 1 bundle
    (tmp_path / "v1.llk").write_bytes(v1)
    with pytest.raises(BundleFormatError, match="malformed runs"):
        read_header(tmp_path / "v1.llk")
    whole = protect(src, tmp_path / "w", policy=LockPolicy(patterns=("fc2.*",)))
    assert read_header(whole.bundle_path).version == VERSION  # whole tensors only: still version 1


def test_state_dict_order_is_execution_order(tmp_path):
    import torch

    state = {"stem.weight": torch.randn(64, 3), "body.weight": torch.randn(64, 64), "avg.weight": torch.randn(2, 64)}
    torch.save(state, tmp_path / "net.pt")
    r = cli("inspect", str(tmp_path / "net.pt"), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["order"] == "state dict order" and [x["layer"] for x in doc["layers"]] == ["stem", "body", "avg"]
    assert doc["layers"][0]["lock"] == ["weight: input columns 2 of 3"]  # the input layer runs first
    assert doc["layers"][2]["lock"] == ["weight: whole (the output head)"]
    res = protect(tmp_path / "net.pt", tmp_path / "o", policy=LockPolicy(start=1, count=1))
    assert res.locked_tensors == ["body.weight"]  # --layers counts in the same order


def test_inspect_text_json_and_errors(tmp_path):
    src = tmp_path / "m.safetensors"
    stnp.save_file(_digits_like(np.random.default_rng(5)), src)
    r = cli("inspect", str(src))
    assert r.exit_code == 0, r.output
    assert "3 layers in name order" in r.stdout and "input columns 29 of 64" in r.stdout
    assert "default policy: 2,176 of 6,570 parameters (33.1%)" in r.stdout
    doc = json.loads(cli("inspect", str(src), "--json").stdout)
    assert [x["index"] for x in doc["layers"]] == [0, 1, 2] and doc["layers"][1]["params"] == 2080
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for bad in ("bad.safetensors", "missing.onnx", "x.bin2"):
        r = cli("inspect", str(tmp_path / bad))
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output


def test_protect_names_what_it_locks_and_warns_on_tiny_locks(tmp_path):
    src = tmp_path / "m.safetensors"
    stnp.save_file(_digits_like(np.random.default_rng(6)), src)
    r = cli("protect", str(src), "--data-key-out", str(tmp_path / "k"), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "fc1.weight  input columns 29 of 64" in r.stdout and "fc3.weight  whole (the output head)" in r.stdout
    r = cli("protect", str(src), "--pattern", "fc3.bias", "--data-key-out", str(tmp_path / "k2"), "--json", "--force")
    assert r.exit_code == 0, r.output
    [doc] = json.loads(r.stdout)
    assert doc["locked_names"] == ["fc3.bias"] and doc["locks"][0]["part"] == "whole"
    assert any("under 1%" in w for w in doc["warnings"]) and "warning:" in r.stderr


def test_many_runs_restore_bit_exact_through_both_paths(tmp_path):
    """Thousands of runs (rows of an embedding table), chunks straddling them: restore and restore_to."""
    import io
    import os

    from layerlock.shared.lockfile import restore_to

    rng = np.random.default_rng(7)
    table = rng.normal(0, 1, (5000, 24)).astype(np.float32)
    src = tmp_path / "e.safetensors"
    stnp.save_file({"tok_embeddings.weight": table, "out.weight": rng.normal(size=(24, 24)).astype(np.float32)}, src)
    res = protect(src, tmp_path / "o", chunk_size=1000)
    assert len(read_header(res.bundle_path).spans()) > 500
    original = src.read_bytes()
    assert restore(res.locked_path, res.bundle_path, res.data_key) == original
    with os.fdopen(os.memfd_create("runs"), "w+b") as out:
        assert restore_to(res.locked_path, res.bundle_path, res.data_key, out) == len(original)
        out.seek(0)
        assert out.read() == original
    buf = io.BytesIO()
    restore_to(res.locked_path, res.bundle_path, res.data_key, buf)
    assert buf.getvalue() == original
