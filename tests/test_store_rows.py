"""The store's compiled kernels against their plain references (also run under NUMBA_BOUNDSCHECK)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_sim import simulate

from routecap.store import RouteStore, StoreError
from routecap.store_rows import (
    SEG_APPEND,
    SEG_FAST,
    SEG_FRESH,
    SEG_SLOW,
    classify_segments,
    classify_segments_reference,
    copy_check_runs,
    first_bad_cell,
    first_bad_cell_reference,
    scatter_runs,
    scatter_runs_reference,
)


def _rows(rng, N, L, K, E, dtype, p_dup, p_big):
    ids = np.zeros((N, L, K), dtype)
    for i in range(N * L):
        ids.reshape(-1, K)[i] = rng.permutation(E)[:K]
    flat = ids.reshape(-1, K)
    for i in np.flatnonzero(rng.random(N * L) < p_dup):
        if K > 1:
            flat[i, rng.integers(1, K)] = flat[i, 0]
    limit = int(np.iinfo(dtype).max)
    for i in np.flatnonzero(rng.random(N * L) < p_big):
        if E <= limit:
            flat[i, rng.integers(K)] = rng.integers(E, limit + 1)
    return ids


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       shape=st.sampled_from([(8, 128, np.uint8), (8, 100, np.uint8), (8, 200, np.uint8),
                              (8, 256, np.uint8), (4, 60, np.uint8), (1, 16, np.uint8),
                              (3, 300, np.uint16), (8, 8, np.uint8)]),
       with_valid=st.booleans(), p_dup=st.sampled_from([0.0, 0.01, 0.3]),
       p_big=st.sampled_from([0.0, 0.01, 0.3]))
def test_first_bad_cell_matches_the_reference(seed, shape, with_valid, p_dup, p_big):
    K, E, dtype = shape
    K = min(K, E)
    rng = np.random.default_rng(seed)
    N, L = int(rng.integers(0, 12)), int(rng.integers(1, 4))
    ids = _rows(rng, N, L, K, E, dtype, p_dup, p_big)
    valid = rng.random((N, L)) < 0.8 if with_valid else None
    starts = np.sort(rng.integers(0, N + 1, int(rng.integers(0, 4))))
    counts = np.array([int(rng.integers(0, N - a + 1)) for a in starts], np.int64)
    got = first_bad_cell(ids, valid, starts.astype(np.int64), counts, E)
    assert got == first_bad_cell_reference(ids, valid, starts, counts, E)


def test_first_bad_cell_names_the_cell():
    ids = np.array([[[1, 2, 3, 4, 5, 6, 7, 8]], [[1, 2, 3, 4, 5, 6, 7, 1]]], np.uint8)
    assert first_bad_cell(ids, None, np.array([0]), np.array([2]), 128) == 1
    assert first_bad_cell(ids, np.array([[True], [False]]), np.array([0]), np.array([2]), 128) == -1
    assert first_bad_cell(ids, None, np.array([0]), np.array([1]), 8) == 0  # id 8 >= E = 8


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), seek=st.booleans())
def test_classify_segments_matches_the_reference(seed, seek):
    rng = np.random.default_rng(seed)
    P, slots_n, B = 4, 6, 10
    S = int(rng.integers(0, 8))
    slots = rng.integers(0, slots_n, S).astype(np.int64)
    lens_by_slot = rng.integers(0, 12, slots_n).astype(np.int64)
    starts = np.where(rng.random(S) < 0.7, lens_by_slot[slots], rng.integers(-1, 14, S))
    starts = starts.astype(np.int64)
    rows = rng.integers(-1, 6, S).astype(np.int64)
    ns = rng.integers(-1, 5, S).astype(np.int64)
    tail_b = rng.integers(-1, B, slots_n).astype(np.int64)
    tail_g = rng.integers(0, 2, slots_n).astype(np.int64)
    cap = rng.integers(0, 5, slots_n).astype(np.int64)
    gen = rng.integers(0, 2, B).astype(np.int64)
    refs = rng.integers(0, 3, B).astype(np.int32)
    published = rng.random(B) < 0.3
    out = []
    for fn in (classify_segments, classify_segments_reference):
        kind = np.full(S, -1, np.int8)
        lens = np.full(S, -7, np.int64)
        mark = np.full(slots_n, -1, np.int64)
        code = fn(slots, starts, rows, ns, 8, lens_by_slot, tail_b, tail_g, cap, gen, refs,
                  published, P, seek, kind, lens, mark)
        assert (mark == -1).all()  # scratch left clean
        out.append((code, kind.tolist() if code < 0 else None, lens.tolist() if code < 0 else None))
    assert out[0] == out[1]


@pytest.mark.parametrize("has_valid", [False, True])
def test_scatter_runs_matches_the_reference(has_valid):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (20, 6)).astype(np.uint8)
    src_valid = rng.random((20, 3)) < 0.5 if has_valid else np.zeros((1, 3), np.bool_)
    d = np.array([0, 10, 30], np.int64)
    s = np.array([0, 5, 19], np.int64)
    n = np.array([5, 3, 1], np.int64)
    outs = []
    for fn in (scatter_runs, scatter_runs_reference):
        dst = np.zeros((40, 6), np.uint8)
        dst_valid = np.zeros((40, 3), np.bool_)
        fn(dst, src, dst_valid, src_valid, has_valid, d, s, n)
        outs.append((dst, dst_valid))
    assert (outs[0][0] == outs[1][0]).all() and (outs[0][1] == outs[1][1]).all()
    assert (outs[0][0][10:13] == src[5:8]).all() and outs[0][0][13:30].sum() == 0


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       shape=st.sampled_from([(8, 128, np.uint8), (8, 100, np.uint8), (8, 200, np.uint8),
                              (8, 256, np.uint8), (4, 60, np.uint8), (3, 300, np.uint16)]),
       with_valid=st.booleans(), p_bad=st.sampled_from([0.0, 0.002, 0.05]))
def test_copy_check_runs_matches_check_then_copy(seed, shape, with_valid, p_bad):
    # the fused kernel against its definition: the first bad cell in run order (the numpy
    # reference), else a plain copy of every run; when refused, no destination row is valid
    K, E, dtype = shape
    rng = np.random.default_rng(seed)
    N, L = int(rng.integers(1, 40)), int(rng.integers(1, 4))
    ids = _rows(rng, N, L, K, E, dtype, p_bad, p_bad)
    valid = rng.random((N, L)) < 0.8 if with_valid else None
    Q = int(rng.integers(0, 6))
    n = rng.integers(0, 6, Q).astype(np.int64)
    s_ = np.array([int(rng.integers(0, N - m + 1)) if m <= N else 0 for m in n], np.int64)
    n = np.minimum(n, N - s_)
    d = np.cumsum(np.r_[0, n[:-1] + rng.integers(0, 3, max(Q - 1, 0))]).astype(np.int64)[:Q]
    R = int(d[-1] + n[-1] + 2) if Q else 2
    swar = dtype == np.uint8 and K == 8 and (E <= 128 or E >= 256)
    dst = np.zeros((R, L, K), dtype)
    dst_valid = np.zeros((R, L), np.bool_)
    got = copy_check_runs(dst.reshape(R * L, K), ids.reshape(N * L, K),
                          ids.reshape(-1).view(np.uint64) if swar else np.zeros(1, np.uint64),
                          swar, dst_valid, valid if with_valid else np.zeros((1, L), np.bool_),
                          with_valid, d, s_, n, E)
    want = first_bad_cell_reference(ids, valid, s_, n, E)
    assert got == want
    if want >= 0:
        assert not dst_valid.any()
        return
    ref = np.zeros_like(dst)
    ref_valid = np.zeros_like(dst_valid)
    for a, b, m in zip(d.tolist(), s_.tolist(), n.tolist(), strict=True):
        ref[a:a + m] = ids[b:b + m]
        ref_valid[a:a + m] = True if valid is None else valid[b:b + m]
    assert (dst == ref).all() and (dst_valid == ref_valid).all()


def test_classify_sorts_a_step_by_what_it_needs():
    s = RouteStore(num_experts=128, moe_layers=[0], top_k=8, block_size=4)
    for r in "abcd":
        s.add_request(r, prompt_len=1)
    t, pool = s.t, s.pool
    step = np.tile(np.arange(8, dtype=np.uint8), (12, 1, 1))
    s.ingest(step[:2], None, [("a", 0, 0, 2)])  # a: 2 rows in a private tail block
    slots = np.array([t.slot_of[r] for r in "abcd"], np.int64)
    starts = np.array([2, 0, 0, 0], np.int64)
    rows = np.array([0, 1, 2, 6], np.int64)
    ns = np.array([1, 1, 5, 6], np.int64)  # b: one block; c: past its table; d: two blocks
    cap = t.cap.copy()
    cap[t.slot_of["c"]] = 1  # c's table holds one entry: its 5 rows need 2
    kind = np.empty(4, np.int8)
    lens = np.empty(4, np.int64)
    assert classify_segments(slots, starts, rows, ns, 12, t.length, t.tail_b, t.tail_g, cap,
                             pool.gen, pool.refs, pool.published, 4, False, kind, lens,
                             t.mark) == -1
    assert kind.tolist() == [SEG_FAST, SEG_APPEND, SEG_FRESH, SEG_FRESH]
    starts[0] = 1  # into a's rows: a cut
    assert classify_segments(slots, starts, rows, ns, 12, t.length, t.tail_b, t.tail_g, cap,
                             pool.gen, pool.refs, pool.published, 4, True, kind, lens,
                             t.mark) == -1
    assert kind[0] == SEG_SLOW


@pytest.mark.parametrize("K,E", [(8, 128), (8, 200), (2, 16)])
@pytest.mark.parametrize("valid", [False, True])
def test_a_bad_row_in_a_fused_step_changes_nothing(K, E, valid):
    # decode rows into private tail blocks (one compiled call) and a prefill chunk into fresh
    # blocks: a bad row anywhere refuses the step, and what was written is undone
    L, P = 3, 4
    s = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=P)
    rng = np.random.default_rng(K + E)
    good = np.stack([[rng.permutation(E)[:K] for _ in range(L)] for _ in range(24)]).astype(
        np.uint8)
    for r in "abc":
        s.add_request(r, prompt_len=1)
    s.ingest(good[:2], None, [("a", 0, 0, 1), ("b", 0, 1, 1)])
    before = [s.take(r).to_numpy().tolist() for r in "abc"], s.blocks_in_use, s.nbytes
    mask = np.ones((24, L), np.bool_) if valid else None
    for steps in ([("a", 1, 0, 1), ("b", 1, 1, 1)],  # both fast
                  [("a", 1, 0, 1), ("c", 0, 2, 9)],  # fast and fresh blocks
                  [("c", 0, 2, 9)]):
        for bad_row in sorted({seg[2] + seg[3] - 1 for seg in steps} | {steps[0][2]}):
            bad = good.copy()
            bad[bad_row, L - 1, K - 1] = bad[bad_row, L - 1, 0]  # a repeated id
            with pytest.raises(StoreError, match="distinct expert ids"):
                s.ingest(bad, mask, steps)
            s.check_invariants()
            assert ([s.take(r).to_numpy().tolist() for r in "abc"], s.blocks_in_use,
                    s.nbytes) == before
    s.ingest(good, mask, [("a", 1, 0, 1), ("b", 1, 1, 1), ("c", 0, 2, 9)])
    s.check_invariants()
    assert (s.take("c").expert_ids == good[2:11]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_simulator_through_the_compiled_paths(seed):
    # the whole store (fused decode, fresh blocks, the general path, evictions) at the router
    # shape of the word-wise row check; under NUMBA_BOUNDSCHECK in make test
    st_ = simulate(seed, 120, ranks=2, L=3, K=8, E=128, budget_blocks=40 if seed else None)
    assert st_.wrong_cells == 0 and st_.checked_cells > 0
