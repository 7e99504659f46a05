"""The OpenAPI 3 document (``/openapi.json``) and a self-contained browsable page (``/docs``).

Generated from one compact table so it cannot drift far from the routes: a test compares the
table with the app's URL map.  The page has no CDN dependency (air-gapped installs): it fetches
``/openapi.json`` and renders each operation with its parameters and body schema.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from layerlock.license_server.roles import ADMINS, AUDITORS, READERS, WRITERS, Role, describe

ERROR = {"$ref": "#/components/schemas/Error"}
_S = {"type": "string"}
_I = {"type": "integer"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = list(required)
    return out


MACHINE_BODY = _obj({"machine": _S, "customer": _S, "enrollment": {**_S, "description": "LLE1.… code"},
                     "labels": {"type": "object", "additionalProperties": _S}})
LICENSE_BODY = _obj({"machine": {**_S, "description": "kind node: the one machine"},
                     "customer": {**_S, "description": "kinds seats/floating: whose machines share the seats"},
                     "model": {**_S, "description": "one model id (or give family)"},
                     "family": {**_S, "description": "a model family, with a versions rule"},
                     "versions": {"enum": ["all", "max", "maintain"]}, "max_version": _S,
                     "kind": {"enum": ["node", "seats", "floating"]}, "seats": _I,
                     "lease_ttl": {**_I, "description": "seconds a lease lasts without renewal (floating)"},
                     "revive_ttl": {**_I, "description": "seconds a lapsed lease's seat stays reserved"},
                     "airgap_ttl": {**_I, "description": "token life of air-gapped activations, seconds"},
                     "days": _I, "expires_at": _I, "not_before": _I,
                     "token_ttl": {**_I, "description": "seconds, <= offline_grace"},
                     "offline_grace": {**_I, "description": "seconds"}, "notes": _S})
ACTIVATE_BODY = _obj({"machine": _S, "model": _S, "ts": _I, "nonce": _S, "sig": _S},
                     ("machine", "model", "ts", "nonce", "sig"))
OFFLINE_BODY = _obj({"layerlock": {"enum": ["offline-request"]}, "v": {"enum": [1]}, "request": ACTIVATE_BODY},
                    ("layerlock", "v", "request"))
WEBHOOK_BODY = _obj({"url": {**_S, "description": "https:// (http:// only for a loopback host)"},
                     "events": {"type": "array", "items": _S, "description": "event types, or [\"*\"] (default)"},
                     "description": _S}, ("url",))
ENROLL_BODY = _obj({"enrollment": {**_S, "description": "LLE1.… code the host printed"},
                    "claim": {**_S, "description": "llc_… single-use claim secret ops created"}},
                   ("enrollment", "claim"))
LIST_Q = ["cursor", "limit"]

# (method, path, summary, roles or None for public, body schema, query params)
ROUTES: list[tuple[str, str, str, str | None, dict[str, Any] | None, list[str]]] = [
    ("get", "/healthz", "Process is up", None, None, []),
    ("get", "/readyz", "Redis reachable and keys loaded", None, None, []),
    ("get", "/metrics", "Prometheus metrics", None, None, []),
    ("get", "/.well-known/jwks.json", "Token signing keys (current and retired-but-valid)", None, None, []),
    ("get", "/v1/ping", "Trivial JSON endpoint (benchmark baseline)", None, None, []),
    ("post", "/v1/activate", "Verifier activation: signed request → license token", None, ACTIVATE_BODY, []),
    ("post", "/v1/activate/offline", "Air-gapped activation: a site's signed request file → its response file "
     "(the same token)", describe(WRITERS), OFFLINE_BODY, []),
    ("get", "/v1/intake-key", "X25519 key that `layerlock protect` seals data keys to", describe(WRITERS),
     None, []),
    ("post", "/v1/machines", "Register a machine (optionally with its enrollment code)", describe(WRITERS),
     MACHINE_BODY, []),
    ("get", "/v1/machines", "List machines", describe(READERS), None,
     [*LIST_Q, "customer", "status", "label"]),
    ("get", "/v1/machines/{code}", "Show a machine", describe(READERS), None, []),
    ("patch", "/v1/machines/{code}", "Update labels / customer", describe(WRITERS),
     _obj({"labels": {"type": "object"}, "customer": _S}), []),
    ("post", "/v1/machines/{code}/deactivate", "Deactivate a machine", describe(WRITERS), None, []),
    ("post", "/v1/machines/{code}/reactivate", "Reactivate a machine", describe(WRITERS), None, []),
    ("post", "/v1/machines/{code}/claims", "Create a single-use claim secret (shown once) for a machine registered "
     "by code", describe(WRITERS), _obj({"ttl": {**_I, "description": "seconds"}}), []),
    ("post", "/v1/enroll", "A host binds its keys: its enrollment code + the claim ops gave it", None, ENROLL_BODY,
     []),
    ("post", "/v1/models", "Register a model with its sealed data key", describe(WRITERS),
     _obj({"model_id": _S, "name": _S, "version": _S, "family": _S, "released_at": _I,
           "sealed_key": {"type": "object"}}, ("model_id", "sealed_key")), []),
    ("get", "/v1/models", "List models", describe(READERS), None, [*LIST_Q, "status"]),
    ("get", "/v1/models/{model_id}", "Show a model (never its key)", describe(READERS), None, []),
    ("post", "/v1/models/{model_id}/retire", "Retire a model", describe(WRITERS), None, []),
    ("get", "/v1/models/{model_id}/fingerprint", "A fingerprinted model's public fingerprint layout (positions, "
     "alignment descriptors; never the key or the real values): what `layerlock trace` extracts", describe(AUDITORS),
     None, []),
    ("post", "/v1/models/{model_id}/trace", "Rank licenses by how strongly a suspect carries their fingerprint; "
     "names those above a threshold with false accusation <= 1e-9 per trace (audited)", describe(AUDITORS),
     _obj({"suspect": {**_S, "description": "name of the file traced (1-256 characters)"},
           "sha256": {**_S, "description": "its SHA-256, 64 lowercase hex digits"},
           "values": {"type": "array", "minItems": 1, "maxItems": 2,
                      "items": {**_S, "description": "base64url of one little-endian float32 per position"}}},
          ("suspect", "values")), []),
    ("post", "/v1/licenses", "Issue a license", describe(WRITERS), LICENSE_BODY, []),
    ("get", "/v1/licenses", "List licenses", describe(READERS), None,
     [*LIST_Q, "machine", "model", "customer", "family", "kind", "status"]),
    ("get", "/v1/licenses/{license_id}", "Show a license (a pool license with its seat usage)", describe(READERS),
     None, []),
    ("get", "/v1/licenses/{license_id}/seats", "Who holds a pool license's seats, until when", describe(READERS),
     None, []),
    ("post", "/v1/licenses/{license_id}/seats/{code}/release", "Release a machine's seat now", describe(WRITERS),
     _obj({"reason": _S}), []),
    ("post", "/v1/licenses/{license_id}/revoke", "Revoke a license", describe(WRITERS),
     _obj({"reason": _S}), []),
    ("post", "/v1/licenses/{license_id}/extend", "Extend a license", describe(WRITERS),
     _obj({"days": _I, "expires_at": _I}), []),
    ("get", "/v1/audit/rejections", "Unauthenticated rejections per hour and reason (never audited one by one)",
     describe(AUDITORS), None, ["hours"]),
    ("get", "/v1/audit", "Audit records, newest first", describe(AUDITORS), None,
     ["cursor", "limit", "type", "machine", "license", "model", "outcome", "reason", "since", "until"]),
    ("get", "/v1/audit/verify", "Walk the hash chain and the stored checkpoints; report the first break",
     describe(AUDITORS), None, []),
    ("get", "/v1/audit/raw", "Audit records oldest first, exactly as stored (rec, h): verify locally",
     describe(AUDITORS), None, ["cursor", "limit"]),
    ("get", "/v1/audit/checkpoint", "A fresh signed checkpoint {size, head, ts, kid} of the chain",
     describe(AUDITORS), None, []),
    ("get", "/v1/audit/checkpoints", "Signed checkpoints the server kept, newest first", describe(AUDITORS),
     None, []),
    ("get", "/v1/audit/checkpoint-key", "Ed25519 JWK that signs audit checkpoints (pin it)", None, None, []),
    ("post", "/v1/keys", "Create an API key (shown once)", describe(ADMINS),
     _obj({"role": {"enum": [r.value for r in Role]}, "name": _S}, ("role",)), []),
    ("get", "/v1/keys", "List API keys (no secrets)", describe(ADMINS), None, LIST_Q),
    ("post", "/v1/keys/{key_id}/revoke", "Revoke an API key", describe(ADMINS), None, []),
    ("post", "/v1/keys/rotate-signing", "New signing key; old one stays in the JWKS", describe(ADMINS), None, []),
    ("post", "/v1/keys/rotate-kek", "New KEK; re-wrap stored data keys", describe(ADMINS), None, []),
    ("post", "/v1/webhooks", "Register a webhook endpoint (its signing secret is shown once)", describe(ADMINS),
     WEBHOOK_BODY, []),
    ("get", "/v1/webhooks", "List webhook endpoints (never their secrets)", describe(ADMINS), None, LIST_Q),
    ("get", "/v1/webhooks/{webhook_id}", "Show a webhook endpoint", describe(ADMINS), None, []),
    ("post", "/v1/webhooks/{webhook_id}/disable", "Disable a webhook endpoint", describe(ADMINS), None, []),
    ("get", "/v1/webhooks/deliveries", "The delivery log, newest first", describe(ADMINS), None,
     ["cursor", "limit", "webhook", "status", "type"]),
    ("get", "/v1/webhooks/deliveries/{delivery_id}", "One delivery, with its body", describe(ADMINS), None, []),
    ("post", "/v1/webhooks/deliveries/{delivery_id}/replay", "Send a delivery again (same event id)",
     describe(ADMINS), None, []),
]


#: Operations answering 201 Created (the rest answer 200).
CREATED = {("post", "/v1/machines"), ("post", "/v1/models"), ("post", "/v1/licenses"), ("post", "/v1/keys"),
           ("post", "/v1/machines/{code}/claims"), ("post", "/v1/webhooks")}
#: Non-JSON success bodies (Prometheus exposition format).
MEDIA = {"/metrics": "text/plain"}
#: Operations that never touch Redis (so never answer 503).
NO_REDIS = {"/healthz", "/v1/ping", "/metrics", "/.well-known/jwks.json"}
#: Error statuses beyond those :func:`_errors` derives from the route's shape.
EXTRA_ERRORS = {("post", "/v1/activate"): {401, 403, 429}, ("post", "/v1/enroll"): {401, 429},
                ("post", "/v1/licenses"): {404}, ("post", "/v1/activate/offline"): {429},
                ("get", "/v1/webhooks/deliveries"): {400}}


#: Operations whose answer depends on a Redis write being confirmed by replicas
#: (``redis_wait_replicas``): every write, and the checkpoint (it covers other clients' writes).
CONFIRMED = {("get", "/v1/audit/checkpoint")}
_503 = ("Service Unavailable, always with Retry-After (seconds). error `unavailable`: Redis unreachable "
        "(or failing over); `overloaded`: the request was shed unread, nothing was done")
_503_WRITE = (_503 + "; `not_replicated`: the change WAS applied on the Redis primary but no replica "
              "confirmed it in time (LAYERLOCK_REDIS_WAIT_REPLICAS), so it may or may not survive a failover: "
              "read it back before retrying a request that creates something (a retried issuance issues a "
              "second license; a retried registration or revocation answers 409)")


def _described(method: str, path: str, code: int) -> dict[str, Any]:
    if code != 503:
        return {"description": HTTPStatus(code).phrase, "content": {"application/json": {"schema": ERROR}}}
    write = method != "get" or (method, path) in CONFIRMED
    return {"description": _503_WRITE if write else _503,
            "headers": {"Retry-After": {"description": "seconds to wait before retrying",
                                        "schema": {"type": "integer", "minimum": 1}}},
            "content": {"application/json": {"schema": ERROR}}}


def _errors(method: str, path: str, roles: str | None, query: list[str]) -> set[int]:
    """The error statuses an operation can answer, each with an Error body."""
    codes = set(EXTRA_ERRORS.get((method, path), ()))
    if roles:
        codes |= {401, 403}  # checked first: before any parameter or body
    if query:
        codes.add(400)
    if "{" in path:
        codes |= {400, 404}  # a malformed id, an unknown one
    if query or "{" in path:
        codes.add(414)  # request line over gunicorn's limit_request_line (answered as JSON too)
    if method != "get":
        codes |= {400, 409, 413}  # every body is parsed strictly (even an expected-empty one); racing writes
    if path not in NO_REDIS:
        codes.add(503)  # Redis unreachable
    return codes


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary, roles, schema, query in ROUTES:
        media = MEDIA.get(path, "application/json")
        op: dict[str, Any] = {"summary": summary, "responses": {
            "201" if (method, path) in CREATED else "200": {
                "description": "Created" if (method, path) in CREATED else "OK",
                "content": {media: {"schema": _S} if media.startswith("text/") else {}}},
            **{str(c): _described(method, path, c) for c in sorted(_errors(method, path, roles, query))}}}
        if roles:
            op["security"] = [{"apiKey": []}]
            op["description"] = f"Roles: {roles}."
        else:
            op["security"] = []
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": _S}
                  for p in path.split("/") if p.startswith("{")]
        params += [{"name": q, "in": "query", "required": False, "schema": _S} for q in query]
        if params:
            op["parameters"] = params
        if schema:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "layerlock license server", "version": "1",
                 "description": "Ops API (API keys with roles admin/operator/auditor) and the verifier "
                                "activation endpoint. Errors are {\"error\": code, \"message\": text}."},
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _obj({"error": _S, "message": _S}, ("error", "message"))},
        },
    }


DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>layerlock API</title>
<style>body{font:14px system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
.op{border:1px solid #ccc;border-radius:6px;margin:.6em 0;padding:.4em .8em}
.m{font-weight:bold;text-transform:uppercase;display:inline-block;width:4.5em}
pre{background:#f6f6f6;padding:.5em;overflow:auto}</style></head>
<body><h1>layerlock license server API</h1><p>Machine-readable: <a href="openapi.json">/openapi.json</a></p>
<div id="ops">loading…</div>
<script>
fetch("openapi.json").then(r => r.json()).then(doc => {
  const root = document.getElementById("ops"); root.textContent = "";
  for (const [path, ops] of Object.entries(doc.paths)) for (const [m, op] of Object.entries(ops)) {
    const d = document.createElement("details"); d.className = "op";
    const s = document.createElement("summary");
    s.innerHTML = `<span class="m"></span><code></code> — <span></span>`;
    s.children[0].textContent = m; s.children[1].textContent = path; s.children[2].textContent = op.summary;
    d.appendChild(s);
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify({description: op.description, parameters: op.parameters,
                                      requestBody: op.requestBody}, null, 2);
    d.appendChild(pre); root.appendChild(d);
  }
});
</script></body></html>
"""
