"""Capture from transformers MoE models, checked against a slow, obviously-correct reference.

The reference runs ONE unpadded forward per request over its final token sequence (teacher
forcing, no cache, no batch) and records each router's output directly. Batched ``generate`` with
left padding and a KV cache must give the same routes, cell for cell. Float rounding in a padded,
cached batch can flip a near-tie at the k-th choice; such a cell is accepted only if its router
margin (the gap in the router's selection score between the k-th chosen expert and the best
unchosen one) is below MARGIN_TOL, and the flips are counted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import SUPPORTED, UNSORTED_TOPK, tiny_model
from torch import nn

from routecap.builtin import load_builtin
from routecap.integrations.hf import (
    HFRouteCapture,
    UnsupportedModelError,
    capture_generate,
    find_moe_routers,
)

MARGIN_TOL = 1e-4


def _reference_routes(model, info, token_ids):
    """[T, L, K] ids and [T, L] selection margins from one plain forward over ``token_ids``."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for site in info.sites:
        def hook(mod, args, output, layer=site.layer, slot=site.index_slot):
            out[layer] = (output[slot].detach().clone(), output[0].detach().clone())
        handles.append(site.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(token_ids)[None].long().to(model.device),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ids = np.stack([out[s.layer][0].cpu().numpy() for s in info.sites], axis=1)
    margins = np.stack([_margin(s.module, out[s.layer][1].float().cpu(), s.top_k)
                        for s in info.sites], axis=1)
    return ids, margins


def _margin(router: nn.Module, logits: torch.Tensor, k: int) -> np.ndarray:
    """Gap between the k-th chosen and the best unchosen selection score, per row."""
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-style: sigmoid + bias, by groups
        scores = logits.sigmoid() + router.e_score_correction_bias.float().cpu()
        g, kg = router.num_group, router.topk_group
        grouped = scores.view(scores.shape[0], g, -1)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
        gs = group_scores.sort(dim=-1, descending=True)[0]
        group_margin = (gs[:, kg - 1] - gs[:, kg]) if kg < g else torch.full_like(gs[:, 0], 1e9)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(kg, dim=-1)[1], True)
        masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(scores.shape[0], -1)
        s = masked.sort(dim=-1, descending=True)[0]
        nxt = torch.where(torch.isinf(s[:, k]), torch.full_like(s[:, k], -1e9), s[:, k])
        return torch.minimum(group_margin, s[:, k - 1] - nxt).numpy()
    # softmax or plain top-k over logits: the order of logits is the order of choice
    s = logits.sort(dim=-1, descending=True)[0]
    return (s[:, k - 1] - s[:, k]).numpy()


def _flips(got, ref, unsorted):
    """[T, L] True where the captured row differs from the reference row."""
    if unsorted:
        got, ref = np.sort(got, axis=-1), np.sort(ref, axis=-1)
    return (got != ref).any(axis=-1)


