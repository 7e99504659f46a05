"""The typed config (env + TOML) and the device-class suite policy, incl. a hybrid (PQ) server."""

from __future__ import annotations

import json

import pytest
from ls_helpers import activate, add_model, issue, new_machine, register

from layerlock.license_server.config import ServerConfig
from layerlock.license_server.policy import CHACHA, SuitePolicy
from layerlock.shared.enrollment import DeviceClass
from layerlock.shared.errors import ActivationDenied, ConfigError
from layerlock.shared.tokens import parse_jwks, verify_token
from layerlock.shared.wrap import MachineKemKeys, binding_info, open_sealed

HYBRID = "MLKEM768X25519-SHA256-AES256GCM"


def test_config_env_overrides_toml(tmp_path):
    toml = tmp_path / "server.toml"
    toml.write_text('[server]\nissuer = "acme"\nclock_skew = 120\nappendfsync = "always"\n')
    cfg = ServerConfig.load({"LAYERLOCK_CONFIG": str(toml), "LAYERLOCK_CLOCK_SKEW": "30",
                             "LAYERLOCK_TRUST_PROXY": "yes", "LAYERLOCK_DATA_DIR": str(tmp_path)})
    assert (cfg.issuer, cfg.clock_skew, cfg.appendfsync, cfg.trust_proxy) == ("acme", 30, "always", True)
    assert cfg.key_dir == tmp_path / "keys"
    with pytest.raises(ConfigError):
        ServerConfig.load({"LAYERLOCK_CLOCK_SKEW": "soon"})
    with pytest.raises(ConfigError):
        ServerConfig.load({"LAYERLOCK_APPENDFSYNC": "no"})
    for word, value in (("off", False), ("ON", True), (" 0 ", False), ("Yes", True)):
        assert ServerConfig.load({"LAYERLOCK_BACKGROUND": word}).background is value
    with pytest.raises(ConfigError, match="'background' must be true or false"):
        ServerConfig.load({"LAYERLOCK_BACKGROUND": "ture"})  # a typo is not silently "false"
    # empty (VAR= in a unit or a template) means the default, as for redis_url
    assert ServerConfig.load({"LAYERLOCK_TRUST_PROXY": "", "LAYERLOCK_BACKGROUND": " "}) == ServerConfig.load({})
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 1\n")
    with pytest.raises(ConfigError):
        ServerConfig.load({"LAYERLOCK_CONFIG": str(bad)})


def test_policy_tree_walks_vendor_type_os():
    policy = SuitePolicy({"suite": "X25519-SHA256-AES256GCM", "vendors": {
        "Dell": {"types": {"x86_64": {"os": {"Ubuntu 24": HYBRID, "Ubuntu": CHACHA}}}},
        "*": {"types": {"aarch64": {"suite": CHACHA}}}}})
    dev = DeviceClass(vendor="Dell", type="x86_64", os="Ubuntu 24.04", aes=True)
    assert policy.choose(dev, has_pq=True) == HYBRID
    assert policy.choose(dev, has_pq=False) == "X25519-SHA256-AES256GCM"  # no ML-KEM key: classic
    assert policy.choose(DeviceClass(vendor="Dell", type="x86_64", os="Ubuntu 22.04"), True) == CHACHA
    assert policy.choose(DeviceClass(vendor="HP", type="aarch64"), False) == CHACHA
    assert policy.choose(DeviceClass(vendor="HP", type="x86_64", aes=False), False) == CHACHA
    with pytest.raises(ConfigError):
        SuitePolicy({"suite": "ROT13"})


def test_policy_can_require_the_hybrid_suite_instead_of_downgrading():
    policy = SuitePolicy({"vendors": {"Dell": {"suite": HYBRID, "require": True}, "HP": {"suite": HYBRID}}})
    assert policy.choose(DeviceClass(vendor="Dell"), has_pq=True) == HYBRID
    with pytest.raises(ActivationDenied) as denied:
        policy.choose(DeviceClass(vendor="Dell"), has_pq=False)
    assert denied.value.code == "suite_required" and "--pq" in denied.value.message
    assert policy.choose(DeviceClass(vendor="HP"), has_pq=False) == "X25519-SHA256-AES256GCM"  # preferred only
    with pytest.raises(ConfigError, match="require"):
        SuitePolicy({"suite": HYBRID, "require": "yes"})


