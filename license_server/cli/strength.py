"""``layerlock inspect`` and ``layerlock assess``: look before you lock, and measure what a lock holds."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from layerlock.shared.errors import InvalidInput, LayerlockError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command(context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("weights", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path),
              help="Show what `protect --base BASE` would lock instead of the default policy.")
@click.option("--include-int", is_flag=True, help="As protect --include-int: integer buffers may be locked.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(model: Path, weights: Path | None, base: Path | None, include_int: bool, as_json: bool) -> None:
    """List a model's layers and what protect would lock; nothing is written.

    MODEL is a .safetensors, .pt/.pth state dict, .onnx or ncnn .param (WEIGHTS: its .bin).
    Layers are in execution order where the format knows it (ONNX graph, state dict, .param),
    otherwise by name -- the order --layers START:COUNT counts in -- with their tensor and
    parameter counts, dtypes, and the part of each the default policy (or --base) would lock.
    """
    from layerlock.shared.inventory import inventory, render

    try:
        if not model.is_file():
            raise InvalidInput(f"{model}: no such file")
        if base is not None and not base.is_file():
            raise InvalidInput(f"--base {base}: no such file")
        with tempfile.TemporaryDirectory(prefix="layerlock-inspect-") as tmp:
            doc = inventory(model, Path(tmp), weights=weights, base=base, include_int=include_int)
    except LayerlockError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"{exc.filename or model}: {exc.strerror}")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo("\n".join(render(doc)))


@click.command(context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--task", "task_spec", required=True, metavar="TASK",
              help="How to build, score and train the model: `digits`, `encoder` (shipped), a file "
                   "path/to/task.py, or a dotted module name.")
@click.option("--locked", type=click.Path(dir_okay=False, path_type=Path),
              help="The locked file protect wrote for MODEL (default: protect MODEL now, into a temporary "
                   "directory, with the policy options below and a throwaway key).")
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path),
              help="The public base: adds the base-substitution attack (A4) and the base to the alternatives; "
                   "without --locked also protects with --base.")
@click.option("--layers", metavar="START:COUNT", help="Policy to assess, as protect --layers (without --locked).")
@click.option("--pattern", "patterns", multiple=True, metavar="GLOB", help="As protect --pattern (without --locked).")
@click.option("--budgets", default="0.01,0.05,0.1", show_default=True,
              help="Shares of the training data the attacker fine-tunes with.")
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Seeds per budget; scores are the attacker's best (worst case) over them.")
@click.option("--steps", type=click.IntRange(1, 100_000), default=None, help="Fine-tuning steps (default: the task's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def assess(model: Path, task_spec: str, locked: Path | None, base: Path | None, layers: str | None,
           patterns: tuple[str, ...], budgets: str, seeds: int, steps: int | None, as_json: bool) -> None:
    """Attack a protected model and say how much of it an attacker gets back.

    \b
    A0 the locked file as shipped      A1 locked elements reset (zeros, init, mean, a fresh draw)
    A2 fine-tuning on 1/5/10 % of the data: locked tensors only, whole model, reset then whole
    A3 neighbour-layer substitution    A4 base substitution, alone and fine-tuned (with --base)
    A5 a per-tensor statistics detector of locked tensors (cross-validated AUC)

    Each attack's residual utility RU = (attack - best alternative without the file) /
    (original - that alternative): 0 means the file gives an attacker nothing.  MODEL is the
    original (unlocked) file.  A task is a Python module defining name, chance, finetune,
    build(tensors), score(model), data(fraction, seed), batches(items, seed) and
    loss(model, batch); see layerlock.demo.digits_task (the demo model) and
    layerlock.demo.encoder_task (BERT-style encoders).  Needs torch and scikit-learn.
    """
    from layerlock.shared.assess import assess as run_battery
    from layerlock.shared.assess import load_task, table
    from layerlock.shared.lockfile import protect
    from layerlock.shared.plan import read_tensors
    from layerlock.shared.selection import LockPolicy

    try:
        try:
            fractions = tuple(float(b) for b in budgets.split(","))
        except ValueError:
            raise InvalidInput(f"--budgets must be comma-separated fractions, got {budgets!r}") from None
        if not fractions or not all(0 < b <= 1 for b in fractions):
            raise InvalidInput("--budgets must be fractions in (0, 1]")
        for path, what in ((model, "MODEL"), (locked, "--locked"), (base, "--base")):
            if path is not None and not path.is_file():
                raise InvalidInput(f"{what} {path}: no such file")
        if locked is not None and (layers or patterns):
            raise InvalidInput("--layers/--pattern choose a policy to protect with: not with --locked")
        task = load_task(task_spec)
        with tempfile.TemporaryDirectory(prefix="layerlock-assess-") as tmp:
            work = Path(tmp)
            if locked is None:
                if base is not None and (layers or patterns):
                    raise InvalidInput("--base chooses what to lock itself: drop --layers/--pattern")
                policy = (LockPolicy(base=str(base)) if base is not None
                          else LockPolicy.parse_layers(layers, patterns) if layers is not None
                          else LockPolicy(patterns=patterns))
                res = protect(model, work / "out", policy=policy, model_id="assess")
                locked_path = res.locked_path
            else:
                locked_path = locked
            original = read_tensors(model, work)
            locked_t = read_tensors(locked_path, work)
            base_t = read_tensors(base, work) if base is not None else None

            def log(msg: str) -> None:
                if not as_json:
                    click.echo(f"  ... {msg}", err=True)
            report = run_battery(original, locked_t, task, base=base_t, budgets=fractions, seeds=seeds, steps=steps,
                                 log=log)
    except LayerlockError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"{exc.filename or model}: {exc.strerror}")
    except ImportError as exc:
        _fail(f"assess needs torch and scikit-learn ({exc.name} is missing): pip install 'layerlock[torch]' "
              "scikit-learn")
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:  # the task's code on this model
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"task {task_spec} failed on this model: {type(exc).__name__}: {first}")
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo("\n".join(table(report)))