def _prompts(vocab=300, lengths=(3, 9, 1, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    W = max(lengths)
    ids = torch.zeros(len(lengths), W, dtype=torch.long)
    mask = torch.zeros(len(lengths), W, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, W - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, W - n:] = 1
    return ids, mask


def _early_eos(model, ids, mask, max_new, **gen):
    """(token, step): a token request 0 first generates at step >= 1, so that it stops early."""
    state = torch.get_rng_state()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             eos_token_id=None, pad_token_id=0, **gen)
    torch.set_rng_state(state)  # the captured run samples the same tokens
    gen0 = out[0, ids.shape[1]:].tolist()
    for step in range(1, len(gen0) - 1):
        if gen0[step] not in gen0[:step]:
            return gen0[step], step
    raise AssertionError(f"no early-stop token in {gen0}")


def _check_golden(model, ids, mask, *, unsorted, max_new=6, **gen):
    info = find_moe_routers(model)
    eos, eos_step = _early_eos(model, ids, mask, max_new, **gen)
    traces, seq = capture_generate(model, ids, mask, max_new_tokens=max_new, eos_token_id=eos,
                                   pad_token_id=0, **gen)
    W = ids.shape[1]
    flips = 0
    lengths = []
    for b, t in enumerate(traces):
        P = int(mask[b].sum())
        gen_b = seq[b, W:].tolist()
        G = gen_b.index(eos) + 1 if eos in gen_b else len(gen_b)
        # prompt plus generated minus the last, whose forward never ran
        assert t.num_tokens == P + G - 1 and t.prompt_len == P and t.start == 0
        expect_tokens = seq[b, W - P:W - P + P + G - 1].tolist()
        assert t.token_ids.tolist() == expect_tokens
        assert t.missing is None
        assert t.moe_layers == info.moe_layers
        ref, margins = _reference_routes(model, info, t.token_ids)
        bad = _flips(t.expert_ids.astype(np.int64), ref, unsorted)
        assert (margins[bad] < MARGIN_TOL).all(), (
            f"request {b}: routes differ at {np.argwhere(bad).tolist()} with margins "
            f"{margins[bad].tolist()}")
        flips += int(bad.sum())
        lengths.append(t.num_tokens)
    assert lengths[0] == int(mask[0].sum()) + eos_step  # request 0 stopped at its EOS
    return flips, traces


@pytest.mark.parametrize("arch", SUPPORTED)
def test_golden_batched_generate_equals_teacher_forcing(arch):
    model = tiny_model(arch, seed=1)
    ids, mask = _prompts()
    flips, traces = _check_golden(model, ids, mask, unsorted=arch in UNSORTED_TOPK,
                                  do_sample=False)
    assert flips == 0, f"{flips} near-tie flips"
    assert len({t.num_tokens for t in traces}) > 1  # uneven lengths really happened


def test_golden_builtin_with_sampling():
    model, tok = load_builtin("tiny-qwen3-moe")
    enc = tok(["hello world", "x", "the quick brown fox jumps over", "routes"],
              return_tensors="pt", padding=True)
    torch.manual_seed(0)
    flips, _ = _check_golden(model, enc["input_ids"], enc["attention_mask"], unsorted=False,
                             max_new=8, do_sample=True, temperature=1.0)
    assert flips == 0


def test_capture_leaves_model_exactly_as_it_was():
    model, tok = load_builtin("tiny-qwen3-moe")
    enc = tok(["hello world", "abc"], return_tensors="pt", padding=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits_before = model(**enc).logits
        gen_before = model.generate(**enc, max_new_tokens=5, do_sample=False)
    with HFRouteCapture(model) as cap:
        with torch.no_grad():
            logits_during = model(**enc).logits
            gen_during = model.generate(**enc, max_new_tokens=5, do_sample=False)
        cap.collect(sequences=gen_during, attention_mask=enc["attention_mask"])
    with torch.no_grad():
        logits_after = model(**enc).logits
    assert torch.equal(logits_before, logits_during) and torch.equal(logits_before, logits_after)
    assert torch.equal(gen_before, gen_during)
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_two_captures_at_once():
    a = tiny_model("qwen3_moe", seed=1)
    b = tiny_model("mixtral", seed=2)
    ids, mask = _prompts(lengths=(4, 2))
    with HFRouteCapture(a) as ca, HFRouteCapture(b) as cb:
        with torch.no_grad():
            sa = a.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            sb = b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        ta = ca.collect(sequences=sa, attention_mask=mask, eos_token_id=[])
        tb = cb.collect(sequences=sb, attention_mask=mask, eos_token_id=[])
    alone_a, _ = capture_generate(a, ids, mask, max_new_tokens=3, do_sample=False,
                                  eos_token_id=[])
    alone_b, _ = capture_generate(b, ids, mask, max_new_tokens=3, do_sample=False,
                                  eos_token_id=[])
    # each capture got its own model's routes, cell for cell, as if it had run alone
    assert len(ta) == len(tb) == len(alone_a) == len(alone_b) == 2
    for got, alone in ((ta, alone_a), (tb, alone_b)):
        for x, y in zip(got, alone, strict=True):
            assert x.equals(y), x.request_id
    assert (tb[0].num_experts, tb[0].top_k) == (8, 2) and (ta[0].num_experts, ta[0].top_k) == (16, 4)
    assert tb[0].moe_layers == (0, 1, 2) and ta[0].moe_layers == (1, 2, 3)


def test_single_token_prompt_and_one_new_token():
    model = tiny_model("qwen3_moe")
    ids = torch.tensor([[5]])
    traces, _ = capture_generate(model, ids, max_new_tokens=1, do_sample=False, eos_token_id=[])
    # the prompt token ran; the generated one never did
    assert traces[0].num_tokens == 1 and traces[0].token_ids.tolist() == [5]


def test_consecutive_batches_do_not_leak_rows():
    model = tiny_model("qwen3_moe")
    long_ids, long_mask = _prompts(lengths=(9, 9))
    short_ids, short_mask = _prompts(lengths=(2, 3), seed=5)
    with HFRouteCapture(model) as cap:
        for ids, mask in ((long_ids, long_mask), (short_ids, short_mask)):
            with torch.no_grad():
                seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                     do_sample=False)
            traces = cap.collect(sequences=seq, attention_mask=mask, eos_token_id=[])
    fresh, _ = capture_generate(model, short_ids, short_mask, max_new_tokens=4, do_sample=False,
                                eos_token_id=[])
    assert len(traces) == len(fresh) == 2
    for a, b in zip(traces, fresh, strict=True):
        assert a.equals(b), a.request_id


def test_model_without_moe_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", vocab_size=100, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM: no MoE block routecap can capture"):
        find_moe_routers(model)


