"""Reading models safely, and writing the decoys that make a locked file predict garbage.

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
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UnsupportedModel

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".onnx")
SAFETENSORS_HEADER_CAP = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype code -> item size in bytes.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# dtype code -> numpy dtype used to read values (BF16 is read as raw uint16 and widened).
_NP: dict[str, str] = {
    "BOOL": "bool", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# ONNX TensorProto.DataType -> our dtype code (types without a fixed byte layout are left out).
_ONNX_DTYPES = {1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL",
                10: "F16", 11: "F64", 12: "U32", 13: "U64", 16: "BF16", 17: "F8_E4M3", 19: "F8_E5M2"}
_BLOCK_ELEMS = 1 << 22  # statistics and decoys are computed in blocks: memory stays flat


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

    format: str  # "safetensors" | "onnx"
    path: Path
    tensors: list[TensorInfo]
    temporary: bool  # path is a converted copy that the caller deletes


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "pytorch"
    if suffix == ".onnx":
        return "onnx"
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
            raise UnsupportedModel(f"{path.name}: tensor {t.name!r} overlaps another tensor")
        end = max(end, t.offset + t.length)
    return tensors


def _st_entry(fname: str, name: str, entry: Any, base: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise UnsupportedModel(f"{fname}: tensor {name!r} has a malformed header entry")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise UnsupportedModel(f"{fname}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise UnsupportedModel(f"{fname}: tensor {name!r} has a malformed shape")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise UnsupportedModel(f"{fname}: tensor {name!r} has malformed data_offsets")
    begin, stop = offs
    length = math.prod(shape) * ITEMSIZE[dtype]
    if begin < 0 or stop - begin != length or base + stop > size:
        raise UnsupportedModel(f"{fname}: tensor {name!r} data_offsets do not match its shape or the file")
    return TensorInfo(name, dtype, tuple(shape), base + begin, length)


# --- PyTorch -----------------------------------------------------------------------------------
def pytorch_to_safetensors(path: Path) -> bytes:
    """A ``.pt``/``.pth`` state dict as safetensors bytes, read with ``weights_only=True`` only.

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
    return bytes(save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}))


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


# --- ONNX: a minimal protobuf walker ------------------------------------------------------------
def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field, wire type, start, stop); for varints start is the value and stop the next pos."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == 1 or wire == 5:
            stop = pos + (8 if wire == 1 else 4)
            if stop > end:
                raise ValueError("truncated fixed field")
            yield field, wire, pos, stop
            pos = stop
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("truncated length-delimited field")
            yield field, wire, pos, pos + n
            pos += n
        else:
            raise ValueError(f"unsupported wire type {wire}")


@dataclass
class _OnnxInit:
    name: str
    dtype: int
    dims: list[int]
    raw: tuple[int, int] | None
    typed: bool
    external: bool


def _onnx_tensor(buf: bytes, start: int, stop: int) -> _OnnxInit:
    t = _OnnxInit("", 0, [], None, False, False)
    for field, wire, a, b in _fields(buf, start, stop):
        if field == 1 and wire == 0:
            t.dims.append(a - (1 << 64) if a >= 1 << 63 else a)
        elif field == 1 and wire == 2:
            p = a
            while p < b:
                v, p = _varint(buf, p, b)
                t.dims.append(v - (1 << 64) if v >= 1 << 63 else v)
        elif field == 2 and wire == 0:
            t.dtype = a
        elif field == 8 and wire == 2:
            t.name = buf[a:b].decode("utf-8", errors="replace")
        elif field == 9 and wire == 2:
            t.raw = (a, b - a)
        elif field in (4, 5, 6, 7, 10, 11) and b > a:
            t.typed = True
        elif field == 14 and wire == 0:
            t.external = a == 1
    return t


def _onnx_initializers(buf: bytes) -> list[_OnnxInit]:
    inits: list[_OnnxInit] = []
    graphs = 0
    for field, wire, a, b in _fields(buf, 0, len(buf)):
        if field == 7 and wire == 2:
            graphs += 1
            for gf, gw, ga, gb in _fields(buf, a, b):
                if gf == 5 and gw == 2:
                    inits.append(_onnx_tensor(buf, ga, gb))
    if not graphs:
        raise ValueError("no graph")
    return inits


def onnx_index(buf: bytes, fname: str = "model.onnx") -> tuple[list[TensorInfo], bool]:
    """Raw-data initializers of an ONNX model, and whether typed-field ones need normalising."""
    try:
        inits = _onnx_initializers(buf)
    except (ValueError, UnicodeDecodeError):
        raise UnsupportedModel(f"{fname}: not an ONNX model (protobuf does not parse as a ModelProto)") from None
    if any(t.external for t in inits):
        raise UnsupportedModel(f"{fname}: ONNX external data is not supported; "
                               "save the model with all initializers inside the file")
    tensors, typed = [], False
    for t in inits:
        dtype = _ONNX_DTYPES.get(t.dtype)
        if dtype is None or any(d < 0 for d in t.dims):
            continue
        if t.raw is None:
            typed = typed or t.typed
            continue
        if t.raw[1] != math.prod(t.dims) * ITEMSIZE[dtype]:
            continue
        tensors.append(TensorInfo(t.name, dtype, tuple(t.dims), t.raw[0], t.raw[1]))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise UnsupportedModel(f"{fname}: duplicate initializer names")
    tensors.sort(key=lambda t: t.offset)
    return tensors, typed


