"""Informed tracing (``fingerprint.informed``, ``layerlock trace --original``): the drift model,
the candidates it sends, that it names a license the flat statistic misses after heavy drift, and
that wrong licenses still score like fair coin sums (the Hoeffding bound's premise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layerlock.shared import fingerprint as fp
from layerlock.shared.errors import InvalidInput
from tests.shared.test_fingerprint import assert_fair_tail

KEY = bytes(range(32))
TAU = fp.threshold(10**6)


def _secret(w: np.ndarray) -> fp.Secret:
    flat = w.astype(np.float32).ravel()
    secret = fp.choose("m-1", {"w": ("F32", tuple(w.shape), flat.size)},
                       lambda name: (flat, np.ones(flat.size, dtype=bool)), KEY)
    assert secret is not None
    return secret


def _copy(w: np.ndarray, secret: fp.Secret, license_id: str) -> np.ndarray:
    out = w.astype(np.float32).copy()
    site = secret.sites[0]
    out.ravel()[site.index] = np.frombuffer(fp.license_values(secret, license_id), "<f4")
    return out


def _ids(n: int) -> list[str]:
    return [f"lic_{i:016x}" for i in range(n)]


def _wire(candidates: list[np.ndarray]) -> list[np.ndarray]:
    """float32 on the wire, as ``layerlock trace`` sends them."""
    return [c.astype(np.float32).astype(np.float64) for c in candidates]


def _drifted(copy: np.ndarray, delta: float, seed: int) -> np.ndarray:
    """A heavy, uneven drift: an eighth of the columns (inputs never active) barely move, the rest
    move by 8 δ -- the shape fine-tuning gives, strong enough to hide the flat statistic."""
    rng = np.random.default_rng(seed)
    cols = np.where(np.arange(copy.shape[1]) % 8 == 0, 0.05, 8.0) * delta
    return (copy + rng.standard_normal(copy.shape) * cols[None, :]).astype(np.float32)


# --- drift_variance ---------------------------------------------------------------------------------
def test_drift_variance_recovers_a_rank_one_pattern():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 2.0, 60), rng.uniform(0.5, 2.0, 50)
    b[7] = 0.0  # an input that never moves
    drift = rng.standard_normal((60, 50)) * np.sqrt(np.outer(a, b))
    known = rng.random((60, 50)) > 0.3
    var = fp.drift_variance(drift, known)
    truth = np.outer(a, b)
    assert np.all(var[:, 7] == 0)
    ratio = np.delete(var, 7, axis=1) / np.delete(truth, 7, axis=1)
    assert 0.7 < float(np.median(ratio)) < 1.3
    assert float(np.corrcoef(np.log(np.delete(var, 7, 1).ravel()), np.log(np.delete(truth, 7, 1).ravel()))[0, 1]) > 0.8


def test_drift_variance_falls_back_to_the_mean_where_nothing_is_known():
    drift = np.arange(12, dtype=np.float64).reshape(3, 4)
    known = np.ones((3, 4), dtype=bool)
    known[1, :] = False  # a row with nothing known
    known[:, 2] = False  # a column with nothing known
    var = fp.drift_variance(drift, known)
    mean = float((drift[known] ** 2).mean())
    assert np.all(var[1, :] == mean) and np.all(var[:, 2] == mean)
    # nothing known at all: the mean of every finite element; non-finite elements are ignored
    drift[0, 0] = np.nan
    var = fp.drift_variance(drift, np.zeros((3, 4), dtype=bool))
    assert np.allclose(var, float(np.nanmean(drift ** 2)))
    assert np.all(np.isfinite(fp.drift_variance(drift, np.ones((3, 4), dtype=bool))))


# --- informed candidates ----------------------------------------------------------------------------
def test_public_layout_carries_delta_for_informed_tracing():
    secret = _secret(np.random.default_rng(2).normal(0, 1, (32, 24)))
    site = secret.public()["sites"][0]  # type: ignore[index]
    assert site["scale"] == secret.sites[0].scale > 0 and "original" not in site


def test_on_an_untouched_copy_informed_is_the_plain_statistic():
    w = np.random.default_rng(3).normal(0, 1, (48, 40)).astype(np.float32)
    secret = _secret(w)
    copy = _copy(w, secret, "lic_a")
    ids = ["lic_a", *_ids(50)]
    plain = fp.scores(secret, fp.extract(secret.public(), {"w": copy}), ids)
    informed = fp.scores(secret, _wire(fp.informed(secret.public(), {"w": copy}, {"w": w})), ids)
    assert np.allclose(plain, informed, atol=1e-3)
    assert informed[0] == pytest.approx(math.sqrt(secret.n), rel=1e-3)
    # the original itself: all residuals 0, every score 0 (no evidence for anyone)
    assert np.all(fp.scores(secret, _wire(fp.informed(secret.public(), {"w": w}, {"w": w})), ids) == 0)


def test_informed_names_the_license_the_uninformed_trace_misses():
    w = np.random.default_rng(4).normal(0, 1, (64, 64)).astype(np.float32)
    secret = _secret(w)
    delta = secret.sites[0].scale
    for seed in range(3):
        lic = f"lic_{seed}"
        suspect = {"w": _drifted(_copy(w, secret, lic), delta, seed)}
        ids = [lic, *_ids(2000)]
        flat = fp.scores(secret, fp.extract(secret.public(), suspect), ids)
        informed = fp.scores(secret, _wire(fp.informed(secret.public(), suspect, {"w": w})), ids)
        assert flat[0] < TAU <= informed[0]
        # wrong licenses: a fair-coin tail, never near the threshold (Hoeffding's premise holds)
        assert_fair_tail(informed[1:])


def test_an_independent_model_is_traced_to_nobody_informed():
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (64, 64)).astype(np.float32)
    secret = _secret(w)
    other = {"w": rng.normal(0, 1, (64, 64)).astype(np.float32)}
    z = fp.scores(secret, _wire(fp.informed(secret.public(), other, {"w": w})), _ids(3000))
    assert float(z.max()) < TAU and float(np.mean(z >= 2.0)) <= math.exp(-2.0)


def test_informed_realigns_permuted_units():
    rng = np.random.default_rng(6)
    w = rng.normal(0, 1, (48, 40)).astype(np.float32)
    secret = _secret(w)
    copy = _copy(w, secret, "lic_a")
    shuffled = copy[rng.permutation(48)][:, rng.permutation(40)]
    z = fp.scores(secret, _wire(fp.informed(secret.public(), {"w": shuffled}, {"w": w})), ["lic_a"])
    assert z[0] >= TAU


def test_informed_refuses_an_original_without_the_tensor_or_a_layout_without_delta():
    w = np.random.default_rng(7).normal(0, 1, (32, 24)).astype(np.float32)
    secret = _secret(w)
    with pytest.raises(InvalidInput, match="original model has no tensor 'w'"):
        fp.informed(secret.public(), {"w": w}, {"v": np.zeros((5, 5), np.float32)})
    public = secret.public()
    del public["sites"][0]["scale"]  # type: ignore[index]
    with pytest.raises(InvalidInput, match="informed tracing needs"):
        fp.informed(public, {"w": w}, {"w": w})


def test_a_suspect_without_the_tensor_is_no_evidence():
    w = np.random.default_rng(8).normal(0, 1, (32, 24)).astype(np.float32)
    secret = _secret(w)
    candidates = fp.informed(secret.public(), {"other": np.zeros((3, 3))}, {"w": w})
    assert all(np.isnan(c).all() for c in candidates)
    assert np.all(fp.scores(secret, candidates, _ids(5)) == 0)


def _pruned(copy: np.ndarray, share: float = 0.5) -> np.ndarray:
    """Magnitude pruning: the smallest ``share`` of the weights set to exactly zero."""
    cut = np.quantile(np.abs(copy), share)
    return np.where(np.abs(copy) < cut, np.float32(0), copy).astype(np.float32)


def test_pruned_weights_are_no_evidence_plain_or_informed():
    w = np.random.default_rng(6).normal(0, 1, (64, 64)).astype(np.float32)
    secret = _secret(w)
    copy = _copy(w, secret, "lic_p")
    # prune 75 %: half of the positions (the larger half by magnitude) go to zero too
    suspect = {"w": _pruned(copy, 0.75)}
    at = suspect["w"].ravel()[secret.sites[0].index]
    gone = at == 0
    assert 0.3 < gone.mean() < 0.7
    [found, _] = fp.extract(secret.public(), suspect)
    y = fp.residual(secret, found)
    assert np.all(y[gone] == 0) and np.all(np.abs(y[~gone]) > 0)
    ids = ["lic_p", *_ids(2000)]
    for candidates in (fp.extract(secret.public(), suspect),
                       _wire(fp.informed(secret.public(), suspect, {"w": w}))):
        z = fp.scores(secret, candidates, ids)
        # the surviving positions carry the license's chips exactly: z = sqrt(survivors)
        assert z[0] == pytest.approx(math.sqrt(int((~gone).sum())), rel=0.02)
        assert_fair_tail(z[1:])
    # a suspect zeroed at every position, read as found: no evidence for anyone (score 0), not
    # ±3 of noise per position (re-aligned, other rows' values land there: an ordinary fair tail)
    blank = copy.copy()
    blank.ravel()[secret.sites[0].index] = 0
    as_found, realigned = fp.extract(secret.public(), {"w": blank})
    assert np.all(fp.scores(secret, [as_found], ids) == 0)
    assert_fair_tail(fp.scores(secret, [realigned], ids))
