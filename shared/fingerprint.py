"""Per-license fingerprints: every license's unlocked weights differ, and a leaked copy names it.

Why it holds against a customer with a patched sidecar
------------------------------------------------------
``protect`` picks ``n`` *fingerprint positions* among the **locked** elements (the largest
magnitudes, so magnitude pruning keeps them) and writes **decoys** there into the bundle as well
as into the locked file: the original values at those positions exist only in the fingerprint
secret, which goes to the license server sealed (HPKE to its intake key, then its KEK).  At
activation the server computes, for that license only, ``v = w + δ·s`` (``s`` = keyed
pseudo-random ±1 chips, ``δ`` = a small share of the tensor's spread) and seals ``v`` to the
machine inside ``wk``, after the data key.  The sidecar writes ``v`` over the decoys.  So
everything a customer holds -- locked file, bundle, token, its own machine key, any sidecar code
-- gives it ``w + δ·s`` and never ``w``: not one original value at a fingerprint position is in
any of them, and ``s`` is keyed by a secret it does not have (:func:`chips`).  Two colluders
learn ``w`` where their chips differ (that is the collusion figure in the README, not a leak of
one license).

Detection and its proven false-accusation bound
-----------------------------------------------
For a suspect, the residual at the positions, ``y = clip((x − w)/δ, ±CLIP)``, depends only on
the suspect and the original, never on license ``L``'s chips.  The statistic is
``z_L = Σ s_L,i y_i / ‖y‖``.  For any fixed ``y`` and chips that are independent fair signs,
Hoeffding gives ``P(z_L ≥ τ) ≤ exp(−τ²/2)`` -- whatever the suspect model is.  A trace tries
``K`` alignments (as found, and re-aligned for permuted hidden units, computed without any
chips), so a union bound over the ``K`` statistics and the ``L`` licenses scanned bounds the
chance that *any* innocent license reaches ``τ`` by ``K·L·exp(−τ²/2)``.  :func:`threshold` picks
``τ`` so that this is ≤ 1e-9 for at least 10^6 licenses.  (Chips are the AES-256-CTR keystream under
a per-model key, one nonce per license: "independent fair signs" holds as long as AES is a PRP.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from layerlock.shared.errors import InvalidInput

FORMAT = 1
MAX_POSITIONS = 4096  # per model: 16 KiB of float32 in every token (see tokens.MAX_TOKEN_LEN)
MIN_POSITIONS = 256  # fewer locked float elements than this: no fingerprint (too weak to trace)
MAX_SITES = 8  # tensors that carry positions (bounds the alignment data)
# Fingerprint energy per tensor ≤ ENERGY² × the locked elements' variance (times the vendor's
# strength²).  0.03: on the 6,570-parameter demo model, the smallest a 0.1-sd noise attack
# leaves traceable (bench/trace.py's sweep); a large model reaches MAX_ALPHA well before it.
ENERGY = 0.03
MAX_ALPHA = 0.1  # δ never exceeds this share of a tensor's standard deviation
POOL_FLOOR = 0.25  # with a sensitivity: positions only above this quantile of relative magnitude
TASK_SHARE = 0.7  # with a sensitivity: this share of the positions, at the same energy (digits: 0 of 1,024
                  # licenses change a held-out digit, and every bench/trace.py attack is still traced)
CLIP = 3.0  # residuals are clipped at ±CLIP·δ: a pruned or retrained weight cannot drown the rest
QUANTILES = np.linspace(0.05, 0.95, 10)  # per-row / per-column descriptors for re-alignment
ALIGN_CAP = 4096  # rows (columns) beyond this are not re-aligned
FALSE_ACCUSATION = 1e-9  # per trace
LICENSES_FOR_BOUND = 1_000_000  # the threshold holds at least for this many licenses scanned
FLOAT = ("F16", "BF16", "F32", "F64")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"fingerprint {what} is not a string")
    try:  # validate: urlsafe_b64decode alone skips characters outside the alphabet
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except ValueError:
        raise InvalidInput(f"fingerprint {what} is not base64url") from None


# --- dtypes ----------------------------------------------------------------------------------------
def to_float(raw: bytes | memoryview | np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian tensor bytes (safetensors dtype code) as float64."""
    buf = raw.tobytes() if isinstance(raw, np.ndarray) else bytes(raw)
    if dtype == "BF16":
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    np_dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}.get(dtype)
    if np_dtype is None:
        raise InvalidInput(f"dtype {dtype} cannot carry a fingerprint")
    return np.frombuffer(buf, dtype=np_dtype).astype(np.float64)


