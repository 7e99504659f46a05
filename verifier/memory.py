"""An unlocked model held in a sealed memfd: in memory only, read-only for everyone but us.

Design (see PROTOCOL.md, "Dropping a model"): the restored bytes are written into a memfd, the
daemon maps it shared and writable *once*, then seals it with ``F_SEAL_FUTURE_WRITE |
F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL``.  From then on nobody can write it (``write()``, a new
writable shared mapping, and reopening ``/proc/<pid>/fd/N`` read-write all fail with EPERM) —
except through the daemon's own pre-existing mapping.  That one mapping is what lets a drop
*zero* the pages every client maps, which plain ``F_SEAL_WRITE`` would forbid (it refuses to be
set while a writable mapping exists, and then nothing can zero the pages at all).  Kernels older
than 5.1 lack ``F_SEAL_FUTURE_WRITE``: we fall back to ``F_SEAL_WRITE``, and a drop then only
closes our descriptor (clients keep what they mapped until they close it); the log says so.

Clients receive a fresh ``O_RDONLY`` descriptor per ``get`` and map the same pages: no copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import threading
from collections.abc import Callable
from typing import BinaryIO

from verifier.errors import ModelUnavailable

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
_BASE_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_ZERO = bytes(1 << 20)


def _mlock(mapping: mmap.mmap) -> bool:
    """Best effort: pin the pages so the unlocked model never reaches swap (needs RLIMIT_MEMLOCK)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        anchor = ctypes.c_char.from_buffer(mapping)
        try:
            rc = libc.mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(mapping)))
            return bool(rc == 0)
        finally:
            del anchor
    except (OSError, AttributeError, TypeError, ValueError):
        return False


class SealedModel:
    """One unlocked model: a sealed memfd plus the daemon's single writable mapping."""

    def __init__(self, name: str, fmt: str, fill: Callable[[BinaryIO], object]) -> None:
        """Create the memfd, let ``fill`` write the model into it, then map and seal it."""
        self.name = name
        self.format = fmt
        self._lock = threading.Lock()
        self._dropped = False
        self._fd = os.memfd_create(f"layerlock:{name}", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        self._map: mmap.mmap | None = None
        self.locked_in_ram = False
        try:
            with os.fdopen(os.dup(self._fd), "r+b") as fh:
                fill(fh)
            self.size = os.fstat(self._fd).st_size
            if self.size:
                self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                if hasattr(mmap, "MADV_DONTDUMP"):
                    self._map.madvise(mmap.MADV_DONTDUMP)  # never in a core dump
                self.locked_in_ram = _mlock(self._map)
            self.zeroable = self._seal()
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_bytes(cls, name: str, fmt: str, data: bytes) -> SealedModel:
        return cls(name, fmt, lambda fh: fh.write(data))

    def _seal(self) -> bool:
        try:
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | _BASE_SEALS)
            return True
        except OSError:
            # Old kernel: F_SEAL_WRITE needs every writable mapping gone first.
            if self._map is not None:
                self._map.close()
                self._map = None
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | _BASE_SEALS)
            return False

    @property
    def dropped(self) -> bool:
        return self._dropped

    def open_readonly(self) -> int:
        """A new O_RDONLY descriptor on the memfd for one client; the caller closes it."""
        with self._lock:
            if self._dropped:
                raise ModelUnavailable("dropped", f"model {self.name} has been dropped")
            try:
                return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return os.dup(self._fd)  # /proc hidden: the seals still forbid writes

    def view(self) -> memoryview:
        """Read-only view of the bytes, for streaming (valid until :meth:`drop`)."""
        if self._map is None:
            return memoryview(os.pread(self._fd, self.size, 0)) if self.size else memoryview(b"")
        return memoryview(self._map).toreadonly()

    def drop(self) -> None:
        """Zero the pages (through our writable mapping, so clients' maps see zeros) and release."""
        with self._lock:
            if self._dropped:
                return
            self._dropped = True
            if self._map is not None:
                try:
                    view = memoryview(self._map)
                    for off in range(0, self.size, len(_ZERO)):
                        n = min(len(_ZERO), self.size - off)
                        view[off:off + n] = _ZERO[:n]
                    view.release()
                except (BufferError, ValueError):
                    pass
            self._release()

    def _release(self) -> None:
        if self._map is not None:
            # A stream in flight may still hold a view; the GC closes the map after it.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
