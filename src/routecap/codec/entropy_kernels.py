"""The ``entropy`` mode's compiled rANS kernels (numba) and the checked entry points that call them.

Shape legend: T tokens, L MoE layers, K top-k, E experts, S = E - K + 1 gap values, M = L * K
frequency tables, N coded symbols.

As in :mod:`routecap.codec.kernels`: each kernel is reached only through an entry point that checks
its contract (shapes against T, L, K, E, table shapes, buffer sizes) and raises
:class:`~routecap.codec.kernels.KernelContractError` otherwise, even under ``python -O``. Inside,
every value read from the data is checked before it indexes anything: an order must be a
permutation of E, a table at most S values long with frequencies summing to 2048 (checked while
they are added, before the slot table is filled), states in [2**16, 2**32), each word read only
while words are left, each rank below E. The loops are bounded by T * L * K symbols: hostile bytes
end in an error code, never a hang. Without numba (or with ``kernels.USE_NUMBA = False``) the
entry points run the reference of :mod:`routecap.codec.entropy`, byte for byte the same.
"""

from __future__ import annotations

import numpy as np

from . import entropy, kernels
from .kernels import _require, _require_block

if kernels.HAVE_NUMBA:
    import numba as _nb
    from numba.cpython.unsafe.numbers import trailing_zeros

_NS = entropy.STATES


def encode_block(ids_TLK: np.ndarray, missing_TL: np.ndarray | None, E: int) -> bytes | None:
    """One block's payload (orders, tables, states, words; see :mod:`routecap.codec.entropy`),
    or None when a table cannot be quantised (the encoder then uses another mode)."""
    T, L, K = ids_TLK.shape
    _require(entropy.fits(E, K), f"entropy mode fits E={E}, K={K}")
    _require(T * L == 0 or int(ids_TLK.max()) < E, f"ids below E={E}")
    live = np.ones((T, L), bool) if missing_TL is None else ~missing_TL
    _require(live.shape == (T, L), f"missing of shape {(T, L)}, got {live.shape}")
    if kernels.USE_NUMBA:
        ids = np.ascontiguousarray(ids_TLK)
        live = np.ascontiguousarray(live)
        counts_LE = np.zeros((L, E), np.int64)
        _count_nb(ids, live, counts_LE)
        perm, rank = entropy.popularity(counts_LE)
        # the stream holds each layer's live rows in turn: layer l's symbols start at starts[l]
        starts = np.zeros(L + 1, np.int64)
        np.cumsum(live.sum(axis=0) * K, out=starts[1:])
        sym = np.empty(int(starts[-1]), np.int16)  # gaps are below E - K + 1 <= 1024
        counts = np.zeros((L * K, E - K + 1), np.int64)
        _gaps_nb(ids, live, rank, starts, sym, counts)
    else:
        perm, counts, tab, sym = entropy.model(ids_TLK, live, E)
        counts = counts.reshape(L * K, -1)
    freq = entropy.quantise(counts)
    if freq is None:
        return None
    cum = entropy.cumulative(freq)
    if kernels.USE_NUMBA:
        # contract: symbol j of layer l's part is gap j % K of a row, below E - K + 1, with a
        # frequency >= 1 in table l * K + j % K (the counts that made freq counted it)
        _require(freq.shape == (L * K, E - K + 1) and starts.shape == (L + 1,)
                 and starts[-1] == sym.shape[0] and (starts % K == 0).all(), "stream layout")
        words = np.empty(sym.shape[0] + 1, np.uint16)
        x = np.full(_NS, entropy.RANS_L, np.int64)
        n = _encode_nb(sym, starts, K, freq, cum, words, x)
        words = words[:n][::-1]
    else:
        x, words = entropy.rans_encode_py(tab, sym, freq, cum)
    return b"".join([entropy.tables_bytes(perm, freq, E), np.array(x, "<u4").tobytes(),
                     words.astype("<u2").tobytes()])


