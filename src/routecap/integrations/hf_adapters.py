"""The registry of transformers router families: one :class:`RouterAdapter` per family.

Shape legend: N router rows (tokens), K top-k, E experts.

Each entry says, for the routers of one family (matched by class name against the router's MRO),
how the family scores and chooses, how to read the chosen ids from the router's output, and where
its final top-k is, which routing replay answers (``force_ids``). A family whose ids cannot be
trusted is refused by name. Discovery of the routers of a model, and the hooks that read them,
are in :mod:`.hf_routers`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .hf_topk import ROUTER_TOPK, TopkScope

if TYPE_CHECKING:
    from .hf_routers import RouterSite

__all__ = ["GENERIC_ADAPTER", "ROUTER_ADAPTERS", "RouterAdapter", "adapter_for", "read_ids_at_slot"]


def read_ids_at_slot(output: Any, site: RouterSite) -> torch.Tensor:
    """The chosen ids ``[N, K]`` from a router's output: element ``site.index_slot`` of the tuple.

    Routers fed ``[B, S, H]`` may return ``[B, S, K]``: that is flattened to rows (a view, no copy).
    Anything that is not a tensor is handed on as is; the capturer checks it and names what came.
    """
    ids = output[site.index_slot] if isinstance(output, (tuple, list)) else output
    if isinstance(ids, torch.Tensor) and ids.dim() > 2:
        ids = ids.reshape(-1, site.top_k)
    return ids


@dataclass(frozen=True, kw_only=True)
class RouterAdapter:
    """What routecap knows about one family of routers.

    Args:
        family: a short name (``"softmax_topk"``), used in errors and docs.
        classes: router class names of the family (matched against the router's MRO).
        scoring: how the family scores experts and picks its top-k, in words: what replay must
            reproduce for the weights.
        read_ids: ``(router output, site) -> [N, K]`` chosen ids, as the router's own top-k
            produced them (never recomputed); None for routers whose output holds no ids: their
            ids are read at the final top-k itself (``force_ids`` says where it is).
        force_ids: where the family's final top-k call is (:class:`.hf_topk.TopkScope`): routing
            replay answers that call with the given ids and the router's scores at them, so the
            router's own code computes the weights (``routecap.replay``). None: replay is not
            possible for the family; ``replay_refusal`` says why.
        refusal: set for families whose output cannot be recorded as routes; the reason.
        replay_refusal: why the family cannot be replayed (with ``force_ids=None``).
    """

    family: str
    classes: tuple[str, ...] = ()
    scoring: str = ""
    read_ids: Callable[[Any, RouterSite], torch.Tensor] | None = read_ids_at_slot
    force_ids: TopkScope | None = ROUTER_TOPK
    refusal: str | None = None
    replay_refusal: str | None = None


#: Any router that returns exactly one integer ``[N, K]`` tensor (the v5 ``(router_logits,
#: router_scores, router_indices)`` shape, or a permutation of it); its scoring is not known.
GENERIC_ADAPTER = RouterAdapter(
    family="generic",
    scoring="unknown: ids read from the one integer [N, K] tensor of the router's output",
)

ROUTER_ADAPTERS: tuple[RouterAdapter, ...] = (
    RouterAdapter(
        family="softmax_topk",
        classes=("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter",
                 "OlmoeTopKRouter"),
        scoring="softmax over the E logits, top-k of the probabilities, then renormalised over "
                "the k chosen (always for Mixtral, if norm_topk_prob for Qwen2/Qwen3-MoE, OLMoE)",
    ),
    RouterAdapter(
        family="topk_softmax",
        classes=("GptOssTopKRouter",),
        scoring="top-k of the logits (router bias included), softmax over the k chosen logits",
    ),
    RouterAdapter(
        family="sigmoid_bias_grouped",
        classes=("DeepseekV3TopkRouter", "Glm4MoeTopkRouter"),
        scoring="sigmoid of the logits; choice on sigmoid + e_score_correction_bias, limited to "
                "the topk_group best of n_group groups (a group scores the sum of its 2 best); "
                "weights from the unbiased sigmoid at the chosen ids, renormalised if "
                "norm_topk_prob, times routed_scaling_factor; topk(sorted=False)",
    ),
    RouterAdapter(
        family="softmax_bias_zero_experts",
        classes=("LongcatFlashTopkRouter",),
        scoring="softmax over n_routed_experts + zero_expert_num logits; choice on softmax + "
                "e_score_correction_bias; weights from the unbiased softmax times "
                "routed_scaling_factor; ids >= n_routed_experts are zero-computation experts "
                "(E is the logits' width); topk(sorted=False)",
    ),
    RouterAdapter(
        family="softmax_group_limited_greedy",
        classes=("DeepseekV2TopkRouter",),
        scoring="softmax over the logits; top-k over it (topk_method='greedy'), or over a copy "
                "with the groups outside the topk_group best (by their best score) set to 0 "
                "('group_limited_greedy'), whose top-k VALUES are the weights; times "
                "routed_scaling_factor. Replay reads a replayed id's weight from the unmasked "
                "softmax (a masked copy would give an id in a dropped group weight 0)",
        force_ids=TopkScope(values_from="softmax"),
    ),
    RouterAdapter(
        family="sigmoid_topk_dense",
        classes=("Llama4Router",),
        scoring="top-k of the logits; sigmoid of the chosen logits, -inf (weight 0) elsewhere, "
                "returned as [N, E] scores with the logits: no ids in the output; the experts "
                "run densely on inputs scaled by the scores",
        read_ids=None,
    ),
    RouterAdapter(
        family="softmax_topk_pnorm_in_block",
        classes=("DbrxRouter",),
        scoring="the router returns logits only; the block (route_tokens_to_experts) takes "
                "softmax, top-k, and divides the chosen by their p-norm "
                "(moe_normalize_expert_weights)",
        read_ids=None,
        force_ids=TopkScope(owner="block", method="route_tokens_to_experts"),
    ),
    RouterAdapter(
        family="sparsemixer",
        classes=("PhimoeTopKRouter",),
        scoring="sparsemixer: the best expert by max, its weight a softmax over the scores within "
                "a relative threshold of it; then the same again with that expert masked (Gumbel "
                "sampling and a Heun's-method gradient estimator in training)",
        force_ids=None,
        replay_refusal="its sparsemixer picks experts one at a time by max and a relative-score "
                       "threshold mask (Gumbel sampling in training), with no top-k call to "
                       "replace; replaying it needs the sparsemixer rewritten, not done",
    ),
    RouterAdapter(
        family="hash",
        classes=("DeepseekV4HashRouter",),
        scoring="routes by token id through a fixed table (router(hidden, input_ids))",
        force_ids=None,
        replay_refusal="hash routing: its layers route by token id (router(hidden, input_ids)), "
                       "not by a top-k of scores; capture refuses it too",
    ),
    RouterAdapter(
        family="skip_as_expert_0",
        classes=("ZayaRouter",),
        refusal="its router reports the skip expert as expert 0 (with weight 0), so a route "
                "cannot tell expert 0 from a skip",
    ),
)


def adapter_for(router: nn.Module,
                adapters: Sequence[RouterAdapter] = ROUTER_ADAPTERS) -> RouterAdapter:
    """The adapter of ``router``'s family: the first whose class names match its MRO, else
    :data:`GENERIC_ADAPTER`."""
    names = [cls.__name__ for cls in type(router).__mro__]
    for name in names:  # the most specific class first
        for adapter in adapters:
            if name in adapter.classes:
                return adapter
    return GENERIC_ADAPTER
