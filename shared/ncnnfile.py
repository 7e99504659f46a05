"""ncnn models: a ``.param`` (the graph, text) and a ``.bin`` (the weights), located exactly.

An ncnn model is two files.  The ``.param`` is text::

    7767517                                   magic
    4 4                                       layer count, blob count
    Input        in0  0 1 in0 0=64            type name #in #out in-blobs out-blobs key=value...
    InnerProduct fc1  1 1 in0 h1 0=64 1=1 2=4096

and the ``.bin`` is nothing but the concatenation of every layer's weight blobs, in ``.param``
order, with no index of its own: where a blob starts follows only from the sizes of all blobs
before it, and those follow from each layer's type and parameters (ncnn's ``load_model`` of that
layer type).  A blob is loaded either *raw* (float32, no header: biases, BatchNorm statistics,
scales) or *tagged*: a 4-byte little-endian storage tag first, then

* ``0x00000000`` or ``0x0002C056``: float32 data;
* ``0x01306B47``: float16 data, padded to 4 bytes;
* ``0x000D4B38``: int8 data, padded to 4 bytes;
* any other non-zero tag: a 256-entry float32 table, then one uint8 index per value, padded.

(ncnn's ``src/modelbin.cpp``; docs/developer-guide/param-and-model-file-structure.md.)

So locking an ncnn model is like locking any other format here: every blob is a contiguous byte
range of the ``.bin`` (:class:`~layerlock.shared.formats.TensorInfo`, the data only -- tags and
padding stay as they are, so the locked ``.bin`` still loads in ncnn), and locked ranges get
decoys.  The ``.param`` is not secret and stays clear; the bundle binds its SHA-256.

Only layer types whose weight layout is known here are accepted: the ones that load no weights
at all, and :data:`WEIGHT_LAYERS`.  Any other type (``LSTM``, ``Gemm``, a custom layer...) makes
every later offset unknowable, so such a model is refused with the type named; the total must
also come out at exactly the ``.bin``'s size.  Parsing is defensive: a hostile pair can only
raise :class:`~layerlock.shared.errors.UnsupportedModel`.

The sidecar serves the pair as one *container* (:func:`container_head`, :func:`split_container`):
the ``.param`` text, NUL-terminated (ncnn's ``load_param_mem`` takes a C string), then the
``.bin`` bytes 64-byte aligned (ncnn's ``load_model(const unsigned char*)`` wants aligned memory).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerlock.shared.errors import UnsupportedModel
from layerlock.shared.formats import PlainModel, TensorInfo

MAGIC = "7767517"
PARAM_SUFFIX, BIN_SUFFIX = ".param", ".bin"
PARAM_CAP = 16 * 1024 * 1024  # real .param files are kilobytes; bounds what we read and hash
MAX_LAYERS = 1_000_000
MAX_PARAM_ID = 31  # ncnn's NCNN_MAX_PARAM_COUNT is 32
TAG_F32, TAG_F32_ALIGNED, TAG_F16, TAG_I8 = 0x00000000, 0x0002C056, 0x01306B47, 0x000D4B38

# Layer types whose load_model reads nothing from the .bin (ncnn's src/layer/*.cpp without one).
WEIGHTLESS = frozenset("""
AbsVal ArgMax BNLL BinaryOp CELU Cast Clip Concat CopyTo Crop CumulativeSum DeepCopy DetectionOutput
Diag Dropout ELU Einsum Eltwise Erf Exp ExpandDims Flatten Flip Fold GELU GLU GridSample HardSigmoid
HardSwish Input Interp InverseSpectrogram LRN Log MVN MatMul Mish Noop PSROIPooling Packing Permute
PixelShuffle Pooling Pooling1D Pooling3D Power PriorBox Proposal ROIAlign ROIPooling ReLU Reduction
Reorg Reshape RotaryEmbed SDPA SELU SPP Shrink ShuffleChannel Sigmoid Slice Softmax Softplus
Spectrogram Split Squeeze StatisticsPooling Swish TanH Threshold Tile UnaryOp Unfold
YoloDetectionOutput Yolov3DetectionOutput
""".split())  # noqa: SIM905 - a table, read as one


@dataclass(frozen=True)
class NcnnLayer:
    """One layer line of a ``.param``: its type, name and raw ``key=value`` parameters."""

    type: str
    name: str
    params: dict[int, str]
    index: int

    def get_int(self, key: int, default: int) -> int:
        """An integer parameter as ncnn's ``ParamDict::get(key, int)`` reads it."""
        raw = self.params.get(key)
        if raw is None:
            return default
        if not re.fullmatch(r"-?[0-9]{1,10}", raw):
            raise UnsupportedModel(f"layer {_shown(self.name)} ({self.type}): parameter {key}={_shown(raw)} "
                                   "is not an integer")
        return int(raw)


