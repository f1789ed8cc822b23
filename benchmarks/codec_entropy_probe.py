"""How much would an entropy coder that adapts to each layer's expert frequencies save, and at
what decode speed? A measured prototype, not a wire mode.

For each block of tokens and each layer it fits the maximum-entropy distribution over K-subsets
with the block's per-expert frequencies (P(S) = prod w_e / e_K(w), as codec_formats.py's
order-0 bound), walks the experts in popularity order with one binary decision each until the
row's K experts are chosen (P(in | position j, r still to choose) = w_j e_{r-1}(w_{>j}) /
e_r(w_{>=j}), 12-bit probabilities; forced decisions cost nothing), and codes the decisions with
a binary rANS coder (32-bit state, 16-bit words) in numba. It prints bits per row, counting the
stream, the per-block tables (popularity order and quantized probabilities, zstd) and the state,
next to set mode's packed ranks and the order-0 bound; and the decode speed of the prototype next
to the codec's set-mode decode, on the same trace, in the same run. Every block round-trips.

Run: python benchmarks/codec_entropy_probe.py [--tokens 8192] [--source realistic]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numba as nb
import numpy as np
import zstandard
from codec_formats import captured_trace, fit_weights, realistic_trace

from routecap import codec

SCALE = 12  # probabilities in 1/4096
RANS_L = 1 << 16


def decision_table(w: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Popularity order and q[j, r - 1] = P(expert at position j in | r to choose), 12-bit.

    0 means never in (weight 0); 4096 means forced in (as many non-zero experts left as to choose).
    """
    perm = np.argsort(-w, kind="stable")
    ws = w[perm]
    E = len(w)
    S = np.zeros((E + 1, K + 1))  # S[j, r] = e_r(ws[j:])
    S[:, 0] = 1.0
    nonzero_left = np.zeros(E + 1, np.int64)
    for j in range(E - 1, -1, -1):
        S[j, 1:] = S[j + 1, 1:] + ws[j] * S[j + 1, :-1]
        nonzero_left[j] = nonzero_left[j + 1] + (ws[j] > 0)
    q = np.zeros((E, K), np.int64)
    for r in range(1, K + 1):
        p = np.where(S[:E, r] > 0, ws * S[1:, r - 1] / np.maximum(S[:E, r], 1e-300), 0.0)
        qr = np.clip(np.rint(p * (1 << SCALE)), 1, (1 << SCALE) - 1)
        qr[ws == 0] = 0
        qr[(ws > 0) & (nonzero_left[:E] <= r)] = 1 << SCALE
        q[:, r - 1] = qr
    return perm, q


@nb.njit(cache=True)
def _decisions(rows_NK, rank_NE, q_EK, E, K, bits_out, q_out):  # pragma: no cover
    """The coded decisions of each row (sorted ids), in decoding order; returns their count."""
    n = 0
    member = np.zeros(E, np.bool_)
    for r in range(rows_NK.shape[0]):
        for k in range(K):
            member[rank_NE[rows_NK[r, k]]] = True
        left = K
        j = 0
        while left > 0:
            p = q_EK[j, left - 1]
            b = member[j]
            if 0 < p < 4096:
                bits_out[n] = b
                q_out[n] = p
                n += 1
            if b:
                left -= 1
                member[j] = False
            j += 1
    return n


