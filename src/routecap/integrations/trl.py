"""Rollout Routing Replay (R3) for TRL's ``GRPOTrainer`` (trl 1.16, transformers ``generate`` rollouts).

Shape legend: B completions, S = P + C columns (left-padded prompt, right-padded completion),
L MoE layers, K top-k.

Switch it on in one line::

    from routecap.integrations.trl import R3GRPOTrainer as GRPOTrainer

(or mix :class:`R3Mixin` into your own ``GRPOTrainer`` subclass, left of it). Then:

1. **capture**: every rollout (``GRPOTrainer._generate_single_turn``, transformers ``generate``)
   runs under :class:`routecap.integrations.hf.HFRouteCapture`; each completion gets a
   :class:`~routecap.trace.RoutingTrace` of prompt + completion minus its last token;
2. **align**: the traces become a ``[B, S, L, K]`` routes tensor aligned to TRL's completion batch
   (:func:`routecap.align.batch_routes`, token ids checked; padding and each completion's final
   token are ``-1``) and travel in the batch dict as ``"routed_experts"``, so TRL's own shuffling
   and splitting into micro-batches carry them with their rows;
3. **replay**: every policy forward that scores the batch (``_get_per_token_logps_and_entropies``:
   the old-log-prob pass when TRL runs one, and the loss forward) runs under
   :func:`routecap.replay.replay` with that micro-batch's routes, one ``with`` per forward chunk.
   The reference model (``beta > 0`` with a separate ``ref_model``) routes natively, as in verl.

Logged metrics (TRL's own logging): ``r3/replayed_cells``, ``r3/fallback_fraction`` (cells routed
by the live router: padding and the final token of each completion), and,
with ``r3_diagnostics=True``, ``r3/route_differ_fraction`` (routes the routers actually used in the
loss forward vs those captured in generation) and ``r3/k3_kl`` (generation-time vs loss-forward
token log-probs); the same figures per step in :attr:`R3Mixin.r3_history`.

Refused by name (routes would be unknown or misplaced): vLLM and continuous-batching rollouts,
``rollout_func``, tools (multi-turn tool loop), multimodal inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from trl import GRPOTrainer
from trl.trainer.utils import pad

from ..align import batch_routes
from ..analysis import AgreementCounter
from .hf import HFRouteCapture, attach_router_hooks, find_moe_routers

__all__ = ["R3GRPOTrainer", "R3Mixin"]

_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class R3Mixin:
    """Routing replay for a ``GRPOTrainer`` (see the module docstring).

    Args (keyword, besides ``GRPOTrainer``'s):
        r3_replay: replay the captured routes (False: capture and measure only, the baseline).
        r3_strict: a ``-1`` cell inside the completion raises instead of falling back.
        r3_diagnostics: also measure, per loss forward, the routes the routers used against the
            captured ones and the k3 KL of generation-time vs training log-probs (one extra
            no-grad forward per rollout batch, in generation conditions).
    """

    def __init__(self, *args: Any, r3_replay: bool = True, r3_strict: bool = False,
                 r3_diagnostics: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for flag, why in (("use_vllm", "vLLM rollouts (use routecap's vLLM adapters and "
                                       "routecap.align with your own rollout loop)"),
                          ("use_transformers_continuous_batching", "continuous-batching rollouts"),
                          ("rollout_func", "a custom rollout_func"),
                          ("tools", "tool-calling rollouts (multi-turn tool loop)")):
            if getattr(self, flag, None):
                raise ValueError(f"routecap R3 for TRL: {why} are not supported; R3 covers the "
                                 f"transformers generate rollout path ({flag} is set)")
        self.r3_replay = r3_replay
        self.r3_strict = r3_strict
        self.r3_diagnostics = r3_diagnostics
        self._r3_info = find_moe_routers(self.accelerator.unwrap_model(self.model))
        self._r3_rollout: dict[str, Any] | None = None  # traces of the rollout being scored
        self._r3_routes: torch.Tensor | None = None      # routes of the micro-batch being scored
        self._r3_hold: ExitStack | None = None
        #: one dict per loss forward: step, replayed/fallback cells and (diagnostics) agreement, KL
        self.r3_history: list[dict[str, Any]] = []

    # ---- 1. capture --------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids: list, images: Any, multimodal_fields: dict,
                              num_generations: int, has_tool_images: bool = False) -> Any:
        if images is not None or multimodal_fields:
            raise ValueError("routecap R3 for TRL: multimodal rollouts are not supported")
        model = self.accelerator.unwrap_model(self.model)
        W = _padded_width([len(p) for p in prompt_ids], self.pad_to_multiple_of)
        cap = HFRouteCapture(model, info=self._r3_info, max_tokens=max(4096, len(prompt_ids) * W))
        with cap:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            pad_id = self._tokenizer.pad_token_id
            prompts = pad([torch.tensor(p) for p in prompt_ids], padding_value=pad_id,
                          padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
            mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompt_ids], padding_value=0,
                       padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
            comps = pad([torch.tensor(c, dtype=prompts.dtype) for c in completion_ids],
                        padding_value=pad_id, padding_side="right")
            lengths = [len(c) for c in completion_ids]
            traces = cap.collect(sequences=torch.cat([prompts, comps], dim=1), attention_mask=mask,
                                 generated_lengths=lengths)
        rollout = {"traces": traces, "lengths": lengths}
        if self.r3_diagnostics:
            rollout["logps"] = self._r3_generation_logps(model, prompts, mask, comps, lengths)
        self._r3_rollout = rollout
        return completion_ids, logprobs

    def _r3_generation_logps(self, model: Any, prompts: torch.Tensor, mask: torch.Tensor,
                             comps: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Token log-probs of the completions as the rollout model saw them (generation
        conditions: no autocast, no replay): the sampler's side of the KL."""
        device = next(model.parameters()).device
        cmask = (torch.arange(comps.size(1))[None] < torch.tensor(lengths)[:, None]).long()
        ids = torch.cat([prompts, comps], 1).to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.cat([mask, cmask], 1).to(device)).logits
        C = comps.size(1)
        logps = torch.log_softmax(logits[:, -C - 1:-1].float(), -1)
        return logps.gather(-1, comps.to(device)[..., None])[..., 0].cpu()

    # ---- 2. align ----------------------------------------------------------------------------
    def _r3_align(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  logits_to_keep: int) -> torch.Tensor:
        """``[B, S, L, K]`` routes of the rollout batch ``input_ids`` (prompt + completion)."""
        roll = self._r3_rollout
        W = input_ids.size(1) - logits_to_keep
        # the completion's real tokens (TRL may zero the mask of truncated completions)
        comp = torch.arange(logits_to_keep, device=input_ids.device)[None] < torch.tensor(
            roll["lengths"], device=input_ids.device)[:, None]
        mask = torch.cat([attention_mask[:, :W].bool(), comp], dim=1)
        return batch_routes(roll["traces"], input_ids, mask)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        self._r3_rollout = None
        try:
            out = super()._generate_and_score_completions(inputs)
            if self._r3_rollout is None:
                raise RuntimeError("routecap R3 for TRL: the rollout ran without capture (did a "
                                   "subclass bypass _generate_single_turn?)")
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            out["routed_experts"] = self._r3_align(ids, out["prompt_mask"],
                                                   out["completion_ids"].size(1))
            if self.r3_diagnostics:
                g = self._r3_rollout["logps"].to(ids.device)
                C = out["completion_ids"].size(1)  # TRL may pad to a multiple: match its width
                out["r3_generation_logps"] = torch.nn.functional.pad(
                    g, (0, max(0, C - g.size(1))), value=float("nan"))[:, :C]
            return out
        finally:
            self._r3_rollout = None

    # ---- 3. replay ---------------------------------------------------------------------------
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        # NOTE: Trainer.training_step runs the loss forward, then the backward after
        # compute_loss returned; a recompute in that backward (gradient checkpointing, on by
        # default in GRPOConfig) must replay the same ids, so the loss forward's replay block is
        # held open here until the backward is done.
        with ExitStack() as hold:
            self._r3_hold = hold
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._r3_hold = None

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        with self._r3_scope(inputs):
            return super()._compute_loss(model, inputs)

    @contextmanager
    def _r3_scope(self, inputs: dict[str, Any]) -> Iterator[None]:
        self._r3_routes = inputs.get("routed_experts")
        self._r3_inputs = inputs
        try:
            yield
        finally:
            self._r3_routes = None
            self._r3_inputs = None

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor,
                                           attention_mask: torch.Tensor, logits_to_keep: int,
                                           batch_size: int | None = None, **kwargs: Any) -> Any:
        routes = self._r3_routes
        in_loss = routes is not None
        if routes is None and self._r3_rollout is not None:
            routes = self._r3_align(input_ids, attention_mask, logits_to_keep)  # old/ref log-probs
        policy = model is not getattr(self, "ref_model", None)
        if routes is None or not policy:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        if any(kwargs.get(k) is not None for k in _MULTIMODAL):
            raise ValueError("routecap R3 for TRL: multimodal inputs are not supported")
        if tuple(routes.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(f"routecap R3 for TRL: routes of shape {tuple(routes.shape)} for "
                             f"input_ids of shape {tuple(input_ids.shape)}")
        from ..replay import replay

        bare = self.accelerator.unwrap_model(model)
        n = input_ids.size(0)
        step = batch_size or n
        outs, replayed, fallback = [], 0, 0
        used = _UsedRoutes(self._r3_info) if (self.r3_diagnostics and in_loss) else None
        hold = getattr(self, "_r3_hold", None) if (in_loss and torch.is_grad_enabled()) else None
        if hold is not None and step < n:
            raise RuntimeError("routecap R3 for TRL: the loss forward ran in chunks; one replay "
                               "block per forward is needed for its backward")
        for start in range(0, n, step):
            end = min(start + step, n)
            chunk = routes[start:end].to(input_ids.device)
            with ExitStack() as scope:
                # the loss forward's block stays open until training_step's backward is done
                stats = (hold or scope).enter_context(
                    _maybe_replay(replay, bare, chunk, self.r3_replay, self.r3_strict))
                scope.enter_context(_maybe(used))
                outs.append(super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep,
                    end - start, **kwargs))
            if stats is not None:
                replayed += stats.replayed_cells
                fallback += stats.fallback_cells
        logps = torch.cat([o[0] for o in outs])
        ent = torch.cat([o[1] for o in outs]) if outs[0][1] is not None else None
        aux = torch.stack([o[2] for o in outs]).mean() if outs[0][2] is not None else None
        if in_loss:
            self._r3_record(routes, input_ids, logps, logits_to_keep, replayed, fallback, used)
        return logps, ent, aux

    def _r3_record(self, routes: torch.Tensor, input_ids: torch.Tensor, logps: torch.Tensor,
                   C: int, replayed: int, fallback: int, used: Any) -> None:
        mode = "train" if self.model.training else "eval"
        rec: dict[str, Any] = {"step": int(self.state.global_step), "replayed_cells": replayed,
                               "fallback_cells": fallback}
        if self.r3_replay:
            self._metrics[mode]["r3/replayed_cells"].append(float(replayed))
            self._metrics[mode]["r3/fallback_fraction"].append(
                fallback / max(1, replayed + fallback))
        if used is not None:
            info = self._r3_info
            c = AgreementCounter()
            c.add_cells(routes.cpu(), used.routes(input_ids.shape), num_experts=info.num_experts,
                        moe_layers=info.moe_layers, who="captured vs used in the loss forward")
            inputs = self._r3_inputs
            mask = inputs["completion_mask"].bool()
            gen = inputs.get("r3_generation_logps")
            if gen is not None:
                c.add_logprobs(gen.cpu(), logps.detach().float().cpu(), mask=mask.cpu())
            g = c.result()
            rec.update(route_differ_fraction=g.differ_fraction, cells=g.num_cells,
                       token_differ_fraction=g.token_differ_fraction, k3_kl=g.k3_kl,
                       extreme_fraction=g.extreme_fraction)
            self._metrics[mode]["r3/route_differ_fraction"].append(g.differ_fraction)
            if g.k3_kl is not None:
                self._metrics[mode]["r3/k3_kl"].append(g.k3_kl)
        self.r3_history.append(rec)


