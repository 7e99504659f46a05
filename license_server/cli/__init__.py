"""``layerlock``: the vendor and ops command line.

``protect`` works on local files; every other command talks to the REST API (``--server``,
``LAYERLOCK_API_KEY``), except ``init`` and ``serve`` which manage a server's own data dir.
"""

from __future__ import annotations

import click

from layerlock.license_server.cli.admin import init, serve
from layerlock.license_server.cli.demo import demo
from layerlock.license_server.cli.ops import audit, keys, licenses, machines, models
from layerlock.license_server.cli.protect import protect


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="layerlock")
def main() -> None:
    """layerlock: protect models, run the license server, manage machines and licenses."""


main.add_command(protect)
for _cmd in (init, serve, demo, keys, machines, models, licenses, audit):
    main.add_command(_cmd)
