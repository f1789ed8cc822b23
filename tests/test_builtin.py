import hashlib

import torch

from routecap.builtin import EOS_ID, PAD_ID, byte_tokenizer, init_weights_, load_builtin, tiny_config
from routecap.integrations.hf import find_moe_routers


def _digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def test_builtin_is_deterministic_and_order_independent():
    a, _ = load_builtin("builtin:tiny-qwen3-moe")
    b, _ = load_builtin("tiny-qwen3-moe")
    assert _digest(a) == _digest(b)
    c, _ = load_builtin("tiny-qwen3-moe", seed=1)
    assert _digest(a) != _digest(c)


def test_builtin_shape():
    model, _ = load_builtin("tiny-qwen3-moe")
    info = find_moe_routers(model)
    assert info.moe_layers == (1, 2, 3)  # layer 0 is dense
    assert (info.num_experts, info.top_k) == (16, 4)
    assert tiny_config().vocab_size == 259


def test_byte_tokenizer_roundtrip_and_left_padding():
    tok = byte_tokenizer()
    enc = tok(["héllo", "a"], padding=True)
    assert enc["input_ids"][1][:5] == [PAD_ID] * 5 and enc["attention_mask"][1][-1] == 1
    assert tok.decode(enc["input_ids"][0]) == "héllo"
    assert tok("a")["input_ids"] == [3 + ord("a")]
    assert tok.eos_token_id == EOS_ID


def test_init_weights_norms_and_routers():
    model, _ = load_builtin("tiny-qwen3-moe")
    hidden = model.config.hidden_size
    params = dict(model.named_parameters())
    norms = [n for n in params if "norm" in n and n.endswith("weight")]
    routers = [n for n in params if n.endswith("mlp.gate.weight")]
    assert len(routers) == 3 and len(norms) >= 4
    for n in norms:
        assert torch.equal(params[n], torch.ones_like(params[n])), n
    for n in routers:  # std 1/sqrt(hidden): router scores well separated
        assert abs(float(params[n].detach().std()) - hidden ** -0.5) < 0.02, n
    others = [n for n in params if n not in norms and n not in routers]
    for n in others:
        assert abs(float(params[n].detach().std()) - 0.02) < 0.005, n
    # distinct streams per name: no two router weights are the same
    assert not torch.equal(params[routers[0]], params[routers[1]])
    # the same seed reproduces the weights exactly, another seed changes every tensor
    before = {n: p.detach().clone() for n, p in params.items()}
    init_weights_(model, seed=0)
    same = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert sorted(same) == sorted(before)
    init_weights_(model, seed=1)
    changed = [n for n, p in model.named_parameters()
               if n not in norms and not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(others + routers)
