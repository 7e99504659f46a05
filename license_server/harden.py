"""``layerlock harden``: a pure-Python package compiled into a wheel of extension modules (Cython).

What it does, in order, all inside one temporary directory that is removed at the end:

1. walks the package: every ``.py`` module is compiled, except ``__init__.py`` files with no code
   (shipped as empty files), ``__main__.py`` (``python -m`` runs ``__main__`` only from source, so it
   is shipped as it is: keep it a two-line launcher) and ``--keep-source`` matches; other files are
   package data; ``.pyc``/``.pyi`` are dropped;
2. translates each module to C with Cython, one process per module and in parallel, so a module that
   does not compile is reported with Cython's own reason (file:line:column: message) and never stops
   the others from being checked;
3. builds the wheel with setuptools (``-O2 -g0``, symbols stripped at link time) from a staging tree
   holding only the C files, the empty ``__init__.py`` files, kept sources and data -- so no ``.py``
   with code reaches the wheel, which is checked entry by entry afterwards;
4. installs the wheel into a fresh virtual environment (the running environment's site-packages are
   added behind its own through a ``.pth``, so dependencies such as numpy resolve, but the package's
   source directory is not on the path), imports every module from outside any source tree, checks
   each one was loaded from the wheel's extension files, and runs the vendor's smoke command there;
5. only then copies the wheel into ``--out``.  On any failure nothing is written there.

What it does not do is make the code secret.  Cython turns Python into C that calls the CPython API;
the names of modules, classes, functions, attributes and string constants stay readable in the
binary, and anyone with a debugger can watch it run.  It removes the source (and, with
``strip_docstrings``, the docstrings) and makes reading the logic a matter of reverse engineering
machine code instead of opening a file.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerlock.shared.errors import LayerlockError

COMPILED, EMPTY, SOURCE, FAILED = "compiled", "empty", "source", "failed"
DROPPED_SUFFIXES = (".pyc", ".pyo", ".pyi")
STEP_TIMEOUT = 600  # seconds for one Cython run, the wheel build, or the import check


class HardenError(LayerlockError):
    """The package could not be hardened; ``report`` holds what was found up to then."""

    code = "harden_failed"

    def __init__(self, message: str, report: HardenReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Module:
    path: str  # relative to the package's parent: "vendorpkg/core.py"
    module: str  # "vendorpkg.core"
    status: str = COMPILED
    reason: str = ""


@dataclass
class HardenReport:
    package: str
    version: str
    modules: list[Module] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    wheel: str | None = None
    verified: bool = False
    smoke: dict[str, Any] | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- looking at the package ---------------------------------------------------------------------------
def _has_code(source: str) -> bool:
    """Whether a module does anything beyond an optional docstring and comments."""
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return bool(body)


def _version_of(init: Path) -> str | None:
    """``__version__ = "..."`` in the package's ``__init__.py``, if it is written as a literal."""
    try:
        tree = ast.parse(init.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)):
            return node.value.value
    return None