class _OddRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 8))
        self.top_k = 2
        self.num_experts = 4

    def forward(self, x):
        return x @ self.weight.T  # logits only


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _OddRouter()
        self.experts = nn.Linear(8, 8)


class _OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_OddBlock()])


def test_router_with_other_signature_is_refused_by_name():
    with pytest.raises(UnsupportedModelError) as e:
        find_moe_routers(_OddModel())
    msg = str(e.value)
    assert "_OddModel: router _OddRouter at layers.0.gate returned (Tensor(3, 4)/torch.float32)" in msg
    assert "expects exactly one integer tensor of shape [N, top_k=2]" in msg


def test_collect_refuses_right_padding():
    model = tiny_model("qwen3_moe")
    ids = torch.tensor([[5, 6, 0]])
    mask = torch.tensor([[1, 1, 0]])
    with HFRouteCapture(model) as cap:
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                 do_sample=False)
        with pytest.raises(ValueError, match="expected a left-padded attention_mask"):
            cap.collect(sequences=seq, attention_mask=mask)


def test_beam_search_refused():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        capture_generate(model, torch.tensor([[5, 6]]), max_new_tokens=2, num_beams=2)


def test_lenient_capture_marks_missing_instead_of_raising():
    model = tiny_model("qwen3_moe")
    info = find_moe_routers(model)
    ids, mask = _prompts(lengths=(3, 2))
    target = info.sites[1].module
    # a router that suddenly returns a wrong K (registered before routecap's hook, so routecap
    # sees the broken output): lenient mode marks that layer missing and keeps the others
    handle = target.register_forward_hook(
        lambda m, a, out: (out[0], out[1][:, :1], out[2][:, :1]))
    cap = HFRouteCapture(model, strict=False)
    try:
        with pytest.warns(RuntimeWarning, match="expected ids of shape"):
            traces, _ = capture_generate(model, ids, mask, capture=cap, max_new_tokens=2,
                                         do_sample=False, eos_token_id=[])
        for t in traces:
            assert t.missing is not None
            assert t.missing[:, 1].all() and not t.missing[:, [0, 2]].any()
        assert cap.capturer.events["shape"] > 0
        assert not cap.active
        with pytest.raises(Exception, match=r"expected ids of shape \[N, K=4\], got \(\d+, 1\)"):
            capture_generate(model, ids, mask, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()


# ---- multi-turn with a persistent store --------------------------------------------------------
def _cache_kwarg(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else (
        "past_key_values")


def test_multi_turn_reuses_the_kv_cache_and_the_stored_routes():
    from routecap.store import RouteStore

    model, tok = load_builtin("tiny-qwen3-moe")
    info = find_moe_routers(model)
    store = RouteStore(num_experts=16, moe_layers=info.moe_layers, top_k=4, block_size=4,
                       model="builtin:tiny-qwen3-moe")
    cap = HFRouteCapture(model, store=store)
    enc = tok(["hello there"], return_tensors="pt")
    gen = dict(do_sample=False, return_dict_in_generate=True, eos_token_id=[])
    with cap, torch.no_grad():
        out1 = model.generate(**enc, max_new_tokens=5, **gen)
        (t1,) = cap.collect(sequences=out1.sequences, attention_mask=enc["attention_mask"],
                            request_ids=["chat"], eos_token_id=[])
        S1 = out1.sequences.shape[1]
        assert t1.num_tokens == S1 - 1
        ids2 = torch.cat([out1.sequences, tok([" and then?"], return_tensors="pt")["input_ids"]], 1)
        mask2 = torch.ones_like(ids2)
        rows_before = cap.rows_computed
        out2 = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=4,
                              **{_cache_kwarg(model): out1.past_key_values}, **gen)
        turn2_rows = cap.rows_computed - rows_before
        (t2_new,) = cap.collect(sequences=out2.sequences, attention_mask=mask2,
                                request_ids=["chat"], eos_token_id=[], start=S1 - 1)
    T2 = ids2.shape[1] + 4 - 1
    # only the new positions ran: from the last token of turn 1 (its forward never ran in turn 1)
    assert turn2_rows == T2 - (S1 - 1)
    assert (t2_new.start, t2_new.end, t2_new.prompt_len) == (S1 - 1, T2, ids2.shape[1])
    full = store.take("chat", 0, T2)
    assert np.array_equal(full.expert_ids[:S1 - 1], t1.expert_ids)  # turn 1 from the store
    assert np.array_equal(full.expert_ids[S1 - 1:], t2_new.expert_ids)
    # and the whole conversation equals a from-scratch forward over its tokens
    ref, margins = _reference_routes(model, info, out2.sequences[0, :T2])
    bad = _flips(full.expert_ids.astype(np.int64), ref, False)
    assert (margins[bad] < MARGIN_TOL).all() and not bad.any()
    assert full.missing is None


def test_continuing_a_cache_the_store_never_saw_is_refused():
    from routecap.store import RouteStore

    model, tok = load_builtin("tiny-qwen3-moe")
    info = find_moe_routers(model)
    enc = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        out1 = model.generate(**enc, max_new_tokens=3, do_sample=False,
                              return_dict_in_generate=True, eos_token_id=[])
    store = RouteStore(num_experts=16, moe_layers=info.moe_layers, top_k=4)
    with HFRouteCapture(model, store=store) as cap, torch.no_grad():
        seq = model.generate(input_ids=out1.sequences, max_new_tokens=2, do_sample=False,
                             attention_mask=torch.ones_like(out1.sequences), eos_token_id=[],
                             **{_cache_kwarg(model): out1.past_key_values})
        with pytest.raises(ValueError, match="continued a KV cache of .* positions that routecap "
                           "never stored"):
            cap.collect(sequences=seq, attention_mask=torch.ones_like(out1.sequences),
                        request_ids=["x"], eos_token_id=[])
    with pytest.raises(ValueError, match=r"the store holds \(E, moe_layers, K\)"):
        HFRouteCapture(model, store=RouteStore(num_experts=8, moe_layers=[0], top_k=2))


def test_collect_start_offset_without_store():
    model = tiny_model("qwen3_moe")
    ids, mask = _prompts(lengths=(4, 2))
    full, _ = capture_generate(model, ids, mask, max_new_tokens=3, do_sample=False,
                               eos_token_id=[])
    with HFRouteCapture(model) as cap, torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                             do_sample=False, eos_token_id=[])
        part = cap.collect(sequences=seq, attention_mask=mask, eos_token_id=[], start=[2, 1])
    assert len(full) == len(part) == 2
    for f, p, s in zip(full, part, [2, 1], strict=True):
        assert p.equals(f.slice(s))


