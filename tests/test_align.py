"""The RL tensor contract (routecap.align): hand-worked tensors for each case, properties, errors."""

import numpy as np
import pytest
import torch

from routecap.align import AlignError, batch_routes, trace_cells, trace_from_cells, unbatch_routes
from routecap.trace import RoutingTrace

M = -1  # a missing cell, in the hand-drawn expectations


def _trace(rows, *, rid="r", start=0, prompt_len=2, tokens=None, missing=None, E=8, layers=(1,)):
    return RoutingTrace.from_ids(np.array(rows), num_experts=E, moe_layers=list(layers),
                                 request_id=rid, prompt_len=prompt_len, start=start,
                                 token_ids=None if tokens is None else np.int32(tokens),
                                 missing=None if missing is None else np.array(missing))


# ---- padded batches ------------------------------------------------------------------------------
def test_right_padding_and_last_token_missing():
    # row 0: prompt [5 6] + completion [7 8]: 3 routed positions, the 4th (8) never ran
    # row 1: prompt [9] + completion [10]: 1 routed position, then 2 padding columns
    a = _trace([[[3, 1]], [[0, 2]], [[1, 2]]], rid="a", tokens=[5, 6, 7])
    b = _trace([[[2, 3]]], rid="b", prompt_len=1, tokens=[9])
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    r = batch_routes([a, b], ids, mask)
    assert r.shape == (2, 4, 1, 2) and r.dtype == torch.int64
    assert r[:, :, 0].tolist() == [
        [[3, 1], [0, 2], [1, 2], [M, M]],   # last token: missing
        [[2, 3], [M, M], [M, M], [M, M]],   # last token, then padding: never expert 0
    ]


def test_left_padding_is_aligned_by_the_mask():
    a = _trace([[[3, 1]], [[0, 2]]], tokens=[5, 6])
    r = batch_routes([a], torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]]))
    assert r[0, :, 0].tolist() == [[M, M], [3, 1], [0, 2], [M, M]]


def test_last_token_error_policy_and_full_traces():
    a = _trace([[[3, 1]], [[0, 2]]])
    with pytest.raises(AlignError, match=r"row 0 \(request 'r'\): the row holds 3 tokens but the trace ends at position 2: no route for the last token"):
        batch_routes([a], torch.zeros(1, 3, dtype=torch.long), last_token="error")
    # a trace re-captured over the full sequence covers the last token too: no -1 left
    assert batch_routes([a], torch.zeros(1, 2, dtype=torch.long), last_token="error")[0, :, 0].tolist() == [[3, 1], [0, 2]]


def test_missing_cells_and_later_turn_traces_are_minus_one():
    # a trace of the latest turn only (start 2) and a cell marked missing at position 3, layer 0
    t = _trace([[[1, 2], [3, 4]], [[5, 6], [7, 0]]], start=2, missing=[[False, False], [True, False]],
               layers=(1, 3), prompt_len=3)
    r = batch_routes([t], torch.zeros(1, 5, dtype=torch.long))
    assert r[0].tolist() == [
        [[M, M], [M, M]],
        [[M, M], [M, M]],
        [[1, 2], [3, 4]],
        [[M, M], [7, 0]],
        [[M, M], [M, M]],
    ]


def test_none_trace_row_is_all_missing_and_device_dtype_follow():
    a = _trace([[[3, 1]]])
    r = batch_routes([None, a], torch.zeros(2, 2, dtype=torch.long), dtype=torch.int32)
    assert r.dtype == torch.int32 and (r[0] == M).all() and r[1, 0, 0].tolist() == [3, 1]


def test_unbatch_inverts_batch():
    a = _trace([[[3, 1]], [[0, 2]], [[1, 2]]])
    b = _trace([[[2, 3]]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    rows = unbatch_routes(batch_routes([a, b], torch.zeros(2, 4, dtype=torch.long), mask), mask)
    assert np.array_equal(rows[0][:3], a.to_numpy()) and (rows[0][3] == M).all()
    assert np.array_equal(rows[1][:1], b.to_numpy()) and rows[1].shape == (2, 1, 2)


def test_trace_cells_and_back():
    t = _trace([[[3, 1]], [[0, 2]]], start=1, missing=[[False], [True]])
    cells = trace_cells(t, 0, 4)
    assert cells[:, 0].tolist() == [[M, M], [3, 1], [M, M], [M, M]]
    back = trace_from_cells(cells[1:3], num_experts=8, moe_layers=[1], request_id="r", prompt_len=2, start=1)
    assert back.equals(t)
    with pytest.raises(AlignError, match=r"cell \[position 2, layer 0\] is partly -1"):
        trace_from_cells(np.array([[[3, 1]], [[M, 2]]]), num_experts=8, moe_layers=[1],
                         request_id="r", prompt_len=2, start=1)


# ---- errors name both sides ----------------------------------------------------------------------
def test_errors_name_both_sides():
    a = _trace([[[3, 1]], [[0, 2]]], rid="a", tokens=[5, 6])
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(AlignError, match="input_ids has B=1 rows, got 2 traces"):
        batch_routes([a, a], ids)
    with pytest.raises(AlignError, match=r"covers positions \[0, 2\) but the row holds 1 tokens"):
        batch_routes([a], ids[:, :1])
    with pytest.raises(AlignError, match=r"the row holds 5 tokens but the trace ends at position 2: no route for the last 3 tokens"):
        batch_routes([a], torch.tensor([[5, 6, 7, 8, 9]]))
    with pytest.raises(AlignError, match="token at position 1 is 9 in the batch but 6 in the trace"):
        batch_routes([a], torch.tensor([[5, 9, 7]]))
    other = _trace([[[3, 1], [0, 1]]], rid="o", layers=(1, 2))
    with pytest.raises(AlignError, match=r"traces\[1\] \(request 'o'\) has E=8, moe_layers=\[1, 2\], K=2; traces\[0\] \(request 'a'\) has E=8, moe_layers=\[1\], K=2"):
        batch_routes([a, other], torch.tensor([[5, 6, 7], [1, 1, 0]]))
    with pytest.raises(AlignError, match="a 0 at column 1 between 1s at columns 0 and 2"):
        batch_routes([a], ids, torch.tensor([[1, 0, 1]]))
    with pytest.raises(AlignError, match=r"attention_mask: expected the input_ids shape \(1, 3\), got \(1, 2\)"):
        batch_routes([a], ids, torch.ones(1, 2))
    with pytest.raises(AlignError, match="last_token: expected one of"):
        batch_routes([a], ids, last_token="native")
