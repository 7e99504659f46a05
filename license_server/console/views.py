"""The console's pages: server-rendered, each one a thin view over the store (reads) and the
REST layer's own functions (writes, through :mod:`.ops`)."""

from __future__ import annotations

import json
import logging
import time
from calendar import timegm
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

from flask import Blueprint, g, make_response, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers.response import Response  # what redirect() and make_response() give

from layerlock.license_server.api.common import client_ip
from layerlock.license_server.app import services
from layerlock.license_server.console import dashboard, ops, sessions
from layerlock.license_server.redis_conn import REDIS_DOWN
from layerlock.license_server.roles import Role
from layerlock.license_server.statuses import status_of
from layerlock.license_server.store import apikeys, licenses, machines, models, page, rejections
from layerlock.license_server.store.audit import STREAM, digest
from layerlock.shared.errors import Forbidden, InvalidInput, LayerlockError

log = logging.getLogger("layerlock")
F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static", static_url_path="/static")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PUBLIC = {"console.login", "console.static"}
PAGE = 50
#: Audit chains up to this long are verified on every dashboard load (~0.3 s); longer ones on demand.
VERIFY_INLINE_MAX = 20_000
#: Fixed sign-in page notices (never text from the query string).
NOTICES = {"expired": "Your session expired. Sign in again.", "signed_out": "You are signed out.",
           "revoked": "The API key of your session was revoked or removed. Sign in with another key."}
AUDIT_TYPES = ("activation", "license_issued", "license_extended", "license_revoked", "machine_registered",
               "machine_updated", "machine_deactivated", "machine_reactivated", "machine_enrolled",
               "claim_created", "claim_refused", "model_registered", "model_retired", "data_key_rewrapped",
               "apikey_created", "apikey_revoked", "signing_key_rotated", "kek_rotated")
#: Fields every audit row shows in its own columns; the rest are listed as details.
AUDIT_MAIN = {"id", "type", "ts", "actor", "prev", "machine", "license", "model", "outcome", "reason"}
#: Detail fields holding Unix seconds, shown as dates.
AUDIT_TIMES = {"expires_at", "not_before", "old_expires_at"}


# --- authentication, CSRF, headers --------------------------------------------------------------
@bp.before_request
def _authenticate() -> Response | None:
    if request.endpoint in PUBLIC:
        return None
    svc = services()
    svc.ensure_bootstrap()
    sid = request.cookies.get(sessions.COOKIE)
    sess, why = sessions.load(svc.redis, sid)
    if sess is None or sid is None:
        return _to_login("expired" if why == "expired" else None)
    key = svc.redis.hgetall(apikeys.key(sess.get("key_id", "")))
    if not key or key.get("status") != "active":
        sessions.destroy(svc.redis, sid)
        return _to_login("revoked")
    g.actor, g.role, g.key_name = key["id"], key.get("role", ""), key.get("name", "")
    g.sid, g.csrf = sid, sessions.csrf_token(sid)
    g.flash = sessions.pop_flash(svc.redis, sid, sess)
    if request.method == "POST":
        _check_form(g.csrf)
    return None


