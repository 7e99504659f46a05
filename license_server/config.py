"""One typed configuration object for the whole server, built once at startup.

Why one object: every tunable (timeouts, limits, lifetimes) is visible in one place, read once
from ``LAYERLOCK_*`` environment variables and/or a TOML file (``LAYERLOCK_CONFIG``), and handed
to :func:`layerlock.license_server.app.create_app`.  Nothing deeper in the code reads the environment.
Environment variables win over the TOML file so a systemd drop-in can override one value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from layerlock.shared.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/layerlock"
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class ServerConfig:
    """Every server setting.  Durations are seconds, sizes are bytes."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    #: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://host:port[,host:port]/service`` or
    #: ``redis+cluster://host:port[,host:port]`` (``rediss+cluster://`` with TLS).
    #: Empty: the gunicorn master starts an embedded ``redis-server`` under ``data_dir/redis``.
    redis_url: str = ""
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
            values.update(doc.get("server", doc))
        for f in fields(cls):
            name = f"LAYERLOCK_{f.name.upper()}"
            if name in env:
                values[f.name] = env[name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls()._with(values)

    def _with(self, values: Mapping[str, Any]) -> ServerConfig:
        known = {f.name: f for f in fields(self)}
        typed: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")
            default = getattr(self, name)
            try:
                if isinstance(default, bool):
                    typed[name] = raw if isinstance(raw, bool) else _BOOLS[str(raw).strip().lower()]
                elif isinstance(default, Path):
                    typed[name] = Path(raw)
                else:
                    typed[name] = type(default)(raw)
            except KeyError:  # a typo ("ture") must not silently read as false
                raise ConfigError(f"setting {name!r} must be true or false (1/0, yes/no, on/off)") from None
            except (TypeError, ValueError):
                raise ConfigError(f"setting {name!r} must be a {type(default).__name__}") from None
        cfg = replace(self, **typed)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.appendfsync not in ("always", "everysec"):
            raise ConfigError("appendfsync must be 'always' or 'everysec' (never 'no': see deploy/redis.conf)")
        if self.min_lifetime < 1 or self.default_token_ttl > self.default_offline_grace:
            raise ConfigError("need 1 <= min_lifetime and default_token_ttl <= default_offline_grace")
        if self.redis_timeout <= 0 or self.max_body_bytes < 1024:
            raise ConfigError("redis_timeout must be > 0 and max_body_bytes >= 1024")
        if self.max_model_body_bytes < self.max_body_bytes:
            raise ConfigError("max_model_body_bytes must be >= max_body_bytes")
        if self.redis_wait_replicas < 0 or self.shed_queue_ms < 0 or self.retry_after < 1:
            raise ConfigError("redis_wait_replicas and shed_queue_ms must be >= 0, retry_after >= 1")
        if self.redis_wait_replicas and not 1 <= self.redis_wait_timeout_ms < self.redis_timeout * 1000:
            raise ConfigError("redis_wait_timeout_ms must be >= 1 and below redis_timeout (in ms): a write "
                              "waiting for its replicas must not outlast the client's socket timeout")
        if self.offline_request_ttl < self.clock_skew:
            raise ConfigError("offline_request_ttl must be >= clock_skew")
        if min(self.background_interval, self.webhook_timeout, self.webhook_backoff) <= 0 or \
                self.webhook_backoff_max < self.webhook_backoff or self.webhook_retry_for < 0:
            raise ConfigError("background_interval, webhook_timeout and webhook_backoff must be > 0, "
                              "webhook_backoff_max >= webhook_backoff, webhook_retry_for >= 0")
