"""Built-in tiny MoE models with seeded random weights and a byte tokenizer: offline, in seconds.

``builtin:tiny-qwen3-moe`` is a 4-layer Qwen3-MoE (layer 0 dense, layers 1-3 sparse), 16 experts,
top-4, hidden size 64. Its weights come from :func:`init_weights_`, which seeds every parameter
from its own name, so the model is the same bit for bit on every machine, in every parameter
order and every transformers version that keeps the parameter names.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["BUILTIN_MODELS", "byte_tokenizer", "init_weights_", "load_builtin", "tiny_config"]

BUILTIN_PREFIX = "builtin:"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB_SIZE = len(_SPECIALS) + 256


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-level alphabet of GPT-2 style tokenizers: printable bytes map to themselves, the
    # others to code points above 255, so every byte is one visible character.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: id = 3 + byte value; ids 0, 1, 2 are <pad>, <bos>, <eos>.

    Left padding, as generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(_SPECIALS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        padding_side="left",
    )


def tiny_config(name: str = "tiny-qwen3-moe") -> Any:
    """The config of a built-in model."""
    if name != "tiny-qwen3-moe":
        raise ValueError(f"unknown built-in model {name!r}; expected one of {sorted(BUILTIN_MODELS)}")
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _seed_of(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


def init_weights_(model: nn.Module, seed: int = 0, *, std: float = 0.02) -> nn.Module:
    """Fill every parameter and floating buffer from a generator seeded by its name.

    Norm weights are 1; router weights get std 1/sqrt(hidden) so that router scores are well
    separated (near-ties at the k-th choice are rare); e_score_correction_bias gets small noise so
    that DeepSeek-style bias correction matters; everything else is N(0, std).
    """
    with torch.no_grad():
        # parameters, and the one learnt buffer routers have; other buffers (rotary tables,
        # attention decay tables, embedding scales) are computed by the model and left alone
        tensors = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers()
            if n.rsplit(".", 1)[-1] == "e_score_correction_bias" and b.is_floating_point()
        ]
        for name, p in tensors:
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if "norm" in owner.rsplit(".", 1)[-1] or "layernorm" in name:
                if leaf == "weight":
                    p.fill_(1.0)
                    continue
            rng = np.random.default_rng(_seed_of(name, seed))
            if leaf == "e_score_correction_bias":
                scale = 0.05
            elif owner.endswith((".gate", ".router")) and p.dim() == 2:
                scale = 1.0 / np.sqrt(p.shape[-1])
            elif leaf == "bias" or leaf.endswith("_bias"):
                scale = std
            else:
                scale = std
            value = rng.standard_normal(tuple(p.shape), dtype=np.float32) * scale
            p.copy_(torch.from_numpy(value).to(p.dtype))
    return model


def _load_tiny_qwen3_moe(device: str | torch.device, dtype: torch.dtype, seed: int) -> Any:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("tiny-qwen3-moe")
    cfg.name_or_path = "builtin:tiny-qwen3-moe"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    init_weights_(model, seed)
    model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


BUILTIN_MODELS: dict[str, Callable[[Any, Any, int], Any]] = {
    "tiny-qwen3-moe": _load_tiny_qwen3_moe,
}


def load_builtin(
    name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a built-in model; ``name`` with or without the ``builtin:`` prefix."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown built-in model {name!r}; expected one of "
            f"{[BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS)]}"
        )
    return BUILTIN_MODELS[key](device, dtype, seed), byte_tokenizer()
