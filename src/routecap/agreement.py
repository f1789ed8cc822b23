"""Agreement of two captures of the same tokens: the R3 paper's router-level measures, expert load
shift, and the k3 KL / extreme-ratio fraction of two log-prob sets.

Shape legend: T tokens, L MoE layers, K top-k, E experts.

Public through :mod:`routecap.analysis` (``from routecap.analysis import agreement``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .trace import RoutingTrace

__all__ = ["Agreement", "AgreementCounter", "agreement"]


@dataclass(frozen=True, kw_only=True)
class Agreement:
    """How far two captures of the same tokens (e.g. inference vs a training re-capture) agree.

    The router-level measures of the R3 paper ("Stabilizing MoE Reinforcement Learning by Aligning
    Training and Inference Routers", Ma et al., 2025), per MoE layer and overall, over the (token,
    layer) cells that both sides routed (cells missing on either side are skipped and counted),
    and, given two log-prob sets of the same tokens, the k3 estimate of their KL and the fraction
    of extreme probability ratios. ``a`` is the reference (the sampler: inference), ``b`` the
    other side (training).
    """

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_requests: int
    #: tokens with at least one compared cell
    num_tokens: int
    #: (token, layer) cells missing on one side only, not compared (missing on both: not counted)
    skipped_cells: int
    cells_L: np.ndarray          # compared cells per layer
    differ_L: np.ndarray         # cells whose expert SET differs
    top1_agree_L: np.ndarray     # cells whose first (highest-scored) expert is the same
    jaccard_sum_L: np.ndarray    # sum over cells of |A & B| / |A | B|
    counts_a_LE: np.ndarray      # expert load of a over the compared cells
    counts_b_LE: np.ndarray
    tokens_with_difference: int  # tokens with at least one differing layer
    differing_layers: int        # sum over tokens of their differing layers
    #: False when either side's K ids are sorted (topk_order="sorted"): top-1 is then unknown
    top1_known: bool = True
    num_logprobs: int = 0
    k3_kl: float | None = None
    extreme_ratio: float = 2.0
    extreme_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- per layer ----------------------------------------------------------------------------
    @staticmethod
    def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    @property
    def differ_fraction_L(self) -> np.ndarray:
        """Per layer: fraction of compared cells whose expert set differs."""
        return self._div(self.differ_L, self.cells_L)

    @property
    def top1_agreement_L(self) -> np.ndarray:
        return self._div(self.top1_agree_L, self.cells_L)

    @property
    def jaccard_L(self) -> np.ndarray:
        """Per layer: mean Jaccard similarity of the two expert sets (1.0 = identical)."""
        return self._div(self.jaccard_sum_L, self.cells_L)

    @property
    def load_shift_LE(self) -> np.ndarray:
        """Per layer and expert: b's share of the layer's assignments minus a's."""
        def share(c: np.ndarray) -> np.ndarray:
            tot = c.sum(axis=1, keepdims=True)
            return np.where(tot > 0, c / np.maximum(tot, 1), 0.0)
        return share(self.counts_b_LE) - share(self.counts_a_LE)

    @property
    def load_shift_L(self) -> np.ndarray:
        """Per layer: total variation distance between the two expert-load distributions."""
        return 0.5 * np.abs(self.load_shift_LE).sum(axis=1)

    # ---- overall ------------------------------------------------------------------------------
    @property
    def num_cells(self) -> int:
        return int(self.cells_L.sum())

    @property
    def differ_fraction(self) -> float:
        """Fraction of compared (token, layer) cells whose expert set differs."""
        return _ratio(self.differ_L.sum(), self.num_cells)

    @property
    def token_differ_fraction(self) -> float:
        """Fraction of tokens routed differently at one layer or more."""
        return _ratio(self.tokens_with_difference, self.num_tokens)

    @property
    def mean_differing_layers(self) -> float:
        """Mean number of layers per token whose expert set differs."""
        return _ratio(self.differing_layers, self.num_tokens)

    @property
    def top1_agreement(self) -> float:
        return _ratio(self.top1_agree_L.sum(), self.num_cells) if self.top1_known else math.nan

    @property
    def jaccard(self) -> float:
        return _ratio(self.jaccard_sum_L.sum(), self.num_cells)

    @property
    def extreme_fraction(self) -> float:
        """Fraction of tokens whose probability ratio (either way) exceeds ``extreme_ratio``."""
        return _ratio(self.extreme_tokens, self.num_logprobs)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (NaN written as null)."""
        def f(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 8)
        shift = self.load_shift_LE
        return {
            "num_requests": self.num_requests,
            "num_tokens": self.num_tokens,
            "num_cells": self.num_cells,
            "skipped_cells": self.skipped_cells,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": list(self.moe_layers),
            "differ_fraction": f(self.differ_fraction),
            "token_differ_fraction": f(self.token_differ_fraction),
            "mean_differing_layers": f(self.mean_differing_layers),
            "top1_agreement": f(self.top1_agreement),
            "jaccard": f(self.jaccard),
            "load_shift": f(float(self.load_shift_L.mean())) if len(self.moe_layers) else None,
            "logprobs": None if not self.num_logprobs else {
                "num_tokens": self.num_logprobs,
                "k3_kl": f(self.k3_kl),
                "extreme_ratio": self.extreme_ratio,
                "extreme_fraction": f(self.extreme_fraction),
            },
            "layers": [
                {
                    "moe_layer": int(layer),
                    "cells": int(self.cells_L[i]),
                    "differ_fraction": f(self.differ_fraction_L[i]),
                    "top1_agreement": f(self.top1_agreement_L[i]) if self.top1_known else None,
                    "jaccard": f(self.jaccard_L[i]),
                    "load_shift": f(self.load_shift_L[i]),
                    "load_shift_by_expert": [f(x) for x in shift[i]],
                }
                for i, layer in enumerate(self.moe_layers)
            ],
            "extra": self.extra,
        }

    def table(self, *, title: str = "routing agreement") -> Any:
        """A ``rich`` table: one row per MoE layer and an overall row."""
        from rich.table import Table

        def pct(x: float) -> str:
            return "-" if not math.isfinite(x) else f"{100 * x:.2f}%"

        t = Table(title=title)
        for col in ("layer", "cells", "set differs", "top-1 agrees", "Jaccard", "load shift (TV)"):
            t.add_column(col, justify="right")
        for i, layer in enumerate(self.moe_layers):
            t.add_row(str(layer), str(int(self.cells_L[i])), pct(self.differ_fraction_L[i]),
                      pct(self.top1_agreement_L[i]) if self.top1_known else "-",
                      f"{self.jaccard_L[i]:.4f}" if math.isfinite(self.jaccard_L[i]) else "-",
                      f"{self.load_shift_L[i]:.4f}")
        t.add_row("all", str(self.num_cells), pct(self.differ_fraction), pct(self.top1_agreement),
                  f"{self.jaccard:.4f}" if math.isfinite(self.jaccard) else "-",
                  f"{float(self.load_shift_L.mean()):.4f}", style="bold")
        cap = [f"{self.num_requests} requests, {self.num_tokens} tokens; tokens with a differing "
               f"layer {pct(self.token_differ_fraction)}, mean differing layers per token "
               f"{self.mean_differing_layers:.3f}; skipped cells (missing) {self.skipped_cells}"]
        if self.extra.get("diverged_requests"):
            cap.append(f"{self.extra['diverged_requests']} requests generated different tokens: "
                       f"{self.extra['uncompared_positions']} positions after the first difference "
                       "not compared")
        if self.num_logprobs:
            cap.append(f"log-probs of {self.num_logprobs} tokens: k3 KL {self.k3_kl:.3e}, ratio > "
                       f"{self.extreme_ratio:g} either way {pct(self.extreme_fraction)}")
        t.caption = "\n".join(cap)
        return t


def _ratio(num: Any, den: Any) -> float:
    return float(num) / float(den) if den else math.nan


def _cells_of(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64, copy=False)


class AgreementCounter:
    """Accumulates an :class:`Agreement` pair by pair (constant memory)."""

    def __init__(self) -> None:
        self._meta: tuple[int, tuple[int, ...], int] | None = None
        self._acc: dict[str, Any] = {}
        self.num_requests = 0
        self.top1_known = True
        #: requests whose token ids differ (``diverged="prefix"``) and positions left out
        self.diverged_requests = 0
        self.uncompared_positions = 0
        self._lp: list[float] = [0.0, 0.0, 0.0]  # tokens, k3 sum, extreme count

    def _start(self, E: int, layers: tuple[int, ...], K: int, who: str) -> None:
        meta = (E, tuple(layers), K)
        if self._meta is None:
            self._meta = meta
            L = len(layers)
            self._acc = {k: np.zeros(L, np.int64) for k in ("cells", "differ", "top1")}
            self._acc["jaccard"] = np.zeros(L, np.float64)
            self._acc["ca"] = np.zeros((L, E), np.int64)
            self._acc["cb"] = np.zeros((L, E), np.int64)
            self._acc.update(tokens=0, skipped=0, tokdiff=0, difflayers=0)
        elif meta != self._meta:
            raise ValueError(f"agreement: {who} has (E, moe_layers, K) = {meta}, expected "
                             f"{self._meta} (the first pair's)")

    def add_cells(self, a_TLK: Any, b_TLK: Any, *, num_experts: int,
                  moe_layers: Sequence[int] | None = None, who: str = "routes") -> None:
        """Compare two ``[..., L, K]`` route arrays of the same tokens (``-1`` = missing)."""
        a, b = _cells_of(a_TLK), _cells_of(b_TLK)
        if a.shape != b.shape or a.ndim < 2:
            raise ValueError(f"agreement: {who}: a has shape {tuple(a.shape)}, b has "
                             f"{tuple(b.shape)}; expected the same [..., L, K]")
        L, K = a.shape[-2:]
        layers = tuple(range(L)) if moe_layers is None else tuple(int(x) for x in moe_layers)
        self._start(int(num_experts), layers, K, who)
        a, b = a.reshape(-1, L, K), b.reshape(-1, L, K)
        for name, x in (("a", a), ("b", b)):
            bad = (x < -1) | (x >= num_experts) | ((x == -1).any(-1) & ~(x == -1).all(-1))[..., None]
            if bad.any():
                t, layer, k = (int(v) for v in np.argwhere(bad)[0])
                raise ValueError(f"agreement: {who}: side {name} holds {int(x[t, layer, k])} at "
                                 f"[token {t}, layer {layer}, slot {k}]; expected ids in "
                                 f"[0, {num_experts}) or a whole cell of -1")
        ok = (a >= 0).all(-1) & (b >= 0).all(-1)              # [T, L]
        acc = self._acc
        # NOTE: cells missing on both sides (padding, a final token) are no cells at all here
        acc["skipped"] += int((~ok & ~((a < 0).all(-1) & (b < 0).all(-1))).sum())
        inter = (a[:, :, :, None] == b[:, :, None, :]).any(-1).sum(-1)  # [T, L] |A & B|
        differ = (inter < K) & ok
        acc["cells"] += ok.sum(0)
        acc["differ"] += differ.sum(0)
        acc["top1"] += ((a[..., 0] == b[..., 0]) & ok).sum(0)
        acc["jaccard"] += np.where(ok, inter / (2 * K - inter), 0.0).sum(0)
        offs = (np.arange(L) * num_experts)[None, :, None]
        for key, x in (("ca", a), ("cb", b)):
            flat = (x + offs)[ok]
            acc[key] += np.bincount(flat.ravel(), minlength=L * num_experts).reshape(L, -1)
        tok = ok.any(1)
        acc["tokens"] += int(tok.sum())
        nd = differ.sum(1)
        acc["tokdiff"] += int((nd > 0).sum())
        acc["difflayers"] += int(nd.sum())

    def add(self, a: RoutingTrace, b: RoutingTrace, *, diverged: str = "error") -> None:
        """Compare two traces of one request over the positions both cover.

        Their token ids, when both have them, must be equal there: with ``diverged="error"`` a
        difference is a ValueError naming the position; with ``"prefix"`` (two generations that
        sampled differently) only the positions before the first difference are compared, and
        :attr:`diverged_requests` / :attr:`uncompared_positions` count what was left out."""
        who = f"request {a.request_id!r}"
        if a.request_id != b.request_id:
            who = f"requests {a.request_id!r} (a) and {b.request_id!r} (b)"
        if (a.num_experts, a.moe_layers, a.top_k) != (b.num_experts, b.moe_layers, b.top_k):
            raise ValueError(f"agreement: {who}: a has (E, moe_layers, K) = "
                             f"{(a.num_experts, a.moe_layers, a.top_k)}, b has "
                             f"{(b.num_experts, b.moe_layers, b.top_k)}")
        lo, hi = max(a.start, b.start), min(a.end, b.end)
        if a.token_ids is not None and b.token_ids is not None and lo < hi:
            ta = a.token_ids[lo - a.start:hi - a.start]
            tb = b.token_ids[lo - b.start:hi - b.start]
            diff = np.flatnonzero(ta != tb)
            if diff.size:
                p = lo + int(diff[0])
                if diverged != "prefix":
                    raise ValueError(f"agreement: {who}: token at position {p} is "
                                     f"{int(ta[diff[0]])} in a but {int(tb[diff[0]])} in b: not the "
                                     "same sequence")
                self.diverged_requests += 1
                self.uncompared_positions += hi - p
                hi = p
        if a.topk_order == "sorted" or b.topk_order == "sorted":
            self.top1_known = False
        if hi > lo:
            self.add_cells(a.to_numpy()[lo - a.start:hi - a.start],
                           b.to_numpy()[lo - b.start:hi - b.start], num_experts=a.num_experts,
                           moe_layers=a.moe_layers, who=who)
        else:
            self._start(a.num_experts, a.moe_layers, a.top_k, who)
        self.num_requests += 1

    def add_logprobs(self, logprobs_a: Any, logprobs_b: Any, *, extreme_ratio: float = 2.0,
                     mask: Any = None, who: str = "log-probs") -> None:
        """Add two log-prob sets of the same tokens (any equal shapes; ``mask`` selects tokens).

        k3 estimates KL(a || b) from samples of a: with ``r = p_b / p_a`` per token,
        ``k3 = r - 1 - log r`` (non-negative, unbiased). A token is extreme when
        ``max(r, 1/r) > extreme_ratio``.
        """
        la = np.asarray(_flat_logprobs(logprobs_a), np.float64)
        lb = np.asarray(_flat_logprobs(logprobs_b), np.float64)
        if la.shape != lb.shape:
            raise ValueError(f"agreement: {who}: a holds {la.size} log-probs {la.shape}, b holds "
                             f"{lb.size} {lb.shape}; expected one per token on both sides")
        keep = np.isfinite(la) & np.isfinite(lb)
        if mask is not None:
            m = np.asarray(_flat_logprobs(mask)).astype(bool)
            if m.shape != la.shape:
                raise ValueError(f"agreement: {who}: mask has shape {m.shape}, log-probs {la.shape}")
            keep &= m
        d = (lb - la)[keep]
        self._lp[0] += d.size
        self._lp[1] += float(np.sum(np.expm1(d) - d))
        self._lp[2] += int((np.abs(d) > math.log(extreme_ratio)).sum())
        self._extreme_ratio = extreme_ratio

    def result(self, **extra: Any) -> Agreement:
        if self._meta is None:
            raise ValueError("agreement: nothing compared")
        E, layers, K = self._meta
        acc = self._acc
        n = int(self._lp[0])
        return Agreement(
            moe_layers=layers, num_experts=E, top_k=K, num_requests=self.num_requests,
            num_tokens=acc["tokens"], skipped_cells=acc["skipped"], cells_L=acc["cells"].copy(),
            differ_L=acc["differ"].copy(), top1_agree_L=acc["top1"].copy(),
            jaccard_sum_L=acc["jaccard"].copy(), counts_a_LE=acc["ca"].copy(),
            counts_b_LE=acc["cb"].copy(), tokens_with_difference=acc["tokdiff"],
            differing_layers=acc["difflayers"], top1_known=self.top1_known, num_logprobs=n,
            k3_kl=self._lp[1] / n if n else None,
            extreme_ratio=getattr(self, "_extreme_ratio", 2.0), extreme_tokens=int(self._lp[2]),
            extra={**extra, **({"diverged_requests": self.diverged_requests,
                                "uncompared_positions": self.uncompared_positions}
                               if self.diverged_requests else {})})


def _flat_logprobs(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]):
        return np.concatenate([_flat_logprobs(v) for v in x]) if x else np.zeros(0)
    return np.asarray(x).reshape(-1)


def agreement(a: Any, b: Any, *, logprobs_a: Any = None, logprobs_b: Any = None,
              logprob_mask: Any = None, extreme_ratio: float = 2.0, num_experts: int | None = None,
              moe_layers: Sequence[int] | None = None, diverged: str = "error") -> Agreement:
    """Router agreement of two captures of the same tokens, per MoE layer and overall.

    ``a`` and ``b``: two traces, two sequences of traces (paired by request id; every request on
    one side must be on the other, else a ValueError names the ones missing on each side), two
    mappings request id -> trace, or two ``[..., L, K]`` route arrays (``-1`` = missing; give
    ``num_experts``). ``logprobs_a`` / ``logprobs_b`` (same shapes, or lists of per-request arrays)
    add the k3 KL and the fraction of probability ratios beyond ``extreme_ratio``.
    ``diverged``: what a token-id difference between paired traces does (see
    :meth:`AgreementCounter.add`).

    Example (L = 1, K = 2; the second token's expert set differs, its top-1 agrees):
        >>> ta = RoutingTrace.from_ids(np.array([[[0, 1]], [[2, 3]]]), num_experts=4,
        ...                            moe_layers=[1], request_id="r", prompt_len=2)
        >>> tb = RoutingTrace.from_ids(np.array([[[1, 0]], [[2, 1]]]), num_experts=4,
        ...                            moe_layers=[1], request_id="r", prompt_len=2)
        >>> g = agreement(ta, tb)
        >>> g.differ_fraction, g.top1_agreement, round(g.jaccard, 4), g.load_shift_L.tolist()
        (0.5, 0.5, 0.6667, [0.25])
    """
    c = AgreementCounter()
    if diverged not in ("error", "prefix"):
        raise ValueError(f"agreement: diverged: expected 'error' or 'prefix', got {diverged!r}")
    if isinstance(a, RoutingTrace) and isinstance(b, RoutingTrace):
        c.add(a, b, diverged=diverged)
    elif _is_traces(a) and _is_traces(b):
        da, db = _by_id(a, "a"), _by_id(b, "b")
        only_a = [k for k in da if k not in db]
        only_b = [k for k in db if k not in da]
        if only_a or only_b:
            raise ValueError(f"agreement: the two sides hold different requests: only in a "
                             f"{only_a[:5]}{'...' if len(only_a) > 5 else ''} ({len(only_a)}), only "
                             f"in b {only_b[:5]}{'...' if len(only_b) > 5 else ''} ({len(only_b)})")
        for k, ta in da.items():
            c.add(ta, db[k], diverged=diverged)
    else:
        if num_experts is None:
            raise ValueError("agreement: give num_experts with route arrays")
        c.add_cells(a, b, num_experts=num_experts, moe_layers=moe_layers)
        c.num_requests = 0
    if (logprobs_a is None) != (logprobs_b is None):
        raise ValueError("agreement: give both logprobs_a and logprobs_b, or neither")
    if logprobs_a is not None:
        c.add_logprobs(logprobs_a, logprobs_b, extreme_ratio=extreme_ratio, mask=logprob_mask)
    return c.result()


def _is_traces(x: Any) -> bool:
    if isinstance(x, Mapping):
        return all(isinstance(v, RoutingTrace) for v in x.values())
    return isinstance(x, (list, tuple)) and all(isinstance(v, RoutingTrace) for v in x)


def _by_id(x: Any, side: str) -> dict[str, RoutingTrace]:
    if isinstance(x, Mapping):
        return dict(x)
    out: dict[str, RoutingTrace] = {}
    for t in x:
        if t.request_id in out:
            raise ValueError(f"agreement: side {side} holds request {t.request_id!r} twice")
        out[t.request_id] = t
    return out
