"""Helpers for the license-server tests: real enrolled machines, sealed model keys, snapshots."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from layerlock.shared.activation import make_request
from layerlock.shared.enrollment import DeviceClass, Enrollment, make_code
from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.machine import MachineSources, derive_code
from layerlock.shared.wrap import seal_for_server


@dataclass
class Machine:
    code: str
    sk: ed25519.Ed25519PrivateKey
    kx: x25519.X25519PrivateKey
    pq: mlkem.MLKEM768PrivateKey | None
    device: DeviceClass = field(default_factory=DeviceClass)

    @property
    def enrollment(self) -> str:
        e = Enrollment(machine=self.code, sig_pub=self.sk.public_key().public_bytes_raw(),
                       kex_pub=self.kx.public_key().public_bytes_raw(),
                       pq_pub=self.pq.public_key().public_bytes_raw() if self.pq else None, device=self.device)
        return make_code(e, self.sk)

    def request(self, model: str, **kw: Any) -> dict[str, Any]:
        return make_request(self.code, model, self.sk, **kw).to_dict()


def new_machine(*, pq: bool = False, aes: bool = True, vendor: str = "TestVendor") -> Machine:
    code = derive_code(MachineSources(machine_id=os.urandom(16).hex()))
    return Machine(code=code, sk=ed25519.Ed25519PrivateKey.generate(), kx=x25519.X25519PrivateKey.generate(),
                   pq=mlkem.MLKEM768PrivateKey.generate() if pq else None,
                   device=DeviceClass(vendor=vendor, type="x86_64", os="Ubuntu 24.04", aes=aes))


def register(server: Any, m: Machine, *, enrolled: bool = True, customer: str = "acme",
             labels: dict[str, str] | None = None) -> requests.Response:
    body: dict[str, Any] = {"machine": m.code, "customer": customer, "labels": labels or {}}
    if enrolled:
        body["enrollment"] = m.enrollment
    resp = server.api("POST", "/v1/machines", body)
    assert resp.status_code == 201, resp.text
    return resp


def add_model(server: Any, model_id: str | None = None) -> tuple[str, bytes]:
    model_id = model_id or f"model-{os.urandom(4).hex()}"
    data_key = os.urandom(32)
    doc = seal_for_server(data_key, x25519_public(b64u_decode(server.intake_pub)), model_id)
    resp = server.api("POST", "/v1/models", {"model_id": model_id, "name": "Test", "version": "1", "sealed_key": doc})
    assert resp.status_code == 201, resp.text
    return model_id, data_key


def issue(server: Any, m: Machine, model_id: str, **kw: Any) -> dict[str, Any]:
    body = {"machine": m.code, "model": model_id, **({"days": 30} | kw)}
    if "expires_at" in kw:
        body.pop("days")
    resp = server.api("POST", "/v1/licenses", body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def activate(server: Any, m: Machine, model_id: str, **extra: Any) -> requests.Response:
    return requests.post(server.url + "/v1/activate", json={**m.request(model_id), **extra}, timeout=10)


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key's serialized value, except activation guards (nonces, rate counters) and the
    commits' short-lived idempotency keys."""
    out = {}
    for k in sorted(r.scan_iter(count=1000)):
        if k.startswith(("{ll}:nonce:", "{ll}:rl:", "{ll}:done:")):
            continue
        out[k] = r.dump(k)
    return out


def world(server: Any) -> tuple[Machine, str, bytes, dict[str, Any]]:
    """A registered, enrolled machine with a model and an active license."""
    m = new_machine()
    register(server, m)
    model_id, key = add_model(server)
    lic = issue(server, m, model_id)
    return m, model_id, key, lic
