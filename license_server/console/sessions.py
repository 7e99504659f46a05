"""Console sessions: server-side, in Redis; the browser holds only a random session id.

Redis keeps ``{ll}:console:session:<sha256(id)>`` — a hash of {key_id, created, seen, flash}
— so whoever reads Redis learns no cookie that would let him in.  A session is bound to the API
key that signed in, never to a copy of the key: every request re-reads that key's record, so
revoking the key ends its console sessions at once and its role is always the current one.

Lifetimes: :data:`IDLE_SECONDS` since the last request (also the Redis TTL, so an abandoned
session disappears by itself) and at most :data:`MAX_SECONDS` since sign-in.

CSRF: each session has a token that every form carries (``csrf``) and every POST must match
(compared in constant time): an HMAC of the session id, so it is never stored (nor in Redis's AOF on
disk) and tells nothing about the id it is derived from.  The sign-in form, which has no session yet, uses a
double-submit token: a short-lived ``SameSite=Strict`` cookie that must equal the form field.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from layerlock.license_server.store import P

PREFIX = P + "console:session:"
COOKIE = "ll_console"
PRE_COOKIE = "ll_console_signin"
COOKIE_PATH = "/console"
#: Sign-out after this long without a request (also the Redis TTL of the session).
IDLE_SECONDS = 30 * 60
#: Sign-out this long after sign-in, however busy the session.
MAX_SECONDS = 12 * 3600
#: How long the sign-in form's double-submit token lives.
SIGNIN_SECONDS = 30 * 60


def _key(sid: str) -> str:
    return PREFIX + hashlib.sha256(sid.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two tokens; False if either is missing or empty."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def csrf_token(sid: str) -> str:
    """The session's CSRF token: derived, not stored (see the module docstring)."""
    return hmac.new(sid.encode(), b"layerlock console csrf v1", hashlib.sha256).hexdigest()


def create(r: Any, key_id: str) -> str:
    """A new session for ``key_id``; returns its id (the cookie value), never stored as such."""
    sid = new_token()
    now = str(int(time.time()))
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(_key(sid), mapping={"key_id": key_id, "created": now, "seen": now})
        pipe.expire(_key(sid), IDLE_SECONDS)
        pipe.execute()
    return sid


def load(r: Any, sid: str | None) -> tuple[dict[str, str] | None, str]:
    """The live session for cookie value ``sid`` (touched: idle timer restarted), or None and
    why not: ``"none"`` (no cookie, or unknown id) or ``"expired"`` (idle or too old)."""
    if not sid or len(sid) > 128:
        return None, "none"
    k = _key(sid)
    rec = r.hgetall(k)
    if not rec:
        return None, "none"
    now = time.time()
    if now - int(rec.get("seen", 0)) > IDLE_SECONDS or now - int(rec.get("created", 0)) > MAX_SECONDS:
        r.delete(k)
        return None, "expired"
    with r.pipeline(transaction=False) as pipe:
        pipe.hset(k, "seen", str(int(now)))
        pipe.expire(k, IDLE_SECONDS)
        pipe.execute()
    return rec, "ok"


def destroy(r: Any, sid: str | None) -> None:
    if sid and len(sid) <= 128:
        r.delete(_key(sid))


def flash(r: Any, sid: str, kind: str, text: str) -> None:
    """Queue a message for the next page this session renders (after a redirect)."""
    k = _key(sid)
    with r.pipeline(transaction=False) as pipe:
        pipe.hset(k, "flash", json.dumps({"kind": kind, "text": text}))
        pipe.expire(k, IDLE_SECONDS)
        pipe.execute()


def pop_flash(r: Any, sid: str, rec: dict[str, str]) -> dict[str, Any] | None:
    if "flash" not in rec:
        return None
    r.hdel(_key(sid), "flash")
    try:
        doc = json.loads(rec["flash"])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
