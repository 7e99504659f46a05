"""Module-scoped real server for the read-mostly API tests (starting gunicorn per test is slow)."""

from __future__ import annotations

import pytest

from tests.conftest import LicenseServer, make_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One real Redis + gunicorn license server shared by a test module (see tests/conftest.py)."""
    base = tmp_path_factory.mktemp("ls")
    rs = make_redis(base / "redis")
    rs.start()
    ls = LicenseServer(base / "server", rs.url)
    try:
        ls.start()
        yield ls
    finally:
        ls.stop()
        rs.kill()
