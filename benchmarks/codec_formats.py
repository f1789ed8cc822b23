"""Wire formats side by side: bytes and encode/decode throughput for the same traces.

Two router shapes: Qwen3-30B-A3B-like (48 MoE layers, top-8 of 128 experts) and a 256-expert one
(58 layers, top-8 of 256, as DeepSeek-V3). The routes are captured with routecap from a
transformers Qwen3-MoE of that router shape (hidden size 64, seeded random weights): 32 requests
of 1024 tokens each, concatenated into one 32,768-token trace. Formats:

* SGLang: base64 of int32 ``[T, L, K]`` (``meta_info["routed_experts"]``);
* vLLM OpenAI: base64 of an ``.npy`` file of int32 ``[T, L, K]``;
* raw uint8 ``[T, L, K]``; raw uint8 + zstd (level 3);
* routecap's codec (``routecap.codec``), order-preserving and set mode.

Throughput is MB/s of raw uint8 equivalent (T * L * K bytes), median of repeats, measured in one
run. Before zstd, routecap's packed rows are compared with the information bound per row,
log2 C(E, K) bits (set mode) and log2(C(E, K) * K!) bits (order mode).

Run: python benchmarks/codec_formats.py [--repeats 5] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

from routecap import codec
from routecap.files import load_file, save_file
from routecap.integrations.sglang import from_sglang, to_sglang
from routecap.integrations.vllm import from_vllm_b64npy, to_vllm_b64npy
from routecap.trace import RoutingTrace

CACHE = Path(__file__).resolve().parent / ".cache"


def captured_trace(layers: int, experts: int, top_k: int, tokens: int) -> RoutingTrace:
    """Routes of a Qwen3-MoE of this router shape over ``tokens`` tokens (cached on disk)."""
    path = CACHE / f"routes-L{layers}-E{experts}-K{top_k}-T{tokens}.safetensors"
    if path.exists():
        return load_file(path)[0]
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from routecap.builtin import init_weights_
    from routecap.integrations.hf import capture_generate

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=64,
                         moe_intermediate_size=16, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_experts=experts,
                         num_experts_per_tok=top_k, max_position_embeddings=2048,
                         norm_topk_prob=True)
    model = init_weights_(Qwen3MoeForCausalLM(cfg), seed=0).eval()
    chunk = 1024
    n_req = tokens // chunk
    g = torch.Generator().manual_seed(0)
    parts = []
    for r in range(n_req):
        # a prompt of chunk + 1 tokens: one forward (max_new_tokens=1) gives chunk + 1 rows
        ids = torch.randint(3, 512, (1, chunk), generator=g)
        (t,), _ = capture_generate(model, ids, max_new_tokens=1, do_sample=False,
                                   eos_token_id=[], pad_token_id=0)
        parts.append(t.expert_ids[:chunk])
        print(f"  captured request {r + 1}/{n_req}", end="\r", file=sys.stderr)
    ids = np.concatenate(parts)
    trace = RoutingTrace.from_ids(ids, num_experts=experts, moe_layers=list(range(layers)),
                                  request_id="bench", prompt_len=tokens, model="qwen3-moe-shape")
    CACHE.mkdir(exist_ok=True)
    save_file([trace], path)
    return trace


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_shape(layers, experts, top_k, tokens, repeats):
    trace = captured_trace(layers, experts, top_k, tokens)
    srt = trace.with_sorted_topk()
    raw_bytes = trace.expert_ids.nbytes
    L, K, E = layers, top_k, experts
    meta = dict(num_layers=L, top_k=K, moe_layers=list(range(L)), num_experts=E,
                request_id="bench", prompt_len=tokens, start=0)
    zc = zstandard.ZstdCompressor(level=3)
    zd = zstandard.ZstdDecompressor()
    formats = [
        ("SGLang base64 int32",
         lambda: to_sglang(trace), lambda b: from_sglang(b, **meta)),
        ("vLLM base64 .npy int32",
         lambda: to_vllm_b64npy(trace, dtype="<i4"),
         lambda b: from_vllm_b64npy(b, moe_layers=list(range(L)), num_experts=E,
                                    request_id="bench", prompt_len=tokens)),
        ("raw uint8",
         lambda: trace.expert_ids.tobytes(),
         lambda b: np.frombuffer(b, np.uint8).reshape(-1, L, K)),
        ("raw uint8 + zstd",
         lambda: zc.compress(trace.expert_ids.tobytes()),
         lambda b: np.frombuffer(zd.decompress(b), np.uint8).reshape(-1, L, K)),
        ("routecap codec, order mode",
         lambda: codec.encode(trace, mode="order"), codec.decode),
        ("  (packed only, no fallback)",
         lambda: codec.encode(trace, mode="order", fallback=False), codec.decode),
        ("routecap codec, set mode",
         lambda: codec.encode(srt, mode="set"), codec.decode),
        ("  (packed only, no fallback)",
         lambda: codec.encode(srt, mode="set", fallback=False), codec.decode),
    ]
    print(f"\n{tokens} tokens, {L} MoE layers, top-{K} of {E} experts: raw uint8 = "
          f"{raw_bytes / 1e6:.2f} MB  (numba {'on' if codec._HAVE_NUMBA else 'off'})")
    print(f"{'format':<28} {'bytes':>12} {'x raw':>7} {'encode MB/s':>12} {'decode MB/s':>12}")
    zstd_raw = None
    for name, enc, dec in formats:
        blob, t_enc = timed(enc, repeats)
        _, t_dec = timed(lambda dec=dec, blob=blob: dec(blob), repeats)
        size = len(blob)
        if name == "raw uint8 + zstd":
            zstd_raw = size
        print(f"{name:<28} {size:>12,} {size / raw_bytes:>7.3f} {raw_bytes / t_enc / 1e6:>12.0f} "
              f"{raw_bytes / t_dec / 1e6:>12.0f}")
        if name.startswith(("routecap", "  (")):
            r = codec.inspect(blob)["routes"]
            mode = r["mode"]
            if mode in ("set", "order"):
                bound = math.log2(math.comb(E, K)) + (
                    math.log2(math.factorial(K)) if mode == "order" else 0)
                packed = -(-L * sum(r["widths"]) // 8) * tokens  # token-aligned packed rows
                bits = 8 * packed / (tokens * L)
                print(f"{'':<28}   {mode} rows before zstd: {bits:.2f} bits/row vs the bound "
                      f"{bound:.2f} (+{100 * (bits / bound - 1):.1f}%) = "
                      f"{packed / raw_bytes:.3f}x raw; blocks "
                      f"{sorted({b[1] for b in r['blocks']})}")
            else:
                print(f"{'':<28}   stored as raw ids + zstd, {r['layout']}-major (smaller "
                      f"than the packed rows here); {'<=' if size <= zstd_raw else '>'} raw+zstd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    codec.decode(codec.encode(RoutingTrace.from_ids(np.zeros((1, 1, 1), np.int64), num_experts=2,
                                                    moe_layers=[0], request_id="w", prompt_len=1)))
    run_shape(48, 128, 8, args.tokens, args.repeats)
    run_shape(58, 256, 8, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
