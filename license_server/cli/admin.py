"""``layerlock init`` and ``layerlock serve``: the commands that manage a server's own data dir.

``init`` contract: creates ``D/keys`` (0700, files 0600: signing key, KEK, intake key) and prints
the first admin API key once; only its SHA-256 is kept (``D/keys/bootstrap-admin.sha256``), and
the server puts that hash into Redis when it starts.  Re-running on an initialised dir refuses
with exit 1 unless ``--force`` (which replaces every key: a deliberate fresh start).

``serve`` contract: runs gunicorn with ``deploy/gunicorn.conf.py`` (or the packaged copy of its
settings when the package is installed without the repository).  Without ``--redis-url`` /
``LAYERLOCK_REDIS_URL`` the gunicorn master starts a private ``redis-server`` under ``D/redis``
and stops it on exit.  SIGINT/SIGTERM go straight to gunicorn (the process is exec'd), which
stops workers, then Redis.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from layerlock.license_server.config import DEFAULT_DATA_DIR
from layerlock.license_server.keystore import initialise
from layerlock.shared.errors import LayerlockError

_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), envvar="LAYERLOCK_DATA_DIR",
                         default=DEFAULT_DATA_DIR, show_default=True, help="Server data dir (env LAYERLOCK_DATA_DIR).")


@click.command()
@_DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print {admin_api_key, intake_pub, data_dir} as JSON.")
@click.option("--force", is_flag=True, help="Replace existing keys (old tokens and stored data keys die).")
def init(data_dir: Path, as_json: bool, force: bool) -> None:
    """Create the key directory and print the first admin API key (shown once)."""
    data_dir = data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        admin_key, intake_pub = initialise(data_dir / "keys", force=force)
    except (LayerlockError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"admin_api_key": admin_key, "intake_pub": intake_pub, "data_dir": str(data_dir)}))
        return
    click.echo(f"Initialised {data_dir}/keys")
    click.echo(f"intake public key (for `layerlock protect`): {intake_pub}")
    click.echo("First admin API key (shown once, store it now):")
    click.echo(admin_key)


def gunicorn_config() -> str:
    repo_conf = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"
    if repo_conf.exists():
        return str(repo_conf)
    return "python:layerlock.license_server.gunicorn_conf"


@click.command()
@_DATA_DIR
@click.option("--bind", default="127.0.0.1:8700", show_default=True, help="host:port (or unix:/path).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="gunicorn workers (default 2 × CPUs, at most 8).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Threads per worker (default 4).")
@click.option("--redis-url", envvar="LAYERLOCK_REDIS_URL", default="",
              help="Existing Redis (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://). "
                   "Unset: embedded.")
@click.option("--appendfsync", type=click.Choice(["everysec", "always"]), default=None,
              help="Embedded Redis AOF fsync policy (default everysec).")
@click.option("--config", "config_file", type=click.Path(exists=True), default=None, help="TOML config file.")
def serve(data_dir: Path, bind: str, workers: int | None, threads: int | None, redis_url: str,
          appendfsync: str | None, config_file: str | None) -> None:
    """Run the license server (gunicorn; embedded Redis unless --redis-url)."""
    data_dir = data_dir.resolve()
    if not (data_dir / "keys" / "signing.json").exists():
        raise click.ClickException(f"{data_dir} is not initialised: run `layerlock init --data-dir {data_dir}`")
    env = dict(os.environ, LAYERLOCK_DATA_DIR=str(data_dir), LAYERLOCK_BIND=bind, LAYERLOCK_REDIS_URL=redis_url)
    for name, value in (("LAYERLOCK_WORKERS", workers), ("LAYERLOCK_THREADS", threads),
                        ("LAYERLOCK_APPENDFSYNC", appendfsync), ("LAYERLOCK_CONFIG", config_file)):
        if value is not None:
            env[name] = str(value)
    if not redis_url:
        env.pop("LAYERLOCK_REDIS_URL")
    argv = [sys.executable, "-m", "gunicorn", "-c", gunicorn_config(), "layerlock.license_server.wsgi:app"]
    os.execve(sys.executable, argv, env)  # noqa: S606 - exec so signals reach gunicorn directly
