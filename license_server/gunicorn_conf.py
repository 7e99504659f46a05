"""gunicorn settings and hooks for the license server (``deploy/gunicorn.conf.py`` re-exports them).

Packaged inside ``license_server`` so an installed copy works without the repository.  Tunables
come from the environment (``layerlock serve`` sets them from its options):
``LAYERLOCK_BIND`` (default 127.0.0.1:8700), ``LAYERLOCK_WORKERS`` (default 2 × CPUs, max 8),
``LAYERLOCK_THREADS`` (default 4).  The master's hooks do three jobs that must happen exactly once,
before workers fork: start the embedded Redis when ``LAYERLOCK_REDIS_URL`` is unset (supervise
it: restarted when it dies, the master exits 1 if that keeps failing; stop it on exit), give
prometheus_client a fresh multiprocess directory, and start the background worker
(``layerlock webhooks run``: webhook deliveries, lease culling; ``LAYERLOCK_BACKGROUND=false``
to run it elsewhere) as a supervised child (``background.py``).

Workers are gthread workers whose own error replies (request line or headers too long, malformed
requests) use the API's JSON shape ``{"error", "message"}`` instead of gunicorn's HTML page.
They also shed load (:class:`Shedder`): a request that waited in the worker's queue longer than
``shed_queue_ms`` is answered 503 ``overloaded`` + ``Retry-After`` without reaching the app.
gunicorn is not meant to face the Internet: a thread is held for as long as a client takes to
send its body, so a few slow clients stall it.  Put nginx (``deploy/nginx-tls.conf``) in front;
the master warns when it is bound to anything but loopback or a Unix socket.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker

if TYPE_CHECKING:
    from layerlock.license_server.config import ServerConfig

__all__ = ["bind", "workers", "threads", "worker_class", "timeout", "graceful_timeout", "keepalive",
           "accesslog", "errorlog", "loglevel", "limit_request_line", "limit_request_field_size",
           "on_starting", "child_exit", "on_exit", "proc_name", "control_socket_disable", "logconfig_dict",
           "logger_class"]

#: The master's exit status for a configuration that can never work (deploy/layerlock-server.service
#: tells systemd not to restart on it: waiting does not fix a wrong URL or a bad setting).
CONFIG_ERROR_EXIT = 2


def _count(name: str, default: int) -> int:
    """A positive whole number from the environment.  A bad one stops gunicorn before it starts,
    with one line naming the variable and exit status 2 -- not "Failed to read config file" and a
    traceback (gunicorn turns any exception here into that, and exit 1)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 256:
        return int(raw)
    _refuse(f"{name} must be a whole number between 1 and 256")


def _refuse(problem: str) -> NoReturn:
    """Stop before gunicorn starts: one JSON line on stderr, exit 2 (no restart under systemd)."""
    print(json.dumps({"ts": round(time.time(), 3), "level": "ERROR", "logger": "gunicorn.error",
                      "msg": f"configuration error, not starting: {problem}"}), file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_ERROR_EXIT)


def _bind(raw: str) -> str:
    """``LAYERLOCK_BIND`` checked here: gunicorn takes an empty one as "listen nowhere" and
    reports a bad address only after the master's hooks have started the embedded Redis."""
    if re.fullmatch(r"unix:.+|fd://\d+", raw):
        return raw
    address = raw.removeprefix("tcp://")
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(\d+)", address)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        _refuse("LAYERLOCK_BIND must be host:port (port 1-65535; an IPv6 host in brackets) or unix:/path")
    return raw


bind = _bind(os.environ.get("LAYERLOCK_BIND", "127.0.0.1:8700").strip())
workers = _count("LAYERLOCK_WORKERS", min(8, 2 * (os.cpu_count() or 1)))
threads = _count("LAYERLOCK_THREADS", 4)
worker_class = "layerlock.license_server.gunicorn_conf.JsonErrorThreadWorker"
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


