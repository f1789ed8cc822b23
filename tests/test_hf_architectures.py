"""routecap's promise over transformers MoE architectures beyond the golden-tested seven.

The promise (README): any architecture either works or is refused with an error that names it.
For each tiny random model in ``extra_architectures.CASES`` this checks exactly one of:

* works: ``capture_generate`` over a left-padded batch of 3 prompts of different lengths (greedy,
  4 new tokens, no EOS) returns one trace per request whose routes equal, cell for cell, those of
  a slow reference: one plain, unpadded, uncached forward per request over the trace's token ids,
  with a forward hook on every router recording its chosen ids. Rows of routers that use
  ``topk(sorted=False)`` are compared as sets. The captured MoE layers must be the ones the config
  puts a router in, and no cell may be missing.
* refused: ``find_moe_routers`` and ``HFRouteCapture`` raise ``UnsupportedModelError`` whose
  message names the architecture (``config.architectures[0]`` or the model's class name).

A case that does neither is a finding: it is marked ``xfail(strict=True)`` with the reason, so the
suite stays green while the gap stays visible (and turns red once it is fixed, to be promoted).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from extra_architectures import CASES, CASES_BY_ID, ArchCase, build_model, tiny_model
from test_hf import _prompts
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from routecap.builtin import init_weights_
from routecap.integrations.hf_topk import TopkReader
from routecap.integrations.hf import (
    HFRouteCapture,
    UnsupportedModelError,
    capture_generate,
    find_moe_routers,
)
from routecap.integrations.hf_routers import moe_config

PROMPT_LENGTHS = (5, 2, 8)  # request 1 is left-padded by 6, request 0 by 3
MAX_NEW = 4


def _params() -> list:
    out = []
    for case in CASES:
        case = case.for_version(transformers.__version__)
        marks = []
        if case.model_type not in CONFIG_MAPPING_NAMES:
            marks.append(pytest.mark.skip(
                reason=f"transformers {transformers.__version__} has no {case.model_type!r}"))
        if case.finding:
            marks.append(pytest.mark.xfail(strict=True, raises=case.finding_raises,
                                           reason=case.finding))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def _architecture_names(model) -> set[str]:
    archs = getattr(model.config, "architectures", None) or []
    return {type(model).__name__, *(str(a) for a in archs[:1])}


def _reference_routes_TLK(model, info, token_ids_T) -> np.ndarray:
    """[T, L, K] chosen ids from one unpadded, uncached forward over ``token_ids_T``."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for site in info.sites:
        def keep(ids, layer=site.layer):
            assert layer not in got, f"router of layer {layer} ran twice in one forward"
            got[layer] = ids.detach().clone()
        if site.adapter.read_ids is None:  # no ids in the output: read at its own top-k
            handles.append(TopkReader(site.module, site.block, site.adapter.force_ids,
                                      num_experts=site.num_experts, top_k=site.top_k,
                                      name=site.path, read=keep))
            continue

        def hook(module, args, output, slot=site.index_slot, keep=keep):
            keep(output[slot])
        handles.append(site.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(token_ids_T, dtype=torch.long)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [s.layer for s in info.sites if s.layer not in got]
    assert not missing, f"reference forward never ran the routers of layers {missing}"
    return np.stack([got[s.layer].numpy() for s in info.sites], axis=1)


def _check_works(case: ArchCase, model) -> None:
    info = find_moe_routers(model)
    assert info.moe_layers == case.moe_layers, (
        f"routers found in layers {info.moe_layers}, the config puts them in {case.moe_layers}")
    # the config alone (what convert and the vLLM adapter read) says the same
    moe = moe_config(model.config)
    assert (moe.num_experts, moe.top_k, moe.moe_layers, moe.num_layers) == (
        info.num_experts, info.top_k, info.moe_layers, info.num_hidden_layers)
    ids_BW, mask_BW = _prompts(lengths=PROMPT_LENGTHS)
    traces, seq_BX = capture_generate(model, ids_BW, mask_BW, max_new_tokens=MAX_NEW,
                                      do_sample=False, eos_token_id=[], pad_token_id=0)
    W = ids_BW.shape[1]
    assert len(traces) == len(PROMPT_LENGTHS)
    for b, (trace, P) in enumerate(zip(traces, PROMPT_LENGTHS, strict=True)):
        T = P + MAX_NEW - 1  # the last generated token never ran
        assert trace.num_tokens == T and trace.prompt_len == P
        assert trace.token_ids.tolist() == seq_BX[b, W - P:W - P + T].tolist()
        assert trace.missing is None, f"request {b}: missing cells {np.argwhere(trace.missing)}"
        assert trace.moe_layers == case.moe_layers
        got_TLK = trace.expert_ids.astype(np.int64)
        ref_TLK = _reference_routes_TLK(model, info, trace.token_ids)
        assert got_TLK.shape == ref_TLK.shape
        if case.unsorted:
            got_TLK, ref_TLK = np.sort(got_TLK, axis=-1), np.sort(ref_TLK, axis=-1)
        bad_TL = (got_TLK != ref_TLK).any(axis=-1)
        assert not bad_TL.any(), (
            f"request {b}: routes differ from the reference at (token, layer) "
            f"{np.argwhere(bad_TL).tolist()}")


def _check_refused(case: ArchCase, model) -> None:
    names = _architecture_names(model)
    for attempt in (find_moe_routers, HFRouteCapture):
        with pytest.raises(UnsupportedModelError) as err:
            attempt(model)
        msg = str(err.value)
        assert any(name in msg for name in names), f"{msg!r} names none of {sorted(names)}"
        assert case.refusal in msg, f"{msg!r} lacks {case.refusal!r}"


@pytest.mark.parametrize("case", _params())
def test_architecture_works_or_is_refused_by_name(case: ArchCase):
    model = tiny_model(case, seed=1)
    if case.expect == "works":
        _check_works(case, model)
    elif case.expect == "refused":
        _check_refused(case, model)
    else:
        raise AssertionError(f"unknown expectation {case.expect!r}")


# ---- routecap.builtin.init_weights_, which the tiny models above rely on ------------------------
# extra_architectures.randomize_weights_ works around both gaps; these keep them visible.

def _needs(model_type: str):
    return pytest.mark.skipif(
        model_type not in CONFIG_MAPPING_NAMES,
        reason=f"transformers {transformers.__version__} has no {model_type!r}")


@pytest.mark.parametrize("case_id, computed", [
    pytest.param("minimax", ("slope_rate", "query_decay", "key_decay", "diagonal_decay"),
                 marks=_needs("minimax")),
    pytest.param("mimo_v2_flash", ("full_attention_inv_freq", "sliding_attention_inv_freq"),
                 marks=_needs("mimo_v2_flash")),
])
def test_init_weights_leaves_computed_buffers_alone(case_id, computed):
    model = build_model(CASES_BY_ID[case_id])
    before = {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in computed}
    if not before:  # not an AssertionError: a renamed buffer must fail, not xfail
        raise LookupError(f"{case_id} has none of the buffers {computed}")
    init_weights_(model, 1)
    changed = sorted(n for n, b in model.named_buffers()
                     if n in before and not torch.equal(b, before[n]))
    assert not changed, f"init_weights_ overwrote computed buffers {changed}"


@_needs("gemma4_text")
def test_init_weights_accepts_0d_buffers():
    model = build_model(CASES_BY_ID["gemma4_text"])
    if not any(b.dim() == 0 and b.is_floating_point() for b in model.buffers()):
        raise LookupError("gemma4_text has no 0-d floating buffer any more")
    init_weights_(model, 1)
