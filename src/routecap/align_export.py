"""Routes in the layouts other RL stacks consume, and back.

Shape legend: B sequences, S columns, T tokens, N token rows one rank's router sees, L MoE layers,
A all decoder layers, K top-k.

Three layouts (the versions matched are listed in docs/align.md):

* **Megatron-core RouterReplay** (``megatron/core/transformer/moe/router_replay.py``):
  ``RouterReplay.set_replay_data(list_of_L_tensors)``, one ``[N, K]`` int64 tensor per MoE layer in
  model order, N the token rows that rank's router sees: the valid tokens of every sequence
  packed (THD), each sequence padded to a multiple of ``tp * cp * 2`` under context parallelism
  (``tp`` without), zigzag-split over CP ranks per sequence, then split contiguously over TP ranks
  under sequence parallelism (verl's ``preprocess_packed_seqs`` + ``scatter_to_sequence_parallel_
  region``). Upstream RouterReplay gathers scores at every index, so it has no missing marker:
  :func:`to_megatron` asks for an explicit ``fill`` expert when cells are missing and returns the
  per-token ``replay_mask`` (verl's patched RouterReplay takes one and keeps those tokens native).
* **verl** ``routed_experts``: ``[B, S, A, K]`` (R3, vLLM-captured: every decoder layer, dense
  ones zero) or ``[B, S, L, K]`` (R2), int16, aligned to ``input_ids`` columns; rows with no
  route (padding, the final token) are zero placeholders that a replay mask must exclude.
* **slime / Miles** ``sample.rollout_routed_experts``: per sample int32 ``[len(tokens) - 1, A, K]``
  (SGLang's ``meta_info["routed_experts"]`` decoded); fallback rows are all ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .align import MISSING, AlignError, _batch_mask, _numpy, _row_span, trace_from_cells
from .align_parallel import CP_MODES, cp_slice, cp_unslice, pad_to_multiple, sp_slice, sp_unslice
from .trace import RoutingTrace

__all__ = [
    "MegatronReplayData",
    "from_megatron",
    "from_slime",
    "from_verl",
    "megatron_align_size",
    "to_megatron",
    "to_slime",
    "to_verl",
]


# ---- Megatron-core ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MegatronReplayData:
    """What one (CP rank, TP rank) hands Megatron-core's RouterReplay for one micro-batch."""

    #: One ``[N, K]`` int64 tensor per MoE layer, model order: ``RouterReplay.set_replay_data(x)``.
    topk_indices_L: list[torch.Tensor]
    #: ``[N, L]`` bool: True where the cell holds a recorded route (False: padding, missing, or the
    #: final token; the index there is ``fill``).
    valid_NL: torch.Tensor
    #: ``[B + 1]`` offsets of the padded packed sequences (before the CP split): Megatron's
    #: ``cu_seqlens_q_padded``.
    cu_seqlens_padded: np.ndarray

    @property
    def replay_mask_N(self) -> torch.Tensor:
        """``[N]`` bool: tokens with a recorded route at every layer (replay those; route the rest
        natively)."""
        return self.valid_NL.all(dim=1)


def megatron_align_size(tp_size: int, cp_size: int) -> int:
    """The multiple every packed sequence is padded to: ``tp * cp * 2`` under CP, else ``tp``."""
    return tp_size * cp_size * 2 if cp_size > 1 else tp_size