class _Captured:
    """Stands in for the client socket while gunicorn renders its error page, to learn the status."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


def _error_code(status: int) -> str:
    """The code the app's own handler gives the same status (``app.py``: werkzeug's name)."""
    if status == 500:
        return "internal"
    from werkzeug.exceptions import default_exceptions

    exc = default_exceptions.get(status)
    return exc().name.lower().replace(" ", "_") if exc is not None else "error"


#: How long the request the current thread serves waited in its worker's queue (seconds).
_queue = threading.local()


class Shedder:
    """WSGI middleware: answer 503 ``overloaded`` + ``Retry-After`` at once, without running the
    app, when the request waited in the worker's queue longer than ``after`` seconds.

    Why queue time: it is what a client feels and it adapts to what requests cost (a storm of
    activations after an outage, each ~2 ms of CPU, piles up in gthread's unbounded queue until
    clients time out and retry on top).  Shedding the late ones costs a fraction of serving them
    and keeps everyone else's latency near ``after``; the sidecars come back after
    ``Retry-After`` with jitter.  A shed request never reaches Flask, so it changes no state and
    writes no audit record.  Probes and the endpoints that never touch Redis are never shed
    (a liveness probe failing under load would only make a restart add to it)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], after: float, retry_after: int, log: Any) -> None:
        from layerlock.license_server.openapi import NO_REDIS
        from layerlock.shared.errors import Overloaded

        self.app, self.after, self.log = app, after, log
        self.exempt = frozenset(NO_REDIS)
        shed = Overloaded(f"the license server is overloaded; retry after {retry_after} s")
        self.body = json.dumps(shed.to_dict()).encode() + b"\n"
        self.headers = [("Content-Type", "application/json"), ("Retry-After", str(retry_after)),
                        ("Content-Length", str(len(self.body)))]
        self._lock = threading.Lock()
        self._shed, self._logged = 0, time.monotonic()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.after and getattr(_queue, "waited", 0.0) > self.after and environ.get("PATH_INFO") not in self.exempt:
            self._count()
            start_response("503 Service Unavailable", list(self.headers))
            return [self.body]
        return self.app(environ, start_response)

    def _count(self) -> None:
        """One warning per 10 s at most, with how many were shed: not one line per request."""
        with self._lock:
            self._shed += 1
            now = time.monotonic()
            if now - self._logged < 10:
                return
            shed, self._shed, self._logged = self._shed, 0, now
        self.log.warning("overloaded: shed %d request(s) that waited over %d ms in the queue",
                         shed, round(self.after * 1000))


class JsonErrorThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker; the replies gunicorn writes itself (414 request line too long,
    431 headers too large, 400 malformed request, 500 before the app ran) are JSON like every
    other error of the API.  gunicorn still classifies and logs the error: its HTML page is
    rendered into a stand-in socket, and only the status line is kept from it.  It measures how
    long each request waited for a thread, for :class:`Shedder`."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        from layerlock.license_server.config import ServerConfig

        cfg = ServerConfig.load()
        app: Callable[..., Iterable[bytes]] = getattr(self, "wsgi")  # noqa: B009 - gunicorn's attribute is untyped
        self.wsgi = Shedder(app, cfg.shed_queue_ms / 1000, cfg.retry_after, self.log)

    def enqueue_req(self, conn: Any) -> None:
        conn.layerlock_queued = time.monotonic()
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        _queue.waited = time.monotonic() - getattr(conn, "layerlock_queued", time.monotonic())
        return super().handle(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        from gunicorn.http.errors import InvalidHeader, InvalidHeaderName

        if isinstance(exc, InvalidHeader | InvalidHeaderName):
            # gunicorn quotes the whole bad line in its log and in the reply; a line that lost its
            # colon ("Authorization Bearer llk_…") would put an API key in the server log
            exc.hdr = re.split(r"[\s:]", str(exc.hdr), maxsplit=1)[0][:40] + " ..."  # (latin-1 only)
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)
        try:
            _, code, reason = captured.data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status = int(code)
        except ValueError:
            status, reason = 500, "Internal Server Error"
        detail = str(exc) if status < 500 or status == 501 else ""
        body = json.dumps({"error": _error_code(status),
                           "message": (detail or reason.lower())[:300]}).encode() + b"\n"
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except Exception:
            self.log.debug("Failed to send error message.")


limit_request_line = 4096
limit_request_field_size = 8192
proc_name = "layerlock-server"
control_socket_disable = True  # gunicorn >= 24: no shared ~/.gunicorn socket between instances

_embedded: Any = None
_background: Any = None
_redis_gave_up: str | None = None


def _give_up_on_redis(reason: str) -> None:
    """Called by the embedded Redis watcher thread: stop gracefully (SIGTERM: workers first, then
    ``on_exit``), which then exits with status 1 so that systemd restarts the whole service."""
    global _redis_gave_up
    _redis_gave_up = reason
    os.kill(os.getpid(), signal.SIGTERM)


def _exposed(addresses: list[str]) -> list[str]:
    """The bind addresses that are neither loopback nor a Unix socket / inherited fd."""
    out = []
    for address in addresses:
        if address.startswith(("unix:", "fd://")):
            continue
        host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            out.append(address)
    return out


def _stop(server: Any, err: Exception) -> NoReturn:
    """The master's way of :func:`_refuse`, once its logger exists: one line, exit 2."""
    server.log.error("configuration error, not starting: %s", err)
    raise SystemExit(CONFIG_ERROR_EXIT) from None


