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


# ---- missing cells, strict mode, checks naming both sides ----------------------------------------
@pytest.fixture(scope="module")
def moved():
    """(model, info, ids, recorded routes, live routes): a Qwen3-MoE whose routers have moved."""
    model = tiny_model("qwen3_moe", seed=5)
    info = replay_sites(model)
    ids_BS = _batch(2)
    routes_BSLK, _ = _forward_ids(model, info, ids_BS)
    perturb_routers_(model, info, 2.0, seed=1)
    live_BSLK, _ = _forward_ids(model, info, ids_BS)
    assert _disagreement(live_BSLK, routes_BSLK) > 0
    return model, info, ids_BS, routes_BSLK, live_BSLK


def test_missing_cells_fall_back_to_the_live_router_and_are_counted(moved):
    model, info, ids_BS, routes_BSLK, live_BSLK = moved
    routes = routes_BSLK.clone()
    #  b\s  0 1 2 3 4 5 6      layer 0: tokens (0, 2) and (1, 6) missing
    #   0   . . x . . . .      layer 2: all of row 1 missing (like right padding)
    #   1   . . . . . . x
    routes[0, 2, 0] = -1
    routes[1, 6, 0] = -1
    routes[1, :, 2] = -1
    missing_BSL = (routes == -1).all(-1)
    logits = {}  # the live router's own choice in THIS forward (its inputs depend on the replay)
    hooks = [s.module.register_forward_hook(
        lambda m, a, out, i=i: logits.__setitem__(i, out[0].detach())) for i, s in
        enumerate(info.sites)]
    try:
        with replay(model, routes) as stats:
            got_BSLK, _ = _forward_ids(model, info, ids_BS)
    finally:
        for h in hooks:
            h.remove()
    own_NLK = torch.stack([logits[i].softmax(-1).topk(info.top_k, -1)[1]
                           for i in range(len(info.sites))], dim=1)
    expect = torch.where(missing_BSL[..., None], own_NLK.reshape(got_BSLK.shape), routes_BSLK)
    assert torch.equal(got_BSLK, expect)
    # the first MoE layer's inputs do not depend on routing: there the fallback is M's live choice
    assert torch.equal(got_BSLK[missing_BSL[..., 0]][:, 0], live_BSLK[missing_BSL[..., 0]][:, 0])
    assert stats.fallback_cells == 2 + S == int(missing_BSL.sum())
    assert stats.replayed_cells == B * S * len(info.sites) - stats.fallback_cells


def test_strict_refuses_missing_cells_of_real_tokens(moved):
    model, info, ids_BS, routes_BSLK, _ = moved
    routes = routes_BSLK.clone()
    routes[1, 4, 1] = -1
    with pytest.raises(ReplayError, match=r"position \(1, 4\), layer 1 \(decoder layer 2\)"):
        with replay(model, routes, strict=True):
            model(input_ids=ids_BS)
    # padding (attention_mask 0) may be -1 in strict mode
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    routes[1, 4:] = -1
    with replay(model, routes, strict=True) as stats:
        model(input_ids=ids_BS, attention_mask=mask)
    assert stats.fallback_cells == 3 * len(info.sites)


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r[..., :2, :], r"L=2 layers .* has L=3 MoE layers \(1, 2, 3\)"),
    (lambda r: r[..., :3], r"K=3 ids per cell.* top-k K=4"),
    (lambda r: r[0], r"input_ids have shape \(2, 7\); the routes are for lead shape \(7,\)"),
    (lambda r: r[:, :5], r"input_ids have shape \(2, 7\); the routes are for lead shape \(2, 5\)"),
    (lambda r: r.float(), r"integer routes"),
    (lambda r: r[0, 0], r"expected routes of shape \[\*lead, L=3, K=4\]"),
])
def test_shape_mismatch_names_both_sides(moved, mutate, match):
    model, _, ids_BS, routes_BSLK, _ = moved
    with pytest.raises(ReplayError, match=match):
        with replay(model, mutate(routes_BSLK)):
            model(input_ids=ids_BS)


