"""The sidecar's retry schedule: exponential with jitter and a cap, honouring ``Retry-After``.

:func:`retry_delay` is pure (its random draw is a parameter), so its bounds are checked exactly;
``ServerClient`` is checked against a real license server whose Redis is down (503 +
``Retry-After``); the daemon's use of it with a scripted server, as in test_verifier_daemon.py.
"""

from __future__ import annotations

import email.utils
import random
import time
from types import SimpleNamespace

import pytest
from verifier_helpers import FakeServer, write_config

from layerlock.shared.errors import RetryLater, Unavailable
from layerlock.verifier.activation import MAX_RETRY_AFTER, ServerClient, retry_after
from layerlock.verifier.config import load_config
from layerlock.verifier.daemon import Daemon, retry_delay
from tests.license_server.ls_helpers import new_machine


def test_exponential_from_retry_min_capped_at_retry_max():
    highs = [retry_delay(n, 2, 300, rand=lambda: 1.0) for n in range(1, 12)]
    assert highs == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    lows = [retry_delay(n, 2, 300, rand=lambda: 0.0) for n in range(1, 12)]
    assert lows == [h / 2 for h in highs]  # equal jitter: [half, all]
    assert retry_delay(10_000, 2, 300, rand=lambda: 1.0) == 300  # no overflow however long it lasts


def test_jitter_spreads_a_fleet_that_failed_together():
    rng = random.Random(7)
    delays = [retry_delay(3, 2, 300, rand=rng.random) for _ in range(10_000)]
    assert min(delays) >= 4 and max(delays) <= 8
    buckets = [sum(1 for d in delays if 4 + i * 0.5 <= d < 4.5 + i * 0.5) for i in range(8)]
    assert min(buckets) > 1000  # about uniform over [4, 8): no wave


def test_retry_after_is_a_floor_spread_over_one_to_two_times_it():
    assert retry_delay(1, 2, 300, retry_after=30, rand=lambda: 0.0) == 30
    assert retry_delay(1, 2, 300, retry_after=30, rand=lambda: 1.0) == 60
    rng = random.Random(1)
    delays = [retry_delay(1, 2, 300, retry_after=2, rand=rng.random) for _ in range(1000)]
    assert min(delays) >= 2 and max(delays) <= 4 and max(delays) - min(delays) > 1.5
    # a longer own back-off wins over a short Retry-After
    assert retry_delay(8, 2, 300, retry_after=2, rand=lambda: 1.0) == 256


def test_retry_after_is_capped_by_retry_max_and_by_the_served_token():
    assert retry_delay(1, 2, 300, retry_after=86_400, rand=lambda: 0.5) == 300
    # a model served from a token expiring in 40 s: at most 20 s, whatever the server asked
    assert retry_delay(1, 2, 300, retry_after=3600, until_expiry=40, rand=lambda: 1.0) == 20
    assert retry_delay(9, 2, 300, until_expiry=40, rand=lambda: 1.0) == 20
    assert retry_delay(1, 2, 300, until_expiry=1, rand=lambda: 1.0) == 2  # never below retry_min


@pytest.mark.parametrize("header, seconds", [("2", 2.0), ("0", 0.0), (" 17 ", 17.0), ("", None), (None, None),
                                             ("soon", None), ("-3", None), ("1.5", None), ("١٢", None),
                                             ("99999999999", MAX_RETRY_AFTER)])
def test_retry_after_header_delay_seconds(header, seconds):
    assert retry_after(header) == seconds


def test_retry_after_header_http_date():
    now = time.time()
    assert retry_after(email.utils.formatdate(now + 120, usegmt=True), now=now) == pytest.approx(120, abs=1)
    assert retry_after(email.utils.formatdate(now - 120, usegmt=True), now=now) == 0


def test_server_client_carries_the_servers_retry_after(license_server, redis_server):
    m = new_machine()
    client = ServerClient(license_server.url, timeout=10)
    redis_server.stop()
    with pytest.raises(RetryLater) as err:
        client.activate(m.code, "any-model", SimpleNamespace(sign=m.sk))
    assert err.value.retry_after == 2 and err.value.code == "unavailable"
    assert isinstance(err.value, Unavailable)  # still "the server could not be asked" for the daemon
    license_server.stop()
    with pytest.raises(Unavailable) as err2:  # nobody answered: no Retry-After to honour
        client.activate(m.code, "any-model", SimpleNamespace(sign=m.sk))
    assert not isinstance(err2.value, RetryLater)


class ShedServer(FakeServer):
    """Answers like a shedding server: 503 overloaded, come back in ``wait`` seconds."""

    def __init__(self, machine, wait: float) -> None:
        super().__init__(machine)
        self.wait = wait

    def activate(self, machine, model_id, keys):
        self.calls += 1
        if self.mode == "shed":
            raise RetryLater("license server answered 503 overloaded", self.wait, code="overloaded")
        return super().activate(machine, model_id, keys)


def test_daemon_honours_retry_after_and_keeps_serving_from_the_cached_token(tmp_path, machine, protected):
    path = write_config(tmp_path / "v.toml", machine, [protected])
    path.write_text(path.read_text().replace("retry_max = 1\n", "retry_max = 600\n"))
    cfg = load_config(path)
    server = ShedServer(machine, wait=45)
    server.ttl = 600  # served from a token with 10 min left: the expiry cap (5 min) is not what binds
    first = Daemon(cfg, machine.state, server)
    first.start()
    try:
        assert first.wait_settled(10)
        assert first.slots["model-a"].state == "unlocked"
    finally:
        first.stop()
    # a restart while the server sheds: unlocked from the cached token, next try after >= 45 s
    server.mode = "shed"
    d = Daemon(cfg, machine.state, server)
    d.start()
    try:
        assert d.wait_settled(10)
        slot = d.slots["model-a"]
        assert slot.state == "unlocked" and slot.source == "cache"
        left = slot.renew_at - time.time()
        assert 45 - 5 <= left <= 90, left  # [Retry-After, 2 x Retry-After], less the time spent here
    finally:
        d.stop()
