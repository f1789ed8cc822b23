"""Hugging Face transformers (v5) binding: find the MoE routers, capture during ``generate``.

Shape legend: B batch rows, S tokens per row in one forward, N = B * S router rows, T tokens of a
request, L MoE layers, K top-k, E experts.

transformers v5 MoE blocks share one shape: a router module (``gate`` or ``router``) returning
``(router_logits, router_scores, router_indices)`` and ``experts(hidden, top_k_index,
top_k_weights)``. :func:`find_moe_routers` finds every such block, numbers it by its decoder layer,
and checks the router's output signature with a tiny probe; a model whose routers do not fit is
refused with an error that names the architecture and router class.

:class:`HFRouteCapture` hooks the routers (one copy into the device step buffer per layer) and the
decoder's forward (one *step* per forward). Each forward over a batch ``[B, S]`` writes its rows at
absolute columns ``[c, c + S)`` of every batch row, where ``c`` is the KV cache length before the
forward (read from the cache object on the host: no device sync). :meth:`HFRouteCapture.collect`
then turns columns into request positions using the left padding of the prompt batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capturer import CaptureSpec, StepCapturer, StepSnapshot
from ..store import RouteStore
from ..trace import RoutingTrace
from .hf_dispatch import MoEDispatch, ParallelConfig

__all__ = [
    "HFRouteCapture",
    "MoEModelInfo",
    "ParallelConfig",
    "attach_router_hooks",
    "RouterSite",
    "UnsupportedModelError",
    "capture_generate",
    "find_moe_routers",
    "moe_layers_from_config",
]

_ROUTER_ATTRS = ("gate", "router")
#: Architectures whose capture is covered by the golden tests (tests/test_hf.py).
VERIFIED_ARCHITECTURES = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "DeepseekV3ForCausalLM",
    "GptOssForCausalLM",
    "Glm4MoeForCausalLM",
)


class UnsupportedModelError(ValueError):
    """The model has no MoE layer routecap can capture, or its routers do not fit."""


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


def _first_attr(objs: Iterable[Any], names: Sequence[str]) -> int | None:
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None)
    if archs:
        return str(archs[0])
    return type(model).__name__


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


@dataclass(frozen=True)
class _Probe:
    slot: int  # which output element holds the ids
    num_experts: int  # ids the router can produce: [0, num_experts)


#: Routers whose ids mean something other than "this expert" (refused by class name).
_REFUSED_ROUTERS = {
    "ZayaRouter": "its router reports the skip expert as expert 0 (with weight 0), so a route "
                  "cannot tell expert 0 from a skip",
}


def _probe_router(site_path: str, block: nn.Module, router: nn.Module, top_k: int,
                  num_experts: int, hidden: int | None, arch: str) -> _Probe:
    """Run the MoE block (or, failing that, its router) on 3 dummy rows and look at what the
    router returns: which output slot holds the [N, K] integer ids, and how wide its logits are.
    """
    cls = type(router).__name__
    params = list(router.parameters())
    ref = params[0] if params else None
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    if ref is None or ref.device.type == "meta" or hidden is None or sharded:
        # cannot probe (weights not materialised, or sharded at rest as under FSDP, where they
        # are all-gathered only inside the forward): capture() checks the output at run time
        return _Probe(slot=2, num_experts=num_experts)
    recorded: list[Any] = []
    original = router.__dict__.get("forward")
    bound = router.forward

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        out = bound(*args, **kwargs)
        recorded.append(out)
        return out

    x = torch.zeros(1, 3, hidden, dtype=ref.dtype, device=ref.device)
    errors = []
    router.forward = recording_forward  # the inner output, whatever other hooks do to it
    try:
        with torch.no_grad():
            try:  # the block supplies whatever else its router needs
                block(x)
            except Exception as e:  # noqa: BLE001 - fall back to the router alone
                errors.append(e)
                recorded.clear()
                try:
                    recording_forward(x[0])
                except Exception as e2:  # noqa: BLE001
                    errors.append(e2)
    finally:
        if original is None:
            del router.forward
        else:
            router.forward = original
    if not recorded:
        e = errors[-1]
        raise UnsupportedModelError(
            f"{arch}: router {cls} at {site_path} cannot be run on dummy hidden states "
            f"({type(e).__name__}: {e}); routecap supports routers returning "
            "(router_logits, router_scores, router_indices)"
        ) from e
    out = recorded[0]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    slots = [
        i for i, o in enumerate(outs)
        if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dtype != torch.bool
        and o.dim() >= 1 and o.shape[-1] == top_k and o.numel() == 3 * top_k
    ]
    if len(slots) != 1:
        got = ", ".join(
            f"{type(o).__name__}{tuple(o.shape) if isinstance(o, torch.Tensor) else ''}"
            f"{'/' + str(o.dtype) if isinstance(o, torch.Tensor) else ''}" for o in outs
        )
        raise UnsupportedModelError(
            f"{arch}: router {cls} at {site_path} returned ({got}); routecap expects exactly one "
            f"integer tensor of shape [N, top_k={top_k}] (the chosen expert ids) in its output"
        )
    # routers with extra "zero-computation" experts (LongCat-Flash) choose ids past the routed
    # experts: their logits say how many ids there are
    first = outs[0]
    width = num_experts
    if isinstance(first, torch.Tensor) and first.is_floating_point() and first.numel() % 3 == 0 \
            and first.shape[-1] * 3 == first.numel():
        width = max(num_experts, int(first.shape[-1]))
    return _Probe(slot=slots[0], num_experts=width)


def _remapped_by(router: nn.Module) -> str | None:
    """The name of a parallel style that rewrites the router's outputs, if one is installed.

    transformers 5.17's expert parallelism (``enable_expert_parallel``) replaces the router's
    ``forward`` with a wrapper (``EpRouterParallel``) that turns the chosen global expert ids into
    this rank's local ids, with a sentinel for experts on other ranks. A hook then sees local ids,
    which are not the routes: such routers are refused rather than recorded wrongly.
    """
    fwd = router.__dict__.get("forward")
    for cell in getattr(fwd, "__closure__", None) or ():
        try:
            obj = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for cls in type(obj).__mro__:
            if cls.__name__ in ("EpRouterParallel", "RouterParallel"):
                return type(obj).__name__
    return None


def find_moe_routers(model: nn.Module, *, probe: bool = True) -> MoEModelInfo:
    """Find every MoE router of a transformers model, or refuse the model with a clear error.

    A MoE block is a module with an ``experts`` child and a ``gate`` or ``router`` child; its layer
    number is the index of the decoder layer that holds it. All routers must share E and K.
    """
    arch = _architecture(model)
    cfg = _text_config(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{arch}: encoder-decoder models are not supported; routecap captures decoder-only "
            "causal language models"
        )
    blocks: list[tuple[str, nn.Module, str, nn.Module]] = []
    for path, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        for attr in _ROUTER_ATTRS:
            router = getattr(mod, attr, None)
            if isinstance(router, nn.Module):
                blocks.append((path, mod, attr, router))
                break
    if not blocks:
        raise UnsupportedModelError(
            f"{arch}: no MoE block routecap can capture (it looks for a module with an "
            "`experts` child and a `gate` or `router` child, as transformers v5 MoE models have)"
        )
    sites: list[RouterSite] = []
    list_paths: set[str] = set()
    for path, block, attr, router in blocks:
        # the last integer component of the block's path is its decoder layer
        parts = path.split(".")
        idx_pos = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if idx_pos is None:
            raise UnsupportedModelError(
                f"{arch}: MoE block at {path!r} is not inside a numbered list of decoder layers"
            )
        layer = int(parts[idx_pos])
        list_paths.add(".".join(parts[:idx_pos]))
        num_experts = _first_attr(
            [router, block.experts, block, cfg],
            ["num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"],
        )
        # the ids the router can choose: the widest of its own counts and of its score-correction
        # bias (LongCat-Flash appends "zero-computation" experts past the routed ones)
        wider = [getattr(router, a, None) for a in ("num_experts", "n_routed_experts",
                                                    "num_local_experts")]
        bias = getattr(router, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor) and bias.dim() == 1:
            wider.append(int(bias.shape[0]))
        wider = [w for w in wider if isinstance(w, int) and not isinstance(w, bool) and w > 0]
        if num_experts is not None and wider:
            num_experts = max(num_experts, *wider)
        top_k = _first_attr(
            [router, block, cfg],
            ["top_k", "num_experts_per_tok", "moe_top_k", "moe_k", "top_k_experts", "moe_topk"],
        )
        if num_experts is None or top_k is None:
            raise UnsupportedModelError(
                f"{arch}: cannot tell the number of experts ({num_experts}) or top-k ({top_k}) of "
                f"the router at {path}.{attr}"
            )
        style = _remapped_by(router)
        if style is not None:
            raise UnsupportedModelError(
                f"{arch}: the router at {path}.{attr} is wrapped by transformers' {style}, which "
                "replaces the chosen global expert ids with this rank's local ids before any hook "
                "sees them (transformers 5.17 expert parallelism, enable_expert_parallel=True); "
                "routecap will not record those as routes. Use a transformers with all-to-all "
                "expert parallelism (DistributedConfig(ep_size=..., ep_implementation="
                "'all_to_all')) or routecap's gathered dispatch")
        refused = _REFUSED_ROUTERS.get(type(router).__name__)
        if refused:
            raise UnsupportedModelError(f"{arch}: {refused}")
        r_hidden = _first_attr([cfg], ["hidden_size"]) or _first_attr(
            [router], ["hidden_dim", "hidden_size"])
        w = getattr(router, "weight", None)
        if r_hidden is None and isinstance(w, torch.Tensor) and w.dim() == 2:
            r_hidden = int(w.shape[1])
        slot = 2
        if probe:
            found = _probe_router(f"{path}.{attr}", block, router, top_k, num_experts, r_hidden,
                                  arch)
            slot, num_experts = found.slot, found.num_experts
        sites.append(RouterSite(path=f"{path}.{attr}", layer=layer, module=router, block=block,
                                num_experts=num_experts, top_k=top_k, index_slot=slot))
    if len(list_paths) != 1:
        raise UnsupportedModelError(
            f"{arch}: MoE blocks live in several layer lists {sorted(list_paths)}; routecap "
            "captures one decoder stack"
        )
    sites.sort(key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise UnsupportedModelError(f"{arch}: more than one MoE router per decoder layer {layers}")
    ek = {(s.num_experts, s.top_k) for s in sites}
    if len(ek) != 1:
        raise UnsupportedModelError(
            f"{arch}: routers disagree on (num_experts, top_k): {sorted(ek)}; a trace has one E and K"
        )
    (list_path,) = list_paths
    step_path = list_path.rpartition(".")[0] if "." in list_path else ""
    step_module = model.get_submodule(step_path)
    layer_list = model.get_submodule(list_path)
    num_hidden = len(layer_list) if isinstance(layer_list, (nn.ModuleList, nn.Sequential)) else (
        _first_attr([cfg], ["num_hidden_layers"]) or max(layers) + 1)
    name = getattr(getattr(model, "config", None), "name_or_path", "") or getattr(
        model, "name_or_path", "") or arch
    return MoEModelInfo(architecture=arch, model_name=str(name), sites=tuple(sites),
                        num_hidden_layers=num_hidden, step_module=step_module,
                        step_module_path=step_path)


def router_hook(site: RouterSite, index: int,
                capture: Callable[[int, torch.Tensor], None]) -> Callable[..., None]:
    """A forward hook for ``site.module`` that hands its chosen ids to ``capture(index, ids)``.

    This is how every binding feeds a :class:`routecap.capturer.StepCapturer` (whose ``capture``
    fits): one device copy per layer, no host sync, so it also records into a CUDA graph.
    """
    slot, K = site.index_slot, site.top_k

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        ids = output[slot] if isinstance(output, (tuple, list)) else output
        if isinstance(ids, torch.Tensor) and ids.dim() > 2:
            ids = ids.reshape(-1, K)  # a view: routers fed [B, S, H] may return [B, S, K]
        capture(index, ids)

    return hook


def attach_router_hooks(info: MoEModelInfo, capture: Callable[[int, torch.Tensor], None]
                        ) -> list[Any]:
    """Hook every router of a model (:func:`find_moe_routers`); returns the handles to remove."""
    return [s.module.register_forward_hook(router_hook(s, i, capture))
            for i, s in enumerate(info.sites)]


def moe_layers_from_config(config: Any) -> tuple[int, ...]:
    """The decoder layers that hold a router, for a transformers config (no weights needed).

    The model is built on the meta device and searched like :func:`find_moe_routers`, so every
    architecture's own rule (``mlp_only_layers``, ``first_k_dense_replace``, ``decoder_sparse_step``,
    ``layer_types``, ...) applies exactly. Engines that return all layers (vLLM, SGLang) need this
    to drop the dense ones.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return find_moe_routers(model, probe=False).moe_layers


