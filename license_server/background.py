"""The gunicorn master's child for background work: ``layerlock webhooks run``
(:mod:`layerlock.license_server.webhooks`: webhook deliveries and lease culling).

A child process rather than a thread in the master: the master forks workers, and a thread
caught mid-TLS-handshake or holding a connection pool's lock at that moment would leave the
worker with a lock nobody releases.  Started once the embedded Redis (if any) is up, with the
master's environment (so the same ``LAYERLOCK_*`` settings and Redis URL); a watcher thread
restarts it when it dies (not when it exits 0: it does so on SIGTERM, e.g. from a ``kill`` of
the whole process group, and must not be brought back then); stopped in ``on_exit``.  The child
also exits by itself when its master is gone (``LAYERLOCK_BACKGROUND_PARENT``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

from layerlock.license_server.embedded_redis import _install_fork_guard, _spawn_lock
from layerlock.license_server.webhooks import PARENT_ENV

POLL_S = 0.5
#: Restarts back off from 1 s, doubling to this.
MAX_BACKOFF_S = 30.0


class Background:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> int:
        _install_fork_guard()
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        with _spawn_lock:  # no worker fork while Popen's exec-status pipe is open (embedded_redis.py)
            self.proc = subprocess.Popen([sys.executable, "-m", "layerlock.license_server.webhooks"], env=env,
                                         stdin=subprocess.DEVNULL)
        return self.proc.pid

    def supervise(self, log: Any) -> None:
        self._watcher = threading.Thread(target=self._watch, args=(log,), name="background-watcher", daemon=True)
        self._watcher.start()

    def _watch(self, log: Any) -> None:
        backoff = 1.0
        while not self._stopping.wait(POLL_S):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            if proc.returncode == 0:
                log.info("background worker (pid %s) exited; not restarting it", proc.pid)
                return
            log.error("background worker (pid %s) died (exit %s); restarting it in %.0f s", proc.pid,
                      proc.returncode, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(MAX_BACKOFF_S, backoff * 2)
            log.warning("background worker restarted (pid %s)", self.start())

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
