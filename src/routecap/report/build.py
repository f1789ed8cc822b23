"""Assemble the report: statistics -> figures -> sections -> one HTML page."""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..placement import PlacementError, PlacementPlan, plan_placement
from ..trace import RoutingTrace
from . import figures
from .page import Section, render_page, request_view_data
from .stats import Limits, ReportStats, collect_stats

__all__ = ["default_ep_size", "render_report", "write_report"]


def default_ep_size(num_experts: int) -> int:
    """The EP size shown when none is given: the largest of 8, 4, 2 that divides E (else 1)."""
    return next((g for g in (8, 4, 2) if num_experts % g == 0 and num_experts >= g), 1)


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(x) else f"{x:.{digits}f}"


def _overview(stats: ReportStats) -> list[tuple[str, str]]:
    s = stats.summary
    imb = s.imbalance_L
    worst = int(np.nanargmax(imb)) if np.isfinite(imb).any() else None
    cards = [("requests", f"{s.num_requests:,}"), ("tokens", f"{s.num_tokens:,}"),
             ("MoE layers", str(len(s.moe_layers))), ("experts", str(s.num_experts)),
             ("top-k", str(s.top_k)),
             ("mean max/mean", _fmt(float(np.nanmean(imb)) if np.isfinite(imb).any() else np.nan))]
    if worst is not None:
        cards.append(("worst layer", f"{s.moe_layers[worst]} ({_fmt(imb[worst])})"))
    cards.append(("missing cells", f"{s.num_missing:,}"))
    return cards


def _placement_section(plan: PlacementPlan, dir_arg: str) -> Section:
    before, after = plan.before_L, plan.after_L
    worst = int(np.nanargmax(before)) if np.isfinite(before).any() else 0
    rows = []
    for g in range(plan.ep_size):
        a = plan.default.experts_on_gpu(worst, g)
        b = plan.balanced.experts_on_gpu(worst, g)
        rows.append(f"<tr><td>GPU {g}</td><td>{' '.join(map(str, a))}</td>"
                    f"<td>{plan.before_LG[worst, g]:,.0f}</td><td>{' '.join(map(str, b))}</td>"
                    f"<td>{plan.after_LG[worst, g]:,.0f}</td></tr>")
    red = f" --redundant {plan.redundant}" if plan.redundant else ""
    layer = plan.moe_layers[worst] if plan.moe_layers else "-"
    table = (f"<h3>Layer {layer} (the most imbalanced under the default): experts per GPU</h3>"
             "<table class='kv'><tr><th></th><th>default experts</th><th>tokens</th>"
             "<th>balanced experts</th><th>tokens</th></tr>" + "".join(rows) + "</table>"
             "<p class='intro'>Write this placement for an engine (SGLang's "
             "<code>--init-expert-location</code> file, or vLLM's EPLB maps):</p>"
             f"<pre class='cmd'><code>routecap placement {html.escape(dir_arg)} --ep-size "
             f"{plan.ep_size}{red} --out placement.json</code></pre>")
    mb = float(np.nanmean(before)) if np.isfinite(before).any() else np.nan
    ma = float(np.nanmean(after)) if np.isfinite(after).any() else np.nan
    intro = (f"Expert parallelism over <b>{plan.ep_size} GPUs</b>, {plan.default.slots_per_gpu} "
             f"expert slots each ({plan.redundant} redundant). The engines' default puts experts "
             "on GPUs in id order; the balanced plan is computed from this capture's load: "
             "hot experts get the redundant slots (as DeepSeek's EPLB does), then "
             "longest-processing-time packing, heaviest first onto the least loaded GPU. "
             f"Busiest GPU / mean GPU, averaged over layers: <b>{_fmt(mb, 3)}</b> default &rarr; "
             f"<b>{_fmt(ma, 3)}</b> balanced. A replicated expert's tokens are split evenly over "
             "its replicas.")
    return Section(key="placement", title="Expert-parallel placement", intro=intro,
                   figures=(("layers", figures.placement_layers(plan)),
                            ("gpus", figures.placement_gpus(plan))),
                   html_after=table)


_REQUEST_VIEW_HTML = """
<div id="rv-root" class="rv-wrap">
  <div class="controls">
    <label>request <select id="rv-request"></select></label>
    <label>colour by layer <select id="rv-layer"></select></label>
    <span class="muted">underlined: generated tokens; hatched: route missing</span>
  </div>
  <div class="rv">
    <div><div id="rv-tokens" class="tokens"></div><div id="rv-legend" class="legend"></div></div>
    <div id="rv-route" class="route"></div>
  </div>
</div>"""


