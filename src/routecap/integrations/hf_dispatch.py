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
from ..layout import Layout, RankView, ceil_chunks

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


class MoEDispatch:
    """Forward hooks on the MoE blocks that make the routers see the rows of ``config.layout``.

    ``begin_step(n_me)`` (called once per forward, before the decoder runs) gathers the token
    counts the layout needs and returns the step's :class:`RankView`.
    """

    def __init__(self, blocks: list[nn.Module], config: ParallelConfig,
                 device: torch.device) -> None:
        self.blocks = blocks
        self.config = config
        self.device = device
        self.view: RankView | None = None
        self._handles: list[Any] = []

    # ---- per step -----------------------------------------------------------------------------
    def begin_step(self, n_me: int) -> RankView:
        c = self.config
        tp, tp_rank = c.tp_size, c.tp_rank
        if c.layout is Layout.LOCAL or c.layout is Layout.TP_SHARDED:
            # only this rank's count matters: the DP peers' counts are not gathered (no sync)
            counts = [n_me]
            dp_rank = 0
        else:
            counts = rcdist.all_gather_counts(n_me, c.dp_group, device=self.device)
            dp_rank = c.dp_rank
        shard = c.shard_size
        if c.layout is Layout.GATHERED_PADDED and shard is None:
            shard = max(max(ceil_chunks(x, tp)) for x in counts)
        if c.layout is Layout.TP_SHARDED and shard is None:
            shard = max(ceil_chunks(n_me, tp))
        self.view = RankView(tokens_per_dp=tuple(counts), dp_rank=dp_rank, tp_size=tp,
                             tp_rank=tp_rank, shard_size=shard)
        return self.view

    # ---- hooks --------------------------------------------------------------------------------
    def install(self) -> None:
        if self.config.layout is Layout.LOCAL:
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
        c = self.config
        if c.layout is Layout.GATHERED:
            routed = rcdist.all_gather_rows(rows, list(view.tokens_per_dp), c.dp_group)
        elif c.layout is Layout.GATHERED_PADDED:
            routed = self._gather_padded(rows, view)
        else:  # TP_SHARDED: this TP rank routes its chunk, padded to the shard size
            start = sum(view.chunk(view.dp_rank, t) for t in range(view.tp_rank))
            mine = view.chunk(view.dp_rank, view.tp_rank)
            routed = rows.new_zeros((view.shard_size, H))
            routed[:mine] = rows[start:start + mine]
        new_x = routed.reshape(1, routed.shape[0], H)
        return ((new_x, *args[1:]) if args else args), (kwargs if args else {**kwargs,
                                                                           "hidden_states": new_x})

    def _gather_padded(self, rows: torch.Tensor, view: RankView) -> torch.Tensor:
        c = self.config
        S, TP = view.shard_size, view.tp_size
        start = sum(view.chunk(view.dp_rank, t) for t in range(view.tp_rank))
        mine = view.chunk(view.dp_rank, view.tp_rank)
        shard = rows.new_zeros((S, rows.shape[1]))
        shard[:mine] = rows[start:start + mine]
        group = c.dp_group if TP == 1 else c.world_group
        return rcdist.all_gather_equal(shard, group)

    def _post(self, block: nn.Module, args: Any, output: Any) -> Any:
        view = self.view
        shape = block.__dict__.pop("_routecap_shape")
        n_rows = args[0].reshape(-1, args[0].shape[-1]).shape[0] if args else None

        def mine(t: torch.Tensor) -> torch.Tensor:
            return self._own_rows(t.reshape(n_rows, -1), view)

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

    def _own_rows(self, rows: torch.Tensor, view: RankView) -> torch.Tensor:
        c = self.config
        me, TP = view.dp_rank, view.tp_size
        if c.layout is Layout.GATHERED:
            off = sum(view.tokens_per_dp[:me])
            return rows[off:off + view.my_tokens]
        if c.layout is Layout.GATHERED_PADDED:
            S = view.shard_size
            parts = [rows[(me * TP + t) * S:(me * TP + t) * S + view.chunk(me, t)]
                     for t in range(TP)]
            return torch.cat(parts, dim=0)
        # TP_SHARDED: gather every TP rank's chunk of the outputs, trim each, concatenate
        S = view.shard_size
        full = rcdist.all_gather_equal(rows[:S].contiguous(), c.tp_group)
        parts = [full[t * S:t * S + view.chunk(me, t)] for t in range(TP)]
        return torch.cat(parts, dim=0)
