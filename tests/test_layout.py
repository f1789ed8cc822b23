"""Layouts against a brute-force reference that moves labelled tokens around explicitly.

Every token is labelled (dp_rank, index). The reference builds, for each layout, the list of rows
a given rank's router sees by doing the data movement (all-gather, padding, TP chunking) on the
labels; the fast path (plan_rows / infer_layout) must pick out exactly this rank's tokens, in order.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routecap.layout import (
    Layout,
    LayoutError,
    RankView,
    ceil_chunks,
    infer_layout,
    plan_rows,
)

PAD = None


def _reference_chunk_tokens(view, r, t):
    """Tokens of DP rank r held by TP rank t (contiguous chunk)."""
    start = sum(view.chunk(r, u) for u in range(t))
    return [(r, i) for i in range(start, start + view.chunk(r, t))]


def _reference_router_rows(layout, view, tp_rank, shard_size=None):
    """The labelled rows the router of (view.dp_rank, tp_rank) sees under ``layout``."""
    me, R, TP = view.dp_rank, view.num_dp, view.tp_size
    if layout is Layout.LOCAL:
        return [(me, i) for i in range(view.my_tokens)]
    if layout is Layout.GATHERED:
        return [(r, i) for r in range(R) for i in range(view.tokens_per_dp[r])]
    if layout is Layout.GATHERED_PADDED:
        rows = []
        for r in range(R):
            for t in range(TP):
                chunk = _reference_chunk_tokens(view, r, t)
                rows += chunk + [PAD] * (shard_size - len(chunk))
        return rows
    if layout is Layout.TP_SHARDED:
        chunk = _reference_chunk_tokens(view, me, tp_rank)
        return chunk + [PAD] * ((shard_size or len(chunk)) - len(chunk))
    raise AssertionError(layout)


def _apply(plan, rows_by_tp_rank, tp_rank):
    """Run a plan on labelled rows (simulating the TP all-gather where the plan needs one)."""
    def take(p, rows):
        out = []
        for start, length in p.segments:
            out += rows[start:start + length]
        return out

    mine = take(plan, rows_by_tp_rank[tp_rank])
    if not plan.tp_gather:
        return mine
    gathered = []
    for rows in rows_by_tp_rank:
        part = rows[: plan.gather_rows]  # each TP rank contributes its padded chunk
        gathered.append(part + [PAD] * (plan.gather_rows - len(part)))
    out = []
    for t, block in enumerate(gathered):
        out += block[: plan.tp_chunks[t]]
    return out


views = st.integers(1, 8).flatmap(lambda R: st.tuples(
    st.lists(st.integers(0, 12), min_size=R, max_size=R),  # tokens per DP rank, zeros included
    st.integers(0, R - 1),                                   # dp_rank
    st.integers(1, 4),                                       # tp_size
    st.integers(0, 5),                                       # extra padding per shard
    st.data(),
))


@settings(max_examples=400, deadline=None)
@given(views, st.sampled_from(list(Layout)))
def test_every_layout_selects_exactly_this_ranks_tokens(args, layout):
    tokens, me, TP, extra, data = args
    tp_rank = data.draw(st.integers(0, TP - 1))
    base = RankView(tokens_per_dp=tokens, dp_rank=me, tp_size=TP, tp_rank=tp_rank)
    S = base.max_chunk + extra
    view = RankView(tokens_per_dp=tokens, dp_rank=me, tp_size=TP, tp_rank=tp_rank, shard_size=S)
    padded = layout in (Layout.GATHERED_PADDED, Layout.TP_SHARDED)
    rows_by_tp = [_reference_router_rows(layout, view, t, S if padded else None)
                  for t in range(TP)]
    plan = plan_rows(layout, view, len(rows_by_tp[tp_rank]))
    got = _apply(plan, rows_by_tp, tp_rank)
    assert got == [(me, i) for i in range(tokens[me])]
    assert PAD not in got
    assert plan.publish == (tp_rank == 0)
    assert plan.num_tokens == tokens[me]

    # inference from shapes: right or refused as ambiguous, never wrong, never "fits nothing"
    try:
        inferred = infer_layout(view, len(rows_by_tp[tp_rank]))
    except LayoutError as e:
        assert "declare the layout explicitly" in str(e)
    else:
        assert _apply(inferred, rows_by_tp, tp_rank) == got


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(1, 8))
def test_ceil_chunks(n, tp):
    chunks = ceil_chunks(n, tp)
    assert sum(chunks) == n and len(chunks) == tp
    assert all(c <= -(-n // tp) for c in chunks)
    assert list(chunks) == sorted(chunks, reverse=True)


# The seed bug: vLLM 0.16-0.19's capturer asserted ``sum(num_tokens_across_dp) == N`` (it assumed
# the gathered layout) and crashed when the modular-kernel path routed only local rows. Each case:
# (DP token counts, this DP rank); both layouts must hand the rank exactly its own labelled tokens.
SEED_CASES = [
    pytest.param([2, 1], 1, id="dummy-batch-on-rank-1"),  # a warm-up dummy batch of one token
    pytest.param([2, 3], 1, id="seed-example"),  # the seed's own numbers
    pytest.param([0, 4], 0, id="zero-tokens"),
]


@pytest.mark.parametrize("tokens_per_dp, me", SEED_CASES)
@pytest.mark.parametrize("layout", [Layout.LOCAL, Layout.GATHERED])
def test_seed_regression_each_layout_selects_this_ranks_labelled_rows(tokens_per_dp, me, layout):
    view = RankView(tokens_per_dp=tokens_per_dp, dp_rank=me)
    rows = _reference_router_rows(layout, view, 0)
    expected = [(me, i) for i in range(tokens_per_dp[me])]
    declared = plan_rows(layout, view, len(rows))
    assert _apply(declared, [rows], 0) == expected
    inferred = infer_layout(view, len(rows))
    assert _apply(inferred, [rows], 0) == expected
    # rank 1's local rows are 1 or 3 while the DP total is 3 or 5: only the declared/inferred
    # layout, never "assume gathered", can tell them apart
    if layout is Layout.LOCAL and sum(tokens_per_dp) != tokens_per_dp[me]:
        with pytest.raises(LayoutError, match="does not fit the declared layout"):
            plan_rows(Layout.GATHERED, view, len(rows))


def test_chunk_start_is_where_each_tp_chunk_begins():
    view = RankView(tokens_per_dp=[7, 2], dp_rank=0, tp_size=3, tp_rank=2)
    # ceil split: 7 -> chunks 3, 3, 1 starting at 0, 3, 6; 2 -> 1, 1, 0 starting at 0, 1, 2
    assert [view.chunk_start(0, t) for t in range(3)] == [0, 3, 6]
    assert [view.chunk_start(1, t) for t in range(3)] == [0, 1, 2]
    explicit = RankView(tokens_per_dp=[5], tp_size=2, chunks=((1, 4),))
    assert (explicit.chunk_start(0, 0), explicit.chunk_start(0, 1)) == (0, 1)


def test_zero_tokens_on_this_rank():
    view = RankView(tokens_per_dp=[4, 0, 3], dp_rank=1)
    assert infer_layout(view, 0).segments == ((0, 0),)
    assert infer_layout(view, 7).segments == ((4, 0),)


def test_mismatch_error_names_every_size():
    view = RankView(tokens_per_dp=[2, 3], dp_rank=1, tp_size=2, tp_rank=1)
    with pytest.raises(LayoutError) as e:
        infer_layout(view, 11)
    msg = str(e.value)
    assert "N=11 rows, which fits no layout" in msg
    for part in ("local: N = n_me = 3", "gathered: N = sum(n) = 5",
                 "gathered_padded: N = R * TP * S = 2 * 2 * S with S >= 2",
                 "tp_sharded: N = this TP rank's chunk = 1 (padded 2)",
                 "tokens_per_dp=[2, 3]", "tp_size=2, tp_rank=1"):
        assert part in msg, part
    with pytest.raises(LayoutError, match="does not fit the declared layout \\(gathered: N = sum"):
        plan_rows("gathered", view, 3)


def test_ambiguous_sizes_are_refused():
    # one token, TP=2: TP rank 1 holds nothing of it under sequence parallelism, but a router
    # that saw 1 row could also be the local layout: the rows differ, so inference refuses
    view = RankView(tokens_per_dp=[1], dp_rank=0, tp_size=2, tp_rank=1, shard_size=1)
    with pytest.raises(LayoutError, match="fits both local and .* declare the layout explicitly"):
        infer_layout(view, 1)
    assert plan_rows("tp_sharded", view, 1).segments == ((0, 0),)
    assert plan_rows("local", view, 1).segments == ((0, 1),)


@pytest.mark.parametrize("kwargs,text", [
    (dict(tokens_per_dp=[]), "one count >= 0 per DP rank"),
    (dict(tokens_per_dp=[1, -1]), "one count >= 0 per DP rank"),
    (dict(tokens_per_dp=[1, 2], dp_rank=2), "dp_rank: expected in [0, 2), got 2"),
    (dict(tokens_per_dp=[1], tp_size=2, tp_rank=2), "0 <= tp_rank < tp_size"),
    (dict(tokens_per_dp=[5], tp_size=2, shard_size=2), "shard_size: 2 is smaller than the largest chunk (3)"),
    (dict(tokens_per_dp=[5], tp_size=2, chunks=[[4, 2]]), "summing to tokens_per_dp=(5,)"),
])
def test_bad_views(kwargs, text):
    with pytest.raises(LayoutError) as e:
        RankView(**kwargs)
    assert text in str(e.value)
