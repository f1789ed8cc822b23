"""What the command line prints: its two consoles, the one-line error, and the tables of a
capture's summary and of one request's routes (shared by cli.py and report/commands.py)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["err", "fail", "out", "print_request", "print_summary", "token_decoder"]

# NOTE: no markup: what is printed holds paths, request ids and routes ("[3, 7]"), which rich
# would read as markup tags and drop; styles are given as arguments instead
out = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: MESSAGE`` on one line, the message verbatim (no markup: a message such as
    "at [token 5, layer 0, slot 0]" must keep its brackets)."""
    err.print(Text.assemble(("error: ", "bold red"), " ".join(str(message).split())),
              soft_wrap=True)
    return typer.Exit(code)


def print_summary(summary: Any, *, title: str) -> None:
    head = Table(title=title, show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    for k, v in [("model", summary.model), ("requests", f"{summary.num_requests:,}"),
                 ("tokens", f"{summary.num_tokens:,}"),
                 ("MoE layers", f"{len(summary.moe_layers)} {list(summary.moe_layers)}"),
                 ("experts", str(summary.num_experts)), ("top-k", str(summary.top_k)),
                 ("missing cells", f"{summary.num_missing:,}")]:
        head.add_row(k, v)
    out.print(head)
    t = Table(title="load imbalance per MoE layer (max/mean of expert counts; 1.00 = balanced)",
              title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("max/mean", justify="right")
    t.add_column("busiest expert", justify="right")
    t.add_column("idle experts", justify="right")
    for layer, imb, busy, idle in zip(summary.moe_layers, summary.imbalance_L,
                                      summary.busiest_L, summary.idle_L):
        t.add_row(str(layer), "-" if imb != imb else f"{imb:.2f}", str(int(busy)), str(int(idle)))
    out.print(t)


def token_decoder(trace: Any, tokenizer: str | None) -> Any:
    """A token-id -> text function: the given tokenizer, or the built-in one for built-in models."""
    if tokenizer is None and not trace.model.startswith("builtin:"):
        return None
    if tokenizer is None or tokenizer.startswith("builtin:"):
        from .builtin import byte_tokenizer

        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as e:
            raise fail(f"--tokenizer {tokenizer}: cannot load it ({e})") from None
    return lambda i: tok.decode([i])


def print_request(trace: Any, limit: int, decode: Any) -> None:
    out.print(f"request {trace.request_id!r}: {trace.num_tokens} tokens from position "
              f"{trace.start}, prompt length {trace.prompt_len}, E={trace.num_experts}, "
              f"K={trace.top_k}, {trace.num_missing} missing cells")
    t = Table(show_lines=False)
    t.add_column("pos", justify="right")
    t.add_column("", justify="left")
    t.add_column("token", justify="right")
    if decode is not None:
        t.add_column("text", justify="left")
    for layer in trace.moe_layers:
        t.add_column(f"layer {layer}", justify="left")
    ids = trace.to_numpy()
    rows = range(trace.num_tokens) if limit == 0 else range(min(limit, trace.num_tokens))
    for r in rows:
        pos = trace.start + r
        kind = "prompt" if pos < trace.prompt_len else "gen"
        tok = "-" if trace.token_ids is None else str(int(trace.token_ids[r]))
        cells = ["missing" if trace.missing is not None and trace.missing[r, layer]
                 else " ".join(str(e) for e in ids[r, layer]) for layer in range(trace.num_layers)]
        text = [] if decode is None else [
            "-" if trace.token_ids is None else repr(decode(int(trace.token_ids[r])))[1:-1]]
        t.add_row(str(pos), kind, tok, *text, *cells)
    out.print(t)
    if limit and trace.num_tokens > limit:
        out.print(f"... {trace.num_tokens - limit} more rows (--limit 0 prints all)")
