"""The RL tensor contract (routecap.align): hand-worked tensors for each case, properties, errors."""

import numpy as np
import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routecap.align import (AlignError, batch_routes, concat_turns, packed_routes, trace_cells,
                            trace_from_cells, unbatch_routes, unpack_routes)
from routecap.align_export import (from_megatron, from_slime, from_verl, megatron_align_size,
                                   to_megatron, to_slime, to_verl)
from routecap.align_parallel import (cp_positions, cp_slice, cp_unslice, pad_to_multiple, sp_slice,
                                     sp_unslice)
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


# ---- packed sequences ----------------------------------------------------------------------------
def test_packed_sequences_with_cu_seqlens_and_tail_padding():
    # seq a: tokens [5 6 7] (2 routed), seq b: tokens [9 10] (1 routed), packed into 6 rows
    a = _trace([[[3, 1]], [[0, 2]]], rid="a", tokens=[5, 6])
    b = _trace([[[2, 3]]], rid="b", prompt_len=1, tokens=[9])
    ids = torch.tensor([[5, 6, 7, 9, 10, 0]])
    r = packed_routes([a, b], torch.tensor([0, 3, 5]), ids)
    assert r.shape == (6, 1, 2)
    assert r[:, 0].tolist() == [[3, 1], [0, 2], [M, M],   # a, last token missing
                                [2, 3], [M, M],           # b
                                [M, M]]                   # tail padding
    rows = unpack_routes(r, [0, 3, 5])
    assert [x.shape[0] for x in rows] == [3, 2] and rows[1][:, 0].tolist() == [[2, 3], [M, M]]
    with pytest.raises(AlignError, match=r"sequence 1 \(request 'b', rows \[3, 5\)\): token at position 0 is 8 in the batch but 9 in the trace"):
        packed_routes([a, b], [0, 3, 5], torch.tensor([5, 6, 7, 8, 10, 0]))
    with pytest.raises(AlignError, match="cu_seqlens: expected 3 offsets for 2 traces, got 2"):
        packed_routes([a, b], [0, 3])
    with pytest.raises(AlignError, match="cu_seqlens ends at 5 but the packed batch holds 4 tokens"):
        packed_routes([a, b], [0, 3, 5], total_tokens=4)


# ---- multi-turn ------------------------------------------------------------------------------------
def test_multi_turn_concatenation_with_offsets():
    # turn 0: prompt 2 + 2 generated -> positions [0, 3); turn 1 reused the KV cache, its prefill
    # computed position 3 (turn 0's last token) onwards -> [3, 5)
    t0 = _trace([[[1, 2]], [[3, 4]], [[5, 6]]], rid="c", tokens=[10, 11, 12])
    t1 = _trace([[[7, 0]], [[1, 3]]], rid="c", start=3, prompt_len=5, tokens=[13, 14],
                missing=[[False], [True]])
    c = concat_turns([t0, t1])
    assert (c.start, c.end, c.prompt_len, c.extra["turns"]) == (0, 5, 2, [[0, 3], [3, 5]])
    assert c.to_numpy()[:, 0].tolist() == [[1, 2], [3, 4], [5, 6], [7, 0], [M, M]]
    assert c.token_ids.tolist() == [10, 11, 12, 13, 14]
    # the whole conversation aligned in one row: turn 1's final token has no route
    r = batch_routes([c], torch.tensor([[10, 11, 12, 13, 14, 15]]))
    assert r[0, :, 0].tolist() == [[1, 2], [3, 4], [5, 6], [7, 0], [M, M], [M, M]]


