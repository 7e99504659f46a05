"""The socket server over real Unix sockets: transfers, refusals, peer checks, hostile clients."""

from __future__ import annotations

import json
import os
import socket
import struct
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


def test_load_torch(server):
    import torch
    sd = client.load_torch("m", socket_path=server)
    assert torch.equal(sd["w"], torch.from_numpy(TENSORS["w"]))


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
    srv, path = start(tmp_path, timeout=1.0)
    try:
        slow = [_raw(path) for _ in range(5)]
        slow[0].sendall(struct.pack(">I", 50) + b'{"op"')  # half a frame, then silence
        t0 = time.monotonic()
        assert client.load_bytes("m", socket_path=path) == save(TENSORS)
        assert time.monotonic() - t0 < 0.9
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
