"""The self-contained HTML page: plotly.js inline, figure JSON inline, the request view's data inline.

Nothing is fetched: plotly.js (the copy the ``plotly`` package ships) is embedded gzip-compressed
and base64-encoded, and unpacked by the browser's ``DecompressionStream`` when the page opens (this
keeps a report near 2 MB instead of 5 MB). The page works from disk, offline.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any

import numpy as np
import plotly
import plotly.graph_objects as go

from ..trace import RoutingTrace

__all__ = ["Section", "render_page"]


@dataclass(frozen=True, kw_only=True)
class Section:
    """One part of the page: a heading, a few sentences, figures and optional raw HTML."""

    key: str
    title: str
    intro: str  # HTML
    figures: tuple[tuple[str, go.Figure], ...] = ()
    html_before: str = ""  # between the intro and the figures
    html_after: str = ""


@lru_cache(maxsize=1)
def plotly_js_gzip_b64() -> str:
    from plotly.offline import get_plotlyjs

    # mtime=0: the same bytes on every run (reports diff cleanly)
    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode()


def _json_for_script(obj: Any) -> str:
    # inside <script type="application/json">, "</" would end the element early
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _figure_json(fig: go.Figure) -> str:
    return fig.to_json(validate=False, pretty=False, engine="json").replace("</", "<\\/")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def request_view_data(samples: list[RoutingTrace], decode: Callable[[int], str] | None,
                      *, moe_layers: tuple[int, ...], num_experts: int,
                      top_k: int) -> dict[str, Any]:
    """The request view's data: per request, the token texts and its routes as base64 arrays."""
    reqs = []
    for t in samples:
        text = None
        if t.token_ids is not None and decode is not None:
            # a token that is part of a multi-byte character decodes to U+FFFD alone: show its id
            text = [s if "\ufffd" not in s else f"\u27e8{int(i)}\u27e9"
                    for i, s in ((i, decode(int(i))) for i in t.token_ids)]
        reqs.append({
            "id": t.request_id, "start": t.start, "prompt_len": t.prompt_len, "T": t.num_tokens,
            "text": text,
            "token_ids": None if t.token_ids is None else [int(i) for i in t.token_ids],
            # little-endian uint16 is what the page's Uint16Array reads on every browser platform
            "ids": _b64(t.expert_ids.astype(np.uint8 if num_experts <= 256 else "<u2")),
            "missing": None if t.missing is None else _b64(t.missing.astype(np.uint8)),
        })
    return {"layers": list(moe_layers), "E": num_experts, "K": top_k,
            "wide": num_experts > 256, "requests": reqs}


def _asset(name: str) -> str:
    return files("routecap.report").joinpath(name).read_text(encoding="utf-8")


def render_page(*, title: str, subtitle: str, cards: list[tuple[str, str]], notes: list[str],
                sections: list[Section], request_view: dict[str, Any] | None) -> str:
    """The whole HTML document."""
    figs: dict[str, str] = {}
    body = []
    nav = []
    for s in sections:
        nav.append(f'<a href="#{s.key}">{html.escape(s.title)}</a>')
        divs = []
        for name, fig in s.figures:
            fid = f"{s.key}-{name}"
            figs[fid] = _figure_json(fig)
            divs.append(f'<div class="plot" id="fig-{fid}" data-figure="{fid}"></div>')
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>'
                    f'<p class="intro">{s.intro}</p>{s.html_before}{"".join(divs)}{s.html_after}'
                    '</section>')
    figures_json = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in figs.items()) + "}"
    card_html = "".join(f'<div class="card"><div class="v">{html.escape(v)}</div>'
                        f'<div class="k">{html.escape(k)}</div></div>' for k, v in cards)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return _asset("page.html").format_map({
        "title": html.escape(title),
        "subtitle": subtitle,
        "css": _asset("page.css"),
        "cards": card_html,
        "nav": "".join(nav),
        "notes": f'<ul class="notes">{notes_html}</ul>' if notes else "",
        "sections": "".join(body),
        "figures_json": figures_json,
        "request_json": _json_for_script(request_view) if request_view is not None else "null",
        "plotly_b64": plotly_js_gzip_b64(),
        "plotly_version": html.escape(plotly.__version__),
        "js": _asset("page.js"),
    })
