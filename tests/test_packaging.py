"""The wheel installs under one namespace and never clashes with an application's own packages.

Builds the wheel from a copy of the sources (the work tree is left alone), installs it into a
fresh venv that already holds an application's own top-level ``shared`` and ``verifier``
packages, and imports both those and ``layerlock.shared.machine`` / ``layerlock.verifier.client``
from it.  The venv is made without pip; its dependencies (numpy, cryptography, …) come from this
test's own venv through a path entry, so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("shared", "verifier", "license_server", "demo")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for part in PARTS:
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: build with this venv's setuptools instead of downloading one.
    done = subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("layerlock-*.whl")
    return built


def test_wheel_has_only_the_layerlock_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"layerlock", next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    for part in PARTS:
        assert f"layerlock/{part}/__init__.py" in names, part
        assert not any(n.startswith(f"{part}/") for n in names), part
    assert "layerlock/verifier/PROTOCOL.md" in names  # package data travels too
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "layerlock = layerlock.license_server.cli:main" in text
    assert "layerlock-verifier = layerlock.verifier.cli:main" in text


def test_wheel_installs_beside_an_apps_own_shared_and_verifier(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The application's own packages, installed first: a wheel shipping top-level shared/ or
    # verifier/ would overwrite or shadow them.
    for app_pkg in ("shared", "verifier"):
        (site / app_pkg).mkdir()
        (site / app_pkg / "__init__.py").write_text(f"WHO = 'the app {app_pkg}'\n")
    # Dependencies from this venv: a plain path entry (its .pth files, among them the editable
    # install of this checkout, are not processed), placed after the fresh venv's own site-packages.
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([*PIP, "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "shared" / "__init__.py").read_text() == "WHO = 'the app shared'\n"

    probe = """
import json, shared, verifier
import layerlock.shared.machine, layerlock.verifier.client, layerlock.license_server.cli
print(json.dumps({"shared": shared.WHO, "verifier": verifier.WHO,
                  "machine": layerlock.shared.machine.__file__, "client": layerlock.verifier.client.__file__,
                  "cli": layerlock.license_server.cli.__file__}))
"""
    done = subprocess.run([str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["shared"] == "the app shared" and doc["verifier"] == "the app verifier"
    for key in ("machine", "client", "cli"):
        assert Path(doc[key]).is_relative_to(site / "layerlock"), (key, doc[key])  # the wheel's, not the checkout's
    for script in ("layerlock", "layerlock-verifier"):
        done = subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert done.returncode == 0 and "Usage" in done.stdout, done.stderr
