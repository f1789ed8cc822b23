"""The train-inference gap of a MoE model, without and with routing replay (R3).

Inference: a batch of prompts is sampled with ``generate`` from a bf16 copy of the model, with
routecap capturing every route (``HFRouteCapture``), and the log-prob of every sampled token is
taken from generate's raw logits. Training: the fp32 model (the master weights the bf16 copy was
rounded from, experts in eager fp32) scores the same sequences in one right-padded forward, twice:

* ``live``    its own routers choose;
* ``replay``  under ``routecap.replay.replay`` with the captured routes, aligned to the batch by
  ``routecap.align.batch_routes``.

Reported for both: the fraction of (token, layer) cells whose expert set differs from the one
inference used (read from what each MoE block's experts received), and, over the sampled tokens,
the mean k3 estimate of KL(inference || training) (``exp(d) - 1 - d`` with
``d = logp_train - logp_infer``), the mean |d| and the fraction of tokens with |d| > ln 2. With
replay the routing difference must be 0 (asserted); what remains is numerical (bf16 vs fp32).

CPU, the built-in model:   python benchmarks/train_inference_gap.py
GPU, Qwen3-30B-A3B shape:  python benchmarks/train_inference_gap.py --big [--layers auto]
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Any

import numpy as np
import torch

from routecap.align import batch_routes
from routecap.integrations.hf import HFRouteCapture, find_moe_routers
from routecap.replay import replay


def experts_received(model: Any) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """Hook each MoE block's experts: per layer, the top-k ids of every call (the ids it ran)."""
    info = find_moe_routers(model, probe=False)
    seen: list[list[torch.Tensor]] = [[] for _ in info.sites]

    def hook(i: int):
        def pre(module, args, kwargs):
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen[i].append(ids.detach().reshape(-1, ids.shape[-1]).cpu())
        return pre

    return seen, [s.block.experts.register_forward_pre_hook(hook(i), with_kwargs=True)
                  for i, s in enumerate(info.sites)]


