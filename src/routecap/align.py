"""The RL tensor contract: routes aligned to the token batches a trainer runs.

Shape legend: B sequences, S columns of a padded batch, T tokens (of one sequence, or of a packed
batch), L MoE layers, K experts per token (top-k), E experts.

A trainer's *routes* tensor has the shape of its ``input_ids`` plus ``[L, K]``: ``[B, S, L, K]``
for a padded batch, ``[T, L, K]`` (or ``[1, T, L, K]``) for packed sequences. A cell ``[.., l, :]``
holds the K logical expert ids of that token at the l-th MoE layer, or ``-1`` in all K entries
when the route is unknown: padding, a position the trace does not cover, a cell the trace marks
missing, or the last token of a sequence (see below). Replay lets the live router decide a ``-1``
cell and counts it (:mod:`routecap.replay`). A padding cell is never filled with a real expert id:
a 0 there would load expert 0.

**The last token.** An engine returns routes for the positions whose forward ran: prompt plus
completion minus the last sampled token, which was never fed back (``T = P + G - 1``). A trainer
feeds all ``P + G`` tokens. ``last_token`` says what that final column gets:

* ``"missing"`` (default): ``-1``, so the live router routes it and replay counts it. Its output
  predicts a token past the end of the sequence, so no log-prob of the sequence depends on it.
* ``"error"``: every token must have a route; a trace one row short raises (use it when the
  trainer feeds ``input_ids[:, :-1]``, or with traces re-captured over the full sequence).

Every function checks what it is given and raises :class:`AlignError` (a ``ValueError``) naming
both sides: the request, the row, the expected and the actual sizes, the first differing position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .trace import RoutingTrace

__all__ = [
    "LAST_TOKEN_POLICIES",
    "AlignError",
    "RouteSpec",
    "batch_routes",
    "concat_turns",
    "packed_routes",
    "route_spec",
    "trace_cells",
    "trace_from_cells",
    "unbatch_routes",
    "unpack_routes",
]

LAST_TOKEN_POLICIES = ("missing", "error")
MISSING = -1


class AlignError(ValueError):
    """Routes and the batch they are aligned to do not fit; the message names both sides."""


@dataclass(frozen=True, kw_only=True)
class RouteSpec:
    """What every trace of one batch must share: E, the MoE layers (so L) and K."""

    num_experts: int
    moe_layers: tuple[int, ...]
    top_k: int

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)


def route_spec(traces: Sequence[RoutingTrace | None]) -> RouteSpec:
    """The common (E, moe_layers, K) of ``traces`` (``None`` entries skipped).

    Raises :class:`AlignError` naming the first trace that differs from the first one.
    """
    spec: RouteSpec | None = None
    first = ""
    for i, t in enumerate(traces):
        if t is None:
            continue
        if not isinstance(t, RoutingTrace):
            raise AlignError(f"traces[{i}]: expected a RoutingTrace or None, got {type(t).__name__}")
        s = RouteSpec(num_experts=t.num_experts, moe_layers=t.moe_layers, top_k=t.top_k)
        if spec is None:
            spec, first = s, f"traces[{i}] (request {t.request_id!r})"
        elif s != spec:
            raise AlignError(
                f"traces[{i}] (request {t.request_id!r}) has E={s.num_experts}, moe_layers="
                f"{list(s.moe_layers)}, K={s.top_k}; {first} has E={spec.num_experts}, "
                f"moe_layers={list(spec.moe_layers)}, K={spec.top_k}: one batch needs one model")
    if spec is None:
        raise AlignError("no trace given (every entry is None): cannot tell L and K")
    return spec


def trace_cells(trace: RoutingTrace, start: int, end: int) -> np.ndarray:
    """``[end - start, L, K]`` int64 routes of absolute positions ``[start, end)``.

    Positions the trace does not cover and cells it marks missing are ``-1``.

    Example:
        >>> t = RoutingTrace.from_ids(np.array([[[3, 1]], [[0, 2]]]), num_experts=4,
        ...                           moe_layers=[1], request_id="r", prompt_len=2, start=1)
        >>> trace_cells(t, 0, 4)[:, 0].tolist()
        [[-1, -1], [3, 1], [0, 2], [-1, -1]]
    """
    out = np.full((max(0, end - start), trace.num_layers, trace.top_k), MISSING, np.int64)
    a, b = max(start, trace.start), min(end, trace.end)
    if a < b:
        out[a - start:b - start] = trace.to_numpy(fill=MISSING)[a - trace.start:b - trace.start]
    return out


def trace_from_cells(cells_TLK: Any, *, num_experts: int, moe_layers: Sequence[int],
                     request_id: str, prompt_len: int, start: int = 0,
                     token_ids: Any = None, **kwargs: Any) -> RoutingTrace:
    """A trace from ``[T, L, K]`` routes in which ``-1`` rows are missing (the inverse of
    :func:`trace_cells`). A row partly ``-1`` is an error naming its position."""
    cells = _numpy(cells_TLK).astype(np.int64, copy=False)
    if cells.ndim != 3:
        raise AlignError(f"request {request_id!r}: expected routes [T, L, K], got shape "
                         f"{tuple(cells.shape)}")
    neg = cells == MISSING
    _check_whole_rows(neg, f"request {request_id!r}", start)
    missing = neg.all(-1)
    tok = None if token_ids is None else _numpy(token_ids).astype(np.int32)
    return RoutingTrace.from_ids(np.where(neg, 0, cells), num_experts=num_experts,
                                 moe_layers=moe_layers, request_id=request_id,
                                 prompt_len=prompt_len, start=start,
                                 missing=missing if missing.any() else None, token_ids=tok,
                                 **kwargs)


# ---- padded batches -----------------------------------------------------------------------------
def batch_routes(traces: Sequence[RoutingTrace | None], input_ids_BS: Any,
                 attention_mask_BS: Any = None, *, last_token: str = "missing",
                 dtype: torch.dtype = torch.int64, device: Any = None) -> torch.Tensor:
    """The ``[B, S, L, K]`` routes of a padded batch, from one trace per row.

    Row b's tokens are the columns where ``attention_mask_BS[b]`` is 1 (one contiguous run: right
    padding, or left padding); the first of them is absolute position 0 of ``traces[b]``. Each
    trace covers positions ``[trace.start, trace.end)``: positions before ``start`` (a trace of
    the latest turn only) are ``-1``, as are padding columns and cells the trace marks missing.
    The row's last token gets what ``last_token`` says (module docstring). ``traces[b]`` may be
    ``None``: the whole row is ``-1``.

    Checks, each an :class:`AlignError` naming both sides: one trace per row; one (E, layers, K)
    for all; a trace longer than its row, or shorter than the row minus the last token; the
    trace's ``token_ids`` (when present) against the row's tokens, naming the first differing
    position.

    Example (L = 1, K = 2; row 0 right-padded, row 1 too; traces one row short of their rows):
        >>> a = RoutingTrace.from_ids(np.array([[[3, 1]], [[0, 2]], [[1, 2]]]), num_experts=4,
        ...     moe_layers=[1], request_id="a", prompt_len=2, token_ids=np.int32([5, 6, 7]))
        >>> b = RoutingTrace.from_ids(np.array([[[2, 3]]]), num_experts=4, moe_layers=[1],
        ...     request_id="b", prompt_len=1)
        >>> ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
        >>> mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
        >>> batch_routes([a, b], ids, mask)[:, :, 0].tolist()
        [[[3, 1], [0, 2], [1, 2], [-1, -1]], [[2, 3], [-1, -1], [-1, -1], [-1, -1]]]
    """
    if last_token not in LAST_TOKEN_POLICIES:
        raise AlignError(f"last_token: expected one of {LAST_TOKEN_POLICIES}, got {last_token!r}")
    ids = _numpy(input_ids_BS)
    if ids.ndim != 2:
        raise AlignError(f"input_ids: expected [B, S], got shape {tuple(ids.shape)}")
    B, S = ids.shape
    mask = np.ones((B, S), bool) if attention_mask_BS is None else _numpy(attention_mask_BS) != 0
    if mask.shape != (B, S):
        raise AlignError(f"attention_mask: expected the input_ids shape {(B, S)}, got "
                         f"{tuple(mask.shape)}")
    if len(traces) != B:
        raise AlignError(f"expected one trace per batch row: input_ids has B={B} rows, got "
                         f"{len(traces)} traces")
    spec = route_spec(traces)
    out = np.full((B, S, spec.num_layers, spec.top_k), MISSING, np.int64)
    for b, t in enumerate(traces):
        c0, n = _row_span(mask[b], b)
        if t is None:
            continue
        where = f"row {b} (request {t.request_id!r})"
        _check_coverage(t, n, where, last_token)
        _check_tokens(t, ids[b, c0:c0 + n], where)
        out[b, c0 + t.start:c0 + t.end] = t.to_numpy(fill=MISSING)
    res = torch.from_numpy(out).to(dtype)
    if device is None and isinstance(input_ids_BS, torch.Tensor):
        device = input_ids_BS.device
    return res if device is None else res.to(device)


def _batch_mask(routes: np.ndarray, attention_mask_BS: Any) -> np.ndarray:
    """The ``[B, S]`` bool mask of a routes batch ``[B, S, L, K]`` (all True when None)."""
    if routes.ndim != 4:
        raise AlignError(f"routes: expected [B, S, L, K], got shape {tuple(routes.shape)}")
    B, S = routes.shape[:2]
    mask = np.ones((B, S), bool) if attention_mask_BS is None else _numpy(attention_mask_BS) != 0
    if mask.shape != (B, S):
        raise AlignError(f"attention_mask: expected the routes' [B, S] = {(B, S)}, got "
                         f"{tuple(mask.shape)}")
    return mask


def unbatch_routes(routes_BSLK: Any, attention_mask_BS: Any = None) -> list[np.ndarray]:
    """The inverse of :func:`batch_routes`: row b's ``[n_b, L, K]`` int64 routes (its valid
    columns, in order; ``-1`` where missing)."""
    r = _numpy(routes_BSLK).astype(np.int64, copy=False)
    mask = _batch_mask(r, attention_mask_BS)
    rows = []
    for b in range(r.shape[0]):
        c0, n = _row_span(mask[b], b)
        rows.append(r[b, c0:c0 + n].copy())
    return rows


# ---- packed sequences ---------------------------------------------------------------------------
def packed_routes(traces: Sequence[RoutingTrace | None], cu_seqlens: Any, input_ids_T: Any = None,
                  *, total_tokens: int | None = None, last_token: str = "missing",
                  dtype: torch.dtype = torch.int64, device: Any = None) -> torch.Tensor:
    """The ``[T, L, K]`` routes of packed sequences: sequence i occupies rows
    ``[cu_seqlens[i], cu_seqlens[i + 1])`` and its first row is absolute position 0 of
    ``traces[i]``.

    ``input_ids_T`` (``[T]`` or ``[1, T]``), when given, is checked against each trace's
    ``token_ids``; its length sets ``total_tokens``. Rows past ``cu_seqlens[-1]`` (padding to a
    fixed packed length) are ``-1``. Everything else is as :func:`batch_routes`.

    Example (two sequences of 3 and 2 tokens packed into 6 rows; L = 1, K = 2):
        >>> a = RoutingTrace.from_ids(np.array([[[3, 1]], [[0, 2]]]), num_experts=4,
        ...                           moe_layers=[1], request_id="a", prompt_len=2)
        >>> b = RoutingTrace.from_ids(np.array([[[2, 3]]]), num_experts=4, moe_layers=[1],
        ...                           request_id="b", prompt_len=1)
        >>> packed_routes([a, b], [0, 3, 5], total_tokens=6)[:, 0].tolist()
        [[3, 1], [0, 2], [-1, -1], [2, 3], [-1, -1], [-1, -1]]
    """
    if last_token not in LAST_TOKEN_POLICIES:
        raise AlignError(f"last_token: expected one of {LAST_TOKEN_POLICIES}, got {last_token!r}")
    cu = _cu_seqlens(cu_seqlens, len(traces))
    ids = None
    if input_ids_T is not None:
        ids = _numpy(input_ids_T)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise AlignError(f"input_ids: expected packed [T] or [1, T], got shape {tuple(ids.shape)}")
        if total_tokens is not None and total_tokens != ids.shape[0]:
            raise AlignError(f"total_tokens={total_tokens} but input_ids holds {ids.shape[0]} tokens")
        total_tokens = int(ids.shape[0])
    T = int(cu[-1]) if total_tokens is None else int(total_tokens)
    if T < cu[-1]:
        raise AlignError(f"cu_seqlens ends at {int(cu[-1])} but the packed batch holds {T} tokens")
    spec = route_spec(traces)
    out = np.full((T, spec.num_layers, spec.top_k), MISSING, np.int64)
    for i, t in enumerate(traces):
        a, n = int(cu[i]), int(cu[i + 1] - cu[i])
        if t is None:
            continue
        where = f"sequence {i} (request {t.request_id!r}, rows [{a}, {a + n}))"
        _check_coverage(t, n, where, last_token)
        if ids is not None:
            _check_tokens(t, ids[a:a + n], where)
        out[a + t.start:a + t.end] = t.to_numpy(fill=MISSING)
    res = torch.from_numpy(out).to(dtype)
    if device is None and isinstance(input_ids_T, torch.Tensor):
        device = input_ids_T.device
    return res if device is None else res.to(device)


def unpack_routes(routes_TLK: Any, cu_seqlens: Any) -> list[np.ndarray]:
    """The inverse of :func:`packed_routes`: sequence i's ``[n_i, L, K]`` int64 routes."""
    r = _numpy(routes_TLK).astype(np.int64, copy=False)
    if r.ndim == 4 and r.shape[0] == 1:
        r = r[0]
    if r.ndim != 3:
        raise AlignError(f"routes: expected packed [T, L, K] or [1, T, L, K], got shape "
                         f"{tuple(r.shape)}")
    cu = _cu_seqlens(cu_seqlens, None)
    if cu[-1] > r.shape[0]:
        raise AlignError(f"cu_seqlens ends at {int(cu[-1])} but the routes hold {r.shape[0]} rows")
    return [r[int(a):int(b)].copy() for a, b in zip(cu[:-1], cu[1:])]


