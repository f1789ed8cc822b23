"""A compact, lossless, self-describing wire encoding for one routing trace.

Shape legend: T tokens, L MoE layers, K top-k, E experts, N = T * L rows (one row: the K ids one
layer chose for one token).

Each row is a set of K distinct ids out of E. Instead of K bytes it is written as integers:

* ``set`` mode (ids sorted within each row; the decoded trace says ``topk_order="sorted"``):
  the row's rank among the K-subsets of E in the combinatorial number system,
  ``sum_i C(c_i, i)`` over the sorted ids ``c_1 < ... < c_K``: ``ceil(log2 C(E, K))`` bits, within
  one bit of the information bound (0.64x raw uint8 at 128/8, 0.77x at 256/8);
* ``order`` mode (the router's order kept): that rank, then the Lehmer code of the order,
  ``ceil(log2 C(E, K)) + ceil(log2 K!)`` bits, within two bits of ``log2(C(E, K) * K!)``;
* ``ids`` mode (ranks would not fit 57 bits, e.g. E = 65536): each id in ``ceil(log2 E)`` bits.

Rows are packed token by token, a token's L rows one after the other, each token starting on a
byte. Tokens go in blocks (16384 by default) that are compressed (zstd) and decoded independently,
in parallel. Consecutive tokens are correlated, a layer's sets repeating across tokens far more
than a token's sets repeat across layers: zstd over the raw ids in layer-major order within a
block often beats the packed rows, and the encoder then stores that instead. It keeps the
smallest of: packed rows, raw ids layer-major, and raw ids token-major in one zstd frame (exactly
what ``zstd(raw ids)`` would be), so an encoding is never larger than raw ids + zstd, plus its
header. Missing cells are a bit mask (their rows hold zeros). Token ids, if any, travel too.

Layout (little-endian)::

    b"RCAP" | u8 version (1) | u8 0 | u32 header length H | H bytes of JSON header | sections

The JSON header carries the trace's metadata, how the routes are stored (mode, field widths,
layout, tokens per block, each block's stored size and codec) and the sections (name, byte
length, codec, CRC-32 of uncompressed sections; zstd frames carry their own checksum) that follow
it, in order. Decoding checks every length, checksum and field before it allocates or reads, lets
zstd write only the size the header promised, and checks every row (ranks in range; raw ids in
``[0, E)``, distinct, sorted where the trace says so), so hostile input gets a
:class:`CodecError`, never an out-of-bounds read, a crash or a hang.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard

from .trace import FORMAT_VERSION, RoutingTrace, TraceValidationError, id_dtype_for, validate_trace

__all__ = ["CodecError", "MODES", "decode", "encode", "inspect"]

MAGIC = b"RCAP"
WIRE_VERSION = 1
MODES = ("auto", "order", "set", "ids", "raw")
BLOCK_TOKENS = 16384
_MAX_HEADER = 1 << 24
_MAX_IDS = 1 << 31  # refuse to allocate more ids than this from a header
_FIELD_BITS = 57  # a field is read with one unaligned 8-byte load: bit offset (<= 7) + width <= 64
_LUT_BITS = 12  # unranking tables of 4096 entries per step stay in L2
_MODE_CODE = {"set": 0, "order": 1, "ids": 2}

try:  # numba makes ranking, unranking and checking rows ~20x faster; numpy does the same work
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised when numba is absent
    _HAVE_NUMBA = False


class CodecError(ValueError):
    """Data that is not a valid routecap wire encoding (the message says what is wrong)."""


def _fail(msg: str) -> CodecError:
    return CodecError(f"routecap wire decode: {msg}")


# ---- combinatorics ----------------------------------------------------------------------------
def _widths(mode: str, E: int, K: int) -> list[int]:
    if mode == "ids":
        return [max(1, (E - 1).bit_length())] * K
    w_set = max(1, (math.comb(E, K) - 1).bit_length())
    if mode == "set":
        return [w_set]
    return [w_set, max(1, (math.factorial(K) - 1).bit_length())]


def _mode_fits(mode: str, E: int, K: int) -> bool:
    """Ranks (and every C(c, i) the decoder adds up) fit the field and 64-bit arithmetic."""
    if mode == "ids":
        return True
    if max(math.comb(E, i) for i in range(K + 1)).bit_length() > 63:
        return False
    return all(w <= _FIELD_BITS for w in _widths(mode, E, K))


@functools.lru_cache(maxsize=32)
def _tables(E: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``comb[i, c] = C(c, i)`` (a sentinel past E), unranking look-up tables and their shifts.

    ``lut[i, x >> shifts[i]]`` is the largest c with ``C(c, i)`` at most the bucket's first
    value; the decoder then steps c up while ``C(c + 1, i) <= x`` (rarely more than once).
    """
    comb = np.zeros((K + 1, E + 2), np.uint64)
    for i in range(K + 1):
        for c in range(E + 1):
            comb[i, c] = math.comb(c, i)
        comb[i, E + 1] = np.uint64((1 << 64) - 1)  # larger than any rank: stops the step-up
    lut = np.zeros((K + 1, 1 << _LUT_BITS), np.uint8 if E < 256 else np.uint16)
    shifts = np.zeros(K + 1, np.int64)
    for i in range(1, K + 1):
        s = max(0, math.comb(E, i).bit_length() - _LUT_BITS)
        shifts[i] = s
        starts = np.arange(1 << _LUT_BITS, dtype=np.uint64) << np.uint64(s)
        lut[i] = np.searchsorted(comb[i, :E + 1], starts, side="right") - 1
    return comb, lut, shifts


