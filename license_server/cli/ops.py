"""REST-backed ops commands: keys, machines, models, licenses (and seats), audit, webhooks, and the
air-gapped exchange (``activate-offline``).

Each talks to the API with an API key (``--server``/``LAYERLOCK_SERVER``, ``--api-key``/
``LAYERLOCK_API_KEY``), prints a table for people or ``--json`` for scripts, and exits 1 with a
one-line reason on failure.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from layerlock.license_server import checkpoints, events
from layerlock.license_server.cli.rest import ApiClient, emit, rest_options
from layerlock.license_server.roles import Role

MACHINE_COLS = ["machine", "customer", "status", "enrolled", "labels"]
LICENSE_COLS = ["license_id", "kind", "machine", "customer", "model", "family", "seats", "status", "expires_at"]
SEAT_COLS = ["machine", "live", "until"]
WEBHOOK_COLS = ["webhook_id", "url", "events", "status", "description"]
DELIVERY_COLS = ["delivery_id", "type", "status", "attempts", "last_status", "last_error", "webhook_id", "event_id"]
AUDIT_COLS = ["id", "type", "outcome", "reason", "machine", "model", "license", "actor"]


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        out[k] = v
    return out


_LIMIT_HELP = "At most this many (pages are followed)."


# --- keys --------------------------------------------------------------------------------------
@click.group()
def keys() -> None:
    """API keys and server key rotation (admin)."""


@keys.command("create")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
@click.option("--name", default="", help="What the key is for.")
@rest_options
def keys_create(client: ApiClient, as_json: bool, role: str, name: str) -> None:
    """Create an API key; the key is printed once."""
    doc = client.call("POST", "/v1/keys", {"role": role, "name": name})
    if as_json:
        emit(doc, True)
    else:
        click.echo(f"created {doc['id']} ({role}); API key (shown once):")
        click.echo(doc["api_key"])


@keys.command("list")
@rest_options
def keys_list(client: ApiClient, as_json: bool) -> None:
    """List API keys (ids, roles, names; never the keys)."""
    emit(list(client.walk("/v1/keys", {}, None)), as_json, ["id", "role", "status", "name", "created_at"])


@keys.command("revoke")
@click.argument("key_id")
@rest_options
def keys_revoke(client: ApiClient, as_json: bool, key_id: str) -> None:
    """Revoke an API key at once; requests made with it get 401."""
    emit(client.call("POST", f"/v1/keys/{key_id}/revoke"), as_json)


@keys.command("rotate-signing")
@rest_options
def keys_rotate_signing(client: ApiClient, as_json: bool) -> None:
    """New token signing key; retired keys stay in the JWKS until their last token expires."""
    emit(client.call("POST", "/v1/keys/rotate-signing"), as_json)


@keys.command("rotate-kek")
@rest_options
def keys_rotate_kek(client: ApiClient, as_json: bool) -> None:
    """New key-encryption key; re-wraps every stored data key (models stay as they are)."""
    emit(client.call("POST", "/v1/keys/rotate-kek"), as_json)


# --- machines ----------------------------------------------------------------------------------
@click.group()
def machines() -> None:
    """Register and manage customer machines."""


def _duration(text: str | None) -> int | None:
    """``90``, ``90s``, ``30m``, ``24h`` or ``7d`` → seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    num, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not num.isascii() or not num.isdigit():
        raise click.BadParameter(f"{text!r} is not a duration like 3600, 30m, 24h or 7d")
    return int(num) * units[unit]


def _print_claim(doc: dict[str, Any]) -> None:
    click.echo(f"claim for {doc['machine']} (single use, expires {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(doc['expires_at']))}), shown once:")  # noqa: E501
    click.echo(doc["claim"])
    click.echo("on that host: sudo layerlock-verifier enroll --server URL --claim -   (and paste it when asked: "
               "never on a command line, where ps and sudo's log would show it)")


@machines.command("add")
@click.argument("code")
@click.option("--customer", default="")
@click.option("--label", "label_pairs", multiple=True, help="key=value (repeatable).")
@click.option("--claim", "with_claim", is_flag=True,
              help="CODE is a bare machine code: also create a single-use claim secret for the host to enroll with.")
