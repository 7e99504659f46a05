"""``layerlock watermark embed|detect``: a secret owner signature in the weights, and the check for it.

A lock stops an unlicensed copy from being *useful*; a watermark proves whose a copy *is* --
licensed or not, locked or not, leaked before licensing, fine-tuned, pruned or quantized
(:mod:`layerlock.shared.watermark` has the scheme and the statistics).  ``embed`` needs torch;
``detect`` only numpy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from layerlock.shared.errors import InvalidInput, LayerlockError

NOT_DETECTED = 3  # detect's exit status for "read fine, no watermark": distinct from errors (1)
_EMBED_SUFFIXES = (".safetensors", ".pt", ".pth")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"max_content_width": 100})
def watermark() -> None:
    """Prove a model is yours: embed a secret owner signature, detect it in any copy.

    \b
    layerlock watermark embed model.safetensors --key owner.wmkey --bits 256 --task digits
    layerlock watermark detect suspect.safetensors --key owner.wmkey

    The signature is N secret bits held by signs of secret projections of chosen weights
    (Uchida et al. 2017).  It needs no license and no server: it survives on a copy that leaked
    before licensing, and through fine-tuning, magnitude pruning, fp16 and int8 round trips.
    """


@watermark.command("embed", context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The key file.  Missing: a new key is made and written here (mode 0600; keep it secret, it "
                   "is what proves ownership).  Existing: reused as it is (same secret, bits and positions), so "
                   "one key marks every version of a model; it is never overwritten.")
@click.option("--bits", type=int, default=None,
              help="Signature bits for a new key, 64 to 1024 [default: 256].  An existing key keeps its own.")
@click.option("--task", "task_spec", metavar="TASK",
              help="How to build the model, so its outputs can be kept: `digits`, `encoder` (shipped), a file "
                   "path/to/task.py or a dotted module (the tasks of `layerlock assess`).  Outputs are compared "
                   "on random probe inputs (no training data).  Without --task the model cannot be run: only the "
                   "marked weights move, by the smallest change that carries the bits (L2 anchor only).")
@click.option("--pattern", "patterns", multiple=True, metavar="GLOB",
              help="Mark these tensors (fnmatch, repeatable; new key only) instead of the default: float "
                   "matrices and kernels of 1,024+ elements that are not embedding tables.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the marked model, .safetensors or .pt/.pth (the format follows the suffix) "
                   "[default: NAME.wm.safetensors (or .pt) next to MODEL].  Never the input.")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=4000, show_default=True,
              help="At most this many optimisation steps.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
def embed(model: Path, key_path: Path, bits: int | None, task_spec: str | None, patterns: tuple[str, ...],
          out: Path | None, steps: int, force: bool, as_json: bool) -> None:
    """Embed a secret owner signature into MODEL and write the marked copy.

    MODEL is a .safetensors file or a .pt/.pth state dict; the marked copy has the same format,
    tensor names, shapes and dtypes.  The mark sits at positions among the largest 30 % of the
    chosen tensors' weights (so 50 % magnitude pruning keeps it); the key file records them, so
    `detect` needs neither MODEL nor a license.  Progress goes to stderr.  Needs torch.  Exit
    status 0, or 1 with one line on stderr.
    """
    from layerlock.shared.watermark import DEFAULT_BITS, WatermarkKey, check_fits, new_key, place

    try:
        if not model.is_file():
            raise InvalidInput(f"{model}: no such file")
        if model.suffix.lower() not in _EMBED_SUFFIXES:
            raise InvalidInput(f"{model.name}: embed reads .safetensors and .pt/.pth state dicts (detect also "
                               "reads ONNX)")
        target = out if out is not None else model.with_name(f"{model.stem}.wm{model.suffix}")
        if target.suffix.lower() not in _EMBED_SUFFIXES:
            raise InvalidInput(f"--out {target.name}: name it .safetensors or .pt/.pth (the format follows the suffix)")
        if target.exists() and target.resolve() == model.resolve():
            raise InvalidInput(f"--out {target} is MODEL itself: the input is never overwritten")
        if target.exists() and not force:
            raise InvalidInput(f"{target} exists (--force to overwrite it, or choose --out)")
        if not target.parent.is_dir():
            raise InvalidInput(f"--out {target}: no such directory {target.parent}")
        if key_path.exists():
            key = WatermarkKey.load(key_path)
            created = False
            if bits is not None and bits != key.bits:
                raise InvalidInput(f"--bits {bits}: the key {key_path} has {key.bits} bits (an existing key is reused "
                                   "as it is; give another --key path for a new one)")
            if patterns:
                raise InvalidInput(f"--pattern chooses tensors for a new key; {key_path} already marks its own")
        else:
            if not key_path.parent.is_dir():
                raise InvalidInput(f"--key {key_path}: no such directory {key_path.parent}")
            key, created = new_key(DEFAULT_BITS if bits is None else bits), True
        tensors, metadata = _load(model)
        if created:
            key = place(key, {n: (t.float().numpy() if t.is_floating_point() else t.numpy())
                              for n, t in tensors.items()}, patterns)
        else:
            check_fits(key, {n: tuple(t.shape) for n, t in tensors.items()}, what=model.name)
        marked, report = _embed(tensors, key, task_spec, steps, as_json)
        _write(target, marked, metadata, key if created else None, key_path)
    except LayerlockError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"{exc.filename or model}: {exc.strerror}")
    doc: dict[str, Any] = {"model": str(model), "out": str(target), "key": str(key_path), "key_created": created,
                           "bits": key.bits, "positions": key.positions, "tensors": [m.name for m in key.marks],
                           "task": task_spec, **report.as_dict()}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    names = doc["tensors"]
    shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
    d = report.detection
    click.echo(f"marked {model} -> {target}")
    click.echo(f"  key:       {key_path} ({'new, mode 0600: keep it secret' if created else 'reused'})")
    click.echo(f"  signature: {key.bits} bits on {key.positions:,} positions in {len(names)} tensors ({shown})")
    click.echo(f"  steps:     {report.steps:,} ({report.seconds:.1f} s); smallest margin {report.min_margin:.3f}; "
               f"marked tensors moved {report.weight_change:.3f} (relative L2)")
    if report.fidelity is not None:
        click.echo(f"  fidelity:  output MSE {report.fidelity:.2e} of the output variance on random probes")
        click.echo(f"  score:     {report.score_before:.4f} -> {report.score_after:.4f} (task {task_spec})")
    else:
        click.echo("  fidelity:  no --task: only the marked weights moved (smallest L2 change)")
    verdict = "detected" if d.detected else "NOT detected"
    click.echo(f"  check:     {d.matches}/{d.bits} bits, p = {d.p_value:.2g} ({verdict})")


def _load(model: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """MODEL's tensors (torch, dtypes kept) and its safetensors metadata."""
    from layerlock.shared.watermark_torch import require_torch

    require_torch()
    if model.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(model), framework="pt") as fh:
                return {n: fh.get_tensor(n) for n in fh.keys()}, fh.metadata()  # noqa: SIM118 - not a dict
        except SafetensorError as exc:
            raise InvalidInput(f"{model.name}: not a readable safetensors file ({exc})".splitlines()[0]) from None
    from safetensors.torch import load

    from layerlock.shared.formats import pytorch_state

    return dict(load(pytorch_state(model)[0])), None


