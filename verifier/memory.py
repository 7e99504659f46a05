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

Cost on the unlock path: the restore writes straight into the memfd (one sequential pass of
``write(2)`` on an unbuffered descriptor; no copy of the whole model is ever held elsewhere),
then mapping, ``MADV_DONTDUMP`` and sealing are O(1).  Pinning (``mlock``) has to fault every
page into our mapping -- about a tenth of a second per GiB -- so it is *not* done here but by
:meth:`SealedModel.pin`, which the daemon runs in the background once the model is served, in
16 MiB steps so that it never stalls the rest of the process (see :func:`_mlock`).  The
trade-off: until ``pin`` returns the pages could in principle be swapped out, exactly as they
could during the restore itself (the restore writes through ``write(2)``, not through a locked
mapping).  ``mlock2(MLOCK_ONFAULT)`` would be instant but pins nothing: it only locks pages as
*our* mapping faults them in, and the daemon never touches them (clients fault their own).
Hosts without swap lose nothing; for the others the window is the restore plus ~0.1 s/GiB.
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

from layerlock.verifier.errors import ModelUnavailable

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
_BASE_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_ZERO = bytes(1 << 20)
_PIN_CHUNK = 16 << 20


def _mlock(mapping: mmap.mmap, chunk: int = _PIN_CHUNK, cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Best effort: pin the pages so the unlocked model never reaches swap (needs RLIMIT_MEMLOCK).

    In ``chunk``-sized steps: one ``mlock`` of the whole model holds our mm's lock while it faults
    every page in (~0.1 s/GiB), and every ``mmap`` in the process -- a thread's stack, a Python
    arena, a client's connection thread -- would wait for it.  Steps of 16 MiB bound that wait to
    a few milliseconds for the same total cost.  ``cancelled()`` (a drop) stops it between steps.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        anchor = ctypes.c_char.from_buffer(mapping)  # keeps the mapping alive while we lock it
        try:
            base, size = ctypes.addressof(anchor), len(mapping)
            for off in range(0, size, chunk):
                if cancelled() or libc.mlock(ctypes.c_void_p(base + off), ctypes.c_size_t(min(chunk, size - off))) != 0:
                    return False
            return True
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
            # Unbuffered: every write goes straight from the restorer's buffer into the memfd.
            with os.fdopen(os.dup(self._fd), "r+b", buffering=0) as fh:
                fill(fh)
            self.size = os.fstat(self._fd).st_size
            if self.size:
                self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                if hasattr(mmap, "MADV_DONTDUMP"):
                    self._map.madvise(mmap.MADV_DONTDUMP)  # never in a core dump
            self.zeroable = self._seal()
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_bytes(cls, name: str, fmt: str, data: bytes) -> SealedModel:
        def fill(fh: BinaryIO) -> None:
            view = memoryview(data)
            while len(view):  # a raw write may be short
                view = view[fh.write(view) or 0:]

        return cls(name, fmt, fill)

    def pin(self) -> bool:
        """``mlock`` the pages (best effort, needs RLIMIT_MEMLOCK >= size); True if pinned.

        Safe to run on a background thread while clients are served: it does not take the lock
        that ``open_readonly`` needs, and a concurrent :meth:`drop` still zeroes the pages (the
        mapping is unmapped once this returns).
        """
        with self._lock:
            mapping = None if self._dropped else self._map
        if mapping is None:
            return False
        pinned = _mlock(mapping, cancelled=lambda: self._dropped)  # False if dropped meanwhile
        with self._lock:
            self.locked_in_ram = pinned and not self._dropped
        return self.locked_in_ram

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
        self.locked_in_ram = False
        if self._map is not None:
            # A stream in flight may still hold a view; the GC closes the map after it.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
