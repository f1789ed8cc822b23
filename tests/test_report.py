"""The HTML report: its numbers against brute-force references, the command, and the page as a
browser shows it (headless Chromium: no console error, no network request, every plot drawn)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from routecap.analysis import expert_counts, summarize
from routecap.files import open_traces, save_file
from routecap.report import Limits, collect_stats, render_report, write_report
from routecap.report.stats import POSITION_EDGES
from routecap.trace import RoutingTrace

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags a root user on a machine without network needs (see docs/report.md)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, "-m", "routecap", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def _random_trace(rng, rid, T, *, L=3, K=2, E=6, prompt_len=None, start=0, p_missing=0.0):
    ids = np.stack([np.stack([rng.choice(E, K, replace=False, p=_skew(E, layer))
                              for layer in range(L)]) for _ in range(T)]) if T else \
        np.zeros((0, L, K), np.int64)
    miss = rng.random((T, L)) < p_missing if p_missing else None
    return RoutingTrace.from_ids(ids, num_experts=E, moe_layers=[1 + 2 * i for i in range(L)],
                                 request_id=rid, start=start,
                                 prompt_len=T // 2 if prompt_len is None else prompt_len,
                                 missing=miss, token_ids=rng.integers(3, 200, T).astype(np.int32),
                                 model="synthetic")


def _skew(E, layer):
    w = 1.0 / np.arange(1, E + 1) ** (0.5 + 0.5 * layer)
    return w / w.sum()


# ---- statistics against references -------------------------------------------------------------
def test_stats_match_brute_force_references():
    rng = np.random.default_rng(1)
    traces = [_random_trace(rng, f"r{i}", T, start=s, prompt_len=p, p_missing=0.2)
              for i, (T, s, p) in enumerate([(40, 0, 10), (25, 30, 35), (0, 0, 0), (90, 0, 90)])]
    st = collect_stats(traces)
    ref = summarize(traces).counts_LE
    assert np.array_equal(st.summary.counts_LE, ref)
    assert np.array_equal(st.counts_prompt_LE + st.counts_gen_LE, ref)
    assert np.array_equal(st.counts_BLE.sum(axis=0), ref)
    # prompt / generated split and position buckets, cell by cell
    L, E = ref.shape
    prompt = np.zeros((L, E), np.int64)
    buckets = np.zeros((len(POSITION_EDGES), L, E), np.int64)
    pairs = np.zeros((L, E, E), np.int64)
    for t in traces:
        for r in range(t.num_tokens):
            pos = t.start + r
            b = max(i for i, e in enumerate(POSITION_EDGES) if pos >= e)
            for layer in range(L):
                if t.missing is not None and t.missing[r, layer]:
                    continue
                ids = [int(x) for x in t.expert_ids[r, layer]]
                for e in ids:
                    buckets[b, layer, e] += 1
                    if pos < t.prompt_len:
                        prompt[layer, e] += 1
                for i in ids:
                    for j in ids:
                        if i != j:
                            pairs[layer, i, j] += 1
    assert np.array_equal(st.counts_prompt_LE, prompt)
    assert np.array_equal(st.counts_BLE, buckets)
    assert st.coact_layers == (0, 1, 2)
    assert np.array_equal(st.coact_pairs_CEE, pairs)
    assert st.request_tokens_N.tolist() == [40, 25, 0, 90]
    assert st.request_prompt_N.tolist() == [10, 5, 0, 90]  # the 2nd starts at 30, prompt ends at 35
    assert np.isnan(st.request_imbalance_N[2])
    # per-request imbalance: mean over layers of max / mean of its own counts
    c = expert_counts(traces[0])
    assert np.isclose(st.request_imbalance_N[0], np.mean(c.max(axis=1) / c.mean(axis=1)))


def test_large_captures_are_cut_and_the_page_says_so():
    rng = np.random.default_rng(2)
    traces = [_random_trace(rng, f"r{i}", 30, E=16, L=4) for i in range(6)]
    lim = Limits(request_view_requests=3, request_view_tokens=20, request_view_ids=200,
                 scatter_requests=4, coactivation_cells=2 * 16 * 16)
    st = collect_stats(traces, limits=lim)
    assert st.coact_layers == (0, 3)  # evenly spaced, first and last
    assert [s.num_tokens for s in st.samples] == [20, 5]  # 200 ids / (L*K = 8) = 25 tokens
    assert st.samples_truncated
    page = render_report(traces, source="synthetic", limits=lim, ep_size=2)
    for note in ("per-request plot: 4 of 6 requests", "co-activation: 2 of 4 layers",
                 "request view: the first 2 requests"):
        assert note in page


def test_missing_routes_are_not_counted_and_are_reported():
    ids = np.array([[[0, 1]], [[0, 1]], [[2, 3]]])
    t = RoutingTrace.from_ids(ids, num_experts=4, moe_layers=[1], request_id="m", prompt_len=1,
                              missing=np.array([[False], [True], [False]]))
    st = collect_stats([t])
    assert st.summary.counts_LE.tolist() == [[1, 1, 1, 1]]  # the missing row's zeros never count
    page = render_report([t], source="m", ep_size=2)
    assert "1 (token, layer) routes are missing" in page


def test_page_is_self_contained():
    rng = np.random.default_rng(3)
    page = render_report([_random_trace(rng, "a", 20)], source="x", ep_size=2)
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=", page)
    assert not re.search(r"<link[^>]*\shref=", page)
    assert "@import" not in page
    figs = json.loads(re.search(r'id="rc-figures">(.*?)</script>', page, re.S).group(1))
    assert set(figs) == {"load-heatmap", "positions-prompt-gen", "positions-buckets",
                         "requests-scatter", "coactivation-lift", "placement-layers",
                         "placement-gpus"}


def test_no_traces_and_bad_ep_size_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no traces"):
        render_report([], source="empty")
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match=r"request 'b' has \(E, moe_layers, K\) = \(8, "):
        collect_stats([_random_trace(rng, "a", 4), _random_trace(rng, "b", 4, E=8)])
    rng = np.random.default_rng(4)
    save_file([_random_trace(rng, "a", 10)], tmp_path / "t.safetensors")
    r = run("report", str(tmp_path / "t.safetensors"), "--ep-size", "4",
            "--out", str(tmp_path / "r.html"))
    assert r.returncode == 2 and "6 + 0 = 6 is not divisible by the expert-parallel size 4" in r.stderr
    r = run("report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html"))
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_report_and_placement_errors_keep_brackets(tmp_path):
    """Errors print the message verbatim: a path such as "a[b].html" used to lose its "[b]" (read
    as rich markup) in report and placement, though not in the other commands."""
    save_file([_random_trace(np.random.default_rng(0), "a", 4)], tmp_path / "t.safetensors")
    taken = tmp_path / "a[b].html"
    taken.write_text("x")
    for cmd in (["report", str(tmp_path / "t.safetensors")],
                ["placement", str(tmp_path / "t.safetensors"), "--ep-size", "2"]):
        r = run(*cmd, "--out", str(taken))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "a[b].html: exists" in r.stderr, r.stderr


# ---- the demo capture, rendered by the command and opened in Chromium ---------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two captures of the same prompts by the built-in model: float32 and bfloat16."""
    import torch

    from routecap.capture_job import CaptureJob, run_capture_job
    from routecap.prompts import read_prompts

    base = tmp_path_factory.mktemp("demo")
    prompts = read_prompts(ROOT / "examples" / "prompts.txt")[:6]
    out = {}
    for name, dtype in (("demo-f32", torch.float32), ("demo-bf16", torch.bfloat16)):
        run_capture_job(CaptureJob(model="builtin:tiny-qwen3-moe", prompts=prompts,
                                   out_dir=base / name, max_new_tokens=12, dtype=dtype))
        out[name.removeprefix("demo-")] = base / name
    return out


