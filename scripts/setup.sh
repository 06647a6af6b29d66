#!/usr/bin/env bash
# Create .venv and install seqlab into it. torch 2.13.0 is installed first and pinned, so pip takes the CPU wheel
# instead of resolving a newer build with several GB of CUDA packages. Usage: scripts/setup.sh [EXTRAS], e.g. dev.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${1:+[$1]}"