@pytest.mark.parametrize(("tree", "message"), [
    ({"suite": HYBRID, "requires": True}, "unknown key 'requires' at top level"),  # would silently downgrade
    ({"vendor": {"Dell": {"suite": HYBRID}}}, "unknown key 'vendor' at top level"),
    ({"vendors": ["Dell"]}, "'vendors' at top level must be a table"),
    ({"vendors": {"Dell": {"types": "x86_64"}}}, "'types' at vendors 'Dell' must be a table"),
    ({"vendors": {"Dell": {"types": {"x86_64": {"os": {"Ubuntu": 5}}}}}},
     "unknown suite 5 for os 'Ubuntu' at vendors 'Dell' / types 'x86_64'"),
    ({"vendors": {"*": {"types": {"*": {"os": {}, "require": 1}}}}}, "'require' at vendors '*' / types '*' must be"),
    ([1], "top level must be a table"),
    ({"suite": ["X25519-SHA256-AES256GCM"]}, "unknown suite ['X25519-SHA256-AES256GCM'] at top level"),
    ({"vendors": {"*": {"types": {"*": {"os": {"Ubuntu": {"suite": HYBRID}}}}}}}, "for os 'Ubuntu'"),
    ([], "top level must be a table"),
])
def test_a_policy_of_the_wrong_shape_is_refused_by_where_it_is_wrong(tree, message):
    with pytest.raises(ConfigError) as err:
        SuitePolicy(tree)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(("env", "setting"), [
    ({"LAYERLOCK_CLOCK_SKEW": "-100"}, "clock_skew"),  # every activation would be stale
    ({"LAYERLOCK_CLOCK_SKEW": "0"}, "clock_skew"),
    ({"LAYERLOCK_RATE_MACHINE_PER_MIN": "0"}, "rate_machine_per_min"),  # every activation rate_limited
    ({"LAYERLOCK_RATE_UNAUTH_PER_MIN": "0"}, "rate_unauth_per_min"),
    ({"LAYERLOCK_REDIS_TIMEOUT": "nan"}, "redis_timeout"),
    ({"LAYERLOCK_REDIS_TIMEOUT": "inf"}, "redis_timeout"),
    ({"LAYERLOCK_BACKGROUND_INTERVAL": "nan"}, "background_interval"),  # would spin on Redis
    ({"LAYERLOCK_WEBHOOK_TIMEOUT": "inf"}, "webhook_timeout"),
    ({"LAYERLOCK_WEBHOOK_BACKOFF_MAX": "nan"}, "webhook_backoff_max"),
    ({"LAYERLOCK_LOG_LEVEL": "LOUD"}, "log_level"),  # crashed every worker at boot
    ({"LAYERLOCK_MAX_OFFLINE_GRACE": "86400"}, "max_offline_grace"),  # below the default grace
    ({"LAYERLOCK_MAX_OFFLINE_GRACE": "-1"}, "max_offline_grace"),
    ({"LAYERLOCK_DEFAULT_TOKEN_TTL": "2"}, "default_token_ttl"),  # below min_lifetime
    ({"LAYERLOCK_DEFAULT_CLAIM_TTL": "-1"}, "default_claim_ttl"),
    ({"LAYERLOCK_MIN_LIFETIME": "1.5"}, "min_lifetime"),
    ({"LAYERLOCK_CLOCK_SKEW": "--5"}, "clock_skew"),
    ({"LAYERLOCK_REDIS_TIMEOUT": "1" + "0" * 400}, "redis_timeout"),  # overflows a float
])
def test_a_setting_that_would_break_every_request_is_refused_by_name(env, setting):
    with pytest.raises(ConfigError) as err:
        ServerConfig.load(env)
    assert setting in str(err.value), str(err.value)
    (name,) = env
    assert ServerConfig.load({name: ""}) == ServerConfig.load({})  # that very value was the cause


