"""Router knowledge for transformers MoE models: where the routers are, what they choose, how to read it.

Shape legend: N router rows (tokens), K top-k, E experts, L MoE layers.

One home for everything routecap knows about a transformers router:

* :data:`ROUTER_ADAPTERS`, the registry of router families (its own module, :mod:`.hf_adapters`,
  re-exported here): how each family scores and chooses, how to read its chosen ids, where replay
  forces them (``force_ids``). A router no entry names gets :data:`GENERIC_ADAPTER` (ids read from
  the one integer ``[N, K]`` tensor of its output, found by a probe; no scoring claimed).
* :func:`find_moe_routers`: every router of a model, numbered by its decoder layer, probed
  (:mod:`.hf_probe` runs each block once to find where the ids are).
* :func:`read_router_counts`: THE list of attribute names E and K are read from (router, experts,
  block, config), and :func:`moe_config`, (E, K, moe layers, layer count) of a config with no
  weights. ``convert``, the vLLM adapter and capture all go through these two.
* :func:`router_hook` / :func:`attach_router_hooks`: feed a capturer from the routers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hf_adapters import GENERIC_ADAPTER, ROUTER_ADAPTERS, RouterAdapter, adapter_for
from .hf_probe import ProbeError, probe_router, remapped_by
from .hf_topk import ROUTER_TOPK, TopkReader

__all__ = [
    "GENERIC_ADAPTER",
    "MoEConfig",
    "MoEModelInfo",
    "NUM_EXPERTS_ATTRS",
    "ROUTER_ADAPTERS",
    "RouterAdapter",
    "RouterSite",
    "TOP_K_ATTRS",
    "UnsupportedModelError",
    "adapter_for",
    "attach_router_hooks",
    "find_moe_routers",
    "moe_config",
    "moe_layers_from_config",
    "read_router_counts",
    "router_hook",
]

#: The attribute names of the number of routed experts and of top-k, in every place (router,
#: experts, MoE block, text config) and architecture routecap reads them from. The one list.
NUM_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "moe_k", "top_k_experts", "moe_topk")
_ROUTER_ATTRS = ("gate", "router")  # the MoE block's child that routes


class UnsupportedModelError(ValueError):
    """The model has no MoE layer routecap can capture, or its routers do not fit."""


# ---- what a model holds ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RouterSite:
    """One MoE router: where it lives and what it chooses."""

    path: str  # module path of the router, e.g. "model.layers.3.mlp.gate"
    layer: int  # decoder layer number
    module: nn.Module
    block: nn.Module  # the MoE block that holds the router and the experts
    num_experts: int
    top_k: int
    index_slot: int  # which element of the router's output tuple holds the top-k ids
    adapter: RouterAdapter = GENERIC_ADAPTER

    def read_ids(self, output: Any) -> torch.Tensor:
        """The ids ``[N, K]`` this router chose, from its forward's output."""
        if self.adapter.read_ids is None:
            raise TypeError(f"{self.path}: a {type(self.module).__name__} returns no ids; they are "
                            "read at its top-k (attach_router_hooks)")
        return self.adapter.read_ids(output, self)


@dataclass(frozen=True, kw_only=True)
class MoEModelInfo:
    """What :func:`find_moe_routers` learnt about a model."""

    architecture: str
    model_name: str
    sites: tuple[RouterSite, ...]
    num_hidden_layers: int
    step_module: nn.Module  # the decoder whose forward is one step
    step_module_path: str

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.sites)

    @property
    def num_experts(self) -> int:
        return self.sites[0].num_experts

    @property
    def top_k(self) -> int:
        return self.sites[0].top_k


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The router shape of a model, read from its config (:func:`moe_config`)."""

    num_experts: int  # E: the ids a router can choose, [0, E)
    top_k: int  # K
    moe_layers: tuple[int, ...]  # the decoder layers that hold a router
    num_layers: int  # every decoder layer, dense ones included (engines return all of them)
    architecture: str = ""


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _first_attr(objs: Iterable[Any], names: Sequence[str]) -> int | None:
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            v = getattr(obj, name, None)
            if _positive_int(v):
                return v
    return None


def read_router_counts(*sources: Any) -> tuple[int | None, int | None]:
    """(E, K) from the first of ``sources`` (router, experts, block, config, ...) that has them.

    E is widened to the ids the router itself can choose: the largest of the router's own counts
    and of its score-correction bias (LongCat-Flash appends "zero-computation" experts past the
    routed ones). None where no source says.
    """
    num_experts = _first_attr(sources, NUM_EXPERTS_ATTRS)
    top_k = _first_attr(sources, TOP_K_ATTRS)
    router = sources[0] if sources else None
    wider = [getattr(router, a, None) for a in NUM_EXPERTS_ATTRS]
    bias = getattr(router, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1:
        wider.append(int(bias.shape[0]))
    wider = [w for w in wider if _positive_int(w)]
    if num_experts is not None and wider:
        num_experts = max(num_experts, *wider)
    return num_experts, top_k


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return str(archs[0]) if archs else type(model).__name__


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


# ---- discovery ---------------------------------------------------------------------------------
def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, block, router attribute, router) of every module with experts and a router."""
    blocks = []
    for path, mod in model.named_modules():
        if not isinstance(getattr(mod, "experts", None), nn.Module):
            continue
        for attr in _ROUTER_ATTRS:
            router = getattr(mod, attr, None)
            if isinstance(router, nn.Module):
                blocks.append((path, mod, attr, router))
                break
    return blocks