@click.option("--claim-ttl", default=None, help="Claim lifetime: 3600, 30m, 24h, 7d (default: server's, 24h).")
@rest_options
def machines_add(client: ApiClient, as_json: bool, code: str, customer: str, label_pairs: tuple[str, ...],
                 with_claim: bool, claim_ttl: str | None) -> None:
    """Register a machine.

    CODE is the enrollment code (LLE1.…) that `layerlock-verifier enroll` printed on the host: the
    machine's keys are bound at once. Or CODE is a bare machine code (LLK-…) with --claim: the server
    returns a single-use claim secret (shown once) that the host presents with
    `layerlock-verifier enroll --claim SECRET`. A machine code alone binds no key: knowing a machine
    code (it is not a secret) must not let anyone else enroll as that machine.
    """
    enrolled = code.startswith("LLE1.")
    if with_claim and enrolled:
        raise click.UsageError("--claim is for a bare machine code; an enrollment code binds the keys already")
    ttl = _duration(claim_ttl)
    body: dict[str, Any] = {"customer": customer, "labels": _labels(label_pairs)}
    body["enrollment" if enrolled else "machine"] = code
    doc = client.call("POST", "/v1/machines", body)
    if with_claim:
        claim = client.call("POST", f"/v1/machines/{doc['machine']}/claims", {} if ttl is None else {"ttl": ttl})
        doc = {**doc, "claim": claim["claim"], "claim_id": claim["claim_id"], "claim_expires_at": claim["expires_at"]}
        if not as_json:
            emit({k: v for k, v in doc.items() if not k.startswith("claim")}, False)
            _print_claim(claim)
            return
    elif not enrolled and not as_json:
        emit(doc, False)
        click.echo("note: no key is bound yet: give the host a claim (layerlock machines claim "
                   f"{doc['machine']}) or re-add it with its enrollment code", err=True)
        return
    emit(doc, as_json)


@machines.command("claim")
@click.argument("code")
@click.option("--ttl", default=None, help="Claim lifetime: 3600, 30m, 24h, 7d (default: server's, 24h).")
@rest_options
def machines_claim(client: ApiClient, as_json: bool, code: str, ttl: str | None) -> None:
    """Create a single-use claim secret for a machine registered by its bare code.

    The host enrolls with it (`layerlock-verifier enroll --server URL --claim SECRET`); the secret is
    shown once, stored only hashed, and a newer claim replaces an older unused one.
    """
    seconds = _duration(ttl)
    doc = client.call("POST", f"/v1/machines/{code}/claims", {} if seconds is None else {"ttl": seconds})
    if as_json:
        emit(doc, True)
    else:
        _print_claim(doc)


@machines.command("list")
@click.option("--customer")
@click.option("--status", type=click.Choice(["active", "inactive"]))
@click.option("--label", help="key or key=value")
@click.option("--limit", type=click.IntRange(min=1), default=None, help=_LIMIT_HELP + " Default: all.")
@rest_options
def machines_list(client: ApiClient, as_json: bool, customer: str | None, status: str | None, label: str | None,
                  limit: int | None) -> None:
    """List registered machines, filtered by customer, status or label."""
    items = list(client.walk("/v1/machines", {"customer": customer, "status": status, "label": label}, limit))
    emit(items, as_json, MACHINE_COLS)


@machines.command("show")
@click.argument("code")
@rest_options
def machines_show(client: ApiClient, as_json: bool, code: str) -> None:
    """Show one machine: customer, labels, device class, status."""
    emit(client.call("GET", f"/v1/machines/{code}"), as_json)


@machines.command("label")
@click.argument("code")
@click.option("--label", "label_pairs", multiple=True, required=True, help="key=value; replaces all labels.")
@rest_options
def machines_label(client: ApiClient, as_json: bool, code: str, label_pairs: tuple[str, ...]) -> None:
    """Set labels (KEY=VALUE) on a machine."""
    emit(client.call("PATCH", f"/v1/machines/{code}", {"labels": _labels(label_pairs)}), as_json)


