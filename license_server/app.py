"""The Flask application factory: one :class:`ServerConfig` in, a ready WSGI app out.

Everything a request needs (Redis client, key store, audit log, suite policy) is built here once
per worker and kept in :class:`Services`; blueprints reach it through :func:`services`.  All
error-to-HTTP mapping happens in :func:`_register_errors`, using the error's ``code`` and the
status table in :mod:`layerlock.license_server.statuses` — the one place a failure becomes a
status code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from layerlock.license_server import logs, metrics
from layerlock.license_server.config import ServerConfig
from layerlock.license_server.keystore import KeyStore
from layerlock.license_server.policy import SuitePolicy
from layerlock.license_server.redis_conn import REDIS_DOWN, RedisClient, connect
from layerlock.license_server.statuses import status_of
from layerlock.license_server.store import apikeys, layout
from layerlock.license_server.store.audit import AuditLog
from layerlock.license_server.store.commit import Commits
from layerlock.license_server.store.guards import ActivationReader
from layerlock.shared.errors import ConfigError, LayerlockError, PayloadTooLarge, Unavailable

log = logging.getLogger("layerlock")


@dataclass
class Services:
    config: ServerConfig
    redis: RedisClient
    keys: KeyStore
    audit: AuditLog
    commits: Commits
    policy: SuitePolicy
    activation_reader: ActivationReader
    bootstrapped: bool = field(default=False)

    def ensure_bootstrap(self) -> None:
        """Once Redis is reachable: move an old key layout (:mod:`store.layout`), then put the
        init-time admin key hash into Redis."""
        if self.bootstrapped:
            return
        layout.migrate(self.redis)
        h = self.keys.current.bootstrap_hash
        if h:
            apikeys.ensure_bootstrap(self.commits, h)
        self.bootstrapped = True


def services() -> Services:
    return current_app.extensions["layerlock"]  # type: ignore[no-any-return]


def create_app(config: ServerConfig, *, redis_client: RedisClient | None = None) -> Flask:
    logs.setup(config.log_level)
    if not config.redis_url and redis_client is None:
        raise ConfigError("no Redis URL: start the server with `layerlock serve` (embedded Redis) "
                          "or set LAYERLOCK_REDIS_URL")
    r = redis_client or connect(config.redis_url, config.redis_timeout)
    svc = Services(config=config, redis=r, keys=KeyStore(config.key_dir, max_token_life=config.max_offline_grace),
                   audit=AuditLog(r), commits=Commits(r, wait_replicas=config.redis_wait_replicas,
                                                       wait_timeout_ms=config.redis_wait_timeout_ms),
                   policy=SuitePolicy.from_file(config.policy_file),
                   activation_reader=ActivationReader(r))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["layerlock"] = svc
    try:
        svc.ensure_bootstrap()
    except (*REDIS_DOWN, Unavailable) as exc:  # Redis down, or the bootstrap key not yet confirmed by a replica
        # the cause, too: a cluster URL naming a plain Redis, or a wrong password, also lands here
        log.warning("redis unreachable at startup; will retry",
                    extra={"fields": {"event": "startup", "cause": _cause(exc)}})

    from layerlock.license_server.api import (
        activation,
        audit,
        enroll,
        keys,
        licenses,
        machines,
        models,
        system,
        trace,
        webhooks,
    )
    from layerlock.license_server.console import bp as console_bp

    for bp in (system.bp, machines.bp, enroll.bp, models.bp, licenses.bp, activation.bp, audit.bp, keys.bp,
               webhooks.bp, trace.bp, console_bp):
        app.register_blueprint(bp)
    _register_errors(app)
    _register_logging(app)
    return app


def _error(err: LayerlockError) -> Response:
    resp = jsonify(err.to_dict())
    resp.status_code = status_of(err)
    if resp.status_code == 503:
        resp.headers["Retry-After"] = str(services().config.retry_after)
    return resp


def _register_errors(app: Flask) -> None:
    @app.errorhandler(LayerlockError)
    def _layerlock(err: LayerlockError) -> Response:
        return _error(err)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        if err.code == 413:
            return _error(PayloadTooLarge(f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes"))
        name = (err.name or "error").lower().replace(" ", "_")
        resp = jsonify({"error": name, "message": err.description or name})
        resp.status_code = err.code or 500
        return resp

    @app.errorhandler(Exception)
    def _other(err: Exception) -> Response:
        if isinstance(err, REDIS_DOWN):
            log.warning("redis unreachable", extra={"fields": {"event": "redis_down", "cause": _cause(err)}})
            return _error(Unavailable("the license database is unreachable; retry shortly"))
        log.exception("unhandled error", extra={"fields": {"event": "error", "path": request.path}})
        resp = jsonify({"error": "internal", "message": "internal server error"})
        resp.status_code = 500
        return resp


def _cause(exc: BaseException) -> str:
    """An exception's type and first line, for a log field (Redis errors name hosts, not secrets)."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _register_logging(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _done(resp: Response) -> Response:
        ms = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000
        metrics.REQUESTS.labels(status=f"{resp.status_code // 100}xx").inc()
        if log.isEnabledFor(logging.INFO) and request.path not in ("/v1/ping", "/healthz", "/metrics"):
            log.info("request", extra={"fields": {"event": "http", "method": request.method, "path": request.path,
                                                  "status": resp.status_code, "ms": round(ms, 2),
                                                  "remote": request.remote_addr}})
        return resp
