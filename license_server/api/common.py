"""Request helpers shared by the blueprints: strict JSON bodies, typed fields, auth, paging.

Strict because a rejected request must change nothing: every body is fully validated (unknown
fields refused, types checked) before any Redis write happens.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from functools import wraps
from itertools import accumulate
from typing import Any, TypeVar

from flask import g, request

from layerlock.license_server.app import services
from layerlock.license_server.store import apikeys
from layerlock.shared.errors import Forbidden, InvalidInput, PayloadTooLarge, Unauthorized
from layerlock.shared.machine import normalize_code

F = TypeVar("F", bound=Callable[..., Any])
#: Deepest JSON nesting a body may have (ours need 3); deeper is refused before ``json.loads``,
#: whose recursion a few thousand brackets (well under the size cap) would exhaust.
MAX_JSON_DEPTH = 32
#: A JSON string, or an unterminated one up to the end: it always matches where it starts, so
#: cutting strings out is linear (no retry from every later quote of an unterminated one).
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
#: A query-string integer: ASCII digits only (``str.isdigit`` also takes '²' and other scripts' digits).
_INT = re.compile(r"-?[0-9]{1,20}")


def body(allowed: Iterable[str], required: Iterable[str] = (), *, limit: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object with only ``allowed`` fields and all ``required`` ones.
    ``limit``: this route's body cap when it is not ``max_body_bytes`` (model registration)."""
    raw = _raw_body(limit)
    if not raw:
        doc: Any = {}
    else:
        try:
            text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads(bytes) does
            _check_depth(text)
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("request body is not valid JSON") from None
        except RecursionError:  # the pre-scan should have caught it; never a 500 all the same
            raise InvalidInput(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    unknown = set(doc) - set(allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = [f for f in required if f not in doc]
    if missing:
        raise InvalidInput(f"missing field(s): {', '.join(missing)}")
    return doc


def _check_depth(text: str) -> None:
    """Refuse JSON nested deeper than :data:`MAX_JSON_DEPTH`, counting brackets outside strings.

    Cheap: bodies with few brackets are not scanned at all; otherwise strings and then everything
    but brackets are cut out by regexes and the depth is a running sum, all in C (~3 ms for the
    worst 64 KiB).  Malformed text is left to ``json.loads``.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    if max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_JSON_DEPTH:
        raise InvalidInput(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")


def _raw_body(limit: int | None = None) -> bytes:
    """The body, capped at ``max_body_bytes`` (or ``limit``) — also for chunked uploads, which
    carry no length (gunicorn does not mark them ``wsgi.input_terminated``, so werkzeug alone
    would see none)."""
    if limit is None:
        limit = services().config.max_body_bytes
    else:
        request.max_content_length = limit  # werkzeug's own cap for this request
    if request.content_length is not None:
        if request.content_length > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        return request.get_data(cache=True)
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        data: bytes = request.environ["wsgi.input"].read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        return data
    return b""


def string(doc: dict[str, Any], name: str, default: str | None = None, *, max_len: int = 200) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidInput(f"{name} must be a string of at most {max_len} characters")
    return value


def integer(value: Any, name: str, *, lo: int = 0, hi: int = 2**53) -> int:
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidInput(f"{name} must be an integer between {lo} and {hi}")
    return value


def labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 50 or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64 and len(v) <= 256
            for k, v in value.items()):
        raise InvalidInput("labels must be an object of at most 50 string → string pairs")
    return value


def machine_code(text: Any) -> str:
    return normalize_code(text)


def page_args() -> tuple[int, int]:
    cursor = integer(request.args.get("cursor", "0"), "cursor")
    limit = integer(request.args.get("limit", "50"), "limit", lo=1, hi=1000)
    return cursor, limit


def client_ip() -> str:
    if services().config.trust_proxy and request.headers.get("X-Forwarded-For"):
        return request.headers["X-Forwarded-For"].split(",")[0].strip()
    return request.remote_addr or "unknown"


def now() -> int:
    return int(time.time())


def require(*roles: str) -> Callable[[F], F]:
    """``Authorization: Bearer <api key>``; no/unknown key → 401, wrong role → 403."""
    def deco(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            header = request.headers.get("Authorization", "")
            scheme, _, secret = header.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            svc = services()
            svc.ensure_bootstrap()
            rec = apikeys.authenticate(svc.redis, secret.strip())
            if rec is None:
                raise Unauthorized("unknown or revoked API key")
            if rec["role"] not in roles:
                raise Forbidden(f"role {rec['role']} may not do this (needs {' or '.join(roles)})")
            g.actor = rec["id"]
            g.role = rec["role"]
            return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return deco
