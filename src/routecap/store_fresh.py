"""The store's step with new blocks, compiled: segments that start blocks at their tables' ends.

Shape legend: S segments of the step, P block size, L MoE layers, K top-k, B pool blocks.

A decode step at a block boundary and a prefill chunk both end here (after
:func:`~routecap.store_rows.step_fast` found a segment that is not :data:`SEG_FAST`). When no
segment needs anything else (:data:`SEG_SLOW`: copy on write, cuts, gaps...), one call of
:func:`fresh_step` plans the new blocks, takes them from the top of the free stack, checks and
copies the rows (:func:`~routecap.store_rows.copy_check_runs`) and commits the pool's and the
requests' state; Python then only writes the new table entries (a few array stores per request
that got a block) and grows a table past its capacity (an event). Nothing changes on a refusal.
"""

from __future__ import annotations

import numpy as np

from .store_rows import SEG_APPEND, SEG_FAST, SEG_FRESH, SEG_NOOP, copy_check_runs
from .store_tables import SLOT_CAP, SLOT_LENGTH, SLOT_ROWS, SLOT_TAIL_B, SLOT_TAIL_G

try:  # numba is a dependency; the plain function keeps the store usable without it
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

__all__ = ["FRESH_FULL", "FRESH_GROW", "fresh_step"]

#: :func:`fresh_step` codes besides -1 (stored) and a bad cell (>= 0); nothing changed with them
FRESH_GROW, FRESH_FULL = -2, -3


def fresh_step_py(kind, slots, starts, rows, ns, P, slot_state, free, nfree, room, grow_ok,
                  refs, in_use, lost, gen_use, clock, dst_cells, src_cells, src_words, swar,
                  dst_valid, src_valid, has_valid, E, out):  # noqa: PLR0913
    """Store a step of :data:`SEG_FAST`, :data:`SEG_APPEND`, :data:`SEG_FRESH` and
    :data:`SEG_NOOP` segments (kinds from :func:`~routecap.store_rows.classify_segments`).

    The new blocks are the top ``need`` entries of the free stack, ``free[nfree - need:nfree]``
    in that order (what :meth:`~routecap.block_pool.BlockPool.take_free` would give): fresh
    segment j gets ``out[3, j]`` onwards. ``out [4, >= S]`` receives per fresh segment, in
    segment order, its slot, first and end table entries and that first index.

    Returns ``(code, fresh segments, need)``, code: -1 stored (blocks referenced, LRU clock
    ``clock + 1 + i`` for the i-th, validity, lengths, tails); :data:`FRESH_GROW` when a table
    must grow past its capacity and not ``grow_ok`` (the caller accounts for the bytes first);
    :data:`FRESH_FULL` when ``need > room`` (the blocks do not fit without an eviction); or the
    flat ``row * L + layer`` of the first bad valid cell. Nothing but ids under invalid rows
    changes unless the code is -1.
    """
    S = kind.shape[0]
    B = refs.shape[0]
    assert slot_state.shape[0] == SLOT_ROWS and gen_use.shape[0] == 2 and P >= 1
    assert (slots.shape[0] == S and starts.shape[0] == S and rows.shape[0] == S
            and ns.shape[0] == S and out.shape[0] == 4 and out.shape[1] >= S)
    assert in_use.shape[0] == B and lost.shape[0] == B and gen_use.shape[1] == B
    assert dst_valid.shape[0] == B * P and 0 <= nfree <= free.shape[0]
    length = slot_state[SLOT_LENGTH]
    tail_b = slot_state[SLOT_TAIL_B]
    tail_g = slot_state[SLOT_TAIL_G]
    cap = slot_state[SLOT_CAP]
    gen = gen_use[0]
    last_use = gen_use[1]
    nf = 0
    nfast = 0
    need = 0
    grow = False
    for i in range(S):
        k = kind[i]
        if k == SEG_APPEND or k == SEG_FRESH:
            j0 = starts[i] // P
            j1 = j0 + (ns[i] + P - 1) // P
            grow |= j1 > cap[slots[i]]
            out[0, nf] = slots[i]
            out[1, nf] = j0
            out[2, nf] = j1
            out[3, nf] = need
            need += j1 - j0
            nf += 1
        else:
            assert k == SEG_FAST or k == SEG_NOOP
            nfast += k == SEG_FAST
    if grow and not grow_ok:
        return FRESH_GROW, nf, need
    if need > room:
        return FRESH_FULL, nf, need
    assert need <= nfree
    base = nfree - need
    # the runs: each FAST segment, then each new block
    d = np.empty(nfast + need, np.int64)
    s = np.empty(nfast + need, np.int64)
    n = np.empty(nfast + need, np.int64)
    q = 0
    for i in range(S):
        if kind[i] == SEG_FAST:
            d[q] = tail_b[slots[i]] * P + starts[i] % P
            s[q] = rows[i]
            n[q] = ns[i]
            q += 1
    j = 0
    for i in range(S):
        if kind[i] == SEG_APPEND or kind[i] == SEG_FRESH:
            for k in range(out[2, j] - out[1, j]):
                d[q] = free[base + out[3, j] + k] * P
                s[q] = rows[i] + k * P
                n[q] = min(P, ns[i] - k * P)
                q += 1
            j += 1
    bad = copy_check_runs(dst_cells, src_cells, src_words, swar, dst_valid, src_valid,
                          has_valid, d, s, n, E)
    if bad >= 0:
        return bad, nf, need
    for t in range(need):  # taken, as BlockPool.take_free marks them
        b = free[base + t]
        assert 0 <= b < B and refs[b] == 0
        refs[b] = 1
        in_use[b] = True
        lost[b, :] = False
        last_use[b] = clock + 1 + t
    j = 0
    for i in range(S):
        sl = slots[i]
        end = starts[i] + ns[i]
        if kind[i] == SEG_FAST:
            last_use[tail_b[sl]] = clock
            length[sl] = end
            if end % P == 0:
                tail_b[sl] = -1
        elif kind[i] != SEG_NOOP:
            last = free[base + out[3, j] + out[2, j] - out[1, j] - 1]
            r = ns[i] % P
            if r:  # the rest of a partly written last block is invalid
                dst_valid[last * P + r:last * P + P] = False
            length[sl] = end
            tail_b[sl] = -1 if r == 0 else last
            tail_g[sl] = gen[last]
            j += 1
    return -1, nf, need


if _HAVE_NUMBA:
    fresh_step = _nb.njit(cache=True, nogil=True)(fresh_step_py)
else:  # pragma: no cover
    fresh_step = fresh_step_py
