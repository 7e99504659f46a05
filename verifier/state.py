"""The state directory: machine keys, pinned server keys, cached tokens.

Layout (directory 0700, every file 0600)::

    machine.json          machine code and the machine-id source used at enrollment
    sign.ed25519.pem      signs activation requests
    kex.x25519.pem        opens the wrapped data key
    kex.mlkem768.seed     optional, 64-byte seed: the post-quantum half of the hybrid suite
    jwks.json             the server's signing keys, pinned at enrollment
    tokens/<model>.jwt    last good token per model: lets a restart unlock while offline
    clock.json            the MAC'd high-water mark of time seen (``clock.py``: rollback detection)
    requests/<model>.json the pending air-gapped request per model (``offline.py``): its nonce

A cached token is useless without ``kex.x25519.pem`` (its ``wk`` is sealed to that key), which
is why caching it on disk is acceptable.  Files anybody else can read are refused outright.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from layerlock.shared.errors import ConfigError
from layerlock.shared.ids import check_model_id
from layerlock.shared.keys import (
    load_ed25519_private,
    load_mlkem768_private,
    load_x25519_private,
    private_pem,
    read_secret_file,
    write_secret_file,
)
from layerlock.shared.tokens import parse_jwks
from layerlock.shared.wrap import MachineKemKeys


@dataclass(frozen=True)
class MachineKeys:
    sign: ed25519.Ed25519PrivateKey
    kem: MachineKemKeys


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.machine_file = self.path / "machine.json"
        self.sign_key = self.path / "sign.ed25519.pem"
        self.kex_key = self.path / "kex.x25519.pem"
        self.pq_key = self.path / "kex.mlkem768.seed"
        self.jwks_file = self.path / "jwks.json"
        self.tokens = self.path / "tokens"
        self.clock_file = self.path / "clock.json"
        self.requests = self.path / "requests"

    # --- permissions ---------------------------------------------------------------------------
    def create(self) -> None:
        """Create the directory 0700; refuse an existing one that others can enter."""
        if self.path.exists():
            self.check()
        else:
            self.path.mkdir(parents=True, mode=0o700)
            os.chmod(self.path, 0o700)

    def check(self) -> None:
        """Refuse a state directory (or any file in it) that group or others can access."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ConfigError(f"state directory {self.path} does not exist; run 'layerlock-verifier enroll'") \
                from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"state directory {self.path} is not a directory")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(f"state directory {self.path} is accessible by group or others (mode {mode:o}); "
                              "chmod 700 it and consider its keys compromised if others could read them")
        for sub in [p for p in self.path.iterdir()] + self._token_files():
            fmode = stat.S_IMODE(sub.lstat().st_mode)
            if fmode & 0o077:
                raise ConfigError(f"{sub} is accessible by group or others (mode {fmode:o}); chmod 600 it")

    def _token_files(self) -> list[Path]:
        return list(self.tokens.iterdir()) if self.tokens.is_dir() else []

    # --- keys ----------------------------------------------------------------------------------
    def has_keys(self) -> bool:
        return self.sign_key.exists() and self.kex_key.exists()

    def create_keys(self, *, pq: bool) -> None:
        write_secret_file(self.sign_key, private_pem(ed25519.Ed25519PrivateKey.generate()))
        write_secret_file(self.kex_key, private_pem(x25519.X25519PrivateKey.generate()))
        if pq:
            write_secret_file(self.pq_key, mlkem.MLKEM768PrivateKey.generate().private_bytes_raw())

    def add_pq_key(self) -> None:
        if not self.pq_key.exists():
            write_secret_file(self.pq_key, mlkem.MLKEM768PrivateKey.generate().private_bytes_raw())

    def load_keys(self) -> MachineKeys:
        if not self.has_keys():
            raise ConfigError(f"no machine keys in {self.path}; run 'layerlock-verifier enroll' first")
        pq = load_mlkem768_private(self.pq_key) if self.pq_key.exists() else None
        return MachineKeys(sign=load_ed25519_private(self.sign_key),
                           kem=MachineKemKeys(x25519=load_x25519_private(self.kex_key), mlkem768=pq))

    # --- machine record and pinned keys --------------------------------------------------------
    def save_machine(self, info: dict[str, Any]) -> None:
        write_secret_file(self.machine_file, json.dumps(info, indent=2).encode())

    def load_machine(self) -> dict[str, Any]:
        try:
            data = json.loads(read_secret_file(self.machine_file))
        except ConfigError:
            raise ConfigError(f"{self.machine_file} is missing; run 'layerlock-verifier enroll' first") from None
        except ValueError:
            raise ConfigError(f"{self.machine_file} is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("machine"), str):
            raise ConfigError(f"{self.machine_file} lacks the machine code")
        return data

    def save_jwks(self, document: dict[str, Any]) -> None:
        parse_jwks(document)  # only pin what parses
        write_secret_file(self.jwks_file, json.dumps(document, indent=2).encode())

    def load_jwks(self) -> dict[str, ed25519.Ed25519PublicKey]:
        try:
            doc = json.loads(read_secret_file(self.jwks_file))
        except ConfigError:
            raise ConfigError(f"no pinned server keys ({self.jwks_file}); run 'layerlock-verifier enroll'") \
                from None
        except ValueError:
            raise ConfigError(f"{self.jwks_file} is not JSON") from None
        return parse_jwks(doc)

    # --- token cache ---------------------------------------------------------------------------
    def _token_path(self, model_id: str) -> Path:
        return self.tokens / f"{check_model_id(model_id)}.jwt"

    def save_token(self, model_id: str, token: str) -> None:
        self.tokens.mkdir(mode=0o700, exist_ok=True)
        write_secret_file(self._token_path(model_id), token.encode("ascii"))

    def load_token(self, model_id: str) -> str | None:
        path = self._token_path(model_id)
        if not path.exists():
            return None
        return read_secret_file(path).decode("ascii", errors="replace").strip()

    def delete_token(self, model_id: str) -> None:
        self._token_path(model_id).unlink(missing_ok=True)

    def file_times(self) -> list[float]:
        """Modification times of the state files: a clock that reads before them was set back."""
        out = []
        for path in [*self.path.iterdir(), *self._token_files()]:
            try:
                out.append(path.stat().st_mtime)
            except OSError:
                continue
        return out

    # --- pending air-gapped requests -----------------------------------------------------------
    def _request_path(self, model_id: str) -> Path:
        return self.requests / f"{check_model_id(model_id)}.json"

    def save_request(self, model_id: str, doc: dict[str, Any]) -> None:
        self.requests.mkdir(mode=0o700, exist_ok=True)
        write_secret_file(self._request_path(model_id), json.dumps(doc).encode())

    def load_request(self, model_id: str) -> dict[str, Any] | None:
        path = self._request_path(model_id)
        if not path.exists():
            return None
        try:
            doc = json.loads(read_secret_file(path))
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def delete_request(self, model_id: str) -> None:
        self._request_path(model_id).unlink(missing_ok=True)