def decode_block(data: bytes | memoryview, T: int, L: int, E: int, skip: np.ndarray,
                 out: np.ndarray) -> int:
    """One block's rows into ``out`` ``[T*L, K]`` (ids ascending, missing rows zero).

    Returns -1, the first invalid row found, ``entropy.BAD_TABLES`` or ``entropy.BAD_STREAM``.
    """
    K = out.shape[1] if out.ndim == 2 else 0
    _require_block(T, L, K, skip, out)
    _require(entropy.fits(E, K), f"entropy mode fits E={E}, K={K}")
    _require(out.dtype == (np.uint8 if E <= 256 else np.uint16), f"out of the ids' dtype at E={E}")
    if not kernels.USE_NUMBA:
        return entropy.decode_block_py(bytes(data), T, L, E, skip, out)
    buf = np.frombuffer(data, np.uint8)
    perm = np.empty((L, E), np.int64)
    slots = np.empty((L * K, entropy.PROB_SCALE), np.uint32)
    empty = np.zeros(L * K, np.bool_)
    pos = _tables_nb(buf, L, K, E, perm, slots, empty)
    if pos < 0:
        return pos
    if pos + 4 * _NS > len(buf) or (len(buf) - pos) % 2:
        return entropy.BAD_STREAM
    x = buf[pos:pos + 4 * _NS].view("<u4").astype(np.int64)
    if x.min() < entropy.RANS_L:
        return entropy.BAD_STREAM
    nw = (len(buf) - pos - 4 * _NS) // 2
    words = np.zeros(nw + 1, np.uint16)  # one word of padding (see _stream_nb)
    words[:nw] = buf[pos + 4 * _NS:].view("<u2")
    return _stream_nb(x, words, nw, perm, slots, empty, T, L, E, skip, out)


