"""The verifier's README matches what is installed and what the license server accepts."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "verifier" / "README.md").read_text()


def test_console_script_documented_and_installed():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["layerlock-verifier"] == "layerlock.verifier.cli:main"
    assert "pip install -e ." in README and "`layerlock-verifier`" in README


def test_machine_registration_body_uses_the_servers_fields():
    from layerlock.license_server.openapi import MACHINE_BODY

    bodies = [json.loads(m) for m in re.findall(r"/v1/machines .*?-d '(\{.*?\})'", README, re.S)]
    assert bodies, "README shows no POST /v1/machines example"
    for body in bodies:
        assert "enrollment" in body and set(body) <= set(MACHINE_BODY["properties"])
