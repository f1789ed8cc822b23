"""Which rows of the router's ``topk_ids`` belong to this rank, in every parallel layout.

Pure functions, no torch. Shape legend: R data-parallel (DP) ranks, TP tensor-parallel size,
n_r tokens of DP rank r this step, N rows the router saw on this rank.

Layouts (what one rank's router sees):

=================  ==========================================  ========================================
layout             rows the router sees                        this rank's rows
=================  ==========================================  ========================================
``local``          ``n_me`` (modular-kernel / all-to-all)       all of them
``gathered``       ``sum_r n_r`` in DP-rank order (naive        ``[sum(n_<me), sum(n_<me) + n_me)``
                   all-gather dispatch)
``gathered_padded`` ``R * TP`` shards of a fixed size S, shard   for each TP rank t, the first
                   ``(r, t)`` at rows ``[(r*TP + t) * S, ...)``  ``chunk(me, t)`` rows of shard (me, t)
                   (CUDA-graph or sequence-parallel padding)
``tp_sharded``     ``c = ceil(n_me / TP)`` (sequence-parallel   its own chunk; the rank's whole batch
                   MoE: TP rank t holds chunk t of the batch)  needs an all-gather over TP, then each
                                                               chunk trimmed to ``chunk(me, t)`` rows
=================  ==========================================  ========================================

``chunk(r, t)`` is how many of DP rank r's tokens TP rank t holds: by default the ceil split
(``c = ceil(n_r / TP)``; chunk t is ``clip(n_r - t * c, 0, c)``), or given explicitly.

Under TP without sequence parallelism every TP rank of a DP group sees the same rows; all of them
select, exactly one (TP rank 0) publishes. Ranks with zero tokens and dummy batches are ordinary:
a rank whose tokens belong to no request still selects its rows, the binding maps them nowhere.

When the binding does not know the layout, :func:`infer_layout` tries them in the fixed order
``local, gathered, gathered_padded, tp_sharded``; if several fit and would select different
rows it refuses (ambiguous), and if none fits it raises :class:`LayoutError` naming every size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Layout",
    "LayoutError",
    "RankView",
    "RowPlan",
    "infer_layout",
    "plan_rows",
]


class Layout(str, enum.Enum):
    LOCAL = "local"
    GATHERED = "gathered"
    GATHERED_PADDED = "gathered_padded"
    TP_SHARDED = "tp_sharded"


#: The order :func:`infer_layout` tries layouts in.
INFERENCE_ORDER = (Layout.LOCAL, Layout.GATHERED, Layout.GATHERED_PADDED, Layout.TP_SHARDED)


class LayoutError(ValueError):
    """The router's rows fit no layout (or several, ambiguously); the message names every size."""


def ceil_chunks(n: int, tp: int) -> tuple[int, ...]:
    """How many of ``n`` tokens each of ``tp`` ranks holds under the ceil split."""
    if tp == 1:
        return (n,)
    c = -(-n // tp)
    return tuple(max(0, min(c, n - t * c)) for t in range(tp))


@dataclass(frozen=True, kw_only=True)
class RankView:
    """What one rank knows about the step: token counts per DP rank, its ranks, shard sizes.

    Args:
        tokens_per_dp: n_r for every DP rank r (this step's tokens, dummy tokens included).
        dp_rank: this rank's DP rank.
        tp_size, tp_rank: the tensor-parallel group this rank belongs to.
        shard_size: S, the fixed size of each padded shard (``gathered_padded``; also the padded
            chunk size of ``tp_sharded``). None: the largest chunk.
        chunks: ``chunks[r][t]`` rows of DP rank r held by TP rank t; None: the ceil split.
    """

    tokens_per_dp: tuple[int, ...]
    dp_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    shard_size: int | None = None
    chunks: tuple[tuple[int, ...], ...] | None = None
    _chunks: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = tuple(int(x) for x in self.tokens_per_dp)
        object.__setattr__(self, "tokens_per_dp", n)
        R = len(n)
        if R < 1 or any(x < 0 for x in n):
            raise LayoutError(f"RankView.tokens_per_dp: expected one count >= 0 per DP rank, got {n}")
        if not 0 <= self.dp_rank < R:
            raise LayoutError(f"RankView.dp_rank: expected in [0, {R}), got {self.dp_rank}")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"RankView: expected 0 <= tp_rank < tp_size, got tp_rank="
                              f"{self.tp_rank}, tp_size={self.tp_size}")
        if self.chunks is None:
            chunks = tuple(ceil_chunks(x, self.tp_size) for x in n)
        else:
            chunks = tuple(tuple(int(c) for c in row) for row in self.chunks)
            if len(chunks) != R or any(len(row) != self.tp_size for row in chunks) or any(
                    sum(row) != x or min(row) < 0 for row, x in zip(chunks, n)):
                raise LayoutError(
                    f"RankView.chunks: expected {R} rows of {self.tp_size} non-negative chunk sizes "
                    f"summing to tokens_per_dp={n}, got {chunks}")
        object.__setattr__(self, "_chunks", chunks)
        biggest = max(max(row) for row in chunks)
        if self.shard_size is not None and self.shard_size < biggest:
            raise LayoutError(f"RankView.shard_size: {self.shard_size} is smaller than the largest "
                              f"chunk ({biggest}) of tokens_per_dp={n} over tp_size={self.tp_size}")

    @property
    def num_dp(self) -> int:
        return len(self.tokens_per_dp)

    @property
    def my_tokens(self) -> int:
        return self.tokens_per_dp[self.dp_rank]

    def chunk(self, r: int, t: int) -> int:
        """How many of DP rank r's tokens TP rank t holds."""
        return self._chunks[r][t]

    def chunk_start(self, r: int, t: int) -> int:
        """Where TP rank t's chunk starts among DP rank r's tokens (the chunks before it)."""
        return sum(self._chunks[r][:t])

    @property
    def max_chunk(self) -> int:
        return max(max(row) for row in self._chunks)

    def describe(self) -> str:
        return (f"dp_rank={self.dp_rank}, tokens_per_dp={list(self.tokens_per_dp)}, "
                f"tp_size={self.tp_size}, tp_rank={self.tp_rank}, shard_size={self.shard_size}")


