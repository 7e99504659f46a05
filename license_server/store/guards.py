"""Activation reads and replay/abuse guards: nonces (SET NX EX) and fixed-window rate limits.

:func:`activation_snapshot` is the single read of an activation: one Lua script counts the
rate-limit hits and returns the machine, the model, every license of the (machine, model) pair
and the audit head, so the request costs one round trip before its commit.  The nonce is
burnt in the commit itself (``Change.once``), atomically with the audit record and the grant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from layerlock.license_server.redis_conn import Client
from layerlock.license_server.store import P, licenses, machines, models
from layerlock.license_server.store.audit import GENESIS, HEAD

# KEYS: rate-limit counter (machine), rate-limit counter (ip), machine, model, license pair set,
# audit head.  ARGV: counter TTL, license key prefix, genesis hash.  The license hashes are read
# by id from the pair set (keys not declared up front: fine on one Redis or a Sentinel group).
_SNAPSHOT = """
local function hit(k)
  local c = redis.call('INCR', k)
  if c == 1 then redis.call('EXPIRE', k, ARGV[1]) end
  return c
end
local cm, ci = hit(KEYS[1]), hit(KEYS[2])
local lics = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local rec = redis.call('HGETALL', ARGV[2] .. id)
  if #rec > 0 then lics[#lics + 1] = rec end
end
return {cm, ci, redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4]), lics,
        redis.call('GET', KEYS[6]) or ARGV[3]}
"""


def nonce_key(machine: str, nonce: str) -> str:
    return f"{P}nonce:{machine}:{nonce}"


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


@dataclass
class Snapshot:
    machine_hits: int
    ip_hits: int
    machine: dict[str, str]
    model: dict[str, str]
    licenses: list[dict[str, str]]
    head: str


class ActivationReader:
    def __init__(self, r: Client) -> None:
        self._script = r.register_script(_SNAPSHOT)

    def __call__(self, machine: str, model: str, ip: str) -> Snapshot:
        window = int(time.time() // 60)
        keys = [f"{P}rl:m:{machine}:{window}", f"{P}rl:ip:{ip}:{window}", machines.key(machine), models.key(model),
                licenses.pair_key(machine, model), HEAD]
        cm, ci, mrec, model_rec, lics, head = self._script(keys=keys, args=[120, licenses.key(""), GENESIS])
        return Snapshot(int(cm), int(ci), _pairs(mrec), _pairs(model_rec), [_pairs(x) for x in lics], head)
