"""Hugging Face transformers (v5) binding: capture routes during ``generate``.

Shape legend: B batch rows, S tokens per row in one forward, N = B * S router rows, T tokens of a
request, L MoE layers, K top-k, E experts.

Which modules are routers, what they choose and how to read it is :mod:`.hf_routers`' business
(:func:`find_moe_routers`, the router adapter registry); its public names are re-exported here.

:class:`HFRouteCapture` hooks the routers (one copy into the device step buffer per layer) and the
decoder's forward (one *step* per forward). Each forward over a batch ``[B, S]`` writes its rows at
absolute columns ``[c, c + S)`` of every batch row, where ``c`` is the KV cache length before the
forward (read from the cache object on the host: no device sync). :meth:`HFRouteCapture.collect`
then turns columns into request positions using the left padding of the prompt batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capturer import CaptureSpec, StepCapturer, StepSnapshot
from ..store import RouteStore
from ..trace import RoutingTrace
from .hf_dispatch import MoEDispatch, ParallelConfig
from .hf_routers import (
    MoEModelInfo,
    RouterSite,
    UnsupportedModelError,
    attach_router_hooks,
    find_moe_routers,
    moe_layers_from_config,
    router_hook,
)
from .hf_steps import StepTag, cache_length, step_shape
from .hf_stops import StopRecorder
from .hf_stops import generated_lengths as generated_lengths_of

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
    "router_hook",
]

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
        # a forward hook per router, or a top-k reader for routers whose output holds no ids
        self._handles.extend(attach_router_hooks(self.info, self.capturer.capture))
        step = self.info.step_module
        self._handles.append(step.register_forward_pre_hook(self._pre_step, with_kwargs=True))
        self._handles.append(step.register_forward_hook(self._post_step))
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

    def _pre_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cap = self.capturer
        if cap.in_step:
            cap.abort_step()  # the previous forward raised before it finished
        shape = step_shape(args, kwargs)
        if shape is None:
            raise TypeError(
                f"routecap: {type(module).__name__}.forward got neither input_ids nor "
                "inputs_embeds; cannot tell the step's tokens"
            )
        B, S = shape
        self.rows_computed += B * S
        tag = StepTag(batch=B, seq=S, offset_or_host=cache_length(kwargs))
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
        tag: StepTag = snap.tag
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
            generated_lengths = generated_lengths_of(gen, eos_token_id)
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
    stops = StopRecorder.install(model, generate_kwargs, prompt_width=input_ids.shape[1])
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
                             generated_lengths=stops.lengths(sequences))
        if dummy:
            traces = []
    finally:
        if own:
            cap.close()
    return traces, sequences