def normalize_onnx(buf: bytes, fname: str = "model.onnx") -> bytes:
    """Re-serialize with every typed-field initializer as ``raw_data`` (needs the onnx package)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UnsupportedModel(f"{fname}: initializers stored as typed fields need the onnx package "
                               "(pip install 'layerlock[onnx]')") from None
    try:
        model = onnx.load_from_string(buf)
    except Exception:  # noqa: BLE001 - DecodeError and friends
        raise UnsupportedModel(f"{fname}: not a valid ONNX model") from None
    for i, t in enumerate(model.graph.initializer):
        if not t.HasField("raw_data") and t.data_type in _ONNX_DTYPES:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    return bytes(model.SerializeToString())


# --- any input -> plain file ---------------------------------------------------------------------
def open_plain(src: Path, workdir: Path) -> PlainModel:
    """Reduce ``src`` to a plain file, converting into ``workdir`` when the bytes must change."""
    if not src.is_file():
        raise UnsupportedModel(f"{src}: no such file")
    fmt = detect_format(src)
    if fmt == "safetensors":
        return PlainModel("safetensors", src, safetensors_index(src), temporary=False)
    if fmt == "pytorch":
        tmp = _temp_path(workdir, src, ".safetensors")
        tmp.write_bytes(pytorch_to_safetensors(src))
        try:
            return PlainModel("safetensors", tmp, safetensors_index(tmp), temporary=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    buf = src.read_bytes()
    tensors, typed = onnx_index(buf, src.name)
    if not typed:
        return PlainModel("onnx", src, tensors, temporary=False)
    buf = normalize_onnx(buf, src.name)
    tensors, _ = onnx_index(buf, src.name)
    tmp = _temp_path(workdir, src, ".onnx")
    tmp.write_bytes(buf)
    return PlainModel("onnx", tmp, tensors, temporary=True)


def _temp_path(workdir: Path, src: Path, suffix: str) -> Path:
    tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
    return workdir / f".{src.stem}.{tag}.plain{suffix}"


# --- decoys --------------------------------------------------------------------------------------
def _values(block: memoryview, dtype: str) -> np.ndarray:
    arr = np.frombuffer(block, dtype=_NP[dtype])
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def tensor_stats(view: memoryview, dtype: str) -> tuple[float, float]:
    """Mean and standard deviation of finite values, in blocks (Chan's parallel variance)."""
    if dtype not in _NP:
        return 0.0, 1.0
    item = ITEMSIZE[dtype]
    n, mean, m2 = 0, 0.0, 0.0
    step = _BLOCK_ELEMS * item
    for start in range(0, len(view), step):
        x = _values(view[start:start + step], dtype).astype(np.float64)
        if dtype in FLOAT_DTYPES:
            x = x[np.isfinite(x)]
        k = int(x.size)
        if not k:
            continue
        bm = float(x.mean())
        bm2 = float(((x - bm) ** 2).sum())
        delta = bm - mean
        total = n + k
        mean += delta * k / total
        m2 += bm2 + delta * delta * n * k / total
        n = total
    if not n:
        return 0.0, 1.0
    return mean, math.sqrt(m2 / n)


def decoy_blocks(info: TensorInfo, mean: float, std: float, rng: np.random.Generator) -> Iterator[bytes]:
    """Random values with the tensor's mean and std, cast to its dtype, block by block.

    Matching the statistics keeps the locked file plausible (no all-zero layer that shouts
    "locked here", activations in a sane range) while the values carry no information.
    """
    item = ITEMSIZE[info.dtype]
    remaining = info.numel
    while remaining:
        n = min(remaining, _BLOCK_ELEMS)
        remaining -= n
        if info.dtype not in _NP:  # float8: no numpy type; random bytes are as good a decoy
            yield rng.bytes(n * item)
            continue
        if info.dtype == "BOOL":
            yield (rng.random(n) < mean).tobytes()
            continue
        x: np.ndarray[Any, Any]
        if info.dtype in ("F16", "BF16", "F32"):  # float32 draws: twice as fast, precision to spare
            x = rng.standard_normal(n, dtype=np.float32)
            x *= np.float32(std)
            x += np.float32(mean)
        else:
            x = rng.normal(mean, std, n)
        if info.dtype == "BF16":
            bits = x.astype(np.float32).view(np.uint32)
            yield ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        elif info.dtype in FLOAT_DTYPES:
            lim = float(np.finfo(_NP[info.dtype]).max)
            yield np.clip(x, -lim, lim).astype(_NP[info.dtype]).tobytes()
        else:
            ii = np.iinfo(_NP[info.dtype])
            lo, hi = max(float(ii.min), -(2.0 ** 62)), min(float(ii.max), 2.0 ** 62)
            yield np.clip(np.rint(x), lo, hi).astype(_NP[info.dtype]).tobytes()
