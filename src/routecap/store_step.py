"""The store's step with new blocks, compiled: segments that start blocks at their tables' ends.

Shape legend: S segments of the step, P block size, L MoE layers, K top-k, B pool blocks.

A decode step at a block boundary and a prefill chunk both end here (after
:func:`~routecap.store_step.step_fast` found a segment that is not :data:`SEG_FAST`). When no
segment needs anything else (:data:`SEG_SLOW`: copy on write, cuts, gaps...), one call of
:func:`fresh_step` plans the new blocks, takes them from the top of the free stack, checks and
copies the rows (:func:`~routecap.store_rows.copy_check_runs`) and commits the pool's and the
requests' state; Python then only writes the new table entries (a few array stores per request
that got a block) and grows a table past its capacity (an event). Nothing changes on a refusal.
"""

from __future__ import annotations

import numpy as np

from .store_rows import (
    SEG_APPEND,
    SEG_FAST,
    SEG_FRESH,
    SEG_NOOP,
    classify_segments,
    copy_check_runs,
)
from .store_tables import (
    _ENTRY_BYTES,
    _GAP,
    SLOT_CAP,
    SLOT_LENGTH,
    SLOT_LIVE,
    SLOT_MARK,
    SLOT_NBLOCKS,
    SLOT_OFF,
    SLOT_ROWS,
    SLOT_SERIAL,
    SLOT_TAIL_B,
    SLOT_TAIL_G,
    _capacity_for,
)

try:  # numba is a dependency; the plain function keeps the store usable without it
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

__all__ = ["FRESH_FULL", "FRESH_GROW", "STEP_EVENTS", "STEP_FRESH", "STEP_STORED", "fresh_step",
           "step_fast"]

_capacity = _nb.njit(inline="always")(_capacity_for) if _HAVE_NUMBA else _capacity_for

def _table_entries_py(slot_state, entries, end, sl, a, b, grow, blocks, gen):
    """Entries ``[a, b)`` of slot ``sl``'s table in the slab ``entries``: ``blocks[:b - a]``
    (and gaps from its current end to ``a``); first, if ``grow``, its table moves to a region of
    ``grow`` entries at ``end``. Returns the slab's end."""
    cap = slot_state[SLOT_CAP]
    if grow:
        c, o = cap[sl], slot_state[SLOT_OFF, sl]
        assert o + c <= end and end + grow <= entries.shape[1]
        for x in range(c):
            entries[0, end + x] = entries[0, o + x]
            entries[1, end + x] = entries[1, o + x]
        for x in range(c, grow):
            entries[0, end + x] = _GAP
            entries[1, end + x] = 0
        slot_state[SLOT_OFF, sl] = end
        cap[sl] = grow
        end += grow
    off = slot_state[SLOT_OFF, sl]
    nb = slot_state[SLOT_NBLOCKS, sl]
    assert nb <= a and b <= cap[sl] and off + cap[sl] <= entries.shape[1] and b - a <= len(blocks)
    for x in range(nb, a):
        entries[0, off + x] = _GAP
    for k in range(b - a):
        entries[0, off + a + k] = blocks[k]
        entries[1, off + a + k] = gen[blocks[k]]
    slot_state[SLOT_NBLOCKS, sl] = b
    return end


_table_entries = (_nb.njit(inline="always")(_table_entries_py) if _HAVE_NUMBA
                  else _table_entries_py)

#: :func:`fresh_step` codes besides -1 (stored) and a bad cell (>= 0); nothing changed with them
FRESH_GROW, FRESH_FULL = -2, -3


#: rows of the ``budget`` argument of :func:`fresh_step`
BUDGET_TABLE_BYTES, BUDGET_BLOCK_BYTES, BUDGET_BLOCKS, BUDGET_IN_USE, BUDGET_SLAB_END, \
    BUDGET_SLAB_SIZE = range(6)


