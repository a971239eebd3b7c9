#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/test_ui_browser.py, marked `browser`).
# Uses the system package manager; never `playwright install` (it downloads from a CDN).
# Idempotent: does nothing when a `chromium` (or chromium-browser) binary is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "install_browser: chromium already present at $(command -v chromium)" >&2
  exit 0
fi
if command -v chromium-browser >/dev/null 2>&1; then
  echo "install_browser: chromium-browser present at $(command -v chromium-browser)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_browser: need root (or sudo) to apt-get install chromium" >&2; exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get; install Chromium with your package manager and put 'chromium' on PATH" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
command -v chromium >/dev/null 2>&1 || { echo "install_browser: chromium still missing after apt-get" >&2; exit 1; }
echo "install_browser: installed $(chromium --version 2>/dev/null || echo chromium)" >&2
