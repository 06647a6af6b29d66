#!/usr/bin/env bash
# Install seqlab with its test extras (dev, plus hf and onnx for the interop checks) into .venv and run the test
# suite (CPU only, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,hf,onnx  # hf, onnx: the Hugging Face parity and ONNX checks (CPU wheels, ~1.5 min)
exec .venv/bin/python -m pytest "$@"
