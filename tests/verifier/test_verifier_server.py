"""The socket server over real Unix sockets: transfers, refusals, peer checks, hostile clients."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from layerlock.shared.errors import VerifierError
from layerlock.verifier import client, protocol
from layerlock.verifier.errors import ModelUnavailable, SidecarRefused, SidecarUnavailable
from layerlock.verifier.memory import SealedModel
from layerlock.verifier.server import SocketServer

TENSORS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.int64)}


class Backend:
    def __init__(self) -> None:
        self.models = {"m": SealedModel.from_bytes("m", "safetensors", save(TENSORS))}

    def list_models(self):
        return [{"model": k, "state": "unlocked"} for k in self.models] + [{"model": "gone", "state": "refused"}]

    def status(self):
        return {"machine": "LLK-TEST", "models": self.list_models()}

    def model(self, model_id):
        if model_id == "gone":
            raise ModelUnavailable("revoked", "license revoked")
        if model_id not in self.models:
            raise ModelUnavailable("unknown_model", "no such model")
        return self.models[model_id]


def start(tmp_path: Path, **kw) -> tuple[SocketServer, str]:
    path = tmp_path / "run" / "v.sock"
    kw.setdefault("allowed_uids", {os.getuid()})
    kw.setdefault("allowed_gids", set())
    srv = SocketServer(path, Backend(), timeout=kw.pop("timeout", 2.0), **kw)
    srv.start()
    return srv, str(path)


@pytest.fixture()
def server(tmp_path):
    srv, path = start(tmp_path)
    yield path
    srv.stop()


def test_socket_mode_0660(server):
    assert os.stat(server).st_mode & 0o777 == 0o660


@pytest.mark.parametrize("transfer", ["fd", "stream"])
def test_get_bytes_and_numpy(server, transfer):
    assert client.load_bytes("m", socket_path=server, transfer=transfer) == save(TENSORS)
    arrays = client.load_numpy("m", socket_path=server, transfer=transfer)
    assert set(arrays) == set(TENSORS)
    for name, arr in TENSORS.items():
        np.testing.assert_array_equal(arrays[name], arr)


def test_numpy_views_are_read_only(server):
    arrays = client.load_numpy("m", socket_path=server)
    assert not arrays["w"].flags.writeable
    with pytest.raises(ValueError):
        arrays["w"][0, 0] = 1


@pytest.mark.parametrize("transfer", ["fd", "stream"])
def test_load_torch(server, transfer):
    import torch
    sd = client.load_torch("m", socket_path=server, transfer=transfer)
    assert set(sd) == set(TENSORS)
    for name, arr in TENSORS.items():
        assert torch.equal(sd[name], torch.from_numpy(arr)) and sd[name].dtype == torch.from_numpy(arr).dtype


def test_load_torch_is_a_writable_copy_on_write_view_of_the_memfd(server):
    """No copy up front (the tensors view one private mapping), yet writable like any state dict;
    a write stays in this process: the sidecar's pages, and the next client's tensors, keep the
    original values."""
    import torch
    sd = client.load_torch("m", socket_path=server)
    w, b = sd["w"], sd["b"]
    base = b.untyped_storage().data_ptr()
    assert 0 < w.data_ptr() - base < 4096 or 0 < base - w.data_ptr() < 4096  # both inside one small mapping
    w.add_(1)  # writable, no warning
    assert torch.equal(w, torch.from_numpy(TENSORS["w"]) + 1)
    again = client.load_torch("m", socket_path=server)
    assert torch.equal(again["w"], torch.from_numpy(TENSORS["w"]))
    assert client.load_bytes("m", socket_path=server) == save(TENSORS)


def test_load_torch_onto_a_device_and_numpy_copies(server):
    import torch
    sd = client.load_torch("m", socket_path=server, device="cpu")
    assert torch.equal(sd["w"], torch.from_numpy(TENSORS["w"]))
    arrays = client.load_numpy("m", socket_path=server, copy=True)
    assert arrays["w"].flags.writeable and arrays["w"].flags.owndata
    arrays["w"][0, 0] = 42
    np.testing.assert_array_equal(client.load_numpy("m", socket_path=server)["w"], TENSORS["w"])


def test_list_and_status(server):
    assert [m["model"] for m in client.list_models(socket_path=server)] == ["m", "gone"]
    assert client.status(socket_path=server)["machine"] == "LLK-TEST"


def test_refusal_carries_reason(server):
    with pytest.raises(SidecarRefused) as err:
        client.load_bytes("gone", socket_path=server)
    assert err.value.code == "revoked" and isinstance(err.value, VerifierError)
    with pytest.raises(SidecarRefused) as err:
        client.load_bytes("nope", socket_path=server)
    assert err.value.code == "unknown_model"


def test_no_daemon(tmp_path):
    with pytest.raises(SidecarUnavailable):
        client.status(socket_path=tmp_path / "none.sock")


def test_allow_list_excluding_root_refuses(tmp_path):
    srv, path = start(tmp_path, allowed_uids={12345}, allowed_gids={12345})
    try:
        with pytest.raises(SidecarRefused) as err:
            client.load_bytes("m", socket_path=path)
        assert err.value.code == "peer_not_allowed"
    finally:
        srv.stop()


def test_allow_by_gid(tmp_path):
    srv, path = start(tmp_path, allowed_uids={12345}, allowed_gids={os.getgid()})
    try:
        assert client.load_bytes("m", socket_path=path) == save(TENSORS)
    finally:
        srv.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to setuid a child")
def test_other_uid_refused_in_forked_child():
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="llk-sock-"))  # pytest's tmp dirs are 0700: uid 65534 can't enter
    os.chmod(root, 0o755)
    srv, server = start(root)
    os.chmod(server, 0o666)  # let uid 65534 reach the socket: only SO_PEERCRED stops it now
    os.chmod(Path(server).parent, 0o755)
    try:
        _other_uid_refused(server)
    finally:
        srv.stop()
        shutil.rmtree(root)


def _other_uid_refused(server: str) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = "unexpected"
        try:
            os.setgid(65534)
            os.setuid(65534)
            client.load_bytes("m", socket_path=server)
            code = "served"
        except SidecarRefused as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001
            code = f"error:{exc!r}"
        finally:
            os.write(w, code.encode())
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    answer = os.read(r, 200).decode()
    os.close(r)
    assert answer == "peer_not_allowed"
    # and the daemon still serves allowed peers
    assert client.load_bytes("m", socket_path=server) == save(TENSORS)


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("payload", [
    b"\x00\x00\x00\x05garbage",                       # not JSON
    struct.pack(">I", 10 * 1024 * 1024) + b"{",       # oversized announcement
    struct.pack(">I", 100) + b'{"op":',               # truncated, then EOF
    struct.pack(">I", 13) + b'{"op":"nope"}',         # unknown op
    struct.pack(">I", 2) + b"[]",                     # not an object
])
def test_bad_frames_close_only_that_connection(server, payload):
    bad = _raw(server)
    good = _raw(server)  # connected before the bad one misbehaves
    bad.sendall(payload)
    if payload.startswith(struct.pack(">I", 100)):
        bad.shutdown(socket.SHUT_WR)
    assert _closed(bad)
    protocol.send_frame(good, {"op": "list"})
    assert protocol.recv_frame(good)["ok"] is True
    good.close()
    bad.close()
    assert client.load_bytes("m", socket_path=server) == save(TENSORS)


def test_silent_client_does_not_block_others(tmp_path):
    srv, path = start(tmp_path, timeout=3.0)
    try:
        slow = [_raw(path) for _ in range(5)]
        slow[0].sendall(struct.pack(">I", 50) + b'{"op"')  # half a frame, then silence
        t0 = time.monotonic()
        assert client.load_bytes("m", socket_path=path) == save(TENSORS)
        assert time.monotonic() - t0 < 2.5  # well before the 3 s idle timeout frees anything
        assert _closed(slow[0])  # the idle timeout reclaims it
        for s in slow:
            s.close()
    finally:
        srv.stop()


def test_refuses_to_replace_a_live_socket_or_a_file(tmp_path):
    srv, path = start(tmp_path)
    try:
        with pytest.raises(Exception, match="another daemon"):
            SocketServer(Path(path), Backend(), allowed_uids={0}, allowed_gids=set()).start()
    finally:
        srv.stop()
    p = tmp_path / "plain"
    p.write_text("x")
    with pytest.raises(Exception, match="not a socket"):
        SocketServer(p, Backend(), allowed_uids={0}, allowed_gids=set()).start()


def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "run" / "v.sock"
    path.parent.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # a crashed daemon's leftover
    srv = SocketServer(path, Backend(), allowed_uids={os.getuid()}, allowed_gids=set())
    srv.start()
    try:
        assert client.status(socket_path=path)["ok"]
    finally:
        srv.stop()


def test_status_frame_is_json_object(server):
    s = _raw(server)
    protocol.send_frame(s, {"op": "status"})
    frame = protocol.recv_frame(s)
    assert json.loads(json.dumps(frame))["machine"] == "LLK-TEST"
    s.close()


def test_onnx_session_through_the_socket(tmp_path):
    import onnx
    import onnxruntime  # noqa: F401
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(w, "w")])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    backend = Backend()
    backend.models["o"] = SealedModel.from_bytes("o", "onnx", data)
    srv = SocketServer(tmp_path / "o.sock", backend, allowed_uids={os.getuid()}, allowed_gids=set())
    srv.start()
    try:
        session = client.onnx_session("o", socket_path=tmp_path / "o.sock")
        x = np.ones((1, 3), dtype=np.float32)
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w)
    finally:
        srv.stop()


def test_socket_group_owns_the_socket(tmp_path):
    srv, path = start(tmp_path, group=4242)
    try:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.geteuid(), 4242, 0o660)
    finally:
        srv.stop()


# --- a real sidecar process (`layerlock-verifier run`), clients under other uids ---------------------
# The sidecar runs as root without any capability when setpriv is there, as under the unit
# (CapabilityBoundingSet= is empty): it can chown its socket only to a group it is a member of.
# Its model is unlocked from a cached token (the license server address is unreachable).

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534          # the peer's uid: never in allowed_uids below
OTHER_GID = 4242        # a gid on no allow-list and not the socket's group
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to setuid a child")


class Sidecar:
    def __init__(self, tmp_path: Path, machine, protected, extra: str, groups: list[int]) -> None:
        from verifier_helpers import write_config

        self.dir = Path(tempfile.mkdtemp(prefix="llk-sock-"))  # pytest's tmp dirs are 0700
        os.chmod(self.dir, 0o755)
        self.socket = self.dir / "v.sock"
        self.log = tmp_path / "sidecar.log"
        self.want = hashlib.sha256(protected.original.read_bytes()).hexdigest()
        machine.state.save_token(protected.model_id, machine.token(protected.model_id, ttl=600))
        self.config = write_config(tmp_path / "v.toml", machine, [protected], socket=self.socket,
                                   extra=extra + "\nclient_timeout = 30")
        cmd = [sys.executable, "-m", "verifier", "run", "--config", str(self.config)]
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all",
                   f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups", "--", *cmd]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_unlocked(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if client.status(socket_path=self.socket)["models"][0]["state"] == "unlocked":
                    return
            except (SidecarUnavailable, SidecarRefused):
                pass
            time.sleep(0.1)
        raise AssertionError(f"sidecar not serving: {self.log.read_text()[-3000:]}")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def sidecar(tmp_path, machine, protected):
    started: list[Sidecar] = []

    def run(extra: str = "", groups: list[int] | None = None, wait: bool = True) -> Sidecar:
        sc = Sidecar(tmp_path, machine, protected, extra, [] if groups is None else groups)
        started.append(sc)
        if wait:
            sc.wait_unlocked()
        return sc

    yield run
    for sc in started:
        sc.stop()


def _as_peer(socket_path: Path, *, uid: int, gid: int, groups: list[int], model: str = "model-a") -> dict:
    """`get` the model from a forked child running as uid/gid with exactly these supplementary groups."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        result: dict = {"error": "unset"}
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            result = {"sha256": hashlib.sha256(client.load_bytes(model, socket_path=socket_path)).hexdigest()}
        except SidecarRefused as exc:
            result = {"refused": exc.code, "message": exc.message}
        except SidecarUnavailable as exc:
            result = {"unavailable": exc.message}
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