@dataclass(frozen=True, kw_only=True)
class RowPlan:
    """How to take this rank's rows out of the router's N rows.

    ``segments``: ``(start, length)`` slices of the router's rows, concatenated in order, that this
    rank captures. For ``tp_sharded`` that is its own chunk, and ``tp_gather`` says the step must be
    all-gathered over TP (``gather_rows`` rows per TP rank, padded) and each TP rank's part trimmed
    to ``tp_chunks[t]``. ``num_tokens`` is what the rank ends up with (n_me).
    """

    layout: Layout
    num_rows: int
    segments: tuple[tuple[int, int], ...]
    num_tokens: int
    tp_gather: bool = False
    gather_rows: int = 0
    tp_chunks: tuple[int, ...] = ()
    publish: bool = True  # exactly one TP rank of a group publishes


def _shard_size(view: RankView, num_rows: int) -> int | None:
    """S for the padded layouts: the given one, or N / (R * TP) when that is a whole number."""
    if view.shard_size is not None:
        return view.shard_size
    shards = view.num_dp * view.tp_size
    if num_rows % shards == 0:
        return num_rows // shards
    return None


def _try(layout: Layout, view: RankView, num_rows: int) -> RowPlan | str:
    """The plan if ``num_rows`` fits ``layout``, else the size it expected (for the error)."""
    me, R, TP = view.dp_rank, view.num_dp, view.tp_size
    n_me = view.my_tokens
    publish = view.tp_rank == 0
    if layout is Layout.LOCAL:
        if num_rows != n_me:
            return f"local: N = n_me = {n_me}"
        return RowPlan(layout=layout, num_rows=num_rows, segments=((0, n_me),), num_tokens=n_me,
                       publish=publish)
    if layout is Layout.GATHERED:
        total = sum(view.tokens_per_dp)
        if num_rows != total:
            return f"gathered: N = sum(n) = {total}"
        off = sum(view.tokens_per_dp[:me])
        return RowPlan(layout=layout, num_rows=num_rows, segments=((off, n_me),), num_tokens=n_me,
                       publish=publish)
    if layout is Layout.GATHERED_PADDED:
        S = _shard_size(view, num_rows)
        if S is None or S < view.max_chunk or num_rows != R * TP * S:
            s_txt = view.shard_size if view.shard_size is not None else "S"
            return (f"gathered_padded: N = R * TP * S = {R} * {TP} * {s_txt} with S >= "
                    f"{view.max_chunk}")
        segs = tuple(((me * TP + t) * S, view.chunk(me, t)) for t in range(TP))
        return RowPlan(layout=layout, num_rows=num_rows, segments=segs, num_tokens=n_me,
                       publish=publish)
    if layout is Layout.TP_SHARDED:
        mine = view.chunk(me, view.tp_rank)
        padded = view.shard_size if view.shard_size is not None else max(
            view.chunk(me, t) for t in range(TP))
        if num_rows not in (mine, padded):
            return f"tp_sharded: N = this TP rank's chunk = {mine} (padded {padded})"
        chunks = tuple(view.chunk(me, t) for t in range(TP))
        return RowPlan(layout=layout, num_rows=num_rows, segments=((0, mine),), num_tokens=n_me,
                       tp_gather=TP > 1, gather_rows=padded, tp_chunks=chunks, publish=publish)
    raise LayoutError(f"unknown layout {layout!r}")  # pragma: no cover


def plan_rows(layout: Layout | str, view: RankView, num_rows: int) -> RowPlan:
    """This rank's rows under a declared ``layout``; :class:`LayoutError` if the sizes disagree."""
    layout = Layout(layout)
    got = _try(layout, view, num_rows)
    if isinstance(got, str):
        raise LayoutError(f"the router saw N={num_rows} rows, which does not fit the declared "
                          f"layout ({got}); this rank's view: {view.describe()}")
    return got


def _selection(plan: RowPlan) -> tuple:
    """What a plan selects, independent of how it is spelt (empty slices select nothing)."""
    segs = tuple(s for s in plan.segments if s[1] > 0)
    if plan.tp_gather:
        return (segs, plan.gather_rows, plan.tp_chunks)
    return (segs,)


def infer_layout(view: RankView, num_rows: int) -> RowPlan:
    """The layout the sizes imply, tried in :data:`INFERENCE_ORDER`.

    Raises :class:`LayoutError` if no layout fits, or if several fit with different rows.
    """
    fits: list[RowPlan] = []
    expected: list[str] = []
    for layout in INFERENCE_ORDER:
        got = _try(layout, view, num_rows)
        if isinstance(got, str):
            expected.append(got)
        else:
            fits.append(got)
    if not fits:
        raise LayoutError(f"the router saw N={num_rows} rows, which fits no layout; expected one "
                          f"of: {'; '.join(expected)}; this rank's view: {view.describe()}")
    first = fits[0]
    for other in fits[1:]:
        if _selection(other) != _selection(first):
            raise LayoutError(
                f"the router saw N={num_rows} rows, which fits both {first.layout.value} and "
                f"{other.layout.value} with different rows; declare the layout explicitly. This "
                f"rank's view: {view.describe()}")
    return first
