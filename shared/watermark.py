"""Owner watermark: an N-bit signature in a model's weights that any copy still carries.

A license proves who may *run* a model; a watermark proves whose it *is* -- on any copy,
locked or not, licensed or leaked before licensing, fine-tuned, pruned or quantized.  This
module is the key, the placement and the detector, in numpy only (a suspect is checked on a
machine without torch); embedding it is :mod:`layerlock.shared.watermark_torch`.

The scheme (Uchida et al. 2017, "Embedding watermarks into deep neural networks")
-----------------------------------------------------------------------------------
The key marks ``m`` weight *positions* ``w`` (elements of chosen tensors).  A secret
projection ``X`` (``N x m``, entries ``±1/sqrt(m)``) and secret signature bits ``s`` (``±1``)
come from the key.  The model carries the mark when ``sign(X w) == s`` for (nearly) every bit;
embedding pushes each ``s_j (X w)_j`` above a margin by gradient descent with a fidelity term.

Detection, and why the p-value is exact
---------------------------------------
For a suspect, count the matches ``k`` of ``sign(X w')`` with ``s``.  If the suspect's weights
were made without the key (an independent model, the unmarked original), then for any fixed
``w'`` each row ``X_j`` is as likely as ``-X_j`` (independent fair ±1 entries), so each bit
matches with probability exactly 1/2, independently of the others.  The chance of ``k`` or
more matches is the binomial tail ``P[Bin(N, 1/2) >= k]``, computed exactly with integers
(:func:`binomial_tail`) -- no approximation, no scipy.  A suspect is *detected* at
``p < 1e-12`` (:data:`THRESHOLD`): one innocent model in a trillion is flagged per key and
check; a vendor checking a million suspects against ten keys still stays under 1e-5 (union
bound).  The independence rests on the projection being unpredictable without the secret: it
comes from HKDF-SHA256, a PRF.  256 bits tolerate 72 wrong bits (BER 0.28) at that threshold,
which is where the robustness to fine-tuning comes from: the margin only needs to keep most
bits, not all.

Where the mark sits, and why
----------------------------
Positions are drawn (by the key) among the **top 30 % by magnitude** of each eligible tensor:
magnitude pruning at 50 % removes the small half and barely reaches them (only where marking
itself shrank a weight: 0-1 % of the bits flip, bench/watermark.py).  Eligible: float
tensors of rank >= 2 with at least :data:`MIN_TENSOR` elements that are not embedding tables
(a table's rows for tokens the data never shows carry nothing the model uses, and the
protect policy decoys them).  Positions are chosen on the model being marked and **stored in
the key file** (uint32 flat indices), so detection needs neither the original model nor its
magnitudes.  Up to ``64 N`` positions (at most :data:`MAX_POSITIONS`): the change each
position takes shrinks as ``1/sqrt(m)``, for the same total.

The key file
------------
JSON, mode 0600, never overwritten::

    {"layerlock_watermark": 1, "secret": "<32 bytes, base64url>", "bits": 256,
     "tensors": [{"name": "fc1.weight", "shape": [64, 64], "positions": "<uint32 LE, base64url>"}, ...]}

The signature bits and the projection derive from the secret (HKDF-SHA256 with distinct
labels), so the file holds one secret.  The projection is derived with HKDF rather than a
seeded numpy ``Generator`` because numpy does not promise a ``Generator``'s stream stays the
same across versions (NEP 19), and a key must still detect years later.  Reusing a key on a
new version of the model (same tensors and shapes) marks it with the same positions and bits:
one key detects every version.
"""

from __future__ import annotations

import fnmatch
import json
import math
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from layerlock.shared.errors import InvalidInput
from layerlock.shared.keys import b64u_decode, b64u_encode, create_secret_file, read_secret_file
from layerlock.shared.selection import is_embedding

