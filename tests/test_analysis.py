import numpy as np
import pytest

from routecap.analysis import expert_counts, summarize
from routecap.trace import RoutingTrace


def _reference_counts(trace):
    counts = np.zeros((trace.num_layers, trace.num_experts), np.int64)
    for t in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            if trace.missing is not None and trace.missing[t, layer]:
                continue
            for e in trace.expert_ids[t, layer]:
                counts[layer, e] += 1
    return counts


def test_counts_match_reference_and_skip_missing():
    rng = np.random.default_rng(0)
    ids = np.array([rng.permutation(6)[:2] for _ in range(5 * 3)]).reshape(5, 3, 2)
    miss = rng.random((5, 3)) < 0.3
    t = RoutingTrace.from_ids(ids, num_experts=6, moe_layers=[0, 2, 5], request_id="a",
                              prompt_len=5, missing=miss)
    assert np.array_equal(expert_counts(t), _reference_counts(t))
    # missing cells hold 0 but are not votes for expert 0
    assert expert_counts(t)[:, 0].sum() == _reference_counts(t)[:, 0].sum()


def test_summary_imbalance():
    # layer 0: every token to experts {0, 1}; layer 1: spread evenly over 4 experts
    ids = np.array([[[0, 1], [0, 1]], [[0, 1], [2, 3]]])
    t = RoutingTrace.from_ids(ids, num_experts=4, moe_layers=[3, 4], request_id="a", prompt_len=2)
    s = summarize([t, t])
    assert s.num_requests == 2 and s.num_tokens == 4
    assert s.counts_LE.tolist() == [[4, 4, 0, 0], [2, 2, 2, 2]]
    assert s.imbalance_L.tolist() == [2.0, 1.0]
    assert s.idle_L.tolist() == [2, 0]
    d = s.to_dict()
    assert d["layers"][0]["moe_layer"] == 3 and d["layers"][0]["imbalance"] == 2.0


def test_summary_of_empty_requests_and_mixed_models():
    e = RoutingTrace.from_ids(np.zeros((0, 1, 2), np.int64), num_experts=4, moe_layers=[0],
                              request_id="e", prompt_len=0)
    s = summarize([e])
    assert np.isnan(s.imbalance_L).all() and s.to_dict()["layers"][0]["imbalance"] is None
    other = RoutingTrace.from_ids(np.zeros((0, 1, 2), np.int64), num_experts=8, moe_layers=[0],
                                  request_id="o", prompt_len=0)
    with pytest.raises(ValueError, match="request 'o' has"):
        summarize([e, other])
    with pytest.raises(ValueError, match="no traces"):
        summarize([])


# ---- agreement ------------------------------------------------------------------------------------
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from routecap.analysis import agreement  # noqa: E402
from routecap.diff import diff_traces  # noqa: E402


def _t(rows, rid="r", tokens=None, start=0, missing=None, layers=(1, 3), order="router"):
    return RoutingTrace.from_ids(np.array(rows), num_experts=4, moe_layers=list(layers), request_id=rid,
                                 prompt_len=1, start=start, topk_order=order,
                                 token_ids=None if tokens is None else np.int32(tokens),
                                 missing=None if missing is None else np.array(missing))


def test_agreement_hand_worked():
    # 3 tokens x 2 layers, K = 2.
    #            layer 1            layer 3
    # token 0:  {0,1} vs {1,0}     {2,3} vs {2,3}     same sets; top-1 differs at layer 1
    # token 1:  {0,1} vs {0,2}     {2,3} vs {3,2}     layer 1 differs (Jaccard 1/3)
    # token 2:  {1,2} vs {1,2}     {0,3} vs missing   layer 3 not compared (missing in b)
    a = _t([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[1, 2], [0, 3]]])
    b = _t([[[1, 0], [2, 3]], [[0, 2], [3, 2]], [[1, 2], [0, 0]]], missing=[[False, False], [False, False], [False, True]])
    g = agreement(a, b)
    assert g.cells_L.tolist() == [3, 2] and g.skipped_cells == 1 and g.num_tokens == 3
    assert g.differ_L.tolist() == [1, 0] and g.differ_fraction == 1 / 5
    assert g.differ_fraction_L.tolist() == [1 / 3, 0.0]
    assert g.token_differ_fraction == 1 / 3 and g.mean_differing_layers == 1 / 3
    assert g.top1_agree_L.tolist() == [2, 1] and g.top1_agreement == 3 / 5
    assert np.allclose(g.jaccard_L, [(1 + 1 / 3 + 1) / 3, 1.0])
    # load over the compared cells: layer 1 a = {0:2, 1:3, 2:1}, b = {0:2, 1:2, 2:2}
    assert g.counts_a_LE[0].tolist() == [2, 3, 1, 0] and g.counts_b_LE[0].tolist() == [2, 2, 2, 0]
    assert np.allclose(g.load_shift_LE[0], [0, -1 / 6, 1 / 6, 0]) and np.isclose(g.load_shift_L[0], 1 / 6)
    d = g.to_dict()
    assert d["layers"][0]["moe_layer"] == 1 and d["differ_fraction"] == 0.2 and d["logprobs"] is None
    assert g.table().row_count == 3


