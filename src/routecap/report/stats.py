"""What the report shows, gathered in one streamed pass over the traces.

Shape legend: T tokens, L MoE layers, K top-k, E experts, B position buckets, N requests.

Missing cells are never counted (a missing route is not a vote for expert 0), and the report says
how many there were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..analysis import TraceSummary
from ..trace import RoutingTrace

__all__ = ["POSITION_EDGES", "Limits", "ReportStats", "collect_stats"]

#: Absolute-position buckets for "early vs late tokens": [0, 16), [16, 64), ... [65536, inf).
POSITION_EDGES = (0, 16, 64, 256, 1024, 4096, 16384, 65536)
_ROWS_PER_CHUNK = 4096


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How much of a large capture goes into the page (the page says what was left out)."""

    request_view_requests: int = 24  # requests offered in the request view
    request_view_ids: int = 250_000  # expert ids (tokens x L x K) in the request view in all
    request_view_tokens: int = 512  # tokens per request in the request view
    scatter_requests: int = 4000  # points in the per-request scatter
    coactivation_cells: int = 100_000  # E x E cells of co-activation matrices in all
    coactivation_layers: int = 6


@dataclass(frozen=True, kw_only=True)
class ReportStats:
    """Everything the report plots, for one capture."""

    summary: TraceSummary
    counts_prompt_LE: np.ndarray
    counts_gen_LE: np.ndarray
    counts_BLE: np.ndarray  # by absolute-position bucket (POSITION_EDGES), prompt and generated
    tokens_B: np.ndarray  # routed (token, layer) cells per bucket / L, i.e. tokens
    request_ids: list[str]
    request_tokens_N: np.ndarray
    request_prompt_N: np.ndarray  # prompt tokens among the request's rows
    request_imbalance_N: np.ndarray  # mean over layers of the request's max/mean expert count
    coact_layers: tuple[int, ...]  # indices into moe_layers
    coact_pairs_CEE: np.ndarray  # tokens that chose both experts i and j (symmetric, diagonal 0)
    coact_counts_CE: np.ndarray  # tokens that chose expert i, for the co-activation layers
    coact_tokens_C: np.ndarray  # routed tokens of each co-activation layer
    samples: list[RoutingTrace]  # request view (maybe truncated, see samples_truncated)
    samples_truncated: bool
    limits: Limits
    notes: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.summary.num_experts

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.summary.moe_layers

    @property
    def bucket_labels(self) -> list[str]:
        edges = list(POSITION_EDGES) + [None]
        return [f"{a}-{b - 1}" if b is not None else f"{a}+" for a, b in zip(edges, edges[1:])]


