"""Clock-rollback detection: offline use must not outlive a token by setting the clock back.

When the license server cannot be asked, the sidecar keeps serving until the token's ``exp`` —
as read on the host's clock, which whoever runs the host can set.  :class:`ClockGuard` keeps a
high-water mark of the latest time the sidecar has seen: its own clock (each pass of a model's
loop), the ``iat`` of every token it uses from its cache or an import (server time), and the
modification times of its state files (at start).  A clock that reads more than ``tolerance``
seconds before the mark has been set back: *offline use stops* — cached and imported tokens are
refused, served models are asked to renew at once and dropped if the server cannot answer —
with the reason ``clock_rollback`` in ``status`` and the log, until an online activation
succeeds (or an air-gapped response to a request this sidecar made is imported: both are fresh
server statements).  Then the current clock becomes the new baseline.

The mark lives in ``clock.json`` in the state directory, MAC'd with HMAC-SHA256 under a key
derived (HKDF-SHA256, info ``layerlock-clock-v1``) from the machine's Ed25519 private key, so
editing or replacing the file is detected (and counts as a rollback); a missing file is
re-created from the current clock and the state files' times.  What this does *not* stop:
root on the host can read the machine key, so root can rewrite the file with a valid MAC (or
delete it and back-date the state files) — this raises the bar from "change the date" to
"forge the sidecar's own state", it is not a defence against root.  It also cannot tell a clock
that was wrong all along (from before the sidecar saw a later time) from a right one; the
license server's ``clock_skew`` check bounds that for online activations.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FILE = "clock.json"
_INFO = b"layerlock-clock-v1"
#: The sidecar's own clock readings are written at most this often (a token's iat, a rollback
#: and a resync are written at once).
PERSIST_EVERY_S = 60.0
DEFAULT_TOLERANCE_S = 300


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class ClockGuard:
    def __init__(self, path: Path, sign_key: ed25519.Ed25519PrivateKey, *,
                 tolerance: float = DEFAULT_TOLERANCE_S) -> None:
        self.path = path
        self.tolerance = tolerance
        self._key = HKDF(hashes.SHA256(), 32, salt=None, info=_INFO).derive(sign_key.private_bytes_raw())
        self._lock = threading.Lock()
        self.hwm = 0.0
        self.flag = ""
        self._saved = 0.0
        self._stamp: tuple[int, int] | None = None

    # --- the file --------------------------------------------------------------------------------
    def _mac(self, hwm: float, flag: str) -> str:
        body = json.dumps({"v": 1, "hwm": hwm, "flag": flag}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _save(self) -> None:
        hwm = round(self.hwm, 3)
        doc = {"v": 1, "hwm": hwm, "flag": self.flag, "mac": self._mac(hwm, self.flag)}
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=self.path.parent)  # 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(doc) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved = self.hwm
        self._stamp = self._file_stamp()

    def _read(self) -> None:
        """Take the file's state; a file that does not verify is a rollback (its mark is lost)."""
        self._stamp = self._file_stamp()
        try:
            doc = json.loads(self.path.read_text())
            hwm, flag, mac = float(doc["hwm"]), str(doc["flag"]), str(doc["mac"])
            ok = hmac.compare_digest(mac, self._mac(hwm, flag))
        except (OSError, ValueError, KeyError, TypeError):
            ok, hwm, flag = False, 0.0, ""
        if ok:
            self.hwm, self.flag, self._saved = hwm, flag, hwm
        elif not self.flag:
            self.flag = (f"{self.path} does not verify (edited or replaced): offline use is refused until an "
                         "online activation succeeds")

    def load(self, now: float, file_times: Iterable[float] = ()) -> None:
        """Read the mark, or start one from ``now`` and the state files' modification times."""
        with self._lock:
            if self.path.exists():
                self._read()
                self.observe_locked(max([now, *file_times]))
                return
            self.hwm = max([now, *file_times])
            self._save()

    def _reload_if_changed(self) -> None:
        """Another process (``layerlock-verifier import``) may have resynced the file."""
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            self.flag = ""  # the file decides (a bad file flags again)
            self._read()

    # --- observations and the check --------------------------------------------------------------
    def observe_locked(self, t: float, *, persist: bool = False) -> None:
        if t > self.hwm:
            self.hwm = t
            if persist or t - self._saved >= PERSIST_EVERY_S:
                self._save()

    def observe(self, t: float, *, persist: bool = True) -> None:
        """A time the sidecar has seen happen (a token's iat: server time)."""
        with self._lock:
            self.observe_locked(t, persist=persist)

    def check(self, now: float) -> tuple[str, bool]:
        """(reason, newly) — reason is '' while the clock is fine; ``now`` is recorded."""
        with self._lock:
            self._reload_if_changed()
            if self.flag:
                return self.flag, False
            if now < self.hwm - self.tolerance:
                self.flag = (f"the clock reads {_iso(now)}, {int(self.hwm - now)} s before the latest time this "
                             f"sidecar has seen ({_iso(self.hwm)}): it was set back; offline use is refused until "
                             "an online activation succeeds")
                self._save()
                return self.flag, True
            self.observe_locked(now)
            return "", False

    @property
    def rolled_back(self) -> str:
        return self.flag

    def resync(self, now: float) -> bool:
        """A fresh server statement arrived: the current clock is the baseline again.  True if a
        rollback (or a bad file) was cleared."""
        with self._lock:
            cleared = bool(self.flag)
            self.flag = ""
            self.hwm = now if cleared else max(self.hwm, now)
            self._save()
            return cleared

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": not self.flag, "high_water": int(self.hwm)}
        if self.flag:
            out["reason"] = self.flag
        return out
