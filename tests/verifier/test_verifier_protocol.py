"""Frames: round trip, and every malformed shape rejected as ProtocolError before allocation."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from layerlock.shared.errors import ProtocolError
from layerlock.verifier import protocol


@pytest.fixture()
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_round_trip(pair):
    a, b = pair
    protocol.send_frame(a, {"op": "get", "model": "m"})
    assert protocol.recv_frame(b) == {"op": "get", "model": "m"}


def test_clean_eof_between_frames_is_none(pair):
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert protocol.recv_frame(b) is None


@pytest.mark.parametrize("raw, match", [
    (struct.pack(">I", protocol.MAX_FRAME + 1), "exceeds"),
    (struct.pack(">I", 10) + b"{}", "closed mid-frame"),
    (b"\x00\x00", "closed mid-frame"),
    (struct.pack(">I", 3) + b"\xff\xfe\xfd", "not UTF-8 JSON"),
    (struct.pack(">I", 2) + b"[]", "JSON object"),
])
def test_malformed_frames(pair, raw, match):
    a, b = pair
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match=match):
        protocol.recv_frame(b)


def test_encode_refuses_oversized():
    with pytest.raises(ProtocolError):
        protocol.encode({"x": "a" * protocol.MAX_FRAME})


def test_fd_passing(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        protocol.send_frame(a, {"ok": True}, [r])
        frame, fds = protocol.recv_frame_with_fds(b)
        assert frame == {"ok": True} and len(fds) == 1
        os.write(w, b"hi")
        assert os.read(fds[0], 2) == b"hi"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_stream_round_trip(pair):
    a, b = pair
    data = os.urandom(3 * protocol.MAX_CHUNK // 2)
    import threading

    def send():
        for off in range(0, len(data), protocol.MAX_CHUNK):
            protocol.send_chunk(a, data[off:off + protocol.MAX_CHUNK])
        protocol.send_chunk(a, b"")

    t = threading.Thread(target=send)
    t.start()
    out = bytearray(len(data))
    assert protocol.recv_stream_into(b, memoryview(out)) == len(data)
    t.join()
    assert bytes(out) == data