def test_agreement_of_a_capture_with_itself_is_perfect_and_sorted_topk_hides_top1():
    a = _t([[[0, 1], [2, 3]], [[3, 1], [2, 0]]])
    g = agreement([a], [a])
    assert (g.differ_fraction, g.token_differ_fraction, g.top1_agreement, g.jaccard) == (0.0, 0.0, 1.0, 1.0)
    assert not g.load_shift_LE.any()
    s = agreement(a, a.with_sorted_topk())
    assert s.differ_fraction == 0.0 and math.isnan(s.top1_agreement) and s.to_dict()["top1_agreement"] is None


def test_k3_kl_and_extreme_ratio_by_hand():
    la = np.log(np.array([0.5, 0.5, 0.1, 0.9]))
    lb = np.log(np.array([0.5, 0.25, 0.3, 0.9]))
    g = agreement(_t([[[0, 1], [2, 3]]]), _t([[[0, 1], [2, 3]]]), logprobs_a=la, logprobs_b=lb)
    r = np.exp(lb - la)  # 1, 0.5, 3, 1
    assert np.isclose(g.k3_kl, np.mean(r - 1 - np.log(r)))
    # |log r| > ln 2: only the ratio 3 (0.5 is exactly 2 the other way: not beyond)
    assert g.num_logprobs == 4 and g.extreme_tokens == 1 and g.extreme_fraction == 0.25
    g2 = agreement(_t([[[0, 1], [2, 3]]]), _t([[[0, 1], [2, 3]]]), logprobs_a=[la[:2], la[2:]],
                   logprobs_b=torch.tensor(lb), logprob_mask=np.array([1, 1, 0, 1]), extreme_ratio=1.5)
    assert g2.num_logprobs == 3 and g2.extreme_tokens == 1  # 0.5 is beyond 1.5


def test_agreement_route_arrays_with_padding():
    a = torch.tensor([[[[0, 1]], [[2, 3]], [[-1, -1]]]])
    b = torch.tensor([[[[0, 1]], [[2, 1]], [[-1, -1]]]])
    g = agreement(a, b, num_experts=4)
    assert g.num_cells == 2 and g.skipped_cells == 0 and g.differ_fraction == 0.5


def test_agreement_errors_name_both_sides():
    a = _t([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], tokens=[5, 6])
    with pytest.raises(ValueError, match="token at position 1 is 6 in a but 7 in b: not the same sequence"):
        agreement(a, _t([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], tokens=[5, 7]))
    g = agreement(a, _t([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], tokens=[5, 7]), diverged="prefix")
    assert g.num_tokens == 1 and g.extra == {"diverged_requests": 1, "uncompared_positions": 1}
    with pytest.raises(ValueError, match=r"a has \(E, moe_layers, K\) = \(4, \(1, 3\), 2\), b has \(4, \(1, 2\), 2\)"):
        agreement(a, _t([[[0, 1], [2, 3]]], layers=(1, 2)))
    with pytest.raises(ValueError, match=r"only in a \['r'\] \(1\), only in b \['x'\] \(1\)"):
        agreement([a], [_t([[[0, 1], [2, 3]]], rid="x")])
    with pytest.raises(ValueError, match=r"a holds 2 log-probs \(2,\), b holds 3"):
        agreement(a, a, logprobs_a=[0.0, 0.0], logprobs_b=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"a has shape \(1, 2, 1, 2\), b has \(1, 3, 1, 2\)"):
        agreement(torch.zeros(1, 2, 1, 2, dtype=torch.long), torch.zeros(1, 3, 1, 2, dtype=torch.long), num_experts=4)
    with pytest.raises(ValueError, match=r"side b holds 9 at \[token 0, layer 0, slot 1\]"):
        agreement(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 9]]]), num_experts=4)


# ---- routecap diff: two precisions of the built-in model, and a capture against itself -----------------
@pytest.fixture(scope="module")
def two_precisions(tmp_path_factory):
    from routecap.builtin import load_builtin
    from routecap.files import TraceWriter
    from routecap.integrations.hf import capture_generate

    root = tmp_path_factory.mktemp("diff")
    prompts = ["Explain routing replay in RL.", "The quick brown fox", "def fibonacci(n):"]
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = load_builtin("tiny-qwen3-moe", dtype=dtype)
        enc = tok(prompts, return_tensors="pt", padding=True)
        traces, _ = capture_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=6,
                                     do_sample=False, request_ids=[f"p{i}" for i in range(3)])
        with TraceWriter(root / str(dtype).split(".")[-1]) as w:
            w.extend(traces)
    return root / "float32", root / "bfloat16"


def test_diff_float32_vs_bfloat16_differs_and_itself_agrees(two_precisions):
    f32, bf16 = two_precisions
    g = diff_traces(f32, bf16)
    assert g.num_requests == 3 and g.num_cells > 0
    assert g.differ_fraction > 0 and g.token_differ_fraction > 0
    same = diff_traces(f32, f32)
    assert (same.differ_fraction, same.token_differ_fraction, same.top1_agreement) == (0.0, 0.0, 1.0)
    assert not same.load_shift_LE.any()


def test_diff_command(two_precisions):
    import json

    f32, bf16 = two_precisions
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "routecap", "diff", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=root)
    r = run(f32, bf16, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["differ_fraction"] > 0 and d["num_requests"] == 3 and len(d["layers"]) == 3
    r = run(f32, f32.parent / "nowhere")
    assert r.returncode == 2 and "nowhere: no such file or folder" in r.stderr
