"""Data- and expert-parallel capture across real GPUs with NCCL (needs 2 GPUs; issue 7).

The same worker as the CPU tests (tests/distributed/worker.py), one process per GPU with NCCL:
transformers' expert parallelism with all-to-all dispatch (the local layout) and routecap's
gathered and padded dispatch, uneven batches, one rank with a dummy batch. Every rank's routes
must equal those of a single-GPU forward over each request's tokens (teacher forcing on one
GPU), every request returned exactly once.

Run on a 2-GPU machine:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        PYTHONPATH=src python -m pytest -q tests/gpu/test_multi_gpu.py
CUDA graphs: transformers' all-to-all expert parallelism reads the split sizes of every layer's
all-to-all back to the host (``.tolist()``), which a CUDA graph cannot capture, so decode under
CUDA graphs is not run for the local layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from distributed.launch import NCCL_ENV, run_ranks, transformers_has_ep  # noqa: E402
from test_hf import MARGIN_TOL, _flips, _reference_routes  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from routecap.files import load_file  # noqa: E402
from routecap.integrations.hf import find_moe_routers  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
WORKER = HERE.parent / "distributed" / "worker.py"
SCENARIOS = [("gathered", [3, 0]), ("gathered", [1, 4]), ("gathered_padded", [2, 3]),
             ("local", [3, 0]), ("local", [2, 1])]


@pytest.mark.parametrize("layout,counts", SCENARIOS,
                         ids=[f"{a}-{'-'.join(map(str, b))}" for a, b in SCENARIOS])
def test_two_gpus_equal_one_gpu(tmp_path, layout, counts):
    args = ["--layout", layout, "--out", str(tmp_path), "--counts", ",".join(map(str, counts)),
            "--device", "cuda"]
    if layout == "local":
        if not transformers_has_ep():
            pytest.skip("this transformers has no all-to-all expert parallelism")
        tiny_model("qwen3_moe", seed=0).save_pretrained(tmp_path / "model")
        args += ["--ep-model", str(tmp_path / "model")]
    run_ranks(WORKER, args, 2, env=NCCL_ENV, timeout=600)
    model = tiny_model("qwen3_moe", seed=0).cuda()
    info = find_moe_routers(model)
    got = {}
    for f in sorted(tmp_path.glob("rank*.safetensors")):
        for t in load_file(f):
            assert t.request_id not in got  # returned once
            got[t.request_id] = t
    assert len(got) == sum(counts)
    flips = 0
    for t in got.values():
        assert t.missing is None
        ref, margins = _reference_routes(model, info, t.token_ids)
        bad = _flips(t.expert_ids.astype(np.int64), ref, False)
        assert (margins[bad] < MARGIN_TOL).all(), (t.request_id, np.argwhere(bad).tolist())
        flips += int(bad.sum())
    print(f"{layout} {counts}: {len(got)} requests, {flips} near-tie flips")


def test_cli_nproc_2_on_two_gpus_equals_one_gpu(tmp_path):
    """`routecap capture --nproc 2 --device cuda`: ranks forked from the launcher's fork server
    (which imported torch but never touched CUDA) each drive their own GPU; the traces equal one
    GPU's but for float ties the batch composition may flip."""
    import os
    import subprocess

    from routecap.files import open_traces

    root = HERE.parents[1]
    args = [sys.executable, "-m", "routecap", "capture", "--model", "builtin:tiny-qwen3-moe",
            "--prompts", "examples/prompts.txt", "--max-new-tokens", "4", "--batch-size", "4",
            "--device", "cuda", "--dtype", "float32"]
    env = dict(os.environ, **NCCL_ENV)
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        r = subprocess.run([*args, "--out", str(tmp_path / name), *extra], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one = {t.request_id: t for t in open_traces(tmp_path / "one")}
    two = open_traces(tmp_path / "two")
    assert two.complete and sorted(two.request_ids()) == sorted(one)
    same = cells = 0
    for t in two:
        o = one[t.request_id]
        assert t.num_tokens == o.num_tokens and t.prompt_len == o.prompt_len
        assert t.missing is None
        a, b = np.sort(t.expert_ids, -1), np.sort(o.expert_ids, -1)
        same += int((a == b).all(-1).sum())
        cells += a.shape[0] * a.shape[1]
    assert same / cells >= 0.99, f"{same}/{cells} cells equal"
