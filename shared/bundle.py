"""The ``.llk`` bundle container: its layout, the header's JSON, and the defensive parser.

Layout (all integers big-endian)::

    magic "LLKBNDL\\n" | u16 version | u32 header length | header (canonical JSON)
    | key check (32 bytes) | chunk 0 | chunk 1 | ... | chunk N-1

The header lists the locked tensors (name, dtype, shape, offset, length in the locked file),
the sizes that fix the chunk layout, the per-bundle salt and the locked file's digest and MAC.
An ncnn bundle (the locked file is the ``.bin``) also binds the SHA-256 of its ``.param``.

Version 3 adds ``fingerprint``: ``[{"tensor": i, "index": base64url of uint32 LE}, ...]``, the
flat element indices (sorted) of locked tensor ``i`` whose real values are *not* in the payload
(decoys are): each license's token carries its own values for them
(:mod:`layerlock.shared.fingerprint`).  A version 3 header may have runs too.

Version 2 (written only when a lock covers part of a tensor: rows, columns, single elements)
adds ``runs`` to a tensor entry: a flat list ``[start, length, start, length, ...]`` of byte
ranges relative to the tensor's offset, sorted and disjoint.  Only those bytes are locked (and
in the payload); the rest of the tensor is the locked file's own.  A bundle with whole tensors
only is still written, and read, as version 1.
The chunks themselves are sealed and opened by :mod:`layerlock.shared.chunks`.

Parsing is defensive: every length and offset read from an untrusted bundle is bounded before it
is used, and a malformed bundle can only ever raise a :class:`~layerlock.shared.errors.BundleFormatError`.
A header is *sanity-checked* here but only *authenticated* once a data key checks it
(:func:`layerlock.shared.chunks.key_check`).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerlock.shared.errors import BundleFormatError, LockError
from layerlock.shared.formats import ITEMSIZE, TensorInfo
from layerlock.shared.ids import is_model_id

MAGIC = b"LLKBNDL\n"
VERSION = 1
VERSION_RUNS = 2  # some tensor entries carry "runs" (a lock below whole tensors)
VERSION_FP = 3  # a "fingerprint" member: positions the license server's token fills in
FP_CAP = 65536  # fingerprint positions in one bundle
RUN_CAP = 4_000_000  # runs in one bundle; the header cap bounds them too
SUITE = "AES-256-GCM"
KDF = "HKDF-SHA256"
FORMATS = ("safetensors", "onnx", "ncnn")
PREFIX = struct.Struct(">8sHI")
HEADER_CAP = 32 * 1024 * 1024
TENSOR_CAP = 500_000
NAME_CAP = 4096
RANK_CAP = 64
MIN_CHUNK, MAX_CHUNK = 16, 64 * 1024 * 1024
DEFAULT_CHUNK = 1 << 20
TAG = 16  # AES-GCM tag per chunk
CHECK = 32  # HMAC-SHA256 key check after the header
SALT = 16

BundleSource = Path | str | bytes | bytearray | memoryview


@dataclass(frozen=True)
class BundleHeader:
    """A parsed, sanity-checked bundle header (authenticated only once a key checks it)."""

    version: int
    model_id: str
    format: str
    locked_digest: str  # hex sha256 of the locked file
    locked_size: int
    plain_size: int  # total bytes of the locked tensors (the encrypted payload)
    chunk_size: int
    chunk_count: int
    suite: str
    salt: bytes
    tensors: tuple[TensorInfo, ...]
    digest: bytes  # sha256 of magic..header: bound into every chunk's AAD
    header_size: int  # bytes before the key check
    locked_mac: bytes  # AES-GMAC tag of the locked file (key from the data key): what restore checks
    # ncnn only: hex sha256 of the .param the locked .bin goes with (authenticated with the header)
    param_digest: str | None = None
    # Version 2: per tensor, the locked byte runs (absolute offset, length); None = the whole tensor.
    runs: tuple[tuple[tuple[int, int], ...] | None, ...] = ()
    # Version 3: (index into ``tensors``, sorted flat element indices) of the fingerprint positions.
    fingerprint: tuple[tuple[int, array[int]], ...] = ()

    def fingerprint_sites(self) -> list[tuple[int, int, array[int]]]:
        """(absolute byte offset of the tensor, item size, element indices) per fingerprint site."""
        return [(self.tensors[i].offset, ITEMSIZE[self.tensors[i].dtype], idx) for i, idx in self.fingerprint]

    @property
    def fingerprint_bytes(self) -> int:
        """Bytes of fingerprint values a token must carry for this bundle (0: none)."""
        return sum(ITEMSIZE[self.tensors[i].dtype] * len(idx) for i, idx in self.fingerprint)

    def spans(self) -> list[tuple[int, int]]:
        """Every locked byte range of the locked file (absolute offset, length), in file order."""
        if not self.runs:
            return [(t.offset, t.length) for t in self.tensors]
        out: list[tuple[int, int]] = []
        for t, runs in zip(self.tensors, self.runs, strict=True):
            out.extend(runs if runs is not None else ((t.offset, t.length),))
        return out

    @property
    def bundle_size(self) -> int:
        return self.header_size + CHECK + self.plain_size + TAG * self.chunk_count

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.plain_size - index * self.chunk_size)


def chunk_count(plain_size: int, chunk_size: int) -> int:
    """Chunks needed for ``plain_size`` bytes; at least one (an empty payload is one empty chunk)."""
    return max(1, -(-plain_size // chunk_size))


# --- writing ---------------------------------------------------------------------------------------
def representable(t: TensorInfo, file_size: int) -> bool:
    """Whether a bundle header can list ``t`` (parsing would accept it): protect locks only these.

    Without this a model with, say, a tensor named ``""`` or of rank > ``RANK_CAP`` would be locked
    into a bundle that no restore can read.
    """
    try:
        t.name.encode()
        _tensor(_entry(t), file_size)
    except (BundleFormatError, UnicodeEncodeError):
        return False
    return True


def _entry(t: TensorInfo, runs: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                             "length": t.length}
    if runs is not None:
        entry["runs"] = [v for run in runs for v in run]
    return entry


def header_bytes(model_id: str, fmt: str, locked_digest: str, locked_mac: bytes, locked_size: int,
                 plain_size: int, chunk_size: int, salt: bytes, locked: list[TensorInfo],
                 param_digest: str | None = None,
                 runs: dict[str, list[tuple[int, int]]] | None = None,
                 fingerprint: dict[str, Any] | None = None) -> bytes:
    """Magic, version, length and the canonical JSON header: everything before the key check.

    ``param_digest`` (ncnn only, and required there): the .param's sha256, so the sidecar serves
    the locked .bin only with the graph it was protected with.  ``runs``: tensor name -> locked
    byte runs (start relative to the tensor, length) for tensors locked only in part; any makes
    the bundle version 2.  ``fingerprint``: tensor name -> flat element indices whose values the
    payload does not hold (version 3).
    """
    if (fmt == "ncnn") != (param_digest is not None):
        raise LockError("an ncnn bundle, and only an ncnn bundle, binds the digest of its .param")
    doc = {
        "model_id": model_id, "format": fmt, "locked_digest": locked_digest, "locked_mac": locked_mac.hex(),
        "locked_size": locked_size,
        "plain_size": plain_size, "chunk_size": chunk_size, "chunk_count": chunk_count(plain_size, chunk_size),
        "suite": SUITE, "kdf": KDF, "salt": salt.hex(),
        "tensors": [_entry(t, (runs or {}).get(t.name)) for t in locked],
    }
    if param_digest is not None:
        doc["param_digest"] = param_digest
    if fingerprint:
        names = [t.name for t in locked]
        doc["fingerprint"] = [{"tensor": names.index(name), "index": _b64(_u32(idx))}
                              for name, idx in sorted(fingerprint.items(), key=lambda kv: names.index(kv[0]))]
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if len(body) > HEADER_CAP:
        raise LockError(f"bundle header would be {len(body)} bytes, over the {HEADER_CAP}-byte cap")
    version = VERSION_FP if fingerprint else VERSION_RUNS if runs else VERSION
    return PREFIX.pack(MAGIC, version, len(body)) + body


def _u32(values: Any) -> bytes:
    """Little-endian uint32s (indices from numpy or a plain sequence)."""
    out = array("I", [int(v) for v in values])
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- reading (untrusted input) ---------------------------------------------------------------------
def read_header(bundle: BundleSource) -> BundleHeader:
    """Parse and sanity-check a bundle header; no key needed (the verifier learns the model id)."""
    with BundleReader(bundle) as reader:
        return reader.header


class BundleReader:
    """Random access to a bundle on disk or in memory; the header is parsed on open."""

    def __init__(self, bundle: BundleSource) -> None:
        self._fh: io.FileIO | None = None
        self._mem: memoryview | None = None
        if isinstance(bundle, bytes | bytearray | memoryview):
            try:
                self._mem = memoryview(bundle).cast("B")  # no copy of a large in-memory bundle
            except (TypeError, ValueError):
                raise BundleFormatError("bundle buffer must be contiguous bytes") from None
            self.size = len(self._mem)
        elif isinstance(bundle, str | os.PathLike):
            try:
                self._fh = open(bundle, "rb", buffering=0)  # noqa: SIM115 - closed in close()
                self.size = os.fstat(self._fh.fileno()).st_size
            except OSError as exc:
                self.close()
                raise BundleFormatError(f"cannot read bundle {os.fspath(bundle)}: {exc.strerror}") from None
        else:
            raise BundleFormatError("bundle must be a path or bytes")
        try:
            self.header = _parse(self)
        except BaseException:
            self.close()
            raise

    def read_into(self, offset: int, dest: memoryview) -> memoryview:
        """Fill ``dest`` from ``offset`` (no allocation per chunk); returns ``dest``."""
        if offset < 0 or offset + len(dest) > self.size:
            raise BundleFormatError("bundle is truncated")
        if self._mem is not None:
            dest[:] = self._mem[offset:offset + len(dest)]
            return dest
        assert self._fh is not None
        try:
            self._fh.seek(offset)
            got = self._fh.readinto(dest)
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle: {exc.strerror}") from None
        if got != len(dest):
            raise BundleFormatError("bundle is truncated")
        return dest

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise BundleFormatError("bundle is truncated")
        if self._mem is not None:
            data = bytes(self._mem[offset:offset + n])
        else:
            assert self._fh is not None
            try:
                self._fh.seek(offset)
                data = self._fh.read(n)
            except OSError as exc:
                raise BundleFormatError(f"cannot read bundle: {exc.strerror}") from None
        if len(data) != n:
            raise BundleFormatError("bundle is truncated")
        return data

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(reader: BundleReader) -> BundleHeader:
    if reader.size < PREFIX.size:
        raise BundleFormatError("not a layerlock bundle: too short")
    prefix = reader.read(0, PREFIX.size)
    magic, version, n = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise BundleFormatError("not a layerlock bundle: bad magic")
    if version not in (VERSION, VERSION_RUNS, VERSION_FP):
        raise BundleFormatError(f"unsupported bundle version {version} "
                                f"(this build reads {VERSION} to {VERSION_FP})")
    if n > HEADER_CAP:
        raise BundleFormatError(f"bundle header length {n} exceeds the {HEADER_CAP}-byte cap")
    if PREFIX.size + n + CHECK > reader.size:
        raise BundleFormatError("bundle is truncated inside its header")
    body = reader.read(PREFIX.size, n)
    try:
        doc = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleFormatError("bundle header is not valid JSON") from None
    hdr = _validate(doc, hashlib.sha256(prefix + body).digest(), PREFIX.size + n, version)
    if reader.size < hdr.bundle_size:
        raise BundleFormatError(f"bundle is truncated: {reader.size} bytes, header says {hdr.bundle_size}")
    if reader.size > hdr.bundle_size:
        raise BundleFormatError(f"bundle has {reader.size - hdr.bundle_size} unexpected trailing bytes")
    return hdr


_KEYS = {"model_id", "format", "locked_digest", "locked_mac", "locked_size", "plain_size", "chunk_size", "chunk_count",
         "suite", "kdf", "salt", "tensors"}
_TENSOR_KEYS = {"name", "dtype", "shape", "offset", "length"}
_NCNN_KEYS = _KEYS | {"param_digest"}


def _int(doc: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    value = doc[key]
    if type(value) is not int or not lo <= value <= hi:
        raise BundleFormatError(f"bundle header field {key!r} is not an integer in [{lo}, {hi}]")
    return value


def _hex(doc: dict[str, Any], key: str, nbytes: int, what: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-f]{{{2 * nbytes}}}", value):
        raise BundleFormatError(f"bundle header has a malformed {what}")
    return value


def _validate(doc: Any, digest: bytes, header_size: int, version: int = VERSION) -> BundleHeader:
    expected = _NCNN_KEYS if isinstance(doc, dict) and doc.get("format") == "ncnn" else _KEYS
    if version == VERSION_FP:
        expected = expected | {"fingerprint"}
    if not isinstance(doc, dict) or set(doc) != expected:
        raise BundleFormatError("bundle header has missing or unknown fields")
    model_id, fmt = doc["model_id"], doc["format"]
    if not is_model_id(model_id):
        raise BundleFormatError("bundle header has an invalid model id")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BundleFormatError("bundle header names an unknown model format")
    if doc["suite"] != SUITE or doc["kdf"] != KDF:
        raise BundleFormatError(f"bundle uses an unsupported cipher suite (this build reads {SUITE})")
    locked_digest = _hex(doc, "locked_digest", 32, "locked-file digest")
    param_digest = _hex(doc, "param_digest", 32, ".param digest") if fmt == "ncnn" else None
    locked_mac = _hex(doc, "locked_mac", TAG, "locked-file MAC")
    salt_hex = _hex(doc, "salt", SALT, "salt")
    locked_size = _int(doc, "locked_size")
    plain_size = _int(doc, "plain_size", hi=locked_size)
    chunk_size = _int(doc, "chunk_size", MIN_CHUNK, MAX_CHUNK)
    count = _int(doc, "chunk_count", 1)
    if count != chunk_count(plain_size, chunk_size):
        raise BundleFormatError("bundle header chunk count does not match its sizes")
    raw = doc["tensors"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= TENSOR_CAP:
        raise BundleFormatError(f"bundle header must list 1..{TENSOR_CAP} tensors")
    tensors = tuple(_tensor(e, locked_size) for e in raw)
    runs = tuple(_runs(e, t, version) for e, t in zip(raw, tensors, strict=True))
    if sum(len(r) for r in runs if r is not None) > RUN_CAP:
        raise BundleFormatError(f"bundle header lists more than {RUN_CAP} runs")
    if version == VERSION_RUNS and all(r is None for r in runs):
        raise BundleFormatError("a version 2 bundle must lock part of a tensor")
    fingerprint = _fingerprint(doc["fingerprint"], tensors, runs) if version == VERSION_FP else ()
    end, total, seen = 0, 0, set()
    for t, r in zip(tensors, runs, strict=True):
        if t.offset < end or t.name in seen:
            raise BundleFormatError("bundle tensors overlap, repeat or are out of order")
        end, total = t.offset + t.length, total + (t.length if r is None else sum(n for _, n in r))
        seen.add(t.name)
    if total != plain_size:
        raise BundleFormatError("bundle tensor lengths do not add up to its payload size")
    return BundleHeader(version, model_id, fmt, locked_digest, locked_size, plain_size, chunk_size,
                        count, SUITE, bytes.fromhex(salt_hex), tensors, digest, header_size,
                        bytes.fromhex(locked_mac), param_digest, runs if version != VERSION else (), fingerprint)


def _fingerprint(raw: Any, tensors: tuple[TensorInfo, ...],
                 runs: tuple[tuple[tuple[int, int], ...] | None, ...]) -> tuple[tuple[int, array[int]], ...]:
    """Version 3's fingerprint sites, each checked: a float tensor of this bundle, indices sorted,
    inside the tensor and inside its locked runs, at most ``FP_CAP`` in all."""
    if not isinstance(raw, list) or not raw:
        raise BundleFormatError("bundle fingerprint must be a non-empty list")
    out: list[tuple[int, array[int]]] = []
    total, last = 0, -1
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != {"tensor", "index"}:
            raise BundleFormatError("bundle fingerprint entry has missing or unknown fields")
        i, text = entry["tensor"], entry["index"]
        if type(i) is not int or not last < i < len(tensors) or tensors[i].dtype not in ("F16", "BF16", "F32", "F64"):
            raise BundleFormatError("bundle fingerprint names a tensor out of order, twice, or not a float tensor")
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True) \
                if isinstance(text, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None or not data or len(data) % 4:
            raise BundleFormatError(f"bundle fingerprint of {tensors[i].name!r} is not base64url uint32s")
        idx = array("I", data)
        if sys.byteorder == "big":
            idx.byteswap()
        total += len(idx)
        if total > FP_CAP or any(idx[k + 1] <= idx[k] for k in range(len(idx) - 1)) or idx[-1] >= tensors[i].numel:
            raise BundleFormatError(f"bundle fingerprint of {tensors[i].name!r} is unsorted, too long or outside it")
        tensor_runs = runs[i] if runs else None
        if tensor_runs is not None:
            item = ITEMSIZE[tensors[i].dtype]
            spans = [((o - tensors[i].offset) // item, (o - tensors[i].offset + n) // item) for o, n in tensor_runs]
            starts = [a for a, _ in spans]
            for element in idx:
                k = bisect.bisect_right(starts, element) - 1
                if k < 0 or element >= spans[k][1]:
                    raise BundleFormatError(f"bundle fingerprint of {tensors[i].name!r} leaves its locked part")
        out.append((i, idx))
        last = i
    return tuple(out)


def _runs(entry: dict[str, Any], t: TensorInfo, version: int) -> tuple[tuple[int, int], ...] | None:
    """A version 2 entry's locked byte runs as absolute (offset, length); None = the whole tensor."""
    if "runs" not in entry:
        return None
    flat = entry["runs"]
    if version == VERSION or not isinstance(flat, list) or not flat or len(flat) % 2 \
            or len(flat) > 2 * RUN_CAP:
        raise BundleFormatError(f"bundle tensor {t.name!r} has malformed runs")
    item, end, out = ITEMSIZE[t.dtype], 0, []
    for i in range(0, len(flat), 2):
        start, n = flat[i], flat[i + 1]
        if (type(start) is not int or type(n) is not int or start < end or n <= 0 or start + n > t.length
                or start % item or n % item):
            raise BundleFormatError(f"bundle tensor {t.name!r} has runs out of order, overlapping or outside it")
        out.append((t.offset + start, n))
        end = start + n
    return tuple(out)


def _tensor(entry: Any, locked_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) - {"runs"} != _TENSOR_KEYS:
        raise BundleFormatError("bundle tensor entry has missing or unknown fields")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= NAME_CAP:
        raise BundleFormatError("bundle tensor entry has an invalid name")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise BundleFormatError(f"bundle tensor {name!r} has an unknown dtype")
    if (not isinstance(shape, list) or len(shape) > RANK_CAP
            or not all(type(d) is int and 0 <= d <= locked_size for d in shape)):
        raise BundleFormatError(f"bundle tensor {name!r} has an invalid shape")
    offset, length = _int(entry, "offset", hi=locked_size), _int(entry, "length", hi=locked_size)
    if offset + length > locked_size:
        raise BundleFormatError(f"bundle tensor {name!r} lies outside the locked file")
    if math.prod(shape) * ITEMSIZE[dtype] != length:
        raise BundleFormatError(f"bundle tensor {name!r} length does not match its shape and dtype")
    return TensorInfo(name, dtype, tuple(shape), offset, length)
