"""Routing replay for transformers MoE models: every router takes given expert ids, its weights
come from the live router at those ids (R3: inference routes; R2: routes of an earlier forward).

Shape legend: B batch rows, S tokens per row, N = B * S router rows, L MoE layers, K top-k,
E experts.

Example:
    >>> import torch
    >>> from routecap.builtin import load_builtin
    >>> from routecap.replay import replay
    >>> model, _ = load_builtin("tiny-qwen3-moe")
    >>> ids_BS = torch.tensor([[5, 6, 7, 8]])
    >>> L, K = 3, 4  # its MoE layers and top-k
    >>> routes_BSLK = torch.zeros(1, 4, L, K, dtype=torch.long)
    >>> routes_BSLK[...] = torch.arange(K)  # every token to experts 0..3 in every layer
    >>> with replay(model, routes_BSLK) as stats:
    ...     out = model(input_ids=ids_BS, labels=ids_BS)
    ...     out.loss.backward()
    >>> stats.replayed_cells, stats.fallback_cells
    (12, 0)

How: each router's own final top-k call (``torch.topk`` over its ``[N, E]`` scores with ``k = K``)
is intercepted (:mod:`routecap.integrations.hf_topk`) and answered with the given ids and the
router's scores gathered at them. The router's own code then computes the weights exactly as it
does for its own choice: softmax -> top-k -> renormalise, top-k -> softmax (GPT-OSS), sigmoid with
a correction bias that only steers the choice (weights from the unbiased scores), group-limited
choice (only the final selection is replaced, the group step runs but no longer decides), routed
scaling factors, zero-computation experts. Gradients reach the router through the gathered
scores, also for an expert the live router would not have picked.

The routes are bound to one ``with`` block (one forward and its backward): no cursor, so
micro-batches cannot drift, and a recompute in backward (gradient checkpointing) replays the same
ids. Replay adds no collective.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from .integrations.hf_routers import MoEModelInfo, UnsupportedModelError, find_moe_routers
from .integrations.hf_topk import TopkTap, TopkTapError
from .route_checks import BAD_PARTIAL, BAD_RANGE, check_routes

__all__ = ["ReplayError", "ReplayStats", "replay", "replay_sites"]


class ReplayError(ValueError):
    """Routes that do not fit the model or the batch, or a router that cannot be replayed."""


class ReplayStats:
    """What one :func:`replay` block did. Counts are per (token, layer) cell of the routes, over
    the layers whose router ran; a recompute (checkpointing) does not count again."""

    def __init__(self, info: MoEModelInfo, missing_L: list[int], tokens: int) -> None:
        self.moe_layers = info.moe_layers
        self.tokens = tokens
        self._missing_L = missing_L
        self._ran: set[int] = set()
        #: router calls that took the given ids (a recompute in backward calls them again)
        self.router_calls = 0

    @property
    def layers_run(self) -> tuple[int, ...]:
        """The MoE layers (decoder layer numbers) whose router ran under replay."""
        return tuple(self.moe_layers[i] for i in sorted(self._ran))

    @property
    def fallback_cells(self) -> int:
        """Cells given as -1 (missing or padding): the live router chose them."""
        return sum(self._missing_L[i] for i in self._ran)

    @property
    def replayed_cells(self) -> int:
        """Cells whose experts were the given ids."""
        return len(self._ran) * self.tokens - self.fallback_cells

    def __repr__(self) -> str:
        return (f"ReplayStats(replayed_cells={self.replayed_cells}, fallback_cells="
                f"{self.fallback_cells}, router_calls={self.router_calls}, layers_run="
                f"{len(self._ran)}/{len(self.moe_layers)})")


# NOTE: a replay block is entered once per training forward; walking the model to find its
# routers costs tens of milliseconds on a 48-layer model, so the result is kept per model and
# reused while every router (and the decoder) is still the module found at its path.
_SITES: weakref.WeakKeyDictionary[nn.Module, tuple[int, MoEModelInfo]] = weakref.WeakKeyDictionary()


def _module_count(model: nn.Module) -> int:
    return sum(1 for _ in model.modules())


def _still_valid(model: nn.Module, count: int, info: MoEModelInfo) -> bool:
    try:
        if model.get_submodule(info.step_module_path) is not info.step_module:
            return False
        if any(model.get_submodule(s.path) is not s.module for s in info.sites):
            return False
    except AttributeError:
        return False
    return _module_count(model) == count


def _cached_sites(model: nn.Module) -> MoEModelInfo:
    got = _SITES.get(model)
    if got is not None and _still_valid(model, *got):
        return got[1]
    info = find_moe_routers(model, probe=False)
    _SITES[model] = (_module_count(model), info)
    return info


def replay_sites(model: nn.Module) -> MoEModelInfo:
    """The model's routers, checked for replay: refuses by name what cannot be replayed.

    Where each router family's final top-k is, or why it cannot be replayed, is the ``force_ids``
    slot of its adapter in :data:`routecap.integrations.hf_adapters.ROUTER_ADAPTERS`.
    """
    info = _cached_sites(model)
    for site in info.sites:
        if site.adapter.force_ids is None:
            raise UnsupportedModelError(
                f"{info.architecture}: routing replay is not supported for router "
                f"{type(site.module).__name__} at {site.path} ({site.adapter.family}): "
                f"{site.adapter.replay_refusal}")
    return info


def _as_tensor(routes: Any) -> torch.Tensor:
    if isinstance(routes, torch.Tensor):
        t = routes
    elif isinstance(routes, np.ndarray):
        t = torch.from_numpy(routes)
    else:
        raise ReplayError(f"replay: expected routes as a torch tensor or numpy array of shape "
                          f"[*lead, L, K], got {type(routes).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ReplayError(f"replay: expected integer routes (expert ids, -1 = missing), got "
                          f"dtype {t.dtype}")
    return t


def _position(flat: int, lead: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, lead)) if lead else ()


class _Replay:
    """The state of one replay block: routes per device, taps, checks."""

    def __init__(self, model: nn.Module, routes: Any, *, strict: bool) -> None:
        self.info = info = replay_sites(model)
        self.strict = strict
        t = _as_tensor(routes)
        L, K, E = len(info.sites), info.top_k, info.num_experts
        if t.dim() < 3:
            raise ReplayError(
                f"replay: expected routes of shape [*lead, L={L}, K={K}] (lead = the input_ids "
                f"shape), got {tuple(t.shape)}")
        if tuple(t.shape[-2:]) != (L, K):
            raise ReplayError(
                f"replay: routes have L={t.shape[-2]} layers and K={t.shape[-1]} ids per cell; "
                f"{info.architecture} has L={L} MoE layers {info.moe_layers} and top-k K={K}")
        self.lead = tuple(int(d) for d in t.shape[:-2])
        self.tokens = N = math.prod(self.lead)
        ids_NLK = t.reshape(N, L, K)
        # NOTE: the checks read the routes on the host once per replay block (a device sync if
        # they live on an accelerator; give them on the CPU, as batch_routes builds them, to avoid
        # it). Nothing reads device values afterwards.
        host_NLK = ids_NLK.detach().cpu().numpy()
        # one compiled pass: missing cells and the first cell that breaks the contract
        check = check_routes(host_NLK, E)
        miss_NL = check.missing_NL
        if check.bad is not None:
            n, li, kind = check.bad
            where = (f"replay: routes at position {_position(n, self.lead)}, layer {li} (decoder "
                     f"layer {info.moe_layers[li]})")
            cell = host_NLK[n, li].tolist()
            if kind == BAD_PARTIAL:
                raise ReplayError(f"{where} are {cell}: a cell is either all -1 (missing) or K "
                                  "expert ids")
            if kind == BAD_RANGE:
                bad_id = next(v for v in cell if not 0 <= v < E)
                raise ReplayError(f"{where} hold expert id {bad_id}; {info.architecture} has "
                                  f"E={E} experts (ids 0..{E - 1}; -1 marks a missing cell)")
            raise ReplayError(f"replay: routes at position {_position(n, self.lead)}, layer {li} "
                              f"(decoder layer {info.moe_layers[li]}) name an expert twice: {cell}")
        self.missing_L = [int(x) for x in check.missing_L]
        self._miss_NL = miss_NL
        # strict: missing cells are allowed only where the forward's attention_mask says padding
        self._strict_open = strict and bool(miss_NL.any())
        self._source_NLK = ids_NLK  # as given: the narrow dtype travels, int64 is made on arrival
        self._miss_NL_t = torch.from_numpy(miss_NL)
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats = ReplayStats(info, self.missing_L, N)
        self._taps: list[TopkTap] = []
        self._handles: list[Any] = []

    # ---- per device copies (made once per block) ----------------------------------------------
    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._by_device.get(device)
        if got is None:
            ids_NLK, miss_NL = self._source_NLK, self._miss_NL_t
            if ids_NLK.device.type == "cpu" and device.type == "cuda":
                # NOTE: from pinned memory the copies are asynchronous: no sync in the forward.
                # The routes cross in their own (narrow) dtype and layout; the int64, layer-major
                # copy the routers index is made by one kernel on the device, not on the host.
                ids_NLK = ids_NLK.contiguous().pin_memory()
                miss_NL = miss_NL.pin_memory()
            ids_NLK = ids_NLK.to(device, non_blocking=True)
            got = (ids_NLK.permute(1, 0, 2).to(torch.int64).contiguous(),
                   miss_NL.to(device, non_blocking=True).t().contiguous())
            self._by_device[device] = got
        return got

    def _forcer(self, index: int) -> Any:
        site = self.info.sites[index]
        N, missing = self.tokens, self.missing_L[index]
        stats = self.stats

        def force(x_NE: torch.Tensor, live: Any) -> torch.Tensor:
            if x_NE.shape[0] != N:
                raise ReplayError(
                    f"replay: the router of decoder layer {site.layer} ({site.path}) scored "
                    f"{x_NE.shape[0]} tokens; the routes hold {N} (lead shape {self.lead}). Give "
                    "each forward its own `with replay(...)` with routes shaped like its input_ids")
            ids_LNK, miss_LN = self._on(x_NE.device)
            ids_NK = ids_LNK[index]
            if missing and self._strict_open:
                self._refuse_missing(self._miss_NL)
            if missing:  # NOTE: a host-side count: no device read to decide
                ids_NK = torch.where(miss_LN[index, :, None], live(), ids_NK)
            stats.router_calls += 1
            stats._ran.add(index)
            return ids_NK

        return force

    # ---- install / remove ---------------------------------------------------------------------
    def install(self) -> None:
        try:
            for i, site in enumerate(self.info.sites):
                scope = site.adapter.force_ids
                tap = TopkTap.attach(scope.owner_of(site.module, site.block), scope.method,
                                     num_experts=site.num_experts, top_k=site.top_k,
                                     values_from=scope.values_from,
                                     name=f"{self.info.architecture} {type(site.module).__name__} "
                                          f"at {site.path}")
                if tap.forcer is not None:
                    tap.detach()
                    raise ReplayError(f"replay: {site.path} is already under another replay; one "
                                      "replay block per model at a time")
                tap.forcer = self._forcer(i)
                self._taps.append(tap)
            step = self.info.step_module
            self._handles.append(step.register_forward_pre_hook(self._check_step, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for tap in self._taps:
            tap.forcer = None
            tap.detach()
        self._taps.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _refuse_missing(self, miss_NL: np.ndarray) -> None:
        n, li = np.argwhere(miss_NL)[0]
        raise ReplayError(
            f"replay(strict=True): {int(miss_NL.sum())} (token, layer) cells of real tokens are "
            f"missing (-1), the first at position {_position(n, self.lead)}, layer {li} (decoder "
            f"layer {self.info.moe_layers[li]}); strict mode replays every cell of a real token "
            "(padding, where the forward's 2-D attention_mask is 0, may be -1)")

    def _check_strict(self, kwargs: dict) -> None:
        miss_NL = self._miss_NL
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == self.lead:
            # NOTE: strict mode reads the mask on the host once per forward (a device sync if it
            # lives on an accelerator)
            real_N = mask.detach().reshape(-1).to("cpu").numpy() != 0
            miss_NL = miss_NL & real_N[:, None]
        if miss_NL.any():
            self._refuse_missing(miss_NL)
        self._strict_open = False

    def _check_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None and args and isinstance(args[0], torch.Tensor):
            x = args[0]
        shape = None
        if isinstance(x, torch.Tensor):
            shape = tuple(x.shape)
        elif isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            shape = tuple(kwargs["inputs_embeds"].shape[:-1])
        lead = self.lead
        if shape is not None and not (shape == lead or (len(lead) == 1 and shape == (1, *lead))
                                      or (len(shape) == 1 and lead == (1, *shape))):
            raise ReplayError(
                f"replay: the forward's input_ids have shape {shape}; the routes are for lead "
                f"shape {lead} (routes [*lead, L, K] must be shaped like the input_ids of the "
                "forward they replay)")
        if self._strict_open:
            self._check_strict(kwargs)


@contextmanager
def replay(model: nn.Module, routes: Any, *, strict: bool = False) -> Iterator[ReplayStats]:
    """Force every MoE router of ``model`` to take the expert ids in ``routes``.

    Args:
        model: a transformers MoE model routecap captures (``find_moe_routers``).
        routes: integer ``[*lead, L, K]`` (torch or numpy): ``lead`` is the shape of the
            forward's ``input_ids`` (``[B, S]``, or ``[1, T]`` / ``[T]`` packed), L the MoE layers in
            model order, K the router's top-k, ids logical in ``[0, E)``. A cell of all -1 is
            missing (or padding): the live router chooses it, and it is counted.
        strict: refuse routes with any missing cell.

    Yields:
        :class:`ReplayStats`, filled as the routers run.

    Run one forward (and its backward: a recompute there replays the same ids) per block.
    """
    state = _Replay(model, routes, strict=strict)
    state.install()
    try:
        yield state.stats
    except TopkTapError as e:
        raise ReplayError(f"replay: {e}") from e
    finally:
        state.remove()
