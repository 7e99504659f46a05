"""Client library for inference processes: fetch an unlocked model from the sidecar.

The default transfer is a sealed memfd passed over the socket (SCM_RIGHTS): the client maps the
sidecar's pages read-only, so nothing is copied through the socket and nothing touches the disk.
``transfer="stream"`` asks for the bytes instead (for clients that cannot receive descriptors).
``ncnn_net`` builds an ``ncnn.Net`` from an ncnn model's ``.param`` + unlocked ``.bin``, from memory.
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
          timeout: float = 60.0, private: bool = False) -> LoadedModel:
    """Ask the sidecar for ``model``; return a zero-copy read-only mapping (or streamed bytes).

    ``private``: map the memfd copy-on-write (``MAP_PRIVATE``, writable) instead of shared
    read-only.  Still no copy up front — pages are copied one by one, only when this process
    writes to them — so frameworks that insist on writable buffers (torch) get them for free.
    Pages it never wrote still show the sidecar's memory: a drop zeroes them like any mapping.
    """
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
                flags, prot = ((mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) if private
                               else (mmap.MAP_SHARED, mmap.PROT_READ))
                buf: mmap.mmap | bytearray = mmap.mmap(fds[0], size, flags, prot) if size else bytearray()
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


def _safetensors_header(buffer: mmap.mmap | bytearray) -> tuple[dict[str, Any], int]:
    """The header's tensor entries and where the data starts (bounds checked against ``buffer``)."""
    (n,) = struct.unpack_from("<Q", buffer, 0)
    if n > len(buffer) - 8:
        raise ProtocolError("safetensors header length exceeds the model size")
    header = json.loads(bytes(buffer[8:8 + n]))
    base = 8 + n
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(buffer) - base:
                raise ProtocolError(f"safetensors tensor {name!r} lies outside the model")
    return {k: v for k, v in header.items() if k != "__metadata__"}, base


def _safetensors_views(buffer: mmap.mmap | bytearray) -> dict[str, Any] | None:
    """numpy arrays viewing ``buffer`` directly; ``None`` when a dtype has no numpy equivalent."""
    import numpy as np

    header, base = _safetensors_header(buffer)
    out: dict[str, Any] = {}
    for name, info in header.items():
        dtype = _NP_DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        arr = np.frombuffer(buffer, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                            offset=base + start)
        out[name] = arr.reshape(shape)
    return out


def _require_safetensors(loaded: LoadedModel, model: str) -> None:
    if loaded.format != "safetensors":
        loaded.close()
        hint = "ncnn_net" if loaded.format == "ncnn" else "onnx_session"
        raise UnsupportedModel(f"model {model} is {loaded.format}, not safetensors; use {hint}")


def load_numpy(model: str, *, socket_path: str | os.PathLike[str] | None = None,
               transfer: str = "fd", copy: bool = False) -> dict[str, Any]:
    """Tensors as numpy arrays.  With the memfd, arrays are read-only views of the shared pages.

    No copy at all: the arrays keep the mapping alive.  ``copy=True``: writable arrays of this
    process's own, made in one pass from the mapping (what ``safetensors.numpy.load_file``
    gives; a later drop by the sidecar cannot reach them).  A model with a dtype numpy lacks
    (bf16) falls back to ``safetensors.numpy.load`` on a bytes copy.
    """
    loaded = fetch(model, socket_path=socket_path, transfer=transfer)
    _require_safetensors(loaded, model)
    views = _safetensors_views(loaded.buffer)
    if views is not None:
        if not copy:
            return views
        out = {name: arr.copy() for name, arr in views.items()}
        del views
        loaded.close()
        return out
    from safetensors.numpy import load

    data = bytes(loaded.buffer)
    loaded.close()
    return load(data)


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                 "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def load_torch(model: str, *, socket_path: str | os.PathLike[str] | None = None,
               transfer: str = "fd", device: Any = None) -> dict[str, Any]:
    """A torch state dict (torch is an optional dependency), built without copying the model.

    With the memfd (the default), the tensors are views of a private copy-on-write mapping of
    the sidecar's sealed memfd: writable like any state dict (``load_state_dict``, fine-tuning),
    yet no byte is copied until this process writes it.  ``device`` (e.g. ``"cuda"``): each
    tensor is moved there straight from the mapping, one at a time, so host memory holds no
    second copy of the model.  A tensor whose offset is not aligned for its dtype is copied.
    """
    try:
        import torch
    except ImportError:  # torch missing
        raise ImportError("load_torch needs torch: pip install 'layerlock[torch]'") from None
    loaded = fetch(model, socket_path=socket_path, transfer=transfer, private=True)
    _require_safetensors(loaded, model)
    header, base = _safetensors_header(loaded.buffer)
    out: dict[str, Any] = {}
    for name, info in header.items():
        dtype = getattr(torch, _TORCH_DTYPES.get(info["dtype"], ""), None)
        if not isinstance(dtype, torch.dtype):
            raise UnsupportedModel(f"model {model}: tensor {name!r} has dtype {info['dtype']}, unknown to torch")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - start) // itemsize
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif (base + start) % itemsize:
            tensor = torch.frombuffer(bytearray(loaded.buffer[base + start:base + end]), dtype=dtype).reshape(shape)
        else:
            tensor = torch.frombuffer(loaded.buffer, dtype=dtype, count=count, offset=base + start).reshape(shape)
        out[name] = tensor.to(device) if device is not None else tensor
    return out


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


