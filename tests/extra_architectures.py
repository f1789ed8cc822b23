"""Tiny random configs of transformers MoE architectures beyond the golden-tested seven (offline).

Each :class:`ArchCase` builds a model with ``AutoConfig.for_model(model_type, **sizes)`` and seeded
random weights (``routecap.builtin.init_weights_``), and says what routecap must do with it: capture
it (``expect="works"``, with the decoder layers that hold a router) or refuse it by name
(``expect="refused"``). A case whose behaviour breaks routecap's promise carries ``finding``: the
test marks it ``xfail(strict=True)`` (details in the report of the architecture survey).

Sizes: hidden 64, 4 heads (2 KV heads) of 16, vocab 300, 2-4 layers, 8 experts top-2 or 16 top-4
where routing is grouped; a dense layer where the architecture has one, so ``moe_layers`` matters.

Skipped (not in the table), and why:
  * longcat_flash: builds 2.2 B parameters even when shrunk (its zero-expert / shortcut layout
    multiplies the layer count), 70 s on this CPU.
  * zaya: the config validator allows only ``num_experts_per_tok=1``; beam, flint, kolibri1,
    lara_mini, inkling2*, muse_spark, dots3_note, hy_v4*: multimodal wrappers or absent from
    transformers 5.17 (the GPU machines' version), so the case table would differ by version.
  * multimodal MoE wrappers (aria, qwen3_vl_moe, qwen3_omni_moe, glm4v_moe, ernie4_5_vl_moe,
    llama4 with vision, gemma4, deepseek_ocr2, minimax_m3_vl, step3p7, mistral_large4, ...): no
    ``AutoModelForCausalLM`` entry or a vision tower to build; their text decoders are covered by
    the text-only cases (qwen3_5_moe_text, llama4_text).
  * deepseek_v4, glm5_next, mistral4, openai_privacy_filter, vitpose_backbone, axk2, cohere2_moe's
    siblings: no causal-LM auto class, not a token-choice LM, or the same router as a case here.
  * axk1: its router cannot run on the dummy rows routecap probes with in a tiny config; a
    duplicate of the DeepSeek-V3 router otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from routecap.builtin import init_weights_

VOCAB = 300
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Multi-head latent attention (DeepSeek-V2 style) at tiny sizes.
_MLA: dict[str, Any] = dict(
    num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
)


@dataclass(frozen=True)
class ArchCase:
    """One architecture, its tiny config and what routecap must do with it."""

    id: str
    model_type: str
    sizes: dict[str, Any]
    expect: str  # "works" or "refused"
    moe_layers: tuple[int, ...] = ()  # works: the decoder layers that hold a router
    unsorted: bool = False  # the router calls topk(sorted=False): compare rows as sets
    refusal: str = ""  # refused: a fragment the error message must contain besides the name
    finding: str | None = None  # routecap breaks its promise here: xfail(strict=True)
    seq2seq: bool = False  # encoder-decoder: built with AutoModelForSeq2SeqLM
    common: bool = True  # merge _COMMON into sizes
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _c(model_type: str, **sizes: Any) -> tuple[str, dict[str, Any]]:
    return model_type, sizes


CASES: list[ArchCase] = [
    # ---- expected to work: v5 routers returning (logits, scores, indices) ------------------------
    ArchCase("phimoe", "phimoe", dict(num_hidden_layers=2, num_local_experts=8,
                                      num_experts_per_tok=2, sliding_window=8),
             "works", moe_layers=(0, 1)),
    ArchCase("granitemoe", "granitemoe", dict(num_hidden_layers=2, num_local_experts=8,
                                              num_experts_per_tok=2),
             "works", moe_layers=(0, 1)),
    ArchCase("granitemoeshared", "granitemoeshared",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                  shared_intermediate_size=32),
             "works", moe_layers=(0, 1)),
    ArchCase("granitemoehybrid", "granitemoehybrid",
             dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                  num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32,
                  mamba_n_heads=4, mamba_d_state=16, mamba_d_head=32, mamba_chunk_size=16),
             "works", moe_layers=(0, 1, 2)),
    ArchCase("jamba", "jamba",
             dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=0,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=8,
                  num_experts_per_tok=2, use_mamba_kernels=False, mamba_d_state=8),
             "works", moe_layers=(1, 3)),
    ArchCase("qwen3_next", "qwen3_next",
             dict(num_hidden_layers=3,
                  layer_types=["linear_attention", "full_attention", "linear_attention"],
                  mlp_only_layers=[0], num_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=32, shared_expert_intermediate_size=32,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=4),
             "works", moe_layers=(1, 2)),
    ArchCase("qwen3_5_moe_text", "qwen3_5_moe_text",
             dict(num_hidden_layers=3,
                  layer_types=["linear_attention", "full_attention", "linear_attention"],
                  num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
             "works", moe_layers=(0, 1, 2)),
    ArchCase("ernie4_5_moe", "ernie4_5_moe",
             dict(num_hidden_layers=3, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
                  moe_layer_start_index=1, moe_num_shared_experts=1),
             "works", moe_layers=(1, 2)),
    ArchCase("deepseek_v2", "deepseek_v2",
             dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, **_MLA),
             "works", moe_layers=(1, 2), unsorted=True),
    ArchCase("dots1", "dots1",
             dict(num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                  topk_group=2, first_k_dense_replace=1, moe_intermediate_size=32,
                  n_shared_experts=1, norm_topk_prob=True),
             "works", moe_layers=(1, 2), unsorted=True),
    ArchCase("glm4_moe_lite", "glm4_moe_lite",
             dict(num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4, n_group=2,
                  topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32,
                  n_shared_experts=1, **_MLA),
             "works", moe_layers=(1, 2), unsorted=True),
    ArchCase("exaone_moe", "exaone_moe",
             dict(num_hidden_layers=3, num_experts=16, num_experts_per_tok=4, n_group=2,
                  topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32,
                  num_shared_experts=1, sliding_window=8),
             "works", moe_layers=(1, 2), unsorted=True),
    ArchCase("minimax", "minimax",
             dict(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
                  num_local_experts=8, num_experts_per_tok=2),
             "works", moe_layers=(0, 1)),
    ArchCase("hunyuan_v1_moe", "hunyuan_v1_moe",
             dict(num_hidden_layers=2, num_experts=8, moe_topk=2),
             "works", moe_layers=(0, 1)),
    ArchCase("flex_olmo", "flex_olmo",
             dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
             "works", moe_layers=(0, 1)),
    ArchCase("cohere2_moe", "cohere2_moe",
             dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
                  num_experts=8, num_experts_per_tok=2, sliding_window=8),
             "works", moe_layers=(1, 2)),
    ArchCase("mimo_v2_flash", "mimo_v2_flash",
             dict(num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4, n_group=2,
                  topk_group=1, moe_intermediate_size=32, v_head_dim=16, sliding_window=8),
             "works", moe_layers=(1, 2), unsorted=True),
    ArchCase("solar_open", "solar_open",
             dict(num_hidden_layers=2, n_routed_experts=16, num_experts_per_tok=4, n_group=2,
                  topk_group=1, moe_intermediate_size=32, n_shared_experts=1),
             "works", moe_layers=(0, 1), unsorted=True),
    ArchCase("nemotron_h", "nemotron_h",
             dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  moe_shared_expert_intermediate_size=32, n_shared_experts=1,
                  mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
                  chunk_size=16, use_mamba_kernels=False),
             "works", moe_layers=(1, 3), unsorted=True),
    ArchCase("lfm2_moe_no_bias", "lfm2_moe",
             dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                  num_dense_layers=1, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, use_expert_bias=False),
             "works", moe_layers=(1, 2)),
    # ---- expected to be refused by name ---------------------------------------------------------
    ArchCase("llama4_text", "llama4_text",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=1,
                  intermediate_size_mlp=96, moe_layers=[0, 1], attention_chunk_size=64),
             "refused", refusal="router Llama4Router"),
    ArchCase("dbrx", "dbrx",
             dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=VOCAB,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                  ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
             "refused", refusal="router DbrxRouter", common=False),
    ArchCase("jetmoe", "jetmoe",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                  kv_channels=16),
             "refused", refusal="no MoE layer found",
             notes="MoE in the MLP and in attention (MoA), router inside `experts`; the message "
                   "says 'no MoE layer found', which is true of routecap's pattern only"),
    ArchCase("lfm2_moe", "lfm2_moe",
             dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                  num_dense_layers=1, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, use_expert_bias=True),
             "refused", refusal="router Lfm2MoeTopKRouter",
             notes="router(hidden, expert_bias): the probe passes no bias"),
    ArchCase("afmoe", "afmoe",
             dict(num_hidden_layers=3, num_dense_layers=1, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, num_shared_experts=1),
             "refused", refusal="router AfmoeTokenChoiceRouter",
             notes="router(hidden, expert_bias): the probe passes no bias"),
    ArchCase("minimax_m2", "minimax_m2",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
             "refused", refusal="router MiniMaxM2TopKRouter",
             notes="router(hidden, e_score_correction_bias): the probe passes no bias"),
    ArchCase("switch_transformers", "switch_transformers",
             dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                  num_decoder_layers=2, num_heads=4, num_experts=8, encoder_sparse_step=1,
                  decoder_sparse_step=1, pad_token_id=0, eos_token_id=2,
                  decoder_start_token_id=0),
             "refused", refusal="encoder-decoder models are not supported", seq2seq=True,
             common=False),
    ArchCase("nllb_moe", "nllb-moe",
             dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                  decoder_ffn_dim=96, num_experts=8, encoder_sparse_step=1,
                  decoder_sparse_step=1, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=2),
             "refused", refusal="encoder-decoder models are not supported", seq2seq=True,
             common=False),
]

CASES_BY_ID = {c.id: c for c in CASES}


def tiny_config(case: ArchCase) -> Any:
    from transformers import AutoConfig

    sizes = {**_COMMON, **case.sizes} if case.common else dict(case.sizes)
    return AutoConfig.for_model(case.model_type, **sizes)


def tiny_model(case: ArchCase, seed: int = 0) -> Any:
    """The case's model in float32, eval mode, with seeded random weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = tiny_config(case)
    cfg.name_or_path = f"tiny-{case.id}"
    auto = AutoModelForSeq2SeqLM if case.seq2seq else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    init_weights_(model, seed)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model
