import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routecap.placement import (
    Placement,
    PlacementError,
    balanced_placement,
    contiguous_placement,
    pack_lpt,
    plan_placement,
    replicate,
    write_placement,
)


def test_contiguous_is_the_engines_default():
    # SGLang "trivial" / vLLM initial map: arange(E + R) % E; GPU g holds slots [g*S, (g+1)*S)
    p = contiguous_placement(6, 4, num_layers=2, redundant=2)
    assert p.physical_to_logical_LP.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]] * 2
    assert p.slots_per_gpu == 2 and p.experts_on_gpu(0, 3) == [0, 1]
    assert p.replicas_LE.tolist() == [[2, 2, 1, 1, 1, 1]] * 2


def test_sorted_loads_on_two_gpus_reach_the_even_split():
    # contiguous: GPU0 = 8+7+6+5 = 26, GPU1 = 4+3+2+1 = 10. The optimum is 36/2 = 18 each:
    # LPT puts {8, 5, 4, 1} on GPU0 and {7, 6, 3, 2} on GPU1.
    plan = plan_placement([[8, 7, 6, 5, 4, 3, 2, 1]], 2, moe_layers=[3])
    assert plan.before_LG.tolist() == [[26, 10]]
    assert plan.after_LG.tolist() == [[18, 18]]
    assert plan.before_L.tolist() == [26 / 18] and plan.after_L.tolist() == [1.0]
    assert sorted(plan.balanced.experts_on_gpu(0, 0)) == [0, 3, 4, 7]
    direct = balanced_placement([[8, 7, 6, 5, 4, 3, 2, 1]], 2)
    assert direct.physical_to_logical_LP.tolist() == plan.balanced.physical_to_logical_LP.tolist()


def test_three_gpus_two_slots_reach_the_even_split():
    # 5 4 3 3 2 1 -> {5, 1} {4, 2} {3, 3}: 6 each, the lower bound total / G
    plan = plan_placement([[5, 4, 3, 3, 2, 1]], 3)
    assert plan.after_LG.tolist() == [[6, 6, 6]]


def test_hot_expert_is_replicated_until_the_split_is_even():
    # expert 3 carries half the load. Default with 2 redundant slots: [0 1 2 | 3 0 1], experts 0
    # and 1 split in two: GPU0 = 5 + 5 + 10 = 20, GPU1 = 30 + 5 + 5 = 40. Without redundancy
    # expert 3's GPU holds at least 30 + 10 = 40 of 60. With 2 redundant slots the plan gives
    # expert 3 three replicas of 10: six slots of 10, 30 / 30, the lower bound total / G.
    load = [[10, 10, 10, 30]]
    assert plan_placement(load, 2).after_LG.max() == 40
    plan = plan_placement(load, 2, redundant=2)
    assert plan.default.physical_to_logical_LP.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert plan.before_LG.tolist() == [[20, 40]]
    assert plan.balanced.replicas_LE.tolist() == [[1, 1, 1, 3]]
    assert plan.after_LG.tolist() == [[30, 30]]


def test_replicate_gives_extra_slots_to_the_highest_load_per_replica():
    assert replicate(np.array([30.0, 10, 10, 10]), 6).tolist() == [3, 1, 1, 1]
    assert replicate(np.array([1.0, 1, 1, 1]), 6).tolist() == [2, 2, 1, 1]  # ties: lowest id
    with pytest.raises(PlacementError, match="3 slots cannot hold 4 experts"):
        replicate(np.ones(4), 3)


def test_already_balanced_layer_keeps_the_default():
    # layer 0 is balanced under the default placement: no move is worth making
    plan = plan_placement([[1, 1, 1, 1], [4, 3, 2, 1]], 2)
    assert plan.balanced.physical_to_logical_LP[0].tolist() == [0, 1, 2, 3]
    assert plan.after_LG[1].tolist() == [5, 5]


def test_bad_sizes_name_both_sides():
    with pytest.raises(PlacementError, match=r"6 \+ 0 = 6 is not divisible by the expert-parallel size 4"):
        contiguous_placement(6, 4, num_layers=1)
    with pytest.raises(PlacementError, match="redundant slots, got -1"):
        plan_placement([[1, 2]], 2, redundant=-1)
    with pytest.raises(PlacementError, match=r"expected a 2-d \[layers, experts\] array, got shape \(3,\)"):
        plan_placement([1, 2, 3], 1)
    with pytest.raises(PlacementError, match="expert 1 of layer 0 has no slot"):
        Placement(physical_to_logical_LP=np.array([[0, 0]]), num_experts=2, ep_size=1)
    with pytest.raises(PlacementError, match="expected 2 layer numbers"):
        plan_placement([[1, 2], [3, 4]], 1, moe_layers=[1])
    with pytest.raises(PlacementError, match=r"pack_lpt: 2 bins x 2 slots != 3 items"):
        pack_lpt(np.ones(3), 2, 2)


