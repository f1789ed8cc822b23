"""Data-parallel token dispatch for transformers MoE blocks, as vLLM does it, under torch.distributed.

Shape legend: R data-parallel (DP) ranks, TP tensor-parallel size, n_r tokens of DP rank r this
step, H hidden size, S padded shard size.

vLLM routes DP tokens in two ways, and a capturer must handle both (the seed bug was a capturer
that assumed one): the *naive* dispatch all-gathers every DP rank's hidden states before the
router, routes all of them and hands each rank its own rows back (``gathered``; with every rank
padded to the same size for CUDA graphs, ``gathered_padded``); the modular-kernel / all-to-all
path routes only the local tokens (``local``, which is what transformers' own expert parallelism
does). ``tp_sharded`` is sequence-parallel MoE: the TP ranks of a DP group share a batch, each
routes its chunk of it, and the outputs are all-gathered over TP.

:class:`MoEDispatch` implements the three non-local modes with forward hooks on every MoE block:
the pre-hook replaces the block's input by the rows the router should see, the post-hook gives the
rank its own rows of the output back. Every computation inside an MoE block is row-wise, so the
model's outputs are those of a plain data-parallel run (tests check this). The token counts of the
step are gathered once per forward (a host sync, as in vLLM's ``num_tokens_across_dp_cpu``).
All collectives go through :mod:`routecap.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed as rcdist
from ..layout import Layout, RankView, RowPlan, ceil_chunks, plan_rows

__all__ = ["MoEDispatch", "ParallelConfig"]


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How this process takes part in a parallel run.

    Args:
        layout: the rows the routers see (``local``, ``gathered``, ``gathered_padded``,
            ``tp_sharded``); routecap binds it explicitly, it never guesses.
        dp_group: the group of data-parallel peers (one rank per DP replica); None: the default
            group when ``tp_group`` is None.
        tp_group: the group of ranks that share this rank's batch (TP peers), or None.
        world_group: every rank (``gathered_padded`` with TP > 1 gathers over all of them).
        shard_size: ``gathered_padded``: the fixed padded size of each rank's shard (a CUDA-graph
            size); None pads to the largest shard of the step.
    """

    layout: Layout | str = Layout.LOCAL
    dp_group: Any = None
    tp_group: Any = None
    world_group: Any = None
    shard_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", Layout(self.layout))

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_group is None else rcdist.group_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return 0 if self.tp_group is None else rcdist.group_rank(self.tp_group)

    @property
    def dp_size(self) -> int:
        return rcdist.group_size(self.dp_group)

    @property
    def dp_rank(self) -> int:
        return rcdist.group_rank(self.dp_group)