def test_multi_turn_gap_and_overlap_name_the_positions():
    t0 = _trace([[[1, 2]], [[3, 4]]], rid="c")
    gap = _trace([[[5, 6]]], rid="c", start=3)
    with pytest.raises(AlignError, match=r"gap at positions \[2, 3\): turn 0 \(request 'c'\) covers \[0, 2\), turn 1 \(request 'c'\) covers \[3, 4\)"):
        concat_turns([t0, gap])
    over = _trace([[[5, 6]], [[1, 2]]], rid="c", start=1)
    with pytest.raises(AlignError, match=r"overlap at positions \[1, 2\): turn 0 \(request 'c'\) covers \[0, 2\), turn 1 \(request 'c'\) covers \[1, 3\)"):
        concat_turns([t0, over])
    with pytest.raises(AlignError, match="has E=8, moe_layers=\\[1, 2\\]"):
        concat_turns([t0, _trace([[[5, 6], [1, 2]]], start=2, layers=(1, 2))])


# ---- context and sequence parallelism --------------------------------------------------------------
def test_cp_contiguous_and_zigzag_hand_worked():
    r = np.arange(8).reshape(8, 1, 1)  # row p holds id p
    # contiguous over 2: [0..3] [4..7]; zigzag over 2: chunks of 2 -> rank 0 {0, 3}, rank 1 {1, 2}
    assert [cp_slice(r, 2, k, mode="contiguous").ravel().tolist() for k in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [cp_slice(r, 2, k).ravel().tolist() for k in range(2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    # zigzag over 4 of 8 rows: chunks of 1 -> rank k holds k and 7 - k
    assert [cp_slice(r, 4, k).ravel().tolist() for k in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # packed: two sequences of 4, each split on its own (THD)
    assert cp_slice(r, 2, 1, cu_seqlens=[0, 4, 8]).ravel().tolist() == [1, 2, 5, 6]
    # batched [B, S, L, K]: every row split along S
    rb = torch.arange(8).reshape(2, 4, 1, 1)
    assert cp_slice(rb, 2, 0).reshape(2, 2).tolist() == [[0, 3], [4, 7]]
    assert torch.equal(cp_unslice([cp_slice(rb, 2, k) for k in range(2)]), rb)


def test_sp_slices_are_contiguous_rank_order():
    r = torch.arange(6).reshape(6, 1, 1)
    assert [sp_slice(r, 3, k).ravel().tolist() for k in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(sp_unslice([sp_slice(r, 3, k) for k in range(3)]), r)


def test_pad_to_multiple_pads_each_sequence_with_minus_one():
    r, cu = pad_to_multiple(torch.tensor([[[1]], [[2]], [[3]], [[4]], [[5]]]), [0, 3, 5], 4)
    assert r.ravel().tolist() == [1, 2, 3, M, 4, 5, M, M] and cu.tolist() == [0, 4, 8]


def test_parallel_errors_name_both_sides():
    r = np.zeros((6, 1, 1), np.int64)
    with pytest.raises(AlignError, match=r"a sequence of 6 tokens does not split into 4 equal chunks \(zigzag CP over cp_size=2 ranks\); pad it to a multiple of 4"):
        cp_slice(r, 2, 0)
    with pytest.raises(AlignError, match=r"sequence 1 \(rows \[4, 6\)\): a sequence of 2 tokens does not split into 4 equal chunks \(contiguous CP over cp_size=4 ranks\)"):
        cp_slice(r, 4, 0, mode="contiguous", cu_seqlens=[0, 4, 6])
    with pytest.raises(AlignError, match=r"cp_rank: expected an int in \[0, 2\), got 2"):
        cp_positions(8, 2, 2)
    with pytest.raises(AlignError, match="cu_seqlens ends at 5 but the routes hold 6 rows"):
        cp_slice(r, 1, 0, cu_seqlens=[0, 5])
    with pytest.raises(AlignError, match="6 token rows do not split over tp_size=4 ranks"):
        sp_slice(r, 4, 0)


# ---- exports ---------------------------------------------------------------------------------------
def _hand_batch():
    a = _trace([[[3, 1], [0, 5]], [[0, 2], [4, 6]], [[1, 2], [7, 3]]], rid="a", layers=(1, 3))
    b = _trace([[[2, 3], [5, 1]]], rid="b", prompt_len=1, layers=(1, 3))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return [a, b], batch_routes([a, b], torch.zeros(2, 4, dtype=torch.long), mask), mask


def test_megatron_hand_worked_tp2_cp1():
    _, r, mask = _hand_batch()
    # packed: a = 4 rows (3 routed + last), b = 2 rows (1 routed + last); tp 2 pads to even: no-op
    d0 = to_megatron(r, mask, tp_size=2, tp_rank=0, fill=0)
    d1 = to_megatron(r, mask, tp_size=2, tp_rank=1, fill=0)
    assert d0.cu_seqlens_padded.tolist() == [0, 4, 6]
    assert len(d0.topk_indices_L) == 2 and d0.topk_indices_L[0].dtype == torch.int64
    assert d0.topk_indices_L[0].tolist() == [[3, 1], [0, 2], [1, 2]]            # a's rows 0-2
    assert d1.topk_indices_L[0].tolist() == [[0, 0], [2, 3], [0, 0]]            # a's last, b
    assert d1.topk_indices_L[1].tolist() == [[0, 0], [5, 1], [0, 0]]
    assert d0.replay_mask_N.tolist() == [True, True, True] and d1.replay_mask_N.tolist() == [False, True, False]
    assert torch.equal(from_megatron([[d0, d1]], mask), r)


def test_megatron_hand_worked_cp2_zigzag():
    _, r, mask = _hand_batch()
    # cp 2, tp 1: each sequence padded to a multiple of 4: a = 4 rows, b = 2 + 2 padding rows;
    # zigzag chunks of 1 row: rank 0 holds rows {0, 3} of each sequence, rank 1 rows {1, 2}
    d = [to_megatron(r, mask, cp_size=2, cp_rank=k, fill=15) for k in range(2)]
    assert d[0].cu_seqlens_padded.tolist() == [0, 4, 8]
    assert d[0].topk_indices_L[0].tolist() == [[3, 1], [15, 15], [2, 3], [15, 15]]
    assert d[1].topk_indices_L[0].tolist() == [[0, 2], [1, 2], [15, 15], [15, 15]]
    assert torch.equal(from_megatron([[d[0]], [d[1]]], mask), r)


def test_megatron_refuses_to_invent_routes():
    _, r, mask = _hand_batch()
    with pytest.raises(AlignError, match=r"4 of 6 \(token, layer\) cells on rank \(cp 0, tp 1\) have no route .* pass fill=<expert id>"):
        to_megatron(r, mask, tp_size=2, tp_rank=1)


def test_verl_layout_hand_worked_and_back():
    traces, r, mask = _hand_batch()
    re, rm = to_verl(r, mask, moe_layers=[1, 3], num_layers=4)
    assert re.shape == (2, 4, 4, 2) and re.dtype == torch.int16
    assert re[0, 0].tolist() == [[0, 0], [3, 1], [0, 0], [0, 5]]   # dense layers 0 and 2 are zero
    assert (re[0, 3] == 0).all() and (re[1, 1:] == 0).all()         # placeholders
    assert rm.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert torch.equal(from_verl(re, mask, moe_layers=[1, 3], replay_mask_BS=rm), r)
    # without the mask, all-zero rows (K > 1) cannot be routes and come back missing
    assert torch.equal(from_verl(re, mask, moe_layers=[1, 3]), r)
    # R2 layout: MoE layers only
    re2, _ = to_verl(r, mask, moe_layers=[1, 3])
    assert re2.shape == (2, 4, 2, 2) and torch.equal(from_verl(re2, mask, moe_layers=[1, 3], replay_mask_BS=rm), r)
    bad = re.clone()
    bad[0, 0, 2] = 4
    with pytest.raises(AlignError, match=r"layer 2 is not in moe_layers \[1, 3\] but holds non-zero ids"):
        from_verl(bad, mask, moe_layers=[1, 3])


def test_slime_layout_and_back():
    t = _trace([[[3, 1], [0, 5]], [[0, 2], [4, 6]]], rid="s", layers=(1, 3), missing=[[False, True], [False, False]])
    arr = to_slime(t, num_layers=4)
    assert arr.dtype == np.int32 and arr.shape == (2, 4, 2)
    assert arr[0].tolist() == [[0, 0], [3, 1], [0, 0], [M, M]]
    back = from_slime(arr, moe_layers=[1, 3], num_experts=8, request_id="s", prompt_len=2)
    assert back.equals(t)
    with pytest.raises(AlignError, match="starts at position 2; slime's rows start at position 0"):
        to_slime(_trace([[[3, 1]]], start=2), num_layers=2)


def test_round_trips_are_byte_exact_on_valid_cells():
    traces, r, mask = _hand_batch()
    # traces -> Megatron (tp 2, cp 2) -> back -> traces
    d = [[to_megatron(r, mask, tp_size=2, tp_rank=t, cp_size=2, cp_rank=c, fill=0) for t in range(2)] for c in range(2)]
    back = unbatch_routes(from_megatron(d, mask), mask)
    for t, row in zip(traces, back):
        again = trace_from_cells(row[:t.num_tokens], num_experts=8, moe_layers=t.moe_layers,
                                 request_id=t.request_id, prompt_len=t.prompt_len)
        assert again.equals(t) and again.expert_ids.tobytes() == t.expert_ids.tobytes()
    # traces -> verl routed_experts -> back
    re, rm = to_verl(r, mask, moe_layers=[1, 3], num_layers=4)
    back = unbatch_routes(from_verl(re, mask, moe_layers=[1, 3], replay_mask_BS=rm), mask)
    for t, row in zip(traces, back):
        assert trace_from_cells(row[:t.num_tokens], num_experts=8, moe_layers=t.moe_layers,
                                request_id=t.request_id, prompt_len=t.prompt_len).equals(t)


# ---- engine outputs through the adapters -----------------------------------------------------------
def _engine_case():
    """Two requests of a model with 4 decoder layers, MoE at 1 and 3, E = 8, K = 2."""
    rng = np.random.default_rng(3)
    reqs = []
    for rid, (P, G) in {"x": (3, 3), "y": (2, 4)}.items():
        T = P + G - 1
        full = np.zeros((T, 4, 2), np.int32)                      # [T, A, K], dense layers zero
        for t in range(T):
            for layer in (1, 3):
                full[t, layer] = rng.permutation(8)[:2]
        tokens = rng.integers(3, 100, P + G).astype(np.int32)
        reqs.append((rid, P, G, full, tokens))
    return reqs


def test_vllm_and_sglang_responses_align_like_routecap_traces():
    import base64
    import io
    from types import SimpleNamespace

    from routecap.integrations.sglang import from_sglang
    from routecap.integrations.vllm import from_request_output, from_vllm_b64npy

    reqs = _engine_case()
    own = [RoutingTrace.from_ids(full[:, [1, 3]], num_experts=8, moe_layers=[1, 3], request_id=rid,
                                 prompt_len=P, token_ids=tokens[:-1])
           for rid, P, G, full, tokens in reqs]
    cu = np.cumsum([0] + [P + G for _, P, G, _, _ in reqs])
    ids = torch.from_numpy(np.concatenate([tokens for *_, tokens in reqs]).astype(np.int64))[None]
    want = packed_routes(own, cu, ids)

    # SGLang: meta_info with base64 of raw int32 [T, A, K]
    sg = [from_sglang({"id": rid, "routed_experts": base64.b64encode(full.tobytes()).decode(),
                       "prompt_tokens": P, "completion_tokens": G},
                      num_layers=4, top_k=2, moe_layers=[1, 3], num_experts=8,
                      token_ids=tokens[:-1])
          for rid, P, G, full, tokens in reqs]
    assert torch.equal(packed_routes(sg, cu, ids), want)

    # vLLM OpenAI server: base64 of an .npy
    def b64npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return base64.b64encode(buf.getvalue()).decode()
    vl = [from_vllm_b64npy(b64npy(full), moe_layers=[1, 3], num_experts=8, request_id=rid,
                           prompt_len=P, token_ids=tokens[:-1])
          for rid, P, G, full, tokens in reqs]
    assert torch.equal(packed_routes(vl, cu, ids), want)

    # vLLM LLM.generate RequestOutput, dense layers found from a config
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0, 2])
    outs = []
    for rid, P, _G, full, tokens in reqs:
        ro = SimpleNamespace(request_id=rid, prompt_token_ids=tokens[:P].tolist(), outputs=[
            SimpleNamespace(index=0, token_ids=tokens[P:].tolist(), routed_experts=full)])
        outs += from_request_output(ro, cfg)
    assert torch.equal(packed_routes(outs, cu, ids), want)


# ---- property: align then un-align is the identity on every valid cell -----------------------------
@st.composite
def _batches(draw):
    L, K = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    E = draw(st.integers(K, 9))
    B = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    traces, lengths = [], []
    for b in range(B):
        n = draw(st.integers(0, 9))
        T = max(0, n - draw(st.integers(0, 1)))  # the last token may have no route
        start = min(T, draw(st.integers(0, 2)))
        ids = np.array([[rng.permutation(E)[:K] for _ in range(L)] for _ in range(T - start)], np.int64).reshape(T - start, L, K)
        miss = rng.random((T - start, L)) < 0.2
        traces.append(RoutingTrace.from_ids(ids, num_experts=E, moe_layers=list(range(L)), request_id=str(b),
                                            prompt_len=1, start=start, missing=miss))
        lengths.append(n)
    S = max(lengths) + draw(st.integers(0, 2))
    left = draw(st.booleans())
    mask = np.zeros((B, S), np.int64)
    for b, n in enumerate(lengths):
        if left:
            mask[b, S - n:] = 1
        else:
            mask[b, :n] = 1
    tp, cp = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["zigzag", "contiguous"]))
    return traces, lengths, torch.from_numpy(mask), tp, cp, mode


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_batches())
def test_property_align_unalign_identity(case):
    traces, lengths, mask, tp, cp, mode = case
    B, S = mask.shape
    r = batch_routes(traces, torch.zeros(B, S, dtype=torch.long), mask)
    # padded batch <-> per-row cells
    rows = unbatch_routes(r, mask)
    for t, n, row in zip(traces, lengths, rows):
        assert np.array_equal(row, trace_cells(t, 0, n))
    # packed <-> per-sequence cells
    cu = np.concatenate([[0], np.cumsum(lengths)])
    p = packed_routes(traces, cu)
    assert all(np.array_equal(a, b) for a, b in zip(unpack_routes(p, cu), rows))
    # CP (either mode) then SP, every rank, then back
    padded, cu_p = pad_to_multiple(p, cu, megatron_align_size(tp, cp))
    local = [cp_slice(padded, cp, k, mode=mode, cu_seqlens=cu_p) for k in range(cp)]
    assert torch.equal(cp_unslice(local, mode=mode, cu_seqlens=cu_p), padded)
    assert all(torch.equal(sp_unslice([sp_slice(x, tp, j) for j in range(tp)]), x) for x in local)
    # Megatron RouterReplay data of every (cp, tp) rank, then back
    d = [[to_megatron(r, mask, tp_size=tp, tp_rank=j, cp_size=cp, cp_rank=k, cp_mode=mode, fill=0)
          for j in range(tp)] for k in range(cp)]
    assert torch.equal(from_megatron(d, mask, cp_mode=mode), r)
    # verl routed_experts and back: tokens replayed whole; a token with a missing layer goes native
    L = traces[0].num_layers
    re, rm = to_verl(r, mask, moe_layers=list(range(1, 2 * L, 2)), num_layers=2 * L)
    back = from_verl(re, mask, moe_layers=list(range(1, 2 * L, 2)), replay_mask_BS=rm)
    whole = (r != M).all(-1).all(-1)
    assert torch.equal(back[whole], r[whole]) and (back[~whole] == M).all()


# ---- the docstring examples of the align modules run as written -----------------------------------
@pytest.mark.parametrize("name", ["routecap.align", "routecap.align_parallel", "routecap.align_export",
                                  "routecap.agreement"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
