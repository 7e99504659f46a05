"""Activation request: signed by the machine key; the parser rejects every malformed field."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.activation import make_request, parse_request, verify_signature
from layerlock.shared.errors import InvalidInput, MachineCodeError, SignatureError
from layerlock.shared.machine import MachineSources, derive_code

MACHINE = derive_code(MachineSources("activation-test"))


def test_round_trip_and_signature():
    key = ed25519.Ed25519PrivateKey.generate()
    req = make_request(MACHINE, "model-a", key)
    parsed = parse_request(req.to_dict())
    assert parsed == req
    verify_signature(parsed, key.public_key())
    with pytest.raises(SignatureError):
        verify_signature(parsed, ed25519.Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize("field,value", [("model", "model-b"), ("ts", 1), ("nonce", "A" * 22)])
def test_any_changed_field_breaks_signature(field, value):
    key = ed25519.Ed25519PrivateKey.generate()
    body = make_request(MACHINE, "model-a", key).to_dict()
    body[field] = value
    with pytest.raises(SignatureError):
        verify_signature(parse_request(body), key.public_key())


def test_nonces_are_fresh():
    key = ed25519.Ed25519PrivateKey.generate()
    assert make_request(MACHINE, "m", key).nonce != make_request(MACHINE, "m", key).nonce


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda b: b.update(extra=1), InvalidInput, "unknown field"),
    (lambda b: b.pop("sig"), InvalidInput, "missing field"),
    (lambda b: b.update(ts="now"), InvalidInput, "ts"),
    (lambda b: b.update(ts=True), InvalidInput, "ts"),
    (lambda b: b.update(ts=-1), InvalidInput, "ts"),
    (lambda b: b.update(nonce="short"), InvalidInput, "nonce"),
    (lambda b: b.update(sig="AAAA"), InvalidInput, "sig"),
    (lambda b: b.update(model="../etc/passwd"), InvalidInput, "model"),
    (lambda b: b.update(model=""), InvalidInput, "model"),
    (lambda b: b.update(machine="LLK-AAAAA"), MachineCodeError, "machine code"),
])
def test_malformed(mutate, exc, match):
    body = make_request(MACHINE, "model-a", ed25519.Ed25519PrivateKey.generate()).to_dict()
    mutate(body)
    with pytest.raises(exc, match=match):
        parse_request(body)


@pytest.mark.parametrize("body", [None, [], "x", 3])
def test_not_an_object(body):
    with pytest.raises(InvalidInput, match="JSON object"):
        parse_request(body)


def test_model_id_with_trailing_newline_rejected():
    body = make_request(MACHINE, "model-a", ed25519.Ed25519PrivateKey.generate()).to_dict()
    body["model"] = "model-a\n"
    with pytest.raises(InvalidInput, match="model"):
        parse_request(body)