# ---- multi-turn ---------------------------------------------------------------------------------
def concat_turns(turns: Sequence[RoutingTrace], *, request_id: str | None = None) -> RoutingTrace:
    """One trace from the traces of consecutive turns of one conversation.

    Turn j covers absolute positions ``[turns[j].start, turns[j].end)``; each turn must start
    where the previous one ended (with KV-cache reuse, a later turn's prefill computes the last
    token of the previous turn, so a turn captured with ``start = previous end`` is exactly
    contiguous). A gap or an overlap is an :class:`AlignError` naming both turns' positions.
    The result keeps the first turn's ``start``, ``prompt_len`` and request id (unless
    ``request_id`` is given); ``token_ids`` are kept when every turn has them.

    Example (turn 0 covers positions [0, 2), turn 1 [2, 3)):
        >>> t0 = RoutingTrace.from_ids(np.array([[[3, 1]], [[0, 2]]]), num_experts=4,
        ...                            moe_layers=[1], request_id="c", prompt_len=2)
        >>> t1 = RoutingTrace.from_ids(np.array([[[2, 3]]]), num_experts=4, moe_layers=[1],
        ...                            request_id="c", prompt_len=5, start=2)
        >>> c = concat_turns([t0, t1])
        >>> (c.start, c.end), c.to_numpy()[:, 0].tolist()
        ((0, 3), [[3, 1], [0, 2], [2, 3]])
    """
    if not turns:
        raise AlignError("concat_turns: no turn given")
    spec = route_spec(turns)
    for j in range(1, len(turns)):
        prev, cur = turns[j - 1], turns[j]
        if cur.start != prev.end:
            kind = "gap" if cur.start > prev.end else "overlap"
            lo, hi = sorted((prev.end, cur.start))
            raise AlignError(
                f"concat_turns: {kind} at positions [{lo}, {hi}): turn {j - 1} (request "
                f"{prev.request_id!r}) covers [{prev.start}, {prev.end}), turn {j} (request "
                f"{cur.request_id!r}) covers [{cur.start}, {cur.end}); each turn must start where "
                "the previous one ended (a turn that re-ran the whole conversation covers it "
                "alone: use that trace)")
    first = turns[0]
    ids = np.concatenate([t.expert_ids for t in turns])
    miss = None
    if any(t.missing is not None for t in turns):
        miss = np.concatenate([np.zeros((t.num_tokens, t.num_layers), bool) if t.missing is None
                               else t.missing for t in turns])
    tok = None
    if all(t.token_ids is not None for t in turns):
        tok = np.concatenate([t.token_ids for t in turns])
    sorted_k = all(t.topk_order == "sorted" for t in turns)
    return RoutingTrace(expert_ids=ids, missing=miss, token_ids=tok,
                        num_experts=spec.num_experts, moe_layers=spec.moe_layers,
                        request_id=first.request_id if request_id is None else request_id,
                        prompt_len=first.prompt_len, start=first.start, model=first.model,
                        topk_order="sorted" if sorted_k else "router",
                        extra={"turns": [[t.start, t.end] for t in turns]})


