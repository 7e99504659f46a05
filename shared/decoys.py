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

Plans (:mod:`layerlock.shared.plan`, :func:`write_plan_decoys`) refine this: a whole float
matrix gets a *spectrum-matched* decoy (random singular vectors, the real singular values and
value quantiles: :func:`spectral_decoy`), so per-tensor statistics do not single it out; part
of a tensor (rows, input columns) gets draws with the mean and std of the tensor's *clear* part,
so locked slices do not stand out from their neighbours (a per-slice detector is at chance on
the demo model; with the locked part's own statistics it found them at AUC 0.99); with a base,
the decoy is the base's own value; integer buffers, locked only when asked, get integers drawn
within the values they held (indices stay in range), bool buffers coin flips at their rate.
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
from layerlock.shared.selection import BUFFER_DTYPES

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


# --- plans: partial locks, base decoys, decoys that do not stand out ------------------------------------
SPECTRAL_CAP = 1 << 20  # whole rank-2 tensors up to this many elements get spectrum-matched decoys ...
SPECTRAL_DIM = 1024  # ... when their smaller side is at most this (SVD + QR: about a second at most;
# a 4096 x 1024 matrix took 17 s, so larger ones get the streamed mean/std decoys)
_QUANTILES = 1025


def read_array(view: memoryview, t: TensorInfo) -> np.ndarray[Any, Any] | None:
    """Tensor ``t`` of ``view`` as a numpy array of its shape (no copy; BF16 widened to float32).

    None for dtypes numpy cannot hold (float8).
    """
    if t.dtype not in _NP:
        return None
    arr = _values(view[t.offset:t.offset + t.length], t.dtype)
    return arr.reshape(t.shape)


def _encode(x: np.ndarray[Any, Any], dtype: str) -> bytes:
    """Values as ``dtype`` bytes (floats clipped to the finite range, integers rounded and clipped)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    if dtype == "BOOL":
        return np.asarray(x, dtype=bool).tobytes()
    if dtype in FLOAT_DTYPES:
        lim = float(np.finfo(_NP[dtype]).max)
        clipped: np.ndarray[Any, Any] = np.clip(np.asarray(x, dtype=np.float64), -lim, lim)
        return clipped.astype(_NP[dtype]).tobytes()
    ii = np.iinfo(_NP[dtype])
    lo, hi = max(float(ii.min), -(2.0 ** 62)), min(float(ii.max), 2.0 ** 62)
    ints: np.ndarray[Any, Any] = np.clip(np.rint(np.asarray(x, dtype=np.float64)), lo, hi)
    return ints.astype(_NP[dtype]).tobytes()


def spectral_decoy(x: np.ndarray[Any, Any], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """A random matrix with ``x``'s singular values and (approximately) its value distribution.

    ``U diag(s) V^T`` with Haar-random ``U``, ``V``: the singular vectors -- everything the
    values do -- are fresh randomness; what is kept is the spectrum and 1,025 quantiles of the
    values, so per-tensor statistics (mean, std, kurtosis, spectrum) look like a trained
    tensor's, not like Gaussian noise (whose spectrum gives a locked tensor away).
    """
    m = x.reshape(x.shape[0], -1).astype(np.float64)
    mu = float(m.mean())
    c = m - mu
    s = np.linalg.svd(c, compute_uv=False)
    rows, cols = c.shape
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    d = (u * s) @ v.T
    qs = np.quantile(c, np.linspace(0, 1, _QUANTILES))
    ranks = np.empty(d.size)
    ranks[np.argsort(d, axis=None, kind="stable")] = np.linspace(0, 1, d.size)
    out = np.interp(ranks, np.linspace(0, 1, _QUANTILES), qs).reshape(c.shape) + mu
    return out.reshape(x.shape)


def _random_values(arr: np.ndarray[Any, Any], mask: np.ndarray[Any, Any] | None, dtype: str,
                   rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """Decoy values for the locked elements (``mask``; None = all), flattened in C order."""
    locked = arr if mask is None else arr[mask]
    if dtype == "BOOL":
        return rng.random(locked.size) < float(np.mean(locked)) if locked.size else np.zeros(0, bool)
    if dtype not in FLOAT_DTYPES and dtype not in ("I8", "U8"):  # index-like: stay within the values seen
        lo, hi = max(int(locked.min()), -(1 << 62)), min(int(locked.max()), 1 << 62)
        return rng.integers(lo, hi, size=locked.size, endpoint=True)
    values = arr.astype(np.float64)
    if mask is None:
        finite = values[np.isfinite(values)]
        std = float(finite.std()) if finite.size else 0.0
        if (arr.ndim == 2 or (arr.ndim > 2 and arr.shape[0] > 1)) and std > 0 and arr.size <= SPECTRAL_CAP \
                and min(arr.shape[0], arr.size // max(arr.shape[0], 1)) <= SPECTRAL_DIM and finite.size == arr.size:
            return spectral_decoy(values, rng).reshape(-1)
        mean, std = decoy_params(float(finite.mean()) if finite.size else 0.0, std, dtype)
        return rng.normal(mean, std, arr.size)
    # Part of a tensor: draw with the statistics of its *clear* part, so the locked slices do not
    # stand out from the rest of the tensor (with too little clear, those of the locked part).
    rows = values.reshape(values.shape[0], -1) if values.ndim >= 2 else None
    by_row = mask.reshape(rows.shape) if rows is not None else None
    if rows is not None and by_row is not None and bool((by_row.all(axis=1) == by_row.any(axis=1)).all()) \
            and int((~by_row.any(axis=1)).sum()) >= 16:
        # Whole rows (an embedding table's tokens): each decoy row mixes two clear rows (weights
        # sqrt(t), sqrt(1 - t): the spread is kept) plus a little noise -- row statistics (norms,
        # spreads, the outlier dimensions such tables have) look like the clear rows', and the
        # values are none of theirs.  The first row is drawn at random, its partner among the
        # 16 other clear rows nearest to it in norm (never itself: a row mixed with itself is a
        # scaled copy): a mix of two random rows has a narrower spread of norms than the rows
        # themselves, which a row classifier on spread and norm found (AUC 0.65 on MiniLM; 0.54
        # with partners of like norm).
        clear_rows = rows[~by_row.any(axis=1)]
        n, width = int(by_row.all(axis=1).sum()), rows.shape[1]
        by_norm = np.argsort(np.linalg.norm(clear_rows, axis=1), kind="stable")
        pick = rng.integers(0, len(clear_rows), size=n)
        step = rng.integers(1, 9, size=n) * rng.choice([-1, 1], size=n)  # 8 ranks either side, not 0
        near = np.where((pick + step >= 0) & (pick + step < len(clear_rows)), pick + step, pick - step)
        a, b = clear_rows[by_norm[pick]], clear_rows[by_norm[near]]
        t = rng.random((n, 1))
        jitter = rng.standard_normal((n, width)) * (0.05 * clear_rows.std(axis=0, keepdims=True))
        drawn: np.ndarray[Any, Any] = (np.sqrt(t) * a + np.sqrt(1 - t) * b) + jitter
        return drawn.reshape(-1)
    clear = values[~mask]
    clear = clear[np.isfinite(clear)]
    source = clear if clear.size >= 16 else values[mask][np.isfinite(values[mask])]
    mean, std = decoy_params(float(source.mean()) if source.size else 0.0,
                             float(source.std()) if source.size else 0.0, dtype)
    return rng.normal(mean, std, int(mask.sum()))


def write_plan_decoys(view: memoryview, locks: list[Any], path: Path, key: bytes,
                      base: dict[str, np.ndarray[Any, Any]] | None = None, bar: Progress | None = None) -> list[str]:
    """Overwrite each lock of a :class:`layerlock.shared.plan.Plan` in ``path`` (a copy of ``view``).

    Whole random locks of large or odd tensors stream as :func:`write_decoys` does; the rest
    (partial locks, base decoys, spectrum-matched decoys) are computed per tensor.  Returns the
    names of locks left byte for byte as they were (empty ones), which are not locked.
    """
    streamed = [lk.info for lk in locks if _streams(lk)]
    unchanged = write_decoys(view, streamed, path, key, None) if streamed else []
    with path.open("r+b") as out:
        for lk in locks:
            t = lk.info
            if not _streams(lk):
                _write_lock(view, lk, out, key, base)
            if bar is not None:
                bar.update(t.length)
    return unchanged


def _streams(lk: Any) -> bool:
    """Whether a lock takes the streaming path (whole, random, not spectrum-matched)."""
    t: TensorInfo = lk.info
    if t.dtype not in _NP or not t.numel:
        return True  # float8 (never partial: plans lock it whole) or empty
    if lk.runs is not None or lk.decoy == "base" or t.dtype in BUFFER_DTYPES:
        return False
    return not (len(t.shape) >= 2 and t.numel <= SPECTRAL_CAP and t.dtype in FLOAT_DTYPES)


def _write_lock(view: memoryview, lk: Any, out: Any, key: bytes, base: dict[str, np.ndarray[Any, Any]] | None) -> None:
    t: TensorInfo = lk.info
    arr = read_array(view, t)
    assert arr is not None
    mask = None if lk.runs is None else lk.mask()
    if lk.decoy == "base":
        if base is None or t.name not in base:
            raise ValueError(f"no base values for {t.name}")
        ref = np.asarray(base[t.name]).reshape(t.shape)
        values = (ref if mask is None else ref[mask]).reshape(-1)
    else:
        values = _random_values(arr, mask, t.dtype, decoy_rng(key, t.name))
    item = ITEMSIZE[t.dtype]
    data = _encode(values, t.dtype)
    runs = [(0, t.numel)] if lk.runs is None else list(lk.runs)
    original = view[t.offset:t.offset + t.length]
    pos, same = 0, True
    for start, n in runs:
        chunk = data[pos * item:(pos + n) * item]
        if same:
            same = original[start * item:(start + n) * item] == chunk
        out.seek(t.offset + start * item)
        out.write(chunk)
        pos += n
    if same:  # the decoy reproduced the locked values (a one-element buffer, say): move one unit
        start = runs[0][0] * item
        out.seek(t.offset + start)
        out.write(bytes([original[start] ^ 1]))