def _check_form(token: str) -> None:
    """A POST must come from a console page of this origin and carry the session's CSRF token."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("refused: this form was posted from another site; nothing was changed")
    if not sessions.same(request.form.get("csrf"), token):
        raise Forbidden("refused: the form's security token is missing or stale (reload the page and try "
                        "again); nothing was changed")


def _to_login(notice: str | None) -> Response:
    args = {}
    if notice:
        args["m"] = notice
    if request.method == "GET" and request.endpoint != "console.dashboard":
        args["next"] = request.full_path.rstrip("?")
    resp = redirect(url_for("console.login", **cast(dict[str, Any], args)), code=303)
    if notice in ("expired", "revoked"):
        _clear_cookie(resp)
    return resp


def _clear_cookie(resp: Response) -> None:
    resp.delete_cookie(sessions.COOKIE, path=sessions.COOKIE_PATH, secure=True, httponly=True, samesite="Strict")


@bp.after_request
def _headers(resp: Response) -> Response:
    h = resp.headers
    h["Content-Security-Policy"] = CSP
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    h["Referrer-Policy"] = "same-origin"
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), clipboard-write=(self)"
    if request.endpoint != "console.static":
        h["Cache-Control"] = "no-store"
    return resp


@bp.errorhandler(LayerlockError)
def _layerlock_error(err: LayerlockError) -> tuple[str, int]:
    return _error_page(status_of(err), str(err))


@bp.errorhandler(HTTPException)
def _http_error(err: HTTPException) -> tuple[str, int]:
    return _error_page(err.code or 500, err.description or err.name)


@bp.errorhandler(Exception)
def _other_error(err: Exception) -> tuple[str, int]:
    if isinstance(err, REDIS_DOWN):
        return _error_page(503, "The license database is unreachable; retry shortly.")
    log.exception("console error", extra={"fields": {"event": "error", "path": request.path}})
    return _error_page(500, "Internal error; the server log has the details.")


def _error_page(status: int, message: str) -> tuple[str, int]:
    return render_template("console/error.html", status=status, message=message), status


def page_role(name: str) -> Callable[[F], F]:
    """Only roles that may read this page (:data:`ops.PAGES`) get it; others a 403 page."""
    def deco(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not ops.may(name):
                raise Forbidden(f"role {g.role} may not open this page (needs {' or '.join(ops.PAGES[name])})")
            return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return deco


@bp.context_processor
def _globals() -> dict[str, Any]:
    return {"may": lambda action: bool(g.get("role")) and ops.may(action)}


@bp.app_template_filter("when")
def _when(ts: Any) -> str:
    try:
        t = float(ts)
    except (TypeError, ValueError):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "—"


@bp.app_template_filter("ago")
def _ago(ts: Any) -> str:
    try:
        d = time.time() - float(ts)
    except (TypeError, ValueError):
        return ""
    future = d < 0
    d = abs(d)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= size:
            n = f"{int(d // size)} {unit}"
            return f"in {n}" if future else f"{n} ago"
    return "in a moment" if future else "just now"


def _flash(kind: str, text: str) -> None:
    sessions.flash(services().redis, g.sid, kind, text)


def _back(endpoint: str, **args: Any) -> Response:
    """After a write: back to the page it came from (its filters kept), Post/Redirect/Get."""
    target = request.form.get("back", "")
    if not target.startswith("/console/") or target.startswith("//") or "\\" in target:
        target = url_for(endpoint, **args)
    return redirect(target, code=303)


def _write(action: str, done: str, endpoint: str, *, args: dict[str, str] | None = None,
           json: dict[str, Any] | None = None, confirm: dict[str, Any] | None = None) -> Response | str:
    """Run a write; on success flash ``done`` and go back; on a refusal flash its reason.

    ``confirm``: the write needs ``confirmed=yes`` (the JS confirm dialog adds it); without it
    the no-JS confirmation page is shown instead."""
    if confirm is not None and request.form.get("confirmed") != "yes":
        if not ops.may(action):
            raise Forbidden(f"role {g.role} may not do this (needs {' or '.join(ops.ACTIONS[action].roles)})")
        fields = {k: v for k, v in request.form.items() if k not in ("csrf", "confirmed")}
        return render_template("console/confirm.html", fields=fields, **confirm)
    try:
        ops.call(action, args=args, json=json)
    except Forbidden:
        raise
    except LayerlockError as err:
        _flash("error", str(err))
        return _back(endpoint)
    _flash("ok", done)
    return _back(endpoint)


def _form_int(name: str, *, lo: int = 1, hi: int = 36_500) -> int:
    raw = request.form.get(name, "").strip()
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise InvalidInput(f"{name} must be a whole number between {lo} and {hi}")
    return int(raw)


# --- sign in / out ------------------------------------------------------------------------------
@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | tuple[Response, int] | str:
    svc = services()
    notice = NOTICES.get(request.args.get("m", ""))
    nxt = request.values.get("next", "")
    if not nxt.startswith("/console/") or nxt.startswith("//") or "\\" in nxt:
        nxt = url_for("console.dashboard")
    if request.method == "GET":
        if sessions.load(svc.redis, request.cookies.get(sessions.COOKIE))[0] is not None:
            return redirect(nxt, code=303)
        return _login_page(notice=notice, nxt=nxt)
    if not sessions.same(request.form.get("csrf"), request.cookies.get(sessions.PRE_COOKIE)):
        return _login_page(error="The sign-in form expired or was not sent by this page. Try again.",
                           nxt=nxt, status=400)
    ip = client_ip()
    if int(svc.redis.get(rejections.failure_key(ip)) or 0) >= svc.config.rate_unauth_per_min:
        rejections.count_only("console_sign_in")
        return _login_page(error="Too many failed sign-ins from your address. Wait a minute.", nxt=nxt,
                           status=429)
    svc.ensure_bootstrap()
    secret = request.form.get("api_key", "").strip()
    rec = apikeys.authenticate(svc.redis, secret) if 0 < len(secret) <= 200 else None
    if rec is None:
        rejections.record(svc.redis, ip, "console_sign_in")
        return _login_page(error="Unknown or revoked API key.", nxt=nxt, status=401)
    sid = sessions.create(svc.redis, rec["id"])
    log.info("console sign-in", extra={"fields": {"event": "console_sign_in", "key_id": rec["id"],
                                                  "role": rec.get("role"), "remote": ip}})
    resp = redirect(nxt, code=303)
    resp.set_cookie(sessions.COOKIE, sid, path=sessions.COOKIE_PATH, secure=True, httponly=True,
                    samesite="Strict")
    resp.delete_cookie(sessions.PRE_COOKIE, path=sessions.COOKIE_PATH, secure=True, httponly=True,
                       samesite="Strict")
    return resp


def _login_page(*, notice: str | None = None, error: str | None = None, nxt: str = "",
                status: int = 200) -> tuple[Response, int]:
    token = sessions.new_token()
    resp = make_response(render_template("console/login.html", csrf=token, notice=notice, error=error, nxt=nxt))
    resp.set_cookie(sessions.PRE_COOKIE, token, max_age=sessions.SIGNIN_SECONDS, path=sessions.COOKIE_PATH,
                    secure=True, httponly=True, samesite="Strict")
    return resp, status


@bp.post("/logout")
def logout() -> Response:
    sessions.destroy(services().redis, g.sid)
    resp = redirect(url_for("console.login", m="signed_out"), code=303)
    _clear_cookie(resp)
    return resp


# --- dashboard ----------------------------------------------------------------------------------
@bp.get("/", endpoint="dashboard")
@page_role("dashboard")
def dashboard_page() -> str:
    svc = services()
    counts = dashboard.counts(svc.redis)
    ctx: dict[str, Any] = {"counts": counts}
    if ops.may("audit"):
        since = time.time() - dashboard.HOURS * 3600
        recs = ops.call("audit.list", query={"type": "activation", "since": f"{since:.3f}",
                                             "limit": "1000"})["items"]
        truncated = False
        cursor = recs[-1]["id"] if len(recs) == 1000 else None
        while cursor and len(recs) < dashboard.SCAN_MAX:
            more = ops.call("audit.list", query={"type": "activation", "since": f"{since:.3f}", "limit": "1000",
                                                 "cursor": cursor})
            recs += more["items"]
            cursor = more["items"][-1]["id"] if len(more["items"]) == 1000 else None
        truncated = cursor is not None
        chart = dashboard.activations(recs, truncated=truncated)
        rejected = ops.call("audit.rejections", query={"hours": str(dashboard.HOURS)})["totals"]
        size = svc.redis.xlen(STREAM)
        verdict = ops.call("audit.verify") if size <= VERIFY_INLINE_MAX else None
        cps = ops.call("audit.checkpoints")["items"]
        ctx.update(chart=chart, denied_bars=dashboard.bars(chart.denied_by_reason),
                   rejected_bars=dashboard.bars(rejected), chain_size=size, verdict=verdict,
                   checkpoint=cps[0] if cps else None, checkpoints=len(cps))
    return render_template("console/dashboard.html", **ctx)


# --- machines -----------------------------------------------------------------------------------
@bp.get("/machines")
@page_role("machines")
def machines_page() -> str:
    svc = services()
    q = request.args.get("q", "").strip()[:200]
    status = request.args.get("status", "")
    cursor = _cursor_arg()
    ql = q.lower()

    def keep(rec: dict[str, str]) -> bool:
        if status and rec.get("status", "active") != status:
            return False
        if not ql:
            return True
        return any(ql in rec.get(f, "").lower() for f in ("code", "customer", "labels"))

    recs, nxt = page(svc.redis, machines.ALL, machines.key, cursor, PAGE, keep)
    items = [machines.public_view(r) for r in recs]
    _add_license_stats(items)
    return render_template("console/machines.html", items=items, q=q, status=status, cursor=cursor, nxt=nxt,
                           query=_query(q=q, status=status))


def _add_license_stats(items: list[dict[str, Any]]) -> None:
    """Each machine's license count and last activation (newest ``last_activation`` of its
    licenses), through the per-pair license sets: a page × models lookups, pipelined."""
    r = services().redis
    model_ids = r.zrange(models.ALL, 0, 499)
    if not items or not model_ids:
        return
    with r.pipeline(transaction=False) as pipe:
        for m in items:
            for model_id in model_ids:
                pipe.smembers(licenses.pair_key(m["machine"], model_id))
        sets = pipe.execute()
    per_machine = [set().union(*sets[i * len(model_ids):(i + 1) * len(model_ids)]) for i in range(len(items))]
    with r.pipeline(transaction=False) as pipe:
        for ids in per_machine:
            for lid in ids:
                pipe.hmget(licenses.key(lid), ["last_activation", "status"])
        rows = iter(pipe.execute())
    for m, ids in zip(items, per_machine, strict=True):
        last = 0
        revoked = 0
        for _ in ids:
            la, st = next(rows)
            last = max(last, int(la or 0))
            revoked += st == "revoked"
        m["licenses"] = len(ids) - revoked
        m["last_activation"] = last or None


@bp.post("/machines/register")
def machine_register() -> Response | str:
    code, enrollment = request.form.get("machine", "").strip(), request.form.get("enrollment", "").strip()
    doc: dict[str, Any] = {"customer": request.form.get("customer", "").strip()}
    if enrollment:
        doc["enrollment"] = enrollment
    if code:
        doc["machine"] = code
    try:
        doc["labels"] = _labels(request.form.get("labels", ""))
    except InvalidInput as err:
        _flash("error", str(err))
        return _back("console.machines_page")
    return _write("machine.register", "Machine registered.", "console.machines_page", json=doc)


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.replace("\n", ",").split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise InvalidInput(f"labels are key=value pairs separated by commas (got {part!r})")
        out[k.strip()] = v.strip()
    return out


@bp.post("/machines/<code>/<op>")
def machine_status(code: str, op: str) -> Response | str:
    if op not in ("deactivate", "reactivate"):
        raise InvalidInput("unknown machine operation")
    confirm = {"title": "Deactivate machine?", "verb": "Deactivate",
               "lines": [("Machine", code),
                         ("Effect", "Every activation for it is refused until it is reactivated; tokens it "
                                    "already holds run out at their expiry.")]} if op == "deactivate" else None
    return _write(f"machine.{op}", f"Machine {code} {op}d.", "console.machines_page", args={"code": code},
                  confirm=confirm)


# --- licenses -----------------------------------------------------------------------------------
@bp.get("/licenses")
@page_role("licenses")
def licenses_page() -> str:
    svc = services()
    want = {k: request.args.get(k, "").strip()[:200] for k in ("machine", "model", "customer")}
    status = request.args.get("status", "")
    cursor = _cursor_arg()
    t = time.time()

    def keep(rec: dict[str, str]) -> bool:
        if any(v and v.lower() not in rec.get(k, "").lower() for k, v in want.items()):
            return False
        return not status or licenses.state(rec, t) == status

    recs, nxt = page(svc.redis, licenses.ALL, licenses.key, cursor, PAGE, keep)
    items = [licenses.public_view(r) | {"last_activation": int(r.get("last_activation", 0)) or None} for r in recs]
    active_models = [m for m in page(svc.redis, models.ALL, models.key, 0, 500,
                                     lambda r: r.get("status") == "active")[0]]
    machine_codes = [m["code"] for m in page(svc.redis, machines.ALL, machines.key, 0, 200,
                                             lambda r: r.get("status", "active") == "active")[0]]
    return render_template("console/licenses.html", items=items, want=want, status=status, cursor=cursor,
                           nxt=nxt, query=_query(status=status, **want), models=active_models,
                           machine_codes=machine_codes, now=t)


@bp.post("/licenses/issue")
def license_issue() -> Response | str:
    doc: dict[str, Any] = {"machine": request.form.get("machine", "").strip(),
                           "model": request.form.get("model", "").strip(),
                           "notes": request.form.get("notes", "").strip()}
    try:
        doc["days"] = _form_int("days")
    except InvalidInput as err:
        _flash("error", str(err))
        return _back("console.licenses_page")
    return _write("license.issue", f"License issued for {doc['machine']} to use {doc['model']}.",
                  "console.licenses_page", json=doc)


@bp.post("/licenses/<license_id>/extend")
def license_extend(license_id: str) -> Response | str:
    try:
        days = _form_int("days")
    except InvalidInput as err:
        _flash("error", str(err))
        return _back("console.licenses_page")
    return _write("license.extend", f"License {license_id} extended by {days} days.", "console.licenses_page",
                  args={"license_id": license_id}, json={"days": days})


@bp.post("/licenses/<license_id>/revoke")
def license_revoke(license_id: str) -> Response | str:
    reason = request.form.get("reason", "").strip()
    confirm = {"title": "Revoke license?", "verb": "Revoke license",
               "lines": [("License", license_id), ("Reason", reason or "(none given)"),
                         ("Effect", "The machine's next renewal is refused and it loses the model when its "
                                    "current token runs out. This cannot be undone.")]}
    return _write("license.revoke", f"License {license_id} revoked.", "console.licenses_page",
                  args={"license_id": license_id}, json={"reason": reason}, confirm=confirm)


# --- models -------------------------------------------------------------------------------------
@bp.get("/models")
@page_role("models")
def models_page() -> str:
    cursor = _cursor_arg()
    status = request.args.get("status", "")
    recs, nxt = page(services().redis, models.ALL, models.key, cursor, PAGE,
                     lambda r: not status or r.get("status") == status)
    return render_template("console/models.html", items=[models.public_view(r) for r in recs], cursor=cursor,
                           nxt=nxt, status=status, query=_query(status=status))


@bp.post("/models/<model_id>/retire")
def model_retire(model_id: str) -> Response | str:
    confirm = {"title": "Retire model?", "verb": "Retire model",
               "lines": [("Model", model_id),
                         ("Effect", "No new licenses can be issued for it and activations for it are refused. "
                                    "This cannot be undone.")]}
    return _write("model.retire", f"Model {model_id} retired.", "console.models_page", args={"model_id": model_id},
                  confirm=confirm)


# --- audit --------------------------------------------------------------------------------------
@bp.get("/audit")
@page_role("audit")
def audit_page() -> str:
    f = {k: request.args.get(k, "").strip()[:200] for k in ("type", "machine", "license", "since", "until")}
    query: dict[str, str] = {"limit": str(PAGE)}
    for k in ("type", "machine", "license"):
        if f[k]:
            query[k] = f[k]
    error = None
    try:
        for k in ("since", "until"):
            if f[k]:
                query[k] = str(_utc(f[k], k))
        if request.args.get("cursor"):
            query["cursor"] = request.args["cursor"][:50]
        doc = ops.call("audit.list", query=query)
    except InvalidInput as err:
        error, doc = str(err), {"items": [], "next_cursor": None}
    rows = []
    for rec in doc["items"]:
        body = {k: v for k, v in rec.items() if k != "id"}
        h = digest(json.dumps(body, sort_keys=True, separators=(",", ":")))
        extra = {k: (_when(v) if k in AUDIT_TIMES else v) for k, v in rec.items() if k not in AUDIT_MAIN}
        rows.append({"rec": rec, "h": h, "extra": extra})
    filtered = any(f[k] for k in ("type", "machine", "license", "since", "until"))
    for i, row in enumerate(rows):  # unfiltered, a record's prev is the hash of the next row down
        nxt_row = rows[i + 1] if i + 1 < len(rows) else None
        row["prev_here"] = bool(nxt_row and not filtered and nxt_row["h"] == row["rec"].get("prev"))
    return render_template("console/audit.html", rows=rows, f=f, types=AUDIT_TYPES, error=error,
                           nxt=doc["next_cursor"], filtered=filtered, cursor=request.args.get("cursor", ""),
                           query=_query(**{k: v for k, v in f.items()}))


def _utc(text: str, name: str) -> int:
    """``YYYY-MM-DDTHH:MM`` (a datetime-local input, read as UTC) or Unix seconds → Unix seconds."""
    if text.isascii() and text.isdigit():
        return int(text)
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return timegm(time.strptime(text, fmt))
        except ValueError:
            continue
    raise InvalidInput(f"{name} must be a date and time (YYYY-MM-DDTHH:MM, UTC)")


@bp.get("/audit/verify")
@page_role("audit")
def audit_verify() -> str:
    verdict = ops.call("audit.verify")
    cps = ops.call("audit.checkpoints")["items"]
    return render_template("console/verify.html", verdict=verdict, checkpoint=cps[0] if cps else None,
                           checkpoints=len(cps), chain_size=services().redis.xlen(STREAM))


@bp.post("/audit/checkpoint")
def audit_checkpoint() -> Response:
    doc = ops.call("audit.checkpoint")
    cp = doc["checkpoint"]
    _flash("ok", f"Signed checkpoint: {cp['size']} records, head {cp['head'][:16]}…")
    return _back("console.audit_verify")


# --- API keys -----------------------------------------------------------------------------------
@bp.get("/keys")
@page_role("keys")
def keys_page() -> str:
    return _keys_page()


def _keys_page(created: dict[str, Any] | None = None) -> str:
    cursor = _cursor_arg()
    recs, nxt = page(services().redis, apikeys.ALL, apikeys.key, cursor, PAGE, lambda r: True)
    return render_template("console/keys.html", items=[apikeys.public_view(r) for r in recs], cursor=cursor,
                           nxt=nxt, roles=[str(r) for r in Role], created=created, query="")


@bp.post("/keys/create")
def key_create() -> Response | str:
    doc = {"role": request.form.get("role", ""), "name": request.form.get("name", "").strip()}
    try:
        created = ops.call("key.create", json=doc)
    except Forbidden:
        raise
    except LayerlockError as err:
        _flash("error", str(err))
        return _back("console.keys_page")
    # The one time this key is shown: rendered in this response (never stored, never redirected to).
    return _keys_page(created=created)


@bp.post("/keys/<key_id>/revoke")
def key_revoke(key_id: str) -> Response | str:
    confirm = {"title": "Revoke API key?", "verb": "Revoke key",
               "lines": [("Key", key_id), ("Effect", "Every request and console session using it is refused "
                                                     "from now on. This cannot be undone.")]}
    return _write("key.revoke", f"API key {key_id} revoked.", "console.keys_page", args={"key_id": key_id},
                  confirm=confirm)


# --- helpers ------------------------------------------------------------------------------------
def _cursor_arg() -> int:
    raw = request.args.get("cursor", "0")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 16 else 0


def _query(**args: str) -> str:
    return urlencode({k: v for k, v in args.items() if v})
