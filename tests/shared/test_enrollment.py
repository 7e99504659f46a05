"""Enrollment code: round trip, self-signature, and every field's malformed form."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from layerlock.shared.enrollment import DeviceClass, Enrollment, make_code, parse_code
from layerlock.shared.errors import InvalidInput, MachineCodeError, SignatureError
from layerlock.shared.keys import b64u_decode, b64u_encode
from layerlock.shared.machine import MachineSources, derive_code

MACHINE = derive_code(MachineSources("enroll-test"))


@pytest.fixture(scope="module")
def keys():
    return ed25519.Ed25519PrivateKey.generate(), x25519.X25519PrivateKey.generate(), mlkem.MLKEM768PrivateKey.generate()


def _enrollment(keys, pq=True) -> Enrollment:
    sig, kex, pqk = keys
    return Enrollment(machine=MACHINE, sig_pub=sig.public_key().public_bytes_raw(),
                      kex_pub=kex.public_key().public_bytes_raw(),
                      pq_pub=pqk.public_key().public_bytes_raw() if pq else None,
                      device=DeviceClass(vendor="Dell", type="x86_64", os="Debian 12", aes=True))


@pytest.mark.parametrize("pq", [True, False])
def test_round_trip(keys, pq):
    enrollment = _enrollment(keys, pq)
    code = make_code(enrollment, keys[0])
    assert "\n" not in code and code.startswith("LLE1.")
    assert parse_code(code) == enrollment
    assert parse_code("  " + code + "\n") == enrollment


def test_detect_device_class():
    dev = DeviceClass.detect()
    assert dev.type and isinstance(dev.aes, bool)


def _resign(payload: dict, key) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return f"LLE1.{b64u_encode(body)}.{b64u_encode(key.sign(b'layerlock-enroll-v1' + bytes(1) + body))}"


def test_signature_by_another_key_rejected(keys):
    code = make_code(_enrollment(keys), ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="self-signature"):
        parse_code(code)


def test_altered_payload_rejected(keys):
    code = make_code(_enrollment(keys), keys[0])
    _, body, sig = code.split(".")
    payload = json.loads(b64u_decode(body))
    payload["device"]["aes"] = False
    altered = f"LLE1.{b64u_encode(json.dumps(payload, sort_keys=True, separators=(',', ':')).encode())}.{sig}"
    with pytest.raises(SignatureError):
        parse_code(altered)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda p: p.update(v=2), InvalidInput, "version"),
    (lambda p: p.update(machine="LLK-nope"), MachineCodeError, "machine code"),
    (lambda p: p.update(kex_pub=b64u_encode(b"short")), InvalidInput, "kex_pub"),
    (lambda p: p.update(sig_pub=5), InvalidInput, "sig_pub"),
    (lambda p: p.update(pq_pub=b64u_encode(b"x" * 100)), InvalidInput, "pq_pub"),
    (lambda p: p.update(device={"vendor": "v", "type": "t", "os": "o"}), InvalidInput, "aes"),
    (lambda p: p["device"].update(vendor=""), InvalidInput, "vendor"),
])
def test_malformed_fields(keys, mutate, exc, match):
    payload = _enrollment(keys).payload()
    mutate(payload)
    with pytest.raises(exc, match=match):
        parse_code(_resign(payload, keys[0]))


@pytest.mark.parametrize("code", ["", "LLE1", "LLE2.a.b", "LLE1.a.b.c", "LLE1.%%%.abc", "LLE1.e30.AAAA", 7,
                                  "LLE1." + "A" * 9000 + ".x"])
def test_garbage(code):
    with pytest.raises(InvalidInput):
        parse_code(code)  # type: ignore[arg-type]
