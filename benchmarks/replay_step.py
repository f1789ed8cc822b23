"""Cost of routing replay in a training step: forward + backward with and without replay.

The model: a transformers Qwen3-MoE with the shape of Qwen3-30B-A3B (128 experts, top-8, hidden
2048, expert width 768, 32 query / 4 KV heads of 128, vocabulary 151,936), bf16, random weights,
experts on ``grouped_mm``, as many decoder layers as fit the GPU with their gradients
(``--layers auto``; at most the real 48). The routes replayed are the model's own (recorded with
routecap's router hooks in a no-grad forward over the same batch, R2-style), so both variants
send every token to the same experts and do the same expert work: the difference is replay's
cost alone. They are given on the host, as ``routecap.align.batch_routes`` builds them.

Two variants, each timed two ways (below), all four interleaved in every repeat (their order
alternates):

* ``plain``   ``loss = CE(model(ids)); loss.backward()``
* ``replay``  the same inside ``with replay(model, routes_BSLK):``

Timed with the host clock between device synchronisations, two ways: ``synced``, one step per
synchronisation (host work before the forward, such as replay's checks of the routes, is fully
exposed), and ``pipelined``, ``--chunk`` steps back to back and one synchronisation, as a training
loop without per-step ``.item()`` runs (the next step's host work overlaps the queued device
work). Reported: min / median / max over the repeats, the ratio of medians, and the host time
of entering and leaving ``replay()`` alone (its checks of the routes and the installing of its
taps, before the forward launches anything). ``--profile`` adds the
top operators of one step of each variant by device time, to say where a difference goes.

GPU (the device):  python benchmarks/replay_step.py [--repeats 20] [--batch 4 --seq 1024]
CPU smoke test:    python benchmarks/replay_step.py --tiny --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from routecap.integrations.hf import attach_router_hooks, find_moe_routers
from routecap.replay import replay

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_capture_overhead as _capture_bench  # noqa: E402  (one home for the benchmark model)

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
            num_experts_per_tok=4, vocab_size=512)


def build_model(shape: dict[str, int], *, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A Qwen3-MoE of ``shape``: the capture benchmark's model (random weights, router scores well
    separated, grouped_mm experts), in train-ready form."""
    return _capture_bench.build_model(shape, seed=seed, device=device, dtype=dtype)


def bytes_per_layer(shape: dict[str, int], tokens: int, elem: int = 2) -> int:
    """Weights + gradients of one decoder layer, plus a rough allowance for its saved activations."""
    H, F_, E = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts"]
    K, heads, kv, hd = (shape["num_experts_per_tok"], shape["num_attention_heads"],
                        shape["num_key_value_heads"], shape["head_dim"])
    params = 3 * E * H * F_ + E * H + H * hd * (2 * heads + 2 * kv) + 2 * H
    acts = tokens * (12 * H + K * 6 * F_) * elem  # hidden states, attention, expert rows
    return 2 * params * elem + acts


