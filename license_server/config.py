"""One typed configuration object for the whole server, built once at startup.

Why one object: every tunable (timeouts, limits, lifetimes) is visible in one place, read once
from ``LAYERLOCK_*`` environment variables and/or a TOML file (``LAYERLOCK_CONFIG``), and handed
to :func:`layerlock.license_server.app.create_app`.  Nothing deeper in the code reads the environment.
Environment variables win over the TOML file so a systemd drop-in can override one value.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from layerlock.shared.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/layerlock"
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL")
#: Longest enrollment claim ops may ask for: long enough to reach the host, short enough to go stale.
MAX_CLAIM_TTL = 30 * 86_400


@dataclass(frozen=True)
class ServerConfig:
    """Every server setting.  Durations are seconds, sizes are bytes."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    #: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://host:port[,host:port]/service`` or
    #: ``redis+cluster://host:port[,host:port]`` (``rediss+cluster://`` with TLS).
    #: Empty: the gunicorn master starts an embedded ``redis-server`` under ``data_dir/redis``.
    redis_url: str = field(default="", repr=False)  # may hold a password: never in a repr
    redis_timeout: float = 1.5
    #: Embedded Redis only: ``always`` (every acknowledged write is on disk) or ``everysec``.
    appendfsync: str = "everysec"
    issuer: str = "layerlock"
    clock_skew: int = 300
    max_body_bytes: int = 64 * 1024
    #: ``POST /v1/models`` only: a fingerprinted model's sealed secret (original values at the
    #: positions, alignment descriptors) is up to a few MiB.
    max_model_body_bytes: int = 16 * 1024 * 1024
    #: Signed activation requests one machine may make a minute (only requests that prove
    #: possession of the machine key count).
    rate_machine_per_min: int = 60
    #: Failed unauthenticated requests (unknown machine, bad signature, unknown claim, …) one
    #: source — an IPv4 address or an IPv6 /64 — may make a minute before it is refused unheard.
    rate_unauth_per_min: int = 60
    #: Lifetime of an enrollment claim unless ops ask for another (seconds).
    default_claim_ttl: int = 86_400
    default_token_ttl: int = 86_400
    default_offline_grace: int = 3 * 86_400
    min_lifetime: int = 5
    #: Upper bound of offline_grace: a retired signing key stays published this long.
    max_offline_grace: int = 90 * 86_400
    policy_file: str = ""
    log_level: str = "INFO"
    #: Seconds a client is told to wait (``Retry-After``) on every 503: Redis unreachable, a
    #: write not replicated, a request shed.
    retry_after: int = 2
    #: Replicas that must confirm a write before it is acknowledged (``WAIT n``, after the commit
    #: that writes it): 0 for a single Redis (durability is then its AOF, ``appendfsync``), 1 with
    #: a Sentinel-managed primary and replica so that a failover loses nothing acknowledged.  A
    #: write no replica confirmed in ``redis_wait_timeout_ms`` is answered 503 ``not_replicated``
    #: + ``Retry-After`` (it did happen on the primary; see README "Scaling out").
    redis_wait_replicas: int = 0
    #: How long a write waits for its replicas (milliseconds); below ``redis_timeout`` so that
    #: the client's socket timeout never fires first.
    redis_wait_timeout_ms: int = 500
    #: Load shedding: a request that waited longer than this in a gunicorn worker's queue before
    #: a thread took it is answered 503 ``overloaded`` + ``Retry-After`` at once, unread by the
    #: app (so it changes nothing), instead of being served late or timing out.  0: never shed.
    shed_queue_ms: int = 500
    #: Trust ``X-Forwarded-For`` from the reverse proxy (set when nginx is in front).
    trust_proxy: bool = False
    #: How old an air-gapped activation request file may be when ops submit it (it travels by
    #: hand); its nonce is remembered that long, so it is answered once.
    offline_request_ttl: int = 7 * 86_400
    #: The gunicorn master runs the background worker (``layerlock webhooks run``: webhook
    #: deliveries, lease culling) as a supervised child.  False: run it yourself, e.g. once per
    #: deployment rather than once per replica (several at once are safe, not needed).
    background: bool = True
    #: Seconds between the background worker's passes (culling, fan-out, due deliveries).
    background_interval: float = 1.0
    #: Webhook delivery: per-request timeout, first retry delay (doubling, with jitter, up to
    #: ``webhook_backoff_max``), and how long a delivery is retried before it is marked failed.
    webhook_timeout: float = 5.0
    webhook_backoff: float = 10.0
    webhook_backoff_max: float = 3600.0
    webhook_retry_for: int = 26 * 3600

    @property
    def key_dir(self) -> Path:
        return self.data_dir / "keys"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """TOML file (``LAYERLOCK_CONFIG``), then ``LAYERLOCK_<FIELD>`` variables, then overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        toml_path = env.get("LAYERLOCK_CONFIG", "")
        if toml_path:
            try:
                with open(toml_path, "rb") as fh:
                    doc = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {toml_path}: {exc}") from None
            if "server" in doc:
                if not isinstance(doc["server"], dict) or len(doc) > 1:
                    raise ConfigError(f"config file {toml_path}: put every setting in one [server] table "
                                      "(or all at the top level, without one)")
                doc = doc["server"]
            values.update(doc)
        for f in fields(cls):
            name = f"LAYERLOCK_{f.name.upper()}"
            if env.get(name, "").strip():  # empty (VAR= in a unit or template) means "the default"
                values[f.name] = env[name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls()._with(values)

    def _with(self, values: Mapping[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(self)}
        typed: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")
            typed[name] = _coerce(name, getattr(self, name), raw)
        cfg = replace(self, **typed)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Ranges and relations, so that a setting that would refuse every request (a clock skew of
        0, a rate of 0) or break every worker (an unknown log level) stops the server at start."""
        if self.appendfsync not in ("always", "everysec"):
            raise ConfigError("appendfsync must be 'always' or 'everysec' (never 'no': see deploy/redis.conf)")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        if not self.issuer.strip():
            raise ConfigError("issuer must not be empty (it is every token's iss, which verifiers check)")
        if not 1 <= self.min_lifetime <= self.default_token_ttl <= self.default_offline_grace <= self.max_offline_grace:
            raise ConfigError("need 1 <= min_lifetime <= default_token_ttl <= default_offline_grace "
                              "<= max_offline_grace (seconds)")
        if not self.min_lifetime <= self.default_claim_ttl <= MAX_CLAIM_TTL:
            raise ConfigError(f"default_claim_ttl must be between min_lifetime and {MAX_CLAIM_TTL} s (30 days)")
        if not 1 <= self.clock_skew <= 86_400:
            raise ConfigError("clock_skew must be between 1 and 86400 s")
        if min(self.rate_machine_per_min, self.rate_unauth_per_min) < 1:
            raise ConfigError("rate_machine_per_min and rate_unauth_per_min must be >= 1 (0 would refuse "
                              "every request)")
        if not 0 < self.redis_timeout <= 60 or self.max_body_bytes < 1024:
            raise ConfigError("redis_timeout must be > 0 and <= 60 s, max_body_bytes >= 1024")
        if self.max_model_body_bytes < self.max_body_bytes:
            raise ConfigError("max_model_body_bytes must be >= max_body_bytes")
        if self.redis_wait_replicas < 0 or self.shed_queue_ms < 0 or self.retry_after < 1:
            raise ConfigError("redis_wait_replicas and shed_queue_ms must be >= 0, retry_after >= 1")
        if self.redis_wait_replicas and not 1 <= self.redis_wait_timeout_ms < self.redis_timeout * 1000:
            raise ConfigError("redis_wait_timeout_ms must be >= 1 and below redis_timeout (in ms): a write "
                              "waiting for its replicas must not outlast the client's socket timeout")
        if self.offline_request_ttl < self.clock_skew:
            raise ConfigError("offline_request_ttl must be >= clock_skew")
        if not (0 < self.background_interval <= 3600 and 0 < self.webhook_timeout <= 300 and
                0 < self.webhook_backoff <= self.webhook_backoff_max <= 86_400) or self.webhook_retry_for < 0:
            raise ConfigError("need 0 < background_interval <= 3600, 0 < webhook_timeout <= 300, "
                              "0 < webhook_backoff <= webhook_backoff_max <= 86400 (seconds), "
                              "webhook_retry_for >= 0")


