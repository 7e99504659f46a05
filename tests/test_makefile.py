"""The Makefile's promises: `make help` lists every target, `make lint` is clean."""

from __future__ import annotations

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


def test_mypy_strict_on_shared_is_clean():
    done = subprocess.run([str(BIN / "mypy"), "-p", "layerlock.shared"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
