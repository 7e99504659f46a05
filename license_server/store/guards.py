"""The activation's one read, and its replay/abuse guards.

:class:`ActivationReader` is the single read of an activation: one Lua script returns the
machine's signed-request count this minute, the request source's failure count this minute,
the machine, the model, every license of the (machine, model) pair and the audit head, so the
request costs one round trip before its commit.  The read *counts nothing*: a machine's
counter rises only in the commit of a request that proved possession of its key
(:func:`count_machine`), and a source's failure counter only when it fails
(:mod:`layerlock.license_server.store.rejections`).  The nonce is burnt in the commit itself
(``Change.once``), atomically with the audit record and the grant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from layerlock.license_server.redis_conn import Client
from layerlock.license_server.store import P, licenses, machines, models, rejections
from layerlock.license_server.store.audit import GENESIS, HEAD, Change

# KEYS: machine counter, source failure counter, machine, model, license pair set, audit head.
# ARGV: license key prefix, genesis hash.  The license hashes are read by id from the pair set
# (keys not declared up front: fine on one Redis or a Sentinel group).
_SNAPSHOT = """
local lics = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local rec = redis.call('HGETALL', ARGV[1] .. id)
  if #rec > 0 then lics[#lics + 1] = rec end
end
return {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[3]),
        redis.call('HGETALL', KEYS[4]), lics, redis.call('GET', KEYS[6]) or ARGV[2]}
"""
WINDOW_TTL_S = 120


def nonce_key(machine: str, nonce: str) -> str:
    return f"{P}nonce:{machine}:{nonce}"


def machine_counter(machine: str, now: float | None = None) -> str:
    return f"{P}rl:m:{machine}:{int((now or time.time()) // 60)}"


def count_machine(change: Change, machine: str) -> Change:
    """Add one signed request to the machine's per-minute counter, inside ``change``'s commit."""
    k = machine_counter(machine)
    return change.write("INCR", k).write("EXPIRE", k, WINDOW_TTL_S)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


@dataclass
class Snapshot:
    machine_hits: int
    source_failures: int
    machine: dict[str, str]
    model: dict[str, str]
    licenses: list[dict[str, str]]
    head: str


class ActivationReader:
    def __init__(self, r: Client) -> None:
        self._script = r.register_script(_SNAPSHOT)

    def __call__(self, machine: str, model: str, ip: str) -> Snapshot:
        now = time.time()
        keys = [machine_counter(machine, now), rejections.failure_key(ip, now), machines.key(machine),
                models.key(model), licenses.pair_key(machine, model), HEAD]
        cm, cf, mrec, model_rec, lics, head = self._script(keys=keys, args=[licenses.key(""), GENESIS])
        return Snapshot(int(cm), int(cf), _pairs(mrec), _pairs(model_rec), [_pairs(x) for x in lics], head)