def fresh_step_py(kind, slots, starts, rows, ns, P, slot_state, free, nfree, budget, grow_ok,
                  refs, in_use, lost, gen_use, clock, dst_cells, src_cells, src_words, swar,
                  dst_valid, src_valid, has_valid, E, out, entries):  # noqa: PLR0913
    """Store a step of :data:`SEG_FAST`, :data:`SEG_APPEND`, :data:`SEG_FRESH` and
    :data:`SEG_NOOP` segments (kinds from :func:`~routecap.store_rows.classify_segments`).

    The new blocks are the top ``need`` entries of the free stack, ``free[nfree - need:nfree]``
    in that order (see :meth:`~routecap.block_pool.BlockPool.took_top`): fresh
    segment j gets ``out[3, j]`` onwards. ``out [5, >= S]`` receives per fresh segment, in
    segment order, its slot, first and end table entries, that first index, and its table's new
    capacity if it grows (else 0). ``budget`` (rows ``BUDGET_*``) holds the tables' bytes, the
    block size in bytes, the pool's blocks and blocks in use, and the end and size of the
    tables' slab (:class:`~routecap.store_tables.TableSlab`, ``entries``).

    Unless ``grow_ok``, a table that must grow past its capacity grows here, into a new region
    at the slab's end, when the slab has room (else :data:`FRESH_GROW`: the caller packs it) and
    its bytes and the new blocks fit the budget together without an eviction; the new entries
    are written; ``budget`` then holds the new table bytes and slab end. With ``grow_ok`` the
    caller has counted the tables' growth already and grows them and writes the entries itself.

    Returns ``(code, fresh segments, need)``, code: -1 stored (blocks referenced, LRU clock
    ``clock + 1 + i`` for the i-th, validity, lengths, tails, tables); :data:`FRESH_GROW`;
    :data:`FRESH_FULL` when the blocks do not fit without an eviction; or the flat
    ``row * L + layer`` of the first bad valid cell. Nothing but ids under invalid rows
    changes unless the code is -1.
    """
    S = kind.shape[0]
    B = refs.shape[0]
    assert slot_state.shape[0] == SLOT_ROWS and gen_use.shape[0] == 2 and P >= 1
    assert (slots.shape[0] == S and starts.shape[0] == S and rows.shape[0] == S
            and ns.shape[0] == S and out.shape[0] == 5 and out.shape[1] >= S
            and budget.shape[0] == 6 and budget[BUDGET_BLOCK_BYTES] > 0)
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
    grown = 0  # entries the growing tables add
    slab = 0  # entries of their new regions
    for i in range(S):
        k = kind[i]
        if k == SEG_APPEND or k == SEG_FRESH:
            j0 = starts[i] // P
            j1 = j0 + (ns[i] + P - 1) // P
            c = cap[slots[i]]
            out[0, nf] = slots[i]
            out[1, nf] = j0
            out[2, nf] = j1
            out[3, nf] = need
            out[4, nf] = 0
            if j1 > c and not grow_ok:
                out[4, nf] = _capacity(j1)
                grown += out[4, nf] - c
                slab += out[4, nf]
            need += j1 - j0
            nf += 1
        else:
            assert k == SEG_FAST or k == SEG_NOOP
            nfast += k == SEG_FAST
    if slab and budget[BUDGET_SLAB_END] + slab > budget[BUDGET_SLAB_SIZE]:
        return FRESH_GROW, nf, need
    table_bytes = budget[BUDGET_TABLE_BYTES] + grown * _ENTRY_BYTES
    bb = budget[BUDGET_BLOCK_BYTES]
    limit = budget[BUDGET_BLOCKS] - (table_bytes + bb - 1) // bb  # RequestTables.limit_for
    if need > limit - budget[BUDGET_IN_USE]:
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
                dk = free[base + out[3, j] + k] * P
                sk = rows[i] + k * P
                nk = min(P, ns[i] - k * P)
                if q > nfast and d[q - 1] + n[q - 1] == dk and s[q - 1] + n[q - 1] == sk:
                    n[q - 1] += nk  # the next block in memory: one run (blocks freed in order
                else:  # come back in order from the free stack)
                    d[q] = dk
                    s[q] = sk
                    n[q] = nk
                    q += 1
            j += 1
    bad = copy_check_runs(dst_cells, src_cells, src_words, swar, dst_valid, src_valid,
                          has_valid, d[:q], s[:q], n[:q], E)
    if bad >= 0:
        return bad, nf, need
    for t in range(need):  # taken, as BlockPool.take_many marks them
        b = free[base + t]
        assert 0 <= b < B and refs[b] == 0
        refs[b] = 1
        in_use[b] = True
        lost[b, :] = False
        last_use[b] = clock + 1 + t
    end = budget[BUDGET_SLAB_END]
    j = 0
    for i in range(S):
        sl = slots[i]
        stop = starts[i] + ns[i]
        if kind[i] == SEG_FAST:
            last_use[tail_b[sl]] = clock
            length[sl] = stop
            if stop % P == 0:
                tail_b[sl] = -1
        elif kind[i] != SEG_NOOP:
            last = free[base + out[3, j] + out[2, j] - out[1, j] - 1]
            r = ns[i] % P
            if r:  # the rest of a partly written last block is invalid
                dst_valid[last * P + r:last * P + P] = False
            length[sl] = stop
            tail_b[sl] = -1 if r == 0 else last
            tail_g[sl] = gen[last]
            if not grow_ok:
                end = _table_entries(slot_state, entries, end, sl, out[1, j], out[2, j], out[4, j],
                                     free[base + out[3, j]:], gen)
            j += 1
    budget[BUDGET_TABLE_BYTES] = table_bytes
    budget[BUDGET_SLAB_END] = end
    return -1, nf, need