def auto_layers(shape: dict[str, int], tokens: int) -> int:
    """As many layers as fit in 85% of the free device memory with gradients, at most the real 48."""
    free, _ = torch.cuda.mem_get_info()
    V, H = shape["vocab_size"], shape["hidden_size"]
    head = 2 * (2 * V * H * 2) + 3 * tokens * V * 4  # embeddings + lm head (+ grads), fp32 logits
    n = int((0.85 * free - head) // bytes_per_layer(shape, tokens))
    return max(1, min(shape["num_hidden_layers"], n))


def record_routes(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The model's own routes ``[B, S, L, K]`` over ``ids`` (routecap's router hooks), on the host."""
    info = find_moe_routers(model)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(info.sites)

    def capture(i: int, t: torch.Tensor) -> None:
        rows[i] = t.detach().clone()

    handles = attach_router_hooks(info, capture)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    B, S = ids.shape
    return torch.stack([r.reshape(B, S, -1) for r in rows], dim=2).cpu()


def step(model: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    V = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach()


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (CPU smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--layers", default="auto", help="decoder layers, or 'auto' (fit the GPU)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4,
                    help="steps back to back per sync in the pipelined timing (1: synced only)")
    ap.add_argument("--profile", action="store_true", help="top operators of one step each")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(TINY if args.tiny else QWEN3_30B_A3B)
    B, S = (2, 16) if args.tiny else (args.batch, args.seq)
    if args.layers == "auto":
        shape["num_hidden_layers"] = (auto_layers(shape, B * S) if device.startswith("cuda")
                                      else shape["num_hidden_layers"])
    else:
        shape["num_hidden_layers"] = int(args.layers)
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (B, S), generator=g).to(device)
    while True:  # the layer estimate is rough: on running out of memory, take 15% fewer layers
        try:
            model = build_model(shape, device=device, dtype=dtype).train()
            routes = record_routes(model, ids)
            step(model, ids)
            break
        except torch.OutOfMemoryError:
            model = None
            torch.cuda.empty_cache()
            if args.layers != "auto" or shape["num_hidden_layers"] == 1:
                raise
            shape["num_hidden_layers"] = max(1, int(shape["num_hidden_layers"] * 0.85))
            print(f"out of memory: retrying with {shape['num_hidden_layers']} layers")

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        step(model, ids)

    stats_seen: list[Any] = []

    def replayed() -> None:
        model.zero_grad(set_to_none=True)
        with replay(model, routes) as stats:
            step(model, ids)
        stats_seen.append(stats)

    variants = {"plain": plain, "replay": replayed}
    C = max(1, args.chunk)
    # two timings of each variant, interleaved: one step between device synchronisations (host
    # work before the forward is fully exposed), and C steps back to back with one
    # synchronisation at the end, as a training loop runs (the next step's host work overlaps
    # the device's queue); per-step time = chunk time / C
    modes = {"synced": 1, "pipelined": C} if C > 1 else {"synced": 1}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    keys = [(m, v) for m in modes for v in variants]
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(args.repeats):
        for m, v in (keys if r % 2 == 0 else list(reversed(keys))):
            fn, n = variants[v], modes[m]

            def chunk(fn=fn, n=n) -> None:
                for _ in range(n):
                    fn()

            times[(m, v)].append(timed(chunk, sync) / n)
    last = stats_seen[-1]
    L = len(find_moe_routers(model, probe=False).sites)
    assert last.fallback_cells == 0 and last.replayed_cells == B * S * L, last
    med = {k: statistics.median(v) for k, v in times.items()}
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device: {dev_name}; torch {torch.__version__}; Qwen3-MoE "
          f"{'tiny' if args.tiny else 'Qwen3-30B-A3B'} shape, {shape['num_hidden_layers']} layers "
          f"({L} MoE), top-{shape['num_experts_per_tok']} of {shape['num_experts']}, {dtype}; "
          f"batch {B} x {S} tokens; forward + backward; {args.repeats} interleaved repeats")
    ratios = {}
    for m in modes:
        label = "one step per sync" if m == "synced" else f"{modes[m]} steps per sync"
        print(f"{m} ({label}), ms per step:")
        for v in variants:
            t = times[(m, v)]
            print(f"  {v:7s} min {min(t) * 1e3:9.2f}  median {med[(m, v)] * 1e3:9.2f}  "
                  f"max {max(t) * 1e3:9.2f}")
        ratios[m] = med[(m, "replay")] / med[(m, "plain")]
        print(f"  replay / plain (medians): {ratios[m]:.4f}  ({(ratios[m] - 1) * 100:+.2f}%, "
              f"{(med[(m, 'replay')] - med[(m, 'plain')]) * 1e3:+.2f} ms a step)")
    ratio = ratios["synced"]
    plain_s = med[("synced", "plain")]

    def setup_only() -> None:
        with replay(model, routes):
            pass

    setup = statistics.median(timed(setup_only, sync) for _ in range(max(5, args.repeats)))
    print(f"  of which entering and leaving replay() (host: route checks, taps): "
          f"{setup * 1e3:.3f} ms ({setup / plain_s * 100:.2f}% of the plain step)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda")
                                         else [])
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        for name, fn in variants.items():
            with profile(activities=acts) as prof:
                fn()
                sync()
            print(f"--- {name}: top operators by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=12))
    return {"median_s": {f"{m}/{v}": t for (m, v), t in med.items()}, "ratio": ratio,
            "ratios": ratios, "layers": shape["num_hidden_layers"], "setup_s": setup}


if __name__ == "__main__":
    main()
