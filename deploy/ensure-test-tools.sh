#!/usr/bin/env bash
# System tools the test suite checks the deploy/ files with: nginx (nginx -t on the TLS example)
# and systemd-analyze (systemd-analyze verify on the units); and the headless browser the console's
# end-to-end tests drive (tests/e2e/test_console_browser.py): Debian's chromium + chromium-driver
# (selenium is given the driver's path, so nothing downloads a browser build) and a font to render
# text in its screenshots. As root with apt-get they are installed from Debian's packages;
# otherwise the tests that need them fail and name the package.
# Extra arguments name further packages wanted if their command is missing (`make bench`: wrk).
set -euo pipefail
missing=()
for extra in "$@"; do command -v "$extra" >/dev/null 2>&1 || missing+=("$extra"); done
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)  # tests/test_harden.py compiles Cython's C
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} from Debian's packages (for the deploy/ and browser tests)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
else
  echo "warning: ${missing[*]} missing and not root: the deploy/ and browser tests will fail (apt install ${missing[*]})" >&2
fi
