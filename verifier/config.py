"""The daemon's TOML configuration, validated all at once with precise messages.

``check`` and ``run`` share :func:`load_config`, so an operator sees exactly the message the
daemon would die with — every problem at once, each as ``file: key: what is wrong`` — instead
of fixing them one restart at a time.  Relative paths are resolved against the config file's
directory, so a demo directory can be moved as a whole.
"""

from __future__ import annotations

import grp
import math
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from layerlock.shared.errors import ConfigError
from layerlock.shared.ids import RULE as MODEL_ID_RULE
from layerlock.shared.ids import is_model_id

DEFAULT_CONFIG = "/etc/layerlock/verifier.toml"
DEFAULT_STATE_DIR = "/var/lib/layerlock"
DEFAULT_SOCKET = "/run/layerlock/verifier.sock"
MAX_CONNECTIONS = 64  # concurrent socket connections, all peers together (PROTOCOL.md: `busy`)
DEFAULT_MAX_CONNECTIONS_PER_UID = 16  # ... and per peer uid (PROTOCOL.md: `too_many_connections`)


@dataclass(frozen=True)
class ModelConfig:
    id: str
    locked: Path
    bundle: Path
    param: Path | None = None  # ncnn only: the .param served with the unlocked .bin


@dataclass(frozen=True)
class Config:
    path: Path
    server_url: str
    models: tuple[ModelConfig, ...]
    ca_bundle: Path | None = None
    issuer: str = "layerlock"
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    socket: Path = Path(DEFAULT_SOCKET)
    allowed_uids: frozenset[int] = field(default_factory=lambda: frozenset({os.getuid(), 0}))
    allowed_gids: frozenset[int] = frozenset()
    socket_group: int | None = None  # gid the socket is chowned to (None: the daemon's own group)
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    machine_id_file: Path | None = None
    request_timeout: float = 10.0
    leeway: int = 60
    retry_min: float = 2.0
    retry_max: float = 300.0
    client_timeout: float = 10.0
    #: How far the clock may read before the latest time seen before offline use stops (clock.py).
    clock_tolerance: float = 300.0


# key -> (types accepted, description); models are checked separately
_TOP: dict[str, tuple[tuple[type, ...], str]] = {
    "server_url": ((str,), "a string (http:// or https:// URL)"),
    "ca_bundle": ((str,), "a string (path of a PEM CA bundle)"),
    "issuer": ((str,), "a string"),
    "state_dir": ((str,), "a string (directory path)"),
    "socket": ((str,), "a string (socket path)"),
    "allowed_uids": ((list,), "a list of integers"),
    "allowed_gids": ((list,), "a list of integers"),
    "socket_group": ((str, int), "a group name or a numeric gid"),
    "max_connections_per_uid": ((int,), "an integer"),
    "machine_id_file": ((str,), "a string (file path)"),
    "request_timeout": ((int, float), "a number of seconds"),
    "leeway": ((int,), "an integer number of seconds"),
    "retry_min": ((int, float), "a number of seconds"),
    "retry_max": ((int, float), "a number of seconds"),
    "client_timeout": ((int, float), "a number of seconds"),
    "clock_tolerance": ((int, float), "a number of seconds"),
    "models": ((list,), "an array of tables ([[models]])"),
}
_MODEL_KEYS = {"id", "locked", "bundle"}


class _Issues:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{self.path}: {key}: {message}")


#: Upper bounds of the durations (seconds): a leeway of 60000 (meant as ms) would accept a token
#: 16 hours past its expiry; a timeout of days is a hang, not a timeout.
_DURATION_MAX = {"request_timeout": 300, "retry_min": 3600, "retry_max": 86_400, "client_timeout": 3600,
                 "leeway": 3600, "clock_tolerance": 86_400}


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a TOML integer too large for a float
        return False


def _typed(issues: _Issues, key: str, value: Any) -> bool:
    types, what = _TOP[key]
    if isinstance(value, bool) or not isinstance(value, types):
        issues.add(key, f"must be {what}, got {type(value).__name__}")
        return False
    return True


