"""The license server: Flask app (factory in :mod:`license_server.app`) + gunicorn + Redis."""
