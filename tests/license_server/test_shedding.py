"""Load shedding: requests that waited too long for a gunicorn thread get 503 ``overloaded`` +
``Retry-After`` at once, unread by the app — so they change nothing — and probes are never shed.

A real gunicorn with one worker and one thread (``LAYERLOCK_SHED_QUEUE_MS=100``).  The thread is
held by a request whose body the test sends in two halves (the app waits for the rest); the
requests that queue meanwhile wait well over 100 ms, so each is shed, deterministically.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
from ls_helpers import new_machine

from layerlock.license_server.store import machines
from layerlock.license_server.store.audit import STREAM
from layerlock.shared.errors import RetryLater
from layerlock.verifier.activation import ServerClient
from tests.conftest import LicenseServer


@pytest.fixture
def one_thread(tmp_path, redis_server):
    srv = LicenseServer(tmp_path / "server", redis_server.url, workers=1,
                        env={"LAYERLOCK_THREADS": "1", "LAYERLOCK_SHED_QUEUE_MS": "100"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _hold_the_thread(server: LicenseServer, body: bytes) -> socket.socket:
    """POST /v1/machines with only the first half of its body sent: the one thread waits for the rest."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/machines HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + server.admin_key.encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                 + body[: len(body) // 2])
    return sock


def test_queued_requests_are_shed_with_retry_after_and_change_nothing(one_thread, redis_server):
    r = redis_server.client()
    records = r.xlen(STREAM)
    held_machine = new_machine()
    body = json.dumps({"enrollment": held_machine.enrollment}).encode()
    sock = _hold_the_thread(one_thread, body)
    time.sleep(2.0)  # the thread has taken it and is reading its body

    queued = [new_machine() for _ in range(6)]
    started = threading.Event()

    def post(m):
        started.set()
        return one_thread.api("POST", "/v1/machines", {"enrollment": m.enrollment}, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(post, m) for m in queued]
        health = pool.submit(lambda: requests.get(one_thread.url + "/healthz", timeout=30))
        client = ServerClient(one_thread.url, timeout=30)
        activation = pool.submit(client.activate, queued[0].code, "some-model", SimpleNamespace(sign=queued[0].sk))
        started.wait(5)
        time.sleep(2.0)  # they are all queued behind the held request now
        sock.sendall(body[len(body) // 2:])
        held = sock.recv(65536)
        sock.close()
        results = [a.result() for a in answers]
        assert health.result().status_code == 200  # probes are never shed
        with pytest.raises(RetryLater) as shed:
            activation.result()

    assert held.startswith(b"HTTP/1.1 201"), held[:200]
    assert r.exists(machines.key(held_machine.code))
    for m, resp in zip(queued, results, strict=True):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "overloaded" and resp.headers["Retry-After"] == "2", resp.text
        assert not r.exists(machines.key(m.code))  # shed before the app: nothing written
    # the sidecar's client reads the shed answer as "come back after Retry-After"
    assert shed.value.code == "overloaded" and shed.value.retry_after == 2
    assert r.xlen(STREAM) == records + 1  # only the held request's record

    # not overloaded any more: served as usual
    resp = one_thread.api("POST", "/v1/machines", {"enrollment": queued[0].enrollment})
    assert resp.status_code == 201, resp.text