def _site(arch: str, cfg: Any, path: str, block: nn.Module, attr: str, router: nn.Module,
          adapters: Sequence[RouterAdapter], probe: bool) -> tuple[RouterSite, str]:
    """The site of one router, and the path of the layer list that holds its block."""
    where = f"{path}.{attr}"
    # the last integer component of the block's path is its decoder layer
    parts = path.split(".")
    idx_pos = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
    if idx_pos is None:
        raise UnsupportedModelError(
            f"{arch}: MoE block at {path!r} is not inside a numbered list of decoder layers")
    num_experts, top_k = read_router_counts(router, block.experts, block, cfg)
    if num_experts is None or top_k is None:
        raise UnsupportedModelError(
            f"{arch}: cannot tell the number of experts ({num_experts}) or top-k ({top_k}) of "
            f"the router at {where}; routecap reads E from {list(NUM_EXPERTS_ATTRS)} and K from "
            f"{list(TOP_K_ATTRS)} of the router, its experts, its block and the text config")
    style = remapped_by(router)
    if style is not None:
        raise UnsupportedModelError(
            f"{arch}: the router at {where} is wrapped by transformers' {style}, which "
            "replaces the chosen global expert ids with this rank's local ids before any hook "
            "sees them (transformers 5.17 expert parallelism, enable_expert_parallel=True); "
            "routecap will not record those as routes. Use a transformers with all-to-all "
            "expert parallelism (DistributedConfig(ep_size=..., ep_implementation="
            "'all_to_all')) or routecap's gathered dispatch")
    adapter = adapter_for(router, adapters)
    if adapter.refusal:
        raise UnsupportedModelError(
            f"{arch}: router {type(router).__name__} at {where}: {adapter.refusal}")
    hidden = _first_attr([cfg], ["hidden_size"]) or _first_attr([router],
                                                                ["hidden_dim", "hidden_size"])
    w = getattr(router, "weight", None)
    if hidden is None and isinstance(w, torch.Tensor) and w.dim() == 2:
        hidden = int(w.shape[1])
    slot = 2
    if probe:
        # routers whose output holds no ids are read at their final top-k call
        scope = (adapter.force_ids or ROUTER_TOPK) if adapter.read_ids is None else None
        try:
            found = probe_router(where, block, router, top_k, num_experts, hidden, arch,
                                 topk_scope=scope)
        except ProbeError as e:
            raise UnsupportedModelError(str(e)) from e
        slot, num_experts = found.slot, found.num_experts
    site = RouterSite(path=where, layer=int(parts[idx_pos]), module=router, block=block,
                      num_experts=num_experts, top_k=top_k, index_slot=slot, adapter=adapter)
    return site, ".".join(parts[:idx_pos])


