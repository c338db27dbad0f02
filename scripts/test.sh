#!/usr/bin/env bash
# Run the whole test suite (sets up first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report test renders report.html in a real headless browser (Debian chromium).
if ! command -v chromium >/dev/null && [ -z "${SODA_NO_BROWSER:-}" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; }; } \
    || echo "chromium could not be installed: the browser test will be skipped" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
