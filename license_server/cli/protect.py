"""``layerlock protect``: lock a model (or a directory of models) and hand its data key to the server.

The data key is the one secret of a protected model, so the command never prints it and never
writes it in plaintext, except through the explicit ``--data-key-out`` testing hook.  Exactly one
destination must be chosen: sealed to the server's intake key (``--intake-key``), sealed and
uploaded (``--register``), or raw for local tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from layerlock.shared.errors import ConfigError, InvalidInput, LayerlockError
from layerlock.shared.keys import b64u_decode, ensure_private_dir, write_secret_file, x25519_public
from layerlock.shared.lockfile import ProtectResult
from layerlock.shared.protect import Outcome, find_models, protect_path
from layerlock.shared.selection import LockPolicy
from layerlock.shared.urls import shown
from layerlock.shared.wrap import seal_for_server

HTTP_TIMEOUT_S = 30
_SHOWN = 20  # locked tensors listed in the text output


def load_intake_key(path: Path) -> x25519.X25519PublicKey:
    """The server's X25519 intake public key: PEM, or the raw 32 bytes as base64url text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read intake key {path}: {exc.strerror}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise ConfigError(f"{path} is not a valid PEM public key") from None
        if not isinstance(key, x25519.X25519PublicKey):
            raise ConfigError(f"{path} is not an X25519 public key")
        return key
    try:
        raw = b64u_decode(data.decode("ascii").strip(), field="intake key")
    except (UnicodeDecodeError, InvalidInput):
        raise ConfigError(f"{path} is neither PEM nor a base64url X25519 public key") from None
    try:
        return x25519_public(raw, field=f"intake key in {path}")
    except InvalidInput as exc:
        raise ConfigError(exc.message) from None


class _Registrar:
    """``--register``: fetch the intake key once, then seal + upload each model's data key."""

    def __init__(self, url: str, api_key: str) -> None:
        import requests

        self.url, self.session = url.rstrip("/"), requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        body = self._call("GET", "/v1/intake-key", "fetching the intake key")
        pub = body.get("intake_pub") if isinstance(body, dict) else None
        if not isinstance(pub, str):
            raise ConfigError(f"{shown(self.url)}/v1/intake-key did not return an intake_pub")
        self.intake = x25519_public(b64u_decode(pub, field="intake_pub"), field="intake_pub")

    def _call(self, method: str, path: str, what: str, payload: Any = None) -> Any:
        import requests

        try:
            reply = self.session.request(method, self.url + path, json=payload, timeout=HTTP_TIMEOUT_S)
        except requests.RequestException as exc:
            raise ConfigError(f"{what}: cannot reach {shown(self.url)}: {type(exc).__name__}") from None
        try:
            body = reply.json()
        except ValueError:
            body = None
        if not 200 <= reply.status_code < 300:
            message = body.get("message") if isinstance(body, dict) else None
            raise LayerlockError(f"{what} failed (HTTP {reply.status_code}): {message or reply.reason}",
                                 code="registration_failed")
        return body

    def register(self, result: ProtectResult, doc: dict[str, object], name: str, version: str) -> None:
        payload = {"model_id": result.model_id, "name": name, "version": version, "sealed_key": doc}
        self._call("POST", "/v1/models", f"registering model {result.model_id}", payload)


def _sink(intake_key: Path | None, register: str | None, api_key: str | None, data_key_out: Path | None,
          is_dir: bool, name: str | None, version: str) -> tuple[Callable[[ProtectResult], None], dict[Path, str]]:
    """The ``on_result`` callback that disposes of each data key, and where each one went."""
    where: dict[Path, str] = {}
    if data_key_out is not None:
        if is_dir:
            ensure_private_dir(data_key_out)

        elif data_key_out.is_dir() or not data_key_out.parent.is_dir():
            raise ConfigError(f"--data-key-out {data_key_out}: not a file path in an existing directory")

        def raw(result: ProtectResult) -> None:
            target = data_key_out / f"{result.model_id}.key" if is_dir else data_key_out
            with _or_discard(result):
                write_secret_file(target, result.data_key)
            where[result.source] = f"raw key in {target} (TESTING ONLY)"
        return raw, where

    intake = load_intake_key(intake_key) if intake_key is not None else None
    registrar = _Registrar(register, api_key or "") if register is not None else None

    def sealed(result: ProtectResult) -> None:
        target = registrar.intake if registrar is not None else intake
        assert target is not None
        doc = seal_for_server(result.data_key, target, result.model_id, result.fingerprint)
        path = result.bundle_path.with_name(result.bundle_path.name[:-len(".llk")] + ".key.sealed")
        with _or_discard(result):
            path.write_text(json.dumps(doc, indent=2) + "\n")
        where[result.source] = f"sealed in {path}"
        if registrar is not None:
            registrar.register(result, doc, (name if not is_dir and name else result.source.stem), version)
            where[result.source] = f"registered at {shown(registrar.url)} (copy sealed in {path})"
    return sealed, where