class R3GRPOTrainer(R3Mixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with routecap's rollout routing replay (see the module docstring)."""


# ---- helpers ------------------------------------------------------------------------------------
def _padded_width(lengths: list[int], multiple: int | None) -> int:
    W = max(lengths) if lengths else 0
    return W + (-W % multiple) if multiple else W


@contextmanager
def _maybe(ctx: Any) -> Iterator[Any]:
    if ctx is None:
        yield None
    else:
        with ctx as value:
            yield value


@contextmanager
def _maybe_replay(replay: Any, model: Any, routes: torch.Tensor, on: bool,
                  strict: bool) -> Iterator[Any]:
    if not on:
        yield None
        return
    with replay(model, routes, strict=strict) as stats:
        yield stats


class _UsedRoutes:
    """The ids every router returned during one forward (what its experts received), by layer.

    NOTE: one device-to-host copy per layer; diagnostics only.
    """

    def __init__(self, info: Any) -> None:
        self.info = info
        self.calls: list[list[np.ndarray]] = [[] for _ in info.sites]
        self._handles: list[Any] = []

    def __enter__(self) -> _UsedRoutes:
        def grab(index: int, ids: torch.Tensor) -> None:
            self.calls[index].append(ids.detach().to("cpu", torch.int64).numpy())
        self._handles = attach_router_hooks(self.info, grab)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def routes(self, shape_BS: tuple[int, ...]) -> np.ndarray:
        """``[B, S, L, K]``: the first call of each layer per chunk (a recompute in backward would
        call again; it is not under these hooks' forward)."""
        B, S = int(shape_BS[0]), int(shape_BS[1])
        K = self.info.top_k
        per_layer = []
        for i, calls in enumerate(self.calls):
            rows = np.concatenate(calls) if calls else np.zeros((0, K), np.int64)
            if rows.shape[0] != B * S:
                raise RuntimeError(f"routecap R3 diagnostics: layer {self.info.moe_layers[i]} "
                                   f"routed {rows.shape[0]} rows, expected B * S = {B * S}")
            per_layer.append(rows.reshape(B, S, K))
        return np.stack(per_layer, axis=2)
