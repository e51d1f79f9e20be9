#!/usr/bin/env bash
# The browser test (tests/test_ui_browser.py) drives Debian's chromium through Playwright:
# `playwright install` cannot download its own browser build here, so install the package.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
chromium --version