def from_float(values: np.ndarray, dtype: str) -> bytes:
    """float64 values as little-endian bytes of ``dtype`` (BF16: round to nearest even)."""
    if dtype == "BF16":
        bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    np_dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]
    return np.asarray(values, dtype=np.float64).astype(np_dtype).tobytes()


def itemsize(dtype: str) -> int:
    return {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]


# --- the secret ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One tensor's fingerprint positions: flat element indices (sorted), their original bytes."""

    tensor: str
    dtype: str
    shape: tuple[int, ...]
    index: np.ndarray  # uint32, strictly increasing
    original: bytes = field(repr=False)  # the original values at ``index``, in ``dtype``
    scale: float = field(repr=False)  # δ for this tensor
    rows: np.ndarray | None = field(default=None, repr=False)  # (R, Q) quantile descriptors
    cols: np.ndarray | None = field(default=None, repr=False)  # (C, Q)

    @property
    def matrix(self) -> tuple[int, int]:
        """The tensor seen as rows × columns (first axis × the rest)."""
        rows = self.shape[0] if self.shape else 1
        return rows, (math.prod(self.shape) // rows if rows else 0)


@dataclass(frozen=True)
class Secret:
    """A model's fingerprint secret: chip key, positions, original values, alignment data.

    Only the license server holds it (sealed under its KEK).  ``public()`` is what may be shown
    to ops tracing a leak: positions and descriptors, never the key or the original values."""

    model_id: str
    key: bytes = field(repr=False)
    sites: tuple[Site, ...]

    @property
    def n(self) -> int:
        return sum(len(s.index) for s in self.sites)

    def originals(self) -> np.ndarray:
        return np.concatenate([to_float(s.original, s.dtype) for s in self.sites])

    def scales(self) -> np.ndarray:
        return np.concatenate([np.full(len(s.index), s.scale) for s in self.sites])

    def to_bytes(self) -> bytes:
        doc = {"v": FORMAT, "model": self.model_id, "key": _b64(self.key), "sites": [
            {"tensor": s.tensor, "dtype": s.dtype, "shape": list(s.shape),
             "index": _b64(s.index.astype("<u4").tobytes()), "original": _b64(s.original), "scale": s.scale,
             "rows": _desc(s.rows), "cols": _desc(s.cols)} for s in self.sites]}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Secret:
        """Parse (and check) a secret; anything off is an InvalidInput naming the field."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("fingerprint secret is not JSON") from None
        if not isinstance(doc, dict) or doc.get("v") != FORMAT or not isinstance(doc.get("sites"), list):
            raise InvalidInput("fingerprint secret has an unknown format")
        key = _unb64(doc.get("key"), "key")
        if len(key) != 32 or not isinstance(doc.get("model"), str):
            raise InvalidInput("fingerprint secret lacks its 256-bit key or model id")
        sites = tuple(_site(e) for e in doc["sites"])
        if not sites or sum(len(s.index) for s in sites) > MAX_POSITIONS * 4:
            raise InvalidInput("fingerprint secret has no positions, or far too many")
        return cls(doc["model"], key, sites)

    def public(self) -> dict[str, object]:
        """Positions, shapes, δ and descriptors (what an extractor needs); no key, no originals.

        δ is here for :func:`informed` (it weighs each position's residual against the drift
        around it); it is not a secret: two colluders see 2δ wherever their chips differ."""
        return {"model_id": self.model_id, "positions": self.n, "sites": [
            {"tensor": s.tensor, "dtype": s.dtype, "shape": list(s.shape),
             "index": _b64(s.index.astype("<u4").tobytes()), "scale": s.scale,
             "rows": _desc(s.rows), "cols": _desc(s.cols)} for s in self.sites]}


def _site(e: object) -> Site:
    if not isinstance(e, dict):
        raise InvalidInput("fingerprint site is not an object")
    tensor, dtype, shape = e.get("tensor"), e.get("dtype"), e.get("shape")
    if not isinstance(tensor, str) or dtype not in FLOAT or not isinstance(shape, list) \
            or not all(type(d) is int and d > 0 for d in shape):
        raise InvalidInput("fingerprint site has a bad tensor name, dtype or shape")
    raw = _unb64(e.get("index"), "index")
    if len(raw) % 4:
        raise InvalidInput("fingerprint site index is not uint32s")
    index = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    numel = math.prod(shape)
    if not len(index) or np.any(np.diff(index.astype(np.int64)) <= 0) or int(index[-1]) >= numel:
        raise InvalidInput(f"fingerprint site {tensor!r} has indices out of order or outside the tensor")
    original = _unb64(e.get("original"), "original") if "original" in e else b""
    if "original" in e and len(original) != len(index) * itemsize(dtype):
        raise InvalidInput(f"fingerprint site {tensor!r} has the wrong number of original values")
    scale = e.get("scale", 0.0)
    if not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
        raise InvalidInput(f"fingerprint site {tensor!r} has a bad scale")
    rows_n, cols_n = shape[0], numel // shape[0]
    return Site(tensor, dtype, tuple(shape), index, original, float(scale),
                _descriptor(e.get("rows"), rows_n), _descriptor(e.get("cols"), cols_n))


def _desc(values: np.ndarray | None) -> str | None:
    """Descriptors travel as float16: three digits tell rows apart, at half the size."""
    if values is None:
        return None
    limit = float(np.finfo(np.float16).max)
    return _b64(np.clip(values, -limit, limit).astype("<f2").tobytes())


def _descriptor(text: object, count: int) -> np.ndarray | None:
    if text is None:
        return None
    raw = _unb64(text, "descriptor")
    if len(raw) != count * len(QUANTILES) * 2:
        raise InvalidInput("fingerprint descriptor has the wrong size")
    return np.frombuffer(raw, dtype="<f2").reshape(count, len(QUANTILES)).astype(np.float64)


def describe(matrix: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Quantiles of each row and each column: unchanged when the other axis is permuted, so a
    detector can find where a hidden unit went (None on an axis too long or too short)."""
    rows_n, cols_n = matrix.shape
    rows = np.quantile(matrix, QUANTILES, axis=1).T if rows_n <= ALIGN_CAP and cols_n >= 8 else None
    cols = np.quantile(matrix, QUANTILES, axis=0).T if cols_n <= ALIGN_CAP and rows_n >= 8 else None
    return rows, cols


# --- choosing positions (protect) ------------------------------------------------------------------
def choose(model_id: str, locked: Mapping[str, tuple[str, tuple[int, ...], int]],
           load: Callable[[str], tuple[np.ndarray, np.ndarray]], key: bytes, *,
           max_positions: int = MAX_POSITIONS, strength: float = 1.0,
           sensitivity: Callable[[str], np.ndarray] | None = None) -> Secret | None:
    """Pick positions among locked float elements.  ``locked`` maps a tensor name to (dtype,
    shape, number of locked elements); ``load(name)`` gives its values (flat) and a boolean mask
    of its locked elements (flat) -- called only for the tensors chosen, so a large model is
    never held in memory at once.

    The ``MAX_SITES`` tensors with the most locked elements carry the positions; within them the
    locked elements of largest magnitude relative to their tensor's spread (pruning keeps those).
    δ per tensor is set so the fingerprint's energy stays under ``ENERGY²`` of the locked part's
    (and never above ``MAX_ALPHA`` of its standard deviation); ``strength`` scales δ (a vendor's
    trade between robustness and invisibility).

    ``sensitivity(name)``: a per-element cost of moving each weight (flat; the task's Fisher
    diagonal, :mod:`layerlock.shared.sensitivity`).  Given, ``TASK_SHARE`` of that number of
    positions is taken where moving a weight by a share of its tensor's spread costs least, among
    the locked elements above the ``POOL_FLOOR`` quantile of relative magnitude (so 50 % magnitude
    pruning still keeps most).  Each tensor keeps the same energy (as far as ``MAX_ALPHA``
    allows), so the fewer, cheaper positions each carry a larger δ: against noise, quantization
    or fine-tuning the statistic depends on the energy far more than on the count, while what
    the model's outputs feel is energy × the sensitivity where it sits.  None: too little is
    locked."""
    usable = {k: v for k, v in locked.items() if v[0] in FLOAT and v[2] > 0 and math.prod(v[1]) > 1}
    if sum(v[2] for v in usable.values()) < MIN_POSITIONS:
        return None
    pool = []
    for name in sorted(usable, key=lambda k: -usable[k][2])[:MAX_SITES]:
        values, mask = load(name)
        spread = float(values.std(dtype=np.float64))
        if not spread > 0 or not math.isfinite(spread):
            continue
        idx = np.flatnonzero(mask)
        pool.append((name, values, idx, np.abs(values[idx].astype(np.float64)) / spread, spread))
    if sum(len(p[2]) for p in pool) < MIN_POSITIONS:
        return None
    rel = np.concatenate([p[3] for p in pool])
    n = min(max_positions, len(rel) // 2)  # as many as the larger half by magnitude
    if sensitivity is None:
        cut = np.partition(rel, len(rel) - n)[len(rel) - n] if n < len(rel) else -np.inf
        keep = [r >= cut for _, _, _, r, _ in pool]
    else:
        n = min(n, max(MIN_POSITIONS, round(n * TASK_SHARE)))
        floor = float(np.quantile(rel, POOL_FLOOR))
        parts = []
        for name, values, idx, r, spread in pool:
            cost = np.asarray(sensitivity(name), dtype=np.float64).ravel()
            if cost.shape != values.shape or not np.all(np.isfinite(cost)):
                raise InvalidInput(f"sensitivity of {name!r} is not one finite value per element")
            parts.append(np.where(r >= floor, cost[idx] * spread ** 2, np.inf))
        cost = np.concatenate(parts)
        cheapest = np.argsort(cost, kind="stable")[:n]
        chosen = np.zeros(len(cost), dtype=bool)
        chosen[cheapest[np.isfinite(cost[cheapest])]] = True
        bounds = np.cumsum([0] + [len(p[2]) for p in pool])
        keep = [chosen[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sites = []
    taken = 0
    for (name, values, idx, _, spread), mask in zip(pool, keep, strict=True):
        pick = np.sort(idx[mask])[: n - taken]
        if not len(pick):
            continue
        taken += len(pick)
        dtype, shape, count = usable[name]
        alpha = min(MAX_ALPHA * strength, ENERGY * strength * math.sqrt(count / len(pick)))
        rows_n = shape[0] if shape else 1
        rows, cols = describe(values.reshape(rows_n, -1))
        sites.append(Site(name, dtype, tuple(shape), pick.astype(np.uint32),
                          from_float(values[pick].astype(np.float64), dtype),
                          alpha * spread, rows, cols))
        if taken >= n:
            break
    # sites in the order of ``locked`` (the file order): the bundle header lists them so, and the
    # sidecar writes a license's values site after site in that order
    order = {name: i for i, name in enumerate(locked)}
    return Secret(model_id, key, tuple(sorted(sites, key=lambda site: order[site.tensor])))


# --- chips and a license's values (server) ---------------------------------------------------------
def chip_key(key: bytes, model_id: str) -> bytes:
    """The AES-256 key the model's chips are drawn under (HKDF-Expand of the fingerprint key)."""
    return HKDFExpand(hashes.SHA256(), 32, b"layerlock-fp-chips-v2\0" + model_id.encode()).derive(key)


def _nonce(license_id: str) -> bytes:
    return hashlib.sha256(b"layerlock-fp-license\0" + license_id.encode()).digest()[:12]


def chip_bytes(key: bytes, model_id: str, license_ids: Sequence[str], n: int) -> np.ndarray:
    """Packed chips (one bit per position, 1 = +1), one row per license: the AES-256-CTR keystream
    under :func:`chip_key` with the license's 96-bit nonce (a hash of its id) and a 32-bit block
    counter from 0.  Nobody without the key can predict (or subtract) them.

    Many licenses at once (a trace over a million): the counter blocks of every license are
    encrypted in one call of the AES block function (ECB over the CTR counter blocks is exactly
    the CTR keystream), so the cost per license is one hash, not one cipher object."""
    blocks = (n + 127) // 128
    counters = np.zeros((len(license_ids), blocks, 16), dtype=np.uint8)
    counters[:, :, :12] = np.frombuffer(b"".join(_nonce(lic) for lic in license_ids),
                                        dtype=np.uint8).reshape(-1, 1, 12)
    counters[:, :, 12:] = np.arange(blocks, dtype=">u4").view(np.uint8).reshape(blocks, 4)
    enc = Cipher(algorithms.AES(chip_key(key, model_id)), modes.ECB()).encryptor()  # noqa: S305 - CTR blocks
    stream = enc.update(counters.tobytes()) + enc.finalize()
    return np.frombuffer(stream, dtype=np.uint8).reshape(len(license_ids), blocks * 16)[:, :(n + 7) // 8]


def chips(key: bytes, model_id: str, license_id: str, n: int) -> np.ndarray:
    """License ``license_id``'s ±1 chips for ``model_id`` (see :func:`chip_bytes`)."""
    bits = np.unpackbits(chip_bytes(key, model_id, [license_id], n)[0])[:n]
    return bits.astype(np.float64) * 2.0 - 1.0


def license_values(secret: Secret, license_id: str) -> bytes:
    """The bytes the sidecar writes over the decoys: ``w + δ·s`` per position, in each tensor's
    dtype, sites in order.  A value that rounds back to ``w`` is pushed one step the chip's way
    (the other way at the edge of the dtype's range), so no position ever carries the original
    and none becomes infinite."""
    s = chips(secret.key, secret.model_id, license_id, secret.n)
    out, pos = [], 0
    for site in secret.sites:
        k = len(site.index)
        w = to_float(site.original, site.dtype)
        v = w + site.scale * s[pos:pos + k]
        raw = from_float(v, site.dtype)
        back = to_float(raw, site.dtype)
        bad = (back == w) | ~np.isfinite(back)  # rounded back to w, or past the dtype's range
        if np.any(bad):
            v = back.copy()
            for i in np.flatnonzero(bad):
                stepped = step(w[i], s[pos + i], site.dtype)
                v[i] = stepped if math.isfinite(stepped) else step(w[i], -s[pos + i], site.dtype)
            raw = from_float(v, site.dtype)
        out.append(raw)
        pos += k
    return b"".join(out)


def step(w: float, direction: float, dtype: str) -> float:
    """The next representable value of ``dtype`` from ``w`` in ``direction`` -- or the other way
    when that one is infinite (``w`` is the dtype's largest): never ``w``, never inf.

    BF16 steps its 16-bit pattern (one step, not the up to 2^15 float32 steps it takes to cross a
    BF16 rounding boundary), and finiteness is judged in the tensor's dtype, not in float32."""
    for up in (direction > 0, direction <= 0):
        value = _neighbour(w, up, dtype)
        if math.isfinite(value):
            return value
    raise InvalidInput(f"no finite {dtype} value next to {w}")  # only for a non-finite w


def _neighbour(w: float, up: bool, dtype: str) -> float:
    if dtype == "BF16":
        bits = int(np.frombuffer(from_float(np.array([w]), "BF16"), dtype="<u2")[0])
        if bits & 0x7FFF == 0:  # ±0: the smallest subnormal of the direction's sign
            bits = 0x0001 if up else 0x8001
        elif bool(bits & 0x8000) != up:  # away from zero
            bits += 1
        else:
            bits -= 1
        return float(to_float(np.array([bits], dtype="<u2"), "BF16")[0])
    target = math.inf if up else -math.inf
    with np.errstate(over="ignore"):
        if dtype == "F64":
            return float(np.nextafter(w, target))
        if dtype == "F32":
            return float(np.nextafter(np.float32(w), np.float32(target)))
        return float(np.nextafter(np.float16(w), np.float16(target)))


# --- tracing ---------------------------------------------------------------------------------------
def threshold(licenses: int, statistics: int = 2) -> float:
    """τ with ``statistics · max(licenses, 10^6) · exp(−τ²/2) ≤ FALSE_ACCUSATION``."""
    scanned = max(licenses, LICENSES_FOR_BOUND)
    tau = math.sqrt(2.0 * math.log(statistics * scanned / FALSE_ACCUSATION))
    return math.nextafter(tau, math.inf)  # so that the bound at τ is ≤, not a rounding above


def false_positive_bound(z: float, licenses: int, statistics: int = 2) -> float:
    """Bound on the chance that an innocent license among ``licenses`` scores ≥ ``z``."""
    return min(1.0, statistics * max(licenses, 1) * math.exp(-z * z / 2.0))


def residual(secret: Secret, observed: np.ndarray) -> np.ndarray:
    """``clip((x − w)/δ)``; positions the suspect lacks (NaN) count as 0 (no evidence), and so do
    positions it holds at exactly 0 where the original is not: a pruned weight says nothing
    about the chips, while its ``−w/δ`` would add a full ``±CLIP`` of noise.  (Both rules read
    only the suspect and the original, so the bound is untouched.)"""
    if observed.shape != (secret.n,):
        raise InvalidInput(f"expected {secret.n} values at the fingerprint positions, got {observed.shape}")
    scales = secret.scales()
    originals = secret.originals()
    with np.errstate(invalid="ignore", over="ignore"):
        y = (observed - originals) / np.where(scales > 0, scales, 1.0)
    y = np.where(np.isfinite(y) & ((observed != 0) | (originals == 0)), y, 0.0)
    clipped: np.ndarray = np.clip(y, -CLIP, CLIP)
    return clipped


def scores(secret: Secret, candidates: Sequence[np.ndarray], license_ids: Sequence[str]) -> np.ndarray:
    """The statistic per license: max over candidate extractions of ``s·y/‖y‖`` (0 when ‖y‖ = 0).

    Computed on the packed chips: ``s·y = 2·Σ_{bits set} y − Σ y``, and the first sum is a
    lookup per chip byte in a table of the 256 possible partial sums of its 8 positions -- so a
    million licenses cost a few seconds, not a million float vectors."""
    n = secret.n
    padded = (n + 7) // 8 * 8
    tables = []
    for observed in candidates:
        y = residual(secret, observed)
        norm = float(np.linalg.norm(y))
        y = np.concatenate([y / norm if norm > 0 else y, np.zeros(padded - n)])
        # table[p, v] = sum of y over the set bits of byte value v at byte p (bit 7 first, as unpackbits)
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float64)  # (256, 8)
        tables.append((y.reshape(-1, 8) @ bits.T, float(y.sum())))
    out = np.full(len(license_ids), -np.inf)
    offsets = np.arange(padded // 8, dtype=np.int32) * 256
    block = 8192
    for start in range(0, len(license_ids), block):
        flat = chip_bytes(secret.key, secret.model_id, license_ids[start:start + block], n) + offsets
        for table, total in tables:
            z = 2.0 * np.take(table.ravel(), flat).sum(axis=1) - total
            out[start:start + len(flat)] = np.maximum(out[start:start + len(flat)], z)
    return out


# --- extraction (ops, from a suspect file) ---------------------------------------------------------
def extract(public: Mapping[str, object], tensors: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The suspect's values at the fingerprint positions: as found, and re-aligned (rows and
    columns matched to the original's by their quantile descriptors, which undoes a permutation
    of hidden units).  Neither depends on any license's chips, which keeps the bound honest."""
    sites = [_site(e) for e in public["sites"]]  # type: ignore[attr-defined]
    plain, aligned = [], []
    for site in sites:
        frames = _frames(site, tensors)
        if frames is None:
            plain.append(np.full(len(site.index), np.nan))
            aligned.append(np.full(len(site.index), np.nan))
            continue
        r, c = _cells(site)
        plain.append(frames[0][r, c])
        aligned.append(frames[1][r, c])
    return [np.concatenate(plain), np.concatenate(aligned)]


def _cells(site: Site) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each position in the site's rows × columns view."""
    r, c = np.divmod(site.index.astype(np.int64), site.matrix[1])
    return r, c


def _frames(site: Site, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The suspect's tensor for ``site`` as rows × columns: as found, and with rows and columns
    put back in the original's order (``aligned[i, j]`` = the suspect's element that holds the
    original's ``[i, j]``); None when the suspect has no such tensor."""
    arr = _find(site, tensors)
    if arr is None:
        return None
    mat = arr.reshape(site.matrix)
    rows, cols = describe(mat)
    perm_r = _match(site.rows, rows) if site.rows is not None and rows is not None else None
    perm_c = _match(site.cols, cols) if site.cols is not None and cols is not None else None
    aligned = mat if perm_r is None else mat[perm_r]
    aligned = aligned if perm_c is None else aligned[:, perm_c]
    return mat, aligned


# --- informed tracing (ops holding the original model) ---------------------------------------------
INFORMED_CLIP = 2.0  # drift-weighted residuals are clipped at ±INFORMED_CLIP·σ (σ: δ and the drift)
ALS_ROUNDS = 10


def drift_variance(drift: np.ndarray, known: np.ndarray, rounds: int = ALS_ROUNDS) -> np.ndarray:
    """A rank-one model of how far each element of a weight matrix moved: ``E[D_ij²] ≈ a_i·b_j``,
    fitted by alternating means on the ``known`` elements (finite, and not fingerprint positions).

    Why rank one: fine-tuning moves a weight by roughly (how much its output unit's error
    changes) × (how active its input is) -- a row factor times a column factor.  Inputs that are
    never active (a dead pixel, a pruned unit) do not move at all, and a position there keeps
    its ``±δ`` intact: that is evidence the flat statistic throws away.  Rows or columns with
    nothing known (and a matrix with nothing known) get the mean of the finite ``D²``."""
    d2 = np.where(np.isfinite(drift), drift, 0.0) ** 2
    finite = np.isfinite(drift)
    known = known & finite
    fallback = float(d2[known].mean()) if known.any() else float(d2[finite].mean()) if finite.any() else 0.0
    if not known.any():
        return np.full(drift.shape, fallback)
    m = known.astype(np.float64)
    a, b = np.ones(drift.shape[0]), np.ones(drift.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(rounds):
            mb = m * (b > 0)[None, :]
            a = np.where(mb.sum(1) > 0, (d2 / np.where(b > 0, b, 1.0)[None, :] * mb).sum(1) / mb.sum(1), 0.0)
            ma = m * (a > 0)[:, None]
            b = np.where(ma.sum(0) > 0, (d2 / np.where(a > 0, a, 1.0)[:, None] * ma).sum(0) / ma.sum(0), 0.0)
    var: np.ndarray = np.outer(a, b)
    var[~known.any(axis=1), :] = fallback
    var[:, ~known.any(axis=0)] = fallback
    return var


def informed(public: Mapping[str, object], tensors: Mapping[str, np.ndarray],
             original: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Like :func:`extract`, for ops who hold the original (unprotected) model: two candidates
    (as found, re-aligned) whose residuals are weighted by how much the suspect drifted from the
    original *around* each position.

    For each fingerprinted tensor: ``D`` = suspect − original over the whole tensor; ``V`` =
    :func:`drift_variance` of ``D`` fitted off the positions; at a position,
    ``σ = sqrt(V + δ²)`` and the weighted residual is ``a = (δ/σ)·clip(D/σ, ±INFORMED_CLIP)``
    (``a = clip(±1)`` on an untouched copy, where ``V`` = 0: the plain statistic).  Positions that
    a fine-tune left alone count fully, those it swept over count little -- after heavy
    fine-tuning this raises the true license's score well above what the flat residual gives.
    The candidates are sent as values ``w + δ·a`` (``w`` read from the original), so the
    server's residual ``clip((x − w)/δ, ±CLIP)`` is ``a`` itself and its API does not change.

    Why the false-accusation bound still holds: ``a`` is computed from the suspect, the original
    and the public layout (positions, δ, descriptors -- all fixed at protect time without any
    chips).  For a license ``L`` whose copy the suspect was not made from, none of these depends
    on ``L``'s chips, so the server's ``z_L = Σ s_L,i a_i / ‖a‖`` is a sum of independent fair
    signs times fixed weights, and Hoeffding gives ``P(z_L ≥ τ) ≤ exp(−τ²/2)`` exactly as for
    :func:`extract`'s candidates; there are still two, so ``K = 2`` in the union bound.  The
    premise is that ``original`` is the model protect was run on: an "original" made from ``L``'s
    own copy carries ``+δ·s_L``, which enters ``D`` with a minus sign (it pushes ``z_L`` down,
    never up); framing ``L`` would take ``L``'s chips, which only the server can compute."""
    sites = [_site(e) for e in public["sites"]]  # type: ignore[attr-defined]
    plain, aligned = [], []
    for site in sites:
        k = len(site.index)
        if not site.scale > 0:
            raise InvalidInput(f"the fingerprint layout gives no scale for {site.tensor!r}: informed tracing needs δ")
        base = _find(site, original)
        if base is None:
            raise InvalidInput(f"the original model has no tensor {site.tensor!r} of shape {list(site.shape)}: "
                               "is it the model that was protected?")
        w_mat = base.reshape(site.matrix)
        r, c = _cells(site)
        frames = _frames(site, tensors)
        if frames is None:
            plain.append(np.full(k, np.nan))
            aligned.append(np.full(k, np.nan))
            continue
        off = np.ones(site.matrix, dtype=bool)
        off[r, c] = False
        for out, mat in zip((plain, aligned), frames, strict=True):
            with np.errstate(invalid="ignore", over="ignore"):
                drift = mat - w_mat
            pruned = (mat == 0) & (w_mat != 0)  # set to zero, not drifted: neither drift nor evidence
            sigma = np.sqrt(drift_variance(drift, off & ~pruned)[r, c] + site.scale ** 2)
            a = site.scale / sigma * np.clip(drift[r, c] / sigma, -INFORMED_CLIP, INFORMED_CLIP)
            out.append(np.where(np.isfinite(a) & ~pruned[r, c], w_mat[r, c] + site.scale * a, np.nan))
    return [np.concatenate(plain), np.concatenate(aligned)]


def _find(site: Site, tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The suspect's tensor for a site: same name, else the one tensor of the same shape (or its
    transpose: exporters store some weights transposed)."""
    arr = tensors.get(site.tensor)
    if arr is not None and tuple(arr.shape) == site.shape:
        return np.asarray(arr, dtype=np.float64)
    same = [a for a in tensors.values() if tuple(a.shape) == site.shape]
    if len(same) == 1:
        return np.asarray(same[0], dtype=np.float64)
    if len(site.shape) == 2:
        flipped = [a for a in tensors.values() if tuple(a.shape) == site.shape[::-1]]
        if len(flipped) == 1:
            return np.asarray(flipped[0], dtype=np.float64).T
    return None


def _match(reference: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    """perm[i] = the suspect's row holding the reference's row i (a one-to-one assignment)."""
    cost = ((reference[:, None, :] - suspect[None, :, :]) ** 2).sum(axis=2)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy: good enough when rows are distinct
        perm = np.full(len(reference), -1, dtype=np.int64)
        used = np.zeros(len(suspect), dtype=bool)
        for flat in np.argsort(cost, axis=None):
            i, j = divmod(int(flat), cost.shape[1])
            if perm[i] < 0 and not used[j]:
                perm[i], used[j] = j, True
        return perm
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(reference), dtype=np.int64)
    perm[rows] = cols
    return perm