def _file(issues: _Issues, base: Path, key: str, value: str) -> Path:
    path = (base / value).resolve() if not os.path.isabs(value) else Path(value)
    if not path.is_file():
        issues.add(key, f"file {path} does not exist" if not path.exists() else f"{path} is not a file")
    return path


def _check_header(issues: _Issues, key: str, model: ModelConfig) -> Any:
    """The bundle must be a layerlock bundle for this very model id (catches swapped paths).

    Returns its (unauthenticated) header, or ``None`` when it is not one.
    """
    try:  # the narrow module first: the facade also imports numpy (protect), ~0.1 s of start-up
        from layerlock.shared.bundle import read_header
    except ImportError:
        try:
            from layerlock.shared.lockfile import read_header
        except ImportError:
            return None
    from layerlock.shared.errors import LayerlockError

    try:
        header = read_header(model.bundle)
    except LayerlockError as exc:
        issues.add(key, f"{model.bundle} is not a valid bundle ({exc.message})")
        return None
    except OSError as exc:
        issues.add(key, f"{model.bundle} cannot be read ({exc.strerror})")
        return None
    if header.model_id != model.id:
        issues.add(key, f"{model.bundle} is the bundle of model {header.model_id!r}, not {model.id!r}")
    return header


def _ncnn_param(issues: _Issues, base: Path, where: str, model: ModelConfig, value: str | None,
                header: Any) -> Path | None:
    """An ncnn model's .param: ``param`` if given, else the locked .bin's name with ``.param``; it
    must be the very .param the model was protected with (the bundle binds its sha256)."""
    fmt = getattr(header, "format", None)
    if fmt != "ncnn":
        if value is not None and fmt is not None:
            issues.add(f"{where}.param", f"only ncnn models have a .param; {model.bundle} is a {fmt} model")
        return None
    if value is not None:
        path = _file(issues, base, f"{where}.param", value)
    else:
        path = model.locked.with_suffix(".param")
        if not path.is_file():
            issues.add(f"{where}.param", f"file {path} does not exist (the ncnn model's .param; "
                                         "set param = PATH if it lives elsewhere)")
    if path.is_file():
        import hashlib

        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            issues.add(f"{where}.param", f"{path} cannot be read ({exc.strerror})")
            return path
        if digest != header.param_digest:
            issues.add(f"{where}.param", f"{path} is not the .param model {model.id!r} was protected with")
    return path


def _models(issues: _Issues, base: Path, raw: list[Any]) -> tuple[ModelConfig, ...]:
    out: list[ModelConfig] = []
    seen: set[str] = set()
    if not raw:
        issues.add("models", "at least one [[models]] entry is required")
    for i, entry in enumerate(raw):
        where = f"models[{i}]"
        if not isinstance(entry, dict):
            issues.add(where, f"must be a table with id, locked, bundle, got {type(entry).__name__}")
            continue
        for unknown in sorted(set(entry) - _MODEL_KEYS - {"param"}):
            issues.add(f"{where}.{unknown}", "unknown key (expected id, locked, bundle, param)")
        param = entry.get("param")
        if param is not None and not isinstance(param, str):
            issues.add(f"{where}.param", f"must be a string, got {type(param).__name__}")
            param = None
        ok = True
        for key in sorted(_MODEL_KEYS):
            if key not in entry:
                issues.add(f"{where}.{key}", "is required")
                ok = False
            elif not isinstance(entry[key], str):
                issues.add(f"{where}.{key}", f"must be a string, got {type(entry[key]).__name__}")
                ok = False
        if not ok:
            continue
        model_id = entry["id"]
        if not is_model_id(model_id):
            issues.add(f"{where}.id", f"must be {MODEL_ID_RULE}")
        elif model_id in seen:
            issues.add(f"{where}.id", f"model {model_id!r} is listed twice")
        seen.add(model_id)
        before = len(issues.items)
        model = ModelConfig(model_id, _file(issues, base, f"{where}.locked", entry["locked"]),
                            _file(issues, base, f"{where}.bundle", entry["bundle"]))
        if len(issues.items) == before:
            header = _check_header(issues, f"{where}.bundle", model)
            model = replace(model, param=_ncnn_param(issues, base, where, model, param, header))
        out.append(model)
    return tuple(out)


