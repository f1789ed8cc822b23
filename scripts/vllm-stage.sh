#!/usr/bin/env bash
# The optional vLLM test stage: vLLM 0.19.1 (the last release with the seed's DP capture bug) in
# its own virtual environment, .venv-vllm, with routecap installed into it; then tests/vllm_stage.
# About 5 minutes and 11 GB the first time (vLLM pulls the CUDA build of torch 2.10; it imports
# and runs these tests without a GPU). .ci/run runs it when ROUTECAP_VLLM_STAGE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -f "$VENV/.routecap-installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q vllm==0.19.1
    "$VENV/bin/pip" install -q -e '.[test]'
    touch "$VENV/.routecap-installed"
fi
"$VENV/bin/python" -m pytest -q tests/vllm_stage
