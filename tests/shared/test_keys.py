"""Key files: written 0600 atomically, refused when others could read them."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from layerlock.shared.errors import ConfigError, InvalidInput
from layerlock.shared.keys import (
    b64u_decode,
    ensure_private_dir,
    load_ed25519_private,
    load_x25519_private,
    private_pem,
    write_secret_file,
)


def test_secret_file_mode_and_round_trip(tmp_path):
    d = ensure_private_dir(tmp_path / "keys")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    key = ed25519.Ed25519PrivateKey.generate()
    write_secret_file(d / "sign.pem", private_pem(key))
    assert stat.S_IMODE((d / "sign.pem").stat().st_mode) == 0o600
    assert load_ed25519_private(d / "sign.pem").public_key() == key.public_key()
    assert not list(d.glob(".*.tmp"))


def test_readable_by_others_refused(tmp_path):
    path = tmp_path / "k.pem"
    write_secret_file(path, private_pem(ed25519.Ed25519PrivateKey.generate()))
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_ed25519_private(path)


def test_wrong_key_type_and_missing(tmp_path):
    path = tmp_path / "k.pem"
    write_secret_file(path, private_pem(x25519.X25519PrivateKey.generate()))
    with pytest.raises(ConfigError, match="Ed25519"):
        load_ed25519_private(path)
    assert isinstance(load_x25519_private(path), x25519.X25519PrivateKey)
    with pytest.raises(ConfigError, match="does not exist"):
        load_x25519_private(tmp_path / "absent.pem")


def test_loose_dir_is_tightened(tmp_path):
    d = tmp_path / "loose"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_b64u_errors():
    with pytest.raises(InvalidInput, match="field-x"):
        b64u_decode("***", field="field-x")
    with pytest.raises(InvalidInput):
        b64u_decode(None)  # type: ignore[arg-type]


def test_planted_temp_symlink_is_not_followed(tmp_path):
    target = tmp_path / "victim"
    target.write_text("untouched")
    (tmp_path / ".k.pem.tmp").symlink_to(target)
    write_secret_file(tmp_path / "k.pem", b"secret")
    assert target.read_text() == "untouched"
    assert (tmp_path / "k.pem").read_bytes() == b"secret"
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_corrupt_pem_is_a_config_error(tmp_path):
    write_secret_file(tmp_path / "k.pem", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="PEM"):
        load_ed25519_private(tmp_path / "k.pem")
