"""The ``entropy`` wire mode: each layer's expert frequencies, coded with rANS (maths and reference).

Shape legend: T tokens, L MoE layers, K top-k, E experts, S = E - K + 1 gap values, M = L * K
frequency tables, N coded symbols.

Trained routers send each layer's tokens to a few experts far more often than to the rest, so a
fixed-width rank (``set`` mode, ``log2 C(E, K)`` bits a row) leaves bits on the table. Per block of
tokens and per layer, the encoder orders the experts by how often the block routes to them at that
layer (rank 0 the busiest, ties by id), writes each row's K experts as their ascending popularity
ranks ``r_1 < ... < r_K``, and codes the gaps ``g_i = r_i - r_{i-1} - 1`` (``r_0 = -1``) with one
static frequency table per (layer, i): the i-th gap of a row at a skewed layer is small, and its
table knows how small. The tables (11-bit frequencies summing to 2048) and each layer's popularity
order travel at the head of the block; the gaps follow as one rANS stream (32-bit states, 16-bit
words, four states taking turns symbol by symbol so that a decoder overlaps their work),
layer-major within the block. Rows come back as sets (ids ascending): the mode is set-only, like ``set``.

Block payload (little-endian)::

    perm     L x E ids (u8 when E <= 256, else u16): layer l's experts, busiest first
    tables   L x K of: u16 n (values 0..n-1 have a frequency), n x u16 frequencies (sum 2048)
    states   4 x u32 (the decoder's first states, each in [2**16, 2**32); symbol j uses j % 4)
    words    u16 words, read front to back; the stream ends with every state at 2**16

Missing rows are not coded (the decoder knows them from the ``missing`` section).

This module holds the model (orders, gaps, quantised tables), the table layout and the slow,
obviously-right reference coder that the compiled kernels (:mod:`~routecap.codec.entropy_kernels`)
are tested against and that runs without numba.
"""

from __future__ import annotations

import struct

import numpy as np

PROB_BITS = 11
PROB_SCALE = 1 << PROB_BITS  # every table's frequencies sum to this (2048)
RANS_L = 1 << 16  # states live in [RANS_L, 2**32) between symbols; words are 16 bits
# what a block decode returns besides -1 (valid) and a row index (the first invalid row)
BAD_TABLES = -2
BAD_STREAM = -3


STATES = 4
MAX_VALUES = 1024  # gap values per table: a decoder's slot entry keeps one in 10 bits


def fits(E: int, K: int) -> bool:
    """A table has at most E - K + 1 values (gaps 0..E - K)."""
    return 1 <= K <= E and E - K + 1 <= MAX_VALUES


def id_bytes(E: int) -> int:
    return 1 if E <= 256 else 2


def max_payload(T: int, L: int, K: int, E: int) -> int:
    """The largest block payload an encoder writes: every symbol emits at most one word."""
    return L * E * id_bytes(E) + L * K * 2 * (1 + E - K + 1) + 4 * STATES + 2 * T * L * K