@machines.command("deactivate")
@click.argument("code")
@rest_options
def machines_deactivate(client: ApiClient, as_json: bool, code: str) -> None:
    """Deactivate a machine: its next activation or renewal is refused and its sidecar drops the models."""
    emit(client.call("POST", f"/v1/machines/{code}/deactivate"), as_json)


# --- models ------------------------------------------------------------------------------------
@click.group()
def models() -> None:
    """Register protected models (their sealed data keys)."""


@models.command("add")
@click.argument("sealed_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model-id", default=None,
              help="Default: NAME-VERSION with --name (NAME alone without --version), else the sealed key's model id.")
@click.option("--name", default=None, help="Display name; with --version it also makes the id NAME-VERSION "
              "and the family NAME.")
@click.option("--family", default=None, help="The model family this is a version of (family licenses name it); "
              "with --version the id is FAMILY-VERSION.")
@click.option("--version", "version_", default="")
@click.option("--released-at", type=int, default=None,
              help="Release time, Unix seconds (default: now); read by the 'maintain' version rule.")
@rest_options
def models_add(client: ApiClient, as_json: bool, sealed_key: Path, model_id: str | None, name: str | None,
               family: str | None, version_: str, released_at: int | None) -> None:
    """Register a protected model. SEALED_KEY is the *.key.sealed document `layerlock protect` wrote.

    The model id is bound into the sealed key (and the .llk bundle) when `layerlock protect`
    runs, so it must match: protect with --model-id NAME-VERSION, then add with --name NAME
    --version VERSION (or --family NAME --version VERSION).  A model added with a version belongs
    to a family (--family, else --name), which family licenses (`licenses issue --family`)
    name instead of one model id.  Prints the id it registered.
    """
    if family and not version_:
        raise click.UsageError("--family needs --version (a family's models are its versions)")
    family = family or (name if version_ else None)
    name = name or family
    try:
        doc = json.loads(sealed_key.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {sealed_key}: {exc}") from None
    sealed_for = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(sealed_for, str) or not sealed_for:
        raise click.ClickException(f"{sealed_key} is not a sealed key document from `layerlock protect` "
                                   "(it names no model)")
    wanted = model_id or (f"{name}-{version_}" if name and version_ else name) or sealed_for
    if wanted != sealed_for:
        how = "--model-id" if model_id else "--name/--version"
        raise click.ClickException(
            f"{sealed_key} is sealed for model id {sealed_for!r}, not {wanted!r} (from {how}): the id is bound "
            f"into the sealed key and the .llk bundle when `layerlock protect` runs. Protect again with "
            f"--model-id {wanted}, or register it under its own id with --model-id {sealed_for}")
    body = {"model_id": wanted, "name": name or wanted, "version": version_, "sealed_key": doc}
    if family:
        body["family"] = family
    if released_at is not None:
        body["released_at"] = released_at
    rec = client.call("POST", "/v1/models", body)
    if as_json:
        emit(rec, True)
    else:
        in_family = f", family {rec['family']!r}: or --family {rec['family']}" if rec.get("family") else ""
        click.echo(f"registered model {rec.get('model_id', wanted)} (name {rec.get('name', '')!r}, "
                   f"version {rec.get('version', '')!r}); license it with --model {rec.get('model_id', wanted)}"
                   f"{in_family}")


@models.command("list")
@rest_options
def models_list(client: ApiClient, as_json: bool) -> None:
    """List registered models (never their data keys)."""
    emit(list(client.walk("/v1/models", {}, None)), as_json,
         ["model_id", "family", "version", "status", "released_at", "kek_id"])


@models.command("retire")
@click.argument("model_id")
@rest_options
def models_retire(client: ApiClient, as_json: bool, model_id: str) -> None:
    """Retire a model: no new licenses or activations for it."""
    emit(client.call("POST", f"/v1/models/{model_id}/retire"), as_json)


# --- licenses ----------------------------------------------------------------------------------
@click.group()
def licenses() -> None:
    """Issue, inspect, revoke and extend licenses."""


@licenses.command("issue")
@click.option("--machine", help="One machine (a node license).")
@click.option("--customer", help="A customer's machines share --seats (a pool license).")
@click.option("--model", help="One model id.")
@click.option("--family", help="A model family instead of one model (see --versions).")
@click.option("--versions", type=click.Choice(["all", "max", "maintain"]), default=None,
              help="Family rule: every version (default); up to --max-version; released before the license "
                   "expires, and those kept after it does.")
@click.option("--max-version", help="The last version --versions max covers (dotted numbers).")
@click.option("--seats", type=click.IntRange(min=1), help="With --customer: how many machines at once.")
@click.option("--floating", is_flag=True, help="Seats are leases: a machine that stops renewing loses its seat.")
@click.option("--lease", "lease_ttl", help="Lease length: 600, 30m, 1h (floating default: the token ttl; "
              "with plain seats it adds a heartbeat).")
@click.option("--revive", "revive_ttl", help="How long a lapsed lease keeps its seat for its machine "
              "(default: the lease length).")
@click.option("--airgap-ttl", help="Token life of air-gapped activations (activate-offline): 30d, 90d.")
@click.option("--days", type=click.IntRange(min=1))
@click.option("--expires-at", type=click.IntRange(min=0), help="Unix seconds.")
@click.option("--not-before", type=click.IntRange(min=0), help="Unix seconds.")
@click.option("--token-ttl", type=click.IntRange(min=1), help="Seconds a token lives before renewal is due.")
@click.option("--offline-grace", type=click.IntRange(min=1), help="Seconds a machine may stay offline.")
@click.option("--notes")
@rest_options
def licenses_issue(client: ApiClient, as_json: bool, floating: bool, **opts: Any) -> None:
    """Issue a license (--days or --expires-at).

    \b
    For one machine:          --machine LLK-… --model ID
    For N machines of a customer (node-locked seats):  --customer C --seats N --model ID
    For N at once (floating leases):  --customer C --seats N --floating [--lease 1h]
    Any of them for a model family instead of one model:  --family NAME [--versions …]
    """
    if opts["days"] is None and opts["expires_at"] is None:
        raise click.UsageError("give --days or --expires-at")
    if (opts["machine"] is None) == (opts["customer"] is None):
        raise click.UsageError("give --machine (one machine) or --customer with --seats (a pool)")
    if (opts["model"] is None) == (opts["family"] is None):
        raise click.UsageError("give --model or --family")
    for name in ("lease_ttl", "revive_ttl", "airgap_ttl"):
        opts[name] = _duration(opts[name])
    if opts["max_version"] is not None and opts["versions"] is None:
        opts["versions"] = "max"
    body = {k: v for k, v in opts.items() if v is not None}
    if floating:
        body["kind"] = "floating"
    emit(_seat_lines(client.call("POST", "/v1/licenses", body), as_json), as_json)


def _seat_lines(doc: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """For people: seat usage as one line (``licenses seats`` lists the holders)."""
    if as_json or "holders" not in doc:
        return doc
    out = {k: v for k, v in doc.items() if k not in ("holders", "used")}
    out["seats"] = f"{doc['used']} of {doc['seats']} in use (licenses seats {doc['license_id']})"
    return out


@licenses.command("list")
@click.option("--machine")
@click.option("--model")
@click.option("--customer")
@click.option("--family")
@click.option("--kind", type=click.Choice(["node", "seats", "floating"]))
@click.option("--status", type=click.Choice(["active", "revoked", "expired", "pending"]))
@click.option("--limit", type=click.IntRange(min=1), default=None, help=_LIMIT_HELP + " Default: all.")
@rest_options
def licenses_list(client: ApiClient, as_json: bool, limit: int | None, **filters: Any) -> None:
    """List licenses, filtered by machine, model, customer or status."""
    emit(list(client.walk("/v1/licenses", filters, limit)), as_json, LICENSE_COLS)


@licenses.command("show")
@click.argument("license_id")
@rest_options
def licenses_show(client: ApiClient, as_json: bool, license_id: str) -> None:
    """Show one license with its status and activation count (a pool license: its seats in use)."""
    emit(_seat_lines(client.call("GET", f"/v1/licenses/{license_id}"), as_json), as_json)


@licenses.command("seats")
@click.argument("license_id")
@rest_options
def licenses_seats(client: ApiClient, as_json: bool, license_id: str) -> None:
    """Who holds a pool license's seats, and until when (a lapsed lease stays listed until culled)."""
    doc = client.call("GET", f"/v1/licenses/{license_id}/seats")
    if as_json:
        emit(doc, True)
        return
    click.echo(f"{license_id}: {doc['used']} of {doc['seats']} seats in use")
    emit([{**h, "until": h["until"] if h["until"] is not None else "until released"} for h in doc["holders"]],
         False, SEAT_COLS)


@licenses.command("release")
@click.argument("license_id")
@click.argument("machine")
@click.option("--reason", default="")
@rest_options
def licenses_release(client: ApiClient, as_json: bool, license_id: str, machine: str, reason: str) -> None:
    """Free MACHINE's seat of a pool license now (audited).

    The machine takes a seat again at its next activation if one is free; to keep it out,
    deactivate it (`machines deactivate`).  It may use the model until its token expires.
    """
    doc = client.call("POST", f"/v1/licenses/{license_id}/seats/{machine}/release", {"reason": reason})
    if as_json:
        emit(doc, True)
    else:
        click.echo(f"released {doc['machine']}'s seat of {license_id}: {doc['used']} of {doc['seats']} now in use")


@licenses.command("revoke")
@click.argument("license_id")
@click.option("--reason", default="")
@rest_options
def licenses_revoke(client: ApiClient, as_json: bool, license_id: str, reason: str) -> None:
    """Revoke a license: its sidecar drops the model at its next renewal (within 2/3 of a token life)."""
    emit(client.call("POST", f"/v1/licenses/{license_id}/revoke", {"reason": reason}), as_json)


@licenses.command("extend")
@click.argument("license_id")
@click.option("--days", type=click.IntRange(min=1))
@click.option("--expires-at", type=click.IntRange(min=0), help="Unix seconds.")
@rest_options
def licenses_extend(client: ApiClient, as_json: bool, license_id: str, days: int | None,
                    expires_at: int | None) -> None:
    """Extend a license's expiry (--days more, or a new --expires-at)."""
    body = {k: v for k, v in (("days", days), ("expires_at", expires_at)) if v is not None}
    emit(client.call("POST", f"/v1/licenses/{license_id}/extend", body), as_json)


# --- audit -------------------------------------------------------------------------------------
@click.group()
def audit() -> None:
    """Read and verify the hash-chained audit trail.

    To detect history rewritten in Redis, save signed checkpoints (`audit checkpoint --out`)
    outside the server and check the log against them (`audit verify --checkpoint`).
    """


class _UnixTime(click.ParamType):  # type: ignore[type-arg]
    """Unix seconds: a finite number >= 0 (click's FloatRange lets ``nan`` through)."""

    name = "unix-seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of Unix seconds", param, ctx)
        if not 0 <= seconds <= 2**33:  # also false for nan
            self.fail(f"{value!r} is not a time (Unix seconds, 0 to 2^33)", param, ctx)
        return seconds


_UNIX_TIME = _UnixTime()

_FILTERS = [click.option("--type", "type_"), click.option("--machine"), click.option("--license"),
            click.option("--model"), click.option("--since", type=_UNIX_TIME, help="Unix seconds."),
            click.option("--until", type=_UNIX_TIME, help="Unix seconds.")]


def _with_filters(fn: Any) -> Any:
    for opt in reversed(_FILTERS):
        fn = opt(fn)
    return fn


def _audit_params(filters: dict[str, Any]) -> dict[str, Any]:
    """The CLI's --type (``type_``: a Python keyword) is the API's ``type``."""
    params = dict(filters)
    params["type"] = params.pop("type_", None)
    return params


@audit.command("list")
@_with_filters
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help=_LIMIT_HELP)
@rest_options
def audit_list(client: ApiClient, as_json: bool, limit: int, **filters: Any) -> None:
    """Newest first."""
    emit(list(client.walk("/v1/audit", _audit_params(filters), limit)), as_json, AUDIT_COLS)


