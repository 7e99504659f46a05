"""End to end: real license server (gunicorn + Redis), the sidecar as a real process, clients as
separate processes.  Token lifetimes are a few seconds so renewal, revocation and offline
expiry all happen within the test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import time

import numpy as np
import pytest
from e2e_deploy import deploy
from e2e_helpers import MODEL_ID, Sidecar, cleanup, cli, predict, public_dir, run_client, wait_for, write_config

from layerlock.verifier import client, protocol
from layerlock.verifier.errors import SidecarRefused


def test_protect_register_license_serve_bit_exact(deployment):
    dep = deployment
    dep.sidecar.start()
    status = dep.sidecar.status()
    assert status["machine"] == dep.machine
    st = status["models"][0]
    assert st["state"] == "unlocked" and st["source"] == "server" and st["license"] == dep.license_id
    want_sha = hashlib.sha256(dep.original.read_bytes()).hexdigest()
    want_pred = predict(dep.tensors)
    for transfer in ("fd", "stream"):
        got = run_client(MODEL_ID, dep.socket, transfer)
        assert got["sha256"] == want_sha
        np.testing.assert_array_equal(np.array(got["pred"], dtype=np.float32), want_pred)
    # the locked file alone predicts garbage
    from safetensors.numpy import load_file
    assert not np.allclose(predict(load_file(str(dep.locked))), want_pred, atol=1e-3)
    # renewal happens (ttl 3 s → renew at ~2 s) and the model stays served
    assert wait_for(lambda: sum(e["event"] == "token_accepted" for e in dep.sidecar.events()) >= 3, timeout=10)
    assert run_client(MODEL_ID, dep.socket)["sha256"] == want_sha
    # nothing unlocked was written: the state dir holds keys, pins, the (sealed) token and the
    # MAC'd clock mark only (listed once the sidecar has stopped: a renewal's atomic write has a
    # temporary file for a moment)
    assert dep.sidecar.stop() == 0
    names = {p.relative_to(dep.state_dir).as_posix() for p in dep.state_dir.rglob("*")}
    assert names == {"machine.json", "sign.ed25519.pem", "kex.x25519.pem", "jwks.json", "tokens",
                     f"tokens/{MODEL_ID}.jwt", "clock.json"}
    log = dep.sidecar.log.read_text()
    token = (dep.state_dir / "tokens" / f"{MODEL_ID}.jwt").read_text()
    assert token.split(".")[1][:20] not in log  # never a token in a log line


def test_onnx_model_served_to_onnxruntime(license_server, tmp_path):
    from e2e_helpers import onnx_predict, run_onnx_client

    dep = deploy(license_server, tmp_path, onnx=True)
    try:
        dep.sidecar.start()
        assert dep.sidecar.model_state()["format"] == "onnx"
        want = onnx_predict(dep.original)
        np.testing.assert_array_equal(run_onnx_client(MODEL_ID, dep.socket), want)
        assert not np.allclose(onnx_predict(dep.locked), want, atol=1e-3)  # the locked file: garbage
    finally:
        dep.sidecar.stop()
        cleanup(dep.socket.parent)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the client under another uid")
def test_foreign_uid_refused_and_bad_frames_isolated(deployment):
    dep = deployment
    dep.sidecar.start()
    os.chmod(dep.socket, 0o666)  # past the file mode: only SO_PEERCRED decides now
    assert run_client(MODEL_ID, dep.socket, uid=65534) == {
        "refused": "peer_not_allowed", "message": "uid 65534 / gid 65534 is not on the sidecar's allow-list"}
    assert any(e["event"] == "peer_refused" and e["uid"] == 65534 and e.get("audit")
               for e in dep.sidecar.events())
    # garbage, oversized and truncated frames: those connections close, the sidecar serves on
    for payload in (b"\x00\x00\x00\x07garbage", struct.pack(">I", 1 << 30), struct.pack(">I", 40) + b'{"op":'):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(dep.socket))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        s.close()
    assert run_client(MODEL_ID, dep.socket)["sha256"] == hashlib.sha256(dep.original.read_bytes()).hexdigest()
    assert dep.sidecar.proc.poll() is None


def test_allow_list_excluding_root(license_server, tmp_path):
    dep = deploy(license_server, tmp_path, allowed_uids=[12345])
    try:
        dep.sidecar.start()
        assert run_client(MODEL_ID, dep.socket)["refused"] == "peer_not_allowed"
        assert cli("status", "--config", str(dep.config), check=False).returncode == 1
    finally:
        dep.sidecar.stop()
        cleanup(dep.socket.parent)


def test_revoke_drops_within_one_renewal(deployment):
    dep = deployment
    dep.sidecar.start()
    held = client.fetch(MODEL_ID, socket_path=dep.socket)  # a client mapping taken before the revoke
    assert bytes(held.buffer[:8]) == dep.original.read_bytes()[:8]
    resp = dep.server.api("POST", f"/v1/licenses/{dep.license_id}/revoke", {"reason": "test"})
    assert resp.status_code == 200, resp.text
    t0 = time.time()
    assert wait_for(lambda: dep.sidecar.model_state()["state"] == "refused", timeout=15)
    # judged by the sidecar's own log (not this test's polling through `status` subprocesses), by
    # order rather than by a stopwatch a loaded CI box can overrun: the first renewal that started
    # after the revoke dropped the model -- at most one renewal already in flight was still granted
    events = dep.sidecar.events()
    dropped = [e for e in events if e["event"] == "model_dropped" and e["reason"] == "revoked"]
    assert dropped, events[-5:]
    granted_after = [e for e in events if e["event"] == "token_accepted" and t0 <= e["ts"] < dropped[0]["ts"]]
    assert len(granted_after) <= 1, granted_after
    assert dropped[0]["ts"] - t0 < 10, dropped
    st = dep.sidecar.model_state()
    assert st["reason"] == "revoked"
    assert run_client(MODEL_ID, dep.socket)["refused"] == "revoked"
    with pytest.raises(SidecarRefused) as err:
        client.load_bytes(MODEL_ID, socket_path=dep.socket)
    assert err.value.code == "revoked"
    # the pages the client still maps were zeroed by the drop; the cached token is gone
    assert bytes(held.buffer) == bytes(held.size)
    held.close()
    assert not (dep.state_dir / "tokens" / f"{MODEL_ID}.jwt").exists()


def test_server_down_offline_grace_and_restart_from_cache(license_server, tmp_path):
    dep = deploy(license_server, tmp_path, token_ttl=6, offline_grace=15)  # 15 s: room for the restarts below
    try:
        dep.sidecar.start()
        want = hashlib.sha256(dep.original.read_bytes()).hexdigest()
        license_server.stop()
        # restart the sidecar while the server is down: it unlocks from the cached token
        dep.sidecar.stop()
        dep.sidecar = Sidecar(dep.config, dep.sidecar.log)
        dep.sidecar.start()
        st = dep.sidecar.model_state()
        assert st["state"] == "unlocked" and st["source"] == "cache", st
        exp = st["expires_at"]
        assert run_client(MODEL_ID, dep.socket)["sha256"] == want
        # keeps serving while the token is valid ...
        assert time.time() < exp
        assert client.load_bytes(MODEL_ID, socket_path=dep.socket)[:8] == dep.original.read_bytes()[:8]
        # ... and refuses once it expires
        assert wait_for(lambda: dep.sidecar.model_state()["state"] == "refused", timeout=exp - time.time() + 5)
        assert time.time() >= exp - 0.5
        assert run_client(MODEL_ID, dep.socket)["refused"] == "token_expired"
        assert dep.sidecar.model_state()["reason"] == "token_expired"
        # the server comes back: the sidecar heals on its own
        license_server.start()
        assert wait_for(lambda: dep.sidecar.model_state()["state"] == "unlocked", timeout=10)
        assert run_client(MODEL_ID, dep.socket)["sha256"] == want
    finally:
        dep.sidecar.stop()
        cleanup(dep.socket.parent)


def test_copied_files_and_token_unlock_nothing_elsewhere(deployment, tmp_path):
    dep = deployment
    dep.sidecar.start()
    dep.sidecar.stop()
    # a second host: same machine-id file (worst case), its own machine keys
    host2 = tmp_path / "host2"
    host2.mkdir()
    state2 = host2 / "state"
    cli("enroll", "--state-dir", str(state2), "--server", dep.server.url, "--machine-id-file",
        str(dep.machine_id_file), "--json")
    for f in (dep.locked, dep.bundle):
        shutil.copy(f, host2 / f.name)
    (state2 / "tokens").mkdir(mode=0o700)
    sock_dir = public_dir()
    try:
        # with the real server: it answers bad_signature (host2's key is not the enrolled one) — a
        # transient answer, since outsiders can provoke it — so the sidecar tries the copied token,
        # whose wk is sealed to the other host's key: refused (bad_wrap). Offline: the same.
        for server_url, denied in ((dep.server.url, "bad_signature"), ("http://127.0.0.1:9", None)):
            reason = "bad_wrap"
            # the copied token: a refused token is forgotten, so copy it each round
            shutil.copy(dep.state_dir / "tokens" / f"{MODEL_ID}.jwt", state2 / "tokens" / f"{MODEL_ID}.jwt")
            cfg = write_config(host2 / "verifier.toml", server=server_url, state_dir=state2,
                               machine_id_file=dep.machine_id_file, socket_path=sock_dir / "v.sock",
                               locked=host2 / dep.locked.name, bundle=host2 / dep.bundle.name)
            car = Sidecar(cfg, host2 / "sidecar.log")
            car.start()
            try:
                st = car.model_state()
                assert st["state"] != "unlocked" and st["reason"] == reason, st
                assert run_client(MODEL_ID, sock_dir / "v.sock")["refused"] == reason
                assert not any(e["event"] == "model_unlocked" for e in car.events())
                if denied:
                    assert {e["reason"] for e in car.events() if e["event"] == "activation_denied"} == {denied}
            finally:
                car.stop()
        # a well-formed token for this machine and model, wk sealed to host2's own key, but signed
        # by a key that was never pinned: refused through the cached-token path, nothing unlocked
        forged = _forged_token(state2, dep.machine)
        (state2 / "tokens" / f"{MODEL_ID}.jwt").write_text(forged)
        os.chmod(state2 / "tokens" / f"{MODEL_ID}.jwt", 0o600)  # (0644 would be refused outright)
        car = Sidecar(cfg, host2 / "sidecar2.log")
        car.start()
        try:
            st = car.model_state()
            assert st["state"] == "refused" and st["reason"] == "bad_token", st
            assert "not pinned" in st["message"]
            assert not any(e["event"] == "model_unlocked" for e in car.events())
        finally:
            car.stop()
    finally:
        cleanup(sock_dir)


def _forged_token(state_dir, machine: str) -> str:
    import uuid

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from layerlock.shared.keys import b64u_encode
    from layerlock.shared.tokens import AUDIENCE, LicenseClaims, sign_token
    from layerlock.shared.wrap import DEFAULT_SUITE, binding_info, seal
    from layerlock.verifier.state import StateDir

    kex = StateDir(state_dir).load_keys().kem.x25519.public_key()
    now = int(time.time())
    wk = seal(os.urandom(32), kex, DEFAULT_SUITE, binding_info("lic_forged", machine, MODEL_ID))
    claims = LicenseClaims(iss="layerlock", aud=AUDIENCE, sub=machine, lic="lic_forged", mdl=MODEL_ID, iat=now,
                           nbf=now, exp=now + 3600, jti=uuid.uuid4().hex, wk=b64u_encode(wk),
                           suite=DEFAULT_SUITE, rna=now + 2400)
    return sign_token(claims, ed25519.Ed25519PrivateKey.generate())


def test_bad_config_refuses_to_run(deployment):
    dep = deployment
    text = dep.config.read_text().replace("request_timeout = 2", 'request_timeout = "2"')
    dep.config.write_text("bogus = 1\n" + text)
    check = cli("check", str(dep.config), check=False)
    run = cli("run", "--config", str(dep.config), check=False)
    assert check.returncode == run.returncode == 1
    assert run.stderr == check.stderr
    assert f"{dep.config}: request_timeout: must be a number of seconds, got str" in run.stderr
    assert f"{dep.config}: bogus: unknown key" in run.stderr


def test_status_json_contract(deployment):
    dep = deployment
    dep.sidecar.start()
    out = json.loads(cli("status", "--config", str(dep.config), "--json").stdout)
    st = out["models"][0]
    assert out["running"] is True and out["machine"] == dep.machine
    assert set(st) >= {"model", "state", "expires_at", "renew_at", "source", "license", "format", "size"}
    assert st["renew_at"] <= st["expires_at"]
    frame_sock = socket.socket(socket.AF_UNIX)
    frame_sock.connect(str(dep.socket))
    protocol.send_frame(frame_sock, {"op": "list"})
    assert protocol.recv_frame(frame_sock)["models"][0]["state"] == "unlocked"
    frame_sock.close()


def test_signing_key_rotation_picked_up_without_reenroll(deployment):
    """`keys rotate-signing` on the server: the sidecar pins the endorsed new key at its next
    renewal and keeps serving past the old token's expiry, with no `enroll` re-run."""
    import jwt

    from layerlock.shared.tokens import parse_jwks

    dep = deployment
    dep.sidecar.start()
    token_file = dep.state_dir / "tokens" / f"{MODEL_ID}.jwt"
    old_kid = jwt.get_unverified_header(token_file.read_text())["kid"]
    assert set(parse_jwks(json.loads((dep.state_dir / "jwks.json").read_text()))) == {old_kid}
    resp = dep.server.api("POST", "/v1/keys/rotate-signing")
    assert resp.status_code == 200, resp.text
    new_kid = resp.json()["kid"]
    assert wait_for(lambda: jwt.get_unverified_header(token_file.read_text())["kid"] == new_kid, timeout=15)
    extended = [e for e in dep.sidecar.events() if e["event"] == "jwks_extended"]
    assert len(extended) == 1 and extended[0]["kids"] == [new_kid]
    assert set(parse_jwks(json.loads((dep.state_dir / "jwks.json").read_text()))) == {old_kid, new_kid}
    # past the expiry of every token accepted so far, so of every one signed by the old key
    last_exp = max(e["exp"] for e in dep.sidecar.events() if e["event"] == "token_accepted")
    time.sleep(max(0.0, last_exp + 1 - time.time()))
    st = dep.sidecar.model_state()
    assert st["state"] == "unlocked" and st["source"] == "server"
    assert run_client(MODEL_ID, dep.socket)["sha256"] == hashlib.sha256(dep.original.read_bytes()).hexdigest()
    assert jwt.get_unverified_header(token_file.read_text())["kid"] == new_kid
