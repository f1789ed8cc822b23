"""The store's compiled kernels against their plain references (also run under NUMBA_BOUNDSCHECK)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routecap.store_rows import (
    classify_segments,
    classify_segments_reference,
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
