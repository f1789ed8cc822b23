"""Every collective routecap calls lives here; the process group is always an argument.

Shape legend: W ranks in the group, N rows, H hidden size, L MoE layers, K top-k.

gloo (CPU, tests) and NCCL (GPU) both work: tensors are moved to the group's device by the caller.
Functions that return Python ints read a device tensor on the host; they say so in a NOTE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_counts",
    "all_gather_equal",
    "all_gather_objects",
    "all_gather_rows",
    "all_reduce_max",
    "barrier",
    "group_rank",
    "group_size",
]

Group = Any  # torch.distributed.ProcessGroup | None (the default group)


def group_rank(group: Group) -> int:
    return dist.get_rank(group)


def group_size(group: Group) -> int:
    return dist.get_world_size(group)


def _gather_into(out: torch.Tensor, x: torch.Tensor, group: Group) -> None:
    fn = getattr(dist, "all_gather_single", None)  # torch >= 2.13; older: all_gather_into_tensor
    if fn is None:
        fn = dist.all_gather_into_tensor
    fn(out, x, group=group)


def all_gather_equal(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate equal-shaped ``x`` ``[N, ...]`` from every rank, in rank order: ``[W * N, ...]``.

    CUDA-graph safe with NCCL (no host sync, static shapes).
    """
    W = group_size(group)
    out = torch.empty((W * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    if x.dtype == torch.bool:  # not every backend reduces or gathers bool
        view_out = out.view(torch.uint8)
        _gather_into(view_out, x.view(torch.uint8), group)
        return out
    _gather_into(out, x, group)
    return out


def all_gather_counts(n: int, group: Group, *, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. tokens this step), in rank order.

    NOTE: returns host ints, so on CUDA this waits for the collective (one small sync per call);
    bindings that already know the counts pass them instead.
    """
    t = torch.tensor([n], dtype=torch.int64, device=device)
    return [int(v) for v in all_gather_equal(t, group).tolist()]


def all_gather_rows(x_NH: torch.Tensor, counts: list[int], group: Group) -> torch.Tensor:
    """Concatenate each rank's ``counts[r]`` rows in rank order: ``[sum(counts), ...]``.

    Rows are padded to ``max(counts)`` for the collective and the padding dropped after.
    """
    W = group_size(group)
    if len(counts) != W:
        raise ValueError(f"all_gather_rows: expected {W} counts (one per rank), got {counts}")
    me = group_rank(group)
    if x_NH.shape[0] != counts[me]:
        raise ValueError(f"all_gather_rows: rank {me} has {x_NH.shape[0]} rows but counts say "
                         f"{counts[me]}")
    S = max(counts) if counts else 0
    padded = x_NH.new_zeros((S, *x_NH.shape[1:]))
    padded[: x_NH.shape[0]] = x_NH
    full = all_gather_equal(padded, group)
    return torch.cat([full[r * S: r * S + counts[r]] for r in range(W)], dim=0)


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Element-wise maximum over ranks, in place; returns ``x``."""
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_gather_objects(obj: Any, group: Group) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (host side; for results, not the hot path)."""
    out: list[Any] = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Group) -> None:
    dist.barrier(group=group)