def test_sglang_file_covers_every_decoder_layer(tmp_path):
    plan = plan_placement([[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8]], 2, moe_layers=[1, 3])
    doc = write_placement(plan, tmp_path / "p.json", "sglang", num_hidden_layers=5)
    assert json.loads((tmp_path / "p.json").read_text()) == doc
    assert list(doc) == ["physical_to_logical_map"]  # SGLang passes the keys as keyword arguments
    rows = doc["physical_to_logical_map"]
    assert len(rows) == 5
    for dense in (0, 2, 4):
        assert rows[dense] == list(range(8))
    assert rows[1] == plan.balanced.physical_to_logical_LP[0].tolist()
    assert rows[3] == plan.balanced.physical_to_logical_LP[1].tolist()
    with pytest.raises(PlacementError, match="more than the highest MoE layer 3, got 3"):
        write_placement(plan, tmp_path / "q.json", "sglang", num_hidden_layers=3)
    with pytest.raises(PlacementError, match="format: expected one of"):
        write_placement(plan, tmp_path / "q.json", "megatron")


def test_vllm_maps_agree_with_each_other(tmp_path):
    plan = plan_placement([[10, 10, 10, 30]], 2, redundant=2)
    doc = write_placement(plan, tmp_path / "v.json", "vllm")
    p2l = np.array(doc["physical_to_logical_map"])
    l2p = np.array(doc["logical_to_physical_map"])
    count = np.array(doc["logical_replica_count"])
    assert l2p.shape == (1, 4, 3) and count.tolist() == [[1, 1, 1, 3]]
    for e in range(4):
        slots = [p for p in l2p[0, e] if p >= 0]
        assert len(slots) == count[0, e] and all(p2l[0, p] == e for p in slots)
    doc = write_placement(plan, tmp_path / "r.json", "routecap")
    assert doc["max_over_mean_after"] == [1.0] and doc["ep_size"] == 2


@st.composite
def _cases(draw):
    ep = draw(st.integers(1, 6))
    per_gpu = draw(st.integers(1, 4))
    slots = ep * per_gpu
    experts = draw(st.integers(1, slots))
    redundant = slots - experts
    layers = draw(st.integers(1, 3))
    load = draw(st.lists(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts),
                         min_size=layers, max_size=layers))
    return np.array(load, dtype=np.float64), ep, redundant


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_every_expert_placed_and_no_gpu_over_its_slots(case):
    load, ep, redundant = case
    plan = plan_placement(load, ep, redundant=redundant)
    p = plan.balanced
    L, E = load.shape
    assert p.physical_to_logical_LP.shape == (L, E + redundant)
    assert (p.replicas_LE >= 1).all()                       # every expert placed at least once
    per_gpu = p.physical_to_logical_LP.reshape(L, ep, -1)
    assert per_gpu.shape[2] == (E + redundant) // ep         # no GPU holds more slots than it has
    assert np.allclose(plan.after_LG.sum(axis=1), load.sum(axis=1))   # load conserved
    assert (plan.after_LG.max(axis=1) <= plan.before_LG.max(axis=1) + 1e-9).all()  # never worse
    # reference: recompute each GPU's load slot by slot
    for layer in range(L):
        for g in range(ep):
            ref = sum(load[layer, e] / p.replicas_LE[layer, e] for e in p.experts_on_gpu(layer, g))
            assert np.isclose(plan.after_LG[layer, g], ref)


def test_replicas_of_one_expert_go_to_different_gpus():
    # expert 0 gets 3 replicas of 20 each; without the group rule LPT could stack two of them
    plan = plan_placement([[60, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], 3, redundant=2)
    assert plan.balanced.replicas_LE[0, 0] == 3
    for g in range(3):
        experts = plan.balanced.experts_on_gpu(0, g)
        assert len(experts) == len(set(experts)) == 5
    # the packing rule alone: items of group 7 spread over both bins
    assert pack_lpt(np.array([5.0, 5, 1, 1]), 2, 2, np.array([7, 7, 1, 2])).tolist() == [0, 1, 0, 1]


def test_docstring_examples():
    import doctest

    import routecap.placement

    assert doctest.testmod(routecap.placement).failed == 0


def test_decoder_layer_count_comes_from_the_model_config(tmp_path):
    from routecap.report.commands import _num_hidden_layers

    assert _num_hidden_layers("builtin:tiny-qwen3-moe") == 4
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 48}}))
    assert _num_hidden_layers(str(tmp_path)) == 48
    assert _num_hidden_layers(str(tmp_path / "nowhere")) is None and _num_hidden_layers("") is None
