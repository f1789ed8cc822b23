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
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    w = model.model.layers[1].mlp.gate.weight
    assert abs(float(w.detach().std()) - 1 / 8) < 0.02  # std 1/sqrt(hidden=64)
    init_weights_(model, seed=0)
