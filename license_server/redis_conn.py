"""Build the Redis client from the configured URL, with short timeouts so nothing hangs.

Why short timeouts: when Redis is gone, a request must fail fast with 503 + ``Retry-After``
rather than tie up a gunicorn worker; redis-py reconnects by itself on the next command, so the
server serves again within seconds of Redis coming back, without a restart.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel

from layerlock.shared.errors import ConfigError

#: The client as the rest of the code sees it.  ``Any`` on purpose: redis-py's annotations type every
#: reply as ``bytes | str`` whatever ``decode_responses`` says, so precise types here would be wrong.
RedisClient: TypeAlias = Any

#: Anything that means "Redis is not reachable right now" (mapped to 503 by the error handler).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
              redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
              # no node of a cluster reachable (raised by the client itself, without a round trip)
              redis.exceptions.RedisClusterException)
#: TLS settings a ``rediss+cluster://`` URL may carry in its query (as ``rediss://`` does).
CLUSTER_TLS_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")


class DeferredCluster:
    """A cluster client made on first use, for a server started while no node is reachable.

    A ``RedisCluster`` learns the slot layout in its constructor, so with every node down it
    cannot be built at all, and the server would not boot.  Until the cluster answers, every use
    raises ``RedisClusterException`` (503 + ``Retry-After``, like any outage); scripts registered
    meanwhile are bound to this object and run on the real client once there is one.
    """

    def __init__(self, make: Callable[[], RedisCluster]) -> None:
        self._make = make
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    def client(self) -> RedisCluster:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make()
        return self._client

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # type: ignore[arg-type]  # duck-typed: evalsha/script_load below

    def get_encoder(self) -> Any:
        """What ``Script`` hashes the text with: a cluster client's (utf-8), from an unconnected client."""
        return redis.Redis(decode_responses=True).get_encoder()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)


def is_cluster(r: RedisClient) -> bool:
    """Whether ``r`` talks to a Redis Cluster (where a script sees one hash slot only)."""
    return isinstance(r, (RedisCluster, DeferredCluster))


def _hosts(netloc: str, default_port: int, *, secret: bool = False) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.partition(":")
        if not host or not (port or "0").isdigit():
            # with credentials in the URL, a "host" may be a piece of an unescaped password
            shown = "" if secret else f" {item!r}"
            raise ConfigError(f"bad host:port{shown} in the Redis URL (a password with '#', '?', '/' or '@' "
                              "must be percent-encoded)")
        hosts.append((host, int(port or default_port)))
    return hosts


def _classify_nodes(nodes: list[tuple[str, int]], client_opts: dict[str, Any]) -> str | None:
    """Why a cluster client could not start, if it is the URL's fault: asked of each node with a
    plain client, because redis-py's cluster client shuffles the nodes and reports the last one's
    error only (and words a missing permission as "cluster mode is not enabled").  A ConfigError
    message when every node that answers is a plain Redis or refuses the credentials; None when
    some node is down or is a cluster node (waiting may help: the server starts, 503 until then)."""
    verdicts = []
    for host, port in nodes:
        probe = redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **client_opts)
        try:
            enabled = probe.info("cluster").get("cluster_enabled")
            verdicts.append(f"{host}:{port} is not in cluster mode" if not enabled else "cluster")
        except redis.exceptions.AuthenticationError:
            verdicts.append(f"{host}:{port} refused the user name and password")
        except (redis.exceptions.RedisError, OSError):
            verdicts.append("unknown")  # down, slow, no permission for INFO: not the URL's fault for sure
        finally:
            probe.close()
    if any(v in ("cluster", "unknown") for v in verdicts):
        return None
    return ("the redis+cluster URL cannot work: " + "; ".join(verdicts) +
            " (for a single Redis use redis://host:port; for a cluster name its nodes and their credentials)")