def open_in_chromium(html_path: Path, screenshot: Path, sections: tuple[str, ...] = ()) -> dict:
    """Load the page in headless Chromium; return console errors, requests and what was drawn."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed and `make test` could not install it "
                    "(apt-get install chromium); the browser check needs a real browser")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.resolve().as_uri())
            page.wait_for_selector("body[data-plots-drawn]", timeout=120_000)
            plots = page.evaluate("""() => [...document.querySelectorAll('.plot')].map(el => {
                const visible = (el._fullData || []).filter(t => t.visible === true);
                const heat = [...el.querySelectorAll('g.hm image')].filter(
                    im => (im.getAttribute('href') || '').startsWith('data:image/png') &&
                          im.getBBox().width > 0);
                const bars = [...el.querySelectorAll('g.bars path')].filter(
                    p => (p.getAttribute('d') || 'M0,0Z') !== 'M0,0Z');
                const points = el.querySelectorAll('g.points path.point');
                return {id: el.id, drawn: el.dataset.drawn === '1',
                        svg: el.querySelectorAll('svg.main-svg').length,
                        types: visible.map(t => t.type), heat: heat.length,
                        bars: bars.length, points: points.length};
            })""")
            page.screenshot(path=str(screenshot), full_page=False)  # the top of the page
            status = page.inner_text("#rc-status")
            tokens = page.locator("#rv-tokens .tok")
            n_tokens = tokens.count()
            tokens.nth(min(3, n_tokens - 1)).hover()
            route = page.inner_text("#rv-route")
            for key in ("request-view",) + sections:
                page.locator(f"#{key}").screenshot(
                    path=str(screenshot.with_name(f"{screenshot.stem}-{key}.png")))
            page.select_option("#rv-layer", index=2)
            legend = page.inner_text("#rv-legend")
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "plots": plots, "tokens": n_tokens,
            "route": route, "status": status, "legend": legend}


def _check_drawn(seen: dict, page_url: str, expected_plots: int) -> None:
    assert seen["errors"] == []
    assert seen["requests"] == [page_url]  # the page itself, nothing else
    assert f"{expected_plots} plots drawn" in seen["status"]
    assert len(seen["plots"]) == expected_plots
    for p in seen["plots"]:
        assert p["drawn"] and p["svg"] >= 1 and p["types"], p
        if "heatmap" in p["types"]:
            assert p["heat"] >= p["types"].count("heatmap"), p
        if "bar" in p["types"]:
            assert p["bars"] >= 1, p
        if "scatter" in p["types"]:
            assert p["points"] >= 1, p
    assert seen["tokens"] > 0
    assert "position 3" in seen["route"] and "layer 1" in seen["route"]
    assert "at layer 3:" in seen["legend"]  # the layer menu recoloured the tokens


def test_demo_report_in_chromium(demo, tmp_path):
    out = tmp_path / "report.html"
    # run where the capture is, so the page names it as a user would see it (demo-f32)
    r = run("report", demo["f32"].name, "--ep-size", "4", "--redundant", "4", "--out", str(out),
            cwd=demo["f32"].parent)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.stat().st_size < 4_000_000
    html = out.read_text()
    assert "Expert-parallel placement" in html and "4 GPUs" in html
    shot = Path(os.environ.get("ROUTECAP_SCREENSHOT_DIR", tmp_path)) / "report.png"
    seen = open_in_chromium(out, shot)
    _check_drawn(seen, out.resolve().as_uri(), 7)
    assert shot.stat().st_size > 10_000
    # the demo model is built in: token text comes from its byte tokenizer
    assert '"text":["' in html.replace(" ", "")
    # existing output is kept unless --overwrite
    r = run("report", str(demo["f32"]), "--out", str(out))
    assert r.returncode == 2 and "pass --overwrite" in r.stderr


def test_placement_command_on_the_demo(demo, tmp_path):
    out = tmp_path / "placement.json"
    r = run("placement", str(demo["f32"]), "--ep-size", "4", "--redundant", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    rows = doc["physical_to_logical_map"]
    assert len(rows) == 4 and all(len(row) == 20 for row in rows)  # 4 decoder layers, 16 + 4 slots
    assert rows[0] == list(range(16)) + [0, 1, 2, 3]  # layer 0 is dense: trivial map
    assert "balanced placement: EP size 4, 5 slots per GPU, 4 redundant" in r.stdout
    summary = summarize(open_traces(demo["f32"]))
    from routecap.placement import plan_placement

    plan = plan_placement(summary.counts_LE, 4, redundant=4, moe_layers=summary.moe_layers)
    assert rows[1] == plan.balanced.physical_to_logical_LP[0].tolist()
    assert (plan.after_L <= plan.before_L).all()


def test_report_written_atomically(tmp_path):
    write_report(tmp_path / "a.html", "<html>é</html>")
    assert (tmp_path / "a.html").read_text() == "<html>é</html>"
    assert [p.name for p in tmp_path.iterdir()] == ["a.html"]


# ---- --vs: agreement by position ---------------------------------------------------------------
def _pair(ids_a, ids_b, *, prompt_len, tokens_a=None, tokens_b=None, rid="r", E=4):
    mk = lambda ids, tok: RoutingTrace.from_ids(  # noqa: E731
        np.array(ids), num_experts=E, moe_layers=[1], request_id=rid, prompt_len=prompt_len,
        token_ids=None if tok is None else np.array(tok, np.int32))
    return mk(ids_a, tokens_a), mk(ids_b, tokens_b)


def test_agreement_by_position_splits_prompt_generated_and_buckets():
    from routecap.analysis import agreement
    from routecap.report.agreement import agreement_by_position

    # 20 tokens, prompt 10; sets differ at positions 2 (prompt) and 17, 18 (generated, bucket 16-63)
    a_ids = [[[0, 1]]] * 20
    b_ids = [[[0, 1]]] * 20
    for p in (2, 17, 18):
        b_ids = b_ids[:p] + [[[0, 2]]] + b_ids[p + 1:]
    a, b = _pair(a_ids, b_ids, prompt_len=10)
    pa = agreement_by_position([a], [b])
    g = pa.overall.result()
    assert g.differ_L.tolist() == [3] and g.num_cells == 20
    assert g.differ_fraction == agreement(a, b).differ_fraction
    assert pa.prompt.result().differ_L.tolist() == [1] and pa.prompt.result().num_cells == 10
    assert pa.generated.result().differ_L.tolist() == [2]
    assert pa.buckets[0].result().num_cells == 16 and pa.buckets[0].result().differ_L.tolist() == [1]
    assert pa.buckets[1].result().num_cells == 4 and pa.buckets[1].result().differ_L.tolist() == [2]
    assert pa.buckets[2].num_requests == 0


def test_agreement_stops_at_the_first_different_token():
    from routecap.report.agreement import agreement_by_position

    # both generated from position 3; token 5 differs, so positions 5.. are never compared, in any
    # bucket (the later routes were computed for other contexts)
    tok_a = [9, 9, 9, 4, 4, 7, 7, 7]
    tok_b = [9, 9, 9, 4, 4, 8, 7, 7]
    a, b = _pair([[[0, 1]]] * 8, [[[0, 1]]] * 5 + [[[2, 3]]] * 3, prompt_len=3,
                 tokens_a=tok_a, tokens_b=tok_b)
    pa = agreement_by_position([a], [b])
    g = pa.overall.result()
    assert g.num_cells == 5 and g.differ_fraction == 0.0
    assert g.extra == {"diverged_requests": 1, "uncompared_positions": 3}
    assert pa.generated.result().num_cells == 2
    assert sum(c.result().num_cells for c in pa.buckets if c.num_requests) == 5


def test_agreement_needs_the_same_requests():
    from routecap.report.agreement import agreement_by_position

    a, _ = _pair([[[0, 1]]], [[[0, 1]]], prompt_len=1, rid="x")
    _, b = _pair([[[0, 1]]], [[[0, 1]]], prompt_len=1, rid="y")
    with pytest.raises(ValueError, match=r"only in the first \['x'\] \(1\), only in --vs \['y'\] \(1\)"):
        agreement_by_position([a], [b])


def test_demo_report_vs_bfloat16_in_chromium(demo, tmp_path):
    out = tmp_path / "vs.html"
    r = run("report", demo["f32"].name, "--vs", demo["bf16"].name, "--ep-size", "4",
            "--redundant", "4", "--out", str(out), cwd=demo["f32"].parent)
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert "Agreement with --vs" in html
    # float32 against bfloat16 routes differ somewhere; against itself nothing differs
    m = re.search(r"expert set differs</th><td><b>([0-9.]+)%", html)
    assert m and float(m.group(1)) > 0
    same = render_report(open_traces(demo["f32"]), source="a", vs=open_traces(demo["f32"]),
                         vs_source="a")
    assert "expert set differs</th><td><b>0.00%" in same
    shots = Path(os.environ.get("ROUTECAP_SCREENSHOT_DIR", tmp_path))
    seen = open_in_chromium(out, shots / "report-vs.png", sections=("agreement", "placement"))
    _check_drawn(seen, out.resolve().as_uri(), 10)


def test_docstring_examples():
    import doctest

    import routecap.report.build

    assert doctest.testmod(routecap.report.build).failed == 0


def test_a_capture_of_empty_requests_renders():
    import warnings

    e = RoutingTrace.from_ids(np.zeros((0, 2, 2), np.int64), num_experts=4, moe_layers=[0, 1],
                              request_id="e", prompt_len=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        page = render_report([e], source="empty", ep_size=2)
    assert '"requests":[]' in page  # nothing to show in the request view, and no crash


def test_request_view_carries_routes_byte_exact():
    import base64

    from routecap.report.page import request_view_data

    rng = np.random.default_rng(6)
    t = _random_trace(rng, "w", 5, E=300, K=3)  # uint16 ids
    t = RoutingTrace.from_ids(t.expert_ids, num_experts=300, moe_layers=t.moe_layers,
                              request_id="w", prompt_len=2, missing=rng.random((5, 3)) < 0.3,
                              token_ids=t.token_ids, topk_order="router")
    d = request_view_data([t], lambda i: f"<{i}>", moe_layers=t.moe_layers, num_experts=300, top_k=3)
    (r,) = d["requests"]
    ids = np.frombuffer(base64.b64decode(r["ids"]), "<u2").reshape(5, 3, 3)
    assert d["wide"] and np.array_equal(ids, t.expert_ids)
    miss = np.frombuffer(base64.b64decode(r["missing"]), np.uint8).reshape(5, 3).astype(bool)
    assert np.array_equal(miss, t.missing)
    assert r["text"] == [f"<{int(i)}>" for i in t.token_ids]
