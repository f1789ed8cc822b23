"""Bodies of the ``routecap report`` and ``routecap placement`` commands (registered in cli.py)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli_output import fail, token_decoder

__all__ = ["placement_command", "report_command"]


def _shared(ts: Any) -> dict[str, Any]:
    """Model, E, K, layers of a trace set: from its manifest, else from its first trace."""
    if getattr(ts, "shared", None) and ts.shared.get("num_experts"):
        return dict(ts.shared)
    first = next(iter(ts), None)
    return {} if first is None else {"model": first.model, "num_experts": first.num_experts}


def report_command(*, traces: Path, out_path: Path, vs: Path | None, ep_size: int | None,
                   redundant: int, tokenizer: str | None, overwrite: bool, out: Console,
                   err: Console) -> None:
    from ..files import TraceFileError, open_traces
    from ..placement import PlacementError
    from .build import check_placement_args, render_report, write_report

    if out_path.exists() and not overwrite:
        raise fail(f"--out {out_path}: exists; pass --overwrite or choose another file")
    if out_path.exists() and out_path.is_dir():
        raise fail(f"--out {out_path}: is a folder; expected an .html file path")
    try:
        ts = open_traces(traces)
        other = open_traces(vs) if vs is not None else None
        shared = _shared(ts)
        if shared.get("num_experts"):
            check_placement_args(int(shared["num_experts"]), ep_size, redundant)
    except (TraceFileError, PlacementError) as e:
        raise fail(str(e)) from None
    model = str(shared.get("model") or "")
    decode = token_decoder(SimpleNamespace(model=model), tokenizer)
    total = len(ts) + (len(other) if other is not None else 0)
    progress = Progress(TextColumn("report"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("requests"), TimeElapsedColumn(), console=err,
                        disable=not err.is_terminal)
    t0 = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("report", total=total)
            page = render_report(ts, source=str(traces), vs=other,
                                 vs_source=None if vs is None else str(vs), ep_size=ep_size,
                                 redundant=redundant, decode=decode,
                                 advance=lambda n: progress.advance(task, n))
    except (TraceFileError, PlacementError, ValueError) as e:
        raise fail(str(e)) from None
    size = write_report(out_path, page)
    out.print(f"wrote {out_path} ({size / 1e6:.2f} MB, {len(ts):,} requests"
              + (f" vs {len(other):,}" if other is not None else "")
              + f", {time.perf_counter() - t0:.1f} s); open it in a browser, no network needed")


def placement_command(*, traces: Path, ep_size: int, redundant: int, out_path: Path, fmt: str,
                      num_layers: int | None, overwrite: bool, out: Console, err: Console) -> None:
    from ..analysis import summarize
    from ..files import TraceFileError, open_traces
    from ..placement import PlacementError, plan_placement, write_placement

    if out_path.exists() and not overwrite:
        raise fail(f"--out {out_path}: exists; pass --overwrite or choose another file")
    try:
        summary = summarize(open_traces(traces))
        plan = plan_placement(summary.counts_LE, ep_size, redundant=redundant,
                              moe_layers=summary.moe_layers)
        if num_layers is None and fmt == "sglang":
            num_layers = _num_hidden_layers(summary.model)
        write_placement(plan, out_path, fmt, num_hidden_layers=num_layers)
    except (TraceFileError, PlacementError, ValueError) as e:
        raise fail(str(e)) from None
    print_placement(plan, out)
    out.print(f"wrote the balanced placement ({fmt} format) to {out_path}")


def _num_hidden_layers(model: str) -> int | None:
    """All decoder layers of the captured model, when its config is at hand (built-in or a folder)."""
    import json

    if model.startswith("builtin:"):
        from ..builtin import tiny_config

        return int(tiny_config(model.split(":", 1)[1]).num_hidden_layers)
    cfg_path = Path(model) / "config.json" if model else None
    if cfg_path is None or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("num_hidden_layers"), int):
            return int(c["num_hidden_layers"])
    return None


def print_placement(plan: Any, out: Console) -> None:
    p = plan.balanced
    t = Table(title=f"balanced placement: EP size {plan.ep_size}, {p.slots_per_gpu} slots per GPU, "
                    f"{plan.redundant} redundant; max/mean = busiest GPU / mean GPU",
              title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("default", justify="right")
    t.add_column("balanced", justify="right")
    for g in range(plan.ep_size):
        t.add_column(f"GPU {g}", justify="left")
    for i, layer in enumerate(plan.moe_layers):
        b, a = plan.before_L[i], plan.after_L[i]
        t.add_row(str(layer), "-" if b != b else f"{b:.3f}", "-" if a != a else f"{a:.3f}",
                  *(" ".join(map(str, p.experts_on_gpu(i, g))) for g in range(plan.ep_size)))
    out.print(t)