def ncnn_net(model: str, *, socket_path: str | os.PathLike[str] | None = None, transfer: str = "fd",
             **options: Any) -> Any:
    """An ``ncnn.Net`` initialised from memory: the ``.param`` text and the unlocked weights as the
    sidecar serves them (the ``ncnn`` package is optional: ``pip install 'layerlock[ncnn]'``).

    ``options`` are set on ``net.opt`` before loading (``num_threads=2``, ``use_vulkan_compute=True``).
    The weights go from the sidecar's sealed memfd (or the streamed buffer, zeroed afterwards)
    straight into ncnn's own memory through a bounded ``DataReader``: no file, no extra copy.  A
    drop cannot reach the net's copy (like ``onnx_session``): the process keeps it until it frees
    the net.
    """
    try:
        import ncnn
    except ImportError:
        raise ImportError("ncnn_net needs the ncnn package: pip install 'layerlock[ncnn]'") from None
    from layerlock.shared.ncnnfile import ncnn_index, parse_param, split_container

    loaded = fetch(model, socket_path=socket_path, transfer=transfer)
    reader = None
    try:
        if loaded.format != "ncnn":
            raise UnsupportedModel(f"model {model} is {loaded.format}, not ncnn; use "
                                   f"{'onnx_session' if loaded.format == 'onnx' else 'load_numpy'}")
        try:
            param, weights = split_container(loaded.buffer)
            text = bytes(loaded.buffer[param]).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"model {model}: the sidecar sent a malformed ncnn container ({exc})") from None
        net = ncnn.Net()
        for name, value in options.items():
            if not hasattr(net.opt, name):
                raise TypeError(f"ncnn_net: ncnn.Option has no {name!r}")
            setattr(net.opt, name, value)
        # The layout must add up before ncnn reads a byte: ncnn checks most reads, but not all (a
        # short int8 scale crashes it), so a .param that does not match its .bin never reaches it.
        view = memoryview(loaded.buffer)[weights]
        try:
            ncnn_index(parse_param(text, f"{model}.param"), lambda o, n: bytes(view[o:o + n]), len(view),
                       f"{model}.bin")
        finally:
            view.release()
        if net.load_param_mem(text) != 0:
            raise UnsupportedModel(f"model {model}: ncnn refused its .param (see ncnn's message above)")
        reader = _memory_reader(ncnn)(loaded.buffer, weights.start, weights.stop)
        if net.load_model(reader) != 0 or reader.pos != reader.end:
            raise UnsupportedModel(f"model {model}: ncnn could not load its weights "
                                   f"(read {reader.pos - weights.start} of {reader.end - weights.start} bytes)")
        return net
    finally:
        if reader is not None:
            reader.release()
        loaded.close()


_MEMORY_READER: Any = None


def _memory_reader(ncnn: Any) -> Any:
    """An ``ncnn.DataReader`` over ``buffer[start:end]``: ``read`` copies into ncnn's destination
    (a pointer handed over as a PyCapsule) and never past ``end``, so a wrong ``.param`` makes
    ncnn fail cleanly instead of reading beyond the buffer."""
    global _MEMORY_READER
    if _MEMORY_READER is not None:
        return _MEMORY_READER
    import ctypes

    import numpy as np

    pointer = ctypes.pythonapi.PyCapsule_GetPointer
    pointer.restype, pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    capsule_name = ctypes.pythonapi.PyCapsule_GetName
    capsule_name.restype, capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]

    class MemoryReader(ncnn.DataReader):  # type: ignore[misc]
        def __init__(self, buffer: mmap.mmap | bytearray, start: int, end: int) -> None:
            super().__init__()
            self.buffer = buffer
            self.array: Any = np.frombuffer(buffer, dtype=np.uint8) if len(buffer) else None
            self.base = int(self.array.ctypes.data) if self.array is not None else 0
            self.pos, self.end = start, end

        def read(self, buf: Any, size: int) -> int:
            n = max(0, min(int(size), self.end - self.pos))
            if n:
                ctypes.memmove(pointer(buf, capsule_name(buf)), self.base + self.pos, n)
                self.pos += n
            return n

        def release(self) -> None:
            """Drop the view of the buffer (so its mapping can close); zero a streamed copy."""
            if self.array is not None and isinstance(self.buffer, bytearray):
                ctypes.memset(self.base, 0, len(self.buffer))
            self.array = None

    _MEMORY_READER = MemoryReader
    return MemoryReader


def list_models(*, socket_path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    return list(request("list", socket_path=socket_path)["models"])


def status(*, socket_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    return request("status", socket_path=socket_path)
