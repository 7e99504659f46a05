"""The lock format: a locked model file plus its ``.llk`` restoration bundle.

Protect copies the model's plain file (see :mod:`shared.formats`) and overwrites the byte ranges
of the selected tensors with decoys, so the locked file keeps the exact header and layout of the
original.  The real bytes of those ranges, concatenated in file order, are encrypted into the
bundle.  Restore is then "copy the locked file, write the real bytes back": bit-exact by
construction, one sequential pass, memory = the output + a few chunk-sized buffers.

Bundle layout (all integers big-endian)::

    magic "LLKBNDL\\n" | u16 version | u32 header length | header (canonical JSON)
    | key check (32 bytes) | chunk 0 | chunk 1 | ... | chunk N-1

* Keys: HKDF-SHA256(data key, salt = the header's per-file random salt) gives an AES-256-GCM key,
  a check key and a MAC key.  The salt makes every bundle's keys unique even if a data key is
  ever reused, so (key, nonce) pairs never repeat.
* The *key check* is HMAC-SHA256(check key, header digest): it authenticates the header before
  anything else is read, and tells "wrong key" apart from "tampered chunk" with a precise message.
  AES-GCM alone is not key-committing; the check makes the bundle commit to its key.
* Chunk ``i`` (plaintext ``chunk_size`` bytes, the last one shorter, possibly empty) is
  AES-256-GCM with nonce ``salt[:4] || u64 i`` and associated data
  ``sha256(magic..header) || u64 i || final flag``: flipping, reordering, dropping or appending
  chunks all fail authentication, and the header records the chunk count and exact sizes.
* The header carries the SHA-256 of the locked file (``locked_digest``: keyless identification,
  e.g. to match files to bundles) and an AES-GMAC tag of it under the MAC key (``locked_mac``).
  Restore recomputes the GMAC over every byte of the locked file -- GHASH runs at >10 GB/s
  where SHA-256 manages ~1.7, which is the difference between meeting and missing the restore
  budget -- so a locked file from another protect run, or an edited one, is refused as
  :class:`~shared.errors.LockedFileMismatch`.

Parsing is defensive: an untrusted bundle can only ever raise a :class:`~shared.errors.LockError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import math
import mmap
import os
import queue
import re
import secrets
import shutil
import struct
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared import formats
from shared.activation import MODEL_ID_RE as _MODEL_ID_RE
from shared.errors import (
    BundleFormatError,
    BundleIntegrityError,
    InvalidInput,
    LockedFileMismatch,
    LockError,
)
from shared.formats import ITEMSIZE, TensorInfo
from shared.selection import LockPolicy, select

MAGIC = b"LLKBNDL\n"
VERSION = 1
SUITE = "AES-256-GCM"
KDF = "HKDF-SHA256"
FORMATS = ("safetensors", "onnx")
_PREFIX = struct.Struct(">8sHI")
HEADER_CAP = 32 * 1024 * 1024
TENSOR_CAP = 500_000
NAME_CAP = 4096
RANK_CAP = 64
MIN_CHUNK, MAX_CHUNK = 16, 64 * 1024 * 1024
DEFAULT_CHUNK = 1 << 20
TAG = 16
CHECK = 32
SALT = 16
_COPY_BLOCK = 8 << 20
_RESTORE_BLOCK = 4 << 20  # kept bytes are copied in blocks of this size ...
_POOL = 3  # ... through this many buffers (and as many chunk buffers)


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


@dataclass
class ProtectResult:
    """What one protect run produced.  ``data_key`` is the secret: never log or print it."""

    model_id: str
    source: Path
    locked_path: Path
    bundle_path: Path
    data_key: bytes = field(repr=False)
    locked_tensors: list[str]
    locked_params: int
    total_params: int
    format: str

    @property
    def fraction(self) -> float:
        return self.locked_params / self.total_params if self.total_params else 0.0


# --- keys ----------------------------------------------------------------------------------------
def _check_key(data_key: object) -> bytes:
    if not isinstance(data_key, bytes | bytearray) or len(data_key) != 32:
        raise BundleIntegrityError("the data key must be 32 bytes")
    return bytes(data_key)


def _subkeys(data_key: bytes, salt: bytes) -> tuple[bytes, bytes, bytes]:
    """(chunk cipher key, key-check key, locked-file MAC key), all bound to this bundle's salt."""
    okm = HKDF(hashes.SHA256(), 96, salt, b"layerlock-bundle-v1").derive(data_key)
    return okm[:32], okm[32:64], okm[64:]


