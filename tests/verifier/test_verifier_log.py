"""Structured logs: one JSON object per line, and secret-looking fields never written."""

from __future__ import annotations

import json

from layerlock.verifier.log import log


def test_json_lines_without_secrets(capsys):
    log("token_accepted", model="m", token="eyJhbGciOi.x.y", data_key="00" * 32, wk="abc", license="lic_1")
    line = capsys.readouterr().out
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["event"] == "token_accepted" and record["model"] == "m" and record["license"] == "lic_1"
    assert not {"token", "data_key", "wk"} & set(record)
    assert "eyJ" not in line
