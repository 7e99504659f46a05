"""Per-license fingerprints (:mod:`layerlock.shared.fingerprint`): the pure functions, and the
bundle's version-3 fingerprint entries.

What matters: chips are keyed and unpredictable without the key, no license copy ever carries an
original value at a fingerprint position (every float dtype, through the real protect / restore
/ write_fingerprint path), a secret survives serialization and anything malformed is refused
precisely, the threshold keeps the false-accusation bound, re-alignment undoes a permutation of
hidden units, and the statistic names the right license on a real (tiny) protected model.  The
figures under attack (fine-tuning, pruning, quantization, noise, collusion) are in
``bench/trace.py``, not here.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy as stnp
import safetensors.torch as sttorch
import torch

from layerlock.shared import fingerprint as fp
from layerlock.shared.bundle import PREFIX, VERSION_FP, read_header
from layerlock.shared.errors import BundleFormatError, InvalidInput
from layerlock.shared.lockfile import protect
from layerlock.shared.restore import restore, write_fingerprint
from layerlock.shared.selection import LockPolicy

KEY = bytes(range(32))
FP = LockPolicy(fingerprint=True)
TAU = fp.threshold(10**6)


def mlp_tensors(seed: int) -> dict[str, np.ndarray]:
    """A 16-32-24-10 perceptron's weights, like the ``mlp`` fixture's, for any seed."""
    rng = np.random.default_rng(seed)
    shapes = {"fc1.weight": (32, 16), "fc1.bias": (32,), "fc2.weight": (24, 32), "fc2.bias": (24,),
              "fc3.weight": (10, 24), "fc3.bias": (10,)}
    return {k: rng.normal(0, 0.5 if k.endswith("weight") else 0.1, v).astype(np.float32) for k, v in shapes.items()}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _ids(n: int, tag: str = "") -> list[str]:
    return [f"lic_{tag}{i:016x}" for i in range(n)]


def licensed_copy(res: Any, license_id: str, secret: fp.Secret | None = None) -> bytes:
    """The sidecar's path: restore the bundle, then the license's values over the decoys."""
    header = read_header(res.bundle_path)
    out = io.BytesIO(restore(res.locked_path, res.bundle_path, res.data_key))
    out.seek(0, io.SEEK_END)
    write_fingerprint(out, 0, header, fp.license_values(secret or fp.Secret.from_bytes(res.fingerprint), license_id))
    return out.getvalue()


def matrix_secret(values: np.ndarray, model_id: str = "m-1") -> fp.Secret:
    """A secret chosen by the real ``choose`` over one fully locked float32 matrix ``w``."""
    flat = values.astype(np.float32).ravel()
    secret = fp.choose(model_id, {"w": ("F32", tuple(values.shape), flat.size)},
                       lambda name: (flat, np.ones(flat.size, dtype=bool)), KEY)
    assert secret is not None
    return secret


# --- chips ------------------------------------------------------------------------------------------
def test_chips_are_deterministic_signs_of_the_requested_length():
    s = fp.chips(KEY, "m-1", "lic_a", 1001)  # not a multiple of 8
    assert s.shape == (1001,)
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert np.array_equal(s, fp.chips(KEY, "m-1", "lic_a", 1001))


@pytest.mark.parametrize("other", [
    {"key": bytes(32)}, {"model_id": "m-2"}, {"license_id": "lic_b"}, {"license_id": "lic_a\0"},
])
def test_chips_depend_on_the_key_the_model_and_the_license(other):
    """Any change of key, model or license gives unrelated chips (agreement near one half)."""
    args = {"key": KEY, "model_id": "m-1", "license_id": "lic_a"} | other
    a = fp.chips(KEY, "m-1", "lic_a", 4096)
    b = fp.chips(args["key"], args["model_id"], args["license_id"], 4096)
    assert abs(float(np.mean(a == b)) - 0.5) < 0.05  # 6.4 standard deviations


def test_chips_drawn_in_a_batch_are_each_license_s_own():
    """A trace draws a million licenses' chips in batches: each row is that license's chips."""
    ids = ["lic_a", "lic_b", "", "lic_\u00e9", *_ids(20)]
    batch = fp.chip_bytes(KEY, "m-1", ids, 1001)
    for row, lic in zip(batch, ids, strict=True):
        assert np.array_equal(np.unpackbits(row)[:1001] * 2.0 - 1.0, fp.chips(KEY, "m-1", lic, 1001))


def test_scores_are_the_normalised_correlation_maximised_over_alignments():
    """The fast path (table lookups on packed chips) equals the statistic's definition."""
    n = 1001
    w = np.random.default_rng(6).normal(0, 1, n).astype(np.float32)
    site = fp.Site("w", "F32", (n,), np.arange(n, dtype=np.uint32), w.tobytes(), 0.01)
    secret = fp.Secret("m-1", KEY, (site,))
    rng = np.random.default_rng(7)
    candidates = [w + rng.normal(0, 0.02, n), np.where(rng.random(n) < 0.2, np.nan, w + 0.05),
                  w.astype(np.float64)]  # the last: residual 0, no evidence
    ids = _ids(300)
    expected = []
    for lic in ids:
        s = fp.chips(KEY, "m-1", lic, n)
        zs = []
        for c in candidates:
            y = fp.residual(secret, c)
            norm = np.linalg.norm(y)
            zs.append(float(s @ y / norm) if norm > 0 else 0.0)
        expected.append(max(zs))
    assert np.allclose(fp.scores(secret, candidates, ids), expected, atol=1e-9)