@dataclass(frozen=True, kw_only=True)
class _StepTag:
    batch: int  # B
    seq: int  # S
    # KV cache length before the forward (the column of s = 0): an int, or a one-element host
    # tensor the device fills asynchronously (static caches keep their length on the device)
    offset_or_host: Any

    @property
    def offset(self) -> int:
        # NOTE: read only when the step reaches the host, after its copy event completed
        return int(self.offset_or_host)


def _step_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if isinstance(x, torch.Tensor):
        return (int(x.shape[0]), int(x.shape[1])) if x.dim() == 2 else (1, int(x.shape[0]))
    e = kwargs.get("inputs_embeds")
    if isinstance(e, torch.Tensor):
        return (int(e.shape[0]), int(e.shape[1])) if e.dim() == 3 else (1, int(e.shape[0]))
    return None


def _cache_length(kwargs: dict) -> Any:
    """The cache's length before the forward: an int, or a host tensor filled asynchronously."""
    cache = kwargs.get("cache", None)
    if cache is None:
        cache = kwargs.get("past_key_values", None)
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        raise TypeError(
            f"routecap: cannot read the length of a {type(cache).__name__} cache; expected a "
            "transformers Cache with get_seq_length()"
        )
    n = get()
    if isinstance(n, torch.Tensor):
        # NOTE: a StaticCache keeps its length in a device tensor: copy it to the host without
        # waiting; the step's copy event (recorded after this) says when it has arrived
        if n.device.type == "cpu":
            return n.clone()
        host = torch.empty((), dtype=n.dtype, pin_memory=True)
        host.copy_(n, non_blocking=True)
        return host
    return int(n)


