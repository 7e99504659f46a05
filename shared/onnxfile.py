"""ONNX models: initializers located by walking the protobuf wire format directly.

No dependency and exact byte offsets: an initializer stored as ``raw_data`` is one contiguous
byte range of the file, which is all locking needs (see :mod:`layerlock.shared.formats`).  Initializers
stored as typed fields (``float_data``...) have no such range; :func:`normalize_onnx` rewrites
them as ``raw_data`` with the optional ``onnx`` package first.

The walker is defensive: every varint and length is bounded by the enclosing field before use,
and only the two levels it needs (ModelProto.graph, GraphProto.initializer) are descended, so a
hostile file can raise :class:`~layerlock.shared.errors.UnsupportedModel` but not recurse or read past its end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from layerlock.shared.errors import UnsupportedModel
from layerlock.shared.formats import ITEMSIZE, MAX_RANK, TensorInfo

# ONNX TensorProto.DataType -> our dtype code (types without a fixed byte layout are left out).
_ONNX_DTYPES = {1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL",
                10: "F16", 11: "F64", 12: "U32", 13: "U64", 16: "BF16", 17: "F8_E4M3", 19: "F8_E5M2"}


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
        if dtype is None or len(t.dims) > MAX_RANK or any(d < 0 for d in t.dims):
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
