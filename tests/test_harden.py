"""`layerlock harden`: a real pure-Python package (classes, closures, a frozen dataclass, a generator,
numpy, a subpackage, package data, a __main__ launcher, a module that calls the sidecar's client)
compiled with Cython into a wheel that holds no source, installed into a fresh venv, giving the same
results as the source; and what it refuses, in one line, leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from layerlock.license_server.harden import COMPILED, EMPTY, FAILED, SOURCE, _survey, strip_docstrings

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]

PACKAGE = {
    "__init__.py": '''\
"""The vendor's inference package: SECRET-DOCSTRING-MARKER."""
from vendorpkg.core import Point, Scaler, make_counter

__version__ = "1.2.0"
__all__ = ["Point", "Scaler", "make_counter"]
''',
    "core.py": '''\
"""Core maths."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Point:
    """A point in the plane."""

    x: float
    y: float = 0.0

    def norm(self) -> float:
        return float(np.hypot(self.x, self.y))


class Scaler:
    def __init__(self, k):
        self.k = k

    def __call__(self, arr):
        return np.asarray(arr) * self.k

    @property
    def double(self):
        return Scaler(self.k * 2)


def make_counter(start=0):
    n = start

    def inc(by=1):
        nonlocal n
        n += by
        return n
    return inc


def gen(n):
    yield from (i * i for i in range(n))


def secret_formula(x):
    # the kind of thing a vendor does not want read: SECRET-SOURCE-MARKER
    return [round(v * 0.731 + 0.1729, 6) for v in x]
''',
    "sub/__init__.py": "# a subpackage without code\n",
    "sub/ops.py": '''\
import json
from pathlib import Path

from ..core import Point, gen


def dist(a: Point, b: Point) -> float:
    return Point(a.x - b.x, a.y - b.y).norm()


def squares(n):
    return list(gen(n))


def table():
    return json.loads((Path(__file__).parent.parent / "data" / "table.json").read_text())
''',
    "data/table.json": '{"k": [1, 2, 3]}\n',
    "infer.py": '''\
"""How a hardened package meets the sidecar: the weights come from it, never from a file."""


def load(model):
    from layerlock.verifier import client

    return client.ncnn_net(model)


def client_ready():
    from layerlock.verifier import client

    return callable(client.ncnn_net) and callable(client.load_numpy)
''',
    "selftest.py": '''\
import json

import numpy as np

import vendorpkg
from vendorpkg import core, infer
from vendorpkg.sub import ops


def main():
    c = vendorpkg.make_counter(3)
    c()
    out = {
        "norm": vendorpkg.Point(3, 4).norm(), "dist": ops.dist(vendorpkg.Point(1, 1), vendorpkg.Point(4, 5)),
        "count": c(5), "scaled": vendorpkg.Scaler(1.5).double([1, 2, 3]).tolist(), "squares": ops.squares(6),
        "table": ops.table(), "repr": repr(vendorpkg.Point(1.0)), "secret": core.secret_formula([1, 2.5]),
        "matmul": (np.arange(6.0).reshape(2, 3) @ np.ones(3)).tolist(), "client": infer.client_ready(),
        "eq": vendorpkg.Point(1, 2) == vendorpkg.Point(1.0, 2.0), "hash": hash(vendorpkg.Point(1, 2)) == hash((1, 2)),
    }
    try:
        vendorpkg.Point(1).x = 3
    except Exception as exc:
        out["frozen"] = type(exc).__name__
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
''',
    "__main__.py": "from vendorpkg.selftest import main\n\nmain()\n",
    "core.pyi": "def secret_formula(x: list[float]) -> list[float]: ...\n",
}


def write_package(root: Path, files: dict[str, str], name: str = "vendorpkg") -> Path:
    for rel, text in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / name


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def layerlock(*args: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([PY, "-m", "layerlock.license_server.cli", "harden", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def fresh_venv(path: Path) -> Path:
    """A new venv seeing the test environment's packages (numpy, layerlock) only through a .pth."""
    import sysconfig

    subprocess.run([PY, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return python


def test_hardened_wheel_has_no_source_installs_fresh_and_gives_the_same_results(tmp_path):
    src_root = tmp_path / "vendor"
    pkg = write_package(src_root, PACKAGE)
    before = snapshot(src_root)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = layerlock(str(pkg), "--out", str(tmp_path / "dist"), "--strip-docstrings", "--requires", "numpy",
                  "--smoke", "python -m vendorpkg", "--json", tmpdir=scratch)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    status = {m["path"]: m["status"] for m in report["modules"]}
    assert status == {"vendorpkg/__init__.py": COMPILED, "vendorpkg/__main__.py": SOURCE,
                      "vendorpkg/core.py": COMPILED, "vendorpkg/infer.py": COMPILED,
                      "vendorpkg/selftest.py": COMPILED, "vendorpkg/sub/__init__.py": EMPTY,
                      "vendorpkg/sub/ops.py": COMPILED}
    assert report["ok"] and report["verified"] and report["smoke"]["exit"] == 0
    assert report["version"] == "1.2.0" and report["dropped"] == ["vendorpkg/core.pyi"]
    print(f"\nharden: {report['seconds']} s for {len(report['modules'])} modules")
    assert report["seconds"] < 60

    wheel = Path(report["wheel"])
    assert wheel.parent == tmp_path / "dist" and sorted(os.listdir(tmp_path / "dist")) == [wheel.name]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        blobs = b"".join(zf.read(n) for n in names)
        metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    py = sorted(n for n in names if n.endswith(".py"))
    assert py == ["vendorpkg/__main__.py", "vendorpkg/sub/__init__.py"]  # the launcher; an empty file
    assert not [n for n in names if n.endswith((".c", ".pyx", ".pyi", ".pyc"))]
    assert sum(n.endswith(".so") for n in names) == 5 and "vendorpkg/data/table.json" in names
    assert b"SECRET-SOURCE-MARKER" not in blobs  # comments and source lines: gone
    assert b"SECRET-DOCSTRING-MARKER" not in blobs and b"A point in the plane" not in blobs  # --strip-docstrings
    assert "Requires-Dist: numpy" in metadata
    assert snapshot(src_root) == before  # nothing written into the source tree
    assert list(scratch.iterdir()) == []  # the temporary build tree is gone

    # an independent check: a second fresh venv, the wheel installed with pip, run from an empty dir
    python = fresh_venv(tmp_path / "venv")
    subprocess.run([PY, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=120)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    hard = subprocess.run([str(python), "-m", "vendorpkg"], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=60)
    assert hard.returncode == 0, hard.stderr
    plain = subprocess.run([PY, "-m", "vendorpkg"], cwd=src_root, env=env, capture_output=True, text=True,
                           timeout=60)
    assert plain.returncode == 0, plain.stderr
    got, want = json.loads(hard.stdout), json.loads(plain.stdout)
    assert got == want  # same results, compiled or not
    assert want["frozen"] == "FrozenInstanceError" and want["client"] is True
    probe = subprocess.run([str(python), "-c", "import json, vendorpkg, vendorpkg.core as c; print(json.dumps("
                            "[vendorpkg.__file__, c.__file__, c.Point.__doc__, vendorpkg.__doc__]))"],
                           cwd=empty, env=env, capture_output=True, text=True, timeout=60)
    init_file, core_file, point_doc, pkg_doc = json.loads(probe.stdout)
    assert init_file.endswith(".so") and core_file.endswith(".so") and str(tmp_path / "venv") in core_file
    assert point_doc.startswith("Point(") and pkg_doc is None  # only dataclass' generated doc is left


def test_what_cannot_be_compiled_is_reported_and_nothing_is_left(tmp_path):
    files = {
        "__init__.py": "",
        "good.py": "def f():\n    return 1\n",
        "dynamic.py": "globals()['late'] = 1\n\n\ndef g():\n    return late  # noqa: F821\n",
        "broken.py": "def h(:\n    pass\n",
    }
    pkg = write_package(tmp_path / "src", files, "badpkg")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "dist"
    r = layerlock(str(pkg), "--out", str(out), tmpdir=scratch)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: 2 of 4 modules cannot be compiled: ")
    assert "badpkg/dynamic.py: line 5:11: undeclared name not builtin: late" in r.stderr
    assert "badpkg/broken.py: line 1:7: invalid syntax (not valid Python)" in r.stderr
    assert "--keep-source" in r.stderr
    assert "badpkg/dynamic.py   failed: line 5:11" in r.stdout  # the per-module report
    assert not out.exists() and list(scratch.iterdir()) == []
    r = layerlock(str(pkg), "--out", str(out), "--json", tmpdir=scratch)
    body = json.loads(r.stdout)
    assert r.returncode == 1 and body["ok"] is False and "cannot be compiled" in body["error"]
    assert {m["path"]: m["status"] for m in body["modules"]} == {
        "badpkg/__init__.py": EMPTY, "badpkg/broken.py": FAILED, "badpkg/dynamic.py": FAILED,
        "badpkg/good.py": COMPILED}


def test_a_failing_smoke_command_writes_no_wheel(tmp_path):
    pkg = write_package(tmp_path / "src", {"__init__.py": "", "m.py": "def answer():\n    return 41\n"}, "tinypkg")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    smoke = "python -c 'import sys, tinypkg.m as m; sys.exit(\"wrong answer %d\" % m.answer())'"
    r = layerlock(str(pkg), "--out", str(tmp_path / "dist"), "--smoke", smoke, tmpdir=scratch)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr == "error: smoke command failed in the hardened install (exit 1): wrong answer 41\n"
    assert not (tmp_path / "dist").exists() and list(scratch.iterdir()) == []


def _empty_package(p: Path) -> None:
    p.mkdir()
    (p / "__init__.py").write_text("")


@pytest.mark.parametrize("setup,args,message", [
    (Path.mkdir, [], "not a Python package"),
    (lambda p: None, [], "not a Python package"),
    (_empty_package, ["--smoke", "python -c 'x"], "--smoke: cannot split"),
    (_empty_package, ["--smoke", "true", "--no-verify"], "--no-verify"),
    (_empty_package, [], "no module with code to compile"),
    (_empty_package, ["--version", "v1 beta"], "not a valid package version"),
])
def test_bad_input_is_one_line(tmp_path, setup, args, message):
    pkg = tmp_path / "pkg"
    setup(pkg)
    r = layerlock(str(pkg), "--out", str(tmp_path / "dist"), *args, tmpdir=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "dist").exists()


def test_survey_and_strip(tmp_path):
    pkg = write_package(tmp_path, {"__init__.py": '"""Doc only."""\n', "__main__.py": "print(1)\n",
                                   "a.py": "x = 1\n", "plugins/b.py": "y = 2\n", "c.pyi": "", "d.txt": "",
                                   "bad-name.py": "z = 3\n"}, "p")
    modules, data, dropped = _survey(pkg, keep_source=["p/plugins/*"])
    assert {m.path: m.status for m in modules} == {"p/__init__.py": EMPTY, "p/__main__.py": SOURCE,
                                                   "p/a.py": COMPILED, "p/plugins/b.py": SOURCE,
                                                   "p/bad-name.py": FAILED}
    assert data == ["p/d.txt"] and dropped == ["p/c.pyi"]
    stripped = strip_docstrings('"""M."""\nfrom __future__ import annotations\n\n\nclass A:\n    """C."""\n\n'
                                '    def f(self):\n        """F."""\n\n\ndef g():\n    """G."""\n    return 1\n')
    assert '"""' not in stripped and "'M.'" not in stripped and stripped.startswith("from __future__")
    compile(stripped, "x", "exec")
