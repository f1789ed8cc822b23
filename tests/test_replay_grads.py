"""Gradients under routecap.replay against a slow reference MoE, per scoring family.

The reference is written here, per family, from the architecture's published scoring: it takes a
FIXED expert set (the replayed ids), computes the weights from the live router's logits at those
ids, and applies the experts one (token, expert) pair at a time. The model under replay and the
same model with the reference patched into every MoE block must give the same loss and the same
gradient for every parameter (router weights and experts included).

The replayed ids are chosen OUTSIDE the live top-k (experts the live router does not pick), where
a replay that gathers its weights from a top-k-masked tensor gives weight 0 and kills the
gradient (the Megatron-fork bug): every such expert must keep a non-zero weight and gradient.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers
import torch.nn.functional as F
from extra_architectures import CASES_BY_ID
from extra_architectures import tiny_model as extra_tiny
from replay_cases import ExpertsTap, perturb_routers_
from tiny_models import tiny_model
from torch.utils.checkpoint import checkpoint

from routecap.replay import replay, replay_sites

_TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2])

B, S = 2, 6


# ---- the reference: weights from live logits at a fixed expert set -----------------------------
def _softmax_topk(router, h, ids_NK):
    """Mixtral (always renormalised), Qwen2/Qwen3-MoE, OLMoE (renormalised if norm_topk_prob)."""
    logits_NE = F.linear(h.reshape(-1, router.hidden_dim), router.weight)
    w_NK = torch.softmax(logits_NE.float(), dim=-1).gather(-1, ids_NK)
    if getattr(router, "norm_topk_prob", True):
        w_NK = w_NK / w_NK.sum(-1, keepdim=True)
    return logits_NE, w_NK.to(logits_NE.dtype) if hasattr(router, "norm_topk_prob") else w_NK, ids_NK


def _topk_softmax(router, h, ids_NK):
    """GPT-OSS: softmax over the chosen logits (router bias included)."""
    logits_NE = F.linear(h, router.weight, router.bias)
    return logits_NE, torch.softmax(logits_NE.gather(-1, ids_NK), dim=1), ids_NK


def _sigmoid_bias(router, h, ids_NK):
    """DeepSeek-V3, GLM-4.5: weights from the UNBIASED sigmoid, renormalised, scaled."""
    logits_NE = F.linear(h.reshape(-1, router.hidden_dim).float(), router.weight.float())
    w_NK = logits_NE.sigmoid().gather(-1, ids_NK)
    if router.norm_topk_prob:
        w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
    return logits_NE, w_NK * router.routed_scaling_factor, ids_NK


def _softmax_zero_experts(router, h, ids_NK):
    """LongCat-Flash: unbiased softmax over routed + zero-computation experts, scaled."""
    logits_NE = F.linear(h.reshape(-1, router.hidden_dim).float(), router.classifier.weight.float())
    w_NK = logits_NE.softmax(-1).gather(-1, ids_NK) * router.routed_scaling_factor
    return logits_NE, w_NK.to(logits_NE.dtype), ids_NK


def _softmax_group_limited(router, h, ids_NK):
    """DeepSeek-V2 group_limited_greedy: the UNMASKED softmax at the ids, scaled (the live router
    reads its weights from group-masked scores: a replayed id in a dropped group must not read 0)."""
    logits_NE = F.linear(h.reshape(-1, router.hidden_dim).float(), router.weight.float())
    w_NK = logits_NE.softmax(-1).gather(-1, ids_NK) * router.routed_scaling_factor
    return logits_NE, w_NK, ids_NK


def _llama4(router, h, ids_NK):
    """Llama 4: sigmoid of the chosen logits, 0 elsewhere; the block scales inputs densely."""
    logits_NE = F.linear(h, router.weight)
    scores_NE = torch.zeros_like(logits_NE).scatter(1, ids_NK, logits_NE.gather(1, ids_NK).sigmoid())
    return scores_NE, logits_NE


def _dbrx(block, logits_NE, ids_NK):
    """DBRX: softmax, then the chosen probabilities divided by their p-norm."""
    w_NK = torch.softmax(logits_NE, dim=1).gather(-1, ids_NK)
    p = block.moe_normalize_expert_weights
    if p is not None:
        w_NK = w_NK / torch.norm(w_NK, p=p, dim=-1, keepdim=True)
    return w_NK, ids_NK


FAMILIES = {  # family -> (architecture, reference, where the reference goes)
    "softmax_topk_renorm": ("qwen3_moe", _softmax_topk, "router"),
    "softmax_topk_renorm_fp32_mixtral": ("mixtral", _softmax_topk, "router"),
    "softmax_topk_no_renorm": ("qwen2_moe", _softmax_topk, "router"),
    "topk_softmax": ("gpt_oss", _topk_softmax, "router"),
    "sigmoid_bias_grouped_scaled": ("deepseek_v3", _sigmoid_bias, "router"),
    "sigmoid_bias_grouped_glm": ("glm4_moe", _sigmoid_bias, "router"),
    "softmax_bias_zero_experts": ("longcat_flash", _softmax_zero_experts, "router"),
    "softmax_group_limited_v2": ("deepseek_v2_grouped", _softmax_group_limited, "router"),
    "sigmoid_dense_llama4": ("llama4_text", _llama4, "router"),
    "softmax_pnorm_dbrx": ("dbrx", _dbrx, "block"),
}


#: DeepSeek-V2 as released (group_limited_greedy): 4 groups of 2, the best 1 group kept
_GROUPED_V2 = dict(topk_method="group_limited_greedy", n_group=4, topk_group=1)


def _build(arch):
    if arch == "deepseek_v2_grouped":
        case = CASES_BY_ID["deepseek_v2"]
        return extra_tiny(replace(case, sizes={**case.sizes, **_GROUPED_V2}), seed=2)
    if arch in CASES_BY_ID:
        return extra_tiny(CASES_BY_ID[arch], seed=2)
    return tiny_model(arch, seed=2)


def _slow_experts(experts):
    """experts(h, ids, w) one (token, expert) pair at a time, each weighted afterwards."""
    fast = experts.forward

    def slow(hidden, top_k_index, top_k_weights):
        hidden_NH = hidden.reshape(-1, hidden.shape[-1])  # DBRX passes [B, S, H]
        out_NH = torch.zeros_like(hidden_NH)
        for n in range(hidden_NH.shape[0]):
            for k in range(top_k_index.shape[1]):
                # the pair twice, weights (1, 0): some expert kernels squeeze a [1, 1] selection
                e = top_k_index[n:n + 1, k:k + 1].expand(1, 2)
                one = torch.tensor([[1.0, 0.0]], dtype=top_k_weights.dtype)
                y_H = fast(hidden_NH[n:n + 1], e, one).reshape(-1)
                out_NH[n] += top_k_weights[n, k] * y_H
        return out_NH.reshape(hidden.shape)

    return slow


def _patch_reference(model, info, routes_BSLK, ref, where):
    """Put the reference into every MoE block of ``model`` (a copy), bound to the routes."""
    for i, site in enumerate(info.sites):
        ids_NK = routes_BSLK[:, :, i].reshape(-1, site.top_k)
        if where == "router":
            site.module.forward = (lambda h, r=site.module, ids=ids_NK: ref(r, h, ids))
        else:
            site.block.route_tokens_to_experts = (
                lambda logits, b=site.block, ids=ids_NK: ref(b, logits, ids))
        if type(site.module).__name__ != "Llama4Router":  # Llama 4's experts are dense anyway
            site.block.experts.forward = _slow_experts(site.block.experts)


def _outside_live_routes(model, info, ids_BS, seed=0):
    """[B, S, L, K] ids none of which the live router picks (a random choice of the others)."""
    with ExpertsTap(info) as tap, torch.no_grad():
        model(input_ids=ids_BS, use_cache=False)
    live_NLK = tap.ids_NLK()
    N, L, K = live_NLK.shape
    E = info.num_experts
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(N, L, K, dtype=torch.long)
    for n in range(N):
        for li in range(L):
            others = [e for e in torch.randperm(E, generator=g).tolist()
                      if e not in live_NLK[n, li].tolist()]
            out[n, li] = torch.tensor(others[:K])
    return out.reshape(B, S, L, K), live_NLK


def _loss_and_grads(model, ids_BS):
    """Cross-entropy against fixed targets at EVERY position (so every token's experts count)."""
    model.zero_grad(set_to_none=True)
    logits_BSV = model(input_ids=ids_BS, use_cache=False).logits
    targets_BS = torch.randint(0, logits_BSV.shape[-1], ids_BS.shape,
                               generator=torch.Generator().manual_seed(7))
    loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _ids(seed=0):
    return torch.randint(3, 300, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_equal_slow_reference(family):
    arch, ref, where = FAMILIES[family]
    if arch == "longcat_flash" and _TRANSFORMERS < (5, 24):
        # NOTE: transformers 5.17's LongCat MoE block unpacks two router outputs where its router
        # returns three: the tiny model cannot run a forward there, replay or not
        pytest.skip("LongCat's MoE block cannot run a forward in transformers < 5.24")
    model = _build(arch).train()
    info = replay_sites(model)
    ids_BS = _ids()
    routes_BSLK, live_NLK = _outside_live_routes(model, info, ids_BS)
    assert not (routes_BSLK.reshape(live_NLK.shape)[..., :, None] == live_NLK[..., None, :]).any()

    reference = copy.deepcopy(model)
    _patch_reference(reference, replay_sites(reference), routes_BSLK, ref, where)
    loss_ref, grads_ref = _loss_and_grads(reference, ids_BS)

    with replay(model, routes_BSLK, strict=True), ExpertsTap(info) as tap:
        loss, grads = _loss_and_grads(model, ids_BS)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{family}: grad of {n}: {m}")
    # every replayed expert lies outside the live top-k: weights and gradients must not die
    w_NLK = tap.weights_NLK()
    assert (w_NLK != 0).all() and torch.isfinite(w_NLK).all()
    for i, site in enumerate(info.sites):
        used = routes_BSLK[:, :, i].unique()
        router_grads = [p.grad for p in site.module.parameters() if p.grad is not None]
        assert router_grads and all(g.abs().sum() > 0 for g in router_grads)
        # LongCat: ids past the routed experts are zero-computation (identity) experts
        real = getattr(site.block.experts, "num_routed_experts", info.num_experts)
        for name, p in site.block.experts.named_parameters():
            if p.dim() == 3 and p.grad is not None:
                dead = [int(e) for e in used if e < real and p.grad[e].abs().sum() == 0]
                assert not dead, f"layer {site.layer}: experts {dead} got no gradient in {name}"
        w = getattr(site.module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and "sigmoid" in family:
            # a sigmoid router's logit row gets gradient only where its expert was used
            dead = [int(e) for e in used if w.grad[e].abs().sum() == 0]
            assert not dead, f"layer {site.layer}: router rows {dead} got no gradient"


# ---- recompute: checkpointing replays the same ids ----------------------------------------------
def _moved_model_and_routes():
    model = tiny_model("deepseek_v3", seed=4).train()
    info = replay_sites(model)
    ids_BS = _ids(1)
    with ExpertsTap(info) as tap, torch.no_grad():
        model(input_ids=ids_BS, use_cache=False)
    routes_BSLK = tap.ids_NLK().reshape(B, S, len(info.sites), -1)
    perturb_routers_(model, info, 2.0, seed=5)  # the live routing now differs
    return model, info, ids_BS, routes_BSLK


def _checkpointing(model, kwargs):
    """transformers' gradient checkpointing (called activation checkpointing from 5.2x on)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_transformers_gradient_checkpointing_replays_the_same_ids(use_reentrant):
    model, info, ids_BS, routes_BSLK = _moved_model_and_routes()
    with replay(model, routes_BSLK) as plain:
        loss, grads = _loss_and_grads(model, ids_BS)
    _checkpointing(model, {"use_reentrant": use_reentrant})
    with replay(model, routes_BSLK) as ckpt:
        loss_ck, grads_ck = _loss_and_grads(model, ids_BS)
    L = len(info.sites)
    assert plain.router_calls == L and ckpt.router_calls == 2 * L  # the recompute ran the routers
    assert ckpt.replayed_cells == plain.replayed_cells == B * S * L
    torch.testing.assert_close(loss_ck, loss)
    assert grads_ck.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_replays_the_same_ids(use_reentrant):
    model, info, ids_BS, routes_BSLK = _moved_model_and_routes()
    emb = model.get_input_embeddings()

    def run(checkpointed):
        model.zero_grad(set_to_none=True)
        def fwd(x_BSH):
            return model(inputs_embeds=x_BSH, use_cache=False).logits

        with replay(model, routes_BSLK) as stats:
            x_BSH = emb(ids_BS)
            logits = checkpoint(fwd, x_BSH, use_reentrant=use_reentrant) if checkpointed \
                else fwd(x_BSH)
            logits.float().logsumexp(-1).mean().backward()
        return stats, _grads_of(model)

    plain, grads = run(False)
    ckpt, grads_ck = run(True)
    assert ckpt.router_calls == 2 * plain.router_calls
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], msg=lambda m, n=name: f"{n}: {m}")


def test_backward_outside_the_block_recomputes_live_routes():
    """Why the backward belongs inside the block: a recompute after it runs the live router."""
    model, info, ids_BS, routes_BSLK = _moved_model_and_routes()
    _checkpointing(model, {"use_reentrant": False})
    with replay(model, routes_BSLK):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids_BS, use_cache=False).logits.float().logsumexp(-1).mean().backward()
    grads = _grads_of(model)
    _checkpointing(model, {"use_reentrant": False})
    model.zero_grad(set_to_none=True)
    with replay(model, routes_BSLK):
        logits = model(input_ids=ids_BS, use_cache=False).logits
    try:  # outside: the recompute chooses live experts
        logits.float().logsumexp(-1).mean().backward()
    except torch.utils.checkpoint.CheckpointError:
        return  # torch noticed the recompute saved other tensors (other experts ran)
    grads_out = _grads_of(model)
    differs = [n for n in grads if not torch.allclose(grads[n], grads_out[n])]
    assert differs, "the recompute outside the replay block gave the replayed gradients"
