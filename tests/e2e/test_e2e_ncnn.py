"""End to end, ncnn: `layerlock protect model.param model.bin` → register → license → the sidecar
(a real process, against a real license server) serves the pair → a separate client process
builds an ``ncnn.Net`` from memory with ``client.ncnn_net`` and predicts exactly what the original
net predicts, while the locked pair predicts at chance."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from e2e_helpers import ENV, PY, Sidecar, cleanup, cli, public_dir

from tests.ncnn_models import digits, net_from, run, write_digits

MODEL_ID = "digits-ncnn-1"

CLIENT = r"""
import json, sys
import numpy as np
from layerlock.verifier import client
from layerlock.verifier.errors import SidecarRefused
from tests.ncnn_models import digits, run
try:
    net = client.ncnn_net(sys.argv[1], socket_path=sys.argv[2], transfer=sys.argv[3], num_threads=1)
except SidecarRefused as exc:
    print(json.dumps({"refused": exc.code})); sys.exit(0)
print(json.dumps({"logits": run(net, digits()[0]).tolist()}))
"""


def _client(sock, transfer="fd"):
    out = subprocess.run([PY, "-c", CLIENT, MODEL_ID, str(sock), transfer], env=ENV, cwd="/",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ncnn_pair_served_and_built_from_memory(license_server, tmp_path):
    site = tmp_path / "site"
    param, weights = write_digits(site / "vendor")
    # the vendor: protect the pair (explicit .bin) with the CLI, sealing the data key to the server
    intake = site / "intake.pub"
    intake.write_text(license_server.intake_pub)
    out = subprocess.run([PY, "-m", "layerlock.license_server.cli", "protect", str(param), str(weights),
                          "--model-id", MODEL_ID, "--intake-key", str(intake), "--out-dir", str(site / "ship"),
                          "--json"], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    item = json.loads(out.stdout)[0]
    assert item["format"] == "ncnn" and item["param"].endswith("digits.locked.param")
    sealed = json.loads((site / "ship" / "digits.key.sealed").read_text())
    resp = license_server.api("POST", "/v1/models", {"model_id": MODEL_ID, "name": "digits-ncnn", "version": "1",
                                                     "sealed_key": sealed})
    assert resp.status_code == 201, resp.text

    # the customer host: only the shipped files (locked .bin, its .param, the bundle)
    mid = site / "machine-id"
    mid.write_text("c0ffee00c0ffee00c0ffee00c0ffee01\n")
    state = site / "state"
    enrolled = json.loads(cli("enroll", "--state-dir", str(state), "--server", license_server.url,
                              "--machine-id-file", str(mid), "--json").stdout)
    resp = license_server.api("POST", "/v1/machines", {"enrollment": enrolled["enrollment_code"],
                                                       "customer": "acme"})
    assert resp.status_code == 201, resp.text
    resp = license_server.api("POST", "/v1/licenses", {"machine": enrolled["machine"], "model": MODEL_ID,
                                                       "days": 1})
    assert resp.status_code == 201, resp.text
    sock_dir = public_dir()
    config = site / "verifier.toml"
    config.write_text(f"""\
server_url = "{license_server.url}"
state_dir = "{state}"
socket = "{sock_dir / 'verifier.sock'}"
machine_id_file = "{mid}"
request_timeout = 2
retry_min = 0.3
retry_max = 1.0

[[models]]
id = "{MODEL_ID}"
locked = "{site / 'ship' / 'digits.locked.bin'}"
bundle = "{site / 'ship' / 'digits.llk'}"
""")  # no `param`: the .param next to the locked .bin is found by name
    assert json.loads(cli("check", "--config", str(config), "--json").stdout)["ok"]
    sidecar = Sidecar(config, site / "sidecar.log")
    try:
        sidecar.start()
        st = next(m for m in sidecar.status()["models"] if m["model"] == MODEL_ID)
        assert st["state"] == "unlocked" and st["format"] == "ncnn", st
        xte, yte, _, _ = digits()
        want = run(net_from(param, weights), xte)
        assert item["fingerprint_positions"] > 0
        for transfer in ("fd", "stream"):
            got = np.array(_client(sock_dir / "verifier.sock", transfer)["logits"], dtype=np.float32)
            # this license's fingerprinted copy, from memory: the same answers, logits a hair apart
            assert not np.array_equal(got, want), transfer
            assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99, transfer
            np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * float(np.abs(want).max()))
        with np.errstate(all="ignore"):
            locked = run(net_from(site / "ship" / "digits.locked.param", site / "ship" / "digits.locked.bin"), xte)
        accuracy = float((locked.argmax(1) == yte).mean())
        assert accuracy < 0.3, accuracy  # the locked pair alone: chance (0.1), not 0.97
        # nothing unlocked was written anywhere on the host (state dir, log, shipped files)
        real = weights.read_bytes()[4:4 + 256]  # the first 64 weights of fc1, a locked layer
        host = [p for p in site.rglob("*") if p.is_file() and "vendor" not in p.parts]
        assert host and not [p for p in host if real in p.read_bytes()]
    finally:
        sidecar.stop()
        cleanup(sock_dir)
    # a .param edited after protect is named by `check`, and the sidecar would refuse it
    (site / "ship" / "digits.locked.param").write_text(param.read_text().replace("9=1", "9=0", 1))
    r = cli("check", "--config", str(config), check=False)
    assert r.returncode == 1 and "is not the .param model 'digits-ncnn-1' was protected with" in r.stderr
