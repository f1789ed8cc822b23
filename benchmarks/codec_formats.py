"""Wire formats side by side: bytes and encode/decode throughput for the same traces.

Two router shapes: Qwen3-30B-A3B-like (48 MoE layers, top-8 of 128 experts) and a 256-expert one
(58 layers, top-8 of 256, as DeepSeek-V3), each with two sources of routes:

* ``captured``: routes captured with routecap from a transformers Qwen3-MoE of that router shape
  (hidden size 64, seeded random weights): requests of 1024 tokens each, concatenated into one
  trace. A random-weight router repeats a layer's expert sets across tokens far more than a
  trained one does, which flatters compressors that find repeats;
* ``realistic``: routes drawn with the statistics trained routers are reported to have (see
  :func:`realistic_trace`): per-layer expert popularity as skewed as published load figures, and
  neighbouring tokens that share experts more often than chance.

Formats:

* SGLang: base64 of int32 ``[T, L, K]`` (``meta_info["routed_experts"]``);
* vLLM OpenAI: base64 of an ``.npy`` file of int32 ``[T, L, K]``;
* raw uint8 ``[T, L, K]``; raw uint8 + zstd (level 3);
* routecap's codec (``routecap.codec``): order-preserving, set mode, and entropy mode (rows as
  sets: per block and layer the experts ranked by popularity, each row's ascending ranks coded
  as gaps with per-(layer, position) frequency tables and rANS).

Throughput is MB/s of raw uint8 equivalent (T * L * K bytes), median of repeats, measured in one
run (wall time; blocks of 16384 tokens decode on several threads); set and entropy mode are then
timed again interleaved, in CPU time, which a busy shared machine disturbs less. Sizes are also
given in bits per row (one row: the K ids of one token at one layer) next to
the entropy of the routes actually observed: the uniform bound log2 C(E, K) (what set mode's
fixed-width ranks reach) and the per-layer order-0 bound, the code length of an ideal coder that
knows each layer's expert frequencies (the maximum-entropy distribution over K-subsets with the
observed per-expert frequencies, fitted per layer). The gap between the two is what an entropy
coder adapting to each layer's frequencies saves over set mode; the entropy mode's line shows
how much of it the shipped coder gets.

Run: python benchmarks/codec_formats.py [--repeats 5] [--tokens 32768] [--source both]
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


# Skew of each layer's expert popularity: Zipf exponents drawn per layer from this range. With
# 128 experts, (0.7, 1.2) gives a busiest expert at 7-13x the mean load per layer over 8k tokens
# (median 10x; measured and printed by the run), as reported for Qwen3-30B-A3B: 7.2x at layer 0 after 30
# requests on a live server, 13-16x per forward at small batches (kekzl/imp PR #1741; and
# QwenLM/Qwen3 issue #1418: its balancing loss averages all layers, so it does not stop one
# layer's skew). DeepSeek-V3 is trained with auxiliary-loss-free bias balancing (arXiv 2412.19437)
# and is milder, yet serving it still loses a sixth of prefill throughput to uneven expert load
# until experts are re-placed by measured load (ROCm/ATOM PR #1210: +16.7% from re-placement alone,
# DeepSeek-V4-Pro at EP=8; sgl-project/sglang issue #5309 shows the hot experts of DeepSeek-R1's
# first MoE layer): (0.4, 0.8) for the 256-expert shape (5-14x, median 9x: with twice the
# experts, a milder exponent gives a similar busiest-to-mean ratio).
ZIPF = {128: (0.7, 1.2), 256: (0.4, 0.8)}
# Neighbouring tokens: routers send consecutive tokens to the same experts more often than chance
# (Mixtral's routing analysis, arXiv 2401.04088 section 5). Modelled as a per-layer "topic"
# preference added to the router scores that changes at a random ~1/SWITCH tokens.
SWITCH, TOPIC = 0.15, 1.0


def realistic_trace(layers: int, experts: int, top_k: int, tokens: int,
                    seed: int = 0) -> RoutingTrace:
    """Routes with a trained router's statistics (see ZIPF and SWITCH; cached on disk).

    Each layer's router score of expert e for token t is ``log p_layer[e] + topic[t, e] + g``:
    a Zipf popularity over a random order of the experts, a topic preference shared by a run of
    neighbouring tokens, and Gumbel noise (so that without the topic, top-K is sampling K
    experts without replacement by popularity); the K best in score order are the route.
    """
    lo, hi = ZIPF[experts]
    path = CACHE / (f"realistic-L{layers}-E{experts}-K{top_k}-T{tokens}-s{seed}-z{lo}-{hi}"
                    f"-w{SWITCH}-t{TOPIC}.safetensors")  # the parameters name the file
    if path.exists():
        return load_file(path)[0]
    rng = np.random.default_rng(seed)
    ids = np.empty((tokens, layers, top_k), np.int64)
    seg = np.cumsum(rng.random(tokens) < SWITCH)
    for layer in range(layers):
        logp = -rng.uniform(lo, hi) * np.log(np.arange(1, experts + 1))[rng.permutation(experts)]
        topic = TOPIC * rng.standard_normal((int(seg[-1]) + 1, experts)).astype(np.float32)
        score = logp.astype(np.float32) + topic[seg] + rng.gumbel(size=(tokens, experts)).astype(
            np.float32)
        top = np.argpartition(-score, top_k, axis=1)[:, :top_k]
        by_score = np.argsort(-np.take_along_axis(score, top, 1), axis=1)
        ids[:, layer] = np.take_along_axis(top, by_score, 1)
    trace = RoutingTrace.from_ids(ids, num_experts=experts, moe_layers=list(range(layers)),
                                  request_id="bench", prompt_len=tokens, model="realistic")
    CACHE.mkdir(exist_ok=True)
    save_file([trace], path)
    return trace


def _elementary(w: np.ndarray, k: int) -> np.ndarray:
    """e_0..e_k, the elementary symmetric polynomials of the weights w."""
    e = np.zeros(k + 1)
    e[0] = 1.0
    for x in w:
        e[1:] = e[1:] + x * e[:-1]
    return e


def fit_weights(n: np.ndarray, T: int, K: int, iters: int = 50) -> np.ndarray:
    """Weights w of the maximum-entropy distribution over K-subsets, P(S) = prod w_e / e_K(w),
    whose inclusion probabilities are n / T (iterative scaling; mean weight 1)."""
    q = n / T  # P(expert in the row); sums to K
    w = np.where(q > 0, q / np.maximum(1 - q, 1e-9), 0.0)
    for _ in range(iters):
        w /= w[w > 0].mean()
        e = _elementary(w, K)
        rest = np.zeros((K, len(n)))  # e_r of w without expert e, for r < K
        rest[0] = 1.0
        for r in range(1, K):
            rest[r] = e[r] - w * rest[r - 1]
        pi = w * rest[K - 1] / e[K]
        w = np.where(q > 0, w * q / np.maximum(pi, 1e-300), 0.0)
    return w / w[w > 0].mean()


def observed_entropy(trace: RoutingTrace) -> dict[str, float]:
    """What the routes are: per-layer load skew, neighbour overlap, and bits per row.

    ``order0``: the mean code length per row under the maximum-entropy distribution over
    K-subsets whose per-expert frequencies are those observed in each layer (weights fitted by
    iterative scaling; P(S) = prod w_e / e_K(w)), i.e. what an ideal coder adapting to each
    layer's expert frequencies reaches (its tables aside). ``uniform``: log2 C(E, K).
    """
    ids = trace.expert_ids
    T, L, K = ids.shape
    E = trace.num_experts
    skew, overlap, bits = [], [], 0.0
    for layer in range(L):
        x = ids[:, layer].astype(np.int64)
        n = np.bincount(x.ravel(), minlength=E).astype(float)
        skew.append(n.max() / n.mean())
        member = np.zeros((T, E), bool)
        np.put_along_axis(member, x, True, axis=1)
        overlap.append((member[1:] & member[:-1]).sum(1).mean() / K)
        w = fit_weights(n, T, K)
        e = _elementary(w, K)
        used = n > 0
        bits += (-(n[used] * np.log2(w[used])).sum()) / T + math.log2(e[K])
    return {"skew_min": min(skew), "skew_med": float(np.median(skew)), "skew_max": max(skew),
            "overlap": float(np.mean(overlap)), "chance": K / E, "order0": bits / L,
            "uniform": math.log2(math.comb(E, K))}


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_shape(trace: RoutingTrace, source: str, repeats: int) -> None:
    srt = trace.with_sorted_topk()
    raw_bytes = trace.expert_ids.nbytes
    tokens, L, K = trace.expert_ids.shape
    E = trace.num_experts
    rows = tokens * L
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
        ("routecap codec, entropy mode",
         lambda: codec.encode(srt, mode="entropy"), codec.decode),
        ("  (entropy, no fallback)",
         lambda: codec.encode(srt, mode="entropy", fallback=False), codec.decode),
    ]
    st = observed_entropy(trace)
    print(f"\n[{source}] {tokens} tokens, {L} MoE layers, top-{K} of {E} experts: raw uint8 = "
          f"{raw_bytes / 1e6:.2f} MB  (numba {'on' if codec._HAVE_NUMBA else 'off'})")
    print(f"  busiest expert / mean load per layer: median {st['skew_med']:.1f}x (layers "
          f"{st['skew_min']:.1f}-{st['skew_max']:.1f}x); a token shares {100 * st['overlap']:.0f}% "
          f"of its experts with the previous token at the same layer (chance "
          f"{100 * st['chance']:.0f}%)")
    print(f"  entropy of a row as a set: uniform bound {st['uniform']:.2f} bits; per-layer "
          f"order-0 {st['order0']:.2f} bits (an ideal coder that knows each layer's expert "
          f"frequencies)")
    print(f"{'format':<28} {'bytes':>12} {'x raw':>7} {'bits/row':>9} {'encode MB/s':>12} "
          f"{'decode MB/s':>12}")
    zstd_raw = None
    for name, enc, dec in formats:
        blob, t_enc = timed(enc, repeats)
        _, t_dec = timed(lambda dec=dec, blob=blob: dec(blob), repeats)
        size = len(blob)
        if name == "raw uint8 + zstd":
            zstd_raw = size
        print(f"{name:<28} {size:>12,} {size / raw_bytes:>7.3f} {8 * size / rows:>9.2f} "
              f"{raw_bytes / t_enc / 1e6:>12.0f} {raw_bytes / t_dec / 1e6:>12.0f}")
        if name.startswith(("routecap", "  (")):
            r = codec.inspect(blob)["routes"]
            mode = r["mode"]
            if mode in ("set", "order"):
                bound = math.log2(math.comb(E, K)) + (
                    math.log2(math.factorial(K)) if mode == "order" else 0)
                packed = -(-L * sum(r["widths"]) // 8) * tokens  # token-aligned packed rows
                bits = 8 * packed / rows
                print(f"{'':<28}   {mode} rows before zstd: {bits:.2f} bits/row vs the bound "
                      f"{bound:.2f} (+{100 * (bits / bound - 1):.1f}%) = "
                      f"{packed / raw_bytes:.3f}x raw; blocks "
                      f"{sorted({b[1] for b in r['blocks']})}")
            elif mode == "entropy":
                bits = 8 * size / rows
                print(f"{'':<28}   entropy rows, tables included: {bits:.2f} bits/row vs the "
                      f"per-layer order-0 bound {st['order0']:.2f} "
                      f"({100 * (bits / st['order0'] - 1):+.1f}%) and the uniform bound "
                      f"{st['uniform']:.2f}; blocks {sorted({b[1] for b in r['blocks']})}; "
                      f"{'<=' if size <= zstd_raw else '>'} raw+zstd")
            else:
                print(f"{'':<28}   stored as raw ids + zstd, {r['layout']}-major (smaller "
                      f"than the packed rows here); {'<=' if size <= zstd_raw else '>'} raw+zstd")


def set_vs_entropy(trace: RoutingTrace, repeats: int) -> None:
    """Decode and encode of set and entropy mode (no fallback), interleaved call by call and
    timed in CPU seconds of this process, so that other jobs on a shared machine weigh less."""
    srt = trace.with_sorted_topk()
    raw = trace.expert_ids.nbytes
    blobs = {m: codec.encode(srt, mode=m, fallback=False) for m in ("set", "entropy")}
    enc = {m: [] for m in blobs}
    dec = {m: [] for m in blobs}
    for _ in range(repeats):
        for m, blob in blobs.items():
            t0 = time.process_time()
            codec.encode(srt, mode=m, fallback=False)
            enc[m].append(time.process_time() - t0)
            t0 = time.process_time()
            codec.decode(blob)
            dec[m].append(time.process_time() - t0)
    rate = {m: (raw / statistics.median(enc[m]) / 1e6, raw / statistics.median(dec[m]) / 1e6)
            for m in blobs}
    print(f"  set vs entropy, interleaved, CPU time: decode {rate['set'][1]:.0f} vs "
          f"{rate['entropy'][1]:.0f} MB/s (entropy/set {rate['entropy'][1] / rate['set'][1]:.2f}),"
          f" encode {rate['set'][0]:.0f} vs {rate['entropy'][0]:.0f} MB/s (entropy/set "
          f"{rate['entropy'][0] / rate['set'][0]:.2f}); bytes entropy/set "
          f"{len(blobs['entropy']) / len(blobs['set']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--source", choices=("captured", "realistic", "both"), default="both")
    args = ap.parse_args()
    codec.decode(codec.encode(RoutingTrace.from_ids(np.zeros((1, 1, 1), np.int64), num_experts=2,
                                                    moe_layers=[0], request_id="w", prompt_len=1)))
    for shape in ((48, 128, 8), (58, 256, 8)):
        for source, make in (("captured", captured_trace), ("realistic", realistic_trace)):
            if args.source in (source, "both"):
                trace = make(*shape, args.tokens)
                run_shape(trace, source, args.repeats)
                set_vs_entropy(trace, args.repeats)


if __name__ == "__main__":
    main()