def big_model(layers: str, device: str, tokens: int) -> Any:
    """A Qwen3-30B-A3B-shaped model in fp32 (random weights), as many layers as fit with a bf16 copy."""
    from replay_step import QWEN3_30B_A3B, build_model

    shape = dict(QWEN3_30B_A3B)
    if layers == "auto":
        H, F_, E, V = (shape["hidden_size"], shape["moe_intermediate_size"],
                       shape["num_experts"], shape["vocab_size"])
        per_layer = 6 * (3 * E * H * F_ + 4 * H * 128 * 36)  # fp32 + bf16 weights
        head = 6 * 2 * V * H + 4 * tokens * V * 4  # embeddings and head, fp32 logits
        free, _ = torch.cuda.mem_get_info()
        shape["num_hidden_layers"] = max(1, min(48, int((0.8 * free - head) // per_layer)))
    else:
        shape["num_hidden_layers"] = int(layers)
    model = build_model(shape, device=device, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def bf16_copy(model: Any, device: str) -> Any:
    """The inference copy: the same weights rounded to bf16 (never a second fp32 copy in memory)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    with torch.device(device):
        infer = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    infer.load_state_dict(model.state_dict())
    infer.generation_config = copy.deepcopy(model.generation_config)
    return infer.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", action="store_true", help="Qwen3-30B-A3B shape on the GPU")
    ap.add_argument("--layers", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None, help="longest prompt (tokens)")
    ap.add_argument("--new", type=int, default=None, help="tokens to sample per prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if args.big else "cpu")
    B = args.batch or (16 if args.big else 8)
    P = args.prompt or (128 if args.big else 24)
    G = args.new or (128 if args.big else 32)
    if args.big:
        model = big_model(args.layers, device, B * (P + G))
        name = f"Qwen3-30B-A3B shape, {model.config.num_hidden_layers} layers, random weights"
    else:
        from routecap.builtin import load_builtin

        model = load_builtin("tiny-qwen3-moe", device=device)[0]
        name = "builtin:tiny-qwen3-moe"
    model.eval()
    infer = bf16_copy(model, device)
    model.config._experts_implementation = "eager"  # the trainer's fp32 forward
    V = model.config.vocab_size
    g = np.random.default_rng(args.seed)
    lengths = g.integers(max(2, P // 2), P + 1, B)
    prompts = [g.integers(3, V, int(n)).tolist() for n in lengths]
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as generate wants
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    torch.manual_seed(args.seed)
    eos = model.generation_config.eos_token_id
    with torch.no_grad(), HFRouteCapture(infer, max_tokens=B * (P + G)) as cap:
        out = infer.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=G, min_new_tokens=1, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0, eos_token_id=eos)
        traces = cap.collect(sequences=out.sequences, attention_mask=mask, eos_token_id=eos)
    del infer
    gen = out.sequences[:, P:].cpu()
    logits_infer = torch.stack(out.logits, dim=1).float().cpu()  # [B, G, V]
    # the sampled sequences, right-padded (each row: its prompt, then its tokens up to EOS)
    rows, n_gen = [], []
    for b, t in enumerate(traces):
        n = t.num_tokens + 1 - len(prompts[b])  # the trace holds all but the last token
        n_gen.append(n)
        rows.append(prompts[b] + gen[b, :n].tolist())
    S = max(len(r) for r in rows)
    seq = torch.zeros(B, S, dtype=torch.long)
    smask = torch.zeros(B, S, dtype=torch.long)
    for b, r in enumerate(rows):
        seq[b, :len(r)] = torch.tensor(r)
        smask[b, :len(r)] = 1
    routes = batch_routes(traces, seq, smask)  # [B, S, L, K], -1 on padding and last tokens
    L, K = routes.shape[-2:]
    recorded = routes.reshape(-1, L, K)
    valid = (recorded >= 0).all(-1)
    lp_infer = torch.cat([
        torch.log_softmax(logits_infer[b, :n_gen[b]], -1).gather(
            -1, gen[b, :n_gen[b], None])[:, 0] for b in range(B)])

    results: dict[str, dict[str, float]] = {}
    for variant in ("live", "replay"):
        seen, handles = experts_received(model)
        with torch.no_grad():
            if variant == "replay":
                with replay(model, routes) as stats:
                    logits = model(input_ids=seq.to(device), attention_mask=smask.to(device)).logits
                assert stats.replayed_cells == int(valid.sum()), stats
            else:
                logits = model(input_ids=seq.to(device), attention_mask=smask.to(device)).logits
        for h in handles:
            h.remove()
        logp = torch.log_softmax(logits.float(), -1).cpu()
        lp_train = torch.cat([
            logp[b, len(prompts[b]) - 1:len(rows[b]) - 1].gather(
                -1, seq[b, len(prompts[b]):len(rows[b]), None])[:, 0] for b in range(B)])
        used = torch.stack([torch.cat(x) for x in seen], dim=1)  # [B*S, L, K]
        differ = (used.sort(-1).values != recorded.sort(-1).values).any(-1) & valid
        d = (lp_train - lp_infer).double()
        results[variant] = {
            "route_diff": float(differ.sum()) / float(valid.sum()),
            "k3": float((d.exp() - 1 - d).mean()),
            "abs_d": float(d.abs().mean()),
            "over_ln2": float((d.abs() > math.log(2)).double().mean()),
        }
    assert results["replay"]["route_diff"] == 0.0, results
    print(f"model: {name}; device: {device}"
          f"{' ' + torch.cuda.get_device_name() if device.startswith('cuda') else ''}; torch "
          f"{torch.__version__}; inference: bf16 generate (sampling, T=1), batch {B}, prompts "
          f"{int(lengths.min())}-{int(lengths.max())} tokens, {sum(n_gen)} sampled tokens; "
          f"training: fp32 forward; {int(valid.sum())} recorded (token, layer) cells, L={L}, K={K}")
    print(f"{'training forward':18s} {'routes differ':>14s} {'mean k3 KL':>12s} "
          f"{'mean |dlogp|':>13s} {'|dlogp|>ln2':>12s}")
    for k, r in results.items():
        print(f"{k:18s} {r['route_diff']:14.4%} {r['k3']:12.3e} {r['abs_d']:13.3e} "
              f"{r['over_ln2']:12.4%}")
    return results


if __name__ == "__main__":
    main()
