"""Routing replay in distributed training (issue 13 item 5), gloo on CPU: 2 and 4 processes.

FSDP2 (``fully_shard``) data parallel and transformers' all-to-all expert parallelism. Each rank
replays its own right-padded batch (uneven sizes and lengths; a rank with no sequence runs a
padding-only dummy batch whose cells all fall back to the live router). The trained model's
router is perturbed so that its own routing differs from the recorded one. Under replay:

- the ranks' losses add up to, and the full gradients equal, those of a single process over the
  combined batch under replay;
- the ids every MoE block's experts received equal the recorded ones in every (token, layer)
  cell, and under expert parallelism every expert, on whichever rank holds it, received after
  the all-to-all exactly the hidden rows of the tokens whose routes name it, from every rank;
- replay adds no collective: the profiler lists the same collective calls (kind and count) for
  the step with and without replay.

The worker and the case building live in replay_worker.py; the GPU version of these scenarios
(NCCL, one GPU a rank) is tests/gpu/test_multi_gpu_replay.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distributed.launch import run_ranks, transformers_has_ep  # noqa: E402
from distributed.replay_worker import check_case, make_case  # noqa: E402

pytestmark = pytest.mark.distributed
WORKER = HERE / "replay_worker.py"


needs_ep = pytest.mark.skipif(not transformers_has_ep(),
                              reason="this transformers has no all-to-all expert parallelism")


def _run(tmp_path: Path, arch: str, counts: list[int], mode: str, *,
         checkpointing: bool = False) -> dict:
    case = make_case(tmp_path, arch, counts, checkpointing=checkpointing)
    run_ranks(WORKER, ["--case", str(tmp_path / "case.pt"), "--mode", mode,
                       "--out", str(tmp_path)], len(counts))
    return check_case(tmp_path, case, len(counts), mode=mode)


@pytest.mark.parametrize("arch,counts", [
    ("builtin", [3, 1]),
    pytest.param("deepseek_v3", [0, 3], marks=pytest.mark.slow),  # a dummy rank, group-limited
], ids=["builtin-3-1", "deepseek_v3-0-3"])
def test_fsdp2_replay_equals_one_process(tmp_path, arch, counts):
    res = _run(tmp_path, arch, counts, "fsdp")
    print(f"{arch} {counts}: own routing differs in {res['disagreement']:.1%} of the cells")


@pytest.mark.slow
def test_fsdp2_replay_under_gradient_checkpointing(tmp_path):
    # the recomputed forward in backward replays the same ids (checked for both calls)
    _run(tmp_path, "qwen3_moe", [2, 1], "fsdp", checkpointing=True)


@needs_ep
@pytest.mark.parametrize("counts", [[3, 0], pytest.param([1, 2, 0, 3], marks=pytest.mark.slow)],
                         ids=["w2-3-0", "w4-1-2-0-3"])
def test_expert_parallel_replay_equals_one_process(tmp_path, counts):
    _run(tmp_path, "qwen3_moe", counts, "ep")


@needs_ep
@pytest.mark.slow
def test_expert_parallel_replay_group_limited_router(tmp_path):
    _run(tmp_path, "deepseek_v3", [2, 1], "ep")
