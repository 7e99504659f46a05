"""ncnn models: the .bin layout against real ncnn, protect/restore of real .param + .bin pairs, the
locked pair at chance, bit-exact outputs after unlocking, the socket handoff to ``ncnn_net``, and
bad input (one line, nothing left behind)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import ncnn  # noqa: E402 - the test extra installs it; a missing install must fail, not skip
import numpy as np
import pytest
from click.testing import CliRunner

from layerlock.license_server.cli import main
from layerlock.shared import ncnnfile
from layerlock.shared.bundle import read_header
from layerlock.shared.errors import BundleFormatError, LockedFileMismatch, LockError, UnsupportedModel
from layerlock.shared.lockfile import protect, restore
from layerlock.shared.selection import LockPolicy
from tests.ncnn_models import digits, net_from, run, write_convnet, write_digits

README = Path(__file__).resolve().parents[2] / "README.md"


# --- the layout, checked against ncnn's own loader --------------------------------------------------
LAYERS = [
    "InnerProduct fc 1 1 in out 0=6 1=1 2=24",
    "InnerProduct fc 1 1 in out 0=6 1=0 2=24 8=1",
    "Convolution c 1 1 in out 0=4 1=3 5=1 6=144",
    "Convolution c 1 1 in out 0=4 1=3 11=1 5=0 6=48 8=101",
    "ConvolutionDepthWise dw 1 1 in out 0=4 1=3 5=1 6=36 7=4",
    "ConvolutionDepthWise dw 1 1 in out 0=4 1=3 5=1 6=36 7=4 8=1",
    "ConvolutionDepthWise dw 1 1 in out 0=4 1=3 6=36 7=4 8=102",
    "Deconvolution dc 1 1 in out 0=4 1=3 5=1 6=144",
    "DeconvolutionDepthWise ddw 1 1 in out 0=4 1=3 5=1 6=36 7=4",
    "BatchNorm bn 1 1 in out 0=4",
    "Bias b 1 1 in out 0=4",
    "PReLU pr 1 1 in out 0=4",
    "Scale s 1 1 in out 0=4 1=1",
    "Scale s 1 1 in out 0=4",
    "MemoryData md 0 1 out 0=4 1=3 2=2",
    "MemoryData md 0 1 out 0=5 21=0",
    "LayerNorm ln 1 1 in out 0=4 1=0.001",
    "InstanceNorm inorm 1 1 in out 0=4 1=0.001 2=1",
    "GroupNorm gn 1 1 in out 0=2 1=4 2=0.001 3=1",
    "Padding pad 1 1 in out 0=1 6=4",
]
TAGS = {"f32": ncnnfile.TAG_F32, "f32a": ncnnfile.TAG_F32_ALIGNED, "f16": ncnnfile.TAG_F16,
        "i8": ncnnfile.TAG_I8, "table": 0x00000101}


def _build(line: str, tag: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """A two-layer .param (Input + ``line``) and a .bin laid out as ncnn reads it, ``tag`` on tagged blobs."""
    takes_input = line.split()[2] != "0"
    param = "7767517\n" + ("2 2\nInput input 0 1 in 0=4 1=4 2=4\n" if takes_input else "1 1\n") + line + "\n"
    layer = ncnnfile.parse_param(param)[-1]
    data = b""
    for blob in ncnnfile.WEIGHT_LAYERS[layer.type](layer):
        if not blob.tagged:
            data += rng.random(blob.count, dtype=np.float32).tobytes()
        elif tag in (ncnnfile.TAG_F32, ncnnfile.TAG_F32_ALIGNED):
            data += struct.pack("<I", tag) + rng.random(blob.count, dtype=np.float32).tobytes()
        elif tag == ncnnfile.TAG_F16:
            raw = rng.random(blob.count).astype("<f2").tobytes()
            data += struct.pack("<I", tag) + raw + bytes(-len(raw) % 4)
        elif tag == ncnnfile.TAG_I8:
            raw = rng.integers(-100, 100, blob.count).astype(np.int8).tobytes()
            data += struct.pack("<I", tag) + raw + bytes(-len(raw) % 4)
        else:
            raw = rng.integers(0, 256, blob.count).astype(np.uint8).tobytes()
            data += struct.pack("<I", tag) + rng.random(256, dtype=np.float32).tobytes() + raw + bytes(-len(raw) % 4)
    return param, data


def _ncnn_loads(param: str, data: bytes) -> tuple[int, int]:
    """(ncnn's load_model result, bytes it consumed), read through the client's bounded reader."""
    from layerlock.verifier.client import _memory_reader

    net = ncnn.Net()
    assert net.load_param_mem(param) == 0
    buf = bytearray(data)
    reader = _memory_reader(ncnn)(buf, 0, len(buf))
    try:
        return net.load_model(reader), reader.pos
    finally:
        reader.release()


# int8-stored weights are only valid in a layer that dequantises them (8=, int8_scale_term): ncnn
# itself crashes on the others, so those combinations are not models at all.
CASES = [(line, tag) for line in LAYERS for tag in TAGS if tag != "i8" or " 8=" in line]


@pytest.mark.parametrize("line,tag", CASES, ids=[f"{line.split()[0]}-{line.split()[1]}-{i}-{tag}"
                                                   for i, (line, tag) in enumerate(CASES)])
def test_layout_is_what_ncnn_reads(line, tag):
    rng = np.random.default_rng(0)
    param, data = _build(line, TAGS[tag], rng)
    layers = ncnnfile.parse_param(param)
    tensors = ncnnfile.ncnn_index(layers, lambda o, n: data[o:o + n], len(data))
    assert _ncnn_loads(param, data) == (0, len(data))  # ncnn consumed exactly what we located
    for t in tensors:  # every tensor lies inside the file, none overlaps a tag
        assert t.offset >= 0 and t.offset + t.length <= len(data)
    ends = sorted((t.offset, t.offset + t.length) for t in tensors)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:], strict=False))
    if tensors:  # one byte short: ncnn fails to load, and we refuse the pair
        # ncnn itself does not check every load: a short int8 scale crashes it, a short Padding
        # table is ignored -- one reason ncnn_net checks the layout before ncnn sees the bytes.
        if " 8=" not in line and not line.startswith("Padding"):
            ret, _ = _ncnn_loads(param, data[:-1])
            assert ret != 0
        with pytest.raises(UnsupportedModel, match="truncated|after the last weight"):
            ncnnfile.ncnn_index(layers, lambda o, n: data[o:o + n], len(data) - 1)
        with pytest.raises(UnsupportedModel, match="after the last weight"):
            ncnnfile.ncnn_index(layers, lambda o, n: (data + b"\0" * 4)[o:o + n], len(data) + 4)


def test_param_parsing():
    text = ('7767517\n3 3\nInput in 0 1 in 0=4\n'
            'Einsum e 1 1 in x 0="ij, jk" -23309=2,1.5,2\n'
            'InnerProduct fc 1 1 x y 0=2 1=0 2=8\n')
    layers = ncnnfile.parse_param(text)
    assert [(la.type, la.name) for la in layers] == [("Input", "in"), ("Einsum", "e"), ("InnerProduct", "fc")]
    assert layers[1].params == {0: '"ij, jk"', 9: "2,1.5,2"} and layers[2].get_int(2, 0) == 8
    bad = {
        "NOT 1 1": "not an ncnn .param",
        "7767517\n2 2\nInput in 0 1 in\n": "2 layers announced, 1 found",
        "7767517\n2 2\nInput a 0 1 x\nReLU a 1 1 x y\n": "appears twice",
        "7767517\n1 1\nInnerProduct fc 0 1 y 0=2.5 2=8\n": "is not an integer",
        "7767517\n1 1\nReLU r 1 1 x y 40=1\n": "out of range",
    }
    for text, message in bad.items():
        with pytest.raises(UnsupportedModel, match=message):
            layers = ncnnfile.parse_param(text)
            ncnnfile.ncnn_index(layers, lambda o, n: b"", 0)


def test_unknown_layer_type_is_named():
    param = "7767517\n2 2\nInput in 0 1 in 0=4\nLSTM lstm 1 1 in out 0=8 1=64 2=0\n"
    with pytest.raises(UnsupportedModel, match="layer 'lstm' is of type 'LSTM'.*InnerProduct"):
        ncnnfile.ncnn_index(ncnnfile.parse_param(param), lambda o, n: b"", 64)


# --- protect and restore real models ---------------------------------------------------------------
def readme_claim() -> tuple[float, float, float]:
    text = " ".join(README.read_text().split())
    import re

    m = re.search(r"test_ncnn\.py.*?locked pair scores ([0-9.]+)–([0-9.]+) over [0-9,]+ data keys, "
                  r"mean ([0-9.]+)", text)
    assert m, "README no longer states the locked ncnn score range of tests/shared/test_ncnn.py"
    return float(m[1]), float(m[2]), float(m[3])


def test_digits_locked_pair_at_chance_unlocked_bit_exact(tmp_path):
    xte, yte, _, _ = digits()
    param, weights = write_digits(tmp_path / "src")
    want = run(net_from(param, weights), xte)
    original = float((want.argmax(1) == yte).mean())
    assert original > 0.9
    low, high, mean = readme_claim()
    scores = []
    for i in range(20):  # the README's range is over 1,000 keys; these 20 fixed ones are the first of them
        res = protect(param, tmp_path / f"out{i}", data_key=hashlib.sha256(f"ncnn-digits-{i}".encode()).digest(),
                      model_id="digits-1")
        with np.errstate(all="ignore"):
            scores.append(float((run(net_from(res.param_path, res.locked_path), xte).argmax(1) == yte).mean()))
    assert all(low <= s <= high for s in scores), scores
    assert abs(float(np.mean(scores)) - mean) <= 0.03, scores
    # The default policy: fc1's informative input columns and the head (README, "The same on ncnn").
    assert res.format == "ncnn" and res.locked_tensors == ["fc1.weight", "fc3.weight"]
    assert 0.31 <= res.fraction <= 0.34
    assert res.locked_path.name == "digits.locked.bin" and res.param_path.name == "digits.locked.param"
    assert res.param_path.read_bytes() == param.read_bytes()
    assert res.locked_path.stat().st_size == weights.stat().st_size
    header = read_header(res.bundle_path)
    assert header.format == "ncnn" and header.param_digest == hashlib.sha256(param.read_bytes()).hexdigest()
    unlocked = restore(res.locked_path, res.bundle_path, res.data_key)
    assert unlocked == weights.read_bytes()
    got = run(net_from(param, unlocked), xte)
    assert np.array_equal(got, want)  # bit-exact outputs, not merely the same accuracy
    print(f"\nncnn digits: original={original:.3f} locked={min(scores):.3f}-{max(scores):.3f} "
          f"(mean {np.mean(scores):.3f}) unlocked={float((got.argmax(1) == yte).mean()):.3f}")


def test_convnet_every_storage_kind(tmp_path):
    xte = digits()[0][:40]
    param, weights = write_convnet(tmp_path / "src")
    want = run(net_from(param, weights), xte, output="out", shape=(1, 8, 8))
    for policy in (LockPolicy(), LockPolicy(patterns=("*",)), LockPolicy(patterns=("dw1.weight",))):
        res = protect(param, tmp_path / "out", policy=policy, model_id="conv-1")
        locked = run(net_from(param, res.locked_path), xte, output="out", shape=(1, 8, 8))
        assert not np.allclose(locked, want, atol=1e-2), policy
        got = run(net_from(param, restore(res.locked_path, res.bundle_path, res.data_key)), xte,
                  output="out", shape=(1, 8, 8))
        assert np.array_equal(got, want)
        for f in (res.locked_path, res.bundle_path, res.param_path):
            f.unlink()
    assert res.locked_tensors == ["dw1.weight"]  # int8 weights take decoys too


def test_bundle_binds_the_param(tmp_path):
    from layerlock.verifier.unlock import restore_model

    param, _ = write_digits(tmp_path)
    res = protect(param, tmp_path / "out", model_id="digits-1")
    model = restore_model("digits-1", res.locked_path, res.bundle_path, res.data_key)
    try:
        view = model.view()
        p, b = ncnnfile.split_container(view)
        assert bytes(view[p]) == param.read_bytes() and bytes(view[b]) == (tmp_path / "digits.bin").read_bytes()
        assert view[p.stop] == 0 and b.start % 64 == 0  # NUL-terminated text, aligned weights
        view.release()
    finally:
        model.drop()
    res.param_path.write_text(param.read_text().replace("0=64 1=1", "0=64 1=0", 1))
    with pytest.raises(LockedFileMismatch, match="not the .param"):
        restore_model("digits-1", res.locked_path, res.bundle_path, res.data_key)
    with pytest.raises(LockedFileMismatch, match="not the .param"):  # an explicit param= is checked the same
        restore_model("digits-1", res.locked_path, res.bundle_path, res.data_key, param=res.param_path)
    with pytest.raises(LockError, match="only an ncnn bundle"):
        from layerlock.shared.bundle import header_bytes
        header_bytes("m", "onnx", "0" * 64, bytes(16), 1, 0, 16, bytes(16), [], param_digest="0" * 64)
    raw = res.bundle_path.read_bytes()
    (tmp_path / "bad.llk").write_bytes(raw.replace(b'"param_digest"', b'"param_digesT"'))
    with pytest.raises(BundleFormatError, match="missing or unknown fields"):
        read_header(tmp_path / "bad.llk")


def test_ncnn_net_over_the_socket_is_exact(tmp_path):
    from layerlock.verifier import client
    from layerlock.verifier.errors import ModelUnavailable
    from layerlock.verifier.server import SocketServer
    from layerlock.verifier.unlock import restore_model

    xte = digits()[0]
    param, weights = write_digits(tmp_path)
    want = run(net_from(param, weights), xte)
    res = protect(param, tmp_path / "out", model_id="digits-1")
    model = restore_model("digits-1", res.locked_path, res.bundle_path, res.data_key)

    class Backend:
        def list_models(self):
            return []

        def status(self):
            return {}

        def model(self, model_id):
            if model_id != "digits-1":
                raise ModelUnavailable("unknown_model", "no such model")
            return model

    srv = SocketServer(tmp_path / "run" / "v.sock", Backend(), allowed_uids={os.getuid()}, allowed_gids=set())
    srv.start()
    try:
        for transfer in ("fd", "stream"):
            net = client.ncnn_net("digits-1", socket_path=srv.path, transfer=transfer, num_threads=1)
            assert np.array_equal(run(net, xte), want), transfer
        with pytest.raises(UnsupportedModel, match="use ncnn_net"):
            client.load_numpy("digits-1", socket_path=srv.path)
        with pytest.raises(TypeError, match="no 'no_such_option'"):
            client.ncnn_net("digits-1", socket_path=srv.path, no_such_option=1)
    finally:
        srv.stop()
        model.drop()


# --- the CLI: pairs, directories, bad input ---------------------------------------------------------
def cli(*args: str):
    return CliRunner().invoke(main, ["protect", *args])


def test_cli_pair_explicit_and_by_name(tmp_path):
    param, weights = write_digits(tmp_path / "a")
    renamed = tmp_path / "a" / "weights-v2.bin"
    weights.rename(renamed)
    r = cli(str(param), str(renamed), "--data-key-out", str(tmp_path / "k1"), "--json", "--model-id", "digits-1")
    assert r.exit_code == 0, r.output
    item = json.loads(r.stdout)[0]
    assert item["format"] == "ncnn" and item["locked"].endswith("digits.locked.bin")
    assert item["param"].endswith("digits.locked.param") and item["locked_tensors"] == 2  # fc1 (part), fc3
    # a directory: each .param is paired with the .bin of its name; one without is an error, others go on
    tree = tmp_path / "tree"
    write_digits(tree / "x")
    write_convnet(tree / "y")
    (tree / "z").mkdir()
    (tree / "z" / "lonely.param").write_text(param.read_text())
    r = cli(str(tree), "--data-key-out", str(tmp_path / "keys"), "--json")
    assert r.exit_code == 1
    out = {Path(o["source"]).name: o for o in json.loads(r.stdout)}
    assert out["digits.param"]["status"] == "ok" and out["convnet.param"]["status"] == "ok"
    assert out["lonely.param"]["status"] == "error" and "lonely.bin do not exist" in out["lonely.param"]["message"]
    assert sorted(p.name for p in (tree / "z").iterdir()) == ["lonely.param"]


def test_bad_input_one_line_error_nothing_left_behind(tmp_path):
    src = tmp_path / "src"
    param, weights = write_digits(src)
    cases = {}
    (tmp_path / "nobin").mkdir()
    (tmp_path / "nobin" / "m.param").write_text(param.read_text())
    cases["nobin/m.param"] = "m.bin do not exist"
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "m.param").write_text(param.read_text())
    (tmp_path / "trunc" / "m.bin").write_bytes(weights.read_bytes()[:-100])
    cases["trunc/m.param"] = "truncated .bin: layer 'fc3'"
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "m.param").write_text(param.read_text())
    (tmp_path / "long" / "m.bin").write_bytes(weights.read_bytes() + bytes(8))
    cases["long/m.param"] = "8 bytes after the last weight"
    (tmp_path / "lstm").mkdir()
    (tmp_path / "lstm" / "m.param").write_text("7767517\n2 2\nInput in 0 1 in 0=4\nLSTM l 1 1 in out 0=8 1=64\n")
    (tmp_path / "lstm" / "m.bin").write_bytes(bytes(64))
    cases["lstm/m.param"] = "of type 'LSTM'"
    (tmp_path / "binonly").mkdir()
    (tmp_path / "binonly" / "m.bin").write_bytes(weights.read_bytes())
    cases["binonly/m.bin"] = "needs its .param: no m.param"
    (tmp_path / "notncnn").mkdir()
    (tmp_path / "notncnn" / "m.param").write_text("learning_rate=0.1\n")
    (tmp_path / "notncnn" / "m.bin").write_bytes(weights.read_bytes())
    cases["notncnn/m.param"] = "not an ncnn .param"
    for rel, message in cases.items():
        path = tmp_path / rel
        before = sorted(p.name for p in path.parent.iterdir())
        r = cli(str(path), "--data-key-out", str(tmp_path / "k"))
        assert r.exit_code == 1, (rel, r.output)
        assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, (rel, r.stderr)
        assert sorted(p.name for p in path.parent.iterdir()) == before, rel
        assert not (tmp_path / "k").exists()
    r = cli(str(tmp_path / "src" / "digits.bin"), str(weights), "--data-key-out", str(tmp_path / "k"))
    assert r.exit_code == 1 and "an ncnn model is given as its .param" in r.stderr
