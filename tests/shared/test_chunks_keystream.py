"""No AES-GCM keystream is ever used twice, and only 32-byte data keys open a bundle.

shared/chunks.py promises unique (key, nonce) pairs: the chunk key is derived from the data key
*and* the bundle's 128-bit salt, and chunk ``i`` uses nonce ``salt[:4] || u64 i``.  A repeated
pair would show as two ciphertexts of equal plaintext being equal (CTR keystream reuse), which is
what these tests look for from the outside.  Found by ``bench/mutants.py`` (C4, C6, C8): the lock
format tests passed with one nonce for all chunks, with an unsalted key derivation, and with
16-byte keys accepted.
"""

from __future__ import annotations

import os
import secrets
import types

import numpy as np
import pytest
import safetensors.numpy as stnp

from layerlock.shared import lockfile
from layerlock.shared.bundle import CHECK, SALT, TAG, read_header
from layerlock.shared.errors import BundleIntegrityError
from layerlock.shared.lockfile import protect, restore
from layerlock.shared.selection import LockPolicy

CHUNK = 64


def _bodies(blob: bytes) -> list[bytes]:
    """Each chunk's ciphertext without its tag (what a keystream reuse would make equal)."""
    hdr = read_header(blob)
    pos, out = hdr.header_size + CHECK, []
    for i in range(hdr.chunk_count):
        n = hdr.chunk_len(i)
        out.append(blob[pos:pos + n])
        pos += n + TAG
    return out


@pytest.fixture
def zeros(tmp_path):
    """One all-zero tensor over eight full chunks: every chunk has the same plaintext."""
    src = tmp_path / "zeros.safetensors"
    stnp.save_file({"w": np.zeros(8 * CHUNK // 4, np.float32), "b": np.ones(4, np.float32)}, src)
    return src


def test_chunks_of_equal_plaintext_never_share_a_keystream(zeros, tmp_path):
    res = protect(zeros, tmp_path / "out", policy=LockPolicy(patterns=("w",)), chunk_size=CHUNK)
    bodies = _bodies(res.bundle_path.read_bytes())
    assert len(bodies) == 8 and all(len(b) == CHUNK for b in bodies)
    assert len(set(bodies)) == len(bodies)
    assert restore(res.locked_path, res.bundle_path, res.data_key) == zeros.read_bytes()


def test_same_data_key_and_salts_sharing_the_nonce_prefix_still_use_other_keys(zeros, tmp_path, monkeypatch):
    """The nonce holds only ``salt[:4]``; the rest of the salt must still change the chunk key."""
    key, prefix = os.urandom(32), os.urandom(4)
    bundles = []
    for name in ("a", "b"):
        salt = prefix + os.urandom(SALT - 4)
        fake = types.SimpleNamespace(token_bytes=lambda n, s=salt: s if n == SALT else secrets.token_bytes(n),
                                     token_hex=secrets.token_hex)
        monkeypatch.setattr(lockfile, "secrets", fake)
        res = protect(zeros, tmp_path / name, model_id="m-1", policy=LockPolicy(patterns=("w",)), data_key=key,
                      chunk_size=CHUNK)
        blob = res.bundle_path.read_bytes()
        assert read_header(blob).salt == salt
        assert restore(res.locked_path, blob, key) == zeros.read_bytes()
        bundles.append(_bodies(blob))
    assert all(x != y for x, y in zip(*bundles, strict=True))


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_only_32_byte_data_keys_open_a_bundle(zeros, tmp_path, size):
    res = protect(zeros, tmp_path / "out", policy=LockPolicy(patterns=("w",)), chunk_size=CHUNK)
    with pytest.raises(BundleIntegrityError, match="32 bytes"):
        restore(res.locked_path, res.bundle_path, res.data_key[:size] + bytes(max(0, size - 32)))