def _coact_layers(L: int, E: int, limits: Limits) -> tuple[int, ...]:
    """All layers if their E x E matrices fit the budget, else evenly spaced ones (first, last)."""
    n = max(1, min(L, limits.coactivation_layers, limits.coactivation_cells // max(1, E * E)))
    if n >= L:
        return tuple(range(L))
    return tuple(sorted({int(round(x)) for x in np.linspace(0, L - 1, n)}))


class _Collector:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.shape: tuple[int, int, int] | None = None  # L, K, E
        self.meta: tuple[str, int, tuple[int, ...], int] | None = None  # model, E, layers, K
        self.num_tokens = 0
        self.num_missing = 0
        self.req_ids: list[str] = []
        self.req_tokens: list[int] = []
        self.req_prompt: list[int] = []
        self.req_imb: list[float] = []
        self.samples: list[RoutingTrace] = []
        self.sample_ids = 0
        self.truncated = False

    def _init(self, t: RoutingTrace) -> None:
        L, K, E = t.num_layers, t.top_k, t.num_experts
        self.shape = (L, K, E)
        nb = len(POSITION_EDGES)
        self.counts_GLE = np.zeros((2 * nb, L, E), np.int64)  # group = 2 * bucket + generated
        self.tokens_G = np.zeros(2 * nb, np.int64)
        self.coact = _coact_layers(L, E, self.limits)
        self.pairs_CEE = np.zeros((len(self.coact), E, E), np.int64)
        self.coact_tokens_C = np.zeros(len(self.coact), np.int64)
        iu = np.triu_indices(K, 1)
        self.pair_a, self.pair_b = iu

    def add(self, t: RoutingTrace) -> None:
        meta = (t.model, t.num_experts, t.moe_layers, t.top_k)
        if self.meta is None:
            self.meta = meta
            self._init(t)
        elif meta[1:] != self.meta[1:]:
            # NOTE: the same check and words as analysis.LoadCounter (counts are kept here by
            # position group, so the totals come from them rather than from a second pass)
            raise ValueError(f"summary: request {t.request_id!r} has (E, moe_layers, K) = "
                             f"{meta[1:]}, expected {self.meta[1:]}")
        self.num_tokens += t.num_tokens
        self.num_missing += t.num_missing
        L, K, E = self.shape
        G = self.counts_GLE.shape[0]
        req_counts_LE = np.zeros((L, E), np.int64)
        for a in range(0, t.num_tokens, _ROWS_PER_CHUNK):
            b = min(t.num_tokens, a + _ROWS_PER_CHUNK)
            ids_TLK = t.expert_ids[a:b]
            valid_TL = None if t.missing is None else ~t.missing[a:b]
            pos_T = t.start + np.arange(a, b)
            group_T = 2 * (np.searchsorted(POSITION_EDGES, pos_T, side="right") - 1) + (
                pos_T >= t.prompt_len)
            # NOTE: int32 flat indices (G*L*E is far below 2**31) halve the memory traffic
            base_TL = ((group_T[:, None] * L + np.arange(L)[None, :]) * E).astype(np.int32)
            flat_TLK = base_TL[:, :, None] + ids_TLK
            flat = flat_TLK.ravel() if valid_TL is None else flat_TLK[valid_TL].ravel()
            c = np.bincount(flat, minlength=G * L * E).reshape(G, L, E)
            self.counts_GLE += c
            req_counts_LE += c.sum(axis=0)
            self.tokens_G += np.bincount(group_T, minlength=G)
            self._coactivation(ids_TLK, valid_TL, E)
        mean_L = req_counts_LE.sum(axis=1) / E
        with np.errstate(invalid="ignore", divide="ignore"):
            imb_L = np.where(mean_L > 0, req_counts_LE.max(axis=1) / np.where(mean_L > 0, mean_L, 1),
                             np.nan)
        self.req_ids.append(t.request_id)
        self.req_tokens.append(t.num_tokens)
        self.req_prompt.append(int(np.clip(t.prompt_len - t.start, 0, t.num_tokens)))
        self.req_imb.append(float(np.nanmean(imb_L)) if np.isfinite(imb_L).any() else float("nan"))
        self._sample(t)

    def _coactivation(self, ids_TLK: np.ndarray, valid_TL: np.ndarray | None, E: int) -> None:
        for c, layer in enumerate(self.coact):
            ids_TK = ids_TLK[:, layer, :].astype(np.int32)
            if valid_TL is not None:
                ids_TK = ids_TK[valid_TL[:, layer]]
            self.coact_tokens_C[c] += ids_TK.shape[0]
            if ids_TK.shape[1] < 2 or ids_TK.shape[0] == 0:
                continue
            i, j = ids_TK[:, self.pair_a].ravel(), ids_TK[:, self.pair_b].ravel()
            self.pairs_CEE[c] += np.bincount(np.minimum(i, j) * E + np.maximum(i, j),
                                             minlength=E * E).reshape(E, E)

    def _sample(self, t: RoutingTrace) -> None:
        lim = self.limits
        if len(self.samples) >= lim.request_view_requests or t.num_tokens == 0:
            self.truncated |= len(self.samples) >= lim.request_view_requests
            return
        per_token = t.num_layers * t.top_k
        room = (lim.request_view_ids - self.sample_ids) // per_token
        n = min(t.num_tokens, lim.request_view_tokens, room)
        if n <= 0:
            self.truncated = True
            return
        if n < t.num_tokens:
            self.truncated = True
        s = t.slice(t.start, t.start + n)
        self.samples.append(s)
        self.sample_ids += n * per_token

    def finish(self) -> ReportStats:
        L, K, E = self.shape
        model, _, layers, _ = self.meta
        summary = TraceSummary(model=model, num_requests=len(self.req_ids),
                               num_tokens=self.num_tokens, num_missing=self.num_missing,
                               num_experts=E, top_k=K, moe_layers=layers,
                               counts_LE=self.counts_GLE.sum(axis=0))
        nb = len(POSITION_EDGES)
        pairs = self.pairs_CEE + self.pairs_CEE.transpose(0, 2, 1)
        idx = np.arange(E)
        pairs[:, idx, idx] = 0  # a token never picks an expert twice; keep the diagonal empty
        counts_BLE = self.counts_GLE.reshape(nb, 2, L, E).sum(axis=1)
        tokens_B = self.tokens_G.reshape(nb, 2).sum(axis=1)
        notes = []
        n_req = len(self.req_ids)
        if n_req > self.limits.scatter_requests:
            notes.append(f"per-request plot: {self.limits.scatter_requests:,} of {n_req:,} requests "
                         "(evenly spaced)")
        if len(self.coact) < L:
            notes.append(f"co-activation: {len(self.coact)} of {L} layers (evenly spaced), to keep "
                         "the page small")
        if self.truncated:
            notes.append(f"request view: the first {len(self.samples)} requests, at most "
                         f"{self.limits.request_view_tokens} tokens each and "
                         f"{self.limits.request_view_ids:,} expert ids in all")
        return ReportStats(
            summary=summary,
            counts_prompt_LE=self.counts_GLE[0::2].sum(axis=0),
            counts_gen_LE=self.counts_GLE[1::2].sum(axis=0),
            counts_BLE=counts_BLE, tokens_B=tokens_B,
            request_ids=self.req_ids, request_tokens_N=np.array(self.req_tokens, np.int64),
            request_prompt_N=np.array(self.req_prompt, np.int64),
            request_imbalance_N=np.array(self.req_imb, np.float64),
            coact_layers=self.coact, coact_pairs_CEE=pairs,
            coact_counts_CE=summary.counts_LE[list(self.coact)],
            coact_tokens_C=self.coact_tokens_C,
            samples=self.samples, samples_truncated=self.truncated, limits=self.limits,
            notes=notes)


def collect_stats(traces: Iterable[RoutingTrace], *, limits: Limits | None = None,
                  advance: Callable[[int], None] | None = None) -> ReportStats:
    """One pass over ``traces``; ``advance(1)`` is called after each trace (progress bars)."""
    c = _Collector(limits or Limits())
    for t in traces:
        c.add(t)
        if advance is not None:
            advance(1)
    if c.shape is None:
        raise ValueError("report: no traces to report on")
    return c.finish()
