"""Tiny random MoE models of every supported architecture, for tests (no downloads).

Every config has a dense layer where the architecture has one, so ``moe_layers`` is exercised, and
uses more experts than top-k with grouped routing where the architecture routes by groups.
"""

from __future__ import annotations

from typing import Any

import torch

from routecap.builtin import init_weights_

VOCAB = 300
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _cfg(model_type: str, **kw: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_COMMON, **kw})


def tiny_config(arch: str) -> Any:
    if arch == "mixtral":
        return _cfg("mixtral", num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=16)
    if arch == "qwen2_moe":
        return _cfg("qwen2_moe", num_hidden_layers=4, num_experts=12, num_experts_per_tok=4,
                    moe_intermediate_size=32, shared_expert_intermediate_size=64,
                    mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=False)
    if arch == "qwen3_moe":
        return _cfg("qwen3_moe", num_hidden_layers=4, num_experts=16, num_experts_per_tok=4,
                    moe_intermediate_size=32, head_dim=16, mlp_only_layers=[0],
                    decoder_sparse_step=1, norm_topk_prob=True)
    if arch == "olmoe":
        return _cfg("olmoe", num_hidden_layers=3, num_experts=16, num_experts_per_tok=4)
    if arch == "deepseek_v3":
        return _cfg("deepseek_v3", num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4,
                    n_group=4, topk_group=2, first_k_dense_replace=1, moe_intermediate_size=32,
                    n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4,
                    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                    v_head_dim=16, head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True,
                    rope_interleave=True)
    if arch == "gpt_oss":
        return _cfg("gpt_oss", num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    if arch == "glm4_moe":
        return _cfg("glm4_moe", num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4,
                    n_group=2, topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32,
                    n_shared_experts=1, head_dim=16, norm_topk_prob=True)
    raise KeyError(arch)


SUPPORTED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe"]
#: routers that call topk(sorted=False): only the set of a row is defined, not its order
UNSORTED_TOPK = {"deepseek_v3", "glm4_moe"}


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.name_or_path = f"tiny-{arch}"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    init_weights_(model, seed)
    model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model
