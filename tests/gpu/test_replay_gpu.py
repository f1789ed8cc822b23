"""routecap.replay on CUDA: exact in bf16, and no host sync in any router call under replay."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay_cases import ExpertsTap, perturb_routers_  # noqa: E402
from tiny_models import SUPPORTED, tiny_model  # noqa: E402

from routecap.replay import replay, replay_sites  # noqa: E402

B, S = 3, 16


def _record(model, info, ids_BS):
    with ExpertsTap(info) as tap, torch.no_grad():
        model(input_ids=ids_BS, use_cache=False)
    return tap.ids_NLK().reshape(B, S, len(info.sites), -1).cpu(), tap.weights_NLK()


@pytest.mark.parametrize("arch", SUPPORTED)
def test_replay_exact_on_cuda_bfloat16(arch):
    model = tiny_model(arch, seed=1, dtype=torch.bfloat16).cuda()
    info = replay_sites(model)
    ids_BS = torch.randint(3, 300, (B, S), generator=torch.Generator().manual_seed(0)).cuda()
    routes_BSLK, _ = _record(model, info, ids_BS)
    perturb_routers_(model, info, 2.0, seed=0)
    live_BSLK, _ = _record(model, info, ids_BS)
    assert not torch.equal(live_BSLK.sort(-1)[0], routes_BSLK.sort(-1)[0])
    with replay(model, routes_BSLK, strict=True):  # routes on the CPU, as batch_routes builds them
        got_BSLK, w_NLK = _record(model, info, ids_BS)
    assert torch.equal(got_BSLK, routes_BSLK)
    assert torch.isfinite(w_NLK.float()).all() and (w_NLK != 0).all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_no_host_sync_in_router_calls_under_replay(arch):
    model = tiny_model(arch, seed=1).cuda()
    info = replay_sites(model)
    L, K, E = len(info.sites), info.top_k, info.num_experts
    g = torch.Generator().manual_seed(0)
    routes = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S * L)])
    routes = routes.reshape(B, S, L, K)
    routes[0, 3] = -1  # missing cells: the fallback path (torch.where with the live top-k) too
    hidden_NH = torch.randn(B * S, model.config.hidden_size, device="cuda")
    with replay(model, routes):  # the routes are checked on the host here, before the forward
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [site.module(hidden_NH) for site in info.sites]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for i, out in enumerate(outs):
        ids_NK = out[2].cpu()
        keep = torch.ones(B * S, dtype=torch.bool)
        keep[3] = False
        assert torch.equal(ids_NK[keep], routes[:, :, i].reshape(-1, K)[keep])
