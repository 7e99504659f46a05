"""``layerlock demo``: see :mod:`layerlock.demo.run`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data/demo"),
              show_default=True, help="Where the demo keeps everything. WIPED at every start.")
@click.option("--port", type=click.IntRange(0, 65535), default=8700, show_default=True,
              help="License server port on 127.0.0.1 (a free one is picked if taken).")
def demo(data_dir: Path, port: int) -> None:
    """Run the whole product locally: license server with embedded Redis, a verifier sidecar,
    and a demo model protected, licensed, unlocked and scored. Ctrl-C stops everything."""
    from layerlock.demo.run import main

    raise SystemExit(main(data_dir, port))
