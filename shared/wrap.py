"""Key wrapping: the data key sealed to one machine with HPKE (RFC 9180).

We use ``cryptography``'s HPKE in base mode (single-shot ``Suite.encrypt``/``decrypt``).  The
``info`` parameter binds the sealed key to the license id, machine code and model id: a ``wk``
lifted out of one token and replayed into another context fails to open, even on the right
machine.

Suites are named by a short stable string that travels in the token's ``suite`` claim, so the
verifier knows how to open ``wk`` without guessing.  Which suite a machine gets is chosen by the
server's device-class policy (:mod:`layerlock.license_server.policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from layerlock.shared.errors import WrapError

DEFAULT_SUITE = "X25519-SHA256-AES256GCM"
SUITES: dict[str, tuple[hpke.KEM, hpke.KDF, hpke.AEAD]] = {
    DEFAULT_SUITE: (hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    # Devices without AES instructions: ChaCha20 is constant-time in software.
    "X25519-SHA256-CHACHA20POLY1305": (hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305),
    # Post-quantum hybrid: secure while either ML-KEM-768 or X25519 holds.
    "MLKEM768X25519-SHA256-AES256GCM": (hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
HYBRID_SUITES = frozenset({"MLKEM768X25519-SHA256-AES256GCM"})

PublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
PrivateKey = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


@dataclass(frozen=True)
class MachineKemKeys:
    """A machine's key-agreement keys: classic X25519 and, optionally, ML-KEM-768 for the hybrid."""

    x25519: x25519.X25519PrivateKey
    mlkem768: mlkem.MLKEM768PrivateKey | None = None

    def private_for(self, suite: str) -> PrivateKey:
        if suite in HYBRID_SUITES:
            if self.mlkem768 is None:
                raise WrapError(f"suite {suite} needs an ML-KEM-768 key, which this machine lacks")
            return hpke.MLKEM768X25519PrivateKey(self.mlkem768, self.x25519)
        return self.x25519


def public_for(suite: str, x25519_pub: x25519.X25519PublicKey,
               mlkem_pub: mlkem.MLKEM768PublicKey | None) -> PublicKey:
    """The recipient public key a suite needs, from a machine's registered public keys."""
    if suite in HYBRID_SUITES:
        if mlkem_pub is None:
            raise WrapError(f"suite {suite} needs the machine's ML-KEM-768 public key")
        return hpke.MLKEM768X25519PublicKey(mlkem_pub, x25519_pub)
    return x25519_pub


def binding_info(license_id: str, machine_code: str, model_id: str) -> bytes:
    """HPKE ``info``: what a wrapped key is for.  NUL-separated, so fields cannot run together."""
    for name, value in (("license id", license_id), ("machine code", machine_code), ("model id", model_id)):
        if not value or "\0" in value:
            raise WrapError(f"{name} must be a non-empty string without NUL")
    return b"\0".join([b"layerlock-wk-v1", license_id.encode(), machine_code.encode(), model_id.encode()])


def _suite(name: str) -> hpke.Suite:
    try:
        kem, kdf, aead = SUITES[name]
    except KeyError:
        raise WrapError(f"unknown HPKE suite {name!r}; known: {', '.join(sorted(SUITES))}") from None
    return hpke.Suite(kem, kdf, aead)


def seal(secret: bytes, recipient: PublicKey, suite: str, info: bytes) -> bytes:
    """Seal ``secret`` to ``recipient``: ``enc || ciphertext`` as HPKE's single-shot API gives it."""
    try:
        return _suite(suite).encrypt(secret, recipient, info=info)
    except WrapError:
        raise
    except (TypeError, ValueError) as exc:
        raise WrapError(f"cannot seal with suite {suite}: {type(exc).__name__}") from None


def open_sealed(sealed: bytes, recipient: PrivateKey, suite: str, info: bytes) -> bytes:
    """Open what :func:`seal` made; any mismatch of key, suite, binding or bytes is a WrapError."""
    try:
        return _suite(suite).decrypt(sealed, recipient, info=info)
    except WrapError:
        raise
    except Exception:  # noqa: BLE001 - InvalidTag, ValueError...: never echo key material
        raise WrapError("wrapped key does not open: wrong machine key, binding or suite, or tampered") from None


