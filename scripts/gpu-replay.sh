#!/usr/bin/env bash
# Issue 13's GPU figures on one GPU: the replay step benchmark, the train-inference gap at the
# Qwen3-30B-A3B shape, then tests/gpu (replay and capture tests; the 2-GPU ones skip on 1 GPU).
# Runs with the device's own transformers (5.17) or with wheels carried in .whl (see gpu-multi.sh).
# Output also lands in $OUT (when set) as replay_step.txt, train_inference_gap.txt, tests_gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
OUTDIR=${OUT:-/tmp/gpu-replay}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# each part runs even if an earlier one failed (one device call gives every result); the exit
# status says whether all passed
failed=""
python3 benchmarks/replay_step.py --repeats 20 --profile 2>&1 | tee "$OUTDIR/replay_step.txt" \
    || failed="$failed replay_step"
python3 benchmarks/train_inference_gap.py --big 2>&1 | tee "$OUTDIR/train_inference_gap.txt" \
    || failed="$failed train_inference_gap"
python3 -m pytest -q -s tests/gpu 2>&1 | tee "$OUTDIR/tests_gpu.txt" || failed="$failed tests/gpu"
if [ -n "$failed" ]; then
    echo "FAILED:$failed"
    exit 1
fi
