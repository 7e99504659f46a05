"""Helpers for the verifier's unit tests: an enrolled state dir and a fake license server.

``Machine`` is a real enrolled state directory (real keys on disk, real pinned JWKS) plus the
"server" signing key, so tests can mint exactly the tokens a license server would — or forge
the ones it never would.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.errors import ActivationDenied, Unavailable
from layerlock.shared.keys import b64u_encode
from layerlock.shared.machine import machine_code
from layerlock.shared.tokens import AUDIENCE, LicenseClaims, jwks, sign_token
from layerlock.shared.wrap import DEFAULT_SUITE, binding_info, public_for, seal
from layerlock.verifier.memory import SealedModel
from layerlock.verifier.state import StateDir


@dataclass
class Machine:
    state: StateDir
    machine_id_file: Path
    code: str
    server_key: ed25519.Ed25519PrivateKey
    data_keys: dict[str, bytes] = field(default_factory=dict)

    def token(self, model: str = "model-a", *, ttl: int = 60, machine: str | None = None,
              kex_pub=None, signer: ed25519.Ed25519PrivateKey | None = None, lic: str = "lic_1",
              binding_model: str | None = None, **over: object) -> str:
        now = int(time.time())
        machine = machine or self.code
        key = self.data_keys.setdefault(model, bytes(range(32)))
        pub = kex_pub or self.state.load_keys().kem.x25519.public_key()
        wk = seal(key, public_for(DEFAULT_SUITE, pub, None), DEFAULT_SUITE,
                  binding_info(lic, machine, binding_model or model))
        claims = dict(iss="layerlock", aud=AUDIENCE, sub=machine, lic=lic, mdl=model, iat=now, nbf=now,
                      exp=now + ttl, jti=uuid.uuid4().hex, wk=b64u_encode(wk), suite=DEFAULT_SUITE,
                      rna=now + (2 * ttl) // 3)
        claims.update(over)
        return sign_token(LicenseClaims(**claims), signer or self.server_key)


def enroll_machine(root: Path, name: str = "state", machine_id: str = "0123456789abcdef0123456789abcdef",
                   server_key: ed25519.Ed25519PrivateKey | None = None) -> Machine:
    root.mkdir(parents=True, exist_ok=True)
    mid = root / f"{name}.machine-id"
    mid.write_text(machine_id + "\n")
    server_key = server_key or ed25519.Ed25519PrivateKey.generate()
    state = StateDir(root / name)
    state.create()
    state.create_keys(pq=False)
    state.save_jwks(jwks([server_key.public_key()]))
    code = machine_code(machine_id_path=mid)
    state.save_machine({"machine": code, "machine_id_file": str(mid)})
    return Machine(state, mid, code, server_key)


class FakeServer:
    """Stands in for the license server in-process: a script of answers per call."""

    def __init__(self, machine: Machine, ttl: int = 60) -> None:
        self.machine = machine
        self.ttl = ttl
        self.mode = "ok"  # ok | down | <denial reason>
        self.calls = 0

    def activate(self, machine: str, model_id: str, keys) -> str:
        self.calls += 1
        if self.mode == "down":
            raise Unavailable("connection refused")
        if self.mode != "ok":
            raise ActivationDenied(self.mode, f"denied: {self.mode}")
        return self.machine.token(model_id, ttl=self.ttl)

    def fetch_jwks(self) -> dict:
        """A server that never rotated: the JWKS holds only the key the machine pinned."""
        return jwks([self.machine.server_key.public_key()])


def fake_restorer(model_id: str, locked: Path, bundle: Path, data_key: bytes) -> SealedModel:
    """Stands in for shared.lockfile: the 'model' is the data key repeated (checks it opened)."""
    return SealedModel(model_id, "safetensors", lambda fh: fh.write(io.BytesIO(data_key * 4).getvalue()))


DATA_KEY = bytes(range(32))


@dataclass
class Protected:
    model_id: str
    original: Path
    locked: Path
    bundle: Path


def make_model(path: Path, seed: int = 0, hidden: int = 16) -> dict:
    """A tiny 3-layer MLP in safetensors (enough layers for the default lock policy)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    dims = [8, hidden, hidden, 4]
    for i in range(3):
        tensors[f"layers.{i}.weight"] = rng.standard_normal((dims[i + 1], dims[i])).astype(np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal(dims[i + 1]).astype(np.float32)
    save_file(tensors, str(path))
    return tensors


def protect_model(root: Path, model_id: str = "model-a", data_key: bytes = DATA_KEY) -> Protected:
    from layerlock.shared.lockfile import protect

    root.mkdir(parents=True, exist_ok=True)
    src = root / f"{model_id}.safetensors"
    make_model(src)
    res = protect(src, root / "out", model_id=model_id, data_key=data_key)
    return Protected(model_id, src, res.locked_path, res.bundle_path)


def write_config(path: Path, machine: Machine, models: list[Protected], *, socket: Path | None = None,
                 server: str = "http://127.0.0.1:9", extra: str = "") -> Path:
    lines = [f'server_url = "{server}"', f'state_dir = "{machine.state.path}"',
             f'socket = "{socket or path.parent / "v.sock"}"', f'machine_id_file = "{machine.machine_id_file}"',
             "request_timeout = 2", "retry_min = 0.2", "retry_max = 1", extra]
    for m in models:
        lines += ["[[models]]", f'id = "{m.model_id}"', f'locked = "{m.locked}"', f'bundle = "{m.bundle}"']
    path.write_text("\n".join(lines) + "\n")
    return path