def _checked_config(server: Any) -> ServerConfig:
    """The configuration, checked once in the master before any worker forks: a bad setting, or a
    Redis URL that can never work (a bad scheme, a cluster URL naming a plain Redis, credentials
    a cluster node refuses), is one log line and exit status 2 -- not every worker failing to
    boot with a traceback.  A Redis that is merely down is not an error here (503 until it is up)."""
    from layerlock.license_server.config import ServerConfig
    from layerlock.license_server.policy import SuitePolicy
    from layerlock.license_server.redis_conn import DeferredCluster, connect
    from layerlock.shared.errors import ConfigError

    try:
        cfg = ServerConfig.load()
        SuitePolicy.from_file(cfg.policy_file)  # else every worker would fail to boot on it
        if cfg.redis_url:
            client = connect(cfg.redis_url, cfg.redis_timeout)
            if not isinstance(client, DeferredCluster):  # (that one holds no connection yet)
                client.close()
    except ConfigError as err:
        _stop(server, err)
    for name, guess in _unknown_settings(os.environ, ServerConfig):
        server.log.warning("%s is not a setting this server reads%s", name,
                           f" (did you mean {guess}?)" if guess else "")
    return cfg


#: ``LAYERLOCK_*`` names that are read, but are not :class:`ServerConfig` fields.
_OTHER_NAMES = frozenset({"LAYERLOCK_CONFIG", "LAYERLOCK_BIND", "LAYERLOCK_WORKERS", "LAYERLOCK_THREADS",
                          "LAYERLOCK_API_KEY", "LAYERLOCK_SERVER", "LAYERLOCK_BACKGROUND_PARENT",
                          "LAYERLOCK_VERIFIER_CONFIG", "LAYERLOCK_SOCKET",
                          # the demo's and the test suite's own
                          "LAYERLOCK_ENCODER_TOKENIZER", "LAYERLOCK_ENCODER_HEADS", "LAYERLOCK_ENCODER_TINY",
                          "LAYERLOCK_TEST_REDIS", "LAYERLOCK_SCREENSHOTS"})


def _unknown_settings(env: Any, config_type: Any) -> list[tuple[str, str | None]]:
    """Misspelled variables (``LAYERLOCK_REDIS_WAIT_REPLICA=1``) would be ignored without a word,
    and that one would acknowledge writes no replica holds: each is named in a warning, with the
    setting it most looks like."""
    import difflib
    from dataclasses import fields

    known = {f"LAYERLOCK_{f.name.upper()}" for f in fields(config_type)} | _OTHER_NAMES
    out = []
    for name in sorted(env):
        if name.startswith("LAYERLOCK_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            out.append((name, close[0] if close else None))
    return out


def on_starting(server: Any) -> None:
    global _embedded, _background
    exposed = _exposed(list(server.cfg.bind or []))
    if exposed:
        server.log.warning("gunicorn is bound to %s: do not expose it directly (slow clients hold its threads); "
                           "put nginx in front (deploy/nginx-tls.conf) and bind to 127.0.0.1", ", ".join(exposed))
    cfg = _checked_config(server)
    from layerlock.license_server.embedded_redis import EmbeddedRedis, require_redis_server
    from layerlock.shared.errors import ConfigError
    from layerlock.shared.keys import ensure_private_dir

    # What waiting cannot fix is exit 2 (no restart): no redis-server binary, a data dir this user
    # may not write or that is a file.  What it can (an embedded Redis still replaying a large AOF
    # after a reboot, a full disk) stays an error that systemd restarts.
    try:
        if not cfg.redis_url:
            require_redis_server()
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            prom = cfg.data_dir / "prometheus"
            shutil.rmtree(prom, ignore_errors=True)
            prom.mkdir(parents=True, mode=0o700)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        if not cfg.redis_url:
            ensure_private_dir(cfg.data_dir / "redis")
    except (ConfigError, PermissionError, FileExistsError, NotADirectoryError) as err:
        _stop(server, err)
    if not cfg.redis_url:
        _embedded = EmbeddedRedis(cfg.data_dir / "redis", cfg.appendfsync)
        os.environ["LAYERLOCK_REDIS_URL"] = _embedded.start()
        server.log.info("embedded redis-server started on %s", _embedded.socket)
        _embedded.supervise(server.log, _give_up_on_redis)
    if cfg.background:  # webhook deliveries and lease culling (license_server/background.py)
        from layerlock.license_server.background import Background

        _background = Background()
        server.log.info("background worker (layerlock webhooks run) started, pid %s", _background.start())
        _background.supervise(server.log)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    if _background is not None:
        _background.stop()
    if _embedded is not None:
        _embedded.stop()
        server.log.info("embedded redis-server stopped")
    if _redis_gave_up is not None:
        server.log.error("exiting with status 1: %s", _redis_gave_up)
        raise SystemExit(1)