# ---- shared checks ------------------------------------------------------------------------------
def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # NOTE: a device-to-host copy; alignment runs on the host, off the training hot path.
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _cu_seqlens(cu_seqlens: Any, n: int | None) -> np.ndarray:
    cu = _numpy(cu_seqlens).astype(np.int64).reshape(-1)
    if cu.size < 1 or cu[0] != 0 or (np.diff(cu) < 0).any():
        raise AlignError(f"cu_seqlens: expected non-decreasing offsets starting at 0, got "
                         f"{cu.tolist()[:16]}")
    if n is not None and cu.size != n + 1:
        raise AlignError(f"cu_seqlens: expected {n + 1} offsets for {n} traces, got {cu.size}")
    return cu


def _row_span(mask_S: np.ndarray, b: int) -> tuple[int, int]:
    """(first valid column, number of valid columns) of one mask row; holes are an error."""
    cols = np.flatnonzero(mask_S)
    if cols.size == 0:
        return 0, 0
    c0, n = int(cols[0]), int(cols.size)
    if int(cols[-1]) != c0 + n - 1:
        hole = int(cols[np.flatnonzero(np.diff(cols) != 1)[0]]) + 1
        raise AlignError(f"attention_mask row {b}: expected one contiguous run of 1s (left or "
                         f"right padding), got a 0 at column {hole} between 1s at columns {c0} "
                         f"and {int(cols[-1])}; pack such rows with cu_seqlens instead")
    return c0, n


