#!/usr/bin/env bash
# Install seqlab into .venv and run its main job: the side-by-side lab on the quick preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/seqlab lab --preset quick "$@"
