"""What the dashboard shows, computed from Redis (read only) and drawn without JavaScript.

* counts: machines, licenses (by state, and expiring soon), models, API keys;
* activations over the last 24 hours, hour by hour, granted and denied — from the audit
  records of type ``activation`` (at most :data:`SCAN_MAX` of them; the chart says when it
  stopped short);
* denials by reason: audited denials (a licensed machine refused) and the unauthenticated
  rejections the server only counts (``GET /v1/audit/rejections``).

The chart is an SVG drawn by the template from the numbers here: no script, nothing inline
that the Content-Security-Policy would have to allow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from layerlock.license_server.store import apikeys, licenses, machines, models

HOURS = 24
#: Activation records the chart reads at most (newest first); more than that in 24 h is a
#: Prometheus job (``layerlock_activations_total``), not a page load.
SCAN_MAX = 20_000
#: License records read at most for the by-state breakdown.
STATE_SCAN_MAX = 50_000
SOON_DAYS = 14
# chart geometry (SVG user units)
WIDTH, HEIGHT, LEFT, RIGHT, BOTTOM, TOP = 880, 230, 40, 24, 26, 12


@dataclass
class Counts:
    machines: int = 0
    machines_inactive: int = 0
    licenses: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    expiring_soon: int = 0
    models: int = 0
    models_retired: int = 0
    keys: int = 0
    partial: bool = False


def counts(r: Any, now: float | None = None) -> Counts:
    t = time.time() if now is None else now
    out = Counts()
    with r.pipeline(transaction=False) as pipe:
        for index in (machines.ALL, licenses.ALL, models.ALL, apikeys.ALL):
            pipe.zcard(index)
        out.machines, out.licenses, out.models, out.keys = pipe.execute()
    out.by_state = {"active": 0, "pending": 0, "expired": 0, "revoked": 0}
    for rec in _scan(r, licenses.ALL, licenses.key, ("status", "expires_at", "not_before"), STATE_SCAN_MAX):
        if rec["expires_at"] is None:
            continue
        state = licenses.state({k: v or "0" for k, v in rec.items()}, t)
        out.by_state[state] = out.by_state.get(state, 0) + 1
        if state == "active" and int(rec["expires_at"]) < t + SOON_DAYS * 86_400:
            out.expiring_soon += 1
    out.machines_inactive = sum(rec["status"] == "inactive"
                                for rec in _scan(r, machines.ALL, machines.key, ("status",), STATE_SCAN_MAX))
    out.models_retired = sum(rec["status"] == "retired"
                             for rec in _scan(r, models.ALL, models.key, ("status",), STATE_SCAN_MAX))
    out.partial = max(out.licenses, out.machines) > STATE_SCAN_MAX
    return out


def _scan(r: Any, index: str, hash_key: Any, fields: tuple[str, ...], cap: int) -> list[dict[str, str | None]]:
    """``fields`` of the first ``cap`` records of an index, in pipelined batches."""
    out: list[dict[str, str | None]] = []
    for start in range(0, cap, 1000):
        ids = r.zrange(index, start, min(start + 999, cap - 1))
        if not ids:
            break
        with r.pipeline(transaction=False) as pipe:
            for ident in ids:
                pipe.hmget(hash_key(ident), list(fields))
            rows = pipe.execute()
        out += [dict(zip(fields, row, strict=True)) for row in rows]
    return out


@dataclass
class Chart:
    """Hourly granted/denied activations and the SVG geometry to draw them."""

    hours: list[dict[str, Any]]
    granted: int
    denied: int
    denied_by_reason: dict[str, int]
    truncated: bool
    peak: int
    ticks: list[dict[str, Any]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    bottom: int = BOTTOM
    top: int = TOP


def activations(records: list[dict[str, Any]], now: float | None = None, truncated: bool = False) -> Chart:
    """Bucket activation audit records (newest first, as listed) into the last :data:`HOURS` hours."""
    t = time.time() if now is None else now
    start = (int(t) // 3600 - HOURS + 1) * 3600
    granted = [0] * HOURS
    denied = [0] * HOURS
    reasons: dict[str, int] = {}
    for rec in records:
        i = int((float(rec.get("ts", 0)) - start) // 3600)
        if not 0 <= i < HOURS:
            continue
        if rec.get("outcome") == "granted":
            granted[i] += 1
        else:
            denied[i] += 1
            reason = str(rec.get("reason") or "unknown")
            reasons[reason] = reasons.get(reason, 0) + 1
    peak = max([g + d for g, d in zip(granted, denied, strict=True)] + [0])
    scale_top = _nice(peak)
    plot_h = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT - RIGHT) / HOURS
    hours = []
    for i in range(HOURS):
        gh = plot_h * granted[i] / scale_top
        dh = plot_h * denied[i] / scale_top
        x = LEFT + i * slot + slot * 0.15
        label = time.strftime("%H:00", time.gmtime(start + i * 3600))
        hours.append({"x": round(x, 1), "w": round(slot * 0.7, 1), "granted": granted[i], "denied": denied[i],
                      "gy": round(HEIGHT - BOTTOM - gh, 1), "gh": round(gh, 1),
                      "dy": round(HEIGHT - BOTTOM - gh - dh, 1), "dh": round(dh, 1), "label": label,
                      "show_label": i % 4 == 0 or i == HOURS - 1, "cx": round(x + slot * 0.35, 1)})
    ticks = [{"value": v, "y": round(HEIGHT - BOTTOM - plot_h * v / scale_top, 1)}
             for v in (0, scale_top // 2, scale_top)]
    return Chart(hours=hours, granted=sum(granted), denied=sum(denied),
                 denied_by_reason=dict(sorted(reasons.items(), key=lambda kv: -kv[1])), truncated=truncated,
                 peak=peak, ticks=ticks)


def _nice(peak: int) -> int:
    """The axis top: the least even 1, 2, 4 or 5 × 10^k ≥ peak (at least 2), so the middle tick is whole."""
    if peak <= 2:
        return 2
    magnitude = 10 ** (len(str(peak)) - 1)
    return int(next(step * magnitude for step in (1, 2, 4, 5, 10)
                    if step * magnitude >= peak and step * magnitude % 2 == 0))


def bars(counts_by_reason: dict[str, int]) -> list[dict[str, Any]]:
    """Horizontal bar widths (percent of the largest) for a reason → count table."""
    top = max(counts_by_reason.values(), default=0) or 1
    return [{"reason": k, "count": v, "pct": max(1, round(100 * v / top))}
            for k, v in sorted(counts_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))]
