"""Decoys: the values written over locked tensors, so a locked file loads but predicts garbage.

Each locked tensor is overwritten with random values of the real tensor's mean and standard
deviation, cast to its dtype.  Matching the statistics keeps the locked file plausible (no
all-zero layer that shouts "locked here", activations in a sane range) while the values carry
no information beyond those two numbers per tensor.

A constant tensor (an all-zeros bias, a LayerNorm weight of ones) has a standard deviation of
0, so its statistics alone would reproduce it: its decoys get a small nonzero spread instead
(:func:`decoy_params`).  Whatever the draw, a tensor whose decoy still equals it byte for byte
is not reported as locked: :func:`write_decoys` changes one element of a non-empty one and
returns the names of those left as they are (empty tensors), so the locked count is the number
of tensors whose bytes differ in the locked file.

The random stream is derived from the data key and the tensor name (HKDF-SHA256, then numpy's
PCG64), so the same key reproduces the same locked file; the key cannot be recovered from the
decoys since HKDF is one-way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from layerlock.shared.chunks import Progress
from layerlock.shared.formats import FLOAT_DTYPES, ITEMSIZE, TensorInfo

# dtype code -> numpy dtype used to read values (BF16 is read as raw uint16 and widened).
_NP: dict[str, str] = {
    "BOOL": "bool", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}
_BLOCK_ELEMS = 1 << 22  # statistics and decoys are computed in blocks: memory stays flat
_INFO = b"layerlock-decoy-v1\0"


def decoy_rng(data_key: bytes, name: str) -> np.random.Generator:
    """The random stream for tensor ``name``'s decoys, from the data key only."""
    seed = HKDF(hashes.SHA256(), 32, None, _INFO + name.encode()).derive(data_key)
    return np.random.default_rng(int.from_bytes(seed, "big"))


def write_decoys(view: memoryview, locked: list[TensorInfo], path: Path, key: bytes,
                 bar: Progress | None = None) -> list[str]:
    """Overwrite each locked tensor's range of ``path`` (a copy of ``view``) with its decoys.

    Returns the names of the tensors left byte for byte as they were: those are not locked.  Only
    an empty tensor can be one; a non-empty tensor whose draw happened to reproduce it (a
    one-element integer, say) gets its first element changed.
    """
    unchanged: list[str] = []
    with path.open("r+b") as out:
        for t in locked:
            original = view[t.offset:t.offset + t.length]
            mean, std = decoy_params(*tensor_stats(original, t.dtype), t.dtype)
            out.seek(t.offset)
            pos, same = 0, True
            for block in decoy_blocks(t, mean, std, decoy_rng(key, t.name)):
                if same:  # stops comparing at the first block that differs (almost always the first)
                    same = original[pos:pos + len(block)] == block
                out.write(block)
                pos += len(block)
            if same and t.length:
                first = bytes(original[:1])
                out.seek(t.offset)
                out.write(bytes([first[0] ^ 1]))  # lowest byte (little-endian): the value moves by one unit
                same = False
            if same:
                unchanged.append(t.name)
            if bar is not None:
                bar.update(t.length)
    return unchanged


def decoy_params(mean: float, std: float, dtype: str) -> tuple[float, float]:
    """The mean and spread to draw a tensor's decoys with: its own, unless it is constant.

    With ``std == 0`` the decoys would equal the tensor (an all-zeros bias stays all zeros: it
    is not locked at all).  Such a tensor gets a small spread around its value: 10 % of it, at
    least 0.02 (a typical initialisation scale) for floats and 1 for integers; a constant
    boolean tensor gets fair coin flips.
    """
    if std > 0 and math.isfinite(std):
        return mean, std
    if dtype == "BOOL":
        return 0.5, 0.5
    floor = 0.02 if dtype in FLOAT_DTYPES else 1.0
    return mean, max(floor, 0.1 * abs(mean)) if math.isfinite(mean) else floor


def _values(block: memoryview, dtype: str) -> np.ndarray:
    arr = np.frombuffer(block, dtype=_NP[dtype])
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def tensor_stats(view: memoryview, dtype: str) -> tuple[float, float]:
    """Mean and standard deviation of finite values, in blocks (Chan's parallel variance)."""
    if dtype not in _NP:
        return 0.0, 1.0
    item = ITEMSIZE[dtype]
    n, mean, m2 = 0, 0.0, 0.0
    step = _BLOCK_ELEMS * item
    for start in range(0, len(view), step):
        x = _values(view[start:start + step], dtype).astype(np.float64)
        if dtype in FLOAT_DTYPES:
            x = x[np.isfinite(x)]
        k = int(x.size)
        if not k:
            continue
        bm = float(x.mean())
        bm2 = float(((x - bm) ** 2).sum())
        delta = bm - mean
        total = n + k
        mean += delta * k / total
        m2 += bm2 + delta * delta * n * k / total
        n = total
    if not n:
        return 0.0, 1.0
    return mean, math.sqrt(m2 / n)


def decoy_blocks(info: TensorInfo, mean: float, std: float, rng: np.random.Generator) -> Iterator[bytes]:
    """Random values with the tensor's mean and std, cast to its dtype, block by block.

    Matching the statistics keeps the locked file plausible (no all-zero layer that shouts
    "locked here", activations in a sane range) while the values carry no information.
    """
    item = ITEMSIZE[info.dtype]
    remaining = info.numel
    while remaining:
        n = min(remaining, _BLOCK_ELEMS)
        remaining -= n
        if info.dtype not in _NP:  # float8: no numpy type; random bytes are as good a decoy
            yield rng.bytes(n * item)
            continue
        if info.dtype == "BOOL":
            yield (rng.random(n) < mean).tobytes()
            continue
        x: np.ndarray[Any, Any]
        if info.dtype in ("F16", "BF16", "F32"):  # float32 draws: twice as fast, precision to spare
            x = rng.standard_normal(n, dtype=np.float32)
            x *= np.float32(std)
            x += np.float32(mean)
        else:
            x = rng.normal(mean, std, n)
        if info.dtype == "BF16":
            bits = x.astype(np.float32).view(np.uint32)
            yield ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        elif info.dtype in FLOAT_DTYPES:
            lim = float(np.finfo(_NP[info.dtype]).max)
            yield np.clip(x, -lim, lim).astype(_NP[info.dtype]).tobytes()
        else:
            ii = np.iinfo(_NP[info.dtype])
            lo, hi = max(float(ii.min), -(2.0 ** 62)), min(float(ii.max), 2.0 ** 62)
            yield np.clip(np.rint(x), lo, hi).astype(_NP[info.dtype]).tobytes()
