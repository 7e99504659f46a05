"""Key encodings and key files, shared by the server's key directory and the verifier's state dir.

Private keys live in files created 0600 inside directories of 0700 and are refused when group
or others can read them: a key that other users could have copied is no longer a secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from layerlock.shared.errors import ConfigError, InvalidInput


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str, *, field: str = "value") -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"{field} must be a base64url string")
    if "+" in text or "/" in text:
        raise InvalidInput(f"{field} is not valid base64url")
    # Strict: base64's default silently skips characters outside the alphabet, which would let
    # two different strings decode to the same bytes.
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError):
        raise InvalidInput(f"{field} is not valid base64url") from None


def raw_public(key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey | mlkem.MLKEM768PublicKey) -> bytes:
    return key.public_bytes_raw()


def ed25519_public(data: bytes, *, field: str = "public key") -> ed25519.Ed25519PublicKey:
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    except ValueError:
        raise InvalidInput(f"{field} is not a 32-byte Ed25519 public key") from None


def x25519_public(data: bytes, *, field: str = "public key") -> x25519.X25519PublicKey:
    try:
        return x25519.X25519PublicKey.from_public_bytes(data)
    except ValueError:
        raise InvalidInput(f"{field} is not a 32-byte X25519 public key") from None


def mlkem768_public(data: bytes, *, field: str = "public key") -> mlkem.MLKEM768PublicKey:
    try:
        return mlkem.MLKEM768PublicKey.from_public_bytes(data)
    except ValueError:
        raise InvalidInput(f"{field} is not an ML-KEM-768 public key") from None


def jwk_thumbprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint of an Ed25519 (OKP) key: our ``kid``.

    Required members only, lexicographic order, no whitespace, SHA-256, base64url.
    """
    members = {"crv": "Ed25519", "kty": "OKP", "x": b64u_encode(public_key.public_bytes_raw())}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return b64u_encode(hashlib.sha256(canonical).digest())


# --- key files ---------------------------------------------------------------------------------
def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as 0700, or tighten an existing one to 0700 (never loosen)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


def write_secret_file(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from the first byte (no window where it is 0644)."""
    tmp = path.with_name(f".{path.name}.tmp")
    # A leftover or planted temp file (or symlink) must not decide the mode or the target.
    tmp.unlink(missing_ok=True)
    create_secret_file(tmp, data)
    os.replace(tmp, path)


def create_secret_file(path: Path, data: bytes) -> None:
    """Write a secret to a **new** file, mode 0600 from the first byte, synced; an existing file
    (or a symlink) raises FileExistsError and is left alone; a failed write leaves no file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def read_secret_file(path: Path) -> bytes:
    """Read a secret, refusing it when group or others could read it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "chmod 600 it, and consider the key compromised if others could read it")
    return path.read_bytes()


def private_pem(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_pem(path: Path) -> object:
    try:
        return serialization.load_pem_private_key(read_secret_file(path), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a readable PEM private key") from None


def load_ed25519_private(path: Path) -> ed25519.Ed25519PrivateKey:
    key = _load_pem(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} does not hold an Ed25519 private key")
    return key


def load_x25519_private(path: Path) -> x25519.X25519PrivateKey:
    key = _load_pem(path)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise ConfigError(f"{path} does not hold an X25519 private key")
    return key


def load_mlkem768_private(path: Path) -> mlkem.MLKEM768PrivateKey:
    """ML-KEM keys are stored as their 64-byte seed (FIPS 203), the most compact form."""
    seed = read_secret_file(path)
    try:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    except ValueError:
        raise ConfigError(f"{path} does not hold an ML-KEM-768 seed") from None
