"""A Redis the server cannot use answers 503, and the log says why (a wrong password on a single
Redis and a dead host land in the same 503: only the log tells them apart).  A URL that can never
work -- a cluster URL naming a plain Redis -- stops the server at start instead (test_cluster.py,
test_cli.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from layerlock.license_server.app import create_app
from layerlock.license_server.cli import main
from layerlock.license_server.config import ServerConfig
from tests.conftest import free_port


def test_unreachable_redis_is_a_503_whose_cause_is_logged(tmp_path, monkeypatch, capsys):
    data = tmp_path / "srv"
    assert CliRunner().invoke(main, ["init", "--data-dir", str(data), "--json"]).exit_code == 0
    monkeypatch.setenv("LAYERLOCK_DATA_DIR", str(data))
    monkeypatch.setenv("LAYERLOCK_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    capsys.readouterr()
    app = create_app(ServerConfig.load())
    r = app.test_client().get("/v1/machines", headers={"Authorization": "Bearer llk_x"})
    assert r.status_code == 503 and r.get_json()["error"] == "unavailable"
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    causes = {rec.get("event"): rec.get("cause", "") for rec in records}
    assert causes["startup"].startswith("ConnectionError: ") and "connecting to 127.0.0.1" in causes["startup"]
    assert causes["redis_down"].startswith("ConnectionError: ")
