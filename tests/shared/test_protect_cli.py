"""``layerlock protect`` end to end through click, on real files (and a real local HTTP server)."""

from __future__ import annotations

import io
import json
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from layerlock.license_server.cli import main
from layerlock.shared.fingerprint import Secret
from layerlock.shared.keys import b64u_encode
from layerlock.shared.lockfile import read_header, restore
from layerlock.shared.restore import write_fingerprint
from layerlock.shared.wrap import open_fingerprint_from_vendor, open_from_vendor


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["protect", *args], env=env)


def test_json_output_and_raw_key_file_mode(small_model, tmp_path):
    key_file = tmp_path / "k.bin"
    r = run(str(small_model), "--data-key-out", str(key_file), "--json", "--model-id", "small-v1")
    assert r.exit_code == 0, r.output
    [item] = json.loads(r.stdout)
    assert item["status"] == "ok" and item["model_id"] == "small-v1" and item["format"] == "safetensors"
    assert 0 < item["fraction"] <= 1 and item["locked_tensors"] > 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    assert len(key) == 32 and key.hex() not in r.output
    assert restore(Path(item["locked"]), Path(item["bundle"]), key) == small_model.read_bytes()


def test_key_options_are_mutually_exclusive(small_model, tmp_path):
    r = run(str(small_model))
    assert r.exit_code == 2 and "exactly one of" in r.stderr
    r = run(str(small_model), "--data-key-out", str(tmp_path / "k"), "--intake-key", str(tmp_path / "i"))
    assert r.exit_code == 2 and "--intake-key, --data-key-out" in r.stderr
    r = run(str(small_model), "--register", "http://127.0.0.1:9", env={"LAYERLOCK_API_KEY": ""})
    assert r.exit_code == 2 and "api-key" in r.stderr
    assert not list(tmp_path.glob("*.llk"))


@pytest.mark.parametrize("args,message", [
    (["missing.safetensors"], "no such file"),
    (["model.bin"], "unknown model format"),
    (["small.safetensors", "--layers", "x:y"], "--layers must be START:COUNT"),
    (["small.safetensors", "--layers", "40:1"], "out of range"),
    (["small.safetensors", "--pattern", "nope*"], "matches no tensor"),
    (["small.safetensors", "--model-id", "bad id!"], "model id"),
])
def test_bad_input_is_one_line_error_exit_1(small_model, tmp_path, args, message):
    (tmp_path / "model.bin").write_bytes(b"x")
    args = [str(tmp_path / a) if i == 0 else a for i, a in enumerate(args)]
    r = run(*args, "--data-key-out", str(tmp_path / "k"))
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1
    assert "Traceback" not in r.output


class Custom:
    pass


def test_pickle_with_custom_class_refused(tmp_path):
    import torch
    src = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(3), "x": Custom()}, src)
    r = run(str(src), "--data-key-out", str(tmp_path / "k"))
    assert r.exit_code == 1 and "arbitrary code" in r.stderr
    assert not (tmp_path / "evil.llk").exists() and not (tmp_path / "k").exists()


def test_layers_and_patterns(small_model, tmp_path):
    r = run(str(small_model), "--layers", "1:1", "--pattern", "fc3.b*", "--data-key-out", str(tmp_path / "k"), "--json")
    assert r.exit_code == 0, r.output
    hdr = read_header(tmp_path / "small.llk")
    assert [t.name for t in hdr.tensors] == ["fc2.bias", "fc2.weight", "fc3.bias"]


def _intake():
    priv = x25519.X25519PrivateKey.generate()
    return priv, priv.public_key()