def test_static_cache_generate_equals_dynamic_cache():
    # a StaticCache keeps its length in a tensor: the capture reads it asynchronously
    model = tiny_model("qwen3_moe", seed=2)
    ids, mask = _prompts(lengths=(4, 2, 6))
    dyn, seq_d = capture_generate(model, ids, mask, max_new_tokens=4, do_sample=False,
                                  eos_token_id=[])
    sta, seq_s = capture_generate(model, ids, mask, max_new_tokens=4, do_sample=False,
                                  eos_token_id=[], cache_implementation="static")
    assert torch.equal(seq_d, seq_s)
    assert len(dyn) == len(sta) == 3
    for a, b in zip(dyn, sta, strict=True):
        assert a.equals(b)


def test_eos_from_generation_config_and_stop_strings():
    from transformers import GenerationConfig

    model, tok = load_builtin("tiny-qwen3-moe")
    enc = tok(["hello world", "abc"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                              do_sample=False, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 1])  # row 0's 2nd generated token ends it
    gc = GenerationConfig(eos_token_id=eos, pad_token_id=0, max_new_tokens=8, do_sample=False)
    traces, seq = capture_generate(model, ids, mask, generation_config=gc)
    P0 = int(mask[0].sum())
    gen0 = seq[0, ids.shape[1]:].tolist()
    assert traces[0].num_tokens == P0 + gen0.index(eos) + 1 - 1
    # custom stopping (as stop strings): the stopped row is fed padding afterwards, which must
    # not count; generate does not report the stop, its padding does
    from transformers import StoppingCriteria, StoppingCriteriaList

    W = ids.shape[1]

    class StopRow1After3(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[1] = input_ids.shape[1] >= W + 3
            return done

    traces, seq = capture_generate(model, ids, mask, max_new_tokens=8, do_sample=False,
                                   eos_token_id=[], pad_token_id=0,
                                   stopping_criteria=StoppingCriteriaList([StopRow1After3()]))
    assert seq[1, W + 3:].tolist() == [0] * (seq.shape[1] - W - 3)
    assert traces[1].num_tokens == int(mask[1].sum()) + 3 - 1
    assert traces[0].num_tokens == int(mask[0].sum()) + 8 - 1


# ---- where a row stopped -----------------------------------------------------------------------
class _StopRowAfter:
    """A custom criterion: row ``row`` is done once it generated ``n`` tokens."""

    def __init__(self, width, row, n):
        self.width, self.row, self.n = width, row, n

    def __call__(self, input_ids, scores, **kw):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] >= self.width + self.n
        return done


