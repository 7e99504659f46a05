"""WSGI entry point for gunicorn (``layerlock.license_server.wsgi:app``): config from the environment."""

from layerlock.license_server.app import create_app
from layerlock.license_server.config import ServerConfig

app = create_app(ServerConfig.load())
