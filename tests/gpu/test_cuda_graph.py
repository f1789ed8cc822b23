"""Capture inside a CUDA graph: captured once, replayed with new inputs and fewer real tokens.

The graph runs the MoE blocks of a tiny Qwen3-MoE (experts on grouped_mm or batched_mm, which
capture) over a
static input of two padded shards of S rows, as vLLM's naive DP dispatch under CUDA graphs: the
other DP rank's shard, then this rank's. Each replay has a different number of real tokens in
this rank's shard; ``publish(n_real)`` hands exactly those rows to the host. The routes must equal
an eager run of the same blocks over the same input, cell for cell, and no device-to-host sync
may happen inside the captured step or in publish (checked with CUDA sync debug mode).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_model  # noqa: E402

from routecap.capturer import CaptureSpec, StepCapturer  # noqa: E402
from routecap.integrations.hf import find_moe_routers  # noqa: E402
from routecap.layout import RankView  # noqa: E402

S = 16  # padded shard size (the graph's size per DP rank)


def _blocks_forward(blocks, x_NH):
    h = x_NH
    for block in blocks:
        h = h + block(h[None])[0]
    return h


def _hooks(info, cap):
    handles = []
    for i, site in enumerate(info.sites):
        handles.append(site.module.register_forward_hook(
            lambda m, a, out, i=i, slot=site.index_slot: cap.capture(i, out[slot])))
    return handles


# grouped_mm captures in bf16; in float32 transformers falls back to a path that copies host
# offsets, which a CUDA graph refuses, so float32 runs the experts with batched_mm
@pytest.mark.parametrize("dtype,experts", [(torch.bfloat16, "grouped_mm"),
                                           (torch.float32, "batched_mm")])
def test_capture_in_cuda_graph_equals_eager(dtype, experts):
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", seed=3, dtype=dtype).cuda()
    model.set_experts_implementation(experts)
    info = find_moe_routers(model)
    blocks = [s.block for s in info.sites]
    spec = CaptureSpec(num_layers=len(blocks), top_k=info.top_k, num_experts=info.num_experts,
                       max_tokens=2 * S)
    view = RankView(tokens_per_dp=[S, S], dp_rank=1, shard_size=S)

    got: dict = {}
    graph_cap = StepCapturer(spec, device="cuda", growable=False,
                             sink=lambda s: got.__setitem__(s.tag, s.expert_ids_NLK.copy()))
    eager_got: dict = {}
    eager_cap = StepCapturer(spec, device="cuda",
                             sink=lambda s: eager_got.__setitem__(s.tag, s.expert_ids_NLK.copy()))

    x_static = torch.zeros(2 * S, model.config.hidden_size, device="cuda", dtype=dtype)
    handles = _hooks(info, graph_cap)
    try:
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graphs require
                for _ in range(2):
                    with graph_cap.graph_step(S, view=view, layout="gathered_padded"):
                        _blocks_forward(blocks, x_static)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                with graph_cap.graph_step(S, view=view, layout="gathered_padded"):
                    _blocks_forward(blocks, x_static)

            inputs = []
            for i, n_real in enumerate([S, 5, 1, 11, 0, 16, 3]):
                x = torch.zeros(2 * S, model.config.hidden_size, device="cuda", dtype=dtype)
                x[:S] = torch.randn(S, x.shape[1], device="cuda", dtype=dtype)  # the other rank
                x[S:S + n_real] = torch.randn(n_real, x.shape[1], device="cuda", dtype=dtype)
                inputs.append((i, n_real, x))
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any implicit sync below raises
            try:
                for i, n_real, x in inputs:
                    x_static.copy_(x)
                    g.replay()
                    graph_cap.publish(n_real, tag=i)
                    graph_cap.poll()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            graph_cap.drain()
    finally:
        for h in handles:
            h.remove()

    # eager: the same blocks over the same inputs, no graph
    handles = _hooks(info, eager_cap)
    try:
        with torch.no_grad():
            for i, n_real, x in inputs:
                eager_cap.begin_step(n_real, tag=i,
                                     view=RankView(tokens_per_dp=[S, n_real], dp_rank=1,
                                                   shard_size=S), layout="gathered_padded")
                _blocks_forward(blocks, x)
                eager_cap.end_step()
            eager_cap.drain()
    finally:
        for h in handles:
            h.remove()
    assert sorted(got) == sorted(eager_got) == list(range(len(inputs)))
    for i, n_real, _ in inputs:
        assert got[i].shape == (n_real, len(blocks), info.top_k)
        assert np.array_equal(got[i], eager_got[i]), i