def _pack_valid(routes_BSLK: np.ndarray, mask_BS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, lengths = [], []
    for b in range(routes_BSLK.shape[0]):
        c0, n = _row_span(mask_BS[b], b)
        rows.append(routes_BSLK[b, c0:c0 + n])
        lengths.append(n)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.concatenate(rows) if rows else routes_BSLK[:0, 0], cu


def to_megatron(routes_BSLK: Any, attention_mask_BS: Any = None, *, tp_size: int = 1,
                tp_rank: int = 0, cp_size: int = 1, cp_rank: int = 0, cp_mode: str = "zigzag",
                sequence_parallel: bool | None = None, fill: int | None = None
                ) -> MegatronReplayData:
    """Routes of a padded batch in the per-layer format Megatron-core's RouterReplay consumes on
    rank (``cp_rank``, ``tp_rank``).

    ``sequence_parallel`` defaults to ``tp_size > 1``. Cells with no route (padding rows added for
    alignment, the final token, missing cells) must get an explicit ``fill`` expert id, since
    upstream RouterReplay gathers router scores at every index; without one they raise. Use
    :attr:`MegatronReplayData.replay_mask_N` to keep them native where your RouterReplay takes a mask.

    Example (one sequence of 3 tokens, L = 1, K = 1, TP 2 with SP: padded to 4 rows, 2 per rank):
        >>> r = torch.tensor([[[[5]], [[6]], [[-1]]]])
        >>> d = to_megatron(r, tp_size=2, tp_rank=1, fill=0)
        >>> d.topk_indices_L[0].tolist(), d.replay_mask_N.tolist(), d.cu_seqlens_padded.tolist()
        ([[0], [0]], [False, False], [0, 4])
    """
    if sequence_parallel is None:
        sequence_parallel = tp_size > 1
    if cp_mode not in CP_MODES:
        raise AlignError(f"cp_mode: expected one of {CP_MODES}, got {cp_mode!r}")
    routes = _numpy(routes_BSLK).astype(np.int64, copy=False)
    mask = _batch_mask(routes, attention_mask_BS)
    packed, cu = _pack_valid(routes, mask)
    align = megatron_align_size(tp_size, cp_size)
    padded, cu_p = pad_to_multiple(packed, cu, align)
    local = cp_slice(padded, cp_size, cp_rank, mode=cp_mode, cu_seqlens=cu_p) if cp_size > 1 \
        else padded
    if sequence_parallel:
        local = sp_slice(local, tp_size, tp_rank)
    valid = local != MISSING  # [N, L, K]
    part = valid.any(-1) & ~valid.all(-1)
    if part.any():
        n, layer = (int(v) for v in np.argwhere(part)[0])
        raise AlignError(f"routes: row {n}, layer {layer} of this rank is partly -1; -1 marks a "
                         "whole (token, layer) cell")
    valid_NL = valid.all(-1)
    if not valid_NL.all():
        if fill is None:
            raise AlignError(
                f"{int((~valid_NL).sum())} of {valid_NL.size} (token, layer) cells on rank (cp "
                f"{cp_rank}, tp {tp_rank}) have no route (padding, the final token or missing) and "
                "Megatron-core's RouterReplay has no missing marker: pass fill=<expert id> (those "
                "tokens then load that expert unless your RouterReplay honours replay_mask_N)")
        local = np.where(valid, local, int(fill))
    t = torch.from_numpy(np.ascontiguousarray(local))
    return MegatronReplayData(topk_indices_L=[t[:, i].contiguous() for i in range(t.shape[1])],
                              valid_NL=torch.from_numpy(valid_NL), cu_seqlens_padded=cu_p)


def from_megatron(parts: Sequence[Sequence[MegatronReplayData]], attention_mask_BS: Any, *,
                  cp_mode: str = "zigzag", sequence_parallel: bool | None = None) -> torch.Tensor:
    """The inverse of :func:`to_megatron`: ``[B, S, L, K]`` routes from every rank's data,
    ``parts[cp_rank][tp_rank]``; cells that were not valid come back ``-1``."""
    cp_size, tp_size = len(parts), len(parts[0])
    if any(len(p) != tp_size for p in parts):
        raise AlignError(f"parts: expected [cp][tp] with {tp_size} TP ranks each, got "
                         f"{[len(p) for p in parts]}")
    if sequence_parallel is None:
        sequence_parallel = tp_size > 1
    cu_p = parts[0][0].cu_seqlens_padded

    def local(d: MegatronReplayData) -> np.ndarray:
        x = torch.stack(d.topk_indices_L, dim=1).numpy().astype(np.int64)
        return np.where(d.valid_NL.numpy()[:, :, None], x, MISSING)

    cp_parts = [sp_unslice([local(d) for d in row]) if sequence_parallel else local(row[0])
                for row in parts]
    padded = cp_unslice(cp_parts, mode=cp_mode, cu_seqlens=cu_p) if cp_size > 1 else cp_parts[0]
    mask = _numpy(attention_mask_BS) != 0
    B, S = mask.shape
    out = np.full((B, S, *padded.shape[1:]), MISSING, np.int64)
    for b in range(B):
        c0, n = _row_span(mask[b], b)
        if int(cu_p[b + 1] - cu_p[b]) < n:
            raise AlignError(f"row {b} holds {n} tokens but packed sequence {b} has "
                             f"{int(cu_p[b + 1] - cu_p[b])} rows")
        out[b, c0:c0 + n] = padded[cu_p[b]:cu_p[b] + n]
    return torch.from_numpy(out)


# ---- verl -------------------------------------------------------------------------------------
def to_verl(routes_BSLK: Any, attention_mask_BS: Any = None, *, moe_layers: Sequence[int],
            num_layers: int | None = None, dtype: torch.dtype = torch.int16
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``routed_experts`` for a padded batch, and its replay mask.

    Returns ``(routed_experts [B, S, A, K], replay_mask [B, S])``: with ``num_layers`` (A, every
    decoder layer: verl's R3 layout) the MoE layers sit at their layer numbers and dense layers are
    zero; without it the layer dim is the L MoE layers (verl's R2 layout). Cells with no route are
    zero placeholders and their token is False in ``replay_mask`` (a token is replayed only when
    every MoE layer has its route).

    Example (one row of 2 tokens + 1 padding column, layers [1] of A = 2, K = 2):
        >>> r = torch.tensor([[[[3, 1]], [[-1, -1]], [[-1, -1]]]])
        >>> re, m = to_verl(r, torch.tensor([[1, 1, 0]]), moe_layers=[1], num_layers=2)
        >>> re[0, :, :, :].tolist(), m.tolist()
        ([[[0, 0], [3, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], [[True, False, False]])
    """
    routes = _numpy(routes_BSLK).astype(np.int64, copy=False)
    mask = _batch_mask(routes, attention_mask_BS)
    layers = _check_layers(moe_layers, routes.shape[2], num_layers)
    valid = (routes != MISSING).all(-1) & mask[:, :, None]  # [B, S, L]
    A = routes.shape[2] if num_layers is None else int(num_layers)
    out = np.zeros((*routes.shape[:2], A, routes.shape[3]), np.int64)
    out[:, :, layers] = np.where(valid[..., None], routes, 0)
    return torch.from_numpy(out).to(dtype), torch.from_numpy(valid.all(-1))


def from_verl(routed_experts: Any, attention_mask_BS: Any = None, *, moe_layers: Sequence[int],
              replay_mask_BS: Any = None) -> torch.Tensor:
    """``[B, S, L, K]`` routes from verl's ``routed_experts`` (``[B, S, A, K]`` or ``[B, S, L, K]``).

    Padding columns and tokens False in ``replay_mask_BS`` are ``-1``; without a replay mask an
    all-zero row with K > 1 (verl's placeholder; a router never picks expert 0 twice) is ``-1``.
    Dense layers (not in ``moe_layers``) must be zero: anything else means the layers given do not
    match, and raises naming the layer.
    """
    re = _numpy(routed_experts).astype(np.int64, copy=False)
    if re.ndim != 4:
        raise AlignError(f"routed_experts: expected [B, S, layers, K], got shape {tuple(re.shape)}")
    A = re.shape[2]
    layers = list(moe_layers)
    if A != len(layers):
        _check_layers(layers, len(layers), A)
        dense = [i for i in range(A) if i not in set(layers)]
        if dense and re[:, :, dense].any():
            i = next(d for d in dense if re[:, :, d].any())
            raise AlignError(f"routed_experts: layer {i} is not in moe_layers {layers} but holds "
                             "non-zero ids: the moe_layers given do not match this model")
        re = re[:, :, layers]
    mask = _batch_mask(re, attention_mask_BS)
    keep = np.broadcast_to(mask[:, :, None], re.shape[:3]).copy()
    if replay_mask_BS is not None:
        rm = _numpy(replay_mask_BS) != 0
        if rm.shape != mask.shape:
            raise AlignError(f"replay_mask: expected {mask.shape}, got {tuple(rm.shape)}")
        keep &= rm[:, :, None]
    elif re.shape[3] > 1:
        keep &= (re != 0).any(-1)
    return torch.from_numpy(np.where(keep[..., None], re, MISSING))


def _check_layers(moe_layers: Sequence[int], L: int, A: int | None) -> list[int]:
    layers = [int(x) for x in moe_layers]
    if len(layers) != L:
        raise AlignError(f"moe_layers: expected {L} layer numbers (the routes' L), got "
                         f"{len(layers)}: {layers}")
    if A is not None and (not layers or max(layers) >= A or min(layers) < 0):
        raise AlignError(f"moe_layers {layers} do not fit num_layers={A} decoder layers")
    return layers if A is not None else list(range(L))


# ---- slime / Miles --------------------------------------------------------------------------------
def to_slime(trace: RoutingTrace, *, num_layers: int) -> np.ndarray:
    """slime's / Miles' ``sample.rollout_routed_experts`` for a trace: int32 ``[T, A, K]`` over every
    decoder layer (dense layers zero), missing cells all ``-1``. The trace must start at position
    0 (slime keeps ``len(sample.tokens) - 1`` rows from the first token)."""
    if trace.start != 0:
        raise AlignError(f"to_slime: request {trace.request_id!r} starts at position {trace.start}; "
                         "slime's rows start at position 0 (concat_turns the earlier turns first)")
    layers = _check_layers(trace.moe_layers, trace.num_layers, num_layers)
    out = np.zeros((trace.num_tokens, num_layers, trace.top_k), np.int32)
    out[:, layers] = trace.to_numpy(fill=MISSING)
    return out


def from_slime(rollout_routed_experts: Any, *, moe_layers: Sequence[int], num_experts: int,
               request_id: str, prompt_len: int, token_ids: Any = None, model: str = ""
               ) -> RoutingTrace:
    """A trace from slime's / Miles' ``rollout_routed_experts`` (``[T, A, K]``): dense layers must
    be zero, all ``-1`` rows are missing."""
    a = _numpy(rollout_routed_experts)
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
        raise AlignError(f"rollout_routed_experts: expected an integer array [T, layers, K], got "
                         f"{a.dtype} {tuple(a.shape)}")
    layers = _check_layers(moe_layers, len(list(moe_layers)), a.shape[1])
    dense = [i for i in range(a.shape[1]) if i not in set(layers)]
    if dense and a[:, dense].any():
        i = next(d for d in dense if a[:, d].any())
        raise AlignError(f"rollout_routed_experts: layer {i} is not in moe_layers {layers} but "
                         "holds non-zero ids: the moe_layers given do not match this model")
    return trace_from_cells(a[:, layers].astype(np.int64), num_experts=num_experts,
                            moe_layers=layers, request_id=request_id, prompt_len=prompt_len,
                            token_ids=token_ids, model=model)
