"""The activation's one read, and its replay/abuse guards.

:class:`ActivationReader` is the single read of an activation: one Lua script returns the
machine's signed-request count this minute, the request source's failure count this minute,
the machine, the model, every license that could cover the request (the machine's and its
customer's, for the model and for its family, with the seat usage of pool licenses) and the
audit head, so the request costs one round trip before its commit.  The read *counts nothing*: a machine's
counter rises only in the commit of a request that proved possession of its key
(:func:`count_machine`), and a source's failure counter only when it fails
(:mod:`layerlock.license_server.store.rejections`).  The nonce is burnt in the commit itself
(``Change.once``), atomically with the audit record and the grant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from layerlock.license_server.redis_conn import RedisClient
from layerlock.license_server.store import P, licenses, machines, models, rejections
from layerlock.license_server.store.audit import GENESIS, HEAD
from layerlock.license_server.store.commit import Change

# KEYS: machine counter, source failure counter, machine, model, license pair set, audit head.
# ARGV: license key prefix, genesis hash, machine code, model id, now, key prefix.
# Candidate licenses come from up to four index sets (store/licenses.py index_key): the pair set,
# the machine's family set, the machine's customer's pool sets for the model and for its family
# (family and customer read here, from the model and machine hashes).  A pool license gets two
# extra fields: ``_used`` (live seats: ZCOUNT now +inf) and ``_held`` (this machine's seat score,
# '' if none).  Keys other than KEYS (the index sets, license hashes, seat zsets) cannot be
# declared up front — they are found by reading; Redis allows that, on a cluster too, because every
# key carries the {ll} hash tag and so lives in the slot of the declared ones (store/__init__.py).
_SNAPSHOT = """
local family = redis.call('HGET', KEYS[4], 'family')
local customer = redis.call('HGET', KEYS[3], 'customer')
local sets = {KEYS[5]}
if family and family ~= '' then sets[#sets + 1] = ARGV[6] .. 'lic:' .. ARGV[3] .. ':@' .. family end
if customer and customer ~= '' then
  sets[#sets + 1] = ARGV[6] .. 'clic:' .. customer .. ':' .. ARGV[4]
  if family and family ~= '' then sets[#sets + 1] = ARGV[6] .. 'clic:' .. customer .. ':@' .. family end
end
local lics, seen = {}, {}
for _, set in ipairs(sets) do
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    if not seen[id] then
      seen[id] = true
      local k = ARGV[1] .. id
      local rec = redis.call('HGETALL', k)
      if #rec > 0 then
        if redis.call('HEXISTS', k, 'seats') == 1 then
          local sk = ARGV[6] .. 'seats:' .. id
          rec[#rec + 1] = '_used'
          rec[#rec + 1] = tostring(redis.call('ZCOUNT', sk, ARGV[5], '+inf'))
          rec[#rec + 1] = '_held'
          rec[#rec + 1] = redis.call('ZSCORE', sk, ARGV[3]) or ''
        end
        lics[#lics + 1] = rec
      end
    end
  end
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
    #: The candidate licenses (see :data:`_SNAPSHOT`): pool ones carry ``_used`` and ``_held``.
    licenses: list[dict[str, str]]
    head: str
    #: When the snapshot was read (what ``_used`` counted live seats against).
    now: float = 0.0
    #: ``time.monotonic()`` of the read: how fresh ``head`` is (Commits._guess; immune to clock steps).
    read_at: float = 0.0


class ActivationReader:
    def __init__(self, r: RedisClient) -> None:
        self._script = r.register_script(_SNAPSHOT)

    def __call__(self, machine: str, model: str, ip: str) -> Snapshot:
        now, read_at = time.time(), time.monotonic()
        keys = [machine_counter(machine, now), rejections.failure_key(ip, now), machines.key(machine),
                models.key(model), licenses.pair_key(machine, model), HEAD]
        cm, cf, mrec, model_rec, lics, head = self._script(keys=keys, args=[licenses.key(""), GENESIS, machine, model,
                                                                            repr(now), P])
        return Snapshot(int(cm), int(cf), _pairs(mrec), _pairs(model_rec), [_pairs(x) for x in lics], head, now,
                        read_at)
