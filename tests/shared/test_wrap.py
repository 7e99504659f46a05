"""HPKE key wrapping: every suite round-trips; any other key, binding or byte fails to open."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from layerlock.shared.errors import WrapError
from layerlock.shared.wrap import (
    DEFAULT_SUITE,
    SUITES,
    MachineKemKeys,
    binding_info,
    open_from_vendor,
    open_sealed,
    public_for,
    seal,
    seal_for_server,
)

SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def machine() -> MachineKemKeys:
    return MachineKemKeys(x25519.X25519PrivateKey.generate(), mlkem.MLKEM768PrivateKey.generate())


def _pub(keys: MachineKemKeys, suite: str):
    assert keys.mlkem768 is not None
    return public_for(suite, keys.x25519.public_key(), keys.mlkem768.public_key())


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_round_trip_every_suite(machine, suite):
    info = binding_info("lic_1", "LLK-X", "model-a")
    sealed = seal(SECRET, _pub(machine, suite), suite, info)
    assert SECRET not in sealed
    assert open_sealed(sealed, machine.private_for(suite), suite, info) == SECRET


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_other_machine_cannot_open(machine, suite):
    other = MachineKemKeys(x25519.X25519PrivateKey.generate(), mlkem.MLKEM768PrivateKey.generate())
    info = binding_info("lic_1", "LLK-X", "model-a")
    sealed = seal(SECRET, _pub(machine, suite), suite, info)
    with pytest.raises(WrapError, match="does not open"):
        open_sealed(sealed, other.private_for(suite), suite, info)


@pytest.mark.parametrize("changed", [("lic_2", "LLK-X", "model-a"), ("lic_1", "LLK-Y", "model-a"),
                                     ("lic_1", "LLK-X", "model-b")])
def test_binding_is_enforced(machine, changed):
    sealed = seal(SECRET, machine.x25519.public_key(), DEFAULT_SUITE, binding_info("lic_1", "LLK-X", "model-a"))
    with pytest.raises(WrapError):
        open_sealed(sealed, machine.x25519, DEFAULT_SUITE, binding_info(*changed))


def test_binding_fields_cannot_run_together():
    assert binding_info("a", "bc", "d") != binding_info("ab", "c", "d")
    with pytest.raises(WrapError):
        binding_info("", "m", "x")
    with pytest.raises(WrapError):
        binding_info("a\0b", "m", "x")


def test_tampered_and_wrong_suite(machine):
    info = binding_info("l", "m", "x")
    sealed = bytearray(seal(SECRET, machine.x25519.public_key(), DEFAULT_SUITE, info))
    for i in (0, 31, 32, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[i] ^= 0x80
        with pytest.raises(WrapError):
            open_sealed(bytes(flipped), machine.x25519, DEFAULT_SUITE, info)
    with pytest.raises(WrapError):
        open_sealed(bytes(sealed), machine.x25519, "X25519-SHA256-CHACHA20POLY1305", info)
    with pytest.raises(WrapError, match="unknown HPKE suite"):
        open_sealed(bytes(sealed), machine.x25519, "ROT13", info)
    with pytest.raises(WrapError):
        open_sealed(bytes(sealed[:20]), machine.x25519, DEFAULT_SUITE, info)


def test_hybrid_needs_mlkem_key():
    classic = MachineKemKeys(x25519.X25519PrivateKey.generate())
    with pytest.raises(WrapError, match="ML-KEM"):
        classic.private_for("MLKEM768X25519-SHA256-AES256GCM")
    with pytest.raises(WrapError, match="ML-KEM"):
        public_for("MLKEM768X25519-SHA256-AES256GCM", classic.x25519.public_key(), None)


def test_intake_round_trip_and_model_binding():
    intake = x25519.X25519PrivateKey.generate()
    doc = seal_for_server(SECRET, intake.public_key(), "model-a")
    assert open_from_vendor(doc, intake, "model-a") == SECRET
    with pytest.raises(WrapError, match="another model"):
        open_from_vendor(doc, intake, "model-b")
    # Relabelled document: the HPKE info binding catches it even if the label is changed.
    relabelled = dict(doc, model="model-b")
    with pytest.raises(WrapError):
        open_from_vendor(relabelled, intake, "model-b")
    with pytest.raises(WrapError):
        open_from_vendor(doc, x25519.X25519PrivateKey.generate(), "model-a")
    for bad in (None, [], {"v": 2}, dict(doc, sealed=5), dict(doc, sealed="!!!"), dict(doc, suite="X")):
        with pytest.raises(WrapError):
            open_from_vendor(bad, intake, "model-a")
