"""The benchmark's CUDA-graph decode step captures the same routes as the same step run eagerly.

benchmarks/gpu_capture_overhead.py measures routecap's cost inside a graph-captured decode step
(explicit torch.cuda.CUDAGraph over a transformers Qwen3-MoE with a StaticCache); this checks,
on a 4-layer model of that family, that speed does not come at the cost of correctness: for
several replays with new token ids, the routes published from the graph equal those of the same
step run eagerly, cell for cell, and every row reaches the store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_capture_overhead import SMALL, DecodeStep, RoutecapPath, build_model, capture_graph  # noqa: E402


def test_graph_decode_routes_equal_eager():
    model = build_model(SMALL, seed=1)
    B = 8
    step = DecodeStep(model, B, context=32, seed=2)
    graph = RoutecapPath(model, max_tokens=B, requests=B, graph=True)
    graph.hook()
    try:
        g = capture_graph(step, around=lambda: graph.cap.graph_step(B))
    finally:
        graph.unhook()
    eager = RoutecapPath(model, max_tokens=B, requests=B, graph=False)
    gen = torch.Generator(device="cpu").manual_seed(3)
    for _ in range(4):
        new_ids = torch.randint(0, model.config.vocab_size, (B, 1), generator=gen).cuda()
        step.input_ids.copy_(new_ids)
        g.replay()
        graph.cap.publish(B, tag=graph.next_tag(1))
        eager.hook()
        try:
            eager.cap.begin_step(B, tag=eager.next_tag(1))
            with torch.no_grad():
                step()
            eager.cap.end_step()
        finally:
            eager.unhook()
    graph.cap.drain()
    eager.cap.drain()
    for r in range(B):
        a, b = graph.store.take(r), eager.store.take(r)
        assert a.num_tokens == 4 and a.missing is None and b.missing is None
        assert np.array_equal(a.expert_ids, b.expert_ids), r
