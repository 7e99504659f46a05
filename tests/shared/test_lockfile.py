"""The .llk bundle: bit-exact round trips, streaming restore, and refusal of every tampering."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct

import numpy as np
import pytest
import safetensors.numpy as stnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerlock.shared.errors import BundleFormatError, BundleIntegrityError, LockedFileMismatch, LockError
from layerlock.shared.lockfile import CHECK, MAGIC, SUITE, read_header, restore, restore_to
from layerlock.shared.lockfile import protect as protect_file
from layerlock.shared.selection import LockPolicy

ALL = LockPolicy(patterns=("*",), include_int=True)  # integer buffers too: every dtype round-trips


def all_dtypes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {f"t.{np.dtype(dt).name}": (rng.normal(0, 50, (7, 5)) if dt != np.bool_ else rng.random((7, 5)) < 0.3)
           .astype(dt) for dt in (np.float64, np.float32, np.float16, np.int8, np.int16, np.int32, np.int64,
                                  np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}
    out["empty.w"] = np.zeros((0, 4), np.float32)
    out["scalar"] = np.array(3.5, np.float32)
    return out


def test_round_trip_every_numpy_dtype_bit_exact(tmp_path):
    src = tmp_path / "dt.safetensors"
    stnp.save_file(all_dtypes(), src)
    res = protect_file(src, policy=ALL, chunk_size=64)
    # An empty tensor has no bytes to replace: it is not counted as locked (test_honest_lock_count.py).
    assert set(res.locked_tensors) == set(all_dtypes()) - {"empty.w"} and res.left_as_is == ["empty.w"]
    assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()
    locked = stnp.load_file(res.locked_path)
    for name, arr in all_dtypes().items():
        assert locked[name].dtype == arr.dtype and locked[name].shape == arr.shape
        if arr.size > 4 and arr.dtype != np.bool_:
            assert not np.array_equal(locked[name], arr), name


def test_round_trip_bfloat16_and_float8(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(300, 7, generator=g).to(torch.bfloat16),
               "b.f8": torch.randn(64, 3, generator=g).to(torch.float8_e4m3fn),
               "c.f32": torch.randn(5, 5, generator=g)}
    src = tmp_path / "bf.safetensors"
    save_file(tensors, src)
    res = protect_file(src, policy=ALL, chunk_size=100)
    assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()
    locked = load_file(res.locked_path)
    orig = tensors["a.bf16"].float()
    decoy = locked["a.bf16"].float()
    assert locked["a.bf16"].dtype == torch.bfloat16 and not torch.equal(decoy, orig)
    assert abs(decoy.mean() - orig.mean()) < 0.2 and abs(decoy.std() - orig.std()) < 0.2


def test_empty_tensors_sharing_an_offset(tmp_path):
    src = tmp_path / "e.safetensors"
    stnp.save_file({"a.w": np.ones((3, 3), np.float32), "b.w": np.zeros((0, 3), np.float32),
                    "c.w": np.zeros((0,), np.int8), "d.w": np.full((2, 2), 7, np.int64)}, src)
    res = protect_file(src, policy=ALL, chunk_size=16)
    assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()
    only_empty = protect_file(src, tmp_path / "o", policy=LockPolicy(patterns=("b.w", "c.w")))
    assert read_header(only_empty.bundle_path).chunk_count == 1
    assert restore(only_empty.locked_path, only_empty.bundle_path, only_empty.data_key) == src.read_bytes()


def test_tensor_larger_than_many_chunks_and_restore_to_memfd(tmp_path):
    src = tmp_path / "big.safetensors"
    rng = np.random.default_rng(2)
    stnp.save_file({"w.0.weight": rng.normal(size=(300, 257)).astype(np.float32),
                    "w.1.weight": rng.normal(size=(3, 3)).astype(np.float32)}, src)
    res = protect_file(src, policy=ALL, chunk_size=4096)
    hdr = read_header(res.bundle_path)
    assert hdr.chunk_count == -(-(300 * 257 + 9) * 4 // 4096) and hdr.suite == SUITE
    fd = os.memfd_create("restore-test")
    with os.fdopen(fd, "w+b") as out:
        out.write(b"prefix")
        n = restore_to(res.locked_path, res.bundle_path, res.data_key, out)
        assert n == src.stat().st_size and out.tell() == 6 + n
        out.seek(0)
        assert out.read() == b"prefix" + src.read_bytes()


def test_bundle_as_bytes_and_header_fields(small_model):
    res = protect_file(small_model, model_id="small-1", chunk_size=128)
    blob = res.bundle_path.read_bytes()
    hdr = read_header(blob)
    assert hdr.model_id == "small-1" and hdr.format == "safetensors"
    assert hdr.locked_digest == hashlib.sha256(res.locked_path.read_bytes()).hexdigest()
    assert [t.name for t in hdr.tensors] == res.locked_tensors
    assert hdr.bundle_size == len(blob) and blob.startswith(MAGIC)
    assert restore(res.locked_path, blob, res.data_key) == small_model.read_bytes()


def test_key_never_in_repr_or_files(small_model, tmp_path):
    key = os.urandom(32)
    res = protect_file(small_model, data_key=key)
    assert key.hex() not in repr(res) and repr(key) not in repr(res)
    for path in (res.locked_path, res.bundle_path):
        assert key not in path.read_bytes()


def test_decoys_are_reproducible_from_the_key_only(small_model, tmp_path):
    key = os.urandom(32)
    a = protect_file(small_model, tmp_path / "a", data_key=key)
    b = protect_file(small_model, tmp_path / "b", data_key=key)
    c = protect_file(small_model, tmp_path / "c")
    assert a.locked_path.read_bytes() == b.locked_path.read_bytes()
    assert a.locked_path.read_bytes() != c.locked_path.read_bytes()
    # Same key, fresh salt: the bundles (cipher keys, nonces) still differ.
    assert a.bundle_path.read_bytes()[-64:] != b.bundle_path.read_bytes()[-64:]


# --- tampering -------------------------------------------------------------------------------------
@pytest.fixture
def tiny(small_model):
    """A bundle with a few small chunks: every header byte can be flipped in a test."""
    res = protect_file(small_model, policy=LockPolicy(patterns=("fc1.bias", "fc3.bias")), chunk_size=32)
    return res, res.bundle_path.read_bytes(), small_model.read_bytes()


def _refused(res, blob, key=None, locked=None):
    with pytest.raises(LockError):
        restore(locked or res.locked_path, blob, key or res.data_key)


def test_every_header_byte_flip_is_refused(tiny):
    res, blob, _ = tiny
    hdr = read_header(blob)
    for i in range(hdr.header_size + CHECK):
        mutated = bytearray(blob)
        mutated[i] ^= 0x01 if i % 2 else 0x80
        _refused(res, bytes(mutated))


def test_body_flips_truncation_appending_and_reordering_are_refused(tiny):
    res, blob, _ = tiny
    hdr = read_header(blob)
    body = hdr.header_size + CHECK
    for i in range(body, len(blob)):
        mutated = bytearray(blob)
        mutated[i] ^= 0x04
        with pytest.raises(BundleIntegrityError):
            restore(res.locked_path, bytes(mutated), res.data_key)
    for cut in (1, 16, 17, 48, len(blob) - body, len(blob) - 20):
        with pytest.raises(BundleFormatError):
            restore(res.locked_path, blob[:-cut], res.data_key)
    for extra in (b"\0", blob[body:body + 48]):
        with pytest.raises(BundleFormatError):
            restore(res.locked_path, blob + extra, res.data_key)
    assert hdr.chunk_count >= 3 and hdr.chunk_len(0) == hdr.chunk_len(1) == 32
    c0, c1 = blob[body:body + 48], blob[body + 48:body + 96]
    with pytest.raises(BundleIntegrityError, match="chunk 0"):
        restore(res.locked_path, blob[:body] + c1 + c0 + blob[body + 96:], res.data_key)


def test_wrong_key_and_wrong_locked_file(tiny, small_model, tmp_path):
    res, blob, _ = tiny
    with pytest.raises(BundleIntegrityError, match="data key does not match"):
        restore(res.locked_path, blob, os.urandom(32))
    with pytest.raises(BundleIntegrityError):
        restore(res.locked_path, blob, b"short")
    other = protect_file(small_model, tmp_path / "other", policy=LockPolicy(patterns=("fc1.bias", "fc3.bias")))
    with pytest.raises(LockedFileMismatch):
        restore(other.locked_path, blob, res.data_key)
    edited = tmp_path / "edited.safetensors"
    data = bytearray(res.locked_path.read_bytes())
    data[-1] ^= 1
    edited.write_bytes(bytes(data))
    with pytest.raises(LockedFileMismatch):
        restore(edited, blob, res.data_key)
    with pytest.raises(LockedFileMismatch):
        restore(tmp_path / "missing.safetensors", blob, res.data_key)
    with pytest.raises(BundleFormatError):
        read_header(tmp_path / "missing.llk")


def test_failed_restore_to_leaves_output_truncated(tiny):
    res, blob, _ = tiny
    mutated = bytearray(blob)
    mutated[-1] ^= 1
    out = io.BytesIO()
    out.write(b"keep")
    with pytest.raises(BundleIntegrityError):
        restore_to(res.locked_path, bytes(mutated), res.data_key, out)
    assert out.getvalue() == b"keep"


def _repack(blob: bytes, doc: object) -> bytes:
    n = struct.unpack(">I", blob[10:14])[0]
    body = json.dumps(doc).encode()
    return blob[:10] + struct.pack(">I", len(body)) + body + blob[14 + n:]


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_lock_error(tiny, data):
    res, blob, _ = tiny
    for candidate in (data, MAGIC + data, blob[:14] + data):
        with pytest.raises(LockError):
            read_header(candidate)
        with pytest.raises(LockError):
            restore(res.locked_path, candidate, res.data_key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, 10**6), xor=st.integers(1, 255), cut=st.integers(0, 64), insert=st.binary(max_size=8))
def test_mutated_bundles_only_raise_lock_error(tiny, pos, xor, cut, insert):
    res, blob, _ = tiny
    i = pos % len(blob)
    flipped = bytearray(blob)
    flipped[i] ^= xor
    for candidate in (bytes(flipped), blob[:len(blob) - cut - 1], blob[:i] + insert + blob[i:] if insert else blob[:i]):
        with contextlib.suppress(LockError):
            read_header(candidate)
        with pytest.raises(LockError):
            restore(res.locked_path, candidate, res.data_key)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["model_id", "format", "locked_digest", "locked_size", "plain_size", "chunk_size",
                              "chunk_count", "suite", "kdf", "salt", "tensors", "extra", "t.name", "t.dtype",
                              "t.shape", "t.offset", "t.length", "t.extra"]),
       value=json_values)
def test_rewritten_header_fields_only_raise_lock_error(tiny, field, value):
    res, blob, _ = tiny
    doc = json.loads(blob[14:14 + struct.unpack(">I", blob[10:14])[0]])
    if field.startswith("t."):
        doc["tensors"][0][field[2:]] = value
    else:
        doc[field] = value
    with pytest.raises(LockError):
        restore(res.locked_path, _repack(blob, doc), res.data_key)


class _Stream(io.RawIOBase):
    """A seekable stream without fileno(): exercises restore_to's generic path."""

    def __init__(self) -> None:
        self.inner = io.BytesIO()

    def writable(self):
        return True

    def seekable(self):
        return True

    def write(self, b):
        return self.inner.write(b)

    def seek(self, pos, whence=0):
        return self.inner.seek(pos, whence)

    def tell(self):
        return self.inner.tell()

    def truncate(self, size=None):
        return self.inner.truncate(size)


