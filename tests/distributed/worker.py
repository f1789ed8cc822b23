"""One rank of a multi-process capture scenario; launched by ``launch.run_ranks``.

Ranks are laid out as ``rank = dp_rank * TP + tp_rank`` (with ``--strided-tp``,
``tp_rank * DP + dp_rank``). Each DP rank captures its own requests (a rank with none runs a
one-token dummy batch to keep the group in step) and the publishing rank of each TP group saves
its traces with routecap's own trace files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for tiny_models

from distributed.rank_setup import init_group, load_ep_model, rank_device  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from routecap.files import save_file  # noqa: E402
from routecap.integrations.hf import HFRouteCapture, ParallelConfig, capture_generate  # noqa: E402


def requests(seed: int, counts: list[int]) -> list[list[tuple[str, list[int]]]]:
    """Per DP rank, its requests as (request id, prompt token ids); lengths uneven."""
    g = np.random.default_rng(seed)
    out, k = [], 0
    for n in counts:
        mine = []
        for _ in range(n):
            length = int(g.integers(1, 9))
            mine.append((f"req{k}", [int(t) for t in g.integers(3, 300, length)]))
            k += 1
        out.append(mine)
    return out


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    W = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), W, dtype=torch.long)
    mask = torch.zeros(len(prompts), W, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, W - len(p):] = torch.tensor(p)
        mask[b, W - len(p):] = 1
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--counts", required=True, help="requests per DP rank, e.g. 3,0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ep-model", default=None, help="load this folder with transformers EP")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    ap.add_argument("--strided-tp", action="store_true", help="TP peers are DP ranks apart")
    args = ap.parse_args()
    rank, world, device = rank_device(args.device)
    torch.manual_seed(args.seed + rank)
    TP = args.tp
    DP = world // TP
    # world rank = dp_rank * TP + tp_rank, or with --strided-tp tp_rank * DP + dp_rank (TP peers
    # DP apart, as a launcher that places TP groups across nodes makes them)
    dp_rank, tp_rank = divmod(rank, TP) if not args.strided_tp else (rank % DP, rank // DP)

    def world_rank(d: int, t: int) -> int:
        return t * DP + d if args.strided_tp else d * TP + t
    if args.ep_model:
        model = load_ep_model(args.ep_model, world).eval()
    else:
        init_group(device)
        model = tiny_model("qwen3_moe", seed=args.seed).to(device)
    # every rank creates every group, in the same order
    tp_groups = [dist.new_group(sorted(world_rank(d, t) for t in range(TP))) for d in range(DP)]
    dp_groups = [dist.new_group(sorted(world_rank(d, t) for d in range(DP))) for t in range(TP)]
    parallel = ParallelConfig(layout=args.layout, dp_group=dp_groups[tp_rank],
                              tp_group=tp_groups[dp_rank] if TP > 1 else None, world_group=None)
    counts = [int(c) for c in args.counts.split(",")]
    assert len(counts) == DP, (counts, DP)
    mine = requests(args.seed, counts)[dp_rank]
    cap = HFRouteCapture(model, parallel=parallel)
    if mine:
        ids, mask = left_pad([p for _, p in mine])
    else:
        ids, mask = torch.tensor([[3]]), torch.tensor([[1]])
    ids, mask = ids.to(device), mask.to(device)
    with cap:
        traces, seq = capture_generate(
            model, ids, mask, capture=cap, request_ids=[r for r, _ in mine] or None,
            dummy=not mine, max_new_tokens=args.max_new_tokens, do_sample=False,
            eos_token_id=[], pad_token_id=0)
    out = Path(args.out)
    if traces:
        save_file(traces, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "dp_rank": dp_rank, "tp_rank": tp_rank, "publishes": cap.publishes,
        "num_traces": len(traces), "sequences": seq.tolist() if mine else [],
        "request_ids": [r for r, _ in mine], "steps": cap.steps}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