def _select(rows: torch.Tensor, segments: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The rows of ``segments`` (``(start, length)`` slices), concatenated in order."""
    if len(segments) == 1:
        start, length = segments[0]
        return rows[start:start + length]
    return torch.cat([rows[start:start + length] for start, length in segments], dim=0)


class MoEDispatch:
    """Forward hooks on the MoE blocks that make the routers see the rows of ``config.layout``.

    ``begin_step(n_me)`` (called once per forward, before the decoder runs) gathers the token
    counts the layout needs and returns the step's :class:`RankView`; the step's
    :class:`~routecap.layout.RowPlan` (``plan_rows``) then says which of the routed rows are this
    rank's, so the rows handed back here are exactly the rows the capturer records. How rows are
    routed and handed back is chosen once, here, from the layout.

    ``gathered_padded`` with TP > 1 gathers the shards over ``world_group``, whose rank order need
    not be ``dp_rank * TP + tp_rank``: the constructor gathers every rank's (DP, TP) ranks once (a
    collective every rank takes part in) and reorders the shards when the world order differs.
    """

    def __init__(self, blocks: list[nn.Module], config: ParallelConfig,
                 device: torch.device) -> None:
        self.blocks = blocks
        self.config = config
        self.device = device
        self.view: RankView | None = None
        self.plan: RowPlan | None = None
        self._handles: list[Any] = []
        layout = config.layout
        self._tp, self._tp_rank = config.tp_size, config.tp_rank
        # only the gathered layouts need the DP peers' counts (one small collective per step)
        self._gathers_counts = layout in (Layout.GATHERED, Layout.GATHERED_PADDED)
        self._route, self._unroute = {
            Layout.LOCAL: (None, None),
            Layout.GATHERED: (self._route_gathered, self._unroute_segments),
            Layout.GATHERED_PADDED: (self._route_padded, self._unroute_segments),
            Layout.TP_SHARDED: (self._route_chunk, self._unroute_tp),
        }[layout]
        self._shard_group = config.dp_group if self._tp == 1 else config.world_group
        self._shard_order: torch.Tensor | None = None
        if layout is Layout.GATHERED_PADDED and self._tp > 1:
            self._shard_order = self._world_shard_order()

    def _world_shard_order(self) -> torch.Tensor | None:
        """World rank of shard (r, t) at index ``r * TP + t``; None when the world order is it."""
        c = self.config
        R, TP = c.dp_size, self._tp
        W = rcdist.group_size(self._shard_group)
        if W != R * TP:
            raise ValueError(f"ParallelConfig: gathered_padded with TP={TP} gathers over "
                             f"world_group, which has {W} ranks; expected DP * TP = {R} * {TP}")
        pairs = [tuple(p) for p in rcdist.all_gather_objects((c.dp_rank, self._tp_rank),
                                                             self._shard_group)]
        grid = [(r, t) for r in range(R) for t in range(TP)]
        if sorted(pairs) != grid:
            raise ValueError(
                f"ParallelConfig: the (dp_rank, tp_rank) of the world_group's ranks, in world "
                f"order, are {pairs}; expected each of the {R} x {TP} grid once (are dp_group and "
                "tp_group this rank's groups?)")
        order = [pairs.index(rt) for rt in grid]
        if order == list(range(W)):
            return None
        return torch.tensor(order, dtype=torch.long, device=self.device)

    # ---- per step -----------------------------------------------------------------------------
    def begin_step(self, n_me: int) -> RankView:
        c = self.config
        tp = self._tp
        if self._gathers_counts:
            counts = rcdist.all_gather_counts(n_me, c.dp_group, device=self.device)
            dp_rank = c.dp_rank
        else:  # only this rank's count matters: the DP peers' are not gathered (no sync)
            counts, dp_rank = [n_me], 0
        shard = c.shard_size
        if c.layout is Layout.GATHERED_PADDED and shard is None:
            shard = max(max(ceil_chunks(x, tp)) for x in counts)
        if c.layout is Layout.TP_SHARDED and shard is None:
            shard = max(ceil_chunks(n_me, tp))
        view = RankView(tokens_per_dp=tuple(counts), dp_rank=dp_rank, tp_size=tp,
                        tp_rank=self._tp_rank, shard_size=shard)
        routed = {Layout.LOCAL: n_me, Layout.GATHERED: sum(counts),
                  Layout.GATHERED_PADDED: len(counts) * tp * (shard or 0),
                  Layout.TP_SHARDED: shard or 0}[c.layout]
        self.view, self.plan = view, plan_rows(c.layout, view, routed)
        return view

    # ---- hooks --------------------------------------------------------------------------------
    def install(self) -> None:
        if self._route is None:  # local: the routers see this rank's rows as they are
            return
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        view = self.view
        if view is None:
            raise RuntimeError("MoEDispatch: an MoE block ran outside a step (no token counts)")
        x = args[0] if args else kwargs.pop("hidden_states")
        H = x.shape[-1]
        rows = x.reshape(-1, H)
        if rows.shape[0] != view.my_tokens:
            raise RuntimeError(f"MoEDispatch: the block got {rows.shape[0]} rows, the step has "
                               f"{view.my_tokens}")
        block._routecap_shape = tuple(x.shape)  # restored by _post
        routed = self._route(rows, view)
        new_x = routed.reshape(1, routed.shape[0], H)
        return ((new_x, *args[1:]) if args else args), (kwargs if args else {**kwargs,
                                                                           "hidden_states": new_x})

    def _my_chunk(self, rows: torch.Tensor, view: RankView) -> torch.Tensor:
        """This TP rank's chunk of its DP rank's rows, zero-padded to the shard size."""
        start = view.chunk_start(view.dp_rank, view.tp_rank)
        mine = view.chunk(view.dp_rank, view.tp_rank)
        chunk = rows.new_zeros((view.shard_size, rows.shape[1]))
        chunk[:mine] = rows[start:start + mine]
        return chunk

    def _route_gathered(self, rows: torch.Tensor, view: RankView) -> torch.Tensor:
        return rcdist.all_gather_rows(rows, list(view.tokens_per_dp), self.config.dp_group)

    def _route_padded(self, rows: torch.Tensor, view: RankView) -> torch.Tensor:
        shards = rcdist.all_gather_equal(self._my_chunk(rows, view), self._shard_group)
        if self._shard_order is None:
            return shards
        S = view.shard_size
        # world order -> (dp_rank, tp_rank) order, the order the layout (and the plan) promise
        return shards.view(-1, S, shards.shape[-1])[self._shard_order].reshape(shards.shape)

    def _route_chunk(self, rows: torch.Tensor, view: RankView) -> torch.Tensor:
        return self._my_chunk(rows, view)

    def _post(self, block: nn.Module, args: Any, output: Any) -> Any:
        shape = block.__dict__.pop("_routecap_shape")
        n_rows = args[0].reshape(-1, args[0].shape[-1]).shape[0] if args else None

        def mine(t: torch.Tensor) -> torch.Tensor:
            return self._unroute(t.reshape(n_rows, -1))

        if isinstance(output, torch.Tensor):
            return mine(output).reshape(shape)
        if isinstance(output, tuple):
            out = [mine(output[0]).reshape(shape)]
            for o in output[1:]:  # e.g. GPT-OSS returns (hidden, router_scores [N, K])
                if isinstance(o, torch.Tensor) and o.dim() >= 1 and o.shape[0] == n_rows:
                    out.append(mine(o))
                else:
                    out.append(o)
            return tuple(out)
        raise TypeError(f"MoEDispatch: cannot split an MoE block output of type "
                        f"{type(output).__name__}")

    def _unroute_segments(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the routed output: the plan's segments."""
        return _select(rows, self.plan.segments)

    def _unroute_tp(self, rows: torch.Tensor) -> torch.Tensor:
        """tp_sharded: every TP rank's chunk of the output (padded), each trimmed, concatenated."""
        plan = self.plan
        S = plan.gather_rows
        full = rcdist.all_gather_equal(rows[:S].contiguous(), self.config.tp_group)
        return _select(full, tuple((t * S, n) for t, n in enumerate(plan.tp_chunks)))
