#!/usr/bin/env bash
# Make Debian's headless-capable Chromium and its WebDriver available for the browser tests
# (tests/test_explorer_browser.py). Installs the packages chromium and chromium-driver with apt
# when either binary is missing (needs root; a browser download at test time is not possible
# on CI here). Prints "<chromium path> <chromedriver path>" on its last line.
set -euo pipefail

find_bin() {
  for name in "$@"; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}

browser=$(find_bin chromium chromium-browser || true)
driver=$(find_bin chromedriver chromium-driver || true)
if [ -z "$browser" ] || [ -z "$driver" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "chromium or chromedriver missing: as root, apt-get install -y chromium chromium-driver" >&2
    exit 1
  fi
  echo "installing chromium and chromium-driver" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium chromium-driver fonts-liberation >/dev/null
  browser=$(find_bin chromium chromium-browser)
  driver=$(find_bin chromedriver chromium-driver)
fi
echo "$browser $driver"