def test_token_count_mismatch_at_the_router_names_both(moved):
    model, info, ids_BS, routes_BSLK, _ = moved
    block = info.sites[0].block
    with pytest.raises(ReplayError, match=r"decoder layer 1 .* scored 3 tokens; the routes hold 14"):
        with replay(model, routes_BSLK):
            block(torch.zeros(1, 3, model.config.hidden_size))


@pytest.mark.parametrize("value, cell, match", [
    (16, (0, 3, 1, 2), r"position \(0, 3\), layer 1 .* expert id 16; .* E=16 experts"),
    (-2, (1, 0, 0, 0), r"position \(1, 0\), layer 0 .* expert id -2"),
    (-1, (1, 5, 2, 1), r"position \(1, 5\), layer 2 .* either all -1"),
])
def test_bad_ids_name_the_position(moved, value, cell, match):
    model, _, ids_BS, routes_BSLK, _ = moved
    routes = routes_BSLK.clone()
    routes[cell] = value
    with pytest.raises(ReplayError, match=match):
        with replay(model, routes):
            pass


def test_duplicate_expert_in_a_cell_is_refused(moved):
    model, _, _, routes_BSLK, _ = moved
    routes = routes_BSLK.clone()
    routes[0, 1, 2, 1] = routes[0, 1, 2, 0]
    with pytest.raises(ReplayError, match=r"position \(0, 1\), layer 2 \(decoder layer \d+\) name an expert twice"):
        with replay(model, routes):
            pass


def test_numpy_routes_and_packed_lead(moved):
    model, info, ids_BS, routes_BSLK, _ = moved
    packed_T = ids_BS.reshape(-1)
    routes_TLK = routes_BSLK.reshape(B * S, len(info.sites), -1).numpy().astype(np.int16)
    with replay(model, routes_TLK) as stats:
        with ExpertsTap(info) as tap, torch.no_grad():
            model(input_ids=packed_T[None], use_cache=False)  # [1, T] against routes [T, L, K]
    assert torch.equal(tap.ids_NLK(), torch.from_numpy(routes_TLK).long())
    assert stats.replayed_cells == B * S * len(info.sites)


def test_micro_batches_bind_their_own_routes(moved):
    model, info, ids_BS, routes_BSLK, _ = moved
    for b in range(B):  # one block per micro-batch, in any order, nothing carried over
        with replay(model, routes_BSLK[b:b + 1]):
            with ExpertsTap(info) as tap, torch.no_grad():
                model(input_ids=ids_BS[b:b + 1], use_cache=False)
        assert torch.equal(tap.ids_NLK(), routes_BSLK[b].reshape(S, len(info.sites), -1))


def test_one_replay_per_model_at_a_time_and_clean_exit(moved):
    model, info, ids_BS, routes_BSLK, live_BSLK = moved
    with replay(model, routes_BSLK):
        with pytest.raises(ReplayError, match="already under another replay"):
            with replay(model, routes_BSLK):
                pass
    # after the blocks (also after an error inside one) the live router routes again
    with pytest.raises(RuntimeError, match="boom"):
        with replay(model, routes_BSLK):
            raise RuntimeError("boom")
    got_BSLK, _ = _forward_ids(model, info, ids_BS)
    assert torch.equal(got_BSLK, live_BSLK)
    assert all("forward" not in s.module.__dict__ for s in info.sites)


def test_router_lookup_is_reused_until_the_model_changes(moved, monkeypatch):
    from routecap import replay as rp

    model, _, _, routes_BSLK, _ = moved
    calls = []
    real = rp.find_moe_routers
    monkeypatch.setattr(rp, "find_moe_routers", lambda m, **kw: calls.append(1) or real(m, **kw))
    rp._SITES.pop(model, None)
    for _ in range(3):
        with replay(model, routes_BSLK):
            pass
    assert len(calls) == 1  # found once, reused
    # a router swapped for another module: found again, never a stale tap on the old one
    site = rp.replay_sites(model).sites[0]
    parent_path, _, name = site.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    import copy
    setattr(parent, name, copy.deepcopy(old))
    try:
        with replay(model, routes_BSLK):
            pass
        assert len(calls) == 2
        assert rp.replay_sites(model).sites[0].module is getattr(parent, name)
    finally:
        setattr(parent, name, old)
