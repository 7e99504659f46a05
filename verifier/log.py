"""Structured logs: one JSON object per line on stdout (journald keeps them as-is).

Callers pass facts (model id, reason code, uid), never secrets: no function here accepts a key
or a token, and :func:`log` drops any field whose name suggests one, as a last line of defence.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()
_FORBIDDEN = ("token", "key", "secret", "wk", "password")


def log(event: str, *, level: str = "info", **fields: Any) -> None:
    record: dict[str, Any] = {"ts": round(time.time(), 3), "level": level, "event": event}
    for name, value in fields.items():
        if any(word in name.lower() for word in _FORBIDDEN):
            continue
        record[name] = value
    line = json.dumps(record, default=str, separators=(",", ":"))
    with _lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
