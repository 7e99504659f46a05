"""Reading models safely: every supported input reduced to a plain file of byte ranges.

Every supported input is reduced to one shape: a *plain file* whose tensors each occupy one
contiguous byte range (:class:`TensorInfo`).  Locking then only ever overwrites byte ranges, so
the locked file keeps the plain file's exact header and layout -- it loads anywhere -- and
restoring is "copy the locked file, put the real bytes back", bit-exact by construction.

* ``.safetensors`` is already such a file; the header is parsed here (no numpy load) so a
  multi-GB model is never held in memory twice.
* ``.pt``/``.pth`` state dicts are read with ``torch.load(weights_only=True)`` only -- a pickle that
  needs anything more is refused, never unpickled -- and converted to safetensors bytes.
* ``.onnx``: initializers stored as ``raw_data`` are located by walking the protobuf wire format
  directly (no dependency, exact byte offsets).  Initializers stored as typed fields
  (``float_data``...) are first normalised to ``raw_data`` with the optional ``onnx`` package;
  the restored bytes are then that normalised serialization, which loads to the same model.
  The wire-format walker lives in :mod:`layerlock.shared.onnxfile`.
* ncnn: a ``.param`` (graph, text) + ``.bin`` (weights) pair; the ``.bin`` is the plain file (its
  blobs located from the ``.param``, :mod:`layerlock.shared.ncnnfile`), the ``.param`` its
  ``companion``, copied unchanged next to the locked ``.bin``.

The decoys written over locked ranges live in :mod:`layerlock.shared.decoys`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from layerlock.shared.errors import UnsupportedModel

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".onnx", ".param")  # .param: an ncnn pair, found by name
SAFETENSORS_HEADER_CAP = 100 * 1024 * 1024  # safetensors' own limit
MAX_RANK = 1024  # far above any real tensor; bounds the cost of multiplying out a hostile shape

# safetensors dtype code -> item size in bytes.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a plain or locked file (``offset`` is absolute)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class PlainModel:
    """A model reduced to a plain file: ``path`` holds bytes that restore must reproduce."""

    format: str  # "safetensors" | "onnx" | "ncnn"
    path: Path
    tensors: list[TensorInfo]
    temporary: bool  # path is a converted copy that the caller deletes
    companion: Path | None = None  # ncnn: the .param that describes path (the .bin)
    # Tensor names in the order the model runs them, where the input says (a state dict's own
    # order; ONNX graph order is read by :func:`layerlock.shared.plan.execution_order`).
    order: list[str] | None = None


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "pytorch"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".param", ".bin"):
        return "ncnn"
    raise UnsupportedModel(f"{path.name}: unknown model format {suffix or '(no suffix)'!r}; "
                           f"expected one of {', '.join(MODEL_SUFFIXES)}")


# --- safetensors -------------------------------------------------------------------------------
def safetensors_index(path: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header; tensors in file order with absolute offsets."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnsupportedModel(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_HEADER_CAP or 8 + n > size:
            raise UnsupportedModel(f"{path.name}: not a safetensors file (header length {n} out of range)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UnsupportedModel(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UnsupportedModel(f"{path.name}: safetensors header is not a JSON object")
    base = 8 + n
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors.append(_st_entry(path.name, name, entry, base, size))
    tensors.sort(key=lambda t: (t.offset, t.length))
    end = base
    for t in tensors:
        if t.offset < end and t.length:
            raise UnsupportedModel(f"{path.name}: tensor {_shown(t.name)} overlaps another tensor")
        end = max(end, t.offset + t.length)
    return tensors


def _st_entry(fname: str, name: str, entry: Any, base: int, size: int) -> TensorInfo:
    shown = _shown(name)
    if not isinstance(entry, dict):
        raise UnsupportedModel(f"{fname}: tensor {shown} has a malformed header entry")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise UnsupportedModel(f"{fname}: tensor {shown} has unsupported dtype {_shown(dtype)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(type(d) is int and d >= 0 for d in shape)):
        raise UnsupportedModel(f"{fname}: tensor {shown} has a malformed shape")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise UnsupportedModel(f"{fname}: tensor {shown} has malformed data_offsets")
    begin, stop = offs
    length = math.prod(shape) * ITEMSIZE[dtype]
    if begin < 0 or stop - begin != length or base + stop > size:
        raise UnsupportedModel(f"{fname}: tensor {shown} data_offsets do not match its shape or the file")
    return TensorInfo(name, dtype, tuple(shape), base + begin, length)


def _shown(value: object, limit: int = 80) -> str:
    """``repr`` of a value read from an untrusted file, cut short: messages end up in logs."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + "..."
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- PyTorch -----------------------------------------------------------------------------------
def pytorch_to_safetensors(path: Path) -> bytes:
    """A ``.pt``/``.pth`` state dict as safetensors bytes, read with ``weights_only=True`` only."""
    return pytorch_state(path)[0]


