"""Move a database written with the old key prefix ``ll:`` to ``{ll}:`` (see the package docstring).

Until 2026-11-27 the keys were ``ll:<...>``; the hash tag that lets the ledger live in one Redis
Cluster slot came with the cluster support.  A server started on an old database must not see
an empty one (it would re-bootstrap and show no machines, while every license is still there), so
the first server to start renames every old key in **one script**: a crash leaves either the old
layout or the new one, never half of each, and the audit stream keeps its ids and hashes (no
record names a key).  Old databases only ever ran on a single Redis or a Sentinel group, where
``KEYS`` in a script is allowed; on a cluster there is nothing to move.
"""

from __future__ import annotations

import logging

from layerlock.license_server.redis_conn import RedisClient, is_cluster
from layerlock.license_server.store import P
from layerlock.shared.errors import ConfigError

OLD = "ll:"
log = logging.getLogger("layerlock")

# Every start runs it, so it first looks for the old audit stream (O(1)): any database a server
# ever ran on has one (the bootstrap key's record), and KEYS walks the whole keyspace.
# Returns the number of keys renamed (0: nothing to do), or -1 when keys exist in both layouts (an
# old server kept writing after a new one started: merging the two would splice records into a
# chain they are not part of): then nothing is renamed.
_MIGRATE = """
if redis.call('EXISTS', ARGV[1] .. 'audit') == 0 then return 0 end
local old = redis.call('KEYS', ARGV[1] .. '*')
if #old == 0 then return 0 end
if #redis.call('KEYS', ARGV[2] .. '*') > 0 then return -1 end
local n = string.len(ARGV[1])
for _, k in ipairs(old) do redis.call('RENAME', k, ARGV[2] .. string.sub(k, n + 1)) end
return #old
"""


def migrate(r: RedisClient) -> int:
    """Rename every ``ll:`` key to ``{ll}:`` at once; returns how many were renamed."""
    if is_cluster(r):
        return 0
    moved = int(r.eval(_MIGRATE, 0, OLD, P))
    if moved < 0:
        raise ConfigError(f"Redis holds keys under both the old prefix {OLD!r} and the new {P!r}: a server "
                          "older than 2026-11-27 is still writing to this database; stop it, then restart")
    if moved:
        log.warning("renamed keys to the cluster-ready layout",
                    extra={"fields": {"event": "layout_migrated", "keys": moved, "from": OLD, "to": P}})
    return moved
