"""Module-scoped real server for the read-mostly API tests (starting gunicorn per test is slow)."""

from __future__ import annotations

import pytest

from tests.conftest import make_redis, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One real Redis + gunicorn license server shared by a test module (see tests/conftest.py)."""
    base = tmp_path_factory.mktemp("ls")
    with serving(make_redis(base / "redis"), base / "server") as ls:
        yield ls