def _group_name(gid: int) -> str:
    import grp

    try:
        return f'"{grp.getgrgid(gid).gr_name}"'  # by name when the host has one (nogroup, nobody)
    except KeyError:
        return str(gid)


@needs_root
def test_sidecar_serves_a_peer_allowed_only_by_gid(sidecar):
    """allowed_gids works end to end: the socket is root:socket_group 0660, so a uid that is on no
    allow-list but whose gid is reaches SO_PEERCRED and gets the model."""
    sc = sidecar(f"socket_group = {_group_name(NOBODY)}\nallowed_uids = [0]\nallowed_gids = [{NOBODY}]",
                 groups=[NOBODY])  # the unit's SupplementaryGroups=: lets the daemon chown without CAP_CHOWN
    st = os.stat(sc.socket)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, NOBODY, 0o660)
    assert _as_peer(sc.socket, uid=NOBODY, gid=NOBODY, groups=[]) == {"sha256": sc.want}
    served = [e for e in sc.events() if e["event"] == "get_served"]
    assert served and served[-1]["uid"] == NOBODY
    # neither uid nor (effective) gid allowed, but a supplementary member of the socket's group:
    # connect() works, and the allow-list answers with the documented refusal
    refused = _as_peer(sc.socket, uid=NOBODY, gid=OTHER_GID, groups=[NOBODY])
    assert refused["refused"] == "peer_not_allowed", refused
    assert f"uid {NOBODY} / gid {OTHER_GID}" in refused["message"]
    assert any(e["event"] == "peer_refused" and e["gid"] == OTHER_GID for e in sc.events())
    # not in the socket's group at all: the socket's mode stops it at connect()
    assert "Permission denied" in _as_peer(sc.socket, uid=NOBODY, gid=OTHER_GID, groups=[])["unavailable"]