@contextlib.contextmanager
def _or_discard(result: ProtectResult) -> Iterator[None]:
    """If the data key cannot be stored, the outputs are useless: remove them, then fail."""
    try:
        yield
    except BaseException:
        result.locked_path.unlink(missing_ok=True)
        result.bundle_path.unlink(missing_ok=True)
        if result.param_path is not None:
            result.param_path.unlink(missing_ok=True)
        raise


@click.command(context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("weights", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out-dir", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write outputs (default: next to each input; a directory tree is mirrored).")
@click.option("--model-id", help="Model id for a single file (default: file stem + random suffix).")
@click.option("--layers", metavar="START:COUNT",
              help="Lock COUNT layers from layer START (layers as `layerlock inspect` lists them: execution "
                   "order where the format knows it, else natural name order).")
@click.option("--pattern", "patterns", multiple=True, metavar="GLOB",
              help="Also lock tensors whose name matches GLOB (fnmatch; repeatable).")
@click.option("--base", "base", type=click.Path(dir_okay=False, path_type=Path),
              help="The public base this model was fine-tuned from: lock only what differs from it (rows that "
                   "changed, tensors it lacks), with the base's own values as decoys.")
@click.option("--base-min-change", type=click.FloatRange(0, None), default=0.0, show_default=True,
              help="With --base: leave clear rows whose relative change from the base is below this.")
@click.option("--include-int", is_flag=True,
              help="Integer and bool buffers may be locked too (decoys stay within the values seen).")
@click.option("--intake-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Seal the data key to this server intake public key (intake.pub) -> NAME.key.sealed.")
@click.option("--register", metavar="URL", help="Seal the data key and register the model at this server.")
@click.option("--api-key", envvar="LAYERLOCK_API_KEY", help="API key for --register [env: LAYERLOCK_API_KEY].")
@click.option("--data-key-out", type=click.Path(path_type=Path),
              help="FOR TESTING ONLY: write the raw data key to this file (mode 0600; a directory "
                   "of MODEL_ID.key files when PATH is a directory).")
@click.option("--name", help="Display name sent with --register (default: file stem).")
@click.option("--version", "model_version", default="1", show_default=True, help="Version sent with --register.")
@click.option("--fingerprint/--no-fingerprint", default=True, show_default=True,
              help="Reserve per-license fingerprint positions in the locked tensors: each license's unlocked "
                   "weights then differ slightly, and `layerlock trace` names the license of a leaked copy. "
                   "Off with --data-key-out (no server to issue the values).")
@click.option("--fingerprint-strength", type=click.FloatRange(0.25, 4.0), default=1.0, show_default=True,
              help="Scale the fingerprint's amplitude: higher survives harsher retraining of a small model, "
                   "lower changes its outputs less (README: Trace a leak).")
@click.option("--fingerprint-task", metavar="TASK",
              help="Place the fingerprint where this task's loss is flattest, so users do not notice it: a "
                   "`layerlock assess` task (digits, encoder, a .py file or a module name) run on the vendor's "
                   "own data (needs PyTorch; reads the whole model into memory).  Default: the largest "
                   "locked weights, no data needed.")
@click.option("--force", is_flag=True, help="Protect a single file again even if its bundle exists (new key).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress bar (it is also off when stderr is not a TTY).")
def protect(path: Path, weights: Path | None, out_dir: Path | None, model_id: str | None, layers: str | None,
            patterns: tuple[str, ...], base: Path | None, base_min_change: float, include_int: bool,
            intake_key: Path | None, register: str | None, api_key: str | None, data_key_out: Path | None,
            name: str | None, model_version: str, fingerprint: bool, fingerprint_strength: float,
            fingerprint_task: str | None, force: bool, as_json: bool, no_progress: bool) -> None:
    """Lock a model so a copy is worthless without a license.

    PATH is a .safetensors, .pt/.pth state dict or .onnx file, an ncnn .param (WEIGHTS is its
    .bin; default: the .bin of the same name), or a directory scanned for all of them (ncnn
    pairs by name).  Writes NAME.locked.safetensors (or .onnx; for ncnn NAME.locked.bin plus the
    .param copied as NAME.locked.param) -- same tensor names, shapes and dtypes, selected tensors
    replaced by decoys -- and NAME.llk, the encrypted restoration bundle.  The data key
    is never printed: choose exactly one of --intake-key, --register or --data-key-out.

    Without --layers/--pattern/--base the default policy locks the model's input interface: the
    70% of embedding rows (tokens) or 45% of the first layer's input columns with the largest
    norms, small position tables and the output head whole (`layerlock inspect` shows it
    first; `layerlock assess` measures it).  With --base it locks what differs from the base.
    Integer and bool buffers are left alone unless --include-int (or a --pattern naming one
    exactly).
    """
    chosen = [opt for opt, value in (("--intake-key", intake_key), ("--register", register),
                                     ("--data-key-out", data_key_out)) if value is not None]
    if len(chosen) != 1:
        raise click.UsageError("choose exactly one of --intake-key, --register or --data-key-out "
                               f"(got {', '.join(chosen) if chosen else 'none'})")
    if register is not None and not api_key:
        raise click.UsageError("--register needs --api-key or LAYERLOCK_API_KEY")
    if fingerprint_task is not None and (not fingerprint or data_key_out is not None):
        raise click.UsageError("--fingerprint-task places a fingerprint: not with --no-fingerprint or --data-key-out")
    try:
        if path.is_dir() and not find_models(path):  # before any key destination is created or contacted
            raise InvalidInput(f"no model files (.safetensors, .pt, .pth, .onnx, ncnn .param) under {path}")
        policy = (LockPolicy.parse_layers(layers, patterns, include_int) if layers is not None
                  else LockPolicy(patterns=tuple(patterns), include_int=include_int))
        if base is not None:
            if layers is not None or patterns:
                raise InvalidInput("--base chooses what to lock itself: drop --layers/--pattern")
            if not base.is_file():
                raise InvalidInput(f"--base {base}: no such file")
            policy = LockPolicy(include_int=include_int, base=str(base), base_min_change=base_min_change)
        if fingerprint_task is not None:
            from layerlock.shared.assess import load_task

            load_task(fingerprint_task)  # a task that does not load fails before any key is made
        policy = dataclasses.replace(policy, fingerprint=fingerprint and data_key_out is None,
                                     fingerprint_strength=fingerprint_strength, fingerprint_task=fingerprint_task)
        on_result, where = _sink(intake_key, register, api_key, data_key_out, path.is_dir(), name, model_version)
        outcomes = protect_path(path, out_dir, model_id=model_id, policy=policy, progress=not no_progress,
                                force=force, on_result=on_result, weights=weights)
    except LayerlockError as exc:
        _fail(exc.message)
    except OSError as exc:
        _fail(f"{exc.filename or path}: {exc.strerror}")
    if as_json:
        click.echo(json.dumps([_as_dict(o, where) for o in outcomes], indent=2))
    elif path.is_dir():
        _table(outcomes)
    else:
        _describe(outcomes[0], where)
    for o in outcomes:
        for warning in o.result.warnings if o.result is not None else []:
            click.echo(f"warning: {o.source}: {warning}", err=True)
        if o.status == "error":
            click.echo(f"error: {o.source}: {o.message}", err=True)
    if any(o.status == "error" for o in outcomes):
        sys.exit(1)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _as_dict(o: Outcome, where: dict[Path, str]) -> dict[str, Any]:
    d: dict[str, Any] = {"source": str(o.source), "status": o.status}
    if o.result is not None:
        r = o.result
        d.update(model_id=r.model_id, format=r.format, locked=str(r.locked_path), bundle=str(r.bundle_path),
                 locked_tensors=len(r.locked_tensors), locked_params=r.locked_params,
                 total_params=r.total_params, fraction=round(r.fraction, 6), data_key=where.get(o.source),
                 policy=r.policy, locked_names=list(r.locked_tensors), locks=r.locks, warnings=r.warnings,
                 fingerprint_positions=r.fingerprint_positions, fingerprint_task=r.fingerprint_task)
        if r.param_path is not None:
            d["param"] = str(r.param_path)
    if o.message:
        d["message"] = o.message
    return d


def _describe(o: Outcome, where: dict[Path, str]) -> None:
    r = o.result
    assert r is not None
    click.echo(f"protected {r.source} -> {r.locked_path} + {r.bundle_path}")
    if r.param_path is not None:
        click.echo(f"  graph:     {r.param_path} (the .param, unchanged: ship it with the locked .bin)")
    click.echo(f"  model id:  {r.model_id}")
    click.echo(f"  locked:    {len(r.locked_tensors)} tensors, {r.locked_params:,} of {r.total_params:,} "
               f"parameters ({100 * r.fraction:.1f}%; {r.policy} policy)")
    shown = r.locks[:_SHOWN]
    for lock in shown:
        click.echo(f"             {lock['name']}  {lock['part']}  ({int(str(lock['params'])):,} parameters"
                   f"{', base values as decoys' if lock.get('decoy') == 'base' else ''})")
    if len(r.locks) > len(shown):
        click.echo(f"             ... and {len(r.locks) - len(shown)} more (--json lists them all)")
    click.echo(f"  data key:  {where.get(r.source, '?')}")
    if r.fingerprint_positions:
        placed = f", placed by task {r.fingerprint_task}" if r.fingerprint_task else ""
        click.echo(f"  fingerprint: {r.fingerprint_positions:,} positions{placed} (each license's values come with "
                   "its token)")


def _table(outcomes: list[Outcome]) -> None:
    rows = [("file", "model id", "locked tensors", "% params", "status")]
    for o in outcomes:
        r = o.result
        rows.append((str(o.source), r.model_id if r else "-", str(len(r.locked_tensors)) if r else "-",
                     f"{100 * r.fraction:.1f}" if r else "-", o.status if r else f"{o.status}: {o.message}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4])
