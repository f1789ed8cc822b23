import numpy as np
import pytest
import torch

from routecap.trace import FORMAT_VERSION, RoutingTrace, TraceValidationError, id_dtype_for, validate_trace


def make(T=3, L=2, K=2, E=8, **kw):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K)
    args = dict(num_experts=E, moe_layers=list(range(1, L + 1)), request_id="r", prompt_len=T)
    args.update(kw)
    return RoutingTrace.from_ids(ids, **args)


@pytest.mark.parametrize("E,dtype", [(1, np.uint8), (8, np.uint8), (256, np.uint8),
                                     (257, np.uint16), (65536, np.uint16)])
def test_narrowest_dtype(E, dtype):
    assert id_dtype_for(E) == dtype


@pytest.mark.parametrize("E", [0, -1, 65537])
def test_bad_num_experts(E):
    with pytest.raises(TraceValidationError, match=r"num_experts: expected an int in \[1, 65536\]"):
        id_dtype_for(E)


def test_from_ids_narrows_torch_and_numpy():
    ids = torch.tensor([[[255, 0]], [[7, 200]]])
    t = RoutingTrace.from_ids(ids, num_experts=256, moe_layers=[3], request_id="a", prompt_len=1)
    assert t.expert_ids.dtype == np.uint8 and t.expert_ids.tolist() == [[[255, 0]], [[7, 200]]]
    t2 = RoutingTrace.from_ids(np.array([[[300, 1]]]), num_experts=301, moe_layers=[0],
                               request_id="b", prompt_len=1)
    assert t2.expert_ids.dtype == np.uint16
    assert (t.num_tokens, t.num_layers, t.top_k, t.end) == (2, 1, 2, 2)


def test_out_of_range_id_names_the_cell():
    ids = np.array([[[0, 1]], [[2, 8]]])
    with pytest.raises(TraceValidationError) as e:
        RoutingTrace.from_ids(ids, num_experts=8, moe_layers=[0], request_id="a", prompt_len=2)
    assert "expected ids in [0, 8), got 8 at [token 1, layer 0, slot 1]" in str(e.value)
    assert e.value.field == "expert_ids"


def test_negative_id_refused():
    with pytest.raises(TraceValidationError, match="got -1 at"):
        RoutingTrace.from_ids(np.array([[[-1, 1]]]), num_experts=8, moe_layers=[0],
                              request_id="a", prompt_len=1)


def test_missing_mask_costs_nothing_when_empty_and_hides_garbage():
    t = make(missing=np.zeros((3, 2), bool))
    assert t.missing is None and t.num_missing == 0
    ids = np.full((2, 1, 2), 99)  # garbage under the mask is allowed in from_ids and zeroed
    ids[0, 0] = [1, 2]
    miss = np.array([[False], [True]])
    t = RoutingTrace.from_ids(ids, num_experts=8, moe_layers=[0], request_id="a",
                              prompt_len=2, missing=miss)
    assert t.expert_ids[1].tolist() == [[0, 0]]
    assert t.to_numpy().tolist() == [[[1, 2]], [[-1, -1]]]
    assert t.num_missing == 1


def test_constructor_refuses_nonzero_under_mask():
    with pytest.raises(TraceValidationError, match="0 in every cell marked missing"):
        RoutingTrace(expert_ids=np.array([[[1, 2]]], np.uint8), num_experts=8, moe_layers=(0,),
                     request_id="a", prompt_len=1, missing=np.array([[True]]))


def test_duplicate_ids_in_a_row_refused():
    with pytest.raises(TraceValidationError, match=r"2 distinct ids in each row, got \[3, 3\]"):
        RoutingTrace.from_ids(np.array([[[3, 3]]]), num_experts=8, moe_layers=[0],
                              request_id="a", prompt_len=1)


@pytest.mark.parametrize(
    "kw,field,text",
    [
        (dict(moe_layers=(1,)), "moe_layers", "expected 2 entries (one per L of expert_ids), got 1"),
        (dict(moe_layers=(2, 1)), "moe_layers", "strictly increasing"),
        (dict(request_id=5), "request_id", "expected a str, got int"),
        (dict(start=-1), "start", "expected a non-negative int, got -1"),
        (dict(prompt_len=1.5), "prompt_len", "expected a non-negative int, got 1.5"),
        (dict(topk_order="random"), "topk_order", "expected one of ('router', 'sorted')"),
        (dict(format_version=FORMAT_VERSION + 1), "format_version", f"expected {FORMAT_VERSION}"),
        (dict(token_ids=np.zeros(3, np.int64)), "token_ids", "int32 array of shape (3,)"),
        (dict(missing=np.ones((3, 1), bool)), "missing", "bool array of shape (3, 2)"),
        (dict(extra={"x": object()}), "extra", "JSON-serialisable"),
        (dict(num_experts=300), "expert_ids", "expected dtype uint16"),
    ],
)
def test_each_field_validated(kw, field, text):
    base = make()
    args = dict(expert_ids=base.expert_ids, num_experts=8, moe_layers=(1, 2), request_id="r",
                prompt_len=3)
    args.update(kw)
    with pytest.raises(TraceValidationError) as e:
        RoutingTrace(**args)
    assert e.value.field == field
    assert text in str(e.value)


