"""Protect one model file or every model under a directory.

A directory is scanned recursively for ``.safetensors``/``.pt``/``.pth``/``.onnx`` and ncnn
``.param`` files (each paired with the ``.bin`` of the same name).  Our own
outputs (``*.locked.*``), hidden files (our temporaries) and models that already have a bundle
next to where their outputs would go are skipped, so running protect twice over a tree is safe
and does not mint a second data key for a model already shipped.  One bad file does not stop
the scan: its error is recorded and the caller decides the exit status.

``on_result`` is called right after each model is protected, so the caller can seal and hand
over the data key immediately and the list of results never needs to outlive the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerlock.shared.errors import InvalidInput, LayerlockError
from layerlock.shared.formats import MODEL_SUFFIXES
from layerlock.shared.lockfile import ProtectResult, protect
from layerlock.shared.selection import LockPolicy


@dataclass
class Outcome:
    """One file's fate in a protect run: ``status`` is ``ok``, ``skipped`` or ``error``."""

    source: Path
    status: str
    result: ProtectResult | None = None
    message: str = ""


def find_models(root: Path) -> list[Path]:
    """Model files under ``root``, sorted, excluding our outputs and hidden files."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or ".locked." in path.name:
            continue
        if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
            found.append(path)
    return found


def protect_path(path: Path, out_dir: Path | None = None, *, model_id: str | None = None,
                 policy: LockPolicy | None = None, progress: bool = False, force: bool = False,
                 on_result: Callable[[ProtectResult], None] | None = None,
                 weights: Path | None = None) -> list[Outcome]:
    """Protect a file (errors raise) or a directory (errors are recorded per file).

    ``weights``: the ``.bin`` of an ncnn ``.param`` given as ``path``, when not named like it.

    An existing bundle is never replaced silently: it may be the only copy matching a locked
    model already shipped (a new protect run means a new data key).  A single file then needs
    ``force``; in a directory the model is skipped.
    """
    path = Path(path)
    if path.is_dir():
        if model_id is not None:
            raise InvalidInput("--model-id names one model; it cannot be used with a directory")
        if weights is not None:
            raise InvalidInput("a weights file goes with one ncnn .param, not with a directory")
        outcomes = []
        for src in find_models(path):
            dest = out_dir / src.parent.relative_to(path) if out_dir is not None else src.parent
            if (dest / f"{src.stem}.llk").exists():
                outcomes.append(Outcome(src, "skipped", message="already protected (bundle exists)"))
                continue
            try:
                outcomes.append(_one(src, dest, None, policy, progress, on_result))
            except LayerlockError as exc:
                outcomes.append(Outcome(src, "error", message=exc.message))
        return outcomes
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or directory")
    bundle = (out_dir if out_dir is not None else path.parent) / f"{path.stem}.llk"
    if bundle.exists() and not force:
        raise InvalidInput(f"{bundle} already exists (the model is already protected); "
                           "use --force to protect it again with a new data key")
    return [_one(path, out_dir, model_id, policy, progress, on_result, weights)]


def _one(src: Path, out_dir: Path | None, model_id: str | None, policy: LockPolicy | None, progress: bool,
         on_result: Callable[[ProtectResult], None] | None, weights: Path | None = None) -> Outcome:
    result = protect(src, out_dir, model_id=model_id, policy=policy, progress=progress, weights=weights)
    if on_result is not None:
        on_result(result)
    return Outcome(src, "ok", result)