@functools.lru_cache(maxsize=16)
def _perm_table(K: int) -> np.ndarray:
    """For K <= 8: Lehmer code -> the sorted index of each slot, 4 bits per slot; else empty."""
    if K > 8:
        return np.zeros(0, np.uint64)
    out = np.zeros(math.factorial(K), np.uint64)
    for perm in itertools.permutations(range(K)):
        code = sum(sum(1 for m in range(j + 1, K) if perm[m] < perm[j]) * math.factorial(K - 1 - j)
                   for j in range(K))
        out[code] = sum(p << (4 * j) for j, p in enumerate(perm))
    return out


def _factorials(K: int) -> np.ndarray:
    """``i!`` for i <= K as uint64; past 20! (which no longer fits) zeros: only order mode uses
    them, and it never runs with K > 18 (the order code would not fit a field)."""
    return np.array([math.factorial(i) if i <= 20 else 0 for i in range(K + 1)], np.uint64)


def _token_bytes(L: int, widths: list[int]) -> int:
    return -(-L * sum(widths) // 8)


# ---- numpy reference kernels --------------------------------------------------------------------
def _rank_np(ids_NK: np.ndarray, comb: np.ndarray, order: bool) -> tuple[np.ndarray, np.ndarray]:
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


def _unrank_np(ranks: np.ndarray, perms: np.ndarray | None, comb: np.ndarray, K: int,
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


def _rows_ok_np(ids_NK: np.ndarray, E: int, sorted_rows: bool) -> np.ndarray:
    ok = (ids_NK < E).all(axis=1)
    srt = np.sort(ids_NK, axis=1)
    ok &= ~(srt[:, 1:] == srt[:, :-1]).any(axis=1)
    if sorted_rows:
        ok &= ~(np.diff(ids_NK.astype(np.int64), axis=1) < 0).any(axis=1)
    return ok


def _pack_np(fields_NM: np.ndarray, widths: list[int], T: int, L: int) -> bytes:
    rb, tb = sum(widths), 8 * _token_bytes(L, widths)
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


def _decode_block_np(buf: np.ndarray, mode: str, widths: list[int], T: int, L: int, E: int,
                     K: int, skip: np.ndarray, sorted_rows: bool, out: np.ndarray) -> int:
    N = T * L
    live = ~skip if skip.shape[0] else np.ones(N, bool)
    if mode == "raw":
        ids = buf.reshape(N, K) if not widths else buf
        ok = _rows_ok_np(ids, E, sorted_rows) | ~live
        out[:] = np.where(live[:, None], ids, 0)
    else:
        rb, tb = sum(widths), 8 * _token_bytes(L, widths)
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
            ok = _rows_ok_np(ids, E, sorted_rows) | ~live
        else:
            comb, _, _ = _tables(E, K)
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
                ids[good] = _unrank_np(ranks[good], None if perms is None else perms[good], comb,
                                       K, E)
        out[:] = np.where(live[:, None], ids, 0)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else -1


# ---- numba kernels ------------------------------------------------------------------------------
if _HAVE_NUMBA:

    @_nb.njit(cache=True, nogil=True)
    def _rank_nb(ids_NK, comb, order, fact, ranks, perms):  # pragma: no cover - compiled
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
                v = v << np.uint64(bit & 7)
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
        """Raw rows of one block (token- or layer-major) into out [T*L, K], checked; bad/-1."""
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
    def _packed_block_nb(buf, widths, T, L, token_bytes, K, E, mode, comb, lut, shifts, fact,
                         ptab, sorted_rows, skip, out):  # pragma: no cover - compiled
        """Packed rows of one block into out [T*L, K], every row checked; first bad row or -1.

        mode 0 set, 1 order, 2 ids. ptab[p] (K <= 8): slot j of permutation p holds sorted
        index (ptab[p] >> 4j) & 15.
        """
        row_bits = 0
        for w in widths:
            row_bits += w
        full = comb[K, E]
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
                ok = True
                if mode == 2:  # ids: K fields of ceil(log2 E) bits
                    for j in range(K):
                        v = _read(buf, bit + j * widths[0], widths[0])
                        ok &= v < np.uint64(E)
                        out[r, j] = v if v < np.uint64(E) else 0
                    ok = ok and _row_ok(out[r], K, E, sorted_rows)
                else:
                    x = _read(buf, bit, widths[0])
                    perm = _read(buf, bit + widths[0], widths[1]) if mode == 1 else np.uint64(0)
                    # a trace whose rows are sorted has only the identity order (perm 0)
                    if x >= full or (mode == 1 and (perm >= kfact or (sorted_rows and perm != 0))):
                        ok = False
                    else:
                        for i in range(K, 0, -1):
                            c = np.int64(lut[i, x >> np.uint64(shifts[i])])
                            while comb[i, c + 1] <= x:
                                c += 1
                            out[r, i - 1] = c
                            x -= comb[i, c]
                        if mode == 1:
                            for j in range(K):
                                tmp[j] = out[r, j]
                            if ptab.shape[0]:
                                code = ptab[perm]
                                for j in range(K):
                                    out[r, j] = tmp[(code >> np.uint64(4 * j)) & np.uint64(15)]
                            else:  # K > 8: the factorial number system, digit by digit
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
                if not ok:
                    for j in range(K):
                        out[r, j] = 0
                    if first_bad < 0:
                        first_bad = r
        return first_bad


# ---- encoding -----------------------------------------------------------------------------------
def _fields(rows_NK: np.ndarray, mode: str, E: int, K: int) -> np.ndarray:
    """[N, M] fields of each row for ``mode``."""
    if mode == "ids":
        return rows_NK.astype(np.uint64)
    comb, _, _ = _tables(E, K)
    order = mode == "order"
    if _HAVE_NUMBA:
        N = rows_NK.shape[0]
        ranks = np.empty(N, np.uint64)
        perms = np.zeros(N, np.uint64)
        fact = _factorials(K)
        _rank_nb(np.ascontiguousarray(rows_NK), comb, order, fact, ranks, perms)
    else:
        ranks, perms = _rank_np(rows_NK, comb, order)
    return np.stack([ranks, perms], axis=1) if order else ranks[:, None]


def _block_payload(ids_TLK: np.ndarray, missing_TL: np.ndarray | None, mode: str, layout: str,
                   E: int) -> bytes:
    """One block's routes before zstd (missing cells hold zero rows or fields)."""
    T, L, K = ids_TLK.shape
    if mode == "raw":
        arr = ids_TLK.transpose(1, 0, 2) if layout == "layer" else ids_TLK
        return np.ascontiguousarray(arr).tobytes()
    widths = _widths(mode, E, K)
    fields = _fields(ids_TLK.reshape(-1, K), mode, E, K)
    if missing_TL is not None:
        fields[missing_TL.ravel()] = 0
    if not _HAVE_NUMBA:
        return _pack_np(fields, widths, T, L)
    tb = _token_bytes(L, widths)
    out = np.zeros(T * tb + 8, np.uint8)
    _pack_nb(fields, np.asarray(widths, np.int64), L, tb, out)
    return out[:-8].tobytes()


def _zstd(data: bytes, level: int, *, checksum: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=checksum,
                                    write_content_size=True).compress(data)


def _routes(trace: RoutingTrace, mode: str, layout: str, block: int, level: int,
            force_zstd: bool, checksum: bool = True) -> tuple[dict[str, Any], bytes]:
    """The routes section for one storage choice: (header fields, stored bytes).

    Each block is ``[stored bytes, codec]``, plus the CRC-32 of the stored bytes where zstd's
    own frame checksum is left out (the one-frame raw candidate, byte for byte ``zstd(raw)``)
    or the block is stored uncompressed.
    """
    ids, miss = trace.expert_ids, trace.missing
    blocks, stored = [], []
    for t0 in range(0, trace.num_tokens, block):
        raw = _block_payload(ids[t0:t0 + block], None if miss is None else miss[t0:t0 + block],
                             mode, layout, trace.num_experts)
        z = _zstd(raw, level, checksum=checksum)
        if force_zstd or len(z) < len(raw):
            blocks.append([len(z), "zstd"] if checksum else
                          [len(z), "zstd", zlib.crc32(z) & 0xFFFFFFFF])
            stored.append(z)
        else:
            blocks.append([len(raw), "none", zlib.crc32(raw) & 0xFFFFFFFF])
            stored.append(raw)
    widths = [] if mode == "raw" else _widths(mode, trace.num_experts, trace.top_k)
    return ({"mode": mode, "widths": widths, "layout": layout, "block_tokens": block,
             "blocks": blocks}, b"".join(stored))


def encode(trace: RoutingTrace, *, mode: str = "auto", level: int = 3, fallback: bool = True,
           block_tokens: int = BLOCK_TOKENS) -> bytes:
    """The wire encoding of one trace.

    ``mode``: ``order`` keeps the router's order (lossless for any trace); ``set`` stores each
    row as a set (the trace must be ``topk_order="sorted"``: call ``trace.with_sorted_topk()``
    when the order does not matter, as in replay); ``auto`` picks ``set`` for sorted traces and
    ``order`` otherwise; ``ids`` and ``raw`` are the fallbacks for very large E. With
    ``fallback`` (the default) the routes are stored as zstd over the raw ids whenever that is
    smaller (layer-major, or token-major in one frame: exactly ``zstd(raw ids)``).

    Example:
        >>> import numpy as np
        >>> t = RoutingTrace.from_ids(np.array([[[5, 1]], [[2, 7]]]), num_experts=8,
        ...                           moe_layers=[0], request_id="r", prompt_len=1)
        >>> decode(encode(t)).equals(t)
        True
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"encode: expected a RoutingTrace, got {type(trace).__name__}")
    if mode not in MODES:
        raise ValueError(f"encode: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"encode: block_tokens must be a positive int, got {block_tokens!r}")
    E, K, T = trace.num_experts, trace.top_k, trace.num_tokens
    if mode == "auto":
        mode = "set" if trace.topk_order == "sorted" else "order"
    if mode == "set" and trace.topk_order != "sorted":
        raise ValueError("encode: mode='set' drops the order within each row; pass "
                         "trace.with_sorted_topk() to say so, or use mode='order'")
    if mode in ("set", "order") and not _mode_fits(mode, E, K):
        mode = "ids"
    best = _routes(trace, mode, "token", block_tokens, level, force_zstd=mode == "raw")
    if fallback and mode != "raw" and T:
        for cand in (("raw", "layer", block_tokens, True), ("raw", "token", T, False)):
            got = _routes(trace, *cand[:3], level, force_zstd=True, checksum=cand[3])
            if len(got[1]) < len(best[1]):
                best = got
    route_meta, route_bytes = best
    sections: list[tuple[dict[str, Any], bytes]] = [(
        {"name": "routes", "bytes": len(route_bytes), "codec": "blocks"}, route_bytes)]
    for name, raw in (("missing", None if trace.missing is None else
                       np.packbits(trace.missing, bitorder="little").tobytes()),
                      ("tokens", None if trace.token_ids is None else
                       trace.token_ids.astype("<i4").tobytes())):
        if raw is None:
            continue
        z = _zstd(raw, level)
        if len(z) < len(raw):
            sections.append(({"name": name, "bytes": len(z), "codec": "zstd",
                              "raw_bytes": len(raw)}, z))
        else:
            sections.append(({"name": name, "bytes": len(raw), "codec": "none",
                              "crc32": zlib.crc32(raw) & 0xFFFFFFFF}, raw))
    header = {
        "format": "routecap.wire", "version": WIRE_VERSION, "trace_format": FORMAT_VERSION,
        "request_id": trace.request_id, "model": trace.model, "num_experts": E, "top_k": K,
        "moe_layers": list(trace.moe_layers), "num_tokens": T, "start": trace.start,
        "prompt_len": trace.prompt_len, "topk_order": trace.topk_order, "extra": trace.extra,
        "routes": route_meta, "sections": [m for m, _ in sections],
    }
    raw_header = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<BBI", WIRE_VERSION, 0, len(raw_header)), raw_header,
                     *(s for _, s in sections)])


# ---- decoding -----------------------------------------------------------------------------------
def _int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"header field {key!r} should be an int in [{lo}, {hi}], got {str(v)[:40]}")
    return v


def _unzstd(what: str, frame: bytes, size: int) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise _fail(f"corrupt zstd frame in {what}") from None
    if declared != size:
        raise _fail(f"corrupt {what}: its zstd frame holds {declared} bytes, expected {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(size, 1))
    except zstandard.ZstdError as e:
        raise _fail(f"corrupt zstd data in {what} ({e})") from None
    if len(out) != size:
        raise _fail(f"corrupt {what}: {len(out)} bytes after zstd, expected {size}")
    return out


def _parse(data: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The header and the sections' stored bytes, every size and checksum checked."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 10 or data[:4] != MAGIC:
        raise _fail("not a routecap wire encoding (bad magic)" if len(data) >= 4
                    else f"truncated: {len(data)} bytes")
    version, _, H = struct.unpack_from("<BBI", data, 4)
    if version != WIRE_VERSION:
        raise _fail(f"wire version {version} is not the version this routecap reads "
                    f"({WIRE_VERSION})" + ("; upgrade routecap" if version > WIRE_VERSION else ""))
    if H > _MAX_HEADER or 10 + H > len(data):
        raise _fail(f"truncated or corrupt: a header of {H} bytes in {len(data)} bytes")
    try:
        h = json.loads(data[10:10 + H])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(f"corrupt header ({type(e).__name__})") from None
    if not isinstance(h, dict) or h.get("format") != "routecap.wire":
        raise _fail("corrupt header (not a routecap.wire header)")
    secs = h.get("sections")
    if not isinstance(secs, list) or not 1 <= len(secs) <= 3:
        raise _fail("corrupt header: 'sections' should be a list of 1 to 3")
    pos = 10 + H
    out: dict[str, Any] = {}
    meta: dict[str, dict[str, Any]] = {}
    for s in secs:
        if not isinstance(s, dict) or s.get("name") not in ("routes", "missing", "tokens") \
                or s.get("name") in out:
            raise _fail(f"corrupt header: bad section {str(s)[:80]}")
        n = _int(s, "bytes", 0, len(data))
        if pos + n > len(data):
            raise _fail(f"truncated: section {s['name']!r} needs {n} bytes at {pos}, the data "
                        f"has {len(data)}")
        stored = memoryview(data)[pos:pos + n]  # no copy of the (large) routes section
        pos += n
        codec = s.get("codec")
        if s["name"] == "routes":
            if codec != "blocks":
                raise _fail(f"corrupt header: routes codec {codec!r}")
        elif codec == "none":
            if zlib.crc32(stored) & 0xFFFFFFFF != s.get("crc32"):
                raise _fail(f"corrupt data: checksum mismatch in section {s['name']!r}")
        elif codec == "zstd":
            # decompressed later, by decode(), to the size the trace's shape dictates
            _int(s, "raw_bytes", 0, 4 * _MAX_IDS)
            meta[s["name"]] = s
        else:
            raise _fail(f"corrupt header: section codec {codec!r}")
        out[s["name"]] = stored
    if pos != len(data):
        raise _fail(f"{len(data) - pos} unexpected bytes after the last section")
    if "routes" not in out:
        raise _fail("no 'routes' section")
    h["_zstd_sections"] = meta
    return h, out


def _section(h: dict[str, Any], secs: dict[str, Any], name: str, size: int) -> bytes | None:
    """A small section's bytes, which must be exactly ``size`` long (zstd: declared so first)."""
    if name not in secs:
        return None
    z = h["_zstd_sections"].get(name)
    if z is not None:
        if z["raw_bytes"] != size:
            raise _fail(f"corrupt section {name!r}: it declares {z['raw_bytes']} bytes, the "
                        f"trace's shape needs {size}")
        return _unzstd(f"section {name!r}", secs[name], size)
    if len(secs[name]) != size:
        raise _fail(f"corrupt section {name!r}: {len(secs[name])} bytes, expected {size}")
    return secs[name]


def inspect(data: bytes) -> dict[str, Any]:
    """The header of an encoding (mode, sizes, metadata), after checking its structure."""
    h, _ = _parse(data)
    h.pop("_zstd_sections", None)
    return h


def decode(data: bytes) -> RoutingTrace:
    """The trace an :func:`encode` produced; :class:`CodecError` for anything else."""
    h, secs = _parse(data)
    E = _int(h, "num_experts", 1, 1 << 16)
    K = _int(h, "top_k", 1, E)
    T = _int(h, "num_tokens", 0, _MAX_IDS)
    layers = h.get("moe_layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= 4096:
        raise _fail(f"header field 'moe_layers' should be a list of 1 to 4096 ints, got "
                    f"{str(layers)[:80]}")
    L = len(layers)
    if T * L * K > _MAX_IDS:
        raise _fail(f"refusing {T} x {L} x {K} ids (more than {_MAX_IDS})")
    missing = None
    raw = _section(h, secs, "missing", (T * L + 7) // 8)
    if raw is not None:
        missing = np.unpackbits(np.frombuffer(raw, np.uint8),
                                bitorder="little")[:T * L].astype(bool).reshape(T, L)
    tokens = None
    raw = _section(h, secs, "tokens", 4 * T)
    if raw is not None:
        tokens = np.frombuffer(raw, "<i4").astype(np.int32)
    order = h.get("topk_order")
    r = h.get("routes")
    if not isinstance(r, dict):
        raise _fail("corrupt header: no 'routes' description")
    ids = _decode_routes(secs["routes"], r, T, L, E, K, missing, sorted_rows=order == "sorted")
    fields = dict(expert_ids=ids, missing=missing, token_ids=tokens, num_experts=E,
                  moe_layers=tuple(layers), request_id=h.get("request_id"),
                  prompt_len=h.get("prompt_len"), start=h.get("start"), model=h.get("model"),
                  topk_order=order, extra=h.get("extra"))
    try:
        # every row was checked while decoding (in range, distinct, sorted where the trace says
        # so); the rest of the contract is checked here without rescanning the ids
        return _checked_metadata(fields)
    except TraceValidationError as e:
        raise _fail(f"the decoded trace breaks the contract: {e}") from None


def _checked_metadata(fields: dict[str, Any]) -> RoutingTrace:
    probe = dict(fields, expert_ids=fields["expert_ids"][:0], missing=None,
                 token_ids=None if fields["token_ids"] is None else fields["token_ids"][:0])
    validate_trace(_unvalidated(probe))  # metadata only (T = 0 for the arrays)
    return _unvalidated(fields)


def _unvalidated(fields: dict[str, Any]) -> RoutingTrace:
    t = object.__new__(RoutingTrace)
    for k, v in fields.items():
        object.__setattr__(t, k, v)
    object.__setattr__(t, "format_version", FORMAT_VERSION)
    if isinstance(t.moe_layers, list):
        object.__setattr__(t, "moe_layers", tuple(t.moe_layers))
    if t.missing is not None and not t.missing.any():
        object.__setattr__(t, "missing", None)
    return t


def _decode_routes(buf: bytes, r: dict[str, Any], T: int, L: int, E: int, K: int,
                   missing: np.ndarray | None, *, sorted_rows: bool) -> np.ndarray:
    """``[T, L, K]`` ids from the routes section; blocks decode in parallel, every row checked."""
    mode = r.get("mode")
    layout = r.get("layout")
    if mode not in ("order", "set", "ids", "raw") or layout not in ("token", "layer") or \
            (layout == "layer" and mode != "raw"):
        raise _fail(f"corrupt header: routes stored as mode {mode!r}, layout {layout!r}")
    if mode == "set" and not sorted_rows:
        raise _fail("corrupt header: set mode for a trace whose rows are not sorted")
    widths = r.get("widths")
    if mode == "raw":
        if widths != []:
            raise _fail("corrupt header: raw routes have no field widths")
    else:
        if mode != "ids" and not _mode_fits(mode, E, K):
            raise _fail(f"mode {mode!r} cannot encode E={E}, K={K}")
        if not (isinstance(widths, list) and all(type(w) is int for w in widths)) or \
                widths != _widths(mode, E, K):
            raise _fail(f"field widths {str(widths)[:80]} are not those of mode {mode!r} at "
                        f"E={E}, K={K}")
    bt = _int(r, "block_tokens", 1, _MAX_IDS)
    blocks = r.get("blocks")
    n_blocks = -(-T // bt)
    if not isinstance(blocks, list) or len(blocks) != n_blocks:
        raise _fail(f"corrupt header: {T} tokens in blocks of {bt} need {n_blocks} blocks")
    dtype = id_dtype_for(E)
    per_token = L * K * dtype.itemsize if mode == "raw" else _token_bytes(L, widths)
    spans = []
    pos = 0
    for i, b in enumerate(blocks):
        if not (isinstance(b, list) and len(b) in (2, 3) and isinstance(b[0], int)
                and not isinstance(b[0], bool) and b[0] >= 0 and b[1] in ("zstd", "none")
                and (len(b) == 3 or b[1] == "zstd")):
            raise _fail(f"corrupt header: block {i} is {str(b)[:40]}")
        if len(b) == 3 and zlib.crc32(buf[pos:pos + b[0]]) & 0xFFFFFFFF != b[2]:
            raise _fail(f"corrupt data: checksum mismatch in routes block {i}")
        t0 = i * bt
        t1 = min(T, t0 + bt)
        size = (t1 - t0) * per_token
        if b[1] == "none" and b[0] != size:
            raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): {b[0]} bytes, expected "
                        f"{size}")
        if b[1] == "zstd":
            try:
                declared = zstandard.frame_content_size(buf[pos:pos + b[0]])
            except zstandard.ZstdError:
                raise _fail(f"corrupt zstd frame in routes block of tokens [{t0}, {t1})") from None
            if declared != size:
                raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): its zstd frame holds "
                            f"{declared} bytes, expected {size}")
        spans.append((t0, t1, pos, b[0], b[1]))
        pos += b[0]
    if pos != len(buf):
        raise _fail(f"corrupt routes: blocks hold {pos} bytes, the section {len(buf)}")
    # every size is known to agree: only now allocate
    out = np.empty((T * L, K), dtype)
    skip = np.zeros(0, bool) if missing is None else missing.ravel()
    if mode != "raw" and mode != "ids":
        comb, lut, shifts = _tables(E, K)
    else:  # no ranks: the combinatorial tables are neither needed nor always representable
        comb = np.zeros((K + 1, 2), np.uint64)
        lut, shifts = np.zeros((K + 1, 1), np.uint8), np.zeros(K + 1, np.int64)
    fact = _factorials(K)
    ptab = _perm_table(K) if mode == "order" else np.zeros(0, np.uint64)
    w_arr = np.asarray(widths, np.int64)

    def block(span: tuple[int, int, int, int, str]) -> int:
        t0, t1, off, n, codec = span
        Tb = t1 - t0
        size = Tb * per_token
        raw = buf[off:off + n]
        if codec == "zstd":
            raw = _unzstd(f"routes block of tokens [{t0}, {t1})", raw, size)
        elif n != size:
            raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): {n} bytes, expected "
                        f"{size}")
        sk = skip[t0 * L:t1 * L] if skip.shape[0] else skip
        dst = out[t0 * L:t1 * L]
        if mode == "raw":
            src = np.frombuffer(raw, dtype)
            if _HAVE_NUMBA:
                bad = _raw_block_nb(src, layout == "layer", Tb, L, E, sorted_rows, sk, dst)
            else:
                arr = src.reshape(L, Tb, K).transpose(1, 0, 2) if layout == "layer" else src
                bad = _decode_block_np(np.ascontiguousarray(arr).reshape(Tb * L, K), "raw", [],
                                       Tb, L, E, K, sk, sorted_rows, dst)
        else:
            padded = np.zeros(size + 8, np.uint8)
            padded[:size] = np.frombuffer(raw, np.uint8)
            if _HAVE_NUMBA:
                bad = _packed_block_nb(padded, w_arr, Tb, L, per_token, K, E, _MODE_CODE[mode],
                                       comb, lut, shifts, fact, ptab, sorted_rows, sk, dst)
            else:
                bad = _decode_block_np(padded[:size], mode, widths, Tb, L, E, K, sk,
                                       sorted_rows, dst)
        return -1 if bad < 0 else t0 * L + int(bad)

    results = _map(block, spans)
    bad = [b for b in results if b >= 0]
    if bad:
        row = min(bad)
        raise _fail(f"corrupt routes: row {row} (token {row // L}, layer {row % L}) is not a "
                    f"valid route (out of range, repeated or unsorted ids)")
    return out.reshape(T, L, K)


def _map(fn: Callable[[Any], int], items: list[Any]) -> list[int]:
    """``fn`` over items, on several threads when there are several (zstd and the numba kernels
    release the GIL, so blocks decode side by side)."""
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
