"""README, Interfaces: "every command takes ``--json``" -- checked on every command of both CLIs.

The commands are enumerated from the click groups themselves (recursively), so a command added
later without ``--json`` fails here unless it is added to :data:`NO_JSON` with a reason.

Commands without ``--json``, and why JSON makes no sense for them:

* ``layerlock serve`` -- execs gunicorn and runs until stopped; it prints nothing of its own, and
  the server's logs are already structured JSON lines.
* ``layerlock demo`` -- the interactive local walk-through (``make run``): it starts processes,
  prints what to try next and keeps running until Ctrl-C.
* ``layerlock-verifier run`` -- the daemon (systemd ``Type=notify``); it reports through
  sd_notify and JSON log lines, and ``layerlock-verifier status --json`` is its machine-readable
  view.
* ``layerlock webhooks run`` -- the background worker (webhook deliveries, lease culling) that
  ``layerlock serve`` starts itself; it runs until stopped and logs JSON lines, and
  ``layerlock webhooks deliveries --json`` is the machine-readable view of what it did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from layerlock.license_server.cli import main as layerlock_main
from layerlock.verifier.cli import main as verifier_main

NO_JSON = {
    "layerlock serve": "long-running: execs gunicorn, whose logs are already JSON lines",
    "layerlock demo": "interactive walk-through that runs until Ctrl-C",
    "layerlock-verifier run": "the daemon: sd_notify + JSON log lines; `status --json` is its JSON view",
    "layerlock webhooks run": "the background worker: runs until stopped, JSON log lines; `webhooks deliveries "
                              "--json` is its JSON view",
}


def _walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        assert cmd.commands, f"{path}: an empty group"
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, f"{path} {name}")
    else:
        yield path, cmd


COMMANDS = dict([*_walk(layerlock_main, "layerlock"), *_walk(verifier_main, "layerlock-verifier")])


def _json_option(cmd: click.Command) -> click.Option | None:
    return next((p for p in cmd.params if isinstance(p, click.Option) and "--json" in p.opts), None)


def test_the_walk_finds_the_commands_the_readme_names():
    for name in ("layerlock protect", "layerlock init", "layerlock machines add", "layerlock licenses issue",
                 "layerlock licenses revoke", "layerlock audit verify", "layerlock keys rotate-signing",
                 "layerlock-verifier enroll", "layerlock-verifier check", "layerlock-verifier status",
                 *NO_JSON):
        assert name in COMMANDS, name
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - set(NO_JSON)))
def test_command_takes_json_flag(name):
    option = _json_option(COMMANDS[name])
    assert option is not None, f"`{name}` has no --json (add it, or add it to NO_JSON with the reason)"
    assert option.is_flag and not option.required, name
    result = CliRunner().invoke(layerlock_main if name.startswith("layerlock ") else verifier_main,
                                [*name.split()[1:], "--help"])
    assert result.exit_code == 0 and "--json" in result.output, name


@pytest.mark.parametrize("name", sorted(NO_JSON))
def test_exempt_commands_still_exist_without_json(name):
    """Keeps the exemption list honest: a command that gains --json leaves it."""
    assert _json_option(COMMANDS[name]) is None, f"`{name}` takes --json now: remove it from NO_JSON"


def test_verifier_check_json(tmp_path):
    """The one command --json was added to for this test: its output parses, success and failure."""
    import numpy as np
    from safetensors.numpy import save_file

    from layerlock.shared.lockfile import protect

    save_file({"w": np.ones((4, 4), np.float32)}, tmp_path / "m.safetensors")
    res = protect(tmp_path / "m.safetensors", model_id="m-1")
    locked, bundle = res.locked_path, res.bundle_path
    good = tmp_path / "good.toml"
    good.write_text(f'server_url = "https://license.example.com"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'socket = "{tmp_path / "v.sock"}"\n[[models]]\nid = "m-1"\nlocked = "{locked}"\n'
                    f'bundle = "{bundle}"\n')
    result = CliRunner().invoke(verifier_main, ["check", str(good), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"ok": True, "config": str(good), "models": ["m-1"]}
    bad = tmp_path / "bad.toml"
    bad.write_text('server_url = "ftp://x"\nnonsense = 1\n')
    result = CliRunner().invoke(verifier_main, ["check", str(bad), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["config"] == str(bad)
    assert any("server_url" in p for p in doc["problems"]) and any("nonsense" in p for p in doc["problems"])
    assert any("models" in p for p in doc["problems"])
