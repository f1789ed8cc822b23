"""Checks on the rows a store is asked to keep: ids in ``[0, E)`` and K distinct ids per row.

Shape legend: N rows of one step, L MoE layers, K top-k.

The store checks every row it stores once, on the way in, so that :meth:`RouteStore.take` can
hand out traces without scanning them again. Only rows a segment names are checked (padding
rows of a step are ignored, as documented), and only valid cells. The check runs at memory
speed for the common router shape of 8 one-byte ids per row (top-8 of up to 256 experts) with a
SWAR kernel; other shapes use a general compiled loop; :func:`first_bad_cell_reference` is the
plain numpy definition both are tested against.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency; the numpy reference keeps the store usable without it
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

__all__ = ["first_bad_cell", "first_bad_cell_reference"]


def first_bad_cell_reference(ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                             first_N: np.ndarray, count_N: np.ndarray,
                             num_experts: int) -> int:
    """Flat index ``row * L + layer`` of the first bad valid cell in the named rows, or -1.

    Rows ``[first_N[i], first_N[i] + count_N[i])`` are checked, in that order. A cell is bad
    when an id is ``>= num_experts`` or two of its K ids are equal.
    """
    N, L, K = ids_NLK.shape
    for a, n in zip(first_N.tolist(), count_N.tolist(), strict=True):
        if n <= 0:
            continue
        ids = ids_NLK[a:a + n]
        bad = (ids >= num_experts).any(-1)
        if K > 1:
            srt = np.sort(ids, axis=-1)
            bad |= (srt[..., 1:] == srt[..., :-1]).any(-1)
        if valid_NL is not None:
            bad &= valid_NL[a:a + n]
        hit = np.flatnonzero(bad.reshape(-1))
        if hit.size:
            return a * L + int(hit[0])
    return -1


if _HAVE_NUMBA:

    @_nb.njit(cache=True, nogil=True)
    def _any_bad_word8(words, valid, has_valid, first, count, L, E):  # pragma: no cover
        # one uint64 per (row, layer) cell: 8 one-byte ids. A byte of x ^ rotate(x, 8s) is zero
        # where ids s apart are equal; rotations by 1..4 bytes compare every pair. For E <= 128
        # ((x + (127 - (E - 1)) * 0x01..) | x) & 0x80.. flags any byte >= E.
        lo = np.uint64(0x0101010101010101)
        hi = np.uint64(0x8080808080808080)
        add = lo * np.uint64(127 - (E - 1)) if E <= 128 else np.uint64(0)
        range_check = E <= 128
        acc = np.uint64(0)
        for p in range(first.shape[0]):
            a = first[p] * L
            b = (first[p] + count[p]) * L
            for i in range(a, b):
                x = words[i]
                f = np.uint64(0)
                if range_check:
                    f = ((x + add) | x) & hi
                r = (x >> np.uint64(8)) | (x << np.uint64(56))
                v = x ^ r
                f |= (v - lo) & ~v & hi
                r = (x >> np.uint64(16)) | (x << np.uint64(48))
                v = x ^ r
                f |= (v - lo) & ~v & hi
                r = (x >> np.uint64(24)) | (x << np.uint64(40))
                v = x ^ r
                f |= (v - lo) & ~v & hi
                r = (x >> np.uint64(32)) | (x << np.uint64(32))
                v = x ^ r
                f |= (v - lo) & ~v & hi
                if has_valid:
                    f *= np.uint64(valid[i])
                acc |= f
        return acc != 0

    @_nb.njit(cache=True, nogil=True)
    def _first_bad_general(cells, valid, has_valid, first, count, L, E):  # pragma: no cover
        K = cells.shape[1]
        for p in range(first.shape[0]):
            for i in range(first[p] * L, (first[p] + count[p]) * L):
                if has_valid and not valid[i]:
                    continue
                for a in range(K):
                    va = cells[i, a]
                    if va >= E:
                        return i
                    for b in range(a):
                        if cells[i, b] == va:
                            return i
        return -1


def first_bad_cell(ids_NLK: np.ndarray, valid_NL: np.ndarray | None, first_N: np.ndarray,
                   count_N: np.ndarray, num_experts: int) -> int:
    """Same answer as :func:`first_bad_cell_reference`, compiled (see the module docstring)."""
    N, L, K = ids_NLK.shape
    if not _HAVE_NUMBA or not ids_NLK.flags.c_contiguous or N == 0:
        return first_bad_cell_reference(ids_NLK, valid_NL, first_N, count_N, num_experts)
    first = np.ascontiguousarray(first_N, np.int64)
    count = np.ascontiguousarray(count_N, np.int64)
    has_valid = valid_NL is not None
    valid = (np.ascontiguousarray(valid_NL).reshape(-1) if has_valid
             else np.zeros(1, np.bool_))
    if ids_NLK.dtype == np.uint8 and K == 8:
        if num_experts > 128 and num_experts < 256:
            # the SWAR range test covers E <= 128 only: check the range apart (rare shapes)
            return _first_bad_general(ids_NLK.reshape(N * L, K), valid, has_valid, first, count,
                                      L, num_experts)
        if not _any_bad_word8(ids_NLK.reshape(-1).view(np.uint64), valid, has_valid, first,
                              count, L, num_experts):
            return -1
    cells = ids_NLK.reshape(N * L, K)
    E = min(int(num_experts), int(np.iinfo(ids_NLK.dtype).max) + 1)
    return int(_first_bad_general(cells, valid, has_valid, first, count, L, E))


#: :func:`classify_segments` kinds
SEG_NOOP, SEG_FAST, SEG_APPEND, SEG_SLOW = 0, 1, 2, 3


def classify_segments_reference(slots, starts, rows, ns, num_rows, lens_by_slot, tail_b, tail_g,
                                cap, gen, refs, published, block_size, seek, kind, lens,
                                mark):  # noqa: PLR0913
    """Check a step's segments and sort them by what storing them takes (see the compiled twin).

    Fills ``kind[i]`` (:data:`SEG_FAST`: inside the request's private tail block;
    :data:`SEG_APPEND`: a fresh block at the table's end; :data:`SEG_SLOW`: anything else that
    changes the request; :data:`SEG_NOOP`) and ``lens[i]`` (the request's length before the
    segment: a request named twice continues where its previous segment ended). Returns -1, or
    ``i * 4 + code`` for the first bad segment i: code 1 rows out of the step, 2 negative start,
    3 start is not the length (without ``seek``). ``mark`` is scratch, one entry per slot, -1.
    """
    S = slots.shape[0]
    P = block_size
    for i in range(S):
        if ns[i] < 0 or rows[i] < 0 or rows[i] + ns[i] > num_rows:
            return i * 4 + 1
        if starts[i] < 0:
            return i * 4 + 2
    repeated = False
    for i in range(S):
        s = slots[i]
        if mark[s] >= 0:
            repeated = True
            p = mark[s]
            lens[i] = starts[p] + ns[p]
        else:
            lens[i] = lens_by_slot[s]
        mark[s] = i
    for i in range(S):
        if not seek and starts[i] != lens[i]:
            for k in range(S):
                mark[slots[k]] = -1
            return i * 4 + 3
    for i in range(S):
        s = slots[i]
        single = True
        if repeated:
            single = mark[s] == i and lens[i] == lens_by_slot[s]
            if single:  # the last segment of its request: is it also the first?
                for k in range(i):
                    if slots[k] == s:
                        single = False
                        break
        n = ns[i]
        st = starts[i]
        o = st % P
        if n == 0:
            kind[i] = SEG_NOOP if st == lens[i] else SEG_SLOW
        elif not single or st != lens[i]:
            kind[i] = SEG_SLOW
        elif o > 0 and o + n <= P and tail_b[s] >= 0:
            b = tail_b[s]
            if gen[b] == tail_g[s] and refs[b] == 1 and not published[b]:
                kind[i] = SEG_FAST
            else:
                kind[i] = SEG_SLOW
        elif o == 0 and n <= P and st // P < cap[s]:
            kind[i] = SEG_APPEND
        else:
            kind[i] = SEG_SLOW
    for k in range(S):
        mark[slots[k]] = -1
    return -1


if _HAVE_NUMBA:
    classify_segments = _nb.njit(cache=True, nogil=True)(classify_segments_reference)
else:  # pragma: no cover
    classify_segments = classify_segments_reference


def fast_runs_reference(kind, slots, starts, rows, ns, tail_b, block_size, len_by_slot,
                        last_use, clock, d_out, s_out, n_out):
    """Runs for the :data:`SEG_FAST` segments, committing their lengths (and tails, LRU clock).

    Writes ``(first pool row, first step row, rows)`` of each into ``d_out``/``s_out``/``n_out``
    and returns how many.
    """
    P = block_size
    k = 0
    for i in range(kind.shape[0]):
        if kind[i] != SEG_FAST:
            continue
        s = slots[i]
        b = tail_b[s]
        d_out[k] = b * P + starts[i] % P
        s_out[k] = rows[i]
        n_out[k] = ns[i]
        k += 1
        end = starts[i] + ns[i]
        len_by_slot[s] = end
        if end % P == 0:
            tail_b[s] = -1
        last_use[b] = clock
    return k


def scatter_runs_reference(dst_rows, src_rows, dst_valid, src_valid, has_valid, d, s, n):
    """``dst_rows[d[i] + r] = src_rows[s[i] + r]`` for ``r < n[i]`` (and the validity mask)."""
    W = src_rows.shape[1]
    L = dst_valid.shape[1]
    for i in range(d.shape[0]):
        for r in range(n[i]):
            a = d[i] + r
            b = s[i] + r
            for c in range(W):
                dst_rows[a, c] = src_rows[b, c]
            for c in range(L):
                dst_valid[a, c] = src_valid[b, c] if has_valid else True


if _HAVE_NUMBA:
    fast_runs = _nb.njit(cache=True, nogil=True)(fast_runs_reference)
    scatter_runs = _nb.njit(cache=True, nogil=True)(scatter_runs_reference)
else:  # pragma: no cover
    fast_runs = fast_runs_reference
    scatter_runs = scatter_runs_reference
