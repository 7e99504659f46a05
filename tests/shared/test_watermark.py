"""The owner watermark's key, placement, statistics and the PyTorch regularizer (library level).

The CLI paths (embed/detect on digits and MiniLM, attacks, exit codes) are in
``tests/license_server/test_cli_watermark.py``; the full figures come from ``bench/watermark.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat

import numpy as np
import pytest

from layerlock.shared.errors import ConfigError, InvalidInput
from layerlock.shared.keys import b64u_encode
from layerlock.shared.watermark import (
    MAX_POSITIONS,
    POOL_SHARE,
    THRESHOLD,
    WatermarkKey,
    binomial_tail,
    detect,
    detect_file,
    new_key,
    place,
)


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.normal(0, 0.1, (64, 48)).astype(np.float32),
            "a.bias": rng.normal(0, 0.1, 64).astype(np.float32),
            "b.weight": rng.normal(0, 0.1, (32, 64)).astype(np.float32),
            "emb.word_embeddings.weight": rng.normal(0, 0.1, (100, 64)).astype(np.float32),
            "small.weight": rng.normal(0, 0.1, (10, 32)).astype(np.float32)}


FIXED = WatermarkKey(bytes(range(32)), 64)


def test_binomial_tail_is_exact():
    for n in (1, 5, 64):
        for k in range(n + 2):
            brute = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
            p, log10_p = binomial_tail(n, k)
            assert p == pytest.approx(brute, rel=1e-12, abs=0)
            if p:
                assert log10_p == pytest.approx(math.log10(p))
    assert binomial_tail(256, 256)[0] == 2.0 ** -256 and binomial_tail(256, 0) == (1.0, 0.0)
    # 256 bits: 184 matches (72 wrong, BER 0.28) still clear the threshold, 183 do not
    assert binomial_tail(256, 184)[0] < THRESHOLD <= binomial_tail(256, 183)[0]
    assert binomial_tail(1024, 1024)[0] > 0  # 2^-1024 is still a (subnormal) float


def test_derivations_are_stable():
    """Bits and projection come from the secret alone (HKDF): a change here breaks every key ever issued."""
    placed = place(FIXED, weights())
    assert "".join("1" if b > 0 else "0" for b in FIXED.signature()[:16]) == "0010010110110101"
    digest = hashlib.sha256(np.sign(placed.projection()).astype(np.int8).tobytes()).hexdigest()
    assert digest[:16] == "0efd8162b7855b8e"
    x = placed.projection()
    assert x.shape == (64, placed.positions) and np.allclose(np.abs(x), 1 / math.sqrt(placed.positions))
    assert np.array_equal(placed.projection(range(10, 12)), x[10:12])


def test_placement_top_magnitudes_and_eligibility():
    w = weights()
    key = place(new_key(64), w)
    names = [m.name for m in key.marks]
    assert names == ["a.weight", "b.weight"]  # not the bias, the embedding table, nor a 320-element matrix
    pool = sum(round(POOL_SHARE * w[n].size) for n in names)
    assert key.positions == min(pool, 64 * 64, MAX_POSITIONS)
    for m in key.marks:
        mags = np.abs(w[m.name]).reshape(-1)
        assert np.all(mags[m.positions] >= np.quantile(mags, 1 - POOL_SHARE) - 1e-7)
    key2 = place(new_key(64), w, patterns=["small.*", "emb.*"])
    assert [m.name for m in key2.marks] == ["emb.word_embeddings.weight", "small.weight"]
    with pytest.raises(InvalidInput, match="nope.* matches no float tensor"):
        place(new_key(64), w, patterns=["nope.*"])
    with pytest.raises(InvalidInput, match="1024 bits need at least 4096 positions"):
        place(new_key(1024), w)
    with pytest.raises(InvalidInput, match="--bits must be in"):
        new_key(32)


def test_chance_level_on_models_made_without_the_key():
    """Matches of independent weights are Bin(N, 1/2): mean BER 1/2, and no p anywhere near the threshold."""
    w = weights()
    rng = np.random.default_rng(5)
    bers, ps = [], []
    for i in range(60):
        key = place(WatermarkKey(rng.bytes(32), 128), w)
        other = {n: rng.normal(0, 0.1, a.shape).astype(np.float32) for n, a in w.items()}
        for tensors in (w, other):  # the model it was placed on (unmarked) and an unrelated one
            d = detect(key, tensors)
            bers.append(d.ber)
            ps.append(d.p_value)
            assert not d.detected
    assert abs(np.mean(bers) - 0.5) < 0.02 and min(ps) > 1e-6


def test_key_file_round_trip_mode_and_no_overwrite(tmp_path):
    key = place(new_key(64), weights())
    path = tmp_path / "owner.wmkey"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = WatermarkKey.load(path)
    assert back.secret == key.secret and back.bits == 64
    assert [(m.name, m.shape) for m in back.marks] == [(m.name, m.shape) for m in key.marks]
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(back.marks, key.marks, strict=True))
    before = path.read_bytes()
    with pytest.raises(InvalidInput, match="already exists"):
        place(new_key(64), weights()).save(path)
    assert path.read_bytes() == before
    with pytest.raises(InvalidInput, match="marks no positions"):
        new_key(64).save(tmp_path / "unplaced")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        WatermarkKey.load(path)


def _doc() -> dict:
    return place(FIXED, weights()).to_json()


def _mutate(change):
    doc = _doc()
    change(doc)
    return doc


@pytest.mark.parametrize("doc, message", [
    ([], "not a JSON object"),
    (_mutate(lambda d: d.update(layerlock_watermark=2)), "not a layerlock watermark key"),
    (_mutate(lambda d: d.update(layerlock_watermark=True)), "not a layerlock watermark key"),
    (_mutate(lambda d: d.pop("secret")), "missing secret"),
    (_mutate(lambda d: d.update(extra=1)), "unknown field extra"),
    (_mutate(lambda d: d.update(secret="abc+")), "secret is not valid base64url"),
    (_mutate(lambda d: d.update(secret=b64u_encode(b"x" * 16))), "secret must be 32 bytes, got 16"),
    (_mutate(lambda d: d.update(bits=10)), "bits must be an integer in [64, 1024], got 10"),
    (_mutate(lambda d: d.update(bits="256")), "bits must be an integer"),
    (_mutate(lambda d: d.update(bits=True)), "bits must be an integer"),
    (_mutate(lambda d: d.update(tensors=[])), "tensors must be a list of 1 to"),
    (_mutate(lambda d: d["tensors"].append(d["tensors"][0])), "is listed twice"),
    (_mutate(lambda d: d["tensors"][0].pop("shape")), "must have exactly name, shape, positions"),
    (_mutate(lambda d: d["tensors"][0].update(name="")), "tensors[0].name must be a non-empty string"),
    (_mutate(lambda d: d["tensors"][0].update(shape=[64, 0])), "tensors[0].shape must be a list of 1 to 8 positive"),
    (_mutate(lambda d: d["tensors"][0].update(shape=[4, 4])), "tensors[0].positions: "),
    (_mutate(lambda d: d["tensors"][0].update(positions="AAA")), "multiple of 4 bytes"),
    (_mutate(lambda d: d["tensors"][0].update(positions=b64u_encode(np.array([5, 3], "<u4").tobytes()))),
     "strictly increasing"),
    (_mutate(lambda d: d.update(tensors=[{**d["tensors"][0],
                                          "positions": b64u_encode(np.array([1, 2], "<u4").tobytes())}])),
     "2 positions for 64 bits (need 256"),
])
def test_malformed_key_is_one_clear_error(doc, message):
    with pytest.raises(InvalidInput) as err:
        WatermarkKey.from_json(doc, "k.json")
    assert err.value.message.startswith("key file k.json: ") and message in err.value.message, err.value.message


def test_key_file_that_is_not_a_key(tmp_path):
    for name, data in (("junk", b"\xff\xfe"), ("text", b"hello"), ("big", b" " * (1 << 20 + 1))):
        path = tmp_path / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        with pytest.raises(InvalidInput, match="not JSON|larger than any watermark key"):
            WatermarkKey.load(path)
    with pytest.raises(InvalidInput, match="no such file"):
        WatermarkKey.load(tmp_path / "missing")


def test_missing_or_reshaped_tensor_named_precisely():
    key = place(FIXED, weights())
    w = weights()
    del w["b.weight"]
    with pytest.raises(InvalidInput, match=r"has no tensor b.weight; the key marks 2 tensors: a.weight, b.weight"):
        detect(key, w)
    w = weights()
    w["a.weight"] = w["a.weight"][:, :40]
    with pytest.raises(InvalidInput, match=r"a.weight is \(64, 40\) in the model; the key marks it as \(64, 48\)"):
        detect(key, w)


def test_onnx_matmul_weights_are_read_transposed(tmp_path):
    """ONNX keeps MatMul weights (in, out): detect turns them back, square ones by the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = weights()
    w["sq.weight"] = np.random.default_rng(1).normal(0, 0.1, (48, 48)).astype(np.float32)
    key = place(FIXED, w, patterns=["a.weight", "sq.weight"])
    marked = dict(w)
    s = key.signature()
    # mark by hand: push every projection's sign to the bit (least squares on the marked positions)
    x = key.projection().astype(np.float64)
    flat = np.concatenate([w[m.name].reshape(-1)[m.positions] for m in key.marks]).astype(np.float64)
    flat += np.linalg.lstsq(x, s * 0.5 - x @ flat, rcond=None)[0]
    start = 0
    for m in key.marks:
        arr = marked[m.name].copy().reshape(-1)
        arr[m.positions] = flat[start:start + m.positions.size]
        start += m.positions.size
        marked[m.name] = arr.reshape(m.shape)
    assert detect(key, marked).matches == 64
    inits = [numpy_helper.from_array(marked["sq.weight"].T.copy(), "sq.weight"),
             numpy_helper.from_array(marked["a.weight"].T.copy(), "a.weight")]
    nodes = [helper.make_node("MatMul", ["x", "sq.weight"], ["h"]),
             helper.make_node("MatMul", ["h", "a.weight"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    d = detect_file(key, path, tmp_path)
    assert d.matches == 64 and d.detected
    assert any("sq.weight is stored transposed (48, 48)" in n for n in d.notes)
    assert any("a.weight is stored transposed (48, 64): read as (64, 48)" in n for n in d.notes)


def test_regularizer_in_a_training_loop():
    """The docstring's example on the digits task: trained from scratch with the term added, the
    model carries every bit and learns as well as without it."""
    import torch

    from layerlock.demo import digits_task as task
    from layerlock.shared.watermark_torch import WatermarkRegularizer

    def trained(reg_bits: int | None):
        torch.manual_seed(0)
        model = task.build(None)
        reg = WatermarkRegularizer(WatermarkKey(bytes(range(32)), reg_bits), model) if reg_bits else None  # seeded
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        stream = task.batches(task.data(1.0, 0), 0)
        for _ in range(400):
            loss = task.loss(model, next(stream))
            if reg is not None:
                loss = loss + reg.loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, reg

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add hand-offs
    try:
        plain, _ = trained(None)
        marked, reg = trained(128)
    finally:
        torch.set_num_threads(threads)
    found = reg.detection(marked)
    assert found.matches == 128 and found.detected
    assert float(reg.loss(marked).detach()) < 1e-3  # every bit has its margin: the term has stopped pulling
    assert task.score(marked) >= task.score(plain) - 0.02
    assert json.loads(json.dumps(reg.key.to_json()))["bits"] == 128
