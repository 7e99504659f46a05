"""`enroll`: keys with tight modes, pinned JWKS, one enrollment code the server can parse."""

from __future__ import annotations

import json
import os
import stat

from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.enrollment import parse_code
from layerlock.shared.machine import machine_code
from layerlock.shared.tokens import jwks
from layerlock.verifier.cli import main


def _enroll(tmp_path, *extra):
    jwks_file = tmp_path / "jwks.json"
    if not jwks_file.exists():
        jwks_file.write_text(json.dumps(jwks([ed25519.Ed25519PrivateKey.generate().public_key()])))
    mid = tmp_path / "machine-id"
    mid.write_text("00112233445566778899aabbccddeeff\n")
    return CliRunner().invoke(main, ["enroll", "--state-dir", str(tmp_path / "state"), "--jwks-file",
                                     str(jwks_file), "--machine-id-file", str(mid), *extra])


def test_enroll_json(tmp_path):
    result = _enroll(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    code = machine_code(machine_id_path=tmp_path / "machine-id")
    assert doc["machine"] == code
    enrollment = parse_code(doc["enrollment_code"])
    assert enrollment.machine == code and enrollment.pq_pub is None
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for f in state.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert {f.name for f in state.iterdir()} == {"sign.ed25519.pem", "kex.x25519.pem", "jwks.json", "machine.json"}


def test_enroll_is_idempotent_and_pq_adds_a_key(tmp_path):
    first = json.loads(_enroll(tmp_path, "--json").output)
    again = json.loads(_enroll(tmp_path, "--json").output)
    assert parse_code(first["enrollment_code"]).sig_pub == parse_code(again["enrollment_code"]).sig_pub
    pq = _enroll(tmp_path, "--json", "--pq")
    assert pq.exit_code == 0, pq.output
    enrollment = parse_code(json.loads(pq.output)["enrollment_code"])
    assert enrollment.pq_pub is not None and len((tmp_path / "state" / "kex.mlkem768.seed").read_bytes()) == 64


def test_enroll_human_output(tmp_path):
    result = _enroll(tmp_path)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("machine code: LLK-") and lines[-1].startswith("LLE1.")


def test_enroll_refuses_open_state_dir(tmp_path):
    (tmp_path / "state").mkdir(mode=0o755)
    os.chmod(tmp_path / "state", 0o755)
    result = _enroll(tmp_path)
    assert result.exit_code == 1 and "accessible by group or others" in result.output


def test_enroll_refuses_readable_key(tmp_path):
    assert _enroll(tmp_path).exit_code == 0
    os.chmod(tmp_path / "state" / "kex.x25519.pem", 0o644)
    result = _enroll(tmp_path)
    assert result.exit_code == 1 and "kex.x25519.pem is accessible" in result.output


def test_enroll_needs_a_source_of_server_keys(tmp_path):
    result = CliRunner().invoke(main, ["enroll", "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 1 and "--jwks-file" in result.output


def test_enroll_rejects_bad_jwks(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{"kty": "RSA"}]}))
    result = _enroll(tmp_path)
    assert result.exit_code == 1 and "not Ed25519" in result.output


def test_enroll_server_unreachable(tmp_path):
    result = CliRunner().invoke(main, ["enroll", "--state-dir", str(tmp_path / "s"), "--server",
                                       "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "unreachable" in result.output
