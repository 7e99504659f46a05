"""HTTP to the license server: fetch its JWKS, send signed activation requests.

Failures are sorted into the two kinds the daemon acts on differently: the server *answered no*
(:class:`~layerlock.shared.errors.ActivationDenied` with the documented reason) versus the server could
not be asked (:class:`~layerlock.shared.errors.Unavailable`: connection refused, timeout, 5xx/503, garbage).
Only the first can drop a model that is already serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from layerlock.shared.activation import make_request
from layerlock.shared.errors import ActivationDenied, Unavailable
from layerlock.verifier.state import MachineKeys


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
            raise Unavailable(f"license server {self.url} unreachable ({type(exc).__name__})") from None

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
        raise Unavailable(f"license server answered {resp.status_code} to the enrollment")

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
            raise Unavailable(f"license server answered {resp.status_code}")
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise ActivationDenied(doc["error"], str(doc.get("message", ""))[:300])
        raise Unavailable(f"license server answered {resp.status_code} without an error code")