def _group(issues: _Issues, value: str | int) -> int | None:
    """The socket's group as a gid: a name must exist on this host; a number is taken as is
    (a group shared with a container may have no name here)."""
    if isinstance(value, int):
        if value < 0:
            issues.add("socket_group", f"must be a non-negative gid, got {value}")
            return None
        return value
    if not value:
        issues.add("socket_group", "must not be empty (leave it out to keep the daemon's own group)")
        return None
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        hint = f" (a numeric gid is written without quotes: socket_group = {value})" if value.isdigit() else ""
        issues.add("socket_group", f"group {value!r} does not exist on this host{hint}")
        return None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parse and validate; raise ConfigError listing every problem, one per line."""
    path = Path(path)
    issues = _Issues(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    base = path.resolve().parent
    kwargs: dict[str, Any] = {}
    for key in sorted(set(raw) - set(_TOP)):
        issues.add(key, f"unknown key (known: {', '.join(sorted(_TOP))})")
    for key in ("server_url", "models"):
        if key not in raw:
            issues.add(key, "is required")
    typed = {k: v for k, v in raw.items() if k in _TOP and _typed(issues, k, v)}

    if "server_url" in typed:
        url = urlparse(typed["server_url"])
        if url.scheme not in ("http", "https") or not url.netloc:
            issues.add("server_url", "must be an http:// or https:// URL with a host")
        elif url.username is not None or url.password is not None:  # it would be logged and shown by status
            issues.add("server_url", "must not carry a user or password (the server authenticates machines by "
                                     "their key)")
        kwargs["server_url"] = typed["server_url"].rstrip("/")
    if "ca_bundle" in typed:
        kwargs["ca_bundle"] = _file(issues, base, "ca_bundle", typed["ca_bundle"])
    if "machine_id_file" in typed:
        kwargs["machine_id_file"] = _file(issues, base, "machine_id_file", typed["machine_id_file"])
    for key in ("state_dir", "socket"):
        if key in typed:
            kwargs[key] = (base / typed[key]).resolve() if not os.path.isabs(typed[key]) else Path(typed[key])
    if "socket" in kwargs and len(os.fsencode(str(kwargs["socket"]))) > 107:
        issues.add("socket", "path is longer than the 107 bytes a Unix socket address allows")
    if "issuer" in typed:
        if not typed["issuer"]:
            issues.add("issuer", "must not be empty")
        kwargs["issuer"] = typed["issuer"]
    for key in ("allowed_uids", "allowed_gids"):
        if key in typed:
            bad = [v for v in typed[key] if isinstance(v, bool) or not isinstance(v, int) or v < 0]
            if bad:
                issues.add(key, f"must hold non-negative integers only, got {bad[0]!r}")
            else:
                kwargs[key] = frozenset(typed[key])
    if "socket_group" in typed:
        gid = _group(issues, typed["socket_group"])
        if gid is not None:
            kwargs["socket_group"] = gid
    if "max_connections_per_uid" in typed:
        if not 1 <= typed["max_connections_per_uid"] <= MAX_CONNECTIONS:
            issues.add("max_connections_per_uid",
                       f"must be between 1 and {MAX_CONNECTIONS} (the sidecar's limit for all peers together)")
        kwargs["max_connections_per_uid"] = typed["max_connections_per_uid"]
    for key, most in _DURATION_MAX.items():
        if key in typed:
            value = typed[key]
            if not _finite(value):  # TOML has nan and inf; nan compares false to everything
                issues.add(key, "must be a finite number of seconds")
            elif value < 0 or (value == 0 and key != "leeway"):
                issues.add(key, "must be positive")
            elif value > most:
                issues.add(key, f"must be at most {most} s")
            kwargs[key] = value
    if kwargs.get("retry_min", 2.0) > kwargs.get("retry_max", 300.0):
        issues.add("retry_min", "must not exceed retry_max")
    models = _models(issues, base, typed["models"]) if "models" in typed else ()
    if issues.items:
        raise ConfigError("\n".join(issues.items))
    return Config(path=path, models=models, **kwargs)
