"""Restore: the original model bytes from a locked file, its bundle and the data key.

Restore is "copy the locked file, write the real bytes back": one sequential pass over the
locked file in which bytes outside the locked tensors are copied, the decoy ranges are read
only to be authenticated, and the real bytes are decrypted chunk by chunk
(:class:`layerlock.shared.chunks.ChunkOpener`) straight into the output.  Every byte of the locked file
goes through the GMAC (:class:`layerlock.shared.chunks.LockedMac`), so a locked file from another protect
run, or an edited one, is refused as :class:`~layerlock.shared.errors.LockedFileMismatch`.

Order of checks: the bundle header is parsed and bounded (:mod:`layerlock.shared.bundle`), then the key
check authenticates it under the data key -- before any size from it is used to allocate --
then the locked file's size must equal the header's.  Memory stays at the output plus a few
chunk-sized buffers.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from layerlock.shared.bundle import CHECK, BundleHeader, BundleReader
from layerlock.shared.chunks import ChunkOpener, LockedMac, check_data_key, key_matches, subkeys
from layerlock.shared.errors import BundleIntegrityError, LockedFileMismatch, LockError

_RESTORE_BLOCK = 4 << 20  # kept bytes are copied in blocks of this size ...
_POOL = 3  # ... through this many buffers (and as many chunk buffers)


def restore(locked_path: Path, bundle: Path | bytes, data_key: bytes) -> bytes:
    """The original model bytes, bit-exact; every check passes before anything is returned.

    The result is assembled in place: kept bytes are read from the locked file straight into it
    and whole chunks are decrypted straight into it, so peak memory is the model plus a chunk.
    """
    with _restorer(locked_path, bundle, data_key) as job:
        # bytes(n) is calloc'ed (untouched); once only the BytesIO holds it, getbuffer() lends it
        # out writable without a copy, and getvalue() hands it back without one.
        buf = io.BytesIO(bytes(job.hdr.locked_size))
        with buf.getbuffer() as view:
            _advise_hugepages(view)
            job.run(_ViewSink(view))
        return buf.getvalue()


def restore_to(locked_path: Path, bundle: Path | bytes, data_key: bytes, out: BinaryIO) -> int:
    """Write the original model bytes to the seekable ``out`` at its position; returns bytes written.

    One sequential pass: bytes outside the locked tensors are copied from the locked file, locked
    ranges are decrypted chunk by chunk, and the whole locked file is authenticated on the way --
    so memory stays at the output plus a few chunk-sized buffers, and ``out`` (the verifier's
    memfd, a file, an ``io.BytesIO``) only ever sees sequential writes, made on a helper thread.
    On any failure ``out`` is truncated back to where it started and a LockError is raised.
    """
    with _restorer(locked_path, bundle, data_key) as job:
        start = out.tell()
        try:
            job.run(_Writer(out, max(min(_RESTORE_BLOCK, job.hdr.locked_size), job.hdr.chunk_size)))
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                out.seek(start)
                out.truncate(start)
            raise
        return job.hdr.locked_size


@contextlib.contextmanager
def _restorer(locked_path: Path, bundle: Path | bytes, data_key: bytes) -> Iterator[_Restorer]:
    """Open the bundle, check the key against it, open the locked file and check its size."""
    key = check_data_key(data_key)
    with BundleReader(bundle) as reader:
        hdr = reader.header
        enc_key, check_key, mac_key = subkeys(key, hdr.salt)
        if not key_matches(check_key, hdr.digest, reader.read(hdr.header_size, CHECK)):
            raise BundleIntegrityError(f"bundle for model {hdr.model_id}: the data key does not match "
                                       "(wrong key, or the header was tampered with)")
        locked_path = Path(locked_path)
        try:
            fh = locked_path.open("rb", buffering=0)
        except OSError as exc:
            raise LockedFileMismatch(f"cannot read locked file {locked_path}: {exc.strerror}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != hdr.locked_size:
                raise LockedFileMismatch(f"{locked_path.name} is not the locked file of model {hdr.model_id}: "
                                         f"{size} bytes, expected {hdr.locked_size}")
            yield _Restorer(fh, locked_path.name, ChunkOpener(reader, hdr, enc_key), LockedMac(mac_key))


def _advise_hugepages(view: memoryview) -> None:
    """Best effort: back a large output with transparent huge pages (Linux ``madvise``).

    Why: filling fresh memory costs one page fault per 4 KiB page, which on a VM is the largest
    single cost of assembling a model in memory.  numpy asks for huge pages for its arrays, so a
    plain ``safetensors`` load gets them; a restore that did not would lose by that margin alone.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or len(view) < (32 << 20) or view.readonly:
        return
    try:
        import ctypes

        anchor = ctypes.c_char.from_buffer(view)
        addr = ctypes.addressof(anchor)
        del anchor
        huge = 2 << 20
        first, last = (addr + huge - 1) & ~(huge - 1), (addr + len(view)) & ~(huge - 1)
        if last > first:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice))
    except (OSError, AttributeError, TypeError, ValueError):
        pass