def _free_run(model, ids, mask, max_new):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             do_sample=False, eos_token_id=[], pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_custom_stop_with_pad_equal_to_eos_keeps_the_eos_route():
    # capture_job sets pad = eos for tokenizers without a pad token. Row 0 stops at its EOS (its
    # 2nd token), row 1 by a custom criterion after 3 tokens; both are then fed pad = eos. The
    # EOS row must keep the route of the token before its EOS (T = P + 2 - 1), not lose it.
    from transformers import StoppingCriteriaList

    model, tok = load_builtin("tiny-qwen3-moe")
    enc = tok(["hello world", "abc"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    W = ids.shape[1]
    free = _free_run(model, ids, mask, 8)
    eos = int(free[0, 1])
    assert eos not in free[0, :1].tolist() and eos not in free[1, :3].tolist(), "pick other rows"
    traces, seq = capture_generate(
        model, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos,
        stopping_criteria=StoppingCriteriaList([_StopRowAfter(W, 1, 3)]))
    assert seq[0, W:].tolist() == [int(free[0, 0])] + [eos] * (seq.shape[1] - W - 1)
    assert [t.num_tokens for t in traces] == [int(mask[0].sum()) + 2 - 1, int(mask[1].sum()) + 3 - 1]
    assert all(t.missing is None for t in traces)


def test_custom_stop_keeps_generated_pad_tokens():
    # row 1 genuinely generates the pad id as its 3rd token, then a custom criterion stops it:
    # those are generated tokens (their routes count), not padding
    from transformers import StoppingCriteriaList

    model, tok = load_builtin("tiny-qwen3-moe")
    enc = tok(["hello world", "abc"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    W = ids.shape[1]
    free = _free_run(model, ids, mask, 6)
    pad = int(free[1, 2])
    assert pad not in free[1, :2].tolist(), "pick another row"
    traces, seq = capture_generate(
        model, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=[], pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([_StopRowAfter(W, 1, 3)]))
    assert seq[1, W:W + 3].tolist() == free[1, :3].tolist()
    assert traces[1].num_tokens == int(mask[1].sum()) + 3 - 1
    assert traces[0].num_tokens == int(mask[0].sum()) + 6 - 1


def test_stop_strings_end_the_row_where_generate_stopped_it():
    model, tok = load_builtin("tiny-qwen3-moe")
    enc = tok(["hello world", "abc"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    W = ids.shape[1]
    free = _free_run(model, ids, mask, 8)
    # the first two adjacent ASCII tokens of row 0 (a byte-level model: most bytes are not text)
    j = next(j for j in range(1, 8) if tok.decode(free[0, j - 1:j + 1]).isascii()
             and tok.decode(free[0, j - 1:j + 1]).isprintable())
    text = tok.decode(free[0, j - 1:j + 1])
    assert text not in tok.decode(free[1]), "pick another stop string"
    traces, seq = capture_generate(model, ids, mask, max_new_tokens=8, do_sample=False,
                                   eos_token_id=[], pad_token_id=0, stop_strings=[text],
                                   tokenizer=tok)
    assert seq[0, W:W + j + 1].tolist() == free[0, :j + 1].tolist()
    assert [t.num_tokens for t in traces] == [int(mask[0].sum()) + j + 1 - 1,
                                              int(mask[1].sum()) + 8 - 1]
    with pytest.raises(ValueError, match="stop_strings need the model's tokenizer"):
        capture_generate(model, ids, mask, max_new_tokens=2, stop_strings=["x"])