@needs_root
def test_sidecar_without_the_socket_group_refuses_to_start(sidecar):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) missing: root keeps CAP_CHOWN and the chown succeeds")
    sc = sidecar(f"socket_group = {NOBODY}\nallowed_gids = [{NOBODY}]", groups=[], wait=False)
    assert sc.proc.wait(60) == 1
    out = sc.log.read_text()
    assert (f"error: socket_group: cannot give {sc.socket} to gid {NOBODY} (Operation not permitted): the daemon "
            "must be a member of that group (systemd: SupplementaryGroups=) or hold CAP_CHOWN") in out, out
    assert not sc.socket.exists()


def _status_ok(path: Path) -> bool:
    try:
        return client.status(socket_path=path)["ok"] is True
    except SidecarRefused as exc:
        assert exc.code == "too_many_connections"
        return False


@needs_root
def test_sidecar_bounds_connections_per_uid(sidecar):
    """One allowed uid holding 16 idle connections cannot starve the others: its 17th is refused
    at once with a protocol frame, another uid is still served, and a closed one frees a slot."""
    # uid 65534 reaches the root:root 0660 socket through its supplementary group 0
    sc = sidecar(f"allowed_uids = [0, {NOBODY}]", groups=None)
    held = []
    for _ in range(16):
        s = _raw(str(sc.socket))
        protocol.send_frame(s, {"op": "list"})
        assert protocol.recv_frame(s)["ok"] is True
        held.append(s)  # ... and now idle
    extra = _raw(str(sc.socket))
    t0 = time.monotonic()
    frame = protocol.recv_frame(extra)  # unasked: the refusal comes on accept
    assert time.monotonic() - t0 < 2
    assert frame["ok"] is False and frame["error"] == "too_many_connections", frame
    assert "max_connections_per_uid" in frame["message"] and "uid 0 " in frame["message"]
    assert _closed(extra)
    extra.close()
    with pytest.raises(SidecarRefused) as err:
        client.load_bytes("model-a", socket_path=sc.socket)
    assert err.value.code == "too_many_connections"
    # a different uid is still served while uid 0 holds its 16
    assert _as_peer(sc.socket, uid=NOBODY, gid=NOBODY, groups=[0]) == {"sha256": sc.want}
    # the held connections still work, and closing one frees a slot for uid 0
    protocol.send_frame(held[0], {"op": "status"})
    assert protocol.recv_frame(held[0])["ok"] is True
    held.pop().close()
    deadline = time.monotonic() + 5
    while not _status_ok(sc.socket):
        assert time.monotonic() < deadline, "a closed connection did not free its slot"
        time.sleep(0.05)
    refusals = [e for e in sc.events() if e["event"] == "connection_refused"]
    assert refusals and refusals[0]["reason"] == "too_many_connections" and refusals[0]["uid"] == 0
    for s in held:
        s.close()
