#!/usr/bin/env bash
# Make sure Debian's Chromium and its ChromeDriver are installed, for the
# dashboard's browser test (tests/dashboard.rs). On a Debian machine (root)
# it installs the packages `chromium` and `chromium-driver` if missing; it
# does nothing when both are there.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
echo "ensure-chromium: installing chromium and chromium-driver" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
