"""The claim flow with the real CLIs, as the README documents it: ops register the bare machine
code with ``--claim``, the host enrolls with the secret, the sidecar activates and serves.  An
outsider's enrollment with the same machine code and a wrong or spent claim gets nothing."""

from __future__ import annotations

import hashlib
import json

from e2e_helpers import (
    MODEL_ID,
    Sidecar,
    cleanup,
    cli,
    make_model,
    ops,
    public_dir,
    run_client,
    write_config,
)

from layerlock.shared.keys import b64u_decode, x25519_public
from layerlock.shared.lockfile import protect
from layerlock.shared.machine import machine_code
from layerlock.shared.wrap import seal_for_server


def test_bare_code_plus_claim_flow_with_the_real_clis(license_server, tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    original = root / "mlp.safetensors"
    make_model(original)
    result = protect(original, root / "protected", model_id=MODEL_ID)
    intake = x25519_public(b64u_decode(license_server.intake_pub))
    assert license_server.api("POST", "/v1/models", {
        "model_id": MODEL_ID, "sealed_key": seal_for_server(result.data_key, intake, MODEL_ID)}).status_code == 201
    mid = root / "machine-id"
    mid.write_text("feedface" * 4 + "\n")
    code = machine_code(machine_id_path=str(mid))
    # ops: the bare machine code from a ticket, with a claim
    added = json.loads(ops(license_server, "machines", "add", code, "--customer", "acme", "--claim", "--json").stdout)
    assert added["machine"] == code and added["enrolled"] is False and added["claim"].startswith("llc_")
    text = ops(license_server, "machines", "claim", code).stdout  # a fresh one replaces it
    secret = text.split("shown once:\n", 1)[1].splitlines()[0]
    assert secret.startswith("llc_") and secret != added["claim"]
    # an outsider with the same machine code but his own keys and the superseded claim: refused
    intruder = root / "intruder"
    out = cli("enroll", "--state-dir", str(intruder), "--server", license_server.url, "--machine-id-file", str(mid),
              "--claim", added["claim"], check=False)
    assert out.returncode == 1 and "claim_superseded" in out.stderr
    assert "warning: a claim secret on the command line is visible" in out.stderr  # (ps, sudo's log)
    state = root / "state"
    # the host: enroll with the claim, pasted (here piped) in -- never on its command line
    out = cli("enroll", "--state-dir", str(state), "--server", license_server.url, "--machine-id-file", str(mid),
              "--claim", "-", "--json", stdin=secret + "\n")
    assert json.loads(out.stdout)["claimed"] is True and "warning" not in out.stderr
    assert license_server.api("GET", f"/v1/machines/{code}").json()["enrolled"] is True
    out = cli("enroll", "--state-dir", str(intruder), "--server", license_server.url, "--machine-id-file", str(mid),
              "--claim", secret, check=False)
    assert out.returncode == 1 and "claim_used" in out.stderr
    ops(license_server, "licenses", "issue", "--machine", code, "--model", MODEL_ID, "--days", "1")
    sock_dir = public_dir()
    config = write_config(root / "verifier.toml", server=license_server.url, state_dir=state, machine_id_file=mid,
                          socket_path=sock_dir / "verifier.sock", locked=result.locked_path, bundle=result.bundle_path)
    sidecar = Sidecar(config, root / "sidecar.log")
    try:
        sidecar.start()
        assert run_client(MODEL_ID, sock_dir / "verifier.sock")["sha256"] == hashlib.sha256(
            original.read_bytes()).hexdigest()
    finally:
        sidecar.stop()
        cleanup(sock_dir)


def test_enroll_claim_from_stdin_must_not_be_empty(tmp_path, license_server):
    out = cli("enroll", "--state-dir", str(tmp_path / "s"), "--server", license_server.url, "--claim", "-",
              check=False, stdin="\n")
    assert out.returncode == 1 and "--claim -: no claim secret was given" in out.stderr, out.stderr


def test_enroll_claim_needs_a_server(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    out = cli("enroll", "--state-dir", str(tmp_path / "s"), "--jwks-file", str(jwks), "--claim", "llc_x", check=False)
    assert out.returncode == 1 and "--claim needs --server" in out.stderr