FORMAT = 1
SECRET_BYTES = 32
MIN_BITS = 64  # 2^-64: even a perfect match of fewer bits barely clears THRESHOLD, with no room for errors
MAX_BITS = 1024
DEFAULT_BITS = 256
POOL_SHARE = 0.30  # positions come from each tensor's largest 30 % magnitudes: 50 % pruning keeps them
MIN_TENSOR = 1024  # smaller tensors (heads of a few classes, norms) carry little and cost much
POSITIONS_PER_BIT = 64
MIN_POSITIONS_PER_BIT = 4  # fewer positions than 4 N: the bits are no longer independent directions
MAX_POSITIONS = 32768  # the projection is bits x positions floats in memory at embed time
MAX_TENSORS = 4096
KEY_FILE_CAP = 1 << 20
THRESHOLD = 1e-12
_SALT = b"layerlock watermark v1"
_KEYS = {"layerlock_watermark", "secret", "bits", "tensors"}
_MARK_KEYS = {"name", "shape", "positions"}


@dataclass(frozen=True)
class Mark:
    """One marked tensor: its name, its shape, and the (sorted, flat, C-order) positions in it."""

    name: str
    shape: tuple[int, ...]
    positions: np.ndarray[Any, np.dtype[np.uint32]]


@dataclass(frozen=True)
class WatermarkKey:
    """The secret, the number of bits, and where the mark sits (empty until :func:`place`)."""

    secret: bytes = field(repr=False)
    bits: int
    marks: tuple[Mark, ...] = ()

    @property
    def positions(self) -> int:
        return sum(int(m.positions.size) for m in self.marks)

    def _derive(self, label: bytes, length: int) -> bytes:
        return HKDF(hashes.SHA256(), length, salt=_SALT, info=label).derive(self.secret)

    def signature(self) -> np.ndarray[Any, np.dtype[np.int8]]:
        """The ``bits`` signature bits as ±1 (from the secret)."""
        raw = np.frombuffer(self._derive(b"signature", (self.bits + 7) // 8), np.uint8)
        return (np.unpackbits(raw)[:self.bits].astype(np.int8) * 2 - 1).astype(np.int8)

    def projection(self, rows: Iterable[int] | None = None) -> np.ndarray[Any, np.dtype[np.float32]]:
        """``X``: one row per bit, entries ±1/sqrt(m), row ``j`` from HKDF(secret, "projection" || j)."""
        m = self.positions
        if not m:
            raise InvalidInput("the watermark key marks no positions yet")
        idx = list(range(self.bits)) if rows is None else list(rows)
        out = np.empty((len(idx), m), np.float32)
        scale = np.float32(1.0 / math.sqrt(m))
        for r, j in enumerate(idx):
            raw = np.frombuffer(self._derive(b"projection" + j.to_bytes(4, "big"), (m + 7) // 8), np.uint8)
            out[r] = (np.unpackbits(raw)[:m].astype(np.float32) * 2 - 1) * scale
        return out

    def to_json(self) -> dict[str, Any]:
        return {"layerlock_watermark": FORMAT, "secret": b64u_encode(self.secret), "bits": self.bits,
                "tensors": [{"name": m.name, "shape": list(m.shape),
                             "positions": b64u_encode(m.positions.astype("<u4").tobytes())} for m in self.marks]}

    def save(self, path: Path) -> None:
        """Write the key as a **new** file, mode 0600 from the first byte; an existing file is refused."""
        if not self.marks:
            raise InvalidInput("refusing to save a watermark key that marks no positions (place it first)")
        data = (json.dumps(self.to_json(), indent=1) + "\n").encode()
        try:
            create_secret_file(path, data)
        except FileExistsError:
            raise InvalidInput(f"key file {path} already exists: a watermark key is never overwritten") from None

    @classmethod
    def load(cls, path: Path) -> WatermarkKey:
        """Read and strictly validate a key file (group/other-readable files are refused)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InvalidInput(f"key file {path}: no such file") from None
        if not stat.S_ISREG(path.stat().st_mode):
            raise InvalidInput(f"key file {path}: not a regular file")
        if size > KEY_FILE_CAP:
            raise InvalidInput(f"key file {path}: {size:,} bytes, larger than any watermark key ({KEY_FILE_CAP:,})")
        raw = read_secret_file(path)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput(f"key file {path}: not JSON") from None
        return cls.from_json(doc, str(path))

    @classmethod
    def from_json(cls, doc: object, source: str = "key") -> WatermarkKey:
        """The key from its JSON document; every field checked, anything off is InvalidInput."""
        def bad(what: str) -> InvalidInput:
            return InvalidInput(f"key file {source}: {what}")

        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        if doc.get("layerlock_watermark") != FORMAT or isinstance(doc.get("layerlock_watermark"), bool):
            raise bad(f"not a layerlock watermark key (format {FORMAT}): "
                      f"layerlock_watermark is {_shown(doc.get('layerlock_watermark'))}")
        extra, missing = set(doc) - _KEYS, _KEYS - set(doc)
        if missing or extra:
            raise bad(", ".join(filter(None, (f"missing {', '.join(sorted(missing))}" if missing else "",
                                              f"unknown field {', '.join(sorted(extra))}" if extra else ""))))
        try:
            secret = b64u_decode(doc["secret"], field="secret")
        except InvalidInput as exc:
            raise bad(exc.message) from None
        if len(secret) != SECRET_BYTES:
            raise bad(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
        bits = doc["bits"]
        if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
            raise bad(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {_shown(bits)}")
        entries = doc["tensors"]
        if not isinstance(entries, list) or not entries or len(entries) > MAX_TENSORS:
            raise bad(f"tensors must be a list of 1 to {MAX_TENSORS} marked tensors")
        marks, names = [], set()
        for i, e in enumerate(entries):
            mark = _mark(e, f"tensors[{i}]", bad)
            if mark.name in names:
                raise bad(f"tensors[{i}]: {mark.name} is listed twice")
            names.add(mark.name)
            marks.append(mark)
        key = cls(secret, bits, tuple(marks))
        if not MIN_POSITIONS_PER_BIT * bits <= key.positions <= MAX_POSITIONS:
            raise bad(f"{key.positions} positions for {bits} bits (need {MIN_POSITIONS_PER_BIT * bits} "
                      f"to {MAX_POSITIONS})")
        return key


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."


def _mark(e: object, where: str, bad: Any) -> Mark:
    if not isinstance(e, dict):
        raise bad(f"{where} is not an object")
    if set(e) != _MARK_KEYS:
        raise bad(f"{where} must have exactly name, shape, positions (got {', '.join(sorted(map(str, e)))})")
    name, shape, pos = e["name"], e["shape"], e["positions"]
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise bad(f"{where}.name must be a non-empty string")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**32 for d in shape)):
        raise bad(f"{where}.shape must be a list of 1 to 8 positive integers")
    numel = math.prod(shape)
    try:
        data = b64u_decode(pos, field=f"{where}.positions")
    except InvalidInput as exc:
        raise bad(exc.message) from None
    if not data or len(data) % 4:
        raise bad(f"{where}.positions must be a non-empty run of uint32 (a multiple of 4 bytes)")
    idx = np.frombuffer(data, "<u4").astype(np.uint32)
    if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise bad(f"{where}.positions must be strictly increasing")
    if int(idx[-1]) >= numel:
        raise bad(f"{where}.positions: {int(idx[-1])} is outside {name} ({numel} elements)")
    return Mark(name, tuple(int(d) for d in shape), idx)


# --- choosing positions ------------------------------------------------------------------------------
def new_key(bits: int = DEFAULT_BITS) -> WatermarkKey:
    """A fresh random secret (``secrets``) for ``bits`` bits, not placed on any model yet."""
    if isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidInput(f"--bits must be in [{MIN_BITS}, {MAX_BITS}] (fewer than {MIN_BITS} bits cannot reach "
                           f"p < {THRESHOLD:g} with any bit wrong), got {bits}")
    return WatermarkKey(secrets.token_bytes(SECRET_BYTES), bits)


def eligible(shapes: Mapping[str, tuple[int, ...]], floating: Mapping[str, bool],
             patterns: Sequence[str] = ()) -> list[str]:
    """Tensors the mark may sit in: by default float, rank >= 2, >= MIN_TENSOR elements, not an
    embedding table; with ``patterns`` (fnmatch), the float tensors of rank >= 2 they name."""
    out = []
    for name, shape in shapes.items():
        if not floating.get(name) or len(shape) < 2 or not 0 < math.prod(shape) < 2**32:  # uint32 positions
            continue
        if patterns:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out.append(name)
        elif math.prod(shape) >= MIN_TENSOR and not is_embedding(name, shape):
            out.append(name)
    return out


def place(key: WatermarkKey, tensors: Mapping[str, np.ndarray[Any, Any]], patterns: Sequence[str] = ()) -> WatermarkKey:
    """Choose the positions on this model: up to 64 N of the union of each eligible tensor's top
    30 % magnitudes, drawn uniformly with a generator seeded from the secret."""
    if key.marks:
        raise InvalidInput("the watermark key is already placed")
    shapes = {n: tuple(a.shape) for n, a in tensors.items()}
    floating = {n: a.dtype.kind == "f" for n, a in tensors.items()}
    names = eligible(shapes, floating, patterns)
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise InvalidInput(f"--pattern {unmatched[0]} matches no float tensor of rank >= 2")
    if not names:
        raise InvalidInput(f"no tensor to mark: none is a float matrix (or kernel) of at least {MIN_TENSOR} "
                           "elements outside the embedding tables (choose some with --pattern)")
    pools = []
    for name in names:
        flat = np.abs(np.asarray(tensors[name], dtype=np.float32).reshape(-1))
        keep = max(1, int(round(POOL_SHARE * flat.size)))
        top = np.argpartition(flat, flat.size - keep)[flat.size - keep:] if keep < flat.size else np.arange(flat.size)
        pools.append(np.sort(top).astype(np.int64))
    pool = sum(p.size for p in pools)
    m = min(pool, POSITIONS_PER_BIT * key.bits, MAX_POSITIONS)
    if m < MIN_POSITIONS_PER_BIT * key.bits:
        raise InvalidInput(f"{key.bits} bits need at least {MIN_POSITIONS_PER_BIT * key.bits} positions; "
                           f"{', '.join(names)} offer {pool} (use fewer --bits, or --pattern more tensors)")
    seed = int.from_bytes(key._derive(b"positions", 16), "big")
    chosen = np.sort(np.random.Generator(np.random.PCG64(seed)).choice(pool, size=m, replace=False))
    marks, start = [], 0
    for name, p in zip(names, pools, strict=True):
        mine = chosen[(chosen >= start) & (chosen < start + p.size)] - start
        start += p.size
        if mine.size:
            marks.append(Mark(name, shapes[name], np.sort(p[mine]).astype(np.uint32)))
    return WatermarkKey(key.secret, key.bits, tuple(marks))


def check_fits(key: WatermarkKey, shapes: Mapping[str, tuple[int, ...]], what: str = "the model") -> None:
    """InvalidInput naming the first marked tensor ``shapes`` lacks or has in another shape."""
    missing = [m.name for m in key.marks if m.name not in shapes]
    if missing:
        raise InvalidInput(f"{what} has no tensor {missing[0]}"
                           f"{f' (nor {len(missing) - 1} more marked tensors)' if len(missing) > 1 else ''}; "
                           f"the key marks {len(key.marks)} tensors: {_names(key)}")
    for m in key.marks:
        if tuple(shapes[m.name]) != m.shape:
            raise InvalidInput(f"{m.name} is {_shape(shapes[m.name])} in {what}; the key marks it as {_shape(m.shape)}")


def _names(key: WatermarkKey, limit: int = 4) -> str:
    names = [m.name for m in key.marks]
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def gather(key: WatermarkKey, tensors: Mapping[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The marked weights of ``tensors``, in key order (float64)."""
    check_fits(key, {n: tuple(a.shape) for n, a in tensors.items()})
    return np.concatenate([np.asarray(tensors[m.name], dtype=np.float64).reshape(-1)[m.positions.astype(np.int64)]
                           for m in key.marks])


# --- detection ---------------------------------------------------------------------------------------
def binomial_tail(n: int, k: int) -> tuple[float, float]:
    """``P[Bin(n, 1/2) >= k]`` exactly, as (p, log10 p); integers throughout, one rounding at the end."""
    if k <= 0:
        return 1.0, 0.0
    if k > n:
        return 0.0, -math.inf
    count = sum(math.comb(n, i) for i in range(k, n + 1))
    return count / (1 << n), math.log10(count) - n * math.log10(2)


@dataclass
class Detection:
    """What :func:`detect` found: matches of ``bits``, the bit error rate and the chance p."""

    bits: int
    matches: int
    p_value: float
    log10_p: float
    strength: float  # mean of s_j (X w)_j over the marked weights' RMS: ~0 by chance, the margin when marked
    notes: list[str] = field(default_factory=list)

    @property
    def ber(self) -> float:
        return (self.bits - self.matches) / self.bits

    @property
    def detected(self) -> bool:
        return self.p_value < THRESHOLD

    def as_dict(self) -> dict[str, Any]:
        return {"detected": self.detected, "bits": self.bits, "matches": self.matches, "ber": round(self.ber, 6),
                "p_value": self.p_value, "log10_p": round(self.log10_p, 3), "threshold": THRESHOLD,
                "strength": round(self.strength, 4), "notes": list(self.notes)}


def detect(key: WatermarkKey, tensors: Mapping[str, np.ndarray[Any, Any]], notes: Sequence[str] = ()) -> Detection:
    """Count sign matches of ``X w`` with the signature on ``tensors`` (name -> array, numpy only).

    A projection that is exactly zero (every marked weight pruned) counts as a mismatch.
    """
    w = gather(key, tensors)
    if not np.all(np.isfinite(w)):
        w = np.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        notes = [*notes, "non-finite marked weights were read as 0"]
    s = key.signature().astype(np.float64)
    y = np.concatenate([key.projection(range(j, min(j + 256, key.bits))).astype(np.float64) @ w
                        for j in range(0, key.bits, 256)])
    matches = int(np.sum(np.sign(y) == s))
    p, log10_p = binomial_tail(key.bits, matches)
    rms = float(np.sqrt(np.mean(w * w)))
    strength = float(np.mean(s * y) / rms) if rms > 0 else 0.0
    return Detection(key.bits, matches, p, log10_p, strength, list(notes))


def read_marked(key: WatermarkKey, path: Path, workdir: Path) -> tuple[dict[str, np.ndarray[Any, Any]], list[str]]:
    """The marked tensors of a model file (safetensors, .pt/.pth, ONNX), only those, and notes.

    Only the marked tensors are read (a large suspect is not copied whole).  A 2-D tensor stored
    transposed -- an ONNX ``MatMul``/``Gemm`` weight kept (in, out) where PyTorch keeps
    (out, in) -- is read back in the key's orientation: by its shape when that is unambiguous,
    by the graph for square ones.
    """
    from layerlock.shared import formats
    from layerlock.shared.decoys import read_array
    from layerlock.shared.plan import _onnx_graph, mapped

    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    plain = formats.open_plain(path, workdir)
    notes: list[str] = []
    try:
        infos = {t.name: t for t in plain.tensors}
        in_out = (_onnx_graph(plain.path) or ([], set()))[1] if plain.format == "onnx" else set()
        shapes = {}
        flips = set()
        for m in key.marks:
            t = infos.get(m.name)
            if t is None:
                continue
            shape = tuple(t.shape)
            if len(m.shape) == 2 and shape == m.shape[::-1] and (shape != m.shape or m.name in in_out):
                flips.add(m.name)
                shape = m.shape
                notes.append(f"{m.name} is stored transposed {_shape(t.shape)}: read as {_shape(m.shape)}")
            shapes[m.name] = shape
        check_fits(key, shapes, what=path.name)
        out: dict[str, np.ndarray[Any, Any]] = {}
        with mapped(plain) as view:
            for m in key.marks:
                arr = read_array(view, infos[m.name])
                if arr is None or arr.dtype.kind not in "fiu":
                    raise InvalidInput(f"{m.name} in {path.name} is {infos[m.name].dtype}: not a dtype the "
                                       "detector can read")
                out[m.name] = np.array(arr.T if m.name in flips else arr)
                del arr
        return out, notes
    finally:
        if plain.temporary:
            plain.path.unlink(missing_ok=True)


def detect_file(key: WatermarkKey, path: Path, workdir: Path) -> Detection:
    """:func:`detect` on a model file (safetensors, .pt/.pth, ONNX); unreadable files are InvalidInput."""
    try:
        tensors, notes = read_marked(key, path, workdir)
    except OSError as exc:
        raise InvalidInput(f"{exc.filename or path}: {exc.strerror}") from None
    return detect(key, tensors, notes)
