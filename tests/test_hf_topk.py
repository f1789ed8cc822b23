"""Capture of routers whose output holds no ids (Llama 4, DBRX), read at their own final top-k.

Golden pattern (as tests/test_hf.py): batched ``generate`` with left padding, a KV cache and an
early EOS must give, cell for cell, the routes of one plain unpadded forward per request. The
reference here RECOMPUTES the choice from the router's logits (top-k of the logits for Llama 4,
of their softmax for DBRX), independently of the tap that capture reads; near-ties (margin below
MARGIN_TOL) are the only accepted difference, and the tests count them.

Also the tap itself: it refuses a router whose call makes no top-k of the expected shape, or
several; capture and replay of one router at once share the tap (capture sees the forced ids).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from extra_architectures import CASES_BY_ID
from extra_architectures import tiny_model as extra_tiny_model
from test_hf import _early_eos, _prompts
from torch import nn

from routecap.integrations.hf import HFRouteCapture, capture_generate, find_moe_routers
from routecap.integrations.hf_topk import TopkReader, TopkScope, TopkTap, TopkTapError
from routecap.replay import ReplayError, replay

MARGIN_TOL = 1e-4

# Llama 4 at top-2 with a dense first layer; DBRX as the sweep builds it
CASES = {
    "llama4_text": replace(CASES_BY_ID["llama4_text"], sizes={
        **CASES_BY_ID["llama4_text"].sizes, "num_hidden_layers": 3, "moe_layers": [1, 2],
        "num_experts_per_tok": 2}),
    "dbrx": CASES_BY_ID["dbrx"],
}


def _logits_of(site, output):
    """The router's [N, E] logits, from its output (Llama 4: (scores, logits); DBRX: logits)."""
    return output[1] if isinstance(output, tuple) else output


def _reference(model, info, token_ids):
    """[T, L, K] ids recomputed from each router's logits, and [T, L] margins at the k-th."""
    logits = {}
    handles = [s.module.register_forward_hook(
        lambda m, a, out, i=i, s=s: logits.__setitem__(i, _logits_of(s, out).detach().float()))
        for i, s in enumerate(info.sites)]
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(token_ids)[None].long(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ids, margins = [], []
    for i, site in enumerate(info.sites):
        score = logits[i] if type(site.module).__name__ == "Llama4Router" else logits[i].softmax(-1)
        top = score.sort(-1, descending=True)
        ids.append(top.indices[:, :site.top_k].numpy())
        margins.append((top.values[:, site.top_k - 1] - top.values[:, site.top_k]).numpy())
    return np.stack(ids, axis=1), np.stack(margins, axis=1)


@pytest.mark.parametrize("arch", list(CASES))
def test_golden_batched_generate_equals_teacher_forcing(arch):
    model = extra_tiny_model(CASES[arch], seed=1)
    info = find_moe_routers(model)
    assert info.moe_layers == ((1, 2) if arch == "llama4_text" else (0, 1))
    assert all(s.adapter.read_ids is None for s in info.sites)
    ids, mask = _prompts()
    eos, eos_step = _early_eos(model, ids, mask, 6, do_sample=False)
    traces, seq = capture_generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos,
                                   pad_token_id=0, do_sample=False)
    W = ids.shape[1]
    flips = 0
    assert len(traces) == ids.shape[0]
    for b, t in enumerate(traces):
        P = int(mask[b].sum())
        gen = seq[b, W:].tolist()
        G = gen.index(eos) + 1 if eos in gen else len(gen)
        assert t.num_tokens == P + G - 1 and t.missing is None
        assert t.token_ids.tolist() == seq[b, W - P:W - P + P + G - 1].tolist()
        ref, margins = _reference(model, info, t.token_ids)
        bad = (t.expert_ids.astype(np.int64) != ref).any(-1)
        assert (margins[bad] < MARGIN_TOL).all(), (
            f"request {b}: routes differ at {np.argwhere(bad).tolist()}")
        flips += int(bad.sum())
    assert traces[0].num_tokens == int(mask[0].sum()) + eos_step  # stopped at its EOS
    assert flips == 0, f"{flips} near-tie flips"


