"""Tiny random models of transformers MoE architectures beyond the golden-tested seven (offline).

Each :class:`ArchCase` builds a model with ``AutoConfig.for_model(model_type, **sizes)`` (composite
vision-language configs get their ``text_config`` the same way) and seeded random weights from
``routecap.builtin.init_weights_``, and says what routecap must do with it: capture it
(``expect="works"``, with the decoder layers that hold a router) or refuse it by name
(``expect="refused"``, with a fragment of the message). A case where routecap breaks its promise
carries ``finding``; tests/test_hf_architectures.py marks it ``xfail(strict=True)``.

Sizes: hidden 64, 4 heads (2 KV heads) of 16, vocab 300, 2-4 layers, 8 experts top-2, or 16 top-4
where routing is grouped; a dense layer where the architecture has one, so that ``moe_layers``
matters; linear-attention / Mamba hybrids keep one full-attention layer; sliding windows of 4
(shorter than the prompts).

Not in the table, and why:
  * multimodal / omni wrappers: llama4, gemma4 and hy_v4_vl (their text decoders are here as
    llama4_text, gemma4_text, hy_v4); mistral_large4, minimax_m3_vl, step3p7, glm5_next,
    deepseek_ocr2, unlimited_ocr, dots3_note, inkling2*, muse_spark, qwen3_omni_moe, qwen4_exp,
    diffusion_gemma: each needs its own vision / audio tower config; not tried, for time.
  * mistral4: no AutoModelForCausalLM entry (the mistral_large4 wrapper uses it).
  * openai_privacy_filter, vitpose_backbone: not causal language models.
  * pure linear-attention / Mamba stacks (no attention layer at all): transformers' own
    ``generate`` raises in ``cache.get_seq_length()``, so there is nothing to capture.
  * longcat_flash is here at a proper tiny size; note its config calls the layer count
    ``num_layers`` (``num_hidden_layers`` is ignored: 28 full-size layers, 2.2 B parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
# DeepSeek-V4 (compressed / sparse attention, hyper-connections) at tiny sizes.
_DSV4: dict[str, Any] = dict(
    num_hidden_layers=2, num_key_value_heads=1, head_dim=32, q_lora_rank=32, o_lora_rank=32,
    o_groups=2, qk_rope_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
    index_n_heads=8, index_head_dim=16, index_topk=6, sliding_window=4,
    num_nextn_predict_layers=0,
)
# A one-block vision tower for the vision-language wrappers (never run: prompts are text only).
_QWEN_VISION: dict[str, Any] = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                    out_hidden_size=64, patch_size=4, num_position_embeddings=16)
#: buffers that hold learnt router state; every other floating buffer is computed (rotary tables,
#: decay tables, embedding scales) and keeps the value the model computed
LEARNT_BUFFERS = ("e_score_correction_bias", "expert_bias")


@dataclass(frozen=True)
class ArchCase:
    """One architecture, its tiny config and what routecap must do with it."""

    id: str
    model_type: str
    sizes: dict[str, Any]
    expect: str  # "works" or "refused"
    moe_layers: tuple[int, ...] = ()  # works: the decoder layers that hold a router
    unsorted: bool = False  # the router calls topk(sorted=False): compare rows as sets
    refusal: str = ""  # refused: a fragment the message must hold besides the architecture
    finding: str | None = None  # routecap breaks its promise here: xfail(strict=True)
    finding_raises: type[BaseException] | tuple[type[BaseException], ...] | None = None
    auto: str = "causal"  # "causal", "seq2seq" or "image-text-to-text"
    text: dict[str, Any] | None = None  # composite config: the text_config (merged with _COMMON)
    common: bool = True  # merge _COMMON into sizes (flat configs)
    notes: str = ""
    # before transformers `older_than` these fields replace the case's: an architecture whose
    # router changed between the versions the suite runs under (5.17 and the newest)
    older_than: str | None = None
    older: dict[str, Any] = field(default_factory=dict)

    def for_version(self, version: str) -> ArchCase:
        """The case as it applies under transformers ``version``."""
        from packaging.version import Version

        if self.older_than and Version(version) < Version(self.older_than):
            return replace(self, **self.older, older_than=None, older={})
        return self


@dataclass(frozen=True)
class SubConfig:
    """A sub-config built as a config object (older transformers leave some given as dicts)."""

    model_type: str
    sizes: dict[str, Any]


def _works(id: str, model_type: str, moe_layers: tuple[int, ...], **sizes: Any) -> ArchCase:
    return ArchCase(id, model_type, sizes, "works", moe_layers=moe_layers)


CASES: list[ArchCase] = [
    # ---- v5 routers returning (logits, scores, indices): expected to work ------------------------
    _works("phimoe", "phimoe", (0, 1), num_hidden_layers=2, num_local_experts=8,
           num_experts_per_tok=2, sliding_window=4),
    _works("granitemoe", "granitemoe", (0, 1), num_hidden_layers=2, num_local_experts=8,
           num_experts_per_tok=2),
    _works("granitemoeshared", "granitemoeshared", (0, 1), num_hidden_layers=2,
           num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32),
    _works("granitemoe_swa", "granitemoe_swa", (0, 1), num_hidden_layers=2, num_local_experts=8,
           num_experts_per_tok=2, sliding_window=4),
    _works("granitemoehybrid", "granitemoehybrid", (0, 1, 2), num_hidden_layers=3,
           layer_types=["mamba", "attention", "mamba"], num_local_experts=8,
           num_experts_per_tok=2, shared_intermediate_size=32, mamba_n_heads=4, mamba_d_state=16,
           mamba_d_head=32, mamba_chunk_size=16),
    replace(_works("jamba", "jamba", (1, 3), num_hidden_layers=4, attn_layer_period=2,
                   attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
                   num_experts=8, num_experts_per_tok=2, mamba_d_state=8),
            # 5.17: the router is a plain nn.Linear returning logits, refused by name
            older_than="5.24", older=dict(expect="refused", refusal="router Linear")),
    _works("qwen3_next", "qwen3_next", (1, 2), num_hidden_layers=3,
           layer_types=["linear_attention", "full_attention", "linear_attention"],
           mlp_only_layers=[0], num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, linear_key_head_dim=16, linear_value_head_dim=16,
           linear_num_key_heads=2, linear_num_value_heads=4),
    _works("qwen3_5_moe_text", "qwen3_5_moe_text", (0, 1, 2), num_hidden_layers=3,
           layer_types=["linear_attention", "full_attention", "linear_attention"],
           num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, linear_key_head_dim=16, linear_value_head_dim=16,
           linear_num_key_heads=2, linear_num_value_heads=4),
    _works("ernie4_5_moe", "ernie4_5_moe", (1, 2), num_hidden_layers=3, moe_num_experts=8,
           moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1, moe_num_shared_experts=1),
    _works("minimax", "minimax", (0, 1), num_hidden_layers=2,
           layer_types=["full_attention", "linear_attention"], num_local_experts=8,
           num_experts_per_tok=2),
    _works("hunyuan_v1_moe", "hunyuan_v1_moe", (0, 1), num_hidden_layers=2, num_experts=8,
           moe_topk=2),
    _works("flex_olmo", "flex_olmo", (0, 1), num_hidden_layers=2, num_experts=8,
           num_experts_per_tok=2),
    _works("cohere2_moe", "cohere2_moe", (1, 2), num_hidden_layers=3,
           mlp_layer_types=["dense", "sparse", "sparse"], num_experts=8, num_experts_per_tok=2,
           sliding_window=4),
    _works("laguna", "laguna", (1, 2), num_hidden_layers=3, num_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
           mlp_layer_types=["dense", "sparse", "sparse"]),
    _works("mellum", "mellum", (1, 2), num_hidden_layers=3, num_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32,
           mlp_layer_types=["dense", "sparse", "sparse"]),
    _works("flint", "flint", (1, 2), num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
           mlp_only_layers=[0], moe_intermediate_size=32, shared_expert_intermediate_size=32,
           layer_types=["full_attention", "sliding_attention", "full_attention"],
           sliding_window=4),
    _works("kolibri1", "kolibri1", (0, 1, 2), num_hidden_layers=3, num_local_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
           sliding_window=4),
    _works("lara_mini", "lara_mini", (0, 1, 2), num_hidden_layers=3, num_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
           layer_types=["linear_attention", "full_attention", "sliding_attention"],
           sliding_window=4),
    _works("lfm2_moe_no_bias", "lfm2_moe", (1, 2), num_hidden_layers=3,
           layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, num_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, use_expert_bias=False),
    # DeepSeek-style routers (sigmoid + correction bias, groups): topk(sorted=False)
    *(replace(c, unsorted=True) for c in (
        _works("deepseek_v2", "deepseek_v2", (1, 2), num_hidden_layers=3, n_routed_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
               first_k_dense_replace=1, **_MLA),
        _works("dots1", "dots1", (1, 2), num_hidden_layers=3, n_routed_experts=16,
               num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
               moe_intermediate_size=32, n_shared_experts=1, norm_topk_prob=True),
        _works("glm4_moe_lite", "glm4_moe_lite", (1, 2), num_hidden_layers=3,
               n_routed_experts=16, num_experts_per_tok=4, n_group=2, topk_group=1,
               first_k_dense_replace=1, moe_intermediate_size=32, n_shared_experts=1, **_MLA),
        _works("exaone_moe", "exaone_moe", (1, 2), num_hidden_layers=3, num_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, first_k_dense_replace=1,
               moe_intermediate_size=32, num_shared_experts=1, sliding_window=4),
        _works("mimo_v2_flash", "mimo_v2_flash", (1, 2), num_hidden_layers=3,
               n_routed_experts=16, num_experts_per_tok=4, n_group=2, topk_group=1,
               moe_intermediate_size=32, v_head_dim=16, sliding_window=4),
        _works("solar_open", "solar_open", (0, 1), num_hidden_layers=2, n_routed_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, moe_intermediate_size=32,
               n_shared_experts=1),
        _works("nemotron_h", "nemotron_h", (1, 3),
               layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
               n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=32, n_shared_experts=1, mamba_num_heads=4,
               mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16),
        _works("beam", "beam", (1, 2), num_hidden_layers=3, num_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, moe_intermediate_size=32,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=4),
        _works("axk1", "axk1", (1, 2), num_hidden_layers=3, n_routed_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, moe_intermediate_size=32,
               n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"], **_MLA),
        _works("hy_v4", "hy_v4", (1, 2), num_hidden_layers=3, n_routed_experts=8,
               num_experts_per_tok=2, n_shared_experts=1, qk_head_dim=16, index_topk=6,
               index_head_dim=16, index_n_heads=8, mlp_layer_types=["dense", "sparse", "sparse"],
               indexer_types=["full", "shared", "shared"],
               **{**_MLA, "head_dim": 16}),
        replace(_works("deepseek_v4_no_hash", "deepseek_v4", (0, 1), **_DSV4,
                       mlp_layer_types=["moe", "moe"]),
                finding="DeepSeek-V4's KV compressors pool fixed windows of columns, padding "
                        "included, so a left-padded row computes other hidden states than the "
                        "same request unpadded: routes differ (request 0, token 3, layer 1). "
                        "The capture equals independent router hooks in the same generate; the "
                        "difference is the model's, not routecap's",
                finding_raises=AssertionError),
        _works("axk2", "axk2", (1, 2), num_hidden_layers=3, n_routed_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, moe_intermediate_size=32,
               n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"], **_MLA),
        # DeepSeek sparse attention: index_topk=6 < the longest sequence (11), so the indexer
        # really selects. (With 2 indexer heads and index_topk=4 the ReLU'd index scores of a
        # random model tie exactly at the k-th key; the model's own cached decode then picks
        # other keys than its uncached forward and routes differ: a property of the model, not
        # of the capture, which equals independent hooks in the same generate.)
        _works("deepseek_v32", "deepseek_v32", (1, 2), num_hidden_layers=3,
               first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=2,
               topk_group=1, moe_intermediate_size=32, n_shared_experts=1, index_topk=6,
               index_head_dim=16, index_n_heads=8, **_MLA),
        _works("glm_moe_dsa", "glm_moe_dsa", (1, 2), num_hidden_layers=3,
               first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=1,
               topk_group=1, moe_intermediate_size=32, n_shared_experts=1, index_topk=6,
               index_head_dim=16, index_n_heads=8, **_MLA),
        _works("kimi_linear", "kimi_linear", (1, 2), num_hidden_layers=3,
               layer_types=["linear_attention", "full_attention", "linear_attention"],
               mlp_layer_types=["dense", "sparse", "sparse"], num_local_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, moe_intermediate_size=32,
               n_shared_experts=1, linear_head_dim=16, linear_num_heads=4, **_MLA),
        _works("bailing_hybrid", "bailing_hybrid", (1, 2), num_hidden_layers=3,
               layer_types=["linear_attention", "full_attention", "linear_attention"],
               mlp_layer_types=["dense", "sparse", "sparse"], num_local_experts=16,
               num_experts_per_tok=4, n_group=2, topk_group=1, moe_intermediate_size=32,
               n_shared_experts=1, **_MLA),
    )),
    # ---- vision-language wrappers, text-only prompts: the decoder is model.language_model ------
    ArchCase("qwen3_5_moe", "qwen3_5_moe", dict(vision_config=_QWEN_VISION), "works",
             moe_layers=(0, 1, 2), auto="image-text-to-text", common=False,
             text=dict(num_hidden_layers=3,
                       layer_types=["linear_attention", "full_attention", "linear_attention"],
                       num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4)),
    ArchCase("qwen3_vl_moe", "qwen3_vl_moe",
             dict(vision_config={**_QWEN_VISION, "deepstack_visual_indexes": [0]}), "works",
             moe_layers=(0, 1), auto="image-text-to-text", common=False,
             text=dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32)),
    ArchCase("glm4v_moe", "glm4v_moe",
             dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                     out_hidden_size=64, patch_size=4)),
             "works", moe_layers=(1, 2), unsorted=True, auto="image-text-to-text", common=False,
             text=dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                            mrope_section=[2, 1, 1],
                                            partial_rotary_factor=0.5))),
    ArchCase("aria", "aria",
             dict(vision_config=SubConfig("idefics3_vision", dict(
                 hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 image_size=32, patch_size=16)),
                  text_config=SubConfig("aria_text", dict(
                      _COMMON, num_hidden_layers=2, moe_num_experts=8, moe_topk=2,
                      moe_num_shared_experts=1))),
             "works", moe_layers=(0, 1), auto="image-text-to-text", common=False,
             # 5.17: the router is a plain Linear (logits only; top-k happens in the block),
             # refused by name
             older_than="5.24",
             older=dict(expect="refused", refusal="router Linear")),
    # ---- zero-computation experts ----------------------------------------------------------------
    ArchCase("longcat_flash", "longcat_flash",
             dict(num_layers=2, ffn_hidden_size=96, expert_ffn_hidden_size=32,
                  n_routed_experts=8, zero_expert_num=4, moe_topk=2, **_MLA),
             "works", moe_layers=(0, 1), unsorted=True,
             notes="zero-computation experts: ids run to n_routed_experts + zero_expert_num; "
                   "routecap takes E from the width of the router logits (12 here)"),
    # ---- other router shapes: expected to be refused by name ------------------------------------
    ArchCase("llama4_text", "llama4_text",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=1,
                  intermediate_size_mlp=96, moe_layers=[0, 1], attention_chunk_size=64),
             "works", moe_layers=(0, 1),
             notes="router returns (scores [N, E], logits): no index tensor; routecap reads the "
                   "ids at the router's own top-k (integrations.hf_topk)"),
    ArchCase("dbrx", "dbrx",
             dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=VOCAB,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  # rope_theta: DbrxAttention reads attn_config.rope_theta (absent by default)
                  # clip_qkv: DbrxAttention clamps q/k/v with it and fails when it is None
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
             "works", moe_layers=(0, 1), common=False,
             notes="router returns logits only; top-k happens in the block "
                   "(route_tokens_to_experts), where routecap reads the ids"),
    ArchCase("jetmoe", "jetmoe",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                  kv_channels=16),
             "refused", refusal="no MoE block routecap can capture",
             notes="MoE MLP and mixture-of-attention heads; routers sit inside `experts`"),
    ArchCase("ernie4_5_vl_moe", "ernie4_5_vl_moe",
             dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                     patch_size=4)),
             "refused", refusal="more than one MoE router per decoder layer",
             auto="image-text-to-text", common=False,
             text=dict(num_hidden_layers=3, moe_num_experts=8, moe_k=2,
                       moe_intermediate_size=[32, 32],
                       mlp_layer_types=["dense", "sparse", "sparse"],
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                            mrope_section=[2, 3, 3])),
             notes="separate text and vision experts, one router each per layer"),
    ArchCase("gemma4_text", "gemma4_text",
             dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                  sliding_window=4, enable_moe_block=True, num_experts=8, top_k_experts=2,
                  moe_intermediate_size=32, vocab_size_per_layer_input=VOCAB,
                  hidden_size_per_layer_input=16),
             "works", moe_layers=(0, 1),
             notes="a v5 router (probs, weights, indices) on the decoder layer itself; top-k is "
                   "config.top_k_experts"),
    # routers with a second required argument (a bias held by the block): routecap probes the
    # whole MoE block, which supplies it (lfm2_moe_no_bias above is the same router without it)
    ArchCase("lfm2_moe", "lfm2_moe",
             dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                  num_dense_layers=1, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, use_expert_bias=True),
             "works", moe_layers=(1, 2)),
    ArchCase("afmoe", "afmoe",
             dict(num_hidden_layers=3, num_dense_layers=1, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, num_shared_experts=1),
             "works", moe_layers=(1, 2)),
    ArchCase("minimax_m2", "minimax_m2",
             dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
             "works", moe_layers=(0, 1)),
    ArchCase("hy_v3", "hy_v3",
             dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, num_shared_experts=1),
             "works", moe_layers=(1, 2)),
    ArchCase("deepseek_v4", "deepseek_v4", dict(_DSV4, mlp_layer_types=["hash_moe", "moe"]),
             "refused", refusal="router DeepseekV4HashRouter",
             notes="hash routing: the first layers route by token id, router(hidden, input_ids)"),
    ArchCase("zaya", "zaya",
             dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=1,
                  router_hidden_size=16),
             "refused", refusal="skip expert as expert 0",
             notes="the router reports its skip expert (id E) as expert 0 with weight 0: a route "
                   "could not tell them apart, so routecap refuses it by class name"),
    # ---- encoder-decoder ------------------------------------------------------------------------
    ArchCase("switch_transformers", "switch_transformers",
             dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                  num_decoder_layers=2, num_heads=4, num_experts=8, encoder_sparse_step=1,
                  decoder_sparse_step=1, pad_token_id=0, eos_token_id=2,
                  decoder_start_token_id=0),
             "refused", refusal="encoder-decoder models are not supported", auto="seq2seq",
             common=False),
    ArchCase("nllb_moe", "nllb-moe",
             dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                  decoder_ffn_dim=96, num_experts=8, encoder_sparse_step=1,
                  decoder_sparse_step=1, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=2),
             "refused", refusal="encoder-decoder models are not supported", auto="seq2seq",
             common=False),
]

CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case id"


def tiny_config(case: ArchCase) -> Any:
    from transformers import AutoConfig

    sizes = {**_COMMON, **case.sizes} if case.common else dict(case.sizes)
    if case.text is not None:
        sizes["text_config"] = {**_COMMON, **case.text}
    for key, value in sizes.items():
        if isinstance(value, SubConfig):
            sizes[key] = AutoConfig.for_model(value.model_type, **value.sizes)
    return AutoConfig.for_model(case.model_type, **sizes)


def _auto_class(kind: str) -> Any:
    import transformers

    return {"causal": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "image-text-to-text": transformers.AutoModelForImageTextToText}[kind]


def randomize_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights (``init_weights_``: parameters and learnt router buffers only)."""
    return init_weights_(model, seed)


def build_model(case: ArchCase) -> Any:
    """The case's model in float32 with the weights the model's own init gives (not random)."""
    cfg = tiny_config(case)
    cfg.name_or_path = f"tiny-{case.id}"
    return _auto_class(case.auto).from_config(cfg, dtype=torch.float32)


def tiny_model(case: ArchCase, seed: int = 0) -> Any:
    """The case's model in float32, eval mode, with seeded random weights."""
    model = build_model(case)
    randomize_weights_(model, seed)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model