# --- data key intake: protect → license server -------------------------------------------------
# ``layerlock protect`` never writes the data key in plaintext.  It seals it to the server's
# *intake* X25519 public key (``layerlock init`` writes ``intake.pub``), bound to the model id, and
# the server re-seals it under its key-encryption key once it receives it.
INTAKE_SUITE = DEFAULT_SUITE
SEALED_KEY_VERSION = 1


def intake_info(model_id: str, what: str = "") -> bytes:
    """HPKE ``info`` of what protect seals to the server: the data key, or (``what="fp"``) the
    fingerprint secret."""
    if not model_id or "\0" in model_id:
        raise WrapError("model id must be a non-empty string without NUL")
    return b"layerlock-intake-v1\0" + model_id.encode() + (b"\0" + what.encode() if what else b"")


def seal_for_server(data_key: bytes, intake_public: x25519.X25519PublicKey, model_id: str,
                    fingerprint: bytes | None = None) -> dict[str, object]:
    """The ``*.key.sealed`` document: safe to store, mail or upload; only the server opens it.

    ``fingerprint``: the model's fingerprint secret (:mod:`layerlock.shared.fingerprint`), sealed
    the same way under its own binding, so neither can be passed off as the other."""
    from layerlock.shared.keys import b64u_encode

    sealed = seal(data_key, intake_public, INTAKE_SUITE, intake_info(model_id))
    doc: dict[str, object] = {"v": SEALED_KEY_VERSION, "model": model_id, "suite": INTAKE_SUITE,
                              "sealed": b64u_encode(sealed),
                              "intake_pub": b64u_encode(intake_public.public_bytes_raw())}
    if fingerprint is not None:
        doc["fingerprint"] = b64u_encode(seal(fingerprint, intake_public, INTAKE_SUITE, intake_info(model_id, "fp")))
    return doc


def open_fingerprint_from_vendor(doc: object, intake_private: x25519.X25519PrivateKey, model_id: str) -> bytes | None:
    """The fingerprint secret in a sealed-key document (None: the model has none)."""
    from layerlock.shared.keys import b64u_decode

    if not isinstance(doc, dict) or doc.get("fingerprint") is None:
        return None
    sealed = doc["fingerprint"]
    if not isinstance(sealed, str):
        raise WrapError("sealed key document has a malformed 'fingerprint'")
    try:
        raw = b64u_decode(sealed, field="fingerprint")
    except Exception:  # noqa: BLE001
        raise WrapError("sealed fingerprint is not base64url") from None
    return open_sealed(raw, intake_private, INTAKE_SUITE, intake_info(model_id, "fp"))


def open_from_vendor(doc: object, intake_private: x25519.X25519PrivateKey, model_id: str) -> bytes:
    """Open a sealed-key document for ``model_id``; anything off is a WrapError, no detail leaked."""
    from layerlock.shared.keys import b64u_decode

    if not isinstance(doc, dict) or doc.get("v") != SEALED_KEY_VERSION:
        raise WrapError("sealed key document has an unknown version")
    if doc.get("model") != model_id:
        raise WrapError("sealed key document is for another model id")
    sealed = doc.get("sealed")
    if not isinstance(sealed, str):
        raise WrapError("sealed key document lacks 'sealed'")
    suite = doc.get("suite", INTAKE_SUITE)
    if suite != INTAKE_SUITE:
        raise WrapError(f"sealed key document uses suite {str(suite)[:40]!r}; expected {INTAKE_SUITE}")
    try:
        raw = b64u_decode(sealed, field="sealed")
    except Exception:  # noqa: BLE001
        raise WrapError("sealed key is not base64url") from None
    key = open_sealed(raw, intake_private, INTAKE_SUITE, intake_info(model_id))
    if len(key) != 32:
        raise WrapError("sealed key document does not hold a 256-bit key")
    return key
