"""The ``--vs`` section: router agreement of two captures of the same requests.

The measures are :func:`routecap.analysis.agreement`'s (the R3 paper's router-level measures); this
module only slices the pairs by position (prompt vs generated, absolute-position buckets) and
plots them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable

import numpy as np
import plotly.graph_objects as go

from ..analysis import Agreement, AgreementCounter
from ..trace import RoutingTrace
from . import figures
from .page import Section
from .stats import POSITION_EDGES, ReportStats

__all__ = ["PositionAgreement", "agreement_by_position", "agreement_section"]


class PositionAgreement:
    """Agreement overall, for prompt and generated positions, and per absolute-position bucket."""

    def __init__(self) -> None:
        self.overall = AgreementCounter()
        self.prompt = AgreementCounter()
        self.generated = AgreementCounter()
        self.buckets = [AgreementCounter() for _ in POSITION_EDGES]
        self.pairs = 0

    def add(self, a: RoutingTrace, b: RoutingTrace) -> None:
        before = self.overall.uncompared_positions
        # two generations that sampled differently are compared up to their first differing token
        self.overall.add(a, b, diverged="prefix")
        lo, hi = max(a.start, b.start), min(a.end, b.end)
        hi -= self.overall.uncompared_positions - before  # the first differing position, if any
        edges = list(POSITION_EDGES) + [math.inf]
        for counter, x, y in [(self.prompt, lo, min(hi, a.prompt_len)),
                              (self.generated, max(lo, a.prompt_len), hi)] + [
                (self.buckets[i], max(lo, edges[i]), min(hi, edges[i + 1]))
                for i in range(len(POSITION_EDGES))]:
            if y > x:
                counter.add(a.slice(int(x), int(y)), b.slice(int(x), int(y)))
        self.pairs += 1


def agreement_by_position(a: Iterable[RoutingTrace], b: Iterable[RoutingTrace], *,
                          advance: Callable[[int], None] | None = None) -> PositionAgreement:
    """Pair ``a`` and ``b`` by request id (every request must be on both sides)."""
    other: dict[str, RoutingTrace] = {}
    for t in b:
        if t.request_id in other:
            raise ValueError(f"--vs: request {t.request_id!r} is there twice")
        other[t.request_id] = t
        if advance is not None:
            advance(1)
    seen: set[str] = set()
    only_a: list[str] = []
    pa = PositionAgreement()
    for t in a:
        seen.add(t.request_id)
        if t.request_id not in other:
            only_a.append(t.request_id)
            continue
        pa.add(t, other[t.request_id])
    only_b = [k for k in other if k not in seen]
    if only_a or only_b:
        raise ValueError(f"--vs: the two captures hold different requests: only in the first "
                         f"{only_a[:5]} ({len(only_a)}), only in --vs {only_b[:5]} ({len(only_b)})")
    return pa


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _per_layer(g: Agreement) -> go.Figure:
    labels = [f"layer {x}" for x in g.moe_layers]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=100 * g.differ_fraction_L, name="expert set differs",
                         marker_color="#d62728",
                         hovertemplate="%{x}: %{y:.2f}% of tokens<extra>set differs</extra>"))
    if g.top1_known:
        fig.add_trace(go.Bar(x=labels, y=100 * (1 - g.top1_agreement_L), name="top-1 differs",
                             marker_color="#ff9896",
                             hovertemplate="%{x}: %{y:.2f}%<extra>top-1 differs</extra>"))
    fig.add_trace(go.Bar(x=labels, y=100 * (1 - g.jaccard_L), name="1 - Jaccard",
                         marker_color="#9467bd",
                         hovertemplate="%{x}: %{y:.2f}%<extra>1 - mean Jaccard</extra>"))
    fig.add_trace(go.Bar(x=labels, y=100 * g.load_shift_L, name="load shift (TV distance)",
                         marker_color="#8c564b",
                         hovertemplate="%{x}: %{y:.2f}%<extra>load shift</extra>"))
    return figures._style(fig, 360, barmode="group", yaxis_title="% (0 = identical)",
                          legend=dict(orientation="h", y=1.14, x=0))


def _result(c: AgreementCounter) -> Agreement | None:
    # every add() registers the shapes, so a counter with a pair has a result
    return c.result() if c.num_requests else None


def _over_positions(pa: PositionAgreement, labels: list[str]) -> go.Figure:
    xs, ys, ns = [], [], []
    for i, c in enumerate(pa.buckets):
        g = _result(c)
        if g is None or g.num_cells == 0:
            continue
        xs.append(labels[i])
        ys.append(100 * g.differ_fraction)
        ns.append(g.num_tokens)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name="by position",
                             customdata=ns, line=dict(color="#d62728", width=3),
                             hovertemplate=("positions %{x}<br>%{y:.2f}% of cells differ"
                                            "<br>%{customdata:,} tokens<extra></extra>")))
    for name, c, color in (("prompt tokens", pa.prompt, figures.PROMPT_COLOR),
                           ("generated tokens", pa.generated, figures.GEN_COLOR)):
        g = _result(c)
        if g is not None and g.num_cells:
            fig.add_hline(y=100 * g.differ_fraction, line_dash="dash", line_color=color,
                          annotation_text=f"{name}: {_pct(g.differ_fraction)}",
                          annotation_position="top left")
    return figures._style(fig, 320, xaxis_title="token position",
                          yaxis_title="% of (token, layer) cells whose set differs",
                          yaxis_rangemode="tozero", showlegend=False)


def _load_shift(g: Agreement) -> go.Figure:
    shift = 100 * g.load_shift_LE
    m = float(np.nanmax(np.abs(shift))) if shift.size and np.isfinite(shift).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=shift.astype(np.float32), x=np.arange(g.num_experts),
        y=[f"layer {x}" for x in g.moe_layers], zmin=-max(m, 1e-9), zmax=max(m, 1e-9),
        colorscale="PuOr_r", colorbar=dict(title=dict(text="share<br>b - a (pp)"), thickness=12),
        hovertemplate="%{y}, expert %{x}<br>share %{z:+.3f} pp<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="expert")
    return figures._style(fig, figures._height(len(g.moe_layers)) + 30,
                          title=dict(text="load shift per expert: b's share of the layer minus a's",
                                     font=dict(size=13), x=0.01))


def agreement_section(*, stats: ReportStats, traces: Iterable[RoutingTrace], source: str,
                      vs: Iterable[RoutingTrace], vs_source: str | None,
                      advance: Callable[[int], None] | None = None) -> Section:
    """The section: ``traces`` (read a second time) against ``vs``."""
    pa = agreement_by_position(traces, vs, advance=advance)
    g = pa.overall.result()
    rows = [("expert set differs", _pct(g.differ_fraction), "of (token, layer) cells"),
            ("tokens with a differing layer", _pct(g.token_differ_fraction), "of tokens"),
            ("differing layers per token", f"{g.mean_differing_layers:.3f}"
             if math.isfinite(g.mean_differing_layers) else "-", "mean"),
            ("top-1 agrees", _pct(g.top1_agreement) if g.top1_known else "unknown (sorted ids)",
             "of cells"),
            ("Jaccard of the expert sets", f"{g.jaccard:.4f}" if math.isfinite(g.jaccard)
             else "-", "mean (1 = identical)"),
            ("load shift", f"{float(np.mean(g.load_shift_L)):.4f}" if len(g.moe_layers) else "-",
             "total variation distance, mean over layers")]
    table = "<table class='kv'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td><b>{html.escape(v)}</b></td>"
        f"<td class='muted'>{html.escape(n)}</td></tr>" for k, v, n in rows) + "</table>"
    caveat = []
    if g.extra.get("diverged_requests"):
        caveat.append(f"{g.extra['diverged_requests']} requests generated different tokens on the "
                      f"two sides: {g.extra['uncompared_positions']:,} positions after the first "
                      "difference are not compared.")
    if g.skipped_cells:
        caveat.append(f"{g.skipped_cells:,} cells missing on one side are not compared.")
    intro = (f"<code>{html.escape(source)}</code> (a) against <code>{html.escape(vs_source or '')}"
             f"</code> (b): {g.num_requests:,} requests, {g.num_tokens:,} tokens, {g.num_cells:,} "
             "(token, layer) cells compared with the router-level measures of the R3 paper "
             "(<code>routecap.analysis.agreement</code>; <code>routecap diff</code> prints the same "
             "table). " + " ".join(html.escape(c) for c in caveat))
    return Section(key="agreement", title="Agreement with --vs", intro=intro, html_before=table,
                   figures=(("layers", _per_layer(g)),
                            ("positions", _over_positions(pa, stats.bucket_labels)),
                            ("load-shift", _load_shift(g))))
