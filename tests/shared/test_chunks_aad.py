"""What each chunk's AES-GCM associated data binds, pinned one part at a time.

The AAD of chunk ``i`` is ``sha256(magic..header) || u64 i || final flag`` (:mod:`layerlock.shared.chunks`).
The index is also in the nonce, so reordering is caught without it; the other two parts are only
caught by tests built so that nothing else gives the tampering away:

* **header digest**: two bundles under the same data key *and the same salt* (so the same chunk
  key and nonces), with different headers.  A chunk of one spliced into the other at the same
  index is a valid ciphertext under that key; only the header digest in its AAD says it belongs
  to another bundle.  (With different salts the subkeys differ and any splice fails anyway --
  protect draws a fresh salt, so the test pins the salt to build the one case where the digest
  is the last line of defence, as it would be after a salt collision or a buggy RNG.)
* **final flag**: a middle chunk re-sealed with the real key, its own index and header digest but
  the final flag set is otherwise indistinguishable from the original (same length, same nonce).

Truncation itself is refused before any chunk is opened (the header fixes the bundle's exact
size), and a header rewritten for a shorter payload no longer matches the digest sealed into
the chunks: those are pinned here too, with the check that catches each named in the test.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import types

import numpy as np
import pytest
import safetensors.numpy as stnp
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from layerlock.shared import chunks, lockfile
from layerlock.shared.bundle import CHECK, SALT, TAG, header_bytes, read_header
from layerlock.shared.errors import BundleFormatError, BundleIntegrityError
from layerlock.shared.lockfile import protect, restore
from layerlock.shared.selection import LockPolicy

CHUNK = 64


def _pin_salt(monkeypatch: pytest.MonkeyPatch, salt: bytes) -> None:
    """Make protect draw ``salt`` for its bundle (only lockfile's view of ``secrets`` changes)."""
    fake = types.SimpleNamespace(token_bytes=lambda n: salt if n == SALT else secrets.token_bytes(n),
                                 token_hex=secrets.token_hex)
    monkeypatch.setattr(lockfile, "secrets", fake)


def _chunk_span(blob: bytes, index: int) -> tuple[int, int]:
    """Byte range of sealed chunk ``index`` in the bundle ``blob``."""
    hdr = read_header(blob)
    start = hdr.header_size + CHECK + sum(hdr.chunk_len(i) + TAG for i in range(index))
    return start, start + hdr.chunk_len(index) + TAG


def _splice(blob: bytes, index: int, sealed: bytes) -> bytes:
    start, end = _chunk_span(blob, index)
    assert len(sealed) == end - start
    return blob[:start] + sealed + blob[end:]


def _chunk(blob: bytes, index: int) -> bytes:
    start, end = _chunk_span(blob, index)
    return blob[start:end]


@pytest.mark.parametrize("other", ["model_id", "selection"])
def test_chunk_sealed_under_same_key_and_salt_for_another_header_is_refused(small_model, tmp_path, monkeypatch,
                                                                           other):
    """Break caught: dropping the header digest from the chunk AAD (chunks.aad)."""
    key, salt = os.urandom(32), os.urandom(SALT)
    _pin_salt(monkeypatch, salt)
    a = protect(small_model, tmp_path / "a", model_id="m-a", policy=LockPolicy(patterns=("fc1.weight",)),
                data_key=key, chunk_size=CHUNK)
    b = protect(small_model, tmp_path / "b", model_id="m-b" if other == "model_id" else "m-a",
                policy=LockPolicy(patterns=("fc1.weight" if other == "model_id" else "fc2.weight",)),
                data_key=key, chunk_size=CHUNK)
    blob_a, blob_b = a.bundle_path.read_bytes(), b.bundle_path.read_bytes()
    ha, hb = read_header(blob_a), read_header(blob_b)
    # The set-up: same key and salt (so same chunk key and nonces), different headers, and both
    # bundles are genuine (each restores under the shared key).
    assert ha.salt == hb.salt == salt and ha.digest != hb.digest
    assert restore(a.locked_path, blob_a, key) == small_model.read_bytes()
    assert restore(b.locked_path, blob_b, key) == small_model.read_bytes()
    index = 1
    assert ha.chunk_len(index) == hb.chunk_len(index) == CHUNK
    if other == "selection":  # the splice would put another tensor's real values into this one
        assert _chunk(blob_a, index) != _chunk(blob_b, index)
    spliced = _splice(blob_a, index, _chunk(blob_b, index))
    with pytest.raises(BundleIntegrityError, match=f"chunk {index} of {ha.chunk_count} fails authentication"):
        restore(a.locked_path, spliced, key)


def _reseal(blob: bytes, key: bytes, index: int, *, final: bool) -> bytes:
    """Chunk ``index`` of ``blob`` decrypted and sealed again with the library's primitives."""
    hdr = read_header(blob)
    enc_key, _, _ = chunks.subkeys(key, hdr.salt)
    aes = AESGCM(enc_key)
    nonce = chunks.nonce(hdr.salt, index)
    plain = aes.decrypt(nonce, _chunk(blob, index), chunks.aad(hdr.digest, index, index == hdr.chunk_count - 1))
    return aes.encrypt(nonce, plain, chunks.aad(hdr.digest, index, final))


@pytest.fixture
def three_tensors(tmp_path):
    """a, b, c: 128 bytes each, all locked, 64-byte chunks: tensor boundaries fall on chunks 2 and 4."""
    src = tmp_path / "abc.safetensors"
    rng = np.random.default_rng(7)
    stnp.save_file({n: rng.normal(0, 1, 32).astype(np.float32) for n in "abc"}, src)
    res = protect(src, tmp_path / "out", policy=LockPolicy(patterns=("*",)), chunk_size=CHUNK)
    blob = res.bundle_path.read_bytes()
    hdr = read_header(blob)
    assert hdr.chunk_count == 6 and [t.length for t in hdr.tensors] == [128, 128, 128]
    return src, res, blob


def test_middle_chunk_resealed_as_final_is_refused(three_tensors):
    """Break caught: dropping the final flag from the chunk AAD (chunks.aad)."""
    src, res, blob = three_tensors
    hdr = read_header(blob)
    for index in range(hdr.chunk_count - 1):
        # Re-sealing with the flag the writer used gives back the very same bytes: the primitives
        # are used exactly as protect uses them, and the flag is the only thing changed below.
        assert _reseal(blob, res.data_key, index, final=False) == _chunk(blob, index)
        marked = _splice(blob, index, _reseal(blob, res.data_key, index, final=True))
        with pytest.raises(BundleIntegrityError, match=f"chunk {index} of {hdr.chunk_count} fails authentication"):
            restore(res.locked_path, marked, res.data_key)
    assert restore(res.locked_path, blob, res.data_key) == src.read_bytes()


def test_bundle_truncated_after_a_middle_chunk_marked_final_is_refused(three_tensors):
    """Truncation right after a chunk re-sealed as final (tensors a and b kept, c dropped).

    * as is: the header still says six chunks -- refused by the header's exact size (bundle._parse)
      before any chunk is opened;
    * with the header rewritten for the shorter payload (a and b only, four chunks) and a valid key
      check for it (the test holds the key): refused because chunks 0-3 were sealed under the
      original header's digest.  Break caught: dropping the header digest from the AAD -- the
      truncated model then restores with c left as a decoy;
    * the same without re-sealing chunk 3 as final: refused while either the header digest or the
      final flag is bound (either alone suffices; removing both lets it through).
    """
    src, res, blob = three_tensors
    hdr = read_header(blob)
    last = 3  # the last chunk of tensor b
    marked = _splice(blob, last, _reseal(blob, res.data_key, last, final=True))
    _, cut = _chunk_span(marked, last)
    with pytest.raises(BundleFormatError, match="truncated"):
        restore(res.locked_path, marked[:cut], res.data_key)

    kept = list(hdr.tensors[:2])
    header = header_bytes(hdr.model_id, hdr.format, hdr.locked_digest, hdr.locked_mac, hdr.locked_size,
                          sum(t.length for t in kept), hdr.chunk_size, hdr.salt, kept)
    _, check_key, _ = chunks.subkeys(res.data_key, hdr.salt)
    rewritten = header + chunks.key_check(check_key, hashlib.sha256(header).digest())
    body = marked[hdr.header_size + CHECK:cut]
    short = read_header(rewritten + body)
    assert short.chunk_count == last + 1 and short.digest != hdr.digest
    with pytest.raises(BundleIntegrityError, match="chunk 0 of 4 fails authentication"):
        restore(res.locked_path, rewritten + body, res.data_key)
    unmarked = blob[hdr.header_size + CHECK:cut]
    with pytest.raises(BundleIntegrityError, match="fails authentication"):
        restore(res.locked_path, rewritten + unmarked, res.data_key)
