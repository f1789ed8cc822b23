"""Routes sliced the way context and sequence parallelism slice the tokens.

Shape legend: T tokens (of a packed batch), B sequences, S columns, L MoE layers, K top-k.

**Context parallelism (CP)** splits every sequence over ``cp_size`` ranks along the sequence:

* ``"contiguous"``: rank r holds chunk r of ``cp_size`` equal chunks;
* ``"zigzag"`` (the load-balanced split of ring attention, Megatron-core's
  ``get_batch_on_this_cp_rank`` and Transformer Engine's THD partitioning): the sequence is cut
  into ``2 * cp_size`` equal chunks and rank r holds chunks ``r`` and ``2 * cp_size - 1 - r``, in
  that order, so that under a causal mask every rank does the same attention work.

With packed sequences (``cu_seqlens``) each sequence is split on its own and a rank's pieces are
concatenated in sequence order (the THD layout). Every sequence must divide evenly: pad it first
with :func:`pad_to_multiple` (padding rows are ``-1``, never a real expert).

**Sequence parallelism (SP)** with tensor parallelism: the tokens a rank's MoE layer sees are
``1 / tp_size`` of the (CP-local) token rows, contiguous, rank order (Megatron-core's
``scatter_to_sequence_parallel_region`` on the first dimension).

Each slicing function has its inverse; ``unslice(slice(x)) == x`` for every rank count is a
property test (tests/test_align.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .align import MISSING, AlignError, _cu_seqlens

__all__ = [
    "CP_MODES",
    "cp_positions",
    "cp_slice",
    "cp_unslice",
    "pad_to_multiple",
    "sp_slice",
    "sp_unslice",
]

CP_MODES = ("contiguous", "zigzag")


def _check_world(name: str, size: int, rank: int | None = None) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise AlignError(f"{name}_size: expected a positive int, got {size!r}")
    if rank is not None and not 0 <= rank < size:
        raise AlignError(f"{name}_rank: expected an int in [0, {size}), got {rank!r}")


def cp_positions(seq_len: int, cp_size: int, cp_rank: int, *, mode: str = "zigzag") -> np.ndarray:
    """The positions of a ``seq_len``-token sequence that CP rank ``cp_rank`` holds, in its order.

    Example (8 tokens over 2 ranks):
        >>> cp_positions(8, 2, 0, mode="contiguous").tolist(), cp_positions(8, 2, 1).tolist()
        ([0, 1, 2, 3], [2, 3, 4, 5])
        >>> cp_positions(8, 2, 0).tolist()
        [0, 1, 6, 7]
    """
    _check_world("cp", cp_size, cp_rank)
    if mode not in CP_MODES:
        raise AlignError(f"mode: expected one of {CP_MODES}, got {mode!r}")
    if cp_size == 1:
        return np.arange(seq_len)  # one rank holds everything (Megatron does not split at CP 1)
    parts = 2 * cp_size if mode == "zigzag" else cp_size
    if seq_len % parts:
        raise AlignError(
            f"a sequence of {seq_len} tokens does not split into {parts} equal chunks ({mode} CP "
            f"over cp_size={cp_size} ranks); pad it to a multiple of {parts} first "
            "(pad_to_multiple)")
    c = seq_len // parts
    if mode == "contiguous":
        return np.arange(cp_rank * c, (cp_rank + 1) * c)
    hi = parts - 1 - cp_rank
    return np.concatenate([np.arange(cp_rank * c, (cp_rank + 1) * c), np.arange(hi * c, (hi + 1) * c)])


def _rank_index(lengths: Sequence[int], cp_size: int, cp_rank: int, mode: str) -> np.ndarray:
    """Packed row indices (into the full packed batch) of one CP rank, sequence by sequence."""
    out, start = [], 0
    for i, n in enumerate(lengths):
        try:
            out.append(start + cp_positions(int(n), cp_size, cp_rank, mode=mode))
        except AlignError as e:
            raise AlignError(f"sequence {i} (rows [{start}, {start + int(n)})): {e}") from None
        start += int(n)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _lengths(cu_seqlens: Any, total: int) -> list[int]:
    if cu_seqlens is None:
        return [total]
    cu = _cu_seqlens(cu_seqlens, None)
    if int(cu[-1]) != total:
        raise AlignError(f"cu_seqlens ends at {int(cu[-1])} but the routes hold {total} rows along "
                         "the sequence; pad them together (pad_to_multiple)")
    return np.diff(cu).tolist()


def _take(x: Any, index: np.ndarray, dim: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=x.device))
    return np.take(np.asarray(x), index, axis=dim)


def _seq_dim(x: Any) -> int:
    nd = x.dim() if isinstance(x, torch.Tensor) else np.ndim(x)
    if nd == 3:
        return 0
    if nd == 4:
        return 1
    raise AlignError(f"routes: expected packed [T, L, K] or batched [B, S, L, K], got {nd} dims")


def cp_slice(routes: Any, cp_size: int, cp_rank: int, *, mode: str = "zigzag",
             cu_seqlens: Any = None) -> Any:
    """The rows of ``routes`` that CP rank ``cp_rank`` holds (torch in, torch out).

    ``routes`` is packed ``[T, L, K]`` (with ``cu_seqlens``: each sequence split on its own; without:
    one sequence) or batched ``[B, S, L, K]`` (every row split along S). A sequence that does not
    divide into the chunks is an :class:`AlignError` naming its length, the chunk count and CP size.

    Example (two packed sequences of 4 rows each, zigzag over 2 ranks; row r holds id r):
        >>> r = np.arange(8).reshape(8, 1, 1)
        >>> cp_slice(r, 2, 0, cu_seqlens=[0, 4, 8]).ravel().tolist()
        [0, 3, 4, 7]
        >>> cp_slice(r, 2, 1, cu_seqlens=[0, 4, 8]).ravel().tolist()
        [1, 2, 5, 6]
    """
    dim = _seq_dim(routes)
    lengths = _lengths(cu_seqlens, int(routes.shape[dim]))
    return _take(routes, _rank_index(lengths, cp_size, cp_rank, mode), dim)


def cp_unslice(slices: Sequence[Any], *, mode: str = "zigzag", cu_seqlens: Any = None) -> Any:
    """The inverse of :func:`cp_slice`: the full routes from every rank's slice, rank order.

    ``cu_seqlens`` are those of the full (padded) packed batch.
    """
    cp_size = len(slices)
    _check_world("cp", cp_size)
    dim = _seq_dim(slices[0])
    local = [int(s.shape[dim]) for s in slices]
    if len(set(local)) != 1:
        raise AlignError(f"cp_unslice: every rank holds the same number of rows; got {local}")
    total = local[0] * cp_size
    lengths = _lengths(cu_seqlens, total)
    index = np.concatenate([_rank_index(lengths, cp_size, r, mode) for r in range(cp_size)])
    inverse = np.empty_like(index)
    inverse[index] = np.arange(index.size)
    if isinstance(slices[0], torch.Tensor):
        return _take(torch.cat(list(slices), dim), inverse, dim)
    return _take(np.concatenate([np.asarray(s) for s in slices], dim), inverse, dim)


def pad_to_multiple(routes_TLK: Any, cu_seqlens: Any, multiple: int) -> tuple[Any, np.ndarray]:
    """Pad every packed sequence with ``-1`` rows to a multiple of ``multiple`` rows.

    Returns ``(padded routes, cu_seqlens_padded)``. Megatron-core (and verl's packing for it) pad
    each sequence to a multiple of ``tp_size * cp_size * 2`` under CP (``tp_size`` without).

    Example:
        >>> r, cu = pad_to_multiple(np.array([[[1]], [[2]], [[3]]]), [0, 1, 3], 2)
        >>> r.ravel().tolist(), cu.tolist()
        ([1, -1, 2, 3], [0, 2, 4])
    """
    _check_world("multiple", multiple)
    x = routes_TLK
    T = int(x.shape[0])
    lengths = _lengths(cu_seqlens, T)
    padded = [n + (-n % multiple) for n in lengths]
    cu_p = np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)
    src = np.concatenate([[0], np.cumsum(lengths)])
    index = np.full(int(cu_p[-1]), -1, np.int64)
    for i, n in enumerate(lengths):
        index[cu_p[i]:cu_p[i] + n] = np.arange(src[i], src[i] + n)
    keep = index >= 0
    if isinstance(x, torch.Tensor):
        out = torch.full((int(cu_p[-1]), *x.shape[1:]), MISSING, dtype=x.dtype, device=x.device)
        out[torch.from_numpy(keep).to(x.device)] = x
    else:
        x = np.asarray(x)
        out = np.full((int(cu_p[-1]), *x.shape[1:]), MISSING, dtype=x.dtype)
        out[keep] = x
    return out, cu_p


def sp_slice(routes: Any, tp_size: int, tp_rank: int) -> Any:
    """The ``1 / tp_size`` contiguous share of the token rows (first dim) that SP rank ``tp_rank``'s
    MoE layer routes. The rows are token-major packed rows (THD); a ``[B, S, L, K]`` batch in
    Megatron's sequence-first (BSHD as ``[S, B]``) order is ``routes.transpose(0, 1).reshape(S * B,
    L, K)`` first.

    Example:
        >>> sp_slice(np.arange(6).reshape(6, 1, 1), 3, 1).ravel().tolist()
        [2, 3]
    """
    _check_world("tp", tp_size, tp_rank)
    n = int(routes.shape[0])
    if n % tp_size:
        raise AlignError(f"sequence parallelism: {n} token rows do not split over tp_size={tp_size} "
                         f"ranks; pad the sequences to a multiple of {tp_size} (pad_to_multiple)")
    c = n // tp_size
    return routes[tp_rank * c:(tp_rank + 1) * c]


def sp_unslice(slices: Sequence[Any]) -> Any:
    """The inverse of :func:`sp_slice`: the rows of every SP rank, rank order."""
    _check_world("tp", len(slices))
    sizes = [int(s.shape[0]) for s in slices]
    if len(set(sizes)) != 1:
        raise AlignError(f"sp_unslice: every rank holds the same number of rows; got {sizes}")
    if isinstance(slices[0], torch.Tensor):
        return torch.cat(list(slices))
    return np.concatenate([np.asarray(s) for s in slices])
