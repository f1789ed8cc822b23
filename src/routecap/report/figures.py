"""The report's Plotly figures, built from :class:`~routecap.report.stats.ReportStats`.

Every function returns a ``plotly.graph_objects.Figure``; the page embeds their JSON and plotly.js.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..placement import PlacementPlan
from .stats import ReportStats

__all__ = ["coactivation", "expert_load", "placement_gpus", "placement_layers", "positions",
           "prompt_vs_generated", "requests"]

_HOT = "RdBu_r"  # blue below the mean, white at the mean, red above
_FONT = dict(family="Inter, system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=12)
PROMPT_COLOR, GEN_COLOR = "#4c78a8", "#f58518"
BEFORE_COLOR, AFTER_COLOR = "#9aa5b1", "#2ca02c"


def _style(fig: go.Figure, height: int, **layout) -> go.Figure:
    layout.setdefault("margin", dict(l=70, r=20, t=40, b=50))
    fig.update_layout(template="plotly_white", height=height, font=_FONT, **layout)
    return fig


def _ratio(num_L: np.ndarray, den_L: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den_L > 0, num_L / np.where(den_L > 0, den_L, 1), np.nan)


def _log_ratio(rel: np.ndarray, title: str) -> dict:
    """Heatmap arguments for a ratio to the mean on a log2 scale, white at the mean (x1).

    A ratio of 0 (an idle expert) sits at the cold end of the scale.
    """
    finite = rel[np.isfinite(rel) & (rel > 0)]
    top = float(np.abs(np.log2(finite)).max()) if finite.size else 1.0
    m = float(min(5, max(1, np.ceil(top))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log2(rel)
    z = np.where(np.isnan(rel), np.nan, np.clip(z, -m, m)).astype(np.float32)
    ticks = np.arange(-m, m + 1, 1 if m <= 3 else 2)
    text = [f"x{2.0 ** t:g}" if t >= 0 else f"x1/{2 ** -t:g}" for t in ticks]
    return dict(z=z, zmin=-m, zmax=m, colorscale=_HOT,
                colorbar=dict(title=dict(text=title), thickness=12, tickvals=ticks, ticktext=text))


def _counts(a: np.ndarray) -> np.ndarray:
    """Counts in the narrowest unsigned dtype (the figure JSON carries them base64-encoded)."""
    return a.astype(np.uint16 if a.size == 0 or a.max() < 65536 else np.uint32)


def max_over_mean_L(counts_LE: np.ndarray) -> np.ndarray:
    return _ratio(counts_LE.max(axis=-1), counts_LE.mean(axis=-1))


def _layer_labels(stats: ReportStats) -> list[str]:
    return [f"layer {x}" for x in stats.moe_layers]


def _height(rows: int) -> int:
    return int(min(1100, max(300, 20 * rows + 130)))


def expert_load(stats: ReportStats) -> go.Figure:
    """Heatmap layers x experts of load relative to the layer's mean, max/mean bars beside it."""
    counts = stats.summary.counts_LE.astype(np.float64)
    rel = counts / np.maximum(counts.mean(axis=1, keepdims=True), 1e-300)
    rel[counts.sum(axis=1) == 0] = np.nan
    imb = max_over_mean_L(counts)
    labels = _layer_labels(stats)
    E = stats.num_experts
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.84, 0.16],
                        horizontal_spacing=0.015,
                        subplot_titles=("tokens per expert / layer mean", "max / mean"))
    fig.add_trace(go.Heatmap(
        **_log_ratio(rel, "x layer mean"), x=np.arange(E), y=labels,
        customdata=np.stack([counts, rel], axis=-1).astype(np.float32),
        hovertemplate=("%{y}, expert %{x}<br>%{customdata[0]:,.0f} tokens"
                       "<br>%{customdata[1]:.2f} x mean<extra></extra>"),
    ), row=1, col=1)
    fig.add_trace(go.Bar(
        x=imb, y=labels, orientation="h", marker_color="#d62728",
        text=[("" if not np.isfinite(v) else f"{v:.2f}") for v in imb], textposition="auto",
        hovertemplate="%{y}: busiest expert %{x:.2f} x mean<extra></extra>", showlegend=False,
    ), row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="expert", row=1, col=1)
    fig.update_xaxes(rangemode="tozero", row=1, col=2)
    return _style(fig, _height(len(labels)), margin=dict(l=80, r=70, t=40, b=50))