@audit.command("export")
@_with_filters
@rest_options
def audit_export(client: ApiClient, as_json: bool, **filters: Any) -> None:
    """Every matching record as JSON lines, oldest first (for archiving or a SIEM)."""
    for rec in reversed(list(client.walk("/v1/audit", _audit_params(filters), None))):
        click.echo(json.dumps(rec, sort_keys=True))


_PIN = click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help="Pinned checkpoint public key (JWK from `audit checkpoint-key --out`, the "
                         "server's keys/checkpoint.pub, or PEM). Default: the key the server publishes.")


def _pinned(client: ApiClient, key_file: Path | None) -> tuple[Any, str]:
    """(public key, where it came from): the pinned file, else the server's published key."""
    try:
        if key_file is not None:
            return checkpoints.parse_key(key_file.read_text()), "the pinned key"
        return (checkpoints.parse_key(json.dumps(client.call("GET", "/v1/audit/checkpoint-key"))),
                "the server's published key")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {key_file}: {exc}") from None
    except checkpoints.CheckpointError as exc:
        raise click.ClickException(f"{key_file or 'server checkpoint key'}: {exc.message}") from None


def _read_checkpoint(path: Path, key: Any, label: str) -> checkpoints.Checkpoint:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read checkpoint {path}: {exc}") from None
    except ValueError:
        raise click.ClickException(f"checkpoint {path} is not JSON") from None
    try:
        return checkpoints.verify(doc, key, label=label)
    except checkpoints.CheckpointError as exc:
        raise click.ClickException(f"checkpoint {path}: {exc.message}") from None


