"""REST-backed ops commands: keys, machines, models, licenses, audit.

Each talks to the API with an API key (``--server``/``LAYERLOCK_SERVER``, ``--api-key``/
``LAYERLOCK_API_KEY``), prints a table for people or ``--json`` for scripts, and exits 1 with a
one-line reason on failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from layerlock.license_server.cli.rest import Client, emit, rest_options

MACHINE_COLS = ["machine", "customer", "status", "enrolled", "labels"]
LICENSE_COLS = ["license_id", "machine", "model", "customer", "status", "expires_at"]
AUDIT_COLS = ["id", "type", "outcome", "reason", "machine", "model", "license", "actor"]


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        out[k] = v
    return out


# --- keys --------------------------------------------------------------------------------------
@click.group()
def keys() -> None:
    """API keys and server key rotation (admin)."""


@keys.command("create")
@click.option("--role", type=click.Choice(["admin", "operator", "auditor"]), required=True)
@click.option("--name", default="", help="What the key is for.")
@rest_options
def keys_create(client: Client, as_json: bool, role: str, name: str) -> None:
    """Create an API key; the key is printed once."""
    doc = client.call("POST", "/v1/keys", {"role": role, "name": name})
    if as_json:
        emit(doc, True)
    else:
        click.echo(f"created {doc['id']} ({role}); API key (shown once):")
        click.echo(doc["api_key"])


@keys.command("list")
@rest_options
def keys_list(client: Client, as_json: bool) -> None:
    """List API keys (ids, roles, names; never the keys)."""
    emit(list(client.walk("/v1/keys", {}, None)), as_json, ["id", "role", "status", "name", "created_at"])


@keys.command("revoke")
@click.argument("key_id")
@rest_options
def keys_revoke(client: Client, as_json: bool, key_id: str) -> None:
    """Revoke an API key at once; requests made with it get 401."""
    emit(client.call("POST", f"/v1/keys/{key_id}/revoke"), as_json)


@keys.command("rotate-signing")
@rest_options
def keys_rotate_signing(client: Client, as_json: bool) -> None:
    """New token signing key; retired keys stay in the JWKS until their last token expires."""
    emit(client.call("POST", "/v1/keys/rotate-signing"), as_json)


@keys.command("rotate-kek")
@rest_options
def keys_rotate_kek(client: Client, as_json: bool) -> None:
    """New key-encryption key; re-wraps every stored data key (models stay as they are)."""
    emit(client.call("POST", "/v1/keys/rotate-kek"), as_json)


# --- machines ----------------------------------------------------------------------------------
@click.group()
def machines() -> None:
    """Register and manage customer machines."""


@machines.command("add")
@click.argument("code")
@click.option("--customer", default="")
@click.option("--label", "label_pairs", multiple=True, help="key=value (repeatable).")
@rest_options
def machines_add(client: Client, as_json: bool, code: str, customer: str, label_pairs: tuple[str, ...]) -> None:
    """Register a machine. CODE is a machine code (LLK-…) or the enrollment code (LLE1.…) the verifier printed."""
    body: dict[str, Any] = {"customer": customer, "labels": _labels(label_pairs)}
    body["enrollment" if code.startswith("LLE1.") else "machine"] = code
    emit(client.call("POST", "/v1/machines", body), as_json)


@machines.command("list")
@click.option("--customer")
@click.option("--status", type=click.Choice(["active", "inactive"]))
@click.option("--label", help="key or key=value")
@click.option("--limit", type=int, default=None)
@rest_options
def machines_list(client: Client, as_json: bool, customer: str | None, status: str | None, label: str | None,
                  limit: int | None) -> None:
    """List registered machines, filtered by customer, status or label."""
    items = list(client.walk("/v1/machines", {"customer": customer, "status": status, "label": label}, limit))
    emit(items, as_json, MACHINE_COLS)


@machines.command("show")
@click.argument("code")
@rest_options
def machines_show(client: Client, as_json: bool, code: str) -> None:
    """Show one machine: customer, labels, device class, status."""
    emit(client.call("GET", f"/v1/machines/{code}"), as_json)


@machines.command("label")
@click.argument("code")
@click.option("--label", "label_pairs", multiple=True, required=True, help="key=value; replaces all labels.")
@rest_options
def machines_label(client: Client, as_json: bool, code: str, label_pairs: tuple[str, ...]) -> None:
    """Set labels (KEY=VALUE) on a machine."""
    emit(client.call("PATCH", f"/v1/machines/{code}", {"labels": _labels(label_pairs)}), as_json)


@machines.command("deactivate")
@click.argument("code")
@rest_options
def machines_deactivate(client: Client, as_json: bool, code: str) -> None:
    """Deactivate a machine: its next activation or renewal is refused and its sidecar drops the models."""
    emit(client.call("POST", f"/v1/machines/{code}/deactivate"), as_json)


# --- models ------------------------------------------------------------------------------------
@click.group()
def models() -> None:
    """Register protected models (their sealed data keys)."""


@models.command("add")
@click.argument("sealed_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model-id", default=None, help="Default: the 'model' field of the sealed key document.")
@click.option("--name", default=None)
@click.option("--version", "version_", default="")
@rest_options
def models_add(client: Client, as_json: bool, sealed_key: Path, model_id: str | None, name: str | None,
               version_: str) -> None:
    """SEALED_KEY is the *.key.sealed document `layerlock protect` wrote."""
    try:
        doc = json.loads(sealed_key.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {sealed_key}: {exc}") from None
    mid = model_id or (doc.get("model") if isinstance(doc, dict) else None)
    if not mid:
        raise click.ClickException("the sealed key names no model; pass --model-id")
    body = {"model_id": mid, "name": name or mid, "version": version_, "sealed_key": doc}
    emit(client.call("POST", "/v1/models", body), as_json)


@models.command("list")
@rest_options
def models_list(client: Client, as_json: bool) -> None:
    """List registered models (never their data keys)."""
    emit(list(client.walk("/v1/models", {}, None)), as_json, ["model_id", "name", "version", "status", "kek_id"])


@models.command("retire")
@click.argument("model_id")
@rest_options
def models_retire(client: Client, as_json: bool, model_id: str) -> None:
    """Retire a model: no new licenses or activations for it."""
    emit(client.call("POST", f"/v1/models/{model_id}/retire"), as_json)


# --- licenses ----------------------------------------------------------------------------------
@click.group()
def licenses() -> None:
    """Issue, inspect, revoke and extend licenses."""


@licenses.command("issue")
@click.option("--machine", required=True)
@click.option("--model", required=True)
@click.option("--days", type=int)
@click.option("--expires-at", type=int, help="Unix seconds.")
@click.option("--not-before", type=int, help="Unix seconds.")
@click.option("--token-ttl", type=int, help="Seconds a token lives before renewal is due.")
@click.option("--offline-grace", type=int, help="Seconds a machine may stay offline.")
@click.option("--notes")
@rest_options
def licenses_issue(client: Client, as_json: bool, **opts: Any) -> None:
    """Issue a license for one machine and one model (--days or --expires-at)."""
    if opts["days"] is None and opts["expires_at"] is None:
        raise click.UsageError("give --days or --expires-at")
    body = {k: v for k, v in opts.items() if v is not None}
    emit(client.call("POST", "/v1/licenses", body), as_json)


@licenses.command("list")
@click.option("--machine")
@click.option("--model")
@click.option("--customer")
@click.option("--status", type=click.Choice(["active", "revoked", "expired", "pending"]))
@click.option("--limit", type=int, default=None)
@rest_options
def licenses_list(client: Client, as_json: bool, limit: int | None, **filters: Any) -> None:
    """List licenses, filtered by machine, model, customer or status."""
    emit(list(client.walk("/v1/licenses", filters, limit)), as_json, LICENSE_COLS)


@licenses.command("show")
@click.argument("license_id")
@rest_options
def licenses_show(client: Client, as_json: bool, license_id: str) -> None:
    """Show one license with its status and activation count."""
    emit(client.call("GET", f"/v1/licenses/{license_id}"), as_json)


@licenses.command("revoke")
@click.argument("license_id")
@click.option("--reason", default="")
@rest_options
def licenses_revoke(client: Client, as_json: bool, license_id: str, reason: str) -> None:
    """Revoke a license: its sidecar drops the model at its next renewal (within 2/3 of a token life)."""
    emit(client.call("POST", f"/v1/licenses/{license_id}/revoke", {"reason": reason}), as_json)


@licenses.command("extend")
@click.argument("license_id")
@click.option("--days", type=int)
@click.option("--expires-at", type=int)
@rest_options
def licenses_extend(client: Client, as_json: bool, license_id: str, days: int | None,
                    expires_at: int | None) -> None:
    """Extend a license's expiry (--days more, or a new --expires-at)."""
    body = {k: v for k, v in (("days", days), ("expires_at", expires_at)) if v is not None}
    emit(client.call("POST", f"/v1/licenses/{license_id}/extend", body), as_json)