class _LockedMac:
    """AES-GMAC (NIST SP 800-38D) over the whole locked file, streamed.

    Why not SHA-256: restore must authenticate every byte of the locked file, and SHA-256 runs
    at ~1.7 GB/s where GHASH runs at >10 GB/s; with SHA-256 the check alone would cost as much
    as a plain load of the model.  The key is derived per bundle and only one tag is ever made
    with it, so the fixed nonce is never reused for a second message.
    """

    def __init__(self, key: bytes) -> None:
        self._ctx = Cipher(algorithms.AES(key), modes.GCM(b"\0" * 12)).encryptor()

    def update(self, data: bytes | memoryview) -> None:
        if len(data):
            self._ctx.authenticate_additional_data(data)

    def tag(self) -> bytes:
        self._ctx.finalize()
        return bytes(self._ctx.tag)


def _decoy_rng(data_key: bytes, name: str) -> Any:
    import numpy as np

    seed = HKDF(hashes.SHA256(), 32, None, b"layerlock-decoy-v1\0" + name.encode()).derive(data_key)
    return np.random.default_rng(int.from_bytes(seed, "big"))


def _nonce(salt: bytes, index: int) -> bytes:
    return salt[:4] + index.to_bytes(8, "big")


def _aad(digest: bytes, index: int, final: bool) -> bytes:
    return digest + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


def default_model_id(src: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).lstrip("._-")[:110] or "model"
    return f"{stem}-{secrets.token_hex(4)}"