class HFRouteCapture:
    """Capture the routes of a transformers MoE model, as a context manager.

    Hooks are installed on ``__enter__`` and removed on ``__exit__``; nothing global is touched, and
    two captures of two models (or of one model, one after the other) do not interfere.

    Example:
        >>> from routecap.builtin import load_builtin
        >>> model, tok = load_builtin("tiny-qwen3-moe")
        >>> enc = tok(["hello", "a longer prompt"], return_tensors="pt", padding=True)
        >>> with HFRouteCapture(model) as cap:
        ...     out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        ...     traces = cap.collect(sequences=out, attention_mask=enc["attention_mask"])
        >>> [t.num_tokens for t in traces]
        [8, 18]
    """

    def __init__(self, model: nn.Module, *, strict: bool = True, max_tokens: int = 4096,
                 info: MoEModelInfo | None = None, parallel: ParallelConfig | None = None,
                 store: RouteStore | None = None, rows_budget_bytes: int = 256 << 20) -> None:
        self.model = model
        self.info = info or find_moe_routers(model)
        self.strict = strict
        self.parallel = parallel
        info = self.info
        spec = CaptureSpec(num_layers=len(info.sites), top_k=info.top_k,
                           num_experts=info.num_experts, max_tokens=max_tokens)
        device = next(info.sites[0].module.parameters()).device
        if device.type == "meta":
            raise UnsupportedModelError("the model's router weights are on the meta device; load "
                                        "the weights before capturing")
        # the rows of the current generate call, by (batch row, KV cache column): a write at
        # column c declares that the row's cache holds exactly c columns (seek), so rows of a
        # cropped or restarted cache never survive, and columns never written read as missing
        self.rows = RouteStore(num_experts=info.num_experts, moe_layers=info.moe_layers,
                               top_k=info.top_k, model=info.model_name,
                               budget_bytes=rows_budget_bytes)
        self._first_column: dict[int, int] = {}
        #: Optional persistent store: collect() moves each request's rows into it under its
        #: request id, so a later turn that reuses the KV cache gets the earlier turns' routes.
        self.store = store
        if store is not None and (store.num_experts, store.moe_layers, store.top_k) != (
                info.num_experts, info.moe_layers, info.top_k):
            raise ValueError(
                f"HFRouteCapture: the store holds (E, moe_layers, K) = "
                f"{(store.num_experts, store.moe_layers, store.top_k)}, the model has "
                f"{(info.num_experts, info.moe_layers, info.top_k)}")
        self.capturer = StepCapturer(spec, device=device, sink=self._ingest, strict=strict,
                                     tp_group=None if parallel is None else parallel.tp_group)
        self.dispatch = None if parallel is None else MoEDispatch(
            [s.block for s in info.sites], parallel, device)
        #: False on every TP rank but the first: they capture (the TP gather needs them) but only
        #: one rank of a TP group returns traces, so nothing is returned twice.
        self.publishes = parallel is None or parallel.tp_rank == 0
        self._handles: list[Any] = []
        self.steps = 0
        #: router rows computed so far (B * S summed over steps): what the model actually ran
        self.rows_computed = 0

    # ---- hooks --------------------------------------------------------------------------------
    def __enter__(self) -> HFRouteCapture:
        if self._handles:
            raise RuntimeError("HFRouteCapture is already active")
        cap = self.capturer
        for index, site in enumerate(self.info.sites):
            self._handles.append(site.module.register_forward_hook(self._router_hook(index, site)))
        step = self.info.step_module
        self._handles.append(step.register_forward_pre_hook(self._pre_step, with_kwargs=True))
        self._handles.append(step.register_forward_hook(self._post_step))
        del cap
        if self.dispatch is not None:
            self.dispatch.install()
        return self

    @property
    def active(self) -> bool:
        """True while the hooks are installed."""
        return bool(self._handles)

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.dispatch is not None:
            self.dispatch.remove()
        if self.capturer.in_step:
            self.capturer.abort_step()

    def _router_hook(self, index: int, site: RouterSite) -> Callable[..., None]:
        return router_hook(site, index, self.capturer.capture)

    def _pre_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cap = self.capturer
        if cap.in_step:
            cap.abort_step()  # the previous forward raised before it finished
        shape = _step_shape(args, kwargs)
        if shape is None:
            raise TypeError(
                f"routecap: {type(module).__name__}.forward got neither input_ids nor "
                "inputs_embeds; cannot tell the step's tokens"
            )
        B, S = shape
        self.rows_computed += B * S
        tag = _StepTag(batch=B, seq=S, offset_or_host=_cache_length(kwargs))
        if self.dispatch is None:
            cap.begin_step(B * S, tag=tag)
        else:
            view = self.dispatch.begin_step(B * S)
            cap.begin_step(B * S, tag=tag, view=view, layout=self.parallel.layout)

    def _post_step(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.capturer.in_step:
            self.capturer.end_step()
            self.steps += 1
            self.capturer.poll()

    def _ingest(self, snap: StepSnapshot) -> None:
        tag: _StepTag = snap.tag
        S = tag.seq
        offset = tag.offset
        rows = self.rows
        for b in range(tag.batch):
            if b not in rows:
                rows.add_request(b, prompt_len=0)
            first = self._first_column.get(b)
            self._first_column[b] = offset if first is None else min(first, offset)
        rows.ingest(snap.expert_ids_NLK, snap.valid_NL,
                    [(b, offset, b * S, S) for b in range(tag.batch)], seek=True)

    # ---- results ------------------------------------------------------------------------------
    def collect(
        self,
        *,
        sequences: torch.Tensor | np.ndarray,
        attention_mask: torch.Tensor | np.ndarray | None = None,
        prompt_width: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generated_lengths: Sequence[int] | None = None,
        request_ids: Sequence[str] | None = None,
        extra: Sequence[dict[str, Any]] | None = None,
        start: int | Sequence[int] = 0,
    ) -> list[RoutingTrace]:
        """One trace per batch row of the last ``generate``: prompt plus generated minus the last.

        Args:
            sequences: ``[B, W + G]`` what ``generate`` returned (prompt columns first).
            attention_mask: ``[B, W]`` the prompt batch's mask (left padding); all ones if None.
            prompt_width: W, the prompt batch's width (defaults to the mask's width).
            eos_token_id: where a row's generation ended (defaults to the model's
                ``generation_config.eos_token_id``); the EOS token counts as generated.
            generated_lengths: override: tokens generated per row (e.g. after stop strings).
            request_ids: one id per row (defaults to "0", "1", ...).
            start: the absolute position each trace starts at (e.g. the first position of the
                latest turn: multi-turn RL only needs the new turn).

        Drains the capture (the one host sync) and frees the rows of this call. With a
        persistent ``store``, each request's rows move into it under its request id first; a turn
        that continued from an earlier turn's KV cache then gets the earlier positions from the
        store. On a TP rank that does not publish (see :attr:`publishes`) it returns no trace.
        """
        self.capturer.drain()
        try:
            if not self.publishes:
                return []
            return self._collect(sequences, attention_mask, prompt_width, eos_token_id,
                                 generated_lengths, request_ids, extra, start)
        finally:
            self.rows.clear()
            self._first_column.clear()

    def _collect(self, sequences: Any, attention_mask: Any, prompt_width: int | None,
                 eos_token_id: Any, generated_lengths: Any, request_ids: Any, extra: Any,
                 start: int | Sequence[int]) -> list[RoutingTrace]:
        seq = _to_numpy(sequences).astype(np.int64)
        if seq.ndim != 2:
            raise ValueError(f"collect: expected sequences of shape [B, W + G], got {seq.shape}")
        B = seq.shape[0]
        if attention_mask is None:
            W = prompt_width if prompt_width is not None else None
            if W is None:
                raise ValueError("collect: give attention_mask or prompt_width")
            mask = np.ones((B, W), dtype=np.int64)
        else:
            mask = _to_numpy(attention_mask).astype(np.int64)
            W = mask.shape[1] if prompt_width is None else prompt_width
        if mask.shape != (B, W):
            raise ValueError(f"collect: expected attention_mask of shape {(B, W)}, got {mask.shape}")
        pads = _left_pads(mask)
        gen = seq[:, W:]
        if generated_lengths is None:
            if eos_token_id is None:
                gc = getattr(self.model, "generation_config", None)
                eos_token_id = getattr(gc, "eos_token_id", None)
            generated_lengths = _generated_lengths(gen, eos_token_id)
        if len(generated_lengths) != B:
            raise ValueError(f"collect: expected {B} generated_lengths, got {len(generated_lengths)}")
        if request_ids is None:
            request_ids = [str(b) for b in range(B)]
        if len(request_ids) != B:
            raise ValueError(f"collect: expected {B} request_ids, got {len(request_ids)}")
        starts = [int(start)] * B if isinstance(start, (int, np.integer)) else [int(x) for x in start]
        if len(starts) != B:
            raise ValueError(f"collect: expected {B} start positions, got {len(starts)}")
        info = self.info
        traces = []
        for b in range(B):
            P = W - int(pads[b])
            G = int(generated_lengths[b])
            T = P + max(G, 1) - 1
            c0 = int(pads[b])
            s0 = starts[b]
            if not 0 <= s0 <= T:
                raise ValueError(f"collect: request {request_ids[b]!r}: start {s0} is outside "
                                 f"[0, {T}] (prompt {P} + generated {G} - 1)")
            tokens = seq[b, c0 + s0:c0 + T].astype(np.int32)
            rid = str(request_ids[b])
            ex = dict(extra[b]) if extra is not None else {}
            if self.store is not None:
                self._persist(b, rid, c0, P, T)
                traces.append(self.store.take(rid, s0, T, token_ids=tokens, prompt_len=P,
                                              extra=ex))
                continue
            if b in self.rows:  # re-keyed: batch row b at column c0 + p is rid's position p
                traces.append(self.rows.take(b, c0 + s0, c0 + T, offset=c0, request_id=rid,
                                             prompt_len=P, token_ids=tokens, extra=ex))
                continue
            traces.append(RoutingTrace(
                expert_ids=np.zeros((T - s0, len(info.sites), info.top_k), self.rows.dtype),
                missing=np.ones((T - s0, len(info.sites)), np.bool_),
                num_experts=info.num_experts, moe_layers=info.moe_layers, request_id=rid,
                prompt_len=P, start=s0, model=info.model_name, token_ids=tokens, extra=ex,
            ))
        return traces

    def _persist(self, b: int, rid: str, c0: int, P: int, T: int) -> None:
        """Move batch row b's rows of this call into the persistent store under ``rid``."""
        store = self.store
        first = self._first_column.get(b)
        # first position computed in this call (the prefill of a fresh batch starts in the padding)
        p0 = T if first is None else max(0, first - c0)
        if rid not in store:
            if p0 > 0:
                raise ValueError(
                    f"collect: request {rid!r}: this generate call continued a KV cache of {p0} "
                    "positions that routecap never stored; capture the earlier turns with the "
                    "same store and request id")
            store.add_request(rid, prompt_len=P)
        elif p0 > store.length(rid):
            raise ValueError(
                f"collect: request {rid!r}: this call starts at position {p0} but the store "
                f"holds {store.length(rid)}; the positions in between were computed elsewhere")
        elif p0 < store.length(rid):
            store.truncate(rid, p0)  # recomputed: this call's rows replace the stored tail
        if T > p0:
            rows = self.rows.take(b, c0 + p0, c0 + T)
            store.write(rid, p0, rows.expert_ids, None if rows.missing is None else ~rows.missing)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()  # NOTE: host copy, outside any step
    return np.asarray(x)


def _left_pads(mask: np.ndarray) -> np.ndarray:
    """Number of leading zeros per row; refuses masks that are not left-padded."""
    B, W = mask.shape
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("collect: attention_mask must hold only 0 and 1")
    ones = mask.sum(axis=1)
    pads = W - ones
    expect = np.arange(W)[None, :] >= pads[:, None]
    if not (expect == mask.astype(bool)).all():
        bad = int(np.argwhere((expect != mask.astype(bool)).any(axis=1))[0][0])
        raise ValueError(
            f"collect: expected a left-padded attention_mask (zeros then ones); row {bad} is "
            f"{mask[bad].tolist()}. Set tokenizer.padding_side = 'left' for generation."
        )
    return pads


def _generated_lengths(gen: np.ndarray, eos: int | Sequence[int] | None) -> list[int]:
    B, G = gen.shape
    if eos is None:
        return [G] * B
    eos_ids = [eos] if isinstance(eos, (int, np.integer)) else list(eos)
    hit = np.isin(gen, eos_ids)
    out = []
    for b in range(B):
        where = np.flatnonzero(hit[b])
        out.append(int(where[0]) + 1 if where.size else G)
    return out


def _stops(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
           kwargs: dict[str, Any]) -> list[int]:
    """Tokens each row generated, up to and including what stopped it.

    The EOS ids come from the call, its ``generation_config``, or the model's; with stop strings
    or custom stopping criteria (whose hits ``generate`` does not report) a row's end is where its
    trailing padding starts: ``generate`` feeds finished rows the pad token.
    """
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(gc, "eos_token_id", None))
    pad = kwargs.get("pad_token_id", getattr(gc, "pad_token_id", None))
    gen = _to_numpy(sequences)[:, attention_mask.shape[1]:]
    lengths = _generated_lengths(gen, eos)
    custom = kwargs.get("stop_strings") or getattr(gc, "stop_strings", None) or \
        kwargs.get("stopping_criteria")
    if custom and pad is not None and gen.shape[1]:
        for b in range(gen.shape[0]):
            live = np.flatnonzero(gen[b] != pad)
            lengths[b] = min(lengths[b], int(live[-1]) + 1 if live.size else 0)
    return lengths