@pytest.mark.parametrize("arch", list(CASES))
def test_capture_under_replay_sees_the_forced_ids(arch):
    model = extra_tiny_model(CASES[arch], seed=2)
    info = find_moe_routers(model)
    ids_BS = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    L, K, E = len(info.sites), info.top_k, info.num_experts
    g = torch.Generator().manual_seed(1)
    routes = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(2 * 5 * L)])
    routes = routes.reshape(2, 5, L, K)
    cap = HFRouteCapture(model)  # built (and probed) before the replay starts
    with replay(model, routes), cap, torch.no_grad():
        model(input_ids=ids_BS, use_cache=False)
        traces = cap.collect(sequences=ids_BS, prompt_width=5, generated_lengths=[1, 1])
    got = torch.from_numpy(np.stack([t.expert_ids for t in traces]).astype(np.int64))
    assert torch.equal(got, routes)
    # both users gone: the owners' callables are the class's again
    assert all("forward" not in s.module.__dict__ and
               "route_tokens_to_experts" not in s.block.__dict__ for s in info.sites)


# ---- the tap on hand-written routers -------------------------------------------------------------
class _Router(nn.Module):
    """softmax -> top-k (``calls`` times; 0 = a router with no top-k at all)."""

    def __init__(self, calls: int = 1, E: int = 6, K: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, 4, generator=torch.Generator().manual_seed(0)))
        self.calls, self.K = calls, K

    def forward(self, h):
        p = torch.softmax(h @ self.weight.T, -1)
        out = (p.max(-1, keepdim=True).values, p.argmax(-1, keepdim=True))
        for _ in range(self.calls):
            out = p.topk(self.K, dim=-1)
        return out


@pytest.mark.parametrize("calls", [0, 2])
def test_tap_refuses_a_router_without_exactly_one_final_topk(calls):
    router = _Router(calls)
    reader = TopkReader(router, router, TopkScope(), num_experts=6, top_k=2, name="r",
                        read=lambda ids: None)
    try:
        with pytest.raises(TopkTapError, match=f"made {calls} top-k calls over"):
            router(torch.randn(3, 4))
    finally:
        reader.remove()
    assert "forward" not in router.__dict__
    router(torch.randn(3, 4))  # untapped: runs as before


def test_tap_reads_and_forces():
    router = _Router()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    live = router(x)[1]
    seen = []
    tap = TopkTap.attach(router, "forward", num_experts=6, top_k=2, name="r")
    tap.readers.append(seen.append)
    try:
        forced = torch.tensor([[5, 4]] * 5)
        tap.forcer = lambda x_NE, live_fn: forced
        vals, ids = router(x)
        p = torch.softmax(x @ router.weight.T, -1)
        assert torch.equal(ids, forced) and torch.equal(vals, p.gather(-1, forced))
        assert torch.equal(seen[-1], forced)  # readers see what the experts will get
        tap.forcer = None
        assert torch.equal(router(x)[1], live) and torch.equal(seen[-1], live)
    finally:
        tap.detach()
    assert "forward" not in router.__dict__


def test_replay_of_a_router_the_tap_cannot_read_is_refused_at_run_time():
    model = extra_tiny_model(CASES["dbrx"], seed=1)
    info = find_moe_routers(model)
    block = info.sites[0].block
    block.route_tokens_to_experts = lambda logits: (logits.softmax(-1).max(-1, keepdim=True))[::-1]
    routes = torch.zeros(1, 3, len(info.sites), info.top_k, dtype=torch.long)
    routes[..., 1] = 1
    with pytest.raises(ReplayError, match="made 0 top-k calls"):
        with replay(model, routes), torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
