"""The daemon's lifecycle in-process, against a scripted license server and real restores."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from verifier_helpers import FakeServer, enroll_machine, protect_model, write_config

from layerlock.shared.keys import jwk_thumbprint
from layerlock.shared.tokens import jwks, sign_endorsement
from layerlock.verifier.config import load_config
from layerlock.verifier.daemon import Daemon
from layerlock.verifier.errors import ModelUnavailable
from tests.conftest import wait_for


@pytest.fixture()
def setup(tmp_path, machine, protected):
    cfg = load_config(write_config(tmp_path / "v.toml", machine, [protected]))
    return cfg, machine, protected


_RUNNING: list[Daemon] = []


@pytest.fixture(autouse=True)
def _stop_daemons():
    """Every daemon a test started is stopped after it, whatever the test did."""
    yield
    while _RUNNING:
        _RUNNING.pop().stop()


def start(cfg, machine, server, **kw):
    d = Daemon(cfg, machine.state, server, **kw)
    _RUNNING.append(d)
    d.start()
    assert d.wait_settled(10)
    return d


def read_model(d, model_id="model-a") -> bytes:
    model = d.model(model_id)
    fd = model.open_readonly()
    try:
        return os.pread(fd, model.size, 0)
    finally:
        os.close(fd)


def renew_now(d, model_id="model-a") -> None:
    d.slots[model_id].renew_at = 0
    with d._wake:
        d._wake.notify_all()


def refusal(d, model_id="model-a") -> str:
    with pytest.raises(ModelUnavailable) as err:
        d.model(model_id)
    return err.value.code


def test_unlock_and_cache(setup):
    cfg, machine, protected = setup
    d = start(cfg, machine, FakeServer(machine))
    assert read_model(d) == protected.original.read_bytes()
    st = d.status()["models"][0]
    assert st["state"] == "unlocked" and st["source"] == "server" and st["expires_at"] > time.time()
    cached = machine.state.tokens / "model-a.jwt"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert refusal(d, "nope") == "unknown_model"


def test_renews_at_rna(setup):
    cfg, machine, _ = setup
    server = FakeServer(machine, ttl=3)
    d = start(cfg, machine, server)
    assert wait_for(lambda: server.calls >= 3, timeout=8)
    assert d.status()["models"][0]["state"] == "unlocked"


@pytest.mark.parametrize("reason", ["revoked", "expired", "no_license", "machine_inactive", "unknown_machine"])
def test_denial_drops_at_once(setup, reason):
    cfg, machine, _ = setup
    server = FakeServer(machine, ttl=3)
    d = start(cfg, machine, server)
    model = d.model("model-a")
    server.mode = reason
    renew_now(d)
    assert wait_for(lambda: d.status()["models"][0]["state"] == "refused", timeout=5)
    assert refusal(d) == reason
    assert model.dropped
    assert not (machine.state.tokens / "model-a.jwt").exists()


def test_offline_serves_until_expiry_then_drops(setup):
    cfg, machine, _ = setup
    server = FakeServer(machine, ttl=3)
    d = start(cfg, machine, server)
    exp = d.status()["models"][0]["expires_at"]
    server.mode = "down"
    assert wait_for(lambda: time.time() >= exp - 1.0, timeout=5)
    assert d.model("model-a")  # still serving inside the offline grace
    assert wait_for(lambda: d.status()["models"][0]["state"] == "refused", timeout=5)
    assert refusal(d) == "token_expired"
    server.mode = "ok"  # the server comes back: the model heals
    assert wait_for(lambda: d.status()["models"][0]["state"] == "unlocked", timeout=5)


def test_transient_denial_keeps_serving(setup):
    cfg, machine, _ = setup
    server = FakeServer(machine, ttl=30)
    d = start(cfg, machine, server)
    server.mode = "rate_limited"
    renew_now(d)
    assert wait_for(lambda: server.calls >= 2)
    assert d.model("model-a")


def test_restart_offline_unlocks_from_cache(setup):
    cfg, machine, protected = setup
    d = start(cfg, machine, FakeServer(machine, ttl=30))
    d.stop()
    down = FakeServer(machine)
    down.mode = "down"
    d2 = start(cfg, machine, down)
    assert read_model(d2) == protected.original.read_bytes()
    assert d2.status()["models"][0]["source"] == "cache"


def test_offline_without_cache_stays_locked(setup):
    cfg, machine, _ = setup
    down = FakeServer(machine)
    down.mode = "down"
    d = start(cfg, machine, down)
    st = d.status()["models"][0]
    assert st["state"] == "locked" and st["reason"] == "server_unreachable"
    assert refusal(d) == "server_unreachable"


@pytest.mark.parametrize("kind, reason", [
    ("other_signer", "bad_token"), ("other_machine", "bad_token"), ("other_model", "bad_token"),
    ("expired", "token_expired"),
])
def test_crafted_cached_tokens_unlock_nothing(setup, kind, reason):
    cfg, machine, _ = setup
    now = int(time.time())
    token = {
        "other_signer": lambda: machine.token(signer=ed25519.Ed25519PrivateKey.generate()),
        "other_machine": lambda: machine.token(machine="LLK-S0QXV-GBENN-A5THD-M288J-U"),
        "other_model": lambda: machine.token("model-b"),
        "expired": lambda: machine.token(exp=now - 5, iat=now - 60, nbf=now - 60),
    }[kind]()
    machine.state.save_token("model-a", token)
    restored = []
    down = FakeServer(machine)
    down.mode = "down"
    d = start(cfg, machine, down, restorer=lambda *a: restored.append(a))
    st = d.status()["models"][0]
    assert st["state"] == "refused" and st["reason"] == reason, st
    assert restored == []
    assert refusal(d) == reason


def test_copied_files_and_token_with_other_machine_keys_unlock_nothing(tmp_path, setup):
    cfg, machine, protected = setup
    d = start(cfg, machine, FakeServer(machine, ttl=60))
    d.stop()
    # Second host: same machine-id (worst case), its own keys; copy models + the cached token.
    other = enroll_machine(tmp_path / "host2", server_key=machine.server_key)
    copies = tmp_path / "host2" / "models"
    copies.mkdir()
    for f in (protected.locked, protected.bundle):
        shutil.copy(f, copies / f.name)
    other.state.save_token("model-a", machine.state.load_token("model-a"))
    protected.locked, protected.bundle = copies / protected.locked.name, copies / protected.bundle.name
    cfg2 = load_config(write_config(tmp_path / "host2" / "v.toml", other, [protected]))
    restored = []
    down = FakeServer(other)
    down.mode = "down"
    d2 = start(cfg2, other, down, restorer=lambda *a: restored.append(a))
    st = d2.status()["models"][0]
    assert st["state"] == "refused" and st["reason"] == "bad_wrap", st
    assert restored == []


def test_state_dir_readable_by_others_refused(setup):
    cfg, machine, _ = setup
    from layerlock.shared.errors import ConfigError

    os.chmod(machine.state.path, 0o755)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        Daemon(cfg, machine.state, FakeServer(machine))
    os.chmod(machine.state.path, 0o700)
    os.chmod(machine.state.sign_key, 0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        Daemon(cfg, machine.state, FakeServer(machine))


def test_machine_code_mismatch_refused(setup):
    cfg, machine, _ = setup
    from layerlock.shared.errors import ConfigError

    machine.machine_id_file.write_text("ffffffffffffffffffffffffffffffff\n")
    with pytest.raises(ConfigError, match="is not the enrolled"):
        Daemon(cfg, machine.state, FakeServer(machine))


def test_two_models_one_refused(tmp_path, machine):
    a = protect_model(tmp_path / "a", "model-a")
    b = protect_model(tmp_path / "b", "model-b")
    cfg = load_config(write_config(tmp_path / "v.toml", machine, [a, b]))

    class Mixed(FakeServer):
        def activate(self, m, model_id, keys):
            if model_id == "model-b":
                from layerlock.shared.errors import ActivationDenied
                raise ActivationDenied("no_license", "no license for model-b")
            return super().activate(m, model_id, keys)

    d = start(cfg, machine, Mixed(machine))
    states = {m["model"]: (m["state"], m.get("reason")) for m in d.status()["models"]}
    assert states == {"model-a": ("unlocked", None), "model-b": ("refused", "no_license")}


def test_pins_in_the_background_after_serving(setup, capsys):
    import resource

    cfg, machine, protected = setup
    d = start(cfg, machine, FakeServer(machine))
    # served at once; the mlock follows on its own thread and is logged
    assert read_model(d) == protected.original.read_bytes()
    assert wait_for(lambda: '"model_pinned"' in capsys.readouterr().out)
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0 or soft == resource.RLIM_INFINITY:
        assert d.model("model-a").locked_in_ram
    d.stop()
    assert not d.slots["model-a"].model


class RotatingServer(FakeServer):
    """A FakeServer that also serves a JWKS document, counting the fetches."""

    def __init__(self, machine, ttl: int = 60) -> None:
        super().__init__(machine, ttl)
        self.jwks_doc: dict = jwks([machine.server_key.public_key()])
        self.fetches = 0

    def fetch_jwks(self) -> dict:
        self.fetches += 1
        return self.jwks_doc

    def rotate(self, *, endorse: bool = True) -> str:
        """The server's ``keys rotate-signing``: a new signing key, the old one still published."""
        old = self.machine.server_key
        new = ed25519.Ed25519PrivateKey.generate()
        kid = jwk_thumbprint(new.public_key())
        ends = {kid: sign_endorsement(old, new.public_key())} if endorse else {}
        self.jwks_doc = jwks([new.public_key(), old.public_key()], ends)
        self.machine.server_key = new
        return kid


