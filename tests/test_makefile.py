"""The Makefile's promises: `make help` lists every target, `make lint` is clean."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_make_help_lists_every_documented_target():
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    listed = set(re.findall(r"^\s+(?:\x1b\[1m)?([a-z-]+)", out, flags=re.M))
    declared = set(re.findall(r"^([a-z-]+):.*## ", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"install", "run", "test", "bench", "lint", "help"} <= declared
    assert listed == declared


def test_ruff_is_clean():
    done = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_on_the_three_packages_is_clean():
    packages = ("layerlock.shared", "layerlock.license_server", "layerlock.verifier")
    done = subprocess.run([str(BIN / "mypy"), *(a for p in packages for a in ("-p", p))], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _plan(target: str, venv: Path) -> str:
    done = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_install_is_a_stamp_prerequisite_so_a_second_run_skips_pip(tmp_path):
    """`make run` installs once; after that (pyproject.toml unchanged) it goes straight to the demo."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # an existing venv: no `python -m venv` planned
    first = _plan("run", venv)
    assert "pip install" in first and "layerlock demo" in first  # never installed: install, then run
    for target in ("run", "install", "install-test", "test"):
        assert "pip install" in _plan(target, venv), target
    stamps = re.findall(r"touch (\S+)", _plan("install-test", venv))
    assert len(stamps) == 2 and all(Path(s).parent == venv for s in stamps), stamps
    for stamp in stamps:  # what the recipes leave behind after a successful install
        Path(stamp).touch()
    for target in ("run", "install", "install-test", "test"):
        plan = _plan(target, venv)
        assert "pip install" not in plan, f"make -n {target} after an install:\n{plan}"
    assert "layerlock demo" in _plan("run", venv)
    old = (ROOT / "pyproject.toml").stat().st_mtime - 60
    for stamp in stamps:  # pyproject.toml changed since: install again
        os.utime(stamp, (old, old))
    assert "pip install" in _plan("run", venv)