def prompt_vs_generated(stats: ReportStats) -> go.Figure:
    labels = _layer_labels(stats)
    n_prompt = int(stats.counts_prompt_LE[0].sum() // max(1, stats.summary.top_k)) if labels else 0
    n_gen = int(stats.counts_gen_LE[0].sum() // max(1, stats.summary.top_k)) if labels else 0
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=max_over_mean_L(stats.counts_prompt_LE),
                         name=f"prompt tokens ({n_prompt:,})", marker_color=PROMPT_COLOR,
                         hovertemplate="%{x}: %{y:.2f}<extra>prompt</extra>"))
    fig.add_trace(go.Bar(x=labels, y=max_over_mean_L(stats.counts_gen_LE),
                         name=f"generated tokens ({n_gen:,})", marker_color=GEN_COLOR,
                         hovertemplate="%{x}: %{y:.2f}<extra>generated</extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    return _style(fig, 340, barmode="group", yaxis_title="max / mean expert load",
                  legend=dict(orientation="h", y=1.12, x=0))


def positions(stats: ReportStats) -> go.Figure:
    """max/mean per layer and absolute-position bucket (early vs late tokens)."""
    keep = np.flatnonzero(stats.tokens_B > 0)
    labels = stats.bucket_labels
    E, K = stats.num_experts, stats.summary.top_k
    z = np.stack([max_over_mean_L(stats.counts_BLE[b]) for b in keep], axis=1) if len(keep) else \
        np.zeros((len(stats.moe_layers), 0))
    # NOTE: with few tokens max/mean is mostly sampling noise; buckets with fewer than 4 routed
    # tokens per expert on average are left blank.
    noisy = stats.tokens_B[keep] * K < 4 * E
    z[:, noisy] = np.nan
    x = [f"{labels[b]}<br>{int(stats.tokens_B[b]):,} tok" for b in keep]
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=_layer_labels(stats), colorscale="YlOrRd", zmin=1.0,
        colorbar=dict(title=dict(text="max/mean"), thickness=12),
        hovertemplate="%{y}, positions %{x}<br>max/mean %{z:.2f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, _height(len(stats.moe_layers)), xaxis_title="token position")


def requests(stats: ReportStats) -> go.Figure:
    n = len(stats.request_ids)
    take = np.arange(n)
    cap = stats.limits.scatter_requests
    if n > cap:
        take = np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))
    tokens = stats.request_tokens_N[take]
    gen_frac = 1.0 - stats.request_prompt_N[take] / np.maximum(tokens, 1)
    fig = go.Figure(go.Scatter(
        x=tokens, y=stats.request_imbalance_N[take], mode="markers",
        text=[stats.request_ids[i] for i in take],
        marker=dict(color=gen_frac, colorscale="Viridis", cmin=0, cmax=1, size=8, opacity=0.8,
                    colorbar=dict(title=dict(text="generated<br>fraction"), thickness=12)),
        hovertemplate="request %{text}<br>%{x:,} tokens<br>mean max/mean %{y:.2f}<extra></extra>"))
    return _style(fig, 360, xaxis_title="tokens in the request",
                  yaxis_title="mean over layers of max/mean", xaxis_type="log" if n > 1 else None)


