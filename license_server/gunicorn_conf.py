"""gunicorn settings and hooks for the license server (``deploy/gunicorn.conf.py`` re-exports them).

Packaged inside ``license_server`` so an installed copy works without the repository.  Tunables
come from the environment (``layerlock serve`` sets them from its options):
``LAYERLOCK_BIND`` (default 127.0.0.1:8700), ``LAYERLOCK_WORKERS`` (default 2 × CPUs, max 8),
``LAYERLOCK_THREADS`` (default 4).  The master's hooks do two jobs that must happen exactly once,
before workers fork: start the embedded Redis when ``LAYERLOCK_REDIS_URL`` is unset (and stop
it on exit), and give prometheus_client a fresh multiprocess directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from gunicorn.glogging import Logger

__all__ = ["bind", "workers", "threads", "worker_class", "timeout", "graceful_timeout", "keepalive",
           "accesslog", "errorlog", "loglevel", "limit_request_line", "limit_request_field_size",
           "on_starting", "child_exit", "on_exit", "proc_name", "control_socket_disable", "logconfig_dict",
           "logger_class"]

bind = os.environ.get("LAYERLOCK_BIND", "127.0.0.1:8700")
workers = int(os.environ.get("LAYERLOCK_WORKERS", str(min(8, 2 * (os.cpu_count() or 1)))))
threads = int(os.environ.get("LAYERLOCK_THREADS", "4"))
worker_class = "gthread"
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = None  # the app logs each request as JSON (without headers or bodies)
errorlog = "-"
# gunicorn's own messages as JSON lines too (same formatter as the app's logs).  Its access log
# stays off: the app logs each request itself, without headers, bodies or query strings.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "formatters": {"json": {"()": "layerlock.license_server.logs.JsonFormatter"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        "error_console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
    },
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
    },
}
loglevel = "info"


class QuietAccessLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, minus the per-request cost of an access log nobody reads: with a
    ``logconfig_dict`` gunicorn formats every access line before the level filter drops it."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


logger_class = QuietAccessLogger
limit_request_line = 4096
limit_request_field_size = 8192
proc_name = "layerlock-server"
control_socket_disable = True  # gunicorn >= 24: no shared ~/.gunicorn socket between instances

_embedded: Any = None


def on_starting(server: Any) -> None:
    global _embedded
    from layerlock.license_server.config import ServerConfig

    cfg = ServerConfig.load()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        prom = cfg.data_dir / "prometheus"
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir(parents=True, mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    if not cfg.redis_url:
        from layerlock.license_server.embedded_redis import EmbeddedRedis

        _embedded = EmbeddedRedis(cfg.data_dir / "redis", cfg.appendfsync)
        os.environ["LAYERLOCK_REDIS_URL"] = _embedded.start()
        server.log.info("embedded redis-server started on %s", _embedded.socket)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _embedded is not None:
        _embedded.stop()
        server.log.info("embedded redis-server stopped")
