"""The server's key directory: signing keys, key-encryption keys (KEK) and the intake key.

Layout under ``<data_dir>/keys`` (0700, every file 0600)::

    signing/<kid>.pem        Ed25519 private keys (PKCS#8)
    signing.json             {"current": kid, "retired": {kid: publish_until},
                              "endorsements": {kid: JWS by the key it replaced}}
    kek/<kek_id>.key         32 random bytes (AES-256-GCM)
    kek.json                 {"current": kek_id}
    intake.key / intake.pub  X25519: ``layerlock protect`` seals data keys to intake.pub
    checkpoint.pem / .pub    Ed25519 key signing audit checkpoints; .pub is its JWK for auditors
                             (created on first use in key dirs from before it existed)
    bootstrap-admin.sha256   hash of the first admin API key (the key itself is printed once)

Why files and not Redis: a Redis dump must never be enough to mint tokens or open data keys.
Workers re-read the metadata when its mtime changes, so a rotation done by one worker (or
the CLI) is picked up by all of them without a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from layerlock.license_server import checkpoints
from layerlock.shared.errors import ConfigError, WrapError
from layerlock.shared.keys import (
    b64u_decode,
    b64u_encode,
    ensure_private_dir,
    jwk_thumbprint,
    load_ed25519_private,
    load_x25519_private,
    private_pem,
    read_secret_file,
    write_secret_file,
)
from layerlock.shared.tokens import sign_endorsement

_KEK_AAD = b"layerlock-kek-v1\0"


def _write_json(path: Path, doc: object) -> None:
    write_secret_file(path, json.dumps(doc, indent=2, sort_keys=True).encode())


def new_api_key() -> str:
    """256 random bits: a plain SHA-256 is then a safe at-rest hash (no brute force possible)."""
    return "llk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def initialise(key_dir: Path, *, force: bool = False) -> tuple[str, str]:
    """Create a fresh key directory; return (first admin API key, intake public b64url).

    Refuses an initialised directory unless ``force`` (which replaces every key: old tokens
    stop verifying and stored data keys become unreadable, so it is only for a fresh start).
    """
    if (key_dir / "signing.json").exists() and not force:
        raise ConfigError(f"{key_dir} is already initialised (use --force to start over)")
    ensure_private_dir(key_dir)
    ensure_private_dir(key_dir / "signing")
    ensure_private_dir(key_dir / "kek")
    sk = ed25519.Ed25519PrivateKey.generate()
    kid = jwk_thumbprint(sk.public_key())
    write_secret_file(key_dir / "signing" / f"{kid}.pem", private_pem(sk))
    _write_json(key_dir / "signing.json", {"current": kid, "retired": {}})
    kek_id = "kek-" + secrets.token_hex(4)
    write_secret_file(key_dir / "kek" / f"{kek_id}.key", os.urandom(32))
    _write_json(key_dir / "kek.json", {"current": kek_id})
    intake = x25519.X25519PrivateKey.generate()
    write_secret_file(key_dir / "intake.key", private_pem(intake))
    intake_pub = b64u_encode(intake.public_key().public_bytes_raw())
    write_secret_file(key_dir / "intake.pub", intake_pub.encode() + b"\n")
    checkpoints.create_key(key_dir, replace=True)
    admin_key = new_api_key()
    write_secret_file(key_dir / "bootstrap-admin.sha256", hash_api_key(admin_key).encode() + b"\n")
    return admin_key, intake_pub


@dataclass(frozen=True)
class _Keys:
    signing: ed25519.Ed25519PrivateKey
    kid: str
    published: tuple[ed25519.Ed25519PublicKey, ...]
    endorsements: dict[str, str]
    keks: dict[str, bytes] = field(repr=False)  # the key that opens every data key: never in a repr
    kek_id: str
    intake: x25519.X25519PrivateKey
    bootstrap_hash: str | None


class KeyStore:
    """Loaded keys plus the operations that need them (sign key, KEK seal/open, rotation)."""

    def __init__(self, key_dir: Path, *, max_token_life: int) -> None:
        self.key_dir = key_dir
        self.max_token_life = max_token_life
        self._lock = threading.Lock()
        self._stamp: tuple[float, float] = (-1.0, -1.0)
        self._checked = 0.0
        self._data_keys: dict[tuple[str, str, str], bytes] = {}
        self._keys = self._load()

    # --- loading ---------------------------------------------------------------------------
    def _mtimes(self) -> tuple[float, float]:
        try:
            return ((self.key_dir / "signing.json").stat().st_mtime, (self.key_dir / "kek.json").stat().st_mtime)
        except FileNotFoundError:
            raise ConfigError(f"{self.key_dir} is not initialised: run `layerlock init`") from None

    def _load(self) -> _Keys:
        stamp = self._mtimes()
        meta = json.loads(read_secret_file(self.key_dir / "signing.json"))
        kid = meta["current"]
        signing = load_ed25519_private(self.key_dir / "signing" / f"{kid}.pem")
        now = time.time()
        published = [signing.public_key()]
        for old, until in sorted(meta.get("retired", {}).items()):
            path = self.key_dir / "signing" / f"{old}.pem"
            if until >= now and path.exists():
                published.append(load_ed25519_private(path).public_key())
        published_kids = {jwk_thumbprint(k) for k in published}
        endorsements = {k: v for k, v in meta.get("endorsements", {}).items() if k in published_kids}
        kek_meta = json.loads(read_secret_file(self.key_dir / "kek.json"))
        keks = {p.stem: read_secret_file(p) for p in sorted((self.key_dir / "kek").glob("*.key"))}
        if kek_meta["current"] not in keks:
            raise ConfigError("current KEK file is missing from the key directory")
        bootstrap = self.key_dir / "bootstrap-admin.sha256"
        boot_hash = read_secret_file(bootstrap).decode().strip() if bootstrap.exists() else None
        self._stamp = stamp
        return _Keys(signing=signing, kid=kid, published=tuple(published),
                     endorsements=endorsements, keks=keks,
                     kek_id=kek_meta["current"], intake=load_x25519_private(self.key_dir / "intake.key"),
                     bootstrap_hash=boot_hash)

    @property
    def current(self) -> _Keys:
        """Current keys, re-read (at most once a second) when a rotation touched the metadata."""
        now = time.monotonic()
        if now - self._checked > 1.0:
            with self._lock:
                self._checked = now
                if self._mtimes() != self._stamp:
                    self._keys = self._load()
        return self._keys

    def reload(self) -> None:
        with self._lock:
            self._keys = self._load()

    # --- KEK -------------------------------------------------------------------------------
    def seal_data_key(self, data_key: bytes, model_id: str) -> tuple[str, str]:
        """AES-256-GCM under the current KEK, bound to the model id; returns (blob, kek_id)."""
        k = self.current
        nonce = os.urandom(12)
        ct = AESGCM(k.keks[k.kek_id]).encrypt(nonce, data_key, _KEK_AAD + model_id.encode())
        return b64u_encode(nonce + ct), k.kek_id

    def open_data_key(self, blob: str, kek_id: str, model_id: str) -> bytes:
        """The data key inside ``blob``.  Kept in a small per-worker cache keyed by the sealed blob
        itself (no extra exposure: the KEK that opens every blob is in this memory anyway), so
        an activation does not re-run AES-GCM; a re-wrapped key is a new blob, a new entry."""
        cache_key = (blob, kek_id, model_id)
        hit = self._data_keys.get(cache_key)
        if hit is not None:
            return hit
        key = self._open_data_key(blob, kek_id, model_id)
        if len(self._data_keys) >= 1024:
            self._data_keys.clear()
        self._data_keys[cache_key] = key
        return key

    def _open_data_key(self, blob: str, kek_id: str, model_id: str) -> bytes:
        keks = self.current.keks
        if kek_id not in keks:
            self.reload()
            keks = self.current.keks
        if kek_id not in keks:
            raise ConfigError(f"KEK {kek_id} is not in the key directory")
        raw = b64u_decode(blob, field="wrapped key")
        try:
            return AESGCM(keks[kek_id]).decrypt(raw[:12], raw[12:], _KEK_AAD + model_id.encode())
        except Exception:  # noqa: BLE001 - InvalidTag: never echo key material
            raise WrapError(f"stored data key of {model_id} does not open under {kek_id}") from None

    def new_kek(self) -> str:
        """Write a new KEK and make it current; old KEKs stay until stored keys are re-wrapped."""
        kek_id = "kek-" + secrets.token_hex(4)
        write_secret_file(self.key_dir / "kek" / f"{kek_id}.key", os.urandom(32))
        _write_json(self.key_dir / "kek.json", {"current": kek_id})
        self.reload()
        return kek_id

    # --- signing ---------------------------------------------------------------------------
    def rotate_signing(self) -> dict[str, object]:
        """New current signing key; the old one stays in the JWKS for ``max_token_life``.

        The old key signs an endorsement of the new one (published with it in the JWKS), so
        verifiers that pinned the old key can trust the new one without re-enrolling.
        """
        meta = json.loads(read_secret_file(self.key_dir / "signing.json"))
        now = int(time.time())
        retired = {k: v for k, v in meta.get("retired", {}).items() if v >= now}
        for gone in set(meta.get("retired", {})) - set(retired):
            (self.key_dir / "signing" / f"{gone}.pem").unlink(missing_ok=True)
        retired[meta["current"]] = now + self.max_token_life
        old_sk = load_ed25519_private(self.key_dir / "signing" / f"{meta['current']}.pem")
        sk = ed25519.Ed25519PrivateKey.generate()
        kid = jwk_thumbprint(sk.public_key())
        endorsements = {k: v for k, v in meta.get("endorsements", {}).items() if k in retired}
        endorsements[kid] = sign_endorsement(old_sk, sk.public_key(), now=now)
        write_secret_file(self.key_dir / "signing" / f"{kid}.pem", private_pem(sk))
        _write_json(self.key_dir / "signing.json", {"current": kid, "retired": retired,
                                                    "endorsements": endorsements})
        self.reload()
        return {"kid": kid, "retired": retired}
