"""The codec's compiled kernels (numba) and the checked entry points that call them.

Shape legend: N rows, K top-k, E experts, M fields per row, T tokens, L MoE layers.

The kernels index their arrays with sizes and values they were handed, so each is reached only
through an entry point below that checks its contract first (array shapes against T, L, K, E,
buffer lengths against the packed layout, table shapes against (E, K)) and raises
:class:`KernelContractError` otherwise; those checks run under ``python -O`` too. Inside, every
value read from the data is compared with its bound before it indexes anything (a rank against
C(E, K), an order code against K!, an id against E). The test suite runs these kernels a second
time with ``NUMBA_BOUNDSCHECK=1`` so that an index past an array fails a test instead of reading
memory it does not own.

Without numba (or with ``USE_NUMBA = False``, which the tests use) the same entry points run the
numpy reference of :mod:`routecap.codec.ranking`, byte for byte the same results.
"""

from __future__ import annotations

import math

import numpy as np

from . import ranking

try:  # numba makes ranking, unranking and checking rows ~20x faster; numpy does the same work
    import numba as _nb

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised when numba is absent
    HAVE_NUMBA = False

#: Whether the entry points run the compiled kernels (tests switch it off to run the reference).
USE_NUMBA = HAVE_NUMBA


class KernelContractError(AssertionError):
    """A caller handed a kernel arrays that break its contract (a bug in routecap, not bad data)."""


def _require(ok: bool, what: str) -> None:
    # NOTE: not an `assert`: these guard memory safety of compiled code and must survive -O.
    if not ok:
        raise KernelContractError(f"codec kernel contract broken: {what}")


def _require_block(T: int, L: int, K: int, skip: np.ndarray, out: np.ndarray) -> None:
    _require(T >= 0 and L >= 1 and K >= 1, f"T={T} >= 0, L={L} >= 1, K={K} >= 1")
    _require(out.ndim == 2 and out.shape == (T * L, K), f"out of shape {(T * L, K)}, got {out.shape}")
    _require(skip.ndim == 1 and skip.shape[0] in (0, T * L) and skip.dtype == np.bool_,
             f"skip: bool of length 0 or {T * L}, got {skip.dtype} {skip.shape}")


