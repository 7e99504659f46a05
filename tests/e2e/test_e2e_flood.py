"""Keyless lockout, end to end: an outsider who knows a machine code floods the real server with
unsigned and forged activations for it while the real sidecar renews and restarts.  The model
stays served; and a sidecar that does get a transient answer (rate_limited) unlocks from its
cached token instead of staying locked."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time

import requests
from e2e_deploy import deploy
from e2e_helpers import MODEL_ID, Sidecar, cleanup, run_client, wait_for

from tests.conftest import LicenseServer, fresh_minute
from tests.license_server.ls_helpers import new_machine


def _flood(url: str, code: str, stop: threading.Event, sent: list[int]) -> None:
    """Forged requests for the victim's code (the outsider's own key) and unsigned junk, as fast
    as one connection goes, bounded in count and time."""
    outsider, stranger = new_machine(), new_machine()
    outsider.code = code
    deadline = time.monotonic() + 60
    with requests.Session() as s:
        while not stop.is_set() and sent[0] < 3000 and time.monotonic() < deadline:
            body = (outsider if sent[0] % 2 else stranger).request(MODEL_ID)
            if sent[0] % 3 == 0:
                body = {**body, "machine": code, "sig": body["sig"][::-1]}  # garbage signature
            with contextlib.suppress(requests.RequestException):
                s.post(url + "/v1/activate", json=body, timeout=5)
            sent[0] += 1


def test_keyless_flood_never_takes_the_model_away(license_server, tmp_path):
    dep = deploy(license_server, tmp_path, token_ttl=3, offline_grace=30)
    stop, sent = threading.Event(), [0]
    flood = threading.Thread(target=_flood, args=(license_server.url, dep.machine, stop, sent), daemon=True)
    try:
        dep.sidecar.start()
        want = hashlib.sha256(dep.original.read_bytes()).hexdigest()
        flood.start()
        # renewals during the flood (every 2 s): served all along
        for _ in range(3):
            time.sleep(2.0)
            assert run_client(MODEL_ID, dep.socket)["sha256"] == want
        assert wait_for(lambda: sent[0] > 60, 30)  # past the source's whole failure budget for the minute
        # a restart during the flood activates from the server, as if nothing happened
        dep.sidecar.stop()
        dep.sidecar = Sidecar(dep.config, dep.sidecar.log)
        dep.sidecar.start()
        st = dep.sidecar.model_state()
        assert st["state"] == "unlocked" and st["source"] == "server", st
        assert run_client(MODEL_ID, dep.socket)["sha256"] == want
    finally:
        stop.set()
        flood.join(10)
        dep.sidecar.stop()
        cleanup(dep.socket.parent)
    renewals = [e for e in dep.sidecar.events() if e.get("event") == "activation_denied"]
    assert renewals == []  # not one of the sidecar's own requests was refused


def test_transient_denial_unlocks_from_the_cached_token(tmp_path, redis_server):
    """The machine's own signed-request budget is spent (2 a minute here): the server answers
    rate_limited — a transient answer — so a restarted sidecar serves from its cached token."""
    srv = LicenseServer(tmp_path / "server", redis_server.url, env={"LAYERLOCK_RATE_MACHINE_PER_MIN": "2"})
    srv.start()
    dep = deploy(srv, tmp_path, token_ttl=60, offline_grace=60)
    try:
        fresh_minute(45)  # keep the three starts (each a sidecar process) inside one rate-limit minute
        dep.sidecar.start()  # activation 1 of 2
        want = hashlib.sha256(dep.original.read_bytes()).hexdigest()
        dep.sidecar.stop()
        dep.sidecar = Sidecar(dep.config, dep.sidecar.log)
        dep.sidecar.start()  # activation 2 of 2
        dep.sidecar.stop()
        dep.sidecar = Sidecar(dep.config, dep.sidecar.log)
        dep.sidecar.start()  # refused: rate_limited → cached token
        st = dep.sidecar.model_state()
        assert st["state"] == "unlocked" and st["source"] == "cache", st
        assert run_client(MODEL_ID, dep.socket)["sha256"] == want
        denied = [e for e in dep.sidecar.events() if e.get("event") == "activation_denied"]
        assert denied and {e["reason"] for e in denied} == {"rate_limited"}
        # it keeps serving while the server keeps answering rate_limited (a definitive answer
        # still drops at once: test_e2e_sidecar.py::test_revoke_drops_within_one_renewal)
        time.sleep(1.5)
        assert dep.sidecar.model_state()["state"] == "unlocked"
    finally:
        dep.sidecar.stop()
        cleanup(dep.socket.parent)
        srv.stop()
