"""`layerlock models add`: the id it registers is predictable, printed, and matches what protect bound.

The model id is bound into the sealed key (HPKE ``info``) and the .llk bundle header at protect
time, so ``models add --name N --version V`` registers ``N-V`` only when protect was given
``--model-id N-V``; for any other sealed key it refuses with a message naming both ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy as stnp
from click.testing import CliRunner
from ls_helpers import new_machine, register

from layerlock.license_server.cli import main


def cli(server, *args: str):
    env = {"LAYERLOCK_SERVER": server.url, "LAYERLOCK_API_KEY": server.admin_key}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def _protect(server, tmp_path: Path, *extra: str) -> tuple[Path, str]:
    src = tmp_path / "model.safetensors"
    rng = np.random.default_rng(0)
    stnp.save_file({"fc1.weight": rng.normal(size=(8, 4)).astype(np.float32),
                    "fc2.weight": rng.normal(size=(3, 8)).astype(np.float32)}, src)
    res = cli(server, "protect", str(src), "--intake-key", str(server.data_dir / "keys" / "intake.pub"),
              "--no-progress", "--json", *extra)
    assert res.exit_code == 0, res.output
    return tmp_path / "model.key.sealed", json.loads(res.output)[0]["model_id"]


def test_name_and_version_register_name_dash_version_and_license_issues(server, tmp_path):
    sealed, model_id = _protect(server, tmp_path, "--model-id", "resnet-3")
    assert model_id == "resnet-3"
    res = cli(server, "models", "add", str(sealed), "--name", "resnet", "--version", "3")
    assert res.exit_code == 0, res.output
    assert "registered model resnet-3" in res.output
    m = new_machine()
    register(server, m)
    res = cli(server, "licenses", "issue", "--machine", m.code, "--model", "resnet-3", "--days", "365", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model"] == "resnet-3"


def test_json_output_names_the_registered_id(server, tmp_path):
    sealed, _ = _protect(server, tmp_path, "--model-id", "vit-7")
    res = cli(server, "models", "add", str(sealed), "--name", "vit", "--version", "7", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert (doc["model_id"], doc["name"], doc["version"]) == ("vit-7", "vit", "7")


def test_a_sealed_key_for_another_id_is_refused_with_both_ids(server, tmp_path):
    sealed, random_id = _protect(server, tmp_path)
    assert random_id.startswith("model-")
    res = cli(server, "models", "add", str(sealed), "--name", "resnet", "--version", "3")
    assert res.exit_code == 1
    assert random_id in res.output and "resnet-3" in res.output and "--model-id" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = cli(server, "models", "add", str(sealed), "--model-id", "other-1")
    assert res.exit_code == 1 and random_id in res.output and "other-1" in res.output
    assert "other-1" not in cli(server, "models", "list").output
    # Without --name/--version/--model-id the sealed key's own id is used, as before.
    res = cli(server, "models", "add", str(sealed))
    assert res.exit_code == 0 and f"registered model {random_id}" in res.output