if kernels.HAVE_NUMBA:

    @_nb.njit(cache=True, nogil=True)
    def _count_nb(ids, live, counts):  # pragma: no cover - compiled
        # contract: ids (T, L, K) < E, live (T, L), counts (L, E)
        T, L, K = ids.shape
        for t in range(T):
            for layer in range(L):
                if live[t, layer]:
                    for i in range(K):
                        counts[layer, ids[t, layer, i]] += 1

    @_nb.njit(cache=True, nogil=True)
    def _gaps_nb(ids, live, rank, starts, sym, counts):  # pragma: no cover - compiled
        """The gaps of the live rows in stream order (layer-major) and their counts per
        (layer, i); the rows are read token by token, in memory order.

        contract: ids (T, L, K) < E with distinct ids per row, live (T, L), rank (L, E)
        permutations, starts (L + 1,) the offsets of each layer's live rows * K, sym
        (starts[L],), counts (L * K, E - K + 1)."""
        T, L, K = ids.shape
        cursor = starts[:L].copy()  # where each layer's next symbol goes
        E = rank.shape[1]
        row = np.empty(K, np.int64)
        one = np.uint64(1)
        for t in range(T):
            for layer in range(L):
                if not live[t, layer]:
                    continue
                if E <= 256:  # the K ranks as bits of a 256-bit set, read back ascending
                    b0 = np.uint64(0)
                    b1 = np.uint64(0)
                    b2 = np.uint64(0)
                    b3 = np.uint64(0)
                    for i in range(K):
                        v = rank[layer, ids[t, layer, i]]
                        m = one << np.uint64(v & 63)
                        q = v >> 6
                        b0 |= m * np.uint64(q == 0)
                        b1 |= m * np.uint64(q == 1)
                        b2 |= m * np.uint64(q == 2)
                        b3 |= m * np.uint64(q == 3)
                    k = 0
                    while b0:
                        row[k] = trailing_zeros(b0)
                        k += 1
                        b0 &= b0 - one
                    while b1:
                        row[k] = 64 + trailing_zeros(b1)
                        k += 1
                        b1 &= b1 - one
                    while b2:
                        row[k] = 128 + trailing_zeros(b2)
                        k += 1
                        b2 &= b2 - one
                    while b3:
                        row[k] = 192 + trailing_zeros(b3)
                        k += 1
                        b3 &= b3 - one
                else:
                    for i in range(K):  # insertion sort of the K ranks
                        v = rank[layer, ids[t, layer, i]]
                        a = i - 1
                        while a >= 0 and row[a] > v:
                            row[a + 1] = row[a]
                            a -= 1
                        row[a + 1] = v
                prev = -1
                c = cursor[layer]
                for i in range(K):
                    g = row[i] - prev - 1  # distinct ranks: 0 <= g <= E - K
                    prev = row[i]
                    sym[c + i] = g
                    counts[layer * K + i, g] += 1
                cursor[layer] = c + K

    @_nb.njit(cache=True, nogil=True)
    def _encode_nb(sym, starts, K, freq, cum, words, x):  # pragma: no cover - compiled
        """Code the symbols last to first (symbol j by state j % 4); the words in the order they
        were written (the decoder reads them backwards) and the final states in x.

        contract: symbol j in [starts[l], starts[l + 1]) is coded with table m = l * K + j % K
        (starts are multiples of K), sym < S, freq[m, sym] >= 1; words (N + 1,): a symbol writes
        at most one word (a state below 2**32 is below 2**21 * f after one 16-bit shift); x (4,).
        """
        n = 0
        bound = np.int64((entropy.RANS_L >> entropy.PROB_BITS) << 16)
        # a = the state of symbol j, b, c, d those of j - 1, j - 2, j - 3
        a, b, c, d = x[0], x[0], x[0], x[0]
        layer = starts.shape[0] - 2
        i = K  # j % K, counted down (no division per symbol)
        for j in range(sym.shape[0] - 1, -1, -1):
            while j < starts[layer]:
                layer -= 1
            i = K - 1 if i == 0 else i - 1
            m = layer * K + i
            g = np.int64(sym[j])
            f = np.int64(freq[m, g])
            s = a
            # branch-free: at most one word per symbol (see the contract); written, then kept
            # only when the state must shrink
            emit = s >= bound * f
            words[n] = s & 0xFFFF
            n += np.int64(emit)
            s = (s >> 16) if emit else s
            # s // f through a double reciprocal (s < 2**32: off by at most one, corrected)
            q = np.int64(s * (1.0 / f))
            rem = s - q * f
            if rem < 0:
                q -= 1
                rem += f
            elif rem >= f:
                q += 1
                rem -= f
            a, b, c, d = b, c, d, (q << entropy.PROB_BITS) + rem + np.int64(cum[m, g])
        # after symbol 0: d is state 0, c state 1 (of symbol -1 = 3 mod 4), b state 2, a state 3
        x[0], x[1], x[2], x[3] = d, c, b, a
        return n

    @_nb.njit(cache=True, nogil=True, inline="always")
    def _u16(buf, p):  # pragma: no cover - compiled
        return np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8)

    @_nb.njit(cache=True, nogil=True)
    def _tables_nb(buf, L, K, E, perm, slots, empty):  # pragma: no cover - compiled
        """Parse the orders into perm (L, E) and the tables into slots (M, 2048): slot q of a table
        holds value | (f - 1) << 10 | (q - cum) << 21 (10 + 11 + 11 bits); empty[m] marks a table
        without values. Returns where the states start, or BAD_TABLES.

        contract: fits(E, K), perm (L, E), slots (L * K, 2048), empty (L * K,)."""
        n = buf.shape[0]
        w = 1 if E <= 256 else 2
        if n < L * E * w:
            return entropy.BAD_TABLES
        stamp = np.zeros(E, np.int64)
        pos = 0
        for layer in range(L):  # each order a permutation of E
            for r in range(E):
                v = np.int64(buf[pos]) if w == 1 else _u16(buf, pos)
                pos += w
                if v >= E or stamp[v] == layer + 1:
                    return entropy.BAD_TABLES
                stamp[v] = layer + 1
                perm[layer, r] = v
        for m in range(L * K):
            if pos + 2 > n:
                return entropy.BAD_TABLES
            cnt = _u16(buf, pos)
            pos += 2
            if cnt > E - K + 1 or pos + 2 * cnt > n:
                return entropy.BAD_TABLES
            total = np.int64(0)
            for s in range(cnt):
                f = _u16(buf, pos)
                pos += 2
                if total + f > entropy.PROB_SCALE:  # checked before it fills any slot
                    return entropy.BAD_TABLES
                for q in range(f):
                    slots[m, total + q] = np.uint32(s | ((f - 1) << 10) | (q << 21))
                total += f
            if cnt > 0 and total != entropy.PROB_SCALE:
                return entropy.BAD_TABLES
            empty[m] = cnt == 0
        return pos

    @_nb.njit(cache=True, nogil=True)
    def _stream_nb(x, words, nw, perm, slots, empty, T, L, E, skip, out):  # pragma: no cover
        """The rows from the stream; -1, the first invalid row, or BAD_STREAM.

        contract: x (4,) states in [RANS_L, 2**32); words (nw + 1,) (one word of padding: the
        renormalisation reads a word before it knows whether it keeps it); perm (L, E)
        permutations; slots and empty as _tables_nb fills them (every slot of a non-empty
        table filled); out (T * L, K); skip (0,) or (T * L,)."""
        K = out.shape[1]
        has_skip = skip.shape[0] > 0
        mask = np.int64(entropy.PROB_SCALE - 1)
        x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
        wp = np.int64(0)
        row = np.empty(K, np.int64)
        one = np.uint64(1)
        for layer in range(L):
            base = layer * K
            for i in range(K):  # a table without values: its layer has no live row
                if empty[base + i]:
                    for t in range(T):
                        if not (has_skip and skip[t * L + layer]):
                            return t * L + layer
            for t in range(T):
                r = t * L + layer
                if has_skip and skip[r]:
                    for i in range(K):
                        out[r, i] = 0
                    continue
                prev = np.int64(-1)
                bad = False
                b0 = np.uint64(0)
                b1 = np.uint64(0)
                b2 = np.uint64(0)
                b3 = np.uint64(0)
                for i in range(K):
                    # x0 codes this symbol; the states then rotate (symbol j uses state j % 4)
                    e = np.int64(slots[base + i, x0 & mask])
                    s = x0 >> entropy.PROB_BITS
                    x0 = x1
                    x1 = x2
                    x2 = x3
                    x3 = (((e >> 10) & 0x7FF) + 1) * s + (e >> 21)
                    # branch-free renormalisation: a word is read, and kept when needed
                    need = x3 < entropy.RANS_L
                    word = np.int64(words[min(wp, nw)])
                    x3 = ((x3 << 16) | word) if need else x3
                    wp += np.int64(need)
                    prev += 1 + (e & 0x3FF)
                    bad |= prev >= E
                    v = perm[layer, min(prev, E - 1)]
                    if E <= 256:  # the row as a 256-bit set, read back in ascending order
                        m = one << np.uint64(v & 63)
                        q = v >> 6
                        b0 |= m * np.uint64(q == 0)
                        b1 |= m * np.uint64(q == 1)
                        b2 |= m * np.uint64(q == 2)
                        b3 |= m * np.uint64(q == 3)
                    else:
                        a = i - 1  # insertion into the sorted row
                        while a >= 0 and row[a] > v:
                            row[a + 1] = row[a]
                            a -= 1
                        row[a + 1] = v
                if bad:
                    return r
                if E <= 256:
                    # the ranks rose strictly and perm is a permutation: exactly K distinct bits
                    k = 0
                    while b0:
                        out[r, k] = trailing_zeros(b0)
                        k += 1
                        b0 &= b0 - one
                    while b1:
                        out[r, k] = 64 + trailing_zeros(b1)
                        k += 1
                        b1 &= b1 - one
                    while b2:
                        out[r, k] = 128 + trailing_zeros(b2)
                        k += 1
                        b2 &= b2 - one
                    while b3:
                        out[r, k] = 192 + trailing_zeros(b3)
                        k += 1
                        b3 &= b3 - one
                else:
                    for i in range(K):
                        out[r, i] = row[i]
        rl = entropy.RANS_L
        if wp != nw or x0 != rl or x1 != rl or x2 != rl or x3 != rl:
            return entropy.BAD_STREAM
        return -1
