"""The sealed memfd: nobody but the daemon can write it, and a drop zeroes what clients map."""

from __future__ import annotations

import mmap
import os

import pytest

from layerlock.verifier.errors import ModelUnavailable
from layerlock.verifier.memory import SealedModel


def test_sealed_readonly_for_clients():
    model = SealedModel.from_bytes("m", "safetensors", b"secret-weights" * 100)
    fd = model.open_readonly()
    try:
        assert os.pread(fd, 14, 0) == b"secret-weights"
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        # Even reopening read-write through /proc cannot get write access: the seal forbids it.
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(OSError):
                os.pwrite(rw, b"x", 0)
            with pytest.raises(OSError):
                mmap.mmap(rw, model.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(OSError):
                os.ftruncate(rw, 1)
        finally:
            os.close(rw)
    finally:
        os.close(fd)
        model.drop()


def test_drop_zeroes_client_mappings_and_refuses_later_gets():
    data = os.urandom(3 << 20)
    model = SealedModel.from_bytes("m", "safetensors", data)
    assert model.zeroable
    fd = model.open_readonly()
    view = mmap.mmap(fd, model.size, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    assert view[:64] == data[:64]
    model.drop()
    assert view[:] == bytes(len(data))
    view.close()
    with pytest.raises(ModelUnavailable) as err:
        model.open_readonly()
    assert err.value.code == "dropped"


def test_fill_failure_releases_memfd():
    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("restore failed")

    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError):
        SealedModel("m", "safetensors", boom)
    assert len(os.listdir("/proc/self/fd")) == before


def _memlock_allows(size: int) -> bool:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= size + (1 << 20)


def test_pin_is_separate_from_unlock_and_refused_after_drop():
    # The constructor never mlocks (that is the daemon's background step, off the READY path).
    model = SealedModel.from_bytes("m", "safetensors", os.urandom(1 << 20))
    assert not model.locked_in_ram
    pinned = model.pin()
    assert pinned == model.locked_in_ram
    if _memlock_allows(model.size):
        assert pinned
    model.drop()
    assert not model.pin() and not model.locked_in_ram


def test_pin_racing_a_drop_still_zeroes_client_mappings():
    import threading

    data = os.urandom(32 << 20)
    for _ in range(3):
        model = SealedModel.from_bytes("m", "safetensors", data)
        fd = model.open_readonly()
        view = mmap.mmap(fd, model.size, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(fd)
        pinner = threading.Thread(target=model.pin)
        pinner.start()
        model.drop()
        pinner.join(10)
        assert not pinner.is_alive()
        assert view[:4096] == bytes(4096) and view[-4096:] == bytes(4096)
        view.close()
        assert not model.pin()


def test_from_bytes_of_an_empty_model():
    model = SealedModel.from_bytes("m", "safetensors", b"")
    assert model.size == 0 and not model.pin()
    model.drop()


def test_mlock_goes_in_steps_and_stops_when_cancelled():
    from layerlock.verifier.memory import _mlock

    model = SealedModel.from_bytes("m", "safetensors", os.urandom(8 << 20))
    try:
        calls = []

        def cancelled():
            calls.append(1)
            return len(calls) > 3

        assert not _mlock(model._map, chunk=1 << 20, cancelled=cancelled)
        assert len(calls) == 4  # stopped between steps, not after the whole range
        if _memlock_allows(model.size):
            assert _mlock(model._map, chunk=1 << 20)
    finally:
        model.drop()
