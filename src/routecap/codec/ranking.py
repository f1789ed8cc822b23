"""The codec's ranking maths and its numpy reference kernels.

Shape legend: N rows (one row: the K ids one layer chose for one token), K top-k, E experts,
M fields per row, T tokens, L MoE layers.

A row is a set of K distinct ids out of E. Its rank among the K-subsets of E in the combinatorial
number system is ``sum_i C(c_i, i)`` over the sorted ids ``c_1 < ... < c_K`` (``set`` mode); the
router's order travels as the Lehmer code of the permutation (``order`` mode); ``ids`` mode keeps
each id in ``ceil(log2 E)`` bits. The functions here are the slow, obviously-right reference that
the compiled kernels (:mod:`routecap.codec.kernels`) are tested against, and the fallback when
numba is not installed.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

FIELD_BITS = 57  # a field is read with one unaligned 8-byte load: bit offset (<= 7) + width <= 64
LUT_BITS = 12  # unranking tables of 4096 entries per step stay in L2
MODE_CODE = {"set": 0, "order": 1, "ids": 2}


# ---- combinatorics ----------------------------------------------------------------------------
def widths_of(mode: str, E: int, K: int) -> list[int]:
    if mode == "ids":
        return [max(1, (E - 1).bit_length())] * K
    w_set = max(1, (math.comb(E, K) - 1).bit_length())
    if mode == "set":
        return [w_set]
    return [w_set, max(1, (math.factorial(K) - 1).bit_length())]


def mode_fits(mode: str, E: int, K: int) -> bool:
    """Ranks (and every C(c, i) the decoder adds up) fit the field and 64-bit arithmetic."""
    if mode == "ids":
        return True
    if max(math.comb(E, i) for i in range(K + 1)).bit_length() > 63:
        return False
    return all(w <= FIELD_BITS for w in widths_of(mode, E, K))


@functools.lru_cache(maxsize=32)
def tables(E: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``comb[i, c] = C(c, i)`` (a sentinel past E), unranking look-up tables and their shifts.

    ``lut[i, x >> shifts[i]]`` is the largest c with ``C(c, i)`` at most the bucket's first
    value; the decoder then steps c up while ``C(c + 1, i) <= x`` (rarely more than once).
    """
    comb = np.zeros((K + 1, E + 2), np.uint64)
    for i in range(K + 1):
        for c in range(E + 1):
            comb[i, c] = math.comb(c, i)
        comb[i, E + 1] = np.uint64((1 << 64) - 1)  # larger than any rank: stops the step-up
    lut = np.zeros((K + 1, 1 << LUT_BITS), np.uint8 if E < 256 else np.uint16)
    shifts = np.zeros(K + 1, np.int64)
    for i in range(1, K + 1):
        s = max(0, math.comb(E, i).bit_length() - LUT_BITS)
        shifts[i] = s
        starts = np.arange(1 << LUT_BITS, dtype=np.uint64) << np.uint64(s)
        lut[i] = np.searchsorted(comb[i, :E + 1], starts, side="right") - 1
    return comb, lut, shifts


@functools.lru_cache(maxsize=16)
def perm_table(K: int) -> np.ndarray:
    """For K <= 8: Lehmer code -> the sorted index of each slot, 4 bits per slot; else empty."""
    if K > 8:
        return np.zeros(0, np.uint64)
    out = np.zeros(math.factorial(K), np.uint64)
    for perm in itertools.permutations(range(K)):
        code = sum(sum(1 for m in range(j + 1, K) if perm[m] < perm[j]) * math.factorial(K - 1 - j)
                   for j in range(K))
        out[code] = sum(p << (4 * j) for j, p in enumerate(perm))
    return out


def factorials(K: int) -> np.ndarray:
    """``i!`` for i <= K as uint64; past 20! (which no longer fits) zeros: only order mode uses
    them, and it never runs with K > 18 (the order code would not fit a field)."""
    return np.array([math.factorial(i) if i <= 20 else 0 for i in range(K + 1)], np.uint64)


