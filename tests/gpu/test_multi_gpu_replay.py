"""Routing replay in training across real GPUs: FSDP2 and expert parallelism over NCCL (issue 16).

The worker of the CPU tests (tests/distributed/replay_worker.py, see test_replay_dist.py) with one
process per GPU and NCCL. The single-process reference runs on one GPU over the combined batch.

- FSDP2 (``fully_shard``): a training step of the built-in model, of a small Qwen3-MoE and of a
  small DeepSeek-V3 (group-limited sigmoid router, routed scaling), uneven batches, one rank with
  a padding-only dummy batch: the ranks' losses add up to the single-GPU loss and the full
  gradients equal the single-GPU ones; the experts received the recorded ids in every cell.
- transformers' all-to-all expert parallelism across the two GPUs, uneven batches, a dummy rank:
  the ids each rank dispatched equal the recorded ones in every cell, every expert received
  (after the all-to-all, on the other GPU too) exactly the hidden rows of the tokens whose routes
  name it, and loss and gradients equal the single-GPU run.
- replay adds no collective (same NCCL calls with and without it).

Run on a 2-GPU machine (scripts/gpu-multi.sh runs this and tests/gpu/test_multi_gpu.py):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        PYTHONPATH=src python -m pytest -q tests/gpu/test_multi_gpu_replay.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from distributed.launch import NCCL_ENV, run_ranks, transformers_has_ep  # noqa: E402
from distributed.replay_worker import check_case, make_case  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
WORKER = HERE.parent / "distributed" / "replay_worker.py"
# GPU reductions (attention, matmul splits) differ in order between one batch and two shards
RTOL, ATOL = 1e-3, 1e-5
FSDP = [("builtin", [3, 1]), ("qwen3_moe", [0, 3]), ("deepseek_v3", [2, 0])]
EP = [("qwen3_moe", [3, 0]), ("qwen3_moe", [1, 4]), ("deepseek_v3", [2, 0])]


def _run(tmp_path: Path, arch: str, counts: list[int], mode: str) -> None:
    case = make_case(tmp_path, arch, counts, device="cuda:0")
    run_ranks(WORKER, ["--case", str(tmp_path / "case.pt"), "--mode", mode, "--out",
                       str(tmp_path), "--device", "cuda"], 2, env=NCCL_ENV, timeout=600)
    res = check_case(tmp_path, case, 2, mode=mode, rtol=RTOL, atol=ATOL)
    n = sum(len(o["collectives"]["plain"]) for o in res["outs"])
    print(f"{mode} {arch} {counts}: own routing differs in {res['disagreement']:.1%} of the "
          f"cells; replayed exactly; {n} collective events, the same with and without replay")


@pytest.mark.parametrize("arch,counts", FSDP, ids=[f"{a}-{'-'.join(map(str, c))}" for a, c in FSDP])
def test_fsdp2_replay_two_gpus_equal_one_gpu(tmp_path, arch, counts):
    _run(tmp_path, arch, counts, "fsdp")


@pytest.mark.parametrize("arch,counts", EP, ids=[f"{a}-{'-'.join(map(str, c))}" for a, c in EP])
def test_expert_parallel_replay_two_gpus_equal_one_gpu(tmp_path, arch, counts):
    if not transformers_has_ep():
        pytest.skip("this transformers has no all-to-all expert parallelism (carry 5.24 wheels)")
    _run(tmp_path, arch, counts, "ep")