# --- audit -------------------------------------------------------------------------------------
@click.group()
def audit() -> None:
    """Read and verify the hash-chained audit trail."""


def _audit_filters(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if v is not None}


_FILTERS = [click.option("--type", "type_"), click.option("--machine"), click.option("--license"),
            click.option("--model"), click.option("--since", type=float), click.option("--until", type=float)]


def _with_filters(fn: Any) -> Any:
    for opt in reversed(_FILTERS):
        fn = opt(fn)
    return fn


def _walk_audit(client: Client, filters: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    params = dict(filters)
    if "type_" in params:
        params["type"] = params.pop("type_")
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        doc = client.call("GET", "/v1/audit", params={**params, "cursor": cursor, "limit": 1000})
        out.extend(doc["items"])
        cursor = doc.get("next_cursor")
        if cursor is None or (limit is not None and len(out) >= limit):
            return out[:limit] if limit is not None else out


@audit.command("list")
@_with_filters
@click.option("--limit", type=int, default=50, show_default=True)
@rest_options
def audit_list(client: Client, as_json: bool, limit: int, **filters: Any) -> None:
    """Newest first."""
    emit(_walk_audit(client, _audit_filters(filters), limit), as_json, AUDIT_COLS)


@audit.command("export")
@_with_filters
@rest_options
def audit_export(client: Client, as_json: bool, **filters: Any) -> None:
    """Every matching record as JSON lines, oldest first (for archiving or a SIEM)."""
    for rec in reversed(_walk_audit(client, _audit_filters(filters), None)):
        click.echo(json.dumps(rec, sort_keys=True))


@audit.command("verify")
@rest_options
def audit_verify(client: Client, as_json: bool) -> None:
    """Walk the hash chain; exit 1 and name the first broken record if it does not hold."""
    doc = client.call("GET", "/v1/audit/verify")
    if as_json:
        emit(doc, True)
    elif doc["ok"]:
        click.echo(f"audit chain ok: {doc['checked']} records")
    if not doc["ok"]:
        raise click.ClickException(f"audit chain broken at {doc['break_at']}: {doc['reason']} "
                                   f"(after {doc['checked']} good records)")
