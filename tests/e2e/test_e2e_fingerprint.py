"""Per-license fingerprints end to end: the shipped digits model protected with the real CLI,
two machines with two licenses served by two real sidecars, each copy traced to its own license
(also after fine-tuning and pruning) with the real ``layerlock trace``, an unrelated model traced
to nobody -- and the customer with a patched sidecar, who holds everything and still cannot get
the original values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from e2e_helpers import MODEL_ID, Sidecar, cleanup, cli, ops, public_dir, write_config

from layerlock.demo.model import accuracy, load_data, train
from layerlock.shared.bundle import read_header
from layerlock.shared.fingerprint import to_float
from layerlock.verifier import client


def _protect(server, root: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    from safetensors.numpy import save_file

    x, y, _, _ = load_data(0)
    weights = train(x, y)
    original = root / "digits.safetensors"
    save_file(weights, str(original))
    out = ops(server, "protect", str(original), "--register", server.url, "--model-id", MODEL_ID, "--json",
              "--no-progress")
    res = json.loads(out.stdout)[0]
    assert res["fingerprint_positions"] >= 256
    return Path(res["locked"]), Path(res["bundle"]), weights


def _site(server, root: Path, name: str, locked: Path, bundle: Path) -> tuple[Sidecar, Path, str, str]:
    mid = root / f"{name}.machine-id"
    mid.write_text((name.encode().hex() * 16)[:32] + "\n")
    state = root / f"{name}-state"
    enrolled = json.loads(cli("enroll", "--state-dir", str(state), "--server", server.url,
                              "--machine-id-file", str(mid), "--json").stdout)
    assert server.api("POST", "/v1/machines", {"enrollment": enrolled["enrollment_code"]}).status_code == 201
    resp = server.api("POST", "/v1/licenses", {"machine": enrolled["machine"], "model": MODEL_ID, "days": 1})
    assert resp.status_code == 201, resp.text
    sock = public_dir() / "verifier.sock"
    config = write_config(root / f"{name}.toml", server=server.url, state_dir=state, machine_id_file=mid,
                          socket_path=sock, locked=locked, bundle=bundle)
    return Sidecar(config, root / f"{name}.log"), sock, resp.json()["license_id"], str(state)


def _trace(server, path: Path) -> tuple[int, dict]:
    out = ops(server, "trace", str(path), "--model", MODEL_ID, "--json", check=False)
    assert out.returncode in (0, 3), out.stderr
    return out.returncode, json.loads(out.stdout)


def _save(tensors: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_two_licenses_two_fingerprints_each_traced(license_server, tmp_path):
    import torch

    from layerlock.demo import digits_task

    locked, bundle, original = _protect(license_server, tmp_path)
    copies, lic_ids, sidecars = {}, {}, []
    try:
        for name in ("east", "west"):
            sidecar, sock, lic, _ = _site(license_server, tmp_path, name, locked, bundle)
            sidecars.append((sidecar, sock))
            sidecar.start()
            copies[name] = client.load_numpy(MODEL_ID, socket_path=sock, copy=True)
            lic_ids[name] = lic
    finally:
        for sidecar, sock in sidecars:
            sidecar.stop()
            cleanup(sock.parent)
    _, _, xt, yt = load_data(0)
    base = accuracy(original, xt, yt)
    hdr = read_header(bundle)
    positions = {hdr.tensors[i].name: np.asarray(idx) for i, idx in hdr.fingerprint}
    east, west = copies["east"], copies["west"]
    for name, idx in positions.items():
        a, b, o = east[name].ravel(), west[name].ravel(), original[name].ravel()
        assert np.all(a[idx] != o[idx]) and np.all(b[idx] != o[idx])  # no license gets an original value
        assert np.mean(a[idx] != b[idx]) > 0.4  # the two licenses' values differ
        rest = np.setdiff1d(np.arange(o.size), idx)
        np.testing.assert_array_equal(a[rest], o[rest])  # everything else is bit-exact
    for copy in (east, west):  # invisible in use: a few of the 450 test digits at most (README table)
        assert abs(accuracy(copy, xt, yt) - base) <= 3 / len(yt) + 1e-9

    for name in ("east", "west"):
        code, doc = _trace(license_server, _save(copies[name], tmp_path / f"{name}.safetensors"))
        assert code == 0 and doc["named"] == [lic_ids[name]], doc
        # fine-tuned by the customer with 10 % of the data (a gentle learning rate keeps accuracy)
        tuned = digits_task.train({k: torch.from_numpy(v) for k, v in copies[name].items()},
                                  digits_task.data(0.1, 1), 300, 1e-3, seed=1)
        tuned_np = {k: v.detach().numpy() for k, v in tuned.state_dict().items()}
        code, doc = _trace(license_server, _save(tuned_np, tmp_path / f"{name}-tuned.safetensors"))
        assert code == 0 and doc["named"] == [lic_ids[name]], doc
        pruned = {k: np.where(np.abs(v) < np.quantile(np.abs(v), 0.5), 0, v) for k, v in copies[name].items()}
        code, doc = _trace(license_server, _save(pruned, tmp_path / f"{name}-pruned.safetensors"))
        assert code == 0 and doc["named"] == [lic_ids[name]], doc
    # an independently trained model and the unfingerprinted original: nobody is named
    x, y, _, _ = load_data(0)
    for path in (_save(train(x, y, seed=5), tmp_path / "other.safetensors"), tmp_path / "digits.safetensors"):
        code, doc = _trace(license_server, path)
        assert code == 3 and doc["named"] == [], doc
        assert doc["ranking"] == []  # no score of an unnamed license is ever shown
    # every trace is in the audit trail, with who traced what and the outcome
    records = license_server.api("GET", "/v1/audit", params={"type": "model_traced"}).json()["items"]
    assert len(records) == 8 and {r["suspect"] for r in records} >= {"east.safetensors", "other.safetensors"}


def test_patched_sidecar_cannot_get_the_original_values(license_server, tmp_path):
    """The customer holds the locked file, the bundle, its token and its machine keys, and runs
    its own code instead of the sidecar: every value it can compute at a fingerprint position
    differs from the original, the copy it can build carries its fingerprint, and skipping the
    fingerprint leaves decoys that make the model useless."""
    from safetensors.numpy import load as load_st

    from layerlock.shared.restore import restore, write_fingerprint
    from layerlock.verifier.state import StateDir
    from layerlock.verifier.unlock import accept_token

    locked, bundle, original = _protect(license_server, tmp_path)
    sidecar, sock, lic, state = _site(license_server, tmp_path, "north", locked, bundle)
    try:
        sidecar.start()  # fetches and caches the token, as the customer's machine would
    finally:
        sidecar.stop()
        cleanup(sock.parent)
    sd = StateDir(Path(state))
    token = (Path(state) / "tokens" / f"{MODEL_ID}.jwt").read_text()
    machine = json.loads((Path(state) / "machine.json").read_text())["machine"]
    claims, unlock = accept_token(token, keys=sd.load_jwks(), kem=sd.load_keys().kem, machine_code=machine,
                                  model_id=MODEL_ID, issuer=claims_issuer(token), leeway=60)
    data_key, values = unlock[:32], unlock[32:]
    hdr = read_header(bundle)
    decrypted = restore(locked, bundle, data_key)  # the bundle's whole payload, decrypted
    from_bundle = load_st(decrypted)
    locked_file = load_st(locked.read_bytes())
    x, y, xt, yt = load_data(0)
    pos = 0
    for i, idx in hdr.fingerprint:
        t = hdr.tensors[i]
        idx = np.asarray(idx)
        o = original[t.name].ravel()[idx]
        token_vals = to_float(values[pos:pos + 4 * len(idx)], t.dtype)
        pos += 4 * len(idx)
        for seen in (from_bundle[t.name].ravel()[idx], locked_file[t.name].ravel()[idx], token_vals):
            assert not np.any(seen == o)  # not one original value at a fingerprint position
        assert np.all(np.abs(token_vals - o) > 0)
    # skipping the fingerprint (decoys stay): worthless
    assert accuracy(from_bundle, xt, yt) < 0.5
    # applying it: a good model -- that names its license
    import io

    buf = io.BytesIO(decrypted)
    buf.seek(0, 2)
    write_fingerprint(buf, 0, hdr, values)
    own = load_st(buf.getvalue())
    assert accuracy(own, xt, yt) > 0.95
    code, doc = _trace(license_server, _save(own, tmp_path / "own.safetensors"))
    assert code == 0 and doc["named"] == [lic]


def claims_issuer(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["iss"])