def _coerce(name: str, default: Any, raw: Any) -> Any:
    """``raw`` (text from the environment, or a TOML value) as the type of ``default``.  Strict:
    a TOML ``1.9`` is not an int, ``true`` is not a number, a list is not text, and ``nan``/``inf``
    are no duration -- each a ConfigError naming the setting, never a silent coercion."""
    text = raw.strip() if isinstance(raw, str) else None
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if text is not None and text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise ConfigError(f"setting {name!r} must be true or false (1/0, yes/no, on/off)")
    if isinstance(default, int):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if text is not None and re.fullmatch(r"[+-]?[0-9]+", text):
            return int(text)
        raise ConfigError(f"setting {name!r} must be a whole number")
    if isinstance(default, float):
        value: float | None = None
        try:
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                value = float(raw)
            elif text is not None:
                value = float(text)
        except (ValueError, OverflowError):  # (a TOML integer of 400 digits overflows a float)
            value = None
        if value is None or not math.isfinite(value):
            raise ConfigError(f"setting {name!r} must be a finite number")
        return value
    if isinstance(default, Path):
        if isinstance(raw, Path | str) and str(raw).strip():
            return Path(raw)
        raise ConfigError(f"setting {name!r} must be a non-empty path")
    if isinstance(raw, str):
        return raw
    raise ConfigError(f"setting {name!r} must be text")
