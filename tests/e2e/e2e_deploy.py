"""The e2e deployment: protect → register model → enroll → register machine → license → sidecar.

Kept out of conftest.py so tests can import it by a unique module name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from e2e_helpers import MODEL_ID, Sidecar, cli, make_model, make_onnx_model, public_dir, write_config

from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.lockfile import protect
from layerlock.shared.wrap import seal_for_server


@dataclass
class Deployment:
    server: Any  # tests/conftest.py LicenseServer
    root: Path
    original: Path
    tensors: dict[str, np.ndarray]
    locked: Path
    bundle: Path
    machine_id_file: Path
    state_dir: Path
    machine: str
    license_id: str
    socket: Path
    config: Path
    sidecar: Sidecar

    def issue(self, **terms: Any) -> str:
        resp = self.server.api("POST", "/v1/licenses", {"machine": self.machine, "model": MODEL_ID, **terms})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["license_id"])


def deploy(license_server, tmp_path: Path, *, token_ttl: int = 3, offline_grace: int = 10,
           allowed_uids: list[int] | None = None, onnx: bool = False) -> Deployment:
    """Renewals every 2 s (``token_ttl`` 3); 10 s of ``offline_grace`` so that one slow renewal on a
    loaded box does not let the token expire."""
    root = tmp_path / "site"
    root.mkdir()
    if onnx:
        original = root / "mlp.onnx"
        make_onnx_model(original)
        tensors: dict[str, np.ndarray] = {}
    else:
        original = root / "mlp.safetensors"
        tensors = make_model(original)
    result = protect(original, root / "protected", model_id=MODEL_ID)
    intake = x25519_public(b64u_decode(license_server.intake_pub))
    resp = license_server.api("POST", "/v1/models", {"model_id": MODEL_ID, "name": "mlp", "version": "1",
                                                     "sealed_key": seal_for_server(result.data_key, intake, MODEL_ID)})
    assert resp.status_code == 201, resp.text
    mid = root / "machine-id"
    mid.write_text("c0ffee00c0ffee00c0ffee00c0ffee00\n")
    state_dir = root / "state"
    enrolled = json.loads(cli("enroll", "--state-dir", str(state_dir), "--server", license_server.url,
                              "--machine-id-file", str(mid), "--json").stdout)
    resp = license_server.api("POST", "/v1/machines", {"enrollment": enrolled["enrollment_code"],
                                                       "customer": "acme"})
    assert resp.status_code == 201, resp.text
    sock_dir = public_dir()
    socket_path = sock_dir / "verifier.sock"
    extra = f"allowed_uids = {allowed_uids}" if allowed_uids is not None else ""
    config = write_config(root / "verifier.toml", server=license_server.url, state_dir=state_dir,
                          machine_id_file=mid, socket_path=socket_path, locked=result.locked_path,
                          bundle=result.bundle_path, extra=extra)
    dep = Deployment(license_server, root, original, tensors, result.locked_path, result.bundle_path, mid,
                     state_dir, enrolled["machine"], "", socket_path, config, Sidecar(config, root / "sidecar.log"))
    dep.license_id = dep.issue(days=1, token_ttl=token_ttl, offline_grace=offline_grace)
    return dep
