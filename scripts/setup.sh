#!/usr/bin/env bash
# Set up everything on a fresh machine: real Fashion-MNIST (Debian package), a virtualenv in
# .venv with the CPU build of PyTorch, and this package (editable) with its test and ray extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is pinned to the CPU wheel that lies on this disk; an unpinned torch pulls a CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
# The ray extra too: CI runs the Ray backend's tests (pytest -m ray).
.venv/bin/python -c "import soda_backdoor, sklearn, pytest, hypothesis, ray" 2>/dev/null || .venv/bin/pip install -q -e '.[test,ray]'
echo "setup done: .venv/bin/soda is ready" >&2