def _check_coverage(t: RoutingTrace, n: int, where: str, last_token: str) -> None:
    if t.end > n:
        raise AlignError(f"{where}: the trace covers positions [{t.start}, {t.end}) but the row "
                         f"holds {n} tokens; trace and batch disagree on the sequence length")
    short = n - t.end
    if short > 1 or (short == 1 and last_token == "error"):
        what = "the last token" if short == 1 else f"the last {short} tokens"
        raise AlignError(
            f"{where}: the row holds {n} tokens but the trace ends at position {t.end}: no route "
            f"for {what} (an engine returns P + G - 1 rows; last_token={last_token!r} allows "
            f"{'no' if last_token == 'error' else 'one'} missing final row)")


def _check_tokens(t: RoutingTrace, row_tokens: np.ndarray, where: str) -> None:
    if t.token_ids is None:
        return
    seen = row_tokens[t.start:t.end].astype(np.int64)
    want = t.token_ids.astype(np.int64)
    diff = np.flatnonzero(seen != want)
    if diff.size:
        i = int(diff[0])
        raise AlignError(f"{where}: token at position {t.start + i} is {int(seen[i])} in the batch "
                         f"but {int(want[i])} in the trace: these routes belong to another "
                         "sequence")


def _check_whole_rows(neg_TLK: np.ndarray, where: str, start: int) -> None:
    part = neg_TLK.any(-1) & ~neg_TLK.all(-1)
    if part.any():
        t, layer = (int(v) for v in np.argwhere(part)[0])
        raise AlignError(f"{where}: cell [position {start + t}, layer {layer}] is partly -1; -1 "
                         "marks a whole (token, layer) cell missing, never some of its K slots")