@pytest.mark.parametrize("kind", ["memfd", "file", "stream", "bytesio"])
def test_restore_to_every_output_kind_and_failure_truncates(tiny, tmp_path, kind):
    res, blob, original = tiny
    bad = bytearray(blob)
    bad[-3] ^= 1
    if kind == "memfd":
        out = os.fdopen(os.memfd_create("t"), "w+b")
    elif kind == "file":
        out = open(tmp_path / "out.bin", "w+b")  # noqa: SIM115 - closed by the with below
    else:
        out = _Stream() if kind == "stream" else io.BytesIO()
    with out:
        out.write(b"head")
        with pytest.raises(BundleIntegrityError):
            restore_to(res.locked_path, bytes(bad), res.data_key, out)
        assert out.tell() == 4
        assert restore_to(res.locked_path, blob, res.data_key, out) == len(original)
        assert out.tell() == 4 + len(original)
        out.seek(0)
        data = out.inner.getvalue() if kind == "stream" else out.read()
    assert data == b"head" + original


def test_large_model_default_policy_both_restore_paths(tmp_path):
    """Above the huge-page threshold (32 MiB), through both restore() and restore_to(memfd)."""
    src = tmp_path / "large.safetensors"
    rng = np.random.default_rng(3)
    stnp.save_file({f"layers.{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(10)},
                   src)
    res = protect_file(src)
    assert 0.05 <= res.fraction < 1 and res.locked_tensors[0] == "layers.0.weight"  # the input layer first
    original = src.read_bytes()
    assert restore(res.locked_path, res.bundle_path, res.data_key) == original
    with os.fdopen(os.memfd_create("large"), "w+b") as out:
        assert restore_to(res.locked_path, res.bundle_path, res.data_key, out) == len(original)
        out.seek(0)
        assert out.read() == original


# --- review fixes ----------------------------------------------------------------------------------
def test_model_id_with_trailing_newline_is_refused(small_model, tiny):
    from layerlock.shared.errors import InvalidInput

    with pytest.raises(InvalidInput):
        protect_file(small_model, model_id="model-1\n")
    res, blob, _ = tiny
    doc = json.loads(blob[14:14 + struct.unpack(">I", blob[10:14])[0]])
    doc["model_id"] += "\n"
    with pytest.raises(BundleFormatError, match="model id"):
        read_header(_repack(blob, doc))


def test_tensors_a_bundle_cannot_list_are_never_locked(tmp_path):
    """A tensor named "" (or of rank > 64) would make an unreadable bundle: it is left unlocked."""
    src = tmp_path / "odd.safetensors"
    stnp.save_file({"": np.ones((4, 4), np.float32), "a.w": np.full((4, 4), 2, np.float32)}, src)
    res = protect_file(src, policy=ALL)
    assert res.locked_tensors == ["a.w"]
    assert restore(res.locked_path, res.bundle_path, res.data_key) == src.read_bytes()


def test_protect_does_not_follow_a_planted_temporary_symlink(small_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (out / ".small.llk.tmp").symlink_to(victim)
    (out / ".small.locked.safetensors.tmp").symlink_to(victim)
    res = protect_file(small_model, out)
    assert victim.read_bytes() == b"precious"
    assert restore(res.locked_path, res.bundle_path, res.data_key) == small_model.read_bytes()
    assert not (out / ".small.llk.tmp").exists() and not (out / ".small.llk.tmp").is_symlink()
