#!/usr/bin/env bash
# Chromium and its matching chromedriver for the web UI tests (tests/server/test_web_ui.py drives
# Debian's Chromium through Selenium; those tests fail, never skip, without them). Run by
# `make test` before pytest: installed from Debian's packages when missing and run as root,
# otherwise it stops and says what to install. LMSERVE_CHROMIUM / LMSERVE_CHROMEDRIVER point the
# tests at a browser installed elsewhere, and are accepted here too.
set -euo pipefail
. "$(dirname "$0")/apt.sh"

_have() { [ -n "${!1:-}" ] && [ -x "${!1}" ] || command -v "${@:2}" >/dev/null 2>&1; }
if _have LMSERVE_CHROMIUM chromium || _have LMSERVE_CHROMIUM chromium-browser \
        || _have LMSERVE_CHROMIUM google-chrome; then browser=1; else browser=; fi
if [ -n "$browser" ] && _have LMSERVE_CHROMEDRIVER chromedriver; then exit 0; fi
lmserve_apt_install "the web UI tests' browser (Chromium and chromedriver)" chromium chromium-driver
command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    || _lmserve_apt_fail "chromium / chromedriver still not on PATH after apt-get install"