def test_chips_are_balanced():
    mat = np.stack([fp.chips(KEY, "m-1", lic, 4096) for lic in _ids(200)])
    assert abs(float(mat.mean())) < 0.005  # 819,200 signs: 4.5 standard deviations
    assert float(np.abs(mat.sum(axis=1)).max()) < 6 * math.sqrt(4096)
    # Different licenses are uncorrelated: the normalised cross products look like N(0, 1).
    cross = (mat @ mat.T)[np.triu_indices(200, 1)] / math.sqrt(4096)
    assert abs(float(cross.mean())) < 0.1 and 0.9 < float(cross.std()) < 1.1


# --- a license's values -----------------------------------------------------------------------------
def _torch_model(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(dtype) for k, v in mlp_tensors(3).items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_no_license_copy_carries_an_original_value(tmp_path, dtype):
    """Protect a tiny model of each float dtype; every license copy differs from the original at
    every fingerprint position (and nowhere else), and carries exactly that license's values."""
    src = tmp_path / "m.safetensors"
    original = _torch_model(dtype)
    sttorch.save_file(original, src)
    res = protect(src, tmp_path / "out", model_id="m-1", policy=FP)
    secret = fp.Secret.from_bytes(res.fingerprint)
    assert res.fingerprint_positions == secret.n >= 100
    assert {s.dtype for s in secret.sites} == {{torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype, "F32")}
    for lic in _ids(4):
        copy = sttorch.load(licensed_copy(res, lic))
        values = fp.to_float(fp.license_values(secret, lic), secret.sites[0].dtype)
        pos = 0
        for site in secret.sites:
            got = copy[site.tensor].float().numpy().astype(np.float64).ravel()
            orig = original[site.tensor].float().numpy().astype(np.float64).ravel()
            k = len(site.index)
            assert np.array_equal(got[site.index], values[pos:pos + k])
            assert np.all(got[site.index] != orig[site.index])
            assert np.array_equal(fp.to_float(site.original, site.dtype), orig[site.index])
            rest = np.setdiff1d(np.arange(got.size), site.index)
            assert np.array_equal(got[rest], orig[rest])
            pos += k
        for name in original:
            if name not in {s.tensor for s in secret.sites}:
                assert torch.equal(copy[name], original[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_neither_the_locked_file_nor_the_bundle_holds_an_original_value(tmp_path, dtype):
    """Half-precision decoys drawn independently hit the original about once in 800 positions
    (measured for BF16 before decoys were moved off it): four protects of a 6,464-weight MLP,
    about 3,700 positions, must show none -- in the locked file or in the bundle's payload."""
    gen = torch.Generator().manual_seed(1)
    original = {"fc1.weight": torch.randn(64, 64, generator=gen), "fc2.weight": torch.randn(32, 64, generator=gen),
                "fc3.weight": torch.randn(10, 32, generator=gen)}
    src = tmp_path / "m.safetensors"
    sttorch.save_file({k: v.to(dtype) for k, v in original.items()}, src)
    positions = 0
    for run in range(4):
        res = protect(src, tmp_path / f"out{run}", model_id="m-1", policy=FP)
        secret = fp.Secret.from_bytes(res.fingerprint)
        locked = sttorch.load_file(res.locked_path)
        unlocked_without_token = sttorch.load(restore(res.locked_path, res.bundle_path, res.data_key))
        for site in secret.sites:
            real = fp.to_float(site.original, site.dtype)
            for held in (locked, unlocked_without_token):
                assert not np.any(held[site.tensor].float().numpy().ravel()[site.index] == real)
            positions += len(site.index)
    assert positions > 3000


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_license_values_step_away_when_delta_rounds_back_to_the_original(dtype):
    """δ far below the dtype's resolution: each value still moves, one step the chip's way."""
    w = fp.to_float(fp.from_float(np.array([1.0, -1.5, 0.3, -3.0, 7.0, -0.02]), dtype), dtype)
    site = fp.Site("w", dtype, (len(w),), np.arange(len(w), dtype=np.uint32), fp.from_float(w, dtype), 1e-30)
    secret = fp.Secret("m-1", KEY, (site,))
    for lic in _ids(2):
        v = fp.to_float(fp.license_values(secret, lic), dtype)
        s = fp.chips(KEY, "m-1", lic, len(w))
        assert np.all(v != w) and np.all(np.isfinite(v))
        assert np.array_equal(np.sign(v - w), s)
        # One step: nothing representable lies strictly between w and v.
        mid = fp.to_float(fp.from_float((v + w) / 2, dtype), dtype)
        assert np.all((mid == v) | (mid == w))


@pytest.mark.parametrize(("dtype", "largest", "scale"), [
    ("F16", 65504.0, 1.0),
    ("BF16", float(fp.to_float(np.array([0x7F7F], dtype="<u2"), "BF16")[0]), 1e-30),
])
def test_license_values_stay_finite_at_the_dtype_limit(dtype, largest, scale):
    """A weight at the dtype's largest value: pushed the other way, never to infinity."""
    w = np.array([largest, -largest])
    site = fp.Site("w", dtype, (2,), np.arange(2, dtype=np.uint32), fp.from_float(w, dtype), scale)
    for lic in _ids(6):
        v = fp.to_float(fp.license_values(fp.Secret("m-1", KEY, (site,)), lic), dtype)
        assert np.all(np.isfinite(v)) and np.all(v != w)


def test_values_land_in_their_own_tensors_whatever_the_file_order(tmp_path):
    """Two locked tensors, the larger one later in the file: each license copy must hold, in
    each tensor, that tensor's own original + δ·chips -- not values meant for the other one."""
    rng = np.random.default_rng(5)
    src = tmp_path / "m.safetensors"
    stnp.save_file({"a.weight": rng.normal(0, 1, (8, 40)).astype(np.float32),
                    "b.weight": rng.normal(0, 1, (64, 32)).astype(np.float32)}, src)
    res = protect(src, tmp_path / "out", model_id="m-1", policy=LockPolicy(patterns=("a.weight", "b.weight"),
                                                                           fingerprint=True))
    secret = fp.Secret.from_bytes(res.fingerprint)
    header = read_header(res.bundle_path)
    assert len(secret.sites) == 2
    copy = stnp.load(licensed_copy(res, "lic_a"))
    got = fp.extract(secret.public(), copy)[0]
    assert fp.scores(secret, [got], ["lic_a"])[0] > TAU
    assert [s.tensor for s in secret.sites] == [header.tensors[i].name for i, _ in header.fingerprint]


# --- the secret -------------------------------------------------------------------------------------
def _secret() -> fp.Secret:
    return matrix_secret(np.random.default_rng(0).normal(0, 1, (32, 24)))


def test_secret_round_trip():
    secret = _secret()
    data = secret.to_bytes()
    back = fp.Secret.from_bytes(data)
    assert back.model_id == secret.model_id and back.key == secret.key and back.n == secret.n
    for a, b in zip(secret.sites, back.sites, strict=True):
        assert (a.tensor, a.dtype, a.shape, a.original, a.scale) == (b.tensor, b.dtype, b.shape, b.original, b.scale)
        assert np.array_equal(a.index, b.index)
        assert a.rows is not None and b.rows is not None
        assert np.allclose(a.rows, b.rows, rtol=1e-3, atol=1e-4)  # float16 on the wire
    assert back.to_bytes() == data
    assert np.array_equal(back.originals(), secret.originals())


def test_public_part_holds_no_key_and_no_original_values():
    secret = _secret()
    public = secret.public()
    text = json.dumps(public)
    assert "key" not in public and _b64(secret.key) not in text
    assert all("original" not in site for site in public["sites"])  # type: ignore[attr-defined]
    assert _b64(secret.sites[0].original)[:16] not in text


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_secret().to_bytes())
    return doc


def _site0(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda doc: change(doc["sites"][0])


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("wrong version", lambda d: d.update(v=2), "unknown format"),
    ("sites not a list", lambda d: d.update(sites={}), "unknown format"),
    ("short key", lambda d: d.update(key=_b64(bytes(16))), "256-bit key"),
    ("key not a string", lambda d: d.update(key=5), "key is not a string"),
    ("key not base64", lambda d: d.update(key="a"), "key is not base64url"),
    ("key with a character outside base64url", lambda d: d.update(key=d["key"][:8] + "!" + d["key"][9:]),
     "key is not base64url"),
    ("model id not a string", lambda d: d.update(model=7), "model id"),
    ("no sites", lambda d: d.update(sites=[]), "no positions"),
    ("site not an object", lambda d: d.update(sites=[3]), "site is not an object"),
    ("integer dtype", _site0(lambda s: s.update(dtype="I32")), "dtype or shape"),
    ("zero dimension", _site0(lambda s: s.update(shape=[0, 24])), "dtype or shape"),
    ("bool dimension", _site0(lambda s: s.update(shape=[True, 24])), "dtype or shape"),
    ("tensor name not a string", _site0(lambda s: s.update(tensor=None)), "tensor name"),
    ("index not base64", _site0(lambda s: s.update(index="a")), "index is not base64url"),
    ("index not uint32s", _site0(lambda s: s.update(index=_b64(b"\0\0\0"))), "not uint32s"),
    ("index unsorted", _site0(lambda s: s.update(index=_b64(np.array([5, 3], "<u4").tobytes()))), "out of order"),
    ("index repeated", _site0(lambda s: s.update(index=_b64(np.array([3, 3], "<u4").tobytes()))), "out of order"),
    ("index outside the tensor", _site0(lambda s: s.update(index=_b64(np.array([1, 32 * 24], "<u4").tobytes()))),
     "outside the tensor"),
    ("empty index", _site0(lambda s: s.update(index="")), "outside the tensor"),
    ("originals short", _site0(lambda s: s.update(original=s["original"][:-8])), "number of original values"),
    ("negative scale", _site0(lambda s: s.update(scale=-1.0)), "bad scale"),
    ("NaN scale", _site0(lambda s: s.update(scale=float("nan"))), "bad scale"),
    ("scale a string", _site0(lambda s: s.update(scale="0.1")), "bad scale"),
    ("descriptor wrong size", _site0(lambda s: s.update(rows=_b64(bytes(40)))), "descriptor has the wrong size"),
    ("descriptor not a string", _site0(lambda s: s.update(cols=[1.0])), "descriptor is not a string"),
]


@pytest.mark.parametrize(("case", "change", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_secrets_are_refused_precisely(case, change, message):
    doc = _doc()
    change(doc)
    with pytest.raises(InvalidInput, match=message):
        fp.Secret.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[1, 2]", b"null", b"{\"v\": 1}"])
def test_secrets_that_are_not_secrets_are_refused(data):
    with pytest.raises(InvalidInput, match="not JSON|unknown format"):
        fp.Secret.from_bytes(data)


def test_a_secret_with_far_too_many_positions_is_refused():
    doc = _doc()
    doc["sites"] = doc["sites"] * (fp.MAX_POSITIONS * 4 // _secret().n + 1)
    with pytest.raises(InvalidInput, match="far too many"):
        fp.Secret.from_bytes(json.dumps(doc).encode())


# --- the bound --------------------------------------------------------------------------------------
def test_threshold_keeps_the_false_accusation_bound_for_a_million_licenses():
    tau = fp.threshold(10**6)
    # 2 · 10^6 · exp(−τ²/2) ≤ 1e-9 exactly (τ is rounded up), and only just.
    assert fp.false_positive_bound(tau, 10**6) <= 1e-9
    assert fp.false_positive_bound(tau, 10**6) == pytest.approx(1e-9, rel=1e-12)
    assert 8.39 < tau < 8.40
    # Fewer licenses scanned: the threshold stays the million-license one (bound only better).
    assert fp.threshold(10) == fp.threshold(10**6)
    assert fp.false_positive_bound(tau, 10) < 1e-13
    # More: the threshold rises so the bound holds at that count.
    big = fp.threshold(2**20)
    assert big > tau and fp.false_positive_bound(big, 2**20) <= 1e-9
    # One statistic instead of two: a lower threshold, the same bound.
    one = fp.threshold(10**6, statistics=1)
    assert one < tau and fp.false_positive_bound(one, 10**6, statistics=1) <= 1e-9
    for licenses in (10**7, 123_456_789):
        assert fp.false_positive_bound(fp.threshold(licenses), licenses) <= 1e-9


def test_false_positive_bound_is_a_capped_decreasing_tail():
    assert fp.false_positive_bound(0.0, 10**6) == 1.0
    zs = np.linspace(0, 12, 50)
    bounds = [fp.false_positive_bound(float(z), 1000) for z in zs]
    assert all(a >= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert fp.false_positive_bound(10.0, 1, statistics=1) == pytest.approx(math.exp(-50))


def test_hoeffding_tail_holds_for_a_fixed_residual():
    """For a fixed residual, innocent licenses' statistics have tails under exp(−z²/2)."""
    secret = matrix_secret(np.random.default_rng(1).normal(0, 1, (64, 32)))
    suspect = secret.originals() + np.random.default_rng(2).standard_normal(secret.n) * secret.scales()
    assert_fair_tail(fp.scores(secret, [suspect], _ids(3000)))


def assert_fair_tail(z: np.ndarray) -> None:
    """Scores of licenses a suspect does not depend on: a fair-coin tail (Hoeffding's premise), never near τ."""
    for t in (1.0, 2.0, 3.0):
        assert float(np.mean(z >= t)) <= math.exp(-t * t / 2)
    assert float(z.max()) < TAU


# --- extraction and scores --------------------------------------------------------------------------
def test_extract_realigns_permuted_rows_and_columns():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (48, 40)).astype(np.float32)
    secret = matrix_secret(w)
    truth = w.ravel()[secret.sites[0].index].astype(np.float64)
    rows, cols = rng.permutation(48), rng.permutation(40)
    shuffled = w[rows][:, cols]
    plain, aligned = fp.extract(secret.public(), {"w": shuffled})
    assert np.array_equal(aligned, truth)
    assert np.mean(plain == truth) < 0.2
    # Unpermuted: both candidates are the values as found.
    plain, aligned = fp.extract(secret.public(), {"w": w})
    assert np.array_equal(plain, truth) and np.array_equal(aligned, truth)


def test_extract_finds_renamed_and_transposed_tensors_and_misses_absent_ones():
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (48, 40)).astype(np.float32)
    secret = matrix_secret(w)
    truth = w.ravel()[secret.sites[0].index].astype(np.float64)
    assert np.array_equal(fp.extract(secret.public(), {"renamed": w, "b": np.zeros(3)})[0], truth)
    assert np.array_equal(fp.extract(secret.public(), {"exported": np.ascontiguousarray(w.T)})[0], truth)
    missing = fp.extract(secret.public(), {"other": np.zeros((5, 5))})
    assert all(np.isnan(c).all() for c in missing)
    # Positions the suspect lacks are no evidence for or against anyone.
    assert np.all(fp.scores(secret, missing, _ids(5)) == 0)


def test_residual_refuses_a_vector_of_the_wrong_length():
    secret = _secret()
    with pytest.raises(InvalidInput, match=f"expected {secret.n} values"):
        fp.residual(secret, np.zeros(secret.n + 1))


def test_scores_name_the_right_license_on_a_protected_model(tmp_path, small_model):
    """A tiny MLP through the real protect/restore path: each copy names its own license, far
    above τ, and no other; the original and an unrelated model name nobody."""
    res = protect(small_model, tmp_path / "out", model_id="small-1", policy=FP)
    secret = fp.Secret.from_bytes(res.fingerprint)
    public = secret.public()
    ids = _ids(12)
    for lic in ids:
        z = fp.scores(secret, fp.extract(public, stnp.load(licensed_copy(res, lic))), ids + _ids(200, "x"))
        assert z[ids.index(lic)] == pytest.approx(math.sqrt(secret.n))
        assert float(np.delete(z, ids.index(lic)).max()) < TAU
    original = stnp.load_file(small_model)
    assert np.all(fp.scores(secret, fp.extract(public, original), ids) == 0)
    unrelated = mlp_tensors(99)
    assert float(fp.scores(secret, fp.extract(public, unrelated), ids + _ids(500, "y")).max()) < TAU


def test_an_average_of_two_copies_names_both_and_nobody_else(tmp_path, small_model):
    """fc2 whole (384 positions): the average scores √(n/2) ≈ 13.9 for each colluder."""
    res = protect(small_model, tmp_path / "out", model_id="small-1",
                  policy=LockPolicy(patterns=("fc2.weight",), fingerprint=True))
    secret = fp.Secret.from_bytes(res.fingerprint)
    a, b = (stnp.load(licensed_copy(res, lic)) for lic in ("lic_a", "lic_b"))
    mean = {k: ((a[k].astype(np.float64) + b[k]) / 2).astype(np.float32) for k in a}
    z = fp.scores(secret, fp.extract(secret.public(), mean), ["lic_a", "lic_b", *_ids(300)])
    assert min(z[:2]) > TAU > float(z[2:].max())


# --- bundle header, version 3 -----------------------------------------------------------------------
def _rewrite(bundle: bytes, change: Callable[[dict[str, Any]], Any], version: int | None = None) -> bytes:
    magic, v, n = PREFIX.unpack(bundle[:PREFIX.size])
    doc = json.loads(bundle[PREFIX.size:PREFIX.size + n])
    change(doc)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return PREFIX.pack(magic, v if version is None else version, len(body)) + body + bundle[PREFIX.size + n:]


@pytest.fixture
def fp_bundle(tmp_path: Path, mlp: dict[str, np.ndarray]) -> tuple[bytes, Any]:
    """A real version-3 bundle: the tiny MLP with an int32 buffer locked too (a non-float tensor)."""
    tensors = dict(mlp)
    tensors["a.ids"] = np.arange(6, dtype=np.int32)
    src = tmp_path / "m.safetensors"
    stnp.save_file(tensors, src)
    res = protect(src, tmp_path / "out", model_id="m-1",
                  policy=LockPolicy(patterns=("a.ids", "fc1.weight", "fc2.weight"), include_int=True, fingerprint=True))
    data = res.bundle_path.read_bytes()
    return data, read_header(data)


def _idx(values: list[int]) -> str:
    return _b64(np.array(values, dtype="<u4").tobytes())


def test_version_3_header_parses_and_lists_the_positions(fp_bundle):
    data, header = fp_bundle
    assert header.version == VERSION_FP
    assert _rewrite(data, lambda d: None) == data  # the editor below rewrites canonically
    names = [t.name for t in header.tensors]
    assert "a.ids" in names and {names[i] for i, _ in header.fingerprint} == {"fc1.weight", "fc2.weight"}
    assert header.fingerprint_bytes == 4 * sum(len(idx) for _, idx in header.fingerprint)


def _fp(doc: dict[str, Any]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = doc["fingerprint"]
    return entries


def _named(doc: dict[str, Any], name: str) -> int:
    return [t["name"] for t in doc["tensors"]].index(name)


BAD_FINGERPRINTS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("index outside the tensor", lambda d: _fp(d)[0].update(index=_idx([1, 32 * 16])), "outside it"),
    ("unsorted", lambda d: _fp(d)[0].update(index=_idx([9, 4])), "unsorted"),
    ("repeated index", lambda d: _fp(d)[0].update(index=_idx([4, 4])), "unsorted"),
    ("non-float tensor", lambda d: _fp(d)[0].update(tensor=_named(d, "a.ids")), "not a float tensor"),
    ("tensor out of order", lambda d: d.update(fingerprint=_fp(d)[::-1]), "out of order, twice"),
    ("tensor twice", lambda d: d.update(fingerprint=[_fp(d)[0], _fp(d)[0]]), "out of order, twice"),
    ("tensor beyond the list", lambda d: _fp(d)[0].update(tensor=99), "out of order"),
    ("tensor a bool", lambda d: _fp(d)[0].update(tensor=True), "out of order"),
    ("bad base64", lambda d: _fp(d)[0].update(index="a"), "not base64url uint32s"),
    ("a character outside base64url", lambda d: _fp(d)[0].update(index="AA!AA" + _fp(d)[0]["index"][5:]),
     "not base64url uint32s"),
    ("index not a string", lambda d: _fp(d)[0].update(index=[1, 2]), "not base64url uint32s"),
    ("not whole uint32s", lambda d: _fp(d)[0].update(index=_b64(b"\1\0\0")), "not base64url uint32s"),
    ("empty index", lambda d: _fp(d)[0].update(index=""), "not base64url uint32s"),
    ("extra field", lambda d: _fp(d)[0].update(extra=1), "missing or unknown fields"),
    ("empty list", lambda d: d.update(fingerprint=[]), "non-empty list"),
    ("not a list", lambda d: d.update(fingerprint={}), "non-empty list"),
    ("too many positions", lambda d: _fp(d)[1].update(index=_idx(list(range(70000)))), "too long"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_FINGERPRINTS, ids=[b[0] for b in BAD_FINGERPRINTS])
def test_malformed_fingerprint_entries_are_refused(fp_bundle, case, change, message):
    data, _ = fp_bundle
    with pytest.raises(BundleFormatError, match=message):
        read_header(_rewrite(data, change))


def test_a_position_outside_the_locked_runs_is_refused(tmp_path, small_model):
    """The default policy locks some input columns of fc1 (byte runs): a position in a column
    left in the clear would put a license's value where the locked file has the original."""
    res = protect(small_model, tmp_path / "out", model_id="small-1", policy=FP)
    data = res.bundle_path.read_bytes()
    header = read_header(data)
    (i, idx), = header.fingerprint
    t = header.tensors[i]
    runs = header.runs[i]
    assert runs is not None
    locked = {e for start, length in runs
              for e in range((start - t.offset) // 4, (start - t.offset + length) // 4)}
    clear = min(set(range(t.numel)) - locked)
    inside = sorted({*list(idx)[:3], clear})
    with pytest.raises(BundleFormatError, match="leaves its locked part"):
        read_header(_rewrite(data, lambda d: _fp(d)[0].update(index=_idx(inside))))


def test_fingerprint_member_only_in_version_3(fp_bundle):
    data, _ = fp_bundle
    with pytest.raises(BundleFormatError, match="missing or unknown fields"):
        read_header(_rewrite(data, lambda d: None, version=2))
    with pytest.raises(BundleFormatError, match="missing or unknown fields"):
        read_header(_rewrite(data, lambda d: d.pop("fingerprint")))


def test_no_shipped_decoy_equals_the_original_at_a_fingerprint_position(tmp_path):
    """BF16 decoys are random draws with 2^16 values: some land on the original (about 0.1 % of
    positions).  Protect moves those one step, in the locked file and the bundle alike."""
    import safetensors.torch as stt
    import torch

    from layerlock.shared.lockfile import protect
    from layerlock.shared.restore import restore
    from layerlock.shared.selection import LockPolicy

    gen = torch.Generator().manual_seed(0)
    # small-variance weights: few distinct BF16 values, so coincidences are frequent without the fix
    tensors = {"fc1.weight": (torch.randn(128, 128, generator=gen) * 0.01).to(torch.bfloat16),
               "fc2.weight": (torch.randn(64, 128, generator=gen) * 0.01).to(torch.bfloat16)}
    stt.save_file(tensors, tmp_path / "m.safetensors")
    res = protect(tmp_path / "m.safetensors", tmp_path / "o", model_id="m-1", policy=LockPolicy(fingerprint=True))
    secret = fp.Secret.from_bytes(res.fingerprint)
    locked = stt.load_file(res.locked_path)
    restored = stt.load(restore(res.locked_path, res.bundle_path, res.data_key))
    checked = 0
    for site in secret.sites:
        original = fp.to_float(site.original, "BF16")
        for shipped in (locked, restored):
            values = shipped[site.tensor].float().numpy().ravel()[site.index]
            assert not np.any(values == original), site.tensor
        checked += len(original)
    assert checked >= 1000


def test_strength_scales_delta_and_the_cap():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 48)).astype(np.float32).ravel()
    locked = {"w": ("F32", (64, 48), w.size)}

    def load(_: str) -> tuple[np.ndarray, np.ndarray]:
        return w, np.ones(w.size, dtype=bool)

    one = fp.choose("m-1", locked, load, KEY)
    two = fp.choose("m-1", locked, load, KEY, strength=2.0)
    assert one is not None and two is not None
    assert two.sites[0].scale == pytest.approx(2 * one.sites[0].scale)
    assert np.array_equal(one.sites[0].index, two.sites[0].index)  # same positions, larger δ