@pytest.mark.parametrize(("toml", "message"), [
    ('server = "x"\n', "one [server] table"),
    ('clock_skew = 60\n[server]\nissuer = "a"\n', "one [server] table"),  # the top-level key was ignored
    ("[server]\nclock_skew = 1.9\n", "'clock_skew' must be a whole number"),  # was 1, silently
    ("[server]\nrate_machine_per_min = true\n", "'rate_machine_per_min' must be a whole number"),
    ('[server]\nissuer = ["a", "b"]\n', "'issuer' must be text"),
    ("[server]\nredis_timeout = nan\n", "'redis_timeout' must be a finite number"),
    ('[server]\nissuer = " "\n', "issuer must not be empty"),
    ('[server]\ndata_dir = ""\n', "'data_dir' must be a non-empty path"),
])
def test_a_config_file_value_of_the_wrong_type_is_refused_not_coerced(tmp_path, toml, message):
    path = tmp_path / "server.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        ServerConfig.load({"LAYERLOCK_CONFIG": str(path)})
    assert message in str(err.value), str(err.value)
    path.write_text('[server]\nclock_skew = 60\nredis_timeout = 2\ntrust_proxy = true\n')
    cfg = ServerConfig.load({"LAYERLOCK_CONFIG": str(path)})
    assert (cfg.clock_skew, cfg.redis_timeout, cfg.trust_proxy) == (60, 2.0, True)


def test_hybrid_suite_end_to_end(tmp_path, redis_server):
    from tests.conftest import LicenseServer

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"vendors": {"PQCorp": {"suite": HYBRID, "require": True}}}))
    srv = LicenseServer(tmp_path / "pq", redis_server.url, workers=1, env={"LAYERLOCK_POLICY_FILE": str(policy)})
    srv.start()
    try:
        m = new_machine(pq=True, vendor="PQCorp")
        register(srv, m)
        model_id, data_key = add_model(srv)
        issue(srv, m, model_id)
        resp = activate(srv, m, model_id)
        assert resp.status_code == 200, resp.text
        jwks = parse_jwks(srv.api("GET", "/.well-known/jwks.json").json())
        claims = verify_token(resp.json()["token"], jwks, machine_code=m.code)
        assert claims.suite == HYBRID
        key = open_sealed(claims.wrapped_key, MachineKemKeys(m.kx, m.pq).private_for(HYBRID), HYBRID,
                          binding_info(claims.lic, m.code, model_id))
        assert key == data_key
        # the same device class without an ML-KEM key is denied, audited, not silently downgraded
        classic = new_machine(pq=False, vendor="PQCorp")
        register(srv, classic)
        issue(srv, classic, model_id)
        resp = activate(srv, classic, model_id)
        assert (resp.status_code, resp.json()["error"]) == (403, "suite_required")
        denied = srv.api("GET", "/v1/audit", params={"machine": classic.code, "type": "activation"}).json()["items"]
        assert [rec["reason"] for rec in denied] == ["suite_required"]
    finally:
        srv.stop()


def test_model_body_cap_must_not_be_below_the_general_one():
    assert ServerConfig.load({}).max_model_body_bytes == 16 * 1024 * 1024
    with pytest.raises(ConfigError, match="max_model_body_bytes must be >= max_body_bytes"):
        ServerConfig.load({"LAYERLOCK_MAX_MODEL_BODY_BYTES": "1024"})
    with pytest.raises(ConfigError):
        ServerConfig.load({"LAYERLOCK_MAX_MODEL_BODY_BYTES": "lots"})


def test_no_repr_shows_a_redis_password_or_a_kek():
    """A traceback with locals, a debugger or a careless log line prints reprs."""
    import dataclasses

    from layerlock.license_server.keystore import _Keys

    assert "hunter2" not in repr(ServerConfig.load({"LAYERLOCK_REDIS_URL": "redis://:hunter2@h:6379"}))
    assert not {f.name: f.repr for f in dataclasses.fields(_Keys)}["keks"]
