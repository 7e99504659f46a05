# gunicorn configuration for the layerlock license server.
#
#   python -m gunicorn -c deploy/gunicorn.conf.py layerlock.license_server.wsgi:app
#   (or `layerlock serve`, which uses this file when it exists next to the package)
#
# The settings and hooks live in license_server/gunicorn_conf.py so an installed package works
# without this repository; override any of them below (plain gunicorn setting names).
# worker_class is gthread with JSON error replies; keep bind on loopback behind nginx
# (deploy/nginx-tls.conf): gunicorn must not face clients directly (slow clients stall it).
# Environment: LAYERLOCK_BIND, LAYERLOCK_WORKERS, LAYERLOCK_THREADS, plus every LAYERLOCK_*
# server setting (see license_server/config.py), and LAYERLOCK_REDIS_URL (unset: embedded Redis).
from layerlock.license_server.gunicorn_conf import *  # noqa: F401,F403