# --- protect -------------------------------------------------------------------------------------
def protect(src: Path, out_dir: Path | None = None, *, model_id: str | None = None,
            policy: LockPolicy | None = None, data_key: bytes | None = None,
            chunk_size: int = DEFAULT_CHUNK, progress: bool = False) -> ProtectResult:
    """Write ``NAME.locked.{safetensors,onnx}`` and ``NAME.llk`` for ``src``; see the module doc."""
    src = Path(src)
    out_dir = Path(out_dir) if out_dir is not None else src.parent
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise InvalidInput(f"chunk size must be between {MIN_CHUNK} and {MAX_CHUNK} bytes")
    if model_id is None:
        model_id = default_model_id(src)
    elif not _MODEL_ID_RE.match(model_id):
        raise InvalidInput("model id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    if data_key is not None and (not isinstance(data_key, bytes) or len(data_key) != 32):
        raise InvalidInput("data_key must be 32 bytes")
    key = secrets.token_bytes(32) if data_key is None else data_key
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = formats.open_plain(src, out_dir)
    try:
        return _protect_plain(plain, src, out_dir, model_id, policy or LockPolicy(), key, chunk_size, progress)
    finally:
        if plain.temporary:
            plain.path.unlink(missing_ok=True)


def _protect_plain(plain: formats.PlainModel, src: Path, out_dir: Path, model_id: str, policy: LockPolicy,
                   key: bytes, chunk_size: int, progress: bool) -> ProtectResult:
    infos = {t.name: t for t in plain.tensors}
    if not infos:
        raise LockError(f"{src.name}: the model has no tensors that can be locked")
    names = select(infos, policy)
    locked = sorted((infos[n] for n in names), key=lambda t: (t.offset, t.length))  # empties first
    suffix = ".onnx" if plain.format == "onnx" else ".safetensors"
    locked_path = out_dir / f"{src.stem}.locked{suffix}"
    bundle_path = out_dir / f"{src.stem}.llk"
    if src.resolve() in (locked_path.resolve(), bundle_path.resolve()):
        raise LockError(f"{src.name}: refusing to overwrite the input with an output")
    tmp_locked = out_dir / f".{locked_path.name}.tmp"
    tmp_bundle = out_dir / f".{bundle_path.name}.tmp"
    plain_size = sum(t.length for t in locked)
    bar = _bar(2 * plain_size, src.name, progress)
    try:
        shutil.copyfile(plain.path, tmp_locked)
        with plain.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                _write_decoys(view, locked, tmp_locked, key, bar)
                salt = secrets.token_bytes(SALT)
                locked_digest, locked_mac, locked_size = _digest_file(tmp_locked, _subkeys(key, salt)[2])
                header = _header_bytes(model_id, plain.format, locked_digest, locked_mac, locked_size,
                                       plain_size, chunk_size, salt, locked)
                with tmp_bundle.open("wb") as out:
                    _write_bundle(out, header, view, locked, key, salt, chunk_size, bar)
            except BaseException as exc:
                # Slices of the mapping live on in the traceback's frames; drop them, or closing
                # the mapping would fail and hide the real error.
                traceback.clear_frames(exc.__traceback__)
                raise
            finally:
                view.release()
        os.replace(tmp_locked, locked_path)
        os.replace(tmp_bundle, bundle_path)
    except BaseException:
        tmp_locked.unlink(missing_ok=True)
        tmp_bundle.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return ProtectResult(model_id=model_id, source=src, locked_path=locked_path, bundle_path=bundle_path,
                         data_key=key, locked_tensors=[t.name for t in locked],
                         locked_params=sum(t.numel for t in locked),
                         total_params=sum(t.numel for t in plain.tensors), format=plain.format)


def _bar(total: int, name: str, progress: bool) -> Any:
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"locking {name}", file=sys.stderr,
                delay=0.5, leave=False)


def _write_decoys(view: memoryview, locked: list[TensorInfo], path: Path, key: bytes, bar: Any) -> None:
    with path.open("r+b") as out:
        for t in locked:
            mean, std = formats.tensor_stats(view[t.offset:t.offset + t.length], t.dtype)
            out.seek(t.offset)
            for block in formats.decoy_blocks(t, mean, std, _decoy_rng(key, t.name)):
                out.write(block)
            if bar is not None:
                bar.update(t.length)


def _digest_file(path: Path, mac_key: bytes) -> tuple[str, bytes, int]:
    """SHA-256 (keyless identification) and GMAC (what restore checks) of the locked file."""
    h, mac = hashlib.sha256(), _LockedMac(mac_key)
    size = 0
    buf = bytearray(_COPY_BLOCK)
    mv = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(mv):
            h.update(mv[:n])
            mac.update(mv[:n])
            size += n
    return h.hexdigest(), mac.tag(), size


def _header_bytes(model_id: str, fmt: str, locked_digest: str, locked_mac: bytes, locked_size: int,
                  plain_size: int, chunk_size: int, salt: bytes, locked: list[TensorInfo]) -> bytes:
    doc = {
        "model_id": model_id, "format": fmt, "locked_digest": locked_digest, "locked_mac": locked_mac.hex(),
        "locked_size": locked_size,
        "plain_size": plain_size, "chunk_size": chunk_size, "chunk_count": _chunk_count(plain_size, chunk_size),
        "suite": SUITE, "kdf": KDF, "salt": salt.hex(),
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                     "length": t.length} for t in locked],
    }
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if len(body) > HEADER_CAP:
        raise LockError(f"bundle header would be {len(body)} bytes, over the {HEADER_CAP}-byte cap")
    return _PREFIX.pack(MAGIC, VERSION, len(body)) + body


