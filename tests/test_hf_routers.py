"""Router knowledge in one place: the adapter registry and the one config reader.

Every consumer of a model's router shape (capture's :func:`find_moe_routers`, ``convert``'s
``RouterShape.from_config``, the vLLM adapter's ``from_request_output``) must read the same
(E, K, MoE layers, layer count) from a config, whatever the architecture calls them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from extra_architectures import CASES_BY_ID, tiny_config, tiny_model
from tiny_models import SUPPORTED
from tiny_models import tiny_model as golden_model
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from routecap.convert import RouterShape
from routecap.integrations import hf
from routecap.integrations.hf_routers import (
    GENERIC_ADAPTER,
    NUM_EXPERTS_ATTRS,
    ROUTER_ADAPTERS,
    TOP_K_ATTRS,
    RouterAdapter,
    UnsupportedModelError,
    adapter_for,
    attach_router_hooks,
    find_moe_routers,
    moe_config,
    read_router_counts,
)
from routecap.integrations.hf_topk import ROUTER_TOPK
from routecap.integrations.vllm import from_request_output

# (case id, E, K, moe layers, all layers): configs that spell the router shape differently
SPELLINGS = [
    ("ernie4_5_moe", 8, 2, (1, 2), 3),  # moe_num_experts, moe_k
    ("gemma4_text", 8, 2, (0, 1), 2),  # top_k_experts
    ("hunyuan_v1_moe", 8, 2, (0, 1), 2),  # moe_topk
    ("longcat_flash", 12, 2, (0, 1), 2),  # num_layers; 8 routed + 4 zero-computation experts
    ("qwen3_vl_moe", 8, 2, (0, 1), 2),  # a vision-language wrapper: text_config
    ("aria", 8, 2, (0, 1), 2),  # moe_num_experts, moe_topk in a wrapper's text_config
]


def _spelling_params():
    out = []
    for row in SPELLINGS:
        case = CASES_BY_ID[row[0]]
        marks = [pytest.mark.skipif(case.model_type not in CONFIG_MAPPING_NAMES,
                                    reason=f"transformers {transformers.__version__} has no "
                                           f"{case.model_type!r}")]
        out.append(pytest.param(*row, id=row[0], marks=marks))
    return out


@pytest.mark.parametrize("case_id, E, K, layers, A", _spelling_params())
def test_one_config_reader_for_capture_convert_and_vllm(tmp_path, case_id, E, K, layers, A):
    cfg = tiny_config(CASES_BY_ID[case_id])
    moe = moe_config(cfg)
    assert (moe.num_experts, moe.top_k, moe.moe_layers, moe.num_layers) == (E, K, layers, A)
    # convert reads a saved config through the same reader
    cfg.save_pretrained(tmp_path)
    shape = RouterShape.from_config(tmp_path / "config.json")
    assert (shape.num_experts, shape.top_k, shape.moe_layers, shape.num_layers) == (E, K, layers, A)
    # and so does the vLLM adapter: all A layers in, dense ones dropped, E from the config
    T = 3
    arr = np.zeros((T, A, K), np.int32)
    for i, layer in enumerate(layers):
        arr[:, layer] = (np.arange(T * K).reshape(T, K) + i) % E
    out = SimpleNamespace(index=0, token_ids=[7, 8], routed_experts=arr)
    (trace,) = from_request_output(
        SimpleNamespace(request_id="r", prompt_token_ids=[5, 6], outputs=[out]), cfg)
    assert trace.moe_layers == layers and trace.num_experts == E and trace.top_k == K
    assert np.array_equal(trace.expert_ids, arr[:, list(layers)])
    assert trace.token_ids.tolist() == [5, 6, 7]


def test_config_reader_refuses_a_dense_config_by_name():
    cfg = transformers.AutoConfig.for_model(
        "qwen3", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM: no MoE block"):
        moe_config(cfg)


def test_router_counts_come_from_one_list_in_order():
    router = SimpleNamespace(top_k=3)
    block = SimpleNamespace(moe_num_experts=6, num_experts_per_tok=5)
    assert read_router_counts(router, block) == (6, 3)  # the router's own K wins
    # every spelling in the list is read
    for name in NUM_EXPERTS_ATTRS:
        assert read_router_counts(SimpleNamespace(**{name: 9, "moe_k": 2})) == (9, 2)
    for name in TOP_K_ATTRS:
        assert read_router_counts(SimpleNamespace(**{name: 2, "num_experts": 9})) == (9, 2)
    # bools and zeros are not counts; a wider score-correction bias widens E
    assert read_router_counts(SimpleNamespace(num_experts=True, top_k=0)) == (None, None)
    wide = SimpleNamespace(num_experts=8, top_k=2, e_score_correction_bias=torch.zeros(12))
    assert read_router_counts(wide) == (12, 2)


# ---- the adapter registry ----------------------------------------------------------------------
GOLDEN_FAMILIES = {
    "mixtral": "softmax_topk", "qwen2_moe": "softmax_topk", "qwen3_moe": "softmax_topk",
    "olmoe": "softmax_topk", "gpt_oss": "topk_softmax", "deepseek_v3": "sigmoid_bias_grouped",
    "glm4_moe": "sigmoid_bias_grouped",
}


def test_registry_names_each_family_once():
    assert set(GOLDEN_FAMILIES) == set(SUPPORTED)
    families = [a.family for a in ROUTER_ADAPTERS]
    assert len(families) == len(set(families))
    classes = [c for a in ROUTER_ADAPTERS for c in a.classes]
    assert len(classes) == len(set(classes)), "a router class claimed by two families"
    for a in ROUTER_ADAPTERS:
        assert a.classes and (a.scoring or a.refusal), a.family


@pytest.mark.parametrize("arch", SUPPORTED)
def test_golden_architectures_get_their_family_and_read_ids(arch):
    model = golden_model(arch, seed=1)
    info = find_moe_routers(model)
    assert {s.adapter.family for s in info.sites} == {GOLDEN_FAMILIES[arch]}
    # the hook hands on exactly what the router's own top-k returned, per layer
    seen: dict[int, list[torch.Tensor]] = {}
    raw: dict[int, torch.Tensor] = {}
    handles = attach_router_hooks(info, lambda i, ids: seen.setdefault(i, []).append(ids))
    for i, s in enumerate(info.sites):
        handles.append(s.module.register_forward_hook(
            lambda m, a, out, i=i, s=s: raw.__setitem__(i, out[s.index_slot])))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(len(info.sites)))
    for i in seen:
        (ids,) = seen[i]
        assert ids.shape == (4, info.top_k) and torch.equal(ids, raw[i].reshape(4, -1))


def test_unknown_router_class_gets_the_generic_adapter():
    case = CASES_BY_ID["granitemoe"]
    info = find_moe_routers(tiny_model(case, seed=1))
    assert {s.adapter for s in info.sites} == {GENERIC_ADAPTER}
    # replay answers its one final top-k (and refuses at run time a call without exactly one:
    # tests/test_hf_topk.py); families with no top-k to answer are registered with a reason
    assert GENERIC_ADAPTER.force_ids is ROUTER_TOPK
    phimoe = find_moe_routers(tiny_model(CASES_BY_ID["phimoe"], seed=1)).sites[0].adapter
    assert phimoe.force_ids is None and "sparsemixer" in phimoe.replay_refusal


class _Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.top_k, self.num_experts = 2, 4

    def forward(self, x):
        logits = x @ self.weight.T
        return logits, logits.topk(2, dim=-1).indices


class _SkipRouter(_Router):
    pass


class _Block(nn.Module):
    def __init__(self, router):
        super().__init__()
        self.gate = router
        self.experts = nn.Linear(8, 8)

    def forward(self, x):
        self.gate(x.reshape(-1, 8))
        return x


class _Model(nn.Module):
    def __init__(self, router):
        super().__init__()
        self.layers = nn.ModuleList([_Block(router)])


def test_a_registered_family_is_matched_through_subclasses_and_refusals_name_it():
    mine = RouterAdapter(family="mine", classes=("_Router",), scoring="test")
    info = find_moe_routers(_Model(_SkipRouter()), adapters=(mine,))
    (site,) = info.sites
    assert site.adapter is mine and site.index_slot == 1  # found by the probe, not assumed
    refused = RouterAdapter(family="skip", classes=("_SkipRouter",), refusal="it skips")
    with pytest.raises(UnsupportedModelError,
                       match=r"_Model: router _SkipRouter at layers.0.gate: it skips"):
        find_moe_routers(_Model(_SkipRouter()), adapters=(mine, refused))
    assert adapter_for(_Router(), (mine, refused)) is mine


def test_public_names_stay_importable_from_hf():
    for name in ("find_moe_routers", "RouterSite", "MoEModelInfo", "router_hook",
                 "attach_router_hooks", "moe_layers_from_config", "UnsupportedModelError"):
        assert hasattr(hf, name), name


def test_config_reader_answers_by_contents_not_identity():
    cfg = tiny_config(CASES_BY_ID["ernie4_5_moe"])
    first = moe_config(cfg)
    assert moe_config(cfg) is first  # the same contents: no second meta build
    cfg.moe_k = 3  # a config is mutable: a changed one is read again
    assert moe_config(cfg).top_k == 3
