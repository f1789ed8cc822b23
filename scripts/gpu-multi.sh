#!/usr/bin/env bash
# Issues 7 and 16 on a machine with 2+ GPUs (one process a GPU, NCCL): the multi-GPU capture tests
# (test_multi_gpu.py) and routing replay under FSDP2 and expert parallelism (test_multi_gpu_replay.py).
# The GPU machines here have transformers 5.17, which has no all-to-all expert parallelism; the
# EP scenarios need a newer transformers, carried as wheels in .whl (see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 hf-xet==1.8.0
# Without them the EP scenarios skip and the gathered/padded ones run.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -m pytest -q -s tests/gpu/test_multi_gpu.py tests/gpu/test_multi_gpu_replay.py
