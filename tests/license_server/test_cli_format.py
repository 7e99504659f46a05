"""How the ops CLI shows values to people (``--json`` output is the API's own, untouched)."""

from __future__ import annotations

from layerlock.license_server.cli.rest import _cell


def test_times_are_utc_dates_for_people():
    assert _cell(1798210458, "expires_at") == "2026-12-25 14:54:18Z"
    assert _cell(1795618458, "not_before") == "2026-11-25 14:54:18Z"
    assert _cell(0, "revoked_at") == "-"


def test_other_values_unchanged():
    assert _cell(30, "token_ttl") == "30"
    assert _cell(None, "expires_at") == "-"
    assert _cell({"rack": "b2"}, "labels") == "rack=b2"
    assert _cell(True, "flag_at") == "True"
