import warnings

import numpy as np
import pytest
import torch

from routecap.capturer import CaptureError, CaptureSpec, StepCapturer


class Sink:
    def __init__(self):
        self.steps = []

    def __call__(self, snap):
        # the arrays are only valid during the call: copy them
        self.steps.append((snap.step, snap.expert_ids_NLK.copy(), snap.valid_NL.copy(), snap.tag))


def capturer(L=2, K=2, E=8, strict=True, max_tokens=4):
    sink = Sink()
    cap = StepCapturer(CaptureSpec(num_layers=L, top_k=K, num_experts=E, max_tokens=max_tokens),
                       device="cpu", sink=sink, strict=strict)
    return cap, sink


def ids(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_one_step_all_layers():
    cap, sink = capturer()
    cap.begin_step(2, tag="t0")
    cap.capture(0, ids([1, 2], [3, 4]))
    cap.capture(1, ids([5, 6], [7, 0]))
    cap.end_step()
    cap.drain()
    step, got, valid, tag = sink.steps[0]
    assert (step, tag) == (0, "t0")
    assert got.dtype == np.uint8
    assert got.tolist() == [[[1, 2], [5, 6]], [[3, 4], [7, 0]]]
    assert valid.all()


def test_layer_not_written_this_step_is_missing_not_stale():
    # step 0 writes both layers; step 1 writes only layer 0: layer 1's rows of step 1 must be
    # missing, never the values left in the buffer by step 0
    cap, sink = capturer()
    cap.begin_step(2)
    cap.capture(0, ids([1, 2], [3, 4]))
    cap.capture(1, ids([5, 6], [7, 1]))
    cap.end_step()
    cap.begin_step(2)
    cap.capture(0, ids([2, 3], [4, 5]))
    cap.end_step()
    _, _, valid, _ = sink.steps[1]
    assert valid.tolist() == [[True, False], [True, False]]


def test_shorter_step_after_longer_one():
    # step 1 is shorter than step 0 and only layer 0 writes: the rows step 0 left in the buffer
    # (layer 1, and rows 1-2 of both layers) must never come back as step 1's routes
    cap, sink = capturer(L=2)
    cap.begin_step(3)
    cap.capture(0, ids([1, 2], [3, 4], [5, 6]))
    cap.capture(1, ids([6, 5], [4, 3], [2, 1]))
    cap.end_step()
    cap.begin_step(1)
    cap.capture(0, ids([7, 0]))
    cap.end_step()
    cap.drain()
    assert len(sink.steps) == 2
    _, got, valid, _ = sink.steps[1]
    assert got.shape == (1, 2, 2) and valid.shape == (1, 2)
    assert got[0, 0].tolist() == [7, 0]
    assert valid.tolist() == [[True, False]]  # layer 1 holds step 0's [6, 5]: missing, not stale


def test_zero_token_step():
    cap, sink = capturer(L=1)
    cap.begin_step(0)
    cap.capture(0, torch.zeros(0, 2, dtype=torch.int64))
    cap.end_step()
    assert sink.steps[0][1].shape == (0, 1, 2)


@pytest.mark.parametrize(
    "layer,value,kind,text",
    [
        (0, ids([1, 2, 3], [4, 5, 6]), "shape", "expected ids of shape [N, K=2], got (2, 3)"),
        (0, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "dtype", "expected integer expert ids, got dtype torch.float32"),
        (5, ids([1, 2], [3, 4]), "layer", "expected layer in [0, 2), got 5"),
        (0, ids([1, 2]), "rows", "the router saw N=1 rows, which does not fit the declared layout (local: N = n_me = 2)"),
    ],
)
def test_bad_input_strict_and_lenient(layer, value, kind, text):
    cap, sink = capturer()
    cap.begin_step(2)
    with pytest.raises(CaptureError) as e:
        cap.capture(layer, value)
    assert text in str(e.value)

    cap, sink = capturer(strict=False)
    cap.begin_step(2)
    cap.capture(1, ids([1, 2], [3, 4]))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cap.capture(layer if layer != 1 else 0, value)
        cap.capture(layer if layer != 1 else 0, value)
    assert len(w) == 1 and text in str(w[0].message)
    assert cap.events[kind] == 2
    cap.end_step()
    _, got, valid, _ = sink.steps[0]
    # layer 0 never wrote: missing; layer 1 intact
    assert valid[:, 0].tolist() == [False, False] and valid[:, 1].all()


@pytest.mark.parametrize("bad", [8, -1, 1000])
def test_ids_out_of_range(bad):
    cap, sink = capturer()
    cap.begin_step(2)
    cap.capture(0, ids([1, 2], [3, bad]))
    cap.capture(1, ids([1, 2], [3, 4]))
    with pytest.raises(CaptureError, match=r"layer 0 gave expert ids outside \[0, 8\) \(first at row 1\)"):
        cap.end_step()

    cap, sink = capturer(strict=False)
    cap.begin_step(2)
    cap.capture(0, ids([1, 2], [3, bad]))
    cap.capture(1, ids([1, 2], [3, 4]))
    with pytest.warns(RuntimeWarning, match="outside"):
        cap.end_step()
    _, got, valid, _ = sink.steps[0]
    # the whole (row, layer) cell is dropped: no partial row
    assert valid.tolist() == [[True, True], [False, True]]
    assert cap.events["range"] == 1


def test_buffer_grows_for_eager_steps_and_not_in_graph_mode():
    cap, sink = capturer(L=1, max_tokens=2)
    cap.begin_step(5)
    cap.capture(0, ids(*[[i, i + 1] for i in range(5)]))
    cap.end_step()
    assert sink.steps[0][1].shape == (5, 1, 2) and cap.capacity >= 5
    cap = StepCapturer(CaptureSpec(num_layers=1, top_k=2, num_experts=8, max_tokens=2),
                       device="cpu", sink=Sink(), growable=False)
    with pytest.raises(CaptureError, match="exceeds the capture buffer of 2 rows"):
        cap.begin_step(3)


def test_step_protocol_errors():
    cap, _ = capturer()
    with pytest.raises(CaptureError, match="end_step\\(\\) without begin_step"):
        cap.end_step()
    cap.begin_step(1)
    with pytest.raises(CaptureError, match="while step 0 is still open"):
        cap.begin_step(1)
    cap.abort_step()
    cap.begin_step(1)


def test_capture_outside_a_step_is_ignored():
    cap, sink = capturer()
    cap.capture(0, ids([1, 2]))
    assert sink.steps == []


def test_uint16_for_many_experts():
    cap, sink = capturer(L=1, E=300)
    cap.begin_step(1)
    cap.capture(0, ids([299, 3]))
    cap.end_step()
    assert sink.steps[0][1].dtype == np.uint16 and sink.steps[0][1].tolist() == [[[299, 3]]]


def test_two_capturers_do_not_share_state():
    a, sa = capturer(L=1)
    b, sb = capturer(L=1)
    a.begin_step(1)
    b.begin_step(1)
    a.capture(0, ids([1, 2]))
    b.capture(0, ids([3, 4]))
    a.end_step()
    b.end_step()
    assert sa.steps[0][1].tolist() == [[[1, 2]]] and sb.steps[0][1].tolist() == [[[3, 4]]]


# ---- parallel layouts ------------------------------------------------------------------------
from routecap.layout import RankView  # noqa: E402


def test_gathered_rows_of_this_rank():
    # DP=3, this is rank 1 with 2 tokens; the router saw all 1 + 2 + 3 rows in rank order
    cap, sink = capturer(L=1)
    view = RankView(tokens_per_dp=[1, 2, 3], dp_rank=1)
    cap.begin_step(2, view=view)  # layout inferred
    cap.capture(0, ids([0, 1], [2, 3], [4, 5], [6, 7], [1, 3], [5, 7]))
    cap.end_step()
    assert sink.steps[0][1][:, 0].tolist() == [[2, 3], [4, 5]]


def test_padded_shards_of_this_rank():
    # DP=2, shards of 3 rows (CUDA-graph padding): rank 1 has 2 real tokens at rows 3 and 4
    cap, sink = capturer(L=1)
    view = RankView(tokens_per_dp=[1, 2], dp_rank=1, shard_size=3)
    cap.begin_step(2, view=view, layout="gathered_padded")
    cap.capture(0, ids([0, 1], [7, 7 - 1], [7, 5], [2, 3], [4, 5], [6, 7]))
    cap.end_step()
    assert sink.steps[0][1][:, 0].tolist() == [[2, 3], [4, 5]]


def test_mismatched_rows_strict_and_lenient_never_stale():
    view = RankView(tokens_per_dp=[2, 2], dp_rank=0)
    # strict: a clear error naming every size
    cap, sink = capturer()
    cap.begin_step(2, view=view, layout="gathered")
    with pytest.raises(CaptureError) as e:
        cap.capture(0, ids([1, 2], [3, 4], [5, 6]))
    assert "N=3 rows, which does not fit the declared layout (gathered: N = sum(n) = 4)" in str(e.value)
    assert "tokens_per_dp=[2, 2]" in str(e.value)
    # lenient: step 0 is fine; in step 1 layer 1 sees 3 rows: its cells of step 1 are missing,
    # never step 0's values still in the buffer
    cap, sink = capturer(strict=False)
    for step in range(2):
        cap.begin_step(2, view=view)
        cap.capture(0, ids([1, 2], [3, 4], [5, 6], [7, 0]))
        if step == 0:
            cap.capture(1, ids([1, 2], [3, 4], [5, 6], [7, 0]))
        else:
            with pytest.warns(RuntimeWarning, match="fits no layout"):
                cap.capture(1, ids([1, 2], [3, 4], [5, 6]))
        cap.end_step()
    assert sink.steps[0][2].all()
    assert sink.steps[1][2].tolist() == [[True, False], [True, False]]
    assert cap.events["rows"] == 1


def test_non_publishing_tp_rank_captures_but_returns_nothing():
    cap, sink = capturer(L=1)
    view = RankView(tokens_per_dp=[2], tp_size=2, tp_rank=1)
    cap.begin_step(2, view=view, layout="local")
    cap.capture(0, ids([1, 2], [3, 4]))
    cap.end_step()
    assert sink.steps == []


def test_view_must_agree_with_step_tokens():
    cap, _ = capturer()
    with pytest.raises(CaptureError, match="num_tokens=3 but the view gives this rank 2"):
        cap.begin_step(3, view=RankView(tokens_per_dp=[2, 5], dp_rank=0))


# ---- graph-mode publish (graph_step records device work; on CPU it simply runs it) -----------
def test_publish_rows_past_the_graph_are_missing_never_stale():
    cap, sink = capturer(L=1, max_tokens=8)
    cap.begin_step(4)
    cap.capture(0, ids([1, 2], [3, 4], [5, 6], [7, 0]))
    cap.end_step()
    with cap.graph_step(2):
        cap.capture(0, ids([2, 1], [4, 3]))
    cap.publish(4, tag="replay")
    _, got, valid, tag = sink.steps[-1]
    assert tag == "replay" and got[:2, 0].tolist() == [[2, 1], [4, 3]]
    assert valid[:, 0].tolist() == [True, True, False, False]  # not the old step's rows 2-3


def test_publish_checks_its_argument_and_needs_a_graph():
    cap, _ = capturer(L=1)
    with pytest.raises(CaptureError, match="without a captured graph_step"):
        cap.publish(1)
    with cap.graph_step(2):
        cap.capture(0, ids([2, 1], [4, 3]))
    for bad in (-1, 99, 1.5):
        with pytest.raises(CaptureError, match="expected 0 <= num_tokens <= 4"):
            cap.publish(bad)


def test_no_growth_once_a_graph_was_captured():
    cap, _ = capturer(L=1, max_tokens=2)
    with cap.graph_step(2):
        cap.capture(0, ids([2, 1], [4, 3]))
    with pytest.raises(CaptureError, match="a CUDA graph records the buffer's address"):
        cap.begin_step(3)


def test_huge_ids_do_not_wrap_into_range():
    cap, sink = capturer(L=1, strict=False)
    cap.begin_step(1)
    cap.capture(0, torch.tensor([[2**32 + 3, 1]]))
    with pytest.warns(RuntimeWarning, match="outside"):
        cap.end_step()
    assert sink.steps[0][2].tolist() == [[False]]


# ---- the TP all-gather is decided at begin_step, from the declared layout -----------------------
def test_tp_rank_whose_layers_were_all_rejected_still_joins_the_gather(monkeypatch):
    # A TP rank that rejects every layer (lenient) used to skip the all-gather that its peers
    # entered: a hang. It must join, contributing cells marked unwritten (missing, not stale).
    from routecap import capturer as capmod

    peer_ids = torch.tensor([[[3, 4]]], dtype=torch.uint8)  # the other TP rank's chunk: valid
    peer_state = torch.ones(1, 1, dtype=torch.uint8)
    calls = []

    def gather(x, group):
        calls.append(tuple(x.shape))
        other = peer_ids if x.dim() == 3 else peer_state
        return torch.cat([x, other[: x.shape[0]]])

    monkeypatch.setattr(capmod.rcdist, "all_gather_equal", gather)
    cap, sink = capturer(L=1, strict=False)
    view = RankView(tokens_per_dp=[2], tp_size=2, tp_rank=0)  # chunks: 1 row each
    cap.begin_step(2, view=view, layout="tp_sharded")
    with pytest.warns(RuntimeWarning, match="expected ids of shape"):
        cap.capture(0, ids([1, 2, 3]))  # rejected: wrong K
    cap.end_step()
    assert calls == [(1, 1, 2), (1, 1)]  # ids and cell states, as on every other TP rank
    _, got, valid, _ = sink.steps[0]
    assert valid.tolist() == [[False], [True]]  # own chunk missing, the peer's chunk kept
    assert got[1, 0].tolist() == [3, 4]


def test_tp_sharded_rows_need_a_declared_layout():
    # inferred per layer, the gather could be entered by some TP ranks and not others
    cap, _ = capturer(L=1)
    view = RankView(tokens_per_dp=[3], tp_size=2, tp_rank=0)
    cap.begin_step(3, view=view)
    with pytest.raises(CaptureError, match="did not declare layout='tp_sharded'"):
        cap.capture(0, ids([1, 2], [3, 4]))


def test_copy_segments_concatenates_slices():
    from routecap.capturer import copy_segments

    dst = torch.full((4, 2), -1)
    src = torch.arange(12).view(6, 2)
    assert copy_segments(dst, src, ((1, 2), (3, 0), (5, 1))) == 3
    assert dst.tolist() == [[2, 3], [4, 5], [10, 11], [-1, -1]]