if _HAVE_NUMBA:
    fresh_step = _nb.njit(cache=True, nogil=True)(fresh_step_py)
else:  # pragma: no cover
    fresh_step = fresh_step_py


#: :func:`step_fast` results besides ``i * 4 + code`` (a bad segment, code 0: no such request)
#: and ``STEP_BAD_CELL - cell`` (a bad cell; nothing changed)
STEP_STORED, STEP_EVENTS, STEP_FRESH, STEP_BAD_CELL = -1, -2, -3, -4


def step_fast_py(handles, from_handles, slot_state, starts, rows, ns, seek, gen_use, refs,
                 published, P, scratch, kind, dst_cells, src_cells, src_words, swar, dst_valid,
                 src_valid, has_valid, E, clock, free, nfree, budget, in_use, lost,
                 out, entries):  # noqa: PLR0913
    """One engine step in one compiled call unless a segment needs more than new blocks.

    ``slot_state`` holds the per-request arrays by slot (rows ``SLOT_*`` of
    :mod:`routecap.store_tables`: serial, live, length, tail block and generation, table
    capacity, mark), ``gen_use`` the blocks' generations and last uses (rows 0 and 1), and
    ``scratch`` ``[5, >= S]`` receives slots, lens and the runs ``d``/``s``/``n`` (few arguments:
    each costs dispatch time on every step).

    Maps ``handles`` (``serial << 32 | slot``, checked against ``serial``/``live``, when
    ``from_handles``; else they are slots) into ``slots``, then classifies the segments
    (:func:`classify_segments`, filling ``kind``/``lens``). If every segment is
    :data:`SEG_FAST` or :data:`SEG_NOOP`, copies and checks their rows
    (:func:`copy_check_runs`, runs in ``d``/``s``/``n``) and commits the requests' lengths,
    tails and the blocks' last use: :data:`STEP_STORED`. If some are :data:`SEG_APPEND` or
    :data:`SEG_FRESH` too, :func:`fresh_step` stores the step when its new blocks fit in
    the ``budget`` without an eviction: :data:`STEP_FRESH`, with the number of fresh segments
    and of blocks taken from the top of the free stack in ``scratch[2, 0]`` and ``scratch[3, 0]``
    (the table entries are written, tables grown, ``budget`` updated: see :func:`fresh_step`).
    Else
    :data:`STEP_EVENTS` (nothing changed: the caller resolves the step); ``i * 4 + code`` for a
    bad segment i (code 0 a handle naming no request, 1-3 as :func:`classify_segments`); or
    ``STEP_BAD_CELL - cell`` for a bad cell (nothing changed).
    """
    S = handles.shape[0]
    M = slot_state.shape[1]
    B = gen_use.shape[1]
    L = dst_valid.shape[1]
    N = src_cells.shape[0] // L
    assert slot_state.shape[0] == SLOT_ROWS and gen_use.shape[0] == 2 and scratch.shape[0] == 5
    assert (starts.shape[0] == S and rows.shape[0] == S and ns.shape[0] == S
            and kind.shape[0] == S and scratch.shape[1] >= S)
    assert refs.shape[0] == B and published.shape[0] == B
    assert dst_valid.shape[0] == B * P and P >= 1
    serial = slot_state[SLOT_SERIAL]
    live = slot_state[SLOT_LIVE]
    length = slot_state[SLOT_LENGTH]
    tail_b = slot_state[SLOT_TAIL_B]
    tail_g = slot_state[SLOT_TAIL_G]
    cap = slot_state[SLOT_CAP]
    mark = slot_state[SLOT_MARK]
    gen = gen_use[0]
    last_use = gen_use[1]
    slots = scratch[0, :S]
    lens = scratch[1, :S]
    d = scratch[2, :S]
    s = scratch[3, :S]
    n = scratch[4, :S]
    for i in range(S):
        h = handles[i]
        if from_handles:
            sl = h & 0xFFFFFFFF
            if h < 0 or sl >= M or (h >> 32) != serial[sl] or live[sl] == 0:
                return i * 4
        else:
            sl = h
            assert 0 <= sl < M and live[sl] != 0
        slots[i] = sl
    code = classify_segments(slots, starts, rows, ns, N, length, tail_b, tail_g, cap, gen, refs,
                             published, P, seek, kind, lens, mark)
    if code >= 0:
        return code
    k = 0
    fresh = False
    for i in range(S):
        if kind[i] == SEG_FAST:
            d[k] = tail_b[slots[i]] * P + starts[i] % P
            s[k] = rows[i]
            n[k] = ns[i]
            k += 1
        elif kind[i] == SEG_APPEND or kind[i] == SEG_FRESH:
            fresh = True
        elif kind[i] != SEG_NOOP:
            return STEP_EVENTS
    if fresh:
        code, nf, need = fresh_step(kind, slots, starts, rows, ns, P, slot_state, free, nfree,
                                    budget, False, refs, in_use, lost, gen_use, clock, dst_cells,
                                    src_cells, src_words, swar, dst_valid, src_valid, has_valid,
                                    E, out, entries)
        if code >= 0:
            return STEP_BAD_CELL - code
        if code != -1:
            return STEP_EVENTS  # the slab must be packed, or the blocks need an eviction
        scratch[2, 0] = nf
        scratch[3, 0] = need
        return STEP_FRESH
    bad = copy_check_runs(dst_cells, src_cells, src_words, swar, dst_valid, src_valid,
                          has_valid, d[:k], s[:k], n[:k], E)
    if bad >= 0:
        return STEP_BAD_CELL - bad
    for i in range(S):
        if kind[i] == SEG_FAST:
            sl = slots[i]
            last_use[tail_b[sl]] = clock
            end = starts[i] + ns[i]
            length[sl] = end
            if end % P == 0:
                tail_b[sl] = -1
    return STEP_STORED


if _HAVE_NUMBA:
    step_fast = _nb.njit(cache=True, nogil=True)(step_fast_py)
else:  # pragma: no cover
    step_fast = step_fast_py
