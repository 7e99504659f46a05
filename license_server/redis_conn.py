"""Build the Redis client from the configured URL, with short timeouts so nothing hangs.

Why short timeouts: when Redis is gone, a request must fail fast with 503 + ``Retry-After``
rather than tie up a gunicorn worker; redis-py reconnects by itself on the next command, so the
server serves again within seconds of Redis coming back, without a restart.
"""

from __future__ import annotations

from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from layerlock.shared.errors import ConfigError

#: The client as the rest of the code sees it.  ``Any`` on purpose: redis-py's annotations type every
#: reply as ``bytes | str`` whatever ``decode_responses`` says, so precise types here would be wrong.
RedisClient: TypeAlias = Any

#: Anything that means "Redis is not reachable right now" (mapped to 503 by the error handler).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


def connect(url: str, timeout: float) -> RedisClient:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://h:p[,h:p]/service``."""
    # One quick retry (covers a Sentinel failover or a dropped idle connection), then give up:
    # a request must not wait past a couple of seconds for a Redis that is down.
    opts = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "health_check_interval": 10,
            "decode_responses": True, "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)}
    if url.startswith("redis+sentinel://"):
        parsed = urlparse(url)
        hosts = []
        for item in parsed.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.partition(":")
            hosts.append((host, int(port or 26379)))
        service = parsed.path.strip("/").split("/")[0]
        if not service:
            raise ConfigError("redis+sentinel URL needs the service name as its path")
        query = parse_qs(parsed.query)
        sentinel = Sentinel(hosts, socket_timeout=timeout, password=parsed.password,  # type: ignore[no-untyped-call]
                            sentinel_kwargs={"socket_timeout": timeout})
        return sentinel.master_for(service, db=int(query.get("db", ["0"])[0]),  # type: ignore[no-untyped-call]
                                   **opts)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("LAYERLOCK_REDIS_URL must be redis://, rediss://, unix:// or redis+sentinel://")
    return redis.Redis.from_url(url, **opts)
