"""Config boundary: every kind of mistake is named precisely (file, key, problem)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerlock.shared.errors import ConfigError
from layerlock.verifier.cli import main
from layerlock.verifier.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def good(tmp_path, machine, protected):
    from verifier_helpers import write_config

    return write_config(tmp_path / "verifier.toml", machine, [protected])


def test_good_config(good, protected):
    cfg = load_config(good)
    assert [m.id for m in cfg.models] == ["model-a"]
    assert cfg.models[0].locked == protected.locked
    assert cfg.retry_min == 0.2 and cfg.issuer == "layerlock"
    result = CliRunner().invoke(main, ["check", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output and "model-a" in result.output


def test_relative_paths_resolve_against_config_dir(tmp_path, protected):
    cfg = tmp_path / "c.toml"
    rel_locked = Path("models/out") / protected.locked.name
    rel_bundle = Path("models/out") / protected.bundle.name
    cfg.write_text(f'server_url = "https://x.example"\n[[models]]\nid = "model-a"\n'
                   f'locked = "{rel_locked}"\nbundle = "{rel_bundle}"\n')
    assert load_config(cfg).models[0].bundle == protected.bundle


CASES = [
    ("server_url = \n", "not valid TOML"),
    ('server_url = 5\nmodels = []\n', "server_url: must be a string"),
    ('server_url = "ftp://x"\n[[models]]\nid="a"\nlocked="/nope/l"\nbundle="/nope/b"\n',
     "server_url: must be an http:// or https:// URL"),
    ('server_url = "http://x"\ncolour = "blue"\nmodels = []\n', "colour: unknown key"),
    ('server_url = "http://x"\n[[models]]\nid="a"\nlocked="/nope/l"\nbundle="/nope/b"\n',
     "models[0].locked: file /nope/l does not exist"),
    ('server_url = "http://x"\n[[models]]\nid="a"\nlocked="/nope/l"\nbundle="/nope/b"\n',
     "models[0].bundle: file /nope/b does not exist"),
    ('server_url = "http://x"\n[[models]]\nid="a"\nlocked=3\nbundle="/b"\nsize=1\n',
     "models[0].locked: must be a string, got int"),
    ('server_url = "http://x"\n[[models]]\nid="a"\nlocked="/l"\nbundle="/b"\nsize=1\n',
     "models[0].size: unknown key"),
    ('server_url = "http://x"\nallowed_uids = [0, "root"]\nmodels = []\n', "allowed_uids: must hold"),
    ('server_url = "http://x"\nrequest_timeout = "10s"\nmodels = []\n', "request_timeout: must be a number"),
    ('server_url = "http://x"\nleeway = true\nmodels = []\n', "leeway: must be an integer"),
    ('server_url = "http://x"\n[models.a]\nlocked="/l"\n', "models: must be an array of tables"),
    ('server_url = "http://x"\nmodels = []\n', "models: at least one"),
    ('models = []\n', "server_url: is required"),
    ('server_url = "http://x"\nca_bundle = "/nope/ca.pem"\nmodels = []\n', "ca_bundle: file /nope/ca.pem"),
    ('server_url = "http://x"\n[[models]]\nid="bad id!"\nlocked="/l"\nbundle="/b"\n', "models[0].id: must be"),
    ('server_url = "http://x"\n[[models]]\nid="ok-prefix\\n"\nlocked="/l"\nbundle="/b"\n', "models[0].id: must be"),
    ('server_url = "http://x"\nsocket_group = "no-such-group-llk"\nmodels = []\n',
     "socket_group: group 'no-such-group-llk' does not exist on this host"),
    ('server_url = "http://x"\nsocket_group = "99999"\nmodels = []\n',
     "socket_group: group '99999' does not exist on this host (a numeric gid is written without quotes"),
    ('server_url = "http://x"\nsocket_group = -1\nmodels = []\n', "socket_group: must be a non-negative gid"),
    ('server_url = "http://x"\nsocket_group = ""\nmodels = []\n', "socket_group: must not be empty"),
    ('server_url = "http://x"\nsocket_group = true\nmodels = []\n',
     "socket_group: must be a group name or a numeric gid, got bool"),
    ('server_url = "http://x"\nmax_connections_per_uid = 0\nmodels = []\n',
     "max_connections_per_uid: must be between 1 and 64"),
    ('server_url = "http://x"\nmax_connections_per_uid = 65\nmodels = []\n',
     "max_connections_per_uid: must be between 1 and 64"),
    ('server_url = "http://x"\nmax_connections_per_uid = 1.5\nmodels = []\n',
     "max_connections_per_uid: must be an integer, got float"),
    # nan compares false to everything: it passed "must be positive", then broke every activation
    ('server_url = "http://x"\nrequest_timeout = nan\nmodels = []\n', "request_timeout: must be a finite number"),
    ('server_url = "http://x"\nretry_min = nan\nmodels = []\n', "retry_min: must be a finite number"),
    ('server_url = "http://x"\nclient_timeout = inf\nmodels = []\n', "client_timeout: must be a finite number"),
    ('server_url = "http://x"\nclock_tolerance = nan\nmodels = []\n', "clock_tolerance: must be a finite"),
    ('server_url = "http://x"\nleeway = 60000\nmodels = []\n', "leeway: must be at most 3600 s"),  # ms, meant
    ('server_url = "http://x"\nleeway = 1' + "0" * 400 + '\nmodels = []\n', "leeway: must be a finite number"),
    ('server_url = "http://x"\nrequest_timeout = 86400\nmodels = []\n', "request_timeout: must be at most 300 s"),
    ('server_url = "https://ops:s3cret@x"\nmodels = []\n', "server_url: must not carry a user or password"),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_bad_configs(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {expected}" in err.value.message or (
        expected == "not valid TOML" and f"{path}: not valid TOML" in err.value.message), err.value.message
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert expected in result.output


def test_socket_group_and_per_uid_limit_resolved(good):
    import grp

    name = grp.getgrgid(os.getgid()).gr_name
    base = good.read_text()
    assert load_config(good).socket_group is None and load_config(good).max_connections_per_uid == 16
    good.write_text(f'socket_group = "{name}"\nmax_connections_per_uid = 3\n' + base)
    cfg = load_config(good)
    assert cfg.socket_group == os.getgid() and cfg.max_connections_per_uid == 3
    good.write_text("socket_group = 4242\n" + base)  # a bare gid is taken as is (no name needed)
    assert load_config(good).socket_group == 4242


def test_check_refuses_unknown_socket_group(good):
    """`layerlock-verifier check` (the unit's ExecStartPre) names the file, the key and the group."""
    good.write_text('socket_group = "no-such-group-llk"\n' + good.read_text())
    out = subprocess.run([sys.executable, "-m", "verifier", "check", str(good)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout
    assert out.stderr == f"error: {good}: socket_group: group 'no-such-group-llk' does not exist on this host\n"


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('server_url = 1\nfoo = 2\n[[models]]\nid="a"\nlocked="/nope/l"\nbundle="/nope/b"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = err.value.message.splitlines()
    assert len(lines) == 4, lines


def test_swapped_bundle_detected(tmp_path, machine):
    from verifier_helpers import protect_model, write_config

    a = protect_model(tmp_path / "a", "model-a")
    b = protect_model(tmp_path / "b", "model-b")
    a.bundle = b.bundle
    cfg = write_config(tmp_path / "c.toml", machine, [a])
    with pytest.raises(ConfigError, match=r"models\[0\].bundle: .* is the bundle of model 'model-b'"):
        load_config(cfg)


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "none.toml")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_run_refuses_with_the_same_message(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('server_url = "http://x"\nfoo = 1\n[[models]]\nid="a"\nlocked="/nope/l"\nbundle="/nope/b"\n')
    check = subprocess.run([sys.executable, "-m", "verifier", "check", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    run = subprocess.run([sys.executable, "-m", "verifier", "run", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert check.returncode == run.returncode == 1
    assert run.stderr == check.stderr and "foo: unknown key" in run.stderr


def test_shipped_example_config_is_valid(tmp_path, protected):
    import grp

    example = (ROOT / "verifier" / "verifier.example.toml").read_text()
    assert 'socket_group = "inference"' in example
    group = grp.getgrgid(os.getgid())  # "inference" need not exist on the test host
    text = (example.replace("/opt/models/resnet.locked.safetensors", str(protected.locked))
            .replace("/opt/models/resnet.llk", str(protected.bundle)).replace('"resnet-demo"', '"model-a"')
            .replace('socket_group = "inference"', f'socket_group = "{group.gr_name}"'))
    path = tmp_path / "example.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.allowed_uids == frozenset({0, 1000}) and cfg.socket.name == "verifier.sock"
    assert cfg.socket_group == group.gr_gid and cfg.max_connections_per_uid == 16


def test_a_url_with_a_password_is_refused_without_quoting_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('server_url = "https://ops:s3cret@x"\nmodels = []\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "s3cret" not in err.value.message and "server_url: must not carry" in err.value.message
