"""Fixtures for the verifier's unit tests (helpers live in verifier_helpers.py: importable by name)."""

from __future__ import annotations

from pathlib import Path

import pytest
from verifier_helpers import Machine, Protected, enroll_machine, protect_model


@pytest.fixture()
def machine(tmp_path: Path) -> Machine:
    return enroll_machine(tmp_path)


@pytest.fixture()
def protected(tmp_path: Path) -> Protected:
    return protect_model(tmp_path / "models")
