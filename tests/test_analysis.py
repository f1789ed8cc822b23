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