@nb.njit(cache=True)
def _rans_encode(bits, qs, n, words):  # pragma: no cover
    """Binary rANS over the decisions, last first; words come out in decoding order reversed."""
    x = np.uint64(RANS_L)
    m = 0
    for i in range(n - 1, -1, -1):
        q = np.uint64(qs[i])
        if bits[i]:
            f, c = q, np.uint64(0)
        else:
            f, c = np.uint64(4096) - q, q
        x_max = np.uint64((RANS_L >> SCALE) << 16) * f
        while x >= x_max:
            words[m] = np.uint16(x & np.uint64(0xFFFF))
            m += 1
            x >>= np.uint64(16)
        x = ((x // f) << np.uint64(SCALE)) + (x % f) + c
    return x, m


@nb.njit(cache=True)
def _decode_layer(x, words, m, perm, q_EK, K, out_NK):  # pragma: no cover
    """Rows of one layer back from the stream (words read from the end); returns (x, m)."""
    for r in range(out_NK.shape[0]):
        left = K
        j = 0
        k = 0
        while left > 0:
            p = q_EK[j, left - 1]
            if p == 4096:
                b = True
            elif p == 0:
                b = False
            else:
                s = x & np.uint64(4095)
                b = s < np.uint64(p)
                if b:
                    f, c = np.uint64(p), np.uint64(0)
                else:
                    f, c = np.uint64(4096 - p), np.uint64(p)
                x = f * (x >> np.uint64(SCALE)) + s - c
                while x < np.uint64(RANS_L):
                    m -= 1
                    x = (x << np.uint64(16)) | np.uint64(words[m])
            if b:
                out_NK[r, k] = perm[j]
                k += 1
                left -= 1
            j += 1
        for a in range(1, K):  # sort the K ids (they came in popularity order)
            v = out_NK[r, a]
            b2 = a - 1
            while b2 >= 0 and out_NK[r, b2] > v:
                out_NK[r, b2 + 1] = out_NK[r, b2]
                b2 -= 1
            out_NK[r, b2 + 1] = v
    return x, m


def probe(trace, block: int = 16384) -> None:
    srt = trace.with_sorted_topk()
    ids = srt.expert_ids.astype(np.int64)
    T, L, K = ids.shape
    E = trace.num_experts
    total_bits = 0
    table_bytes = 0
    streams = []
    for t0 in range(0, T, block):
        b = ids[t0:t0 + block]
        Tb = b.shape[0]
        tables = []
        for layer in range(L):  # layer-major within the block: one table per layer
            n = np.bincount(b[:, layer].ravel(), minlength=E).astype(float)
            perm, q = decision_table(fit_weights(n, Tb, K), K)
            rank = np.empty(E, np.int64)
            rank[perm] = np.arange(E)
            tables.append((perm, q, rank))
        bits = np.zeros(Tb * L * E, np.bool_)
        qs = np.zeros(Tb * L * E, np.int64)
        n_dec = 0
        for layer, (_, q, rank) in enumerate(tables):
            n_dec += _decisions(b[:, layer], rank, q, E, K, bits[n_dec:], qs[n_dec:])
        words = np.zeros(n_dec + 4, np.uint16)
        x, m = _rans_encode(bits, qs, n_dec, words)
        raw_tables = b"".join(p.astype(np.uint8 if E <= 256 else np.uint16).tobytes()
                              + q.astype("<u2").tobytes() for p, q, _ in tables)
        tb = len(zstandard.ZstdCompressor(level=3).compress(raw_tables))
        table_bytes += tb
        total_bits += 16 * m + 64 + 8 * tb
        streams.append((t0, Tb, tables, x, words[:m].copy(), m))

    def decode_all() -> np.ndarray:
        out = np.empty((T, L, K), np.int64)
        for t0, Tb, tables, x, words, m in streams:
            for layer in range(L):
                perm, q, _ = tables[layer]
                dst = np.empty((Tb, K), np.int64)
                x, m = _decode_layer(x, words, m, perm, q, K, dst)
                out[t0:t0 + Tb, layer] = dst
            assert m == 0 and x == RANS_L, "stream not consumed exactly"
        return out

    assert np.array_equal(decode_all(), ids), "the prototype does not round-trip"
    rows = T * L
    times, set_times = [], []
    blob = codec.encode(srt, mode="set", fallback=False)
    for _ in range(5):
        t = time.perf_counter()
        decode_all()
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        codec.decode(blob)
        set_times.append(time.perf_counter() - t)
    raw = T * L * K
    print(f"  entropy-coded prototype: {total_bits / rows:.2f} bits/row (tables "
          f"{8 * table_bytes / rows:.2f}); set mode packed {8 * len(blob) / rows:.2f}; uniform "
          f"bound {math.log2(math.comb(E, K)):.2f}")
    print(f"  decode MB/s of raw uint8, median of 5, one thread: prototype "
          f"{raw / statistics.median(times) / 1e6:.0f}, codec set mode "
          f"{raw / statistics.median(set_times) / 1e6:.0f} (its blocks on up to 2 threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--source", choices=("captured", "realistic", "both"), default="both")
    args = ap.parse_args()
    for shape in ((48, 128, 8), (58, 256, 8)):
        for source, make in (("captured", captured_trace), ("realistic", realistic_trace)):
            if args.source in (source, "both"):
                print(f"[{source}] {args.tokens} tokens, {shape[0]} layers, top-{shape[2]} of "
                      f"{shape[1]}")
                probe(make(*shape, args.tokens))


if __name__ == "__main__":
    main()