def _cluster(url: str, opts: dict[str, Any]) -> RedisClient:
    """``redis+cluster://[user:password@]h:p[,h:p...]``: any reachable node finds the others."""
    parsed = urlparse(url)
    if parsed.path.strip("/") not in ("", "0"):
        raise ConfigError("a Redis Cluster has only database 0: drop the path from the redis+cluster URL")
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - set(CLUSTER_TLS_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown redis+cluster URL option(s): {', '.join(sorted(unknown))}")
    tls = url.startswith("rediss+cluster://")
    if query and not tls:
        raise ConfigError("ssl_* options need a rediss+cluster:// URL")
    hosts = _hosts(parsed.netloc, 6379, secret="@" in url)
    nodes = [ClusterNode(host, port) for host, port in hosts]  # type: ignore[no-untyped-call]
    auth: dict[str, Any] = {"username": parsed.username, "password": parsed.password, "ssl": tls}

    def make() -> RedisCluster:
        return RedisCluster(startup_nodes=nodes, **auth, **({**opts, **query}))

    try:
        return make()
    except (redis.exceptions.RedisClusterException, redis.exceptions.ConnectionError):
        # A plain Redis or refused credentials will not change by waiting: the URL's mistake,
        # said at startup rather than as a 503 for every request.  A node that is down may come
        # up: that one is deferred.
        why = _classify_nodes(hosts, {**auth, **query, "socket_timeout": opts["socket_timeout"],
                                      "socket_connect_timeout": opts["socket_connect_timeout"],
                                      "decode_responses": True})
        if why:
            raise ConfigError(why) from None
        return DeferredCluster(make)


def connect(url: str, timeout: float) -> RedisClient:
    """A client for ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://h:p[,h:p]/service``
    or ``redis+cluster://h:p[,h:p]`` (``rediss+cluster://`` with TLS).  A URL that cannot be
    parsed is a :class:`ConfigError` whose message never quotes what may be a password."""
    try:
        return _connect(url, timeout)
    except (ValueError, TypeError):  # redis-py's own parsing: its messages may quote the URL
        raise ConfigError("LAYERLOCK_REDIS_URL cannot be parsed (a port that is not a number, a bad "
                          "option value, or a password with '#', '?', '/' or '@' not percent-encoded)") from None


def _connect(url: str, timeout: float) -> RedisClient:
    # One quick retry (covers a Sentinel failover or a dropped idle connection), then give up:
    # a request must not wait past a couple of seconds for a Redis that is down.
    opts = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "health_check_interval": 10,
            "decode_responses": True, "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)}
    if url.startswith("redis+sentinel://"):
        parsed = urlparse(url)
        hosts = _hosts(parsed.netloc, 26379, secret="@" in url)
        service = parsed.path.strip("/").split("/")[0]
        if not service:
            raise ConfigError("redis+sentinel URL needs the service name as its path")
        query = parse_qs(parsed.query)
        sentinel = Sentinel(hosts, socket_timeout=timeout, password=parsed.password,  # type: ignore[no-untyped-call]
                            sentinel_kwargs={"socket_timeout": timeout})
        return sentinel.master_for(service, db=int(query.get("db", ["0"])[0]),  # type: ignore[no-untyped-call]
                                   **opts)
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        return _cluster(url, opts)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("LAYERLOCK_REDIS_URL must be redis://, rediss://, unix://, redis+sentinel:// "
                          "or redis+cluster://")
    client = redis.Redis.from_url(url, **opts)
    _check_options(url, client)
    return client


def _check_options(url: str, client: redis.Redis) -> None:
    """What redis-py would only find at the first connection (every request a 500), or never: a
    misspelled option (``?socket_timout=1``) and a database that is not a number (``/notadb``
    silently meant database 0)."""
    parsed = urlparse(url)
    db = parsed.path.strip("/") if parsed.scheme in ("redis", "rediss") else ""
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError("the database in LAYERLOCK_REDIS_URL (its path) must be a number")
    pool = client.connection_pool
    try:
        pool.connection_class(**pool.connection_kwargs)  # builds, does not connect
    except TypeError as exc:
        # Named only when the URL has no credentials: a password with an unencoded '?' puts its
        # own tail here as an "option".
        name = re.search(r"argument '(\w+)'", str(exc)) if "@" not in url else None
        raise ConfigError("LAYERLOCK_REDIS_URL has an option redis-py does not know"
                          + (f": {name.group(1)!r}" if name else " (or a password with '?' not percent-encoded)")) \
            from None
