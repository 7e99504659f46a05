"""The sidecar's wire format: length-prefixed JSON frames over a Unix stream socket.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (an object).
Simple enough for a C++ or Go inference server to speak in a page of code (see PROTOCOL.md),
strict enough that a malformed or oversized frame is detected before anything is allocated:
request frames are capped at :data:`MAX_FRAME` bytes, streamed model data at :data:`MAX_CHUNK`.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import struct
from typing import Any

from layerlock.shared.errors import ProtocolError

MAX_FRAME = 64 * 1024
MAX_CHUNK = 1 << 20
_LEN = struct.Struct(">I")
VERSION = 1


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("frame is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame must hold a JSON object")
    return obj


def recv_exact(sock: socket.socket, n: int, *, eof_ok: bool = False) -> bytes | None:
    """Exactly ``n`` bytes; ``None`` on a clean EOF before the first byte when ``eof_ok``."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0 and eof_ok:
                return None
            raise ProtocolError(f"connection closed mid-frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, *, max_size: int = MAX_FRAME) -> dict[str, Any] | None:
    """One frame, or ``None`` when the peer closed cleanly between frames."""
    head = recv_exact(sock, 4, eof_ok=True)
    if head is None:
        return None
    (length,) = _LEN.unpack(head)
    if length > max_size:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_size}-byte limit")
    body = recv_exact(sock, length)
    assert body is not None
    return decode_body(body)


def send_frame(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(obj)
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def recv_frame_with_fds(sock: socket.socket, *, max_fds: int = 1,
                        max_size: int = MAX_FRAME) -> tuple[dict[str, Any] | None, list[int]]:
    """A frame plus any descriptors passed with its first bytes (SCM_RIGHTS).

    The sender attaches descriptors to the ``sendmsg`` carrying the frame's header, so reading the
    4 header bytes with ``recvmsg`` collects them.  Descriptors arriving with a bad frame are
    closed, never leaked.
    """
    fds: list[int] = []
    fds_size = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
    msg, ancdata, flags, _ = sock.recvmsg(4, fds_size)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many descriptors passed with a frame")
        if not msg:
            return None, fds
        if len(msg) < 4:
            rest = recv_exact(sock, 4 - len(msg))
            assert rest is not None
            msg += rest
        (length,) = _LEN.unpack(msg)
        if length > max_size:
            raise ProtocolError(f"frame of {length} bytes exceeds the {max_size}-byte limit")
        body = recv_exact(sock, length)
        assert body is not None
        return decode_body(body), fds
    except BaseException:
        for fd in fds:
            _close(fd)
        raise


def send_chunk(sock: socket.socket, data: bytes | memoryview) -> None:
    sock.sendall(_LEN.pack(len(data)))
    if len(data):
        sock.sendall(data)


def recv_stream_into(sock: socket.socket, out: memoryview) -> int:
    """Receive data chunks (each ≤ MAX_CHUNK) into ``out`` until the zero-length terminator."""
    got = 0
    while True:
        head = recv_exact(sock, 4)
        assert head is not None
        (length,) = _LEN.unpack(head)
        if length == 0:
            return got
        if length > MAX_CHUNK or got + length > len(out):
            raise ProtocolError("streamed chunk is larger than announced")
        view = out[got:got + length]
        filled = 0
        while filled < length:
            k = sock.recv_into(view[filled:])
            if k == 0:
                raise ProtocolError("connection closed mid-stream")
            filled += k
        got += length


def refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


def _close(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
