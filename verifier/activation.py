"""HTTP to the license server: fetch its JWKS, send signed activation requests.

Failures are sorted into the two kinds the daemon acts on differently: the server *answered no*
(:class:`~layerlock.shared.errors.ActivationDenied` with the documented reason) versus the server could
not be asked (:class:`~layerlock.shared.errors.Unavailable`: connection refused, timeout, 5xx/503, garbage).
Only the first can drop a model that is already serving.  A 5xx that says when to come back
(``Retry-After``: the server shedding load, Redis failing over, a write not yet replicated, or
nginx's own 502/503/504) is a :class:`~layerlock.shared.errors.RetryLater` carrying that delay and
the server's error code, which the daemon's back-off honours.
"""

from __future__ import annotations

import email.utils
import time
from pathlib import Path
from typing import Any

import requests

from layerlock.shared.activation import make_request
from layerlock.shared.errors import ActivationDenied, RetryLater, Unavailable
from layerlock.shared.urls import shown
from layerlock.verifier.state import MachineKeys

#: A server cannot make the sidecar wait longer than this through ``Retry-After`` (the daemon's
#: ``retry_max`` caps it further).
MAX_RETRY_AFTER = 86_400.0


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP-date, RFC 9110 10.2.3);
    None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), MAX_RETRY_AFTER)


def unavailable(resp: requests.Response, doc: Any, what: str) -> Unavailable:
    """The error for a 5xx answer: :class:`RetryLater` (with the server's code) when it said when."""
    code = doc.get("error") if isinstance(doc, dict) and isinstance(doc.get("error"), str) else None
    message = f"license server answered {resp.status_code}{f' {code}' if code else ''}{what}"
    wait = retry_after(resp.headers.get("Retry-After"))
    if wait is None:
        return Unavailable(message)
    return RetryLater(message, wait, code=code[:64] if code else None)


class ServerClient:
    def __init__(self, url: str, *, ca_bundle: Path | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.verify: str | bool = str(ca_bundle) if ca_bundle else True
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        try:
            return self.session.request(method, self.url + path, json=body, timeout=self.timeout,
                                        verify=self.verify)
        except requests.RequestException as exc:
            raise Unavailable(f"license server {shown(self.url)} unreachable ({type(exc).__name__})") from None

    def fetch_jwks(self) -> dict[str, Any]:
        resp = self._call("GET", "/.well-known/jwks.json")
        if resp.status_code != 200:
            raise Unavailable(f"license server answered {resp.status_code} for its JWKS")
        try:
            doc = resp.json()
        except ValueError:
            raise Unavailable("license server JWKS is not JSON") from None
        if not isinstance(doc, dict):
            raise Unavailable("license server JWKS is not a JSON object")
        return doc

    def enroll(self, enrollment_code: str, claim: str) -> dict[str, Any]:
        """Redeem a claim: bind this machine's keys (named in its self-signed enrollment code)."""
        resp = self._call("POST", "/v1/enroll", {"enrollment": enrollment_code, "claim": claim})
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code == 200 and isinstance(doc, dict):
            return doc
        if resp.status_code < 500 and isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise ActivationDenied(doc["error"], str(doc.get("message", ""))[:300])
        raise unavailable(resp, doc, " to the enrollment")

    def activate(self, machine: str, model_id: str, keys: MachineKeys) -> str:
        """A fresh token for ``model_id``; raise ActivationDenied or Unavailable."""
        body = make_request(machine, model_id, keys.sign).to_dict()
        resp = self._call("POST", "/v1/activate", body)
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code == 200 and isinstance(doc, dict) and isinstance(doc.get("token"), str):
            return str(doc["token"])
        if resp.status_code >= 500 or resp.status_code == 200:
            raise unavailable(resp, doc, "")
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise ActivationDenied(doc["error"], str(doc.get("message", ""))[:300])
        raise Unavailable(f"license server answered {resp.status_code} without an error code")
