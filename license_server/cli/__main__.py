"""``python -m license_server.cli`` — same as the ``layerlock`` script."""

from layerlock.license_server.cli import main

main(prog_name="layerlock")