def test_expert_ids_must_be_narrow_numpy():
    with pytest.raises(TraceValidationError, match="expected dtype uint8.*got dtype int64"):
        RoutingTrace(expert_ids=np.zeros((1, 1, 1), np.int64), num_experts=4, moe_layers=(0,),
                     request_id="a", prompt_len=1)
    with pytest.raises(TraceValidationError, match="a numpy array, got Tensor"):
        RoutingTrace(expert_ids=torch.zeros(1, 1, 1), num_experts=4, moe_layers=(0,),
                     request_id="a", prompt_len=1)


def test_zero_rows_is_a_valid_trace():
    t = RoutingTrace.from_ids(np.zeros((0, 2, 4), np.int64), num_experts=16, moe_layers=[0, 1],
                              request_id="empty", prompt_len=0)
    assert t.num_tokens == 0 and t.to_numpy().shape == (0, 2, 4)


def test_slice_keeps_absolute_positions():
    t = make(T=5, token_ids=np.arange(5, dtype=np.int32), start=10)
    s = t.slice(12, 14)
    assert (s.start, s.num_tokens, s.end) == (12, 2, 14)
    assert np.array_equal(s.expert_ids, t.expert_ids[2:4])
    assert s.token_ids.tolist() == [2, 3]
    with pytest.raises(TraceValidationError, match="slice"):
        t.slice(9, 12)


def test_sorted_topk_and_its_check():
    t = make(T=4, K=3)
    s = t.with_sorted_topk()
    assert s.topk_order == "sorted"
    assert np.array_equal(s.expert_ids, np.sort(t.expert_ids, axis=-1))
    assert {tuple(r) for r in s.expert_ids.reshape(-1, 3)} == {
        tuple(sorted(r)) for r in t.expert_ids.reshape(-1, 3)}
    with pytest.raises(TraceValidationError, match="ascending"):
        RoutingTrace(expert_ids=np.array([[[2, 1]]], np.uint8), num_experts=4, moe_layers=(0,),
                     request_id="a", prompt_len=1, topk_order="sorted")


def test_equals_and_metadata():
    a, b = make(), make()
    assert a.equals(b)
    assert not a.equals(make(request_id="other"))
    md = a.metadata()
    assert md["dtype"] == "uint8" and md["moe_layers"] == [1, 2] and md["top_k"] == 2


def test_from_verified_checks_metadata_and_trusts_the_ids():
    """The trusted constructor (readers of verified bytes): metadata, shapes and dtypes checked,
    the ids neither rescanned nor copied."""
    ids = np.array([[[1, 2]], [[3, 0]]], np.uint8)
    ids.flags.writeable = False  # a read-only view (a memory-mapped file) stays one
    t = RoutingTrace.from_verified(expert_ids=ids, num_experts=4, moe_layers=[5], request_id="r",
                                   prompt_len=2, missing=np.zeros((2, 1), bool), extra={"a": 1})
    assert t.expert_ids is ids and t.moe_layers == (5,) and t.missing is None
    assert t.equals(RoutingTrace.from_ids(ids, num_experts=4, moe_layers=[5], request_id="r",
                                          prompt_len=2, extra={"a": 1}))
    bad = dict(expert_ids=ids, num_experts=4, moe_layers=[5], request_id="r", prompt_len=2)
    for change, text in [
        (dict(moe_layers=[5, 6]), "moe_layers: expected 1 entries"),
        (dict(request_id=7), "request_id: expected a str"),
        (dict(expert_ids=ids.astype(np.uint16)), "dtype uint8"),
        (dict(missing=np.zeros((3, 1), bool)), "missing: expected None or a bool array of shape (2, 1)"),
        (dict(prompt_len=-1), "prompt_len: expected a non-negative int"),
        (dict(extra=[1]), "extra: expected a dict"),
    ]:
        with pytest.raises(TraceValidationError) as e:
            RoutingTrace.from_verified(**{**bad, **change})
        assert text in str(e.value), (text, str(e.value))
    # what it trusts is not checked: an id out of range passes here, and validate_trace says so
    wrong = RoutingTrace.from_verified(**{**bad, "expert_ids": np.array([[[1, 9]], [[3, 0]]], np.uint8)})
    with pytest.raises(TraceValidationError, match="ids in \\[0, 4\\)"):
        validate_trace(wrong)