def test_rotated_signing_key_pinned_through_endorsement(setup, capsys):
    cfg, machine, _ = setup
    server = RotatingServer(machine)
    d = start(cfg, machine, server)
    before = server.calls
    new_kid = server.rotate()
    renew_now(d)
    assert wait_for(lambda: d.slots["model-a"].renew_at > time.time() + 10 and server.calls > before)
    assert d.status()["models"][0]["state"] == "unlocked"
    assert new_kid in d.jwks and new_kid in machine.state.load_jwks()  # persisted like enroll does
    assert server.fetches == 1
    cached = (machine.state.tokens / "model-a.jwt").read_text()
    assert jwt.get_unverified_header(cached)["kid"] == new_kid
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    ext = [e for e in events if e.get("event") == "jwks_extended"]
    assert len(ext) == 1 and ext[0]["kids"] == [new_kid]


def test_unendorsed_key_not_trusted_and_fetch_rate_limited(setup):
    cfg, machine, _ = setup
    server = RotatingServer(machine)
    d = start(cfg, machine, server)
    pinned_file = machine.state.jwks_file.read_bytes()
    new_kid = server.rotate(endorse=False)
    for _ in range(3):
        calls = server.calls
        renew_now(d)
        assert wait_for(lambda: server.calls > calls)  # noqa: B023
    assert wait_for(lambda: d.slots["model-a"].failures >= 3)
    assert new_kid not in d.jwks and new_kid not in machine.state.load_jwks()
    assert machine.state.jwks_file.read_bytes() == pinned_file
    assert server.fetches == 1  # at most once a minute, however often the token is refused
    assert d.status()["models"][0]["state"] == "unlocked"  # still serving the old token until exp