def _cp_doc(cp: checkpoints.Checkpoint, **extra: Any) -> dict[str, Any]:
    return {**extra, "size": cp.size, "head": cp.head, "ts": cp.ts, "kid": cp.kid}


@audit.command("checkpoint")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the checkpoint here (default: print it as JSON).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@_PIN
@rest_options
def audit_checkpoint(client: ApiClient, as_json: bool, out: Path | None, force: bool, key_file: Path | None) -> None:
    """Get a signed checkpoint (size, head hash, time) of the audit log.

    Keep it somewhere the server's Redis cannot reach: `audit verify --checkpoint FILE` later
    proves that the log still contains, unchanged, every record up to it.  The signature is
    checked (against --key when given) before anything is saved.
    """
    doc = client.call("GET", "/v1/audit/checkpoint")
    key, label = _pinned(client, key_file)
    try:
        cp = checkpoints.verify(doc, key, label=label)
    except checkpoints.CheckpointError as exc:
        raise click.ClickException(f"the server's checkpoint: {exc.message}") from None
    if out is None:
        click.echo(json.dumps(doc, indent=2))
        return
    try:
        with open(out, "w" if force else "x") as fh:
            fh.write(json.dumps(doc, indent=2) + "\n")
    except FileExistsError:
        raise click.ClickException(f"{out} exists (keep old checkpoints; --force overwrites)") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
    if as_json:
        emit(_cp_doc(cp, file=str(out)), True)
    else:
        click.echo(f"checkpoint saved to {out}: {cp.size} records, head {cp.head[:16]}…, key {cp.kid}")


