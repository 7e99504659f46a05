"""``layerlock``: the vendor and ops command line.

``protect`` and ``harden`` work on local files; every other command talks to the REST API (``--server``,
``LAYERLOCK_API_KEY``), except ``init`` and ``serve`` which manage a server's own data dir.
"""

from __future__ import annotations

import click

from layerlock.license_server.cli.admin import init, serve
from layerlock.license_server.cli.demo import demo
from layerlock.license_server.cli.harden import harden
from layerlock.license_server.cli.ops import activate_offline, audit, keys, licenses, machines, models, webhooks
from layerlock.license_server.cli.protect import protect
from layerlock.license_server.cli.strength import assess, inspect
from layerlock.license_server.cli.trace import trace
from layerlock.license_server.cli.watermark import watermark


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="layerlock")
def main() -> None:
    """layerlock: protect models, run the license server, manage machines and licenses."""


main.add_command(protect)
main.add_command(inspect)
main.add_command(assess)
main.add_command(harden)
main.add_command(watermark)
main.add_command(trace)
for _cmd in (init, serve, demo, keys, machines, models, licenses, audit, activate_offline, webhooks):
    main.add_command(_cmd)