def capture_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    request_ids: Sequence[str] | None = None,
    capture: HFRouteCapture | None = None,
    strict: bool = True,
    dummy: bool = False,
    **generate_kwargs: Any,
) -> tuple[list[RoutingTrace], torch.Tensor]:
    """Run ``model.generate`` over one left-padded batch and return (traces, sequences).

    ``dummy=True`` runs the batch only to keep a parallel group in step (a rank with no request
    left); its routes are dropped and no trace is returned. Under a parallel capture every rank
    must run the same number of forwards, so ``synced_gpus`` defaults to True there. Beam search
    and assisted generation reorder or rewrite batch rows; they are refused.
    """
    for key, bad in (("num_beams", lambda v: v not in (None, 1)),
                     ("assistant_model", lambda v: v is not None),
                     ("prompt_lookup_num_tokens", lambda v: v is not None)):
        if key in generate_kwargs and bad(generate_kwargs[key]):
            raise ValueError(f"capture_generate: {key}={generate_kwargs[key]!r} is not supported "
                             "(it reorders or rewrites batch rows)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if capture is not None and capture.parallel is not None:
        generate_kwargs.setdefault("synced_gpus", True)
    cap = capture if capture is not None else HFRouteCapture(model, strict=strict)
    own = not cap.active  # hooks installed here are removed here
    try:
        if own:
            cap.__enter__()
        with torch.no_grad():  # not inference_mode: FSDP (transformers EP) needs version counters
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        traces = cap.collect(sequences=sequences, attention_mask=attention_mask,
                             request_ids=request_ids,
                             generated_lengths=_stops(model, sequences, attention_mask,
                                                      generate_kwargs))
        if dummy:
            traces = []
    finally:
        if own:
            cap.close()
    return traces, sequences
