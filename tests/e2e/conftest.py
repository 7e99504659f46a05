"""E2E fixtures: a deployment on the suite-wide ``license_server`` (real gunicorn + real Redis,
tests/conftest.py) with the sidecar ready to start (see e2e_deploy.py)."""

from __future__ import annotations

import pytest
from e2e_deploy import deploy
from e2e_helpers import cleanup


@pytest.fixture
def deployment(license_server, tmp_path):
    dep = deploy(license_server, tmp_path)
    try:
        yield dep
    finally:
        dep.sidecar.stop()
        cleanup(dep.socket.parent)