# ---- entry points -------------------------------------------------------------------------------
def rank_rows(ids_NK: np.ndarray, E: int, order: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row's combinatorial rank and (``order``) Lehmer code, as uint64 ``[N]`` arrays."""
    N, K = ids_NK.shape
    _require(ranking.mode_fits("order" if order else "set", E, K), f"ranks of E={E}, K={K} fit")
    _require(N == 0 or int(ids_NK.max()) < E, f"ids below E={E}")  # they index comb's columns
    comb, _, _ = ranking.tables(E, K)
    if not USE_NUMBA:
        return ranking.rank_np(ids_NK, comb, order)
    ranks = np.empty(N, np.uint64)
    perms = np.zeros(N, np.uint64)
    _rank_nb(np.ascontiguousarray(ids_NK), comb, order, ranking.factorials(K), ranks, perms)
    return ranks, perms


def pack_rows(fields_NM: np.ndarray, widths: list[int], T: int, L: int) -> bytes:
    """``[N, M]`` fields packed ``widths`` bits each, token by token, each token on a byte."""
    _require(fields_NM.ndim == 2 and fields_NM.shape == (T * L, len(widths)),
             f"fields of shape {(T * L, len(widths))}, got {fields_NM.shape}")
    _require(all(1 <= w <= ranking.FIELD_BITS for w in widths), f"widths in [1, 57]: {widths}")
    if not USE_NUMBA:
        return ranking.pack_np(fields_NM, widths, T, L)
    tb = ranking.token_bytes(L, widths)
    out = np.zeros(T * tb + 8, np.uint8)  # 8 bytes of slack: a field is written 8 bytes at most
    _pack_nb(fields_NM.astype(np.uint64, copy=False), np.asarray(widths, np.int64), L, tb, out)
    return out[:-8].tobytes()


def decode_raw_block(src: np.ndarray, layer_major: bool, T: int, L: int, E: int,
                     sorted_rows: bool, skip: np.ndarray, out: np.ndarray) -> int:
    """Raw ids of one block (token- or layer-major) into ``out`` ``[T*L, K]``, every row checked.

    Missing rows (``skip``) become zeros. Returns the block's first invalid row, or -1.
    """
    K = out.shape[1] if out.ndim == 2 else 0
    _require_block(T, L, K, skip, out)
    _require(src.ndim == 1 and src.shape[0] == T * L * K, f"{T * L * K} raw ids, got {src.shape}")
    if not USE_NUMBA:
        arr = src.reshape(L, T, K).transpose(1, 0, 2) if layer_major else src
        return ranking.decode_block_np(np.ascontiguousarray(arr).reshape(T * L, K), "raw", [],
                                       T, L, E, K, skip, sorted_rows, out)
    return _raw_block_nb(src, layer_major, T, L, E, sorted_rows, skip, out)


def decode_packed_block(data: bytes | memoryview, mode: str, widths: list[int], T: int, L: int,
                        E: int, sorted_rows: bool, skip: np.ndarray, out: np.ndarray) -> int:
    """Packed rows of one block (``set``, ``order`` or ``ids``) into ``out`` ``[T*L, K]``.

    ``data`` holds exactly ``T`` tokens of ``token_bytes(L, widths)`` bytes. Every row is checked
    (rank below C(E, K), order code below K! and the identity for sorted traces, ids in range,
    distinct, sorted where the trace says so); missing rows (``skip``) become zeros. Returns the
    block's first invalid row, or -1.
    """
    K = out.shape[1] if out.ndim == 2 else 0
    _require_block(T, L, K, skip, out)
    _require(mode in ranking.MODE_CODE, f"a packed mode, got {mode!r}")
    _require(widths == ranking.widths_of(mode, E, K), f"widths of {mode} at E={E}, K={K}")
    _require(mode == "ids" or ranking.mode_fits(mode, E, K), f"{mode} fits E={E}, K={K}")
    tb = ranking.token_bytes(L, widths)
    size = T * tb
    _require(len(data) == size, f"{size} bytes for {T} tokens, got {len(data)}")
    # 8 bytes of zeros past the data: a field is read with one 8-byte load
    buf = np.zeros(size + 8, np.uint8)
    buf[:size] = np.frombuffer(data, np.uint8)
    if not USE_NUMBA:
        return ranking.decode_block_np(buf[:size], mode, widths, T, L, E, K, skip, sorted_rows,
                                       out)
    if mode == "ids":
        return _ids_block_nb(buf, widths[0], T, L, tb, E, sorted_rows, skip, out)
    comb, lut, shifts = ranking.tables(E, K)
    fact = ranking.factorials(K)
    ptab = ranking.perm_table(K) if mode == "order" else np.zeros(0, np.uint64)
    # the tables the kernel indexes: comb[i, c] for i <= K, c <= E + 1 (a sentinel past E);
    # lut[i, x >> shifts[i]] for x < C(E, i); ptab[p] for p < K! (K <= 8) or nothing
    _require(comb.shape == (K + 1, E + 2) and lut.shape == (K + 1, 1 << ranking.LUT_BITS)
             and shifts.shape == (K + 1,) and fact.shape == (K + 1,), "tables of (E, K)")
    _require(ptab.shape[0] == (math.factorial(K) if mode == "order" and K <= 8 else 0),
             f"a permutation table of {math.factorial(K)} entries for order mode, K <= 8")
    return _ranked_block_nb(buf, widths[0], widths[-1], T, L, tb, K, E, mode == "order", comb,
                            lut, shifts, fact, ptab, sorted_rows, skip, out)


# ---- numba kernels ------------------------------------------------------------------------------
if HAVE_NUMBA:

    @_nb.njit(cache=True, nogil=True)
    def _rank_nb(ids_NK, comb, order, fact, ranks, perms):  # pragma: no cover - compiled
        # contract: ids_NK < E, comb (K + 1, E + 2), fact (K + 1,), ranks and perms (N,)
        N, K = ids_NK.shape
        buf = np.empty(K, np.int64)
        for r in range(N):
            for j in range(K):
                buf[j] = ids_NK[r, j]
            for a in range(1, K):  # insertion sort of K small ints
                v = buf[a]
                b = a - 1
                while b >= 0 and buf[b] > v:
                    buf[b + 1] = buf[b]
                    b -= 1
                buf[b + 1] = v
            s = np.uint64(0)
            for i in range(K):
                s += comb[i + 1, buf[i]]
            ranks[r] = s
            if order:
                code = np.uint64(0)
                for j in range(K):
                    smaller = 0
                    for m in range(j + 1, K):
                        if ids_NK[r, m] < ids_NK[r, j]:
                            smaller += 1
                    code += np.uint64(smaller) * fact[K - 1 - j]
                perms[r] = code

    @_nb.njit(cache=True, nogil=True)
    def _pack_nb(fields_NM, widths, L, token_bytes, out):  # pragma: no cover - compiled
        # contract: fields_NM (T * L, M), widths (M,) in [1, 57], out T * token_bytes + 8 bytes
        N, M = fields_NM.shape
        row_bits = 0
        for w in widths:
            row_bits += w
        for r in range(N):
            bit = (r // L) * token_bytes * 8 + (r % L) * row_bits
            for j in range(M):
                w = widths[j]
                v = fields_NM[r, j] & ((np.uint64(1) << np.uint64(w)) - np.uint64(1))
                p = bit >> 3
                v = v << np.uint64(bit & 7)  # w + 7 <= 64 bits: at most 8 bytes from p
                k = 0
                while v != 0:
                    out[p + k] |= np.uint8(v & np.uint64(255))
                    v = v >> np.uint64(8)
                    k += 1
                bit += w

    @_nb.njit(cache=True, nogil=True, inline="always")
    def _read(buf, bit, w):  # pragma: no cover - compiled
        # w <= 57 bits at bit offset `bit`; buf has 8 bytes of padding past the data
        p = bit >> 3
        x = np.uint64(0)
        for b in range(8):
            x |= np.uint64(buf[p + b]) << np.uint64(8 * b)
        return (x >> np.uint64(bit & 7)) & ((np.uint64(1) << np.uint64(w)) - np.uint64(1))

    @_nb.njit(cache=True, nogil=True, inline="always")
    def _popcount(x):  # pragma: no cover - compiled
        x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
        x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2))
                                                    & np.uint64(0x3333333333333333))
        x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
        return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))

    @_nb.njit(cache=True, nogil=True, inline="always")
    def _row_ok(row, K, E, sorted_rows):  # pragma: no cover - compiled
        """In range, distinct and (sorted_rows) increasing; branch-free for E <= 256."""
        bad = False
        if sorted_rows:
            for a in range(K - 1):
                bad |= row[a] >= row[a + 1]
            return not (bad or row[K - 1] >= E)
        if E <= 256:  # the ids as bits of a 256-bit set: K distinct ids set K bits
            w0 = np.uint64(0)
            w1 = np.uint64(0)
            w2 = np.uint64(0)
            w3 = np.uint64(0)
            one = np.uint64(1)
            for a in range(K):
                v = np.uint64(row[a])
                bad |= v >= np.uint64(E)
                m = one << (v & np.uint64(63))
                q = v >> np.uint64(6)
                w0 |= m * np.uint64(q == 0)
                w1 |= m * np.uint64(q == 1)
                w2 |= m * np.uint64(q == 2)
                w3 |= m * np.uint64(q == 3)
            n = _popcount(w0) + _popcount(w1) + _popcount(w2) + _popcount(w3)
            return not (bad or n != K)
        for a in range(K):
            bad |= row[a] >= E
            for b in range(a + 1, K):
                bad |= row[a] == row[b]
        return not bad

    @_nb.njit(cache=True, nogil=True)
    def _raw_block_nb(src, layer_major, T, L, E, sorted_rows, skip, out):  # pragma: no cover
        # contract: src (T * L * K,), out (T * L, K), skip (0,) or (T * L,)
        K = out.shape[1]
        first_bad = -1
        has_skip = skip.shape[0] > 0
        tile = 64  # tokens per tile: the tile's rows of every layer stay in cache
        for t0 in range(0, T, tile):
            t1 = min(T, t0 + tile)
            for layer in range(L):
                for t in range(t0, t1):
                    r = t * L + layer
                    q = (layer * T + t) * K if layer_major else r * K
                    for a in range(K):
                        out[r, a] = src[q + a]
            for r in range(t0 * L, t1 * L):
                if has_skip and skip[r]:
                    for a in range(K):
                        out[r, a] = 0
                elif first_bad < 0 and not _row_ok(out[r], K, E, sorted_rows):
                    first_bad = r
        return first_bad

    @_nb.njit(cache=True, nogil=True)
    def _ids_block_nb(buf, w, T, L, token_bytes, E, sorted_rows, skip, out):  # pragma: no cover
        # contract: buf T * token_bytes + 8 bytes, token_bytes = ceil(L * K * w / 8),
        # out (T * L, K), skip (0,) or (T * L,)
        K = out.shape[1]
        has_skip = skip.shape[0] > 0
        first_bad = -1
        e = np.uint64(E)
        for t in range(T):
            for layer in range(L):
                r = t * L + layer
                if has_skip and skip[r]:
                    for j in range(K):
                        out[r, j] = 0
                    continue
                bit = t * token_bytes * 8 + layer * K * w
                ok = True
                for j in range(K):
                    v = _read(buf, bit + j * w, w)
                    ok &= v < e
                    out[r, j] = v if v < e else 0
                if not (ok and _row_ok(out[r], K, E, sorted_rows)):
                    for j in range(K):
                        out[r, j] = 0
                    if first_bad < 0:
                        first_bad = r
        return first_bad

    @_nb.njit(cache=True, nogil=True)
    def _ranked_block_nb(buf, w_set, w_perm, T, L, token_bytes, K, E, order, comb, lut, shifts,
                         fact, ptab, sorted_rows, skip, out):  # pragma: no cover - compiled
        """Set (rank) or order (rank, Lehmer code) rows; first invalid row or -1.

        contract: buf T * token_bytes + 8 bytes; comb (K + 1, E + 2) with a sentinel larger than
        any rank in column E + 1; lut (K + 1, 4096) with lut[i, b] <= E; shifts, fact (K + 1,);
        ptab (K!,) for K <= 8 in order mode (slot j of permutation p holds sorted index
        (ptab[p] >> 4j) & 15), else empty; out (T * L, K); skip (0,) or (T * L,).
        """
        row_bits = w_set + (w_perm if order else 0)
        full = comb[K, E]  # C(E, K): ranks are below it
        kfact = fact[K]
        has_skip = skip.shape[0] > 0
        first_bad = -1
        tmp = np.empty(K, np.int64)
        for t in range(T):
            for layer in range(L):
                r = t * L + layer
                if has_skip and skip[r]:
                    for j in range(K):
                        out[r, j] = 0
                    continue
                bit = t * token_bytes * 8 + layer * row_bits
                x = _read(buf, bit, w_set)
                perm = _read(buf, bit + w_set, w_perm) if order else np.uint64(0)
                # a trace whose rows are sorted has only the identity order (perm 0)
                if x >= full or (order and (perm >= kfact or (sorted_rows and perm != 0))):
                    for j in range(K):
                        out[r, j] = 0
                    if first_bad < 0:
                        first_bad = r
                    continue
                # x < C(E, K), so at step i the remainder is below C(E, i): the look-up index
                # x >> shifts[i] is below 4096 and c stays in [0, E - 1]
                for i in range(K, 0, -1):
                    c = np.int64(lut[i, x >> np.uint64(shifts[i])])
                    while comb[i, c + 1] <= x:
                        c += 1
                    out[r, i - 1] = c
                    x -= comb[i, c]
                if order:
                    for j in range(K):
                        tmp[j] = out[r, j]
                    if ptab.shape[0]:
                        code = ptab[perm]
                        for j in range(K):
                            out[r, j] = tmp[(code >> np.uint64(4 * j)) & np.uint64(15)]
                    else:  # K > 8: the factorial number system, digit by digit (perm < K!)
                        used = 0
                        for j in range(K):
                            f = fact[K - 1 - j]
                            d = np.int64(perm // f)
                            perm = perm % f
                            k = -1
                            for m in range(K):
                                if not (used >> m) & 1:
                                    k += 1
                                    if k == d:
                                        out[r, j] = tmp[m]
                                        used |= 1 << m
                                        break
        return first_bad