def _chunk_count(plain_size: int, chunk_size: int) -> int:
    return max(1, -(-plain_size // chunk_size))


def _plaintext(view: memoryview, locked: list[TensorInfo], chunk_size: int) -> Iterator[bytes]:
    """The concatenated real bytes of the locked tensors, cut into ``chunk_size`` pieces."""
    buf = bytearray()
    for t in locked:
        pos, end = t.offset, t.offset + t.length
        while pos < end:
            take = min(end - pos, chunk_size - len(buf))
            buf += view[pos:pos + take]
            pos += take
            if len(buf) == chunk_size:
                yield bytes(buf)
                buf.clear()
    if buf or not sum(t.length for t in locked):
        yield bytes(buf)


def _write_bundle(out: BinaryIO, header: bytes, view: memoryview, locked: list[TensorInfo], key: bytes,
                  salt: bytes, chunk_size: int, bar: Any) -> None:
    digest = hashlib.sha256(header).digest()
    enc_key, check_key, _ = _subkeys(key, salt)
    out.write(header)
    out.write(hmac.new(check_key, digest, hashlib.sha256).digest())
    aes = AESGCM(enc_key)
    count = _chunk_count(sum(t.length for t in locked), chunk_size)
    for i, chunk in enumerate(_plaintext(view, locked, chunk_size)):
        out.write(aes.encrypt(_nonce(salt, i), chunk, _aad(digest, i, i == count - 1)))
        if bar is not None:
            bar.update(len(chunk))


# --- header parsing (untrusted input) -------------------------------------------------------------
def read_header(bundle: Path | str | bytes | bytearray | memoryview) -> BundleHeader:
    """Parse and sanity-check a bundle header; no key needed (the verifier learns the model id)."""
    with _BundleReader(bundle) as reader:
        return reader.header


class _BundleReader:
    """Random access to a bundle on disk or in memory; the header is parsed on open."""

    def __init__(self, bundle: Path | str | bytes | bytearray | memoryview) -> None:
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
        if self._mem is not None:
            if offset + len(dest) > self.size:
                raise BundleFormatError("bundle is truncated")
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

    def __enter__(self) -> _BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(reader: _BundleReader) -> BundleHeader:
    if reader.size < _PREFIX.size:
        raise BundleFormatError("not a layerlock bundle: too short")
    prefix = reader.read(0, _PREFIX.size)
    magic, version, n = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise BundleFormatError("not a layerlock bundle: bad magic")
    if version != VERSION:
        raise BundleFormatError(f"unsupported bundle version {version} (this build reads {VERSION})")
    if n > HEADER_CAP:
        raise BundleFormatError(f"bundle header length {n} exceeds the {HEADER_CAP}-byte cap")
    if _PREFIX.size + n + CHECK > reader.size:
        raise BundleFormatError("bundle is truncated inside its header")
    body = reader.read(_PREFIX.size, n)
    try:
        doc = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleFormatError("bundle header is not valid JSON") from None
    hdr = _validate(doc, hashlib.sha256(prefix + body).digest(), _PREFIX.size + n)
    if reader.size < hdr.bundle_size:
        raise BundleFormatError(f"bundle is truncated: {reader.size} bytes, header says {hdr.bundle_size}")
    if reader.size > hdr.bundle_size:
        raise BundleFormatError(f"bundle has {reader.size - hdr.bundle_size} unexpected trailing bytes")
    return hdr


_KEYS = {"model_id", "format", "locked_digest", "locked_mac", "locked_size", "plain_size", "chunk_size", "chunk_count",
         "suite", "kdf", "salt", "tensors"}


def _int(doc: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    value = doc[key]
    if type(value) is not int or not lo <= value <= hi:
        raise BundleFormatError(f"bundle header field {key!r} is not an integer in [{lo}, {hi}]")
    return value


def _validate(doc: Any, digest: bytes, header_size: int) -> BundleHeader:
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        raise BundleFormatError("bundle header has missing or unknown fields")
    model_id, fmt = doc["model_id"], doc["format"]
    if not isinstance(model_id, str) or not _MODEL_ID_RE.match(model_id):
        raise BundleFormatError("bundle header has an invalid model id")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BundleFormatError("bundle header names an unknown model format")
    if doc["suite"] != SUITE or doc["kdf"] != KDF:
        raise BundleFormatError(f"bundle uses an unsupported cipher suite (this build reads {SUITE})")
    locked_digest = doc["locked_digest"]
    if not isinstance(locked_digest, str) or not re.fullmatch(r"[0-9a-f]{64}", locked_digest):
        raise BundleFormatError("bundle header has a malformed locked-file digest")
    locked_mac = doc["locked_mac"]
    if not isinstance(locked_mac, str) or not re.fullmatch(r"[0-9a-f]{32}", locked_mac):
        raise BundleFormatError("bundle header has a malformed locked-file MAC")
    salt_hex = doc["salt"]
    if not isinstance(salt_hex, str) or not re.fullmatch(rf"[0-9a-f]{{{2 * SALT}}}", salt_hex):
        raise BundleFormatError("bundle header has a malformed salt")
    locked_size = _int(doc, "locked_size")
    plain_size = _int(doc, "plain_size", hi=locked_size)
    chunk_size = _int(doc, "chunk_size", MIN_CHUNK, MAX_CHUNK)
    chunk_count = _int(doc, "chunk_count", 1)
    if chunk_count != _chunk_count(plain_size, chunk_size):
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
                        chunk_count, SUITE, bytes.fromhex(salt_hex), tensors, digest, header_size,
                        bytes.fromhex(locked_mac))


def _tensor(entry: Any, locked_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "length"}:
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


# --- restore -------------------------------------------------------------------------------------
def restore(locked_path: Path, bundle: Path | bytes, data_key: bytes) -> bytes:
    """The original model bytes, bit-exact; every check passes before anything is returned.

    The result is assembled in place: kept bytes are read from the locked file straight into it
    and whole chunks are decrypted straight into it, so peak memory is the model plus a chunk.
    """
    with _restorer(locked_path, bundle, data_key) as job:
        # bytes(n) is calloc'ed (untouched); once only the BytesIO holds it, getbuffer() lends it
        # out writable without a copy, and getvalue() hands it back without one.
        buf = io.BytesIO(bytes(job.hdr.locked_size))
        with buf.getbuffer() as view:
            _advise_hugepages(view)
            job.run(_ViewSink(view))
        return buf.getvalue()


def restore_to(locked_path: Path, bundle: Path | bytes, data_key: bytes, out: BinaryIO) -> int:
    """Write the original model bytes to the seekable ``out`` at its position; returns bytes written.

    One sequential pass: bytes outside the locked tensors are copied from the locked file, locked
    ranges are decrypted chunk by chunk, and the whole locked file is authenticated on the way --
    so memory stays at the output plus a few chunk-sized buffers, and ``out`` (the verifier's
    memfd, a file, an ``io.BytesIO``) only ever sees sequential writes, made on a helper thread.
    On any failure ``out`` is truncated back to where it started and a LockError is raised.
    """
    with _restorer(locked_path, bundle, data_key) as job:
        start = out.tell()
        try:
            job.run(_Writer(out, max(min(_RESTORE_BLOCK, job.hdr.locked_size), job.hdr.chunk_size)))
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                out.seek(start)
                out.truncate(start)
            raise
        return job.hdr.locked_size


@contextlib.contextmanager
def _restorer(locked_path: Path, bundle: Path | bytes, data_key: bytes) -> Iterator[_Restorer]:
    """Open the bundle, check the key against it, open the locked file and check its size."""
    key = _check_key(data_key)
    with _BundleReader(bundle) as reader:
        hdr = reader.header
        enc_key, check_key, mac_key = _subkeys(key, hdr.salt)
        expected = hmac.new(check_key, hdr.digest, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, reader.read(hdr.header_size, CHECK)):
            raise BundleIntegrityError(f"bundle for model {hdr.model_id}: the data key does not match "
                                       "(wrong key, or the header was tampered with)")
        locked_path = Path(locked_path)
        try:
            fh = locked_path.open("rb", buffering=0)
        except OSError as exc:
            raise LockedFileMismatch(f"cannot read locked file {locked_path}: {exc.strerror}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != hdr.locked_size:
                raise LockedFileMismatch(f"{locked_path.name} is not the locked file of model {hdr.model_id}: "
                                         f"{size} bytes, expected {hdr.locked_size}")
            yield _Restorer(fh, locked_path.name, reader, hdr, enc_key, mac_key)


def _advise_hugepages(view: memoryview) -> None:
    """Best effort: back a large output with transparent huge pages (Linux ``madvise``).

    Why: filling fresh memory costs one page fault per 4 KiB page, which on a VM is the largest
    single cost of assembling a model in memory.  numpy asks for huge pages for its arrays, so a
    plain ``safetensors`` load gets them; a restore that did not would lose by that margin alone.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or len(view) < (32 << 20) or view.readonly:
        return
    try:
        import ctypes

        anchor = ctypes.c_char.from_buffer(view)
        addr = ctypes.addressof(anchor)
        del anchor
        huge = 2 << 20
        first, last = (addr + huge - 1) & ~(huge - 1), (addr + len(view)) & ~(huge - 1)
        if last > first:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice))
    except (OSError, AttributeError, TypeError, ValueError):
        pass


class _ViewSink:
    """Output into a preallocated buffer: callers fill ``reserve``d slices of it in place."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def reserve(self, n: int) -> memoryview:
        return self.view[self.pos:self.pos + n]

    def commit(self, part: memoryview) -> None:
        self.pos += len(part)

    def finish(self) -> None:
        pass


class _Writer:
    """Output to a stream, written on a helper thread from a small pool of buffers, in order.

    Why a thread: copying into the output (for a memfd, allocating its pages) is the biggest
    single cost of a restore, and file writes release the GIL; overlapping them with reading,
    authenticating and decrypting is what keeps restore within ~1.3x of a plain load.  After a
    write error the thread keeps draining (returning buffers) so the producer never blocks.
    """

    def __init__(self, out: BinaryIO, block: int) -> None:
        self.out = out
        self.error: BaseException | None = None
        self.pool: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(_POOL):
            self.pool.put(memoryview(bytearray(block)))
        self.queue: queue.SimpleQueue[tuple[memoryview, memoryview] | None] = queue.SimpleQueue()
        self.current = memoryview(b"")
        self.thread = threading.Thread(target=self._loop, name="layerlock-restore-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            part, buf = item
            if self.error is None:
                try:
                    _write(self.out, part)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the producer
                    self.error = exc
            self.pool.put(buf)

    def reserve(self, n: int) -> memoryview:
        if self.error is not None:
            raise self.error
        self.current = self.pool.get()
        return self.current[:n]

    def commit(self, part: memoryview) -> None:
        self.queue.put((part, self.current))

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Restorer:
    """One restore pass over the locked file, in order, producing the original bytes into a sink."""

    def __init__(self, fh: io.FileIO, name: str, reader: _BundleReader, hdr: BundleHeader, enc_key: bytes,
                 mac_key: bytes) -> None:
        self.fh, self.name, self.reader, self.hdr = fh, name, reader, hdr
        self.aes, self.mac = AESGCM(enc_key), _LockedMac(mac_key)
        self.index = 0  # next chunk to decrypt
        self.pos = hdr.header_size + CHECK  # its position in the bundle
        self.block = min(_RESTORE_BLOCK, max(hdr.locked_size, 1))
        self.scratch = memoryview(bytearray(self.block))  # decoys: read to authenticate, never output
        self.cipher = memoryview(bytearray(hdr.chunk_size + TAG))
        self.spill = memoryview(bytearray(0))  # a chunk that straddles tensors is decrypted here ...
        self.pending = self.spill  # ... and this part of it is not yet output

    def run(self, sink: _ViewSink | _Writer) -> None:
        done = False
        try:
            pos = 0
            for t in self.hdr.tensors:
                self._kept(sink, pos, t.offset - pos)
                self._kept(None, t.offset, t.length)
                self._real(sink, t.length)
                pos = t.offset + t.length
            self._kept(sink, pos, self.hdr.locked_size - pos)
            if self.hdr.plain_size == 0:  # nothing but empty tensors: still authenticate the one chunk
                self._decrypt(memoryview(bytearray(0)))
            if self.index != self.hdr.chunk_count or len(self.pending):
                raise BundleIntegrityError(f"bundle for model {self.hdr.model_id}: chunks left over")
            if not hmac.compare_digest(self.mac.tag(), self.hdr.locked_mac):
                raise LockedFileMismatch(f"{self.name} is not the locked file of model {self.hdr.model_id} "
                                         "(content differs: another protect run, or modified)")
            done = True
        finally:
            if done:
                sink.finish()
            else:
                with contextlib.suppress(BaseException):
                    sink.finish()

    def _kept(self, sink: _ViewSink | _Writer | None, offset: int, length: int) -> None:
        """Locked-file bytes, authenticated; output unless they are decoys (``sink`` is None)."""
        self.fh.seek(offset)
        while length:
            n = min(self.block, length)
            part = sink.reserve(n) if sink is not None else self.scratch[:n]
            got = 0
            while got < n:
                r = self.fh.readinto(part[got:])
                if not r:
                    raise LockedFileMismatch(f"{self.name} changed size while being read")
                got += r
            self.mac.update(part)
            if sink is not None:
                sink.commit(part)
            length -= n

    def _real(self, sink: _ViewSink | _Writer, length: int) -> None:
        """Output the next ``length`` decrypted bytes (a tensor's real values)."""
        while length:
            if not len(self.pending):
                n = self.hdr.chunk_len(self.index)
                if n <= length:  # the whole chunk belongs to this tensor: decrypt it in place
                    dest = sink.reserve(n)
                    self._decrypt(dest)
                    sink.commit(dest)
                    length -= n
                    continue
                if len(self.spill) < n:
                    self.spill = memoryview(bytearray(self.hdr.chunk_size))
                self._decrypt(self.spill[:n])
                self.pending = self.spill[:n]
            take = min(len(self.pending), length)
            dest = sink.reserve(take)
            dest[:] = self.pending[:take]
            sink.commit(dest)
            self.pending = self.pending[take:]
            length -= take

    def _decrypt(self, dest: memoryview) -> None:
        hdr, i = self.hdr, self.index
        if i >= hdr.chunk_count:
            raise BundleIntegrityError(f"bundle for model {hdr.model_id}: more data than chunks")
        n = len(dest) + TAG
        try:
            self.aes.decrypt_into(_nonce(hdr.salt, i), self.reader.read_into(self.pos, self.cipher[:n]),
                                  _aad(hdr.digest, i, i == hdr.chunk_count - 1), dest)
        except InvalidTag:
            raise BundleIntegrityError(f"bundle for model {hdr.model_id}: chunk {i} of {hdr.chunk_count} "
                                       "fails authentication (modified, reordered or truncated)") from None
        self.pos += n
        self.index += 1


def _write(out: BinaryIO, data: memoryview) -> None:
    """``out.write`` until all is written: raw (unbuffered) files may write less than asked."""
    while len(data):
        n = out.write(data)
        if n is None or n >= len(data):
            return
        data = data[n:]
