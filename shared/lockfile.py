"""The lock format: a locked model file plus its ``.llk`` restoration bundle -- the public API.

Protect copies the model's plain file (see :mod:`layerlock.shared.formats`) and overwrites the byte ranges
of the selected tensors with decoys (:mod:`layerlock.shared.decoys`), so the locked file keeps the exact
header and layout of the original.  The real bytes of those ranges, concatenated in file order,
are encrypted into the bundle.  Restore (:mod:`layerlock.shared.restore`) is then "copy the locked file,
write the real bytes back": bit-exact by construction, one sequential pass, memory = the output
+ a few chunk-sized buffers.

Where each part lives:

* :mod:`layerlock.shared.bundle` -- the container: layout, header JSON, defensive parsing
  (:class:`BundleHeader`, :func:`read_header`);
* :mod:`layerlock.shared.chunks` -- the cryptography: per-bundle subkeys, key check, chunked AES-256-GCM
  (nonces and associated data), the AES-GMAC of the locked file;
* :mod:`layerlock.shared.decoys` -- the values written over locked tensors, derived from the data key;
* :mod:`layerlock.shared.restore` -- :func:`restore` and :func:`restore_to`;
* here -- :func:`protect` and :class:`ProtectResult`, and re-exports of the names above so
  ``from shared.lockfile import ...`` stays the one import callers need.

The header carries the SHA-256 of the locked file (``locked_digest``: keyless identification,
e.g. to match files to bundles) and an AES-GMAC tag of it under a key derived from the data key
(``locked_mac``), which is what restore checks.  Parsing is defensive: an untrusted bundle can
only ever raise a :class:`~layerlock.shared.errors.LockError`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import secrets
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from layerlock.shared import formats
from layerlock.shared.bundle import (
    CHECK,
    DEFAULT_CHUNK,
    FORMATS,
    HEADER_CAP,
    KDF,
    MAGIC,
    MAX_CHUNK,
    MIN_CHUNK,
    NAME_CAP,
    RANK_CAP,
    SALT,
    SUITE,
    TAG,
    TENSOR_CAP,
    VERSION,
    BundleHeader,
    chunk_count,
    header_bytes,
    read_header,
    representable,
)
from layerlock.shared.chunks import KEY_BYTES, LockedMac, Progress, subkeys, write_sealed
from layerlock.shared.decoys import write_plan_decoys
from layerlock.shared.errors import BundleFormatError, InvalidInput, LockError
from layerlock.shared.fingerprint import FLOAT as FINGERPRINT_DTYPES
from layerlock.shared.fingerprint import Secret, from_float, to_float
from layerlock.shared.fingerprint import choose as choose_fingerprint
from layerlock.shared.fingerprint import step as step_value
from layerlock.shared.formats import TensorInfo, create_new
from layerlock.shared.ids import is_model_id
from layerlock.shared.plan import Plan, describe, load_base, make_plan, mapped, tensors_of
from layerlock.shared.restore import restore, restore_to
from layerlock.shared.selection import LockPolicy

__all__ = [
    "CHECK", "DEFAULT_CHUNK", "FORMATS", "HEADER_CAP", "KDF", "MAGIC", "MAX_CHUNK", "MIN_CHUNK", "NAME_CAP",
    "RANK_CAP", "SALT", "SUITE", "TAG", "TENSOR_CAP", "VERSION",
    "BundleHeader", "ProtectResult", "TensorInfo", "chunk_count", "default_model_id", "protect", "read_header",
    "restore", "restore_to",
]

_COPY_BLOCK = 8 << 20


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
    # Selected but byte for byte the same in the locked file (empty tensors): not counted as locked.
    left_as_is: list[str] = field(default_factory=list)
    # ncnn: NAME.locked.param, the .param copied unchanged (the locked pair is it + NAME.locked.bin).
    param_path: Path | None = None
    # What was locked, tensor by tensor (name, part, params, decoy; see plan.describe), the
    # policy that chose it, and what protect has to say about it (tiny locks, buffers left alone).
    locks: list[dict[str, object]] = field(default_factory=list)
    policy: str = "default"
    warnings: list[str] = field(default_factory=list)
    # The per-license fingerprint secret (:class:`layerlock.shared.fingerprint.Secret`, serialized):
    # the original values at the fingerprint positions, which the bundle does not hold.  Secret
    # like the data key: it goes to the license server sealed, never to disk in plaintext.
    fingerprint: bytes | None = field(default=None, repr=False)
    fingerprint_positions: int = 0
    fingerprint_task: str | None = None  # the task whose sensitivity placed the positions

    @property
    def fraction(self) -> float:
        return self.locked_params / self.total_params if self.total_params else 0.0


def default_model_id(src: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).lstrip("._-")[:110] or "model"
    return f"{stem}-{secrets.token_hex(4)}"


def protect(src: Path, out_dir: Path | None = None, *, model_id: str | None = None,
            policy: LockPolicy | None = None, data_key: bytes | None = None,
            chunk_size: int = DEFAULT_CHUNK, progress: bool = False, weights: Path | None = None) -> ProtectResult:
    """Write ``NAME.locked.{safetensors,onnx}`` and ``NAME.llk`` for ``src``; see the module doc.

    ncnn: ``src`` is the ``.param`` (or the ``.bin``), ``weights`` the ``.bin`` if it is not
    named like the ``.param``; writes ``NAME.locked.bin`` + ``NAME.locked.param`` + ``NAME.llk``.
    """
    src = Path(src)
    out_dir = Path(out_dir) if out_dir is not None else src.parent
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise InvalidInput(f"chunk size must be between {MIN_CHUNK} and {MAX_CHUNK} bytes")
    if model_id is None:
        model_id = default_model_id(src)
    elif not is_model_id(model_id):
        raise InvalidInput("model id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    if data_key is not None and (not isinstance(data_key, bytes) or len(data_key) != KEY_BYTES):
        raise InvalidInput("data_key must be 32 bytes")
    key = secrets.token_bytes(KEY_BYTES) if data_key is None else data_key
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = formats.open_plain(src, out_dir, Path(weights) if weights is not None else None)
    try:
        return _protect_plain(plain, src, out_dir, model_id, policy or LockPolicy(), key, chunk_size, progress)
    finally:
        if plain.temporary:
            plain.path.unlink(missing_ok=True)


def _protect_plain(plain: formats.PlainModel, src: Path, out_dir: Path, model_id: str, policy: LockPolicy,
                   key: bytes, chunk_size: int, progress: bool) -> ProtectResult:
    file_size = plain.path.stat().st_size
    infos = {t.name: t for t in plain.tensors if representable(t, file_size)}
    if not infos:
        raise LockError(f"{src.name}: the model has no tensors that can be locked")
    base = load_base(Path(policy.base), out_dir) if policy.base is not None else None
    with mapped(plain) as plan_view:
        plan = make_plan(plain, plan_view, policy, infos, base)
        secret = _choose_fingerprint(model_id, plan, plain, plan_view, policy, src.name, progress) \
            if policy.fingerprint else None
    fp_index = {s.tensor: s.index for s in secret.sites} if secret is not None else None
    locked = [lk.info for lk in plan.locks]  # file order, empties first
    runs = {lk.name: r for lk in plan.locks if (r := lk.byte_runs()) is not None}
    # The payload: every locked byte range in file order (whole tensors, or their runs).
    pieces = [TensorInfo(t.name, t.dtype, t.shape, t.offset + s, n) for t in locked
              for s, n in (runs.get(t.name) or [(0, t.length)])]
    suffix = {"onnx": ".onnx", "ncnn": ".bin"}.get(plain.format, ".safetensors")
    locked_path = out_dir / f"{src.stem}.locked{suffix}"
    bundle_path = out_dir / f"{src.stem}.llk"
    param_path = out_dir / f"{src.stem}.locked.param" if plain.companion is not None else None
    outputs = {o.resolve() for o in (locked_path, bundle_path, param_path) if o is not None}
    if {src.resolve(), plain.path.resolve(), *([plain.companion.resolve()] if plain.companion else [])} & outputs:
        raise LockError(f"{src.name}: refusing to overwrite the input with an output")
    tmp_locked = out_dir / f".{locked_path.name}.tmp"
    tmp_bundle = out_dir / f".{bundle_path.name}.tmp"
    tmp_param = out_dir / f".{param_path.name}.tmp" if param_path is not None else None
    param_digest = None
    plain_size = sum(t.length for t in pieces)
    bar = _bar(sum(t.length for t in locked) + plain_size, src.name, progress)
    try:
        create_new(tmp_locked).close()  # refuses a planted symlink; copyfile then writes this file
        shutil.copyfile(plain.path, tmp_locked)
        if tmp_param is not None and plain.companion is not None:
            param_digest = _copy_companion(plain.companion, tmp_param)
        # A private (copy-on-write) mapping when fingerprinting: the decoys go over the
        # fingerprint positions in memory only, so the bundle never holds their real values.
        access = mmap.ACCESS_COPY if fp_index else mmap.ACCESS_READ
        with plain.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=access) as mm:
            view = memoryview(mm)
            try:
                left_as_is = write_plan_decoys(view, plan.locks, tmp_locked, key, plan.base, bar)
                if fp_index:
                    _decoys_at_fingerprint(view, tmp_locked, infos, fp_index)
                salt = secrets.token_bytes(SALT)
                locked_digest, locked_mac, locked_size = _digest_file(tmp_locked, subkeys(key, salt)[2])
                header = header_bytes(model_id, plain.format, locked_digest, locked_mac, locked_size,
                                      plain_size, chunk_size, salt, locked, param_digest, runs or None,
                                      fp_index)
                with create_new(tmp_bundle) as out:
                    write_sealed(out, header, view, pieces, key, salt, chunk_size, bar)
                _self_check(tmp_bundle)
            except BaseException as exc:
                # Slices of the mapping live on in the traceback's frames; drop them, or closing
                # the mapping would fail and hide the real error.  (This also drops the frames'
                # references to the data key.)
                traceback.clear_frames(exc.__traceback__)
                raise
            finally:
                view.release()
        if tmp_param is not None and param_path is not None:
            os.replace(tmp_param, param_path)
        os.replace(tmp_locked, locked_path)
        os.replace(tmp_bundle, bundle_path)
    except BaseException:
        tmp_locked.unlink(missing_ok=True)
        tmp_bundle.unlink(missing_ok=True)
        if tmp_param is not None:
            tmp_param.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    same = set(left_as_is)
    changed = [lk for lk in plan.locks if lk.name not in same]  # only what differs in the locked file counts
    return ProtectResult(model_id=model_id, source=src, locked_path=locked_path, bundle_path=bundle_path,
                         data_key=key, locked_tensors=[lk.name for lk in changed],
                         locked_params=sum(lk.elements for lk in changed), policy=plan.policy,
                         locks=[d for d in describe(plan) if d["name"] not in same], warnings=plan.warnings,
                         total_params=sum(t.numel for t in plain.tensors), format=plain.format,
                         left_as_is=left_as_is, param_path=param_path,
                         fingerprint=secret.to_bytes() if secret is not None else None,
                         fingerprint_positions=secret.n if secret is not None else 0,
                         fingerprint_task=policy.fingerprint_task if secret is not None else None)


def _choose_fingerprint(model_id: str, plan: Plan, plain: formats.PlainModel, view: memoryview,
                        policy: LockPolicy, source: str, progress: bool) -> Secret | None:
    """Fingerprint positions among the plan's locked float elements (None: too little locked).

    With ``policy.fingerprint_task`` the positions go where that task's loss is flattest
    (:mod:`layerlock.shared.sensitivity`); the task builds its model from the mapping (one copy
    of the model in memory).  Locked tensors that are not parameters of the task's model (a
    float buffer) carry no positions then: their cost is unknown."""
    locks = {lk.name: lk for lk in plan.locks if lk.info.dtype in FINGERPRINT_DTYPES}

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        t = locks[name].info
        values = to_float(view[t.offset:t.offset + t.length], t.dtype)
        if t.dtype != "F64":  # exact in float32; half the memory of a large tensor
            values = values.astype(np.float32)
        mask = locks[name].mask().ravel() & np.isfinite(values)
        return values, mask

    sensitivity = None
    if policy.fingerprint_task is not None:
        from layerlock.shared.sensitivity import BATCHES, fisher

        tensors = tensors_of(plain, view, copy=False)  # views: the task's build() copies them
        bar = _bar(BATCHES, source, progress, unit="batch",
                   desc=f"sensitivity of {source} ({policy.fingerprint_task})")
        try:
            costs = fisher(policy.fingerprint_task, tensors, list(locks),
                           on_batch=(lambda: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        del tensors
        locks = {name: lk for name, lk in locks.items() if name in costs}
        sensitivity = costs.__getitem__

    shapes = {name: (lk.info.dtype, tuple(lk.info.shape), lk.elements) for name, lk in locks.items()}
    key = secrets.token_bytes(32)
    if sensitivity is None and any(lk.head for lk in locks.values()):
        # Without data, keep the fingerprint off the output head when there is enough elsewhere: a
        # head weight moves the outputs directly (digits: 0.68 changed predictions per license with
        # positions on the head, 0.13 without; README "Trace a leak").
        body = {n: v for n, v in shapes.items() if not locks[n].head}
        secret = choose_fingerprint(model_id, body, load, key, strength=policy.fingerprint_strength)
        if secret is not None:
            return secret
    return choose_fingerprint(model_id, shapes, load, key, strength=policy.fingerprint_strength,
                              sensitivity=sensitivity)


def _decoys_at_fingerprint(view: memoryview, locked_path: Path, infos: dict[str, TensorInfo],
                           fp_index: dict[str, np.ndarray]) -> None:
    """Copy the locked file's decoys over the fingerprint positions of ``view`` (a private map),
    so the bundle holds decoys there too.  A decoy that happens to equal the original value
    (random draws in a 16-bit dtype do, now and then) is moved one step in both files: no
    original value at a fingerprint position is in anything shipped."""
    with locked_path.open("r+b") as fh:
        for name, idx in fp_index.items():
            t = infos[name]
            item = formats.ITEMSIZE[t.dtype]
            fh.seek(t.offset)
            decoy = np.frombuffer(bytearray(fh.read(t.length)), dtype=np.uint8).reshape(-1, item)
            target = np.frombuffer(view[t.offset:t.offset + t.length], dtype=np.uint8).reshape(-1, item)
            for i in idx[np.all(decoy[idx] == target[idx], axis=1)]:
                w = float(to_float(target[i].tobytes(), t.dtype)[0])
                moved = from_float(np.array([step_value(w, 1.0, t.dtype)]), t.dtype)
                fh.seek(t.offset + int(i) * item)
                fh.write(moved)
                decoy[i] = np.frombuffer(moved, dtype=np.uint8)
            target[idx] = decoy[idx]


def _copy_companion(src: Path, tmp: Path) -> str:
    """Copy an ncnn .param byte for byte; its sha256 (what the bundle binds) of exactly those bytes."""
    from layerlock.shared.ncnnfile import read_param

    data = read_param(src)
    with create_new(tmp) as out:
        out.write(data)
    return hashlib.sha256(data).hexdigest()


class _Bar(Progress, Protocol):
    """A closable progress bar (``tqdm``)."""

    def close(self) -> object: ...


def _bar(total: int, name: str, progress: bool, *, unit: str = "B", desc: str | None = None) -> _Bar | None:
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: _Bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc or f"locking {name}", file=sys.stderr,
                     delay=0.5, leave=False)
    return bar


def _digest_file(path: Path, mac_key: bytes) -> tuple[str, bytes, int]:
    """SHA-256 (keyless identification) and GMAC (what restore checks) of the locked file."""
    h, mac = hashlib.sha256(), LockedMac(mac_key)
    size = 0
    buf = bytearray(_COPY_BLOCK)
    mv = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(mv):
            h.update(mv[:n])
            mac.update(mv[:n])
            size += n
    return h.hexdigest(), mac.tag(), size


def _self_check(bundle: Path) -> None:
    """Parse what was just written: never hand out a bundle (and a data key) that restore refuses."""
    try:
        read_header(bundle)
    except BundleFormatError as exc:
        raise LockError(f"internal error: the bundle written is unreadable ({exc.message})") from None
