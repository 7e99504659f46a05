"""The Unix socket server: peer credentials, one thread per connection, strict framing.

Why threads: each connection is independent and mostly blocked in ``recv``/``sendmsg``; a
per-connection thread with a socket timeout means a slow or silent client only ever stalls its
own thread, and a cap on concurrent connections bounds what a flood can cost.  A malformed,
oversized or truncated frame closes that connection and nothing else.

Two caps: all peers together (``max_clients``, answer ``busy``) and per peer uid
(``max_per_uid``, answer ``too_many_connections``), so one allowed uid holding idle connections
cannot take every slot.  Both are checked in the accept loop, before any thread is started.

Who can ``connect`` at all is the socket file's business (owner root or the daemon, group
``group``, mode 0660); who is *served* is the SO_PEERCRED allow-list.  A peer allowed only by
its gid must therefore also be able to open the socket: hence ``socket_group``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from layerlock.shared.errors import LayerlockError, ProtocolError
from layerlock.verifier import protocol
from layerlock.verifier.config import DEFAULT_MAX_CONNECTIONS_PER_UID, MAX_CONNECTIONS, Config
from layerlock.verifier.log import log
from layerlock.verifier.memory import SealedModel

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class Backend(Protocol):
    """What the server serves; the daemon implements it (tests use a fake)."""

    def list_models(self) -> list[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def model(self, model_id: str) -> SealedModel:
        """The unlocked model, or raise ModelUnavailable with the reason."""
        ...


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Peer(pid, uid, gid)


class SocketServer:
    def __init__(self, path: Path, backend: Backend, *, allowed_uids: set[int], allowed_gids: set[int],
                 mode: int = 0o660, group: int | None = None, timeout: float = 10.0,
                 max_clients: int = MAX_CONNECTIONS,
                 max_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID) -> None:
        self.path = Path(path)
        self.backend = backend
        self.allowed_uids = set(allowed_uids)
        self.allowed_gids = set(allowed_gids)
        self.mode = mode
        self.group = group
        self.timeout = timeout
        self.max_per_uid = max_per_uid
        self._slots = threading.BoundedSemaphore(max_clients)
        self._per_uid: dict[int, int] = {}  # open connections per peer uid
        self._per_uid_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def from_config(cls, config: Config, backend: Backend) -> SocketServer:
        return cls(config.socket, backend, allowed_uids=set(config.allowed_uids),
                   allowed_gids=set(config.allowed_gids), group=config.socket_group,
                   timeout=config.client_timeout, max_per_uid=config.max_connections_per_uid)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # no window where the socket is connectable by everyone
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        try:
            self._set_owner()
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()
        st = self.path.stat()
        log("socket_listening", path=str(self.path), mode=f"{self.mode:o}", uid=st.st_uid, gid=st.st_gid,
            max_connections_per_uid=self.max_per_uid)
        self._warn_unreachable(st.st_gid)

    def _set_owner(self) -> None:
        """Group first, then the mode: the socket is 0600 until it has its final group."""
        if self.group is not None:
            try:
                os.chown(self.path, -1, self.group)
            except OSError as exc:
                raise LayerlockError(
                    f"socket_group: cannot give {self.path} to gid {self.group} ({exc.strerror}): the daemon "
                    "must be a member of that group (systemd: SupplementaryGroups=) or hold CAP_CHOWN",
                    code="config_error") from None
        os.chmod(self.path, self.mode)

    def _warn_unreachable(self, socket_gid: int) -> None:
        """Log what the socket's permissions will stop before the allow-list is even consulted."""
        others = sorted(g for g in self.allowed_gids if g != socket_gid)
        if others and not self.mode & 0o002:
            log("allowed_gids_unreachable", level="warning", gids=others, socket_gid=socket_gid,
                hint="peers allowed only by these gids get EACCES at connect() unless they are members "
                     "of the socket's group: set socket_group")
        if self.group is None:
            return
        parent = self.path.parent.stat()
        if not (parent.st_mode & 0o001 or (parent.st_gid == socket_gid and parent.st_mode & 0o010)):
            log("socket_dir_not_traversable", level="warning", path=str(self.path.parent),
                mode=f"{stat.S_IMODE(parent.st_mode):o}", gid=parent.st_gid,
                hint="members of the socket's group cannot reach the socket: make the directory "
                     "o+x, or g+x with the socket's group")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _remove_stale(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise LayerlockError(f"{self.path} exists and is not a socket; refusing to replace it",
                                 code="config_error")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # nobody listens: a leftover from a crash
            return
        finally:
            probe.close()
        raise LayerlockError(f"another daemon is listening on {self.path}", code="config_error")

    # --- connections ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: don't spin, the slots free up as clients leave
                continue
            try:
                peer = peer_of(conn)
            except OSError:
                conn.close()
                continue
            if not self._claim(peer.uid):
                log("connection_refused", level="warning", reason="too_many_connections", pid=peer.pid,
                    uid=peer.uid, gid=peer.gid, limit=self.max_per_uid)
                self._reply_and_close(conn, protocol.refusal(
                    "too_many_connections", f"uid {peer.uid} already has {self.max_per_uid} open connections to "
                    "the sidecar (max_connections_per_uid); close one and retry"))
                continue
            if not self._slots.acquire(blocking=False):
                self._unclaim(peer.uid)
                self._reply_and_close(conn, protocol.refusal("busy", "too many connections"))
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, peer), name="conn", daemon=True).start()
            except RuntimeError:  # no thread to be had: give the slots back, not leak them
                self._slots.release()
                self._unclaim(peer.uid)
                self._reply_and_close(conn, protocol.refusal("busy", "too many connections"))

    def _claim(self, uid: int) -> bool:
        with self._per_uid_lock:
            held = self._per_uid.get(uid, 0)
            if held >= self.max_per_uid:
                return False
            self._per_uid[uid] = held + 1
            return True

    def _unclaim(self, uid: int) -> None:
        with self._per_uid_lock:
            held = self._per_uid.pop(uid, 0) - 1
            if held > 0:
                self._per_uid[uid] = held

    def _reply_and_close(self, conn: socket.socket, frame: dict[str, Any]) -> None:
        try:
            conn.settimeout(1.0)
            protocol.send_frame(conn, frame)
        except OSError:
            pass
        finally:
            conn.close()

    def allowed(self, peer: Peer) -> bool:
        return peer.uid in self.allowed_uids or peer.gid in self.allowed_gids

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        try:
            conn.settimeout(self.timeout)
            if not self.allowed(peer):
                log("peer_refused", level="warning", audit=True, pid=peer.pid, uid=peer.uid, gid=peer.gid)
                protocol.send_frame(conn, protocol.refusal(
                    "peer_not_allowed", f"uid {peer.uid} / gid {peer.gid} is not on the sidecar's allow-list"))
                return
            while not self._stopping.is_set():
                request = protocol.recv_frame(conn)
                if request is None:
                    return
                self._dispatch(conn, peer, request)
        except ProtocolError as exc:
            log("connection_closed", level="warning", reason="protocol_error", detail=exc.message)
        except TimeoutError:
            log("connection_closed", level="warning", reason="timeout")
        except OSError as exc:
            log("connection_closed", level="warning", reason="io_error", detail=type(exc).__name__)
        finally:
            conn.close()
            self._slots.release()
            self._unclaim(peer.uid)

    def _dispatch(self, conn: socket.socket, peer: Peer, request: dict[str, Any]) -> None:
        op = request.get("op")
        handler: Callable[[], dict[str, Any]]
        if op == "list":
            handler = lambda: {"ok": True, "models": self.backend.list_models()}  # noqa: E731
        elif op == "status":
            handler = lambda: {"ok": True, **self.backend.status()}  # noqa: E731
        elif op == "get":
            self._get(conn, peer, request)
            return
        else:
            raise ProtocolError(f"unknown op {str(op)[:32]!r}")
        protocol.send_frame(conn, handler())

    def _get(self, conn: socket.socket, peer: Peer, request: dict[str, Any]) -> None:
        model_id = request.get("model")
        transfer = request.get("transfer", "fd")
        if not isinstance(model_id, str) or transfer not in ("fd", "stream"):
            raise ProtocolError("get needs a string 'model' and transfer 'fd' or 'stream'")
        try:
            model = self.backend.model(model_id)
            fd = model.open_readonly()
        except LayerlockError as exc:
            log("get_refused", level="warning", audit=True, model=model_id, uid=peer.uid, pid=peer.pid,
                reason=exc.code)
            protocol.send_frame(conn, protocol.refusal(exc.code, exc.message))
            return
        header = {"ok": True, "model": model_id, "format": model.format, "size": model.size,
                  "transfer": transfer}
        log("get_served", audit=True, model=model_id, uid=peer.uid, pid=peer.pid, transfer=transfer)
        try:
            if transfer == "fd":
                protocol.send_frame(conn, header, [fd])
                return
            protocol.send_frame(conn, header)
            view = model.view()
            try:
                for off in range(0, model.size, protocol.MAX_CHUNK):
                    protocol.send_chunk(conn, view[off:off + protocol.MAX_CHUNK])
            finally:
                view.release()
            protocol.send_chunk(conn, b"")
        finally:
            os.close(fd)