@dataclass(frozen=True)
class _Blob:
    suffix: str  # tensor name = layer name + "." + suffix
    count: int  # number of values
    tagged: bool  # ModelBin::load(w, 0): storage tag first; else load(w, 1): raw float32
    shape: tuple[int, ...]


def _shown(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --- the .param ------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    """Whitespace-separated tokens, a quoted string value (``4="a b"``) kept as one token."""
    out: list[str] = []
    words = iter(text.split())
    for tok in words:
        eq = tok.find("=")
        if eq > 0 and tok[eq + 1:eq + 2] == '"' and (len(tok) == eq + 2 or not tok.endswith('"')):
            for more in words:
                tok += " " + more
                if more.endswith('"'):
                    break
        out.append(tok)
    return out


def parse_param(text: str, fname: str = "model.param") -> list[NcnnLayer]:
    """The layers of a text ``.param``, read the way ncnn's ``Net::load_param`` reads them."""
    toks = _tokens(text)
    if not toks or toks[0] != MAGIC:
        raise UnsupportedModel(f"{fname}: not an ncnn .param (the first word must be the magic {MAGIC}; "
                               "binary .param.bin files are not supported)")
    if len(toks) < 3 or not (toks[1].isdigit() and toks[2].isdigit()):
        raise UnsupportedModel(f"{fname}: malformed ncnn .param (no layer and blob counts after the magic)")
    count = int(toks[1])
    if not 0 < count <= MAX_LAYERS or int(toks[2]) <= 0:
        raise UnsupportedModel(f"{fname}: malformed ncnn .param (layer count {count}, blob count {toks[2]})")
    pos = 3
    layers: list[NcnnLayer] = []
    names: set[str] = set()
    for index in range(count):
        if pos + 4 > len(toks):
            raise UnsupportedModel(f"{fname}: truncated ncnn .param: {count} layers announced, {index} found")
        kind, name, nin, nout = toks[pos:pos + 4]
        if not (nin.isdigit() and nout.isdigit()):
            raise UnsupportedModel(f"{fname}: layer {_shown(name)} ({_shown(kind)}) has malformed blob counts")
        pos += 4 + int(nin) + int(nout)
        if pos > len(toks):
            raise UnsupportedModel(f"{fname}: truncated ncnn .param in layer {_shown(name)}")
        params: dict[int, str] = {}
        while pos < len(toks) and (m := re.fullmatch(r"(-?[0-9]{1,6})=(.*)", toks[pos], flags=re.S)):
            key = int(m[1])
            key = -key - 23300 if key <= -23300 else key  # old-style array: -23300 - id
            if not 0 <= key <= MAX_PARAM_ID:
                raise UnsupportedModel(f"{fname}: layer {_shown(name)}: parameter id {m[1]} out of range")
            params[key] = m[2]
            pos += 1
        if name in names:
            raise UnsupportedModel(f"{fname}: layer name {_shown(name)} appears twice")
        names.add(name)
        layers.append(NcnnLayer(kind, name, params, index))
    return layers


# --- which blobs each layer type loads (ncnn's src/layer/<type>.cpp, load_param + load_model) -------
def _matrix(n: int, size: int) -> tuple[int, ...]:
    return (n, size // n) if n > 0 and size % n == 0 else (size,)


def _kernel(n: int, size: int, kh: int, kw: int) -> tuple[int, ...]:
    k = n * kh * kw
    return (n, size // k, kh, kw) if k > 0 and size % k == 0 else _matrix(n, size)


def _weights(n: int, size: int, shape: tuple[int, ...], bias: bool) -> list[_Blob]:
    blobs = [_Blob("weight", size, True, shape)]
    if bias:
        blobs.append(_Blob("bias", n, False, (n,)))
    return blobs


def _inner_product(layer: NcnnLayer) -> list[_Blob]:
    n, size = layer.get_int(0, 0), layer.get_int(2, 0)
    blobs = _weights(n, size, _matrix(n, size), layer.get_int(1, 0) != 0)
    if layer.get_int(8, 0):
        blobs += [_Blob("weight_int8_scales", n, False, (n,)), _Blob("input_int8_scales", 1, False, (1,))]
    return blobs


def _convolution(layer: NcnnLayer) -> list[_Blob]:
    if layer.get_int(19, 0):  # dynamic_weight: the weights are an input blob
        return []
    n, kw, size, int8 = layer.get_int(0, 0), layer.get_int(1, 0), layer.get_int(6, 0), layer.get_int(8, 0)
    blobs = _weights(n, size, _kernel(n, size, layer.get_int(11, kw), kw), layer.get_int(5, 0) != 0)
    if int8:
        blobs += [_Blob("weight_int8_scales", n, False, (n,)), _Blob("input_int8_scales", 1, False, (1,))]
    if int8 > 100:
        blobs.append(_Blob("output_int8_scales", 1, False, (1,)))
    return blobs


def _convolution_depthwise(layer: NcnnLayer) -> list[_Blob]:
    if layer.get_int(19, 0):
        return []
    n, kw, size = layer.get_int(0, 0), layer.get_int(1, 0), layer.get_int(6, 0)
    group, int8 = layer.get_int(7, 1), layer.get_int(8, 0)
    blobs = _weights(n, size, _kernel(n, size, layer.get_int(11, kw), kw), layer.get_int(5, 0) != 0)
    if int8 in (1, 101):
        blobs += [_Blob("weight_int8_scales", group, False, (group,)), _Blob("input_int8_scales", 1, False, (1,))]
    elif int8 in (2, 102):
        blobs += [_Blob("weight_int8_scales", 1, False, (1,)), _Blob("input_int8_scales", 1, False, (1,))]
    if int8 > 100:
        blobs.append(_Blob("output_int8_scales", 1, False, (1,)))
    return blobs


def _deconvolution(layer: NcnnLayer) -> list[_Blob]:
    if layer.get_int(28, 0):
        return []
    n, kw, size = layer.get_int(0, 0), layer.get_int(1, 0), layer.get_int(6, 0)
    return _weights(n, size, _kernel(n, size, layer.get_int(11, kw), kw), layer.get_int(5, 0) != 0)


def _raw(*suffixes: str, key: int, default: int = 0, when: tuple[int, int] | None = None) -> Callable[
        [NcnnLayer], list[_Blob]]:
    """Layers that load ``len(suffixes)`` raw float32 blobs of param ``key`` values each
    (only if param ``when[0]`` -- default ``when[1]`` -- is non-zero)."""
    def blobs(layer: NcnnLayer) -> list[_Blob]:
        if when is not None and not layer.get_int(*when):
            return []
        n = layer.get_int(key, default)
        return [] if n == 0 else [_Blob(s, n, False, (n,)) for s in suffixes]
    return blobs


def _scale(layer: NcnnLayer) -> list[_Blob]:
    n = layer.get_int(0, 0)
    if n == -233:  # scale from a second input blob
        return []
    return [_Blob("scale", n, False, (n,))] + ([_Blob("bias", n, False, (n,))] if layer.get_int(1, 0) else [])


def _memory_data(layer: NcnnLayer) -> list[_Blob]:
    w, h, d, c = layer.get_int(0, 0), layer.get_int(1, 0), layer.get_int(11, 0), layer.get_int(2, 0)
    dims = (c, d, h, w) if d else (c, h, w) if c else (h, w) if h else (w,) if w else ()
    if not dims:
        return []
    return [_Blob("data", math.prod(dims), layer.get_int(21, 1) == 0, dims)]


WEIGHT_LAYERS: dict[str, Callable[[NcnnLayer], list[_Blob]]] = {
    "InnerProduct": _inner_product,
    "Convolution": _convolution,
    "ConvolutionDepthWise": _convolution_depthwise,
    "Deconvolution": _deconvolution,
    "DeconvolutionDepthWise": _deconvolution,
    "BatchNorm": _raw("slope", "mean", "var", "bias", key=0),
    "Bias": _raw("bias", key=0),
    "PReLU": _raw("slope", key=0),
    "Scale": _scale,
    "MemoryData": _memory_data,
    "LayerNorm": _raw("gamma", "beta", key=0, when=(2, 1)),
    "InstanceNorm": _raw("gamma", "beta", key=0, when=(2, 1)),
    "GroupNorm": _raw("gamma", "beta", key=1, when=(3, 1)),
    "Padding": _raw("pad", key=6),
}


def _align4(n: int) -> int:
    return (n + 3) & ~3


# --- the .bin --------------------------------------------------------------------------------------
def ncnn_index(layers: list[NcnnLayer], read: Callable[[int, int], bytes], size: int,
               fname: str = "model.bin") -> list[TensorInfo]:
    """Every weight blob of the ``.bin`` (``size`` bytes; ``read(offset, n)`` reads it) as a tensor.

    Raises UnsupportedModel naming the first layer type whose weights cannot be located, and
    when the blobs do not end exactly at the end of the file.
    """
    tensors: list[TensorInfo] = []
    pos = 0
    for layer in layers:
        if layer.type in WEIGHTLESS:
            continue
        spec = WEIGHT_LAYERS.get(layer.type)
        if spec is None:
            raise UnsupportedModel(
                f"{fname}: layer {_shown(layer.name)} is of type {layer.type!r}, whose weights layerlock cannot "
                f"locate in the .bin (supported with weights: {', '.join(sorted(WEIGHT_LAYERS))})")
        for blob in spec(layer):
            if not 0 < blob.count <= size:
                raise UnsupportedModel(f"{fname}: layer {_shown(layer.name)} ({layer.type}) declares a weight of "
                                       f"{blob.count} values, impossible in a {size}-byte .bin")
            name = f"{layer.name}.{blob.suffix}"
            if not blob.tagged:
                tensors.append(TensorInfo(name, "F32", blob.shape, pos, 4 * blob.count))
                pos += 4 * blob.count
            else:
                if pos + 4 > size:
                    raise _truncated(fname, layer, pos + 4, size)
                (tag,) = struct.unpack("<I", read(pos, 4))
                pos += 4
                if tag in (TAG_F32, TAG_F32_ALIGNED):
                    tensors.append(TensorInfo(name, "F32", blob.shape, pos, 4 * blob.count))
                    pos += 4 * blob.count
                elif tag == TAG_F16:
                    tensors.append(TensorInfo(name, "F16", blob.shape, pos, 2 * blob.count))
                    pos += _align4(2 * blob.count)
                elif tag == TAG_I8:
                    tensors.append(TensorInfo(name, "I8", blob.shape, pos, blob.count))
                    pos += _align4(blob.count)
                else:  # any other tag: a 256-entry value table, then one index per value
                    tensors.append(TensorInfo(f"{name}_table", "F32", (256,), pos, 1024))
                    tensors.append(TensorInfo(name, "U8", blob.shape, pos + 1024, blob.count))
                    pos += 1024 + _align4(blob.count)
            if pos > size:
                raise _truncated(fname, layer, pos, size)
    if pos != size:
        raise UnsupportedModel(f"{fname}: {size - pos} bytes after the last weight its .param describes "
                               "(the .bin does not belong to this .param)")
    return tensors


def _truncated(fname: str, layer: NcnnLayer, need: int, size: int) -> UnsupportedModel:
    return UnsupportedModel(f"{fname}: truncated .bin: layer {_shown(layer.name)} ({layer.type}) needs at least "
                            f"{need} bytes, the file has {size} (or the .bin does not belong to its .param)")


# --- a pair of files -------------------------------------------------------------------------------
def pair_paths(src: Path, weights: Path | None = None) -> tuple[Path, Path]:
    """(``.param``, ``.bin``) for ``src`` (either one) and the optional explicit weights file."""
    if src.suffix.lower() == BIN_SUFFIX and weights is None:
        param = src.with_suffix(PARAM_SUFFIX)
        if not param.is_file():
            raise UnsupportedModel(f"{src.name}: unknown model format '.bin' (an ncnn .bin needs its .param: "
                                   f"no {param.name} next to it)")
        return param, src
    if src.suffix.lower() != PARAM_SUFFIX:
        raise UnsupportedModel(f"{src.name}: an ncnn model is given as its .param (and optionally its .bin)")
    bin_path = weights if weights is not None else src.with_suffix(BIN_SUFFIX)
    if not bin_path.is_file():
        raise UnsupportedModel(f"{src.name}: its weights {bin_path.name} do not exist "
                               "(an ncnn model is a .param + .bin pair; give the .bin as a second argument)")
    return src, bin_path


def read_param(path: Path) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(PARAM_CAP + 1)
    if len(data) > PARAM_CAP:
        raise UnsupportedModel(f"{path.name}: larger than {PARAM_CAP} bytes; not an ncnn .param")
    return data


def decode_param(data: bytes, fname: str) -> str:
    if b"\0" in data:
        raise UnsupportedModel(f"{fname}: not an ncnn .param (binary data; .param.bin files are not supported)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedModel(f"{fname}: not an ncnn .param (not UTF-8 text)") from None


def index_pair(param: Path, bin_path: Path) -> list[TensorInfo]:
    """The tensors of the ``.bin`` as the ``.param`` lays them out."""
    layers = parse_param(decode_param(read_param(param), param.name), param.name)
    size = bin_path.stat().st_size
    with bin_path.open("rb") as fh:
        def read(offset: int, n: int) -> bytes:
            fh.seek(offset)
            return fh.read(n)
        return ncnn_index(layers, read, size, bin_path.name)


def open_ncnn(src: Path, weights: Path | None = None) -> PlainModel:
    """An ncnn pair as a plain model: the ``.bin`` is the file locked, the ``.param`` its companion."""
    param, bin_path = pair_paths(src, weights)
    return PlainModel("ncnn", bin_path, index_pair(param, bin_path), temporary=False, companion=param)


# --- the container the sidecar serves ----------------------------------------------------------------
CONTAINER_MAGIC = b"LLKNCNN1"
_HEAD = struct.Struct("<8sQQQQ")  # magic, param offset, param length, bin offset, bin length
HEAD_SIZE = 64
ALIGN = 64


def container_layout(param_len: int, bin_len: int) -> tuple[int, int, int]:
    """(param offset, bin offset, total size) of a container holding these two parts."""
    bin_off = -(-(HEAD_SIZE + param_len + 1) // ALIGN) * ALIGN
    return HEAD_SIZE, bin_off, bin_off + bin_len


def container_head(param: bytes, bin_len: int) -> bytes:
    """Everything before the ``.bin`` bytes: header, ``.param`` text, NUL, zero padding."""
    param_off, bin_off, _ = container_layout(len(param), bin_len)
    head = _HEAD.pack(CONTAINER_MAGIC, param_off, len(param), bin_off, bin_len)
    out = head + bytes(HEAD_SIZE - len(head)) + param
    return out + bytes(bin_off - len(out))


def split_container(buf: bytes | bytearray | memoryview | mmap.mmap) -> tuple[slice, slice]:
    """(``.param`` slice, ``.bin`` slice) of a container; ValueError if it is malformed."""
    if len(buf) < HEAD_SIZE:
        raise ValueError("ncnn container is shorter than its header")
    magic, param_off, param_len, bin_off, bin_len = _HEAD.unpack_from(buf, 0)
    if magic != CONTAINER_MAGIC:
        raise ValueError("not an ncnn container (bad magic)")
    if not (param_off >= HEAD_SIZE and param_off + param_len < bin_off and bin_off + bin_len == len(buf)):
        raise ValueError("ncnn container offsets do not fit its size")
    return slice(param_off, param_off + param_len), slice(bin_off, bin_off + bin_len)
