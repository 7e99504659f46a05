"""``layerlock trace SUSPECT --model ID``: name the license a leaked copy came from.

The suspect file stays here: this command reads it, fetches the model's public fingerprint
layout (positions, alignment descriptors) from the server, extracts the suspect's values at the
positions -- as found, and re-aligned in case hidden units were permuted -- and sends only those
to ``POST /v1/models/ID/trace``, where the real values and the chip key are.  The server ranks
every license, names those above a threshold with a proven false-accusation bound, and audits
the trace.  See :mod:`layerlock.shared.fingerprint` for the statistic and the bound.

With ``--original`` (the vendor's unprotected model file) the residual at each position is
weighted, here, by how far the suspect drifted from the original around it
(:func:`layerlock.shared.fingerprint.informed`): that is what names the license after heavy
fine-tuning.  The values sent are still one per position and the server's statistic and bound
are unchanged; the original never leaves this machine.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np

from layerlock.license_server.cli.rest import ApiClient, emit, rest_options
from layerlock.shared.errors import LayerlockError


@click.command(context_settings={"max_content_width": 100})
@click.argument("suspect", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_id", required=True, help="The model id the suspect is thought to be a copy of.")
@click.option("--original", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The original, unprotected model file (the one `protect` was run on): informed tracing, "
                   "which weighs each position by how much the suspect drifted around it -- needed to name a "
                   "license after heavy fine-tuning.  Read locally, never sent.")
@rest_options
def trace(client: ApiClient, as_json: bool, suspect: Path, model_id: str, original: Path | None) -> None:
    """Rank licenses by how strongly SUSPECT carries their fingerprint, and name the culprit(s).

    SUSPECT is a .safetensors file, a .pt/.pth state dict or an .onnx model.  A license is named
    only when its score passes a threshold chosen so that the chance of naming any innocent
    license is at most 1e-9 per trace, for any suspect, with up to a million licenses (more
    licenses raise the threshold).  Needs an auditor or admin key; every trace is audited.
    Exit status: 0 when a license is named, 3 when none is, 1 on errors.

    With --original the trace is informed: the suspect is compared with the original over whole
    tensors, and positions that fine-tuning left alone weigh more than those it swept over.  The
    bound is the same (the weighting uses no license's chips); ORIGINAL must be the unprotected
    model, not a license's copy.
    """
    from layerlock.shared.fingerprint import INFORMED_CLIP, extract, informed

    tensors = _read(suspect)
    base = _read(original) if original is not None else None
    layout = client.call("GET", f"/v1/models/{model_id}/fingerprint")
    try:
        found_tensors = {k: np.asarray(v) for k, v in tensors.items()}
        if base is None:
            candidates = extract(layout, found_tensors)
        else:
            candidates = informed(layout, found_tensors, {k: np.asarray(v) for k, v in base.items()})
    except LayerlockError as exc:
        _fail(exc.message)
    found = sum(1 for site in layout["sites"] if _has(site, tensors))
    body = {"suspect": suspect.name, "sha256": _sha256(suspect),
            "values": [base64.urlsafe_b64encode(c.astype("<f4").tobytes()).rstrip(b"=").decode() for c in candidates]}
    doc: dict[str, Any] = client.call("POST", f"/v1/models/{model_id}/trace", body)
    doc["tensors_found"] = f"{found} of {len(layout['sites'])}"
    doc["detection"] = "informed" if original is not None else "uninformed"
    if original is not None:
        doc["original"] = original.name
        doc["residual"] = ("informed: the values sent are w + delta * a, a = (delta/sigma) * "
                           f"clip(d/sigma, -{INFORMED_CLIP:g}, {INFORMED_CLIP:g}), "
                           "d = suspect - original at the position, sigma^2 = delta^2 + a rank-one fit of d^2 over "
                           "the tensor's other elements; so y = a in the statistic")
    if as_json:
        emit(doc, True)
    else:
        _print(doc)
    sys.exit(0 if doc["named"] else 3)


def _read(path: Path) -> dict[str, Any]:
    from layerlock.shared.plan import read_tensors

    if not path.is_file():
        _fail(f"{path}: no such file")
    try:
        with tempfile.TemporaryDirectory(prefix="layerlock-trace-") as tmp:
            return dict(read_tensors(path, Path(tmp)))
    except LayerlockError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"{exc.filename or path}: {exc.strerror}")


def _has(site: dict[str, Any], tensors: dict[str, Any]) -> bool:
    shape = tuple(site["shape"])
    return any(tuple(np.shape(a)) in (shape, shape[::-1]) for a in tensors.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _print(doc: dict[str, Any]) -> None:
    click.echo(f"suspect:   {doc['suspect']} (sha256 {doc['sha256'][:16]}...)")
    click.echo(f"model:     {doc['model_id']}: {doc['positions']:,} fingerprint positions, "
               f"{doc['tensors_found']} fingerprinted tensors found in the suspect")
    if doc["detection"] == "informed":
        click.echo(f"detection: informed, against the original {doc['original']} (drift-weighted residual)")
    click.echo(f"scanned:   {doc['licenses_scanned']:,} licenses, {doc['alignments']} alignments; "
               f"threshold z >= {doc['threshold']} (false accusation <= {doc['false_accusation_bound']:g} per trace)")
    if doc["named"]:
        click.echo(f"TRACED to: {', '.join(doc['named'])}")
        click.echo("  license                          score   P(an innocent license scores this high)")
        for r in doc["ranking"]:
            click.echo(f"  {r['license_id']:<32} {r['score']:>6.2f}   <= {r['false_positive_bound']:.2g}")
    else:
        click.echo("not traced: no license passes the threshold (scores under it are never shown: they "
                   "would leak chips)")
    click.echo(f"statistic: {doc['statistic']}")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)
