"""Small real ncnn models for the tests, written as ``.param`` + ``.bin`` directly (ncnn's documented
layout: docs/developer-guide/param-and-model-file-structure.md), and a way to run them in ncnn.

* :func:`write_digits` -- the demo's digits MLP (64-64-32-10, trained on scikit-learn's bundled
  digits in about a second) as InnerProduct layers with float32 (tag 0) weights;
* :func:`write_convnet` -- a small convolutional net on the 8x8 digit images with every storage
  kind a weight can have: float16 (tagged), BatchNorm statistics (raw float32), int8 weights, and
  a raw-float32-tagged (0x0002C056) InnerProduct.  Its weights are random: it is for bit-exactness
  and layout, not accuracy.
"""

from __future__ import annotations

import functools
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TAG_F32, TAG_F32_ALIGNED, TAG_F16, TAG_I8 = 0x00000000, 0x0002C056, 0x01306B47, 0x000D4B38


def _tag(tag: int) -> bytes:
    return struct.pack("<I", tag)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(test inputs, test labels, weights, biases) of the digits MLP, trained once per process."""
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
    return xte.astype(np.float32), yte, [w.T.astype(np.float32) for w in clf.coefs_], \
        [b.astype(np.float32) for b in clf.intercepts_]


def write_digits(folder: Path, stem: str = "digits") -> tuple[Path, Path]:
    """The digits MLP as ``STEM.param`` + ``STEM.bin``; input blob ``data`` (64), output ``logits``."""
    _, _, weights, biases = digits()
    lines = ["7767517", "6 7", "Input data 0 1 data 0=64"]
    blob, prev = b"", "data"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True), start=1):
        top = f"fc{i}_out" if i < 3 else "fc3_out"
        relu = " 9=1" if i < 3 else ""  # activation_type 1: ReLU fused
        lines.append(f"InnerProduct fc{i} 1 1 {prev} {top} 0={w.shape[0]} 1=1 2={w.size}{relu}")
        blob += _tag(TAG_F32) + w.astype("<f4").tobytes() + b.astype("<f4").tobytes()
        prev = top
    lines += ["Split split 1 2 fc3_out logits logits_sm", "Softmax prob 1 1 logits_sm prob 0=0"]
    folder.mkdir(parents=True, exist_ok=True)
    param, bin_path = folder / f"{stem}.param", folder / f"{stem}.bin"
    param.write_text("\n".join(lines) + "\n")
    bin_path.write_bytes(blob)
    return param, bin_path


def write_convnet(folder: Path, stem: str = "convnet", seed: int = 3) -> tuple[Path, Path]:
    """A conv net on 1x8x8 inputs (blob ``data``), output ``out`` (10): Convolution (fp16) + BatchNorm
    + ReLU, ConvolutionDepthWise (int8 weights), Pooling, Flatten, InnerProduct (0x0002C056 float32)."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.4, (8, 1, 3, 3)).astype(np.float16)
    conv_b = rng.normal(0, 0.1, 8).astype(np.float32)
    bn = [rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8), rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8)]
    dw_w = rng.integers(-60, 60, (8, 1, 3, 3)).astype(np.int8)
    fc_w = rng.normal(0, 0.2, (10, 8 * 3 * 3)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, 10).astype(np.float32)
    lines = [
        "7767517", "8 8",
        "Input data 0 1 data 0=8 1=8 2=1",
        f"Convolution conv1 1 1 data c1 0=8 1=3 4=1 5=1 6={conv_w.size}",
        "BatchNorm bn1 1 1 c1 b1 0=8",
        "ReLU relu1 1 1 b1 r1",
        f"ConvolutionDepthWise dw1 1 1 r1 d1 0=8 1=3 4=1 5=0 6={dw_w.size} 7=8 8=1",
        "Pooling pool1 1 1 d1 p1 0=0 1=3 2=3",
        "Flatten flat 1 1 p1 f1",
        f"InnerProduct fc 1 1 f1 out 0=10 1=1 2={fc_w.size}",
    ]
    blob = _tag(TAG_F16) + _pad4(conv_w.astype("<f2").tobytes()) + conv_b.astype("<f4").tobytes()
    blob += b"".join(np.asarray(v, dtype="<f4").tobytes() for v in bn)
    # int8 weights (8=1: per-group weight scales, then the input scale, both raw float32)
    blob += _tag(TAG_I8) + _pad4(dw_w.tobytes()) + np.full(8, 64.0, "<f4").tobytes() + np.float32(20).tobytes()
    blob += _tag(TAG_F32_ALIGNED) + fc_w.astype("<f4").tobytes() + fc_b.astype("<f4").tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    param, bin_path = folder / f"{stem}.param", folder / f"{stem}.bin"
    param.write_text("\n".join(lines) + "\n")
    bin_path.write_bytes(blob)
    return param, bin_path


def net_from(param: str | Path, weights: bytes | Path) -> Any:
    """An ``ncnn.Net`` from a .param (text or path) and .bin (bytes or path), loaded from memory."""
    import ncnn

    text = param.read_text() if isinstance(param, Path) else param
    data = weights.read_bytes() if isinstance(weights, Path) else weights
    net = ncnn.Net()
    net.opt.num_threads = 1
    assert net.load_param_mem(text) == 0
    net.load_model_mem(data)
    return net


def run(net: Any, xs: np.ndarray, *, input: str = "data", output: str = "logits",
        shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The net's ``output`` for every row of ``xs`` (reshaped to ``shape`` for ncnn)."""
    import ncnn

    out = []
    for x in xs:
        with net.create_extractor() as ex:
            ex.input(input, ncnn.Mat(np.ascontiguousarray(x.reshape(shape) if shape else x, dtype=np.float32)))
            ret, mat = ex.extract(output)
            assert ret == 0
            out.append(np.array(mat).reshape(-1).copy())
    return np.stack(out)
