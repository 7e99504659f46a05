"""Client library for inference processes: fetch an unlocked model from the sidecar.

The default transfer is a sealed memfd passed over the socket (SCM_RIGHTS): the client maps the
sidecar's pages read-only, so nothing is copied through the socket and nothing touches the disk.
``transfer="stream"`` asks for the bytes instead (for clients that cannot receive descriptors).
Refusals raise :class:`layerlock.verifier.errors.SidecarRefused` carrying the sidecar's reason code.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from layerlock.shared.errors import ProtocolError, UnsupportedModel
from layerlock.verifier import protocol
from layerlock.verifier.errors import SidecarRefused, SidecarUnavailable

DEFAULT_SOCKET = "/run/layerlock/verifier.sock"
SOCKET_ENV = "LAYERLOCK_SOCKET"


def _socket_path(socket_path: str | os.PathLike[str] | None) -> str:
    return str(socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


def _connect(socket_path: str | os.PathLike[str] | None, timeout: float) -> socket.socket:
    path = _socket_path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise SidecarUnavailable(f"no layerlock sidecar listening on {path} ({exc.strerror or exc})") from None
    return sock


def _check(frame: dict[str, Any] | None) -> dict[str, Any]:
    if frame is None:
        raise SidecarUnavailable("the sidecar closed the connection without answering")
    if not frame.get("ok"):
        raise SidecarRefused(str(frame.get("error", "refused")), str(frame.get("message", "")))
    return frame


def _send(sock: socket.socket, frame: dict[str, Any]) -> None:
    """Send a request; a refused peer may find the socket already closed by the sidecar, whose
    refusal frame is still waiting to be read — so a broken pipe here is not yet an error."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        protocol.send_frame(sock, frame)


def request(op: str, *, socket_path: str | os.PathLike[str] | None = None, timeout: float = 30.0,
            **fields: Any) -> dict[str, Any]:
    """One JSON request/answer (``list``, ``status``)."""
    with _connect(socket_path, timeout) as sock:
        try:
            _send(sock, {"op": op, **fields})
            return _check(protocol.recv_frame(sock))
        except (OSError, ProtocolError) as exc:
            raise SidecarUnavailable(f"talking to the sidecar failed: {exc}") from None


@dataclass
class LoadedModel:
    """The model's bytes: a read-only mmap of the sidecar's memfd, or a bytearray when streamed."""

    model: str
    format: str
    size: int
    buffer: mmap.mmap | bytearray

    def close(self) -> None:
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()


def fetch(model: str, *, socket_path: str | os.PathLike[str] | None = None, transfer: str = "fd",
          timeout: float = 60.0) -> LoadedModel:
    """Ask the sidecar for ``model``; return a zero-copy read-only mapping (or streamed bytes)."""
    with _connect(socket_path, timeout) as sock:
        try:
            _send(sock, {"op": "get", "model": model, "transfer": transfer})
            frame, fds = protocol.recv_frame_with_fds(sock)
        except (OSError, ProtocolError) as exc:
            raise SidecarUnavailable(f"talking to the sidecar failed: {exc}") from None
        try:
            header = _check(frame)
            size = int(header["size"])
            fmt = str(header.get("format", "safetensors"))
            if header.get("transfer") == "fd":
                if len(fds) != 1:
                    raise ProtocolError("the sidecar announced a descriptor but sent none")
                buf: mmap.mmap | bytearray = (mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ)
                                              if size else bytearray())
                return LoadedModel(model, fmt, size, buf)
            data = bytearray(size)
            try:
                got = protocol.recv_stream_into(sock, memoryview(data))
            except (OSError, ProtocolError) as exc:
                raise SidecarUnavailable(f"stream from the sidecar broke off: {exc}") from None
            if got != size:
                raise ProtocolError(f"stream ended after {got} of {size} bytes")
            return LoadedModel(model, fmt, size, data)
        finally:
            for fd in fds:
                os.close(fd)  # the mapping keeps the pages; the descriptor is not needed


def load_bytes(model: str, *, socket_path: str | os.PathLike[str] | None = None,
               transfer: str = "fd") -> bytes:
    """The model file's bytes (one copy into this process's heap)."""
    loaded = fetch(model, socket_path=socket_path, transfer=transfer)
    try:
        return bytes(loaded.buffer)
    finally:
        loaded.close()


# --- safetensors without a copy ----------------------------------------------------------------
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def _safetensors_views(buffer: mmap.mmap | bytearray) -> dict[str, Any] | None:
    """numpy arrays viewing ``buffer`` directly; ``None`` when a dtype has no numpy equivalent."""
    import numpy as np

    (n,) = struct.unpack_from("<Q", buffer, 0)
    if n > len(buffer) - 8:
        raise ProtocolError("safetensors header length exceeds the model size")
    header = json.loads(bytes(buffer[8:8 + n]))
    base = 8 + n
    out: dict[str, Any] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _NP_DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        arr = np.frombuffer(buffer, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                            offset=base + start)
        out[name] = arr.reshape(shape)
    return out


def load_numpy(model: str, *, socket_path: str | os.PathLike[str] | None = None,
               transfer: str = "fd") -> dict[str, Any]:
    """Tensors as numpy arrays.  With the memfd, arrays are read-only views of the shared pages.

    No copy at all: the arrays keep the mapping alive.  A model with a dtype numpy lacks (bf16)
    falls back to ``safetensors.numpy.load`` on a bytes copy.
    """
    loaded = fetch(model, socket_path=socket_path, transfer=transfer)
    if loaded.format != "safetensors":
        loaded.close()
        raise UnsupportedModel(f"model {model} is {loaded.format}, not safetensors; use onnx_session")
    views = _safetensors_views(loaded.buffer)
    if views is not None:
        return views
    from safetensors.numpy import load

    data = bytes(loaded.buffer)
    loaded.close()
    return load(data)


def load_torch(model: str, *, socket_path: str | os.PathLike[str] | None = None,
               transfer: str = "fd") -> dict[str, Any]:
    """A torch state dict (torch is an optional dependency)."""
    try:
        from safetensors.torch import load
    except ImportError:  # torch missing
        raise ImportError("load_torch needs torch: pip install 'layerlock[torch]'") from None
    return load(load_bytes(model, socket_path=socket_path, transfer=transfer))


def onnx_session(model: str, *, socket_path: str | os.PathLike[str] | None = None,
                 transfer: str = "fd", **session_kwargs: Any) -> Any:
    """An onnxruntime InferenceSession built from the model bytes (onnxruntime optional)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("onnx_session needs onnxruntime: pip install 'layerlock[onnx]'") from None
    data = load_bytes(model, socket_path=socket_path, transfer=transfer)
    session_kwargs.setdefault("providers", ["CPUExecutionProvider"])
    return onnxruntime.InferenceSession(data, **session_kwargs)


def list_models(*, socket_path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    return list(request("list", socket_path=socket_path)["models"])


def status(*, socket_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    return request("status", socket_path=socket_path)