def coactivation(stats: ReportStats) -> go.Figure:
    """Lift of expert pairs chosen by the same token, one layer at a time (dropdown)."""
    E = stats.num_experts
    fig = go.Figure()
    buttons = []
    n = len(stats.coact_layers)
    for c, layer in enumerate(stats.coact_layers):
        pairs = stats.coact_pairs_CEE[c].astype(np.float64)
        cnt = stats.coact_counts_CE[c].astype(np.float64)
        N = float(stats.coact_tokens_C[c])
        with np.errstate(invalid="ignore", divide="ignore"):
            lift = pairs * N / np.outer(cnt, cnt)
        lift[~np.isfinite(lift)] = np.nan
        np.fill_diagonal(lift, np.nan)
        log2 = np.log2(np.where(lift > 0, lift, np.nan))
        log2[(lift == 0)] = -2.0  # never together: the bottom of the scale
        fig.add_trace(go.Heatmap(
            z=np.clip(log2, -2, 2).astype(np.float32), customdata=_counts(pairs), x=np.arange(E),
            y=np.arange(E), zmin=-2, zmax=2, colorscale=_HOT, visible=(c == 0),
            colorbar=dict(title=dict(text="lift"), thickness=12, tickvals=[-2, -1, 0, 1, 2],
                          ticktext=["x1/4", "x1/2", "x1", "x2", "x4"]),
            hovertemplate=("experts %{y} and %{x}<br>%{customdata:,} tokens chose both"
                           "<br>lift 2^%{z:.2f}<extra></extra>")))
        buttons.append(dict(label=f"layer {stats.moe_layers[layer]}", method="update",
                            args=[{"visible": [i == c for i in range(n)]}]))
    fig.update_yaxes(autorange="reversed", title_text="expert", scaleanchor="x")
    fig.update_xaxes(title_text="expert", constrain="domain")
    menus = [dict(buttons=buttons, direction="down", x=0, y=1.12, xanchor="left",
                  showactive=True)] if n > 1 else []
    return _style(fig, 560, updatemenus=menus)


def placement_layers(plan: PlacementPlan) -> go.Figure:
    labels = [f"layer {x}" for x in plan.moe_layers]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=plan.before_L, name="engine default (contiguous)",
                         marker_color=BEFORE_COLOR,
                         hovertemplate="%{x}: %{y:.3f}<extra>default</extra>"))
    red = f", {plan.redundant} redundant slots" if plan.redundant else ""
    fig.add_trace(go.Bar(x=labels, y=plan.after_L, name=f"balanced (LPT{red})",
                         marker_color=AFTER_COLOR,
                         hovertemplate="%{x}: %{y:.3f}<extra>balanced</extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    return _style(fig, 340, barmode="group", yaxis_title="busiest GPU / mean GPU",
                  legend=dict(orientation="h", y=1.12, x=0))


def placement_gpus(plan: PlacementPlan) -> go.Figure:
    labels = [f"layer {x}" for x in plan.moe_layers]
    G = plan.ep_size
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("engine default", "balanced"))
    rel_before = plan.before_LG / np.maximum(plan.before_LG.mean(axis=1, keepdims=True), 1e-300)
    scale = _log_ratio(rel_before, "x mean GPU")
    for col, load in ((1, plan.before_LG), (2, plan.after_LG)):
        rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-300)
        args = _log_ratio(rel, "x mean GPU")
        args.update(zmin=scale["zmin"], zmax=scale["zmax"], colorbar=scale["colorbar"])
        args["z"] = np.clip(args["z"], scale["zmin"], scale["zmax"])
        fig.add_trace(go.Heatmap(
            **args, x=[f"GPU {g}" for g in range(G)], y=labels,
            customdata=np.stack([load, rel], axis=-1).astype(np.float32), showscale=(col == 2),
            hovertemplate=("%{y}, %{x}<br>%{customdata[0]:,.1f} tokens"
                           "<br>%{customdata[1]:.2f} x mean<extra></extra>")),
            row=1, col=col)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    return _style(fig, _height(len(labels)), margin=dict(l=80, r=20, t=40, b=40))
