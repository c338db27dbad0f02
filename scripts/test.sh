#!/usr/bin/env bash
# Run the test suite (sets up first if needed). Extra arguments go to pytest.
#   bash scripts/test.sh          everything (CI): unit, CLI, study front ends, real-data end to end
#   bash scripts/test.sh --fast   the fast tier (under 2 minutes on 2 cores): no test marked slow;
#                                 covers `soda run` and its resume on tiny data the tests write
set -euo pipefail
cd "$(dirname "$0")/.."
FAST=()
if [ "${1:-}" = "--fast" ]; then
  shift
  FAST=(-m "not slow")
  export SODA_NO_BROWSER=1  # the browser test is slow anyway
fi
bash scripts/setup.sh
# The report test renders report.html in a real headless browser (Debian chromium).
if ! command -v chromium >/dev/null && [ -z "${SODA_NO_BROWSER:-}" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; }; } \
    || echo "chromium could not be installed: the browser test will be skipped" >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "${FAST[@]}" "$@"
