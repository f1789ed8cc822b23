"""Analysis of routing traces: expert load per layer and its imbalance; agreement of two captures
(:mod:`routecap.agreement`, re-exported here).

Shape legend: T tokens, L MoE layers, K top-k, E experts, N compared (token, layer) cells.

Missing cells are never counted: a missing route is not a vote for expert 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .agreement import Agreement, AgreementCounter, agreement
from .trace import RoutingTrace

__all__ = [
    "Agreement",
    "AgreementCounter",
    "LoadCounter",
    "TraceSummary",
    "agreement",
    "expert_counts",
    "summarize",
]


def expert_counts(trace: RoutingTrace) -> np.ndarray:
    """``counts_LE``: how many of the trace's tokens each layer sent to each expert."""
    T, L, K = trace.expert_ids.shape
    E = trace.num_experts
    flat_TLK = trace.expert_ids.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
    if trace.missing is not None:
        flat = flat_TLK[~trace.missing]  # [cells, K]
    else:
        flat = flat_TLK
    return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)


@dataclass(frozen=True, kw_only=True)
class TraceSummary:
    """Totals over a set of traces of one model."""

    model: str
    num_requests: int
    num_tokens: int
    num_missing: int  # (token, layer) cells
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    counts_LE: np.ndarray

    @property
    def imbalance_L(self) -> np.ndarray:
        """max / mean of expert counts per layer (1.0 is perfectly balanced; NaN with no tokens)."""
        mean = self.counts_LE.sum(axis=1) / self.num_experts
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean > 0, self.counts_LE.max(axis=1) / np.maximum(mean, 1e-300), np.nan)

    @property
    def idle_L(self) -> np.ndarray:
        """Experts that received no token, per layer."""
        return (self.counts_LE == 0).sum(axis=1)

    @property
    def busiest_L(self) -> np.ndarray:
        return self.counts_LE.argmax(axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_requests": self.num_requests,
            "num_tokens": self.num_tokens,
            "num_missing": self.num_missing,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": list(self.moe_layers),
            "layers": [
                {
                    "moe_layer": int(layer),
                    "imbalance": None if np.isnan(imb) else round(float(imb), 6),
                    "busiest_expert": int(busy),
                    "idle_experts": int(idle),
                    "counts": [int(c) for c in counts],
                }
                for layer, imb, busy, idle, counts in zip(
                    self.moe_layers, self.imbalance_L, self.busiest_L, self.idle_L, self.counts_LE)
            ],
        }


class LoadCounter:
    """Accumulates a :class:`TraceSummary` one trace at a time (constant memory, picklable)."""

    def __init__(self) -> None:
        self._meta: tuple[str, int, tuple[int, ...], int] | None = None  # model, E, layers, K
        self._counts: np.ndarray | None = None
        self.num_requests = 0
        self.num_tokens = 0
        self.num_missing = 0

    def _check(self, meta: tuple[str, int, tuple[int, ...], int], who: str) -> None:
        if self._meta is None:
            self._meta = meta
            self._counts = np.zeros((len(meta[2]), meta[1]), np.int64)
        elif meta[1:] != self._meta[1:]:
            raise ValueError(
                f"summary: {who} has (E, moe_layers, K) = {meta[1:]}, expected {self._meta[1:]}")

    def add(self, trace: RoutingTrace) -> None:
        self._check((trace.model, trace.num_experts, trace.moe_layers, trace.top_k),
                    f"request {trace.request_id!r}")
        self._counts += expert_counts(trace)
        self.num_requests += 1
        self.num_tokens += trace.num_tokens
        self.num_missing += trace.num_missing

    def merge(self, other: LoadCounter) -> None:
        """Add another counter's totals (e.g. another data-parallel rank's)."""
        if other._meta is None:
            return
        self._check(other._meta, "another counter")
        self._counts += other._counts
        self.num_requests += other.num_requests
        self.num_tokens += other.num_tokens
        self.num_missing += other.num_missing

    def summary(self) -> TraceSummary:
        if self._meta is None:
            raise ValueError("summary: no traces")
        model, E, layers, K = self._meta
        return TraceSummary(model=model, num_requests=self.num_requests,
                            num_tokens=self.num_tokens, num_missing=self.num_missing,
                            num_experts=E, top_k=K, moe_layers=layers,
                            counts_LE=self._counts.copy())


def summarize(traces: Iterable[RoutingTrace]) -> TraceSummary:
    """Expert load and imbalance over ``traces`` (streamed; any iterable)."""
    c = LoadCounter()
    for t in traces:
        c.add(t)
    return c.summary()
