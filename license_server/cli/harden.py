"""``layerlock harden``: compile a vendor's pure-Python inference package into a wheel of extension
modules (Cython), check it in a fresh venv, and report what could not be compiled and why.
The logic lives in :mod:`layerlock.license_server.harden`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # the module imports nothing heavy, but keep `layerlock --help` lean
    from layerlock.license_server.harden import HardenReport


@click.command(context_settings={"max_content_width": 100})
@click.argument("package_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory the wheel is written to (created if needed; nothing is written on failure).")
@click.option("--strip-docstrings", is_flag=True,
              help="Remove module, class and function docstrings before compiling (help() shows nothing).")
@click.option("--smoke", metavar="COMMAND",
              help="Run COMMAND (split like a shell would, no shell) in the fresh venv where the wheel is "
                   "installed; it must exit 0.  E.g. --smoke 'python -m vendorpkg.selftest'.")
@click.option("--keep-source", "keep_source", multiple=True, metavar="GLOB",
              help="Ship matching modules (path like PKG/x.py, or dotted name) as .py instead (repeatable).")
@click.option("--name", "dist_name", help="Distribution name of the wheel (default: the package name).")
@click.option("--version", "version", help="Wheel version (default: a literal __version__, else 0.0.0).")
@click.option("--requires", multiple=True, metavar="REQ",
              help="A dependency the wheel declares, e.g. 'numpy>=1.26' (repeatable).")
@click.option("--no-verify", is_flag=True, help="Skip installing and importing the wheel in a fresh venv.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), help="Parallel compilations (default: the CPUs, at most 8).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (also on failure, with ok: false).")
def harden(package_dir: Path, out_dir: Path, strip_docstrings: bool, smoke: str | None,
           keep_source: tuple[str, ...], dist_name: str | None, version: str | None, requires: tuple[str, ...],
           no_verify: bool, jobs: int | None, as_json: bool) -> None:
    """Compile a pure-Python package into a wheel of extension modules, so its source does not ship.

    PACKAGE_DIR is the package's directory (the one with __init__.py).  Every module with code is
    translated to C by Cython and compiled (-O2, no debug info, symbols stripped); __init__.py files
    without code ship empty, __main__.py ships as source (python -m needs it: keep it a launcher).
    A module Cython rejects is reported with Cython's reason and the run fails.  The wheel is then
    installed into a fresh venv (the current environment's packages visible for dependencies), every
    module is imported from it, and the --smoke command is run there; only then is it written to --out.

    This makes reading the code a reverse-engineering job instead of opening a file.  It does not
    make it secret: names and strings stay in the binary, and a debugger still watches it run.
    """
    from layerlock.license_server.harden import HardenError
    from layerlock.license_server.harden import harden as run

    try:
        report = run(package_dir, out_dir, strip=strip_docstrings, smoke=smoke, keep_source=keep_source,
                     dist_name=dist_name, version=version, requires=requires, verify=not no_verify, jobs=jobs)
    except HardenError as exc:
        if as_json:
            body = exc.report.as_dict() if exc.report is not None else {}
            click.echo(json.dumps({"ok": False, "error": exc.message, **body}, indent=2))
        elif exc.report is not None:
            _table(exc.report)
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"ok": True, **report.as_dict()}, indent=2))
        return
    click.echo(f"hardened {report.package} {report.version} -> {report.wheel} ({report.seconds:.1f} s)")
    _table(report)
    if report.verified:
        smoke_text = f"; smoke `{report.smoke['command']}` passed" if report.smoke else ""
        click.echo(f"  verified: every module imports from the wheel in a fresh venv{smoke_text}")


def _table(report: HardenReport) -> None:
    width = max((len(m.path) for m in report.modules), default=0)
    for m in report.modules:
        click.echo(f"  {m.path.ljust(width)}  {m.status}" + (f": {m.reason}" if m.reason else ""))
    if report.data_files:
        click.echo(f"  data: {len(report.data_files)} file(s) shipped as they are")
    if report.dropped:
        click.echo(f"  dropped: {', '.join(report.dropped)}")
