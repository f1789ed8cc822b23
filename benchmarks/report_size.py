"""Time and size of ``routecap report`` on a 100k-token capture, beside reading the same traces.

The capture is synthetic, made through the public API (``RoutingTrace.from_ids`` and
``TraceWriter``) in the router shape of Qwen3-30B-A3B (48 MoE layers, top-8 of 128 experts):
200 requests of 500 tokens (300 prompt, 200 generated). Each layer has its own skewed expert
popularity, and generated tokens drift towards other experts than prompt tokens, so every
section of the report has something to show. It is written once under benchmarks/.cache/.

Measured side by side in one process (median of the repeats):

* baseline: ``summarize(open_traces(dir))``, the load table ``routecap show`` prints (reads and
  counts every route once);
* report: ``render_report`` (one pass of statistics, the figures, the page) + writing the file.

The first report in a process also gzips plotly.js once (cached afterwards); that one-time cost is
printed on its own line.

Run: python benchmarks/report_size.py [--repeats 3] [--tokens 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from routecap.analysis import summarize
from routecap.files import TraceWriter, open_traces
from routecap.report import collect_stats, render_report, write_report
from routecap.report.page import plotly_js_gzip_b64
from routecap.trace import RoutingTrace

L, K, E = 48, 8, 128
PROMPT, GEN = 300, 200
CACHE = Path(__file__).resolve().parent / ".cache"


def make_capture(out: Path, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    T = PROMPT + GEN
    n_req = max(1, tokens // T)
    # per-layer popularity: Zipf-like logits over a random expert order, sharper in deeper layers
    ranks = np.stack([rng.permutation(E) for _ in range(L)])  # [L, E]
    sharp = np.linspace(0.15, 0.5, L)[:, None]
    logit_LE = -sharp * np.log1p(ranks)
    drift_LE = rng.normal(0, 0.6, (L, E))  # generated tokens favour other experts
    with TraceWriter(out, max_requests=50, overwrite=True) as w:
        for r in range(n_req):
            gen_T = (np.arange(T) >= PROMPT)[:, None, None]
            noise = rng.gumbel(size=(T, L, E)).astype(np.float32)
            score = logit_LE[None] + gen_T * drift_LE[None] + noise + rng.normal(0, 0.3, (1, L, E))
            ids = np.argpartition(-score, K, axis=2)[:, :, :K]  # Gumbel top-k: K distinct experts
            w.append(RoutingTrace.from_ids(ids, num_experts=E, moe_layers=range(1, L + 1),
                                        request_id=f"req-{r:04d}", prompt_len=PROMPT,
                                        token_ids=rng.integers(3, 50_000, T).astype(np.int32),
                                        model="synthetic:qwen3-30b-a3b-shape"))


def median_time(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds (CPU time is what a shared, busy machine still measures)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def browser_time(path: Path) -> None:
    """Seconds from opening the page in headless Chromium until every plot is drawn (if present)."""
    import shutil

    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        print("browser: chromium or playwright missing, not measured")
        return
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("body[data-plots-drawn]", timeout=300_000)
        wall = time.perf_counter() - t0
        n = page.get_attribute("body", "data-plots-drawn")
        browser.close()
    print(f"browser: headless Chromium opened the page and drew its {n} plots in {wall:.2f} s (wall)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100_000)
    args = ap.parse_args()
    cap = CACHE / f"report-capture-v2-{args.tokens}"
    if not (cap / "summary.done").exists():
        t0 = time.perf_counter()
        make_capture(cap, args.tokens)
        (cap / "summary.done").write_text("ok\n")
        print(f"made the synthetic capture in {time.perf_counter() - t0:.1f} s")
    ts = open_traces(cap)
    n_tok = ts.num_tokens
    disk = sum(p.stat().st_size for p in cap.glob("*.safetensors"))
    print(f"capture: {len(ts)} requests, {n_tok:,} tokens, L={L} MoE layers, top-{K} of E={E}; "
          f"{disk / 1e6:.1f} MB of trace files")

    t0, c0 = time.perf_counter(), time.process_time()
    plotly_js_gzip_b64()
    print(f"one-time per process: gzip + base64 of plotly.js {time.perf_counter() - t0:.2f} s wall, "
          f"{time.process_time() - c0:.2f} s CPU")

    out = CACHE / "report-100k.html"
    base, base_cpu, _ = median_time(lambda: summarize(open_traces(cap)), args.repeats)
    stats_t, stats_cpu, _ = median_time(lambda: collect_stats(open_traces(cap)), args.repeats)
    rep, rep_cpu, size = median_time(
        lambda: write_report(out, render_report(open_traces(cap), source=str(cap), ep_size=8,
                                                redundant=16)), args.repeats)
    js = len(plotly_js_gzip_b64())
    print(f"{'':34s} {'wall s':>7s} {'CPU s':>7s}  CPU x summarize")
    for name, w, c in (("read + count (summarize)", base, base_cpu),
                       ("report statistics pass", stats_t, stats_cpu),
                       ("whole report, written", rep, rep_cpu)):
        print(f"{name:34s} {w:7.2f} {c:7.2f}  x{c / base_cpu:5.2f}")
    print(f"HTML: {size / 1e6:.2f} MB = plotly.js embedded {js / 1e6:.2f} MB + figures and request "
          f"view {(size - js) / 1e6:.2f} MB  -> {out}")
    browser_time(out)
    page = out.read_text()
    for note in ("per-request plot:", "co-activation:", "request view:"):
        i = page.find(note)
        if i >= 0:
            print("  downsampled, said on the page: " + page[i:page.find("<", i)])


if __name__ == "__main__":
    main()