def token_bytes(L: int, widths: list[int]) -> int:
    return -(-L * sum(widths) // 8)


# ---- numpy reference kernels --------------------------------------------------------------------
def rank_np(ids_NK: np.ndarray, comb: np.ndarray, order: bool) -> tuple[np.ndarray, np.ndarray]:
    N, K = ids_NK.shape
    srt = np.sort(ids_NK.astype(np.int64), axis=1)
    ranks = np.zeros(N, np.uint64)
    for i in range(K):
        ranks += comb[i + 1, srt[:, i]]
    perms = np.zeros(N, np.uint64)
    if order:  # Lehmer code: for each slot, how many later slots hold a smaller id
        for j in range(K):
            smaller = (ids_NK[:, j + 1:] < ids_NK[:, j:j + 1]).sum(axis=1)
            perms += smaller.astype(np.uint64) * np.uint64(math.factorial(K - 1 - j))
    return ranks, perms


def unrank_np(ranks: np.ndarray, perms: np.ndarray | None, comb: np.ndarray, K: int,
               E: int) -> np.ndarray:
    N = ranks.shape[0]
    out = np.zeros((N, K), np.int64)
    x = ranks.copy()
    for i in range(K, 0, -1):
        c = np.searchsorted(comb[i, :E + 1], x, side="right").astype(np.int64) - 1
        out[:, i - 1] = c
        x -= comb[i, c]
    if perms is not None:
        p = perms.astype(np.int64)
        used = np.zeros((N, K), bool)
        res = np.zeros((N, K), np.int64)
        for j in range(K):
            f = math.factorial(K - 1 - j)
            d, p = p // f, p % f
            free_rank = np.cumsum(~used, axis=1) - 1  # the d-th smallest index not used yet
            pick = np.argmax((free_rank == d[:, None]) & ~used, axis=1)
            res[:, j] = pick
            used[np.arange(N), pick] = True
        out = np.take_along_axis(out, res, axis=1)
    return out


def rows_ok_np(ids_NK: np.ndarray, E: int, sorted_rows: bool) -> np.ndarray:
    ok = (ids_NK < E).all(axis=1)
    srt = np.sort(ids_NK, axis=1)
    ok &= ~(srt[:, 1:] == srt[:, :-1]).any(axis=1)
    if sorted_rows:
        ok &= ~(np.diff(ids_NK.astype(np.int64), axis=1) < 0).any(axis=1)
    return ok


def pack_np(fields_NM: np.ndarray, widths: list[int], T: int, L: int) -> bytes:
    rb, tb = sum(widths), 8 * token_bytes(L, widths)
    starts = (np.arange(T, dtype=np.int64)[:, None] * tb
              + np.arange(L, dtype=np.int64)[None, :] * rb).ravel()
    bits = np.zeros(T * tb, np.uint8)
    off = 0
    for j, w in enumerate(widths):
        f = fields_NM[:, j]
        for b in range(w):
            bits[starts + off + b] = ((f >> np.uint64(b)) & np.uint64(1)).astype(np.uint8)
        off += w
    return np.packbits(bits, bitorder="little").tobytes()


def decode_block_np(buf: np.ndarray, mode: str, widths: list[int], T: int, L: int, E: int,
                     K: int, skip: np.ndarray, sorted_rows: bool, out: np.ndarray) -> int:
    N = T * L
    live = ~skip if skip.shape[0] else np.ones(N, bool)
    if mode == "raw":
        ids = buf.reshape(N, K) if not widths else buf
        ok = rows_ok_np(ids, E, sorted_rows) | ~live
        out[:] = np.where(live[:, None], ids, 0)
    else:
        rb, tb = sum(widths), 8 * token_bytes(L, widths)
        starts = (np.arange(T, dtype=np.int64)[:, None] * tb
                  + np.arange(L, dtype=np.int64)[None, :] * rb).ravel()
        bits = np.unpackbits(buf, bitorder="little")
        fields = np.zeros((N, len(widths)), np.uint64)
        off = 0
        for j, w in enumerate(widths):
            for b in range(w):
                fields[:, j] |= bits[starts + off + b].astype(np.uint64) << np.uint64(b)
            off += w
        if mode == "ids":
            ids = fields.astype(np.int64)
            ok = rows_ok_np(ids, E, sorted_rows) | ~live
        else:
            comb, _, _ = tables(E, K)
            ranks = fields[:, 0]
            perms = fields[:, 1] if mode == "order" else None
            ok = ranks < np.uint64(math.comb(E, K))
            if perms is not None:
                ok &= perms < np.uint64(math.factorial(K))
                if sorted_rows:  # a trace whose rows are sorted has only the identity order
                    ok &= perms == 0
            ok |= ~live
            good = ok & live
            ids = np.zeros((N, K), np.int64)
            if good.any():
                ids[good] = unrank_np(ranks[good], None if perms is None else perms[good], comb,
                                       K, E)
        out[:] = np.where(live[:, None], ids, 0)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else -1