@audit.command("checkpoint-key")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Save the JWK here.")
@rest_options
def audit_checkpoint_key(client: ApiClient, as_json: bool, out: Path | None) -> None:
    """The public key that signs checkpoints (a JWK), to pin with --key.

    Fetching it from the server you audit is trust on first use: compare its kid with the
    server's keys/checkpoint.pub out of band.
    """
    jwk = client.call("GET", "/v1/audit/checkpoint-key")
    if out is not None:
        try:
            out.write_text(json.dumps(jwk) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
    emit(jwk, as_json)


def _verify_locally(client: ApiClient, files: tuple[Path, ...], key_file: Path | None) -> dict[str, Any]:
    key, label = _pinned(client, key_file)
    cps = [(path, _read_checkpoint(path, key, label)) for path in files]
    out: dict[str, Any] = {"key": "pinned" if key_file else "server",
                           "checkpoints": [_cp_doc(cp, file=str(path)) for path, cp in cps]}
    cursor = None
    try:
        walk = checkpoints.ChainWalk(cp for _, cp in cps)
        while True:
            page = client.call("GET", "/v1/audit/raw", params={"cursor": cursor, "limit": 5000})
            for item in page["items"]:
                walk.feed(str(item["id"]), item["rec"], item["h"])
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        walk.finish()
    except checkpoints.ChainBroken as exc:
        return {**exc.report, **out, "ok": False}
    except (KeyError, TypeError):
        raise click.ClickException("unexpected answer from GET /v1/audit/raw") from None
    return {"ok": True, "checked": walk.count, "head": walk.prev, **out}


@audit.command("verify")
@click.option("--checkpoint", "checkpoint_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A saved checkpoint (repeatable): verify locally that the log extends it.")
@_PIN
@rest_options
def audit_verify(client: ApiClient, as_json: bool, checkpoint_files: tuple[Path, ...], key_file: Path | None) -> None:
    """Check the hash chain; exit 1 with the first break if it does not hold.

    Without --checkpoint the server walks its own chain (and the checkpoints it kept).  That
    catches naive edits only: whoever can write to Redis can re-chain history.  With
    --checkpoint, this command fetches every record (GET /v1/audit/raw) and checks here, without
    trusting the server's verdict: the checkpoint's signature (its own key and --key, or the
    server's published key), the chain from genesis, and that record #size still hashes to the
    checkpoint's head — so nothing up to the checkpoint was edited, removed or re-chained.
    """
    if checkpoint_files:
        doc = _verify_locally(client, checkpoint_files, key_file)
        if as_json:
            emit(doc, True)
        elif doc["ok"]:
            covered = ", ".join(f"{c['file']} ({c['size']} records)" for c in doc["checkpoints"])
            click.echo(f"audit log ok: {doc['checked']} records chained from genesis; extends {covered}; "
                       f"signed by {doc['checkpoints'][0]['kid']} ({doc['key']} key)")
        if not doc["ok"]:
            raise click.ClickException(f"audit log does not extend the checkpoint: {doc['reason']} "
                                       f"(at {doc['break_at']}, after {doc['checked']} good records)")
        return
    doc = client.call("GET", "/v1/audit/verify")
    if as_json:
        emit(doc, True)
    elif doc["ok"]:
        click.echo(f"audit chain ok: {doc['checked']} records")
    if not doc["ok"]:
        raise click.ClickException(f"audit chain broken at {doc['break_at']}: {doc['reason']} "
                                   f"(after {doc['checked']} good records)")


# --- air-gapped activation ---------------------------------------------------------------------
@click.command("activate-offline")
@click.argument("request_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Write the response file here (carry it to the site: layerlock-verifier import FILE).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@rest_options
def activate_offline(client: ApiClient, as_json: bool, request_file: Path, out: Path, force: bool) -> None:
    """Answer an air-gapped site's activation request (from `layerlock-verifier request`).

    The server makes the same decision and the same sealed, signed token as for an online
    activation, audited with your key as actor; the request's nonce is burnt, so each request
    file is answered once.  Renewal is the same exchange with a new request.
    """
    try:
        doc = json.loads(request_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise click.ClickException(f"cannot read {request_file}: {exc}") from None
    answer = client.call("POST", "/v1/activate/offline", doc)
    try:
        # 0600 from the first byte: the token is sealed to the site's machine, still only its business
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
        with os.fdopen(os.open(out, flags, 0o600), "w") as fh:
            os.fchmod(fh.fileno(), 0o600)  # (--force over an older, wider file)
            fh.write(json.dumps(answer, indent=2) + "\n")
    except FileExistsError:
        raise click.ClickException(f"{out} exists (--force overwrites)") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
    if as_json:
        emit({k: v for k, v in answer.items() if k != "token"} | {"file": str(out)}, True)
    else:
        click.echo(f"wrote {out}: license {answer['license_id']} for {answer['machine']} / {answer['model']}, "
                   f"token expires {_when(answer['expires_at'])}; on the site: layerlock-verifier import {out.name}")


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


# --- webhooks ----------------------------------------------------------------------------------
@click.group()
def webhooks() -> None:
    """Signed event deliveries to your endpoints (admin).

    Deliveries are JSON POSTs signed with HMAC-SHA256 (header Layerlock-Signature: t=…,v1=…, over
    "<t>." + body), retried with exponential back-off for 26 h, logged (`webhooks deliveries`)
    and replayable.  See layerlock.license_server.webhooks for the verification snippet.
    """


@webhooks.command("create")
@click.argument("url")
@click.option("--event", "event_types", multiple=True,
              help="Event type to send (repeatable; default: all). One of: " + ", ".join(events.TYPES))
@click.option("--description", default="")
@rest_options
def webhooks_create(client: ApiClient, as_json: bool, url: str, event_types: tuple[str, ...],
                    description: str) -> None:
    """Register an https endpoint (http only for loopback); prints its signing secret once."""
    body: dict[str, Any] = {"url": url, "description": description}
    if event_types:
        body["events"] = list(event_types)
    doc = client.call("POST", "/v1/webhooks", body)
    if as_json:
        emit(doc, True)
        return
    click.echo(f"created {doc['webhook_id']} → {doc['url']} ({', '.join(doc['events'])}); signing secret "
               "(shown once, store it with the receiver):")
    click.echo(doc["secret"])


@webhooks.command("list")
@rest_options
def webhooks_list(client: ApiClient, as_json: bool) -> None:
    """List endpoints (never their secrets)."""
    emit(list(client.walk("/v1/webhooks", {}, None)), as_json, WEBHOOK_COLS)


@webhooks.command("disable")
@click.argument("webhook_id")
@rest_options
def webhooks_disable(client: ApiClient, as_json: bool, webhook_id: str) -> None:
    """Stop sending to an endpoint; its pending deliveries are cancelled."""
    emit(client.call("POST", f"/v1/webhooks/{webhook_id}/disable"), as_json)


def _walk_log(client: ApiClient, params: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    """Follow the delivery log's cursors (they are log ids, not ranks)."""
    out: list[dict[str, Any]] = []
    cursor = None
    while limit is None or len(out) < limit:
        page = client.call("GET", "/v1/webhooks/deliveries", params={
            **params, "cursor": cursor, "limit": 500 if limit is None else min(500, limit - len(out))})
        out += page["items"]
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    return out


@webhooks.command("deliveries")
@click.option("--webhook")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed", "cancelled"]))
@click.option("--type", "type_", help="Event type.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help=_LIMIT_HELP)
@rest_options
def webhooks_deliveries(client: ApiClient, as_json: bool, webhook: str | None, status: str | None,
                        type_: str | None, limit: int) -> None:
    """The delivery log, newest first."""
    emit(_walk_log(client, {"webhook": webhook, "status": status, "type": type_}, limit), as_json, DELIVERY_COLS)


@webhooks.command("replay")
@click.argument("delivery_id")
@rest_options
def webhooks_replay(client: ApiClient, as_json: bool, delivery_id: str) -> None:
    """Send a delivery again now (same event id, so receivers can drop it if they had it)."""
    emit(client.call("POST", f"/v1/webhooks/deliveries/{delivery_id}/replay"), as_json)


@webhooks.command("run")
def webhooks_run() -> None:
    """Run the background worker: webhook deliveries and lease culling (until SIGTERM).

    `layerlock serve` starts one itself (LAYERLOCK_BACKGROUND=false turns that off); run it by
    hand only if you turned it off.  It reads the server's settings (LAYERLOCK_REDIS_URL,
    LAYERLOCK_DATA_DIR for the KEK that opens webhook secrets).
    """
    from layerlock.license_server.webhooks import main

    main()