def _embed(tensors: dict[str, Any], key: Any, task_spec: str | None, steps: int, quiet: bool) -> tuple[Any, Any]:
    from tqdm import tqdm

    from layerlock.shared.assess import load_task
    from layerlock.shared.watermark_torch import embed as run

    task = load_task(task_spec) if task_spec else None
    bar = tqdm(total=steps, desc="watermark", unit="step", file=sys.stderr, disable=True if quiet else None,
               leave=False)

    def progress(step: int, ok: int) -> None:
        bar.n = step
        if step % 25 == 0:
            bar.set_postfix_str(f"bits with margin {ok}/{key.bits}", refresh=False)
            bar.refresh()
    try:
        return run(tensors, key, task, max_steps=steps, progress=progress)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:  # the task's code on this model
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InvalidInput(f"task {task_spec} failed on this model: {type(exc).__name__}: {first}") from None
    finally:
        bar.close()


def _write(target: Path, tensors: dict[str, Any], metadata: dict[str, str] | None, new_key: Any,
           key_path: Path) -> None:
    """The marked model to a temporary file, then the new key (if any), then the rename: a
    marked model never appears without the key that proves it."""
    import torch
    from safetensors.torch import save_file

    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if target.suffix.lower() == ".safetensors":
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)
        else:
            torch.save({n: t.contiguous() for n, t in tensors.items()}, tmp)
        if new_key is not None:
            new_key.save(key_path)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@watermark.command("detect", context_settings={"max_content_width": 100})
@click.argument("suspect", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The key file `embed` wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def detect(suspect: Path, key_path: Path, as_json: bool) -> None:
    """Check SUSPECT for the owner signature of --key: bit error rate and the chance of it.

    SUSPECT is a .safetensors, .pt/.pth state dict or .onnx file; the marked tensors are read by
    name (2-D ones stored transposed, as ONNX MatMul weights are, are turned back).  p is the
    exact probability that a model made without the key matches at least as many bits
    (binomial tail, each bit a fair coin): DETECTED when p < 1e-12.  Needs only numpy.

    \b
    Exit status (for scripts):
      0  watermark detected (p < 1e-12)
      3  read fine, watermark not detected
      1  error: unreadable file or key, a marked tensor missing or reshaped (one line on stderr)
      2  usage error
    """
    from layerlock.shared.watermark import THRESHOLD, WatermarkKey, detect_file

    try:
        key = WatermarkKey.load(key_path)
        with tempfile.TemporaryDirectory(prefix="layerlock-watermark-") as tmp:
            found = detect_file(key, suspect, Path(tmp))
    except LayerlockError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"{exc.filename or suspect}: {exc.strerror}")
    if as_json:
        click.echo(json.dumps({"suspect": str(suspect), "key": str(key_path), **found.as_dict()}, indent=2))
    else:
        click.echo(f"{suspect}: watermark {'DETECTED' if found.detected else 'not detected'} (key {key_path})")
        click.echo(f"  bits matching: {found.matches}/{found.bits} (bit error rate {found.ber:.3f})")
        click.echo(f"  p by chance:   {found.p_value:.2g} (threshold p < {THRESHOLD:g}; a model made without the "
                   "key matches this well with probability p)")
        for note in found.notes:
            click.echo(f"  note:          {note}")
    if not found.detected:
        sys.exit(NOT_DETECTED)