class _ViewSink:
    """Output into a preallocated buffer: callers fill ``reserve``d slices of it in place."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def reserve(self, n: int) -> memoryview:
        return self.view[self.pos:self.pos + n]

    def commit(self, part: memoryview) -> None:
        self.pos += len(part)

    def finish(self) -> None:
        pass


class _Writer:
    """Output to a stream, written on a helper thread from a small pool of buffers, in order.

    Why a thread: copying into the output (for a memfd, allocating its pages) is the biggest
    single cost of a restore, and file writes release the GIL; overlapping them with reading,
    authenticating and decrypting is what keeps restore within ~1.3x of a plain load.  After a
    write error the thread keeps draining (returning buffers) so the producer never blocks.
    """

    def __init__(self, out: BinaryIO, block: int) -> None:
        self.out = out
        self.error: BaseException | None = None
        self.pool: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(_POOL):
            self.pool.put(memoryview(bytearray(block)))
        self.queue: queue.SimpleQueue[tuple[memoryview, memoryview] | None] = queue.SimpleQueue()
        self.current: memoryview | None = None  # the buffer being filled ...
        self.fill = 0  # ... up to here: small pieces (runs of a partial lock) share one hand-off
        self.thread = threading.Thread(target=self._loop, name="layerlock-restore-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            part, buf = item
            if self.error is None:
                try:
                    _write(self.out, part)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the producer
                    self.error = exc
            self.pool.put(buf)

    def reserve(self, n: int) -> memoryview:
        if self.error is not None:
            raise self.error
        if self.current is None or self.fill + n > len(self.current):
            self._hand_off()
            self.current, self.fill = self.pool.get(), 0
        return self.current[self.fill:self.fill + n]

    def commit(self, part: memoryview) -> None:
        self.fill += len(part)
        if self.current is not None and self.fill == len(self.current):
            self._hand_off()

    def _hand_off(self) -> None:
        """Queue what the current buffer holds for writing (the thread returns it to the pool)."""
        if self.current is not None:
            if self.fill:
                self.queue.put((self.current[:self.fill], self.current))
            else:
                self.pool.put(self.current)
        self.current, self.fill = None, 0

    def finish(self) -> None:
        self._hand_off()
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Restorer:
    """One restore pass over the locked file, in order, producing the original bytes into a sink."""

    def __init__(self, fh: io.FileIO, name: str, chunks: ChunkOpener, mac: LockedMac) -> None:
        self.fh, self.name, self.chunks, self.mac = fh, name, chunks, mac
        self.hdr: BundleHeader = chunks.hdr
        self.block = min(_RESTORE_BLOCK, max(self.hdr.locked_size, 1))
        self.scratch = memoryview(bytearray(self.block))  # decoys: read to authenticate, never output
        self.spill = memoryview(bytearray(0))  # a chunk that straddles tensors is decrypted here ...
        self.pending = self.spill  # ... and this part of it is not yet output

    def run(self, sink: _ViewSink | _Writer) -> None:
        done = False
        try:
            pos = 0
            for offset, length in self.hdr.spans():  # whole tensors, or runs of them (version 2)
                self._kept(sink, pos, offset - pos)
                self._kept(None, offset, length)
                self._real(sink, length)
                pos = offset + length
            self._kept(sink, pos, self.hdr.locked_size - pos)
            if self.hdr.plain_size == 0:  # nothing but empty tensors: still authenticate the one chunk
                self.chunks.open_into(memoryview(bytearray(0)))
            if not self.chunks.done or len(self.pending):
                raise BundleIntegrityError(f"bundle for model {self.hdr.model_id}: chunks left over")
            if not self.mac.matches(self.hdr.locked_mac):
                raise LockedFileMismatch(f"{self.name} is not the locked file of model {self.hdr.model_id} "
                                         "(content differs: another protect run, or modified)")
            done = True
        finally:
            if done:
                sink.finish()
            else:
                with contextlib.suppress(BaseException):
                    sink.finish()

    def _kept(self, sink: _ViewSink | _Writer | None, offset: int, length: int) -> None:
        """Locked-file bytes, authenticated; output unless they are decoys (``sink`` is None)."""
        self.fh.seek(offset)
        while length:
            n = min(self.block, length)
            part = sink.reserve(n) if sink is not None else self.scratch[:n]
            got = 0
            while got < n:
                r = self.fh.readinto(part[got:])
                if not r:
                    raise LockedFileMismatch(f"{self.name} changed size while being read")
                got += r
            self.mac.update(part)
            if sink is not None:
                sink.commit(part)
            length -= n

    def _real(self, sink: _ViewSink | _Writer, length: int) -> None:
        """Output the next ``length`` decrypted bytes (a tensor's real values)."""
        while length:
            if not len(self.pending):
                n = self.chunks.next_len()
                if n <= length:  # the whole chunk belongs to this tensor: decrypt it in place
                    dest = sink.reserve(n)
                    self.chunks.open_into(dest)
                    sink.commit(dest)
                    length -= n
                    continue
                if len(self.spill) < n:
                    self.spill = memoryview(bytearray(self.hdr.chunk_size))
                self.chunks.open_into(self.spill[:n])
                self.pending = self.spill[:n]
            take = min(len(self.pending), length)
            dest = sink.reserve(take)
            dest[:] = self.pending[:take]
            sink.commit(dest)
            self.pending = self.pending[take:]
            length -= take


def _write(out: BinaryIO, data: memoryview) -> None:
    """``out.write`` until all is written: raw (unbuffered) files may write less than asked."""
    while len(data):
        n = out.write(data)
        if n is None or n >= len(data):
            return
        data = data[n:]


def write_fingerprint(out: BinaryIO, start: int, header: BundleHeader, values: bytes) -> None:
    """Write a license's fingerprint values over the decoys at the bundle's fingerprint positions
    of the model just restored to ``out`` from ``start`` (runs of adjacent positions in one write).

    ``values`` must be exactly ``header.fingerprint_bytes`` long (the caller checks it against
    the token).  ``out`` is left positioned at the end of the model."""
    if len(values) != header.fingerprint_bytes:
        raise LockError(f"fingerprint values are {len(values)} bytes; the bundle needs {header.fingerprint_bytes}")
    end = out.tell()
    pos = 0
    for offset, item, idx in header.fingerprint_sites():
        i = 0
        while i < len(idx):
            j = i + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            out.seek(start + offset + idx[i] * item)
            _write(out, memoryview(values)[pos + i * item:pos + j * item])
            i = j
        pos += len(idx) * item
    out.seek(end)
