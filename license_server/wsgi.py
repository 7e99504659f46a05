"""WSGI entry point for gunicorn (``license_server.wsgi:app``): config from the environment."""

from license_server.app import create_app
from license_server.config import ServerConfig

app = create_app(ServerConfig.load())