def render_report(
    traces: Iterable[RoutingTrace],
    *,
    source: str,
    vs: Iterable[RoutingTrace] | None = None,
    vs_source: str | None = None,
    ep_size: int | None = None,
    redundant: int = 0,
    decode: Callable[[int], str] | None = None,
    limits: Limits | None = None,
    advance: Callable[[int], None] | None = None,
) -> str:
    """The report of ``traces`` (and, with ``vs``, their agreement with ``vs``) as HTML text.

    Example:
        >>> import numpy as np
        >>> from routecap.trace import RoutingTrace
        >>> t = RoutingTrace.from_ids(np.array([[[0, 1]], [[2, 3]]]), num_experts=4,
        ...                           moe_layers=[1], request_id="r0", prompt_len=1)
        >>> page = render_report([t], source="demo", ep_size=2)
        >>> page.startswith("<!DOCTYPE html>") and "Expert-parallel placement" in page
        True
    """
    if vs is not None and iter(traces) is traces:
        traces = list(traces)  # a one-shot iterator: the --vs pass reads the traces again
    stats = collect_stats(traces, limits=limits, advance=advance)
    s = stats.summary
    G = default_ep_size(s.num_experts) if ep_size is None else ep_size
    plan = plan_placement(s.counts_LE, G, redundant=redundant, moe_layers=s.moe_layers)
    notes = list(stats.notes)
    if s.num_missing:
        notes.append(f"{s.num_missing:,} (token, layer) routes are missing; they are left out of "
                     "every count (never read as expert 0)")
    if ep_size is None:
        notes.append(f"placement shown for EP size {G} (pass --ep-size to choose)")
    sections = [
        Section(key="load", title="Expert load",
                intro=("Tokens each expert received, per MoE layer, relative to the layer's mean "
                       "(white = mean, red = hot, blue = cold). Beside it, max/mean: the busiest "
                       "expert's load over the mean; 1.00 is perfectly balanced."),
                figures=(("heatmap", figures.expert_load(stats)),)),
        Section(key="positions", title="Load over positions",
                intro=("Imbalance of prompt tokens against generated tokens, and by absolute "
                       "position (early vs late tokens). With few tokens max/mean is mostly "
                       "sampling noise: position buckets with fewer than 4 routed tokens per "
                       "expert are left blank."),
                figures=(("prompt-gen", figures.prompt_vs_generated(stats)),
                         ("buckets", figures.positions(stats)))),
        Section(key="requests", title="Per request",
                intro=("Each point is one request: its length and its own imbalance (max/mean of "
                       "its expert counts, averaged over layers; short requests are noisier)."),
                figures=(("scatter", figures.requests(stats)),)),
        Section(key="coactivation", title="Expert co-activation",
                intro=("How often two experts are chosen by the same token, against chance: lift "
                       "= observed pairs / (count<sub>i</sub> &times; count<sub>j</sub> / tokens). "
                       "Red: chosen together more often than independent choices would be; blue: "
                       "less. Pick the layer in the menu."),
                figures=(("lift", figures.coactivation(stats)),)),
    ]
    if vs is not None:
        from .agreement import agreement_section

        sections.append(agreement_section(stats=stats, traces=traces, source=source, vs=vs,
                                   vs_source=vs_source, advance=advance))
    sections.append(_placement_section(plan, source))
    text = ("text from the tokenizer" if decode is not None else
            "no tokenizer (token ids shown; pass --tokenizer for text)")
    sections.append(Section(
        key="request-view", title="Request view",
        intro=(f"A request's tokens ({text}), coloured by the first expert the chosen layer "
               "routed each token to. Hover a token for its routes at every layer." +
               (" These traces hold their K ids sorted ascending (topk_order=sorted): the first "
                "is the lowest id, not the top-1." if any(t.topk_order == "sorted"
                                                          for t in stats.samples) else "")),
        html_after=_REQUEST_VIEW_HTML))
    rv = request_view_data(stats.samples, decode, moe_layers=s.moe_layers,
                           num_experts=s.num_experts, top_k=s.top_k)
    sub = (f"<code>{html.escape(source)}</code>" +
           (f" vs <code>{html.escape(vs_source or '')}</code>" if vs is not None else "") +
           f" &middot; model <code>{html.escape(s.model or 'unknown')}</code>")
    return render_page(title="routecap report", subtitle=sub, cards=_overview(stats),
                       notes=notes, sections=sections, request_view=rv)


def write_report(path: str | os.PathLike, page: str) -> int:
    """Write the page atomically; returns its size in bytes."""
    path = Path(path)
    data = page.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def check_placement_args(num_experts: int, ep_size: int | None, redundant: int) -> None:
    """Raise :class:`PlacementError` early (before reading every trace) for impossible sizes."""
    from ..placement import contiguous_placement

    if ep_size is not None:
        contiguous_placement(num_experts, ep_size, num_layers=0, redundant=redundant)
    elif redundant:
        g = default_ep_size(num_experts)
        if (num_experts + redundant) % g:
            raise PlacementError(f"--redundant {redundant}: {num_experts} + {redundant} slots do "
                                 f"not divide over the default EP size {g}; pass --ep-size")
