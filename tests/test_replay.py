"""routecap.replay: exactness over every architecture, gradients against a slow reference MoE,
recompute, fallback, strict mode and the checks that name both sides.

Exactness: routes are recorded from model M; M's routers are then perturbed until M's own routing
differs from the recording (the disagreement is measured and must be > 0); under replay the ids
the experts actually receive (a hook on the experts, not the router's output) equal the recorded
ones in every cell, with finite, non-zero weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from replay_cases import ExpertsTap, perturb_routers_, refused_cases, replay_cases, same_rows
from tiny_models import tiny_model

from routecap.integrations.hf import HFRouteCapture, UnsupportedModelError, find_moe_routers
from routecap.replay import ReplayError, replay, replay_sites

B, S = 2, 7


def _batch(seed: int = 0, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, S), generator=g)


def _forward_ids(model, info, ids_BS) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S, L, K] ids the experts received, [B, S, L, K] their weights) in one forward."""
    with ExpertsTap(info) as tap, torch.no_grad():
        model(input_ids=ids_BS, use_cache=False)
    return (tap.ids_NLK().reshape(B, S, len(info.sites), -1),
            tap.weights_NLK().reshape(B, S, len(info.sites), -1))


def _disagreement(a_BSLK, b_BSLK) -> float:
    L = a_BSLK.shape[2]
    return float((~same_rows(a_BSLK.reshape(-1, L, a_BSLK.shape[-1]),
                             b_BSLK.reshape(-1, L, b_BSLK.shape[-1]))).float().mean())


@pytest.mark.parametrize("rc", replay_cases())
def test_replay_exact_after_routers_moved(rc):
    model = rc.build(seed=1)
    info = replay_sites(model)
    ids_BS = _batch()
    routes_BSLK, _ = _forward_ids(model, info, ids_BS)
    scale, moved = 0.5, 0.0
    for attempt in range(6):
        perturb_routers_(model, info, scale, seed=attempt)
        live_BSLK, _ = _forward_ids(model, info, ids_BS)
        moved = _disagreement(live_BSLK, routes_BSLK)
        if moved > 0:
            break
        scale *= 2
    assert moved > 0, "perturbing the routers never changed the routing"
    with replay(model, routes_BSLK, strict=True) as stats:
        got_BSLK, w_BSLK = _forward_ids(model, info, ids_BS)
    L = len(info.sites)
    if type(info.sites[0].module).__name__ == "Llama4Router":  # dense experts: ids come sorted
        got_BSLK, routes_BSLK = got_BSLK.sort(-1)[0], routes_BSLK.sort(-1)[0]
    bad = (got_BSLK != routes_BSLK).any(-1)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} cells differ under replay, first "
                           f"at (b, s, layer) {np.argwhere(bad.numpy())[0].tolist()}")
    assert torch.isfinite(w_BSLK).all() and (w_BSLK != 0).all(), "a replayed expert got weight 0"
    assert stats.replayed_cells == B * S * L and stats.fallback_cells == 0
    assert stats.layers_run == info.moe_layers
    print(f"{rc.id}: live routing moved in {moved:.1%} of cells; replay exact in all {bad.numel()}")


@pytest.mark.parametrize("rc, fragment", refused_cases())
def test_replay_refuses_by_name(rc, fragment):
    model = rc.build(seed=1)
    with pytest.raises(UnsupportedModelError) as err:
        with replay(model, torch.zeros(1, 1, 1, 1, dtype=torch.long)):
            pass
    msg = str(err.value)
    names = {type(model).__name__, *(model.config.architectures or [])[:1]}
    assert any(n in msg for n in names), f"{msg!r} names none of {names}"
    assert fragment in msg, f"{msg!r} lacks {fragment!r}"


# ---- R2: record with routecap's capture in one forward, replay in the update --------------------
def test_r2_record_with_capture_then_replay():
    model = tiny_model("qwen3_moe", seed=3)
    info = find_moe_routers(model)
    ids_BS = _batch(1)
    # the "old log-prob" pass: a plain forward under routecap's capture
    with HFRouteCapture(model) as cap, torch.no_grad():
        model(input_ids=ids_BS, use_cache=False)
        traces = cap.collect(sequences=ids_BS, prompt_width=S, generated_lengths=[1] * B)
    routes_BSLK = torch.from_numpy(np.stack([t.expert_ids for t in traces]).astype(np.int64))
    assert routes_BSLK.shape == (B, S, len(info.sites), info.top_k)
    # the update: the routers have moved since (an optimizer step)
    perturb_routers_(model, info, 2.0, seed=0)
    live_BSLK, _ = _forward_ids(model, info, ids_BS)
    assert _disagreement(live_BSLK, routes_BSLK) > 0
    model.train()
    with replay(model, routes_BSLK) as stats:
        with ExpertsTap(info) as tap:
            out = model(input_ids=ids_BS, labels=ids_BS, use_cache=False)
        out.loss.backward()
    assert torch.equal(tap.ids_NLK().reshape(routes_BSLK.shape), routes_BSLK)
    assert stats.fallback_cells == 0 and stats.replayed_cells == B * S * len(info.sites)
    assert all(s.module.weight.grad is not None and s.module.weight.grad.abs().sum() > 0
               for s in info.sites)