def _survey(pkg_dir: Path, keep_source: Iterable[str]) -> tuple[list[Module], list[str], list[str]]:
    """(modules, data files, dropped files), paths relative to the package's parent, sorted."""
    root = pkg_dir.parent
    patterns = list(keep_source)
    modules: list[Module] = []
    data: list[str] = []
    dropped: list[str] = []
    for path in sorted(pkg_dir.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not path.is_file():
            continue
        rel_s = rel.as_posix()
        if path.suffix in DROPPED_SUFFIXES:
            dropped.append(rel_s)
            continue
        if path.suffix != ".py":
            data.append(rel_s)
            continue
        parts = list(rel.with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mod = Module(rel_s, name)
        modules.append(mod)
        if not all(p.isidentifier() for p in parts):
            mod.status, mod.reason = FAILED, "not an importable module name"
            continue
        try:
            source = path.read_text(encoding="utf-8")
            code = _has_code(source)
        except UnicodeDecodeError:
            mod.status, mod.reason = FAILED, "not UTF-8 text"
            continue
        except SyntaxError as exc:
            mod.status, mod.reason = FAILED, f"line {exc.lineno}:{exc.offset or 0}: {exc.msg} (not valid Python)"
            continue
        if any(fnmatch.fnmatch(rel_s, p) or fnmatch.fnmatch(name, p) for p in patterns):
            mod.status, mod.reason = SOURCE, "kept as source (--keep-source)"
        elif parts[-1] == "__main__":
            mod.status, mod.reason = SOURCE, ("kept as source: `python -m` runs __main__ only from source "
                                              "(keep it a two-line launcher that calls compiled code)")
        elif parts[-1] == "__init__" and not code:
            mod.status, mod.reason = EMPTY, "no code: shipped as an empty __init__.py"
    return modules, data, dropped


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def strip_docstrings(source: str) -> str:
    """The module without module, class and function docstrings (comments go too: it is re-printed)."""
    tree = _StripDocstrings().visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


# --- compiling --------------------------------------------------------------------------------------
_CYTHON_ERROR = re.compile(r"^(?P<file>[^\s:][^:\n]*):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$", re.M)


def _cythonize(mod: Module, src_root: Path, c_root: Path) -> None:
    """``src_root/mod.path`` -> ``c_root/mod.path.c``; on failure mod becomes FAILED with Cython's reason."""
    out = c_root / (mod.path + ".c")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cython", "-3", "--module-name", _cython_name(mod),
           "-X", "emit_code_comments=False", mod.path, "-o", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=src_root, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        mod.status, mod.reason = FAILED, f"Cython did not finish within {STEP_TIMEOUT} s"
        return
    if proc.returncode != 0 or not out.is_file():
        errors = [("" if m["file"] == mod.path else f"{m['file']} ")
                  + f"line {m['line']}:{m['col']}: {m['msg'].strip()}" for m in _CYTHON_ERROR.finditer(proc.stderr)]
        tail = proc.stderr.strip().splitlines()[-1:] or [f"cython exited {proc.returncode}"]
        mod.status, mod.reason = FAILED, "; ".join(errors[:3]) if errors else tail[0]


def _cython_name(mod: Module) -> str:
    return mod.module + ".__init__" if mod.path.endswith("/__init__.py") else mod.module


_SETUP = """\
import json
from setuptools import Extension, setup

cfg = json.load(open("harden.json"))
setup(
    name=cfg["name"], version=cfg["version"], packages=cfg["packages"],
    package_data=cfg["package_data"], include_package_data=False, zip_safe=False,
    install_requires=cfg["requires"],
    ext_modules=[Extension(name, [src], extra_compile_args=["-O2", "-g0"], extra_link_args=["-s"])
                 for name, src in cfg["extensions"]],
)
"""


def _stage(pkg_dir: Path, report: HardenReport, c_root: Path, stage: Path, requires: list[str],
           dist_name: str, jobs: int) -> None:
    """The build tree: setup.py + harden.json, C files, empty __init__.py files, kept sources, data."""
    root = pkg_dir.parent
    packages: set[str] = set()
    for rel in [m.path for m in report.modules] + report.data_files:
        parts = Path(rel).parts[:-1]
        packages.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    package_data: dict[str, list[str]] = {}
    for rel in report.data_files:
        parts = Path(rel).parts
        package_data.setdefault(".".join(parts[:-1]), []).append(parts[-1])
    extensions = []
    for mod in report.modules:
        target = stage / mod.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if mod.status == COMPILED:
            c_file = c_root / (mod.path + ".c")
            dest = stage / "_c" / (mod.path + ".c")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(c_file, dest)
            extensions.append((_cython_name(mod), dest.relative_to(stage).as_posix()))
        elif mod.status == EMPTY:
            target.write_bytes(b"")
        elif mod.status == SOURCE:
            shutil.copyfile(root / mod.path, target)
    for rel in report.data_files:
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, stage / rel)
    for pkg in packages:
        (stage / pkg.replace(".", "/")).mkdir(parents=True, exist_ok=True)
    cfg = {"name": dist_name, "version": report.version, "packages": sorted(packages),
           "package_data": package_data, "requires": requires, "extensions": extensions}
    (stage / "harden.json").write_text(json.dumps(cfg))
    (stage / "setup.py").write_text(_SETUP)
    (stage / "setup.cfg").write_text(f"[build_ext]\nparallel = {jobs}\n")


def _run(cmd: list[str], what: str, report: HardenReport, **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", STEP_TIMEOUT), **kw)
    except subprocess.TimeoutExpired:
        raise HardenError(f"{what} did not finish in time", report) from None
    except OSError as exc:
        raise HardenError(f"{what}: cannot run {cmd[0]} ({exc.strerror})", report) from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        raise HardenError(f"{what} failed (exit {proc.returncode}): {(errors or lines or ['no output'])[-1]}", report)
    return proc


def _check_wheel(wheel: Path, report: HardenReport) -> None:
    """No module source in the wheel: only empty __init__.py files, kept sources and data may be .py."""
    allowed = {m.path for m in report.modules if m.status in (EMPTY, SOURCE)}
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    with zipfile.ZipFile(wheel) as zf:
        names = {i.filename: i for i in zf.infolist()}
    leaked = [n for n in names if n.endswith((".py", ".pyx", ".c")) and n not in allowed]
    missing = [m.path for m in report.modules if m.status == COMPILED
               and m.path[:-3] + suffix not in names]
    if leaked or missing:
        raise HardenError(f"the built wheel is not what was asked: source {leaked[:3]}, missing extensions "
                          f"{missing[:3]}", report)


# --- checking the result ----------------------------------------------------------------------------------
_IMPORT_CHECK = """\
import importlib, json, sys, sysconfig
venv, suffix = sys.argv[1], sysconfig.get_config_var("EXT_SUFFIX")
problems = []
for name, compiled in json.loads(sys.argv[2]):
    try:
        mod = importlib.import_module(name)
    except BaseException as exc:
        problems.append(f"{name}: {type(exc).__name__}: {exc}")
        continue
    where = getattr(mod, "__file__", "") or ""
    if not where.startswith(venv):
        problems.append(f"{name}: imported from {where}, not from the hardened wheel")
    elif compiled and not where.endswith(suffix):
        problems.append(f"{name}: {where} is not an extension module")
print(json.dumps(problems))
"""


def _venv(tmp: Path, report: HardenReport) -> Path:
    """A fresh venv that sees the running environment's packages (dependencies) through a .pth."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "creating a fresh venv", report)
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                "inspecting the fresh venv", report).stdout.strip()
    # addsitedir, not a bare path: the running environment's own .pth files (editable installs) apply too
    deps = [p for p in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")) if os.path.isdir(p)]
    Path(site, "_layerlock_harden_deps.pth").write_text(f"import site; list(map(site.addsitedir, {deps!r}))\n")
    return python


def _clean_env(venv_bin: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv_bin.parent),
               PYTHONNOUSERSITE="1")
    return env


def _verify(wheel: Path, tmp: Path, report: HardenReport, smoke: list[str] | None, smoke_timeout: float) -> None:
    python = _venv(tmp, report)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          "--no-compile", str(wheel)], "installing the wheel into a fresh venv", report)
    empty = tmp / "cwd"
    empty.mkdir()
    env = _clean_env(python.parent)
    venv_root = str(python.parent.parent.resolve())
    mods = [[m.module, m.status == COMPILED] for m in report.modules
            if m.status != FAILED and not m.module.endswith("__main__")]
    proc = _run([str(python), "-I", "-c", _IMPORT_CHECK, venv_root, json.dumps(mods)],
                "importing the hardened package", report, cwd=empty, env=env)
    problems = json.loads(proc.stdout.strip().splitlines()[-1])
    if problems:
        raise HardenError(f"the hardened package does not import cleanly: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), report)
    report.verified = True
    if smoke:
        started = time.monotonic()
        try:
            proc = subprocess.run(smoke, cwd=empty, env=env, capture_output=True, text=True, timeout=smoke_timeout)
        except subprocess.TimeoutExpired:
            raise HardenError(f"smoke command did not finish within {smoke_timeout:g} s", report) from None
        except OSError as exc:
            raise HardenError(f"smoke command: cannot run {smoke[0]} ({exc.strerror})", report) from None
        report.smoke = {"command": shlex.join(smoke), "exit": proc.returncode,
                        "seconds": round(time.monotonic() - started, 2),
                        "stdout_tail": proc.stdout.strip().splitlines()[-5:]}
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise HardenError(f"smoke command failed in the hardened install (exit {proc.returncode}): {last}", report)


# --- the whole run ----------------------------------------------------------------------------------------
def harden(package_dir: Path, out_dir: Path, *, strip: bool = False, smoke: str | None = None,
           keep_source: Iterable[str] = (), dist_name: str | None = None, version: str | None = None,
           requires: Iterable[str] = (), verify: bool = True, jobs: int | None = None,
           smoke_timeout: float = 600.0) -> HardenReport:
    """Compile ``package_dir`` into a wheel in ``out_dir``; see the module docstring."""
    started = time.monotonic()
    pkg_dir = Path(package_dir).resolve()
    name = pkg_dir.name
    if not pkg_dir.is_dir() or not (pkg_dir / "__init__.py").is_file():
        raise HardenError(f"{package_dir}: not a Python package (a directory with an __init__.py)")
    if not name.isidentifier():
        raise HardenError(f"{package_dir}: {name!r} is not an importable package name")
    smoke_argv = None
    if smoke is not None:
        try:
            smoke_argv = shlex.split(smoke)
        except ValueError as exc:
            raise HardenError(f"--smoke: cannot split the command ({exc})") from None
        if not smoke_argv:
            raise HardenError("--smoke: the command is empty")
        if not verify:
            raise HardenError("--smoke runs in the verification venv: it cannot be combined with --no-verify")
    for tool, extra in (("Cython", "harden"), ("setuptools", "harden")):
        if _missing(tool):
            raise HardenError(f"layerlock harden needs {tool}: pip install 'layerlock[{extra}]'")
    version = version or _version_of(pkg_dir / "__init__.py") or "0.0.0"
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*([._-]?[A-Za-z0-9]+)*", version):
        raise HardenError(f"version {version!r} is not a valid package version")
    report = HardenReport(name, version)
    report.modules, report.data_files, report.dropped = _survey(pkg_dir, keep_source)
    jobs = max(1, jobs or min(8, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="layerlock-harden-"))
    try:
        src_root = tmp / "src"
        for mod in report.modules:
            if mod.status != COMPILED:
                continue
            dest = src_root / mod.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = (pkg_dir.parent / mod.path).read_text(encoding="utf-8")
            dest.write_text(strip_docstrings(text) if strip else text, encoding="utf-8")
        c_root = tmp / "c"
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda m: _cythonize(m, src_root, c_root),
                          [m for m in report.modules if m.status == COMPILED]))
        failed = [m for m in report.modules if m.status == FAILED]
        if failed:
            raise HardenError(f"{len(failed)} of {len(report.modules)} modules cannot be compiled: "
                              + "; ".join(f"{m.path}: {m.reason}" for m in failed)
                              + " (fix them, or ship them as source with --keep-source)", report)
        if not any(m.status == COMPILED for m in report.modules):
            raise HardenError(f"{package_dir}: no module with code to compile", report)
        stage = tmp / "stage"
        _stage(pkg_dir, report, c_root, stage, list(requires), dist_name or name, jobs)
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
              "--no-cache-dir", "-w", str(tmp / "dist"), str(stage)], "building the wheel", report,
             env={**os.environ, "PIP_NO_INPUT": "1"})
        wheels = sorted((tmp / "dist").glob("*.whl"))
        if len(wheels) != 1:
            raise HardenError(f"building the wheel produced {len(wheels)} wheels", report)
        _check_wheel(wheels[0], report)
        if verify:
            _verify(wheels[0], tmp, report, smoke_argv, smoke_timeout)
        report.wheel = str(_deliver(wheels[0], Path(out_dir)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report.seconds = round(time.monotonic() - started, 2)
    return report


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _deliver(wheel: Path, out_dir: Path) -> Path:
    """Copy the wheel into ``out_dir`` (created if needed) under its own name, atomically."""
    target, tmp = out_dir / wheel.name, out_dir / f".{wheel.name}.tmp"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HardenError(f"cannot write the wheel into {out_dir}: {exc.strerror}") from None
    return target.resolve()
