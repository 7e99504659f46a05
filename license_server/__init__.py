"""The license server: Flask app (factory in :mod:`layerlock.license_server.app`) + gunicorn + Redis."""
