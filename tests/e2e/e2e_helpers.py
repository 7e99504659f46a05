"""End-to-end plumbing: a protected model registered and licensed on a real license server, an
enrolled state dir, and the sidecar as a real subprocess whose readiness is read from its own
sd_notify datagrams (the same signal systemd waits for)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import wait_for  # noqa: F401 - re-exported: e2e tests import it from here

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MODEL_ID = "mlp-demo"

CLIENT = r"""
import hashlib, json, sys
import numpy as np
from layerlock.verifier import client
from layerlock.verifier.errors import SidecarRefused
model, sock, transfer = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    data = client.load_bytes(model, socket_path=sock, transfer=transfer)
    arrays = client.load_numpy(model, socket_path=sock, transfer=transfer)
except SidecarRefused as exc:
    print(json.dumps({"refused": exc.code, "message": exc.message})); sys.exit(0)
x = np.random.default_rng(42).standard_normal((5, 8)).astype(np.float32)
for i in range(3):
    x = x @ arrays[f"layers.{i}.weight"].T + arrays[f"layers.{i}.bias"]
    if i < 2:
        x = np.maximum(x, 0)
print(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "pred": x.tolist()}))
"""


def make_model(path: Path, hidden: int = 32) -> dict[str, np.ndarray]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    dims = [8, hidden, hidden, 4]
    tensors = {}
    for i in range(3):
        tensors[f"layers.{i}.weight"] = rng.standard_normal((dims[i + 1], dims[i])).astype(np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal(dims[i + 1]).astype(np.float32)
    save_file(tensors, str(path))
    return tensors


def make_onnx_model(path: Path) -> None:
    """The same kind of MLP as an ONNX graph (MatMul/Relu), weights as initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    ws = [rng.standard_normal(shape).astype(np.float32) for shape in ((8, 32), (32, 32), (32, 4))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


ONNX_CLIENT = r"""
import json, sys
import numpy as np
from layerlock.verifier import client
session = client.onnx_session(sys.argv[1], socket_path=sys.argv[2])
x = np.random.default_rng(42).standard_normal((5, 8)).astype(np.float32)
print(json.dumps({"pred": session.run(None, {"x": x})[0].tolist()}))
"""


def onnx_predict(model: Path | bytes) -> np.ndarray:
    import onnxruntime

    data = model.read_bytes() if isinstance(model, Path) else model
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(42).standard_normal((5, 8)).astype(np.float32)
    return session.run(None, {"x": x})[0]


def run_onnx_client(model: str, sock: Path) -> np.ndarray:
    out = subprocess.run([PY, "-c", ONNX_CLIENT, model, str(sock)], env=ENV, cwd="/", capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return np.array(json.loads(out.stdout.strip().splitlines()[-1])["pred"], dtype=np.float32)


def predict(tensors: dict[str, np.ndarray]) -> np.ndarray:
    x = np.random.default_rng(42).standard_normal((5, 8)).astype(np.float32)
    for i in range(3):
        x = x @ tensors[f"layers.{i}.weight"].T + tensors[f"layers.{i}.bias"]
        if i < 2:
            x = np.maximum(x, 0)
    return x


def run_client(model: str, sock: Path, transfer: str = "fd", *, uid: int | None = None) -> dict[str, Any]:
    """The inference side, as a separate process.

    With ``uid``, a forked child drops to that uid (the venv's interpreter may not be executable
    by it, so the child runs the client code in the forked interpreter instead of exec'ing one).
    """
    if uid is not None:
        return _forked_client(model, sock, uid)
    out = subprocess.run([PY, "-c", CLIENT, model, str(sock), transfer], env=ENV, cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forked_client(model: str, sock: Path, uid: int) -> dict[str, Any]:
    from layerlock.verifier import client
    from layerlock.verifier.errors import SidecarRefused

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result: dict[str, Any] = {}
        try:
            os.setgid(uid)
            os.setuid(uid)
            data = client.load_bytes(model, socket_path=sock)
            result = {"sha256": __import__("hashlib").sha256(data).hexdigest()}
        except SidecarRefused as exc:
            result = {"refused": exc.code, "message": exc.message}
        except BaseException as exc:  # noqa: BLE001
            result = {"error": repr(exc)}
        finally:
            os.write(w, json.dumps(result).encode())
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def cli(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``layerlock-verifier …`` as a subprocess; ``stdin``: what is typed or piped into it."""
    out = subprocess.run([PY, "-m", "verifier", *args], env=ENV, cwd=REPO, capture_output=True, text=True,
                         timeout=60, input=stdin)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def ops(server, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The ops CLI (`layerlock …`) against ``server`` with its admin key, as a subprocess."""
    env = {**ENV, "LAYERLOCK_SERVER": server.url, "LAYERLOCK_API_KEY": server.admin_key}
    out = subprocess.run([PY, "-m", "layerlock.license_server.cli", *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@dataclass
class Sidecar:
    """``layerlock-verifier run`` as a subprocess; :meth:`start` returns once it sent READY=1."""

    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    notify: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> None:
        addr = f"\0layerlock-e2e-{os.getpid()}-{time.monotonic_ns()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(addr)
        listener.settimeout(0.2)
        env = {**ENV, "NOTIFY_SOCKET": "@" + addr[1:]}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([PY, "-m", "verifier", "run", "--config", str(self.config)], env=env,
                                         cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while "READY=1" not in self.notify:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar not ready: {self.log.read_text()[-3000:]}")
                with contextlib.suppress(TimeoutError):
                    self.notify.extend(listener.recv(4096).decode().split("\n"))
        finally:
            listener.close()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def status(self) -> dict[str, Any]:
        out = cli("status", "--config", str(self.config), "--json")
        return json.loads(out.stdout)

    def model_state(self, model: str = MODEL_ID) -> dict[str, Any]:
        return next(m for m in self.status()["models"] if m["model"] == model)


def public_dir() -> Path:
    """A world-traversable directory (pytest's tmp dirs are 0700) for sockets other uids reach."""
    path = Path(tempfile.mkdtemp(prefix="llk-e2e-"))
    os.chmod(path, 0o755)
    return path


def write_config(path: Path, *, server: str, state_dir: Path, machine_id_file: Path, socket_path: Path,
                 locked: Path, bundle: Path, extra: str = "") -> Path:
    path.write_text(f"""\
server_url = "{server}"
state_dir = "{state_dir}"
socket = "{socket_path}"
machine_id_file = "{machine_id_file}"
request_timeout = 2
retry_min = 0.3
retry_max = 1.0
{extra}
[[models]]
id = "{MODEL_ID}"
locked = "{locked}"
bundle = "{bundle}"
""")
    return path


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