def pytorch_state(path: Path) -> tuple[bytes, list[str]]:
    """A ``.pt``/``.pth`` state dict as safetensors bytes, and its names in the dict's own order.

    Read with ``weights_only=True`` only.

    Why refuse instead of falling back: unpickling runs arbitrary code, and a model file from a
    customer or a model hub is exactly the untrusted input that exploits that.
    """
    try:
        import torch
        from safetensors.torch import save
    except ImportError:
        raise UnsupportedModel(f"{path.name}: reading PyTorch files needs torch; "
                               "install it (pip install 'layerlock[torch]') or convert to safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, zip errors...
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise UnsupportedModel(
                f"{path.name}: refusing to load: the pickle needs more than tensors (arbitrary code); "
                "save a plain state dict with torch.save(model.state_dict(), ...) or use safetensors") from None
        raise UnsupportedModel(f"{path.name}: not a readable PyTorch file ({type(exc).__name__})") from None
    state = _state_dict(obj, torch)
    if state is None:
        raise UnsupportedModel(f"{path.name}: not a state dict (expected a dict of name -> tensor, "
                               "optionally under 'state_dict' or 'model')")
    # Clone: tied weights share storage, which safetensors refuses; the copy is the price of safety.
    return bytes(save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})), list(state)


def _state_dict(obj: Any, torch: Any) -> dict[str, Any] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in obj.items()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if inner is not None and inner is not obj:
                found = _state_dict(inner, torch)
                if found is not None:
                    return found
    return None


# --- any input -> plain file ---------------------------------------------------------------------
def open_plain(src: Path, workdir: Path, weights: Path | None = None) -> PlainModel:
    """Reduce ``src`` to a plain file, converting into ``workdir`` when the bytes must change.

    ``weights``: an ncnn ``.param``'s ``.bin`` when it is not named like the ``.param``.
    """
    if not src.is_file():
        raise UnsupportedModel(f"{src}: no such file")
    fmt = detect_format(src)
    if weights is not None and fmt != "ncnn":
        raise UnsupportedModel(f"{src.name}: a second file is only taken with an ncnn .param (its .bin)")
    if fmt == "ncnn":
        from layerlock.shared.ncnnfile import open_ncnn  # imports this module: import here

        return open_ncnn(src, weights)
    if fmt == "safetensors":
        return PlainModel("safetensors", src, safetensors_index(src), temporary=False)
    if fmt == "pytorch":
        tmp = _temp_path(workdir, src, ".safetensors")
        data, order = pytorch_state(src)
        _write_new(tmp, data)
        try:
            return PlainModel("safetensors", tmp, safetensors_index(tmp), temporary=True, order=order)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    from layerlock.shared.onnxfile import normalize_onnx, onnx_index  # imports this module: import here

    buf = src.read_bytes()
    tensors, typed = onnx_index(buf, src.name)
    if not typed:
        return PlainModel("onnx", src, tensors, temporary=False)
    buf = normalize_onnx(buf, src.name)
    tensors, _ = onnx_index(buf, src.name)
    tmp = _temp_path(workdir, src, ".onnx")
    _write_new(tmp, buf)
    return PlainModel("onnx", tmp, tensors, temporary=True)


def _temp_path(workdir: Path, src: Path, suffix: str) -> Path:
    tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
    return workdir / f".{src.stem}.{tag}.plain{suffix}"


def create_new(path: Path) -> BinaryIO:
    """Open ``path`` for writing as a file this call creates (mode 0666 less the umask, like ``open``).

    Our temporaries have predictable names; a stale one (from a killed run) is removed first, and
    ``O_EXCL`` then refuses anything planted at the path in between -- a symlink is never followed,
    so protect cannot be tricked into overwriting another file through a shared output directory.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def _write_new(path: Path, data: bytes) -> None:
    with create_new(path) as fh:
        fh.write(data)
