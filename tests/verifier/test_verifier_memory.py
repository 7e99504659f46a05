"""The sealed memfd: nobody but the daemon can write it, and a drop zeroes what clients map."""

from __future__ import annotations

import mmap
import os

import pytest

from verifier.errors import ModelUnavailable
from verifier.memory import SealedModel


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