def find_moe_routers(model: nn.Module, *, probe: bool = True,
                     adapters: Sequence[RouterAdapter] = ROUTER_ADAPTERS) -> MoEModelInfo:
    """Find every MoE router of a transformers model, or refuse the model with a clear error.

    A MoE block is a module with an ``experts`` child and a ``gate`` or ``router`` child; its layer
    number is the index of the decoder layer that holds it. All routers must share E and K. Each
    router gets the adapter of its family (``adapters``, by class name). ``probe`` runs each block
    on 3 dummy rows to find which output holds the ids (off for models on the meta device).
    """
    arch = _architecture(model)
    cfg = _text_config(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{arch}: encoder-decoder models are not supported; routecap captures decoder-only "
            "causal language models")
    blocks = _moe_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"{arch}: no MoE block routecap can capture (it looks for a module with an "
            "`experts` child and a `gate` or `router` child, as transformers v5 MoE models have)")
    sites: list[RouterSite] = []
    list_paths: set[str] = set()
    for path, block, attr, router in blocks:
        site, list_path = _site(arch, cfg, path, block, attr, router, adapters, probe)
        sites.append(site)
        list_paths.add(list_path)
    if len(list_paths) != 1:
        raise UnsupportedModelError(
            f"{arch}: MoE blocks live in several layer lists {sorted(list_paths)}; routecap "
            "captures one decoder stack")
    sites.sort(key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise UnsupportedModelError(f"{arch}: more than one MoE router per decoder layer {layers}")
    ek = {(s.num_experts, s.top_k) for s in sites}
    if len(ek) != 1:
        raise UnsupportedModelError(
            f"{arch}: routers disagree on (num_experts, top_k): {sorted(ek)}; a trace has one E "
            "and K")
    (list_path,) = list_paths
    step_path = list_path.rpartition(".")[0] if "." in list_path else ""
    layer_list = model.get_submodule(list_path)
    num_hidden = len(layer_list) if isinstance(layer_list, (nn.ModuleList, nn.Sequential)) else (
        _first_attr([cfg], ["num_hidden_layers"]) or max(layers) + 1)
    name = getattr(getattr(model, "config", None), "name_or_path", "") or getattr(
        model, "name_or_path", "") or arch
    return MoEModelInfo(architecture=arch, model_name=str(name), sites=tuple(sites),
                        num_hidden_layers=num_hidden, step_module=model.get_submodule(step_path),
                        step_module_path=step_path)


#: moe_config's answers by config contents (a config is mutable: never by object identity)
_MOE_CONFIGS: dict[str, MoEConfig] = {}


def moe_config(config: Any) -> MoEConfig:
    """(E, K, moe layers, layer count) of a transformers config, no weights needed.

    The model is built on the meta device and searched by :func:`find_moe_routers` (no probe), so
    every architecture's own rule for dense layers (``mlp_only_layers``, ``first_k_dense_replace``,
    ``decoder_sparse_step``, ``layer_types``, ...) and every spelling of E and K
    (:data:`NUM_EXPERTS_ATTRS`, :data:`TOP_K_ATTRS`) apply exactly as in capture. Engines that
    return all layers (vLLM, SGLang) need this to drop the dense ones.
    """
    import transformers

    try:  # building even a meta model takes a while: reading one config per request must not
        key: str | None = f"{type(config).__qualname__}:{config.to_json_string(use_diff=False)}"
    except (AttributeError, TypeError, ValueError):
        key = None
    if key is not None and key in _MOE_CONFIGS:
        return _MOE_CONFIGS[key]
    model = None
    # a vision-language wrapper has no causal-LM class: its decoder is found the same way
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
            break
        except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
            error = e
    if model is None:
        raise UnsupportedModelError(
            f"{type(config).__name__} ({getattr(config, 'model_type', '?')}): no causal or "
            f"image-text-to-text model class in transformers ({error})")
    info = find_moe_routers(model, probe=False)
    found = MoEConfig(num_experts=info.num_experts, top_k=info.top_k, moe_layers=info.moe_layers,
                      num_layers=info.num_hidden_layers, architecture=info.architecture)
    if key is not None:
        _MOE_CONFIGS[key] = found
        while len(_MOE_CONFIGS) > 32:
            _MOE_CONFIGS.pop(next(iter(_MOE_CONFIGS)))
    return found


def moe_layers_from_config(config: Any) -> tuple[int, ...]:
    """The decoder layers that hold a router, for a transformers config (:func:`moe_config`)."""
    return moe_config(config).moe_layers


# ---- feeding a capturer ------------------------------------------------------------------------
def router_hook(site: RouterSite, index: int,
                capture: Callable[[int, torch.Tensor], None]) -> Callable[..., None]:
    """A forward hook for ``site.module`` that hands its chosen ids to ``capture(index, ids)``.

    This is how every binding feeds a :class:`routecap.capturer.StepCapturer` (whose ``capture``
    fits): one device copy per layer, no host sync, so it also records into a CUDA graph.
    """
    read = site.adapter.read_ids

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        capture(index, read(output, site))

    return hook


def attach_router_hooks(info: MoEModelInfo, capture: Callable[[int, torch.Tensor], None]
                        ) -> list[Any]:
    """Hook every router of a model (:func:`find_moe_routers`); returns the handles to remove.

    Routers whose output holds no ids (Llama 4, DBRX) are read at their final top-k
    (:class:`.hf_topk.TopkReader`): the ids their own top-k produced, never a recomputation.
    """
    handles: list[Any] = []
    for i, s in enumerate(info.sites):
        if s.adapter.read_ids is None:
            handles.append(TopkReader(
                s.module, s.block, s.adapter.force_ids or ROUTER_TOPK, num_experts=s.num_experts,
                top_k=s.top_k, name=f"{info.architecture} {type(s.module).__name__} at {s.path}",
                read=lambda ids, i=i: capture(i, ids)))
        else:
            handles.append(s.module.register_forward_hook(router_hook(s, i, capture)))
    return handles
