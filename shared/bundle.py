"""The ``.llk`` bundle container: its layout, the header's JSON, and the defensive parser.

Layout (all integers big-endian)::

    magic "LLKBNDL\\n" | u16 version | u32 header length | header (canonical JSON)
    | key check (32 bytes) | chunk 0 | chunk 1 | ... | chunk N-1

The header lists the locked tensors (name, dtype, shape, offset, length in the locked file),
the sizes that fix the chunk layout, the per-bundle salt and the locked file's digest and MAC.
The chunks themselves are sealed and opened by :mod:`layerlock.shared.chunks`.

Parsing is defensive: every length and offset read from an untrusted bundle is bounded before it
is used, and a malformed bundle can only ever raise a :class:`~layerlock.shared.errors.BundleFormatError`.
A header is *sanity-checked* here but only *authenticated* once a data key checks it
(:func:`layerlock.shared.chunks.key_check`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerlock.shared.activation import MODEL_ID_RE as _MODEL_ID_RE
from layerlock.shared.errors import BundleFormatError, LockError
from layerlock.shared.formats import ITEMSIZE, TensorInfo

MAGIC = b"LLKBNDL\n"
VERSION = 1
SUITE = "AES-256-GCM"
KDF = "HKDF-SHA256"
FORMATS = ("safetensors", "onnx")
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


def valid_model_id(value: object) -> bool:
    """The model id rule, matched against the *whole* string.

    ``MODEL_ID_RE`` ends in ``$``, which ``re.match`` also accepts before a trailing newline.
    """
    return isinstance(value, str) and _MODEL_ID_RE.fullmatch(value) is not None


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


def _entry(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "length": t.length}


def header_bytes(model_id: str, fmt: str, locked_digest: str, locked_mac: bytes, locked_size: int,
                 plain_size: int, chunk_size: int, salt: bytes, locked: list[TensorInfo]) -> bytes:
    """Magic, version, length and the canonical JSON header: everything before the key check."""
    doc = {
        "model_id": model_id, "format": fmt, "locked_digest": locked_digest, "locked_mac": locked_mac.hex(),
        "locked_size": locked_size,
        "plain_size": plain_size, "chunk_size": chunk_size, "chunk_count": chunk_count(plain_size, chunk_size),
        "suite": SUITE, "kdf": KDF, "salt": salt.hex(),
        "tensors": [_entry(t) for t in locked],
    }
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if len(body) > HEADER_CAP:
        raise LockError(f"bundle header would be {len(body)} bytes, over the {HEADER_CAP}-byte cap")
    return PREFIX.pack(MAGIC, VERSION, len(body)) + body


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
    if version != VERSION:
        raise BundleFormatError(f"unsupported bundle version {version} (this build reads {VERSION})")
    if n > HEADER_CAP:
        raise BundleFormatError(f"bundle header length {n} exceeds the {HEADER_CAP}-byte cap")
    if PREFIX.size + n + CHECK > reader.size:
        raise BundleFormatError("bundle is truncated inside its header")
    body = reader.read(PREFIX.size, n)
    try:
        doc = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleFormatError("bundle header is not valid JSON") from None
    hdr = _validate(doc, hashlib.sha256(prefix + body).digest(), PREFIX.size + n)
    if reader.size < hdr.bundle_size:
        raise BundleFormatError(f"bundle is truncated: {reader.size} bytes, header says {hdr.bundle_size}")
    if reader.size > hdr.bundle_size:
        raise BundleFormatError(f"bundle has {reader.size - hdr.bundle_size} unexpected trailing bytes")
    return hdr


_KEYS = {"model_id", "format", "locked_digest", "locked_mac", "locked_size", "plain_size", "chunk_size", "chunk_count",
         "suite", "kdf", "salt", "tensors"}
_TENSOR_KEYS = {"name", "dtype", "shape", "offset", "length"}


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


def _validate(doc: Any, digest: bytes, header_size: int) -> BundleHeader:
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        raise BundleFormatError("bundle header has missing or unknown fields")
    model_id, fmt = doc["model_id"], doc["format"]
    if not valid_model_id(model_id):
        raise BundleFormatError("bundle header has an invalid model id")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BundleFormatError("bundle header names an unknown model format")
    if doc["suite"] != SUITE or doc["kdf"] != KDF:
        raise BundleFormatError(f"bundle uses an unsupported cipher suite (this build reads {SUITE})")
    locked_digest = _hex(doc, "locked_digest", 32, "locked-file digest")
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
    end, total, seen = 0, 0, set()
    for t in tensors:
        if t.offset < end or t.name in seen:
            raise BundleFormatError("bundle tensors overlap, repeat or are out of order")
        end, total = t.offset + t.length, total + t.length
        seen.add(t.name)
    if total != plain_size:
        raise BundleFormatError("bundle tensor lengths do not add up to its payload size")
    return BundleHeader(VERSION, model_id, fmt, locked_digest, locked_size, plain_size, chunk_size,
                        count, SUITE, bytes.fromhex(salt_hex), tensors, digest, header_size,
                        bytes.fromhex(locked_mac))


def _tensor(entry: Any, locked_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
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