@pytest.mark.parametrize("form", ["b64", "pem"])
def test_intake_key_writes_sealed_document(small_model, tmp_path, form):
    priv, pub = _intake()
    intake = tmp_path / "intake.pub"
    if form == "b64":
        intake.write_text(b64u_encode(pub.public_bytes_raw()) + "\n")
    else:
        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        intake.write_bytes(pem)
    r = run(str(small_model), "--intake-key", str(intake), "--out-dir", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert "sealed in" in r.stdout and "model id:" in r.stdout
    doc = json.loads((tmp_path / "out" / "small.key.sealed").read_text())
    model_id = read_header(tmp_path / "out" / "small.llk").model_id
    key = open_from_vendor(doc, priv, model_id)
    bundle = tmp_path / "out" / "small.llk"
    restored = restore(tmp_path / "out" / "small.locked.safetensors", bundle, key)
    # fingerprinted (the default): the bundle holds decoys at the positions, the sealed
    # fingerprint secret the real values -- together, and only together, bit-exact
    secret = Secret.from_bytes(open_fingerprint_from_vendor(doc, priv, model_id))
    hdr = read_header(bundle)
    assert secret.n == sum(len(idx) for _, idx in hdr.fingerprint) > 0
    assert restored != small_model.read_bytes()
    out = io.BytesIO(restored)
    write_fingerprint(out, 0, hdr, b"".join(site.original for site in secret.sites))
    assert out.getvalue() == small_model.read_bytes()


def test_no_fingerprint_restores_bit_exact_from_the_key_alone(small_model, tmp_path):
    priv, pub = _intake()
    intake = tmp_path / "intake.pub"
    intake.write_text(b64u_encode(pub.public_bytes_raw()) + "\n")
    r = run(str(small_model), "--intake-key", str(intake), "--no-fingerprint", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["fingerprint_positions"] == 0, r.output
    doc = json.loads((tmp_path / "small.key.sealed").read_text())
    assert "fingerprint" not in doc
    model_id = read_header(tmp_path / "small.llk").model_id
    key = open_from_vendor(doc, priv, model_id)
    assert restore(tmp_path / "small.locked.safetensors", tmp_path / "small.llk", key) == small_model.read_bytes()


def test_bad_intake_key_file(small_model, tmp_path):
    (tmp_path / "intake.pub").write_text("not a key")
    r = run(str(small_model), "--intake-key", str(tmp_path / "intake.pub"))
    assert r.exit_code == 1 and r.stderr.startswith("error:")


class _Server:
    """A tiny stand-in license server: real HTTP on a local port, recording what it receives."""

    def __init__(self, pub: x25519.X25519PublicKey, status: int = 201) -> None:
        outer = self
        self.posts: list[tuple[str, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/intake-key":
                    self._reply(200, {"intake_pub": b64u_encode(pub.public_bytes_raw())})
                else:
                    self._reply(404, {"error": "not_found", "message": "no such route"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts.append((self.headers.get("Authorization"), body))
                if status >= 300:
                    self._reply(status, {"error": "conflict", "message": "model id already registered"})
                else:
                    self._reply(status, {"model_id": body["model_id"]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [201, 409])
def test_register(small_model, tmp_path, monkeypatch, status):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    priv, pub = _intake()
    server = _Server(pub, status)
    try:
        r = run(str(small_model), "--register", server.url, "--name", "Small", "--version", "2.1",
                env={"LAYERLOCK_API_KEY": "secret-api-key"})
    finally:
        server.close()
    [(auth, body)] = server.posts
    assert auth == "Bearer secret-api-key"
    assert body["name"] == "Small" and body["version"] == "2.1"
    key = open_from_vendor(body["sealed_key"], priv, body["model_id"])
    # the fingerprint secret travels sealed in the same upload; with it, bit-exact
    secret = Secret.from_bytes(open_fingerprint_from_vendor(body["sealed_key"], priv, body["model_id"]))
    out = io.BytesIO(restore(tmp_path / "small.locked.safetensors", tmp_path / "small.llk", key))
    write_fingerprint(out, 0, read_header(tmp_path / "small.llk"), b"".join(s.original for s in secret.sites))
    assert out.getvalue() == small_model.read_bytes()
    if status == 201:
        assert r.exit_code == 0, r.output
        assert "registered at" in r.stdout
    else:
        assert r.exit_code == 1
        assert "HTTP 409" in r.stderr and "model id already registered" in r.stderr


def test_directory_scan_summary_and_json(tmp_path, mlp):
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    stnp.save_file(mlp, root / "a.safetensors")
    stnp.save_file({k: v.astype(np.float16) for k, v in mlp.items()}, root / "sub" / "b.safetensors")
    (root / "broken.onnx").write_bytes(b"\xff\xff\xff")
    (root / "notes.txt").write_text("not a model")
    keys = tmp_path / "keys"
    r = run(str(root), "--data-key-out", str(keys), "--no-progress")
    assert r.exit_code == 1  # broken.onnx failed, the others were protected
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["file", "model"] and len(lines) == 4
    assert "broken.onnx" in r.stderr and "error" in r.stderr
    assert (root / "a.locked.safetensors").exists() and (root / "sub" / "b.llk").exists()
    assert len(list(keys.glob("*.key"))) == 2
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    # A second run skips what is already protected and never picks up *.locked.* outputs.
    (root / "broken.onnx").unlink()
    r = run(str(root), "--data-key-out", str(keys), "--json")
    assert r.exit_code == 0, r.output
    items = json.loads(r.stdout)
    assert sorted(i["status"] for i in items) == ["skipped", "skipped"]
    assert not any(".locked." in i["source"] for i in items)


def test_existing_bundle_needs_force(small_model, tmp_path):
    assert run(str(small_model), "--data-key-out", str(tmp_path / "k1")).exit_code == 0
    first = (tmp_path / "small.llk").read_bytes()
    r = run(str(small_model), "--data-key-out", str(tmp_path / "k2"))
    assert r.exit_code == 1 and "--force" in r.stderr
    assert (tmp_path / "small.llk").read_bytes() == first and not (tmp_path / "k2").exists()
    r = run(str(small_model), "--data-key-out", str(tmp_path / "k2"), "--force")
    assert r.exit_code == 0 and (tmp_path / "small.llk").read_bytes() != first


def test_unwritable_key_destination_leaves_no_outputs(small_model, tmp_path):
    r = run(str(small_model), "--data-key-out", str(tmp_path / "missing-dir" / "k"))
    assert r.exit_code == 1 and r.stderr.startswith("error:")
    assert not list(tmp_path.glob("small.*llk")) and not (tmp_path / "small.locked.safetensors").exists()


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_directory_without_models_is_one_line_error_exit_1(tmp_path, extra):
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("not a model")
    (root / "a.locked.safetensors").write_bytes(b"our own output, not an input")
    keys = tmp_path / "keys"
    r = run(str(root), "--data-key-out", str(keys), *extra)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: no model files") and r.stderr.count("\n") == 1 and str(root) in r.stderr
    assert r.stdout == "" and not keys.exists()


@pytest.mark.parametrize("value", ["0.1", "5", "strong"])
def test_fingerprint_strength_out_of_range_is_a_usage_error_and_writes_nothing(small_model, tmp_path, value):
    priv, pub = _intake()
    intake = tmp_path / "intake.pub"
    intake.write_text(b64u_encode(pub.public_bytes_raw()) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run(str(small_model), "--intake-key", str(intake), "--fingerprint-strength", value)
    assert r.exit_code == 2 and "--fingerprint-strength" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
