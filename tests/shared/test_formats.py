"""Reading inputs safely: safetensors headers, PyTorch state dicts (weights only), ONNX initializers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import struct

import numpy as np
import pytest
import safetensors.numpy as stnp
import torch  # `make test` installs the CPU build; a missing torch must fail, not skip
from hypothesis import given, settings
from hypothesis import strategies as st

from layerlock.shared.decoys import decoy_blocks, tensor_stats
from layerlock.shared.errors import LockError, UnsupportedModel
from layerlock.shared.formats import TensorInfo, safetensors_index
from layerlock.shared.lockfile import protect as protect_file
from layerlock.shared.lockfile import restore
from layerlock.shared.onnxfile import onnx_index
from layerlock.shared.selection import LockPolicy


class Custom:
    """Not a tensor: a weights-only load must refuse it."""

    def __init__(self) -> None:
        self.x = 1


def test_safetensors_index_matches_the_library(small_model):
    index = {t.name: t for t in safetensors_index(small_model)}
    data = small_model.read_bytes()
    for name, arr in stnp.load_file(small_model).items():
        t = index[name]
        assert t.shape == arr.shape and t.dtype == "F32" and t.length == arr.nbytes
        assert data[t.offset:t.offset + t.length] == arr.tobytes()


@pytest.mark.parametrize("blob", [b"", b"\x05", b"\xff" * 8 + b"{}", b"\x02\0\0\0\0\0\0\0[]",
                                  b"\x20\0\0\0\0\0\0\0" + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'])
def test_malformed_safetensors_refused(tmp_path, blob):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(UnsupportedModel):
        protect_file(path)


@settings(max_examples=100, deadline=None)
@given(header=st.recursive(st.none() | st.booleans() | st.integers(-5, 2**66) | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=10),
       tail=st.binary(max_size=64))
def test_random_safetensors_headers_only_raise_unsupported_model(tmp_path_factory, header, tail):
    body = json.dumps({"w": header} if not isinstance(header, dict) else header).encode()
    path = tmp_path_factory.mktemp("st") / "r.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + tail)
    with contextlib.suppress(UnsupportedModel):
        safetensors_index(path)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModel, match="unknown model format"):
        protect_file(tmp_path / "m.bin")
    with pytest.raises(UnsupportedModel, match="no such file"):
        protect_file(tmp_path / "nope.safetensors")


def test_decoys_match_statistics_and_dtype():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 5000).astype(np.float32)
    mean, std = tensor_stats(memoryview(x.tobytes()), "F32")
    assert math.isclose(mean, float(x.astype(np.float64).mean()), rel_tol=1e-6)
    info = TensorInfo("w", "F32", (5000,), 0, x.nbytes)
    decoy = np.frombuffer(b"".join(decoy_blocks(info, mean, std, np.random.default_rng(1))), np.float32)
    assert decoy.shape == x.shape and abs(decoy.mean() - 3.0) < 0.1 and abs(decoy.std() - 2.0) < 0.1
    ints = np.arange(-100, 100, dtype=np.int8)
    m, s = tensor_stats(memoryview(ints.tobytes()), "I8")
    d = np.frombuffer(b"".join(decoy_blocks(TensorInfo("i", "I8", (200,), 0, 200), m, s, np.random.default_rng(2))),
                      np.int8)
    assert d.min() >= -128 and d.max() <= 127 and abs(d.mean() - m) < 15


# --- PyTorch ---------------------------------------------------------------------------------------
def _state(mlp):
    return {k: torch.from_numpy(v) for k, v in mlp.items()} | {
        "bn.num_batches_tracked": torch.tensor(7), "emb.weight": torch.randn(5, 4).to(torch.bfloat16)}


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3}])
def test_pytorch_state_dict_round_trip(tmp_path, wrap, mlp):
    from safetensors.torch import load

    state = _state(mlp)
    src = tmp_path / "net.pt"
    torch.save(wrap(state), src)
    res = protect_file(src, chunk_size=256)
    assert res.locked_path.name == "net.locked.safetensors" and res.format == "safetensors"
    restored = load(restore(res.locked_path, res.bundle_path, res.data_key))
    assert set(restored) == set(state)
    for k, v in state.items():
        assert restored[k].dtype == v.dtype and torch.equal(restored[k], v), k
    assert not list(tmp_path.glob(".*")), "temporary plain file left behind"


def test_pytorch_tied_weights(tmp_path):
    w = torch.randn(4, 4)
    src = tmp_path / "tied.pth"
    torch.save({"a.weight": w, "b.weight": w}, src)
    res = protect_file(src, policy=LockPolicy(patterns=("*",)))
    from safetensors.torch import load

    restored = load(restore(res.locked_path, res.bundle_path, res.data_key))
    assert torch.equal(restored["a.weight"], w) and torch.equal(restored["b.weight"], w)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pickle_needing_code_is_refused(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": Custom()}, src)
    with pytest.raises(UnsupportedModel, match="arbitrary code"):
        protect_file(src)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(LockError):
        protect_file(raw)
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(UnsupportedModel, match="not a state dict"):
        protect_file(lst)


# --- ONNX ------------------------------------------------------------------------------------------
def _onnx_mlp(raw: bool, t):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, prev = [], [], "x"
    for i in (1, 2, 3):
        w, b = t[f"fc{i}.weight"].T.copy(), t[f"fc{i}.bias"]
        if raw:
            inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        else:
            inits += [helper.make_tensor(f"fc{i}.weight", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
                      helper.make_tensor(f"fc{i}.bias", TensorProto.FLOAT, b.shape, b.tolist())]
        nodes += [helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"fc{i}.bias"], [f"a{i}"])]
        prev = f"a{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx, model


def _run(blob: bytes, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("raw", [True, False])
def test_onnx_round_trip_and_garbage_predictions(tmp_path, raw, mlp):
    onnx, model = _onnx_mlp(raw, mlp)
    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    res = protect_file(src, chunk_size=512)
    assert res.format == "onnx" and res.locked_path.name == "mlp.locked.onnx"
    # The default locks the input interface: half of fc1's input rows (ONNX MatMul weights are (in, out)).
    assert res.locked_tensors == ["fc1.weight"] and res.locks[0]["part"] == "input rows 8 of 16"
    restored = restore(res.locked_path, res.bundle_path, res.data_key)
    if raw:
        assert restored == src.read_bytes()
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    want = _run(src.read_bytes(), x)
    np.testing.assert_array_equal(_run(restored, x), want)
    locked = _run(res.locked_path.read_bytes(), x)
    assert not np.allclose(locked, want, atol=0.1)
    onnx.checker.check_model(onnx.load_from_string(res.locked_path.read_bytes()))


def test_onnx_index_offsets_and_garbage(tmp_path, mlp):
    onnx, model = _onnx_mlp(True, mlp)
    blob = model.SerializeToString()
    tensors, typed = onnx_index(blob)
    assert not typed and [t.name for t in tensors][:2] == ["fc1.weight", "fc1.bias"]
    w = mlp["fc1.weight"].T
    t = tensors[0]
    assert blob[t.offset:t.offset + t.length] == w.tobytes() and t.shape == w.shape
    with pytest.raises(UnsupportedModel):
        onnx_index(b"\xff\xff\xff garbage")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(io.BytesIO(b"\x0a\x03abc").getvalue())
    with pytest.raises(UnsupportedModel):
        protect_file(bad)


def test_hostile_safetensors_header_values_are_not_echoed_in_full(tmp_path):
    long = "x" * 100_000
    for entry in ({"dtype": long, "shape": [1], "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}):
        header = json.dumps({long: entry}).encode()
        path = tmp_path / "hostile.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        with pytest.raises(UnsupportedModel) as info:
            safetensors_index(path)
        assert len(str(info.value)) < 400
