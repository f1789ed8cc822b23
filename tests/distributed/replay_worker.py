"""A replayed training step under FSDP2 or transformers expert parallelism, one rank a process.

Shared by tests/distributed/test_replay_dist.py (gloo, CPU) and tests/gpu/test_multi_gpu_replay.py
(NCCL, one GPU a rank). The test process builds a *case* with :func:`make_case`:

- a rollout model M (seed 0) whose routes are recorded with routecap's router hooks, one
  unpadded forward per sequence (``[T, L, K]`` each);
- the trained model: M with its router weights perturbed, so that its own routing differs from
  the recorded one in a measured fraction of the (token, layer) cells; saved with
  ``save_pretrained``;
- per rank a right-padded batch (uneven sizes and lengths; a rank with no sequence gets a
  padding-only dummy batch) with labels and routes ``[B, S, L, K]`` (-1 on padding);
- the single-process reference over the combined batch under replay: loss, gradients.

Each rank (``main``) loads the trained model under FSDP2 (``fully_shard`` per decoder layer and
the root) or under transformers' all-to-all expert parallelism, runs one forward + backward
without replay and one with replay (each under the profiler, which lists the collectives), and
saves what the experts received (under EP also the rows each expert received after the
all-to-all), the loss, the full gradients and the collective calls.
:func:`check_case` compares that with the reference.

Loss: summed token cross-entropy over the labels of the whole combined batch, divided by the
number of label tokens of the combined batch (``n_label_tokens``), so that the ranks' losses add up
to the single-process loss; FSDP's gradient division is set to 1 (gradients are sums over ranks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for tiny_models

from routecap.integrations.hf import attach_router_hooks, find_moe_routers  # noqa: E402

PAD = 0
#: profiler event names that are collectives (c10d backends and functional collectives)
_COLLECTIVE_MARKS = ("gloo:", "nccl:", "c10d", "all_gather", "all_to_all", "reduce_scatter",
                     "all_reduce", "allreduce", "broadcast")


# ---- the case, built in the test process ----------------------------------------------------

def build_model(arch: str, seed: int = 0) -> Any:
    """The rollout model: ``builtin`` (routecap's built-in tiny Qwen3-MoE) or a tiny_models arch."""
    if arch == "builtin":
        from routecap.builtin import load_builtin

        return load_builtin("tiny-qwen3-moe", seed=seed)[0]
    from tiny_models import tiny_model

    return tiny_model(arch, seed=seed)


def expert_inputs(model: Any, rows: list[list[torch.Tensor]] | None = None
                  ) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """Hook every MoE block's ``experts``: per layer, the top-k ids each call received (and, into
    ``rows`` if given, the hidden rows it was called with)."""
    info = find_moe_routers(model, probe=False)
    seen: list[list[torch.Tensor]] = [[] for _ in info.sites]

    def hook(i: int):
        def pre(module, args, kwargs):
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen[i].append(ids.detach().reshape(-1, ids.shape[-1]).cpu().clone())
            if rows is not None:
                x = args[0] if args else kwargs["hidden_states"]
                rows[i].append(x.detach().reshape(ids.numel() // ids.shape[-1], -1).cpu().clone())
        return pre

    handles = [s.block.experts.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, s in enumerate(info.sites)]
    return seen, handles


def record_routes(model: Any, seqs: list[list[int]], device: str) -> list[torch.Tensor]:
    """Per sequence its recorded routes ``[T, L, K]``: routecap's router hooks, unpadded forwards."""
    info = find_moe_routers(model)
    rows: list[torch.Tensor | None] = [None] * len(info.sites)

    def capture(i: int, ids: torch.Tensor) -> None:
        rows[i] = ids.detach().cpu().clone()

    handles = attach_router_hooks(info, capture)
    out = []
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=torch.tensor([s], device=device))
                out.append(torch.stack([r.reshape(len(s), -1) for r in rows], dim=1))
    finally:
        for h in handles:
            h.remove()
    return out


def right_pad(seqs: list[list[int]], routes: list[torch.Tensor], L: int, K: int,
              width: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch; no sequence = a padding-only dummy row (zero labels, all -1 routes)."""
    S = width or max([len(s) for s in seqs], default=3)
    B = max(len(seqs), 1)
    ids = torch.full((B, S), PAD, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    routes_BSLK = torch.full((B, S, L, K), -1, dtype=torch.long)
    for b, (s, r) in enumerate(zip(seqs, routes)):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
        routes_BSLK[b, :len(s)] = r
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "routes": routes_BSLK}


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (0, with a graph, if none)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def perturb_routers_(model: Any, scale: float, seed: int = 1) -> None:
    """Add N(0, scale * std(w)) to every router weight: the trained model routes differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in find_moe_routers(model, probe=False).sites:
            w = s.module.weight
            w.add_(torch.randn(w.shape, generator=g).to(w) * (scale * w.float().std()))


def make_case(tmp: Path, arch: str, counts: list[int], *, device: str = "cpu", seed: int = 0,
              perturb: float = 0.5, checkpointing: bool = False) -> dict[str, Any]:
    """Write the case file (model folder, per-rank batches, reference) and return it."""
    from routecap.replay import replay

    rng = np.random.default_rng(seed)
    rollout = build_model(arch, seed).to(device)
    info = find_moe_routers(rollout)
    L, K, V = len(info.sites), info.top_k, rollout.config.vocab_size
    per_rank = [[[int(t) for t in rng.integers(3, V, int(rng.integers(2, 13)))]
                 for _ in range(n)] for n in counts]
    everything = [s for mine in per_rank for s in mine]
    recorded = record_routes(rollout, everything, device)
    model = rollout
    perturb_routers_(model, perturb, seed + 1)
    model.save_pretrained(tmp / "model")

    # the single process over the combined batch, under replay (and once without, to measure
    # how far the trained model's own routing is from the recorded one)
    batch = right_pad(everything, recorded, L, K)
    n_label = int((batch["labels"][:, 1:] != -100).sum())
    dev = {k: v.to(device) for k, v in batch.items()}
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen, handles = expert_inputs(model)
    with torch.no_grad():
        loss_sum(model, dev)
    live = [torch.cat(x) for x in seen]
    for x in seen:
        x.clear()
    model.zero_grad(set_to_none=True)
    with replay(model, batch["routes"]) as stats:  # routes stay on the host, as trainers give them
        loss = loss_sum(model, dev) / n_label
        loss.backward()
    for h in handles:
        h.remove()
    replayed = [list(x) for x in seen]  # one entry per call (two under recompute)
    valid = (batch["routes"] >= 0).all(-1).reshape(-1, L)  # [N, L]
    ref_ids = batch["routes"].reshape(-1, L, K)
    disagree = sum(int((_sorted(live[i])[valid[:, i]] != _sorted(ref_ids[:, i])[valid[:, i]])
                       .any(-1).sum()) for i in range(L))
    for i in range(L):  # the reference itself replays exactly
        assert len(replayed[i]) == (2 if checkpointing else 1), (i, len(replayed[i]))
        for call in replayed[i]:
            assert torch.equal(_sorted(call)[valid[:, i]], _sorted(ref_ids[:, i])[valid[:, i]])
    assert stats.replayed_cells == int(valid.sum()), stats
    ranks = []
    k = 0
    for mine in per_rank:
        ranks.append(right_pad(mine, recorded[k:k + len(mine)], L, K))
        k += len(mine)
    case = {
        "arch": arch, "counts": counts, "L": L, "K": K, "E": info.num_experts,
        "n_label_tokens": n_label, "ranks": ranks, "checkpointing": checkpointing,
        "ref_loss": float(loss.detach()), "disagreement": disagree / int(valid.sum()),
        "ref_grads": {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()
                      if p.grad is not None},
        "model_dir": str(tmp / "model"),
    }
    torch.save(case, tmp / "case.pt")
    return case


def _sorted(ids: torch.Tensor) -> torch.Tensor:
    return ids.sort(dim=-1).values


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` in lexicographic order (a multiset of rows, compared exactly)."""
    a = x.float().numpy()
    return torch.from_numpy(a[np.lexsort(a.T[::-1])]) if len(a) else x.float()


def check_case(tmp: Path, case: dict[str, Any], world: int, *, mode: str,
               rtol: float = 1e-4, atol: float = 1e-6) -> dict[str, Any]:
    """Compare every rank's output with the single-process reference (asserts)."""
    outs = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
    L, K, E = case["L"], case["K"], case["E"]
    assert case["disagreement"] > 0, "the perturbed router still routes like the recorded one"
    # loss: the ranks' parts add up to the single-process loss over the combined batch
    total = sum(o["loss"] for o in outs)
    assert abs(total - case["ref_loss"]) <= 1e-5 + rtol * abs(case["ref_loss"]), (
        total, case["ref_loss"])
    # gradients: every parameter's full gradient equals the single-process one
    got = outs[0]["grads"]
    assert sorted(got) == sorted(case["ref_grads"]), set(got) ^ set(case["ref_grads"])
    for name, ref in case["ref_grads"].items():
        torch.testing.assert_close(got[name], ref, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for r, o in enumerate(outs):
        batch = case["ranks"][r]
        routes = batch["routes"].reshape(-1, L, K)
        valid = (routes >= 0).all(-1)  # [N, L]
        # every recorded cell reached the experts exactly; the padding cells fell back
        for i in range(L):
            calls = o["replay_ids"][i]  # one per forward of the layer (two under recompute)
            assert len(calls) == (2 if case["checkpointing"] else 1), (r, i, len(calls))
            for seen in calls:
                assert seen.shape == (routes.shape[0], K), (r, i, seen.shape)
                bad = (_sorted(seen)[valid[:, i]] != _sorted(routes[:, i])[valid[:, i]]).any(-1)
                assert not bad.any(), f"rank {r} layer {i}: {int(bad.sum())} cells not replayed"
        assert o["stats"] == (int((~valid).sum()), int(valid.sum())), (r, o["stats"])
        # replay adds no collective: the same collective calls (by kind and count) as without it
        assert o["collectives"]["replay"] == o["collectives"]["plain"], r
        assert o["collectives"]["plain"], "no collective seen: the check could not fail"
    if mode == "ep":
        # each expert received exactly the (token, expert) pairs the ranks dispatched to it
        for i in range(L):
            sent = torch.bincount(torch.cat([c.reshape(-1) for o in outs
                                             for c in o["replay_ids"][i]]), minlength=E)
            received = torch.bincount(torch.cat([o["received"][i] for o in outs]), minlength=E)
            assert torch.equal(received, sent), (i, received.tolist(), sent.tolist())
            for r, o in enumerate(outs):
                mine = o["received"][i]
                lo, hi = r * E // world, (r + 1) * E // world
                assert ((mine >= lo) & (mine < hi)).all(), (r, i)  # only its own experts
            # token by token: expert e received exactly the hidden rows of the tokens whose ids
            # (recorded ones, on every valid cell) name e, from every rank
            for e in range(E):
                owner = outs[e * world // E]
                got = owner["received_rows"][i][owner["received"][i] == e]
                want = torch.cat([o["sent_rows"][i][(torch.cat(o["replay_ids"][i]) == e).any(-1)]
                                  for o in outs])
                assert torch.equal(_rows_sorted(got), _rows_sorted(want)), (
                    f"layer {i} expert {e}: received {got.shape[0]} rows, {want.shape[0]} routed")
    return {"disagreement": case["disagreement"], "outs": outs}


# ---- one rank -------------------------------------------------------------------------------

def _received(model: Any) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Under all-to-all EP: per layer, the global expert id of every row this rank's experts
    received, and the rows themselves (hidden states, moved bytes-exact by the all-to-all)."""
    from transformers.distributed.expert_parallel import EPImplementation

    info = find_moe_routers(model, probe=False)
    received: list[list[torch.Tensor]] = [[] for _ in info.sites]
    received_rows: list[list[torch.Tensor]] = [[] for _ in info.sites]
    for i, s in enumerate(info.sites):
        fwd = s.block.experts.forward
        impls = [c.cell_contents for c in (getattr(fwd, "__closure__", None) or ())
                 if isinstance(c.cell_contents, EPImplementation)]
        if len(impls) != 1:
            raise RuntimeError(f"{s.path}: no expert-parallel implementation found on the experts")
        impl = impls[0]
        rank, n_local = impl.ep_mesh.get_local_rank(), impl.num_local_experts
        dispatch = impl._dispatch_tokens

        def spy(*args, _i=i, _d=dispatch, _off=rank * n_local):
            out = _d(*args)  # (received rows, their local expert ids, weights, state)
            received[_i].append(out[1].detach().reshape(-1).cpu() + _off)  # local -> global ids
            received_rows[_i].append(out[0].detach().cpu().clone())
            return out

        impl._dispatch_tokens = spy
    return received, received_rows


def _collectives(prof: Any) -> list[str]:
    """The collective calls the profiler saw, sorted (backward threads interleave their events)."""
    names = [e.name for e in prof.events()]
    return sorted(n for n in names if any(m in n.lower() for m in _COLLECTIVE_MARKS))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def main() -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from distributed.rank_setup import init_group, load_ep_model, rank_device
    from routecap.replay import replay

    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--mode", choices=["fsdp", "ep"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    args = ap.parse_args()
    rank, world, device = rank_device(args.device)
    case = torch.load(args.case)
    torch.manual_seed(rank)
    if args.mode == "ep":
        model = load_ep_model(case["model_dir"], world, dtype=torch.float32)
        device = str(next(model.parameters()).device)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        init_group(device)
        model = AutoModelForCausalLM.from_pretrained(case["model_dir"], dtype=torch.float32)
        model.to(device)
        mesh = init_device_mesh(device.split(":")[0], (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert fsdp, "the model is not sharded with FSDP2"
    for m in fsdp:
        # gradients are sums over ranks, like one process (SUM collectives: gloo has no PREMUL_SUM)
        m.set_gradient_divide_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):  # torch >= 2.9
            m.set_force_sum_reduction_for_comms(True)
    model.train()
    if case["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = {k: (v if k == "routes" else v.to(device)) for k, v in case["ranks"][rank].items()}
    n_label = case["n_label_tokens"]
    sent_rows: list[list[torch.Tensor]] = [[] for _ in find_moe_routers(model, probe=False).sites]
    seen, _ = expert_inputs(model, sent_rows)
    received, received_rows = _received(model) if args.mode == "ep" else ([], [])

    activities = [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        (loss_sum(model, batch) / n_label).backward()
    plain = _collectives(prof)
    for x in seen + received + sent_rows + received_rows:
        x.clear()
    model.zero_grad(set_to_none=True)
    with profile(activities=activities) as prof:
        with replay(model, batch["routes"]) as stats:
            loss = loss_sum(model, batch) / n_label
            loss.backward()
    replayed = _collectives(prof)
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    out = {
        "rank": rank, "loss": float(loss.detach()),
        "replay_ids": [list(x) for x in seen],
        "received": [torch.cat(x) if x else torch.zeros(0, dtype=torch.long) for x in received],
        "received_rows": [torch.cat(x) for x in received_rows if x],
        "sent_rows": [torch.cat(x) for x in sent_rows] if args.mode == "ep" else [],
        "stats": (int(stats.fallback_cells), int(stats.replayed_cells)),
        "collectives": {"plain": plain, "replay": replayed},
        "grads": grads if rank == 0 else {},
    }
    torch.save(out, Path(args.out) / f"rank{rank}.pt")
    print(f"rank {rank}: loss {float(loss):.6f}, {len(plain)} collectives, stats {out['stats']}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
