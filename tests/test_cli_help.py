"""`-h` is `--help` on every command of both CLIs (`layerlock` and `layerlock-verifier`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from layerlock.license_server.cli import main as layerlock_main
from layerlock.verifier.cli import main as verifier_main

REPO = Path(__file__).resolve().parents[1]
CLIS = {"layerlock": layerlock_main, "layerlock-verifier": verifier_main}


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path below (and including) ``command``, groups recursed."""
    paths = [path]
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path + (name,))} listed but not loadable"
            paths += _walk(sub, path + (name,))
    return paths


COMMANDS = [(prog, path) for prog, main in CLIS.items() for path in _walk(main)]


def test_walk_finds_the_known_commands():
    names = {(prog, " ".join(path)) for prog, path in COMMANDS}
    for expected in [("layerlock", ""), ("layerlock", "protect"), ("layerlock", "machines add"),
                     ("layerlock", "licenses issue"), ("layerlock-verifier", ""),
                     ("layerlock-verifier", "enroll"), ("layerlock-verifier", "run"),
                     ("layerlock-verifier", "check"), ("layerlock-verifier", "status")]:
        assert expected in names, expected


@pytest.mark.parametrize("prog, path", COMMANDS, ids=[" ".join((p, *c)) for p, c in COMMANDS])
def test_dash_h_is_help(prog, path):
    main = CLIS[prog]
    short = CliRunner().invoke(main, [*path, "-h"], prog_name=prog)
    assert short.exit_code == 0, short.output
    assert short.output.startswith(f"Usage: {' '.join((prog, *path))} "), short.output
    assert short.output == CliRunner().invoke(main, [*path, "--help"], prog_name=prog).output


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_installed_scripts_take_dash_h(prog):
    """The console scripts themselves (the venv's, next to this interpreter)."""
    script = Path(sys.executable).parent / prog
    assert script.exists(), f"{script} missing: pip install -e . (make install) installs it"
    out = subprocess.run([str(script), "-h"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Usage: {prog} "), out.stdout
