"""GPU cost of route capture: CUDA-graph decode and an eager prefill, side by side.

The model: a transformers Qwen3-MoE with the shape of Qwen3-30B-A3B (48 layers, 128 experts,
top-8, hidden 2048, expert width 768, 32 query / 4 KV heads of 128, vocabulary 151,936), bf16,
random weights; experts on ``grouped_mm`` (the implementation that captures into a CUDA graph).

Decode (batch 1, 32, 256; a context of 512 tokens per sequence in a ``StaticCache``) runs under an
explicit ``torch.cuda.CUDAGraph``: one graph per batch size and variant, captured once and
replayed every step with new token ids. The step's inputs are static tensors (token ids,
positions, a prepared 4-D attention mask) and the graph resets the cache's write position at its
start, so every replay is the same step. Three variants, interleaved in every repeat:

* ``none``      the graph of the model alone;
* ``routecap``  routecap's whole path: router hooks copying ids into the device step buffer inside
  the graph (``StepCapturer.graph_step``: narrowing and cell states too), then per step
  ``publish`` (an asynchronous copy to pinned memory), ``poll`` and the ``RouteStore`` ingest of
  every request's row;
* ``hooks``     what one writes by hand: forward hooks that copy each router's ids to the host.
  They synchronise with the device, so they cannot run inside a CUDA graph: this variant runs the
  step eagerly, which is its true cost.

Prefill (one request of 8192 tokens, eager, as engines run prefills) has the same three variants,
routecap's path there being the eager ``begin_step`` / ``end_step``.

Each repeat times a chunk of steps per variant with the host clock after a device synchronise, so
host work that does not overlap the device is counted. Reported: min / median / max step time over
the repeats and the ratio of medians to ``none``. Before timing, routecap's decode loop runs once
under ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host synchronisation inside the
captured step, ``publish`` or ``poll`` raises.

Run on a CUDA machine: python benchmarks/gpu_capture_overhead.py [--repeats 20] [--small]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from routecap.capturer import CaptureSpec, StepCapturer
from routecap.integrations.hf import attach_router_hooks, find_moe_routers
from routecap.store import RouteStore

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936)
SMALL = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_experts=32, num_experts_per_tok=4, vocab_size=1024)


def build_model(shape: dict[str, int], *, seed: int = 0, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> Any:
    """A Qwen3-MoE of ``shape`` (on CUDA in bf16 by default), random weights, grouped_mm experts,
    sdpa. Also the model of benchmarks/replay_step.py."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**shape, max_position_embeddings=16384, norm_topk_prob=True,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, shape["hidden_size"] ** -0.5)  # well-separated router scores
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def _cache_kwarg(model: Any) -> str:
    params = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class DecodeStep:
    """One decode step of ``batch`` sequences at position ``context`` over a StaticCache, with
    static inputs so that it can be captured into a CUDA graph and replayed."""

    model: Any
    batch: int
    context: int
    seed: int = 0
    input_ids: torch.Tensor = field(init=False)
    position_ids: torch.Tensor = field(init=False)
    mask: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        from transformers import StaticCache

        m, B, C = self.model, self.batch, self.context
        dev = next(m.parameters()).device
        self.cache = StaticCache(config=m.config, max_cache_len=C + 1)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        V = m.config.vocab_size
        prompt = torch.randint(0, V, (B, C), generator=g).to(dev)
        kw = _cache_kwarg(m)
        with torch.no_grad():  # fill the cache, every row at once, about 8192 tokens a forward
            for c0 in range(0, C, max(1, 8192 // B)):
                c1 = min(C, c0 + max(1, 8192 // B))
                pos = torch.arange(c0, c1, device=dev)[None].expand(B, -1)
                m.model(input_ids=prompt[:, c0:c1], position_ids=pos, use_cache=True,
                        **{kw: self.cache})
        self.layers = [layer for layer in self.cache.layers]
        self.input_ids = torch.randint(0, V, (B, 1), generator=g).to(dev)
        self.position_ids = torch.full((B, 1), C, dtype=torch.long, device=dev)
        # a prepared 4-D mask (every cached column and the new one visible) is used as is:
        # nothing in the step depends on the host
        self.mask = torch.ones((B, 1, 1, C + 1), dtype=torch.bool, device=dev)
        self.kw = kw
        self._pos = torch.tensor(C, device=dev)

    def __call__(self) -> Any:
        for layer in self.layers:  # write position C every time: each replay is the same step
            layer.cumulative_length.copy_(self._pos)
        return self.model.model(input_ids=self.input_ids, position_ids=self.position_ids,
                                attention_mask=self.mask, use_cache=True,
                                **{self.kw: self.cache})


def capture_graph(fn: Callable[[], Any], *, around: Callable[[], Any] | None = None
                  ) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream, then capture it (inside ``around()`` if given)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            if around is None:
                fn()
            else:
                with around():
                    fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        if around is None:
            fn()
        else:
            with around():
                fn()
    return g


class RoutecapPath:
    """routecap's whole path for one model: router hooks -> step buffer -> pinned host -> store."""

    def __init__(self, model: Any, *, max_tokens: int, requests: int, graph: bool):
        self.info = find_moe_routers(model)
        info = self.info
        self.store = RouteStore(num_experts=info.num_experts, moe_layers=info.moe_layers,
                                top_k=info.top_k, block_size=16, budget_bytes=2 << 30)
        self.cap = StepCapturer(CaptureSpec(num_layers=len(info.sites), top_k=info.top_k,
                                            num_experts=info.num_experts, max_tokens=max_tokens),
                                device="cuda", sink=self._ingest, growable=not graph)
        self.requests = requests
        self.next_pos = [0] * requests  # host-side: steps reach the store after their copy
        for r in range(requests):
            self.store.add_request(r, prompt_len=0)
        self.handles: list[Any] = []
        self.segments: list[tuple[int, int, int, int]] = []
        self.steps = 0

    def _ingest(self, snap: Any) -> None:
        self.store.ingest(snap.expert_ids_NLK, snap.valid_NL, snap.tag)

    def hook(self) -> None:
        self.handles = attach_router_hooks(self.info, self.cap.capture)

    def unhook(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def next_tag(self, rows_per_request: int) -> list[tuple[int, int, int, int]]:
        """Segments of the next step: request r's rows at its next positions."""
        tag = [(r, self.next_pos[r], r * rows_per_request, rows_per_request)
               for r in range(self.requests)]
        for r in range(self.requests):
            self.next_pos[r] += rows_per_request
        return tag


class HostCopyHooks:
    """The hand-written baseline: per-layer forward hooks that copy ids to the host."""

    def __init__(self, model: Any):
        self.info = find_moe_routers(model)
        self.rows: list[np.ndarray] = []
        self.handles: list[Any] = []

    def hook(self) -> None:
        def h(module: Any, args: Any, out: Any, slot: int = self.info.sites[0].index_slot) -> None:
            self.rows.append(out[slot].to("cpu").numpy())  # a device sync per layer

        self.handles = [s.module.register_forward_hook(h) for s in self.info.sites]

    def unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.rows.clear()


def _timed(fn: Callable[[], None], steps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _report(title: str, times: dict[str, list[float]]) -> dict[str, float]:
    base = statistics.median(times["none"])
    print(f"\n{title}")
    print(f"  {'variant':<10} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'vs none':>10}")
    ratios = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios[name] = med / base
        print(f"  {name:<10} {min(ts) * 1e3:>9.3f} {med * 1e3:>10.3f} {max(ts) * 1e3:>9.3f} "
              f"{(med / base - 1) * 100:>+9.2f}%")
    return ratios


def bench_decode(model: Any, batch: int, *, context: int, repeats: int, chunk: int) -> dict:
    step = DecodeStep(model, batch, context)
    g_none = capture_graph(step)
    rc = RoutecapPath(model, max_tokens=batch, requests=batch, graph=True)
    rc.hook()
    try:
        g_rc = capture_graph(step, around=lambda: rc.cap.graph_step(batch))
    finally:
        rc.unhook()

    def run_rc() -> None:
        g_rc.replay()
        rc.cap.publish(batch, tag=rc.next_tag(1))
        rc.cap.poll()

    # no device-to-host sync inside the captured step, publish or poll
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run_rc()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rc.cap.drain()
    base = HostCopyHooks(model)

    def run_hooks() -> None:
        base.hook()
        try:
            with torch.no_grad():
                step()
        finally:
            base.unhook()

    variants = {"none": g_none.replay, "routecap": run_rc, "hooks": run_hooks}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        _timed(fn, 2)
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn, chunk))
    rc.cap.drain()
    ratios = _report(f"decode, batch {batch}, context {context}, CUDA graph (explicit "
                     f"torch.cuda.CUDAGraph); {repeats} interleaved repeats x {chunk} steps",
                     times)
    got = rc.store.take(0)
    assert got.missing is None and got.num_tokens > 0  # every published row reached the store
    return {"batch": batch, "ratios": ratios,
            "medians_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}


def bench_prefill(model: Any, tokens: int, *, repeats: int) -> dict:
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=dev)
    rc = RoutecapPath(model, max_tokens=tokens, requests=1, graph=False)
    base = HostCopyHooks(model)

    def run_none() -> None:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)

    def run_rc() -> None:
        rc.hook()
        try:
            rc.cap.begin_step(tokens, tag=rc.next_tag(tokens))
            with torch.no_grad():
                model.model(input_ids=ids, use_cache=False)
            rc.cap.end_step()
            rc.cap.poll()
        finally:
            rc.unhook()

    def run_hooks() -> None:
        base.hook()
        try:
            with torch.no_grad():
                model.model(input_ids=ids, use_cache=False)
        finally:
            base.unhook()

    variants = {"none": run_none, "routecap": run_rc, "hooks": run_hooks}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        _timed(fn, 1)
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn, 1))
    rc.cap.drain()
    ratios = _report(f"prefill, {tokens} tokens, eager; {repeats} interleaved repeats", times)
    return {"tokens": tokens, "ratios": ratios,
            "medians_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}


def _device_events(fn: Callable[[], None]) -> tuple[int, int, float]:
    """(kernels, memcpys, device microseconds) that one call of ``fn`` puts on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = memcpys = 0
    us = 0.0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name.lower()
        if "memcpy" in name:
            memcpys += 1
        elif "memset" not in name:
            kernels += 1
        us += float(getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0))
    return kernels, memcpys, us


def profile_capture_step(num_layers: int, top_k: int, num_experts: int, tokens: int) -> dict:
    """The device work routecap adds to one eager step of ``tokens`` rows, counted by the profiler.

    The step is routecap's alone (begin_step, one capture per MoE layer of ids already on the
    device, end_step with its copy to pinned memory), so every kernel counted is routecap's: the
    floor is one copy per layer.
    """
    try:
        from routecap.capture_kernels import fused_available
    except ImportError:  # an older routecap (the --kernels-only comparison against a checkout)
        def fused_available(device: torch.device) -> bool:
            return False

    cap = StepCapturer(CaptureSpec(num_layers=num_layers, top_k=top_k, num_experts=num_experts,
                                   max_tokens=tokens), device="cuda", sink=lambda snap: None)
    ids = [torch.randint(0, num_experts, (tokens, top_k), device="cuda")
           for _ in range(num_layers)]

    def step() -> None:
        cap.begin_step(tokens)
        for layer, x in enumerate(ids):
            cap.capture(layer, x)
        cap.end_step()

    step()
    cap.drain()
    kernels, memcpys, us = _device_events(step)
    cap.drain()
    return {"tokens": tokens, "kernels": kernels, "memcpys": memcpys, "device_us": us,
            "fused": fused_available(torch.device("cuda")), "layers": num_layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=10, help="decode steps per timed chunk")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--small", action="store_true", help="a 4-layer model, for a quick check")
    ap.add_argument("--kernels-only", action="store_true",
                    help="only count the device work of routecap's step (no model), at the "
                         "30B-A3B shape; run it with PYTHONPATH at another checkout to compare")
    args = ap.parse_args()
    if args.kernels_only:
        shape = SMALL if args.small else QWEN3_30B_A3B
        L, K, E = shape["num_hidden_layers"], shape["num_experts_per_tok"], shape["num_experts"]
        import routecap

        print(f"routecap from {routecap.__file__}")
        for n in sorted({*(int(x) for x in args.batches.split(",")), args.prefill}):
            c = profile_capture_step(L, K, E, n)
            print(f"  {n:>6} tokens: {c['kernels']:>3} kernels (L + {c['kernels'] - L}), "
                  f"{c['memcpys']} memcpys, {c['device_us']:8.1f} us of device time")
        return
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name()}")
    t0 = time.perf_counter()
    model = build_model(SMALL if args.small else QWEN3_30B_A3B)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e9:.1f}B parameters, built in {time.perf_counter() - t0:.0f} s")
    results = []
    for b in (int(x) for x in args.batches.split(",")):
        results.append(bench_decode(model, b, context=args.context, repeats=args.repeats,
                                    chunk=args.chunk))
        torch.cuda.empty_cache()
    results.append(bench_prefill(model, args.prefill, repeats=args.repeats))
    info = find_moe_routers(model)
    L, K, E = len(info.sites), info.top_k, info.num_experts
    print(f"\ndevice work routecap adds to one step (torch profiler; L = {L} MoE layers, so the "
          f"floor is {L} copy kernels)")
    counts = {}
    for n in sorted({*(int(x) for x in args.batches.split(",")), args.prefill}):
        c = profile_capture_step(L, K, E, n)
        counts[n] = c
        print(f"  {n:>6} tokens: {c['kernels']:>3} kernels (L + {c['kernels'] - L}), "
              f"{c['memcpys']} memcpys, {c['device_us']:8.1f} us of device time "
              f"({'fused Triton' if c['fused'] else 'torch ops'} end of step)")
    print("\nsummary: routecap overhead vs no capture (median step time)")
    for r in results:
        what = f"decode batch {r['batch']}" if "batch" in r else f"prefill {r['tokens']}"
        n = r.get("batch", r.get("tokens"))
        added_us = (r["medians_ms"]["routecap"] - r["medians_ms"]["none"]) * 1e3
        c = counts.get(n)
        kern = f"  +{c['kernels']} kernels, +{c['device_us']:.0f} us device" if c else ""
        print(f"  {what:<20} routecap {100 * (r['ratios']['routecap'] - 1):+6.2f}% "
              f"({added_us:+8.1f} us/step){kern}   "
              f"hand-written host-copy hooks {100 * (r['ratios']['hooks'] - 1):+7.2f}%   "
              f"(no capture: {r['medians_ms']['none']:.2f} ms)")
    print("sync check: no device-to-host synchronisation in routecap's captured decode step, "
          "publish or poll (torch.cuda.set_sync_debug_mode('error'))")


if __name__ == "__main__":
    main()
