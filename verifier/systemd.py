"""sd_notify without libsystemd: the datagram protocol is one ``sendto`` of ``KEY=VALUE`` lines.

``$NOTIFY_SOCKET`` names a Unix datagram socket, either a path or an abstract address written
with a leading ``@``.  ``READY=1`` tells systemd (Type=notify) that start-up is over;
``WATCHDOG=1`` must arrive more often than ``$WATCHDOG_USEC`` or systemd restarts us; ``STATUS=``
is what ``systemctl status`` shows.  Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    return addr


def notify(*lines: str) -> bool:
    """Send one notification; True if it was delivered to systemd."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is on and meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def start_watchdog(healthy: Callable[[], bool], stop: threading.Event) -> threading.Thread | None:
    """Ping ``WATCHDOG=1`` at half the interval while ``healthy()``; a hung daemon gets restarted."""
    interval = watchdog_interval()
    if interval is None:
        return None

    def loop() -> None:
        while not stop.wait(interval):
            if healthy():
                notify("WATCHDOG=1")

    thread = threading.Thread(target=loop, name="watchdog", daemon=True)
    thread.start()
    return thread