# ---- the model (encoder side) -------------------------------------------------------------------
def popularity(counts_LE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's experts busiest first (ties by id), and each expert's rank in that order."""
    L, E = counts_LE.shape
    perm_LE = np.argsort(-counts_LE, axis=1, kind="stable")
    rank_LE = np.empty_like(perm_LE)
    np.put_along_axis(rank_LE, perm_LE, np.broadcast_to(np.arange(E), (L, E)), axis=1)
    return perm_LE, rank_LE


def model(ids_TLK: np.ndarray, live_TL: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray, np.ndarray]:
    """Popularity order ``perm_LE``, gap counts ``counts_LKS``, and the coded symbols in stream
    order: table index ``tab_N`` (layer * K + i) and gap ``sym_N`` (live rows, layer-major)."""
    T, L, K = ids_TLK.shape
    S = E - K + 1
    ids_LTK = ids_TLK.astype(np.int64).transpose(1, 0, 2)
    live_LT = np.ascontiguousarray(live_TL.T)
    layer_LT = np.broadcast_to(np.arange(L, dtype=np.int64)[:, None], (L, T))
    seen = (layer_LT[..., None] * E + ids_LTK)[live_LT]
    counts_LE = np.bincount(seen.ravel(), minlength=L * E).reshape(L, E)
    perm_LE, rank_LE = popularity(counts_LE)
    ranks = np.sort(np.take_along_axis(rank_LE, ids_LTK.reshape(L, T * K), axis=1)
                    .reshape(L, T, K)[live_LT], axis=1)  # [N_rows, K], layer-major
    gaps = np.diff(ranks, axis=1, prepend=-1) - 1
    tab = (layer_LT[live_LT][:, None] * K + np.arange(K)).ravel()
    sym = gaps.ravel()
    counts_LKS = np.bincount(tab * S + sym, minlength=L * K * S).reshape(L, K, S)
    return perm_LE, counts_LKS, tab, sym


def quantise(counts_MS: np.ndarray) -> np.ndarray | None:
    """Frequencies summing to 2048 per table with data (each seen value >= 1; the busiest value
    takes the rounding), zeros for tables without data; None if a table cannot fit 11 bits."""
    n = counts_MS.sum(axis=1, keepdims=True)
    f = np.where(counts_MS > 0, np.maximum(1, counts_MS * PROB_SCALE // np.maximum(n, 1)), 0)
    used = n[:, 0] > 0
    top = np.argmax(counts_MS, axis=1)
    rows = np.arange(f.shape[0])
    f[rows, top] += np.where(used, PROB_SCALE - f.sum(axis=1), 0)
    if (f[rows, top] < 1)[used].any():
        return None
    return f


def tables_bytes(perm_LE: np.ndarray, freq_MS: np.ndarray, E: int) -> bytes:
    out = [perm_LE.astype("<u1" if id_bytes(E) == 1 else "<u2").tobytes()]
    for f in freq_MS:
        nz = np.flatnonzero(f)
        n = int(nz[-1]) + 1 if nz.size else 0
        out.append(struct.pack("<H", n))
        out.append(f[:n].astype("<u2").tobytes())
    return b"".join(out)


def cumulative(freq_MS: np.ndarray) -> np.ndarray:
    return np.cumsum(freq_MS, axis=1) - freq_MS


# ---- reference coder ----------------------------------------------------------------------------
def rans_encode_py(tab_N: np.ndarray, sym_N: np.ndarray, freq_MS: np.ndarray,
                   cum_MS: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The states and the words, in decoding order (symbol j is coded by state j % 4)."""
    x = [RANS_L] * STATES
    words = []
    for j in range(len(sym_N) - 1, -1, -1):
        f = int(freq_MS[tab_N[j], sym_N[j]])
        c = int(cum_MS[tab_N[j], sym_N[j]])
        s = x[j % STATES]
        while s >= ((RANS_L >> PROB_BITS) << 16) * f:
            words.append(s & 0xFFFF)
            s >>= 16
        x[j % STATES] = ((s // f) << PROB_BITS) + s % f + c
    return x, np.array(words[::-1], np.uint16)


def parse_tables_py(buf: bytes, L: int, K: int, E: int
                    ) -> tuple[np.ndarray, list[np.ndarray], int] | None:
    """The popularity orders, the L * K frequency tables and where the states start; None when
    they are not valid (an order that is no permutation, a table longer than E - K + 1 values or
    whose frequencies do not sum to 2048)."""
    w = id_bytes(E)
    pos = L * E * w
    if len(buf) < pos:
        return None
    perm = np.frombuffer(buf[:pos], "<u1" if w == 1 else "<u2").astype(np.int64).reshape(L, E)
    if not (np.sort(perm, axis=1) == np.arange(E)).all():
        return None
    freqs = []
    for _ in range(L * K):
        if pos + 2 > len(buf):
            return None
        (n,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        if n > E - K + 1 or pos + 2 * n > len(buf):
            return None
        f = np.frombuffer(buf[pos:pos + 2 * n], "<u2").astype(np.int64)
        pos += 2 * n
        if n and int(f.sum()) != PROB_SCALE:
            return None
        freqs.append(f)
    return perm, freqs, pos


def decode_block_py(buf: bytes, T: int, L: int, E: int, skip: np.ndarray,
                    out: np.ndarray) -> int:
    """One block's rows into ``out`` ``[T*L, K]`` (ids ascending; missing rows zero): -1, the first
    invalid row (a rank past E, or a gap without a table), BAD_TABLES or BAD_STREAM."""
    K = out.shape[1]
    got = parse_tables_py(buf, L, K, E)
    if got is None:
        return BAD_TABLES
    perm, freqs, pos = got
    if pos + 4 * STATES > len(buf) or (len(buf) - pos) % 2:
        return BAD_STREAM
    x = list(struct.unpack_from(f"<{STATES}I", buf, pos))
    if min(x) < RANS_L:
        return BAD_STREAM
    words = np.frombuffer(buf[pos + 4 * STATES:], "<u2")
    wp = 0
    j = 0
    for layer in range(L):
        for t in range(T):
            r = t * L + layer
            out[r] = 0
            if skip.shape[0] and skip[r]:
                continue
            prev = -1
            row = []
            for i in range(K):
                f = freqs[layer * K + i]
                if f.shape[0] == 0:
                    return r
                cum = np.cumsum(f) - f
                s = x[j % STATES]
                slot = s & (PROB_SCALE - 1)
                sym = int(np.searchsorted(cum, slot, side="right")) - 1  # the value whose range holds slot
                s = int(f[sym]) * (s >> PROB_BITS) + slot - int(cum[sym])
                if s < RANS_L:
                    if wp == words.shape[0]:
                        return BAD_STREAM
                    s = (s << 16) | int(words[wp])
                    wp += 1
                x[j % STATES] = s
                j += 1
                prev += 1 + sym
                if prev >= E:
                    return r
                row.append(int(perm[layer, prev]))
            out[r] = sorted(row)
    if wp != words.shape[0] or x != [RANS_L] * STATES:
        return BAD_STREAM
    return -1
